"""jobs/: work split, part files, resume, streaming merge, JSON Lines, with a fake model.

The fake `process` records which indices shared each forward batch, so the tests can check the
property the design rests on: batch composition does not depend on the split or on a restart."""

from __future__ import annotations

import io
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from tagclip_cli.data import DecodedImage
from tagclip_cli.errors import ConfigMismatchError, IncompleteRunError, UsageError
from tagclip_cli.jobs.parts import PartStore, merge_output
from tagclip_cli.jobs.placement import Placement, parse_shard, placement_from_env
from tagclip_cli.jobs.runner import JobSpec, run_job
from tagclip_cli.jobs.session import Session
from tagclip_cli.jobs.sinks import json_row
from tagclip_cli.record import RecordIO
from tagclip_cli.sources import ImageItem

SCHEMA = pa.schema(
    [
        ("index", pa.int64()),
        ("image_id", pa.string()),
        ("status", pa.string()),
        ("error", pa.string()),
        ("batch", pa.list_(pa.int64())),
    ]
).with_metadata({b"tagclip": json.dumps({"model": "fake"}, sort_keys=True).encode()})
CONFIG = RecordIO.from_dict({"model": "fake"})


def make_items(n: int) -> list[ImageItem]:
    return [ImageItem(i, f"img{i:03d}.jpg", f"/data/img{i:03d}.jpg") for i in range(n)]


def size_of(index: int) -> tuple[int, int]:
    """Three image sizes in an irregular pattern; index 7 fails to decode."""
    return [(32, 48), (48, 32), (32, 32)][(index * index + 1) % 3]


def fake_records(todo):
    for it in todo:
        if it.index == 7:
            yield DecodedImage(it, error="broken")
        else:
            h, w = size_of(it.index)
            yield DecodedImage(it, torch.zeros(3, h, w), w, h)


def fake_process(batch, calls=None):
    if calls is not None:
        calls.append([r.item.index for r in batch])
    indices = [r.item.index for r in batch]
    assert len({tuple(r.pixels.shape) for r in batch if r.pixels is not None}) <= 1, "mixed sizes"
    return [
        {"index": r.item.index, "image_id": r.item.image_id,
         "status": "failed" if r.error else "ok", "error": r.error, "batch": indices}
        for r in batch
    ]


def spec(items, out, **kw) -> JobSpec:
    return JobSpec(items=items, out=out, config=CONFIG, schema=SCHEMA, batch_size=2, part_size=4, **kw)


def run(items, out, placement=Placement(), calls=None, **kw):
    return run_job(spec(items, out, **kw), Session(placement, "cpu"), fake_records,
                   lambda batch: fake_process(batch, calls))


# ---- placement ------------------------------------------------------------------------------------

def test_parse_shard():
    assert parse_shard("0/4") == (0, 4)
    assert parse_shard(" 3 / 4 ") == (3, 4)
    for bad in ("4/4", "1/0", "a/b", "1", "-1/2"):
        with pytest.raises(UsageError):
            parse_shard(bad)


def test_placement_from_torchrun_env_and_shard():
    single = placement_from_env(None, {})
    assert (single.rank, single.world, single.leader, single.distributed, single.merges) == (0, 1, True, False, True)
    ranked = placement_from_env(None, {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1"})
    assert (ranked.rank, ranked.world, ranked.leader, ranked.distributed, ranked.merges) == (1, 2, False, True, True)
    shard = placement_from_env((2, 3), {})
    assert (shard.rank, shard.world, shard.leader, shard.merges) == (2, 3, True, False)
    # shard 1 of 3, split again over 2 torchrun ranks: global rank 1*2+1 of 6
    both = placement_from_env((1, 3), {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "0"})
    assert (both.rank, both.world) == (3, 6)
    with pytest.raises(UsageError):
        placement_from_env(None, {"RANK": "2", "WORLD_SIZE": "2"})


def test_windows_are_split_round_robin():
    items = make_items(20)
    p = Placement(rank=1, world=3)
    # window 4: windows 0..4 = indices 0-3, 4-7, 8-11, 12-15, 16-19; rank 1 of 3 owns windows 1 and 4
    assert [it.index for it in items if p.owns(it, 4)] == [4, 5, 6, 7, 16, 17, 18, 19]


# ---- runs -----------------------------------------------------------------------------------------

def test_single_run_writes_every_row_in_order(tmp_path):
    out = tmp_path / "out.parquet"
    calls: list[list[int]] = []
    summary = run(make_items(19), out, calls=calls)
    table = pq.read_table(out)
    assert table.column("index").to_pylist() == list(range(19))
    assert (summary.total, summary.done, summary.failed, summary.skipped) == (19, 18, 1, 0)
    assert summary.failures == [("img007.jpg", "broken")] and summary.merged
    assert not (tmp_path / "out.parquet.parts").exists()
    for batch in calls:  # every forward batch lies inside one window of 2 * 4 = 8 indices
        assert len({i // 8 for i in batch}) == 1 and len(batch) <= 2
    # window 0: sizes (h, w) of 0..6 are 48x32, 32x32, 32x32, 48x32, 32x32, 32x32, 48x32 and 7 fails:
    # a batch leaves as soon as two images of one size are there, the failure alone, the rest at the end
    assert calls[:5] == [[1, 2], [0, 3], [4, 5], [7], [6]]
    assert table.schema.metadata == SCHEMA.metadata


def test_split_and_restart_do_not_change_batches(tmp_path):
    items = make_items(37)
    full = tmp_path / "full.parquet"
    run(items, full)
    expected = pq.read_table(full)

    shards = tmp_path / "shards.parquet"
    for i in (2, 0, 1):
        summary = run(items, shards, placement=placement_from_env((i, 3), {}))
        assert not summary.merged
    assert summary.note and "All shards are done" in summary.note
    assert merge_output(shards) == 37
    assert pq.read_table(shards).equals(expected)


def test_interrupted_run_keeps_complete_windows_and_resumes(tmp_path):
    items = make_items(30)
    full = tmp_path / "full.parquet"
    run(items, full)
    out = tmp_path / "out.parquet"
    seen = []

    def dying(batch):
        seen.extend(r.item.index for r in batch)
        if len(seen) >= 13:  # dies in the middle of window 1 (indices 8..15)
            raise KeyboardInterrupt
        return fake_process(batch)

    with pytest.raises(KeyboardInterrupt):
        run_job(spec(items, out), Session(Placement(), "cpu"), fake_records, dying)
    store = PartStore(out)
    done = np.flatnonzero(store.done_mask(30)).tolist()
    assert done == list(range(8))  # window 0 only: the partial window 1 was not written
    summary = run(items, out)
    assert summary.skipped == 8 and summary.done + summary.failed == 22
    assert pq.read_table(out).equals(pq.read_table(full))


def test_config_and_input_mismatch_refuse_unless_overwrite(tmp_path):
    items = make_items(10)
    out = tmp_path / "out.parquet"
    job = {"format": "parquet", "batch_size": 2, "window": 8}
    PartStore.open(out, CONFIG, items, job)
    with pytest.raises(ConfigMismatchError, match=r"other settings is there \(--model: fake -> other\)"):
        PartStore.open(out, RecordIO.from_dict({"model": "other"}), items, job)
    renamed = items[:4] + [ImageItem(4, "other.jpg", "/data/other.jpg")] + items[5:]
    with pytest.raises(ConfigMismatchError, match="image #4: image_id 'img004.jpg', now 'other.jpg'"):
        PartStore.open(out, CONFIG, renamed, job)
    with pytest.raises(ConfigMismatchError, match="10 images, now 9"):
        PartStore.open(out, CONFIG, items[:9], job)
    PartStore.open(out, RecordIO.from_dict({"model": "other"}), renamed, job, overwrite=True)
    assert json.loads((tmp_path / "out.parquet.parts" / "config.json").read_text()) == {"model": "other"}


def test_rerunning_a_finished_output_is_a_no_op_and_other_runs_are_refused(tmp_path):
    out = tmp_path / "out.parquet"
    first = run(make_items(12), out)
    assert first.failed == 1  # index 7 does not decode
    before = out.read_bytes()
    calls = []
    again = run(make_items(12), out, calls=calls)
    assert calls == []  # nothing processed
    assert (again.total, again.skipped, again.done, again.failed_before) == (12, 12, 0, 1)
    assert "already complete" in again.note
    assert out.read_bytes() == before
    with pytest.raises(ConfigMismatchError, match="output exists"):
        run(make_items(11), out)  # other images: refused, not silently kept
    with pytest.raises(ConfigMismatchError, match="output exists"):
        other = JobSpec(items=make_items(12), out=out, config=RecordIO.from_dict({"model": "other"}), schema=SCHEMA,
                        batch_size=2)
        run_job(other, Session(Placement(), "cpu"), fake_records, fake_process)
    redo = run(make_items(12), out, overwrite=True)
    assert (redo.done, redo.failed) == (11, 1)


def test_merge_refuses_while_images_are_missing(tmp_path):
    items = make_items(20)
    out = tmp_path / "out.parquet"
    run(items, out, placement=placement_from_env((0, 2), {}))
    with pytest.raises(IncompleteRunError, match=r"8 of 20 images have no result yet \(e\.g\. #8 img008"):
        merge_output(out)
    assert not out.exists()
    with pytest.raises(UsageError, match="no such work directory"):
        merge_output(tmp_path / "nothing.parquet")


def test_merge_detects_a_shard_run_with_another_config(tmp_path):
    items = make_items(16)
    out = tmp_path / "out.parquet"
    run(items, out, placement=placement_from_env((0, 2), {}))
    other = SCHEMA.with_metadata({b"tagclip": json.dumps({"model": "changed"}).encode()})
    store = PartStore(out)
    store.write_part(pa.Table.from_pylist(
        [{"index": i, "image_id": f"img{i:03d}.jpg", "status": "ok", "error": None, "batch": [i]}
         for i in range(8, 16)], schema=other))
    with pytest.raises(ConfigMismatchError, match="different configuration"):
        merge_output(out)


def test_streaming_merge_interleaved_parts_with_duplicates(tmp_path):
    items = make_items(11)
    store = PartStore.open(tmp_path / "m.parquet", CONFIG, items, {"format": "parquet"})

    def part(indices):
        return pa.Table.from_pylist([{"index": i, "image_id": f"img{i:03d}.jpg", "status": "ok", "error": None,
                                      "batch": [i]} for i in indices], schema=SCHEMA)

    store.write_part(part([0, 2, 4, 6, 8, 10]))  # like rank 0 of 2 with window 1
    store.write_part(part([1, 3, 5]))
    store.write_part(part([7, 9]))
    store.write_part(part([5, 6]))  # a duplicate (e.g. a shard run twice)
    chunks = list(store.iter_merged(SCHEMA, 11, chunk=4))
    assert [c.column("index").to_pylist() for c in chunks] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10]]
    assert store.merge(SCHEMA, 11) == 11
    assert pq.read_table(tmp_path / "m.parquet").column("index").to_pylist() == list(range(11))


def test_json_lines_to_a_stream(tmp_path):
    stream = io.StringIO()
    items = make_items(9)
    summary = run_job(spec(items, None), Session(Placement(), "cpu"), fake_records, fake_process, stdout=stream)
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert [r["index"] for r in lines] == list(range(9))  # index order even though batches were bucketed
    assert lines[7]["status"] == "failed" and lines[7]["error"] == "broken"
    assert summary.done == 8 and not list(tmp_path.iterdir())  # no parts, nothing on disk


def test_json_row_scores_as_class_dict():
    row = {"index": 3, "image_id": "a.jpg", "tags": ["cat"], "scores": [np.float32(0.1).item(), 0.25, float("nan")]}
    out = json_row(row, ["cat", "dog", "cow"])
    assert out["scores"] == {"cat": 0.1, "dog": 0.25, "cow": None}  # float32 0.1 prints as 0.1, NaN -> null
    assert out["tags"] == ["cat"] and row["scores"][0] != 0.1  # the input row is untouched
    assert json_row({"index": 1, "scores": None}, ["cat"])["scores"] is None


def test_fail_fast_stops_after_the_window_with_the_failure(tmp_path):
    out = tmp_path / "out.parquet"
    summary = run(make_items(30), out, fail_fast=True)
    assert summary.failed == 1 and "fail-fast" in summary.note and not out.exists()
    assert np.flatnonzero(PartStore(out).done_mask(30)).tolist() == list(range(8))


def test_describe_item_difference_names_the_first_row_that_differs():
    """Rows null in both lists are the same; the image number is offset + row, or the row's own
    index when offset holds the indices (a --shard task's own items)."""
    from tagclip_cli.jobs.parts import describe_item_difference

    def table(paths):
        return pa.table({"image_id": ["a", "b", "c"], "path": paths, "coco_id": pa.array([None] * 3, pa.int64())})

    previous, current = table([None, "x/b.jpg", "x/c.jpg"]), table([None, "x/b.jpg", "y/c.jpg"])
    assert describe_item_difference(previous, current, 10).endswith("(image #12: path 'x/c.jpg', now 'y/c.jpg')")
    assert "(image #70: path" in describe_item_difference(previous, current, np.array([5, 40, 70]))
    assert describe_item_difference(previous, previous) == "the unfinished run there has a different input list"
