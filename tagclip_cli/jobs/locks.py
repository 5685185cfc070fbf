"""One writer per output: the lock files beside OUT held by a run's leader (see below)."""

from __future__ import annotations

import glob
import json
import logging
import math
import os
import re
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

from tagclip_cli.errors import OutputLockedError, UsageError
from tagclip_cli.jobs.placement import Placement
from tagclip_cli.jobs.session import Session

log = logging.getLogger(__name__)


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
