"""The streaming merge of part files into index order, in chunks of `chunk` indices.

Each part is read once, in the order of its first index, and cut (it is sorted by index) into one
piece per output chunk it has rows in. A chunk is complete, and is written, once every part that
starts before its end has been read. Pieces of later chunks wait in memory up to a budget; past
it they are spilled, all of them, to one temporary file beside the parts (lz4 Arrow IPC, one
stream per chunk at a recorded offset) and read back when their chunk comes. So the time is
O(rows) whatever the layout of the parts (one process: parts are contiguous and nothing is
spilled; `--shard I/N` with N large: every part spans most of the indices, and most rows are
spilled once), and memory is bounded by the budget, the chunk and the parts that have rows in the
current chunk.

The rows of a chunk are its pieces in part order (spilled pieces are always older than the ones
in memory), stably sorted by index, and of an index met twice the first row is kept: the same
rows, order and values as merging chunk by chunk from whole parts.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from tagclip_cli.errors import IncompleteRunError
from tagclip_cli.itemlist import LOCAL_BASE

MERGE_MEMORY = 32 << 20  # bytes of waiting pieces kept in memory before they are spilled


class ChunkBuffer:
    """Pieces of rows waiting for their chunk: in memory up to `budget` bytes, else in one spill
    file (each chunk's spilled rows an lz4 Arrow IPC stream at a recorded offset)."""

    def __init__(self, schema: pa.Schema, spill_path: Path, budget: int = MERGE_MEMORY) -> None:
        self.schema = schema
        self.spill_path = spill_path
        self.budget = budget
        self.current = 0  # the chunk being completed: its pieces are never spilled
        self.waiting: dict[int, list[pa.Table]] = {}
        self.waiting_bytes = 0
        self.spilled: dict[int, list[tuple[int, int]]] = {}  # chunk -> (offset, size) in the spill file
        self.fd: int | None = None
        self.size = 0

    def add(self, chunk: int, piece: pa.Table) -> None:
        self.waiting.setdefault(chunk, []).append(piece)
        if chunk > self.current:
            self.waiting_bytes += piece.nbytes
            if self.waiting_bytes > self.budget:
                self.spill()

    def spill(self) -> None:
        """Append every waiting piece of a later chunk to the spill file, one stream per chunk."""
        if self.fd is None:
            self.fd = os.open(self.spill_path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        options = pa.ipc.IpcWriteOptions(compression="lz4")
        plain = self.schema.remove_metadata()
        for chunk in sorted(c for c in self.waiting if c > self.current):
            sink = pa.BufferOutputStream()
            with pa.ipc.new_stream(sink, plain, options=options) as writer:
                for piece in self.waiting.pop(chunk):
                    writer.write_table(piece.replace_schema_metadata())
            data = sink.getvalue()
            view = memoryview(data)
            while view:
                view = view[os.pwrite(self.fd, view, self.size + len(data) - len(view)):]
            self.spilled.setdefault(chunk, []).append((self.size, len(data)))
            self.size += len(data)
        self.waiting_bytes = 0

    def take(self, chunk: int) -> pa.Table | None:
        """All rows of a chunk, in part order (spilled pieces first: they are the older ones)."""
        pieces = [pa.ipc.open_stream(os.pread(self.fd, size, offset)).read_all()  # type: ignore[arg-type]
                  .replace_schema_metadata(self.schema.metadata) for offset, size in self.spilled.pop(chunk, ())]
        pieces += self.waiting.pop(chunk, [])
        return pa.concat_tables(pieces) if pieces else None

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None
            self.spill_path.unlink(missing_ok=True)


def split_by_chunk(table: pa.Table, chunk: int, chunks: int) -> Iterator[tuple[int, pa.Table]]:
    """(chunk number, rows) of a table, by the chunk of `chunk` indices each row falls in; rows in
    no chunk below `chunks` are left out."""
    index = table.column("index").to_numpy()
    if len(index) > 1 and (np.diff(index) < 0).any():
        table = table.sort_by("index")
        index = table.column("index").to_numpy()
    numbers = index // chunk
    starts = np.r_[0, np.flatnonzero(np.diff(numbers)) + 1]
    stops = np.r_[starts[1:], len(index)]
    for start, stop in zip(starts.tolist(), stops.tolist(), strict=True):
        number = int(numbers[start])
        if 0 <= number < chunks:
            yield number, table.slice(start, stop - start)


def first_rows(table: pa.Table) -> pa.Table:
    """Sorted by index (stable), one row per index: the first one."""
    merged = table.sort_by("index")
    indices = merged.column("index").to_numpy()
    if len(indices) > 1 and (indices[1:] == indices[:-1]).any():
        merged = merged.filter(pa.array(np.r_[True, indices[1:] != indices[:-1]]))
    return merged


def iter_merged(parts: Sequence[tuple[int, Path]], schema: pa.Schema, total: int, chunk: int,
                spill_root: Path, budget: int | None = None,
                renumber: Callable[[np.ndarray], np.ndarray] | None = None) -> Iterator[pa.Table]:
    """The rows of the parts ((first index, path), by first index) in index order, one row per
    index, `chunk` indices at a time (budget: bytes of waiting rows held in memory, default
    MERGE_MEMORY; renumber: makes the local indices of a part global, jobs/listing.Numbering).
    Raises IncompleteRunError if an index below total has no row."""
    chunks = -(-total // chunk)
    buffer = ChunkBuffer(schema, spill_root / f".merge-{uuid.uuid4().hex[:12]}.arrows",
                         MERGE_MEMORY if budget is None else budget)
    following = 0
    try:
        for number in range(chunks):
            start, end = number * chunk, (number + 1) * chunk
            buffer.current = number
            while following < len(parts) and parts[following][0] < end:
                table = _renumbered(pq.read_table(parts[following][1]).cast(schema), renumber)
                for at, piece in split_by_chunk(table, chunk, chunks):
                    buffer.add(at, piece)
                following += 1
            rows = buffer.take(number)
            merged = first_rows(rows) if rows is not None else schema.empty_table()
            _check_complete(merged, start, min(end, total))
            if merged.num_rows:
                yield merged
    finally:
        buffer.close()


def _renumbered(table: pa.Table, renumber: Callable[[np.ndarray], np.ndarray] | None) -> pa.Table:
    """The table with its local indices made global (a part of global indices as it is)."""
    if renumber is None or not table.num_rows:
        return table
    index = table.column("index").to_numpy()
    if index.max() < LOCAL_BASE:
        return table
    at = table.schema.get_field_index("index")
    return table.set_column(at, table.schema.field(at), pa.array(renumber(index), pa.int64()))


def _check_complete(merged: pa.Table, start: int, stop: int) -> None:
    """Every index start..stop-1 has a row (the manifest said so; the part files must agree)."""
    indices = merged.column("index").to_numpy()
    present = np.count_nonzero((indices >= start) & (indices < stop))
    if present != stop - start:
        have = np.zeros(stop - start, dtype=bool)
        inside = indices[(indices >= start) & (indices < stop)]
        have[inside - start] = True
        first = start + int(np.flatnonzero(~have)[0])
        raise IncompleteRunError(f"image #{first} has no row in the part files although the manifest listed it; "
                                 "rerun the same command to redo the missing images, then merge again")
