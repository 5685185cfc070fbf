"""Output files: tags Parquet (one row per image, every class's score, run metadata) and atomic writes."""

from __future__ import annotations

import errno
import json
import os
import tempfile
from collections.abc import Iterable, Sequence
from contextlib import contextmanager
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from tagclip_cli.errors import OutputWriteError, UsageError

METADATA_KEY = b"tagclip"
ROW_GROUP_SIZE = 4096


def tags_schema(metadata: dict | None = None) -> pa.Schema:
    """Columns of the tags Parquet. `scores` holds the fused score of every foreground class in
    vocabulary order (names in the metadata's "classes"); failed rows have status "failed", an
    error and null scores."""
    schema = pa.schema(
        [
            ("index", pa.int64()),
            ("image_id", pa.string()),
            ("path", pa.string()),
            ("width", pa.int32()),
            ("height", pa.int32()),
            ("status", pa.string()),
            ("error", pa.string()),
            ("tags", pa.list_(pa.string())),
            ("scores", pa.list_(pa.float32())),
        ]
    )
    if metadata is not None:
        schema = schema.with_metadata({METADATA_KEY: json.dumps(metadata, sort_keys=True).encode("utf-8")})
    return schema


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


def tag_row(item, width, height, error: str | None, tags: Sequence[str] = (), scores=None) -> dict:
    """One Parquet row (a dict in `tags_schema` order)."""
    return {
        "index": item.index,
        "image_id": output_text(item.image_id),
        "path": output_text(item.path),
        "width": width,
        "height": height,
        "status": "failed" if error else "ok",
        "error": output_text(error) if error else error,
        "tags": list(tags) if not error else [],
        "scores": [float(s) for s in scores] if scores is not None and not error else None,
    }


def rows_to_table(rows: Sequence[dict], schema: pa.Schema) -> pa.Table:
    return pa.Table.from_pylist(list(rows), schema=schema)


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
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except OSError as exc:  # disk full, quota, I/O error: one line for the user, no half file left
        Path(tmp).unlink(missing_ok=True)
        raise OutputWriteError(f"cannot write {path} ({describe_os_error(exc)})") from exc
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


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


def _fsync_dir(directory: Path) -> None:
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


def write_parquet_atomic(tables: Iterable[pa.Table], path: str | Path, schema: pa.Schema) -> int:
    """Stream tables into one Parquet file, atomically. Returns the number of rows."""
    rows = 0
    with atomic_path(path) as tmp:
        with pq.ParquetWriter(tmp, schema, compression="zstd") as writer:
            for table in tables:
                writer.write_table(table.cast(schema), row_group_size=ROW_GROUP_SIZE)
                rows += table.num_rows
    return rows


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


def read_metadata(path: str | Path) -> dict:
    """The run metadata stored in a tags Parquet file."""
    meta = pq.read_schema(path).metadata or {}
    raw = meta.get(METADATA_KEY)
    return json.loads(raw) if raw else {}
