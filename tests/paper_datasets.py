"""Tiny synthetic copies of the paper's datasets, laid out exactly as the real ones are on disk:
VOCdevkit (VOC2007 classification, VOC2012 segmentation), COCO 2014 / 2017 (instances_*.json
with the real 80 category ids and names, polygon masks) and COCO-Stuff (stuffthingmaps PNGs of
fine ids). A few images each, with coloured rectangles over noise; every label agrees with the
rectangles drawn."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

from tagclip_cli.evaluate import COCOSTUFF_FINE_NAMES, COCOSTUFF_UNUSED, VOC_CLASSES

SIZE = (64, 80)  # (height, width): not multiples of the patch size


def _image(rng: np.random.Generator, boxes: list[tuple[int, int, int, int]]) -> np.ndarray:
    """(H, W, 3) uint8 noise with one flat colour per box (y0, y1, x0, x1)."""
    h, w = SIZE
    out = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    for y0, y1, x0, x1 in boxes:
        out[y0:y1, x0:x1] = rng.integers(0, 256, 3, dtype=np.uint8)
    return out


def _save_jpeg(path: Path, pixels: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path, quality=95)


def _save_label(path: Path, label: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(label.astype(np.uint8), mode="L").save(path)


BOXES = [(4, 40, 6, 50), (30, 60, 40, 76)]  # two objects per image
VOC_IMAGES = {"000001": ("dog", "person"), "000002": ("car", "sofa"), "000003": ("cat", "bird")}
VOC12_IMAGES = {"2007_000032": ("aeroplane", "person"), "2007_000039": ("tvmonitor", "chair"),
                "2008_000002": ("horse", "cow")}
COCO_THINGS = [i for i in range(91) if i not in COCOSTUFF_UNUSED]  # stuffthingmaps value = COCO id - 1


def voc2007(root: Path, rng: np.random.Generator) -> Path:
    base = root / "VOCdevkit" / "VOC2007"
    (base / "ImageSets" / "Main").mkdir(parents=True)
    (base / "Annotations").mkdir(parents=True)
    for name, classes in VOC_IMAGES.items():
        _save_jpeg(base / "JPEGImages" / f"{name}.jpg", _image(rng, BOXES))
        objects = "".join(
            f"<object><name>{c}</name><pose>Unspecified</pose><truncated>0</truncated><difficult>0</difficult>"
            f"<bndbox><xmin>{x0 + 1}</xmin><ymin>{y0 + 1}</ymin><xmax>{x1}</xmax><ymax>{y1}</ymax></bndbox></object>"
            for c, (y0, y1, x0, x1) in zip(classes, BOXES, strict=True)
        )
        xml = (f"<annotation><folder>VOC2007</folder><filename>{name}.jpg</filename><size><width>{SIZE[1]}</width>"
               f"<height>{SIZE[0]}</height><depth>3</depth></size><segmented>0</segmented>{objects}</annotation>")
        (base / "Annotations" / f"{name}.xml").write_text(xml)
    (base / "ImageSets" / "Main" / "test.txt").write_text("".join(f"{n}\n" for n in VOC_IMAGES))
    return root / "VOCdevkit"


def voc2012(root: Path, rng: np.random.Generator) -> Path:
    base = root / "VOCdevkit" / "VOC2012"
    (base / "ImageSets" / "Segmentation").mkdir(parents=True)
    for name, classes in VOC12_IMAGES.items():
        _save_jpeg(base / "JPEGImages" / f"{name}.jpg", _image(rng, BOXES))
        label = np.zeros(SIZE, dtype=np.uint8)
        for c, (y0, y1, x0, x1) in zip(classes, BOXES, strict=True):
            label[y0:y1, x0:x1] = VOC_CLASSES.index(c) + 1
            label[y0, x0:x1] = 255  # VOC's "void" outline
        _save_label(base / "SegmentationClass" / f"{name}.png", label)
    (base / "ImageSets" / "Segmentation" / "val.txt").write_text("".join(f"{n}\n" for n in VOC12_IMAGES))
    return base


def _coco(root: Path, split: str, names: list[str], rng: np.random.Generator) -> list[tuple[str, list[int]]]:
    """root/annotations/instances_<split>.json and root/<split>/*.jpg; (file stem, fine ids) per image."""
    categories = [{"id": i + 1, "name": COCOSTUFF_FINE_NAMES[i], "supercategory": "thing"} for i in COCO_THINGS]
    images, annotations, out = [], [], []
    for k, name in enumerate(names):
        image_id = int(name.split("_")[-1])
        fine = [COCO_THINGS[(7 * k + 3 * j) % len(COCO_THINGS)] for j in range(len(BOXES))]
        _save_jpeg(root / split / f"{name}.jpg", _image(rng, BOXES))
        images.append({"id": image_id, "file_name": f"{name}.jpg", "height": SIZE[0], "width": SIZE[1]})
        for j, ((y0, y1, x0, x1), f) in enumerate(zip(BOXES, fine, strict=True)):
            polygon = [x0, y0, x1, y0, x1, y1, x0, y1]
            annotations.append({"id": 100 * image_id + j, "image_id": image_id, "category_id": f + 1,
                                "segmentation": [[float(v) for v in polygon]], "area": float((y1 - y0) * (x1 - x0)),
                                "bbox": [x0, y0, x1 - x0, y1 - y0], "iscrowd": 0})
        out.append((name, fine))
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    payload = {"info": {}, "licenses": [], "images": images, "annotations": annotations, "categories": categories}
    (root / "annotations" / f"instances_{split}.json").write_text(json.dumps(payload))
    return out


def coco2014(root: Path, rng: np.random.Generator) -> Path:
    _coco(root / "COCO2014", "val2014", [f"COCO_val2014_{i:012d}" for i in (42, 73, 74)], rng)
    return root / "COCO2014"


def coco2017_and_stuff(root: Path, rng: np.random.Generator) -> tuple[Path, Path]:
    """COCO2017 val2017 and the COCO-Stuff maps of the same images (things from the instances, the
    rest of the image one stuff class; some pixels unlabeled, 255)."""
    coco = root / "COCO2017"
    stuff = root / "cocostuff"
    made = _coco(coco, "val2017", [f"{i:012d}" for i in (139, 285, 632)], rng)
    stuff_ids = [i for i in range(91, 182)]
    for k, (name, fine) in enumerate(made):
        label = np.full(SIZE, stuff_ids[(11 * k) % len(stuff_ids)], dtype=np.uint8)
        for (y0, y1, x0, x1), f in zip(BOXES, fine, strict=True):
            label[y0:y1, x0:x1] = f
        label[-2:, :] = 255
        _save_label(stuff / "stuffthingmaps_trainval2017" / "val2017" / f"{name}.png", label)
    return coco, stuff


def write_paper_datasets(root: Path, seed: int = 0) -> dict[str, Path]:
    """All five roots, as `tagclip reproduce` takes them."""
    rng = np.random.default_rng(seed)
    coco2017, cocostuff = coco2017_and_stuff(root, rng)
    return {"voc2007": voc2007(root, rng), "voc2012": voc2012(root, rng), "coco2014": coco2014(root, rng),
            "coco2017": coco2017, "cocostuff": cocostuff}
