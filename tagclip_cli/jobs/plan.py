"""The plan: the input list written once beside the parts (`OUT.parts/plan.parquet`: the columns of
the `ItemList`, with the input it was listed from), so that later `--shard` tasks of an array and
torchrun ranks other than 0 read it instead of listing the input again: a folder of millions is
walked once, a remote tar's headers are read once, not once per task.

A single-process run (and rank 0) lists the input itself and checks it against items.parquet, as
before, so an input that changed under an unfinished run is still refused. A `--shard` task that
finds a plan of the same input (the same arguments, from the same working directory) uses it: the
first task of an array fixes the list for all of them. Written atomically (a temporary file renamed):
tasks starting together may each write it, with the same content; a reader never sees half of one.
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

log = logging.getLogger(__name__)

PLAN_NAME = "plan.parquet"
PLAN_VERSION = 1
PLAN_KEY = b"tagclip.plan"


def input_key(**inputs: object) -> str:
    """What the input list was listed from: the input arguments and the working directory (relative
    paths are read from it)."""
    shown = {name: None if value is None else str(value) for name, value in sorted(inputs.items())}
    return json.dumps({"version": PLAN_VERSION, "cwd": os.getcwd(), **shown}, sort_keys=True)


def plan_path(parts: Path) -> Path:
    return Path(parts) / PLAN_NAME


def write_plan(items: ItemList, parts: Path, key: str) -> None:
    """plan.parquet in the work directory from the list's columns (no copy of them in Python)."""
    columns: dict[str, pa.Array] = {"image_id": items.ids}
    if items.paths is not None:
        columns["path"] = items.paths
    if items.coco_ids is not None:
        columns["coco_id"] = items.coco_ids
    if items.kinds is not None:
        for name in COLUMN_TYPES:
            columns[name] = pa.array(getattr(items, name))
    info = {"input": key, "prefix": items.prefix, "shards": items.shards, "columns": items.columns,
            "errors": {str(k): v for k, v in items.errors.items()},
            "raw_paths": {str(k): v.encode("utf-8", "surrogateescape").hex() for k, v in items.raw_paths.items()}}
    table = pa.table(columns).replace_schema_metadata({PLAN_KEY: json.dumps(info).encode()})
    with atomic_path(plan_path(parts)) as tmp:
        pq.write_table(table, tmp, compression="zstd")


def read_plan(parts: Path, key: str) -> ItemList | None:
    """The input list of the plan in this work directory if it was listed from the same input,
    else None (no plan, another input, or a plan this version cannot read: then the input is listed)."""
    path = plan_path(parts)
    if not path.is_file():
        return None
    try:
        info = json.loads((pq.read_schema(path).metadata or {})[PLAN_KEY])
        if info.get("input") != key:
            return None
        table = pq.read_table(path)
    except Exception as exc:  # damaged or of another version: list the input instead
        log.warning("cannot use the input plan %s (%s); listing the input", path, exc)
        return None
    items = _from_table(table, info)
    items.input_key, items.planned_in = key, str(Path(parts))
    return items


def _from_table(table: pa.Table, info: dict) -> ItemList:
    def column(name: str) -> pa.ChunkedArray | None:
        return table.column(name) if name in table.column_names else None  # as read: no second copy

    cols = None
    if "kinds" in table.column_names:
        cols = {name: np.asarray(column(name).to_numpy(), dtype=dtype) for name, dtype in COLUMN_TYPES.items()}
        cols.update(shards=info["shards"], columns=info["columns"],
                    errors={int(k): v for k, v in info["errors"].items()})
    raw = {int(k): bytes.fromhex(v).decode("utf-8", "surrogateescape") for k, v in info["raw_paths"].items()}
    return ItemList(column("image_id"), column("path"), info["prefix"], column("coco_id"), raw, cols)
