"""jobs/locks.py: one writer per output. The lock files of live, dead and stale runs, and of shards.

Real lock files in a temporary directory, real processes for the pids (a finished subprocess's
pid is a dead one), real mtimes for the heartbeats."""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
import time

import pytest

from tagclip_cli.errors import OutputLockedError, UsageError
from tagclip_cli.jobs.locks import LOCK_STALE_SECONDS, LockEntry, OutputLock, read_locks
from tagclip_cli.jobs.placement import Placement


def entry(first: int, last: int, world: int) -> LockEntry:
    return LockEntry(pid=1, host="h", started=0.0, first=first, last=last, world=world)


def test_shares_overlap_when_some_window_belongs_to_both():
    whole, half0, half1 = entry(0, 0, 1), entry(0, 0, 2), entry(1, 1, 2)
    assert whole.overlaps(half0) and whole.overlaps(half1) and half0.overlaps(half0)
    assert not half0.overlaps(half1)
    assert not half0.overlaps(entry(1, 1, 4)) and half0.overlaps(entry(2, 2, 4))  # w%2==0 vs w%4==1 / ==2
    # --shard 0/2 under torchrun with 2 ranks owns global ranks 0-1 of 4: windows w%4 in {0, 1};
    # --shard 1/2 in one process owns w%2 == 1, which includes w%4 == 1.
    assert entry(0, 1, 4).overlaps(half1) and not entry(0, 1, 4).overlaps(entry(2, 3, 4))


def dead_pid() -> int:
    proc = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    return int(proc.stdout)


def write_lock(path, age: float = 0.0, **fields) -> None:
    data = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time() - age, "first": 0,
            "last": 0, "world": 1, "proc_start": None, **fields}
    path.write_text(json.dumps(data))
    os.utime(path, (time.time() - age, time.time() - age))


def test_a_live_lock_refuses_with_one_line_naming_the_run(tmp_path):
    out = tmp_path / "out.parquet"
    first = OutputLock(out, Placement())
    first.acquire()
    with pytest.raises(OutputLockedError) as refused:
        OutputLock(out, Placement()).acquire()
    message = str(refused.value)
    assert "\n" not in message
    assert f"pid {os.getpid()} on {socket.gethostname()}, started " in message and "UTC" in message
    assert message.startswith(f"{out}: another run is writing this output")
    first.release()
    assert not list(tmp_path.iterdir())  # released: no lock file, no temporary file


def test_the_lock_of_a_dead_process_is_taken_over_with_a_warning(tmp_path, caplog):
    out = tmp_path / "out.parquet"
    pid = dead_pid()
    write_lock(tmp_path / "out.parquet.lock", pid=pid)
    lock = OutputLock(out, Placement())
    with caplog.at_level(logging.WARNING, logger="tagclip_cli"):
        lock.acquire()
    assert f"taking over the lock of a run that ended without releasing it (pid {pid} on " in caplog.text
    assert "that process is not running" in caplog.text
    assert json.loads((tmp_path / "out.parquet.lock").read_text())["pid"] == os.getpid()
    lock.release()


def test_a_reused_pid_is_not_taken_for_the_run(tmp_path, caplog):
    out = tmp_path / "out.parquet"
    write_lock(tmp_path / "out.parquet.lock", proc_start="1")  # our pid, but not our start time
    lock = OutputLock(out, Placement())
    with caplog.at_level(logging.WARNING, logger="tagclip_cli"):
        lock.acquire()
    assert "its pid is reused" in caplog.text
    lock.release()


def test_another_hosts_lock_is_live_until_its_heartbeat_is_stale(tmp_path, caplog):
    out = tmp_path / "out.parquet"
    path = tmp_path / "out.parquet.lock"
    write_lock(path, age=LOCK_STALE_SECONDS / 2, host="elsewhere", pid=dead_pid())
    with pytest.raises(OutputLockedError, match="on elsewhere, started"):
        OutputLock(out, Placement()).acquire()
    write_lock(path, age=LOCK_STALE_SECONDS + 60, host="elsewhere")
    lock = OutputLock(out, Placement())
    with caplog.at_level(logging.WARNING, logger="tagclip_cli"):
        lock.acquire()
    assert "on elsewhere" in caplog.text and "no heartbeat for 11 min" in caplog.text
    lock.release()


def test_shards_lock_side_by_side_and_a_whole_run_is_refused(tmp_path):
    out = tmp_path / "out.parquet"
    shards = [OutputLock(out, Placement(rank=i, world=2, shard=(i, 2))) for i in range(2)]
    for lock in shards:
        lock.acquire()
    assert sorted(p.name for p in read_locks(out)) == ["out.parquet.shard-0-of-2.lock", "out.parquet.shard-1-of-2.lock"]
    with pytest.raises(OutputLockedError, match=r"shard [01]/2; lock out.parquet.shard-[01]-of-2.lock"):
        OutputLock(out, Placement()).acquire()
    with pytest.raises(OutputLockedError, match="shard 1/2; lock out.parquet.shard-1-of-2.lock"):
        OutputLock(out, Placement(rank=1, world=2, shard=(1, 2))).acquire()
    with pytest.raises(OutputLockedError):  # another split of the same output overlaps
        OutputLock(out, Placement(rank=2, world=4, shard=(2, 4))).acquire()
    for lock in shards:
        lock.release()
    assert not list(tmp_path.iterdir())


def test_an_unreadable_lock_is_taken_over_and_a_missing_directory_refused(tmp_path, caplog):
    out = tmp_path / "out.parquet"
    (tmp_path / "out.parquet.lock").write_text("{not json")
    lock = OutputLock(out, Placement())
    with caplog.at_level(logging.WARNING, logger="tagclip_cli"):
        lock.acquire()
    assert "its lock file is unreadable" in caplog.text
    lock.release()
    with pytest.raises(UsageError, match="output directory does not exist"):
        OutputLock(tmp_path / "no" / "out.parquet", Placement()).acquire()
