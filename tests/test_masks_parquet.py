"""`tagclip segment --out masks.parquet`: one row per (image, class mask), the same masks, ids and
scores as the COCO JSON of the same run, streamed in row groups, readable with pandas."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import sample_photos
from PIL import Image
from typer.testing import CliRunner

from tagclip_cli.cli import app
from tagclip_cli.formats import rle_decode
from tagclip_cli.record import METADATA_KEY
from tagclip_cli.writers import (
    coco_categories,
    masks_schema,
    segment_schema,
    write_masks_parquet,
)

EXPECTED_SCHEMA = [
    ("image_id", pa.string()), ("path", pa.string()), ("width", pa.int32()), ("height", pa.int32()),
    ("status", pa.string()), ("error", pa.string()), ("class_id", pa.int32()), ("class_name", pa.string()),
    ("score", pa.float32()), ("area", pa.int64()), ("bbox", pa.list_(pa.float64())), ("counts", pa.string()),
]  # fmt: skip


@pytest.fixture(scope="module")
def segmented(tmp_path_factory, tiny_checkpoint, cache_dir):
    """The same segment run written as COCO JSON and as a masks Parquet (+ its tags)."""
    root = tmp_path_factory.mktemp("seg")
    images = root / "images"
    images.mkdir()
    for i, array in enumerate(sample_photos().values()):
        Image.fromarray(array).resize((64 + 16 * i, 48)).save(images / f"p{i}.png")
    (images / "broken.png").write_bytes(b"not a png")
    outs = {}
    for name in ("masks.json", "masks.parquet"):
        extra = ["--tags-out", str(root / "tags.parquet")] if name.endswith("parquet") else []
        result = CliRunner().invoke(app, ["segment", str(images), "--vocab", "voc", "--out", str(root / name),
                                          "--checkpoint", str(tiny_checkpoint), "--device", "cpu", "--workers", "0",
                                          "--cache-dir", str(cache_dir), "--batch-size", "2", "-q", *extra])
        assert result.exit_code == 1, result.output  # broken.png failed
        outs[name] = root / name
    return outs["masks.json"], outs["masks.parquet"], root / "tags.parquet"


def test_masks_parquet_schema_and_metadata(segmented):
    _, masks, _ = segmented
    schema = pq.read_schema(masks)
    assert [(f.name, f.type) for f in schema] == EXPECTED_SCHEMA
    meta = json.loads(schema.metadata[METADATA_KEY])
    from tagclip_cli.vocab import load_vocabulary

    assert meta["classes"] == list(load_vocabulary("voc").classes)
    assert meta["segment"]["method"] == "clses"


def test_masks_parquet_has_the_coco_json_masks(segmented):
    coco_path, masks, _ = segmented
    coco = json.loads(coco_path.read_text())
    names = {c["id"]: c["name"] for c in coco["categories"]}
    assert coco["categories"] == coco_categories(json.loads(pq.read_schema(masks).metadata[METADATA_KEY])["classes"])
    rows = pq.read_table(masks).to_pylist()
    by_image: dict[str, list[dict]] = {}
    for row in rows:
        by_image.setdefault(row["image_id"], []).append(row)
    assert sorted(by_image) == sorted(im["file_name"] for im in coco["images"])
    anns: dict[int, list[dict]] = {}
    for ann in coco["annotations"]:
        anns.setdefault(ann["image_id"], []).append(ann)
    for image in coco["images"]:
        got = by_image[image["file_name"]]
        assert {(r["width"], r["height"], r["status"]) for r in got} == {
            (image["width"], image["height"], image["tagclip_status"])}
        want = anns.get(image["id"], [])
        if not want:  # failed or no mask: one row, null mask columns
            assert len(got) == 1 and got[0]["class_id"] is None and got[0]["counts"] is None
            if image["tagclip_status"] == "failed":
                assert got[0]["error"] == image["tagclip_error"]
            continue
        assert [r["class_id"] for r in got] == [a["category_id"] for a in want]
        for row, ann in zip(got, want, strict=True):
            assert row["class_name"] == names[ann["category_id"]]
            assert row["counts"] == ann["segmentation"]["counts"]
            assert row["area"] == ann["area"] and row["bbox"] == ann["bbox"]
            assert row["score"] == pytest.approx(ann["score"], rel=1e-6)
            mask = rle_decode(row["counts"], row["height"], row["width"])
            assert int(mask.sum()) == row["area"]
    assert sum(r["status"] == "failed" for r in rows) == 1


def test_masks_parquet_tags_out_and_pandas(segmented):
    import pandas as pd  # in the dev extra (with datasets)

    _, masks, tags = segmented
    frame = pd.read_parquet(masks)
    assert list(frame.columns) == [name for name, _ in EXPECTED_SCHEMA]
    ok = frame[frame["status"] == "ok"]
    assert ok["class_id"].notna().all() and (ok["area"] > 0).all()
    # per image: the mask areas never exceed the image (masks of one label map do not overlap)
    per_image = ok.groupby("image_id").agg(area=("area", "sum"), w=("width", "first"), h=("height", "first"))
    assert (per_image["area"] <= per_image["w"] * per_image["h"]).all()
    tag_rows = pq.read_table(tags).to_pylist()
    assert [r["image_id"] for r in tag_rows] == sorted(frame["image_id"].unique())
    for r in tag_rows:
        if r["status"] == "ok":  # CLS-SEG masks come from the tags
            names = set(frame.loc[frame["image_id"] == r["image_id"], "class_name"].dropna())
            assert names <= set(r["tags"])


def _segment_rows(start: int, count: int, classes: list[str]) -> pa.Table:
    rows = []
    for i in range(start, start + count):
        masks = [{"category_id": 1 + (i + k) % len(classes), "counts": f"c{i}-{k}", "area": i + k,
                  "bbox": [0.0, 0.0, 1.0, 1.0], "score": 0.5} for k in range(i % 3)]
        rows.append({"index": i, "image_id": f"im{i:05d}.png", "path": f"/d/im{i:05d}.png", "width": 4,
                     "height": 3, "status": "ok", "error": None, "tags": [], "scores": [0.0] * len(classes),
                     "coco_id": None, "masks": masks})
    return pa.Table.from_pylist(rows, schema=segment_schema({"classes": classes}))


def test_writer_streams_tables_into_row_groups(tmp_path, monkeypatch):
    """The final writer takes the merged rows one table at a time (jobs.PartStore.iter_merged)
    and writes each as it comes: no step needs all masks."""
    import tagclip_cli.writers as writers

    monkeypatch.setattr(writers, "ROW_GROUP_SIZE", 50)
    classes = ["a", "b", "c"]
    pulled = []

    def tables():
        for start in range(0, 300, 100):
            pulled.append(start)
            yield _segment_rows(start, 100, classes)

    out = tmp_path / "m.parquet"
    images = write_masks_parquet(tables(), out, segment_schema({"classes": classes}))
    assert images == 300 and pulled == [0, 100, 200]
    meta = pq.ParquetFile(out).metadata
    total = sum(max(1, i % 3) for i in range(300))
    assert meta.num_rows == total and meta.num_row_groups >= total // 50
    table = pq.read_table(out)
    assert table.schema.equals(masks_schema({"classes": classes}), check_metadata=False)
    first = table.slice(0, 4).to_pylist()  # im0: no mask; im1: one; im2: two
    assert [(r["image_id"], r["class_id"], r["counts"]) for r in first] == [
        ("im00000.png", None, None), ("im00001.png", 2, "c1-0"), ("im00002.png", 3, "c2-0"), ("im00002.png", 1, "c2-1")]
    assert first[1]["class_name"] == "b" and first[3]["class_name"] == "a"
