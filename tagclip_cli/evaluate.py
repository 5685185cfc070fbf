"""`tagclip evaluate`: ground-truth loaders, pure-numpy metrics and the evaluation driver.

Three independent layers, each testable on its own:

* **Metrics** (pure numpy): :func:`average_precision`, :func:`ap_per_class`, :func:`tag_prf`,
  :class:`ConfusionMatrix`.
* **Ground truth**: VOC XML (``xml.etree``), label PNGs (PIL), COCO instances JSON (``pycocotools``
  for masks). Every loader yields :class:`GtImage` records in split order, image-level labels
  ``(N, F)`` and, where the dataset has them, one semantic map ``(H, W)`` at a time.
* **Predictions**: our tags Parquet, our COCO RLE JSON, or a directory of label PNGs.

Rules (they are also written into every JSON report):

* **AP** ("paper", ALGORITHM.md section 6): per class, over all evaluated images, the mean of the
  precision at the rank of each positive. *Ties*: the reference sorts with ``torch.sort`` whose
  order among equal scores is undefined, so we define it: equal scores form one threshold, and
  every positive in a tied group gets the precision measured after the whole group. This is the
  convention of scikit-learn's ``average_precision_score`` (so the two agree with or without
  ties) and it is neither the optimistic nor the pessimistic order. Without ties it is exactly
  the reference formula. ``voc07`` is the 11-point interpolated variant (recall 0, 0.1, ..., 1).
* **Classes with no positive image** get no AP and are left out of the mean (the report lists
  them). The reference code would count them as 0; on the full VOC/COCO splits every class has
  positives, so the published numbers are the same either way.
* **Tags**: precision, recall and F1 of the ``tags`` column. "overall" pools every
  (image, class) cell (the reference's reported P/R/F1); "per-class" averages per-class precision
  and recall over classes with a positive and takes F1 of the two means (CP/CR/CF1).
* **mIoU**: one confusion matrix ``(K, K+1)`` accumulated over the whole set, one image at a time;
  ground-truth value 255 is ignored; the extra column counts pixels whose prediction is not one
  of the K classes (e.g. "background" on COCO-Stuff, which has no background class): they are
  misses for their ground-truth class and false positives for none. IoU_c = TP / (GT + Pred - TP);
  the mean is over classes with at least one ground-truth pixel (as the reference), background
  included when the dataset has it (VOC: 21 classes, COCO-Object: 81).
* **VOC difficult objects** (``voc2007``): counted as positives by default; ``negative`` or
  ``ignore`` (the image is left out of that class's AP and tag counts) on request.
* **COCO-Object maps** are rasterised from instance masks: background 0, category index + 1
  elsewhere; where instances overlap, the smaller instance (in pixels; ties: higher annotation id)
  is on top, since a small object overlapping a larger one is usually in front of it; crowd
  regions not covered by a non-crowd instance are ignored (255).
* **Image-level labels for COCO** come from every annotation, crowd ones included; the default
  COCO split is every image with at least one annotation (the reference lists: 40,137 images for
  val2014, 4,952 for val2017).
* **COCO-Stuff-27**: ground-truth PNGs hold the 182 fine ids (stuffthingmaps value = COCO-Stuff id
  - 1, 255 unlabeled), mapped to the 27 coarse classes. Segmentation predictions may use the 27
  coarse names or the (171 used) fine names, which are mapped to their coarse class. Tags are
  evaluated against the fine classes present in the map (171 classes), as the reference does.
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import math
import re
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from tagclip_cli import __version__
from tagclip_cli.errors import UsageError
from tagclip_cli.writers import atomic_path

log = logging.getLogger(__name__)

IGNORE = -1  # ground-truth pixel / label excluded from every count
RAW_IGNORE = 255  # the value that means "ignore" in ground-truth PNGs
_INVALID = -2  # a raw value that should never occur (an error naming the file)

GT_NAMES = ("voc2007", "voc2012", "coco2014", "coco2017", "coco-object", "coco-stuff-27", "coco", "folder")
AP_VARIANTS = ("paper", "voc07")
DIFFICULT_MODES = ("positive", "negative", "ignore")

# ---------------------------------------------------------------------------------------------
# Class vocabularies of the ground truth (facts: PASCAL VOC devkit; COCO-Stuff labels.txt)
# ---------------------------------------------------------------------------------------------

VOC_CLASSES: tuple[str, ...] = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train",
    "tvmonitor",
)  # fmt: skip

# COCO-Stuff fine classes indexed by the value in `stuffthingmaps_*` PNGs (= COCO-Stuff id - 1):
# 0-90 "things" (the 80 COCO classes plus 11 ids that were never annotated), 91-181 "stuff".
# Source: the COCO-Stuff release, labels.txt (github.com/nightrome/cocostuff).
COCOSTUFF_FINE_NAMES: tuple[str, ...] = (
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat",
    "traffic light", "fire hydrant", "street sign", "stop sign", "parking meter", "bench", "bird",
    "cat", "dog", "horse", "sheep", "cow", "elephant", "bear", "zebra", "giraffe", "hat",
    "backpack", "umbrella", "shoe", "eye glasses", "handbag", "tie", "suitcase", "frisbee", "skis",
    "snowboard", "sports ball", "kite", "baseball bat", "baseball glove", "skateboard", "surfboard",
    "tennis racket", "bottle", "plate", "wine glass", "cup", "fork", "knife", "spoon", "bowl",
    "banana", "apple", "sandwich", "orange", "broccoli", "carrot", "hot dog", "pizza", "donut",
    "cake", "chair", "couch", "potted plant", "bed", "mirror", "dining table", "window", "desk",
    "toilet", "door", "tv", "laptop", "mouse", "remote", "keyboard", "cell phone", "microwave",
    "oven", "toaster", "sink", "refrigerator", "blender", "book", "clock", "vase", "scissors",
    "teddy bear", "hair drier", "toothbrush", "hair brush",
    # stuff (91-181)
    "banner", "blanket", "branch", "bridge", "building-other", "bush", "cabinet", "cage",
    "cardboard", "carpet", "ceiling-other", "ceiling-tile", "cloth", "clothes", "clouds", "counter",
    "cupboard", "curtain", "desk-stuff", "dirt", "door-stuff", "fence", "floor-marble",
    "floor-other", "floor-stone", "floor-tile", "floor-wood", "flower", "fog", "food-other",
    "fruit", "furniture-other", "grass", "gravel", "ground-other", "hill", "house", "leaves",
    "light", "mat", "metal", "mirror-stuff", "moss", "mountain", "mud", "napkin", "net", "paper",
    "pavement", "pillow", "plant-other", "plastic", "platform", "playingfield", "railing",
    "railroad", "river", "road", "rock", "roof", "rug", "salad", "sand", "sea", "shelf",
    "sky-other", "skyscraper", "snow", "solid-other", "stairs", "stone", "straw",
    "structural-other", "table", "tent", "textile-other", "towel", "tree", "vegetable",
    "wall-brick", "wall-concrete", "wall-other", "wall-panel", "wall-stone", "wall-tile",
    "wall-wood", "water-other", "waterdrops", "window-blind", "window-other", "wood",
)  # fmt: skip

# The 11 "thing" ids defined but never annotated in COCO (street sign, hat, shoe, eye glasses,
# plate, mirror, window, desk, door, blender, hair brush): 182 - 11 = the 171 classes in use.
COCOSTUFF_UNUSED: frozenset[int] = frozenset({11, 25, 28, 29, 44, 65, 67, 68, 70, 82, 90})

# The 27 coarse classes (12 thing + 15 stuff supercategories) used by PiCIE, STEGO and TagCLIP.
# "food" and "furniture" exist both as a thing and a stuff supercategory; the suffix tells apart.
COCOSTUFF_COARSE_NAMES: tuple[str, ...] = (
    "electronic", "appliance", "food-things", "furniture-things", "indoor", "kitchen", "accessory",
    "animal", "outdoor", "person", "sports", "vehicle",
    "ceiling", "floor", "food-stuff", "furniture-stuff", "rawmaterial", "textile", "wall", "window",
    "building", "ground", "plant", "sky", "solid", "structural", "water",
)  # fmt: skip

# Fine value (0..181) -> coarse index (0..26): the COCO-Stuff supercategory hierarchy
# (cocostuff labels hierarchy; the same table is used by PiCIE, STEGO and the TagCLIP reference).
COCOSTUFF_FINE_TO_COARSE: tuple[int, ...] = (
    9,  # 0 person
    11, 11, 11, 11, 11, 11, 11, 11,  # 1-8 vehicle
    8, 8, 8, 8, 8, 8,  # 9-14 outdoor (traffic light .. bench)
    7, 7, 7, 7, 7, 7, 7, 7, 7, 7,  # 15-24 animal
    6, 6, 6, 6, 6, 6, 6, 6,  # 25-32 accessory
    10, 10, 10, 10, 10, 10, 10, 10, 10, 10,  # 33-42 sports
    5, 5, 5, 5, 5, 5, 5, 5,  # 43-50 kitchen
    2, 2, 2, 2, 2, 2, 2, 2, 2, 2,  # 51-60 food (things)
    3, 3, 3, 3, 3, 3, 3, 3, 3, 3,  # 61-70 furniture (things)
    0, 0, 0, 0, 0, 0,  # 71-76 electronic
    1, 1, 1, 1, 1, 1,  # 77-82 appliance
    4, 4, 4, 4, 4, 4, 4, 4,  # 83-90 indoor
    17, 17, 22, 20, 20, 22, 15, 25, 16, 13,  # 91-100 banner .. carpet
    12, 12, 17, 17, 23, 15, 15, 17, 15, 21,  # 101-110 ceiling-other .. dirt
    15, 25, 13, 13, 13, 13, 13, 22, 26, 14,  # 111-120 door-stuff .. food-other
    14, 15, 22, 21, 21, 24, 20, 22, 15, 17,  # 121-130 fruit .. mat
    16, 15, 22, 24, 21, 17, 25, 16, 21, 17,  # 131-140 metal .. pillow
    22, 16, 21, 21, 25, 21, 26, 21, 24, 20,  # 141-150 plant-other .. roof
    17, 14, 21, 26, 15, 23, 20, 21, 24, 15,  # 151-160 rug .. stairs
    24, 22, 25, 15, 20, 17, 17, 22, 14, 18,  # 161-170 stone .. wall-brick
    18, 18, 18, 18, 18, 18, 26, 26, 19, 19,  # 171-180 wall-concrete .. window-other
    24,  # 181 wood
)  # fmt: skip

# ---------------------------------------------------------------------------------------------
# Class-name matching
# ---------------------------------------------------------------------------------------------

# Names of one class in different datasets; the first is the form our vocabularies use.
ALIAS_GROUPS: tuple[tuple[str, ...], ...] = (
    ("aeroplane", "airplane"),
    ("motorbike", "motorcycle"),
    ("sofa", "couch"),
    ("tvmonitor", "tv", "tv monitor"),
    ("diningtable", "dining table"),
    ("pottedplant", "potted plant"),
    ("hair drier", "hair dryer"),
)


def _squash(name: str) -> str:
    return re.sub(r"[^0-9a-z]+", "", name.lower())


_ALIAS_KEY: dict[str, str] = {_squash(n): _squash(group[0]) for group in ALIAS_GROUPS for n in group}


def name_key(name: str) -> str:
    """Comparison key of a class name: lower case, letters and digits only, aliases folded.

    ``"Dining Table"``, ``"dining_table"`` and ``"diningtable"`` share a key; so do
    ``"airplane"`` and ``"aeroplane"``.
    """
    key = _squash(name)
    return _ALIAS_KEY.get(key, key)


@dataclass(frozen=True)
class ClassMatch:
    """How prediction classes map onto ground-truth classes."""

    pred_to_gt: tuple[int | None, ...]  # per prediction class: ground-truth index, or None
    pairs: tuple[tuple[str, str], ...]  # (prediction name, ground-truth name) for every match
    unmatched_pred: tuple[str, ...]
    unmatched_gt: tuple[str, ...]

    def to_json(self) -> dict[str, Any]:
        renamed = [{"pred": p, "gt": g} for p, g in self.pairs if p != g]
        return {
            "matched": len(self.pairs),
            "renamed": renamed,
            "unmatched_pred": list(self.unmatched_pred),
            "unmatched_gt": list(self.unmatched_gt),
            "rule": "case-insensitive, spaces/punctuation ignored, aliases "
            + ", ".join("/".join(g) for g in ALIAS_GROUPS),
        }


def match_classes(
    pred_names: Sequence[str],
    gt_names: Sequence[str],
    *,
    synonyms: Mapping[str, int] | None = None,
    skip_gt: Iterable[int] = (),
    one_to_one: bool = True,
    allow_unmatched: bool = False,
    what: str = "ground truth",
) -> ClassMatch:
    """Match prediction class names to ground-truth classes by :func:`name_key`.

    ``synonyms`` maps further names onto ground-truth indices (e.g. COCO-Stuff fine names onto
    coarse classes); with ``one_to_one`` two prediction classes may not share a ground-truth class.
    ``skip_gt`` (e.g. background) need no prediction class. Raises :class:`UsageError` listing the
    unmatched names unless ``allow_unmatched``.
    """
    lookup: dict[str, int] = {}
    for index, name in enumerate(gt_names):
        lookup.setdefault(name_key(name), index)
    for name, index in (synonyms or {}).items():
        lookup.setdefault(name_key(name), index)
    pred_to_gt: list[int | None] = []
    pairs: list[tuple[str, str]] = []
    unmatched_pred: list[str] = []
    claimed: dict[int, str] = {}
    for name in pred_names:
        index = lookup.get(name_key(name))
        if index is not None and one_to_one and index in claimed:
            raise UsageError(
                f"prediction classes '{claimed[index]}' and '{name}' both match the {what} class '{gt_names[index]}'"
            )
        pred_to_gt.append(index)
        if index is None:
            unmatched_pred.append(name)
        else:
            claimed[index] = name
            pairs.append((name, gt_names[index]))
    skip = set(skip_gt)
    unmatched_gt = [n for i, n in enumerate(gt_names) if i not in claimed and i not in skip]
    if (unmatched_pred or unmatched_gt) and not allow_unmatched:
        parts = []
        if unmatched_pred:
            parts.append(f"prediction classes not in the {what}: {', '.join(unmatched_pred)}")
        if unmatched_gt:
            parts.append(f"{what} classes with no prediction class: {', '.join(unmatched_gt)}")
        raise UsageError(
            "class names do not match; "
            + "; ".join(parts)
            + " (pass --allow-unmatched to evaluate the common classes only)"
        )
    return ClassMatch(tuple(pred_to_gt), tuple(pairs), tuple(unmatched_pred), tuple(unmatched_gt))


# ---------------------------------------------------------------------------------------------
# Metrics (pure numpy)
# ---------------------------------------------------------------------------------------------


def _threshold_curve(scores: np.ndarray, positives: np.ndarray) -> tuple[np.ndarray, ...]:
    """Precision, recall and number of positives at each distinct score, highest first."""
    order = np.argsort(-scores, kind="stable")
    sorted_scores = scores[order]
    sorted_pos = positives[order]
    tp = np.cumsum(sorted_pos)
    # The last index of each run of equal scores: one threshold per distinct score.
    ends = np.flatnonzero(np.r_[sorted_scores[1:] != sorted_scores[:-1], True])
    tp_at = tp[ends].astype(np.float64)
    precision = tp_at / (ends + 1)
    recall = tp_at / tp[-1]
    new_positives = np.diff(np.r_[0.0, tp_at])
    return precision, recall, new_positives


def average_precision(scores: np.ndarray, positives: np.ndarray, variant: str = "paper") -> float:
    """AP of one class. ``scores`` (N,) float, ``positives`` (N,) bool. NaN if no positive.

    ``paper``: mean of the precision at the rank of each positive; tied scores share the
    precision measured after the whole tied group (see the module docstring).
    ``voc07``: mean over recall levels 0, 0.1, ..., 1 of the best precision at recall >= level.
    """
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    positives = np.asarray(positives, dtype=bool).reshape(-1)
    if scores.shape != positives.shape:
        raise ValueError(f"scores {scores.shape} and positives {positives.shape} differ in shape")
    if not positives.any():
        return math.nan
    if not np.isfinite(scores).all():
        raise ValueError("scores contain NaN or infinity")
    precision, recall, new_positives = _threshold_curve(scores, positives)
    if variant == "paper":
        return float((new_positives * precision).sum() / new_positives.sum())
    if variant == "voc07":
        points = []
        for level in np.linspace(0.0, 1.0, 11):
            reached = recall >= level - 1e-12
            points.append(precision[reached].max() if reached.any() else 0.0)
        return float(np.mean(points))
    raise ValueError(f"unknown AP variant {variant!r} (choose from {', '.join(AP_VARIANTS)})")


def ap_per_class(scores: np.ndarray, labels: np.ndarray, variant: str = "paper") -> np.ndarray:
    """AP per column. ``scores`` (N, C) float; ``labels`` (N, C) int: 1 positive, 0 negative,
    ``IGNORE`` (-1) left out of that column. Returns (C,) float64, NaN for classes without a
    positive."""
    scores = np.asarray(scores)
    labels = np.asarray(labels)
    if scores.shape != labels.shape or scores.ndim != 2:
        raise ValueError(f"scores {scores.shape} and labels {labels.shape} must be the same (N, C)")
    out = np.full(scores.shape[1], math.nan)
    for c in range(scores.shape[1]):
        keep = labels[:, c] != IGNORE
        out[c] = average_precision(scores[keep, c], labels[keep, c] == 1, variant)
    return out


def _ratio(num: float, den: float) -> float:
    return float(num / den) if den > 0 else 0.0


def _f1(precision: float, recall: float) -> float:
    return 2 * precision * recall / (precision + recall) if precision + recall > 0 else 0.0


def tag_prf(predicted: np.ndarray, labels: np.ndarray) -> dict[str, Any]:
    """Precision / recall / F1 of predicted tags. ``predicted`` (N, C) bool; ``labels`` (N, C) int
    (1, 0, ``IGNORE``).

    Returns ``overall`` (all cells pooled), ``per_class`` (mean of per-class precision and recall
    over classes with a positive, F1 of the means; a class never predicted has precision 0) and
    per-class arrays ``precision``, ``recall``, ``f1``, ``tp``, ``fp``, ``fn``.
    """
    predicted = np.asarray(predicted, dtype=bool)
    labels = np.asarray(labels)
    valid = labels != IGNORE
    truth = labels == 1
    tp = (predicted & truth & valid).sum(axis=0)
    fp = (predicted & ~truth & valid).sum(axis=0)
    fn = (~predicted & truth & valid).sum(axis=0)
    precision = np.array([_ratio(t, t + f) for t, f in zip(tp, fp, strict=True)])
    recall = np.array([_ratio(t, t + f) if t + f > 0 else math.nan for t, f in zip(tp, fn, strict=True)])
    f1 = np.array([_f1(p, r) if not math.isnan(r) else math.nan for p, r in zip(precision, recall, strict=True)])
    has_pos = (tp + fn) > 0
    overall_p = _ratio(tp.sum(), tp.sum() + fp.sum())
    overall_r = _ratio(tp.sum(), tp.sum() + fn.sum())
    class_p = float(precision[has_pos].mean()) if has_pos.any() else math.nan
    class_r = float(recall[has_pos].mean()) if has_pos.any() else math.nan
    return {
        "overall": {"precision": overall_p, "recall": overall_r, "f1": _f1(overall_p, overall_r)},
        "per_class": {
            "precision": class_p,
            "recall": class_r,
            "f1": _f1(class_p, class_r) if has_pos.any() else math.nan,
        },
        "precision": precision,
        "recall": recall,
        "f1": f1,
        "tp": tp,
        "fp": fp,
        "fn": fn,
    }


class ConfusionMatrix:
    """Pixel confusion ``(K, K+1)`` accumulated one image at a time.

    Row = ground-truth class, column = predicted class; the last column counts pixels predicted
    as none of the K classes ("void"). Ground-truth pixels equal to ``IGNORE`` are skipped.
    """

    def __init__(self, num_classes: int) -> None:
        self.num_classes = num_classes
        self.matrix = np.zeros((num_classes, num_classes + 1), dtype=np.int64)

    def update(self, gt: np.ndarray, pred: np.ndarray) -> None:
        """Add one image. ``gt`` (H, W) int in [0, K) or IGNORE; ``pred`` (H, W) int in [0, K]."""
        if gt.shape != pred.shape:
            raise ValueError(f"ground truth {gt.shape} and prediction {pred.shape} differ in shape")
        k = self.num_classes
        keep = gt != IGNORE
        g = gt[keep].astype(np.int64)
        p = pred[keep].astype(np.int64)
        if g.size and (g.min() < 0 or g.max() >= k):
            raise ValueError(f"ground-truth values outside [0, {k})")
        if p.size and (p.min() < 0 or p.max() > k):
            raise ValueError(f"prediction values outside [0, {k}]")
        self.matrix += np.bincount(g * (k + 1) + p, minlength=k * (k + 1)).reshape(k, k + 1)

    def summary(self) -> dict[str, Any]:
        """mIoU over classes with ground-truth pixels, per-class IoU (C,), pixel accuracy,
        mean class accuracy, and the per-class pixel counts."""
        k = self.num_classes
        m = self.matrix
        tp = np.diag(m[:, :k]).astype(np.float64)
        gt_pixels = m.sum(axis=1).astype(np.float64)
        pred_pixels = m[:, :k].sum(axis=0).astype(np.float64)
        union = gt_pixels + pred_pixels - tp
        with np.errstate(divide="ignore", invalid="ignore"):
            iou = np.where(union > 0, tp / union, math.nan)
            accuracy = np.where(gt_pixels > 0, tp / gt_pixels, math.nan)
        present = gt_pixels > 0
        total = m.sum()
        return {
            "miou": float(iou[present].mean()) if present.any() else math.nan,
            "iou": iou,
            "pixel_accuracy": float(tp.sum() / total) if total else math.nan,
            "mean_class_accuracy": float(accuracy[present].mean()) if present.any() else math.nan,
            "gt_pixels": gt_pixels.astype(np.int64),
            "pred_pixels": pred_pixels.astype(np.int64),
            "void_pixels": int(m[:, k].sum()),
            "present": present,
        }


# ---------------------------------------------------------------------------------------------
# Ground truth
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class GtImage:
    """One ground-truth image: ``key`` and ``alt_keys`` are the names it can be matched by."""

    key: str
    alt_keys: tuple[str, ...] = ()
    path: Path | None = None  # the label file (XML or PNG), when there is one
    coco_id: int | None = None


def read_split(path: Path) -> list[str]:
    """Image names from a split file: first whitespace-separated token of each non-blank line
    (so the reference's "name label label ..." lists work too); ``#`` starts a comment."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"{path}: cannot read split file ({exc})") from exc
    names = [line.split("#", 1)[0].split() for line in text.splitlines()]
    entries = [tokens[0] for tokens in names if tokens]
    if not entries:
        raise UsageError(f"{path}: the split file lists no images")
    return entries


def _key_candidates(name: str) -> list[str]:
    """Forms under which a file name or id can match: as given, without extension, the stem."""
    name = name.replace("\\", "/").strip()
    out = [name]
    p = Path(name)
    if p.suffix:
        out.append(p.with_suffix("").as_posix())
    out.append(p.stem)
    return out


class ImageIndex:
    """Find ground-truth images by any of their keys."""

    def __init__(self, images: Sequence[GtImage]) -> None:
        self.images = list(images)
        self._by_key: dict[str, int] = {}
        ambiguous: set[str] = set()
        for i, image in enumerate(self.images):
            for key in (image.key, *image.alt_keys):
                if key in self._by_key and self._by_key[key] != i:
                    ambiguous.add(key)
                self._by_key.setdefault(key, i)
        for key in ambiguous:
            del self._by_key[key]

    def find(self, names: Iterable[str]) -> int | None:
        """Index of the first image matching one of ``names`` (each tried in several forms)."""
        for name in names:
            if not name:
                continue
            for candidate in _key_candidates(name):
                index = self._by_key.get(candidate)
                if index is not None:
                    return index
        return None


def apply_split(images: Sequence[GtImage], split: Path, what: str) -> list[GtImage]:
    """The images named by a split file, in its order. Unknown names are an error."""
    index = ImageIndex(images)
    chosen: list[GtImage] = []
    missing: list[str] = []
    seen: set[int] = set()
    for entry in read_split(split):
        i = index.find([entry])
        if i is None:
            missing.append(entry)
        elif i not in seen:
            seen.add(i)
            chosen.append(index.images[i])
    if missing:
        raise UsageError(f"{split}: {len(missing)} entries have no {what} ground truth (e.g. {', '.join(missing[:5])})")
    return chosen


def read_label_png(path: Path) -> np.ndarray:
    """A single-channel label PNG (palette, L or 16-bit) as (H, W) int32 raw values."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            if image.mode not in ("P", "L", "I", "I;16", "I;16B", "I;16L", "1"):
                raise UsageError(f"{path}: label PNG must be single-channel (palette or grayscale), not {image.mode}")
            return np.asarray(image, dtype=np.int32)
    except (OSError, UnidentifiedImageError, SyntaxError) as exc:
        raise UsageError(f"{path}: cannot read label image ({exc})") from exc


def _apply_lut(raw: np.ndarray, lut: np.ndarray, path: Path, what: str) -> np.ndarray:
    if raw.size and (raw.min() < 0 or raw.max() >= len(lut)):
        bad = int(raw.max()) if raw.max() >= len(lut) else int(raw.min())
        raise UsageError(f"{path}: {what} value {bad} is not a known class")
    out = lut[raw]
    if (out == _INVALID).any():
        bad = int(raw[out == _INVALID][0])
        raise UsageError(f"{path}: {what} value {bad} is not a known class")
    return out


class GroundTruth:
    """Base: a dataset's images, image-level labels and (optionally) semantic maps."""

    name: str = ""
    description: str = ""
    images: list[GtImage]
    split_rule: str = ""
    label_classes: tuple[str, ...] = ()
    label_synonyms: Mapping[str, int] = {}
    map_classes: tuple[str, ...] | None = None  # index = value in load_map(); None: no maps
    map_background: int | None = None
    map_synonyms: Mapping[str, int] = {}
    notes: tuple[str, ...] = ()

    def labels(self, images: Sequence[GtImage]) -> np.ndarray:
        """(N, F) int8 labels over ``label_classes``: 1, 0, or IGNORE."""
        raise NotImplementedError

    def load_map(self, image: GtImage) -> np.ndarray:
        """(H, W) int32 map: class index in ``map_classes`` or IGNORE."""
        raise UsageError(f"{self.name} has image-level ground truth only; evaluate a tags Parquet")


def _find_base(root: Path, subdirs: Sequence[str], markers: Sequence[str]) -> Path:
    """The first of ``root`` and ``root/<subdir>`` that contains one of the ``markers`` dirs."""
    for base in (root, *(root / s for s in subdirs)):
        if any((base / m).is_dir() for m in markers):
            return base
    looked = ", ".join(str(b) for b in (root, *(root / s for s in subdirs)))
    raise UsageError(f"{root}: no {' or '.join(markers)} directory found (looked in {looked})")


class VocClassification(GroundTruth):
    """PASCAL VOC image-level labels from ``Annotations/*.xml`` (default split: Main/test.txt)."""

    def __init__(self, root: Path, split: Path | None, difficult: str = "positive", year: str = "2007"):
        if difficult not in DIFFICULT_MODES:
            raise UsageError(f"--difficult must be one of {', '.join(DIFFICULT_MODES)}, not {difficult}")
        base = _find_base(root, [f"VOC{year}", f"VOCdevkit/VOC{year}"], ["Annotations"])
        self.name = f"voc{year}"
        self.root = base
        self.difficult = difficult
        self.label_classes = VOC_CLASSES
        annotations = base / "Annotations"
        if split is None:
            split = base / "ImageSets" / "Main" / "test.txt"
            if not split.is_file():
                raise UsageError(f"{base}: no ImageSets/Main/test.txt; pass --split")
        self.split_rule = str(split)
        self.images = [GtImage(key=name, path=annotations / f"{name}.xml") for name in read_split(split)]
        self.description = f"PASCAL VOC{year} Annotations XML, {len(self.images)} images"
        self.notes = (f"difficult objects: {self._difficult_note()}",)

    def _difficult_note(self) -> str:
        return {
            "positive": "counted as positives (default)",
            "negative": "counted as negatives when a class has only difficult objects in an image",
            "ignore": "an image whose only objects of a class are difficult is left out of that class",
        }[self.difficult]

    def labels(self, images: Sequence[GtImage]) -> np.ndarray:
        index = {name: i for i, name in enumerate(VOC_CLASSES)}
        out = np.zeros((len(images), len(VOC_CLASSES)), dtype=np.int8)
        for row, image in enumerate(images):
            assert image.path is not None
            for name, difficult in parse_voc_xml(image.path):
                c = index.get(name)
                if c is None:
                    raise UsageError(f"{image.path}: unknown VOC class '{name}'")
                if not difficult or self.difficult == "positive":
                    out[row, c] = 1
                elif self.difficult == "ignore" and out[row, c] != 1:
                    out[row, c] = IGNORE
        return out


def parse_voc_xml(path: Path) -> list[tuple[str, bool]]:
    """(class name, difficult) for every ``<object>`` of a VOC annotation file."""
    try:
        tree = ET.parse(path)
    except FileNotFoundError as exc:
        raise UsageError(f"{path}: annotation file not found") from exc
    except (OSError, ET.ParseError) as exc:
        raise UsageError(f"{path}: cannot parse annotation XML ({exc})") from exc
    objects = []
    for obj in tree.getroot().iter("object"):
        name = (obj.findtext("name") or "").strip().lower()
        if not name:
            raise UsageError(f"{path}: an <object> has no <name>")
        difficult = (obj.findtext("difficult") or "0").strip() == "1"
        objects.append((name, difficult))
    return objects


class LabelMapDir(GroundTruth):
    """Ground truth as label PNGs (VOC2012 SegmentationClass, COCO-Stuff maps, a user folder).

    ``map_lut`` maps raw PNG values to ``map_classes`` indices (or IGNORE / invalid);
    ``label_lut`` maps them to ``label_classes`` indices for image-level labels (IGNORE for
    background and unlabeled).
    """

    def __init__(
        self,
        *,
        name: str,
        label_dir: Path,
        split: Path | None,
        map_classes: tuple[str, ...],
        map_lut: np.ndarray,
        map_background: int | None,
        label_classes: tuple[str, ...],
        label_lut: np.ndarray,
        map_synonyms: Mapping[str, int] | None = None,
        notes: tuple[str, ...] = (),
    ) -> None:
        self.name = name
        self.root = label_dir
        self.map_classes = map_classes
        self.map_background = map_background
        self.label_classes = label_classes
        self.map_synonyms = dict(map_synonyms or {})
        self._map_lut = map_lut
        self._label_lut = label_lut
        self.notes = notes
        if split is not None:
            self.split_rule = str(split)
            self.images = []
            missing = []
            for entry in read_split(split):
                rel = Path(entry).with_suffix(".png") if Path(entry).suffix else Path(entry + ".png")
                path = label_dir / rel
                if not path.is_file():
                    missing.append(str(rel))
                key = rel.with_suffix("").as_posix()
                self.images.append(GtImage(key=key, alt_keys=(rel.stem,), path=path))
            if missing:
                raise UsageError(
                    f"{split}: {len(missing)} listed images have no label PNG in {label_dir} "
                    f"(e.g. {', '.join(missing[:5])})"
                )
        else:
            self.split_rule = f"every *.png under {label_dir}"
            paths = sorted(label_dir.rglob("*.png"))
            if not paths:
                raise UsageError(f"{label_dir}: no label PNGs found")
            self.images = [
                GtImage(key=p.relative_to(label_dir).with_suffix("").as_posix(), alt_keys=(p.stem,), path=p)
                for p in paths
            ]
        self.description = f"{name} label PNGs in {label_dir}, {len(self.images)} images"

    def load_map(self, image: GtImage) -> np.ndarray:
        assert image.path is not None
        return _apply_lut(read_label_png(image.path), self._map_lut, image.path, "ground-truth")

    def labels(self, images: Sequence[GtImage]) -> np.ndarray:
        out = np.zeros((len(images), len(self.label_classes)), dtype=np.int8)
        for row, image in enumerate(images):
            assert image.path is not None
            values = np.unique(read_label_png(image.path))
            mapped = _apply_lut(values, self._label_lut, image.path, "ground-truth")
            out[row, mapped[mapped >= 0]] = 1
        return out


def _lut(size: int, pairs: Mapping[int, int], default: int) -> np.ndarray:
    lut = np.full(size, default, dtype=np.int32)
    for raw, value in pairs.items():
        lut[raw] = value
    return lut


def voc2012_segmentation(root: Path, split: Path | None) -> LabelMapDir:
    """VOC2012 ``SegmentationClass`` (or ``SegmentationClassAug``) PNGs; default split
    ``ImageSets/Segmentation/val.txt``. 0 = background, 1..20 = VOC classes, 255 = ignore."""
    base = _find_base(root, ["VOC2012", "VOCdevkit/VOC2012"], ["SegmentationClass", "SegmentationClassAug"])
    sub = "SegmentationClass" if (base / "SegmentationClass").is_dir() else "SegmentationClassAug"
    label_dir = base / sub
    if split is None:
        split = base / "ImageSets" / "Segmentation" / "val.txt"
        if not split.is_file():
            raise UsageError(f"{base}: no ImageSets/Segmentation/val.txt; pass --split")
    classes = ("background", *VOC_CLASSES)
    map_lut = _lut(256, {i: i for i in range(21)} | {RAW_IGNORE: IGNORE}, _INVALID)
    label_lut = _lut(256, {i: i - 1 for i in range(1, 21)} | {0: IGNORE, RAW_IGNORE: IGNORE}, _INVALID)
    return LabelMapDir(
        name="voc2012",
        label_dir=label_dir,
        split=split,
        map_classes=classes,
        map_lut=map_lut,
        map_background=0,
        label_classes=VOC_CLASSES,
        label_lut=label_lut,
        notes=("255 = ignore", "mIoU over 21 classes including background"),
    )


def cocostuff27(root: Path, split: Path | None) -> LabelMapDir:
    """COCO-Stuff label PNGs (fine values 0..181, 255 unlabeled) mapped to the 27 coarse classes."""
    label_dir = root
    if not any(root.glob("*.png")):
        subdirs = [
            "stuffthingmaps_trainval2017/val2017",
            "val2017",
            "SegmentationClass/val",
            "SegmentationClass",
        ]
        found = [root / d for d in subdirs if (root / d).is_dir()]
        if not found:
            raise UsageError(f"{root}: no COCO-Stuff label PNGs (looked in {', '.join(subdirs)})")
        label_dir = found[0]
    used = [i for i in range(182) if i not in COCOSTUFF_UNUSED]
    fine_classes = tuple(COCOSTUFF_FINE_NAMES[i] for i in used)
    # Values 182..254 are not classes; the reference maps them to "unlabeled" like 255.
    map_lut = np.full(256, IGNORE, dtype=np.int32)
    map_lut[:182] = COCOSTUFF_FINE_TO_COARSE
    label_lut = np.full(256, IGNORE, dtype=np.int32)
    label_lut[used] = np.arange(len(used))
    synonyms = {COCOSTUFF_FINE_NAMES[i]: COCOSTUFF_FINE_TO_COARSE[i] for i in used}
    return LabelMapDir(
        name="coco-stuff-27",
        label_dir=label_dir,
        split=split,
        map_classes=COCOSTUFF_COARSE_NAMES,
        map_lut=map_lut,
        map_background=None,
        label_classes=fine_classes,
        label_lut=label_lut,
        map_synonyms=synonyms,
        notes=(
            "fine COCO-Stuff ids mapped to 27 coarse classes (no background class)",
            "255 and values 182-254 = ignore",
            "predicted background / unknown pixels count as misses",
            "tags are evaluated against the 171 fine classes",
        ),
    )


def folder_ground_truth(root: Path, split: Path | None, classes_file: Path | None) -> LabelMapDir:
    """A user's label PNGs (255 = ignore).

    ``root`` is the PNG directory, or a dataset directory holding ``labels/`` (and ``classes.txt``,
    used when ``classes_file`` is None): the layout ``tagclip_cli.synthetic`` writes. The class
    file has one name per line. If a line is "background", line i (0-based) names pixel value i;
    otherwise 0 is background and line i (1-based) names value i, as in our own mask PNGs.
    """
    from tagclip_cli.vocab import VocabularyError, read_name_list

    if not root.is_dir():
        raise UsageError(f"{root}: not a directory of label PNGs")
    label_dir = root / "labels" if (root / "labels").is_dir() else root
    if classes_file is None and (root / "classes.txt").is_file():
        classes_file = root / "classes.txt"
    if classes_file is None:
        raise UsageError("--gt folder needs --classes FILE (one class name per line) or ROOT/classes.txt")
    try:
        names = read_name_list(classes_file)
    except VocabularyError as exc:
        raise UsageError(str(exc)) from exc
    if not names:
        raise UsageError(f"{classes_file}: lists no classes")
    keys = [name_key(n) for n in names]
    dup = sorted({n for n, k in zip(names, keys, strict=True) if keys.count(k) > 1})
    if dup:
        raise UsageError(f"{classes_file}: duplicate class names: {', '.join(dup)}")
    if "background" in keys:
        background = keys.index("background")
        rule = f"classes from {classes_file}: line i = pixel value i, '{names[background]}' = background"
    else:
        names, background = ("background", *names), 0
        rule = f"classes from {classes_file}: line i = pixel value i (1-based), 0 = background"
    if len(names) > 255:
        raise UsageError(f"{classes_file}: {len(names)} classes; label PNGs allow at most 255 (255 = ignore)")
    map_lut = _lut(65536, {i: i for i in range(len(names))} | {RAW_IGNORE: IGNORE}, _INVALID)
    fg = [i for i in range(len(names)) if i != background]
    label_pairs = {raw: j for j, raw in enumerate(fg)} | {RAW_IGNORE: IGNORE, background: IGNORE}
    label_lut = _lut(65536, label_pairs, _INVALID)
    return LabelMapDir(
        name="folder",
        label_dir=label_dir,
        split=split,
        map_classes=tuple(names),
        map_lut=map_lut,
        map_background=background,
        label_classes=tuple(names[i] for i in fg),
        label_lut=label_lut,
        notes=(rule, "255 = ignore", f"mIoU over {len(names)} classes including background"),
    )


def _load_json(path: Path, what: str) -> Any:
    try:
        with open(path, encoding="utf-8") as fh:
            return json.load(fh)
    except FileNotFoundError as exc:
        raise UsageError(f"{path}: {what} not found") from exc
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UsageError(f"{path}: cannot read {what} ({exc})") from exc


def decode_segmentation(segm: Any, height: int, width: int, where: str) -> np.ndarray:
    """A COCO ``segmentation`` (polygons, uncompressed or compressed RLE) as an (H, W) bool mask."""
    from pycocotools import mask as mask_utils

    try:
        if isinstance(segm, list):
            if not segm:
                return np.zeros((height, width), dtype=bool)
            rle = mask_utils.merge(mask_utils.frPyObjects(segm, height, width))
        elif isinstance(segm, dict) and isinstance(segm.get("counts"), list):
            rle = mask_utils.frPyObjects(segm, *segm["size"])
        elif isinstance(segm, dict) and isinstance(segm.get("counts"), str | bytes):
            rle = segm
        else:
            raise ValueError("not a polygon list or an RLE object")
        mask = mask_utils.decode(rle)
    except (ValueError, TypeError, KeyError, IndexError) as exc:
        raise UsageError(f"{where}: invalid segmentation ({exc})") from exc
    if mask.shape[:2] != (height, width):
        raise UsageError(f"{where}: mask is {mask.shape[1]}x{mask.shape[0]} but the image is {width}x{height}")
    return mask.astype(bool)


class CocoInstances(GroundTruth):
    """A COCO instances JSON: image-level labels from its annotations and semantic maps
    rasterised from the instance masks (COCO-Object rules, see the module docstring)."""

    def __init__(self, name: str, ann_file: Path, split: Path | None) -> None:
        data = _load_json(ann_file, "COCO annotation file")
        if not isinstance(data, dict) or not all(k in data for k in ("images", "annotations", "categories")):
            raise UsageError(f"{ann_file}: not a COCO instances file (needs images, annotations, categories)")
        self.name = name
        self.root = ann_file
        try:
            categories = sorted(data["categories"], key=lambda c: int(c["id"]))
            self._cat_index = {int(c["id"]): i for i, c in enumerate(categories)}
            names = tuple(str(c["name"]) for c in categories)
            self._image_info = {int(im["id"]): im for im in data["images"]}
            self._anns: dict[int, list[dict[str, Any]]] = {}
            for ann in data["annotations"]:
                image_id = int(ann["image_id"])
                if int(ann["category_id"]) not in self._cat_index:
                    raise UsageError(
                        f"{ann_file}: annotation {ann.get('id')} has unknown category {ann['category_id']}"
                    )
                if image_id not in self._image_info:
                    raise UsageError(f"{ann_file}: annotation {ann.get('id')} refers to unknown image {image_id}")
                self._anns.setdefault(image_id, []).append(ann)
            all_images = [
                GtImage(
                    key=Path(str(im["file_name"])).stem,
                    alt_keys=(str(im["id"]), str(im["file_name"])),
                    coco_id=int(im["id"]),
                )
                for im in data["images"]
            ]
        except (KeyError, TypeError, ValueError) as exc:
            raise UsageError(f"{ann_file}: malformed COCO file ({exc!r})") from exc
        if len(self._cat_index) > 254:
            raise UsageError(f"{ann_file}: more than 254 categories")
        self.label_classes = names
        self.map_classes = ("background", *names)
        self.map_background = 0
        if split is not None:
            self.images = apply_split(all_images, split, name)
            self.split_rule = str(split)
        else:
            self.images = [im for im in all_images if im.coco_id in self._anns]
            self.split_rule = "every image with at least one annotation (default)"
        self.description = f"COCO instances {ann_file.name}, {len(self.images)} images, {len(names)} classes"
        self.notes = (
            "image-level labels from every annotation, crowd included",
            "maps: background 0; overlapping instances: smaller on top; crowd-only pixels ignored",
            f"mIoU over {len(names) + 1} classes including background",
        )

    def labels(self, images: Sequence[GtImage]) -> np.ndarray:
        out = np.zeros((len(images), len(self.label_classes)), dtype=np.int8)
        for row, image in enumerate(images):
            for ann in self._anns.get(image.coco_id or -1, []):
                out[row, self._cat_index[int(ann["category_id"])]] = 1
        return out

    def load_map(self, image: GtImage) -> np.ndarray:
        assert image.coco_id is not None
        info = self._image_info[image.coco_id]
        height, width = int(info["height"]), int(info["width"])
        where = f"{self.root} image {image.coco_id}"
        instances = []
        crowd = np.zeros((height, width), dtype=bool)
        for ann in self._anns.get(image.coco_id, []):
            mask = decode_segmentation(ann["segmentation"], height, width, where)
            if ann.get("iscrowd", 0):
                crowd |= mask
            else:
                instances.append((int(mask.sum()), int(ann.get("id", 0)), mask, ann))
        return rasterise_instances(instances, crowd, self._cat_index, height, width)


def rasterise_instances(
    instances: Sequence[tuple[int, int, np.ndarray, Mapping[str, Any]]],
    crowd: np.ndarray,
    cat_index: Mapping[int, int],
    height: int,
    width: int,
) -> np.ndarray:
    """Semantic map (H, W) int32 from instance masks: background 0, category index + 1 elsewhere.

    ``instances`` are ``(area, annotation id, mask (H, W) bool, annotation)``. Larger instances are
    painted first so smaller ones end up on top (ties: higher annotation id on top); pixels of a
    crowd region that no non-crowd instance covers become IGNORE.
    """
    out = np.zeros((height, width), dtype=np.int32)
    covered = np.zeros((height, width), dtype=bool)
    for _, _, mask, ann in sorted(instances, key=lambda t: (-t[0], t[1])):
        out[mask] = cat_index[int(ann["category_id"])] + 1
        covered |= mask
    out[crowd & ~covered] = IGNORE
    return out


def _coco_ann_file(root: Path, names: Sequence[str]) -> Path:
    if root.is_file():
        return root
    tried = []
    for name in names:
        for rel in (f"annotations/{name}", name):
            path = root / rel
            tried.append(str(path))
            if path.is_file():
                return path
    raise UsageError(f"{root}: no COCO annotation file found (looked for {', '.join(tried)})")


def load_ground_truth(
    name: str,
    root: Path,
    split: Path | None = None,
    *,
    difficult: str = "positive",
    classes_file: Path | None = None,
) -> GroundTruth:
    """The ground truth named ``name`` (one of :data:`GT_NAMES`) under ``root``."""
    root = Path(root)
    if not root.exists():
        raise UsageError(f"{root}: no such file or directory")
    if split is not None and not Path(split).is_file():
        raise UsageError(f"{split}: split file not found")
    if classes_file is not None and name != "folder":
        raise UsageError("--classes is only for --gt folder")
    if difficult != "positive" and name != "voc2007":
        raise UsageError("--difficult only applies to --gt voc2007")
    if name == "voc2007":
        return VocClassification(root, split, difficult)
    if name == "voc2012":
        return voc2012_segmentation(root, split)
    if name == "coco2014":
        return CocoInstances(name, _coco_ann_file(root, ["instances_val2014.json"]), split)
    if name in ("coco2017",):
        return CocoInstances(name, _coco_ann_file(root, ["instances_val2017.json"]), split)
    if name == "coco-object":
        # TagCLIP evaluates COCO-Object segmentation on val2017 (its README); val2014 if that is all.
        return CocoInstances(name, _coco_ann_file(root, ["instances_val2017.json", "instances_val2014.json"]), split)
    if name == "coco":
        if not root.is_file():
            raise UsageError(f"{root}: --gt coco needs --root pointing at a COCO instances JSON file")
        return CocoInstances(name, root, split)
    if name == "coco-stuff-27":
        return cocostuff27(root, split)
    if name == "folder":
        return folder_ground_truth(root, split, classes_file)
    raise UsageError(f"unknown --gt {name!r}; choose from {', '.join(GT_NAMES)}")


# ---------------------------------------------------------------------------------------------
# Predictions
# ---------------------------------------------------------------------------------------------


@dataclass
class TagPredictions:
    """A tags Parquet from `tagclip annotate`: ``scores`` (M, F) float32 over ``classes``."""

    source: Path
    classes: tuple[str, ...]
    image_ids: list[str]
    paths: list[str]
    ok: np.ndarray  # (M,) bool
    scores: np.ndarray  # (M, F) float32, NaN rows where not ok
    tags: list[list[str]]
    config: dict[str, Any] = field(default_factory=dict)


TAGS_COLUMNS = ("image_id", "path", "status", "tags", "scores")


def read_tags_parquet(path: Path) -> TagPredictions:
    """Read and validate a tags Parquet (columns and metadata as written by `tagclip annotate`)."""
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path, columns=list(TAGS_COLUMNS))
    except FileNotFoundError as exc:
        raise UsageError(f"{path}: not found") from exc
    except Exception as exc:  # pyarrow raises many types (ArrowInvalid, KeyError, OSError)
        raise UsageError(f"{path}: not a tags Parquet with columns {', '.join(TAGS_COLUMNS)} ({exc})") from exc
    meta = (table.schema.metadata or {}).get(b"tagclip")
    if meta is None:
        raise UsageError(f"{path}: no 'tagclip' metadata (not written by `tagclip annotate`)")
    try:
        config = json.loads(meta)
        classes = tuple(str(c) for c in config["classes"])
    except (ValueError, KeyError, TypeError) as exc:
        raise UsageError(f"{path}: the 'tagclip' metadata has no valid 'classes' list ({exc})") from exc
    data = table.to_pydict()
    status = data["status"]
    ok = np.array([s == "ok" for s in status], dtype=bool)
    scores = np.full((len(status), len(classes)), np.nan, dtype=np.float32)
    for row, values in enumerate(data["scores"]):
        if not ok[row]:
            continue
        if values is None or len(values) != len(classes):
            raise UsageError(
                f"{path}: row {row} ({data['image_id'][row]}) has "
                f"{'no' if values is None else len(values)} scores, expected {len(classes)}"
            )
        scores[row] = np.asarray(values, dtype=np.float32)
    if not np.isfinite(scores[ok]).all():
        raise UsageError(f"{path}: some scores of 'ok' rows are NaN or infinite")
    known = set(classes)
    tags = [list(t or []) for t in data["tags"]]
    for row, row_tags in enumerate(tags):
        unknown = [t for t in row_tags if t not in known]
        if unknown and ok[row]:
            raise UsageError(f"{path}: row {row} has tags not in the metadata classes: {', '.join(unknown)}")
    return TagPredictions(
        source=Path(path),
        classes=classes,
        image_ids=[str(x) if x is not None else "" for x in data["image_id"]],
        paths=[str(x) if x is not None else "" for x in data["path"]],
        ok=ok,
        scores=scores,
        tags=tags,
        config=config,
    )


class MaskPredictions:
    """Base for segmentation predictions: label maps with 0 = background, i = ``classes[i-1]``."""

    source: Path
    classes: tuple[str, ...]
    entries: list[tuple[tuple[str, ...], Any]]  # (names to match, handle for load())

    def load(self, handle: Any, height: int, width: int) -> np.ndarray:
        """(H, W) int32 map with values in [0, len(classes)]."""
        raise NotImplementedError


class CocoMaskPredictions(MaskPredictions):
    """Our COCO RLE JSON (`tagclip segment`): one annotation per (image, class).

    Should annotations of one image overlap, the one with the higher ``score`` wins.
    """

    def __init__(self, path: Path) -> None:
        data = _load_json(path, "prediction JSON")
        if not isinstance(data, dict) or not all(k in data for k in ("images", "annotations", "categories")):
            raise UsageError(f"{path}: not a COCO mask file (needs images, annotations, categories)")
        self.source = Path(path)
        try:
            categories = sorted(data["categories"], key=lambda c: int(c["id"]))
            self.classes = tuple(str(c["name"]) for c in categories)
            self._cat_value = {int(c["id"]): i + 1 for i, c in enumerate(categories)}
            self._images = {int(im["id"]): im for im in data["images"]}
            self._anns: dict[int, list[dict[str, Any]]] = {}
            for ann in data["annotations"]:
                if int(ann["category_id"]) not in self._cat_value:
                    raise UsageError(f"{path}: annotation {ann.get('id')} has unknown category {ann['category_id']}")
                self._anns.setdefault(int(ann["image_id"]), []).append(ann)
            self.entries = []
            for image_id, im in self._images.items():
                names = tuple(str(im[k]) for k in ("tagclip_image_id", "file_name") if im.get(k) is not None)
                # Our own numeric "id" is not the dataset's id: match by name only.
                self.entries.append((names, image_id))
        except (KeyError, TypeError, ValueError) as exc:
            raise UsageError(f"{path}: malformed COCO mask file ({exc!r})") from exc

    def load(self, handle: Any, height: int, width: int) -> np.ndarray:
        im = self._images[handle]
        h, w = int(im.get("height", height)), int(im.get("width", width))
        out = np.zeros((h, w), dtype=np.int32)
        anns = sorted(self._anns.get(handle, []), key=lambda a: float(a.get("score", 0.0)))
        for ann in anns:
            mask = decode_segmentation(ann["segmentation"], h, w, f"{self.source} image {handle}")
            out[mask] = self._cat_value[int(ann["category_id"])]
        return out


class PngMaskPredictions(MaskPredictions):
    """A directory of label PNGs (`tagclip segment --png-dir`); class names from a vocabulary."""

    def __init__(self, directory: Path, classes: Sequence[str]) -> None:
        self.source = Path(directory)
        self.classes = tuple(classes)
        paths = sorted(self.source.rglob("*.png"))
        if not paths:
            raise UsageError(f"{directory}: no PNG files found")
        self.entries = [((p.relative_to(self.source).as_posix(),), p) for p in paths]

    def load(self, handle: Any, height: int, width: int) -> np.ndarray:
        out = read_label_png(handle)
        if out.size and out.max() > len(self.classes):
            raise UsageError(
                f"{handle}: pixel value {int(out.max())} but the vocabulary has {len(self.classes)} classes"
            )
        return out


def _png_dir_classes(directory: Path, vocab: str | None) -> tuple[str, ...]:
    if vocab is not None:
        from tagclip_cli.vocab import VocabularyError, load_vocabulary

        try:
            return load_vocabulary(vocab).classes
        except VocabularyError as exc:
            raise UsageError(str(exc)) from exc
    for sidecar in ("categories.json", "classes.json"):
        path = directory / sidecar
        if path.is_file():
            data = _load_json(path, "category list")
            items = data.get("categories", data) if isinstance(data, dict) else data
            try:
                if items and isinstance(items[0], dict):
                    return tuple(str(c["name"]) for c in sorted(items, key=lambda c: int(c["id"])))
                return tuple(str(c) for c in items)
            except (KeyError, TypeError, ValueError, IndexError) as exc:
                raise UsageError(f"{path}: not a category list ({exc!r})") from exc
    raise UsageError(
        f"{directory}: PNG predictions carry no class names; pass --vocab (the vocabulary used by segment)"
    )


def open_mask_predictions(path: Path, vocab: str | None = None) -> MaskPredictions:
    """Our COCO RLE JSON, or a directory of label PNGs."""
    if path.is_dir():
        return PngMaskPredictions(path, _png_dir_classes(path, vocab))
    return CocoMaskPredictions(path)


def prediction_kind(path: Path) -> str:
    """The kind of ``--pred``: "tags" (Parquet), "masks-json" or "masks-png", from the file itself."""
    if path.is_dir():
        return "masks-png"
    if not path.is_file():
        raise UsageError(f"{path}: no such file or directory")
    with open(path, "rb") as fh:
        head = fh.read(4)
    if head == b"PAR1":
        return "tags"
    if head.lstrip()[:1] == b"{" or path.suffix.lower() == ".json":
        return "masks-json"
    raise UsageError(f"{path}: not a tags Parquet, a COCO mask JSON or a directory of label PNGs")


# ---------------------------------------------------------------------------------------------
# Driver
# ---------------------------------------------------------------------------------------------


# Called as progress(advance, total) while images are evaluated.
Progress = Callable[[int, int], None]


@dataclass(frozen=True)
class EvaluateConfig:
    """Settings of one evaluation run (all reported)."""

    gt: str
    root: Path
    pred: Path
    split: Path | None = None
    ap: str = "paper"
    difficult: str = "positive"
    classes_file: Path | None = None
    vocab: str | None = None
    allow_unmatched: bool = False
    require_all: bool = False


def match_images(
    gt_images: Sequence[GtImage], candidates: Sequence[tuple[str, ...]], source: Path
) -> tuple[dict[int, int], int]:
    """Map ground-truth image index -> prediction index. Returns also the number of predictions
    that match no ground-truth image. Two predictions for one image are an error."""
    index = ImageIndex(gt_images)
    gt_to_pred: dict[int, int] = {}
    extra = 0
    for j, names in enumerate(candidates):
        i = index.find(names)
        if i is None:
            extra += 1
            continue
        if i in gt_to_pred:
            first = candidates[gt_to_pred[i]][0]
            raise UsageError(f"{source}: '{first}' and '{names[0]}' both match image '{gt_images[i].key}'")
        gt_to_pred[i] = j
    return gt_to_pred, extra


def _image_counts(
    gt: GroundTruth, gt_to_pred: Mapping[int, int], extra: int, failed: int, require_all: bool
) -> dict[str, Any]:
    missing = [im.key for i, im in enumerate(gt.images) if i not in gt_to_pred]
    if not gt_to_pred:
        raise UsageError(
            f"no prediction matches a {gt.name} ground-truth image "
            f"(e.g. ground truth '{gt.images[0].key}'); check --root, --split and --pred"
        )
    if missing:
        message = (
            f"{len(missing)} of {len(gt.images)} ground-truth images have no prediction (e.g. {', '.join(missing[:5])})"
        )
        if require_all:
            raise UsageError(message)
        log.warning("%s; they are left out of the metrics", message)
    if extra:
        log.warning("%d predictions match no ground-truth image in the split; ignored", extra)
    return {
        "ground_truth": len(gt.images),
        "with_prediction": len(gt_to_pred),
        "evaluated": len(gt_to_pred) - failed,
        "failed": failed,
        "missing_prediction": len(missing),
        "missing_examples": missing[:20],
        "predictions_not_in_ground_truth": extra,
    }


def _nan_to_none(value: Any) -> Any:
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, np.floating):
        return _nan_to_none(float(value))
    if isinstance(value, np.integer):
        return int(value)
    return value


AP_DESCRIPTIONS = {
    "paper": "non-interpolated: mean precision at the rank of each positive (ALGORITHM.md section 6)",
    "voc07": "VOC2007 11-point interpolated (recall 0, 0.1, ..., 1)",
}
TIES_RULE = (
    "equal scores form one threshold; each positive in a tied group gets the precision after the "
    "whole group (scikit-learn average_precision_score convention)"
)


def evaluate_tags(
    gt: GroundTruth,
    preds: TagPredictions,
    config: EvaluateConfig,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Classification report: per-class AP, mAP, tag precision/recall/F1."""
    match = match_classes(
        preds.classes,
        gt.label_classes,
        synonyms=gt.label_synonyms,
        one_to_one=True,
        allow_unmatched=config.allow_unmatched,
        what=f"{gt.name} ground truth",
    )
    candidates = [(i, p) for i, p in zip(preds.image_ids, preds.paths, strict=True)]
    gt_to_pred, extra = match_images(gt.images, candidates, preds.source)
    pairs = sorted(gt_to_pred.items())
    failed = sum(1 for _, j in pairs if not preds.ok[j])
    images = _image_counts(gt, gt_to_pred, extra, failed, config.require_all)
    pairs = [(i, j) for i, j in pairs if preds.ok[j]]
    if not pairs:
        raise UsageError(f"{preds.source}: every matched prediction has status 'failed'")
    eval_images = [gt.images[i] for i, _ in pairs]
    labels_all = gt.labels(eval_images)
    if progress:
        progress(len(eval_images), len(eval_images))
    columns = [(p, g) for p, g in enumerate(match.pred_to_gt) if g is not None]
    gt_cols = [g for _, g in columns]
    rows = [j for _, j in pairs]
    scores = preds.scores[np.ix_(rows, [p for p, _ in columns])]
    labels = labels_all[:, gt_cols]
    class_of_pred = {preds.classes[p]: k for k, (p, _) in enumerate(columns)}
    tagged = np.zeros(scores.shape, dtype=bool)
    for r, j in enumerate(rows):
        for tag in preds.tags[j]:
            k = class_of_pred.get(tag)
            if k is not None:
                tagged[r, k] = True
    ap = ap_per_class(scores, labels, config.ap)
    prf = tag_prf(tagged, labels)
    evaluated = ~np.isnan(ap)
    skipped = [gt.label_classes[g] for g, ok in zip(gt_cols, evaluated, strict=True) if not ok]
    if skipped:
        log.warning("%d classes have no positive image and are left out of mAP: %s", len(skipped), ", ".join(skipped))
    per_class = []
    for k, g in enumerate(gt_cols):
        valid = labels[:, k] != IGNORE
        per_class.append(
            {
                "class": gt.label_classes[g],
                "pred_class": preds.classes[columns[k][0]],
                "ap": _nan_to_none(float(ap[k])),
                "positives": int((labels[:, k] == 1).sum()),
                "ignored": int((~valid).sum()),
                "tagged": int(tagged[valid, k].sum()),
                "precision": _nan_to_none(float(prf["precision"][k])),
                "recall": _nan_to_none(float(prf["recall"][k])),
                "f1": _nan_to_none(float(prf["f1"][k])),
            }
        )
    return {
        "task": "classification",
        "images": images,
        "class_matching": match.to_json(),
        "metrics": {
            "mAP": _nan_to_none(float(ap[evaluated].mean())) if evaluated.any() else None,
            "classes_in_mAP": int(evaluated.sum()),
            "classes_without_positives": skipped,
            "tags_overall": {k: _nan_to_none(v) for k, v in prf["overall"].items()},
            "tags_per_class_mean": {k: _nan_to_none(v) for k, v in prf["per_class"].items()},
            "per_class": per_class,
        },
        "metric_settings": {
            "ap": config.ap,
            "ap_definition": AP_DESCRIPTIONS[config.ap],
            "ties": TIES_RULE,
            "classes_without_positives": "skipped (not counted in the mean)",
            "tags": "the `tags` column as written; overall = all (image, class) cells pooled; "
            "per-class mean = mean precision and recall over classes with a positive, F1 of the means",
            "failed_rows": "excluded from every metric, counted in images.failed",
        },
    }


def evaluate_masks(
    gt: GroundTruth,
    preds: MaskPredictions,
    config: EvaluateConfig,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Segmentation report: per-class IoU, mIoU, pixel accuracy from one streaming confusion."""
    if gt.map_classes is None:
        raise UsageError(f"--gt {gt.name} has image-level ground truth only; --pred must be a tags Parquet")
    k = len(gt.map_classes)
    skip = [gt.map_background] if gt.map_background is not None else []
    match = match_classes(
        preds.classes,
        gt.map_classes,
        synonyms=gt.map_synonyms,
        skip_gt=skip,
        one_to_one=not gt.map_synonyms,
        allow_unmatched=config.allow_unmatched,
        what=f"{gt.name} ground truth",
    )
    void = k
    # Prediction value -> ground-truth index: 0 is background (void when the dataset has none).
    lut = np.array(
        [gt.map_background if gt.map_background is not None else void]
        + [g if g is not None else void for g in match.pred_to_gt],
        dtype=np.int32,
    )
    gt_to_pred, extra = match_images(gt.images, [names for names, _ in preds.entries], preds.source)
    images = _image_counts(gt, gt_to_pred, extra, 0, config.require_all)
    confusion = ConfusionMatrix(k)
    for i, j in sorted(gt_to_pred.items()):
        image = gt.images[i]
        gt_map = gt.load_map(image)
        pred_raw = preds.load(preds.entries[j][1], *gt_map.shape)
        if pred_raw.shape != gt_map.shape:
            raise UsageError(
                f"{preds.source}: prediction for '{image.key}' is {pred_raw.shape[1]}x{pred_raw.shape[0]} "
                f"but the ground truth is {gt_map.shape[1]}x{gt_map.shape[0]}"
            )
        confusion.update(gt_map, lut[pred_raw])
        if progress:
            progress(1, len(gt_to_pred))
    summary = confusion.summary()
    absent = [n for n, p in zip(gt.map_classes, summary["present"], strict=True) if not p]
    per_class = [
        {
            "class": name,
            "iou": _nan_to_none(float(summary["iou"][c])),
            "gt_pixels": int(summary["gt_pixels"][c]),
            "pred_pixels": int(summary["pred_pixels"][c]),
            "in_mean": bool(summary["present"][c]),
        }
        for c, name in enumerate(gt.map_classes)
    ]
    return {
        "task": "segmentation",
        "images": images,
        "class_matching": match.to_json(),
        "metrics": {
            "mIoU": _nan_to_none(summary["miou"]),
            "pixel_accuracy": _nan_to_none(summary["pixel_accuracy"]),
            "mean_class_accuracy": _nan_to_none(summary["mean_class_accuracy"]),
            "classes_in_mIoU": int(summary["present"].sum()),
            "classes_without_gt_pixels": absent,
            "unlabelled_prediction_pixels": summary["void_pixels"],
            "per_class": per_class,
            "confusion": confusion.matrix.tolist(),
        },
        "metric_settings": {
            "miou": "one confusion matrix over all evaluated images; IoU = TP / (GT + Pred - TP); "
            "mean over classes with ground-truth pixels",
            "ignore": "ground-truth 255 (and COCO crowd-only pixels) ignored",
            "background_included": gt.map_background is not None,
            "confusion": "rows = ground truth, columns = prediction, last column = predicted none "
            "of the classes (counts as a miss)",
        },
    }


def evaluate(config: EvaluateConfig, progress: Progress | None = None) -> dict[str, Any]:
    """Run one evaluation and return the full report (JSON-serialisable)."""
    if config.ap not in AP_VARIANTS:
        raise UsageError(f"--ap must be one of {', '.join(AP_VARIANTS)}, not {config.ap}")
    kind = prediction_kind(config.pred)
    if config.vocab is not None and kind != "masks-png":
        raise UsageError("--vocab is only for a --pred directory of PNGs")
    gt = load_ground_truth(
        config.gt, config.root, config.split, difficult=config.difficult, classes_file=config.classes_file
    )
    if kind == "tags":
        result = evaluate_tags(gt, read_tags_parquet(config.pred), config, progress)
    else:
        result = evaluate_masks(gt, open_mask_predictions(config.pred, config.vocab), config, progress)
    return {
        "tool": f"tagclip-cli {__version__}",
        "created": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "settings": {
            "gt": config.gt,
            "root": str(config.root),
            "ground_truth": gt.description,
            "split": gt.split_rule,
            "pred": str(config.pred),
            "pred_kind": kind,
            "allow_unmatched": config.allow_unmatched,
            "notes": list(gt.notes),
        },
        "units": "fractions in [0, 1] (the terminal table shows percentages)",
        **result,
    }


def _json_safe(value: Any) -> Any:
    """NaN -> None and numpy scalars -> Python, recursively (the report is strict JSON)."""
    if isinstance(value, Mapping):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    if isinstance(value, np.ndarray):
        return [_json_safe(v) for v in value.tolist()]
    return _nan_to_none(value)


def write_report(report: Mapping[str, Any], path: Path) -> None:
    """Write the JSON report atomically (temp file in the same directory, fsync, rename)."""
    report = _json_safe(report)
    path = Path(path)
    directory = path.parent if str(path.parent) else Path(".")
    if not directory.is_dir():
        raise UsageError(f"{path}: directory {directory} does not exist")
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as fh:
        json.dump(report, fh, indent=2, allow_nan=False)
        fh.write("\n")


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.2f}"


def render_report(report: Mapping[str, Any], console: Any) -> None:
    """Print the per-class table and the summary lines with rich (percentages)."""
    from rich.table import Table

    settings = report["settings"]
    images = report["images"]
    metrics = report["metrics"]
    title = f"{settings['gt']} - {report['task']} - {images['evaluated']} images"
    if report["task"] == "classification":
        table = Table(title=title)
        for col in ("class", "AP", "positives", "tagged", "P", "R", "F1"):
            table.add_column(col, justify="left" if col == "class" else "right")
        for row in metrics["per_class"]:
            table.add_row(
                row["class"], _pct(row["ap"]), str(row["positives"]), str(row["tagged"]),
                _pct(row["precision"]), _pct(row["recall"]), _pct(row["f1"]),
            )  # fmt: skip
        overall, per_class = metrics["tags_overall"], metrics["tags_per_class_mean"]
        table.add_section()
        label = "mAP" if report["metric_settings"]["ap"] == "paper" else "mAP (VOC07 11-point)"
        table.add_row(label, _pct(metrics["mAP"]), "", "", "", "", "", style="bold")
        table.add_row("tags overall", "", "", "", _pct(overall["precision"]), _pct(overall["recall"]),
                      _pct(overall["f1"]))  # fmt: skip
        table.add_row("tags per-class mean", "", "", "", _pct(per_class["precision"]),
                      _pct(per_class["recall"]), _pct(per_class["f1"]))  # fmt: skip
        console.print(table)
        if metrics["classes_without_positives"]:
            console.print(f"classes without positives (not in mAP): {', '.join(metrics['classes_without_positives'])}")
    else:
        table = Table(title=title)
        for col in ("class", "IoU", "GT pixels", "pred pixels"):
            table.add_column(col, justify="left" if col == "class" else "right")
        for row in metrics["per_class"]:
            iou = _pct(row["iou"]) if row["in_mean"] else f"({_pct(row['iou'])})"
            table.add_row(row["class"], iou, str(row["gt_pixels"]), str(row["pred_pixels"]))
        table.add_section()
        table.add_row("mIoU", _pct(metrics["mIoU"]), "", "", style="bold")
        table.add_row("pixel accuracy", _pct(metrics["pixel_accuracy"]), "", "")
        console.print(table)
        if metrics["classes_without_gt_pixels"]:
            absent = ", ".join(metrics["classes_without_gt_pixels"])
            console.print(f"classes without ground-truth pixels (not in mIoU): {absent}")
    notes = [f"{images['evaluated']} of {images['ground_truth']} ground-truth images evaluated"]
    if images["failed"]:
        notes.append(f"{images['failed']} failed rows excluded")
    if images["missing_prediction"]:
        notes.append(f"{images['missing_prediction']} without prediction")
    console.print("; ".join(notes))
