"""The input list of a run whose `--shard` tasks each listed only their own row groups of Parquet
inputs or their own tar shards (`OwnedItems`, shardsources.list_parquet_share / list_tars_share):
no task can write `items.parquet` (the whole list) or the plan, so each writes its piece of the
list, `OUT.parts/listing/<first index>-<digest>.parquet` (items.parquet's rows of its items,
atomically), and `tagclip merge` puts `items.parquet` together from the pieces (the streaming
merge of jobs/merge.py) once they cover the whole input.

Parquet: every file's footer gives its row count, so a task's indices are global from the start
and its part files are the same as any other run's. Tars give no count without reading a shard,
and a task reads nothing of the shards it does not own: it numbers its samples with local indices
(itemlist.local_indices: shard number and place in the shard, in the global order), its piece
records the row count of each shard it owns, and its parts carry the local indices. Once a piece
of every shard is there, `Numbering` turns local indices into global ones (the global index of a
shard's first row is the sum of the earlier shards' counts); so do the plan's unit table, or a
whole-list run's own listing. `tagclip merge` renumbers the pieces, the manifest's runs and the
parts' rows as it reads them; global indices pass through, so parts of tasks that listed the
whole input (a plan, an earlier run) mix freely with local ones on one OUT.

A piece records the input it was listed from, and the number of images of the whole input
(Parquet) or the number of tar shards and the counts of its own (tars): a task of another input
refuses to join (ConfigMismatchError), as does a whole-list run whose counts differ from the pieces'.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from tagclip_cli.errors import ConfigMismatchError, IncompleteRunError
from tagclip_cli.fileio import atomic_path
from tagclip_cli.itemlist import LOCAL_BASE, PARQUET, SHARD_SHIFT, ItemList, OwnedItems
from tagclip_cli.jobs.merge import iter_merged
from tagclip_cli.jobs.plan import PLAN_KEY, plan_path

LISTING_DIR = "listing"
LISTING_KEY = b"tagclip.listing"
ITEMS_SCHEMA = pa.schema([("index", pa.int64()), ("image_id", pa.string()), ("path", pa.string()),
                          ("coco_id", pa.int64())])
ITEMS_SLICE = 1 << 16  # items.parquet is written and compared this many rows at a time (row groups)
SHARD_MASK = (1 << SHARD_SHIFT) - 1


# ---- local indices -> global ones -------------------------------------------------------------------

class Numbering:
    """Local indices -> global ones: `firsts[s]` the global index of tar shard s's first row (-1:
    not known), `total` the number of images of the whole input when known."""

    def __init__(self, firsts: np.ndarray, total: int | None = None) -> None:
        self.firsts = np.asarray(firsts, dtype=np.int64)
        self.total = total

    @classmethod
    def of_counts(cls, counts: np.ndarray) -> Numbering:
        counts = np.asarray(counts, dtype=np.int64)
        return cls(np.cumsum(counts) - counts, int(counts.sum()))

    def to_global(self, indices: np.ndarray) -> np.ndarray:
        """indices with every local one whose shard is known made global (the others as they are)."""
        indices = np.asarray(indices, dtype=np.int64)
        local = indices >= LOCAL_BASE
        if not local.any():
            return indices
        offset = indices[local] - LOCAL_BASE
        shard = offset >> SHARD_SHIFT
        known = shard < len(self.firsts)
        first = np.full(len(shard), -1, dtype=np.int64)
        first[known] = self.firsts[shard[known]]
        out = indices.copy()
        out[local] = np.where(first >= 0, first + (offset & SHARD_MASK), indices[local])
        return out


def shard_numbering(parts: Path) -> Numbering | None:
    """The numbering of the tar shards of the input of this work directory: from the pieces when
    they hold every shard's count, else from the plan's unit table (a whole-list run wrote it);
    None when neither knows it yet."""
    counts, shards = _piece_counts(pieces(parts))
    if shards is not None and len(counts) == shards:
        return Numbering.of_counts(np.array([counts[s] for s in range(shards)], dtype=np.int64))
    path = plan_path(parts)
    if not path.is_file():
        return None
    try:
        with pa.OSFile(str(path)) as source:
            info = json.loads((pa.ipc.open_file(source).schema.metadata or {})[PLAN_KEY])
    except Exception:  # damaged: the plan's own reader says so when it matters
        return None
    runs = info.get("units")
    if not runs:
        return None
    firsts = np.full(max(runs["unit"]) + 1, -1, dtype=np.int64)
    firsts[np.asarray(runs["unit"], dtype=np.int64)] = runs["start"]
    return Numbering(firsts, info["total"])


def whole_list_numbering(items: ItemList) -> Numbering | None:
    """The numbering of a whole list of tar samples (its units are its shards), None for others."""
    units = items.unit_column()
    if units is None or not len(units) or (units < 0).any() or items.held is not None or (items.kinds == PARQUET).any():
        return None
    return Numbering.of_counts(np.bincount(units))


# ---- the pieces ---------------------------------------------------------------------------------------

def piece_name(items: OwnedItems) -> str:
    """The file name of a task's piece: its first index and a digest of all of them (a rerun of the
    task writes the same file; tasks of another split of the same input write others)."""
    digest = hashlib.sha256(items.positions.tobytes())
    if items.numbered_locally:
        digest.update(json.dumps(sorted(items.counts.items())).encode())  # type: ignore[union-attr]
    if len(items):
        first = int(items.positions[0])
    else:  # a task whose tar shards hold no image: named by the first of them
        first = LOCAL_BASE + (min(items.counts or {0: 0}) << SHARD_SHIFT)
    return f"{int(first):012d}-{digest.hexdigest()[:16]}.parquet"


def pieces(parts: Path) -> list[tuple[Path, dict]]:
    """(path, info) of every piece in the work directory (footers only): info {"input", "total"}
    (Parquet) or {"input", "shards", "counts": [[shard, rows], ...]} (tars)."""
    folder = Path(parts) / LISTING_DIR
    if not folder.is_dir():
        return []
    found = []
    for path in sorted(folder.glob("*.parquet")):
        found.append((path, json.loads((pq.read_schema(path).metadata or {})[LISTING_KEY])))
    return found


def _piece_counts(found: list[tuple[Path, dict]]) -> tuple[dict[int, int], int | None]:
    """The tar shards' counts the pieces hold, and the number of tar shards (None: no tar piece)."""
    counts: dict[int, int] = {}
    shards = None
    for _, info in found:
        if "counts" in info:
            shards = info["shards"]
            counts.update((int(s), int(rows)) for s, rows in info["counts"])
    return counts, shards


@dataclass(frozen=True)
class Listed:
    """What a run listed, to check the pieces against: its input (None: not known), the number of
    images (None: not known: a task that numbered its own tar shards) and of tar shards, and the
    row count of each tar shard it knows (complete: of every shard, those not named have none)."""

    key: str | None
    total: int | None
    shards: int | None = None
    counts: dict[int, int] | None = None
    complete: bool = False

    @classmethod
    def of(cls, items: ItemList | OwnedItems) -> Listed:
        if isinstance(items, OwnedItems):
            return cls(items.input_key, items.total, items.shards, items.counts)
        return cls(items.input_key, len(items))


def check_pieces(parts: Path, out: Path, listed: Listed, whole: ItemList | None = None) -> None:
    """Refuse (one line) when the pieces there were listed from another input than this run's, or
    count another number of images or tar shards, or another number of rows in a tar shard. whole:
    the whole list the run listed (its tar shards' counts are compared with the pieces')."""
    found = pieces(parts)
    if whole is not None and any("counts" in info for _, info in found):
        numbering = whole_list_numbering(whole)
        if numbering is not None:
            counts = np.diff(np.r_[numbering.firsts, numbering.total])
            listed = Listed(listed.key, listed.total, None, dict(enumerate(counts.tolist())), complete=True)
    for path, info in found:
        if listed.key is not None and info.get("input") not in (None, listed.key):
            _refuse(out, path, info, listed)
        if "counts" not in info:
            if listed.total is None:  # (tar tasks of the version before local numbering: global pieces)
                raise ConfigMismatchError(
                    f"{out}: the --shard tasks there numbered their images as an earlier version of tagclip-cli "
                    f"did ({path.name}); finish them with that version, or start a new OUT")
            if info["total"] != listed.total:
                _refuse(out, path, info, listed)
            continue
        if (listed.shards is None and not listed.complete) or listed.shards not in (None, info["shards"]):
            _refuse(out, path, info, listed)
        for shard, rows in info["counts"]:
            had = (listed.counts or {}).get(shard, 0 if listed.complete else None)
            if had is not None and had != rows:
                raise ConfigMismatchError(
                    f"{out}: tar shard #{shard} of the input has {had} rows here, {rows} as another --shard task "
                    f"listed it ({path.name}; did the shard change?); rerun every task on the same input, or start "
                    "a new OUT")


def _refuse(out: Path, path: Path, info: dict, listed: Listed) -> None:
    def size(total: int | None, shards: int | None) -> str:
        return f"{total} images" if total is not None else f"{shards} tar shards"

    now = listed.total if listed.total is not None else listed.shards
    raise ConfigMismatchError(
        f"{out}: the --shard tasks there listed a different input ({path.name}: "
        f"{size(info.get('total'), info.get('shards'))}, now {now}); rerun with the same inputs, or start a new OUT")


def write_piece(parts: Path, out: Path, items: OwnedItems) -> None:
    """This task's piece of the input list (nothing when it owns no image, or no tar shard), after
    checking that the pieces already there are of the same input."""
    check_pieces(parts, out, Listed.of(items))
    if not (items.counts if items.numbered_locally else len(items)):
        return
    folder = Path(parts) / LISTING_DIR
    folder.mkdir(exist_ok=True)
    info = {"input": items.input_key, "total": items.total} if not items.numbered_locally else \
        {"input": items.input_key, "shards": items.shards, "counts": sorted(items.counts.items())}  # type: ignore
    table = items.table().cast(ITEMS_SCHEMA).replace_schema_metadata({LISTING_KEY: json.dumps(info).encode()})
    with atomic_path(folder / piece_name(items)) as tmp:
        pq.write_table(table, tmp, compression="zstd", row_group_size=ITEMS_SLICE)


def assemble_items(parts: Path, out: Path) -> bool:
    """items.parquet from the pieces, when there are some (False: none), renumbered to global
    indices. IncompleteRunError naming the first images (or tar shards) no task has listed yet
    (their tasks have not started)."""
    found = pieces(parts)
    if not found:
        return False
    counts, shards = _piece_counts(found)
    first = found[0][1]
    check_pieces(parts, out, Listed(None, first.get("total"), first.get("shards"), counts if shards else None))
    numbering = _tar_numbering(out, counts, shards) if shards is not None else None
    total = numbering.total if numbering is not None else first["total"]
    firsts = []
    for path, _ in found:
        index = pq.read_table(path, columns=["index"]).column("index").to_numpy()
        if len(index):
            firsts.append((int(index[0]) if numbering is None else int(numbering.to_global(index[:1])[0]), path))
    if numbering is None:
        _check_listed(found, out, total)
    renumber = None if numbering is None else numbering.to_global
    with atomic_path(Path(parts) / "items.parquet") as tmp:
        with pq.ParquetWriter(tmp, ITEMS_SCHEMA, compression="zstd") as writer:
            for table in iter_merged(sorted(firsts), ITEMS_SCHEMA, total, ITEMS_SLICE, Path(parts), renumber=renumber):
                writer.write_table(table)
    return True


def _tar_numbering(out: Path, counts: dict[int, int], shards: int) -> Numbering:
    """The numbering of the pieces' tar shards; IncompleteRunError naming the shards no piece holds."""
    missing = [s for s in range(shards) if s not in counts]
    if missing:
        examples = ", ".join(f"#{s}" for s in missing[:3])
        raise IncompleteRunError(
            f"{out}: {len(missing)} of {shards} tar shards have not been listed yet (e.g. {examples}): the --shard "
            "tasks that own them have not started; run every shard, then merge again")
    return Numbering.of_counts(np.array([counts[s] for s in range(shards)], dtype=np.int64))


def _check_listed(found: list[tuple[Path, dict]], out: Path, total: int) -> None:
    """Every index 0..total-1 is in some piece (of Parquet tasks), else IncompleteRunError."""
    listed = np.zeros(total, dtype=bool)
    for path, _ in found:
        listed[pq.read_table(path, columns=["index"]).column("index").to_numpy()] = True
    missing = np.flatnonzero(~listed)
    if len(missing):
        examples = ", ".join(f"#{i}" for i in missing[:3].tolist())
        raise IncompleteRunError(
            f"{out}: {len(missing)} of {total} images have not been listed yet (e.g. {examples}): the --shard "
            "tasks that own them have not started; run every shard, then merge again")


def positions_in(path: Path, items: OwnedItems, numbering: Numbering | None = None) -> np.ndarray | None:
    """The global indices of a task's items in a Parquet file whose row r is index r (a finished
    output, items.parquet): its own when global, else from the numbering, else found by the
    image_id of each owned shard's first row (one pass over that column, a slice at a time). None
    when one of them is not there (another input)."""
    if not items.numbered_locally:
        return items.positions
    if numbering is not None and (numbering.to_global(items.positions) < LOCAL_BASE).all():
        return numbering.to_global(items.positions)
    if not len(items):
        return items.positions[:0]
    shard = (items.positions - LOCAL_BASE) >> SHARD_SHIFT
    starts = np.r_[0, np.flatnonzero(np.diff(shard)) + 1]
    wanted = items.table().column("image_id").take(pa.array(starts))
    found: dict[str, int] = {}
    row = 0
    for batch in pq.ParquetFile(path).iter_batches(batch_size=ITEMS_SLICE, columns=["image_id"]):
        ids = batch.column(0)
        for at in np.flatnonzero(pc.is_in(ids, value_set=wanted).to_numpy(zero_copy_only=False)).tolist():
            found.setdefault(ids[at].as_py(), row + at)
        row += batch.num_rows
    if any(image_id not in found for image_id in wanted.to_pylist()):
        return None
    heads = np.array([found[image_id] for image_id in wanted.to_pylist()], dtype=np.int64)
    return np.repeat(heads, np.diff(np.r_[starts, len(items)])) + (items.positions & SHARD_MASK)


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
