"""Look at the labels: one overlay PNG per image and an offline HTML contact sheet.

Inputs are the two files the other commands write: the tags Parquet (`tagclip annotate`) and,
optionally, the COCO RLE masks JSON (`tagclip segment`). Cards are in file order, or with
sort="doubt" the likeliest mistakes first: images whose tag decisions lie closest to their
thresholds (`doubt_margins`), failed images first if asked, optionally one class's only. Output
layout::

    OUT/index.html              contact sheet (inline CSS/JS from tagclip_cli/assets/, data embedded as
                                JSON; no network)
    OUT/overlays/<name>.png     image at full size (capped by max_side) with masks, plus a legend
    OUT/thumbs/<name>.jpg       thumbnail of the overlay's image part

The page renders one page of cards at a time from the embedded JSON (thumbnails lazy-load), so a
gallery of tens of thousands of images opens as fast as one of ten.
"""

from __future__ import annotations

import html
import json
import logging
import re
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from tagclip_cli.errors import UsageError, with_suggestion
from tagclip_cli.fileio import atomic_path
from tagclip_cli.formats import (
    TAG_COLUMNS,
    MaskIndex,
    class_color,
    iter_tag_batches,
    label_map,
    load_masks,
    read_tags_schema,
)
from tagclip_cli.showdraw import FAILED_RED, LegendLine, render_overlay, thumbnail

log = logging.getLogger(__name__)

NO_MASK_SWATCH = (255, 255, 255)
PUBLIC_MODE = 0o644  # temp files are created 0600; a gallery is meant to be shared or served


@dataclass(frozen=True)
class ShowConfig:
    """What `tagclip show` renders and where.

    max_side caps the longer side of each overlay's image part (the legend panel is added below);
    thumb_side is the longer side of the thumbnails; page_size the cards per page in index.html;
    limit renders only the first N rows of the tags file (None = all). images: the folder the image
    ids are relative to (only IMAGES/<image id> is drawn), or None for the paths the tags file recorded."""

    tags: Path
    out: Path
    images: Path | None = None
    masks: Path | None = None
    max_side: int = 1024
    thumb_side: int = 256
    page_size: int = 100
    limit: int | None = None
    workers: int = 0
    title: str | None = None
    sort: str = "file"  # "file" (the tags file's order) or "doubt" (smallest margin first)
    failed_first: bool = False  # with sort="doubt": failed images before all others
    doubt_class: str | None = None  # doubt of this class only; implies sort="doubt"
    max_margin: float | None = None  # with doubt: keep only images whose margin is at most this
    thresholds: Path | None = None  # thresholds file (default: those the tags file records)


SORT_ORDERS = ("file", "doubt")


@dataclass
class ShowSummary:
    """Counts after a run. `unreadable` are rows marked ok whose image could not be read now."""

    images: int = 0
    failed_rows: int = 0
    unreadable: list[tuple[str, str]] = field(default_factory=list)
    unmatched_masks: int = 0
    index_html: Path | None = None


# ---- colours --------------------------------------------------------------------------------------


def hex_color(rgb: tuple[int, int, int]) -> str:
    return "#{:02x}{:02x}{:02x}".format(*rgb)


def text_color_on(rgb: tuple[int, int, int]) -> tuple[int, int, int]:
    """Black or white, whichever reads better on `rgb` (relative luminance threshold)."""
    luminance = 0.2126 * rgb[0] + 0.7152 * rgb[1] + 0.0722 * rgb[2]
    return (0, 0, 0) if luminance > 140 else (255, 255, 255)


# ---- inputs ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TagRow:
    """One row of the tags Parquet, with the score of each predicted tag looked up."""

    index: int
    image_id: str
    path: str | None
    width: int | None
    height: int | None
    failed: bool
    error: str | None
    tags: tuple[tuple[str, float | None], ...]
    doubt: tuple[int, float, float] | None = None  # (class index, margin, its threshold); see doubt_margins


def doubt_margins(scores: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
    """How close each tag decision is: |normalised score - threshold| per class (N, F) for
    scores (N, F) and thresholds (F,), the normalisation of the tag rule (docs/algorithm.md §6).
    A small margin is a decision that a small change of score or threshold would flip."""
    from tagclip_cli.thresholds import normalised_scores

    return np.abs(normalised_scores(scores) - np.asarray(thresholds, dtype=np.float32)[None, :])


def _doubt_of(scores: Sequence[float] | None, thresholds: np.ndarray | None, only: int | None
              ) -> tuple[int, float, float] | None:
    """(class, margin, threshold) of a row's closest decision (or of class `only`); None when the
    row has no usable scores or no thresholds were asked for."""
    if thresholds is None or not scores or len(scores) != len(thresholds):
        return None
    margins = doubt_margins(np.asarray([scores], dtype=np.float32), thresholds)[0]
    c = int(np.argmin(margins)) if only is None else only
    return c, float(margins[c]), float(thresholds[c])


def iter_tag_rows(path: Path, classes: Sequence[str], limit: int | None = None,
                  thresholds: np.ndarray | None = None, doubt_class: int | None = None) -> Iterator[TagRow]:
    """Rows of a tags Parquet in file order, reading a few thousand at a time; with (F,)
    thresholds each row carries its doubt (`doubt_margins`: of its closest decision, or of class
    doubt_class)."""
    position = {name: i for i, name in enumerate(classes)}
    count = 0
    for batch in iter_tag_batches(path, TAG_COLUMNS):
        for row in batch:
            if limit is not None and count >= limit:
                return
            scores = row["scores"] or []
            tags = []
            for name in row["tags"] or []:
                i = position.get(name)
                tags.append((name, float(scores[i]) if i is not None and i < len(scores) else None))
            yield TagRow(
                index=int(row["index"]),
                image_id=str(row["image_id"]),
                path=row["path"],
                width=row["width"],
                height=row["height"],
                failed=row["status"] != "ok",
                error=row["error"],
                tags=tuple(tags),
                doubt=None if row["status"] != "ok" else _doubt_of(row["scores"], thresholds, doubt_class),
            )
            count += 1


def doubt_order(rows: Sequence[TagRow], failed_first: bool = False, max_margin: float | None = None
                ) -> list[TagRow]:
    """Rows by increasing doubt margin (ties: file order); failed rows (no scores) first with
    failed_first, else last; rows whose margin exceeds max_margin are left out (failed rows are
    kept only with failed_first)."""
    failed = [r for r in rows if r.doubt is None]
    scored = [r for r in rows if r.doubt is not None and (max_margin is None or r.doubt[1] <= max_margin)]
    scored.sort(key=lambda r: r.doubt[1])  # stable: file order among equal margins
    if failed_first:
        return failed + scored
    return scored + ([] if max_margin is not None else failed)


# ---- one image ------------------------------------------------------------------------------------


def safe_name(index: int, image_id: str) -> str:
    """A file name for row `index` that is unique (the index) and readable (the sanitised stem)."""
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", Path(image_id).stem).strip("._") or "image"
    return f"{index:07d}_{stem[:60]}"


@dataclass(frozen=True)
class RenderJob:
    """Everything a worker needs to draw one image (picklable)."""

    row: TagRow
    source: str | None
    annotations: tuple[dict[str, Any], ...]
    mask_size: tuple[int, int] | None  # (height, width) declared by the masks file
    label_of: dict[int, int]
    names: tuple[str, ...]  # names[label - 1]
    out: str
    name: str
    max_side: int
    thumb_side: int


def render_job(job: RenderJob) -> dict[str, Any]:
    """Draw and save one overlay and thumbnail; returns the card's data for index.html."""
    row = job.row
    picture, read_error = _read_picture(job.source)
    colors = np.array([(0, 0, 0)] + [class_color(i + 1) for i in range(len(job.names))], dtype=np.uint8)
    labels = _job_labels(job, picture)
    mask_share: dict[int, float] = {}
    if labels is not None:
        counts = np.bincount(labels.ravel(), minlength=len(job.names) + 1)
        mask_share = {lab: counts[lab] / labels.size for lab in np.flatnonzero(counts[1:]) + 1}

    failed = row.failed or read_error is not None
    error = row.error if row.failed else (f"cannot read image now: {read_error}" if read_error else None)
    position = {name: i + 1 for i, name in enumerate(job.names)}
    size_text = f"{picture.width}x{picture.height}" if picture is not None else (
        f"{row.width}x{row.height}" if row.width and row.height else "size unknown")
    lines = _legend_lines(job, size_text, mask_share, position, failed, error)

    overlay, part = render_overlay(picture, labels, colors, lines, failed, job.max_side)
    overlay_rel, thumb_rel, thumb = _save_overlay(job, overlay, part)
    card = {
        "id": row.image_id,
        "o": overlay_rel,
        "t": thumb_rel,
        "tw": thumb.width,
        "th": thumb.height,
        "size": size_text,
        "tags": [[position.get(n, 0) - 1, None if s is None else round(s, 4)] for n, s in row.tags],
        "masks": sorted(int(lab) - 1 for lab in mask_share),
        "err": error if failed else None,
        "read_error": read_error if not row.failed else None,
    }
    if row.doubt is not None:  # [class index, margin, threshold] of the closest decision
        card["doubt"] = [row.doubt[0], round(row.doubt[1], 4), round(row.doubt[2], 4)]
    return card


def _read_picture(source: str | None) -> tuple[Image.Image | None, str | None]:
    """The RGB image at source, or None and why it cannot be read now."""
    from tagclip_cli.data import DecodeError, load_rgb

    if source is None:
        return None, "image file not found"
    try:
        return load_rgb(source), None
    except DecodeError as exc:
        return None, str(exc)


def _job_labels(job: RenderJob, picture: Image.Image | None) -> np.ndarray | None:
    """The (H, W) label map of the job's masks at the picture's size (None without picture or masks)."""
    if picture is None or not job.annotations:
        return None
    h, w = job.mask_size or (picture.height, picture.width)
    labels = label_map(job.annotations, job.label_of, h, w, f"masks of {job.row.image_id}", resize=True)
    if labels.shape != (picture.height, picture.width):
        labels = np.asarray(
            Image.fromarray(labels).resize((picture.width, picture.height), Image.Resampling.NEAREST)
        )
    return labels


def _legend_lines(job: RenderJob, size_text: str, mask_share: dict[int, float], position: dict[str, int],
                  failed: bool, error: str | None) -> list[LegendLine]:
    """The legend: the id, the failure or the size, each tag (with its mask share), masks that are
    not tags, and the closest decision when the rows are in doubt order."""
    row = job.row
    lines = [LegendLine(row.image_id, bold=True)]
    if failed:
        lines.append(LegendLine(f"FAILED: {error or 'unknown error'}", color=FAILED_RED, bold=True))
    else:
        lines.append(LegendLine(f"{size_text} · {len(row.tags)} tag(s) with scores", color=(90, 90, 90)))
    shown: set[int] = set()
    for name, score in row.tags:
        label = position.get(name)
        text = name if score is None else f"{name} {score:.2f}"
        if label in mask_share:
            text += f" · mask {100 * mask_share[label]:.1f}% of pixels"
            shown.add(label)
        # A white swatch = a tag without a mask (no class colour is pure white).
        lines.append(LegendLine(text, swatch=class_color(label) if label in mask_share else NO_MASK_SWATCH))
    for label, share in sorted(mask_share.items()):
        if label not in shown:
            lines.append(LegendLine(f"{job.names[label - 1]} (not a tag) · mask {100 * share:.1f}% of pixels",
                                    swatch=class_color(label)))
    if not failed and not row.tags:
        lines.append(LegendLine("no tags above the threshold", color=(90, 90, 90)))
    if row.doubt is not None:
        c, margin, threshold = row.doubt
        lines.append(LegendLine(f"closest decision: {job.names[c]}, {margin:.3f} from its threshold {threshold:.2f}",
                                color=(90, 90, 90)))
    return lines


def _save_overlay(job: RenderJob, overlay: Image.Image, part: Image.Image) -> tuple[str, str, Image.Image]:
    """Write overlays/<name>.png and thumbs/<name>.jpg; their relative paths and the thumbnail."""
    out = Path(job.out)
    overlay_rel = f"overlays/{job.name}.png"
    thumb_rel = f"thumbs/{job.name}.jpg"
    with atomic_path(out / overlay_rel) as tmp:
        overlay.save(tmp, format="PNG", compress_level=6)
        tmp.chmod(PUBLIC_MODE)
    thumb = thumbnail(part, job.thumb_side)
    with atomic_path(out / thumb_rel) as tmp:
        thumb.save(tmp, format="JPEG", quality=85)
        tmp.chmod(PUBLIC_MODE)
    return overlay_rel, thumb_rel, thumb


# ---- the whole gallery ----------------------------------------------------------------------------


def resolve_source(images: Path | None, row: TagRow) -> str | None:
    """The image file for a row: IMAGES/<image_id> when a folder is given, else the path recorded at
    annotation time; None when that file is not there."""
    candidate = images / row.image_id if images is not None else (Path(row.path) if row.path else None)
    return str(candidate) if candidate is not None and candidate.is_file() else None


def _rows_to_show(config: ShowConfig, classes: Sequence[str]) -> list[TagRow]:
    """The rows of the gallery, in order: the first `limit` rows of the file, or with the doubt
    order the `limit` most doubtful of all rows."""
    if config.sort not in SORT_ORDERS:
        raise UsageError(f"--sort must be one of {', '.join(SORT_ORDERS)}, not '{config.sort}'")
    by_doubt = config.sort == "doubt" or config.doubt_class is not None
    if not by_doubt:
        if config.failed_first or config.max_margin is not None or config.thresholds is not None:
            raise UsageError("--failed-first, --max-margin and --thresholds order by doubt: add --sort doubt")
        return list(iter_tag_rows(config.tags, classes, config.limit))
    from tagclip_cli.thresholds import read_threshold_file, thresholds_from_record

    recorded = thresholds_from_record(read_tags_schema(config.tags))
    chosen = read_threshold_file(config.thresholds, classes, recorded.default) if config.thresholds else recorded
    vector = np.asarray(chosen.vector(classes), dtype=np.float32)
    only = None
    if config.doubt_class is not None:
        if config.doubt_class not in classes:
            raise UsageError(with_suggestion(f"--class {config.doubt_class!r}: not a class of {config.tags} "
                                             f"({', '.join(classes[:5])}{', ...' if len(classes) > 5 else ''})",
                                             config.doubt_class, classes))
        only = list(classes).index(config.doubt_class)
    rows = doubt_order(list(iter_tag_rows(config.tags, classes, None, vector, only)), config.failed_first,
                       config.max_margin)
    return rows[: config.limit] if config.limit is not None else rows


def build_gallery(config: ShowConfig, progress: Callable[[int, int], object] | None = None) -> ShowSummary:
    """Render every overlay and thumbnail, then write index.html. Raises UsageError for bad inputs."""
    if config.images is not None and not config.images.is_dir():
        raise UsageError(f"{config.images}: not a directory (--images)")
    if config.out.exists() and not config.out.is_dir():
        raise UsageError(f"{config.out}: exists and is not a directory (--out)")
    classes = [str(c) for c in read_tags_schema(config.tags).classes or []]
    masks = load_masks(config.masks) if config.masks else None
    names = list(classes)
    if masks is not None:
        for cat_id in sorted(masks.categories):
            if masks.categories[cat_id] not in names:
                names.append(masks.categories[cat_id])
    label_of = {} if masks is None else {cid: names.index(n) + 1 for cid, n in masks.categories.items()}
    rows = _rows_to_show(config, classes)
    if not rows:
        raise UsageError(f"{config.tags}: no rows to show" + (
            f" (no image within --max-margin {config.max_margin})" if config.max_margin is not None else ""))
    for sub in ("overlays", "thumbs"):
        (config.out / sub).mkdir(parents=True, exist_ok=True)

    summary = ShowSummary(images=len(rows))
    jobs = _render_jobs(config, rows, masks, names, label_of, summary)
    cards = _render_all(jobs, config.workers, progress)
    for row, card in zip(rows, cards, strict=True):
        if row.failed:
            summary.failed_rows += 1
        elif card["read_error"]:
            summary.unreadable.append((row.image_id, card["read_error"]))
        del card["read_error"]

    title = config.title or f"tagclip gallery: {config.tags.name}"
    page = gallery_html(title, names, cards, config.page_size, sources={
        "tags": str(config.tags), "masks": str(config.masks) if config.masks else None,
    })
    summary.index_html = config.out / "index.html"
    with atomic_path(summary.index_html) as tmp:
        tmp.write_text(page, encoding="utf-8")
        tmp.chmod(PUBLIC_MODE)
    return summary


def _render_jobs(config: ShowConfig, rows: Sequence[TagRow], masks: MaskIndex | None, names: Sequence[str],
                 label_of: dict[int, int], summary: ShowSummary) -> list[RenderJob]:
    """One RenderJob per row, with the row's masks (matched by file name); counts the masks file's
    images that match no row in `summary.unmatched_masks` (and warns)."""
    used_masks: set[int] = set()
    jobs = []
    for row in rows:
        coco_id = masks.lookup(row.image_id, row.path) if masks else None
        anns: tuple[dict[str, Any], ...] = ()
        mask_size = None
        if coco_id is not None:
            used_masks.add(coco_id)
            anns = tuple(masks.annotations.get(coco_id, ()))
            im = masks.images[coco_id]
            if im.get("height") and im.get("width"):
                mask_size = (int(im["height"]), int(im["width"]))
        jobs.append(RenderJob(
            row=row, source=resolve_source(config.images, row), annotations=anns, mask_size=mask_size,
            label_of=label_of, names=tuple(names), out=str(config.out), name=safe_name(row.index, row.image_id),
            max_side=config.max_side, thumb_side=config.thumb_side,
        ))
    if masks is not None:
        summary.unmatched_masks = len(set(masks.images) - used_masks)
        if summary.unmatched_masks:
            log.warning("%d image(s) in %s match no row of %s (matched by file name)",
                        summary.unmatched_masks, config.masks, config.tags)
    return jobs


def _render_all(jobs: Sequence[RenderJob], workers: int,
                progress: Callable[[int, int], object] | None) -> list[dict[str, Any]]:
    """The cards of every job, in order: in a process pool with workers > 1, else here."""
    cards: list[dict[str, Any]] = []
    if workers > 1:
        with ProcessPoolExecutor(max_workers=workers) as pool:
            for card in pool.map(render_job, jobs, chunksize=8):
                cards.append(card)
                if progress:
                    progress(1, len(jobs))
    else:
        for job in jobs:
            cards.append(render_job(job))
            if progress:
                progress(1, len(jobs))
    return cards


# ---- index.html -----------------------------------------------------------------------------------


def gallery_html(title: str, classes: Sequence[str], cards: Sequence[dict[str, Any]], page_size: int,
                 sources: dict[str, Any]) -> str:
    """A self-contained page: inline CSS and JS, cards rendered from embedded JSON, one page at a time."""
    payload = {
        "title": title,
        "classes": [{"name": n, "color": hex_color(class_color(i + 1)),
                     "ink": hex_color(text_color_on(class_color(i + 1)))} for i, n in enumerate(classes)],
        "cards": list(cards),
        "pageSize": page_size,
        "sources": sources,
    }
    # "<" escaped so that no string in the data can close the <script> element.
    data = json.dumps(payload, ensure_ascii=False, separators=(",", ":")).replace("<", "\\u003c")
    return (
        _asset("gallery.html").replace("__TITLE__", html.escape(title))
        .replace("__CSS__", _asset("gallery.css"))
        .replace("__JS__", _asset("gallery.js"))
        .replace("__DATA__", data)
    )


@lru_cache(maxsize=4)
def _asset(name: str) -> str:
    """A page asset shipped as package data (tagclip_cli/assets/)."""
    return resources.files("tagclip_cli").joinpath("assets", name).read_text(encoding="utf-8")
