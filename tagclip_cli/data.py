"""Image sources and decoding: folders (recursive, deterministic order), and the DataLoader side.

Every image gets a stable `image_id` (the path relative to the input root, or a manifest id) and a
global `index` (its position in the deterministic listing), which sharding and resume rely on.
"""

from __future__ import annotations

import logging
import math
import os
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

from tagclip_cli.errors import UsageError

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif")
DEFAULT_MAX_PIXELS = 178_956_970  # PIL's own decompression-bomb limit (2x its warning level)


class DecodeError(Exception):
    """An image that cannot be used; the message is the reason stored in the output."""


@dataclass(frozen=True)
class ImageItem:
    """One input image: global position, stable id, path on disk, and COCO id when known."""

    index: int
    image_id: str
    path: str
    coco_id: int | None = None


def list_folder(root: str | Path, extensions: Sequence[str] = IMAGE_EXTENSIONS) -> list[ImageItem]:
    """All images under root (recursive), sorted by their relative POSIX path."""
    root = Path(root)
    if not root.exists():
        raise UsageError(f"{root}: no such file or directory")
    if not root.is_dir():
        raise UsageError(f"{root}: not a directory")
    exts = tuple(e.lower() for e in extensions)
    found: list[str] = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        dirnames.sort()
        for name in filenames:
            if name.lower().endswith(exts):
                rel = Path(dirpath, name).relative_to(root).as_posix()
                found.append(rel)
    found.sort()
    return [ImageItem(i, rel, str(root / rel)) for i, rel in enumerate(found)]


@dataclass(frozen=True)
class Preprocess:
    """Decode to RGB and resize (bicubic, no crop) to the next multiple of the patch size, then
    normalise with the model's mean/std. Output (3, ceil(H/p)*p, ceil(W/p)*p) float32."""

    patch_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    max_side: int | None = None
    max_pixels: int = DEFAULT_MAX_PIXELS

    def target_size(self, width: int, height: int) -> tuple[int, int]:
        """(width, height) after the optional max-side cap and rounding up to the patch size."""
        if self.max_side and max(width, height) > self.max_side:
            scale = self.max_side / max(width, height)
            width, height = max(1, round(width * scale)), max(1, round(height * scale))
        p = self.patch_size
        return max(p, math.ceil(width / p) * p), max(p, math.ceil(height / p) * p)

    def load_rgb(self, path: str) -> Image.Image:
        return load_rgb(path, self.max_pixels)

    def __call__(self, image: Image.Image) -> Tensor:
        w, h = self.target_size(*image.size)
        resized = image.resize((w, h), Image.Resampling.BICUBIC)
        arr = torch.from_numpy(np.asarray(resized, dtype=np.float32) / np.float32(255.0))
        arr = arr.permute(2, 0, 1)
        mean = torch.tensor(self.mean, dtype=torch.float32)[:, None, None]
        std = torch.tensor(self.std, dtype=torch.float32)[:, None, None]
        return (arr - mean) / std


Tensor = torch.Tensor


def load_rgb(path: str, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Open an image as 8-bit RGB with EXIF orientation applied (first frame of animations).

    Raises DecodeError with a specific reason for anything unusable."""
    try:
        if os.path.getsize(path) == 0:
            raise DecodeError("empty file (0 bytes)")
    except OSError as exc:
        raise DecodeError(f"cannot read file ({exc.strerror or exc})") from exc
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                if img.width * img.height > max_pixels:
                    raise DecodeError(
                        f"image too large ({img.width}x{img.height} pixels > {max_pixels}); decompression-bomb guard"
                    )
                img.seek(0)
                img.load()
                img = ImageOps.exif_transpose(img)
                return to_rgb(img)
    except DecodeError:
        raise
    except Image.DecompressionBombError as exc:
        raise DecodeError(f"image too large ({exc}); decompression-bomb guard") from exc
    except Image.UnidentifiedImageError as exc:
        raise DecodeError("not an image (unrecognised format)") from exc
    except (OSError, SyntaxError, ValueError) as exc:
        raise DecodeError(f"cannot decode image ({exc})") from exc


def to_rgb(img: Image.Image) -> Image.Image:
    """8-bit RGB: 16-bit and float grayscale are scaled, alpha is composited on white."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        hi = 65535.0 if img.mode.startswith("I;16") or (img.mode == "I" and arr.max() > 255) else 255.0
        if img.mode == "F":
            hi = max(float(arr.max()), 1.0)
        arr = np.clip(arr / hi * 255.0, 0, 255).astype(np.uint8)
        img = Image.fromarray(arr, mode="L")
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA"):
        base = Image.new("RGBA", img.size, (255, 255, 255, 255))
        base.alpha_composite(img.convert("RGBA"))
        img = base
    return img.convert("RGB")


class ImageDataset(torch.utils.data.Dataset):
    """Decodes and preprocesses items; a failure becomes a record with an error, never an exception."""

    def __init__(self, items: Sequence[ImageItem], preprocess: Preprocess) -> None:
        self.items = list(items)
        self.preprocess = preprocess

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict:
        item = self.items[i]
        record = {"item": item, "pixels": None, "width": None, "height": None, "error": None}
        try:
            img = self.preprocess.load_rgb(item.path)
            record["width"], record["height"] = img.size
            record["pixels"] = self.preprocess(img)
        except DecodeError as exc:
            record["error"] = str(exc)
        except Exception as exc:  # a decoder bug must not kill a million-image run
            record["error"] = f"cannot decode image ({type(exc).__name__}: {exc})"
        return record


def collate_records(records: list[dict]) -> list[dict]:
    return records


def make_loader(
    items: Sequence[ImageItem], preprocess: Preprocess, batch_size: int, workers: int, pin_memory: bool = False
) -> Iterator[list[dict]]:
    """Batches of decoded records in item order."""
    dataset = ImageDataset(items, preprocess)
    return iter(
        torch.utils.data.DataLoader(
            dataset,
            batch_size=batch_size,
            shuffle=False,
            num_workers=workers,
            collate_fn=collate_records,
            pin_memory=pin_memory,
            persistent_workers=False,
        )
    )
