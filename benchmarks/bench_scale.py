"""Bookkeeping at scale (issue 25): time and memory of the job layer as the number of images grows.

Sections (each measured in fresh child processes):
- resume start and merge (benchmarks/scale_jobs.py): a resumed run's scan of N finished images
  (with the manifest, and as the previous version left an output), and `tagclip merge` of N rows
  in one process's layout and in 1,000 shards' (with the previous merge up to --reference-upto).

    .venv/bin/python benchmarks/bench_scale.py --quick            # 20k and 100k (make bench)
    .venv/bin/python benchmarks/bench_scale.py                    # 100k and 1M
    .venv/bin/python benchmarks/bench_scale.py --sizes 10000000   # 10M
    .venv/bin/python benchmarks/bench_scale.py --sizes 10000000 --resume-only
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent


def jobs_sections(args: argparse.Namespace) -> None:
    """Resume start and merge (one process, --shards shards) at each size."""
    sys.path.insert(0, str(HERE))
    from scale_jobs import run_sections

    with tempfile.TemporaryDirectory(prefix="bench-scale-", dir=args.tmp) as root:
        run_sections(Path(root), args.sizes, args.shards, args.reference_upto, merge=not args.resume_only)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="20k and 100k images (make bench)")
    parser.add_argument("--sizes", type=int, nargs="+", help="numbers of images (default 100k and 1M)")
    parser.add_argument("--shards", type=int, default=1000, help="--shard tasks of the sharded merge")
    parser.add_argument("--reference-upto", type=int, default=1_000_000,
                        help="also time the previous merge up to this many rows")
    parser.add_argument("--resume-only", action="store_true", help="only the resume start (e.g. at 10M)")
    parser.add_argument("--tmp", default=None, help="where to make the work directories (default: $TMPDIR)")
    args = parser.parse_args()
    sys.stdout.reconfigure(line_buffering=True)  # type: ignore[attr-defined]
    args.sizes = args.sizes or ([20_000, 100_000] if args.quick else [100_000, 1_000_000])
    jobs_sections(args)


if __name__ == "__main__":
    main()
