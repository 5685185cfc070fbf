"""Memory stays flat as the number of images grows: peak RSS of `tagclip annotate` at 500 and 2,000 images.

Writes N small noise images (mixed sizes) and a tiny random CLIP checkpoint to a temp dir, then:
1. one run over all N images, sampling the process's RSS from /proc while it works; reports the
   peak RSS when the first 500 rows are in part files and at the end (after the merge);
2. separate runs over the first 500 and over all N images; reports each run's peak RSS (wait4).
Nothing per image should be kept in RAM beyond one part's buffer, so the numbers should match.

    .venv/bin/python benchmarks/bench_memory.py            # 2,000 images
    .venv/bin/python benchmarks/bench_memory.py --images 500 --workers 2
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch
from PIL import Image

SIZES = [(64, 48), (48, 64), (64, 64), (80, 60)]


def tiny_checkpoint(path: Path) -> None:
    """A randomly initialised 6-layer, 64-wide ViT-B/16-shaped CLIP (OpenAI key layout)."""
    import open_clip

    torch.manual_seed(0)
    vision = open_clip.model.CLIPVisionCfg(layers=6, width=64, head_width=64, patch_size=16, image_size=224)
    text = open_clip.model.CLIPTextCfg(context_length=77, vocab_size=49408, width=64, heads=1, layers=1)
    model = open_clip.model.CLIP(embed_dim=32, vision_cfg=vision, text_cfg=text, quick_gelu=True).eval()
    torch.save(model.state_dict(), path)


def make_images(root: Path, n: int) -> list[Path]:
    rng = np.random.default_rng(0)
    paths = []
    for i in range(n):
        w, h = SIZES[i % len(SIZES)]
        folder = root / f"{i // 500:02d}"
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{i:05d}.png"
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(path)
        paths.append(path)
    return paths


def proc_kb(pid: int, field: str) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except (FileNotFoundError, ProcessLookupError):
        pass
    return 0


def rows_in_parts(parts: Path) -> int:
    total = 0
    for p in list(parts.glob("part-*.parquet")):
        try:
            total += pq.read_metadata(p).num_rows
        except (FileNotFoundError, OSError):
            pass
    return total


def annotate(listing: Path, out: Path, ckpt: Path, workers: int, cache: Path, sample_at: int | None = None,
             part_size: int = 256):
    """Run annotate; returns (seconds, peak RSS MB of the whole run, peak RSS MB when sample_at rows were done)."""
    env = dict(os.environ, TAGCLIP_CACHE_DIR=str(cache))
    cmd = [sys.executable, "-m", "tagclip_cli", "annotate", str(listing), "--vocab", "voc", "--out", str(out),
           "--checkpoint", str(ckpt), "--workers", str(workers), "--batch-size", "8", "--device", "cpu",
           "--overwrite", "-q", "--part-size", str(part_size)]
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    at_sample = None
    parts = out.with_name(out.name + ".parts")
    last = -1
    while True:
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            break
        if sample_at is None:
            time.sleep(0.05)
            continue
        rows = rows_in_parts(parts) if parts.exists() else 0
        if rows != last:  # one point of the RSS curve per new part file
            rss, hwm = proc_kb(proc.pid, "VmRSS") / 1024, proc_kb(proc.pid, "VmHWM") / 1024
            print(f"    {rows:6d} rows in parts: RSS {rss:7.1f} MB, peak so far {hwm:7.1f} MB", flush=True)
            last = rows
            if at_sample is None and rows >= sample_at:
                at_sample = hwm
        time.sleep(0.05)
    seconds = time.perf_counter() - start
    stderr = proc.stderr.read().decode()
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"annotate failed:\n{stderr}")
    return seconds, usage.ru_maxrss / 1024, at_sample


def listing_of(paths: list[Path], path: Path) -> Path:
    path.write_text("".join(f"{p}\n" for p in paths))
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=2000)
    ap.add_argument("--first", type=int, default=500)
    ap.add_argument("--workers", type=int, default=0, help="0: RSS is the one process doing everything")
    ap.add_argument("--separate", action="store_true", help="also time separate runs of --first and --images")
    ap.add_argument("--part-size", type=int, default=256)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench_memory_") as tmp:
        tmp = Path(tmp)
        ckpt = tmp / "tiny.pt"
        tiny_checkpoint(ckpt)
        paths = make_images(tmp / "images", args.images)
        first = tmp / "first.txt"
        first.write_text("".join(f"{p}\n" for p in paths[: args.first]))
        full = tmp / "all.txt"
        full.write_text("".join(f"{p}\n" for p in paths))
        cache = tmp / "cache"
        annotate(listing_of(paths[:16], tmp / "warm.txt"), tmp / "warm.parquet", ckpt, 0, cache)  # text cache

        print(f"one run over {args.images} images:")
        seconds, peak_all, peak_first = annotate(full, tmp / "all.parquet", ckpt, args.workers, cache,
                                                 sample_at=args.first, part_size=args.part_size)
        rows = pq.read_metadata(tmp / "all.parquet").num_rows
        print(f"  {rows} rows (--workers {args.workers}, part size {args.part_size}, {seconds:.1f} s, "
              f"{rows / seconds:.0f} images/s incl. startup)")
        print(f"  peak RSS after {args.first:>5} rows: {peak_first:7.1f} MB" if peak_first else
              "  (the run finished before the first sample)")
        print(f"  peak RSS at the end ({rows} rows, merged): {peak_all:7.1f} MB")
        if not args.separate:
            return
        s_first, p_first, _ = annotate(first, tmp / "first.parquet", ckpt, args.workers, cache)
        s_all, p_all, _ = annotate(full, tmp / "all2.parquet", ckpt, args.workers, cache)
        print("separate runs (peak RSS of the process tree, wait4):")
        print(f"  {args.first:>5} images: {p_first:7.1f} MB  ({s_first:.1f} s)")
        print(f"  {args.images:>5} images: {p_all:7.1f} MB  ({s_all:.1f} s)")
        print(f"  growth: {p_all - p_first:+.1f} MB for {args.images - args.first} more images "
              f"({(p_all - p_first) * 1024 / (args.images - args.first):+.2f} KB/image)")


if __name__ == "__main__":
    main()
