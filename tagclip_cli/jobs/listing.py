"""The input list of a run whose `--shard` tasks each listed only their own row groups of Parquet
inputs (`OwnedItems`, shardsources.list_parquet_share): no task can write `items.parquet` (the
whole list) or the plan, so each writes its piece of the list, `OUT.parts/listing/<first
index>-<digest>.parquet` (items.parquet's rows of its items, by global index, atomically), and
`tagclip merge` puts `items.parquet` together from the pieces (the streaming merge of
jobs/merge.py) once they cover every index. The indices are global from the start (every file's
footer gives its row count), so the part files of such tasks are the same as any other run's, and
tasks that listed the whole input (a plan, an earlier run) mix freely with them on one OUT.

A piece records the input it was listed from and the number of images of the whole input: a
task of another input refuses to join (ConfigMismatchError), as does a whole-list run whose count
differs from the pieces'.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from tagclip_cli.errors import ConfigMismatchError, IncompleteRunError
from tagclip_cli.fileio import atomic_path
from tagclip_cli.itemlist import OwnedItems
from tagclip_cli.jobs.merge import iter_merged

LISTING_DIR = "listing"
LISTING_KEY = b"tagclip.listing"
ITEMS_SCHEMA = pa.schema([("index", pa.int64()), ("image_id", pa.string()), ("path", pa.string()),
                          ("coco_id", pa.int64())])
ITEMS_SLICE = 1 << 16  # items.parquet is written and compared this many rows at a time (row groups)


def piece_name(items: OwnedItems) -> str:
    """The file name of a task's piece: its first index and a digest of all of them (a rerun of the
    task writes the same file; tasks of another split of the same input write others)."""
    digest = hashlib.sha256(items.positions.tobytes()).hexdigest()[:16]
    return f"{int(items.positions[0]):012d}-{digest}.parquet"


def pieces(parts: Path) -> list[tuple[Path, dict]]:
    """(path, {"input", "total"}) of every piece in the work directory (footers only)."""
    folder = Path(parts) / LISTING_DIR
    if not folder.is_dir():
        return []
    found = []
    for path in sorted(folder.glob("*.parquet")):
        found.append((path, json.loads((pq.read_schema(path).metadata or {})[LISTING_KEY])))
    return found


def check_pieces(parts: Path, out: Path, total: int, key: str | None) -> None:
    """Refuse (one line) when the pieces there were listed from another input than this run's
    (`key`, None: not known) or count another number of images."""
    for path, info in pieces(parts):
        other = key is not None and info.get("input") not in (None, key)
        if info["total"] != total or other:
            raise ConfigMismatchError(
                f"{out}: the --shard tasks there listed a different input ({path.name}: {info['total']} images, "
                f"now {total}); rerun with the same inputs, or start a new OUT")


def write_piece(parts: Path, out: Path, items: OwnedItems) -> None:
    """This task's piece of the input list (nothing when it owns no image), after checking that the
    pieces already there are of the same input."""
    check_pieces(parts, out, items.total, items.input_key)
    if not len(items):
        return
    folder = Path(parts) / LISTING_DIR
    folder.mkdir(exist_ok=True)
    info = json.dumps({"input": items.input_key, "total": items.total}).encode()
    table = items.table().cast(ITEMS_SCHEMA).replace_schema_metadata({LISTING_KEY: info})
    with atomic_path(folder / piece_name(items)) as tmp:
        pq.write_table(table, tmp, compression="zstd", row_group_size=ITEMS_SLICE)


def assemble_items(parts: Path, out: Path) -> bool:
    """items.parquet from the pieces, when there are some (False: none). IncompleteRunError naming
    the first images no task has listed yet (their tasks have not started)."""
    found = pieces(parts)
    if not found:
        return False
    total = found[0][1]["total"]
    check_pieces(parts, out, total, None)
    listed = np.zeros(total, dtype=bool)
    firsts = []
    for path, _ in found:
        index = pq.read_table(path, columns=["index"]).column("index").to_numpy()
        listed[index] = True
        firsts.append((int(index[0]), path))
    missing = np.flatnonzero(~listed)
    if len(missing):
        examples = ", ".join(f"#{i}" for i in missing[:3].tolist())
        raise IncompleteRunError(
            f"{out}: {len(missing)} of {total} images have not been listed yet (e.g. {examples}): the --shard "
            "tasks that own them have not started; run every shard, then merge again")
    with atomic_path(Path(parts) / "items.parquet") as tmp:
        with pq.ParquetWriter(tmp, ITEMS_SCHEMA, compression="zstd") as writer:
            for table in iter_merged(sorted(firsts), ITEMS_SCHEMA, total, ITEMS_SLICE, Path(parts)):
                writer.write_table(table)
    return True


def rows_at(path: Path, positions: np.ndarray, columns: list[str]) -> pa.Table:
    """The rows at these (increasing) positions of a Parquet file whose row r is index r (an output,
    items.parquet), reading only the row groups that hold some of them."""
    stored = pq.ParquetFile(path)
    tables, start = [], 0
    for group in range(stored.metadata.num_row_groups):
        stop = start + stored.metadata.row_group(group).num_rows
        lo, hi = np.searchsorted(positions, [start, stop])
        if hi > lo:
            rows = stored.read_row_group(group, columns=columns)
            tables.append(rows.take(pa.array(positions[lo:hi] - start)))
        start = stop
    return pa.concat_tables(tables) if tables else stored.schema_arrow.empty_table().select(columns)
