"""How fast the command line starts: `tagclip --help`, `tagclip annotate --help`, a rerun of a
finished `annotate` (nothing left to do) and one refused for a changed option (--tag-threshold),
each as repeated whole-process runs.

A first `annotate` (shapes-demo on examples/shapes/images, into a temporary folder) makes the output
that the reruns find finished; it is not timed. Each timed command runs --repeat times in a fresh
process with the repository's Python; the median, min and max wall times are printed, and the
median against the target (1 s for `--help`). Times on a shared machine vary with its load: read
them with `uptime`.

    .venv/bin/python benchmarks/bench_startup.py [--repeat 5] [--quick]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HELP_TARGET_S = 1.0


def run(args: list[str], cwd: Path, env: dict, expect: int = 0) -> float:
    """Wall seconds of one whole-process `python -m tagclip_cli ARGS` (fails on another exit code)."""
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "tagclip_cli", *args], cwd=cwd, env=env, capture_output=True,
                          text=True)
    elapsed = time.perf_counter() - start
    if done.returncode != expect:
        raise SystemExit(f"tagclip {' '.join(args)} exited {done.returncode}: {done.stderr.strip()[-500:]}")
    return elapsed


def timed(name: str, args: list[str], repeat: int, cwd: Path, env: dict, expect: int = 0) -> float:
    times = [run(args, cwd, env, expect) for _ in range(repeat)]
    median = statistics.median(times)
    print(f"{name}: median {median:.2f} s (min {min(times):.2f}, max {max(times):.2f}, {repeat} runs)", flush=True)
    return median


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=5, help="whole-process runs per command")
    parser.add_argument("--quick", action="store_true", help="3 runs per command")
    opts = parser.parse_args()
    repeat = 3 if opts.quick else opts.repeat
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        env["TAGCLIP_CACHE_DIR"] = str(work / "cache")
        annotate = ["annotate", str(ROOT / "examples" / "shapes" / "images"), "--model", "shapes-demo", "--vocab",
                    "shapes", "--out", str(work / "labels.parquet"), "--quiet"]
        help_s = timed("tagclip --help", ["--help"], repeat, work, env)
        timed("tagclip annotate --help", ["annotate", "--help"], repeat, work, env)
        run(annotate, work, env)  # the finished run that the reruns find
        timed("annotate rerun, nothing to do", annotate, repeat, work, env)
        timed("annotate rerun refused (--tag-threshold changed)", [*annotate, "--tag-threshold", "0.6"], repeat,
              work, env, expect=2)
    verdict = "met" if help_s < HELP_TARGET_S else "not met"
    print(f"tagclip --help median {help_s:.2f} s vs target {HELP_TARGET_S:.0f} s: {verdict}")


if __name__ == "__main__":
    main()
