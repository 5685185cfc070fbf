"""The plan: the input list written once beside the parts (`OUT.parts/plan.arrow`: the columns of
the `ItemList`, with the input it was listed from), so that later `--shard` tasks of an array and
torchrun ranks other than 0 read it instead of listing the input again: a folder of millions is
walked once, a remote tar's headers are read once, not once per task.

A task reads only its share: the plan is an Arrow IPC file of record batches of `block` rows (the
window of the task that wrote it), read one batch at a time, so a task that owns windows
w % world == rank reads the batches that hold them, and a task that owns tar / Parquet units reads
the row ranges of its units (a table of each unit's first row is in the plan's metadata). Its time
and memory follow its share, not N: what stays O(N / block) is the file's footer (24 bytes per
batch), and O(units) the shard table. A task whose window differs from the writer's (another
--batch-size) reads the batches that overlap its windows, up to one more per window.

A single-process run (and rank 0) lists the input itself and checks it against items.parquet, as
before, so an input that changed under an unfinished run is still refused. A `--shard` task that
finds a plan of the same input (the same arguments, from the same working directory) uses it: the
first task of an array fixes the list for all of them. Written atomically (a temporary file renamed):
tasks starting together may each write it, with the same content; a reader never sees half of one.
An earlier version's plan (`plan.parquet`, version 1) is read whole, and the first task that reads
it writes `plan.arrow` beside it.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from tagclip_cli.fileio import atomic_path
from tagclip_cli.itemlist import COLUMN_TYPES, ItemList
from tagclip_cli.jobs.placement import Placement, window_positions

log = logging.getLogger(__name__)

PLAN_NAME = "plan.arrow"
OLD_PLAN_NAME = "plan.parquet"  # version 1: one Parquet table, read whole
PLAN_VERSION = 1  # of the input key (what was listed), not of the file
PLAN_FORMAT = 2
PLAN_KEY = b"tagclip.plan"
SLICE_ROWS = 1 << 16  # the plan is written from this many rows of the columns at a time


def input_key(**inputs: object) -> str:
    """What the input list was listed from: the input arguments and the working directory (relative
    paths are read from it)."""
    shown = {name: None if value is None else str(value) for name, value in sorted(inputs.items())}
    return json.dumps({"version": PLAN_VERSION, "cwd": os.getcwd(), **shown}, sort_keys=True)


def plan_path(parts: Path) -> Path:
    return Path(parts) / PLAN_NAME


# ---- writing ----------------------------------------------------------------------------------------

def write_plan(items: ItemList, parts: Path, key: str, block: int) -> None:
    """plan.arrow in the work directory from the list's columns, in record batches of `block` rows
    (the writer's window), a slice of the columns at a time."""
    info = {"input": key, "format": PLAN_FORMAT, "total": len(items), "block": block, "prefix": items.prefix,
            "id_prefix": items.id_prefix,
            "shards": items.shards, "columns": items.columns, "units": unit_runs(items),
            "errors": {str(k): v for k, v in items.errors.items()},
            "raw_paths": {str(k): v.encode("utf-8", "surrogateescape").hex() for k, v in items.raw_paths.items()}}
    schema = _plan_schema(items).with_metadata({PLAN_KEY: json.dumps(info).encode()})
    step = block * max(1, SLICE_ROWS // block)  # slices of whole batches: every batch but the last has `block` rows
    with atomic_path(plan_path(parts)) as tmp:
        with pa.OSFile(str(tmp), "wb") as sink, pa.ipc.new_file(sink, schema) as writer:
            for start in range(0, len(items), step):
                writer.write_table(_plan_slice(items, start, min(len(items), start + step), schema),
                                   max_chunksize=block)


def _plan_schema(items: ItemList) -> pa.Schema:
    fields = [("image_id", pa.large_string())]
    if items.paths is not None:
        fields.append(("path", pa.large_string()))
    if items.coco_ids is not None:
        fields.append(("coco_id", pa.int64()))
    if items.kinds is not None:
        fields += [(name, pa.from_numpy_dtype(dtype)) for name, dtype in COLUMN_TYPES.items()]
    return pa.schema(fields)


def _plan_slice(items: ItemList, start: int, stop: int, schema: pa.Schema) -> pa.Table:
    """Rows start..stop of the plan, each column one chunk (so that batches are cut at `block` rows)."""
    arrays = []
    for name in schema.names:
        if name in COLUMN_TYPES:
            arrays.append(pa.array(getattr(items, name)[start:stop]))
        else:
            column = {"image_id": items.ids, "path": items.paths, "coco_id": items.coco_ids}[name]
            arrays.append(column.slice(start, stop - start))
    return pa.table(arrays, schema=schema.remove_metadata()).combine_chunks()


def unit_runs(items: ItemList) -> dict | None:
    """{"unit": [...], "start": [...]}: the first row of each unit (tar / Parquet shard) when every
    item lives in one and each unit's items are consecutive (as listing makes them); else None."""
    units = items.unit_column()
    if units is None or not len(units) or (units < 0).any():
        return None
    starts = np.r_[0, np.flatnonzero(np.diff(units) != 0) + 1]
    if len(np.unique(units[starts])) != len(starts):
        return None
    return {"unit": units[starts].tolist(), "start": starts.tolist()}


# ---- reading ----------------------------------------------------------------------------------------

def read_plan(parts: Path, key: str, placement: Placement | None = None, window: int | None = None) -> ItemList | None:
    """The input list of the plan in this work directory if it was listed from the same input,
    else None (no plan, another input, or a plan this version cannot read: then the input is listed).
    With a placement and its window, only that share is read (`ItemList.hold`); else all of it."""
    path = plan_path(parts)
    if not path.is_file():
        return _read_old_plan(parts, key)
    try:
        with pa.OSFile(str(path)) as source:
            reader = pa.ipc.open_file(source)
            info = json.loads((reader.schema.metadata or {})[PLAN_KEY])
            if info.get("input") != key or info.get("format") != PLAN_FORMAT:
                return None
            items = None
            if placement is not None and window is not None:
                items = _read_share(reader, info, placement, window)
            if items is None:
                items = _from_table(reader.read_all(), info)
    except Exception as exc:  # damaged or of another version: list the input instead
        log.warning("cannot use the input plan %s (%s); listing the input", path, exc)
        return None
    items.input_key, items.planned_in = key, str(Path(parts))
    return items


def share_positions(info: dict, placement: Placement, window: int) -> tuple[np.ndarray, tuple] | None:
    """The positions a placement owns in a plan (increasing), and what they were dealt for; None when
    its list mixes plain items and units (then the plan is read whole)."""
    total = info["total"]
    runs = info.get("units")
    if runs is not None:
        units = np.asarray(runs["unit"], dtype=np.int64)
        starts = np.asarray(runs["start"], dtype=np.int64)
        stops = np.r_[starts[1:], total].astype(np.int64)
        mine = units % placement.world == placement.rank
        lengths = stops[mine] - starts[mine]
        first = np.repeat(starts[mine] - np.r_[0, np.cumsum(lengths)[:-1]], lengths)
        return first + np.arange(int(lengths.sum()), dtype=np.int64), (placement.rank, placement.world, None)
    if info["shards"]:  # shard items without a unit table: not consecutive, or mixed with plain ones
        return None
    return window_positions(total, window, placement.rank, placement.world), (placement.rank, placement.world, window)


def _read_share(reader: pa.ipc.RecordBatchFileReader, info: dict, placement: Placement, window: int) -> ItemList | None:
    """The rows of this placement's share: the record batches that hold them, then those rows."""
    found = share_positions(info, placement, window)
    if found is None:
        return None
    positions, owner = found
    block = info["block"]
    blocks = np.unique(positions // block)
    table = pa.Table.from_batches([reader.get_batch(int(b)) for b in blocks], reader.schema)
    rows = np.searchsorted(blocks, positions // block) * block + positions % block
    if table.num_rows != len(positions):
        table = table.take(pa.array(rows))
    held = set(positions.tolist()) if info["errors"] or info["raw_paths"] else set()
    share = {**info, "errors": {k: v for k, v in info["errors"].items() if int(k) in held},
             "raw_paths": {k: v for k, v in info["raw_paths"].items() if int(k) in held}}
    return _from_table(table, share).hold(positions, info["total"], owner)


def _read_old_plan(parts: Path, key: str) -> ItemList | None:
    """An earlier version's plan.parquet, read whole (then `PartStore.open` writes plan.arrow)."""
    path = Path(parts) / OLD_PLAN_NAME
    if not path.is_file():
        return None
    try:
        info = json.loads((pq.read_schema(path).metadata or {})[PLAN_KEY])
        if info.get("input") != key:
            return None
        items = _from_table(pq.read_table(path), info)
    except Exception as exc:  # damaged or of another version: list the input instead
        log.warning("cannot use the input plan %s (%s); listing the input", path, exc)
        return None
    items.input_key, items.planned_in = key, str(Path(parts))
    return items


def _from_table(table: pa.Table, info: dict) -> ItemList:
    def column(name: str) -> pa.Array | None:  # one chunk: items are looked up by row
        return table.column(name).combine_chunks() if name in table.column_names else None

    cols = None
    if "kinds" in table.column_names:
        cols = {name: np.asarray(column(name).to_numpy(), dtype=dtype) for name, dtype in COLUMN_TYPES.items()}
        cols.update(shards=info["shards"], columns=info["columns"],
                    errors={int(k): v for k, v in info["errors"].items()})
    raw = {int(k): bytes.fromhex(v).decode("utf-8", "surrogateescape") for k, v in info["raw_paths"].items()}
    return ItemList(column("image_id"), column("path"), info["prefix"], column("coco_id"), raw, cols,
                    info.get("id_prefix", ""))
