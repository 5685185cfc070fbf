"""A `--shard` task's own listing of Parquet inputs (shardsources.list_parquet_share, OwnedItems,
jobs/listing.py): the same items as the full listing for every split, read from the footers of the
other files and the column chunks of its own row groups only (bytes counted by a real fsspec
filesystem that records every read), the pieces of the input list put together by the merge, and
an existing items.parquet checked against a task's own rows."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from shard_fixtures import noise_images, recording_filesystem, write_dataset, write_parquet

from tagclip_cli.errors import ConfigMismatchError, IncompleteRunError
from tagclip_cli.itemlist import ItemList, OwnedItems, total_items
from tagclip_cli.jobs.listing import LISTING_DIR, assemble_items, write_piece
from tagclip_cli.jobs.parts import items_table, own_items_differ, write_items
from tagclip_cli.jobs.placement import Placement
from tagclip_cli.sources import collect_items, read_bytes

READS = recording_filesystem("counting")  # local files under counting://, every read recorded


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Five files: img2dataset style (key column), a key repeated across row groups, one file that
    is not Parquet, one with a damaged key column chunk, and Hugging Face style (no key column)."""
    root = tmp_path_factory.mktemp("own_files")
    images = noise_images(30, seed=5)
    write_parquet(root / "a.parquet", images[:10], row_group_size=3, style="img2dataset")
    keys = ["x", "y", "x", "x", "z", "y", "q"]
    pq.write_table(pa.table({"key": keys, "jpg": pa.array([b"img"] * 7, pa.binary())}), root / "b.parquet",
                   row_group_size=2)
    (root / "c.parquet").write_bytes(b"not parquet at all")
    write_parquet(root / "d.parquet", images[10:19], row_group_size=4, style="img2dataset")
    meta = pq.read_metadata(root / "d.parquet")
    key = meta.row_group(1).column(0)  # row group 1's key column chunk: overwritten with junk
    data = bytearray((root / "d.parquet").read_bytes())
    data[key.data_page_offset:key.data_page_offset + key.total_compressed_size] = b"\xff" * key.total_compressed_size
    (root / "d.parquet").write_bytes(bytes(data))
    write_parquet(root / "e.parquet", images[19:], row_group_size=2, style="hf")
    return root


def own_listing(pattern: str, rank: int, world: int) -> OwnedItems:
    items = collect_items(None, images_parquet=pattern, own=(rank, world))
    assert isinstance(items, OwnedItems)
    return items


def test_the_tasks_own_items_are_the_full_listing_s(files):
    full = collect_items(None, images_parquet=str(files / "*.parquet"))
    assert isinstance(full, ItemList) and len(full) == 10 + 7 + 1 + 9 + 11
    ids = [it.image_id for it in full]
    assert ids[10:17] == ["b/x", "b/y", "b/x#2", "b/x#3", "b/z", "b/y#2", "b/q"]
    assert [it.locator[0] for it in full][17:19] == ["error", "parquet"]
    assert {it.locator[0] for it in full[22:26]} == {"error"}  # d's damaged row group: its rows fail
    for world in (1, 2, 3, 4, 7, 25):
        got = []
        for rank in range(world):
            own = own_listing(str(files / "*.parquet"), rank, world)
            assert own.total == total_items(own) == len(full)
            assert list(own) == list(Placement(rank, world).share(full, 8)), (rank, world)
            got += list(own)
        assert sorted(got, key=lambda it: it.index) == list(full), world


def test_a_task_reads_the_footers_and_its_own_column_chunks_only(files):
    world, rank = 4, 1
    READS.clear()
    own = own_listing(f"counting://{files}/*.parquet", rank, world)
    for item in own:
        if item.locator[0] == "parquet":
            assert read_bytes(item)
    unit = 0
    for name in "abcde":
        path = str(files / f"{name}.parquet")
        size = len((files / f"{name}.parquet").read_bytes())
        if name == "c":  # not Parquet: pyarrow reads it (18 bytes) to say so, as a full listing does
            assert sum(length for _, length in READS.pop(path)) <= size + 8
            unit += 1
            continue
        meta = pq.read_metadata(path)
        footer = (size - 8 - int.from_bytes((files / f"{name}.parquet").read_bytes()[-8:-4], "little"), size)
        groups = range(meta.num_row_groups)
        owned = [g for g in groups if (unit + g) % world == rank]
        allowed = [footer]
        for g in groups:
            for c in range(meta.num_columns):
                chunk = meta.row_group(g).column(c)
                start = chunk.dictionary_page_offset or chunk.data_page_offset
                span = (start, start + chunk.total_compressed_size)
                is_key = meta.schema.column(c).name == "key"
                if g in owned or (is_key and owned and g < max(owned)):  # ids before an owned group: for `#2`
                    allowed.append(span)
        reads = READS.pop(path, [])
        assert reads, name
        spans = joined(allowed)  # a struct's leaves lie side by side and are read in one go
        for at, length in reads:
            assert any(lo <= at and at + length <= hi for lo, hi in spans), (name, at, length, spans)
        if not owned:  # nothing of it but the footer
            assert sum(length for _, length in reads) == footer[1] - footer[0], name
        unit += meta.num_row_groups
    assert not READS


def joined(spans: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """The union of byte ranges [lo, hi) as disjoint ranges (touching ones joined)."""
    out: list[tuple[int, int]] = []
    for lo, hi in sorted(spans):
        if out and lo <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], hi))
        else:
            out.append((lo, hi))
    return out


def test_owned_items_as_a_share(files):
    full = collect_items(None, images_parquet=str(files / "*.parquet"))
    own = own_listing(str(files / "*.parquet"), 2, 3)
    assert own.unit_column().tolist() == [it.shard_index for it in own]
    assert set(own.unit_column() % 3) == {2}
    some = own.take(own.positions[1::2])
    assert list(some) == [full[int(p)] for p in own.positions[1::2]]
    assert list(own[2:5]) == [full[int(p)] for p in own.positions[2:5]]
    assert own.table().equals(items_table(list(full)).take(pa.array(own.positions)))
    assert list(Placement(2, 3).share(own, 8)) == list(own)
    assert not len(Placement(0, 3).share(own, 8))


def test_tars_are_listed_by_shard_too(tmp_path):  # (the tar share: tests/test_own_tar_listing.py)
    tars, _ = write_dataset(tmp_path, noise_images(6), shards=3)
    items = collect_items(str(tars), own=(0, 3))
    assert isinstance(items, OwnedItems) and len(items) == 2 and items.counts == {0: 2} and items.total is None


def test_the_pieces_make_items_parquet_once_every_image_is_listed(files, tmp_path):
    full = collect_items(None, images_parquet=str(files / "*.parquet"))
    out = tmp_path / "out.parquet"
    parts = tmp_path / "out.parquet.parts"
    parts.mkdir()
    world = 5
    for rank in range(world):
        own = own_listing(str(files / "*.parquet"), rank, world)
        own.input_key = "the input"
        write_piece(parts, out, own)
        if rank == 1:
            with pytest.raises(IncompleteRunError, match=r"of 38 images have not been listed yet \(e\.g\. #6, #7"):
                assemble_items(parts, out)
    assert len(list((parts / LISTING_DIR).glob("*.parquet"))) == world
    assert assemble_items(parts, out)
    assert pq.read_table(parts / "items.parquet").equals(items_table(list(full)))
    other = own_listing(str(files / "{a,b}.parquet"), 0, 2)
    other.input_key = "another input"
    with pytest.raises(ConfigMismatchError, match=r"listed a different input \(.*: 38 images, now 17\)"):
        write_piece(parts, out, other)


def test_an_existing_items_parquet_is_checked_against_the_task_s_rows(files, tmp_path):
    full = collect_items(None, images_parquet=str(files / "*.parquet"))
    write_items(full, tmp_path / "items.parquet")
    own = own_listing(str(files / "*.parquet"), 1, 3)
    assert own_items_differ(tmp_path / "items.parquet", own) is None
    table = items_table(list(full))
    ids = table.column("image_id").to_pylist()
    changed = int(own.positions[2])
    ids[changed] = "renamed"
    pq.write_table(table.set_column(1, "image_id", pa.array(ids)), tmp_path / "items.parquet")
    assert own_items_differ(tmp_path / "items.parquet", own) == (
        f"the unfinished run there has a different input list (image #{changed}: image_id 'renamed', "
        f"now {full[changed].image_id!r})")
    ids[changed] = full[changed].image_id
    unowned = int(np.setdiff1d(np.arange(len(full)), own.positions)[0])
    ids[unowned] = "not this task's"
    pq.write_table(table.set_column(1, "image_id", pa.array(ids)), tmp_path / "items.parquet")
    assert own_items_differ(tmp_path / "items.parquet", own) is None  # another task's row: its own check
    pq.write_table(table.slice(0, 30), tmp_path / "items.parquet")
    assert "(30 images, now 38)" in own_items_differ(tmp_path / "items.parquet", own)
