"""`tagclip export FORMAT`: our tags and masks as the datasets that training and labelling tools read.

Formats (each writes one folder, `--out`):
- `yolo`: the Ultralytics layout, `images/` (links, or copies with `copy`), `labels/*.txt` and
  `data.yaml`. `task="segment"` writes one polygon per connected part of a class mask, with every
  hole joined to its part's outline by a zero-width cut (the polygon then fills as the mask does:
  Ultralytics rasterises a label line with `cv2.fillPoly`); `task="detect"` writes each part's box.
- `voc`: Pascal VOC, `SegmentationClass/*.png` (palette, pixel = class index + 1, 0 background),
  `JPEGImages/` links, `ImageSets/Segmentation/<split>.txt`, per-class image tags
  `ImageSets/Main/<class>_<split>.txt` (1 / -1) and a CVAT-style `labelmap.txt`.
- `labelstudio`: `tasks.json` (one task per image, `predictions` with the model version, a score
  per region: choices for tags, brush regions in Label Studio's RLE or polygons for masks) and
  `label_config.xml`, the labelling config that matches it.
- `cvat`: `annotations.xml` in CVAT for images 1.1: an image-level `<tag>` per tag and a `<mask>`
  per class mask (CVAT's RLE in the mask's box). We pick this over the COCO 1.0 route because it
  is the only CVAT import that keeps both image tags and exact masks (holes included): COCO
  import in CVAT has no image-level labels.
- `coco`: `annotations.json`, a COCO JSON (RLE masks) from a masks Parquet (or JSON).

Inputs are read only through `tagclip_cli.formats`; the masks stream one image at a time (a masks
Parquet a row group at a time), so memory stays flat in the number of images. Every export is
written into a hidden temporary folder beside `--out` and renamed into place at the end: an
export that fails or is killed leaves `--out` as it was, and a rerun writes the same files.

This module holds the run (config, inputs, output names, the atomic folder); the geometry and the
five writers are in `tagclip_cli.exportformats`.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from array import array
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from tagclip_cli.errors import UsageError
from tagclip_cli.formats import (
    MaskFile,
    MaskImage,
    MaskRegion,
    iter_tag_batches,
    read_tags,
    read_tags_schema,
    tag_classes,
)

FORMATS = ("yolo", "voc", "labelstudio", "cvat", "coco")
YOLO_TASKS = ("detect", "segment")
MASK_AS = ("brush", "polygon")
# Label Studio serves local files under this URL when LOCAL_FILES_SERVING_ENABLED is set and
# LOCAL_FILES_DOCUMENT_ROOT is the image folder.
LABEL_STUDIO_URL_PREFIX = "/data/local-files/?d="

Progress = Callable[[int, int], None]


@dataclass(frozen=True)
class ExportConfig:
    """One `tagclip export` run. `tags` and/or `masks` are our outputs; `images` is the folder the
    image ids are relative to (default: the paths recorded in the tags or masks file)."""

    format: str
    out: Path
    tags: Path | None = None
    masks: Path | None = None
    images: Path | None = None
    task: str = "segment"
    copy: bool = False
    mask_as: str = "brush"
    split: str = "train"
    url_prefix: str = LABEL_STUDIO_URL_PREFIX
    overwrite: bool = False


@dataclass
class ExportSummary:
    """What an export wrote: images exported, failed images skipped, masks and label lines/regions."""

    out: Path
    format: str
    images: int = 0
    skipped: int = 0
    masks: int = 0
    shapes: int = 0
    files: list[str] = field(default_factory=list)


@dataclass
class Record:
    """One image to export: our id, the image file (None when neither --images nor a recorded path
    exists), size, status, masks, and its tags as (class name, score)."""

    image_id: str
    source: Path | None
    width: int
    height: int
    status: str
    error: str | None
    masks: list[MaskRegion]
    tags: list[tuple[str, float | None]]


# ---- inputs ---------------------------------------------------------------------------------------


class _TagIndex:
    """A tags Parquet looked up by image id, for a stream of ids (the masks file's).

    While the ids come in the tags file's order (a masks file and a tags file of one run), the
    tags rows are read alongside them a batch at a time, so memory stays flat. At the first id
    not found ahead, it falls back to an index of the whole file: its columns as Arrow arrays (tens
    of bytes per image; scores only for formats that write them) and a dict from id to row."""

    COLUMNS = ("image_id", "path", "width", "height", "status", "error", "tags")

    def __init__(self, path: Path, with_scores: bool) -> None:
        self.path = path
        self.columns = (*self.COLUMNS, "scores") if with_scores else self.COLUMNS
        self.record = read_tags_schema(path, self.columns)
        self.classes = tag_classes(path, self.record)
        self.indexed = False  # True once the fallback index is built
        self._table: Any = None
        self._row: dict[str, int] = {}
        self.restart()

    def restart(self) -> None:
        """Start matching a new stream of ids from the top of the file."""
        self._ahead: Iterator[dict] = self.rows()

    def rows(self) -> Iterator[dict]:
        """Every row in file order, a batch at a time."""
        for batch in iter_tag_batches(self.path, self.columns, batch_size=4096):
            yield from batch

    def get(self, image_id: str) -> dict | None:
        """The row of image_id (None if the file has none)."""
        if not self.indexed:
            for row in self._ahead:
                if row["image_id"] == image_id:
                    return row
            self._build_index()  # not ahead: the orders differ (or the id is missing)
        row = self._row.get(image_id)
        return None if row is None else self._table.slice(row, 1).to_pylist()[0]

    def _build_index(self) -> None:
        self._table, _ = read_tags(self.path, self.columns)
        for i, image_id in enumerate(self._table.column("image_id").to_pylist()):
            self._row.setdefault(image_id, i)
        self.indexed = True

    def tags_of(self, row: dict | None) -> list[tuple[str, float | None]]:
        """(name, stored score) of a tags row's tags; [] for a missing or failed row."""
        if row is None or row["status"] != "ok":
            return []
        scores = row.get("scores") or []
        position = {name: i for i, name in enumerate(self.classes)}
        out = []
        for name in row["tags"] or []:
            i = position.get(name)
            out.append((name, float(scores[i]) if i is not None and i < len(scores) else None))
        return out


@dataclass
class Inputs:
    config: ExportConfig
    masks: MaskFile | None
    tags: _TagIndex | None
    classes: tuple[str, ...]  # the vocabulary: the tags file's, else the masks file's
    count: int  # images in the stream

    def label_of(self, region: MaskRegion) -> int:
        """Vocabulary index of a mask's class (the classes were checked in `_open_inputs`)."""
        return self.classes.index(region.class_name)

    def records(self) -> Iterator[Record]:
        images = self.config.images
        if self.masks is not None:
            for im in self.masks:
                row = self.tags.get(im.image_id) if self.tags is not None else None
                yield self._record(im, row, images)
        else:
            assert self.tags is not None
            for row in self.tags.rows():
                im = MaskImage(row["image_id"], row["path"], row["width"] or 0, row["height"] or 0, row["status"],
                               row["error"], [])
                yield self._record(im, row, images)

    def _record(self, im: MaskImage, row: dict | None, images: Path | None) -> Record:
        source: Path | None
        if images is not None:
            source = images / im.image_id
        else:
            recorded = (row or {}).get("path") or im.path
            source = Path(recorded) if recorded else None
        tags = self.tags.tags_of(row) if self.tags is not None else []
        return Record(im.image_id, source, im.width, im.height, im.status, im.error, im.masks, tags)


def _open_inputs(config: ExportConfig) -> Inputs:
    """Open and cross-check the inputs before anything is written: every mask class is in the
    vocabulary, every masked image is in the tags file, no two images export to the same name."""
    if config.masks is None and config.tags is None:
        raise UsageError("export needs --masks (and/or --tags for labelstudio and cvat)")
    if config.masks is None and config.format in ("yolo", "voc", "coco"):
        raise UsageError(f"export {config.format} needs --masks (a masks JSON or Parquet of `tagclip segment`)")
    if config.images is not None and not config.images.is_dir():
        raise UsageError(f"--images {config.images}: not a directory")
    tags = _TagIndex(config.tags, with_scores=config.format == "labelstudio") if config.tags is not None else None
    masks = MaskFile(config.masks) if config.masks is not None else None
    classes = tags.classes if tags is not None else masks.classes  # type: ignore[union-attr]
    if masks is not None and tags is not None:
        unknown = [name for name in masks.classes if name not in tags.classes]
        if unknown:
            raise UsageError(f"{masks.path}: class '{unknown[0]}' is not in the vocabulary of {tags.path} "
                             f"({len(tags.classes)} classes: {', '.join(tags.classes[:5])}, ...)")
    namer = _NAMERS.get(config.format) or (lambda image_id: image_id)
    # 8 bytes per image (a hash of each output name), not the names: memory stays small at scale
    hashes = array("q")
    ids = masks.image_ids() if masks is not None else (r["image_id"] for r in tags.rows())  # type: ignore[union-attr]
    for image_id in ids:
        if masks is not None and tags is not None and tags.get(image_id) is None:
            raise UsageError(f"{masks.path}: image '{image_id}' is not in the tags file {tags.path}")
        hashes.append(_name_hash(namer(image_id)))
    count = len(hashes)
    if count:
        ordered = np.sort(np.frombuffer(hashes, dtype=np.int64))
        if (ordered[1:] == ordered[:-1]).any():
            _name_clash(masks.image_ids() if masks is not None else (r["image_id"] for r in tags.rows()),  # type: ignore[union-attr]
                        namer, config.masks or config.tags)
    if tags is not None:
        tags.restart()
    return Inputs(config, masks, tags, tuple(classes), count)


def _name_hash(name: str) -> int:
    return int.from_bytes(hashlib.blake2b(name.encode("utf-8", "surrogateescape"), digest_size=8).digest(),
                          "little", signed=True)


def _name_clash(ids: Iterator[str], namer: Callable[[str], str], source: Path | None) -> None:
    """Raise for the first two images whose output names are equal (or a repeated image id)."""
    first: dict[str, str] = {}
    for image_id in ids:
        name = namer(image_id)
        if name in first:
            raise UsageError(f"{source}: images '{first[name]}' and '{image_id}' export to the same name '{name}'")
        first[name] = image_id


def _check_out(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out}: exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise UsageError(f"--out {out}: exists and is not empty (pass --overwrite to replace it)")
    if not out.parent.is_dir():
        raise UsageError(f"--out {out}: the parent folder {out.parent} does not exist")


@contextmanager
def _atomic_dir(out: Path):
    """A fresh hidden folder beside `out` to write into; renamed over `out` on success, removed on
    failure. Its name is fixed, so a killed run's leftovers are cleared by the next run."""
    tmp = out.parent / f".{out.name}.export-partial"
    old = out.parent / f".{out.name}.export-old"
    for stale in (tmp, old):
        if stale.exists():
            shutil.rmtree(stale)
    tmp.mkdir()
    try:
        yield tmp
        if out.exists():
            os.replace(out, old)  # the old export stays whole until the new one is in place
        os.replace(tmp, out)
        if old.exists():
            shutil.rmtree(old)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


# ---- file names -----------------------------------------------------------------------------------


def _safe_parts(image_id: str) -> list[str]:
    """Path parts of an image id kept inside the output folder ('..' and a leading '/' cannot climb
    out; a part named 'images' is renamed, as Ultralytics maps the last '/images/' to '/labels/')."""
    parts = [("__" if p == ".." else p) for p in Path(image_id).parts if p not in ("/", ".", "")]
    return parts or ["image"]


def yolo_name(image_id: str) -> str:
    """images/<this> and labels/<this without its suffix>.txt (sub-folders kept)."""
    return "/".join("images_" if p == "images" else p for p in _safe_parts(image_id))


def voc_name(image_id: str) -> str:
    """The flat VOC image name: the id without its suffix, folders joined by '__'."""
    parts = _safe_parts(image_id)
    parts[-1] = Path(parts[-1]).stem or parts[-1]
    return "__".join(parts)


_NAMERS: dict[str, Callable[[str], str]] = {
    "yolo": lambda image_id: str(Path(yolo_name(image_id)).with_suffix("")),
    "voc": voc_name,
}



# ---- entry points ---------------------------------------------------------------------------------


def export(config: ExportConfig, progress: Progress | None = None) -> ExportSummary:
    """Run one export (see the module docstring). Every check that can fail on the inputs runs
    before anything is written; errors are UsageError / FormatError (exit code 2) and leave
    `config.out` untouched. `progress(step, total)` is called once per image."""
    if config.format not in FORMATS:
        raise UsageError(f"unknown export format '{config.format}' (one of {', '.join(FORMATS)})")
    if config.task not in YOLO_TASKS:
        raise UsageError(f"--task must be one of {', '.join(YOLO_TASKS)}, not '{config.task}'")
    if config.mask_as not in MASK_AS:
        raise UsageError(f"--mask-as must be one of {', '.join(MASK_AS)}, not '{config.mask_as}'")
    if not config.split or "/" in config.split:
        raise UsageError(f"--split must be a plain name such as train, not '{config.split}'")
    from tagclip_cli.exportformats import WRITERS

    _check_out(config.out, config.overwrite)
    inputs = _open_inputs(config)
    summary = ExportSummary(out=config.out, format=config.format)
    with _atomic_dir(config.out) as tmp:
        WRITERS[config.format](inputs, tmp, summary, progress or (lambda step, total: None))
        summary.files = sorted(str(p.relative_to(tmp)) for p in tmp.iterdir())
    return summary


def export_yolo(
    masks: str | Path,
    out: str | Path,
    *,
    tags: str | Path | None = None,
    images: str | Path | None = None,
    task: str = "segment",
    copy: bool = False,
    overwrite: bool = False,
    progress: Progress | None = None,
) -> ExportSummary:
    """An Ultralytics YOLO dataset at `out` (images/, labels/, data.yaml) from a masks JSON or
    Parquet, optionally cross-checked against a tags Parquet. `images` is the folder the image ids
    are relative to (default: the recorded paths). Returns the summary; `out/data.yaml` is what
    `ultralytics.YOLO(...).train(data=...)` takes."""
    config = ExportConfig(format="yolo", out=Path(out), masks=Path(masks), tags=Path(tags) if tags else None,
                          images=Path(images) if images else None, task=task, copy=copy, overwrite=overwrite)
    return export(config, progress)
