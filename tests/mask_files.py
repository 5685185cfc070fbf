"""Masks files for the export tests, written with pyarrow and pycocotools directly: the masks
Parquet in the schema `tagclip segment --out masks.parquet` writes (one row per (image, class
mask), a null-class row for an image without masks or a failed one), and hand-made masks with
holes, several parts and a part inside a hole."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from tagclip_cli.record import METADATA_KEY
from tagclip_cli.writers import rle_encode, tag_row, tags_schema

MASKS_SCHEMA = pa.schema([
    ("image_id", pa.string()), ("path", pa.string()), ("width", pa.int32()), ("height", pa.int32()),
    ("status", pa.string()), ("error", pa.string()), ("class_id", pa.int32()), ("class_name", pa.string()),
    ("score", pa.float32()), ("area", pa.int64()), ("bbox", pa.list_(pa.float64())), ("counts", pa.string()),
])  # fmt: skip


def mask_rows(image_id: str, path: str, label_map: np.ndarray | None, classes: Sequence[str],
              error: str | None = None, scores: dict[int, float] | None = None, size=(0, 0)) -> list[dict]:
    """Rows of one image: label_map (H, W) int, 0 = no class, k = classes[k-1]; None = failed."""
    if label_map is None:
        width, height = size
        return [dict(image_id=image_id, path=path, width=width, height=height, status="failed", error=error,
                     class_id=None, class_name=None, score=None, area=None, bbox=None, counts=None)]
    height, width = label_map.shape
    rows = []
    for k in sorted(set(np.unique(label_map).tolist()) - {0}):
        from pycocotools import mask as mask_utils

        rle = rle_encode(label_map == k)
        coco_rle = {"size": rle["size"], "counts": rle["counts"].encode()}
        rows.append(dict(image_id=image_id, path=path, width=width, height=height, status="ok", error=None,
                         class_id=k, class_name=classes[k - 1], score=(scores or {}).get(k, 0.5 + 0.01 * k),
                         area=int(mask_utils.area(coco_rle)), bbox=[float(v) for v in mask_utils.toBbox(coco_rle)],
                         counts=rle["counts"]))
    if not rows:
        rows.append(dict(image_id=image_id, path=path, width=width, height=height, status="ok", error=None,
                         class_id=None, class_name=None, score=None, area=None, bbox=None, counts=None))
    return rows


def write_masks_parquet(path: Path, rows: list[dict], classes: Sequence[str], row_group_size: int = 4096) -> Path:
    meta = {"classes": list(classes), "tool": "tagclip-cli", "tool_version": "test"}
    schema = MASKS_SCHEMA.with_metadata({METADATA_KEY: json.dumps(meta).encode()})
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), path, row_group_size=row_group_size)
    return path


def parquet_from_coco(coco_json: Path, out: Path, row_group_size: int = 3) -> Path:
    """The masks Parquet holding the same masks as a COCO masks JSON of `tagclip segment`."""
    doc = json.loads(coco_json.read_text())
    names = {c["id"]: c["name"] for c in sorted(doc["categories"], key=lambda c: c["id"])}
    anns: dict[int, list[dict]] = {}
    for ann in doc["annotations"]:
        anns.setdefault(ann["image_id"], []).append(ann)
    rows = []
    for im in doc["images"]:
        base = dict(image_id=im["tagclip_image_id"], path=im["file_name"], width=im["width"], height=im["height"],
                    status=im["tagclip_status"], error=im.get("tagclip_error"))
        mine = anns.get(im["id"], [])
        for ann in mine:
            rows.append(dict(base, class_id=ann["category_id"], class_name=names[ann["category_id"]],
                             score=ann["score"], area=ann["area"], bbox=ann["bbox"],
                             counts=ann["segmentation"]["counts"]))
        if not mine:
            rows.append(dict(base, class_id=None, class_name=None, score=None, area=None, bbox=None, counts=None))
    return write_masks_parquet(out, rows, list(names.values()), row_group_size)


def write_tags_parquet(path: Path, images: Sequence[tuple[str, str, int, int]], classes: Sequence[str],
                       tags: dict[str, list[str]], failed: Sequence[str] = ()) -> Path:
    """A tags Parquet (`writers.tags_schema`) for (image_id, path, width, height) rows; scores are
    0.8 for a tag and 0.1 otherwise."""
    from tagclip_cli.sources import ImageItem

    rows = []
    for index, (image_id, image_path, width, height) in enumerate(images):
        item = ImageItem(index, image_id, image_path)
        if image_id in failed:
            rows.append(tag_row(item, width, height, "cannot decode"))
            continue
        mine = tags.get(image_id, [])
        rows.append(tag_row(item, width, height, None, mine, [0.8 if c in mine else 0.1 for c in classes]))
    schema = tags_schema({"classes": list(classes), "tool": "tagclip-cli", "tool_version": "test"})
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), path)
    return path


def hand_made_maps(height: int = 60, width: int = 80) -> dict[str, np.ndarray]:
    """Label maps (H, W) over classes 1..3: a square with two holes and an island in one hole (1),
    a ring (2), two separate bars (3); an image with nothing; one touching the image border."""
    yy, xx = np.mgrid[:height, :width]
    a = np.zeros((height, width), np.int32)
    a[5:40, 5:40] = 1
    a[12:20, 12:20] = 0
    a[25:33, 10:30] = 0
    a[15:18, 15:18] = 1
    r = np.hypot(yy - 20, xx - 60)
    a[(r < 15) & (r > 7)] = 2
    a[45:55, 50:75] = 3
    a[45:58, 5:9] = 3
    b = np.zeros((height, width), np.int32)
    b[:, : width // 2] = 2
    b[0:10, width - 10 :] = 1
    return {"holes.png": a, "empty.png": np.zeros((height, width), np.int32), "border.png": b}


def write_images(root: Path, maps: dict[str, np.ndarray]) -> None:
    """An RGB image for each label map (the exports link or copy them)."""
    root.mkdir(parents=True, exist_ok=True)
    for name, labels in maps.items():
        rgb = np.stack([labels * 60 % 256] * 3, -1).astype(np.uint8)
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rgb).save(root / name)
