"""The merge of part files as it was before the streaming k-way merge (tagclip-cli up to issue 25),
kept as the reference its replacement is checked against (tests/test_merge.py: same bytes) and
timed against (benchmarks/bench_scale.py).

For each chunk of indices it reads the parts that start in it, keeps every part that has not ended
yet, and filters every kept part to the chunk: with `--shard I/N` layouts, where each part spans
most of the indices, that is O(chunks x parts) and holds every spanning part in memory.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq


def reference_iter_merged(parts: Sequence[tuple[int, int, Path]], schema: pa.Schema, total: int,
                          chunk: int = 4096) -> Iterator[pa.Table]:
    """The rows of the parts ((first index, last index, path), sorted) in index order, one row per
    index, `chunk` indices at a time."""
    active: list[tuple[int, pa.Table]] = []
    next_part = 0
    for start in range(0, total, chunk):
        end = start + chunk
        while next_part < len(parts) and parts[next_part][0] < end:
            _, hi, path = parts[next_part]
            active.append((hi, pq.read_table(path).cast(schema)))
            next_part += 1
        pieces = []
        for _, table in active:
            idx = table.column("index")
            pieces.append(table.filter(pc.and_(pc.greater_equal(idx, start), pc.less(idx, end))))
        merged = pa.concat_tables(pieces).sort_by("index") if pieces else schema.empty_table()
        indices = merged.column("index").to_numpy()
        if len(indices) > 1 and (indices[1:] == indices[:-1]).any():
            merged = merged.filter(pa.array(np.r_[True, indices[1:] != indices[:-1]]))
        active = [(hi, table) for hi, table in active if hi >= end]
        if merged.num_rows:
            yield merged


def write_layout(store, n: int, rows, shards: int, window: int, part_size: int, begin_shard=None) -> int:
    """Write results for indices 0..n-1 into a PartStore as the part files that `--shard I/shards`
    runs with this window and part size leave (shards=1: one process): shard I takes windows I,
    I+shards, ..., and writes a part when it holds part_size rows or more after a window.
    rows(indices) gives the result rows of those indices; begin_shard(store), if given, is called
    before each shard's parts. Returns the number of parts."""
    windows = -(-n // window)
    count = 0
    for shard in range(shards):
        if begin_shard is not None:
            begin_shard(store)
        held: list[np.ndarray] = []
        size = 0
        for w in range(shard, windows, shards):
            held.append(np.arange(w * window, min(n, (w + 1) * window)))
            size += len(held[-1])
            if size >= part_size:
                store.write_part(rows(np.concatenate(held)))
                held, size, count = [], 0, count + 1
        if held:
            store.write_part(rows(np.concatenate(held)))
            count += 1
    return count
