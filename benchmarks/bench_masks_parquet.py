"""The masks Parquet stays flat in memory: images/s and peak RSS of the merge + write step of
`tagclip segment --out masks.parquet` (parts in OUT.parts/ -> masks Parquet), at two run sizes.

That step is the only one of `segment` whose input grows with the run (the model stages work one
window of images at a time, as `annotate`, see bench_memory.py). For each size N, a child process
writes N images' segment rows (3 synthetic masks of 512x384 each, real COCO RLE from
`writers.mask_entries`) as 256-row part files, exactly as a run leaves them; a second child merges
them with `PartStore.merge` (the code `segment` runs) and reports its time and peak RSS (getrusage).
If nothing holds all masks, the peak RSS is the same at both sizes.

    .venv/bin/python benchmarks/bench_masks_parquet.py                 # 2,000 and 10,000 images
    .venv/bin/python benchmarks/bench_masks_parquet.py --sizes 500 2000
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PART_ROWS = 256
HEIGHT, WIDTH = 384, 512
CLASSES = [f"class{i}" for i in range(20)]


def make_parts(out: Path, n: int) -> None:
    """OUT.parts/ of a finished segment run of n images (no merge yet)."""
    import numpy as np
    import pyarrow as pa

    from tagclip_cli.jobs.parts import PartStore
    from tagclip_cli.record import RunRecord
    from tagclip_cli.sources import ImageItem
    from tagclip_cli.writers import mask_entries, segment_row, segment_schema

    config = RunRecord(classes=CLASSES)
    items = [ImageItem(i, f"{i // 1000:03d}/{i:06d}.jpg", f"/data/{i:06d}.jpg") for i in range(n)]
    store = PartStore.open(out, config, items, {"format": "masks-parquet"})
    schema = segment_schema(config)
    rng = np.random.default_rng(0)
    rows = []
    for item in items:
        labels = np.zeros((HEIGHT, WIDTH), np.int32)
        for _ in range(3):
            y, x = rng.integers(0, HEIGHT - 64), rng.integers(0, WIDTH - 64)
            h, w = rng.integers(16, 160), rng.integers(16, 200)
            labels[y:y + h, x:x + w] = rng.integers(1, len(CLASSES) + 1)
        present = {int(v): 0.5 for v in np.unique(labels) if v}
        scores = rng.random(len(CLASSES)).astype(np.float32)
        rows.append(segment_row(item, WIDTH, HEIGHT, None, [], scores, mask_entries(labels, present)))
        if len(rows) == PART_ROWS:
            store.write_part(pa.Table.from_pylist(rows, schema=schema))
            rows = []
    if rows:
        store.write_part(pa.Table.from_pylist(rows, schema=schema))


def merge(out: Path, n: int) -> dict:
    """Merge the parts into the masks Parquet (what `segment` does at the end); time and peak RSS."""
    import resource

    import pyarrow.parquet as pq

    from tagclip_cli.jobs.parts import PartStore
    from tagclip_cli.writers import segment_schema

    store = PartStore(out)
    schema = segment_schema(store.config())
    start = time.perf_counter()
    store.merge(schema, n, "masks-parquet")
    seconds = time.perf_counter() - start
    meta = pq.ParquetFile(out).metadata
    return {"images": n, "rows": meta.num_rows, "row_groups": meta.num_row_groups, "seconds": seconds,
            "images_per_s": n / seconds, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "file_mb": out.stat().st_size / 2**20}


def child(mode: str, out: str, n: int) -> dict | None:
    code = (f"import json, sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); import bench_masks_parquet as b; "
            f"from pathlib import Path; r = b.{mode}(Path({out!r}), {n}); print(json.dumps(r))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1]) if mode == "merge" else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[2000, 10000])
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        for n in args.sizes:
            out = Path(tmp) / f"masks-{n}.parquet"
            child("make_parts", str(out), n)
            r = child("merge", str(out), n)
            print(f"{r['images']:>7} images, {r['rows']:>7} rows, {r['row_groups']} row groups: merge + write "
                  f"{r['seconds']:.1f} s ({r['images_per_s']:.0f} images/s), peak RSS {r['peak_rss_mb']:.0f} MB, "
                  f"file {r['file_mb']:.1f} MB", flush=True)


if __name__ == "__main__":
    main()
