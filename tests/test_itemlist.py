"""The input list as columns (issue 25): an `ItemList` gives the items a list of `ImageItem`s would,
items.parquet's table from its columns matches the items one by one, placement and resume work on
it as masks, and the fast tar header path reads exactly what tarfile reads."""

from __future__ import annotations

import io
import os
import tarfile

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from shard_fixtures import encode, noise_images, rewrite_header, write_dataset, write_parquet, write_tar

from tagclip_cli import tarscan
from tagclip_cli.data import ImageDataset, Preprocess
from tagclip_cli.errors import ConfigMismatchError, UsageError
from tagclip_cli.fileio import output_text
from tagclip_cli.itemlist import ItemList, ItemShare, as_share
from tagclip_cli.jobs import parts
from tagclip_cli.jobs.parts import PartStore, items_table
from tagclip_cli.jobs.placement import Placement
from tagclip_cli.record import RunRecord
from tagclip_cli.sourcebase import IMAGE_EXTENSIONS, ImageItem
from tagclip_cli.sources import collect_items, list_folder, read_manifest, read_path_list


def table_of_objects(items) -> pa.Table:
    """items.parquet as the previous version built it: one ImageItem at a time."""
    return pa.table({
        "index": pa.array([it.index for it in items], pa.int64()),
        "image_id": pa.array([output_text(it.image_id) for it in items], pa.string()),
        "path": pa.array([output_text(it.path) for it in items], pa.string()),
        "coco_id": pa.array([it.coco_id for it in items], pa.int64()),
    })


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("inputs")
    images = noise_images(7)
    tars, folder = write_dataset(root, images, shards=3)
    (root / "mixed").mkdir()
    broken = write_tar(root / "mixed" / "00000.tar", [("a.png", encode(images[0])), ("a.txt", b"x"),
                                                       ("b.txt", b"no image"), ("c.png", encode(images[1]))])
    cut = root / "mixed" / "00001.tar"
    data = (tars / "00000.tar").read_bytes()
    cut.write_bytes(data[: len(data) * 2 // 3])
    (root / "pq").mkdir()
    write_parquet(root / "pq" / "train-00000.parquet", images, row_group_size=3)
    return root, folder, tars, broken.parent


def test_every_kind_as_columns_gives_the_items_and_the_table_of_the_items(inputs):
    root, folder, tars, mixed = inputs
    for items in (collect_items(str(folder)), collect_items(str(tars)), collect_items(str(mixed / "*.tar")),
                  collect_items(str(root / "pq"))):
        assert isinstance(items, ItemList)
        objects = list(items)
        assert [it.index for it in objects] == list(range(len(items)))
        assert items.table().equals(table_of_objects(objects))  # the columns' table is the items' table
        assert ItemList.of(objects) == objects == items  # and objects -> columns -> the same objects
        assert items[-1] == objects[-1] and items[1:3] == objects[1:3]
    failed = [it for it in collect_items(str(mixed / "*.tar")) if it.locator[0] == "error"]
    assert failed[0].image_id == "00000/b" and failed[-1].image_id == "00001/<unreadable>"  # no image; the cut


def test_path_lists_as_columns(tmp_path):
    lines = ["data/a.jpg\n", "\n", "data/./b.jpg\n", "c.jpg\r\n", f"{tmp_path}/data/d.jpg\n", "data/sub//e.png\n"]
    outside = f"{tmp_path}/data/d.jpg"  # absolute, not under ./data: an error, unless tmp_path is the cwd
    items = read_path_list([line for line in lines if line != f"{outside}\n"], "data")
    assert [(it.image_id, it.path) for it in items] == [
        ("a.jpg", "data/a.jpg"), ("b.jpg", "data/./b.jpg"), ("c.jpg", "data/c.jpg"), ("sub/e.png", "data/sub//e.png")]
    plain = read_path_list(["x.jpg\n", "y.jpg\n"])
    assert plain.paths is None and [it.path for it in plain] == ["x.jpg", "y.jpg"]  # the path is the id: stored once
    remote = read_path_list(["s3://b/imgs/a.jpg", "b.jpg"], "s3://b/imgs")
    assert [(it.image_id, it.path) for it in remote] == [("a.jpg", "s3://b/imgs/a.jpg"), ("b.jpg", "s3://b/imgs/b.jpg")]


def test_a_repeated_line_is_named_with_its_line_numbers_blank_lines_counted():
    with pytest.raises(UsageError, match=r"^list.txt:5: sub/../a.jpg was already listed on line 1$"):
        read_path_list(["data/a.jpg", "", "b.jpg", "  ", "sub/../a.jpg", "c.jpg", "b.jpg"], "data", "list.txt")
    with pytest.raises(UsageError, match=r"^-:4: b.jpg was already listed on line 2$"):
        read_path_list(["a.jpg", "b.jpg", "c.jpg", "b.jpg", "a.jpg"])
    with pytest.raises(UsageError, match=r"^-:2: a.jpg was already listed on line 1$"):
        read_path_list(["s3://b/r/a.jpg", "a.jpg"], "s3://b/r")


def test_a_folder_with_a_name_that_is_not_utf8(tmp_path):
    (tmp_path / "b.png").write_bytes(b"")
    (tmp_path / "a.png").write_bytes(b"")
    os.makedirs(tmp_path / "z")
    (tmp_path / "z" / "0.jpg").write_bytes(b"")
    raw = os.fsdecode(b"caf\xe9.png")
    (tmp_path / raw).write_bytes(b"")
    items = list_folder(tmp_path)
    assert [it.image_id for it in items] == ["a.png", "b.png", "caf\\xe9.png", "z/0.jpg"]
    assert items[2].path == str(tmp_path / raw)  # opened by its real name
    assert items.table().column("path")[2].as_py() == output_text(str(tmp_path / raw))
    sorted_names = list_folder(tmp_path / "z")
    assert [it.path for it in sorted_names] == [str(tmp_path / "z" / "0.jpg")]


def test_a_manifest_keeps_its_coco_ids(tmp_path):
    (tmp_path / "imgs").mkdir()
    (tmp_path / "m.json").write_text('{"images": [{"id": 9, "file_name": "x.jpg"}, {"id": 3, "file_name": "y.jpg"}]}')
    items = read_manifest(tmp_path / "m.json", tmp_path / "imgs")
    assert [(it.image_id, it.coco_id) for it in items] == [("9", 9), ("3", 3)]
    assert items.table().column("coco_id").to_pylist() == [9, 3]


def test_placement_masks_match_owns_item_by_item(inputs):
    _, folder, tars, _ = inputs
    for items in (collect_items(str(folder)), collect_items(str(tars)), list(collect_items(str(tars)))):
        for rank, world in ((0, 1), (0, 2), (1, 2), (2, 3)):
            p = Placement(rank=rank, world=world)
            assert p.owned(items, 2).tolist() == [p.owns(it, 2) for it in items]
            assert list(p.share(items, 2)) == [it for it in items if p.owns(it, 2)]  # built from the windows
    mixed = list(collect_items(str(tars)))[:4] + [ImageItem(i, f"p{i}", f"/p{i}") for i in range(4, 11)]
    columns = ItemList.of(mixed)
    for rank in range(3):
        p = Placement(rank=rank, world=3)
        assert list(p.share(columns, 2)) == [it for it in mixed if p.owns(it, 2)]


def test_remaining_and_the_dataset_keep_columns(inputs, tmp_path):
    _, folder, _, _ = inputs
    items = collect_items(str(folder))
    share = as_share(items)
    assert isinstance(share, ItemShare) and list(share) == list(items)
    store = PartStore.open(tmp_path / "out.parquet", RunRecord(), items, {"window": 4})
    store.write_part(pa.table({"index": pa.array([0, 2], pa.int64()), "status": ["ok", "failed"]}))
    todo = store.remaining(share, len(items))
    assert isinstance(todo, ItemShare) and [it.index for it in todo] == [1, 3, 4, 5, 6]
    dataset = ImageDataset(todo, Preprocess(16, (0.5,) * 3, (0.5,) * 3))
    assert dataset.items is todo and dataset[0].item == items[1]  # no list of objects made


def test_items_parquet_of_the_previous_version_resumes_and_a_change_is_named(inputs, tmp_path, monkeypatch):
    _, folder, _, _ = inputs
    items = collect_items(str(folder))
    out = tmp_path / "out.parquet"
    (tmp_path / "out.parquet.parts").mkdir()
    pq.write_table(table_of_objects(list(items)), tmp_path / "out.parquet.parts" / "items.parquet", compression="zstd")
    monkeypatch.setattr(parts, "ITEMS_SLICE", 3)  # compared in slices of three
    PartStore.open(out, RunRecord(), items, {"window": 4})  # the same list: accepted
    changed = list(items)
    changed[5] = ImageItem(5, "other.png", "/x/other.png")
    with pytest.raises(ConfigMismatchError, match=r"image #5: image_id"):
        PartStore.open(out, RunRecord(), changed, {"window": 4})
    fresh = tmp_path / "fresh.parquet"
    PartStore.open(fresh, RunRecord(), items, {"window": 4})  # written a slice at a time
    written = pq.read_table(tmp_path / "fresh.parquet.parts" / "items.parquet")
    assert written.equals(items_table(list(items))) and written.equals(table_of_objects(list(items)))


def member_tar(fmt: int) -> bytes:
    """A tar in the given format with long names (prefix / long-name records), a directory, links,
    empty members and non-ASCII names."""
    buffer = io.BytesIO()
    long_dir = "d" * 90 + "/" + "e" * 40
    with tarfile.open(fileobj=buffer, mode="w", format=fmt) as tar:
        def add(name: str, data: bytes = b"", kind: bytes = tarfile.REGTYPE, link: str = "") -> None:
            info = tarfile.TarInfo(name)
            info.size, info.type, info.linkname = (len(data) if kind == tarfile.REGTYPE else 0), kind, link
            tar.addfile(info, io.BytesIO(data) if kind == tarfile.REGTYPE else None)

        add("dir", kind=tarfile.DIRTYPE)
        add("dir/0001.jpg", b"x" * 700)
        add("dir/0001.json", b"{}")
        add(f"{long_dir}/0002.png", b"y" * 513)
        add("0003.jpg", b"")
        add("0004.jpg", kind=tarfile.LNKTYPE, link="dir/0001.jpg")
        add("caf\u00e9/0005.webp", b"z" * 1024)
        add("0006.txt", b"caption only")
    return buffer.getvalue()


@pytest.mark.parametrize("fmt", [tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT])
def test_the_fast_header_path_reads_what_tarfile_reads(fmt, monkeypatch):
    data = member_tar(fmt)
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        third = tar.getmembers()[2].offset
    variants = [data, data[: len(data) // 2], rewrite_header(data, third, checksum=False),
                rewrite_header(data, third, size=1 << 40), data[:third] + b"\0" * 512 + data[third + 512:]]

    def scan(blob: bytes):
        return tarscan.scan_tar(io.BytesIO(blob), len(blob), "t.tar", IMAGE_EXTENSIONS)

    fast = [scan(blob) for blob in variants]
    monkeypatch.setattr(tarscan, "_plain_member", lambda block, cursor: None)  # tarfile for every header
    assert fast == [scan(blob) for blob in variants]
    assert [s.key for s in fast[0][0]][:3] == ["dir/0001", "d" * 90 + "/" + "e" * 40 + "/0002", "0003"]


def test_an_empty_list_and_a_sparse_share():
    assert len(ItemList.of([])) == 0 and ItemList.of([]).table().num_rows == 0
    some = [ImageItem(3, "d", "/d"), ImageItem(7, "h", "/h")]
    share = as_share(some)
    assert list(share) == some and share.positions.tolist() == [3, 7]
    assert [it.index for it in share.take(np.array([7]))] == [7]


@pytest.mark.parametrize("text", [
    "a.jpg\r\nb c.jpg \n\n  \nd.png\re.png\r\rf\x1cg.jpg\n\x1c\n\u3000\nlast.webp",
    "x.jpg\ny.jpg\n",
    "\ufeffbom.jpg\nz.jpg\n",  # read line by line (Arrow drops the mark)
    "s.tar\nt.tar\n",  # a list of shards: read as before
    "one\x1ftwo.jpg\n",  # the reader's delimiter: read line by line
])
def test_a_path_list_file_read_by_arrow_gives_what_reading_its_lines_gives(tmp_path, text):
    from tagclip_cli.sources import _path_list_column

    path = tmp_path / "list.txt"
    path.write_bytes(text.encode())
    with open(path, encoding="utf-8") as fh:
        expected = list(read_path_list(fh, None, str(path)))
    fast = _path_list_column(str(path))
    if fast is not None:
        assert list(fast) == expected
    if text.startswith(("\ufeff", "s.tar", "one")):
        assert fast is None
    if text.startswith("x.jpg"):
        assert fast is not None and fast.ids.num_chunks >= 1
    listed = collect_items(str(path)) if not text.startswith("s.tar") else None
    assert listed is None or list(listed) == expected


def test_a_repeat_in_a_path_list_file_is_named_by_both_readers(tmp_path):
    path = tmp_path / "list.txt"
    path.write_text("a.jpg\n\n \nb.jpg\na.jpg\n")
    with pytest.raises(UsageError, match=rf"^{path}:5: a.jpg was already listed on line 1$"):
        collect_items(str(path))


@pytest.mark.parametrize("lines, folder", [
    (["/data/set/é/a.jpg", "/data/set/é/b.jpg", "/data/set/ë/c.jpg", "/data/set/"], "/data/set/"),
    (["/data/set/a.jpg", "/data/setx.jpg"], "/data/"),
    (["rel/a.jpg", "other.jpg"], ""),
    (["/one/only.jpg"], "/one/"),
])
def test_a_path_list_is_held_after_the_folder_its_lines_share(tmp_path, lines, folder):
    from tagclip_cli.sources import _path_list_column

    path = tmp_path / "list.txt"
    path.write_text("".join(f"{line}\n" for line in lines), encoding="utf-8")
    expected = list(read_path_list(lines, None, str(path)))
    fast = _path_list_column(str(path))
    assert fast.id_prefix == folder and fast.ids[0].as_py() == lines[0][len(folder):]
    assert list(fast) == expected and fast.table().equals(ItemList.of(expected).table())
    fast.keep(np.array([len(lines) - 1]), (1, 2, 1))  # a share of it keeps the prefix
    assert fast[len(lines) - 1] == expected[-1] and len(fast.ids) == 1
    if len(lines) > 1:
        with pytest.raises(IndexError, match="not in the share"):
            fast[0]


def test_keep_holds_the_rows_of_a_share_of_every_kind(inputs):
    root, folder, tars, mixed = inputs
    for source in (folder, tars, mixed, root / "pq"):
        items = collect_items(str(source))
        total, positions = len(items), np.arange(1, len(items), 2)
        expected = [items[int(p)] for p in positions]
        errors = {p: e for p, e in items.errors.items() if p % 2}
        items.keep(positions, (1, 2, 1))
        assert len(items) == total and len(items.ids) == len(positions) and items.errors == errors
        assert [items[int(p)] for p in positions] == expected
        assert list(items.take(positions)) == expected
