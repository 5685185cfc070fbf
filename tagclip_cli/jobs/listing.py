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

Tar shards give no count without walking their headers, so the tasks of an array share their
counts (`TarCountBoard`): each task publishes the row counts of the shards it listed in
`OUT.parts/listing/counts/<digest of the input>/` (small JSON files, written once, atomically; a
task of another input, refused when it meets the pieces or items.parquet, leaves its counts apart)
and reads the others'; a shard whose count has not appeared after a short wait is counted by the
task itself from its headers (in an order of its own, so that tasks counting at once mostly count
different shards) and published too, so a later task, or one of a throttled array, reads no byte
of the shards it does not own.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from tagclip_cli.errors import ConfigMismatchError, IncompleteRunError
from tagclip_cli.fileio import atomic_path
from tagclip_cli.itemlist import OwnedItems
from tagclip_cli.jobs.merge import iter_merged
from tagclip_cli.sources import ShardCount, TarCounts

log = logging.getLogger(__name__)

LISTING_DIR = "listing"
LISTING_KEY = b"tagclip.listing"
ITEMS_SCHEMA = pa.schema([("index", pa.int64()), ("image_id", pa.string()), ("path", pa.string()),
                          ("coco_id", pa.int64())])
ITEMS_SLICE = 1 << 16  # items.parquet is written and compared this many rows at a time (row groups)
COUNTS_DIR = "counts"
COUNT_WAIT = (2.0, 60.0)  # seconds a task waits for the other tasks' tar counts: at least, at most
POLL = 0.5  # seconds between looks at the counts folder while waiting
PUBLISH_EVERY = 1.0  # a task publishes what it counted at most this often


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


class TarCountBoard(TarCounts):
    """The tar shards' row counts shared by the --shard tasks of an array through the work
    directory (see the module docstring). `complete` waits for the counts it lacks while others
    appear: at least COUNT_WAIT[0] s or twice the time the task took to list its own shards, longer
    while new counts keep coming, never more than COUNT_WAIT[1] s (an interrupt stops it at once);
    then it counts the missing shards itself, a second at a time, looking again in between."""

    def __init__(self, parts: Path, out: Path, key: str, rank: int) -> None:
        super().__init__()
        self.folder = Path(parts) / LISTING_DIR / COUNTS_DIR / hashlib.sha256(key.encode()).hexdigest()[:16]
        self.parts, self.out, self.key, self.rank = Path(parts), out, key, rank
        self.seen: set[str] = set()  # count files read
        self.fresh: dict[int, ShardCount] = {}  # counted here, not published yet
        self.published_at = time.monotonic()
        self.shared = True  # False once the work directory turned out not writable: counted alone
        self.counted = 0  # shards of other tasks counted here

    def add(self, shard: int, count: ShardCount, owned: bool = True) -> None:
        self._take({shard: count})
        self.counted += not owned
        if owned or count.sound:  # (a damaged shard's count is published by its owner only: a read that
            self.fresh[shard] = count  # failed for a moment here must not become every task's count)
        if time.monotonic() - self.published_at >= PUBLISH_EVERY:
            self.publish()

    def publish(self) -> None:
        """Write the counts made here since the last time, as one new file."""
        self.published_at = time.monotonic()
        if not self.fresh or not self.shared:
            return
        self._published()  # (refuses first when the counts there are of another input)
        counts = sorted(self.fresh.items())
        text = json.dumps({"input": self.key, "shards": self.shards, "counts": [[s, c.rows] for s, c in counts],
                           "unreadable": {str(s): c.unreadable for s, c in counts if c.unreadable is not None}})
        name = f"{counts[0][0]:08d}-{hashlib.sha256(text.encode()).hexdigest()[:16]}.json"
        try:
            self.parts.mkdir(exist_ok=True)
            self.folder.mkdir(parents=True, exist_ok=True)
            with atomic_path(self.folder / name) as tmp:
                tmp.write_text(text)
        except OSError as exc:  # (OutputWriteError too) the other tasks count for themselves
            log.info("cannot share tar shard counts in %s (%s); counting alone", self.folder, exc)
            self.shared = False
        self.seen.add(name)
        self.fresh = {}

    def complete(self, count: Callable[[int], ShardCount], threads: int, listed_in: float) -> dict[int, ShardCount]:
        self.publish()
        wait = min(COUNT_WAIT[1], max(COUNT_WAIT[0], 2 * listed_in))
        start = time.monotonic()
        deadline, order = start + wait, None
        while True:
            found = self._published()
            missing = [s for s in range(self.shards) if s not in self.known]
            if not missing:
                break
            now = time.monotonic()
            if found and now < deadline:  # others are still publishing: keep waiting for them
                deadline = min(start + COUNT_WAIT[1], max(deadline, now + wait))
            if now < deadline and self.shared:
                time.sleep(min(POLL, deadline - now))
                continue
            if order is None:  # this task's own order, so that tasks counting at once count different shards
                order = np.random.default_rng(self.rank).permutation(self.shards)
            missing = [int(s) for s in order if s not in self.known]
            self.count_missing(missing, count, threads, until=time.monotonic() + PUBLISH_EVERY)
            self.publish()
        if self.counted:
            log.info("counted %d tar shards of other tasks from their headers (their counts were not in %s)",
                     self.counted, self.folder)
        return self.known

    def _published(self) -> dict[int, ShardCount]:
        """The counts in the files of other tasks not read before (taken into `known`)."""
        try:
            names = sorted(n for n in os.listdir(self.folder) if n.endswith(".json") and n not in self.seen)
        except OSError:  # not there yet
            return {}
        found: dict[int, ShardCount] = {}
        for name in names:
            self.seen.add(name)
            try:
                info = json.loads((self.folder / name).read_text())
                counts = [(int(s), int(rows)) for s, rows in info["counts"]]
            except (OSError, ValueError, KeyError, TypeError) as exc:  # not ours: its shards are counted here
                log.warning("%s: not a file of tar shard counts (%s); ignored", self.folder / name, exc)
                continue
            if info.get("input") != self.key or info.get("shards") != self.shards:  # (a pattern that matches more now)
                raise ConfigMismatchError(
                    f"{self.out}: the --shard tasks there listed a different input ({name}: {info.get('shards')} tar "
                    f"shards, now {self.shards}); rerun with the same inputs, or start a new OUT")
            unreadable = info.get("unreadable", {})
            found.update({s: ShardCount(rows, unreadable.get(str(s))) for s, rows in counts})
        self._take(found)
        return found

    def _take(self, found: dict[int, ShardCount]) -> None:
        for shard, count in found.items():
            had = self.known.setdefault(shard, count)
            if had.rows != count.rows:
                raise ConfigMismatchError(
                    f"{self.out}: tar shard #{shard} of the input has {had.rows} rows here, {count.rows} as another "
                    "--shard task counted it (did the shard change?); rerun every task on the same input, or start "
                    "a new OUT")


def tar_counts(parts: Path, out: Path, key: str, rank: int) -> TarCounts:
    """Where a --shard task over tars finds the other shards' counts: the board in the work
    directory, unless OUT is a finished output with no work directory (it is left as it is: the
    task counts alone, and is then told the output is complete)."""
    if Path(out).exists() and not Path(parts).is_dir():
        return TarCounts()
    return TarCountBoard(parts, out, key, rank)
