"""Listing remote tar shards (issue 25): requests and bytes fetched from S3 to list one shard.

A shard of --samples samples (an image member of --sizes bytes each, plus a 100-byte .json) is put on
moto's S3 server on 127.0.0.1 and listed through the CLI's own path (`shardsources.list_tars` on
its s3:// URL, in a child process); the server counts the GET requests and the bytes it sent for the
shard (HEAD requests apart). Rows: member size, shard MB, GETs, MB fetched, the fraction of the
shard, the lister's CPU seconds (s3fs and the scan; moto's own work is in the parent) and wall
seconds on loopback (moto copies the whole object for each ranged GET, so wall time here grows with
GETs x shard size; on real S3 each GET costs its latency, ~20-50 ms). The listing is checked equal
to the local listing of the same file.

    .venv/bin/python benchmarks/bench_remote_tar.py                          # 100 KB, 20 KB and 2 KB members
    .venv/bin/python benchmarks/bench_remote_tar.py --code /work/main        # another checkout's tagclip_cli
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


def write_shard(path: Path, samples: int, size: int) -> Path:
    """samples samples of an image member of size random bytes and a 100-byte .json each."""
    import numpy as np

    rng = np.random.default_rng(0)
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for i in range(samples):
            for ext, data in (("jpg", rng.bytes(size)), ("json", b"{}".ljust(100))):
                info = tarfile.TarInfo(f"{i:07d}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", type=int, default=1000)
    parser.add_argument("--sizes", default="100000,20000,2000", help="image member sizes, bytes (comma-separated)")
    parser.add_argument("--code", help="measure the tagclip_cli of this checkout (e.g. an earlier version)")
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    options = parser.parse_args(argv)
    if options.child:
        return child(*options.child)
    sys.path.insert(0, str(HERE.parent / "tests"))
    from shard_fixtures import moto_s3, s3fs_client

    served: list[tuple[str, str, int]] = []
    print(f"one shard of {options.samples} samples on moto's S3 (loopback), listed by list_tars: image member "
          "bytes, shard MB, GET requests, MB fetched (fraction of the shard), lister CPU s, wall s")
    with tempfile.TemporaryDirectory() as tmp, moto_s3(served):
        fs = s3fs_client()
        fs.mkdir("bucket")
        for size in (int(s) for s in options.sizes.split(",")):
            local = write_shard(Path(tmp) / f"{size}.tar", options.samples, size)
            fs.put(str(local), f"bucket/{size}.tar")
            served.clear()
            env = {**os.environ, "PYTHONPATH": options.code or str(HERE.parent), "OMP_NUM_THREADS": "1"}
            done = subprocess.run([sys.executable, __file__, "--child", f"s3://bucket/{size}.tar", str(local)],
                                  capture_output=True, text=True, env=env)
            if done.returncode:
                raise SystemExit(done.stderr[-2000:])
            r = json.loads(done.stdout.splitlines()[-1])
            gets = [n for method, path, n in served if method == "GET" and path.endswith(f"/{size}.tar")]
            total = local.stat().st_size
            print(f"  {size:>7,d} B  {total / 1e6:7.1f} MB  {len(gets):5d} GETs  {sum(gets) / 1e6:7.2f} MB "
                  f"({sum(gets) / total:6.1%})  CPU {r['cpu']:5.2f} s  wall {r['wall']:6.2f} s  "
                  f"{'equal to the local listing' if r['equal'] else 'DIFFERS from the local listing'}", flush=True)


def child(url: str, local: str) -> None:
    """List url (timed), then local; print {cpu, wall, equal}."""
    from tagclip_cli.shardsources import list_tars

    list_tars([local])  # imports and first-use set-up outside the measure
    start, cpu = time.perf_counter(), time.process_time()
    remote = list_tars([url])
    wall, cpu = time.perf_counter() - start, time.process_time() - cpu
    print(json.dumps({"cpu": cpu, "wall": wall, "equal": local_equal(remote, list_tars([local]))}))


def local_equal(remote, local) -> bool:
    """The same rows but for the shard's URL."""
    a, b = remote.table(), local.table()
    strip = [p.split("::")[0] for p in a.column("path").to_pylist()], [p.split("::")[0] for p in
                                                                       b.column("path").to_pylist()]
    return a.column("image_id").equals(b.column("image_id")) and strip[0] == strip[1] and \
        [it.locator for it in remote] == [it.locator for it in local]


if __name__ == "__main__":
    main()
