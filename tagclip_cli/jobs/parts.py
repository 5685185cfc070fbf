"""The work directory OUT.parts/ (config.json, items.parquet, job.json, atomic part files), the
checks that let a run resume, the streaming merge and the final writers (`tagclip merge`)."""

from __future__ import annotations

import json
import logging
import shutil
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from tagclip_cli.errors import (
    ConfigMismatchError,
    IncompleteRunError,
    OutputWriteError,
    UsageError,
)
from tagclip_cli.faults import deferred_signals
from tagclip_cli.fileio import atomic_path, write_json_atomic
from tagclip_cli.itemlist import LOCAL_BASE, ItemList, ItemShare, OwnedItems, as_share, total_items
from tagclip_cli.jobs.listing import (
    ITEMS_SCHEMA,
    ITEMS_SLICE,
    Listed,
    Numbering,
    assemble_items,
    check_pieces,
    positions_in,
    rows_at,
    shard_numbering,
    whole_list_numbering,
    write_piece,
)
from tagclip_cli.jobs.manifest import MANIFEST_DIR, ManifestWriter, PartEntry, PartIndex
from tagclip_cli.jobs.merge import iter_merged
from tagclip_cli.jobs.plan import plan_path, write_plan
from tagclip_cli.record import RecordIO, RunRecord, describe_changes, only_thresholds_changed
from tagclip_cli.sources import ImageItem
from tagclip_cli.writers import (
    COCO_JSON_FORMAT,
    MASKS_PARQUET_FORMAT,
    ROW_GROUP_SIZE,
    read_record,
    write_coco_json,
    write_masks_parquet,
    write_parquet_atomic,
)

log = logging.getLogger(__name__)


# ---- the work directory ---------------------------------------------------------------------------

def parts_dir(out: Path) -> Path:
    return out.with_name(out.name + ".parts")


def items_table(items: Sequence[ImageItem]) -> pa.Table:
    """items.parquet's columns (index, image_id, path, coco_id) for a whole input list."""
    return ItemList.of(items).table()


def item_slices(items: ItemList, size: int = ITEMS_SLICE) -> Iterator[pa.Table]:
    """items.parquet's rows, `size` at a time (made from the columns, never all at once)."""
    for start in range(0, len(items), size):
        yield items.table(start, min(len(items), start + size))


def write_items(items: ItemList, path: Path) -> None:
    """items.parquet, atomically, a slice at a time."""
    with atomic_path(path) as tmp:
        if len(items) <= ITEMS_SLICE:  # one slice: one call
            pq.write_table(items.table(), tmp, compression="zstd")
            return
        with pq.ParquetWriter(tmp, ITEMS_SCHEMA, compression="zstd") as writer:
            for table in item_slices(items):
                writer.write_table(table)


def items_differ(path: Path, items: ItemList) -> str | None:
    """How the input list stored at path differs from items (None: the same), compared a slice at a
    time. An items.parquet of an earlier version has the same columns and is compared the same way."""
    stored = pq.ParquetFile(path)
    total = stored.metadata.num_rows
    if total != len(items):
        return (f"the unfinished run there has a different input list ({total} images, "
                f"now {len(items)})")
    start = 0
    for batch in stored.iter_batches(batch_size=ITEMS_SLICE):
        previous = pa.Table.from_batches([batch]).cast(ITEMS_SCHEMA)
        current = items.table(start, start + batch.num_rows)
        if not previous.equals(current):
            return describe_item_difference(previous, current, start)
        start += batch.num_rows
    return None


class PartStore:
    """The work directory of one output: configuration, input list, atomic part files and the
    manifest that says what each part holds (jobs/manifest.py)."""

    def __init__(self, out: Path) -> None:
        self.out = Path(out)
        self.dir = parts_dir(self.out)
        self.manifest = ManifestWriter(self.dir / MANIFEST_DIR)
        self._index: PartIndex | None = None  # the scan at the start of this process
        self._numbering: Numbering | None = None  # local indices -> global ones, once known

    @classmethod
    def open(
        cls,
        out: Path,
        config: RunRecord,
        items: Sequence[ImageItem],
        job: dict,
        overwrite: bool = False,
        create: bool = True,
    ) -> PartStore:
        """Create or reopen the work directory for this config and input list (or refuse).

        create=False (torchrun ranks other than 0) only checks what rank 0 created."""
        store = cls(out)
        if not store.out.parent.is_dir():
            raise UsageError(f"{store.out.parent}: output directory does not exist")
        if create:
            if overwrite:
                shutil.rmtree(store.dir, ignore_errors=True)
            else:
                store._refuse_existing_output(config)
            try:
                store.dir.mkdir(exist_ok=True)
            except OSError as exc:
                raise UsageError(f"{store.dir}: cannot create the work directory ({exc.strerror or exc})") from exc
        elif not store.dir.is_dir():
            raise UsageError(f"{store.dir}: the work directory is not visible here (is OUT on a shared filesystem?)")
        store._check_or_write_config(config, create)
        store._check_or_write_items(items, create, job.get("window", 1))
        store._note_job(job, create)
        if create:  # the leader indexes parts the manifest lacks (an earlier version's) before the others look
            (store.dir / MANIFEST_DIR).mkdir(exist_ok=True)
            store.index()
        return store

    def refuse_other_settings(self, config: RunRecord, items: Sequence[ImageItem]) -> None:
        """The refusals of `open` (without --overwrite) that need only the files there, so that they
        come before the model loads: an output made with other settings, an unfinished run with
        other settings or inputs (ConfigMismatchError naming each difference)."""
        self._refuse_existing_output(config)
        if (self.dir / "config.json").exists():
            self._check_config(RecordIO.read_config(self.dir / "config.json"), config)
        if (self.dir / "items.parquet").exists():
            self._check_items(items)
        elif isinstance(items, OwnedItems):
            check_pieces(self.dir, self.out, Listed.of(items))

    def _refuse_existing_output(self, config: RunRecord) -> None:
        if self.out.exists() and not self.dir.exists():
            raise ConfigMismatchError(f"{self.out}: output exists{_made_with(self.out, config)}")

    def _check_config(self, previous: RunRecord, config: RunRecord) -> None:
        if not RecordIO.same(previous, config):
            raise ConfigMismatchError(
                f"{self.out}: an unfinished run with other settings is there ({describe_changes(previous, config)}); "
                "rerun with the same options, or pass --overwrite")

    def _check_items(self, items: Sequence[ImageItem]) -> None:
        """The input list against items.parquet, a slice at a time (not when it was read from this
        directory's plan, which was written with items.parquet from the same listing)."""
        if isinstance(items, OwnedItems):  # a --shard task that listed only its own row groups
            difference = own_items_differ(self.dir / "items.parquet", items, self.numbering())
        else:
            columns = ItemList.of(items)
            if columns.planned_in == str(self.dir):
                return
            difference = items_differ(self.dir / "items.parquet", columns)
        if difference is not None:
            raise ConfigMismatchError(f"{self.out}: {difference}; rerun with the same inputs, or pass --overwrite")

    def _check_or_write_config(self, config: RunRecord, create: bool) -> None:
        path = self.dir / "config.json"
        if path.exists():
            self._check_config(RecordIO.read_config(path), config)
        elif create:
            RecordIO.write_config(config, path)
        else:
            raise UsageError(f"{path}: missing (is OUT on a shared filesystem?)")

    def _check_or_write_items(self, items: Sequence[ImageItem], create: bool, window: int) -> None:
        path = self.dir / "items.parquet"
        if isinstance(items, OwnedItems):  # its piece of the list; `tagclip merge` puts them together
            if path.exists():
                self._check_items(items)
            elif create:
                write_piece(self.dir, self.out, items)
            return
        columns = ItemList.of(items)
        if path.exists():
            self._check_items(columns)
        elif create and columns.held is None:
            check_pieces(self.dir, self.out, Listed.of(columns), columns)
            write_items(columns, path)
        else:
            raise UsageError(f"{path}: missing (is OUT on a shared filesystem?)")
        if columns.held is None:  # a whole list: it numbers the local indices of tar tasks' parts itself
            self._numbering = whole_list_numbering(columns)
        if create and columns.input_key is not None and columns.held is None and not plan_path(self.dir).exists():
            write_plan(columns, self.dir, columns.input_key, window)  # later tasks read their share (jobs/plan.py)

    def _note_job(self, job: dict, create: bool) -> None:
        path = self.dir / "job.json"
        if path.exists():
            previous = json.loads(path.read_text())
            if previous.get("window") != job.get("window"):
                log.warning(
                    "resuming with a different --batch-size (%s, was %s): rows computed now come from "
                    "differently composed batches and can differ from the earlier ones in the last float bit",
                    job.get("batch_size"), previous.get("batch_size"))
        elif create:
            write_json_atomic(job, path)

    # ---- reading ----
    def job(self) -> dict:
        path = self.dir / "job.json"
        return json.loads(path.read_text()) if path.exists() else {}

    def config(self) -> RunRecord:
        path = self.dir / "config.json"
        if not path.exists():
            raise UsageError(f"{self.dir}: no config.json; not a tagclip work directory")
        return RecordIO.read_config(path)

    def items(self) -> pa.Table:
        path = self.dir / "items.parquet"
        if not path.exists():
            raise UsageError(f"{self.dir}: no items.parquet; not a tagclip work directory")
        return pq.read_table(path)

    def total(self) -> int:
        """The number of inputs, from the metadata of items.parquet (no rows read)."""
        path = self.dir / "items.parquet"
        if not path.exists():
            raise UsageError(f"{self.dir}: no items.parquet; not a tagclip work directory")
        return pq.ParquetFile(path).metadata.num_rows

    def scan(self) -> PartIndex:
        """What the part files hold now: the manifest, checked against the directory listing."""
        return PartIndex.scan(self.dir, self.manifest)

    def index(self) -> PartIndex:
        """The scan of this process's start (made once; writing a part forgets it)."""
        if self._index is None:
            self._index = self.scan()
        return self._index

    def numbering(self) -> Numbering | None:
        """Local indices -> global ones (jobs/listing.py), when known: from the whole list this
        process listed, else the pieces of every tar shard or the plan."""
        if self._numbering is None:
            self._numbering = shard_numbering(self.dir)
        return self._numbering

    def global_index(self, index: PartIndex) -> PartIndex:
        """index with the local indices of --shard tasks over tars made global, as far as known."""
        if not index.local():
            return index
        numbering = self.numbering()
        return index if numbering is None else index.renumbered(numbering.to_global)

    def part_files(self) -> list[tuple[int, int, Path]]:
        """(first index, last index, path) of every complete part, by first (global) index."""
        return [(lo, hi, self.dir / name) for lo, hi, name in self.global_index(self.scan()).parts()]

    def done_mask(self, total: int) -> np.ndarray:
        """(total,) bool: which indices already have a row (one bit per image, not a set of rows)."""
        return self.global_index(self.scan()).done_mask(total)

    def remaining(self, items: Sequence[ImageItem], total: int | None = None) -> ItemShare:
        """The items that have no row yet, in their order (local indices: among the parts of local
        indices, as the task that numbered them wrote them)."""
        share = as_share(items)
        local = bool(len(share.positions)) and share.positions[-1] >= LOCAL_BASE
        done = (self.index() if local else self.global_index(self.index())).done_at(share.positions)
        return share.take(share.positions[~done]) if done.any() else share  # nothing done: no copy

    def failed_indices(self, local: bool = False) -> np.ndarray:
        """Indices of the rows already in parts whose status is "failed" (for the exit code of a
        resumed run: the output has them even though this run did not meet them); local: as the
        parts hold them, else global as far as known."""
        return (self.index() if local else self.global_index(self.index())).failed_indices()

    def left(self, items: Sequence[ImageItem]) -> int | None:
        """The number of images of the whole input without a row; None when not known yet (a task
        over tars whose fellow tasks have not all listed their shards)."""
        total = total_items(items)
        if total is None:
            numbering = self.numbering()
            total = None if numbering is None else numbering.total
        return None if total is None else len(self.missing(total))

    # ---- writing ----
    def write_part(self, table: pa.Table) -> Path:
        table = table.sort_by("index")
        indices = table.column("index")
        lo, hi = pc.min(indices).as_py(), pc.max(indices).as_py()
        path = self.dir / f"part-{lo:012d}-{hi:012d}.parquet"
        try:
            with deferred_signals():  # a Ctrl-C lets this part and its manifest line finish first
                with atomic_path(path) as tmp:
                    pq.write_table(table, tmp, compression="zstd")
                self.manifest.append([PartEntry.of_table(path.name, table)])
        except OutputWriteError as exc:
            raise OutputWriteError(
                f"{exc}; the {len(self.part_files())} parts written before are intact in {self.dir}: "
                "free some space and rerun the same command to resume") from exc
        self._index = None
        return path

    def missing(self, total: int, wait_seconds: float = 0.0) -> np.ndarray:
        """Indices without a row. Polls for up to wait_seconds: another node's parts can show up late
        on a network filesystem."""
        deadline = time.monotonic() + wait_seconds
        while True:
            missing = np.flatnonzero(~self.done_mask(total))
            if not len(missing) or time.monotonic() >= deadline:
                return missing
            time.sleep(min(2.0, max(0.0, deadline - time.monotonic())))

    def iter_merged(self, schema: pa.Schema, total: int, chunk: int = ROW_GROUP_SIZE) -> Iterator[pa.Table]:
        """The rows of all parts in index order, one row per index, `chunk` indices at a time: a
        streaming merge that reads each part once (jobs/merge.py)."""
        parts = [(lo, path) for lo, _, path in self.part_files()]
        return iter_merged(parts, schema, total, chunk, self.dir, renumber=self.renumber())

    def renumber(self, index: PartIndex | None = None) -> Callable[[np.ndarray], np.ndarray] | None:
        """What makes the local indices of the parts' rows global in a merge (None: none to make);
        index: the scan the merge reads (default: a new one)."""
        numbering = self.numbering() if (self.scan() if index is None else index).local() else None
        return None if numbering is None else numbering.to_global

    def merge(self, schema: pa.Schema, total: int, fmt: str = "parquet", wait_seconds: float = 0.0,
              options: dict | None = None) -> int:
        """Write the final output from the parts (refusing if any index has no row). Returns rows."""
        missing = self.missing(total, wait_seconds)
        if len(missing):
            raise IncompleteRunError(self.describe_missing(missing, total))
        try:
            return write_final(fmt, self.iter_merged(schema, total), self.out, schema, options)
        except OutputWriteError as exc:
            raise OutputWriteError(f"{exc}; all results are intact in {self.dir}: free some space and "
                                   f"rerun the same command (or `tagclip merge {self.out}`)") from exc

    def describe_missing(self, missing: np.ndarray, total: int) -> str:
        ids = pq.read_table(self.dir / "items.parquet", columns=["image_id"]).column("image_id") \
            .take(pa.array(missing[:3])).to_pylist()
        examples = ", ".join(f"#{i} {image_id}" for i, image_id in zip(missing[:3].tolist(), ids, strict=True))
        return (f"{self.out}: {len(missing)} of {total} images have no result yet (e.g. {examples}); "
                "finish the remaining shards (rerun a shard's command to resume it), then merge again")

    def cleanup(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)


def finished_output(out: Path, config: RunRecord, items: Sequence[ImageItem]) -> int | None:
    """The number of failed rows if `out` is a finished Parquet output of exactly this
    configuration and these items (and no unfinished run is next to it), else None. The output is
    compared with the input list a slice at a time."""
    if not out.is_file() or PartStore(out).dir.exists():
        return None
    if isinstance(items, OwnedItems):
        return _finished_own(out, config, items)
    columns = ItemList.of(items)
    try:
        if not RecordIO.same(read_record(out), config):
            return None
        stored = pq.ParquetFile(out)
        names = stored.schema_arrow.names
        keys = [c for c in ("index", "image_id", "path") if c in names]
        if keys[:2] != ["index", "image_id"] or stored.metadata.num_rows != len(columns):
            return None
        failed, start = 0, 0
        for batch in stored.iter_batches(batch_size=ITEMS_SLICE, columns=[*keys, "status"]):
            table = pa.Table.from_batches([batch])
            if not table.select(keys).equals(columns.table(start, start + batch.num_rows).select(keys)):
                return None
            failed += batch.num_rows - int(pc.sum(pc.equal(table.column("status"), "ok")).as_py() or 0)
            start += batch.num_rows
    except Exception:  # not a Parquet file of ours, or unreadable: the usual refusal explains
        return None
    return failed


def _finished_own(out: Path, config: RunRecord, items: OwnedItems) -> int | None:
    """finished_output for a --shard task that listed only its own items: the output's rows at
    their indices are compared with them (the failed rows are counted over the whole output)."""
    try:
        if not RecordIO.same(read_record(out), config):
            return None
        stored = pq.ParquetFile(out)
        names = stored.schema_arrow.names
        if items.total not in (None, stored.metadata.num_rows) or names[:2] != ["index", "image_id"]:
            return None
        keys = [c for c in ("index", "image_id", "path") if c in stored.schema_arrow.names]
        positions = positions_in(out, items)  # (a task over tars: where its shards' rows are)
        if positions is None or not rows_at(out, positions, keys).equals(_numbered(items, positions).select(keys)):
            return None
        status = pq.read_table(out, columns=["status"]).column("status")
        return len(status) - int(pc.sum(pc.equal(status, "ok")).as_py() or 0)
    except Exception:  # not a Parquet file of ours, or unreadable: the usual refusal explains
        return None


def own_items_differ(path: Path, items: OwnedItems, numbering: Numbering | None = None) -> str | None:
    """items_differ for a --shard task's own items: items.parquet's rows at their (global) indices."""
    total = pq.ParquetFile(path).metadata.num_rows
    if items.total not in (None, total):
        return f"the unfinished run there has a different input list ({total} images, now {items.total})"
    positions = positions_in(path, items, numbering)
    if positions is None:
        return "the unfinished run there has a different input list (this task's tar shards are not in it)"
    previous = rows_at(path, positions, ITEMS_SCHEMA.names).cast(ITEMS_SCHEMA)
    current = _numbered(items, positions).cast(ITEMS_SCHEMA)
    if previous.equals(current):
        return None
    return describe_item_difference(previous, current, positions)


def _numbered(items: OwnedItems, positions: np.ndarray) -> pa.Table:
    """The task's items as items.parquet's rows, at these global indices."""
    return items.table().set_column(0, "index", pa.array(positions, pa.int64()))


def has_previous(out: Path | None, overwrite: bool) -> bool:
    """Whether a run into `out` meets an earlier one there (an output, or an unfinished run) that it
    must resume, skip or refuse (not with --overwrite, which replaces it)."""
    return out is not None and not overwrite and (out.exists() or parts_dir(out).exists())


def previous_record(out: Path) -> RunRecord | None:
    """The record of the earlier run at `out`: its unfinished run's config.json, else the finished
    output's; None when there is none (or it is not one of our Parquet files)."""
    try:
        if (parts_dir(out) / "config.json").is_file():
            return RecordIO.read_config(parts_dir(out) / "config.json")
        record = read_record(out) if out.is_file() else None
    except Exception:  # unreadable: the refusals of PartStore.open explain it
        return None
    return None if record is None or record.empty else record


def _made_with(out: Path, config: RunRecord) -> str:
    """How an existing output's configuration compares with this run's, and what to do, for the
    refusal message: each changed setting (old -> new), `tagclip retag` when only the thresholds of
    a tags Parquet changed, else --overwrite."""
    replace = "; pass --overwrite to replace it"
    try:
        previous = read_record(out)
    except Exception:  # not a Parquet file of ours: nothing to compare
        return replace
    if previous.empty:
        return replace
    if RecordIO.same(previous, config):
        return f" (same configuration: this run is already complete){replace}"
    made = f" (made with other settings: {describe_changes(previous, config)})"
    if config.segment is None and only_thresholds_changed(previous, config):
        return f"{made}; only thresholds changed: {_retag_command(out, config)} re-derives its tags from the stored " \
               "scores without the model, or pass --overwrite to recompute it"
    return made + replace


def _retag_command(out: Path, config: RunRecord) -> str:
    """The `tagclip retag` command that turns `out`'s tags into those of `config`'s thresholds."""
    new = out.with_name(f"{out.stem}.retagged{out.suffix}")
    threshold = f" --tag-threshold {config.tag_threshold}" if config.tag_threshold is not None else ""
    file = " --thresholds FILE" if config.thresholds is not None else ""
    return f"`tagclip retag {out}{file}{threshold} --out {new}`"


def describe_item_difference(previous: pa.Table, current: pa.Table, offset: int | np.ndarray = 0) -> str:
    """The first row where two slices of an input list differ, named by its image number: offset +
    its row, or offset[row] when offset holds the rows' indices (a --shard task's own items). Rows
    null in both count as the same."""
    if previous.num_rows != current.num_rows:
        return (f"the unfinished run there has a different input list ({previous.num_rows} images, "
                f"now {current.num_rows})")
    for name in ("image_id", "path", "coco_id"):
        a, b = previous.column(name), current.column(name)
        if not a.equals(b):
            same = pc.or_(pc.fill_null(pc.equal(a, b), False), pc.and_(pc.is_null(a), pc.is_null(b)))
            differs = np.flatnonzero(~same.to_numpy(zero_copy_only=False))
            if not len(differs):
                continue
            first = int(differs[0])
            image = first + offset if isinstance(offset, int) else int(offset[first])
            return (f"the unfinished run there has a different input list (image #{image}: "
                    f"{name} {a[first].as_py()!r}, now {b[first].as_py()!r})")
    return "the unfinished run there has a different input list"


def write_final(fmt: str, tables: Iterable[pa.Table], out: Path, schema: pa.Schema, options: dict | None = None) -> int:
    """Write the merged rows (tables in index order) as the final output; returns the row count.

    The format name is stored in job.json so that `tagclip merge` writes what the run would have."""
    if fmt == "parquet":
        return write_parquet_atomic(tables, out, schema)
    if fmt == COCO_JSON_FORMAT:  # `tagclip segment`: masks JSON (+ the tags Parquet with tags_out)
        return write_coco_json(tables, out, schema, tags_out=(options or {}).get("tags_out"))
    if fmt == MASKS_PARQUET_FORMAT:  # `tagclip segment --out masks.parquet`: one row per (image, mask)
        return write_masks_parquet(tables, out, schema, tags_out=(options or {}).get("tags_out"))
    raise UsageError(f"unknown output format '{fmt}' in the work directory of {out}")


def merge_output(out: Path) -> int:
    """`tagclip merge OUT`: check that every input has a row in OUT.parts/, write OUT, remove the parts."""
    store = PartStore(out)
    if not store.dir.is_dir():
        if store.out.exists():
            raise UsageError(f"{store.out}: already merged (no {store.dir.name} work directory)")
        raise UsageError(f"{store.dir}: no such work directory; nothing to merge")
    config = store.config()
    if not (store.dir / "items.parquet").exists():
        assemble_items(store.dir, store.out)  # the pieces of --shard tasks that listed their own share
    total = store.total()
    raw = store.scan()
    index = store.global_index(raw)
    missing = np.flatnonzero(~index.done_mask(total))
    if len(missing):
        raise IncompleteRunError(store.describe_missing(missing, total))
    parts = index.parts()
    schema = pq.read_schema(store.dir / parts[0][2])
    for name in index.records().values():  # one part per distinct run record, the first of each
        made_with = read_record(store.dir / name)
        if not made_with.empty and not RecordIO.same(made_with, config):
            raise ConfigMismatchError(
                f"{store.dir / name}: written with a different configuration than {store.dir / 'config.json'}; "
                "were the shards started with different options? Rerun that shard's work with --overwrite "
                "in a fresh output")
    job = store.job()
    merged = iter_merged([(lo, store.dir / name) for lo, _, name in parts], schema, total, ROW_GROUP_SIZE, store.dir,
                         renumber=store.renumber(raw))
    rows = write_final(job.get("format", "parquet"), merged, store.out, schema, job.get("final_options"))
    store.cleanup()
    return rows
