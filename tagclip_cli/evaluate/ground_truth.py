"""What every ground truth is made of: images and their match keys, split files, label PNGs with
their lookup tables, the `GroundTruth` base and the label-PNG directory ground truth."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tagclip_cli.errors import UsageError

RAW_IGNORE = 255  # the value that means "ignore" in ground-truth PNGs
_INVALID = -2  # a raw value that should never occur (an error naming the file)



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

