"""data.py sources (folder, COCO manifest, path lists, stdin) and the loader's size bucketing."""

from __future__ import annotations

import io
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from tagclip_cli.data import DecodedImage, ImageDataset, Preprocess, bucket_batches, iter_records, load_rgb
from tagclip_cli.errors import UsageError
from tagclip_cli.sources import ImageItem, collect_items, list_folder, read_manifest, read_path_list


def touch_images(root, names):
    for name in names:
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (20, 10), (255, 0, 0)).save(path)


# ---- sources --------------------------------------------------------------------------------------

def test_folder_is_recursive_and_sorted(tmp_path):
    touch_images(tmp_path, ["b.png", "a/z.jpg", "a/b/c.png", "C.JPG"])
    (tmp_path / "notes.txt").write_text("x")
    items = list_folder(tmp_path)
    assert [it.image_id for it in items] == ["C.JPG", "a/b/c.png", "a/z.jpg", "b.png"]
    assert [it.index for it in items] == [0, 1, 2, 3]
    assert items[1].path == str(tmp_path / "a/b/c.png") and items[1].coco_id is None


def test_manifest_ids_and_order(tmp_path):
    touch_images(tmp_path / "imgs", ["x.jpg", "sub/y.jpg"])
    manifest = tmp_path / "instances.json"
    manifest.write_text(json.dumps({"images": [{"id": 42, "file_name": "sub/y.jpg", "width": 20},
                                               {"id": 7, "file_name": "x.jpg"}], "annotations": []}))
    items = read_manifest(manifest, tmp_path / "imgs")
    assert items == [ImageItem(0, "42", str(tmp_path / "imgs/sub/y.jpg"), 42),
                     ImageItem(1, "7", str(tmp_path / "imgs/x.jpg"), 7)]


@pytest.mark.parametrize(
    "doc, message",
    [
        ({"annotations": []}, "no 'images' list"),
        ({"images": [{"id": 1}]}, r"images\[0\] has no 'id' and 'file_name'"),
        ({"images": [{"id": "1", "file_name": "a.jpg"}]}, "integer 'id'"),
        ({"images": [{"id": 1, "file_name": "a.jpg"}, {"id": 1, "file_name": "b.jpg"}]}, "id 1 appears twice"),
    ],
)
def test_bad_manifests(tmp_path, doc, message):
    manifest = tmp_path / "m.json"
    manifest.write_text(json.dumps(doc))
    with pytest.raises(UsageError, match=message):
        read_manifest(manifest, tmp_path)


def test_manifest_that_is_not_json(tmp_path):
    manifest = tmp_path / "m.json"
    manifest.write_text("{not json")
    with pytest.raises(UsageError, match="not a JSON file"):
        read_manifest(manifest, tmp_path)
    with pytest.raises(UsageError, match="no such file"):
        read_manifest(tmp_path / "missing.json", tmp_path)


def test_path_list_without_root_keeps_paths_as_given():
    items = read_path_list(["data/a.jpg\n", "\n", "  \n", "/abs/b.png\r\n"])
    assert [(it.index, it.image_id, it.path) for it in items] == [(0, "data/a.jpg", "data/a.jpg"),
                                                                 (1, "/abs/b.png", "/abs/b.png")]


def test_path_list_with_root(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    root = tmp_path / "data"
    lines = ["data/x/a.jpg", str(root / "b.jpg"), "c.jpg", "./data/../data/d.jpg"]
    items = read_path_list(lines, "data")
    # inside the root (as `find data` prints it, or absolute): path kept, id relative to the root;
    # any other relative path is under the root
    assert [(it.image_id, it.path) for it in items] == [
        ("x/a.jpg", "data/x/a.jpg"),
        ("b.jpg", str(root / "b.jpg")),
        ("c.jpg", os.path.join("data", "c.jpg")),
        ("d.jpg", "./data/../data/d.jpg"),
    ]
    with pytest.raises(UsageError, match=r"list.txt:1: /elsewhere/e.jpg is not under --image-root"):
        read_path_list(["/elsewhere/e.jpg"], "data", "list.txt")


def test_path_list_duplicates_are_refused():
    with pytest.raises(UsageError, match=r"<stdin>:3: a.jpg was already listed on line 1"):
        read_path_list(["a.jpg", "b.jpg", "a.jpg"], None, "<stdin>")


def test_collect_items_dispatch(tmp_path):
    touch_images(tmp_path / "imgs", ["one.png", "two.png"])
    listing = tmp_path / "list.txt"
    listing.write_text(f"{tmp_path}/imgs/two.png\n{tmp_path}/imgs/one.png\n")
    assert [it.image_id for it in collect_items(str(tmp_path / "imgs"))] == ["one.png", "two.png"]
    assert [it.image_id for it in collect_items(str(listing), image_root=tmp_path / "imgs")] == ["two.png", "one.png"]
    single = collect_items(str(tmp_path / "imgs/one.png"))
    assert [(it.image_id, it.path) for it in single] == [(str(tmp_path / "imgs/one.png"),) * 2]
    stdin = io.StringIO("imgs/one.png\n")
    assert [it.image_id for it in collect_items("-", image_root="imgs", stdin=stdin)] == ["one.png"]


def test_collect_items_usage_errors(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty.txt").write_text("\n")
    cases = [
        ((None,), "no input"),
        ((str(tmp_path / "nope"),), "no such file or directory"),
        ((str(tmp_path / "empty"),), "no images found"),
        ((str(tmp_path / "empty.txt"),), "no images found"),
        ((str(tmp_path), tmp_path / "m.json", tmp_path), "either IMAGES or --manifest"),
        ((None, tmp_path / "m.json"), "--manifest needs --image-root"),
        ((str(tmp_path / "empty"), None, tmp_path), "--image-root applies to"),
    ]
    for args, message in cases:
        with pytest.raises(UsageError, match=message):
            collect_items(*args)


# ---- loader and bucketing -------------------------------------------------------------------------

def record(index: int, shape: tuple[int, int] | None) -> DecodedImage:
    pixels = torch.zeros(3, *shape) if shape else None
    return DecodedImage(ImageItem(index, str(index), str(index)), pixels, error=None if shape else "bad")


def flat(batches) -> list[tuple[list[int], bool]]:
    return [([r.item.index for r in batch], end) for batch, end in batches]


def test_bucketing_groups_sizes_inside_windows():
    a, b = (16, 32), (32, 16)
    records = [record(0, a), record(1, b), record(2, a), record(3, None), record(4, b), record(5, b),
               record(6, a), record(7, a), record(8, b), record(9, a)]
    # window 4: [0..3], [4..7], [8, 9]; batch size 2
    assert flat(bucket_batches(records, batch_size=2, window=4)) == [
        ([0, 2], False), ([3], False), ([1], True),
        ([4, 5], False), ([6, 7], False), ([], True),
        ([8], False), ([9], True),
    ]


def test_bucketing_of_a_rank_share_uses_the_same_windows():
    """Rank 1 of 2 sees windows 1 and 3 only; its batches equal those of a full run."""
    shapes = [(16, 16), (16, 32)]
    full = [record(i, shapes[i % 3 == 0]) for i in range(16)]
    everything = flat(bucket_batches(full, 3, 4))
    share = flat(bucket_batches([r for r in full if (r.item.index // 4) % 2 == 1], 3, 4))
    in_share = [(ix, end) for ix, end in everything if ix and (ix[0] // 4) % 2 == 1]
    assert [b for b in share if b[0]] == in_share


def test_iter_records_with_workers_keeps_order(tmp_path):
    touch_images(tmp_path, [f"{i}.png" for i in range(5)])
    (tmp_path / "9.png").write_bytes(b"")
    items = list_folder(tmp_path)
    prep = Preprocess(16, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    records = list(iter_records(items, prep, workers=2))
    assert [r.item.index for r in records] == list(range(6))
    assert records[0].pixels.shape == (3, 16, 32) and (records[0].width, records[0].height) == (20, 10)
    assert records[5].pixels is None and "empty" in records[5].error
    assert list(iter_records([], prep, workers=2)) == []


def test_decoding_keeps_the_rgb_for_the_crf_only_when_asked(tmp_path):
    """keep_rgb: the oriented (H, W, 3) uint8 image as load_rgb gives it (no second decode later)."""
    Image.fromarray(np.arange(10 * 20 * 3, dtype=np.uint8).reshape(10, 20, 3)).save(tmp_path / "a.png")
    items = list_folder(tmp_path)
    prep = Preprocess(16, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    kept = ImageDataset(items, prep, keep_rgb=True)[0]
    assert kept.rgb.shape == (10, 20, 3) and kept.rgb.dtype == np.uint8
    assert np.array_equal(kept.rgb, np.asarray(load_rgb(items[0].path)))
    assert ImageDataset(items, prep)[0].rgb is None
    failed = kept.failed("out of memory")
    assert (failed.pixels, failed.rgb, failed.error) == (None, None, "out of memory")
    assert (failed.width, failed.height) == (20, 10)  # the row keeps the image's size
