"""sources.py: WebDataset tar shards, Parquet with image bytes, remote inputs (a real S3 API on
loopback: moto's server), bad shards; and reading each item's bytes as data.py decodes them."""

from __future__ import annotations

import json
import logging
import os
import tarfile

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from shard_fixtures import (
    add_member,
    encode,
    link_member,
    moto_s3,
    noise_images,
    rewrite_header,
    s3fs_client,
    tar_layout,
    write_dataset,
    write_parquet,
    write_tar,
)

from tagclip_cli.data import ImageDataset, Preprocess
from tagclip_cli.errors import UsageError
from tagclip_cli.jobs.placement import Placement
from tagclip_cli.shardsources import read_bytes
from tagclip_cli.sources import ParquetColumns, collect_items, list_tars

PRE = Preprocess(16, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))


def decoded(items):
    return list(ImageDataset(items, PRE, keep_rgb=True))


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """10 images as 3 tar shards and as a folder of the same files."""
    root = tmp_path_factory.mktemp("wds")
    images = noise_images(10)
    tars, folder = write_dataset(root, images, shards=3)
    return images, tars, folder


# ---- tar shards -----------------------------------------------------------------------------------

def test_tar_samples_are_grouped_by_key_and_read_like_the_folder(dataset):
    images, tars, folder = dataset
    items = collect_items(str(tars / "{00000..00002}.tar"))
    assert [it.image_id for it in items][:5] == ["00000/0000000", "00000/0000001", "00000/0000002",
                                                  "00000/0000003", "00001/0010000"]
    assert [it.index for it in items] == list(range(10))
    assert [it.shard_index for it in items] == [0] * 4 + [1] * 4 + [2] * 2
    assert items[0].path == f"tar://0000000.png::{tars / '00000.tar'}"
    flat = collect_items(str(folder))
    for tar_image, file_image, arr in zip(decoded(items), decoded(flat), images, strict=True):
        assert tar_image.error is None
        assert np.array_equal(tar_image.rgb, arr)
        assert tar_image.pixels.equal(file_image.pixels)


def test_every_way_of_naming_the_shards_lists_the_same(dataset, tmp_path):
    _, tars, _ = dataset
    pattern = collect_items(str(tars / "{00000..00002}.tar"))
    (tmp_path / "urls.txt").write_text("".join(f"{tars / f'{s:05d}.tar'}\n" for s in range(3)))
    assert collect_items(str(tars)) == pattern  # a folder of tars
    assert collect_items(str(tmp_path / "urls.txt")) == pattern  # a text file listing tar URLs
    assert collect_items(str(tars / "0000*.tar")) == pattern  # a glob
    single = collect_items(str(tars / "00001.tar"))
    assert [it.image_id for it in single] == ["00001/0010000", "00001/0010001", "00001/0010002", "00001/0010003"]


def test_webdataset_keys_first_image_member_and_other_members_ignored(tmp_path):
    red, blue = encode(np.full((16, 16, 3), 200, np.uint8)), encode(np.zeros((16, 16, 3), np.uint8))
    tar = write_tar(tmp_path / "s.tar", [
        ("sub/a.json", b"{}"), ("sub/a.seg.png", red), ("sub/a.png", blue),  # key sub/a: first image member
        ("b.txt", b"caption"), ("b.jpg", blue),
        ("c.json", b"{}"),  # a sample without an image: a failed row saying so
    ])
    items = collect_items(str(tar))
    assert [it.image_id for it in items] == ["s/sub/a", "s/b", "s/c"]
    out = decoded(items)
    assert out[0].rgb[0, 0].tolist() == [200, 200, 200]
    assert out[1].error is None
    assert out[2].error.startswith("no image in this sample of") and "c.json" in out[2].error


def test_duplicated_key_in_a_shard_keeps_both_and_warns(tmp_path, caplog):
    one, two = encode(np.full((16, 16, 3), 10, np.uint8)), encode(np.full((16, 16, 3), 90, np.uint8))
    tar = write_tar(tmp_path / "d.tar", [("k.png", one), ("x.png", one), ("k.png", two)])
    with caplog.at_level(logging.WARNING, logger="tagclip_cli"):
        items = collect_items(str(tar))
    assert [it.image_id for it in items] == ["d/k", "d/x", "d/k#2"]
    assert [im.rgb[0, 0, 0] for im in decoded(items)] == [10, 10, 90]
    assert "key d/k appears 2 times; kept as d/k#2" in caplog.text


def test_truncated_tar_keeps_the_samples_read_and_fails_the_rest_naming_the_shard(tmp_path, caplog):
    members = [(f"{k:03d}.png", encode(arr)) for k, arr in enumerate(noise_images(6, seed=3))]
    full = write_tar(tmp_path / "full.tar", members).read_bytes()
    cut = tmp_path / "cut.tar"
    cut.write_bytes(full[: len(full) // 2])
    with caplog.at_level(logging.WARNING, logger="tagclip_cli"):
        items = collect_items(str(cut))
    out = decoded(items)
    good = [im for im in out if im.error is None]
    assert 1 <= len(good) < 6 and [im.item.image_id for im in good] == [f"cut/{k:03d}" for k in range(len(good))]
    assert out[-1].error is not None and "truncated" in out[-1].error and str(cut) in out[-1].error
    assert "truncated" in caplog.text and "\n" not in out[-1].error


def test_tar_cut_at_a_header_boundary_is_truncated_too(tmp_path):
    members = [(f"{k:03d}.png", encode(arr)) for k, arr in enumerate(noise_images(3, seed=4))]
    full = write_tar(tmp_path / "full.tar", members).read_bytes()
    with tarfile.open(tmp_path / "full.tar") as tar:
        second = tar.getmembers()[1].offset  # where the second member's header starts
    (tmp_path / "cut.tar").write_bytes(full[:second])
    items = collect_items(str(tmp_path / "cut.tar"))
    out = decoded(items)
    assert [im.item.image_id for im in out] == ["cut/000", "cut/<unreadable>"]
    assert out[0].error is None and "truncated tar shard" in out[1].error and "end-of-archive" in out[1].error
    assert len(collect_items(str(tmp_path / "full.tar"))) == 3  # a whole tar is not


def test_a_member_that_is_not_an_image_is_a_failed_row(tmp_path):
    tar = write_tar(tmp_path / "t.tar", [("a.jpg", b"<html>not found</html>"), ("b.png", encode(noise_images(1)[0]))])
    out = decoded(collect_items(str(tar)))
    assert out[0].error == "not an image (the file is HTML/XML text)" and out[1].error is None


def test_a_shard_that_vanishes_mid_run_fails_its_rows(dataset, tmp_path):
    _, tars, _ = dataset
    copy = tmp_path / "gone.tar"
    copy.write_bytes((tars / "00000.tar").read_bytes())
    items = collect_items(str(copy))
    copy.unlink()
    out = decoded(items)
    assert all(im.error and "cannot read tar shard" in im.error and str(copy) in im.error for im in out)


def test_nothing_listable_is_a_usage_error(tmp_path):
    with pytest.raises(UsageError, match=r"cannot read tar shard .*nope-0\.tar.*\(and the 1 other shards\)"):
        collect_items(str(tmp_path / "nope-{0..1}.tar"))
    good = write_tar(tmp_path / "ok-0.tar", [("a.png", encode(noise_images(1)[0]))])
    items = collect_items(str(tmp_path / "ok-{0..1}.tar"))  # one of two exists: a failed row for the other
    assert [it.image_id for it in items] == ["ok-0/a", "ok-1/<unreadable>"]
    assert decoded(items)[1].error.startswith("cannot read tar shard") and good.exists()


def test_placement_splits_tar_inputs_by_shard(dataset):
    _, tars, _ = dataset
    items = collect_items(str(tars))
    for world in (2, 3):
        owners = [[r for r in range(world) if Placement(rank=r, world=world).owns(it, 4)] for it in items]
        assert all(len(o) == 1 for o in owners)
        by_shard = {}
        for it, (owner,) in zip(items, owners, strict=True):
            assert by_shard.setdefault(it.shard_index, owner) == owner  # one shard, one process


# ---- damaged tar shards: every sample a row, damage stepped over and reported --------------------

@pytest.fixture(scope="module")
def nine(tmp_path_factory):
    """A sound tar of 9 samples (`00K.png` + `00K.json`): its bytes, its layout, the images."""
    root = tmp_path_factory.mktemp("nine")
    images = noise_images(9, seed=7)
    members = []
    for k, arr in enumerate(images):
        members += [(f"{k:03d}.png", encode(arr)), (f"{k:03d}.json", b'{"k": %d}' % k)]
    path = write_tar(root / "nine.tar", members)
    return path.read_bytes(), tar_layout(path), images


def damaged(tmp_path, name: str, data: bytes, caplog):
    """(ok ids, {failed id: reason}, pixels by id) of a damaged shard, and the warning text."""
    (tmp_path / name).write_bytes(data)
    with caplog.at_level(logging.WARNING, logger="tagclip_cli"):
        out = decoded(collect_items(str(tmp_path / name)))
    ok = [im.item.image_id for im in out if im.error is None]
    failed = {im.item.image_id: im.error for im in out if im.error is not None}
    assert all("\n" not in e for e in failed.values())
    return ok, failed, {im.item.image_id: im.rgb for im in out if im.error is None}


def header(layout, name: str) -> int:
    return next(h for n, h, _ in layout if n == name)


def test_cut_in_the_data_after_a_complete_image_keeps_that_sample(nine, tmp_path, caplog):
    data, layout, images = nine
    json1 = next(d for n, _, d in layout if n == "001.json")
    ok, failed, pixels = damaged(tmp_path, "cut.tar", data[:json1 + 3], caplog)  # inside 001.json's data
    assert ok == ["cut/000", "cut/001"] and np.array_equal(pixels["cut/001"], images[1])
    assert list(failed) == ["cut/<unreadable>"]
    assert failed["cut/<unreadable>"] == (f"truncated tar shard {tmp_path / 'cut.tar'}: the file ends at byte "
                                          f"{json1 + 3} inside 001.json (header at byte {header(layout, '001.json')};"
                                          " any members after it are lost)")
    assert failed["cut/<unreadable>"] in caplog.text


def test_cut_in_an_image_fails_that_sample_and_the_rest_of_the_shard(nine, tmp_path, caplog):
    data, layout, _ = nine
    png2 = next(d for n, _, d in layout if n == "002.png")
    ok, failed, _ = damaged(tmp_path, "cut.tar", data[:png2 + 100], caplog)
    assert ok == ["cut/000", "cut/001"] and list(failed) == ["cut/002", "cut/<unreadable>"]
    assert failed["cut/002"].startswith(f"truncated tar shard {tmp_path / 'cut.tar'}: 002.png is cut off at byte "
                                        f"{png2 + 100} (it declares ")
    assert "inside 002.png" in failed["cut/<unreadable>"]


def test_cut_inside_a_header_or_in_the_last_padding(nine, tmp_path, caplog):
    data, layout, _ = nine
    at = header(layout, "003.png")
    ok, failed, _ = damaged(tmp_path, "cut.tar", data[:at + 100], caplog)
    assert ok == ["cut/000", "cut/001", "cut/002"] and list(failed) == ["cut/<unreadable>"]
    assert f"the file ends inside a header at byte {at}" in failed["cut/<unreadable>"]
    ok, failed, _ = damaged(tmp_path, "pad.tar", data[:at - 10], caplog)  # 002.json's data whole, padding cut
    assert ok == ["pad/000", "pad/001", "pad/002"]
    assert f"the file ends at byte {at - 10} without the end-of-archive marker" in failed["pad/<unreadable>"]


@pytest.mark.parametrize("size", [8 << 30, -5], ids=["8GiB", "negative"])
def test_a_damaged_size_field_loses_one_member_and_the_scan_reads_on(nine, tmp_path, caplog, size):
    data, layout, images = nine
    at = header(layout, "004.png")
    ok, failed, pixels = damaged(tmp_path, "bad.tar", rewrite_header(data, at, size=size), caplog)  # base-256 field
    assert ok == [f"bad/{k:03d}" for k in range(9) if k != 4]
    assert all(np.array_equal(pixels[f"bad/{k:03d}"], images[k]) for k in range(9) if k != 4)
    after = header(layout, "004.json")
    shard_line = failed.pop("bad/<unreadable>")
    assert shard_line.startswith(f"damaged tar shard {tmp_path / 'bad.tar'}: ")
    assert f"at byte {at} (members lost up to the next valid header, at byte {after})" in shard_line
    if size > 0:  # the header verifies: its sample fails naming the size
        assert failed == {"bad/004": f"damaged tar shard {tmp_path / 'bad.tar'}: 004.png declares {8 << 30} bytes, "
                                     f"past the end of the file at byte {len(data)}"}
    else:  # the header is unusable: its sample is what follows it (004.json), without an image
        assert "a header declaring a negative size (-5)" in shard_line
        assert failed == {"bad/004": f"no image in this sample of {tmp_path / 'bad.tar'} (004.json)"}
    assert shard_line in caplog.text


def test_a_bad_checksum_mid_shard_is_stepped_over_and_reported(nine, tmp_path, caplog):
    data, layout, _ = nine
    blob = rewrite_header(rewrite_header(data, header(layout, "003.png"), checksum=False),
                          header(layout, "006.json"), checksum=False)
    ok, failed, _ = damaged(tmp_path, "sum.tar", blob, caplog)
    assert ok == [f"sum/{k:03d}" for k in range(9) if k != 3]  # 006 lost only its json
    assert failed["sum/003"] == f"no image in this sample of {tmp_path / 'sum.tar'} (003.json)"
    assert failed["sum/<unreadable>"] == (
        f"damaged tar shard {tmp_path / 'sum.tar'}: a header with a bad checksum at byte {header(layout, '003.png')} "
        f"(members lost up to the next valid header, at byte {header(layout, '003.json')}); a header with a bad "
        f"checksum at byte {header(layout, '006.json')} (members lost up to the next valid header, at byte "
        f"{header(layout, '007.png')})")
    assert len(failed) == 2


def test_concatenated_tars_are_read_whole_without_a_failed_row(nine, tmp_path, caplog):
    data, _, _ = nine
    ok, failed, _ = damaged(tmp_path, "twice.tar", data + data, caplog)
    assert len(ok) == 18 and not failed


def test_a_file_that_is_no_tar_is_a_usage_error_saying_so(nine, tmp_path):
    import gzip

    data, _, _ = nine
    (tmp_path / "gz.tar").write_bytes(gzip.compress(data))
    with pytest.raises(UsageError, match=r"gz\.tar: not a tar file \(gzip-compressed data \(compressed tar shards "
                                         r"are not supported"):
        collect_items(str(tmp_path / "gz.tar"))
    (tmp_path / "empty.tar").write_bytes(b"")
    with pytest.raises(UsageError, match=r"empty\.tar: empty file \(0 bytes\), not a tar"):
        collect_items(str(tmp_path / "empty.tar"))


def test_links_are_read_from_their_target_inside_the_shard_and_never_outside(tmp_path):
    a, b = noise_images(2, seed=8)
    outside = tmp_path / "outside.png"
    outside.write_bytes(encode(b))  # a readable image the links must not reach
    with tarfile.open(tmp_path / "links.tar", "w") as tar:
        add_member(tar, "img/a.png", encode(a))
        link_member(tar, "img/hard.png", "img/a.png", hard=True)
        link_member(tar, "img/sym.png", "a.png", hard=False)  # relative to its folder
        link_member(tar, "img/chain.png", "sym.png", hard=False)
        link_member(tar, "img/ahead.png", "later.png", hard=False)  # target further on
        add_member(tar, "img/later.png", encode(b))
        link_member(tar, "abs.png", str(outside), hard=False)
        link_member(tar, "up.png", "../outside.png", hard=False)
        link_member(tar, "hardabs.png", str(outside), hard=True)
        link_member(tar, "dangling.png", "img/none.png", hard=False)
        link_member(tar, "loop1.png", "loop2.png", hard=False)
        link_member(tar, "loop2.png", "loop1.png", hard=False)
    out = {im.item.image_id: im for im in decoded(collect_items(str(tmp_path / "links.tar")))}
    for name in ("hard", "sym", "chain", "a"):
        assert out[f"links/img/{name}"].error is None and np.array_equal(out[f"links/img/{name}"].rgb, a), name
    assert np.array_equal(out["links/img/ahead"].rgb, b)
    shard = tmp_path / "links.tar"
    assert out["links/abs"].error == f"abs.png is a symbolic link to {outside}, outside the tar shard (not read)"
    assert out["links/up"].error == "up.png is a symbolic link to ../outside.png, outside the tar shard (not read)"
    assert out["links/hardabs"].error == f"hardabs.png is a hard link to {outside}, outside the tar shard (not read)"
    assert out["links/dangling"].error == f"link dangling.png -> img/none.png: no such regular member in {shard}"
    assert out["links/loop1"].error == f"link loop1.png -> loop2.png: a chain of links too long in {shard}"
    assert len(out) == 12


def test_compressed_shards_are_refused_at_listing_naming_the_shard(dataset, tmp_path):
    import gzip

    _, tars, _ = dataset
    folder = tmp_path / "mixed"
    folder.mkdir()
    (folder / "a.tar").write_bytes((tars / "00000.tar").read_bytes())
    (folder / "b.tar.gz").write_bytes(gzip.compress((tars / "00001.tar").read_bytes()))
    (tmp_path / "c.tgz").write_bytes((folder / "b.tar.gz").read_bytes())
    (tmp_path / "urls.txt").write_text(f"{folder / 'a.tar'}\n{folder / 'b.tar.gz'}\n")
    refused = "compressed tar shards are not supported; decompress them to .tar first"
    for given, named in ((folder, "b.tar.gz"), (folder / "b.tar.gz", "b.tar.gz"), (tmp_path / "c.tgz", "c.tgz"),
                         (tmp_path / "urls.txt", "b.tar.gz"), (folder / "*", "b.tar.gz")):
        with pytest.raises(UsageError, match=f"{named}: {refused}"):
            collect_items(str(given))


# ---- Parquet --------------------------------------------------------------------------------------

def test_hugging_face_parquet_in_row_groups(tmp_path):
    images = noise_images(10, seed=5)
    path = write_parquet(tmp_path / "train-00000.parquet", images, row_group_size=3, style="hf")
    items = collect_items(str(path))  # auto-detected from the extension
    assert [it.image_id for it in items] == [f"train-00000/{i}" for i in range(10)]  # no key column: row number
    assert [it.locator[1:3] for it in items[2:5]] == [(0, 2), (1, 0), (1, 1)]
    assert [it.shard_index for it in items] == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3]  # work split by row group
    out = decoded(items)
    assert all(np.array_equal(im.rgb, arr) for im, arr in zip(out, images, strict=True))
    # the same via --images-parquet with a glob, and an explicit id column
    again = collect_items(None, images_parquet=str(tmp_path / "*.parquet"), columns=ParquetColumns(id="label"))
    assert [it.image_id for it in again] == [f"train-00000/{i}" for i in range(10)]


def test_img2dataset_parquet_key_and_jpg_columns(tmp_path):
    images = noise_images(5, seed=6)
    write_parquet(tmp_path / "00000.parquet", images[:3], style="img2dataset")
    write_parquet(tmp_path / "00001.parquet", images[3:], style="img2dataset")
    items = collect_items(None, images_parquet=str(tmp_path / "{00000,00001}.parquet"))
    assert [it.image_id for it in items] == ["00000/000000000", "00000/000000001", "00000/000000002",
                                             "00001/000000000", "00001/000000001"]
    assert [it.shard_index for it in items] == [0, 0, 0, 1, 1]
    assert all(np.array_equal(im.rgb, arr) for im, arr in zip(decoded(items), images, strict=True))
    assert collect_items(str(tmp_path)) == items  # a folder of Parquet files


def test_parquet_without_the_image_column_names_its_columns(tmp_path):
    path = tmp_path / "meta.parquet"
    pq.write_table(pa.table({"url": ["http://x/1.jpg"], "caption": ["a cat"]}), path)
    with pytest.raises(UsageError, match=r"meta\.parquet: no 'image' or 'jpg' column; its columns are: url, "
                                         r"caption \(choose with --image-column\)"):
        collect_items(str(path))
    with pytest.raises(UsageError, match="no --image-column picture; its columns are: url, caption"):
        collect_items(None, images_parquet=str(path), columns=ParquetColumns(image="picture"))
    with pytest.raises(UsageError, match="column 'caption' holds string, not image bytes"):
        collect_items(None, images_parquet=str(path), columns=ParquetColumns(image="caption"))


def test_parquet_null_image_and_duplicate_keys(tmp_path, caplog):
    data = encode(noise_images(1)[0])
    pq.write_table(pa.table({"key": ["a", "a", "b"], "jpg": pa.array([data, data, None], pa.binary())}),
                   tmp_path / "p.parquet")
    with caplog.at_level(logging.WARNING, logger="tagclip_cli"):
        items = collect_items(str(tmp_path / "p.parquet"))
    assert [it.image_id for it in items] == ["p/a", "p/a#2", "p/b"]
    assert "kept as p/a#2" in caplog.text
    out = decoded(items)
    assert out[0].error is None and out[1].error is None and out[2].error.startswith("no image bytes in this row")


def corrupt_chunk(path, group: int, column: int) -> None:
    """Overwrite the page header of one column chunk of a Parquet file (its footer stays sound)."""
    chunk = pq.ParquetFile(path).metadata.row_group(group).column(column)
    data = bytearray(path.read_bytes())
    data[chunk.data_page_offset:chunk.data_page_offset + 16] = b"\xff" * 16
    path.write_bytes(bytes(data))


def test_damaged_parquet_row_groups_fail_their_rows_and_the_others_are_read(tmp_path, caplog):
    images = noise_images(9, seed=9)
    path = write_parquet(tmp_path / "p.parquet", images, row_group_size=3, style="img2dataset")
    corrupt_chunk(path, 1, 0)  # the ids of rows 3-5
    corrupt_chunk(path, 2, 1)  # the images of rows 6-8
    with caplog.at_level(logging.WARNING, logger="tagclip_cli"):
        out = decoded(collect_items(str(path)))
    assert [im.item.image_id for im in out] == [f"p/{i:09d}" for i in range(3)] + [f"p/{i}" for i in range(3, 6)] + [
        f"p/{i:09d}" for i in range(6, 9)]
    assert [im.error is None for im in out] == [True] * 3 + [False] * 6
    assert all(np.array_equal(im.rgb, arr) for im, arr in zip(out[:3], images, strict=False))
    assert all(im.error.startswith(f"cannot read row group 1 of Parquet file {path} (") for im in out[3:6])
    assert all(im.error.startswith(f"cannot read Parquet file {path} (") for im in out[6:])
    assert f"cannot read row group 1 of Parquet file {path}" in caplog.text


def test_an_unreadable_parquet_file_among_others_is_one_failed_row(tmp_path, caplog):
    write_parquet(tmp_path / "a.parquet", noise_images(2, seed=10), style="img2dataset")
    (tmp_path / "b.parquet").write_bytes(b"PAR1 this is not Parquet")
    with caplog.at_level(logging.WARNING, logger="tagclip_cli"):
        items = collect_items(None, images_parquet=str(tmp_path / "{a,b,c}.parquet"))
    assert [it.image_id for it in items] == ["a/000000000", "a/000000001", "b/<unreadable>", "c/<unreadable>"]
    assert [it.shard_index for it in items] == [0, 0, 1, 2]
    out = decoded(items)
    assert out[2].error.startswith(f"{tmp_path / 'b.parquet'}: cannot read as Parquet (")
    assert out[3].error == f"{tmp_path / 'c.parquet'}: no such file" and out[3].error in caplog.text
    with pytest.raises(UsageError, match=r"b\.parquet: cannot read as Parquet .*\(and the 1 other files\)"):
        collect_items(None, images_parquet=str(tmp_path / "{b,c}.parquet"))


def test_a_folder_of_images_says_it_leaves_shards_beside_them_out(dataset, tmp_path, caplog):
    _, tars, _ = dataset
    (tmp_path / "x.png").write_bytes(encode(noise_images(1)[0]))
    (tmp_path / "y.tar").write_bytes((tars / "00000.tar").read_bytes())
    with caplog.at_level(logging.WARNING, logger="tagclip_cli"):
        items = collect_items(str(tmp_path))
    assert [it.image_id for it in items] == ["x.png"]
    assert f"{tmp_path} holds images and 1 tar / Parquet file(s) (e.g. y.tar); only the images are read" in caplog.text


# ---- remote: a real S3 API on loopback ------------------------------------------------------------

@pytest.fixture(scope="module")
def s3(dataset, tmp_path_factory):
    """moto's S3 server with a bucket holding the shards, the folder, a Parquet file and a manifest."""
    images, tars, folder = dataset
    extra = tmp_path_factory.mktemp("s3data")
    with moto_s3() as endpoint:
        fs = s3fs_client()
        fs.mkdir("bucket")
        fs.put(str(tars) + "/", "bucket/tars/", recursive=True)
        fs.put(str(folder) + "/", "bucket/folder/", recursive=True)
        fs.put(str(write_parquet(extra / "hf.parquet", images, row_group_size=4)), "bucket/pq/hf.parquet")
        names = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*.png"))
        manifest = {"images": [{"id": i + 1, "file_name": n} for i, n in enumerate(names)]}
        fs.pipe("bucket/coco.json", json.dumps(manifest).encode())
        fs.pipe("bucket/list.txt", "".join(f"s3://bucket/folder/{n}\n" for n in names).encode())
        yield endpoint


def test_s3_every_input_kind_reads_the_same_pixels(s3, dataset):
    images, tars, folder = dataset
    local = [im.pixels for im in decoded(collect_items(str(folder)))]
    remote_tars = collect_items("s3://bucket/tars/{00000..00002}.tar")
    assert [it.image_id for it in remote_tars] == [it.image_id for it in collect_items(str(tars))]
    kinds = {
        "tars": remote_tars,
        "tar folder": collect_items("s3://bucket/tars/"),
        "folder": collect_items("s3://bucket/folder"),
        "path list": collect_items("s3://bucket/list.txt"),
        "manifest": collect_items(None, manifest="s3://bucket/coco.json", image_root="s3://bucket/folder"),
        "parquet": collect_items(None, images_parquet="s3://bucket/pq/*.parquet"),
    }
    assert [it.image_id for it in kinds["folder"]][:2] == ["00000/0000000.png", "00000/0000001.png"]
    for kind, items in kinds.items():
        out = decoded(items)
        assert [im.error for im in out] == [None] * 10, kind
        assert all(a.equal(b) for a, b in zip((im.pixels for im in out), local, strict=True)), kind


def test_s3_missing_bucket_or_key_is_a_usage_error(s3):
    with pytest.raises(UsageError, match="cannot read tar shard s3://no-such-bucket/0.tar"):
        collect_items("s3://no-such-bucket/{0..1}.tar")
    with pytest.raises(UsageError, match="s3://no-such-bucket/images: no such file or directory"):
        collect_items("s3://no-such-bucket/images")
    with pytest.raises(UsageError, match=r"s3://bucket/pq/none\.parquet: no such file"):
        collect_items(None, images_parquet="s3://bucket/pq/none.parquet")


def test_s3_shard_deleted_after_listing_fails_its_rows(s3, dataset):
    _, tars, _ = dataset
    fs = s3fs_client()
    fs.put(str(tars / "00002.tar"), "bucket/vanish/00002.tar")
    items = list_tars(["s3://bucket/vanish/00002.tar"])
    fs.rm("bucket/vanish/00002.tar")
    out = decoded(items)
    assert len(out) == 2 and all("cannot read tar shard s3://bucket/vanish/00002.tar" in im.error for im in out)
    assert os.environ["AWS_SECRET_ACCESS_KEY"] not in " ".join(im.error for im in out)


def test_a_remote_tar_is_listed_by_ranged_reads_of_its_headers(tmp_path):
    """Counted by the server: a shard of large members costs its headers (a small fraction of it),
    one of small members a few large reads (not one request per member); both list as the same
    file does locally, and the images still read whole."""
    rng = np.random.default_rng(5)
    shards = {"large": [(f"{i:05d}.{ext}", rng.bytes(90_000) if ext == "jpg" else b"{}") for i in range(60)
                        for ext in ("jpg", "json")],
              "small": [(f"{i:05d}.{ext}", rng.bytes(900) if ext == "jpg" else b"{}") for i in range(400)
                        for ext in ("jpg", "json")]}
    from s3fs import S3FileSystem

    served: list[tuple[str, str, int]] = []
    S3FileSystem.clear_instance_cache()  # list_tars's filesystem must talk to this server, and later ones not
    with moto_s3(served):
        fs = s3fs_client()
        fs.mkdir("ranged")  # moto's buckets live as long as the process
        for name, members in shards.items():
            local = write_tar(tmp_path / f"{name}.tar", members)
            fs.put(str(local), f"ranged/{name}.tar")
            served.clear()
            remote = list_tars([f"s3://ranged/{name}.tar"])
            gets = [n for method, path, n in served if method == "GET" and path.endswith(f"/{name}.tar")]
            listed = list_tars([str(local)])
            assert [(it.image_id, it.locator, it.path.split("::")[0]) for it in remote] == \
                [(it.image_id, it.locator, it.path.split("::")[0]) for it in listed]
            size = local.stat().st_size
            if name == "large":  # about one small read per sample, at the headers
                assert 60 <= len(gets) <= 62 and sum(gets) < size // 10, (len(gets), sum(gets), size)
                assert read_bytes(remote.item(59)) == members[118][1]  # reading an image reads its data
            else:  # read through in a few growing reads
                assert 1 <= len(gets) <= 6 and sum(gets) >= size - 10_240, (len(gets), sum(gets), size)
    S3FileSystem.clear_instance_cache()


def test_unreachable_url_is_a_usage_error_before_any_work():
    from shard_fixtures import free_port

    url = f"http://127.0.0.1:{free_port()}/shards/{{0..1}}.tar"  # nothing listens there
    with pytest.raises(UsageError, match=r"cannot read tar shard http://127\.0\.0\.1:\d+/shards/0\.tar"):
        collect_items(url)
