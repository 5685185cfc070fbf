"""Tests for tagclip_cli.evaluate: metrics by hand and against scikit-learn, ground-truth loaders on
small synthetic VOCdevkit / COCO / COCO-Stuff fixtures, prediction readers and the driver."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image
from pycocotools import mask as mask_utils
from sklearn.metrics import average_precision_score

from tagclip_cli import evaluate as ev
from tagclip_cli.errors import UsageError
from tagclip_cli.evaluate import IGNORE
from tagclip_cli.formats import decode_segmentation
from tagclip_cli.sources import ImageItem
from tagclip_cli.writers import rows_to_table, tag_row, tags_schema, write_parquet_atomic

# pycocotools' decode trips a numpy 2 deprecation warning that is not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

# ---------------------------------------------------------------------------------------------
# Fixture writers (the formats of `tagclip annotate` / `tagclip segment` and of the datasets)
# ---------------------------------------------------------------------------------------------


def write_tags_parquet(path: Path, classes, rows, background=("sky",)) -> Path:
    """rows: (image_id, path, scores or None (failed), tags), written by our own writer."""
    schema = tags_schema({"classes": list(classes), "background": list(background)})
    table = [
        tag_row(ImageItem(i, image_id, rel), *((None, None, "cannot decode") if scores is None else (8, 6, None)),
                tags, scores)
        for i, (image_id, rel, scores, tags) in enumerate(rows)
    ]
    write_parquet_atomic([rows_to_table(table, schema)], path, schema)
    return path


def rle(mask: np.ndarray) -> dict:
    out = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    out["counts"] = out["counts"].decode("ascii")
    return out


def write_coco_masks(path: Path, classes, images) -> Path:
    """images: (file_name, label map (H, W) with 0 = background, i = classes[i-1])."""
    out = {
        "images": [],
        "annotations": [],
        "categories": [{"id": i + 1, "name": c} for i, c in enumerate(classes)],
    }
    for n, (file_name, label) in enumerate(images, start=1):
        h, w = label.shape
        out["images"].append({"id": n, "file_name": file_name, "width": w, "height": h, "tagclip_image_id": file_name})
        for cat in np.unique(label):
            if cat == 0:
                continue
            m = label == cat
            out["annotations"].append(
                {
                    "id": len(out["annotations"]) + 1,
                    "image_id": n,
                    "category_id": int(cat),
                    "segmentation": rle(m),
                    "area": int(m.sum()),
                    "bbox": [0, 0, w, h],
                    "iscrowd": 0,
                    "score": 0.9,
                }
            )
    path.write_text(json.dumps(out))
    return path


def write_png(path: Path, array: np.ndarray, palette: bool = True) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.fromarray(array.astype(np.uint8), mode="L")
    if palette:
        image = image.convert("P")
        image.putpalette([v for i in range(256) for v in (i, 255 - i, (7 * i) % 256)])
    image.save(path)
    return path


def voc_xml(objects) -> str:
    objs = "".join(
        f"<object><name>{name}</name><difficult>{int(d)}</difficult><bndbox><xmin>1</xmin></bndbox></object>"
        for name, d in objects
    )
    size = "<size><width>8</width><height>6</height></size>"
    return f"<annotation><filename>x.jpg</filename>{size}{objs}</annotation>"


VOC07_OBJECTS = {
    "000001": [("dog", False), ("person", False)],
    "000002": [("train", False)],
    "000003": [("sofa", False), ("chair", True)],
    "000004": [("car", False), ("car", True), ("person", True)],
    "000005": [("chair", False), ("pottedplant", True), ("diningtable", False)],
}


@pytest.fixture
def voc2007(tmp_path: Path) -> Path:
    base = tmp_path / "VOCdevkit" / "VOC2007"
    (base / "Annotations").mkdir(parents=True)
    (base / "ImageSets" / "Main").mkdir(parents=True)
    for name, objects in VOC07_OBJECTS.items():
        (base / "Annotations" / f"{name}.xml").write_text(voc_xml(objects))
    (base / "ImageSets" / "Main" / "test.txt").write_text("\n".join(VOC07_OBJECTS) + "\n")
    return tmp_path / "VOCdevkit"


VOC12_MAPS = {
    "2007_000001": np.array([[0, 0, 1, 1], [0, 255, 1, 1], [15, 15, 0, 0]]),
    "2007_000002": np.array([[20, 20, 0, 0], [20, 255, 255, 0], [0, 0, 0, 0]]),
}


@pytest.fixture
def voc2012(tmp_path: Path) -> Path:
    base = tmp_path / "VOC2012"
    for name, label in VOC12_MAPS.items():
        write_png(base / "SegmentationClass" / f"{name}.png", label)
    (base / "ImageSets" / "Segmentation").mkdir(parents=True)
    (base / "ImageSets" / "Segmentation" / "val.txt").write_text("\n".join(VOC12_MAPS) + "\n")
    return base


def square(h, w, y0, y1, x0, x1) -> np.ndarray:
    m = np.zeros((h, w), dtype=np.uint8)
    m[y0:y1, x0:x1] = 1
    return m


def coco_instances() -> dict:
    """Three images: overlap of a large and a small instance, a crowd region, no annotation."""
    h, w = 6, 8
    anns = [
        # image 1: a large "person" (cat 1) and a smaller "dog" (cat 18) inside it -> dog on top
        {
            "id": 1,
            "image_id": 1,
            "category_id": 18,
            "iscrowd": 0,
            "segmentation": rle(square(h, w, 1, 3, 1, 3)),
        },
        {
            "id": 2,
            "image_id": 1,
            "category_id": 1,
            "iscrowd": 0,
            "segmentation": rle(square(h, w, 0, 4, 0, 5)),
        },
        # image 2: a crowd of people (partly covered by an airplane instance), polygon airplane
        {
            "id": 3,
            "image_id": 2,
            "category_id": 1,
            "iscrowd": 1,
            "segmentation": rle(square(h, w, 0, 6, 4, 8)),
        },
        {
            "id": 4,
            "image_id": 2,
            "category_id": 5,
            "iscrowd": 0,
            "segmentation": [[4.0, 0.0, 6.0, 0.0, 6.0, 2.0, 4.0, 2.0]],
        },
    ]
    for a in anns:
        a.update(area=1.0, bbox=[0, 0, 1, 1])
    return {
        "images": [
            {"id": 1, "file_name": "COCO_val2014_000000000001.jpg", "width": w, "height": h},
            {"id": 2, "file_name": "COCO_val2014_000000000002.jpg", "width": w, "height": h},
            {"id": 3, "file_name": "COCO_val2014_000000000003.jpg", "width": w, "height": h},
        ],
        "annotations": anns,
        "categories": [
            {"id": 1, "name": "person", "supercategory": "person"},
            {"id": 5, "name": "airplane", "supercategory": "vehicle"},
            {"id": 18, "name": "dog", "supercategory": "animal"},
        ],
    }


@pytest.fixture
def coco_root(tmp_path: Path) -> Path:
    (tmp_path / "coco" / "annotations").mkdir(parents=True)
    (tmp_path / "coco" / "annotations" / "instances_val2014.json").write_text(json.dumps(coco_instances()))
    return tmp_path / "coco"


# ---------------------------------------------------------------------------------------------
# Class names
# ---------------------------------------------------------------------------------------------


def test_name_key_folds_aliases_case_and_punctuation():
    assert ev.name_key("airplane") == ev.name_key("aeroplane")
    assert ev.name_key("Dining Table") == ev.name_key("diningtable") == ev.name_key("dining_table")
    assert ev.name_key("tv") == ev.name_key("tvmonitor")
    assert ev.name_key("couch") == ev.name_key("sofa")
    assert ev.name_key("motorcycle") == ev.name_key("motorbike")
    assert ev.name_key("potted plant") == ev.name_key("pottedplant")
    assert ev.name_key("cat") != ev.name_key("car")


def test_match_classes_aliases_and_error_lists_unmatched():
    match = ev.match_classes(["aeroplane", "sofa", "dog"], ["dog", "airplane", "couch"])
    assert match.pred_to_gt == (1, 2, 0)
    assert {"pred": "aeroplane", "gt": "airplane"} in match.to_json()["renamed"]
    with pytest.raises(UsageError) as info:
        ev.match_classes(["aeroplane", "zebra", "unicorn"], ["airplane", "dog"])
    message = str(info.value)
    assert "zebra, unicorn" in message and "no prediction class: dog" in message
    assert "\n" not in message
    relaxed = ev.match_classes(["aeroplane", "zebra"], ["airplane", "dog"], allow_unmatched=True)
    assert relaxed.pred_to_gt == (0, None) and relaxed.unmatched_gt == ("dog",)


def test_match_classes_rejects_two_predictions_for_one_class():
    with pytest.raises(UsageError, match="both match"):
        ev.match_classes(["sofa", "couch"], ["sofa"])


# ---------------------------------------------------------------------------------------------
# AP
# ---------------------------------------------------------------------------------------------


def reference_ap(scores: np.ndarray, positives: np.ndarray) -> float:
    """The paper's formula on a strict order: mean precision at the rank of each positive."""
    order = np.argsort(-scores)
    hits = positives[order]
    precision = np.cumsum(hits) / np.arange(1, len(hits) + 1)
    return float(precision[hits].mean())


@pytest.mark.parametrize("seed", range(5))
def test_ap_equals_sklearn_and_reference_without_ties(seed):
    rng = np.random.default_rng(seed)
    n = 200
    scores = rng.permutation(n) / n + rng.random(n) * 1e-4  # distinct
    positives = rng.random(n) < 0.3
    ours = ev.average_precision(scores, positives)
    assert ours == pytest.approx(average_precision_score(positives, scores), abs=1e-12)
    assert ours == pytest.approx(reference_ap(scores, positives), abs=1e-12)


def test_ap_with_ties_hand_computed():
    # Sorted: 0.9 (neg) | 0.5, 0.5, 0.5 (pos, pos, neg tied). One threshold at 0.5:
    # precision after the tied group = 2/4, both positives get it -> AP = 0.5.
    # (Pessimistic order would give (1/3 + 2/4) / 2 = 0.4167; optimistic (1/2 + 2/3) / 2 = 0.5833.)
    scores = np.array([0.5, 0.9, 0.5, 0.5])
    positives = np.array([True, False, False, True])
    assert ev.average_precision(scores, positives) == pytest.approx(0.5)
    # Same result whatever the input order of the tied items.
    assert ev.average_precision(scores[::-1], positives[::-1]) == pytest.approx(0.5)
    # A second case: 0.9 pos | 0.8 pos, 0.8 neg | 0.7 pos -> (1 + 2/3 + 3/4) / 3.
    scores = np.array([0.9, 0.8, 0.8, 0.7, 0.6])
    positives = np.array([True, False, True, True, False])
    assert ev.average_precision(scores, positives) == pytest.approx((1 + 2 / 3 + 3 / 4) / 3)


def test_ap_with_ties_equals_sklearn():
    rng = np.random.default_rng(7)
    scores = rng.integers(0, 6, size=300).astype(float)  # many ties
    positives = rng.random(300) < 0.4
    assert ev.average_precision(scores, positives) == pytest.approx(
        average_precision_score(positives, scores), abs=1e-12
    )


def test_ap_voc07_hand_computed():
    # precisions 1, 1/2, 2/3, 1/2 at recalls 1/2, 1/2, 1, 1:
    # levels 0..0.5 -> 1 (6 levels), 0.6..1 -> 2/3 (5 levels)
    scores = np.array([0.9, 0.8, 0.7, 0.6])
    positives = np.array([True, False, True, False])
    assert ev.average_precision(scores, positives, "voc07") == pytest.approx((6 + 5 * 2 / 3) / 11)
    assert ev.average_precision(scores, positives, "paper") == pytest.approx((1 + 2 / 3) / 2)


def test_ap_no_positive_is_nan_and_perfect_is_one():
    assert math.isnan(ev.average_precision(np.array([0.1, 0.2]), np.array([False, False])))
    assert ev.average_precision(np.array([0.9, 0.8, 0.1]), np.array([True, True, False])) == 1.0


def test_ap_per_class_ignores_ignored_cells():
    scores = np.array([[0.9, 0.1], [0.8, 0.2], [0.7, 0.3]])
    labels = np.array([[0, 0], [IGNORE, 0], [1, 0]], dtype=np.int8)
    ap = ev.ap_per_class(scores, labels)
    # class 0 over images 0 and 2: ranking neg, pos -> 1/2 ; class 1 has no positive
    assert ap[0] == pytest.approx(0.5)
    assert math.isnan(ap[1])


# ---------------------------------------------------------------------------------------------
# Tags P/R/F1
# ---------------------------------------------------------------------------------------------


def test_tag_prf_hand_computed():
    predicted = np.array([[1, 0, 1], [1, 1, 0], [0, 0, 0]], dtype=bool)
    labels = np.array([[1, 0, 0], [1, 0, IGNORE], [0, 1, 0]], dtype=np.int8)
    out = ev.tag_prf(predicted, labels)
    # cells: TP (0,0), (1,0); FP (0,2), (1,1); FN (2,1)
    assert out["overall"]["precision"] == pytest.approx(2 / 4)
    assert out["overall"]["recall"] == pytest.approx(2 / 3)
    assert out["overall"]["f1"] == pytest.approx(2 * 0.5 * (2 / 3) / (0.5 + 2 / 3))
    # per class: class 0 P=1 R=1; class 1 P=0 R=0; class 2 has no positive -> not in the mean
    assert out["per_class"]["precision"] == pytest.approx(0.5)
    assert out["per_class"]["recall"] == pytest.approx(0.5)
    assert math.isnan(out["recall"][2])


# ---------------------------------------------------------------------------------------------
# Confusion matrix / mIoU
# ---------------------------------------------------------------------------------------------


def test_confusion_miou_hand_computed_with_ignore():
    gt1 = np.array([[0, 0, 1], [1, IGNORE, 2]])
    pr1 = np.array([[0, 1, 1], [1, 2, 2]])
    gt2 = np.array([[2, 2], [0, IGNORE]])
    pr2 = np.array([[2, 0], [0, 0]])
    cm = ev.ConfusionMatrix(3)
    cm.update(gt1, pr1)
    cm.update(gt2, pr2)
    # Non-ignored pairs (gt, pred): (0,0) (0,1) (1,1) (1,1) (2,2) | (2,2) (2,0) (0,0)
    expected = np.zeros((3, 4), dtype=np.int64)
    for g, p in [(0, 0), (0, 1), (1, 1), (1, 1), (2, 2), (2, 2), (2, 0), (0, 0)]:
        expected[g, p] += 1
    np.testing.assert_array_equal(cm.matrix, expected)
    s = cm.summary()
    # IoU0 = 2 / (3 + 3 - 2) = 1/2 ; IoU1 = 2 / (2 + 3 - 2) = 2/3 ; IoU2 = 2 / (3 + 2 - 2) = 2/3
    np.testing.assert_allclose(s["iou"], [1 / 2, 2 / 3, 2 / 3])
    assert s["miou"] == pytest.approx((1 / 2 + 2 / 3 + 2 / 3) / 3)
    assert s["pixel_accuracy"] == pytest.approx(6 / 8)


def test_confusion_void_column_and_absent_class():
    cm = ev.ConfusionMatrix(3)
    gt = np.array([[0, 0, 1, 1]])
    pred = np.array([[0, 3, 1, 2]])  # 3 = void (predicted none of the classes)
    cm.update(gt, pred)
    s = cm.summary()
    # class 0: TP 1, GT 2, pred 1 -> 1/2 ; class 1: TP 1, GT 2, pred 1 -> 1/2 ; class 2 absent in GT
    np.testing.assert_allclose(s["iou"], [0.5, 0.5, 0.0])
    assert s["miou"] == pytest.approx(0.5)  # class 2 has no ground-truth pixel: not in the mean
    assert s["void_pixels"] == 1
    assert s["pixel_accuracy"] == pytest.approx(2 / 4)


def test_confusion_rejects_out_of_range_and_shape_mismatch():
    cm = ev.ConfusionMatrix(2)
    with pytest.raises(ValueError):
        cm.update(np.array([[0, 2]]), np.array([[0, 0]]))
    with pytest.raises(ValueError):
        cm.update(np.array([[0, 1]]), np.array([[0, 0, 0]]))


@settings(max_examples=40, deadline=None)
@given(
    st.integers(1, 6),
    st.lists(st.tuples(st.integers(1, 5), st.integers(1, 5), st.integers(0, 2**31 - 1)), min_size=1, max_size=4),
)
def test_property_perfect_prediction_has_miou_one(k, shapes):
    cm = ev.ConfusionMatrix(k)
    for h, w, seed in shapes:
        gt = np.random.default_rng(seed).integers(-1, k, size=(h, w))
        cm.update(gt, np.where(gt == IGNORE, 0, gt))
    s = cm.summary()
    if s["present"].any():
        assert s["miou"] == pytest.approx(1.0)
        assert s["pixel_accuracy"] == pytest.approx(1.0)


# ---------------------------------------------------------------------------------------------
# Ground-truth loaders
# ---------------------------------------------------------------------------------------------


def test_voc2007_labels_and_difficult_modes(voc2007: Path):
    c = {n: i for i, n in enumerate(ev.VOC_CLASSES)}
    gt = ev.load_ground_truth("voc2007", voc2007)
    assert [im.key for im in gt.images] == list(VOC07_OBJECTS)
    labels = gt.labels(gt.images)
    assert labels.shape == (5, 20)
    assert labels[0, c["dog"]] == labels[0, c["person"]] == 1 and labels[0].sum() == 2
    assert labels[2, c["chair"]] == 1  # difficult counted as positive by default
    assert labels[3, c["person"]] == 1 and labels[3, c["car"]] == 1
    neg = ev.load_ground_truth("voc2007", voc2007, difficult="negative")
    lab = neg.labels(neg.images)
    assert lab[2, c["chair"]] == 0 and lab[3, c["person"]] == 0 and lab[3, c["car"]] == 1
    ign = ev.load_ground_truth("voc2007", voc2007, difficult="ignore")
    lab = ign.labels(ign.images)
    assert lab[2, c["chair"]] == IGNORE and lab[3, c["person"]] == IGNORE
    assert lab[3, c["car"]] == 1  # one non-difficult car is enough
    assert lab[4, c["pottedplant"]] == IGNORE


def test_voc2007_bad_inputs_name_the_file(voc2007: Path):
    base = voc2007 / "VOC2007"
    (base / "Annotations" / "000002.xml").write_text(voc_xml([("unicorn", False)]))
    gt = ev.load_ground_truth("voc2007", voc2007)
    with pytest.raises(UsageError, match=r"000002\.xml: unknown VOC class 'unicorn'"):
        gt.labels(gt.images)
    (base / "Annotations" / "000002.xml").write_text("<annotation><object>")
    with pytest.raises(UsageError, match=r"000002\.xml: cannot parse"):
        gt.labels(gt.images)
    split = base / "mine.txt"
    split.write_text("000001\n000009\n")
    only = ev.load_ground_truth("voc2007", voc2007, split)
    with pytest.raises(UsageError, match=r"000009\.xml: annotation file not found"):
        only.labels(only.images)
    with pytest.raises(UsageError, match="no Annotations"):
        ev.load_ground_truth("voc2007", voc2007.parent / "VOCdevkit" / "VOC2007" / "ImageSets")


def test_voc2012_maps_labels_and_ignore(voc2012: Path):
    gt = ev.load_ground_truth("voc2012", voc2012)
    assert gt.map_classes[0] == "background" and len(gt.map_classes) == 21
    m = gt.load_map(gt.images[0])
    expected = VOC12_MAPS["2007_000001"].copy()
    expected[expected == 255] = IGNORE
    np.testing.assert_array_equal(m, expected)
    labels = gt.labels(gt.images)
    assert np.flatnonzero(labels[0]).tolist() == [0, 14]  # aeroplane, person
    assert np.flatnonzero(labels[1]).tolist() == [19]  # tvmonitor
    write_png(voc2012 / "SegmentationClass" / "2007_000002.png", np.array([[0, 37]]))
    with pytest.raises(UsageError, match=r"2007_000002\.png: ground-truth value 37"):
        gt.load_map(gt.images[1])


def test_coco_labels_default_split_and_aliases(coco_root: Path):
    gt = ev.load_ground_truth("coco2014", coco_root)
    assert gt.label_classes == ("person", "airplane", "dog")
    assert [im.coco_id for im in gt.images] == [1, 2]  # image 3 has no annotation
    labels = gt.labels(gt.images)
    np.testing.assert_array_equal(labels, [[1, 0, 1], [1, 1, 0]])  # crowd person counts as present


def test_coco_object_overlap_and_crowd_rules(coco_root: Path):
    gt = ev.load_ground_truth("coco-object", coco_root)
    m1 = gt.load_map(gt.images[0])
    expected = np.zeros((6, 8), dtype=int)
    expected[0:4, 0:5] = 1  # person (index 0 -> value 1)
    expected[1:3, 1:3] = 3  # the smaller dog is on top
    np.testing.assert_array_equal(m1, expected)
    m2 = gt.load_map(gt.images[1])
    airplane = decode_segmentation([[4.0, 0.0, 6.0, 0.0, 6.0, 2.0, 4.0, 2.0]], 6, 8, "x")
    expected = np.zeros((6, 8), dtype=int)
    expected[:, 4:8] = IGNORE  # crowd region ignored ...
    expected[airplane] = 2  # ... except where a non-crowd instance covers it
    np.testing.assert_array_equal(m2, expected)


def test_rasterise_ties_higher_annotation_id_on_top():
    a = square(4, 4, 0, 2, 0, 2).astype(bool)
    b = square(4, 4, 1, 3, 1, 3).astype(bool)
    out = ev.rasterise_instances(
        [(4, 7, a, {"category_id": 1}), (4, 9, b, {"category_id": 2})],
        np.zeros((4, 4), bool),
        {1: 0, 2: 1},
        4,
        4,
    )
    assert out[1, 1] == 2


def test_coco_split_file_and_unknown_entries(coco_root: Path, tmp_path: Path):
    split = tmp_path / "split.txt"
    split.write_text("COCO_val2014_000000000003 0\n1\n")  # by file stem and by id
    gt = ev.load_ground_truth("coco2014", coco_root, split)
    assert [im.coco_id for im in gt.images] == [3, 1]
    split.write_text("COCO_val2014_000000000003\nnope\n")
    with pytest.raises(UsageError, match=r"split\.txt: 1 entries have no coco2014 ground truth \(e\.g\. nope\)"):
        ev.load_ground_truth("coco2014", coco_root, split)


def test_coco_bad_file_is_one_line_error(tmp_path: Path):
    bad = tmp_path / "inst.json"
    bad.write_text("{not json")
    with pytest.raises(UsageError, match=r"inst\.json: cannot read COCO annotation file"):
        ev.load_ground_truth("coco", bad)
    bad.write_text(json.dumps({"images": []}))
    with pytest.raises(UsageError, match="not a COCO instances file"):
        ev.load_ground_truth("coco", bad)


def test_cocostuff_mapping_table():
    assert len(ev.COCOSTUFF_FINE_NAMES) == 182 and len(ev.COCOSTUFF_FINE_TO_COARSE) == 182
    assert len(ev.COCOSTUFF_COARSE_NAMES) == 27 and len(set(ev.COCOSTUFF_COARSE_NAMES)) == 27
    used = [i for i in range(182) if i not in ev.COCOSTUFF_UNUSED]
    assert len(used) == 171
    assert set(ev.COCOSTUFF_FINE_TO_COARSE) == set(range(27))
    # Things (0-90) map to the 12 thing supercategories, stuff (91-181) to the 15 stuff ones.
    assert {ev.COCOSTUFF_FINE_TO_COARSE[i] for i in range(91)} == set(range(12))
    assert {ev.COCOSTUFF_FINE_TO_COARSE[i] for i in range(91, 182)} == set(range(12, 27))
    name = dict(zip(ev.COCOSTUFF_FINE_NAMES, ev.COCOSTUFF_FINE_TO_COARSE, strict=True))
    coarse = ev.COCOSTUFF_COARSE_NAMES
    for fine, expected in [
        ("person", "person"), ("tv", "electronic"), ("banana", "food-things"), ("salad", "food-stuff"),
        ("wall-brick", "wall"), ("window-blind", "window"), ("sky-other", "sky"), ("sea", "water"),
        ("wood", "solid"), ("grass", "plant"), ("road", "ground"), ("cabinet", "furniture-stuff"),
        ("bed", "furniture-things"), ("skyscraper", "building"), ("fence", "structural"),
    ]:  # fmt: skip
        assert coarse[name[fine]] == expected, fine


def test_cocostuff27_maps_and_fine_labels(tmp_path: Path):
    raw = np.array([[0, 156, 255], [183, 71, 168]])  # person, sky-other, unlabeled, junk, tv, tree
    write_png(tmp_path / "stuffthingmaps_trainval2017" / "val2017" / "000000000139.png", raw, palette=False)
    gt = ev.load_ground_truth("coco-stuff-27", tmp_path)
    assert gt.map_background is None and len(gt.map_classes) == 27
    coarse = {n: i for i, n in enumerate(ev.COCOSTUFF_COARSE_NAMES)}
    np.testing.assert_array_equal(
        gt.load_map(gt.images[0]),
        [[coarse["person"], coarse["sky"], IGNORE], [IGNORE, coarse["electronic"], coarse["plant"]]],
    )
    assert len(gt.label_classes) == 171
    labels = gt.labels(gt.images)
    assert sorted(gt.label_classes[i] for i in np.flatnonzero(labels[0])) == [
        "person",
        "sky-other",
        "tree",
        "tv",
    ]


def test_folder_ground_truth_with_background(tmp_path: Path):
    (tmp_path / "labels").mkdir()
    write_png(tmp_path / "labels" / "a.png", np.array([[0, 1], [2, 255]]))
    classes = tmp_path / "classes.txt"
    classes.write_text("background\nairplane\ncat  # felines\n")
    gt = ev.load_ground_truth("folder", tmp_path / "labels", classes_file=classes)
    assert gt.map_classes == ("background", "airplane", "cat") and gt.map_background == 0
    assert gt.label_classes == ("airplane", "cat")
    np.testing.assert_array_equal(gt.load_map(gt.images[0]), [[0, 1], [2, IGNORE]])
    np.testing.assert_array_equal(gt.labels(gt.images), [[1, 1]])
    with pytest.raises(UsageError, match="--classes"):
        ev.load_ground_truth("folder", tmp_path / "labels")
    write_png(tmp_path / "labels" / "a.png", np.array([[0, 4]]))
    with pytest.raises(UsageError, match=r"a\.png: ground-truth value 4"):
        gt.load_map(gt.images[0])


def test_folder_dataset_layout_one_based_classes(tmp_path: Path):
    # The layout of tagclip_cli.synthetic: ROOT/labels/*.png, ROOT/classes.txt without background.
    write_png(tmp_path / "labels" / "000001.png", np.array([[0, 1], [2, 2]]), palette=False)
    (tmp_path / "classes.txt").write_text("circle\nsquare\n")
    gt = ev.load_ground_truth("folder", tmp_path)
    assert gt.map_classes == ("background", "circle", "square") and gt.map_background == 0
    assert [im.key for im in gt.images] == ["000001"]
    np.testing.assert_array_equal(gt.load_map(gt.images[0]), [[0, 1], [2, 2]])
    np.testing.assert_array_equal(gt.labels(gt.images), [[1, 1]])


def test_rgb_label_png_is_rejected(tmp_path: Path):
    path = tmp_path / "x.png"
    Image.new("RGB", (2, 2)).save(path)
    with pytest.raises(UsageError, match=r"x\.png: label PNG must be single-channel"):
        ev.read_label_png(path)


# ---------------------------------------------------------------------------------------------
# Predictions and the driver
# ---------------------------------------------------------------------------------------------


def voc_scores(rng, objects) -> list[float]:
    present = {n for n, _ in objects}
    return [float(rng.random() + (1.0 if c in present else 0.0)) for c in ev.VOC_CLASSES]


def test_evaluate_voc2007_tags_matches_direct_computation(voc2007: Path, tmp_path: Path):
    rng = np.random.default_rng(0)
    rows = []
    score_rows = []
    for name, objects in VOC07_OBJECTS.items():
        scores = voc_scores(rng, objects)
        score_rows.append(scores)
        tags = [ev.VOC_CLASSES[int(np.argmax(scores))]]
        rows.append((f"JPEGImages/{name}.jpg", f"/data/JPEGImages/{name}.jpg", scores, tags))
    rows.append(("JPEGImages/000099.jpg", "/data/JPEGImages/000099.jpg", None, []))  # failed, not in GT
    pred = write_tags_parquet(tmp_path / "tags.parquet", ev.VOC_CLASSES, rows)
    report = ev.evaluate(ev.EvaluateConfig(gt="voc2007", root=voc2007, pred=pred))
    gt = ev.load_ground_truth("voc2007", voc2007)
    labels = gt.labels(gt.images)
    scores = np.array(score_rows, dtype=np.float32)
    expected = [average_precision_score(labels[:, c], scores[:, c]) for c in range(20) if labels[:, c].any()]
    assert report["metrics"]["mAP"] == pytest.approx(np.mean(expected))
    assert report["metrics"]["classes_in_mAP"] == len(expected)
    assert len(report["metrics"]["classes_without_positives"]) == 20 - len(expected)
    assert report["images"]["evaluated"] == 5 and report["images"]["predictions_not_in_ground_truth"] == 1
    json.dumps(report, allow_nan=False)


def test_evaluate_failed_rows_are_excluded_and_counted(voc2007: Path, tmp_path: Path):
    rng = np.random.default_rng(1)
    rows = [(f"{n}.jpg", f"{n}.jpg", voc_scores(rng, o), ["dog"]) for n, o in VOC07_OBJECTS.items()]
    rows[1] = (rows[1][0], rows[1][1], None, [])
    pred = write_tags_parquet(tmp_path / "tags.parquet", ev.VOC_CLASSES, rows)
    report = ev.evaluate(ev.EvaluateConfig(gt="voc2007", root=voc2007, pred=pred))
    assert report["images"]["failed"] == 1 and report["images"]["evaluated"] == 4
    train = next(r for r in report["metrics"]["per_class"] if r["class"] == "train")
    assert train["ap"] is None and train["positives"] == 0  # its only image failed
    dog = next(r for r in report["metrics"]["per_class"] if r["class"] == "dog")
    assert dog["tagged"] == 4 and dog["precision"] == pytest.approx(1 / 4) and dog["recall"] == 1.0


def test_evaluate_coco_tags_with_alias_names_and_missing(coco_root: Path, tmp_path: Path, caplog):
    rows = [
        (
            "COCO_val2014_000000000001.jpg",
            "val/COCO_val2014_000000000001.jpg",
            [0.9, 0.1, 0.8],
            ["person", "dog"],
        )
    ]
    pred = write_tags_parquet(tmp_path / "t.parquet", ["person", "aeroplane", "dog"], rows)
    report = ev.evaluate(ev.EvaluateConfig(gt="coco2014", root=coco_root, pred=pred))
    assert report["images"]["missing_prediction"] == 1 and report["images"]["evaluated"] == 1
    assert {"pred": "aeroplane", "gt": "airplane"} in report["class_matching"]["renamed"]
    assert report["metrics"]["mAP"] == 1.0
    assert "have no prediction" in caplog.text
    with pytest.raises(UsageError, match="1 of 2 ground-truth images have no prediction"):
        ev.evaluate(ev.EvaluateConfig(gt="coco2014", root=coco_root, pred=pred, require_all=True))
    bad = write_tags_parquet(tmp_path / "b.parquet", ["person", "plane", "dog"], rows)
    with pytest.raises(UsageError, match="prediction classes not in the coco2014 ground truth: plane"):
        ev.evaluate(ev.EvaluateConfig(gt="coco2014", root=coco_root, pred=bad))


def test_evaluate_voc2012_masks_json_and_png_dir(voc2012: Path, tmp_path: Path):
    pred1 = np.array([[0, 1, 1, 1], [0, 0, 1, 1], [15, 0, 0, 0]])
    pred2 = np.array([[20, 0, 0, 0], [20, 20, 0, 0], [0, 0, 0, 7]])
    masks = write_coco_masks(
        tmp_path / "masks.json",
        ev.VOC_CLASSES,
        [("JPEGImages/2007_000001.jpg", pred1), ("JPEGImages/2007_000002.jpg", pred2)],
    )
    cm = ev.ConfusionMatrix(21)
    for name, pred in zip(VOC12_MAPS, (pred1, pred2), strict=True):
        gt = VOC12_MAPS[name].copy()
        gt[gt == 255] = IGNORE
        cm.update(gt, pred)
    expected = cm.summary()
    report = ev.evaluate(ev.EvaluateConfig(gt="voc2012", root=voc2012, pred=masks))
    assert report["metrics"]["mIoU"] == pytest.approx(expected["miou"])
    per = {r["class"]: r for r in report["metrics"]["per_class"]}
    # Hand check of three classes: aeroplane GT 4 px, pred 5 px, TP 4 -> 4/5
    assert per["aeroplane"]["iou"] == pytest.approx(4 / 5)
    # person GT 2, pred 1, TP 1 -> 1/2 ; tvmonitor GT 3, pred 2 (the third is on a 255 pixel), TP 2
    assert per["person"]["iou"] == pytest.approx(1 / 2)
    assert per["tvmonitor"]["iou"] == pytest.approx(2 / 3)
    # car predicted but absent from the ground truth: IoU 0, not in the mean
    assert per["car"]["iou"] == 0.0 and not per["car"]["in_mean"]
    assert report["metrics"]["classes_in_mIoU"] == 4  # background, aeroplane, person, tvmonitor

    png_dir = tmp_path / "pngs"
    write_png(png_dir / "JPEGImages" / "2007_000001.png", pred1)
    write_png(png_dir / "JPEGImages" / "2007_000002.png", pred2)
    with pytest.raises(UsageError, match="--vocab"):
        ev.evaluate(ev.EvaluateConfig(gt="voc2012", root=voc2012, pred=png_dir))
    report2 = ev.evaluate(ev.EvaluateConfig(gt="voc2012", root=voc2012, pred=png_dir, vocab="voc"))
    assert report2["metrics"]["mIoU"] == pytest.approx(expected["miou"])
    assert report2["metrics"]["confusion"] == report["metrics"]["confusion"]


def test_evaluate_masks_size_mismatch_is_an_error(voc2012: Path, tmp_path: Path):
    masks = write_coco_masks(tmp_path / "m.json", ev.VOC_CLASSES, [("2007_000001.jpg", np.zeros((2, 2), int))])
    with pytest.raises(UsageError, match=r"prediction for '2007_000001' is 2x2 but the ground truth is 4x3"):
        ev.evaluate(ev.EvaluateConfig(gt="voc2012", root=voc2012, pred=masks))


def test_evaluate_coco_object_masks(coco_root: Path, tmp_path: Path):
    gt = ev.load_ground_truth("coco-object", coco_root)
    perfect = [(f"COCO_val2014_00000000000{i}.jpg", np.where(gt.load_map(im) < 0, 0, gt.load_map(im)))
               for i, im in zip((1, 2), gt.images, strict=True)]  # fmt: skip
    masks = write_coco_masks(tmp_path / "m.json", ["person", "aeroplane", "dog"], perfect)
    report = ev.evaluate(ev.EvaluateConfig(gt="coco-object", root=coco_root, pred=masks))
    assert report["metrics"]["mIoU"] == pytest.approx(1.0)
    assert report["metrics"]["pixel_accuracy"] == pytest.approx(1.0)


def test_evaluate_cocostuff_with_fine_names(tmp_path: Path):
    raw = np.array([[0, 156], [71, 168]])  # person, sky-other, tv, tree
    write_png(tmp_path / "gt" / "000000000139.png", raw, palette=False)
    fine = [ev.COCOSTUFF_FINE_NAMES[i] for i in range(182) if i not in ev.COCOSTUFF_UNUSED]
    value = {n: i + 1 for i, n in enumerate(fine)}
    pred = np.array([[value["person"], value["clouds"]], [0, value["bush"]]])  # clouds -> sky, bush -> plant
    masks = write_coco_masks(tmp_path / "m.json", fine, [("val2017/000000000139.jpg", pred)])
    report = ev.evaluate(ev.EvaluateConfig(gt="coco-stuff-27", root=tmp_path / "gt", pred=masks))
    per = {r["class"]: r for r in report["metrics"]["per_class"]}
    assert per["person"]["iou"] == per["sky"]["iou"] == per["plant"]["iou"] == 1.0
    assert per["electronic"]["iou"] == 0.0  # predicted "background": a miss
    assert report["metrics"]["mIoU"] == pytest.approx(3 / 4)
    assert report["metrics"]["unlabelled_prediction_pixels"] == 1


def test_voc2007_rejects_mask_predictions(voc2007: Path, tmp_path: Path):
    masks = write_coco_masks(tmp_path / "m.json", ev.VOC_CLASSES, [])
    with pytest.raises(UsageError, match="image-level ground truth only"):
        ev.evaluate(ev.EvaluateConfig(gt="voc2007", root=voc2007, pred=masks))


def test_bad_prediction_files(voc2007: Path, tmp_path: Path):
    junk = tmp_path / "x.bin"
    junk.write_bytes(b"\x00\x01\x02\x03")
    with pytest.raises(UsageError, match=r"x\.bin: not a tags Parquet"):
        ev.evaluate(ev.EvaluateConfig(gt="voc2007", root=voc2007, pred=junk))
    table = pa.table({"image_id": ["a"], "path": ["a"], "status": ["ok"], "tags": [["dog"]], "scores": [[0.1]]})
    nometa = tmp_path / "n.parquet"
    pq.write_table(table, nometa)
    with pytest.raises(UsageError, match=r"n\.parquet: no 'tagclip' metadata"):
        ev.read_tags_parquet(nometa)
    short = write_tags_parquet(tmp_path / "s.parquet", ["dog", "cat"], [("a", "a", [0.1], ["dog"])])
    with pytest.raises(UsageError, match=r"row 0 \(a\) has 1 scores, expected 2"):
        ev.read_tags_parquet(short)


def test_write_report_is_valid_json(tmp_path: Path):
    path = tmp_path / "r.json"
    ev.write_report({"a": np.int64(1), "b": [math.nan, np.float32(0.5)], "c": np.array([1.0, np.nan])}, path)
    assert json.loads(path.read_text()) == {"a": 1, "b": [None, 0.5], "c": [1.0, None]}
    assert [p.name for p in tmp_path.iterdir()] == ["r.json"]


# ---------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------


def run_cli(args):
    from typer.testing import CliRunner

    from tagclip_cli.cli import app

    return CliRunner().invoke(app, ["evaluate", *args])


def test_cli_evaluate_writes_report_and_table(voc2007: Path, tmp_path: Path):
    rng = np.random.default_rng(3)
    rows = [(f"{n}.jpg", f"{n}.jpg", voc_scores(rng, o), ["person"]) for n, o in VOC07_OBJECTS.items()]
    pred = write_tags_parquet(tmp_path / "tags.parquet", ev.VOC_CLASSES, rows)
    out = tmp_path / "report.json"
    result = run_cli(["--gt", "voc2007", "--root", str(voc2007), "--tags", str(pred), "--report", str(out)])
    assert result.exit_code == 0, result.output
    assert "mAP" in result.output and "aeroplane" in result.output
    report = json.loads(out.read_text())
    assert report["settings"]["gt"] == "voc2007" and report["images"]["evaluated"] == 5
    assert report["metric_settings"]["ap"] == "paper"
    assert any("difficult objects: counted as positives" in n for n in report["settings"]["notes"])
    assert f"{100 * report['metrics']['mAP']:.2f}" in result.output
    voc07 = run_cli(["--gt", "voc2007", "--root", str(voc2007), "--tags", str(pred), "--ap", "voc07"])
    assert voc07.exit_code == 0 and "VOC07 11-point" in voc07.output


@pytest.mark.parametrize(
    "args, message",
    [
        (["--gt", "imagenet"], "--gt must be one of"),
        (["--gt", "voc2012"], "no SegmentationClass or SegmentationClassAug directory"),
        (["--gt", "voc2007", "--ap", "11pt"], "--ap must be one of"),
    ],
)
def test_cli_errors_are_one_line_exit_2(voc2007: Path, tmp_path: Path, args, message):
    pred = write_tags_parquet(tmp_path / "t.parquet", ev.VOC_CLASSES, [])
    result = run_cli(["--root", str(voc2007), "--tags", str(pred), *args])
    assert result.exit_code == 2
    assert message in result.output
    assert "Traceback" not in result.output
