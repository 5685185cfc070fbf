"""pipeline.py: the stages of annotate and segment (typed results from the mapper, rows and label
PNGs from the writer) and the one runner, on the tiny random CLIP."""

from __future__ import annotations

import copy
import json

import numpy as np
import pyarrow as pa
import pytest
from conftest import sample_photos
from PIL import Image

from tagclip_cli.data import ImageDataset, Preprocess
from tagclip_cli.formats import rle_decode
from tagclip_cli.methods.clses import ClsSegConfig, ClsSegSegments
from tagclip_cli.pipeline import (
    ModelOptions,
    SegmentOptions,
    SegResult,
    run_segment,
    segment_images,
    segment_rows,
)
from tagclip_cli.sources import list_folder
from tagclip_cli.tagclip import TagCLIPConfig
from tagclip_cli.vocab import load_vocabulary
from tagclip_cli.writers import segment_schema


@pytest.fixture(scope="module")
def voc():
    return load_vocabulary("voc")


@pytest.fixture(scope="module")
def photo_dir(tmp_path_factory):
    """img0.png 200x150 and img2.png 170x131 (real photos), and img1.png that is not an image."""
    root = tmp_path_factory.mktemp("photos")
    arrays = list(sample_photos().values())
    Image.fromarray(arrays[0]).resize((200, 150)).save(root / "img0.png")
    (root / "img1.png").write_text("not an image")
    Image.fromarray(arrays[2]).resize((170, 131)).save(root / "img2.png")
    return root


def test_segment_mapper_writes_nothing_and_the_writer_makes_rows_and_pngs(tiny_backbone, voc, photo_dir, tmp_path):
    seg = ClsSegSegments(tiny_backbone, voc)
    pre = Preprocess(tiny_backbone.patch_size, tiny_backbone.mean, tiny_backbone.std)
    decoded = ImageDataset(list_folder(photo_dir), pre)
    records = [decoded[i] for i in range(len(decoded))]
    results = segment_images(seg, records)
    assert all(isinstance(r, SegResult) for r in results)
    assert [r.error for r in results] == [None, "not an image (the file is text)", None]
    assert results[0].label_map.shape == (150, 200) and results[1].label_map is None
    assert list(tmp_path.iterdir()) == []  # the mapper writes nothing; the writer does
    rows = segment_rows(results, png_dir=tmp_path)
    assert [r["status"] for r in rows] == ["ok", "failed", "ok"]
    assert rows[1]["masks"] is None and not (tmp_path / "img1.png").exists()
    table = pa.Table.from_pylist(rows, schema=segment_schema({"classes": list(voc.classes)}))
    assert table.num_rows == 3
    for row in (rows[0], rows[2]):
        png = np.asarray(Image.open(tmp_path / row["image_id"]))
        assert png.shape == (row["height"], row["width"])
        rebuilt = np.zeros_like(png)
        for mask in row["masks"]:
            rebuilt[rle_decode(mask["counts"], row["height"], row["width"])] = mask["category_id"]
        assert np.array_equal(rebuilt, png)
        assert row["tags"] and len(row["scores"]) == voc.num_classes
        assert {voc.classes[m["category_id"] - 1] for m in row["masks"]} <= set(row["tags"])


def test_run_segment_leaves_its_options_as_they_were(tiny_checkpoint, cache_dir, voc, tmp_path):
    """The runner derives the session's device and the stage from the options; it changes none."""
    images = tmp_path / "images"
    images.mkdir()
    for i, array in enumerate(list(sample_photos().values())[:2]):
        Image.fromarray(array).resize((48, 32)).save(images / f"p{i}.png")
    (images / "broken.png").write_bytes(b"")
    opts = SegmentOptions(
        items=list_folder(images), vocab=voc, out=tmp_path / "masks.json", png_dir=tmp_path / "png",
        model=ModelOptions(checkpoint=tiny_checkpoint, cache_dir=cache_dir), tagclip=TagCLIPConfig(use_cwr=False),
        segment=ClsSegConfig(), batch_size=2, workers=0,
    )
    before = copy.deepcopy(opts)
    summary = run_segment(opts)
    assert opts == before
    assert (summary.done, summary.failed, summary.merged) == (2, 1, True)
    doc = json.loads((tmp_path / "masks.json").read_text())
    assert [im["file_name"] for im in doc["images"]] == ["broken.png", "p0.png", "p1.png"]
    assert sorted(p.name for p in (tmp_path / "png").iterdir()) == ["p0.png", "p1.png"]
