"""tagclip_cli/formats.py: our outputs read back. Files are written by our own writers
(tagclip_cli/writers.py) and read again; bad files raise FormatError naming the file."""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from tagclip_cli.errors import FormatError, UsageError
from tagclip_cli.fileio import json_scalar
from tagclip_cli.formats import (
    TAG_COLUMNS,
    TagsFile,
    class_color,
    decode_segmentation,
    iter_tag_batches,
    label_map,
    load_masks,
    read_coco,
    read_tags,
    read_tags_schema,
    rle_decode,
    tag_classes,
)
from tagclip_cli.record import RecordIO
from tagclip_cli.sources import ImageItem
from tagclip_cli.vocab import parse_vocabulary
from tagclip_cli.writers import (
    mask_entries,
    read_record,
    rle_encode,
    rows_to_table,
    segment_row,
    segment_schema,
    tag_row,
    tags_schema,
    write_coco_json,
    write_label_png,
    write_parquet_atomic,
)

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

CLASSES = ["cat", "dog", "car"]
CONFIG = {"classes": CLASSES, "tool": "tagclip-cli", "threshold": 0.5}
ITEMS = [ImageItem(0, "a.jpg", "/data/a.jpg"), ImageItem(1, "sub/b.jpg", "/data/sub/b.jpg"),
         ImageItem(2, "c.jpg", "/data/c.jpg")]


def write_tags(path: Path) -> Path:
    rows = [
        tag_row(ITEMS[0], 8, 6, None, ["cat"], [0.9, 0.1, 0.25]),
        tag_row(ITEMS[1], 4, 4, None, ["dog", "car"], [0.0, 0.75, 0.5]),
        tag_row(ITEMS[2], None, None, "not an image"),
    ]
    schema = tags_schema(CONFIG)
    write_parquet_atomic([rows_to_table(rows, schema)], path, schema)
    return path


def one_line_naming(exc: pytest.ExceptionInfo, path: Path) -> None:
    message = str(exc.value)
    assert str(path) in message and "\n" not in message


# ---- tags Parquet ---------------------------------------------------------------------------------


def test_tags_round_trip_with_metadata(tmp_path):
    path = write_tags(tmp_path / "tags.parquet")
    assert RecordIO.to_dict(read_tags_schema(path)) == CONFIG == RecordIO.to_dict(read_record(path))
    assert tag_classes(path, read_tags_schema(path)) == tuple(CLASSES)
    table, metadata = read_tags(path, ("image_id", "status", "scores"))
    assert RecordIO.to_dict(metadata) == CONFIG and table.column_names == ["image_id", "status", "scores"]
    assert table.column("image_id").to_pylist() == ["a.jpg", "sub/b.jpg", "c.jpg"]
    rows = [row for batch in iter_tag_batches(path, TAG_COLUMNS, batch_size=2) for row in batch]
    assert [r["status"] for r in rows] == ["ok", "ok", "failed"]
    assert rows[1]["tags"] == ["dog", "car"] and rows[1]["scores"] == [0.0, 0.75, 0.5]  # exact in float32
    assert rows[2]["scores"] is None and rows[2]["error"] == "not an image"


def test_tags_file_lookup_and_identity(tmp_path):
    path = write_tags(tmp_path / "tags.parquet")
    vocab = parse_vocabulary("\n".join(CLASSES) + "\n", source="three.txt")
    tags = TagsFile(path, vocab)
    assert tags.lookup(ITEMS[1]).tags == [1, 2] and tags.lookup(ITEMS[1]).scores == [0.0, 0.75, 0.5]
    assert tags.lookup(ImageItem(7, "a.jpg", "/elsewhere/a.jpg")).names == ["cat"]  # by id, not position
    assert "not an image" in tags.lookup(ITEMS[2]).error
    assert tags.identity()["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    with pytest.raises(FormatError, match="other classes") as exc:
        TagsFile(path, parse_vocabulary("cat\ndog\n", source="two.txt"))
    one_line_naming(exc, path)
    assert "--" not in str(exc.value)  # no CLI flag: the caller adds its own wording


def test_bad_tags_files_name_the_file(tmp_path):
    missing = tmp_path / "missing.parquet"
    with pytest.raises(FormatError, match="no such tags file") as exc:
        read_tags_schema(missing)
    one_line_naming(exc, missing)
    junk = tmp_path / "junk.parquet"
    junk.write_text("hello")
    with pytest.raises(FormatError, match="not a tags Parquet written by tagclip annotate") as exc:
        read_tags(junk)
    one_line_naming(exc, junk)
    other = tmp_path / "other.parquet"
    pq.write_table(pa.table({"image_id": ["a"]}), other)
    with pytest.raises(FormatError, match="missing columns: index, path") as exc:
        read_tags_schema(other)
    one_line_naming(exc, other)
    assert RecordIO.to_dict(read_tags_schema(other, ["image_id"])) == {}
    with pytest.raises(FormatError, match="no 'tagclip' metadata") as exc:
        tag_classes(other, RecordIO.from_dict({}))
    one_line_naming(exc, other)
    bad_meta = tmp_path / "bad_meta.parquet"
    pq.write_table(pa.table({"image_id": ["a"]}).replace_schema_metadata({b"tagclip": b"{not json"}), bad_meta)
    with pytest.raises(FormatError, match="metadata is not JSON") as exc:
        read_tags_schema(bad_meta, ["image_id"])
    one_line_naming(exc, bad_meta)
    assert issubclass(FormatError, UsageError) and FormatError.exit_code == 2


# ---- a segment run: COCO masks JSON and label maps --------------------------------------------------


def test_segment_outputs_round_trip(tmp_path):
    maps = [np.zeros((6, 8), np.int32), np.zeros((4, 4), np.int32)]
    maps[0][1:4, 2:7] = 1
    maps[0][4:, :3] = 3
    maps[1][:, 2:] = 2
    rows = [
        segment_row(ITEMS[0], 8, 6, None, ["cat", "car"], [0.9, 0.1, 0.25], mask_entries(maps[0], {1: 0.8, 3: 0.3})),
        segment_row(ITEMS[1], 4, 4, None, ["dog"], [0.0, 0.75, 0.5], mask_entries(maps[1], {2: float("nan")})),
        segment_row(ITEMS[2], None, None, "not an image"),
    ]
    schema = segment_schema(CONFIG)
    masks_path, tags_path = tmp_path / "masks.json", tmp_path / "tags.parquet"
    write_coco_json([rows_to_table(rows, schema)], masks_path, schema, tags_out=tags_path)

    assert RecordIO.to_dict(read_tags_schema(tags_path)) == CONFIG
    for row, expected in zip(rows[:2], maps, strict=True):
        rebuilt = np.zeros_like(expected)
        for mask in row["masks"]:
            rebuilt[rle_decode(mask["counts"], row["height"], row["width"])] = mask["category_id"]
        assert np.array_equal(rebuilt, expected)

    coco = read_coco(masks_path)
    assert [c["name"] for c in coco.categories] == CLASSES
    index = load_masks(masks_path)
    assert index.categories == {1: "cat", 2: "dog", 3: "car"}
    for item, expected in zip(ITEMS[:2], maps, strict=True):
        image_id = index.lookup(item.image_id, item.path)
        h, w = expected.shape
        labels = label_map(index.annotations[image_id], {1: 1, 2: 2, 3: 3}, h, w, str(masks_path))
        assert np.array_equal(labels, expected)
    failed = index.lookup("c.jpg", None)
    assert index.images[failed]["tagclip_status"] == "failed" and failed not in index.annotations
    dog = index.annotations[index.lookup("sub/b.jpg", None)][0]
    assert dog["score"] is None  # NaN is written as null, and null sorts as 0


def test_decode_segmentation_forms_and_sizes():
    square = np.zeros((10, 10), bool)
    square[2:6, 2:6] = True
    rle = rle_encode(square)
    as_bytes = {"size": rle["size"], "counts": rle["counts"].encode("ascii")}
    assert np.array_equal(decode_segmentation(rle, 10, 10, "x"), square)
    assert np.array_equal(decode_segmentation(as_bytes, 10, 10, "x"), square)
    polygon = decode_segmentation([[0.0, 0.0, 5.0, 0.0, 5.0, 5.0, 0.0, 5.0]], 10, 10, "x")
    assert polygon[1, 1] and not polygon[8, 8]
    assert not decode_segmentation([], 3, 4, "x").any()
    with pytest.raises(FormatError, match="masks.json image 7: mask is 10x10 but the image is 20x20"):
        decode_segmentation(rle, 20, 20, "masks.json image 7")
    assert decode_segmentation(rle, 20, 20, "x", resize=True)[4:12, 4:12].all()
    with pytest.raises(FormatError, match="masks.json image 7: invalid segmentation"):
        decode_segmentation({"counts": 5}, 10, 10, "masks.json image 7")


@pytest.mark.parametrize(
    "content, message",
    [
        (None, "no such masks file"),
        ("{not json", "cannot read masks file \\(not a JSON file"),
        ("[]", "not a COCO masks file \\(needs images, annotations, categories\\)"),
        ('{"images": [{"id": 1}], "categories": [{"id": 1, "name": "a"}], '
         '"annotations": [{"id": 5, "image_id": 1, "category_id": 9}]}', "annotation 5 has unknown category 9"),
        ('{"images": [], "categories": [{"id": 1, "name": "a"}], '
         '"annotations": [{"id": 5, "image_id": 3, "category_id": 1}]}', "annotation 5 refers to unknown image 3"),
        ('{"images": [{"file_name": "x"}], "categories": [], "annotations": []}', "malformed COCO file"),
    ],
)
def test_bad_masks_files_name_the_file(tmp_path, content, message):
    path = tmp_path / "masks.json"
    if content is not None:
        path.write_text(content)
    with pytest.raises(FormatError, match=message) as exc:
        load_masks(path)  # what `tagclip show --masks` reads (through read_coco)
    one_line_naming(exc, path)


# ---- colours and JSON values ----------------------------------------------------------------------


def test_class_color_is_the_palette_of_our_label_pngs(tmp_path):
    labels = np.arange(1, 256, dtype=np.int32).reshape(15, 17)
    write_label_png(labels, tmp_path / "l.png")
    with Image.open(tmp_path / "l.png") as image:
        assert image.mode == "P"
        palette = image.getpalette()
    for label in (1, 2, 15, 100, 255):
        assert class_color(label) == tuple(palette[3 * label : 3 * label + 3])
    assert class_color(256) == class_color(1)


def test_json_scalar_makes_strict_json():
    values = [math.nan, float("inf"), -math.inf, np.float32(0.5), np.int64(3), None, "x", 1.25]
    assert [json_scalar(v) for v in values] == [None, None, None, 0.5, 3, None, "x", 1.25]
    assert json.dumps(json_scalar(np.float64("nan")), allow_nan=False) == "null"
