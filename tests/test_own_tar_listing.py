"""A `--shard` task's own listing of tar shards (shardsources.list_tars_share, the row counts of
the other shards shared through jobs/listing.py's TarCountBoard): the same items, indices, warnings
and errors as the full listing for every split, whichever task comes first; no byte of another
task's shard read once the counts are published (recorded by a real fsspec filesystem), only its
headers when the task has to count it; tasks running at once wait for each other's counts rather
than walk each other's shards; the wait is bounded and an interrupt stops it; counts of another
input are kept apart, those of a changed shard or shard list refused in one line."""

from __future__ import annotations

import json
import logging
import os
import signal
import threading
import time

import pytest
from shard_fixtures import encode, noise_images, recording_filesystem, tar_layout, write_dataset, write_tar

from tagclip_cli.errors import ConfigMismatchError, UsageError
from tagclip_cli.itemlist import OwnedItems
from tagclip_cli.jobs import listing
from tagclip_cli.jobs.listing import TarCountBoard
from tagclip_cli.jobs.placement import Placement
from tagclip_cli.shardsources import TarCounts
from tagclip_cli.sources import ParquetColumns, collect_items

# local files under tarrecording:// with no descriptor (read through `read`, as a remote tar), every
# read recorded
READS = recording_filesystem("tarrecording", descriptor=False)


@pytest.fixture(scope="module")
def tars(tmp_path_factory):
    """Nine shards: five sound ones of 5, 5, 5, 5 and 3 samples, one with a key repeated (`#2`),
    one cut in the middle of a member (its samples before the cut, then a failed row), one that is
    no tar at all (one failed row), one empty of images."""
    root = tmp_path_factory.mktemp("own_tars")
    folder, _ = write_dataset(root, noise_images(23, seed=8), shards=5)
    one, two = encode(noise_images(1, seed=1)[0]), encode(noise_images(1, seed=2)[0])
    write_tar(folder / "r-repeat.tar", [("k.png", one), ("x.png", one), ("k.png", two), ("k.json", b"{}")])
    members = [(f"{k:03d}.png", encode(arr)) for k, arr in enumerate(noise_images(6, seed=3))]
    whole = write_tar(root / "whole.tar", members).read_bytes()
    (folder / "t-cut.tar").write_bytes(whole[: len(whole) // 2])
    (folder / "u-junk.tar").write_bytes(b"this is not a tar file" * 40)
    write_tar(folder / "v-text.tar", [("a.txt", b"no image")])
    return folder


@pytest.fixture
def no_wait(monkeypatch):
    monkeypatch.setattr(listing, "COUNT_WAIT", (0.0, 0.0))


def own_listing(source: str, rank: int, world: int, counts: TarCounts | None = None) -> OwnedItems:
    items = collect_items(source, own=(rank, world) if counts is None else (rank, world, counts))
    assert isinstance(items, OwnedItems)
    return items


def test_the_tasks_own_items_are_the_full_listing_s_whichever_task_comes_first(tars, tmp_path, no_wait, caplog):
    with caplog.at_level(logging.WARNING, logger="tagclip_cli"):
        full = collect_items(str(tars))
    warned = caplog.records[:]
    ids = [it.image_id for it in full]
    assert len(full) == 23 + 3 + 5 + 1 + 1
    assert ids[23:26] == ["r-repeat/k", "r-repeat/x", "r-repeat/k#2"] and ids[-2:] == ["u-junk/<unreadable>",
                                                                                      "v-text/a"]
    assert ids[-3] == "t-cut/<unreadable>" and full[-3].locator[0] == "error"
    for world in (1, 2, 3, 4, 9, 12):
        for order in (range(world), reversed(range(world))):  # the first task counts the others' shards
            parts, got = tmp_path / f"{world}-{order.__class__.__name__}.parts", []
            for rank in order:
                caplog.clear()
                with caplog.at_level(logging.WARNING, logger="tagclip_cli"):
                    own = own_listing(str(tars), rank, world, TarCountBoard(parts, tmp_path / "x", "key", rank))
                assert own.total == len(full)
                assert list(own) == list(Placement(rank, world).share(full, 8)), (rank, world)
                mine = {it.shard for it in own}
                assert [r.getMessage() for r in caplog.records] == [
                    r.getMessage() for r in warned if any(str(shard) in r.getMessage() for shard in mine)]
                got += list(own)
            assert sorted(got, key=lambda it: it.index) == list(full), world
    for rank in range(3):  # alone (no work directory to share counts in): the same, counted here
        assert list(own_listing(str(tars), rank, 3)) == list(Placement(rank, 3).share(full, 8))


def test_a_damaged_shard_s_count_is_published_by_its_owner_only_and_junk_is_ignored(tars, tmp_path, no_wait,
                                                                                   caplog):
    full = collect_items(str(tars))
    parts = tmp_path / "parts"
    own_listing(str(tars), 0, 9, TarCountBoard(parts, tmp_path / "x", "key", 0))  # counts shards 1..8 itself
    published = set()
    for path in (parts / "listing" / "counts").glob("*/*.json"):
        published |= {shard for shard, _ in json.loads(path.read_text())["counts"]}
    assert published == {0, 1, 2, 3, 4, 5, 8}  # not t-cut (6) nor u-junk (7): a failed read may be fleeting
    next((parts / "listing" / "counts").iterdir()).joinpath("junk.json").write_text("{not json")
    with caplog.at_level(logging.WARNING, logger="tagclip_cli"):
        own = own_listing(str(tars), 6, 9, TarCountBoard(parts, tmp_path / "x", "key", 6))
    assert "junk.json: not a file of tar shard counts" in caplog.text
    assert list(own) == list(Placement(6, 9).share(full, 8)) and own[len(own) - 1].image_id == "t-cut/<unreadable>"


def test_nothing_listable_is_the_same_usage_error(tmp_path, no_wait):
    with pytest.raises(UsageError) as whole:
        collect_items(str(tmp_path / "nope-{0..2}.tar"))
    assert "(and the 2 other shards)" in str(whole.value)
    for rank in range(3):
        board = TarCountBoard(tmp_path / "parts", tmp_path / "x", "key", rank)
        with pytest.raises(UsageError) as own:
            own_listing(str(tmp_path / "nope-{0..2}.tar"), rank, 3, board)
        assert str(own.value) == str(whole.value)
    write_tar(tmp_path / "nope-1.tar", [("a.png", encode(noise_images(1)[0]))])
    for own in (None, (0, 3), (1, 3)):
        with pytest.raises(UsageError, match=r"^--image-column / --id-column apply to Parquet inputs$"):
            collect_items(str(tmp_path / "nope-{0..2}.tar"), columns=ParquetColumns("jpg"), own=own)


def big_shards(folder, shards: int = 4, samples: int = 6):
    """Shards whose samples are a large member (200 KB: stepped over by the header walk) and a small image."""
    folder.mkdir()
    for s in range(shards):
        members = [[(f"{s}{k:03d}.bin", bytes(range(256)) * 800), (f"{s}{k:03d}.png", encode(image))]
                   for k, image in enumerate(noise_images(samples, seed=s))]
        write_tar(folder / f"{s:02d}.tar", [member for sample in members for member in sample])
    return folder


def test_a_task_reads_nothing_of_other_shards_once_counted_and_only_headers_to_count(tmp_path, no_wait):
    folder = big_shards(tmp_path / "big")
    parts, world = tmp_path / "parts", 4
    source = f"tarrecording://{folder}/*.tar"
    READS.clear()
    first = own_listing(source, 2, world, TarCountBoard(parts, tmp_path / "x", "key", 2))  # no counts yet
    for s in range(world):  # it walked the others' shards for their counts: header blocks and what follows
        path = str(folder / f"{s:02d}.tar")
        shard = folder / f"{s:02d}.tar"
        headers = [offset for _, offset, _ in tar_layout(shard)]
        reads = READS.pop(path)  # (after the last header: what is left, to check the end of the archive)
        assert all(at in headers or at > headers[-1] for at, _ in reads), (s, reads)
        if s != 2:
            assert sum(length for _, length in reads) < 0.2 * shard.stat().st_size, (s, reads)
    assert not READS
    for rank in range(world):  # the counts are published now: each task reads its own shard only
        own = own_listing(source, rank, world, TarCountBoard(parts, tmp_path / "x", "key", rank))
        assert set(READS) == {str(folder / f"{rank:02d}.tar")}, rank
        assert own.total == first.total == 4 * 6
        READS.clear()


def test_tasks_at_once_wait_for_each_other_s_counts(tmp_path, monkeypatch):
    monkeypatch.setattr(listing, "COUNT_WAIT", (10.0, 30.0))  # long enough for the other thread to start
    folder = big_shards(tmp_path / "big", shards=3)
    source, parts, world = f"tarrecording://{folder}/*.tar", tmp_path / "parts", 3
    READS.clear()
    results: dict[int, OwnedItems] = {}

    def task(rank: int) -> None:
        results[rank] = own_listing(source, rank, world, TarCountBoard(parts, tmp_path / "x", "key", rank))

    threads = [threading.Thread(target=task, args=(rank,)) for rank in range(world)]
    start = time.monotonic()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert time.monotonic() - start < 10.0  # each went on as soon as the others' counts were there
    assert set(READS) == {str(folder / f"{s:02d}.tar") for s in range(world)}
    full = collect_items(source)
    for rank in range(world):
        assert list(results[rank]) == list(Placement(rank, world).share(full, 8))


def test_the_wait_is_bounded_then_the_task_counts_alone(tmp_path, monkeypatch):
    monkeypatch.setattr(listing, "COUNT_WAIT", (0.3, 0.6))
    tars, _ = write_dataset(tmp_path, noise_images(6), shards=3)
    start = time.monotonic()
    own = own_listing(str(tars), 1, 3, TarCountBoard(tmp_path / "parts", tmp_path / "x", "key", 1))
    assert 0.3 <= time.monotonic() - start < 3.0
    assert own.total == 6 and own.positions.tolist() == [2, 3]
    assert len(list((tmp_path / "parts" / "listing" / "counts").glob("*/*.json"))) >= 1  # published


def test_an_interrupt_stops_the_wait_at_once(tmp_path, monkeypatch):
    monkeypatch.setattr(listing, "COUNT_WAIT", (60.0, 60.0))
    tars, _ = write_dataset(tmp_path, noise_images(4), shards=2)
    # Python's own Ctrl-C handler (an earlier test in the same process may have left another one)
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    timer = threading.Timer(0.5, os.kill, (os.getpid(), signal.SIGINT))
    start = time.monotonic()
    timer.start()
    try:
        with pytest.raises(KeyboardInterrupt):
            own_listing(str(tars), 0, 2, TarCountBoard(tmp_path / "parts", tmp_path / "x", "key", 0))
    finally:
        timer.join()
        signal.signal(signal.SIGINT, previous)
    assert time.monotonic() - start < 5.0


def test_counts_of_another_input_are_apart_those_of_a_changed_shard_refused(tmp_path, no_wait):
    tars, _ = write_dataset(tmp_path, noise_images(6), shards=3)
    parts, out = tmp_path / "parts", tmp_path / "x"
    own_listing(str(tars), 0, 3, TarCountBoard(parts, out, "key", 0))
    READS.clear()
    source = f"tarrecording://{tars}"
    other = own_listing(source, 1, 3, TarCountBoard(parts, out, "other key", 1))  # not this key's counts
    assert other.total == 6 and set(READS) == {str(tars / f"0000{s}.tar") for s in range(3)}
    with pytest.raises(ConfigMismatchError, match=r"x: the --shard tasks there listed a different input "
                                                  r"\(.*\.json: 3 tar shards, now 2\)"):
        own_listing(str(tars / "0000{0,1}.tar"), 1, 2, TarCountBoard(parts, out, "key", 1))
    write_tar(tars / "00001.tar", [("a.png", encode(noise_images(1)[0]))])  # 2 samples before, 1 now
    with pytest.raises(ConfigMismatchError, match=r"tar shard #1 of the input has 1 rows here, 2 as another"):
        own_listing(str(tars), 1, 3, TarCountBoard(parts, out, "key", 1))


def test_a_finished_output_without_a_work_directory_is_left_alone(tmp_path):
    (tmp_path / "out.parquet").write_bytes(b"finished")
    assert type(listing.tar_counts(tmp_path / "out.parquet.parts", tmp_path / "out.parquet", "k", 0)) is TarCounts
    assert isinstance(listing.tar_counts(tmp_path / "new.parquet.parts", tmp_path / "new.parquet", "k", 0),
                      TarCountBoard)
