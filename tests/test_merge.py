"""The streaming k-way merge of part files (jobs/merge.py) against the merge it replaced
(benchmarks/merge_reference.py): the same bytes for one process and for many small shards, with
duplicates, whether the rows wait in memory or are spilled to disk."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tagclip_cli.errors import IncompleteRunError
from tagclip_cli.jobs.merge import iter_merged
from tagclip_cli.jobs.parts import PartStore, merge_output
from tagclip_cli.record import RecordIO
from tagclip_cli.sources import ImageItem
from tagclip_cli.writers import ROW_GROUP_SIZE, tags_schema, write_parquet_atomic

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from merge_reference import reference_iter_merged, write_layout  # noqa: E402

CLASSES = [f"c{i}" for i in range(6)]
CONFIG = {"tool": "tagclip-cli", "classes": CLASSES}
SCHEMA = tags_schema(CONFIG)


def results(n: int, seed: int = 0) -> pa.Table:
    """n tag rows (every 13th failed), indices 0..n-1."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        failed = i % 13 == 5
        scores = rng.random(len(CLASSES)).astype(np.float32)
        rows.append({"index": i, "image_id": f"{i // 100:03d}/{i:06d}", "path": f"/data/{i:06d}.jpg",
                     "width": 64 + i % 7, "height": 48, "status": "failed" if failed else "ok",
                     "error": "broken" if failed else None,
                     "tags": [] if failed else [c for c, s in zip(CLASSES, scores, strict=True) if s > 0.5],
                     "scores": None if failed else scores.tolist()})
    return pa.Table.from_pylist(rows, schema=SCHEMA)


def store_with(tmp_path: Path, table: pa.Table, shards: int, window: int = 8, part_size: int = 32) -> PartStore:
    items = [ImageItem(i, f"img{i}", f"/data/{i}") for i in range(table.num_rows)]
    store = PartStore.open(tmp_path / "out.parquet", RecordIO.from_dict(CONFIG), items, {"format": "parquet"})
    write_layout(store, table.num_rows, table.take, shards, window, part_size)
    return store


def parquet_bytes(tables, path: Path) -> bytes:
    write_parquet_atomic(tables, path, SCHEMA)
    return path.read_bytes()


@pytest.mark.parametrize("shards", [1, 7, 97])
@pytest.mark.parametrize("budget", [1, 1 << 30])  # spill every waiting piece / never spill
def test_kway_merge_writes_the_same_bytes_as_the_reference(tmp_path, shards, budget):
    n, chunk = 2 * 512 + 77, 512  # three chunks, the last one partial
    table = results(n)
    store = store_with(tmp_path, table, shards, window=4, part_size=16)
    parts = store.part_files()
    assert len(parts) >= 60  # many small parts
    new = parquet_bytes(iter_merged([(lo, p) for lo, _, p in parts], SCHEMA, n, chunk, store.dir, budget=budget),
                        tmp_path / "new.parquet")
    old = parquet_bytes(reference_iter_merged(parts, SCHEMA, n, chunk), tmp_path / "old.parquet")
    assert new == old
    assert pq.read_table(tmp_path / "new.parquet").equals(table)
    assert [p.name for p in store.dir.iterdir() if p.name.startswith(".merge")] == []  # spills removed


def test_duplicates_keep_the_first_part_s_row_like_the_reference(tmp_path):
    n = 1500
    table = results(n)
    store = store_with(tmp_path, table, shards=13, window=4, part_size=16)
    again = results(n, seed=1)  # the same indices with other values, as two runs of one shard could leave
    for lo in (0, 52, 900, 1480):
        store.write_part(again.slice(lo, 20))
    parts = store.part_files()
    for budget in (1, 1 << 30):
        new = parquet_bytes(iter_merged([(lo, p) for lo, _, p in parts], SCHEMA, n, 512, store.dir, budget=budget),
                            tmp_path / f"new{budget}.parquet")
        old = parquet_bytes(reference_iter_merged(parts, SCHEMA, n, chunk=512), tmp_path / "old.parquet")
        assert new == old


def test_merge_command_equals_the_reference_and_cleans_up(tmp_path):
    n = ROW_GROUP_SIZE + 300
    table = results(n)
    store = store_with(tmp_path, table, shards=31, window=32, part_size=256)
    parts = store.part_files()
    schema = pq.read_schema(parts[0][2])  # what `tagclip merge` writes with, then and now
    write_parquet_atomic(reference_iter_merged(parts, schema, n), tmp_path / "old.parquet", schema)
    old = (tmp_path / "old.parquet").read_bytes()
    assert merge_output(store.out) == n
    assert store.out.read_bytes() == old
    assert not store.dir.exists()


def test_a_part_missing_under_the_merge_is_refused_not_skipped(tmp_path):
    table = results(600)
    store = store_with(tmp_path, table, shards=5)
    parts = store.part_files()
    without = [(lo, p) for lo, _, p in parts if lo != 8]  # the manifest said index 8 had a row
    with pytest.raises(IncompleteRunError, match="image #8 has no row"):
        list(iter_merged(without, SCHEMA, 600, 256, store.dir, budget=1))
    assert [p.name for p in store.dir.iterdir() if p.name.startswith(".merge")] == []


def test_masks_parquet_benchmark_makes_and_merges_a_segment_run(tmp_path):
    """benchmarks/bench_masks_parquet.py (run by `make bench`) writes a segment run's parts through
    the PartStore and merges them into the masks Parquet: it must follow the store's API (it once
    passed a plain dict where the store takes a RunRecord, and `make bench` failed there)."""
    import bench_masks_parquet as bench

    out = tmp_path / "masks.parquet"
    bench.make_parts(out, 12)
    result = bench.merge(out, 12)
    table = pq.read_table(out)
    assert result["images"] == 12 and result["rows"] == table.num_rows >= 12  # 1-3 masks per image
    assert sorted(set(table.column("image_id").to_pylist())) == [f"000/{i:06d}.jpg" for i in range(12)]
    assert set(table.column("status").to_pylist()) == {"ok"}
