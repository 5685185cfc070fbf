"""Small file helpers every layer may use: atomic writes (temp file, fsync, rename, directory
fsync), the output-path probe, content hashes, and text / scalars made fit for UTF-8 and strict JSON
outputs. No schema, no model: the backbone and the sources import this, never `writers`."""

from __future__ import annotations

import errno
import hashlib
import json
import math
import os
import tempfile
from collections.abc import Sequence
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from tagclip_cli.errors import OutputWriteError, UsageError


def output_text(text: str) -> str:
    """`text` made safe for UTF-8 outputs (Parquet, JSON, the terminal).

    On Linux a file name is bytes; Python represents bytes that are not UTF-8 as lone surrogates
    (surrogateescape), which no UTF-8 writer accepts. Those bytes become backslash escapes here:
    the Latin-1 name b"caf\\xe9.png" is written as the 11 characters `caf\\xe9.png`. Valid text
    is returned unchanged."""
    try:
        return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    except UnicodeEncodeError:  # a surrogate that is not an escaped byte (e.g. from JSON "\ud800")
        return text.encode("utf-8", "backslashreplace").decode("utf-8")


@contextmanager
def atomic_path(path: str | Path):
    """Yield a temporary path beside `path`; on success fsync it and rename it over `path`."""
    path = Path(path)
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as exc:
        raise OutputWriteError(f"cannot write {path} ({describe_os_error(exc)})") from None
    os.close(fd)
    try:
        yield Path(tmp)
        # mkstemp creates 0600; outputs get the usual permissions (0666 minus the umask)
        os.chmod(tmp, 0o666 & ~_current_umask())
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except OSError as exc:  # disk full, quota, I/O error: one line for the user, no half file left
        Path(tmp).unlink(missing_ok=True)
        raise OutputWriteError(f"cannot write {path} ({describe_os_error(exc)})") from exc
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def describe_os_error(exc: OSError) -> str:
    """A short reason for a failed write. pyarrow's errors carry the errno only in their text."""
    text = str(exc)
    if exc.errno == errno.ENOSPC or "No space left on device" in text:
        return "no space left on device"
    if exc.errno == errno.EDQUOT or "Disk quota exceeded" in text:
        return "disk quota exceeded"
    if exc.errno == errno.EROFS or "Read-only file system" in text:
        return "read-only file system"
    if exc.errno in (errno.EACCES, errno.EPERM):
        return "permission denied"
    return exc.strerror or text


def fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def check_output_suffix(out: str | Path, suffixes: Sequence[str], option: str = "--out", others: str = "") -> None:
    """Refuse, before any work, an output whose extension is not one of `suffixes` (the formats the
    command writes, e.g. (".json", ".parquet")); `others` names further accepted values in the message.
    Raises UsageError."""
    suffix = Path(out).suffix
    if suffix.lower() not in suffixes:
        shown = f"unknown output extension '{suffix}'" if suffix else "no output extension"
        raise UsageError(f"{option} {out}: {shown}; supported: {', '.join(suffixes)}{others}")


def check_output_path(out: str | Path) -> None:
    """Refuse, before any work, an output that cannot be written: a missing or non-directory
    parent, a directory in place of the file, a parent where no file can be created (permissions,
    read-only or full file system). A probe file is created and removed; nothing is left behind.
    Raises UsageError."""
    out = Path(out)
    parent = out.parent
    if not parent.exists():
        raise UsageError(f"{parent}: output directory does not exist")
    if not parent.is_dir():
        raise UsageError(f"{parent}: not a directory (in --out {out})")
    if out.is_dir():
        raise UsageError(f"{out}: is a directory; --out needs a file name, e.g. {out / 'labels.parquet'}")
    try:
        fd, probe = tempfile.mkstemp(dir=parent, prefix=f".{out.name}.", suffix=".probe")
    except OSError as exc:
        raise UsageError(f"{parent}: cannot create files in the output directory ({describe_os_error(exc)})") from None
    os.close(fd)
    os.unlink(probe)


def write_json_atomic(obj: object, path: str | Path) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "w", encoding="utf-8") as fh:
            json.dump(obj, fh)


def write_bytes_atomic(data: bytes, path: str | Path) -> None:
    """Write `data` to `path` atomically (temp file, fsync, rename, directory fsync)."""
    with atomic_path(path) as tmp:
        Path(tmp).write_bytes(data)


def json_scalar(value: object) -> object:
    """A value made fit for strict JSON: NaN and +-inf become None, numpy scalars Python numbers,
    anything else is returned unchanged."""
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, float | np.floating):
        return float(value) if math.isfinite(value) else None
    return value


def file_sha256(path: Path, cache_dir: Path | None = None) -> str:
    """Content hash of a checkpoint, memoised by (path, size, mtime) in the cache dir."""
    path = Path(path).resolve()
    stat = path.stat()
    memo_key = hashlib.sha256(f"{path}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()[:24]
    memo = Path(cache_dir) / "hashes" / memo_key if cache_dir else None
    if memo is not None and memo.exists():
        return memo.read_text().strip()
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 22), b""):
            digest.update(chunk)
    value = digest.hexdigest()
    if memo is not None:
        try:
            memo.parent.mkdir(parents=True, exist_ok=True)
            memo.write_text(value)
        except OSError:
            pass
    return value
