"""The job runner: this rank's windows that have no rows yet -> decode -> process -> a sink, then the
counts gathered on the leader and the parts merged (or a note: --fail-fast, one --shard of several)."""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from tagclip_cli.data import DecodedImage, bucket_batches
from tagclip_cli.errors import OutputWriteError, UsageError
from tagclip_cli.itemlist import LOCAL_BASE, ItemList, ItemShare, total_items
from tagclip_cli.jobs.parts import PartStore, finished_output
from tagclip_cli.jobs.placement import Placement
from tagclip_cli.jobs.session import Session
from tagclip_cli.jobs.sinks import JsonLinesSink, PartSink
from tagclip_cli.record import RunRecord
from tagclip_cli.sources import ImageItem

log = logging.getLogger(__name__)


WINDOW_BATCHES = 4  # a window holds this many batches: room for size bucketing, little memory
MAX_FAILURES_KEPT = 100  # failures listed in the summary; the output has them all


@dataclass
class Summary:
    """Counts of one run (all ranks on the leader). `failures` keeps the first few (image_id, error)."""

    total: int = 0
    done: int = 0
    skipped: int = 0
    failed: int = 0
    failures: list[tuple[str, str]] = field(default_factory=list)
    failed_before: int = 0  # failed rows among the skipped ones (written by an earlier, interrupted run)
    leader: bool = True  # False on torchrun ranks other than 0: they report nothing
    merged: bool = False
    note: str | None = None  # what to do next (e.g. run `tagclip merge` after the last shard)

    def add_failure(self, image_id: str, error: str) -> None:
        self.failed += 1
        if len(self.failures) < MAX_FAILURES_KEPT:
            self.failures.append((image_id, error))

    def count(self, rows: Sequence[dict]) -> None:
        """Count result rows as done or failed (by their "status")."""
        for row in rows:
            if row["status"] == "failed":
                self.add_failure(row["image_id"], row["error"])
            else:
                self.done += 1

    @classmethod
    def combine(cls, summaries: Iterable[Summary]) -> Summary:
        """The leader's summary of all ranks' summaries."""
        total = cls(leader=True)
        for s in summaries:
            total.total += s.total
            total.done += s.done
            total.skipped += s.skipped
            total.failed += s.failed
            total.failed_before += s.failed_before
            total.failures.extend(s.failures[: MAX_FAILURES_KEPT - len(total.failures)])
        return total


# ---- running --------------------------------------------------------------------------------------

@dataclass
class JobSpec:
    """What to compute and where: `out` None means JSON Lines on stdout (no parts, no resume)."""

    items: Sequence[ImageItem]
    out: Path | None
    config: RunRecord  # what determines the rows (config.json, the output's metadata)
    schema: pa.Schema
    format: str = "parquet"
    final_options: dict = field(default_factory=dict)  # for the final writer, kept in job.json (tags_out)
    batch_size: int = 8
    part_size: int = 256
    overwrite: bool = False
    fail_fast: bool = False

    @property
    def window(self) -> int:
        return self.batch_size * WINDOW_BATCHES

    def stops_at(self, summary: Summary) -> bool:
        """--fail-fast: stop after the window in which the first image failed."""
        return self.fail_fast and summary.failed > 0


def run_job(
    spec: JobSpec,
    sess: Session,
    records: Callable[[Sequence[ImageItem]], Iterable[DecodedImage]],
    process: Callable[[list[DecodedImage]], list[dict]],
    progress: Callable[[int], object] | None = None,
    stdout: TextIO | None = None,
) -> Summary:
    """Process this rank's windows that have no rows yet, stream rows to parts (or stdout), merge.

    records(todo) yields the decoded images of the given items in order; process(batch) returns
    one row per image of a same-size batch (rows have "index", "image_id", "status", "error")."""
    placement = sess.placement
    mine = placement.share(spec.items, spec.window)
    store: PartStore | None = None
    if spec.out is None:
        sink: JsonLinesSink | PartSink = _stdout_sink(spec, placement, stdout)
        todo = mine
    else:
        resumable = not spec.overwrite and spec.format == "parquet"
        finished = finished_output(spec.out, spec.config, spec.items) if resumable else None
        if finished is not None:
            return _already_complete(spec.out, spec.items, placement, finished)
        store = _open_store(spec, sess)
        _keep_share(spec.items, mine, placement, spec.window)
        todo = store.remaining(mine)
        sink = PartSink(store, spec.schema, spec.part_size)
    summary = _resume_summary(store, mine.positions, len(todo))
    if progress:
        progress(summary.skipped)
    _run_windows(spec, records(todo), process, sink, summary, progress)
    return _finish(spec, sess, store, summary)


def check_before_loading(out: Path, config: RunRecord, items: Sequence[ImageItem], output_format: str,
                         placement: Placement) -> Summary | None:
    """What `run_job` (without --overwrite) would find in `out` without computing anything, checked
    before the model loads: the summary of a finished output of this config and these items
    (nothing to do), or the refusal of an output or unfinished run made with other settings or
    inputs (ConfigMismatchError, naming each changed setting); None when there is work to do."""
    finished = finished_output(out, config, items) if output_format == "parquet" else None
    if finished is not None:
        return _already_complete(out, items, placement, finished)
    PartStore(out).refuse_other_settings(config, items)
    return None


def _stdout_sink(spec: JobSpec, placement: Placement, stdout: TextIO | None) -> JsonLinesSink:
    if placement.distributed:
        raise UsageError("--out - (JSON Lines on stdout) works in a single process; with torchrun, "
                         "write Parquet and read it afterwards")
    return JsonLinesSink(stdout or sys.stdout, spec.config.classes or ())


def _already_complete(out: Path, items: Sequence[ImageItem], placement: Placement, failed: int) -> Summary:
    """Rerunning a finished command is a no-op, as `make` would do (job arrays retry whole
    commands); exit 1 still reports failed rows, as after a resumed run."""
    total = total_items(items)
    if total is None:  # (a task over tars that numbered its own shards: the output's rows)
        total = pq.ParquetFile(out).metadata.num_rows
    return Summary(total=total, skipped=total, failed_before=failed if placement.leader else 0,
                   leader=placement.leader, merged=True,
                   note=f"{out} is already complete for these images and this configuration; "
                        "nothing to do (--overwrite recomputes it)")


def _open_store(spec: JobSpec, sess: Session) -> PartStore:
    """The work directory, created (or checked) by rank 0 first, then checked by the other ranks."""
    job = {"format": spec.format, "batch_size": spec.batch_size, "window": spec.window,
           "final_options": spec.final_options}

    def open_store(create: bool) -> Callable[[], PartStore]:
        return lambda: PartStore.open(spec.out, spec.config, spec.items, job, spec.overwrite and create, create)

    return sess.leader_first(open_store(True), open_store(False))  # type: ignore[return-value]


def _keep_share(items: Sequence[ImageItem], mine: ItemShare, placement: Placement, window: int) -> None:
    """A process of several that listed the whole input itself (the first --shard task, torchrun's
    rank 0) keeps only its share once the work directory holds the list (items.parquet, the plan):
    the rest is never read again here (at 10M images ~0.3-0.5 GB less while the model runs)."""
    if placement.world > 1 and isinstance(items, ItemList) and items.held is None and items.input_key is not None:
        items.keep(mine.positions, (placement.rank, placement.world, window))


def _resume_summary(store: PartStore | None, mine: np.ndarray, todo: int) -> Summary:
    """This rank's starting counts: its images (mine: their indices, increasing), those already done
    by an earlier run (and how many of them failed, for the exit code)."""
    summary = Summary(total=len(mine), skipped=len(mine) - todo)
    if store is not None and summary.skipped:
        failed = store.failed_indices(local=bool(len(mine)) and mine[-1] >= LOCAL_BASE)
        at = np.searchsorted(mine, failed)
        summary.failed_before = int((mine[np.minimum(at, len(mine) - 1)] == failed).sum()) if len(mine) else 0
        log.info("%d images already done in %s; %d to go", summary.skipped, store.dir, todo)
    return summary


def _run_windows(
    spec: JobSpec,
    records: Iterable[DecodedImage],
    process: Callable[[list[DecodedImage]], list[dict]],
    sink: JsonLinesSink | PartSink,
    summary: Summary,
    progress: Callable[[int], object] | None,
) -> None:
    """The window loop: process each forward batch, hand each complete window's rows (in index
    order) to the sink, stop early under --fail-fast. Whatever ends the loop (a signal, an error),
    the complete windows are written; a partial window is not."""
    window_rows: list[dict] = []
    try:
        for batch, end in bucket_batches(records, spec.batch_size, spec.window):
            rows = process(batch) if batch else []
            summary.count(rows)
            window_rows.extend(rows)
            if progress and rows:
                progress(len(rows))
            if not end:
                continue
            sink.write(sorted(window_rows, key=lambda r: r["index"]))
            window_rows = []
            if spec.stops_at(summary):
                break
    except OutputWriteError:
        sink.discard()  # the disk refused them (full?): not again in `finally`; they are redone on resume
        raise
    finally:
        sink.flush()


def _finish(spec: JobSpec, sess: Session, store: PartStore | None, summary: Summary) -> Summary:
    """Gather every rank's counts on the leader, then merge the parts into the output (or say
    why not: --fail-fast stopped, or this is one --shard of several)."""
    placement = sess.placement
    everyone = sess.gather(summary)
    if not placement.leader:
        summary.leader = False
        return summary
    total = Summary.combine(everyone)  # type: ignore[arg-type]
    if store is None:
        return total
    if spec.stops_at(total):
        total.note = f"stopped at the first failure (--fail-fast); finished parts are kept in {store.dir}"
        return total
    if not placement.merges:
        total.note = _shard_note(spec, placement, store.left(spec.items))
        return total
    rows = store.merge(spec.schema, total_items(spec.items), spec.format,
                       wait_seconds=60.0 if placement.distributed else 0.0, options=spec.final_options)
    store.cleanup()
    total.merged = True
    log.info("wrote %s (%d rows)", spec.out, rows)
    return total


def _shard_note(spec: JobSpec, placement: Placement, left: int | None) -> str:
    """What to do after one --shard finished: merge now, or when the other shards are done (left:
    the images without a row; None: not known, some tasks over tars have not listed their shards)."""
    if left is None:
        return (f"{placement.describe()} finished. The tasks of some other tar shards have not listed them yet; when "
                f"all shards are done, run `tagclip merge {spec.out}`")
    return (
        f"{placement.describe()} finished. "
        + (f"All shards are done: run `tagclip merge {spec.out}`" if not left else
           f"{left} images of other shards still have no result; when all shards are done, run "
           f"`tagclip merge {spec.out}`")
    )
