"""Prediction readers: our tags Parquet, our COCO RLE masks JSON or masks Parquet (all read through
`tagclip_cli.formats`) and a directory of label PNGs."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from tagclip_cli.errors import UsageError
from tagclip_cli.evaluate.ground_truth import read_label_png
from tagclip_cli.formats import is_masks_parquet, label_map, read_masks_as_coco, read_tags, tag_classes
from tagclip_cli.record import RunRecord


def _load_json(path: Path, what: str) -> Any:
    """A user's JSON side file (a PNG directory's category list)."""
    try:
        with open(path, encoding="utf-8") as fh:
            return json.load(fh)
    except FileNotFoundError as exc:
        raise UsageError(f"{path}: {what} not found") from exc
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UsageError(f"{path}: cannot read {what} ({exc})") from exc


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
    record: RunRecord = field(default_factory=RunRecord)  # the run record of the tags file


TAGS_COLUMNS = ("image_id", "path", "status", "tags", "scores")


def read_tags_parquet(path: Path) -> TagPredictions:
    """Read and validate a tags Parquet (columns and metadata as written by `tagclip annotate`)."""
    table, record = read_tags(path, TAGS_COLUMNS)
    classes = tag_classes(path, record)
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
        record=record,
    )


class MaskPredictions:
    """Base for segmentation predictions: label maps with 0 = background, i = ``classes[i-1]``."""

    source: Path
    classes: tuple[str, ...]
    entries: list[tuple[tuple[str, ...], Any]]  # (names to match, handle for load())
    # Several label maps per image (a background-threshold sweep, `sweep.CamPredictions`): one
    # entry per variant; a plain prediction has the one variant None.
    variants: tuple[Any, ...] = (None,)

    def load(self, handle: Any, height: int, width: int) -> np.ndarray:
        """(H, W) int32 map with values in [0, len(classes)]."""
        raise NotImplementedError

    def load_variants(self, handle: Any, height: int, width: int) -> list[np.ndarray]:
        """One (H, W) map per variant, in the order of `variants`."""
        return [self.load(handle, height, width)]


class CocoMaskPredictions(MaskPredictions):
    """Our COCO RLE JSON or masks Parquet (`tagclip segment`): one annotation per (image, class).

    Should annotations of one image overlap, the one with the higher ``score`` wins.
    """

    def __init__(self, path: Path) -> None:
        coco = read_masks_as_coco(path, "prediction JSON", "mask")
        self.source = Path(path)
        self.classes = tuple(str(c["name"]) for c in coco.categories)
        self._cat_value = {int(c["id"]): i + 1 for i, c in enumerate(coco.categories)}
        self._images = coco.images
        self._anns = coco.annotations
        # Our own numeric "id" is not the dataset's id: match by name only.
        self.entries = [
            (tuple(str(im[k]) for k in ("tagclip_image_id", "file_name") if im.get(k) is not None), image_id)
            for image_id, im in self._images.items()
        ]

    def load(self, handle: Any, height: int, width: int) -> np.ndarray:
        im = self._images[handle]
        try:
            h, w = int(im.get("height", height)), int(im.get("width", width))
        except (TypeError, ValueError) as exc:
            raise UsageError(f"{self.source}: image {handle} has no valid size ({exc})") from None
        return label_map(self._anns.get(handle, []), self._cat_value, h, w, f"{self.source} image {handle}")


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
    """Our COCO RLE JSON or masks Parquet, or a directory of label PNGs."""
    if path.is_dir():
        return PngMaskPredictions(path, _png_dir_classes(path, vocab))
    return CocoMaskPredictions(path)


def prediction_kind(path: Path) -> str:
    """The kind of ``--pred``: "tags" (Parquet), "masks-parquet", "masks-json" or "masks-png", from the
    file itself."""
    if path.is_dir():
        return "masks-png"
    if not path.is_file():
        raise UsageError(f"{path}: no such file or directory")
    with open(path, "rb") as fh:
        head = fh.read(4)
    if head == b"PAR1":
        return "masks-parquet" if is_masks_parquet(path) else "tags"
    if head.lstrip()[:1] == b"{" or path.suffix.lower() == ".json":
        return "masks-json"
    raise UsageError(f"{path}: not a tags Parquet, a COCO mask JSON or a directory of label PNGs")

