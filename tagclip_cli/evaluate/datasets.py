"""The datasets `tagclip evaluate --gt` knows: VOC2007 classification, VOC2012 segmentation, COCO
instances (classification and COCO-Object maps), COCO-Stuff-27 and a user's folder of label PNGs.
`REGISTRY` maps each name to its loader and a one-line description."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from tagclip_cli.errors import UsageError
from tagclip_cli.evaluate.classes import (
    COCOSTUFF_COARSE_NAMES,
    COCOSTUFF_FINE_NAMES,
    COCOSTUFF_FINE_TO_COARSE,
    COCOSTUFF_UNUSED,
    VOC_CLASSES,
    name_key,
)
from tagclip_cli.evaluate.ground_truth import (
    _INVALID,
    RAW_IGNORE,
    GroundTruth,
    GtImage,
    LabelMapDir,
    _find_base,
    _lut,
    apply_split,
    read_split,
)
from tagclip_cli.evaluate.metrics import IGNORE
from tagclip_cli.formats import decode_segmentation, read_coco

DIFFICULT_MODES = ("positive", "negative", "ignore")


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




class CocoInstances(GroundTruth):
    """A COCO instances JSON: image-level labels from its annotations and semantic maps
    rasterised from the instance masks (COCO-Object rules in the `tagclip_cli.evaluate` docstring)."""

    def __init__(self, name: str, ann_file: Path, split: Path | None) -> None:
        coco = read_coco(ann_file, "COCO annotation file", "instances")
        self.name = name
        self.root = ann_file
        self._cat_index = {int(c["id"]): i for i, c in enumerate(coco.categories)}
        names = tuple(str(c["name"]) for c in coco.categories)
        self._image_info = coco.images
        self._anns = coco.annotations
        try:
            all_images = [
                GtImage(key=Path(str(im["file_name"])).stem, alt_keys=(str(image_id), str(im["file_name"])),
                        coco_id=image_id)
                for image_id, im in coco.images.items()
            ]
        except KeyError as exc:
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


def _coco_instances(name: str, files: Sequence[str]) -> Loader:
    """A loader of the COCO instances file found under root by one of `files` (first found wins)."""
    return lambda root, split, _options: CocoInstances(name, _coco_ann_file(root, files), split)


def _coco_file(root: Path, split: Path | None, _options: Mapping[str, Any]) -> CocoInstances:
    if not root.is_file():
        raise UsageError(f"{root}: --gt coco needs --root pointing at a COCO instances JSON file")
    return CocoInstances("coco", root, split)


# loader(root, split, options): options holds `difficult` and `classes_file`.
Loader = Callable[[Path, Path | None, Mapping[str, Any]], GroundTruth]


@dataclass(frozen=True)
class Dataset:
    """One `--gt` choice: how to load it under a root, and what it is."""

    load: Loader
    description: str


REGISTRY: dict[str, Dataset] = {
    "voc2007": Dataset(lambda root, split, o: VocClassification(root, split, o["difficult"]),
                       "PASCAL VOC2007 image-level labels (Annotations XML; default split Main/test.txt)"),
    "voc2012": Dataset(lambda root, split, _o: voc2012_segmentation(root, split),
                       "PASCAL VOC2012 SegmentationClass PNGs (default split Segmentation/val.txt)"),
    "coco2014": Dataset(_coco_instances("coco2014", ["instances_val2014.json"]),
                        "COCO val2014 instances: image-level labels and COCO-Object maps"),
    "coco2017": Dataset(_coco_instances("coco2017", ["instances_val2017.json"]),
                        "COCO val2017 instances: image-level labels and COCO-Object maps"),
    # TagCLIP evaluates COCO-Object segmentation on val2017 (its README); val2014 if that is all.
    "coco-object": Dataset(_coco_instances("coco-object", ["instances_val2017.json", "instances_val2014.json"]),
                           "COCO-Object: instances val2017 (else val2014) rasterised to 81-class maps"),
    "coco-stuff-27": Dataset(lambda root, split, _o: cocostuff27(root, split),
                             "COCO-Stuff label PNGs mapped to the 27 coarse classes"),
    "coco": Dataset(_coco_file, "any COCO instances JSON file given as --root"),
    "folder": Dataset(lambda root, split, o: folder_ground_truth(root, split, o["classes_file"]),
                      "a directory of label PNGs with a class list (255 = ignore)"),
}
GT_NAMES = tuple(REGISTRY)


def load_ground_truth(
    name: str,
    root: Path,
    split: Path | None = None,
    *,
    difficult: str = "positive",
    classes_file: Path | None = None,
) -> GroundTruth:
    """The ground truth named ``name`` (a key of :data:`REGISTRY`) under ``root``."""
    root = Path(root)
    if not root.exists():
        raise UsageError(f"{root}: no such file or directory")
    if split is not None and not Path(split).is_file():
        raise UsageError(f"{split}: split file not found")
    if classes_file is not None and name != "folder":
        raise UsageError("--classes is only for --gt folder")
    if difficult != "positive" and name != "voc2007":
        raise UsageError("--difficult only applies to --gt voc2007")
    dataset = REGISTRY.get(name)
    if dataset is None:
        raise UsageError(f"unknown --gt {name!r}; choose from {', '.join(GT_NAMES)}")
    return dataset.load(root, split, {"difficult": difficult, "classes_file": classes_file})
