"""tagclip_cli/export.py and `tagclip export`: each format read back by its own reference reader
where one installs (Ultralytics' dataset checker and loader, Label Studio's brush decoder and
config parser, pycocotools), else by the published specification (Pascal VOC, CVAT for images
1.1), with a round trip to the masks: exact for RLE and label PNGs, IoU >= 0.98 for polygons.

Masks are real (`tagclip segment --model shapes-demo` on generated scenes) and hand-made (holes,
several parts, a part inside a hole, masks on the image border). The readers live in the
`export-test` extra (pip install -e '.[dev,export-test]')."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from mask_files import (
    hand_made_maps,
    mask_rows,
    parquet_from_coco,
    write_images,
    write_masks_parquet,
    write_tags_parquet,
)
from PIL import Image
from pycocotools import mask as mask_utils

from tagclip_cli.export import ExportConfig, export, export_yolo, labelstudio_config
from tagclip_cli.formats import MaskFile, iter_mask_images
from tagclip_cli.sources import ImageItem
from tagclip_cli.writers import mask_entries, rows_to_table, segment_row, segment_schema, voc_palette, write_coco_json

REPO = Path(__file__).resolve().parents[1]
HAND_CLASSES = ["square", "ring", "bar"]


def run_tagclip(*args: str, cwd: Path | None = None, check: bool = True, **env) -> subprocess.CompletedProcess:
    environ = dict(os.environ, COLUMNS="200", OMP_NUM_THREADS="1",
                   PYTHONPATH=os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p), **env)
    proc = subprocess.run([sys.executable, "-m", "tagclip_cli", *args], capture_output=True, text=True, env=environ,
                          timeout=600, cwd=cwd)
    if check:
        assert proc.returncode == 0, proc.stderr
    return proc


def rle_mask(counts: str, height: int, width: int) -> np.ndarray:
    return mask_utils.decode({"size": [height, width], "counts": counts.encode()}).astype(bool)


def expected_masks(path: Path) -> dict[str, dict[str, np.ndarray]]:
    """{image_id: {class: (H, W) mask}} of the ok images of a masks file, decoded by pycocotools
    from the file itself (the JSON through pycocotools' COCO API, the Parquet row by row)."""
    out: dict[str, dict[str, np.ndarray]] = {}
    if path.suffix == ".parquet":
        for row in pq.read_table(path).to_pylist():
            if row["status"] != "ok":
                continue
            masks = out.setdefault(row["image_id"], {})
            if row["class_id"] is not None:
                masks[row["class_name"]] = rle_mask(row["counts"], row["height"], row["width"])
        return out
    from pycocotools.coco import COCO

    coco = COCO(str(path))
    names = {c["id"]: c["name"] for c in coco.loadCats(coco.getCatIds())}
    for image in coco.imgs.values():
        if image["tagclip_status"] != "ok":
            continue
        masks = out.setdefault(image["tagclip_image_id"], {})
        for ann in coco.loadAnns(coco.getAnnIds(imgIds=[image["id"]])):
            masks[names[ann["category_id"]]] = coco.annToMask(ann).astype(bool)
    return out


def iou(a: np.ndarray, b: np.ndarray) -> float:
    union = (a | b).sum()
    return 1.0 if union == 0 else float((a & b).sum() / union)


# ---- inputs -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def real(tmp_path_factory) -> dict:
    """`tagclip segment --model shapes-demo` on 4 generated scenes: masks JSON, tags, images, and
    the same masks as a Parquet (3 rows per row group, so an image's rows span row groups)."""
    from tagclip_cli.synthetic import write_folder_dataset

    root = tmp_path_factory.mktemp("export-real")
    write_folder_dataset(root / "ds", 4, seed=3)
    images = root / "ds" / "images"
    run_tagclip("segment", str(images), "--model", "shapes-demo", "--vocab", "shapes", "--out",
                str(root / "masks.json"), "--tags-out", str(root / "tags.parquet"), "--workers", "0",
                "--device", "cpu", "--cache-dir", str(root / "cache"))
    parquet_from_coco(root / "masks.json", root / "masks.parquet", row_group_size=3)
    assert sum(len(m) for m in expected_masks(root / "masks.json").values()) >= 4  # real masks to export
    return {"root": root, "images": images, "json": root / "masks.json", "tags": root / "tags.parquet",
            "parquet": root / "masks.parquet"}


@pytest.fixture(scope="module")
def hand(tmp_path_factory) -> dict:
    """Hand-made label maps as a masks JSON (our COCO writer), a masks Parquet with a failed image,
    their images (one in a sub-folder) and a tags Parquet."""
    root = tmp_path_factory.mktemp("export-hand")
    maps = hand_made_maps()
    maps["sub/border.png"] = maps.pop("border.png")
    images = root / "images"
    write_images(images, maps)
    items = [ImageItem(i, name, str(images / name)) for i, name in enumerate(maps)]
    scores = {1: 0.9, 2: 0.7, 3: 0.6}
    meta = {"classes": HAND_CLASSES, "tool": "tagclip-cli", "tool_version": "test"}
    schema = segment_schema(meta)
    rows = [segment_row(item, lm.shape[1], lm.shape[0], None, [HAND_CLASSES[k - 1] for k in np.unique(lm) if k],
                        [0.5] * 3, mask_entries(lm, scores)) for item, lm in zip(items, maps.values(), strict=True)]
    write_coco_json([rows_to_table(rows, schema)], root / "masks.json", schema)
    prows = []
    for item, lm in zip(items, maps.values(), strict=True):
        prows += mask_rows(item.image_id, item.path, lm, HAND_CLASSES, scores=scores)
    prows += mask_rows("broken.png", str(images / "broken.png"), None, HAND_CLASSES, error="cannot decode",
                       size=(80, 60))
    write_masks_parquet(root / "masks.parquet", prows, HAND_CLASSES, row_group_size=2)
    tag_images = [(i.image_id, i.path, 80, 60) for i in items] + [("broken.png", str(images / "broken.png"), 0, 0)]
    tags = {name: sorted({HAND_CLASSES[k - 1] for k in np.unique(lm) if k}) for name, lm in maps.items()}
    write_tags_parquet(root / "tags.parquet", tag_images, HAND_CLASSES, tags, failed=["broken.png"])
    return {"root": root, "images": images, "json": root / "masks.json", "parquet": root / "masks.parquet",
            "tags": root / "tags.parquet", "maps": maps}


# ---- the reader: formats.iter_mask_images ------------------------------------------------------


@pytest.mark.parametrize("which", ["real", "hand"])
def test_mask_reader_gives_the_same_images_from_json_and_parquet(which, request):
    data = request.getfixturevalue(which)
    assert pq.ParquetFile(data["parquet"]).num_row_groups > 1  # read row group by row group
    from_json = [im for im in iter_mask_images(data["json"]) if im.status == "ok"]
    from_parquet = [im for im in iter_mask_images(data["parquet"]) if im.status == "ok"]
    assert [im.image_id for im in from_json] == [im.image_id for im in from_parquet]
    for a, b in zip(from_json, from_parquet, strict=True):
        assert (a.width, a.height) == (b.width, b.height)
        assert [(r.class_id, r.class_name, r.area, r.counts) for r in a.masks] == \
            [(r.class_id, r.class_name, r.area, r.counts) for r in b.masks]
        assert [r.score for r in a.masks] == pytest.approx([r.score for r in b.masks])
    expected = expected_masks(data["json"])
    for im in from_parquet:
        assert {r.class_name for r in im.masks} == set(expected[im.image_id])
        for r in im.masks:
            assert np.array_equal(r.mask(im.height, im.width), expected[im.image_id][r.class_name])
    assert MaskFile(data["json"]).classes == MaskFile(data["parquet"]).classes


def test_mask_reader_keeps_failed_and_empty_images(hand):
    images = {im.image_id: im for im in iter_mask_images(hand["parquet"])}
    assert images["broken.png"].status == "failed" and images["broken.png"].error == "cannot decode"
    assert images["empty.png"].status == "ok" and images["empty.png"].masks == []
    assert list(MaskFile(hand["parquet"]).image_ids()) == list(images)


def test_bad_masks_parquet_files_name_the_file_and_the_problem(hand, tmp_path):
    import pyarrow as pa

    from tagclip_cli.errors import FormatError

    no_columns = tmp_path / "no-columns.parquet"
    pq.write_table(pa.table({"image_id": ["a"]}), no_columns)
    no_meta = tmp_path / "no-meta.parquet"
    pq.write_table(pq.read_table(hand["parquet"]).replace_schema_metadata(None), no_meta)
    bad_class = write_masks_parquet(tmp_path / "bad-class.parquet", mask_rows(
        "a.png", "a.png", np.ones((4, 4), np.int32) * 3, HAND_CLASSES), HAND_CLASSES[:2])
    not_parquet = tmp_path / "text.parquet"
    not_parquet.write_text("hello")
    cases = [(no_columns, "missing columns: path, width"), (no_meta, "no 'tagclip' metadata"),
             (bad_class, "image a.png: class 3 'bar' is not in the file's classes"),
             (not_parquet, "not a masks Parquet written by tagclip segment (not a Parquet file")]
    for path, message in cases:
        with pytest.raises(FormatError, match=re.escape(message)) as info:
            list(iter_mask_images(path))
        assert str(info.value).startswith(str(path))


# ---- yolo -------------------------------------------------------------------------------------


def ultralytics_labels(out: Path, task: str, tmp_path: Path) -> tuple[dict[str, dict], dict]:
    """{image file name relative to images/: label dict} as Ultralytics' own checker and loader see
    the exported dataset (check_det_dataset on data.yaml, then YOLODataset)."""
    os.environ.setdefault("YOLO_CONFIG_DIR", str(tmp_path / "ultralytics-config"))
    os.environ["YOLO_OFFLINE"] = "1"
    from ultralytics.cfg import get_cfg
    from ultralytics.data import YOLODataset
    from ultralytics.data.utils import check_det_dataset

    data = check_det_dataset(str(out / "data.yaml"))
    assert Path(data["train"]) == (out / "images").resolve()
    dataset = YOLODataset(img_path=data["train"], data=data, task=task, imgsz=64, augment=False, cache=False,
                          hyp=get_cfg())
    return {str(Path(lb["im_file"]).relative_to((out / "images").resolve())): lb for lb in dataset.labels}, data


@pytest.mark.parametrize("which,source", [("real", "json"), ("real", "parquet"), ("hand", "json"),
                                          ("hand", "parquet")])
def test_yolo_segment_is_read_by_ultralytics_and_fills_back_to_the_masks(which, source, request, tmp_path):
    from ultralytics.data.utils import polygon2mask

    data = request.getfixturevalue(which)
    out = tmp_path / "yolo"
    summary = export_yolo(data[source], out, tags=data["tags"], images=data["images"])
    labels, yaml = ultralytics_labels(out, "segment", tmp_path)
    classes = MaskFile(data[source]).classes
    assert yaml["names"] == dict(enumerate(classes))
    expected = expected_masks(data[source])
    assert set(labels) == set(expected)  # ok images only: the failed one is left out
    assert summary.images == len(expected) and summary.skipped == (1 if source == "parquet" and which == "hand"
                                                                   else 0)
    for name, label in labels.items():
        h, w = label["shape"]
        got: dict[str, np.ndarray] = {}
        for cls, segment in zip(label["cls"].ravel().tolist(), label["segments"], strict=True):
            # Ultralytics loads float32 coordinates and its polygon2mask truncates them to pixels:
            # 17/60 comes back as 16.99999, so round to the nearest pixel first
            filled = polygon2mask((h, w), [np.round(segment * [w, h]).reshape(-1)], color=1, downsample_ratio=1)
            got[classes[int(cls)]] = got.get(classes[int(cls)], np.zeros((h, w), bool)) | filled.astype(bool)
        assert set(got) == {c for c, m in expected[name].items() if m.sum() > 2}, name
        for cls, mask in got.items():
            assert iou(mask, expected[name][cls]) >= 0.98, (name, cls, iou(mask, expected[name][cls]))
        assert (out / "images" / name).is_symlink()
        assert (out / "images" / name).resolve() == (data["images"] / name).resolve()


def test_yolo_holes_and_parts_are_one_line_per_part(hand, tmp_path):
    out = tmp_path / "yolo"
    export_yolo(hand["parquet"], out, images=hand["images"])
    lines = (out / "labels" / "holes.txt").read_text().splitlines()
    by_class = [int(line.split()[0]) for line in lines]
    # square with 2 holes + the island in a hole = 2 parts; ring = 1 part with its hole; bar = 2 parts
    assert sorted(by_class) == [0, 0, 1, 2, 2]
    assert (out / "labels" / "empty.txt").read_text() == ""  # a background image
    assert (out / "labels" / "sub" / "border.txt").exists()
    for line in lines:
        values = [float(v) for v in line.split()[1:]]
        assert len(values) % 2 == 0 and len(values) >= 6 and all(0.0 <= v <= 1.0 for v in values)


def test_yolo_detect_boxes_are_the_parts_boxes(hand, tmp_path):
    from skimage.measure import label as components
    from skimage.measure import regionprops

    out = tmp_path / "yolo"
    export(ExportConfig(format="yolo", out=out, masks=hand["parquet"], tags=hand["tags"], images=hand["images"],
                        task="detect", copy=True))
    labels, _ = ultralytics_labels(out, "detect", tmp_path)
    expected = expected_masks(hand["parquet"])
    for name, label in labels.items():
        h, w = label["shape"]
        got = sorted((int(c), *np.round(b * [w, h, w, h], 3).tolist())
                     for c, b in zip(label["cls"].ravel(), label["bboxes"], strict=True))
        want = []
        for cls, mask in expected[name].items():
            for region in regionprops(components(mask, connectivity=2)):
                y0, x0, y1, x1 = region.bbox
                want.append((HAND_CLASSES.index(cls), (x0 + x1) / 2, (y0 + y1) / 2, x1 - x0, y1 - y0))
        np.testing.assert_allclose(np.array(got), np.array(sorted(want)), atol=1e-3, err_msg=name)
        assert not (out / "images" / name).is_symlink()  # --copy
        assert (out / "images" / name).read_bytes() == (hand["images"] / name).read_bytes()


# ---- voc --------------------------------------------------------------------------------------


def test_voc_layout_from_the_specification(hand, tmp_path):
    out = tmp_path / "voc"
    export(ExportConfig(format="voc", out=out, masks=hand["json"], tags=hand["tags"], images=hand["images"],
                        split="train"))
    names = (out / "ImageSets" / "Segmentation" / "train.txt").read_text().split()
    assert names == ["holes", "empty", "sub__border"]
    for image_id, lm in hand["maps"].items():
        name = image_id.replace("/", "__").removesuffix(".png")
        png = Image.open(out / "SegmentationClass" / f"{name}.png")
        assert png.mode == "P" and png.getpalette()[: 3 * 4] == voc_palette()[: 3 * 4]
        assert np.array_equal(np.asarray(png), lm)  # exact: pixel = class index + 1, 0 = background
        assert (out / "JPEGImages" / f"{name}.png").resolve() == (hand["images"] / image_id).resolve()
    for k, cls in enumerate(HAND_CLASSES, start=1):
        rows = dict(line.split() for line in (out / "ImageSets" / "Main" / f"{cls}_train.txt").read_text().splitlines())
        want = {image_id.replace("/", "__").removesuffix(".png"): ("1" if (lm == k).any() else "-1")
                for image_id, lm in hand["maps"].items()}
        assert rows == want
    labelmap = (out / "labelmap.txt").read_text().splitlines()
    assert labelmap[:2] == ["# label:color_rgb:parts:actions", "background:0,0,0::"]
    assert labelmap[2] == "square:128,0,0::" and len(labelmap) == 2 + len(HAND_CLASSES)


# ---- label studio -----------------------------------------------------------------------------


def test_labelstudio_brush_decodes_exactly_with_label_studios_decoder(real, tmp_path):
    from label_studio_converter.brush import decode_rle
    from label_studio_tools.core.label_config import parse_config

    out = tmp_path / "ls"
    export(ExportConfig(format="labelstudio", out=out, masks=real["parquet"], tags=real["tags"]))
    config = parse_config((out / "label_config.xml").read_text())
    assert config["tags"]["type"] == "Choices" and config["masks"]["type"] == "BrushLabels"
    classes = MaskFile(real["parquet"]).classes
    assert config["masks"]["labels"] == list(classes) and config["tags"]["labels"] == list(classes)
    tasks = json.loads((out / "tasks.json").read_text())
    expected = expected_masks(real["parquet"])
    tags = {r["image_id"]: r for r in pq.read_table(real["tags"]).to_pylist()}
    assert [t["data"]["tagclip_image_id"] for t in tasks] == list(expected)
    for task in tasks:
        image_id = task["data"]["tagclip_image_id"]
        assert task["data"]["image"] == "/data/local-files/?d=" + image_id
        prediction = task["predictions"][0]
        assert prediction["model_version"].startswith("tagclip-cli")
        results = prediction["result"]
        choices = [r for r in results if r["type"] == "choices"]
        assert [c["value"]["choices"] for c in choices] == ([tags[image_id]["tags"]] if tags[image_id]["tags"]
                                                            else [])
        brushes = [r for r in results if r["type"] == "brushlabels"]
        assert {b["value"]["brushlabels"][0] for b in brushes} == set(expected[image_id])
        for b in brushes:
            h, w = b["original_height"], b["original_width"]
            decoded = decode_rle(b["value"]["rle"]).reshape(h, w, 4)[:, :, 3] > 0
            assert np.array_equal(decoded, expected[image_id][b["value"]["brushlabels"][0]])
            assert 0.0 <= b["score"] <= 1.0


def test_labelstudio_polygons_fill_back_to_the_masks(hand, tmp_path):
    import cv2
    from label_studio_tools.core.label_config import parse_config

    out = tmp_path / "ls"
    export(ExportConfig(format="labelstudio", out=out, masks=hand["parquet"], tags=hand["tags"],
                        mask_as="polygon"))
    assert parse_config((out / "label_config.xml").read_text())["masks"]["type"] == "PolygonLabels"
    tasks = json.loads((out / "tasks.json").read_text())
    expected = expected_masks(hand["parquet"])
    for task in tasks:
        image_id = task["data"]["tagclip_image_id"]
        got: dict[str, np.ndarray] = {}
        for r in task["predictions"][0]["result"]:
            if r["type"] != "polygonlabels":
                continue
            h, w = r["original_height"], r["original_width"]
            points = np.round(np.array(r["value"]["points"]) / 100.0 * [w, h]).astype(np.int32)
            filled = np.zeros((h, w), np.uint8)
            cv2.fillPoly(filled, [points], 1)
            cls = r["value"]["polygonlabels"][0]
            got[cls] = got.get(cls, np.zeros((h, w), bool)) | filled.astype(bool)
        assert set(got) == set(expected[image_id])
        for cls, mask in got.items():
            assert iou(mask, expected[image_id][cls]) >= 0.98, (image_id, cls)


def test_nan_mask_scores_give_strict_json(tmp_path):
    rows = mask_rows("a.png", "a.png", np.ones((4, 4), np.int32), HAND_CLASSES, scores={1: float("nan")})
    masks = write_masks_parquet(tmp_path / "nan.parquet", rows, HAND_CLASSES)
    assert [r.score for im in iter_mask_images(masks) for r in im.masks] == [None]
    export(ExportConfig(format="labelstudio", out=tmp_path / "ls", masks=masks))

    def refuse(name):
        raise AssertionError(f"{name} in tasks.json")

    task = json.loads((tmp_path / "ls" / "tasks.json").read_text(), parse_constant=refuse)[0]
    assert task["predictions"][0]["result"][0]["score"] is None


def test_labelstudio_config_escapes_class_names():
    root = ET.fromstring(labelstudio_config(['a "b" & <c>', "d"], masks=True, mask_as="brush"))
    assert [c.get("value") for c in root.iter("Choice")] == ['a "b" & <c>', "d"]


# ---- cvat -------------------------------------------------------------------------------------


def cvat_mask(element: ET.Element, height: int, width: int) -> np.ndarray:
    """A CVAT 1.1 <mask> as an (H, W) mask, from the specification: run lengths over the box
    (left, top, width, height) row by row, alternating background / mask, background first."""
    runs = [int(v) for v in element.get("rle").split(",")]
    left, top, w, h = (int(element.get(k)) for k in ("left", "top", "width", "height"))
    flat = np.repeat(np.arange(len(runs)) % 2 == 1, runs)
    assert flat.size == w * h
    out = np.zeros((height, width), bool)
    out[top : top + h, left : left + w] = flat.reshape(h, w)
    return out


def test_cvat_xml_from_the_specification(hand, tmp_path):
    out = tmp_path / "cvat"
    export(ExportConfig(format="cvat", out=out, masks=hand["parquet"], tags=hand["tags"]))
    root = ET.parse(out / "annotations.xml").getroot()
    assert root.tag == "annotations" and root.findtext("version") == "1.1"
    task = root.find("meta/task")
    assert task.findtext("mode") == "annotation"
    assert [lb.findtext("name") for lb in task.iter("label")] == HAND_CLASSES
    images = root.findall("image")
    assert int(task.findtext("size")) == len(images) == 3  # the failed image is left out
    expected = expected_masks(hand["parquet"])
    tags = {r["image_id"]: r["tags"] for r in pq.read_table(hand["tags"]).to_pylist()}
    for element in images:
        name, h, w = element.get("name"), int(element.get("height")), int(element.get("width"))
        assert [t.get("label") for t in element.findall("tag")] == tags[name]
        masks = {m.get("label"): cvat_mask(m, h, w) for m in element.findall("mask")}
        assert set(masks) == set(expected[name])
        for cls, mask in masks.items():
            assert np.array_equal(mask, expected[name][cls])  # exact
        for m in element.findall("mask"):
            assert 0.0 < float(m.find("attribute[@name='score']").text) <= 1.0


# ---- coco -------------------------------------------------------------------------------------


def test_coco_from_a_masks_parquet_loads_in_pycocotools(real, tmp_path):
    from pycocotools.coco import COCO

    out = tmp_path / "coco"
    export(ExportConfig(format="coco", out=out, masks=real["parquet"], tags=real["tags"]))
    coco = COCO(str(out / "annotations.json"))
    assert [c["name"] for c in coco.loadCats(coco.getCatIds())] == list(MaskFile(real["parquet"]).classes)
    expected = expected_masks(real["parquet"])
    for image in coco.imgs.values():
        anns = coco.loadAnns(coco.getAnnIds(imgIds=[image["id"]]))
        got = {coco.cats[a["category_id"]]["name"]: coco.annToMask(a).astype(bool) for a in anns}
        assert set(got) == set(expected[image["file_name"]])
        for cls, mask in got.items():
            assert np.array_equal(mask, expected[image["file_name"]][cls])
    # the same annotations as the masks JSON that segment wrote
    original = json.loads(real["json"].read_text())
    exported = json.loads((out / "annotations.json").read_text())
    strip = [(a["category_id"], a["segmentation"]["counts"], a["area"]) for a in original["annotations"]]
    assert [(a["category_id"], a["segmentation"]["counts"], a["area"]) for a in exported["annotations"]] == strip


# ---- bad input, atomic writes -----------------------------------------------------------------


def tree(root: Path) -> dict[str, bytes | str]:
    """Every file under root: content, or the target of a link."""
    return {str(p.relative_to(root)): (os.readlink(p) if p.is_symlink() else p.read_bytes())
            for p in sorted(root.rglob("*")) if p.is_symlink() or p.is_file()}


def test_bad_inputs_exit_2_with_one_line_and_write_nothing(hand, tmp_path):
    other_tags = write_tags_parquet(tmp_path / "other.parquet", [("holes.png", "x", 80, 60)], HAND_CLASSES, {})
    small_vocab = write_tags_parquet(tmp_path / "small.parquet", [("holes.png", "x", 80, 60)], ["square", "ring"], {})
    full = tmp_path / "full"
    full.mkdir()
    (full / "keep.txt").write_text("mine")
    cases = [
        (["yolo", "--masks", str(hand["parquet"]), "--tags", str(other_tags)], tmp_path / "o1",
         "image 'empty.png' is not in the tags file"),
        (["yolo", "--masks", str(hand["parquet"]), "--tags", str(small_vocab)], tmp_path / "o2",
         "class 'bar' is not in the vocabulary"),
        (["voc", "--masks", str(hand["json"])], full, "exists and is not empty (pass --overwrite"),
        (["labelstudio", "--masks", str(tmp_path / "missing.parquet")], tmp_path / "o3", "no such masks file"),
        (["yolo", "--masks", str(hand["parquet"]), "--task", "pose"], tmp_path / "o4", "--task must be one of"),
        (["tiff", "--masks", str(hand["parquet"])], tmp_path / "o5", "unknown export format 'tiff'"),
        (["yolo", "--tags", str(hand["tags"])], tmp_path / "o6", "export yolo needs --masks"),
    ]
    before = sorted(p.name for p in tmp_path.iterdir())
    for args, out, message in cases:
        proc = run_tagclip("export", *args, "--out", str(out), check=False)
        assert proc.returncode == 2, (args, proc.stderr)
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], (args, proc.stderr)
        assert "Traceback" not in proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no output, no temporary left
    assert tree(full) == {"keep.txt": b"mine"}


def test_two_images_with_one_output_name_are_refused(tmp_path):
    rows = []
    for name in ("a/b.jpg", "a/b.png"):
        rows += mask_rows(name, name, np.ones((4, 4), np.int32), HAND_CLASSES)
    masks = write_masks_parquet(tmp_path / "clash.parquet", rows, HAND_CLASSES)
    proc = run_tagclip("export", "yolo", "--masks", str(masks), "--out", str(tmp_path / "out"), check=False)
    assert proc.returncode == 2
    assert "images 'a/b.jpg' and 'a/b.png' export to the same name 'a/b'" in proc.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("order", ["same", "reversed"])
def test_tags_are_matched_by_id_in_any_order(hand, tmp_path, order):
    from tagclip_cli.export import _TagIndex

    table = pq.read_table(hand["tags"])
    tags = tmp_path / "tags.parquet"
    pq.write_table(table if order == "same" else table.take(list(range(table.num_rows))[::-1]), tags)
    index = _TagIndex(tags, with_scores=False)
    for im in iter_mask_images(hand["parquet"]):
        assert index.get(im.image_id)["image_id"] == im.image_id
    # in the same order the rows are read alongside the masks; else an index is built
    assert index.indexed == (order == "reversed")
    out = tmp_path / "cvat"
    export(ExportConfig(format="cvat", out=out, masks=hand["parquet"], tags=tags))
    want = {r["image_id"]: r["tags"] for r in table.to_pylist()}
    for element in ET.parse(out / "annotations.xml").getroot().findall("image"):
        assert [t.get("label") for t in element.findall("tag")] == want[element.get("name")]


def test_missing_image_mid_export_leaves_nothing(hand, tmp_path):
    images = tmp_path / "images"
    write_images(images, {"holes.png": hand["maps"]["holes.png"]})  # the other images are missing
    proc = run_tagclip("export", "yolo", "--masks", str(hand["parquet"]), "--images", str(images), "--out",
                       str(tmp_path / "out"), check=False)
    assert proc.returncode == 2 and "image 'empty.png': file not found" in proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["images"]


def test_overwrite_replaces_and_empty_folder_is_fine(hand, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    export_yolo(hand["parquet"], out, images=hand["images"])  # an empty folder needs no --overwrite
    first = tree(out)
    (out / "stray.txt").write_text("old")
    export_yolo(hand["parquet"], out, images=hand["images"], task="detect", overwrite=True)
    second = tree(out)
    assert "stray.txt" not in second and second.keys() == first.keys() and second != first
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def big_masks(root: Path, count: int) -> tuple[Path, Path]:
    """A masks Parquet of `count` images (hand-made maps repeated) and their (empty) image files."""
    maps = list(hand_made_maps().values())
    images = root / "images"
    images.mkdir(parents=True)
    rows = []
    for i in range(count):
        name = f"{i:06d}.png"
        (images / name).write_bytes(b"")
        rows += mask_rows(name, str(images / name), maps[i % len(maps)], HAND_CLASSES)
    return write_masks_parquet(root / "masks.parquet", rows, HAND_CLASSES), images


@pytest.mark.slow
@pytest.mark.parametrize("overwrite", [False, True])
def test_killed_export_leaves_out_as_it_was_and_a_rerun_gives_the_same_files(tmp_path, overwrite):
    masks, images = big_masks(tmp_path, 1500)
    out = tmp_path / "out"
    args = ["export", "yolo", "--masks", str(masks), "--images", str(images), "--out", str(out), "--overwrite"]
    run_tagclip(*args)
    reference = tree(out)
    if not overwrite:
        import shutil

        shutil.rmtree(out)
    environ = dict(os.environ, OMP_NUM_THREADS="1",
                   PYTHONPATH=os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p))
    proc = subprocess.Popen([sys.executable, "-m", "tagclip_cli", *args], env=environ,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    partial = tmp_path / ".out.export-partial" / "labels"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        if partial.is_dir() and sum(1 for _ in partial.iterdir()) > 50:  # mid-export
            break
        time.sleep(0.02)
    assert proc.poll() is None, "the export finished before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    if overwrite:
        assert tree(out) == reference  # the earlier export is untouched
    else:
        assert not out.exists()
    run_tagclip(*args)
    assert tree(out) == reference
    assert sorted(p.name for p in tmp_path.iterdir()) == ["images", "masks.parquet", "out"]
