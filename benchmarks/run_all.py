"""Run every benchmark script (`make bench`) and end with the three headline ratios.

Runs, in this order, each `benchmarks/bench_*.py` that exists (bench_speed.py, bench_memory.py,
bench_synthetic.py, bench_sources.py, bench_scale.py, and any later bench_*.py), each in its own
process with the repository's Python, streaming its output. A script whose --help lists --quick
gets --quick unless --full is given (scripts without one get the reduced settings in QUICK_ARGS).
Missing scripts are skipped with a note. On a CPU with native bf16 (AMX or AVX512-BF16)
bench_speed.py runs a second time with --precision bf16 and its three ratios are printed, labelled,
before the end. The last three lines are copied from the default (fp32) bench_speed.py output:

    annotate speedup vs naive: <R>x
    segment speedup vs naive: <R>x
    annotate time vs encoder-only: <R>x

    .venv/bin/python benchmarks/run_all.py            # quick settings (about 3 minutes on a quiet 2-core AMX box)
    .venv/bin/python benchmarks/run_all.py --full     # each script's full default
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

HERE = Path(__file__).resolve().parent
KNOWN = ("bench_speed.py", "bench_memory.py", "bench_synthetic.py", "bench_sources.py", "bench_scale.py")
# Reduced settings for scripts that have no --quick of their own (keeps `make bench` to a few minutes).
QUICK_ARGS = {
    "bench_memory.py": ["--images", "800", "--first", "200"],
    "bench_batching.py": ["--images", "16"],
}
HEADLINES = (
    "annotate speedup vs naive",
    "segment speedup vs naive",
    "annotate time vs encoder-only",
)


def scripts() -> list[str]:
    """The known scripts first (in a fixed order), then any other bench_*.py alphabetically."""
    others = sorted(p.name for p in HERE.glob("bench_*.py") if p.name not in KNOWN)
    return [*KNOWN, *others]


def fast_cpu_bf16() -> bool:
    """True on a CPU whose matrix units run bf16 natively (AMX or AVX512-BF16)."""
    try:
        import torch

        return bool(torch.cpu._is_amx_tile_supported() or torch.cpu._is_avx512_bf16_supported())
    except (ImportError, AttributeError):
        return False


def supports_quick(path: Path) -> bool:
    """True if the script's argument parser has a --quick option (read from its source)."""
    return re.search(r"""add_argument\(\s*["']--quick["']""", path.read_text(encoding="utf-8")) is not None


def quick_args(path: Path) -> list[str]:
    """--quick if the script has it, else the reduced settings of QUICK_ARGS (or none)."""
    return ["--quick"] if supports_quick(path) else QUICK_ARGS.get(path.name, [])


def run_script(path: Path, args: list[str]) -> tuple[int, str, float]:
    """Run one script, echoing its stdout; returns (exit code, captured stdout, seconds)."""
    cmd = [sys.executable, str(path), *args]
    print(f"\n=== {path.name} ({' '.join(cmd[1:]).replace(str(HERE) + '/', '')}) ===", flush=True)
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, cwd=HERE.parent)
    lines = []
    assert proc.stdout is not None
    for line in proc.stdout:
        sys.stdout.write(line)
        sys.stdout.flush()
        lines.append(line)
    code = proc.wait()
    return code, "".join(lines), time.perf_counter() - start


def headlines(output: str) -> dict[str, str]:
    """The ratio lines found in a script's output, by their label."""
    found = {}
    for label in HEADLINES:
        matches = re.findall(rf"^{re.escape(label)}: (\S+)x\s*$", output, flags=re.MULTILINE)
        if matches:
            found[label] = matches[-1]
    return found


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--full", action="store_true", help="run each script with its full defaults")
    ap.add_argument("--only", nargs="*", default=None, help="run only these scripts (names)")
    args = ap.parse_args(argv)
    ratios: dict[str, str] = {}
    bf16_ratios: dict[str, str] = {}
    failed = []
    summary = []
    for name in scripts():
        if args.only is not None and name not in args.only:
            continue
        path = HERE / name
        if not path.exists():
            print(f"\n=== {name}: not present, skipped ===", flush=True)
            summary.append(f"{name}: skipped (not present)")
            continue
        code, output, seconds = run_script(path, [] if args.full else quick_args(path))
        summary.append(f"{name}: exit {code}, {seconds:.0f}s")
        if code != 0:
            failed.append(name)
        if name == "bench_speed.py":
            ratios = headlines(output)
            if fast_cpu_bf16():
                code, output, seconds = run_script(path, [*(quick_args(path) if not args.full else []),
                                                         "--precision", "bf16"])
                summary.append(f"{name} --precision bf16: exit {code}, {seconds:.0f}s")
                if code != 0:
                    failed.append(f"{name} --precision bf16")
                bf16_ratios = headlines(output)
    print("\n=== summary ===")
    for line in summary:
        print(line)
    print()
    if bf16_ratios:
        for label in HEADLINES:
            print(f"({label} with --precision bf16: {bf16_ratios.get(label, 'n/a')}x)")
        print("default precision (fp32):")
    for label in HEADLINES:
        print(f"{label}: {ratios.get(label, 'n/a')}x")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
