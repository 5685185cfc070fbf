"""Bookkeeping at scale (issue 25): listing time, start time and memory per image as N grows.

The inputs are N images made of hard links to one small JPEG (disk use stays at directory entries):
- path list: a text file naming N files of the folder below;
- folder: N hard links, 1,000 per sub-folder;
- tars: one tar of 1,000 samples, hard-linked N / 1,000 times (distinct shard names);
- Parquet: one file of 10,000 rows (row groups of 1,000) with the JPEG's bytes, hard-linked N / 10,000 times;
- pathlist-virtual (not in the default kinds): a path list of N names of which only the first 100,000
  exist, for 10M without 10M directory entries (listing opens no file).

Sections (each a function, each measured in fresh child processes):
- listing: `collect_items` alone, after importing torch and the pipeline; µs per item, the peak RSS of
  the process (imports included) and, per item, the peak and the retained growth over the imports;
- shard start: `tagclip annotate --shard 0/1000` (tiny random CLIP, 80 classes, --workers 0) stopped at
  its first written batch: seconds to that batch and the peak RSS (imports and model included), against N;
  then a later task (1/1000, reading its share of the plan) and a single process (no --shard);
- jobs, resume start and merge (benchmarks/scale_jobs.py): a resumed run's scan of N finished images
  (with the manifest, and as the previous version left an output), and `tagclip merge` of N rows
  in one process's layout and in 1,000 shards' (with the previous merge up to --reference-upto).

    .venv/bin/python benchmarks/bench_scale.py --quick          # 20k and 100k, a few minutes (make bench)
    .venv/bin/python benchmarks/bench_scale.py                  # 100k and 1M
    .venv/bin/python benchmarks/bench_scale.py --sizes 10000000 --resume-only   # resume start at 10M
    .venv/bin/python benchmarks/bench_scale.py --sizes 10000000 --merge-only    # the two merges at 10M
    .venv/bin/python benchmarks/bench_scale.py --sizes 10000000 --kinds pathlist-virtual --sections listing,shard-start
"""

from __future__ import annotations

import argparse
import io
import json
import os
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
KINDS = ("pathlist", "folder", "tars", "parquet")
PER_FOLDER = 1000
PER_TAR = 1000
PER_PARQUET = 10000
LINKS_PER_FILE = 60000


# ---- inputs: hard links to one small JPEG ---------------------------------------------------------

def jpeg_bytes() -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (32, 24), (120, 60, 200)).save(buffer, format="JPEG", quality=80)
    return buffer.getvalue()


def make_folder(root: Path, n: int) -> Path:
    """N hard links to one JPEG, PER_FOLDER per sub-folder: root/images-N/DDDDD/NNNNNNNNNN.jpg."""
    images = root / f"images-{n}"
    if (root / f".folder-{n}").exists():
        return images
    data = jpeg_bytes()
    for start in range(0, n, PER_FOLDER):
        origin = root / f"one-{n}-{start // LINKS_PER_FILE}.jpg"  # a file takes at most 65,000 links (ext4)
        if not origin.exists():
            origin.write_bytes(data)
        folder = images / f"{start // PER_FOLDER:05d}"
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(start, min(n, start + PER_FOLDER)):
            target = folder / f"{i:010d}.jpg"
            if not target.exists():
                os.link(origin, target)
    (root / f".folder-{n}").touch()
    return images


def write_paths(listing: Path, images: Path, n: int) -> None:
    """Write N lines naming the files of make_folder's layout (PER_FOLDER per sub-folder)."""
    with open(listing, "w") as fh:
        for start in range(0, n, PER_FOLDER):
            folder = images / f"{start // PER_FOLDER:05d}"
            fh.writelines(f"{folder}/{i:010d}.jpg\n" for i in range(start, min(n, start + PER_FOLDER)))


def make_pathlist(root: Path, n: int) -> Path:
    """A text file naming the first N files of the folder (absolute paths)."""
    images = make_folder(root, n)
    listing = root / f"paths-{n}.txt"
    if not listing.exists() or not listing.read_text()[:200].startswith(str(images)):
        write_paths(listing, images, n)
    return listing


def make_virtual_pathlist(root: Path, n: int) -> Path:
    """A text file naming N files of which only the first 100,000 exist (hard links): listing a path
    list opens none of them, and a `--shard 0/1000` task's first images are among those that exist.
    For 10M without 10M directory entries."""
    real = min(n, 100000)
    images = make_folder(root, real)
    listing = root / f"virtual-paths-{n}.txt"
    if not listing.exists():
        write_paths(listing, images, n)
    return listing


def make_tars(root: Path, n: int) -> Path:
    """N / PER_TAR hard links to one tar of PER_TAR samples (key.jpg + key.txt each)."""
    one = root / "one.tar"
    if not one.exists():
        data = jpeg_bytes()
        with tarfile.open(one, "w", format=tarfile.USTAR_FORMAT) as tar:
            for i in range(PER_TAR):
                for ext, payload in (("jpg", data), ("txt", b"a caption")):
                    info = tarfile.TarInfo(f"{i:07d}.{ext}")
                    info.size = len(payload)
                    tar.addfile(info, io.BytesIO(payload))
    folder = root / f"tars-{n}"
    folder.mkdir(exist_ok=True)
    for s in range(max(1, n // PER_TAR)):
        target = folder / f"{s:06d}.tar"
        if not target.exists():
            os.link(one, target)
    return folder


def make_parquet(root: Path, n: int) -> Path:
    """N / PER_PARQUET hard links to one Parquet file of PER_PARQUET rows (key, jpg)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    one = root / "one.parquet"
    rows = min(PER_PARQUET, n)
    if not one.exists() or pq.ParquetFile(one).metadata.num_rows != rows:
        data = jpeg_bytes()
        table = pa.table({"key": [f"{i:07d}" for i in range(rows)], "jpg": [data] * rows})
        pq.write_table(table, one, row_group_size=1000)
    folder = root / f"parquet-{n}"
    folder.mkdir(exist_ok=True)
    for s in range(max(1, n // rows)):
        target = folder / f"{s:06d}.parquet"
        if not target.exists():
            os.link(one, target)
    return folder


MAKERS = {"pathlist": make_pathlist, "folder": make_folder, "tars": make_tars, "parquet": make_parquet,
          "pathlist-virtual": make_virtual_pathlist}


# ---- measuring in a child process -----------------------------------------------------------------

def rss_mb() -> float:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def peak_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def child_listing(source: str, own: str = "", counts: str = "") -> None:
    """Print {seconds, items, base_mb, peak_mb, retained_mb} for collect_items(source); own "I/N":
    what --shard I/N lists without a plan (its own row groups of Parquet inputs, its own tar shards);
    counts (only for a --code checkout from before local numbering, which had jobs/listing.py's
    TarCountBoard): a folder standing for OUT, whose work directory shares the tar counts between
    tasks (without it that task counts every other shard itself). items: the whole input's count
    when the listing knows it, else (tars numbered locally) the items listed."""
    import gc

    import torch  # noqa: F401  (the imports of a run, in the baseline)

    import tagclip_cli.pipeline  # noqa: F401
    from tagclip_cli.sources import collect_items

    warm = Path(tempfile.mkdtemp())  # what the first listing imports and sets up, outside the measure
    (warm / "a.jpg").write_bytes(b"")
    collect_items(str(warm))
    gc.collect()
    base = rss_mb()
    start, cpu = time.perf_counter(), time.process_time()
    share = tuple(map(int, own.split("/"))) if own else None
    if counts:
        from tagclip_cli.jobs.listing import TarCountBoard

        share = (*share, TarCountBoard(Path(counts) / "out.parts", Path(counts) / "out", "bench", share[0]))
    items = collect_items(source, **({"own": share} if share else {}))
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    gc.collect()
    total = getattr(items, "total", None)
    total = len(items) if total is None else total
    print(json.dumps({"seconds": seconds, "cpu": cpu, "items": total, "listed": len(items), "base_mb": base,
                      "peak_mb": peak_mb(), "retained_mb": rss_mb() - base}))


def child_start(source: str, out: str, checkpoint: str, cache: str, shard: str) -> None:
    """Print {seconds, peak_mb} of `annotate --shard` until its first batch of rows."""
    start = time.perf_counter()
    from contextlib import contextmanager

    from tagclip_cli import commands

    @contextmanager
    def progress(total: int):
        def advance(n: int) -> None:
            if n:
                print(json.dumps({"seconds": time.perf_counter() - start, "cpu": time.process_time(),
                                  "peak_mb": peak_mb(), "share": total}), flush=True)
                os._exit(0)
        yield advance

    commands.annotate(source, "coco", out, checkpoint=checkpoint, cache_dir=cache,
                      shard=None if shard == "none" else shard, workers=0, batch_size=8, progress=progress)
    print(json.dumps({"seconds": time.perf_counter() - start, "cpu": time.process_time(), "peak_mb": peak_mb(),
                      "share": 0}), flush=True)


CODE = [str(HERE.parent)]  # the checkout whose tagclip_cli the children import (--code)


def run_child(*args: str) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": CODE[0]}
    done = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True, env=env)
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not lines:
        raise SystemExit(f"child {args[:2]} failed:\n{done.stderr[-2000:]}")
    return json.loads(lines[-1])


def load() -> str:
    return f"load {os.getloadavg()[0]:.1f}"


# ---- sections -------------------------------------------------------------------------------------

def section_listing(root: Path, sizes: list[int], kinds: list[str], own: str = "") -> None:
    """Listing: time and memory per item, for each input kind and size (own "I/N": what a --shard
    I/N task lists without a plan; per item of the whole input all the same)."""
    print("listing (collect_items" + (f", own share of --shard {own}" if own else "") + "): kind, N, wall and CPU "
          "us/item, peak RSS MB (imports included), peak B/item over imports, retained B/item")
    for kind in kinds:
        for n in sizes:
            source = str(MAKERS[kind](root, n))
            for counts, what in tar_count_runs(root, kind, own):
                r = run_child("--child-listing", source, own, counts)
                per = 1e6 / r["items"]
                grow = max(0.0, r["peak_mb"] - r["base_mb"]) * 2**20 / r["items"]
                kept = r["retained_mb"] * 2**20 / r["items"]
                print(f"  {kind:8s} N={r['items']:>9,d}  {r['seconds'] * per:6.2f} us/item "
                      f"(CPU {r['cpu'] * per:5.2f})  peak {r['peak_mb']:7.0f} MB  +{grow:5.0f} B/item  "
                      f"retained {kept:5.0f} B/item  ({load()})"
                      + (f"  {what}: {r['seconds']:.2f} s (CPU {r['cpu']:.2f} s)" if what else ""), flush=True)


def tar_count_runs(root: Path, kind: str, own: str) -> list[tuple[str, str]]:
    """(counts folder, what) of each listing to measure: one (a --shard task over tars: its own shards,
    numbered locally; N/item figures are then per item listed); for a --code checkout with the
    earlier tar share (jobs/listing.py's TarCountBoard), three: alone (no work directory: it counts
    every other shard itself, at once), the first task of an array (waits for counts, then counts and
    publishes them) and a task that finds them all published."""
    if not (own and kind == "tars" and "TarCountBoard" in (Path(CODE[0]) / "tagclip_cli/jobs/listing.py").read_text()):
        return [("", "own shards only (local numbering)" if own and kind == "tars" else "")]
    board = tempfile.mkdtemp(dir=root)
    return [("", "alone (counts the other shards)"), (board, "first (waits, counts, publishes)"),
            (board, "counts published")]


def section_shard_start(root: Path, sizes: list[int], kinds: list[str]) -> None:
    """`--shard I/1000` tasks: seconds to the first batch and peak RSS, against N. The first task
    lists the input and writes the plan; a later task (1/1000, same OUT) reads its share of the plan
    instead. Over Parquet files (no plan is written) each task lists only its own row groups. Then a
    single process (no --shard, a new OUT), which holds the whole list."""
    sys.path.insert(0, str(HERE))
    from bench_memory import tiny_checkpoint

    checkpoint = root / "tiny.pt"
    if not checkpoint.exists():
        tiny_checkpoint(checkpoint)
    cache = root / "cache"
    print("shard start (annotate --shard I/1000 to its first batch; tiny CLIP, 80 classes): kind, N, task, "
          "share, seconds (process CPU seconds), peak RSS MB")
    for kind in kinds:
        for n in sizes:
            source = str(MAKERS[kind](root, n))
            with tempfile.TemporaryDirectory(dir=root) as out:
                tasks = (("0/1000", "first (lists, writes the plan)"), ("1/1000", "later (reads the plan)"))
                if kind == "parquet":  # no plan: each task lists its own row groups (footers of the rest)
                    tasks = (("0/1000", "first (its own row groups)"), ("1/1000", "later (its own row groups)"))
                if kind == "tars":  # no plan: each task lists its own shards, numbered locally
                    tasks = (("0/1000", "first (own shards, local)"), ("1/1000", "later (own shards, local)"))
                for task, what, name in (*((t, w, "tags") for t, w in tasks),
                                         ("none", "single process (no --shard)", "single")):
                    r = run_child("--child-start", source, str(Path(out) / f"{name}.parquet"), str(checkpoint),
                                  str(cache), task)
                    print(f"  {kind:8s} N={n:>9,d}  {what:31s} share {r['share']:>7,d}  {r['seconds']:6.1f} s "
                          f"(CPU {r.get('cpu', float('nan')):5.1f} s)  peak {r['peak_mb']:7.0f} MB  ({load()})",
                          flush=True)


def section_jobs(root: Path, sizes: list[int], kinds: list[str], options: argparse.Namespace) -> None:
    """Resume start and merge (one process, --shards shards) at each size (benchmarks/scale_jobs.py)."""
    sys.path.insert(0, str(HERE))
    from scale_jobs import run_sections

    with tempfile.TemporaryDirectory(prefix="bench-scale-", dir=options.tmp) as work:
        run_sections(Path(work), sizes, options.shards, options.reference_upto, merge=not options.resume_only,
                     resume=not options.merge_only)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", nargs="+", default=["100000,1000000"], help="N, comma- or space-separated")
    parser.add_argument("--kinds", default=",".join(KINDS), help=f"some of {','.join(MAKERS)}")
    parser.add_argument("--sections", help="some of listing,shard-start,jobs (default: all; jobs with --resume-only)")
    parser.add_argument("--quick", action="store_true",
                        help="listing at N = 20,000 and 100,000; shard start of a path list and tars at 100,000; "
                             "jobs at 20,000 and 100,000")
    parser.add_argument("--workdir", help="keep the inputs here (default: a temporary folder)")
    parser.add_argument("--code", help="measure the tagclip_cli of this checkout (e.g. an earlier version)")
    parser.add_argument("--shards", type=int, default=1000, help="--shard tasks of the sharded merge (jobs)")
    parser.add_argument("--reference-upto", type=int, default=1_000_000,
                        help="jobs: also time the previous merge up to this many rows")
    parser.add_argument("--resume-only", action="store_true", help="jobs: only the resume start (e.g. at 10M)")
    parser.add_argument("--merge-only", action="store_true", help="jobs: only the merges (e.g. at 10M)")
    parser.add_argument("--tmp", default=None, help="jobs: where to make the work directories (default: $TMPDIR)")
    parser.add_argument("--own", default="", help="listing: what --shard I/N lists without a plan (e.g. 0/1000)")
    parser.add_argument("--child-listing", nargs=3, help=argparse.SUPPRESS)
    parser.add_argument("--child-start", nargs=5, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child_listing:
        return child_listing(*args.child_listing)
    if args.child_start:
        return child_start(*args.child_start)
    sys.stdout.reconfigure(line_buffering=True)  # type: ignore[attr-defined]
    if args.code:
        CODE[0] = str(Path(args.code).resolve())
    sizes = [int(n) for text in args.sizes for n in text.split(",") if n]
    kinds = [k for k in args.kinds.split(",") if k]
    sections = {"listing": lambda root, n, k: section_listing(root, n, k, args.own), "shard-start": section_shard_start,
                "jobs": lambda root, n, k: section_jobs(root, n, k, args)}
    quick = {"listing": ([20000, 100000], kinds), "shard-start": ([100000], ["pathlist", "tars"]),
             "jobs": ([20000, 100000], kinds)}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(args.workdir or tmp)
        root.mkdir(parents=True, exist_ok=True)
        chosen = args.sections or ("jobs" if args.resume_only or args.merge_only else "listing,shard-start,jobs")
        for name in chosen.split(","):
            sections[name](root, *(quick[name] if args.quick and name in quick else (sizes, kinds)))


if __name__ == "__main__":
    main()
