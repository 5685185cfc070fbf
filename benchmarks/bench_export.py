"""`tagclip export yolo --task segment` on synthetic masks: images/s and peak RSS at two sizes.

Writes a masks Parquet (the `tagclip segment --out masks.parquet` schema, row groups of 4,096
rows) and a tags Parquet of N images, whose masks are the ground-truth label maps of generated
shapes scenes (tagclip_cli.synthetic, 224x224, a pool of 64 scenes reused), and N empty image
files for the export to link; the export gets both (--tags --masks), as a user would run it.
Then runs the export in a subprocess on the first N/4 and on all N images and
reports each run's wall time, images/s and peak RSS (wait4), and the marginal rate between the
two runs ((N - N/4) / (t_N - t_N/4): the CLI's start-up, mostly importing torch, cancels out).
A `tagclip --version` process gives the start-up's own time and RSS. The masks stream a row group
at a time and the tags are read alongside them, so the peak RSS should be the same at both sizes.

    .venv/bin/python benchmarks/bench_export.py              # 2,500 and 10,000 images
    .venv/bin/python benchmarks/bench_export.py --quick      # 500 and 2,000
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

REPO = Path(__file__).resolve().parents[1]


def scene_masks(pool: int) -> tuple[list[str], list[list[dict]]]:
    """(classes, per scene: one row template per class present) from generated scenes."""
    from pycocotools import mask as mask_utils

    from tagclip_cli.synthetic import OBJECT_CLASSES, generate_scene
    from tagclip_cli.writers import rle_encode

    classes = list(OBJECT_CLASSES)
    scenes = []
    for index in range(pool):
        scene = generate_scene(index, seed=7)
        labels = np.asarray(scene.label_map)
        rows = []
        for k in sorted(set(np.unique(labels).tolist()) - {0}):
            if k > len(classes):
                continue  # stuff labels: not object classes
            rle = rle_encode(labels == k)
            coco = {"size": rle["size"], "counts": rle["counts"].encode()}
            rows.append({"class_id": k, "class_name": classes[k - 1], "score": 0.8, "area": int(mask_utils.area(coco)),
                         "bbox": [float(v) for v in mask_utils.toBbox(coco)], "counts": rle["counts"],
                         "width": labels.shape[1], "height": labels.shape[0]})
        scenes.append(rows)
    return classes, scenes


SCHEMA = pa.schema([
    ("image_id", pa.string()), ("path", pa.string()), ("width", pa.int32()), ("height", pa.int32()),
    ("status", pa.string()), ("error", pa.string()), ("class_id", pa.int32()), ("class_name", pa.string()),
    ("score", pa.float32()), ("area", pa.int64()), ("bbox", pa.list_(pa.float64())), ("counts", pa.string()),
])  # fmt: skip


def write_inputs(root: Path, count: int, classes: list[str], scenes: list[list[dict]]) -> tuple[Path, Path, Path]:
    """(masks Parquet, tags Parquet, image folder) of `count` images."""
    from tagclip_cli.record import METADATA_KEY
    from tagclip_cli.writers import tags_schema

    images = root / "images"
    images.mkdir(parents=True, exist_ok=True)
    meta = {"classes": classes, "tool": "tagclip-cli", "tool_version": "bench"}
    path = root / f"masks-{count}.parquet"
    with pq.ParquetWriter(path, SCHEMA.with_metadata({METADATA_KEY: json.dumps(meta).encode()})) as writer:
        rows: list[dict] = []
        for i in range(count):
            name = f"{i // 1000:03d}/{i:06d}.png"
            image = images / name
            if not image.exists():
                image.parent.mkdir(exist_ok=True)
                image.touch()
            for template in scenes[i % len(scenes)]:
                rows.append({"image_id": name, "path": str(image), "status": "ok", "error": None, **template})
            if len(rows) >= 4096:
                writer.write_table(pa.Table.from_pylist(rows, schema=SCHEMA))
                rows = []
        if rows:
            writer.write_table(pa.Table.from_pylist(rows, schema=SCHEMA))
    tags = root / f"tags-{count}.parquet"
    tag_rows = []
    for i in range(count):
        name = f"{i // 1000:03d}/{i:06d}.png"
        present = {t["class_id"] - 1 for t in scenes[i % len(scenes)]}
        tag_rows.append({"index": i, "image_id": name, "path": str(images / name), "width": 224, "height": 224,
                         "status": "ok", "error": None, "tags": [classes[k] for k in sorted(present)],
                         "scores": [0.8 if k in present else 0.1 for k in range(len(classes))]})
    pq.write_table(pa.Table.from_pylist(tag_rows, schema=tags_schema(meta)), tags, row_group_size=4096)
    return path, tags, images


def run_tagclip(*args: str) -> tuple[float, float]:
    """(seconds, peak RSS MB) of one `tagclip ARGS` process."""
    env = dict(os.environ, OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p))
    cmd = [sys.executable, "-m", "tagclip_cli", *args]
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL)
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"failed: {' '.join(cmd)}")
    return seconds, usage.ru_maxrss / 1024


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=10_000, help="the larger run (the smaller is a quarter)")
    ap.add_argument("--quick", action="store_true", help="2,000 and 500 images")
    args = ap.parse_args()
    large = 2000 if args.quick else args.images
    sizes = [large // 4, large]
    classes, scenes = scene_masks(64)
    with tempfile.TemporaryDirectory(prefix="bench-export-") as tmp:
        root = Path(tmp)
        results = []
        for count in sizes:
            masks, tags, images = write_inputs(root, count, classes, scenes)
            rows = pq.ParquetFile(masks).metadata.num_rows
            out = root / f"yolo-{count}"
            seconds, peak = run_tagclip("export", "yolo", "--task", "segment", "--tags", str(tags), "--masks",
                                        str(masks), "--images", str(images), "--out", str(out), "--overwrite",
                                        "--quiet")
            lines = sum(len(p.read_text().splitlines()) for p in (out / "labels").rglob("*.txt"))
            results.append((count, seconds, peak))
            print(f"export yolo --task segment: {count:6d} images ({rows} masks, {lines} polygons): "
                  f"{seconds:6.1f} s, {count / seconds:7.1f} images/s, peak RSS {peak:6.1f} MB", flush=True)
            shutil.rmtree(out)
        (small, t_small, p_small), (big, t_big, p_big) = results
        start_s, start_rss = run_tagclip("--version")
        print(f"start-up alone (tagclip --version): {start_s:.1f} s, peak RSS {start_rss:.1f} MB")
        print(f"marginal rate {small} -> {big} images: {(big - small) / (t_big - t_small):.1f} images/s")
        print(f"peak RSS {big} vs {small} images: {p_big / p_small:.2f}x (flat = 1.00x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
