"""Reading + decoding throughput of tar shards and Parquet vs the same images as a folder, and peak
memory in the number of shards (issue 14's measure; `make bench` runs it with --quick).

The same JPEGs (photo-like: smooth gradients plus noise, --side px) are written as a folder
(`<shard>/<key>.jpg`), as WebDataset tars and as one Parquet file (row groups of 64), then listed and
decoded through the CLI's own path (sources.collect_items -> data.iter_records with the ViT-B/16
preprocessing: decode, RGB, bicubic resize, normalise). Rows: images/s of each (best of --repeats,
kinds interleaved so that load changes on a shared machine hit all alike) and the ratio to the
folder. Then each of --shard-counts is listed and decoded in a fresh process and its peak RSS
(ru_maxrss) printed: flat in the number of shards means per-shard state is not kept.

    .venv/bin/python benchmarks/bench_sources.py            # 2048 images, 3 repeats
    .venv/bin/python benchmarks/bench_sources.py --quick    # 512 images
"""

from __future__ import annotations

import argparse
import io
import resource
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def photo(rng: np.random.Generator, side: int) -> bytes:
    """A JPEG (quality 90) that compresses like a photo: a smooth colour field plus mild noise."""
    y, x = np.mgrid[0:side, 0:side].astype(np.float32) / side
    base = np.stack([np.sin(x * rng.uniform(2, 8)), np.cos(y * rng.uniform(2, 8)), x * y], axis=-1)
    arr = np.clip((base * 0.5 + 0.5) * 255 + rng.normal(0, 12, (side, side, 3)), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def write_inputs(root: Path, count: int, side: int, shards: int) -> None:
    """root/folder/<shard>/<key>.jpg, root/tars-<shards>/<shard>.tar and root/images.parquet."""
    rng = np.random.default_rng(0)
    images = [photo(rng, side) for _ in range(count)]
    write_tars(root / f"tars-{shards}", images, shards)
    per = -(-count // shards)
    for i, data in enumerate(images):
        path = root / "folder" / f"{i // per:05d}" / f"{i:08d}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    table = pa.table({"key": [f"{i:08d}" for i in range(count)], "jpg": pa.array(images, pa.binary())})
    pq.write_table(table, root / "images.parquet", row_group_size=64, compression="none")


def write_tars(folder: Path, images: list[bytes], shards: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    per = -(-len(images) // shards)
    for s in range(shards):
        with tarfile.open(folder / f"{s:05d}.tar", "w") as tar:
            for i in range(s * per, min(len(images), (s + 1) * per)):
                for name, data in ((f"{i:08d}.jpg", images[i]), (f"{i:08d}.json", b'{"caption": ""}')):
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))


def read_all(source: str, workers: int) -> tuple[int, float]:
    """(images decoded, seconds) listing + decoding source through sources.py and data.py."""
    from tagclip_cli.data import Preprocess, iter_records
    from tagclip_cli.sources import collect_items

    start = time.perf_counter()
    items = collect_items(source)
    preprocess = Preprocess(16, CLIP_MEAN, CLIP_STD, max_side=1024)
    done = 0
    for record in iter_records(items, preprocess, workers):
        assert record.error is None, record.error
        done += 1
    return done, time.perf_counter() - start


def child(source: str, workers: int) -> None:
    """Run in a fresh process: decode everything, print images and peak RSS (MiB)."""
    done, _ = read_all(source, workers)
    print(done, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=2048)
    parser.add_argument("--side", type=int, default=320, help="image side in px (square JPEGs)")
    parser.add_argument("--shards", type=int, default=8, help="tar shards for the throughput rows")
    parser.add_argument("--shard-counts", default="4,32", help="shard counts for the peak-RSS rows")
    parser.add_argument("--workers", type=int, default=0, help="DataLoader workers (0: in this process)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="512 images")
    parser.add_argument("--child", nargs=2, metavar=("SOURCE", "WORKERS"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        return child(args.child[0], int(args.child[1]))
    if args.quick:
        args.images = 512
    counts = [int(c) for c in args.shard_counts.split(",")]
    with tempfile.TemporaryDirectory(prefix="bench_sources_") as tmp:
        root = Path(tmp)
        write_inputs(root, args.images, args.side, args.shards)
        kinds = {"folder": str(root / "folder"), "tar": str(root / f"tars-{args.shards}"),
                 "parquet": str(root / "images.parquet")}
        best = dict.fromkeys(kinds, float("inf"))
        for _ in range(args.repeats):
            for kind, source in kinds.items():
                done, seconds = read_all(source, args.workers)
                assert done == args.images
                best[kind] = min(best[kind], seconds)
        print(f"read + decode + preprocess, {args.images} JPEGs {args.side}x{args.side}, workers {args.workers}, "
              f"best of {args.repeats}:")
        for kind in kinds:
            rate = args.images / best[kind]
            ratio = best["folder"] / best[kind]
            label = f"{kind} ({args.shards} tars)" if kind == "tar" else kind
            print(f"  {label:<16} {rate:8.1f} images/s   {ratio:6.1%} of the folder's")
        print("peak RSS listing + decoding all tar shards, fresh process each:")
        for count in counts:
            images = [p.read_bytes() for p in sorted((root / "folder").rglob("*.jpg"))]
            write_tars(root / f"tars-{count}", images, count)
            out = subprocess.run([sys.executable, __file__, "--child", str(root / f"tars-{count}"),
                                  str(args.workers)], capture_output=True, text=True, check=True)
            done, rss = out.stdout.split()
            print(f"  {count:>3} shards: {float(rss):7.1f} MiB ({done} images)")


if __name__ == "__main__":
    main()
