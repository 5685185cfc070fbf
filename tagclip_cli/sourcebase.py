"""What every input kind shares: `ImageItem` (one input image and where its bytes are), the
extensions recognised, and fsspec access to local paths and URLs (errors as short reasons, URLs
without credentials). Listing lives in sources.py (folders, lists, manifests, the CLI's input) and
shardsources.py (tar shards, Parquet, reading one item's bytes)."""

from __future__ import annotations

import re
from dataclasses import dataclass

from tagclip_cli.errors import UsageError
from tagclip_cli.fileio import output_text

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif")
TAR_EXTENSIONS = (".tar",)
COMPRESSED_TAR_EXTENSIONS = (".tar.gz", ".tgz", ".tar.bz2", ".tbz2", ".tar.xz", ".txz", ".tar.zst", ".tar.zstd")
PARQUET_EXTENSIONS = (".parquet",)
SHARD_EXTENSIONS = TAR_EXTENSIONS + COMPRESSED_TAR_EXTENSIONS + PARQUET_EXTENSIONS
URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


class SourceError(Exception):
    """An item whose bytes cannot be read (shard truncated or gone); the message is the row's reason."""


@dataclass(frozen=True, slots=True)
class ImageItem:
    """One input image: global position, stable id, where it is, and COCO id when known.

    path: the image file (local path or URL), or for an image inside a tar / Parquet file a
    readable description (`tar://<member>::<shard>`, `<file>#row=<n>`). shard: that tar / Parquet
    file (None for plain files); shard_index: the unit of work it belongs to, the tar's position
    among the input's tars, or for Parquet the row group's among all row groups (work is split by
    it, so one tar or row group is read by one process). locator: where in the shard:
    ("tar", data offset, size), ("parquet", row group, row in group, image column), or
    ("error", reason) for a sample that has no readable image (the reason becomes its failed row)."""

    index: int
    image_id: str
    path: str
    coco_id: int | None = None
    shard: str | None = None
    shard_index: int | None = None
    locator: tuple = ()


def is_url(path: str) -> bool:
    """Whether path names a URL (s3://bucket/key, https://host/x) rather than a local path."""
    return bool(URL.match(path))


def url_fs(url: str):
    """(filesystem, path in it) for a URL or local path; a missing backend is a usage error."""
    import fsspec

    try:
        return fsspec.core.url_to_fs(url)
    except ImportError as exc:
        raise UsageError(f"{safe_url(url)}: {exc} (remote storage: pip install 'tagclip-cli[remote]')") from None
    except ValueError as exc:
        raise UsageError(f"{safe_url(url)}: {exc}") from None


def safe_url(url: str) -> str:
    """A URL as it may be printed: any user:password@ part removed (never log credentials)."""
    return output_text(re.sub(r"^([A-Za-z][A-Za-z0-9+.-]*://)[^/@]*@", r"\1", url))


def io_reason(exc: BaseException) -> str:
    """An I/O exception as a short reason (botocore / aiohttp messages can span lines)."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    if isinstance(exc, FileNotFoundError):
        return text if text and "No such file" not in text else "not found"
    if isinstance(exc, PermissionError):
        return "permission denied"
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
