"""List once (issue 25): the first task writes the plan beside the parts; later --shard tasks and
torchrun ranks other than 0 read it instead of listing the input again; a single process still
lists and is refused when its input changed under an unfinished run."""

from __future__ import annotations

import logging

import pytest
from shard_fixtures import noise_images, write_dataset

from tagclip_cli.commands import planned_items
from tagclip_cli.errors import ConfigMismatchError
from tagclip_cli.jobs.parts import PartStore, parts_dir
from tagclip_cli.jobs.placement import Placement
from tagclip_cli.jobs.plan import plan_path
from tagclip_cli.record import RunRecord

JOB = {"window": 4}


@pytest.fixture
def data(tmp_path):
    tars, folder = write_dataset(tmp_path / "in", noise_images(9), shards=3)
    return tars, folder


def first_task(out, source, **inputs):
    items = planned_items(out, Placement(rank=0, world=3, shard=(0, 3)), source, **inputs)
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
    assert len(other) == 6 and other.planned_in is None  # another input argument: listed
    plan_path(parts_dir(out)).write_bytes(b"not parquet")
    with caplog.at_level(logging.WARNING):
        again = planned_items(out, Placement(rank=1, world=3, shard=(1, 3)), str(tars))
    assert "cannot use the input plan" in caplog.text and len(again) == 9 and again.planned_in is None


def test_tasks_starting_together_write_the_same_plan(data, tmp_path):
    tars, _ = data
    out = tmp_path / "out.parquet"
    a = planned_items(out, Placement(rank=0, world=2, shard=(0, 2)), str(tars))
    b = planned_items(out, Placement(rank=1, world=2, shard=(1, 2)), str(tars))  # both listed: no plan yet
    PartStore.open(out, RunRecord(), a, JOB)
    first = plan_path(parts_dir(out)).read_bytes()
    PartStore.open(out, RunRecord(), b, JOB)  # finds items.parquet and the plan: checks, keeps them
    assert plan_path(parts_dir(out)).read_bytes() == first
    assert not list(parts_dir(out).glob(".*.tmp"))  # written by rename: no half-written file left
