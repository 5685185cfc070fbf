"""A `--shard` task's own listing of tar shards (shardsources.list_tars_share): its own shards only,
numbered with local indices (itemlist.local_indices) that jobs/listing.py's `Numbering` turns into
the full listing's indices once every shard's count is known from the tasks' pieces. The same items,
warnings and errors as the full listing for every split; no byte of another task's shard read
(recorded by a real fsspec filesystem); the pieces put together into items.parquet, refused while a
shard's owner has not listed it, or when a shard changed between tasks."""

from __future__ import annotations

import logging
from dataclasses import replace

import numpy as np
import pyarrow.parquet as pq
import pytest
from shard_fixtures import encode, noise_images, recording_filesystem, write_dataset, write_tar

from tagclip_cli.errors import ConfigMismatchError, IncompleteRunError, UsageError
from tagclip_cli.itemlist import LOCAL_BASE, OwnedItems, local_indices
from tagclip_cli.jobs.listing import LISTING_DIR, Numbering, assemble_items, shard_numbering, write_piece
from tagclip_cli.jobs.parts import items_table
from tagclip_cli.jobs.placement import Placement
from tagclip_cli.sources import ParquetColumns, collect_items

# local files under tarrecording:// with no descriptor (read through `read`, as a remote tar), every
# read recorded
READS = recording_filesystem("tarrecording", descriptor=False)


@pytest.fixture(scope="module")
def tars(tmp_path_factory):
    """Nine shards: five sound ones of 5, 5, 5, 5 and 3 samples, one with a key repeated (`#2`),
    one cut in the middle of a member (its samples before the cut, then a failed row), one that is
    no tar at all (one failed row), one without images (a sample of text only: a failed row)."""
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


def own_listing(source: str, rank: int, world: int) -> OwnedItems:
    items = collect_items(source, own=(rank, world))
    assert isinstance(items, OwnedItems) and items.numbered_locally and items.total is None
    return items


def own_places(own: OwnedItems) -> list[int]:
    """Each item's place in its shard."""
    return [k for s in sorted(own.counts) for k in range(own.counts[s])]


def numbering_of(tasks: list[OwnedItems]) -> Numbering:
    """The numbering every task's counts give (as `tagclip merge` learns it from their pieces)."""
    counts = {s: n for task in tasks for s, n in task.counts.items()}
    return Numbering.of_counts(np.array([counts[s] for s in range(tasks[0].shards)]))


def test_the_tasks_own_items_are_the_full_listing_s_once_renumbered(tars, caplog):
    with caplog.at_level(logging.WARNING, logger="tagclip_cli"):
        full = collect_items(str(tars))
    warned = caplog.records[:]
    ids = [it.image_id for it in full]
    assert len(full) == 23 + 3 + 5 + 1 + 1
    assert ids[23:26] == ["r-repeat/k", "r-repeat/x", "r-repeat/k#2"] and ids[-2:] == ["u-junk/<unreadable>",
                                                                                      "v-text/a"]
    assert ids[-3] == "t-cut/<unreadable>" and full[-3].locator[0] == "error"
    for world in (1, 2, 3, 4, 9, 12):
        tasks = []
        for rank in range(world):
            caplog.clear()
            with caplog.at_level(logging.WARNING, logger="tagclip_cli"):
                own = own_listing(str(tars), rank, world)
            assert sorted(own.counts) == list(range(rank, 9, world))
            expected = list(Placement(rank, world).share(full, 8))
            assert [it.image_id for it in own] == [it.image_id for it in expected]
            assert list(own) == [replace(it, index=int(p)) for it, p in zip(expected, own.positions, strict=True)]
            assert own.positions.tolist() == [LOCAL_BASE + (it.shard_index << 32) + k for it, k in
                                              zip(own, own_places(own), strict=True)]
            mine = {it.shard for it in own}
            assert [r.getMessage() for r in caplog.records] == [
                r.getMessage() for r in warned if any(str(shard) in r.getMessage() for shard in mine)]
            tasks.append(own)
        numbering = numbering_of(tasks)
        assert numbering.total == len(full)
        for rank, own in enumerate(tasks):  # renumbered: the full listing's indices of this task's share
            assert numbering.to_global(own.positions).tolist() == [
                it.index for it in Placement(rank, world).share(full, 8)], (rank, world)


def test_local_indices_sort_as_global_ones_and_global_ones_pass_through():
    numbering = Numbering.of_counts(np.array([3, 0, 2, 4]))
    local = np.concatenate([local_indices(s, n) for s, n in enumerate([3, 0, 2, 4])])
    assert numbering.to_global(local).tolist() == list(range(9))
    mixed = np.array([5, int(local_indices(2, 2)[1]), 0, int(local_indices(9, 1)[0])])
    assert numbering.to_global(mixed).tolist() == [5, 4, 0, mixed[3]]  # shard 9 is not known: left local
    assert Numbering(np.array([0, -1, 3])).to_global(local_indices(1, 2)).tolist() == local_indices(1, 2).tolist()


def test_nothing_listable_is_the_same_usage_error_and_a_task_of_unreadable_shards_writes_their_rows(tmp_path):
    with pytest.raises(UsageError) as whole:
        collect_items(str(tmp_path / "nope-{0..2}.tar"))
    assert "(and the 2 other shards)" in str(whole.value)
    for rank in range(3):  # none of the shards exists: refused as the full listing does, naming its own first
        with pytest.raises(UsageError) as own:
            own_listing(str(tmp_path / "nope-{0..2}.tar"), rank, 3)
        assert str(own.value) == str(whole.value).replace("nope-0", f"nope-{rank}")
    write_tar(tmp_path / "nope-1.tar", [("a.png", encode(noise_images(1)[0]))])
    alone = own_listing(str(tmp_path / "nope-{0..2}.tar"), 0, 3)  # another shard exists: its error row
    assert [it.locator[0] for it in alone] == ["error"] and alone.counts == {0: 1}
    assert "cannot read tar shard" in alone[0].locator[1]
    for own in (None, (0, 3), (1, 3)):
        with pytest.raises(UsageError, match=r"^--image-column / --id-column apply to Parquet inputs$"):
            collect_items(str(tmp_path / "nope-{0..2}.tar"), columns=ParquetColumns("jpg"), own=own)
    (tmp_path / "empty").mkdir()
    write_tar(tmp_path / "empty" / "0.tar", [])
    write_tar(tmp_path / "empty" / "1.tar", [("a.png", encode(noise_images(1)[0]))])
    nothing = own_listing(str(tmp_path / "empty" / "{0,1}.tar"), 0, 2)  # its shard is empty, another is not
    assert not len(nothing) and nothing.counts == {0: 0}
    with pytest.raises(UsageError, match="no images found"):  # a task that owns every shard knows there are none
        own_listing(str(tmp_path / "empty" / "0.tar"), 0, 1)


def big_shards(folder, shards: int = 4, samples: int = 6):
    """Shards whose samples are a large member (200 KB: stepped over by the header walk) and a small image."""
    folder.mkdir()
    for s in range(shards):
        members = [[(f"{s}{k:03d}.bin", bytes(range(256)) * 800), (f"{s}{k:03d}.png", encode(image))]
                   for k, image in enumerate(noise_images(samples, seed=s))]
        write_tar(folder / f"{s:02d}.tar", [member for sample in members for member in sample])
    return folder


def test_a_task_reads_no_byte_of_the_shards_it_does_not_own(tmp_path):
    folder = big_shards(tmp_path / "big", shards=5)
    world, source = 3, f"tarrecording://{folder}/*.tar"
    for rank in (2, 0, 1):  # nothing published, no work directory: each task alone
        READS.clear()
        own = own_listing(source, rank, world)
        mine = {str(folder / f"{s:02d}.tar") for s in range(rank, 5, world)}
        assert set(READS) == mine, rank  # its own shards, by their headers (not the 200 KB members)
        for path in mine:
            assert sum(length for _, length in READS[path]) < 0.2 * (tmp_path / path).stat().st_size
        assert own.counts == {s: 6 for s in range(rank, 5, world)}


def test_the_pieces_make_items_parquet_once_every_shard_is_listed(tars, tmp_path):
    full = collect_items(str(tars))
    out, parts = tmp_path / "out.parquet", tmp_path / "out.parquet.parts"
    parts.mkdir()
    world = 4
    for rank in (3, 1, 0, 2):
        own = own_listing(str(tars), rank, world)
        own.input_key = "the input"
        write_piece(parts, out, own)
        if rank != 2:
            with pytest.raises(IncompleteRunError, match=r"2 of 9 tar shards have not been listed yet \(e\.g\. #2, #6\)"
                               if rank == 0 else r"tar shards have not been listed yet"):
                assemble_items(parts, out)
            assert shard_numbering(parts) is None
    assert len(list((parts / LISTING_DIR).glob("*.parquet"))) == world
    assert shard_numbering(parts).total == len(full)
    assert assemble_items(parts, out)
    assert pq.read_table(parts / "items.parquet").equals(items_table(list(full)))


def test_a_task_of_another_input_or_a_changed_shard_is_refused(tmp_path):
    tars, _ = write_dataset(tmp_path, noise_images(6), shards=3)
    out, parts = tmp_path / "x", tmp_path / "parts"
    parts.mkdir()
    first = own_listing(str(tars), 0, 3)
    first.input_key = "key"
    write_piece(parts, out, first)
    other = own_listing(str(tars / "0000{0,1}.tar"), 1, 2)
    other.input_key = "key"  # (the same arguments, a pattern that matches fewer files now)
    with pytest.raises(ConfigMismatchError, match=r"x: the --shard tasks there listed a different input "
                                                  r"\(.*\.parquet: 3 tar shards, now 2\)"):
        write_piece(parts, out, other)
    again = own_listing(str(tars), 0, 3)
    write_tar(tars / "00000.tar", [("a.png", encode(noise_images(1)[0]))])  # 2 samples before, 1 now
    changed = own_listing(str(tars), 0, 3)
    again.input_key = changed.input_key = "key"
    write_piece(parts, out, again)  # the same piece again: accepted
    with pytest.raises(ConfigMismatchError, match=r"tar shard #0 of the input has 1 rows here, 2 as another"):
        write_piece(parts, out, changed)
    whole = collect_items(str(tars))
    whole.input_key = "key"
    from tagclip_cli.jobs.listing import Listed, check_pieces

    with pytest.raises(ConfigMismatchError, match=r"tar shard #0 of the input has 1 rows here, 2 as another"):
        check_pieces(parts, out, Listed.of(whole), whole)  # a whole-list run finds the shard changed too


def test_global_pieces_of_the_version_before_local_numbering_are_refused(tmp_path):
    tars, _ = write_dataset(tmp_path, noise_images(6), shards=3)
    out, parts = tmp_path / "x", tmp_path / "parts"
    parts.mkdir()
    local = own_listing(str(tars), 1, 3)
    old = OwnedItems(local.base, np.array([2, 3]), 6)  # what a task of the earlier version wrote: global indices
    old.input_key = local.input_key = "key"
    write_piece(parts, out, old)
    with pytest.raises(ConfigMismatchError, match=r"x: the --shard tasks there numbered their images as an earlier "
                                                  r"version of tagclip-cli did \(000000000002-"):
        write_piece(parts, out, local)
