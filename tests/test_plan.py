"""List once (issue 25): the first task that lists the whole input writes the plan beside the parts;
later --shard tasks and torchrun ranks other than 0 read it instead of listing the input again; a
single process still lists and is refused when its input changed under an unfinished run. (A
--shard task over tars with no plan lists only its own shards, tests/test_own_tar_listing.py: here
the tars' plan is written by a task of a method that fits on the whole collection, which lists it
whole.)"""

from __future__ import annotations

import json
import logging
from dataclasses import replace

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from shard_fixtures import noise_images, write_dataset
from test_jobs import CONFIG, fake_process, fake_records, run, spec

from tagclip_cli.commands import planned_items
from tagclip_cli.errors import ConfigMismatchError
from tagclip_cli.itemlist import COLUMN_TYPES, ERROR, LOCAL_BASE, ItemList, OwnedItems
from tagclip_cli.jobs.parts import PartStore, merge_output, parts_dir
from tagclip_cli.jobs.placement import Placement
from tagclip_cli.jobs.plan import OLD_PLAN_NAME, PLAN_KEY, plan_path, read_plan, write_plan
from tagclip_cli.jobs.runner import WINDOW_BATCHES, run_job
from tagclip_cli.jobs.session import Session
from tagclip_cli.record import RunRecord
from tagclip_cli.sources import ImageItem, collect_items

JOB = {"window": 4}


@pytest.fixture
def data(tmp_path):
    tars, folder = write_dataset(tmp_path / "in", noise_images(9), shards=3)
    return tars, folder


def first_task(out, source, **inputs):
    items = planned_items(out, Placement(rank=0, world=3, shard=(0, 3)), source, whole=True, **inputs)
    PartStore.open(out, RunRecord(), items, JOB)
    return items


@pytest.mark.parametrize("kind", ["tars", "folder"])
def test_later_shard_tasks_read_the_plan_instead_of_listing(data, tmp_path, kind, caplog):
    tars, folder = data
    source = str(tars if kind == "tars" else folder)
    out = tmp_path / "out.parquet"
    listed = first_task(out, source)
    assert plan_path(parts_dir(out)).is_file() and listed.planned_in is None
    for victim in sorted((tars if kind == "tars" else folder / "00002").iterdir())[-1:]:
        victim.unlink()  # listing again now would give another list
    with caplog.at_level(logging.INFO):
        planned = planned_items(out, Placement(rank=2, world=3, shard=(2, 3)), source)
    assert "read the input list (9 images) from the plan" in caplog.text
    assert list(planned) == list(listed) and planned.planned_in == str(parts_dir(out))
    PartStore.open(out, RunRecord(), planned, JOB)  # no second listing to compare: accepted
    rank = planned_items(out, Placement(rank=1, world=2, group_rank=1, group_size=2), source)
    assert list(rank) == list(listed)  # a torchrun rank other than 0 reads it too


def test_a_single_process_still_lists_and_refuses_a_changed_input(data, tmp_path):
    _, folder = data
    out = tmp_path / "out.parquet"
    first_task(out, str(folder))
    (folder / "00000" / "0000000.png").unlink()
    items = planned_items(out, Placement(), str(folder))
    assert len(items) == 8
    with pytest.raises(ConfigMismatchError, match="different input list"):
        PartStore.open(out, RunRecord(), items, JOB)


def test_another_input_or_a_damaged_plan_is_listed_again(data, tmp_path, caplog):
    tars, folder = data
    out = tmp_path / "out.parquet"
    first_task(out, str(tars))
    other = planned_items(out, Placement(rank=1, world=3, shard=(1, 3)), str(tars / "0000{0,1}.tar"))
    assert isinstance(other, OwnedItems) and other.counts == {1: 3}  # another input argument: listed (its own shard)
    plan_path(parts_dir(out)).write_bytes(b"not parquet")
    with caplog.at_level(logging.WARNING):
        again = planned_items(out, Placement(rank=1, world=3, shard=(1, 3)), str(tars))
    assert "cannot use the input plan" in caplog.text and isinstance(again, OwnedItems) and again.counts == {1: 3}


def test_tasks_starting_together_write_the_same_plan(data, tmp_path):
    _, folder = data
    out = tmp_path / "out.parquet"
    a = planned_items(out, Placement(rank=0, world=2, shard=(0, 2)), str(folder))
    b = planned_items(out, Placement(rank=1, world=2, shard=(1, 2)), str(folder))  # both listed: no plan yet
    PartStore.open(out, RunRecord(), a, JOB)
    first = plan_path(parts_dir(out)).read_bytes()
    PartStore.open(out, RunRecord(), b, JOB)  # finds items.parquet and the plan: checks, keeps them
    assert plan_path(parts_dir(out)).read_bytes() == first
    assert not list(parts_dir(out).glob(".*.tmp"))  # written by rename: no half-written file left


@pytest.fixture
def many(tmp_path):
    return write_dataset(tmp_path / "many", noise_images(30), shards=5)


@pytest.mark.parametrize("kind", ["tars", "folder"])
def test_a_later_task_reads_only_its_share(many, tmp_path, kind):
    tars, folder = many
    source = str(tars if kind == "tars" else folder)
    out = tmp_path / "out.parquet"
    listed = first_task(out, source)  # the plan's batches: JOB's window, 4 rows
    for rank, world, batch_size in [(2, 3, 1), (1, 3, 2), (0, 4, 3), (3, 4, 1), (0, 1, 1), (7, 10, 1)]:
        placement = Placement(rank=rank, world=world, shard=(rank, world))
        window = batch_size * WINDOW_BATCHES  # 4 (the writer's), 8 or 12: batches overlap windows
        planned = planned_items(out, placement, source, batch_size=batch_size)
        expected = placement.share(listed, window)
        assert len(planned) == len(listed) and planned.planned_in == str(parts_dir(out))
        assert len(planned.ids) == len(expected)  # the rows of its share, no more
        assert list(placement.share(planned, window)) == list(expected)
        others = sorted(set(range(len(listed))) - set(expected.positions.tolist()))
        if others:
            with pytest.raises(IndexError, match="not in the share"):
                planned[others[0]]
        with pytest.raises(ValueError, match="the plan was read for the share"):
            Placement(rank=(rank + 1) % 5, world=5).share(planned, window)
        store = PartStore.open(out, RunRecord(), planned, JOB)  # no second listing to compare: accepted
        assert store.remaining(placement.share(planned, window), len(planned)).positions.tolist() == \
            expected.positions.tolist()


def test_a_share_keeps_its_unreadable_shards_error(many, tmp_path):
    tars, _ = many
    (tars / "00005.tar").write_bytes(b"this is not a tar file" * 40)
    out = tmp_path / "out.parquet"
    listed = first_task(out, str(tars))
    assert listed.errors and listed.kinds[-1] == ERROR
    placement = Placement(rank=2, world=3, shard=(2, 3))  # owns shards 2 and 5 (the damaged one)
    planned = planned_items(out, placement, str(tars), batch_size=1)
    share = placement.share(planned, 4)
    assert list(share) == list(placement.share(listed, 4)) and share[len(share) - 1].locator[0] == "error"
    assert planned.errors == {len(listed) - 1: listed.errors[len(listed) - 1]}


def write_plan_v1(items, parts, key):
    """plan.parquet as the previous version wrote it (one Parquet table, metadata as JSON)."""
    columns = {"image_id": items.ids}
    if items.paths is not None:
        columns["path"] = items.paths
    if items.kinds is not None:
        for name in COLUMN_TYPES:
            columns[name] = pa.array(getattr(items, name))
    info = {"input": key, "prefix": items.prefix, "shards": items.shards, "columns": items.columns,
            "errors": {str(k): v for k, v in items.errors.items()}, "raw_paths": {}}
    pq.write_table(pa.table(columns).replace_schema_metadata({PLAN_KEY: json.dumps(info).encode()}),
                   parts / OLD_PLAN_NAME, compression="zstd")


@pytest.mark.parametrize("kind", ["tars", "folder"])
def test_a_plan_of_the_previous_version_is_read_whole_then_the_new_one_written(many, tmp_path, kind):
    tars, folder = many
    source = str(tars if kind == "tars" else folder)
    out = tmp_path / "out.parquet"
    listed = first_task(out, source)
    plan_path(parts_dir(out)).unlink()
    write_plan_v1(listed, parts_dir(out), listed.input_key)
    placement = Placement(rank=1, world=3, shard=(1, 3))
    old = planned_items(out, placement, source, batch_size=1)
    assert old.held is None and list(old) == list(listed) and old.planned_in == str(parts_dir(out))
    PartStore.open(out, RunRecord(), old, JOB)  # this task writes plan.arrow for the next ones
    new = planned_items(out, placement, source, batch_size=1)
    assert new.held is not None and list(placement.share(new, 4)) == list(placement.share(listed, 4))


def test_a_list_mixing_plain_files_and_shards_is_read_whole(tmp_path):
    items = ItemList.of([ImageItem(0, "a", "a.png"), ImageItem(1, "b", "tar://b.png::x.tar", None, "x.tar", 0,
                                                                  ("tar", 512, 10)), ImageItem(2, "c", "c.png")])
    write_plan(items, tmp_path, "key", 1)
    placement = Placement(rank=1, world=2)
    whole = read_plan(tmp_path, "key", placement, 1)
    assert whole.held is None and list(whole) == list(items)
    assert list(placement.share(whole, 1)) == list(placement.share(items, 1))
    assert read_plan(tmp_path, "another input", placement, 1) is None


def run_by_image(items, out, placement, full):
    """test_jobs.run, but each image decoded (its size, whether it fails) as its index in the full
    listing says (a tar task's local indices are other numbers for the same images)."""
    index_of = {it.image_id: it.index for it in full}

    def records(todo):
        for it in todo:
            record = next(iter(fake_records([replace(it, index=index_of[it.image_id])])))
            yield replace(record, item=it)

    return run_job(spec(items, out), Session(placement, "cpu"), records, lambda batch: fake_process(batch))


def test_shard_tasks_keep_or_read_only_their_share_and_merge_to_one_process_output(many, tmp_path):
    tars, folder = many
    for source in (str(folder), str(tars)):
        single = tmp_path / f"single-{len(source)}.parquet"
        run(collect_items(source), single)  # batch size 2: windows of 8 (test_jobs.fake_records: #7 fails)
        out = tmp_path / f"shards-{len(source)}.parquet"
        held = []
        for rank in (1, 0, 2):  # the first task lists (and keeps its share), the others read the plan
            placement = Placement(rank=rank, world=3, shard=(rank, 3))
            items = planned_items(out, placement, source, batch_size=2)
            expected = placement.share(collect_items(source), 8)
            summary = run_by_image(items, out, placement, collect_items(source))
            assert summary.total == len(expected)
            if source == str(tars):  # each task lists its own shards (no plan), numbered locally
                assert isinstance(items, OwnedItems) and [it.image_id for it in items] == [
                    it.image_id for it in expected] and items.positions[0] >= LOCAL_BASE and items.total is None
                continue
            assert items.held is not None
            held.append(len(items.ids))
            assert held[-1] == len(expected) and len(items) == 30
        assert merge_output(out) == 30
        same = ["index", "image_id", "status", "error"]  # (tar shards are batched per shard: "batch" differs)
        assert pq.read_table(out, columns=same).equals(pq.read_table(single, columns=same))


def test_a_plan_without_its_items_parquet_is_not_used(data, tmp_path):
    tars, _ = data
    out = tmp_path / "out.parquet"
    first_task(out, str(tars))
    (parts_dir(out) / "items.parquet").unlink()
    again = planned_items(out, Placement(rank=1, world=3, shard=(1, 3)), str(tars), batch_size=1)
    assert isinstance(again, OwnedItems) and again.counts == {1: 3} and len(again) == 3  # listed: its own shard


def test_local_and_global_parts_on_one_output_merge_to_one_process_output(many, tmp_path):
    """A tar task numbers its shards locally (no plan yet); then a whole list is written (the plan)
    and the other tasks read their share from it (global indices): `tagclip merge` renumbers the
    first task's parts and gives the one-process rows. A whole-list run finds the local parts done."""
    tars, _ = many
    source, full = str(tars), collect_items(str(tars))
    single = tmp_path / "single.parquet"
    run(collect_items(source), single)
    same = ["index", "image_id", "status", "error"]
    for finish in ("plan tasks", "whole-list run"):
        out = tmp_path / f"{finish}.parquet"
        local = planned_items(out, Placement(rank=1, world=3, shard=(1, 3)), source, batch_size=2)
        assert isinstance(local, OwnedItems) and local.numbered_locally
        run_by_image(local, out, Placement(rank=1, world=3, shard=(1, 3)), full)
        if finish == "whole-list run":  # lists everything, skips the local task's images, merges
            summary = run_by_image(collect_items(source), out, Placement(), full)
            assert summary.skipped == len(local) and summary.done + summary.failed == 30 - len(local)
        else:
            whole = planned_items(out, Placement(rank=0, world=3, shard=(0, 3)), source, whole=True)
            PartStore.open(out, CONFIG, whole, {"window": 8})  # a whole list on the output: items.parquet, the plan
            for rank in (2, 0):
                placement = Placement(rank=rank, world=3, shard=(rank, 3))
                planned = planned_items(out, placement, source, batch_size=2)
                assert planned.held is not None  # read from the plan: global indices
                run_by_image(planned, out, placement, full)
            assert merge_output(out) == 30
        assert pq.read_table(out, columns=same).equals(pq.read_table(single, columns=same)), finish
