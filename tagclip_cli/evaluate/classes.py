"""Class vocabularies of the ground truths (facts: PASCAL VOC devkit; COCO-Stuff labels.txt) and
matching prediction class names onto them."""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from tagclip_cli.errors import UsageError

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

