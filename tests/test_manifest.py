"""The manifest of OUT.parts/ (jobs/manifest.py): what resume reads instead of every part file.
A killed writer leaves it readable, concurrent writers do not lose lines, and an output written
before it existed (parts, no manifest) resumes to the same result."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from test_jobs import CONFIG, SCHEMA, make_items, run

from tagclip_cli.jobs.manifest import MANIFEST_DIR, PartEntry, PartIndex, read_manifest
from tagclip_cli.jobs.parts import PartStore

ROOT = Path(__file__).resolve().parents[1]


def rows(indices, failed=()) -> pa.Table:
    return pa.Table.from_pylist(
        [{"index": i, "image_id": f"img{i:03d}.jpg", "status": "failed" if i in failed else "ok",
          "error": "broken" if i in failed else None, "batch": [i]} for i in indices], schema=SCHEMA)


def truth(store: PartStore, total: int) -> tuple[np.ndarray, np.ndarray]:
    """The done mask and failed indices read from every part file (what the manifest must agree with)."""
    mask = np.zeros(total, dtype=bool)
    failed = []
    for path in store.dir.glob("part-*.parquet"):
        table = pq.read_table(path)
        mask[table.column("index").to_numpy()] = True
        failed += [r["index"] for r in table.to_pylist() if r["status"] == "failed"]
    return mask, np.array(sorted(failed), dtype=np.int64)


def open_store(tmp_path: Path, n: int) -> PartStore:
    return PartStore.open(tmp_path / "out.parquet", CONFIG, make_items(n), {"format": "parquet"})


def test_each_part_has_a_line_and_the_scan_does_not_open_parts(tmp_path):
    store = open_store(tmp_path, 40)
    store.write_part(rows([0, 1, 2, 3, 8, 9, 10, 11], failed={9}))  # two runs, like a rank's windows
    store.write_part(rows([20, 21, 22]))
    lines = read_manifest(store.dir / MANIFEST_DIR)
    assert lines["part-000000000000-000000000011.parquet"][0].runs == (0, 4, 8, 12)
    assert lines["part-000000000000-000000000011.parquet"][0].failed == (9,)
    (store.dir / "part-000000000020-000000000022.parquet").write_bytes(b"not parquet any more")
    index = store.scan()  # from the manifest alone: the damaged part is not opened
    assert index.adopted == 0
    assert np.flatnonzero(index.done_mask(40)).tolist() == [0, 1, 2, 3, 8, 9, 10, 11, 20, 21, 22]
    assert index.failed_indices().tolist() == [9]


def test_done_at_answers_for_some_indices_as_the_mask_does(tmp_path):
    store = open_store(tmp_path, 40)
    store.write_part(rows([0, 1, 2, 3, 8, 9, 10, 11]))
    store.write_part(rows([20, 21, 22]))
    store.write_part(rows([39]))
    index = store.scan()
    mask = index.done_mask(40)
    for positions in (np.arange(40), np.array([3, 4, 7, 8, 11, 12, 19, 20, 22, 23, 38, 39]), np.array([5]),
                      np.zeros(0, dtype=np.int64)):
        assert index.done_at(positions).tolist() == mask[positions].tolist()
    assert PartStore(store.out).remaining(make_items(40), 40).positions.tolist() == np.flatnonzero(~mask).tolist()


def test_a_torn_line_is_skipped_and_its_part_read_once(tmp_path):
    store = open_store(tmp_path, 30)
    store.write_part(rows(range(0, 8)))
    store.write_part(rows(range(8, 16), failed={12}))
    manifest = store.manifest.path
    data = manifest.read_bytes()
    manifest.write_bytes(data[: len(data) - 9])  # the second line cut, as a kill in the write leaves it
    index = PartStore(store.out).scan()
    assert index.adopted == 1  # the part of the torn line was read
    mask, failed = truth(store, 30)
    assert (index.done_mask(30) == mask).all() and index.failed_indices().tolist() == failed.tolist()
    with open(manifest, "ab") as fh:
        fh.write(b"\x00" * 64 + b"\n{\"v\": 1, \"part\": 3}\n")  # zeros after a crash, a bad line
    again = PartStore(store.out).scan()
    assert again.adopted == 0  # the first scan appended the line it had to read
    assert (again.done_mask(30) == mask).all()


WRITER = textwrap.dedent("""
    import sys, time
    sys.path.insert(0, {tests!r})
    from test_manifest import rows
    from tagclip_cli.jobs.parts import PartStore
    store = PartStore({out!r})
    first, count, step = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
    for k in range(count):
        lo = first + k * step
        store.write_part(rows(range(lo, lo + 4), failed={{lo + 1}} if k % 3 == 0 else set()))
    print("done", flush=True)
    time.sleep(float(sys.argv[4]))
""")


def start_writer(store: PartStore, first: int, count: int, step: int, linger: float = 0.0) -> subprocess.Popen:
    code = WRITER.format(tests=str(ROOT / "tests"), out=str(store.out))
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen([sys.executable, "-c", code, str(first), str(count), str(step), str(linger)],
                            env=env, stdout=subprocess.PIPE, text=True)


def test_concurrent_writers_lose_no_line(tmp_path):
    total = 4 * 40 * 4
    store = open_store(tmp_path, total)
    writers = [start_writer(store, 4 * w, 40, 16) for w in range(4)]  # interleaved, like ranks
    for proc in writers:
        assert proc.wait(timeout=300) == 0
    assert len(list((store.dir / MANIFEST_DIR).glob("*.jsonl"))) == 4  # one file per process
    index = PartStore(store.out).scan()
    assert index.adopted == 0 and len(index.entries) == 160
    mask, failed = truth(store, total)
    assert mask.all() and (index.done_mask(total) == mask).all()
    assert sorted(index.failed_indices().tolist()) == failed.tolist()


def test_a_killed_writer_leaves_a_readable_manifest(tmp_path):
    total = 4000
    store = open_store(tmp_path, total)
    proc = start_writer(store, 0, 1000, 4, linger=60)
    deadline = time.monotonic() + 120
    while len(list(store.dir.glob("part-*.parquet"))) < 20:
        assert proc.poll() is None and time.monotonic() < deadline
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)  # somewhere in a part, its rename or its line
    assert proc.wait(timeout=60) == -signal.SIGKILL
    index = PartStore(store.out).scan()
    mask, failed = truth(store, total)
    assert 20 <= mask.sum() < total
    assert index.adopted <= 1  # at most the part whose line the kill prevented
    assert (index.done_mask(total) == mask).all()
    assert sorted(index.failed_indices().tolist()) == failed.tolist()


JOB = {"format": "parquet", "batch_size": 2, "window": 8}


def finished_and_fresh(tmp_path: Path) -> tuple[list, Path, PartStore, pa.Table]:
    """30 items, a fresh work directory for out.parquet, and an uninterrupted run's output."""
    items = make_items(30)
    run(items, tmp_path / "full.parquet")
    out = tmp_path / "out.parquet"
    return items, out, PartStore.open(out, CONFIG, items, JOB), pq.read_table(tmp_path / "full.parquet")


def test_an_output_of_the_previous_version_resumes_to_the_same_result(tmp_path):
    items, out, store, reference = finished_and_fresh(tmp_path)
    shutil.rmtree(store.dir / MANIFEST_DIR)  # the previous version wrote parts and no manifest
    for lo, hi in ((0, 8), (8, 16)):
        pq.write_table(reference.slice(lo, hi - lo).cast(SCHEMA), store.dir / f"part-{lo:012d}-{hi - 1:012d}.parquet")
    reopened = PartStore.open(out, CONFIG, items, JOB)
    assert reopened.index().adopted == 2  # its parts were read once, at the start, and their lines written
    assert PartStore(out).scan().adopted == 0
    summary = run(items, out)
    assert summary.skipped == 16 and summary.done + summary.failed == 14
    assert summary.failed_before == 1  # index 7 failed in the earlier run
    assert pq.read_table(out).equals(reference)


def test_a_manifest_line_whose_part_is_gone_is_redone(tmp_path):
    items, out, store, reference = finished_and_fresh(tmp_path)
    for lo in (0, 8, 16):
        store.write_part(reference.slice(lo, 8).cast(SCHEMA))
    (store.dir / "part-000000000008-000000000015.parquet").unlink()
    assert np.flatnonzero(PartStore(out).done_mask(30)).tolist() == [*range(8), *range(16, 24)]
    summary = run(items, out)
    assert summary.skipped == 16
    assert pq.read_table(out).equals(reference)


def test_lines_that_disagree_about_a_part_send_the_scan_to_the_part(tmp_path):
    store = open_store(tmp_path, 20)
    path = store.write_part(rows(range(0, 6)))
    wrong = PartEntry(path.name, 6, (0, 20), (), "")
    store.manifest.append([wrong])  # e.g. a part rewritten with other rows under the same name
    index = PartIndex.scan(store.dir)
    assert index.adopted == 1
    assert np.flatnonzero(index.done_mask(20)).tolist() == list(range(6))


@pytest.mark.parametrize("line", [b"", b"{}", b"[1, 2]", b'{"v": 1, "part": "part-1-2.parquet", "rows": 1, '
                                  b'"runs": [1], "failed": [], "record": ""}', b'{"v": 1, "part": "x", "rows": 1, '
                                  b'"runs": [1, 2], "failed": [], "record": ""}'])
def test_invalid_lines_are_not_entries(line):
    assert PartEntry.parse(line) is None
