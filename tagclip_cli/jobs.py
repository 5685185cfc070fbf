"""Batch jobs: work split (torchrun ranks, --shard), atomic part files, resume, merge, JSON Lines.

Layout beside the output `OUT`: a work directory `OUT.parts/` holding
- `config.json`: everything that determines the results; a different configuration refuses to resume;
- `items.parquet`: the full input list (index, image_id, path, coco_id); a different list refuses,
  and `tagclip merge` uses it to prove that every index 0..total-1 has a row;
- `job.json`: the final format and the batching that was used;
- `part-<first index>-<last index>.parquet`: result rows, each file written atomically.
Beside them, `OUT.lock` (or `OUT.shard-I-of-N.lock`) names the live run writing that share of the
output; a second run on it refuses before loading the model (see "one writer per output").

Work is cut into windows of consecutive global indices (a few batches each); window w belongs to
global rank w % world. A window is processed by one process, with forward batches that depend only
on the window's images, and is written only when complete. So any split (one process, torchrun
ranks, --shard, a killed and restarted run) computes every image in exactly the same batch and the
merged output is identical. The merge streams parts in index order, so memory does not grow with
the number of images.
"""

from __future__ import annotations

import glob
import json
import logging
import math
import os
import re
import shutil
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import TextIO

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from tagclip_cli import errors
from tagclip_cli.data import DecodedImage, ImageItem, bucket_batches
from tagclip_cli.errors import (
    ConfigMismatchError,
    IncompleteRunError,
    OutputLockedError,
    OutputWriteError,
    UsageError,
)
from tagclip_cli.faults import deferred_signals
from tagclip_cli.writers import (
    COCO_JSON_FORMAT,
    MASKS_PARQUET_FORMAT,
    ROW_GROUP_SIZE,
    atomic_path,
    json_scalar,
    output_text,
    read_metadata,
    write_coco_json,
    write_json_atomic,
    write_masks_parquet,
    write_parquet_atomic,
)

log = logging.getLogger(__name__)

WINDOW_BATCHES = 4  # a window holds this many batches: room for size bucketing, little memory
MAX_FAILURES_KEPT = 100  # failures listed in the summary; the output has them all
DIST_TIMEOUT = timedelta(hours=24)  # ranks wait this long for the slowest one at the end
PART_NAME = re.compile(r"part-(\d+)-(\d+)\.parquet$")


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


# ---- work split ----------------------------------------------------------------------------------

def parse_shard(text: str) -> tuple[int, int]:
    """`I/N` (0 <= I < N) -> (I, N)."""
    match = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", text)
    if not match:
        raise UsageError(f"--shard {text}: expected I/N, e.g. 0/4 for the first of four shards")
    index, count = int(match[1]), int(match[2])
    if count < 1 or index >= count:
        raise UsageError(f"--shard {text}: I must be in 0..N-1 (shards are numbered from 0)")
    return index, count


@dataclass(frozen=True)
class Placement:
    """Which part of the work this process does.

    rank/world: the global split (windows with w % world == rank). Under torchrun, group_rank /
    group_size are RANK / WORLD_SIZE; with --shard I/N as well, the shard is split again across the
    group (rank = I * group_size + group_rank, world = N * group_size)."""

    rank: int = 0
    world: int = 1
    group_rank: int = 0
    group_size: int = 1
    local_rank: int = 0
    shard: tuple[int, int] | None = None

    @property
    def leader(self) -> bool:
        return self.group_rank == 0

    @property
    def distributed(self) -> bool:
        return self.group_size > 1

    @property
    def merges(self) -> bool:
        """Whether this run writes the final output (a shard leaves it to `tagclip merge`)."""
        return self.shard is None

    def owns(self, item: ImageItem, window: int) -> bool:
        """Whether this process does the item: by its tar / Parquet shard when it lives in one (a
        shard is read by one process only), else by its window of indices."""
        if item.shard_index is not None:
            return item.shard_index % self.world == self.rank
        return (item.index // window) % self.world == self.rank

    def describe(self) -> str:
        parts = []
        if self.shard:
            parts.append(f"shard {self.shard[0]}/{self.shard[1]}")
        if self.distributed:
            parts.append(f"rank {self.group_rank}/{self.group_size}")
        return ", ".join(parts) or "single process"


def placement_from_env(shard: tuple[int, int] | None = None, env: dict[str, str] | None = None) -> Placement:
    """The placement of this process from torchrun's variables (RANK, WORLD_SIZE, LOCAL_RANK) and --shard."""
    env = os.environ if env is None else env
    try:
        group_size = int(env.get("WORLD_SIZE", "1"))
        group_rank = int(env.get("RANK", "0"))
        local_rank = int(env.get("LOCAL_RANK", "0"))
    except ValueError:
        raise UsageError("RANK / WORLD_SIZE / LOCAL_RANK must be integers (set by torchrun)") from None
    if not 0 <= group_rank < max(group_size, 1):
        raise UsageError(f"RANK={group_rank} is outside WORLD_SIZE={group_size}")
    index, count = shard if shard else (0, 1)
    return Placement(
        rank=index * group_size + group_rank,
        world=count * group_size,
        group_rank=group_rank,
        group_size=group_size,
        local_rank=local_rank,
        shard=shard,
    )


class Session:
    """A running placement: the torch.distributed process group (if any) and this rank's device."""

    def __init__(self, placement: Placement, device: str) -> None:
        self.placement = placement
        self.device = device

    def leader_first(self, on_leader: Callable[[], object], on_others: Callable[[], object]) -> object:
        """Run on_leader on rank 0, then on_others on every other rank; a TagclipError on any rank is
        raised on every rank (so nobody waits forever for a rank that gave up)."""
        result: object = None
        error: Exception | None = None
        if self.placement.leader:
            try:
                result = on_leader()
            except Exception as exc:  # re-raised below, after telling the others
                error = exc
        self._raise_everywhere(error)
        if not self.placement.leader:
            try:
                result = on_others()
            except Exception as exc:
                error = exc
        self._raise_everywhere(error)
        return result

    def _raise_everywhere(self, error: Exception | None) -> None:
        if not self.placement.distributed:
            if error is not None:
                raise error
            return
        import torch.distributed as dist

        message = None if error is None else f"{type(error).__name__}\x00{error}"
        gathered: list[str | None] = [None] * self.placement.group_size
        dist.all_gather_object(gathered, message)
        if error is not None:
            raise error
        for rank, other in enumerate(gathered):
            if other is not None:
                kind, text = other.split("\x00", 1)
                cls = getattr(errors, kind, None)
                if not (isinstance(cls, type) and issubclass(cls, errors.TagclipError)):
                    cls = UsageError  # same message and exit code 2 on every rank
                raise cls(text if rank == 0 else f"rank {rank}: {text}")

    def gather(self, obj: object) -> list[object]:
        """Every rank's obj, on every rank (a barrier too)."""
        if not self.placement.distributed:
            return [obj]
        import torch.distributed as dist

        gathered: list[object] = [None] * self.placement.group_size
        dist.all_gather_object(gathered, obj)
        return gathered


@contextmanager
def session(placement: Placement, device: str) -> Iterator[Session]:
    """Join torchrun's process group when there is more than one rank (gloo for the CPU control
    messages, NCCL for CUDA tensors) and pin one device per rank: cuda:LOCAL_RANK."""
    if not placement.distributed:
        yield Session(placement, device)
        return
    import torch
    import torch.distributed as dist

    if device.startswith("cuda"):
        wanted = f"cuda:{placement.local_rank}"
        if device not in ("cuda", wanted):
            log.warning("--device %s ignored under torchrun: rank %d uses %s (LOCAL_RANK)",
                        device, placement.group_rank, wanted)
        device = wanted
        torch.cuda.set_device(placement.local_rank)
        backend = "cpu:gloo,cuda:nccl"
    else:
        backend = "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend=backend, timeout=DIST_TIMEOUT)
    log.debug("joined the process group: %s, backend %s, device %s", placement.describe(), backend, device)
    try:
        yield Session(placement, device)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


# ---- one writer per output ------------------------------------------------------------------------
#
# The leader of a run (rank 0 under torchrun) holds a lock file beside the output before the model
# is loaded: `OUT.lock`, or `OUT.shard-I-of-N.lock` for `--shard I/N`. Lock files are per shard, not
# one shared file with per-shard entries, so that taking and releasing one is a single atomic
# create (os.link, which also works on NFS) or unlink, with no read-modify-write that two shards
# could interleave. Each holds the pid, host, start time and the windows the run owns (ranks of
# `world`, as in Placement); a run refuses when a live lock owns any of its windows, so shards of
# one split work side by side while a whole run, or shards of another split, are refused.

LOCK_HEARTBEAT_SECONDS = 30.0  # a live run touches its lock file this often (a daemon thread)
LOCK_STALE_SECONDS = 600.0  # a lock of another host untouched this long is a dead run's (docs/troubleshooting.md)


@dataclass(frozen=True)
class LockEntry:
    """The run holding (a share of) an output: its leader process and the ranks first..last of
    world it owns. proc_start tells a reused pid apart (Linux /proc); age: seconds since the
    last heartbeat when read."""

    pid: int
    host: str
    started: float
    first: int
    last: int
    world: int
    proc_start: str | None = None
    age: float = 0.0

    def describe(self) -> str:
        when = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(self.started))
        whole = self.first == 0 and self.last + 1 == self.world
        share = "" if whole else (f", shard {self.first}/{self.world}" if self.first == self.last else
                                  f", ranks {self.first}-{self.last} of {self.world}")
        return f"pid {self.pid} on {self.host}, started {when}{share}"

    def overlaps(self, other: LockEntry) -> bool:
        """Whether some window belongs to both: window w is owned when w % world is in first..last,
        so (Chinese remainder theorem) both own one iff two of their ranks agree modulo gcd(worlds)."""
        g = math.gcd(self.world, other.world)
        return bool({r % g for r in range(self.first, self.last + 1)}
                    & {r % g for r in range(other.first, other.last + 1)})

    def gone(self) -> str | None:
        """Why this lock belongs to a run that has ended (None: it may be alive)."""
        if self.pid < 0:
            return "its lock file is unreadable"
        if self.host != socket.gethostname():
            return f"no heartbeat for {self.age / 60:.0f} min" if self.age > LOCK_STALE_SECONDS else None
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return "that process is not running"
        except PermissionError:  # alive, another user's
            return None
        if self.proc_start is not None and _proc_start(self.pid) not in (None, self.proc_start):
            return "that process is not running (its pid is reused)"
        return None


def _proc_start(pid: int) -> str | None:
    """The start time of a process in clock ticks since boot (field 22 of /proc/PID/stat), if known."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text.rsplit(")", 1)[1].split()[19]


def lock_path(out: Path, placement: Placement) -> Path:
    name = f".shard-{placement.shard[0]}-of-{placement.shard[1]}" if placement.shard else ""
    return out.with_name(f"{out.name}{name}.lock")


def read_locks(out: Path) -> dict[Path, LockEntry]:
    """Every readable lock file of this output (a malformed one counts as a dead run's)."""
    pattern = re.compile(re.escape(out.name) + r"(\.shard-\d+-of-\d+)?\.lock")
    found: dict[Path, LockEntry] = {}
    for path in out.parent.glob(f"{glob.escape(out.name)}*.lock"):
        if not pattern.fullmatch(path.name):
            continue
        try:
            age = time.time() - path.stat().st_mtime
            found[path] = LockEntry(**json.loads(path.read_text()), age=age)
        except FileNotFoundError:  # released meanwhile
            continue
        except (OSError, ValueError, TypeError):
            found[path] = LockEntry(pid=-1, host="?", started=0.0, first=0, last=0, world=1, age=math.inf)
    return found


class OutputLock:
    """The lock file of one run's share of an output (see above), held by the run's leader."""

    def __init__(self, out: Path, placement: Placement) -> None:
        self.out = Path(out)
        self.path = lock_path(self.out, placement)
        first = placement.rank - placement.group_rank  # the group's first global rank
        self.entry = LockEntry(os.getpid(), socket.gethostname(), time.time(), first,
                               first + placement.group_size - 1, placement.world, _proc_start(os.getpid()))
        self._stop = threading.Event()

    def acquire(self) -> None:
        """Take the lock, or raise OutputLockedError naming the live run that owns some of our
        windows. Locks of runs that ended without releasing them are taken over with a warning."""
        if not self.out.parent.is_dir():
            raise UsageError(f"{self.out.parent}: output directory does not exist")
        for _ in range(3):  # a lock can be created between our look and our create: look again
            self._clear_the_way()
            if self._create():
                break
        else:
            raise OutputLockedError(f"{self.path}: another run keeps taking this lock; try again")
        # A run of another share that started at the same moment may have missed our lock, and we
        # its: whoever sees the other now steps back (both may; neither writes over the other).
        for path, other in read_locks(self.out).items():
            if path != self.path and other.overlaps(self.entry) and other.gone() is None:
                self.path.unlink(missing_ok=True)
                raise OutputLockedError(self._refusal(other, path))
        threading.Thread(target=self._heartbeat, daemon=True, name="tagclip-lock-heartbeat").start()

    def _clear_the_way(self) -> None:
        """Refuse if a live run owns any of our windows; remove the locks of ended runs."""
        for path, other in read_locks(self.out).items():
            if not other.overlaps(self.entry):
                continue
            reason = other.gone()
            if reason is None:
                raise OutputLockedError(self._refusal(other, path))
            log.warning("%s: taking over the lock of a run that ended without releasing it (%s; %s)",
                        path, other.describe(), reason)
            path.unlink(missing_ok=True)

    def _create(self) -> bool:
        """Create our lock file whole and atomically (a hard link fails if the name exists)."""
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        fields = {k: v for k, v in asdict(self.entry).items() if k != "age"}
        try:
            tmp.write_text(json.dumps(fields))
            os.link(tmp, self.path)
            return True
        except FileExistsError:
            return False
        except OSError as exc:
            raise UsageError(f"{self.path}: cannot create the lock file ({exc.strerror or exc})") from exc
        finally:
            tmp.unlink(missing_ok=True)

    def _refusal(self, other: LockEntry, path: Path) -> str:
        return (f"{self.out}: another run is writing this output ({other.describe()}; lock {path.name}); "
                "wait for it to end or stop it (a killed run's lock is taken over by the next run)")

    def _heartbeat(self) -> None:
        """Touch the lock file while the run lives: other hosts tell a dead run by its age."""
        while not self._stop.wait(LOCK_HEARTBEAT_SECONDS):
            try:
                os.utime(self.path)
            except OSError:  # released, or removed by hand
                pass

    def release(self) -> None:
        """Remove our lock file (only if it is still ours)."""
        self._stop.set()
        try:
            current = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return
        if (current.get("pid"), current.get("started")) == (self.entry.pid, self.entry.started):
            self.path.unlink(missing_ok=True)


@contextmanager
def output_lock(sess: Session, out: Path | None) -> Iterator[None]:
    """Hold the lock of this run's share of `out` for the block (taken by the leader; a refusal is
    raised on every rank). Nothing to lock for JSON Lines on stdout (out None)."""
    if out is None:
        yield
        return
    lock = OutputLock(out, sess.placement)
    sess.leader_first(lock.acquire, lambda: None)
    try:
        yield
    finally:
        if sess.placement.leader:
            lock.release()


# ---- the work directory ---------------------------------------------------------------------------

def parts_dir(out: Path) -> Path:
    return out.with_name(out.name + ".parts")


def items_table(items: Sequence[ImageItem]) -> pa.Table:
    return pa.table(
        {
            "index": pa.array([it.index for it in items], pa.int64()),
            "image_id": pa.array([output_text(it.image_id) for it in items], pa.string()),
            "path": pa.array([output_text(it.path) for it in items], pa.string()),
            "coco_id": pa.array([it.coco_id for it in items], pa.int64()),
        }
    )


class PartStore:
    """The work directory of one output: configuration, input list and atomic part files."""

    def __init__(self, out: Path) -> None:
        self.out = Path(out)
        self.dir = parts_dir(self.out)

    @classmethod
    def open(
        cls,
        out: Path,
        config: dict,
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
            elif store.out.exists() and not store.dir.exists():
                raise ConfigMismatchError(f"{store.out}: output exists{_made_with(store.out, config)}; "
                                          "pass --overwrite to replace it")
            try:
                store.dir.mkdir(exist_ok=True)
            except OSError as exc:
                raise UsageError(f"{store.dir}: cannot create the work directory ({exc.strerror or exc})") from exc
        elif not store.dir.is_dir():
            raise UsageError(f"{store.dir}: the work directory is not visible here (is OUT on a shared filesystem?)")
        store._check_or_write_config(config, create)
        store._check_or_write_items(items, create)
        store._note_job(job, create)
        return store

    def _check_or_write_config(self, config: dict, create: bool) -> None:
        path = self.dir / "config.json"
        if path.exists():
            previous = json.loads(path.read_text())
            if previous != config:
                changed = sorted(k for k in set(previous) | set(config) if previous.get(k) != config.get(k))
                raise ConfigMismatchError(
                    f"{self.out}: an unfinished run with a different configuration is there "
                    f"(differs in: {', '.join(changed)}); rerun with the same options, or pass --overwrite"
                )
        elif create:
            write_json_atomic(config, path)
        else:
            raise UsageError(f"{path}: missing (is OUT on a shared filesystem?)")

    def _check_or_write_items(self, items: Sequence[ImageItem], create: bool) -> None:
        path = self.dir / "items.parquet"
        current = items_table(items)
        if path.exists():
            previous = pq.read_table(path)
            if not previous.equals(current):
                raise ConfigMismatchError(f"{self.out}: {describe_item_difference(previous, current)}; rerun "
                                          "with the same inputs, or pass --overwrite")
        elif create:
            with atomic_path(path) as tmp:
                pq.write_table(current, tmp, compression="zstd")
        else:
            raise UsageError(f"{path}: missing (is OUT on a shared filesystem?)")

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

    def config(self) -> dict:
        path = self.dir / "config.json"
        if not path.exists():
            raise UsageError(f"{self.dir}: no config.json; not a tagclip work directory")
        return json.loads(path.read_text())

    def items(self) -> pa.Table:
        path = self.dir / "items.parquet"
        if not path.exists():
            raise UsageError(f"{self.dir}: no items.parquet; not a tagclip work directory")
        return pq.read_table(path)

    def part_files(self) -> list[tuple[int, int, Path]]:
        """(first index, last index, path) of every complete part, by first index."""
        found = []
        for path in self.dir.glob("part-*.parquet"):
            match = PART_NAME.fullmatch(path.name)
            if match:
                found.append((int(match[1]), int(match[2]), path))
        return sorted(found)

    def done_mask(self, total: int) -> np.ndarray:
        """(total,) bool: which indices already have a row (one bit per image, not a set of rows)."""
        mask = np.zeros(total, dtype=bool)
        for _, _, path in self.part_files():
            indices = pq.read_table(path, columns=["index"]).column("index").to_numpy()
            mask[indices[indices < total]] = True
        return mask

    def remaining(self, items: Sequence[ImageItem], total: int) -> list[ImageItem]:
        """The items (of an input list of `total`) that have no row yet, in their order."""
        done = self.done_mask(total)
        return [it for it in items if not done[it.index]]

    def failed_indices(self) -> np.ndarray:
        """Indices of the rows already in parts whose status is "failed" (for the exit code of a
        resumed run: the output has them even though this run did not meet them)."""
        found = [np.zeros(0, dtype=np.int64)]
        for _, _, path in self.part_files():
            table = pq.read_table(path, columns=["index", "status"])
            failed = pc.equal(table.column("status"), "failed").to_numpy(zero_copy_only=False)
            found.append(table.column("index").to_numpy()[failed])
        return np.concatenate(found)

    # ---- writing ----
    def write_part(self, table: pa.Table) -> Path:
        table = table.sort_by("index")
        indices = table.column("index")
        lo, hi = pc.min(indices).as_py(), pc.max(indices).as_py()
        path = self.dir / f"part-{lo:012d}-{hi:012d}.parquet"
        try:
            with deferred_signals(), atomic_path(path) as tmp:  # a Ctrl-C lets this part finish first
                pq.write_table(table, tmp, compression="zstd")
        except OutputWriteError as exc:
            raise OutputWriteError(
                f"{exc}; the {len(self.part_files())} parts written before are intact in {self.dir}: "
                "free some space and rerun the same command to resume") from exc
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
        """The rows of all parts in index order, one row per index, `chunk` indices at a time.

        Only the parts overlapping the current chunk are in memory."""
        parts = self.part_files()
        active: list[tuple[int, pa.Table]] = []
        next_part = 0
        for start in range(0, total, chunk):
            end = start + chunk
            while next_part < len(parts) and parts[next_part][0] < end:
                lo, hi, path = parts[next_part]
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
        ids = self.items().column("image_id").take(pa.array(missing[:3])).to_pylist()
        examples = ", ".join(f"#{i} {image_id}" for i, image_id in zip(missing[:3].tolist(), ids, strict=True))
        return (f"{self.out}: {len(missing)} of {total} images have no result yet (e.g. {examples}); "
                "finish the remaining shards (rerun a shard's command to resume it), then merge again")

    def cleanup(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)


def finished_output(spec: JobSpec) -> int | None:
    """The number of failed rows if spec.out is a finished Parquet output of exactly this
    configuration and these items (and no unfinished run is next to it), else None."""
    if not spec.out.is_file() or PartStore(spec.out).dir.exists():
        return None
    try:
        if read_metadata(spec.out) != json.loads(json.dumps(spec.config)):
            return None
        names = pq.read_schema(spec.out).names
        keys = [c for c in ("index", "image_id", "path") if c in names]
        table = pq.read_table(spec.out, columns=[*keys, "status"])
    except Exception:  # not a Parquet file of ours, or unreadable: the usual refusal explains
        return None
    if keys[:2] != ["index", "image_id"] or not table.select(keys).equals(items_table(spec.items).select(keys)):
        return None
    return sum(1 for status in table.column("status").to_pylist() if status != "ok")


def _made_with(out: Path, config: dict) -> str:
    """How an existing output's configuration compares with this run's, for the refusal message."""
    try:
        previous = read_metadata(out)
    except Exception:  # not a Parquet file of ours: nothing to compare
        return ""
    if not previous:
        return ""
    config = json.loads(json.dumps(config))  # tuples -> lists, as stored
    if previous == config:
        return " (same configuration: this run is already complete)"
    changed = sorted(k for k in set(previous) | set(config) if previous.get(k) != config.get(k))
    return f" (made with a different configuration: differs in {', '.join(changed)})"


def describe_item_difference(previous: pa.Table, current: pa.Table) -> str:
    if previous.num_rows != current.num_rows:
        return (f"the unfinished run there has a different input list ({previous.num_rows} images, "
                f"now {current.num_rows})")
    for name in ("image_id", "path", "coco_id"):
        a, b = previous.column(name), current.column(name)
        if not a.equals(b):
            differs = pc.invert(pc.fill_null(pc.equal(a, b), False))
            first = int(np.flatnonzero(differs.to_numpy(zero_copy_only=False))[0])
            return (f"the unfinished run there has a different input list (image #{first}: "
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
    total = store.items().num_rows
    missing = store.missing(total)
    if len(missing):
        raise IncompleteRunError(store.describe_missing(missing, total))
    parts = store.part_files()
    schema = pq.read_schema(parts[0][2])
    for _, _, path in parts:
        made_with = read_metadata(path)
        if made_with and made_with != config:
            raise ConfigMismatchError(
                f"{path}: written with a different configuration than {store.dir / 'config.json'}; "
                "were the shards started with different options? Rerun that shard's work with --overwrite "
                "in a fresh output")
    job = store.job()
    rows = write_final(job.get("format", "parquet"), store.iter_merged(schema, total), store.out, schema,
                       job.get("final_options"))
    store.cleanup()
    return rows


# ---- JSON Lines -----------------------------------------------------------------------------------

def _score(value: float | None) -> float | None:
    """A float32 score as the shortest decimal that reads back to the same float32 (NaN -> null)."""
    value = json_scalar(value)
    return None if value is None else float(str(np.float32(value)))


def json_row(row: dict, classes: Sequence[str]) -> dict:
    """A result row for JSON Lines: the Parquet columns, with `scores` as {class: score}."""
    out = dict(row)
    scores = row.get("scores")
    if scores is not None:
        out["scores"] = {name: _score(s) for name, s in zip(classes, scores, strict=True)}
    return out


class OutputClosed(Exception):
    """The reader of `--out -` went away (e.g. `| head`): stop quietly."""


class JsonLinesSink:
    """Writes rows as JSON Lines to a text stream, one object per image, flushed per window."""

    def __init__(self, stream: TextIO, classes: Sequence[str]) -> None:
        self.stream = stream
        self.classes = list(classes)

    def write(self, rows: Sequence[dict]) -> None:
        try:
            for row in rows:
                self.stream.write(json.dumps(json_row(row, self.classes), ensure_ascii=False, allow_nan=False))
                self.stream.write("\n")
            self.stream.flush()
        except BrokenPipeError:
            raise OutputClosed() from None

    def flush(self) -> None:
        """Nothing held back: every window is written as it completes."""

    def discard(self) -> None:
        """Nothing held back to drop."""


class PartSink:
    """Collects the rows of complete windows and writes them as part files of about part_size rows.

    Only complete windows come here: a partial window is recomputed whole on resume, so that its
    forward batches are the same as in an uninterrupted run."""

    def __init__(self, store: PartStore, schema: pa.Schema, part_size: int) -> None:
        self.store = store
        self.schema = schema
        self.part_size = part_size
        self.buffer: list[dict] = []

    def write(self, rows: Sequence[dict]) -> None:
        self.buffer.extend(rows)
        if len(self.buffer) >= self.part_size:
            self.flush()

    def flush(self) -> None:
        if self.buffer:
            self.store.write_part(pa.Table.from_pylist(self.buffer, schema=self.schema))
        self.buffer.clear()

    def discard(self) -> None:
        """Drop the held rows (the disk refused them: they are redone on resume)."""
        self.buffer.clear()


# ---- running --------------------------------------------------------------------------------------

@dataclass
class JobSpec:
    """What to compute and where: `out` None means JSON Lines on stdout (no parts, no resume)."""

    items: Sequence[ImageItem]
    out: Path | None
    config: dict
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
    mine = [it for it in spec.items if placement.owns(it, spec.window)]
    store: PartStore | None = None
    if spec.out is None:
        sink: JsonLinesSink | PartSink = _stdout_sink(spec, placement, stdout)
        todo = mine
    else:
        finished = None if spec.overwrite or spec.format != "parquet" else finished_output(spec)
        if finished is not None:
            return _already_complete(spec, placement, finished)
        store = _open_store(spec, sess)
        todo = store.remaining(mine, len(spec.items))
        sink = PartSink(store, spec.schema, spec.part_size)
    summary = _resume_summary(spec, placement, store, len(mine), len(todo))
    if progress:
        progress(summary.skipped)
    _run_windows(spec, records(todo), process, sink, summary, progress)
    return _finish(spec, sess, store, summary)


def _stdout_sink(spec: JobSpec, placement: Placement, stdout: TextIO | None) -> JsonLinesSink:
    if placement.distributed:
        raise UsageError("--out - (JSON Lines on stdout) works in a single process; with torchrun, "
                         "write Parquet and read it afterwards")
    return JsonLinesSink(stdout or sys.stdout, spec.config.get("classes", ()))


def _already_complete(spec: JobSpec, placement: Placement, failed: int) -> Summary:
    """Rerunning a finished command is a no-op, as `make` would do (job arrays retry whole
    commands); exit 1 still reports failed rows, as after a resumed run."""
    return Summary(total=len(spec.items), skipped=len(spec.items), failed_before=failed if placement.leader else 0,
                   leader=placement.leader, merged=True,
                   note=f"{spec.out} is already complete for these images and this configuration; "
                        "nothing to do (--overwrite recomputes it)")


def _open_store(spec: JobSpec, sess: Session) -> PartStore:
    """The work directory, created (or checked) by rank 0 first, then checked by the other ranks."""
    job = {"format": spec.format, "batch_size": spec.batch_size, "window": spec.window,
           "final_options": spec.final_options}

    def open_store(create: bool) -> Callable[[], PartStore]:
        return lambda: PartStore.open(spec.out, spec.config, spec.items, job, spec.overwrite and create, create)

    return sess.leader_first(open_store(True), open_store(False))  # type: ignore[return-value]


def _resume_summary(spec: JobSpec, placement: Placement, store: PartStore | None, mine: int, todo: int) -> Summary:
    """This rank's starting counts: its images, those already done by an earlier run (and how many
    of them failed, for the exit code)."""
    summary = Summary(total=mine, skipped=mine - todo)
    if store is not None and summary.skipped:
        summary.failed_before = sum(1 for i in store.failed_indices() if placement.owns(spec.items[i], spec.window))
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
        total.note = _shard_note(spec, placement, len(store.missing(len(spec.items))))
        return total
    rows = store.merge(spec.schema, len(spec.items), spec.format, wait_seconds=60.0 if placement.distributed else 0.0,
                       options=spec.final_options)
    store.cleanup()
    total.merged = True
    log.info("wrote %s (%d rows)", spec.out, rows)
    return total


def _shard_note(spec: JobSpec, placement: Placement, left: int) -> str:
    """What to do after one --shard finished: merge now, or when the other shards are done."""
    return (
        f"{placement.describe()} finished. "
        + (f"All shards are done: run `tagclip merge {spec.out}`" if not left else
           f"{left} images of other shards still have no result; when all shards are done, run "
           f"`tagclip merge {spec.out}`")
    )
