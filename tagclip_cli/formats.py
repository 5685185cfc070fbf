"""Reading our own outputs back: the tags Parquet with its run metadata, the COCO masks JSON, COCO
segmentations (RLE or polygons) as masks and label maps, and the colours of label values.

The one place that opens these files, for `tagclip segment --tags`, `tagclip evaluate` and
`tagclip show`. Every problem with a file raises `FormatError` (a UsageError, exit code 2) whose
one-line message names the file and what is wrong with it; callers may add their flag's name.
Writing is `tagclip_cli.writers`; this module depends on it (the palette) and on `record`,
never the other way round.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from tagclip_cli.errors import FormatError
from tagclip_cli.fileio import file_sha256
from tagclip_cli.record import METADATA_KEY, RecordIO, RunRecord
from tagclip_cli.writers import (
    CAMS_FORMAT,
    CAMS_INDEX,
    schema_record,
    voc_palette,
)

if TYPE_CHECKING:
    from tagclip_cli.vocab import Vocabulary

__all__ = [
    "MASK_COLUMNS", "TAG_COLUMNS", "CamFile", "CocoFile", "FileTags", "FormatError", "MaskFile", "MaskImage",
    "MaskIndex", "MaskRegion", "TagsFile", "class_color", "decode_segmentation", "iter_mask_images",
    "iter_tag_batches", "iter_tag_tables", "label_map", "load_masks", "open_masks", "read_cam_file",
    "read_cams_index", "read_coco", "read_tags", "read_tags_schema", "rle_decode", "tag_classes",
    "tags_arrow_schema",
]  # fmt: skip

TAG_COLUMNS = ("index", "image_id", "path", "width", "height", "status", "error", "tags", "scores")
_KEY = METADATA_KEY.decode()
_NOT_TAGS = "not a tags Parquet written by tagclip annotate"


# ---- the tags Parquet -----------------------------------------------------------------------------


def read_tags_schema(path: str | Path, columns: Sequence[str] = TAG_COLUMNS) -> RunRecord:
    """The run record of a tags Parquet (empty when it has none), after checking that the file is a
    Parquet file with `columns`. Raises FormatError naming the file."""
    path = Path(path)
    if not path.is_file():
        raise FormatError(f"{path}: no such tags file")
    return _parquet_config(path, columns, _NOT_TAGS)


def _parquet_config(path: Path, columns: Sequence[str], what: str) -> RunRecord:
    """The run record of one of our Parquet outputs, after checking it is Parquet with `columns`;
    FormatError naming the file otherwise (`what` says which of our files it is not)."""
    try:
        schema = pq.read_schema(path)
    except (OSError, ValueError, pa.ArrowException) as exc:
        raise FormatError(f"{path}: {what} (not a Parquet file: {exc})") from None
    missing = [c for c in columns if c not in schema.names]
    if missing:
        raise FormatError(f"{path}: {what} (missing columns: {', '.join(missing)})")
    try:
        return schema_record(schema, path)
    except ValueError as exc:
        raise FormatError(f"{path}: its '{_KEY}' metadata is not JSON ({exc})") from None


def tag_classes(path: str | Path, record: RunRecord) -> tuple[str, ...]:
    """The vocabulary (`classes`) of a tags file's run record; FormatError when it has none."""
    if not RecordIO.to_dict(record):
        raise FormatError(f"{path}: no '{_KEY}' metadata (not written by `tagclip annotate`)")
    classes = record.classes
    if not isinstance(classes, list):
        raise FormatError(f"{path}: the '{_KEY}' metadata has no valid 'classes' list")
    return tuple(str(c) for c in classes)


def read_tags(path: str | Path, columns: Sequence[str] = TAG_COLUMNS) -> tuple[pa.Table, RunRecord]:
    """(table of `columns`, run record) of a tags Parquet. Raises FormatError naming the file."""
    record = read_tags_schema(path, columns)
    try:
        table = pq.read_table(path, columns=list(columns))
    except (OSError, ValueError, pa.ArrowException) as exc:
        raise FormatError(f"{path}: cannot read tags ({exc})") from None
    return table, record


def iter_tag_batches(
    path: str | Path, columns: Sequence[str] = TAG_COLUMNS, batch_size: int = 2048
) -> Iterator[list[dict]]:
    """Rows of a tags Parquet as lists of dicts, `batch_size` at a time (memory stays flat).
    Call `read_tags_schema` first to check the file."""
    try:
        for batch in pq.ParquetFile(path).iter_batches(batch_size=batch_size, columns=list(columns)):
            yield batch.to_pylist()
    except (OSError, ValueError, pa.ArrowException) as exc:
        raise FormatError(f"{path}: cannot read tags ({exc})") from None


def tags_arrow_schema(path: str | Path) -> pa.Schema:
    """The Arrow schema (columns and metadata) of a tags Parquet; `read_tags_schema` checks it first."""
    try:
        return pq.read_schema(path)
    except (OSError, ValueError, pa.ArrowException) as exc:
        raise FormatError(f"{path}: {_NOT_TAGS} (not a Parquet file: {exc})") from None


def iter_tag_tables(path: str | Path, batch_size: int = 4096) -> Iterator[pa.Table]:
    """Every column of a tags Parquet, `batch_size` rows at a time in file order (memory stays
    flat; `tagclip retag`). Call `read_tags_schema` first to check the file."""
    try:
        for batch in pq.ParquetFile(path).iter_batches(batch_size=batch_size):
            yield pa.Table.from_batches([batch])
    except (OSError, ValueError, pa.ArrowException) as exc:
        raise FormatError(f"{path}: cannot read tags ({exc})") from None


@dataclass
class FileTags:
    """One image's entry in a tags file: foreground indices, the stored scores, or the failure."""

    tags: list[int]
    names: list[str]
    scores: list[float] | None
    error: str | None = None


class TagsFile:
    """The tags Parquet of an earlier `tagclip annotate` (or segment --tags-out) run, looked up by
    image id. Its classes must be the vocabulary's, in the same order."""

    COLUMNS = ("image_id", "status", "error", "tags", "scores")

    def __init__(self, path: str | Path, vocab: Vocabulary) -> None:
        self.path = Path(path)
        self.table, self.record = read_tags(self.path, self.COLUMNS)
        classes = self.record.classes
        if classes is not None and list(classes) != list(vocab.classes):
            raise FormatError(
                f"{self.path}: made with other classes ({len(classes)}: {', '.join(classes[:4])}, ...) "
                f"than the vocabulary {vocab.source} ({vocab.num_classes}: {', '.join(vocab.classes[:4])}, ...)"
            )
        self.class_index = {name: i for i, name in enumerate(vocab.classes)}
        self.ids = self.table.column("image_id")
        self._by_id: dict[str, int] | None = None

    def _row(self, item) -> int | None:
        """The row of item: the same position first (files made from the same input list), else by id."""
        if item.index < len(self.ids) and self.ids[item.index].as_py() == item.image_id:
            return item.index
        if self._by_id is None:
            self._by_id = {}
            for row, image_id in enumerate(self.ids.to_pylist()):
                self._by_id.setdefault(image_id, row)
        return self._by_id.get(item.image_id)

    def lookup(self, item) -> FileTags:
        """The entry of an `ImageItem` (index, image_id); a missing or failed row is an error entry."""
        row = self._row(item)
        if row is None:
            return FileTags([], [], None, f"no tags for this image in {self.path.name}")
        rec = {name: self.table.column(name)[row].as_py() for name in self.COLUMNS}
        if rec["status"] != "ok":
            return FileTags([], [], None, f"tagging failed in {self.path.name}: {rec['error']}")
        names = list(rec["tags"] or [])
        unknown = [n for n in names if n not in self.class_index]
        if unknown:
            return FileTags([], [], None, f"tags not in the vocabulary in {self.path.name}: {', '.join(unknown)}")
        return FileTags([self.class_index[n] for n in names], names, rec["scores"])

    def identity(self) -> dict:
        """What the segment output depends on: the file's content hash and the run that made it
        (TagCLIP's settings, or another tagging method's: PIAA's with its fit)."""
        made_with = self.record.tagclip if self.record.tagger is None else self.record.tagger
        return {"sha256": file_sha256(self.path), "made_with": made_with}


# ---- COCO JSON (our masks file, and COCO instances ground truth) ----------------------------------


@dataclass
class CocoFile:
    """A parsed COCO JSON: categories sorted by id, images by id, annotations grouped per image id."""

    path: Path
    categories: list[dict[str, Any]]
    images: dict[int, dict[str, Any]]
    annotations: dict[int, list[dict[str, Any]]]
    info: dict[str, Any] = field(default_factory=dict)


def read_coco(path: str | Path, what: str = "masks file", kind: str = "masks") -> CocoFile:
    """Parse and check a COCO JSON (images, annotations, categories; every annotation's category
    and image exist). Errors call the file `what` ("masks file", "COCO annotation file") and the
    COCO flavour expected `kind` ("masks", "instances")."""
    path = Path(path)
    try:
        with open(path, encoding="utf-8") as fh:
            data = json.load(fh)
    except FileNotFoundError:
        raise FormatError(f"{path}: no such {what}") from None
    except (UnicodeDecodeError, ValueError) as exc:
        raise FormatError(f"{path}: cannot read {what} (not a JSON file: {exc})") from None
    except OSError as exc:
        raise FormatError(f"{path}: cannot read {what} ({exc})") from None
    if not isinstance(data, dict) or not all(k in data for k in ("images", "annotations", "categories")):
        raise FormatError(f"{path}: not a COCO {kind} file (needs images, annotations, categories)")
    try:
        categories = sorted(data["categories"], key=lambda c: int(c["id"]))
        known = {int(c["id"]): str(c["name"]) for c in categories}  # a nameless category is malformed
        images = {int(im["id"]): im for im in data["images"]}
        annotations: dict[int, list[dict[str, Any]]] = {}
        for ann in data["annotations"]:
            image_id = int(ann["image_id"])
            if int(ann["category_id"]) not in known:
                raise FormatError(f"{path}: annotation {ann.get('id')} has unknown category {ann['category_id']}")
            if image_id not in images:
                raise FormatError(f"{path}: annotation {ann.get('id')} refers to unknown image {image_id}")
            annotations.setdefault(image_id, []).append(ann)
    except (KeyError, TypeError, ValueError) as exc:
        raise FormatError(f"{path}: malformed COCO file ({exc!r})") from None
    info = data.get("info")
    return CocoFile(path, categories, images, annotations, info if isinstance(info, dict) else {})


@dataclass
class MaskIndex:
    """Annotations of a COCO RLE masks file, grouped per image and findable by image name."""

    categories: dict[int, str]
    by_name: dict[str, int]
    images: dict[int, dict[str, Any]]
    annotations: dict[int, list[dict[str, Any]]]

    def lookup(self, image_id: str, path: str | None) -> int | None:
        """COCO image id for a tags row: by our image id (relative path), then by path, then by
        file name when that is unique."""
        for key in (image_id, path, Path(image_id).name):
            if key and key in self.by_name:
                return self.by_name[key]
        return None


def load_masks(path: str | Path) -> MaskIndex:
    """Our masks (`tagclip segment`: the COCO masks JSON or the masks Parquet) indexed by image name:
    `tagclip_image_id`, `file_name`, and the file's base name where only one image has it."""
    coco = read_masks_as_coco(path, "masks file")
    by_name: dict[str, int] = {}
    basenames: dict[str, list[int]] = {}
    for image_id, im in coco.images.items():
        for key in ("tagclip_image_id", "file_name"):
            if im.get(key) is not None:
                by_name.setdefault(str(im[key]), image_id)
        if im.get("file_name") is not None:
            basenames.setdefault(Path(str(im["file_name"])).name, []).append(image_id)
    for name, ids in basenames.items():
        if len(ids) == 1:
            by_name.setdefault(name, ids[0])
    categories = {int(c["id"]): str(c["name"]) for c in coco.categories}
    return MaskIndex(categories, by_name, coco.images, coco.annotations)


# ---- masks, one image at a time (COCO masks JSON or masks Parquet) ---------------------------------

# The masks Parquet (`tagclip segment --out masks.parquet`): one row per (image, class mask), plus one
# row with a null class_id for an image without masks or a failed image; the run metadata (with
# "classes") under METADATA_KEY as in the tags Parquet. class_id = vocabulary index + 1, the COCO
# category id of `writers.coco_categories`.
MASK_COLUMNS = ("image_id", "path", "width", "height", "status", "error", "class_id", "class_name", "score",
                "area", "bbox", "counts")
_NOT_MASKS = "not a masks Parquet written by tagclip segment"


@dataclass(frozen=True)
class MaskRegion:
    """One class's mask in one image: COCO category id (vocabulary index + 1), its name, the mask's
    score (None when not stored or NaN), area in pixels, bbox [x, y, w, h] and compressed COCO RLE counts."""

    class_id: int
    class_name: str
    score: float | None
    area: int
    bbox: tuple[float, float, float, float]
    counts: str

    def mask(self, height: int, width: int) -> np.ndarray:
        """The (H, W) bool mask."""
        return rle_decode(self.counts, height, width)


@dataclass
class MaskImage:
    """One image of a masks file: our image id, its path (as recorded), size, status ("ok" or
    "failed"), the error of a failed image, and its masks (empty for failed images)."""

    image_id: str
    path: str
    width: int
    height: int
    status: str
    error: str | None
    masks: list[MaskRegion]


class MaskFile:
    """A masks file opened for streaming: the COCO masks JSON (read whole: JSON has no random access)
    or the masks Parquet (read a row group at a time: memory stays flat). `classes` are the category
    names in id order (id = position + 1 for our files), `categories` maps id to name. Iterating
    yields `MaskImage`s in file order; `image_ids()` yields only the ids (cheap for Parquet)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise FormatError(f"{self.path}: no such masks file")
        self.kind = "parquet" if self.path.suffix.lower() in (".parquet", ".pq") else "json"
        self._coco: CocoFile | None = None
        if self.kind == "parquet":
            self.record = self._parquet_record()
            self.categories = {i + 1: name for i, name in enumerate(tag_classes(self.path, self.record))}
        else:
            self._coco = read_coco(self.path, "masks file")
            stored = self._coco.info.get(_KEY)
            self.record = RecordIO.from_dict(stored if isinstance(stored, dict) else {}, self.path)
            self.categories = {int(c["id"]): str(c["name"]) for c in self._coco.categories}
        self.classes = tuple(self.categories.values())

    def _parquet_record(self) -> RunRecord:
        return _parquet_config(self.path, MASK_COLUMNS, _NOT_MASKS)

    def _batches(self, columns: Sequence[str], batch_size: int) -> Iterator[list[dict]]:
        try:
            for batch in pq.ParquetFile(self.path).iter_batches(batch_size=batch_size, columns=list(columns)):
                yield batch.to_pylist()
        except (OSError, ValueError, pa.ArrowException) as exc:
            raise FormatError(f"{self.path}: cannot read masks ({exc})") from None

    def image_ids(self) -> Iterator[str]:
        """Image ids in file order, one per image (a Parquet image's rows are consecutive)."""
        if self._coco is not None:
            for im in self._coco.images.values():
                yield _coco_image_id(im)
            return
        previous = None
        for rows in self._batches(("image_id",), 1 << 16):
            for row in rows:
                if row["image_id"] != previous:
                    previous = row["image_id"]
                    yield previous

    def __iter__(self) -> Iterator[MaskImage]:
        if self._coco is not None:
            yield from self._iter_json(self._coco)
        else:
            yield from self._iter_parquet()

    def _iter_json(self, coco: CocoFile) -> Iterator[MaskImage]:
        for coco_id, im in coco.images.items():
            where = f"{self.path}: image {coco_id}"
            try:
                width, height = int(im["width"]), int(im["height"])
                regions = []
                for ann in coco.annotations.get(coco_id, ()):
                    segm = ann["segmentation"]
                    if not (isinstance(segm, dict) and isinstance(segm.get("counts"), str)):
                        raise FormatError(f"{where}: annotation {ann.get('id')} is not a compressed RLE "
                                          "with str counts")
                    regions.append(MaskRegion(int(ann["category_id"]), self.categories[int(ann["category_id"])],
                                              _finite(ann.get("score")), int(ann["area"]),
                                              tuple(float(v) for v in ann["bbox"]), segm["counts"]))
            except (KeyError, TypeError, ValueError) as exc:
                raise FormatError(f"{where}: malformed image or annotation ({exc!r})") from None
            status = str(im.get("tagclip_status", "ok"))
            yield MaskImage(_coco_image_id(im), str(im.get("file_name", "")), width, height, status,
                            im.get("tagclip_error"), regions if status == "ok" else [])

    def _iter_parquet(self) -> Iterator[MaskImage]:
        current: MaskImage | None = None
        for rows in self._batches(MASK_COLUMNS, 4096):
            for row in rows:
                if current is None or row["image_id"] != current.image_id:
                    if current is not None:
                        yield current
                    current = MaskImage(row["image_id"], row["path"], row["width"], row["height"], row["status"],
                                        row["error"], [])
                if row["class_id"] is None:
                    continue
                class_id = int(row["class_id"])
                name = self.categories.get(class_id)
                if name is None or (row["class_name"] is not None and row["class_name"] != name):
                    raise FormatError(f"{self.path}: image {row['image_id']}: class {class_id} "
                                      f"'{row['class_name']}' is not in the file's classes")
                if row["counts"] is None or row["bbox"] is None or len(row["bbox"]) != 4:
                    raise FormatError(f"{self.path}: image {row['image_id']}: class '{name}' has no counts or bbox")
                current.masks.append(MaskRegion(class_id, name, _finite(row["score"]), int(row["area"] or 0),
                                                tuple(row["bbox"]), row["counts"]))
        if current is not None:
            yield current


def _finite(score: Any) -> float | None:
    """A stored mask score as a float, None when missing or not finite (JSON has no NaN)."""
    if score is None:
        return None
    value = float(score)
    return value if math.isfinite(value) else None


def _coco_image_id(im: Mapping[str, Any]) -> str:
    return str(im.get("tagclip_image_id") or im.get("file_name") or im["id"])


def is_masks_parquet(path: str | Path) -> bool:
    """Whether `path` is a Parquet file with the masks Parquet's mask columns (class_id, counts)."""
    try:
        names = pq.read_schema(path).names
    except (OSError, ValueError, pa.ArrowException):
        return False
    return "class_id" in names and "counts" in names


def read_masks_as_coco(path: str | Path, what: str = "masks file", kind: str = "masks") -> CocoFile:
    """Our masks as a parsed COCO JSON, whichever file `tagclip segment` wrote: the COCO masks JSON
    (`read_coco`), or the masks Parquet, whose images are numbered from 1 in file order and whose
    annotations are what the COCO JSON of the same run holds (its run record as info["tagclip"])."""
    if not is_masks_parquet(path):
        return read_coco(path, what, kind)
    masks = MaskFile(path)
    images: dict[int, dict[str, Any]] = {}
    annotations: dict[int, list[dict[str, Any]]] = {}
    for number, image in enumerate(masks, start=1):
        images[number] = {"id": number, "file_name": image.image_id, "width": image.width, "height": image.height,
                          "tagclip_image_id": image.image_id, "tagclip_status": image.status}
        if image.status != "ok":
            images[number]["tagclip_error"] = image.error
        annotations[number] = [
            {"image_id": number, "category_id": region.class_id, "area": region.area, "bbox": list(region.bbox),
             "segmentation": {"size": [image.height, image.width], "counts": region.counts}, "iscrowd": 0,
             "score": region.score}
            for region in image.masks]
    categories = [{"id": cid, "name": name} for cid, name in masks.categories.items()]
    return CocoFile(masks.path, categories, images, {k: v for k, v in annotations.items() if v},
                    {_KEY: RecordIO.stored(masks.record)})


def open_masks(path: str | Path) -> MaskFile:
    """Open a masks file (`.parquet`: masks Parquet, else COCO masks JSON). Raises FormatError."""
    return MaskFile(path)


def iter_mask_images(path: str | Path) -> Iterator[MaskImage]:
    """The images of a masks file one at a time (`MaskFile`)."""
    yield from MaskFile(path)


# ---- segmentations --------------------------------------------------------------------------------


def decode_segmentation(segm: Any, height: int, width: int, where: str, *, resize: bool = False) -> np.ndarray:
    """A COCO `segmentation` (polygons, uncompressed or compressed RLE with str or bytes counts) as
    an (H, W) bool mask. A mask of another size is an error naming `where`, or with `resize`
    scaled to (H, W) by nearest neighbour."""
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
        mask = mask_utils.decode(rle).astype(bool)
    except (ValueError, TypeError, KeyError, IndexError) as exc:
        raise FormatError(f"{where}: invalid segmentation ({exc})") from None
    if mask.shape[:2] != (height, width):
        if not resize:
            raise FormatError(f"{where}: mask is {mask.shape[1]}x{mask.shape[0]} but the image is {width}x{height}")
        from PIL import Image

        mask = np.asarray(Image.fromarray(mask).resize((width, height), Image.Resampling.NEAREST))
    return mask


def rle_decode(counts: str, height: int, width: int) -> np.ndarray:
    """(H, W) bool mask of a compressed RLE counts string (a `masks` entry of a segment row)."""
    return decode_segmentation({"size": [height, width], "counts": counts}, height, width, "RLE")


def label_map(
    annotations: Sequence[Mapping[str, Any]],
    label_of: Mapping[int, int],
    height: int,
    width: int,
    where: str = "masks",
    *,
    resize: bool = False,
) -> np.ndarray:
    """(H, W) int32 map: 0 where no mask, else `label_of[category_id]`. Where masks overlap the
    higher `score` wins (`tagclip evaluate` and `tagclip show` alike). `resize` as in
    `decode_segmentation`."""
    out = np.zeros((height, width), dtype=np.int32)
    for ann in sorted(annotations, key=lambda a: float(a.get("score") or 0.0)):
        mask = decode_segmentation(ann["segmentation"], height, width, where, resize=resize)
        out[mask] = label_of[int(ann["category_id"])]
    return out


# ---- colours --------------------------------------------------------------------------------------

_PALETTE = voc_palette()


def class_color(label: int) -> tuple[int, int, int]:
    """RGB of label value `label` (class position + 1) in the PASCAL VOC palette of our label PNGs;
    labels past 255 wrap around (0 is never used for a class)."""
    if label <= 0:
        raise ValueError("label 0 is 'no class' and has no colour")
    value = (label - 1) % 255 + 1
    r, g, b = _PALETTE[3 * value : 3 * value + 3]
    return r, g, b


# ---- saved cams (segment --save-cams; written by writers.write_cam_file) ---------------------------

@dataclass(frozen=True)
class CamFile:
    """One image's saved cams: `cams` (K, h, w) float16 (image size or patch grid), `tags` (K,)
    vocabulary indices, `size` the image's (height, width), and its id and path."""

    cams: np.ndarray
    tags: np.ndarray
    size: tuple[int, int]
    image_id: str
    path: str


def read_cams_index(cams_dir: str | Path) -> dict:
    """DIR/cams.json of a --save-cams directory, checked (FormatError naming the problem)."""
    cams_dir = Path(cams_dir)
    if not cams_dir.is_dir():
        raise FormatError(f"--cams {cams_dir}: not a directory of saved cams (segment --save-cams DIR)")
    target = cams_dir / CAMS_INDEX
    try:
        index = json.loads(target.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FormatError(f"--cams {cams_dir}: no {CAMS_INDEX}; not written by segment --save-cams") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise FormatError(f"{target}: cannot read ({exc})") from None
    if not isinstance(index, dict) or index.get("format") != CAMS_FORMAT:
        raise FormatError(f"{target}: not a tagclip cams index (format {CAMS_FORMAT!r} expected)")
    if index.get("layout") not in ("image", "grid") or not isinstance(index.get("classes"), list) \
            or not isinstance(index.get("rule"), dict):
        raise FormatError(f"{target}: malformed cams index (layout, classes or rule missing)")
    return index


def read_cam_file(path: str | Path, num_classes: int | None = None) -> CamFile:
    """One .npz of a --save-cams directory (FormatError naming the file and problem)."""
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as data:
            cams, tags, size = data["cams"], data["tags"], data["size"]
            image_id, image_path = str(data["image_id"]), str(data["path"])
    except FileNotFoundError:
        raise FormatError(f"{path}: cam file not found") from None
    except (OSError, ValueError, KeyError, EOFError) as exc:
        raise FormatError(f"{path}: not a cam file written by segment --save-cams ({exc})") from None
    if cams.ndim != 3 or tags.shape != (cams.shape[0],) or size.shape != (2,):
        raise FormatError(f"{path}: cams {cams.shape}, tags {tags.shape} and size {size.shape} do not fit")
    if num_classes is not None and tags.size and (tags.min() < 0 or tags.max() >= num_classes):
        raise FormatError(f"{path}: tag index outside the {num_classes} classes of cams.json")
    return CamFile(cams, tags.astype(np.int64), (int(size[0]), int(size[1])), image_id, image_path)
