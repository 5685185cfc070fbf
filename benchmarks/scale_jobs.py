"""Resume start and merge at scale (issue 25), the job-layer sections of bench_scale.py.

Work directories are made directly, as a finished run leaves them (config.json, items.parquet,
job.json, the manifest, 256-row parts written with `PartStore.write_part`), in two layouts: one
process (contiguous parts) and `--shard I/1000` (shard I holds windows I, I+1000, ...: each part
spans most of the indices). Rows are those of `annotate` with 80 classes (random scores).

- resume start: a fresh process opens the work directory of N finished images and computes what a
  resumed run computes before its first image: the done mask and the failed indices (the scan a
  `--shard` task also makes at its end). Once with the manifest, and once as an output written by
  the previous version (parts only; this first start reads every part and writes the manifest).
  The input listing and the check of items.parquet are not in it (bench_scale.py's listing section).
- merge: `tagclip merge OUT` (merge_output) in a fresh process, for both layouts: seconds and peak
  RSS; with --reference, also the merge it replaced (benchmarks/merge_reference.py), whose output
  must be byte-identical.

Each measurement runs in a child process; peak RSS is its VmHWM, and "+MB" is the difference to
a child that only imports (torch included, through tagclip_cli.faults).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
CLASSES = [f"class{i:02d}" for i in range(80)]
WINDOW = 32  # --batch-size 8
PART_SIZE = 256


def result_rows(indices: np.ndarray, schema, light: bool = False):
    """annotate's rows for these indices: 80 random float32 scores, a tag, every 50th failed.
    light: no scores (the resume scan never reads them; the parts are made faster)."""
    import pyarrow as pa

    n = len(indices)
    rng = np.random.default_rng(int(indices[0]))
    failed = indices % 50 == 7
    scores = pa.ListArray.from_arrays(np.arange(n + 1, dtype=np.int32) * len(CLASSES),
                                      pa.array(rng.random(n * len(CLASSES), dtype=np.float32)),
                                      mask=pa.array(failed | light))
    tags = pa.ListArray.from_arrays(np.arange(n + 1, dtype=np.int32),
                                    pa.array([CLASSES[i % 80] for i in indices.tolist()]))
    ids = [f"{i // 1000:05d}/{i:010d}.jpg" for i in indices.tolist()]
    return pa.table({"index": indices, "image_id": ids, "path": [f"/data/images/{i}" for i in ids],
                     "width": np.full(n, 32, np.int32), "height": np.full(n, 24, np.int32),
                     "status": np.where(failed, "failed", "ok"),
                     "error": pa.array([("broken" if f else None) for f in failed.tolist()], pa.string()),
                     "tags": tags, "scores": scores}).cast(schema)


def make_work_dir(out: Path, n: int, shards: int, light: bool = False) -> float:
    """OUT.parts/ of a finished run of n images in the layout of `shards` --shard tasks (1: one
    process), made without listing inputs. Returns the seconds it took."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    sys.path.insert(0, str(HERE))
    from merge_reference import write_layout

    from tagclip_cli.fileio import write_json_atomic
    from tagclip_cli.jobs.manifest import MANIFEST_DIR, ManifestWriter
    from tagclip_cli.jobs.parts import PartStore
    from tagclip_cli.record import RecordIO
    from tagclip_cli.writers import tags_schema

    start = time.perf_counter()
    config = RecordIO.from_dict({"tool": "tagclip-cli", "classes": CLASSES})
    schema = tags_schema(config)
    store = PartStore(out)
    shutil.rmtree(store.dir, ignore_errors=True)
    out.unlink(missing_ok=True)
    (store.dir / MANIFEST_DIR).mkdir(parents=True)
    RecordIO.write_config(config, store.dir / "config.json")
    write_json_atomic({"format": "parquet", "batch_size": 8, "window": WINDOW, "final_options": {}},
                      store.dir / "job.json")
    items_schema = pa.schema([("index", pa.int64()), ("image_id", pa.string()), ("path", pa.string()),
                              ("coco_id", pa.int64())])
    with pq.ParquetWriter(store.dir / "items.parquet", items_schema) as w:
        for lo in range(0, n, 1 << 20):
            idx = np.arange(lo, min(n, lo + (1 << 20)))
            ids = [f"{i // 1000:05d}/{i:010d}.jpg" for i in idx.tolist()]
            w.write_table(pa.table({"index": idx, "image_id": ids, "path": [f"/data/images/{i}" for i in ids],
                                    "coco_id": pa.nulls(len(idx), pa.int64())}))
    def new_process(store: PartStore) -> None:  # each --shard task writes its own manifest file
        store.manifest = ManifestWriter(store.manifest.dir)

    write_layout(store, n, lambda idx: result_rows(idx, schema, light), shards, WINDOW, PART_SIZE, new_process)
    return time.perf_counter() - start


def rss_mb(field: str = "VmRSS") -> float:
    """This process's resident set (VmRSS) or its peak (VmHWM), in MB. The peak is the memory map's
    own: getrusage's ru_maxrss survives exec, so a child would report its parent's peak."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) / 1024
    return 0.0


def child(task: str, out: Path) -> dict:
    """One measurement in this (fresh) process: imports (nothing: the baseline) | resume | merge |
    reference."""
    import pyarrow.parquet as pq

    from tagclip_cli.jobs.parts import PartStore, merge_output
    from tagclip_cli.writers import write_parquet_atomic

    result: dict = {}
    if task == "merge":
        result["parts"] = len(PartStore(out).part_files())
        if os.environ.get("MERGE_MEMORY"):  # to see what the budget does
            import tagclip_cli.jobs.merge as merge_module

            merge_module.MERGE_MEMORY = int(os.environ["MERGE_MEMORY"])
    base = rss_mb()
    start = time.perf_counter()
    if task == "imports":
        pass
    elif task == "resume":
        store = PartStore(out)
        total = store.total()
        index = store.index()
        done = index.done_mask(total)
        result.update(done=int(done.sum()), failed=len(index.failed_indices()), adopted=index.adopted,
                      parts=len(index.entries))
    elif task == "merge":
        cleanup = PartStore.cleanup

        def timed_cleanup(store):  # removing the parts is timed apart: the previous merge is timed without it
            began = time.perf_counter()
            cleanup(store)
            result["cleanup_seconds"] = time.perf_counter() - began

        PartStore.cleanup = timed_cleanup
        result["rows"] = merge_output(out)
    else:
        sys.path.insert(0, str(HERE))
        from merge_reference import reference_iter_merged

        parts = PartStore(out).part_files()
        schema = pq.read_schema(parts[0][2])
        total = PartStore(out).total()
        result["rows"] = write_parquet_atomic(reference_iter_merged(parts, schema, total),
                                              out.with_suffix(".reference.parquet"), schema)
    result["seconds"] = time.perf_counter() - start - result.get("cleanup_seconds", 0.0)
    peak = rss_mb("VmHWM")
    import pyarrow as pa

    result["arrow_peak_mb"] = pa.default_memory_pool().max_memory() / 2**20  # what Arrow held at most
    result.update(peak_mb=peak, rss_before_mb=base)
    return result


def measure(task: str, out: Path) -> dict:
    """Run `child` in a fresh process (one thread for BLAS / Arrow's pool stays the default)."""
    env = {**os.environ, "PYTHONPATH": str(HERE.parent), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(HERE / "scale_jobs.py"), task, str(out)], env=env,
                          capture_output=True, text=True, check=False)
    if proc.returncode:
        raise SystemExit(f"{task} {out}: child failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def load() -> str:
    return f"load {os.getloadavg()[0]:.1f}"


def resume_section(root: Path, n: int) -> None:
    """Resume start of n finished images (one-process layout), with the manifest and without it."""
    from tagclip_cli.jobs.manifest import MANIFEST_DIR

    out = root / f"resume-{n}.parquet"
    made = make_work_dir(out, n, 1, light=True)
    parts = out.with_name(out.name + ".parts")
    fast = measure("resume", out)
    shutil.rmtree(parts / MANIFEST_DIR)  # as the previous version left it: parts only
    first = measure("resume", out)
    again = measure("resume", out)
    print(f"resume start, {n:,} images, {fast['parts']:,} parts (made in {made:.0f} s):")
    for label, r in (("with the manifest", fast), ("previous version's output, first start", first),
                     ("  the start after it", again)):
        grew = r["peak_mb"] - BASELINE["peak_mb"]
        print(f"  {label}: {r['seconds']:.2f} s, peak RSS {r['peak_mb']:.0f} MB (+{grew:.0f}), "
              f"{r['adopted']:,} parts read  [{load()}]")
    shutil.rmtree(parts)


def merge_section(root: Path, n: int, shards: int, reference: bool) -> dict:
    """`tagclip merge` of n rows in the layout of `shards` tasks (and the previous merge)."""
    out = root / f"merge-{n}-{shards}.parquet"
    made = make_work_dir(out, n, shards)
    layout = "one process" if shards == 1 else f"{shards:,} shards"
    if shards > 1:  # a --shard task's scan at its start (and end): every shard's manifest file
        scan = measure("resume", out)
        print(f"resume start, {n:,} images in {layout} (a manifest file each): {scan['seconds']:.2f} s, "
              f"peak RSS {scan['peak_mb']:.0f} MB (+{scan['peak_mb'] - BASELINE['peak_mb']:.0f})  [{load()}]")
    old = measure("reference", out) if reference else None
    new = measure("merge", out)
    print(f"merge, {n:,} rows, {layout}, {new['parts']:,} parts (made in {made:.0f} s): {new['seconds']:.1f} s "
          f"(+{new['cleanup_seconds']:.1f} s removing the parts), peak RSS {new['peak_mb']:.0f} MB "
          f"(+{new['peak_mb'] - BASELINE['peak_mb']:.0f}; Arrow's peak {new['arrow_peak_mb']:.0f} MB)  [{load()}]")
    if old is not None:
        same = out.with_suffix(".reference.parquet").read_bytes() == out.read_bytes()
        print(f"  previous merge: {old['seconds']:.1f} s, peak RSS {old['peak_mb']:.0f} MB "
              f"(+{old['peak_mb'] - BASELINE['peak_mb']:.0f}; Arrow's peak {old['arrow_peak_mb']:.0f} MB); "
              f"outputs byte-identical: {same}")
        out.with_suffix(".reference.parquet").unlink()
    out.unlink()
    return new


BASELINE: dict = {}


def run_sections(root: Path, sizes: list[int], shards: int, reference_upto: int, merge: bool = True,
                 resume: bool = True) -> None:
    BASELINE.update(measure("imports", root / "none.parquet"))
    print(f"a process that only imports: peak RSS {BASELINE['peak_mb']:.0f} MB (the +MB below are over it)")
    for n in sizes:
        if resume:
            resume_section(root, n)
        if not merge:
            continue
        one = merge_section(root, n, 1, n <= reference_upto)
        many = merge_section(root, n, shards, n <= reference_upto)
        print(f"merge in {shards:,} shards vs one process, {n:,} rows: {many['seconds'] / one['seconds']:.2f}x time")


if __name__ == "__main__":
    print(json.dumps(child(sys.argv[1], Path(sys.argv[2]))))
