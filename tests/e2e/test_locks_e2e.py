"""One writer per output, in subprocesses: a second run on an output that a live run is writing
refuses at once (exit 2, one line naming the other run); a SIGKILLed run's lock is taken over by
the next run with a warning; shards of one output run side by side and merge as before.

Before the lock, the second run computed everything too, and whichever finished second failed
with "No such file or directory ... free some space" (the first one's merge had removed the
shared work directory under it); `test_a_second_run_on_a_live_output_refuses_at_once` is that
scenario."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

N_LONG = 1000  # enough for the first run to still be busy when the second one has started up
N_SHORT = 40


def env_for(cache: Path) -> dict[str, str]:
    env = dict(os.environ, TAGCLIP_CACHE_DIR=str(cache), COLUMNS="400", OMP_NUM_THREADS="1")
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    return env


def annotate_args(images: Path, out: Path, checkpoint: Path, *extra: str) -> list[str]:
    return ["annotate", str(images), "--vocab", "voc", "--out", str(out), "--checkpoint", str(checkpoint),
            "--workers", "0", "--batch-size", "2", "--part-size", "1", "--device", "cpu", *extra]


def start(args: list[str], cache: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "tagclip_cli", *args], env=env_for(cache), text=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)


def tagclip(*args: str, cache: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tagclip_cli", *args], capture_output=True, text=True,
                          env=env_for(cache), timeout=600)


def make_images(root: Path, n: int) -> Path:
    root.mkdir()
    rng = np.random.default_rng(n)
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (32, 48, 3), dtype=np.uint8)).save(root / f"im{i:03d}.png")
    return root


def wait_for(condition, proc: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert proc.poll() is None, proc.stderr.read()
        assert time.monotonic() < deadline
        time.sleep(0.05)


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("lock_cache")


@pytest.mark.slow
def test_a_second_run_on_a_live_output_refuses_at_once(tiny_checkpoint, cache, tmp_path):
    images = make_images(tmp_path / "images", N_LONG)
    out = tmp_path / "out.parquet"
    args = annotate_args(images, out, tiny_checkpoint)
    first = start(args, cache)
    try:
        wait_for(lambda: any(Path(f"{out}.parts").glob("part-*.parquet")), first)  # computing
        second = tagclip(*args, cache=cache)
        first_alive = first.poll() is None
        parts_after_refusal = len(list(Path(f"{out}.parts").glob("part-*.parquet")))
    finally:
        if first.poll() is None:
            os.killpg(first.pid, signal.SIGKILL)
        first.communicate(timeout=120)
    assert second.returncode == 2, second.stderr
    assert first_alive, "the first run ended before the second one was refused: use more images"
    lines = [line for line in second.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, second.stderr
    assert lines[0].startswith(f"error: {out}: another run is writing this output (pid {first.pid} on "
                               f"{socket.gethostname()}, started "), lines[0]
    assert "UTC; lock out.parquet.lock)" in lines[0]
    assert "free some space" not in second.stderr and "Traceback" not in second.stderr
    assert parts_after_refusal < N_LONG // 4  # the first run was far from done: nothing was computed twice


@pytest.mark.slow
def test_a_sigkilled_runs_lock_is_taken_over_with_a_warning(tiny_checkpoint, cache, tmp_path):
    images = make_images(tmp_path / "images", N_SHORT)
    out = tmp_path / "out.parquet"
    args = annotate_args(images, out, tiny_checkpoint)
    first = start(args, cache)
    try:
        wait_for(lambda: any(Path(f"{out}.parts").glob("part-*.parquet")), first)
    finally:
        if first.poll() is None:
            os.killpg(first.pid, signal.SIGKILL)
        first.communicate(timeout=120)
    assert (tmp_path / "out.parquet.lock").exists()  # left behind by the killed run
    rerun = tagclip(*args, cache=cache)
    assert rerun.returncode == 0, rerun.stderr
    text = " ".join(rerun.stderr.split())
    assert "taking over the lock of a run that ended without releasing it" in text
    assert f"(pid {first.pid} on {socket.gethostname()}" in text and "that process is not running" in text
    assert pq.read_table(out).column("index").to_pylist() == list(range(N_SHORT))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["images", "out.parquet"]  # lock and parts gone


@pytest.mark.slow
def test_two_shards_run_side_by_side_then_merge(tiny_checkpoint, cache, tmp_path):
    images = make_images(tmp_path / "images", N_SHORT)
    out = tmp_path / "out.parquet"
    shards = [start(annotate_args(images, out, tiny_checkpoint, "--shard", f"{i}/2"), cache) for i in range(2)]
    locks = [tmp_path / f"out.parquet.shard-{i}-of-2.lock" for i in range(2)]
    both_held = False
    while any(p.poll() is None for p in shards):
        both_held = both_held or all(lock.exists() for lock in locks)
        time.sleep(0.02)
    errors = [p.communicate(timeout=120)[1] for p in shards]
    assert [p.returncode for p in shards] == [0, 0], errors
    assert both_held, "the shards did not overlap in time"
    assert all("tagclip merge" in e for e in errors)
    merged = tagclip("merge", str(out), cache=cache)
    assert merged.returncode == 0 and f"merged {N_SHORT} rows" in merged.stderr, merged.stderr
    assert pq.read_table(out).column("index").to_pylist() == list(range(N_SHORT))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["images", "out.parquet"]
