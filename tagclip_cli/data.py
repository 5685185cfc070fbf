"""Decoding images and the DataLoader side: bytes -> RGB -> preprocessed pixels, size bucketing.

Listing inputs (folders, path lists, manifests, tar shards, Parquet; local or remote) is
sources.py (`ImageItem` lives there). An item's bytes are read through
`sources.read_bytes` when it lives inside a tar / Parquet file or at a URL.
"""

from __future__ import annotations

import io
import logging
import math
import os
import re
import stat
import warnings
from collections.abc import Callable, Hashable, Iterable, Iterator, Sequence
from dataclasses import dataclass, replace
from typing import BinaryIO

import numpy as np
import torch
from PIL import Image, ImageFile, ImageOps

from tagclip_cli.faults import deferred_signals, ignore_signals_in_worker
from tagclip_cli.fileio import output_text
from tagclip_cli.sources import ImageItem, SourceError, is_url, read_bytes

log = logging.getLogger(__name__)

DEFAULT_MAX_PIXELS = 178_956_970  # PIL's own decompression-bomb limit (2x its warning level)


class DecodeError(Exception):
    """An image that cannot be used; the message is the reason stored in the output."""


@dataclass(frozen=True)
class Preprocess:
    """Decode to RGB and resize (bicubic, no crop) to the next multiple of the patch size, then
    normalise with the model's mean/std. Output (3, ceil(H/p)*p, ceil(W/p)*p) float32.

    An image smaller than one patch is enlarged to one patch; one whose longer side exceeds
    max_side is first scaled down so that side equals max_side (aspect ratio kept)."""

    patch_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    max_side: int | None = None
    max_pixels: int = DEFAULT_MAX_PIXELS

    def downscaled(self, width: int, height: int) -> bool:
        """Whether the --max-side cap shrinks an image of this size."""
        return bool(self.max_side) and max(width, height) > self.max_side

    def target_size(self, width: int, height: int) -> tuple[int, int]:
        """(width, height) after the optional max-side cap and rounding up to the patch size."""
        if self.downscaled(width, height):
            scale = self.max_side / max(width, height)
            width, height = max(1, round(width * scale)), max(1, round(height * scale))
        p = self.patch_size
        return max(p, math.ceil(width / p) * p), max(p, math.ceil(height / p) * p)

    def load_rgb(self, path: str) -> Image.Image:
        return load_rgb(path, self.max_pixels)

    def load_item(self, item: ImageItem) -> Image.Image:
        """The item's image as RGB: a local file by path, else its bytes (tar member, Parquet
        cell, URL) through sources.read_bytes. Raises DecodeError."""
        if item.shard is None and not is_url(item.path):
            return load_rgb(item.path, self.max_pixels)
        try:
            data = read_bytes(item)
        except SourceError as exc:
            raise DecodeError(str(exc)) from None
        if not data:
            raise DecodeError("empty file (0 bytes)")
        return decode_rgb(io.BytesIO(data), item.path, self.max_pixels)

    def __call__(self, image: Image.Image) -> Tensor:
        w, h = self.target_size(*image.size)
        resized = image.resize((w, h), Image.Resampling.BICUBIC)
        arr = torch.from_numpy(np.asarray(resized, dtype=np.float32) / np.float32(255.0))
        arr = arr.permute(2, 0, 1)
        mean = torch.tensor(self.mean, dtype=torch.float32)[:, None, None]
        std = torch.tensor(self.std, dtype=torch.float32)[:, None, None]
        return (arr - mean) / std


Tensor = torch.Tensor


_FILE_KINDS = {stat.S_IFIFO: "a named pipe", stat.S_IFSOCK: "a socket", stat.S_IFCHR: "a character device",
               stat.S_IFBLK: "a block device", stat.S_IFDIR: "a directory"}


def open_image_file(path: str) -> BinaryIO:
    """Open path for reading after checking it is a non-empty regular file.

    Checking first matters: opening a named pipe blocks forever, and a broken symlink or an
    unreadable file deserves its own reason. Raises DecodeError."""
    try:
        info = os.stat(path)
    except FileNotFoundError:
        if os.path.islink(path):
            raise DecodeError("broken symbolic link (its target does not exist)") from None
        raise DecodeError("file not found (removed after the folder was listed?)") from None
    except PermissionError:
        raise DecodeError("permission denied") from None
    except OSError as exc:
        raise DecodeError(f"cannot read file ({exc.strerror or exc})") from None
    if not stat.S_ISREG(info.st_mode):
        kind = _FILE_KINDS.get(stat.S_IFMT(info.st_mode), "a special file")
        raise DecodeError(f"not a regular file ({kind})")
    if info.st_size == 0:
        raise DecodeError("empty file (0 bytes)")
    try:
        return open(path, "rb")  # the caller closes it
    except PermissionError:
        raise DecodeError("permission denied") from None
    except OSError as exc:
        raise DecodeError(f"cannot read file ({exc.strerror or exc})") from None


def _not_an_image(head: bytes) -> str:
    """The reason for a file PIL does not recognise, with a hint at what it is."""
    stripped = head.lstrip()
    if stripped[:1] == b"<":
        return "not an image (the file is HTML/XML text)"
    try:
        head.decode("utf-8")
    except UnicodeDecodeError:
        return "not an image (unrecognised format)"
    return "not an image (the file is text)"


def load_rgb(path: str, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Open an image as 8-bit RGB with EXIF orientation applied (first frame of animations).

    A truncated file is an error, never a partly grey image: PIL's LOAD_TRUNCATED_IMAGES is
    forced off here (another library in the process may have switched it on). Images with more
    than max_pixels pixels are refused before any pixel is decoded (decompression bombs). PIL's
    warnings about damaged metadata are silenced: what matters is reported as the reason.
    Raises DecodeError with a specific reason for anything unusable."""
    with open_image_file(path) as fh:
        return decode_rgb(fh, path, max_pixels)


def decode_rgb(fh: BinaryIO, path: str, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """`load_rgb` on an open binary file (a file on disk, or the bytes of a tar member / Parquet
    cell); path only names it in debug logs. Raises DecodeError."""
    ImageFile.LOAD_TRUNCATED_IMAGES = False
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # incl. DecompressionBombWarning: the check below decides
        try:
            img = Image.open(fh)
        except Image.DecompressionBombError as exc:  # above PIL's hard limit, raised while opening
            found = re.search(r"\((\d+) pixels\)", str(exc))
            size = f"{int(found[1]) / 1e6:.0f} megapixels" if found else str(exc)
            raise DecodeError(f"image too large ({size}, limit {max_pixels / 1e6:.0f}); "
                              "decompression-bomb guard") from None
        except Image.UnidentifiedImageError:
            fh.seek(0)
            raise DecodeError(_not_an_image(fh.read(512))) from None
        except MemoryError:
            raise DecodeError("out of memory while reading the image header") from None
        except Exception as exc:  # PIL's plugins raise many types on damaged headers (even TypeError)
            raise DecodeError(f"corrupt image header ({_describe(exc)})") from None
        with img:
            width, height = img.size
            if width * height > max_pixels:
                raise DecodeError(
                    f"image too large ({width}x{height} = {width * height / 1e6:.0f} megapixels, limit "
                    f"{max_pixels / 1e6:.0f}); decompression-bomb guard"
                )
            if width < 1 or height < 1:
                raise DecodeError(f"image has no pixels ({width}x{height})")
            fmt = img.format or "image"
            try:
                if getattr(img, "n_frames", 1) > 1:
                    img.seek(0)
                img.load()
            except MemoryError:
                raise DecodeError(f"out of memory while decoding ({fmt}, {width}x{height})") from None
            except Exception as exc:
                if isinstance(exc, OSError) and "truncated" in str(exc).lower():
                    raise DecodeError(f"truncated image ({fmt}: {exc})") from None
                raise DecodeError(f"corrupt image data ({fmt}: {_describe(exc)})") from None
            try:
                oriented = ImageOps.exif_transpose(img)
            except Exception as exc:  # unreadable EXIF: the pixels are fine, keep them as stored
                log.debug("%s: EXIF orientation not applied (%s)", path, exc)
                oriented = img
            try:
                return to_rgb(oriented)
            except (ValueError, OSError) as exc:
                raise DecodeError(f"unsupported colour mode {oriented.mode} ({exc})") from None


def _describe(exc: Exception) -> str:
    """An exception as a short reason: the message, with the type when the message alone is vague."""
    text = str(exc).strip().replace("\n", " ")
    if isinstance(exc, OSError | SyntaxError | ValueError) and text:
        return text
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def to_rgb(img: Image.Image) -> Image.Image:
    """8-bit RGB: 16-bit and float grayscale are scaled, alpha is composited on white."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        hi = 65535.0 if img.mode.startswith("I;16") or (img.mode == "I" and arr.max() > 255) else 255.0
        if img.mode == "F":
            hi = max(float(np.nanmax(arr)) if np.isfinite(arr).any() else 1.0, 1.0)
        arr = np.clip(np.nan_to_num(arr / hi * 255.0), 0, 255).astype(np.uint8)
        img = Image.fromarray(arr, mode="L")
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        base = Image.new("RGBA", img.size, (255, 255, 255, 255))
        base.alpha_composite(img.convert("RGBA"))
        img = base
    return img.convert("RGB")


@dataclass(frozen=True)
class DecodedImage:
    """One input after decoding, as it travels from the DataLoader through the model to the writer.

    pixels: (3, H', W') float32, resized to multiples of the patch size and normalised; None when
    the image failed. width/height: the oriented image before any resizing (the output's size);
    None when decoding failed. error: why the image has no result (the reason stored in the
    output), else None. downscaled: the --max-side cap shrank it. rgb: the (height, width, 3)
    uint8 image itself, kept only when asked (the dense CRF needs it), else None."""

    item: ImageItem
    pixels: Tensor | None = None
    width: int | None = None
    height: int | None = None
    error: str | None = None
    downscaled: bool = False
    rgb: np.ndarray | None = None

    def failed(self, reason: str) -> DecodedImage:
        """This image marked failed (e.g. out of memory even alone): no pixels, the size kept."""
        return replace(self, pixels=None, rgb=None, error=reason)

    def to(self, device: torch.device | str) -> DecodedImage:
        """The pixels on `device` (non-blocking: from pinned host memory the copy overlaps)."""
        if self.pixels is None:
            return self
        return replace(self, pixels=self.pixels.to(device, non_blocking=True))

    def pin_memory(self) -> DecodedImage:
        """The DataLoader's pin_memory hook: the pixels in page-locked memory."""
        return self if self.pixels is None else replace(self, pixels=self.pixels.pin_memory())

    def __reduce__(self) -> tuple:
        """Pickled (a DataLoader worker sending it to the main process) with the pixels as a NumPy
        array, i.e. as plain bytes through the worker's result pipe. A torch tensor would go by
        torch's default "file_descriptor" sharing: a handshake per tensor with a listener thread
        that multiprocessing's resource_sharer starts in the worker; a SIGINT/SIGTERM raising
        `Interrupted` in the main process mid-handshake makes that thread print a traceback as the
        run shuts down. Bytes through the pipe have no side channel to cut (and open no file
        descriptors); the pixels arrive C-contiguous, with the same values."""
        pixels = None if self.pixels is None else self.pixels.numpy()
        return _unpickle_decoded, (self.item, pixels, self.width, self.height, self.error, self.downscaled, self.rgb)


def _unpickle_decoded(item: ImageItem, pixels: np.ndarray | None, *rest: object) -> DecodedImage:
    """The inverse of `DecodedImage.__reduce__`."""
    return DecodedImage(item, None if pixels is None else torch.from_numpy(pixels), *rest)  # type: ignore[arg-type]


class ImageDataset(torch.utils.data.Dataset):
    """Decodes and preprocesses items; a failure becomes a `DecodedImage` with an error, never an
    exception. keep_rgb keeps the decoded RGB image too (for the CRF: no second decode)."""

    def __init__(self, items: Sequence[ImageItem], preprocess: Preprocess, keep_rgb: bool = False) -> None:
        # a list of items as columns (sources' ItemList, a share of it) is kept as it is: forked
        # workers read its Arrow / NumPy buffers without copying them (no per-item reference counts)
        self.items = items if hasattr(items, "positions") else list(items)
        self.preprocess = preprocess
        self.keep_rgb = keep_rgb

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> DecodedImage:
        item = self.items[i]
        return decoded(item, self.preprocess.load_item, self.preprocess, self.keep_rgb)


def decoded(item: ImageItem, image: Image.Image | Callable[[ImageItem], Image.Image], preprocess: Preprocess,
            keep_rgb: bool = False) -> DecodedImage:
    """One item decoded and preprocessed: `image` is the picture itself (a PIL image, made RGB
    here) or how to load it (e.g. `Preprocess.load_item`). A failure becomes a `DecodedImage` with
    an error, never an exception; keep_rgb keeps the RGB image too (for the CRF: no second decode)."""
    try:
        img = image(item) if callable(image) else to_rgb(image)
        return DecodedImage(
            item,
            pixels=preprocess(img),
            width=img.size[0],
            height=img.size[1],
            downscaled=preprocess.downscaled(*img.size),
            rgb=np.asarray(img) if keep_rgb else None,
        )
    except DecodeError as exc:
        error = output_text(str(exc))
    except MemoryError:
        error = "out of memory while decoding"
    except Exception as exc:  # a decoder bug must not kill a million-image run
        error = output_text(f"cannot decode image ({type(exc).__name__}: {exc})")
    return DecodedImage(item, error=error)


def _single(image: DecodedImage) -> DecodedImage:
    return image


def iter_records(
    items: Sequence[ImageItem], preprocess: Preprocess, workers: int, pin_memory: bool = False,
    keep_rgb: bool = False,
) -> Iterator[DecodedImage]:
    """Decoded images (see `ImageDataset`) one by one, in item order.

    `workers` processes decode and resize ahead of the model (0 = in this process); with
    pin_memory the pixel tensors arrive in page-locked memory, ready for non-blocking copies."""
    if not items:
        return iter(())
    loader = torch.utils.data.DataLoader(
        ImageDataset(items, preprocess, keep_rgb),
        batch_size=None,  # one record per fetch: workers stay busy and memory stays at a few images
        shuffle=False,
        num_workers=workers,
        collate_fn=_single,
        pin_memory=pin_memory,
        prefetch_factor=4 if workers else None,
        persistent_workers=False,
        worker_init_fn=ignore_signals_in_worker,  # Ctrl-C / SIGTERM are the main process's to handle
    )
    # Starting the iterator forks the workers. Signals are held meanwhile: a SIGTERM to the process
    # group would otherwise kill a worker born before its worker_init_fn ignores it (the DataLoader
    # then raises "worker killed by signal" while shutting down), and `Interrupted` raised in the
    # parent inside an at-fork hook (logging's lock release) is lost and can deadlock the run.
    with deferred_signals():
        return iter(loader)


def bucket_batches(
    records: Iterable[DecodedImage], batch_size: int, window: int
) -> Iterator[tuple[list[DecodedImage], bool]]:
    """Group decoded images into forward batches of one preprocessed size: yields (batch, end).

    Images (in index order) are cut into windows of `window` consecutive global indices; inside a
    window, images of the same size (3, H, W) are collected and a batch is emitted as soon as
    `batch_size` of them are there; the rest are emitted at the end of the window, the last one
    with end=True (an empty batch if nothing was left). Failed decodes come alone. Batch
    composition depends only on the items, batch_size and window, never on which process or run
    handles the window, which is what keeps outputs bit-identical across ranks and resumes."""
    buckets: dict[Hashable, list[DecodedImage]] = {}
    current: int | None = None

    def drain() -> Iterator[tuple[list[DecodedImage], bool]]:
        rest = list(buckets.values())
        buckets.clear()
        for i, batch in enumerate(rest):
            yield batch, i == len(rest) - 1
        if not rest:
            yield [], True

    for record in records:
        w = record.item.index // window
        if current is not None and w != current:
            yield from drain()
        current = w
        if record.error is not None:
            yield [record], False
            continue
        key = tuple(record.pixels.shape)
        bucket = buckets.setdefault(key, [])
        bucket.append(record)
        if len(bucket) >= batch_size:
            del buckets[key]
            yield bucket, False
    if current is not None:
        yield from drain()


def to_device(images: list[DecodedImage], device: torch.device | str) -> list[DecodedImage]:
    """The images with their pixels on `device` (see `DecodedImage.to`)."""
    return [image.to(device) for image in images]
