"""Listing inputs of every kind, local or remote (fsspec): folders, path lists, COCO manifests,
WebDataset tar shards and Parquet files with image bytes; and reading one item's bytes.

Every image becomes an `ImageItem` with a stable `image_id` and a global `index` (its position in
the deterministic listing), which sharding and resume rely on. Items stay random-access: an image
inside a tar or Parquet file carries its `shard` (that file's URL or path) and a `locator` (where in
it), so any process can read any item without reading the ones before it. Sources know nothing of
the method; decoding lives in data.py.

Libraries: fsspec opens and lists every URL (s3://, gs://, hf://, https://, local paths) with the
storage library's own credentials and configuration (s3fs, gcsfs: `pip install tagclip-cli[remote]`);
braceexpand expands WebDataset shard patterns (`data/{00000..00127}.tar`); tar headers are walked
with the standard library's tarfile on a seekable file, and Parquet is read with pyarrow, one row
group at a time.
"""

from __future__ import annotations

import io
import json
import logging
import os
import posixpath
import re
import sys
import tarfile
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from tagclip_cli.errors import UsageError
from tagclip_cli.fileio import output_text

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif")
TAR_EXTENSIONS = (".tar",)
PARQUET_EXTENSIONS = (".parquet",)
LIST_THREADS = 8  # shards listed at once (remote listing waits on the network, not the CPU)
OPEN_FILES = 4  # tar/Parquet files kept open per process while reading items
URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


class SourceError(Exception):
    """An item whose bytes cannot be read (shard truncated or gone); the message is the row's reason."""


@dataclass(frozen=True)
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


def _fs(url: str):
    """(filesystem, path in it) for a URL or local path; a missing backend is a usage error."""
    import fsspec

    try:
        return fsspec.core.url_to_fs(url)
    except ImportError as exc:
        raise UsageError(f"{_safe(url)}: {exc} (remote storage: pip install 'tagclip-cli[remote]')") from None
    except ValueError as exc:
        raise UsageError(f"{_safe(url)}: {exc}") from None


def _safe(url: str) -> str:
    """A URL as it may be printed: any user:password@ part removed (never log credentials)."""
    return output_text(re.sub(r"^([A-Za-z][A-Za-z0-9+.-]*://)[^/@]*@", r"\1", url))


def _reason(exc: BaseException) -> str:
    """An I/O exception as a short reason (botocore / aiohttp messages can span lines)."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    if isinstance(exc, FileNotFoundError):
        return text if text and "No such file" not in text else "not found"
    if isinstance(exc, PermissionError):
        return "permission denied"
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


# ---- folders, path lists, manifests ---------------------------------------------------------------

def list_folder(root: str | Path, extensions: Sequence[str] = IMAGE_EXTENSIONS) -> list[ImageItem]:
    """All images under root (recursive), sorted by their relative POSIX path. root may be a URL."""
    if isinstance(root, str) and is_url(root):
        return _list_remote_folder(root, extensions)
    root = Path(root)
    if not root.exists():
        raise UsageError(f"{root}: no such file or directory")
    if not root.is_dir():
        raise UsageError(f"{root}: not a directory")
    found = _local_files(root, extensions)
    # Undecodable (non-UTF-8) names keep their real path for opening; the id is escaped (output_text).
    return [ImageItem(i, output_text(rel), str(root / rel)) for i, rel in enumerate(found)]


def _local_files(root: Path, extensions: Sequence[str], recursive: bool = True) -> list[str]:
    """Relative POSIX paths of the files under root with one of the extensions, sorted."""
    exts = tuple(e.lower() for e in extensions)
    found: list[str] = []
    linked_dirs: list[str] = []

    def unlisted(exc: OSError) -> None:  # os.walk skips such directories silently otherwise
        log.warning("cannot list %s (%s); images in it are not included", output_text(str(exc.filename)),
                    exc.strerror or exc)

    for dirpath, dirnames, filenames in os.walk(root, followlinks=False, onerror=unlisted):
        dirnames.sort()
        linked_dirs.extend(os.path.join(dirpath, d) for d in dirnames if os.path.islink(os.path.join(dirpath, d)))
        for name in filenames:
            if name.lower().endswith(exts):
                found.append(Path(dirpath, name).relative_to(root).as_posix())
        if not recursive:
            break
    if linked_dirs and recursive:  # not followed (loops, duplicates): say so rather than drop their images
        log.warning("%d symbolic link(s) to directories not followed (e.g. %s); list such images in a "
                    "text file of paths to include them", len(linked_dirs), output_text(linked_dirs[0]))
    found.sort()
    return found


def _remote_files(url: str, extensions: Sequence[str]) -> list[str]:
    """Full URLs of the objects under url with one of the extensions, sorted; UsageError if unreachable."""
    fs, root = _fs(url)
    try:
        names = fs.find(root)
    except Exception as exc:  # network, auth, missing bucket: before any work, exit 2
        raise UsageError(f"{_safe(url)}: cannot list ({_reason(exc)})") from None
    exts = tuple(e.lower() for e in extensions)
    protocol = url.split("://", 1)[0]
    return sorted(f"{protocol}://{name}" for name in names if name.lower().endswith(exts))


def _list_remote_folder(url: str, extensions: Sequence[str]) -> list[ImageItem]:
    base = url.rstrip("/") + "/"
    files = _remote_files(url, extensions)
    return [ImageItem(i, output_text(f[len(base):] if f.startswith(base) else f), f) for i, f in enumerate(files)]


def read_manifest(manifest: str | Path, image_root: str | Path) -> list[ImageItem]:
    """The images of a COCO-style JSON (`images`: [{id, file_name}, ...]) in the manifest's order.

    image_id is the manifest id as a string and coco_id the id itself; paths are image_root/file_name.
    Either may be a URL."""
    remote_root = isinstance(image_root, str) and is_url(image_root)
    try:
        doc = json.loads(_read_text(str(manifest)))
    except FileNotFoundError:
        raise UsageError(f"{manifest}: no such file") from None
    except UsageError:
        raise
    except OSError as exc:
        raise UsageError(f"{manifest}: cannot read ({exc.strerror or _reason(exc)})") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UsageError(f"{manifest}: not a JSON file ({exc})") from None
    if remote_root:
        _check_remote_dir(str(image_root), "--image-root ")
    elif not Path(image_root).is_dir():
        raise UsageError(f"--image-root {image_root}: not a directory")
    images = doc.get("images") if isinstance(doc, dict) else None
    if not isinstance(images, list):
        raise UsageError(f"{manifest}: not a COCO manifest (no 'images' list)")
    items: list[ImageItem] = []
    seen: set[int] = set()
    for pos, image in enumerate(images):
        try:
            coco_id, file_name = image["id"], image["file_name"]
        except (TypeError, KeyError):
            raise UsageError(f"{manifest}: images[{pos}] has no 'id' and 'file_name'") from None
        if isinstance(coco_id, bool) or not isinstance(coco_id, int) or not isinstance(file_name, str):
            raise UsageError(f"{manifest}: images[{pos}] needs an integer 'id' and a string 'file_name'")
        if coco_id in seen:
            raise UsageError(f"{manifest}: image id {coco_id} appears twice")
        seen.add(coco_id)
        path = f"{str(image_root).rstrip('/')}/{file_name}" if remote_root else str(Path(image_root) / file_name)
        items.append(ImageItem(len(items), str(coco_id), path, coco_id))
    return items


def _read_text(path: str) -> str:
    """A small text file (manifest, list of paths), local or remote."""
    if not is_url(path):
        with open(path, encoding="utf-8") as fh:
            return fh.read()
    fs, p = _fs(path)
    try:
        with fs.open(p, "rb") as fh:
            return fh.read().decode("utf-8")
    except FileNotFoundError:
        raise
    except UnicodeDecodeError:
        raise
    except Exception as exc:
        raise UsageError(f"{_safe(path)}: cannot read ({_reason(exc)})") from None


def _check_remote_dir(url: str, what: str = "") -> None:
    fs, p = _fs(url)
    try:
        ok = fs.isdir(p)
    except Exception as exc:
        raise UsageError(f"{what}{_safe(url)}: cannot list ({_reason(exc)})") from None
    if not ok:
        raise UsageError(f"{what}{_safe(url)}: not a directory (no objects under this prefix)")


def read_path_list(lines: Iterable[str], image_root: str | Path | None = None, source: str = "-") -> list[ImageItem]:
    """Images named one per line (blank lines ignored), in the given order.

    Without image_root the id and the path are the line as given (relative to the working
    directory). With image_root, a path inside the root (lexically, e.g. `find ROOT` output) keeps
    its path and gets the id relative to the root; any other relative path is taken as relative to
    the root (id = the line). An absolute path outside the root is an error. Lines may be URLs."""
    remote_root = image_root is not None and is_url(str(image_root))
    root_abs = None if image_root is None or remote_root else os.path.abspath(image_root)
    items: list[ImageItem] = []
    seen: dict[str, int] = {}
    for lineno, raw in enumerate(lines, start=1):
        line = raw.rstrip("\r\n")
        if not line.strip():
            continue
        path, image_id = line, line
        if remote_root:
            base = str(image_root).rstrip("/") + "/"
            if line.startswith(base):
                image_id = line[len(base):]
            elif is_url(line):
                raise UsageError(f"{source}:{lineno}: {_safe(line)} is not under --image-root {_safe(str(image_root))}")
            else:
                path = base + line
        elif root_abs is not None and not is_url(line):
            absolute = os.path.abspath(line)
            if absolute == root_abs or absolute.startswith(root_abs + os.sep):
                image_id = Path(os.path.relpath(absolute, root_abs)).as_posix()
            elif os.path.isabs(line):
                raise UsageError(f"{source}:{lineno}: {line} is not under --image-root {image_root}")
            else:
                image_id = Path(os.path.normpath(line)).as_posix()
                path = os.path.join(image_root, line)
        if image_id in seen:
            raise UsageError(f"{source}:{lineno}: {line} was already listed on line {seen[image_id]}")
        seen[image_id] = lineno
        items.append(ImageItem(len(items), image_id, path))
    return items


# ---- WebDataset tar shards ------------------------------------------------------------------------

def expand_urls(pattern: str) -> list[str]:
    """A shard pattern as a list: brace ranges and alternatives (`{00000..00127}`, `{a,b}`) via
    braceexpand, then glob characters (`*`, `?`) via fsspec. A name without either is itself."""
    if "{" in pattern and "}" in pattern:
        from braceexpand import braceexpand

        urls = list(braceexpand(pattern))
    else:
        urls = [pattern]
    out: list[str] = []
    for url in urls:
        local_exists = not is_url(url) and os.path.exists(url)
        if not local_exists and any(c in url for c in "*?"):
            fs, p = _fs(url)
            try:
                matches = sorted(fs.glob(p))
            except Exception as exc:
                raise UsageError(f"{_safe(url)}: cannot list ({_reason(exc)})") from None
            protocol = url.split("://", 1)[0] if is_url(url) else None
            out.extend(f"{protocol}://{m}" if protocol else m for m in matches)
        else:
            out.append(url)
    return out


def _shard_names(urls: Sequence[str], suffixes: Sequence[str]) -> list[str]:
    """Short unique names of shard files: the path after the shards' common folder, without the
    extension (`data/00003.tar` -> `00003`); these prefix the image ids."""
    folders = [posixpath.dirname(u.replace(os.sep, "/")) for u in urls]
    common = posixpath.commonpath(folders) if all(folders) and len({u.split("://")[0] for u in urls}) == 1 else ""
    names = []
    for url in urls:
        rel = url.replace(os.sep, "/")
        if common and rel.startswith(common + "/"):
            rel = rel[len(common) + 1:]
        else:
            rel = posixpath.basename(rel)
        for suffix in suffixes:
            if rel.lower().endswith(suffix):
                rel = rel[: -len(suffix)]
                break
        names.append(rel)
    return names


@dataclass(frozen=True)
class TarSample:
    """One sample found in a tar: its key and the image member (None: the sample has no image)."""

    key: str
    member: str | None
    offset: int = 0
    size: int = 0
    error: str | None = None  # why it cannot be read (truncated shard, no image member)


def _sample_key(name: str) -> tuple[str, str]:
    """(key, extension) as WebDataset splits a member name: the key is the path up to the first
    dot of the base name (`a/b/000012.seg.png` -> `a/b/000012`, `seg.png`)."""
    folder, base = posixpath.split(name)
    stem, dot, ext = base.partition(".")
    return (posixpath.join(folder, stem) if folder else stem), ext if dot else ""


def scan_tar(fileobj, size: int | None, shard: str) -> tuple[list[TarSample], str | None]:
    """The samples of one tar (in file order, grouped by key as WebDataset does), walking the
    headers only (tarfile seeks over the data). Returns (samples, problem): problem says where a
    truncated or damaged shard stops; the samples before it are kept."""
    samples: list[TarSample] = []
    problem: str | None = None
    current_key: str | None = None
    current_names: set[str] = set()
    image: tuple[str, int, int] | None = None
    members: list[str] = []

    def close() -> None:
        if current_key is None:
            return
        if image is None:
            listed = ", ".join(members[:4]) + (", ..." if len(members) > 4 else "")
            samples.append(TarSample(current_key, None, error=f"no image in this sample of {shard} ({listed})"))
        else:
            samples.append(TarSample(current_key, *image))

    try:
        with tarfile.open(fileobj=fileobj, mode="r:") as tar:
            while True:
                info = tar.next()
                if info is None:
                    if size is not None and tar.offset >= size:  # no end-of-archive blocks: cut at a header
                        problem = (f"truncated tar shard {shard}: it ends after {len(samples) + 1} samples "
                                   "without the end-of-archive marker; later samples are lost")
                    break
                if not info.isfile():
                    continue
                if size is not None and info.offset_data + info.size > size:
                    problem = f"truncated tar shard {shard}: {info.name} is cut off at byte {size}"
                    current_key = None
                    break
                key, ext = _sample_key(info.name)
                if key != current_key or info.name in current_names:  # a new sample (or the same key again)
                    close()
                    current_key, current_names, image, members = key, set(), None, []
                current_names.add(info.name)
                members.append(info.name)
                if image is None and ext and ("." + ext.rsplit(".", 1)[-1]).lower() in IMAGE_EXTENSIONS:
                    image = (info.name, info.offset_data, info.size)
    except (tarfile.TarError, EOFError, OSError) as exc:
        problem = f"truncated or damaged tar shard {shard} ({_reason(exc)}); samples after {len(samples)} are lost"
    if problem is None or current_key is not None:
        close()
    return samples, problem


def _list_one_tar(url: str) -> tuple[list[TarSample], str | None]:
    fs, p = _fs(url)
    try:
        size = fs.size(p)
        with fs.open(p, "rb") as fh:
            return scan_tar(fh, size, _safe(url))
    except Exception as exc:  # unreachable / vanished / denied: this shard is one failed row
        return [], f"cannot read tar shard {_safe(url)} ({_reason(exc)})"


def list_tars(urls: Sequence[str], first_index: int = 0) -> list[ImageItem]:
    """The samples of every tar shard, shard by shard in the given order: image_id
    `<shard name>/<key>`. Shards are listed in parallel threads (remote listing waits on the
    network). A shard that cannot be read, or the lost rest of a truncated one, is one failed item
    naming the shard; UsageError if no shard could be read at all."""
    names = _shard_names(urls, TAR_EXTENSIONS)
    with ThreadPoolExecutor(max_workers=min(LIST_THREADS, max(1, len(urls)))) as pool:
        listings = list(pool.map(_list_one_tar, urls))
    if all(not samples and problem for samples, problem in listings):
        raise UsageError(listings[0][1] + (f" (and the {len(urls) - 1} other shards)" if len(urls) > 1 else ""))
    items: list[ImageItem] = []
    for shard_index, (url, name, (samples, problem)) in enumerate(zip(urls, names, listings, strict=True)):
        seen: dict[str, int] = {}
        for sample in samples:
            image_id = _unique_id(f"{name}/{sample.key}", seen, url)
            if sample.error is not None:
                locator: tuple = ("error", sample.error)
                path = f"{url}#{sample.key}"
            else:
                locator = ("tar", sample.offset, sample.size)
                path = f"tar://{sample.member}::{url}"
            items.append(ImageItem(first_index + len(items), output_text(image_id), output_text(path),
                                   shard=url, shard_index=shard_index, locator=locator))
        if problem is not None:
            log.warning("%s", problem)
            items.append(ImageItem(first_index + len(items), output_text(f"{name}/<unreadable>"), output_text(url),
                                   shard=url, shard_index=shard_index, locator=("error", problem)))
    return items


def _unique_id(image_id: str, seen: dict[str, int], where: str) -> str:
    """image_id, or `image_id#2`, `#3`, ... when it was seen before in this shard (warned)."""
    count = seen.get(image_id, 0) + 1
    seen[image_id] = count
    if count == 1:
        return image_id
    log.warning("%s: key %s appears %d times; kept as %s#%d", _safe(where), image_id, count, image_id, count)
    return f"{image_id}#{count}"


# ---- Parquet with image bytes ---------------------------------------------------------------------

@dataclass(frozen=True)
class ParquetColumns:
    """The columns asked for (None: the defaults: image, then jpg; key, path, then the row number)."""

    image: str | None = None
    id: str | None = None


def _pick_image_column(schema, wanted: str | None, url: str) -> str:
    import pyarrow as pa

    names = schema.names
    candidates = [wanted] if wanted else ["image", "jpg"]
    for name in candidates:
        if name not in names:
            continue
        typ = schema.field(name).type
        if pa.types.is_struct(typ) and typ.get_field_index("bytes") >= 0:
            return name
        if pa.types.is_binary(typ) or pa.types.is_large_binary(typ):
            return name
        raise UsageError(f"{_safe(url)}: column '{name}' holds {typ}, not image bytes "
                         "(binary, or a struct with a 'bytes' field)")
    asked = f"--image-column {wanted}" if wanted else "'image' or 'jpg' column"
    raise UsageError(f"{_safe(url)}: no {asked}; its columns are: {', '.join(names)} (choose with --image-column)")


def _pick_id_column(schema, wanted: str | None, url: str) -> str | None:
    names = schema.names
    if wanted:
        if wanted not in names:
            raise UsageError(f"{_safe(url)}: no --id-column {wanted}; its columns are: {', '.join(names)}")
        return wanted
    for name in ("key", "path"):
        if name in names:
            return name
    return None


def list_parquet(urls: Sequence[str], columns: ParquetColumns = ParquetColumns(), first_index: int = 0
                 ) -> list[ImageItem]:
    """One item per row of every Parquet file, file by file: image_id `<file name>/<id>` (the id
    column's value, or the row number). Only the footer and the id column are read here, one row
    group at a time. UsageError for a missing file or a missing image column (naming the columns)."""
    import pyarrow.parquet as pq

    names = _shard_names(urls, PARQUET_EXTENSIONS)
    items: list[ImageItem] = []
    groups = 0  # row groups so far: the unit of work (one file can be a whole data set)
    for url, name in zip(urls, names, strict=True):
        fs, p = _fs(url)
        try:
            with fs.open(p, "rb") as fh:
                pf = pq.ParquetFile(fh)
                schema = pf.schema_arrow
                image_col = _pick_image_column(schema, columns.image, url)
                id_col = _pick_id_column(schema, columns.id, url)
                seen: dict[str, int] = {}
                row = 0
                for group in range(pf.metadata.num_row_groups):
                    count = pf.metadata.row_group(group).num_rows
                    ids = (pf.read_row_group(group, columns=[id_col]).column(0).to_pylist() if id_col
                           else range(row, row + count))
                    for in_group, value in enumerate(ids):
                        image_id = _unique_id(f"{name}/{row if value is None else value}", seen, url)
                        items.append(ImageItem(first_index + len(items), output_text(image_id),
                                               output_text(f"{url}#row={row}"), shard=url,
                                               shard_index=groups + group,
                                               locator=("parquet", group, in_group, image_col)))
                        row += 1
                groups += pf.metadata.num_row_groups
        except UsageError:
            raise
        except FileNotFoundError:
            raise UsageError(f"{_safe(url)}: no such file") from None
        except Exception as exc:  # unreachable, denied, not Parquet: before any work
            raise UsageError(f"{_safe(url)}: cannot read as Parquet ({_reason(exc)})") from None
    return items


# ---- reading one item's bytes (in DataLoader workers) ---------------------------------------------

class _OpenFiles:
    """A few open shard files per process (least recently used closed first), and for Parquet the
    image column of the last row group read: items come in order, so most reads hit the cache."""

    def __init__(self) -> None:
        self.pid = os.getpid()
        self.files: OrderedDict[str, object] = OrderedDict()
        self.group: tuple[str, int, str] | None = None
        self.group_values: list | None = None

    def get(self, url: str):
        if self.pid != os.getpid():  # forked into a DataLoader worker: the parent's handles are not ours
            self.__init__()
        fh = self.files.pop(url, None)
        if fh is None:
            fs, p = _fs(url)
            fh = fs.open(p, "rb")
            while len(self.files) >= OPEN_FILES:
                self.files.popitem(last=False)[1].close()
        self.files[url] = fh
        return fh

    def drop(self, url: str) -> None:
        fh = self.files.pop(url, None)
        if fh is not None:
            try:
                fh.close()
            except Exception:  # already broken: nothing to release
                pass
        if self.group and self.group[0] == url:
            self.group, self.group_values = None, None


_OPEN = _OpenFiles()


def read_bytes(item: ImageItem) -> bytes:
    """The encoded image of an item: the file itself, a tar member, or a Parquet cell. Raises
    SourceError (message = the failed row's reason) or FileNotFoundError for a plain file."""
    kind = item.locator[0] if item.locator else None
    if kind == "error":
        raise SourceError(item.locator[1])
    if kind == "tar":
        _, offset, size = item.locator
        try:
            fh = _OPEN.get(item.shard)
            fh.seek(offset)
            data = fh.read(size)
        except Exception as exc:  # the shard vanished or the network failed mid-run
            _OPEN.drop(item.shard)
            raise SourceError(f"cannot read tar shard {_safe(item.shard)} ({_reason(exc)})") from None
        if len(data) != size:
            _OPEN.drop(item.shard)
            raise SourceError(f"truncated tar shard {_safe(item.shard)} (member cut off after {len(data)} of "
                              f"{size} bytes)")
        return data
    if kind == "parquet":
        return _parquet_cell(item)
    fs, p = _fs(item.path)  # a plain file by URL
    try:
        with fs.open(p, "rb") as fh:
            return fh.read()
    except FileNotFoundError:
        raise SourceError("not found (removed after the input was listed?)") from None
    except Exception as exc:
        raise SourceError(f"cannot read {_safe(item.path)} ({_reason(exc)})") from None


def _parquet_cell(item: ImageItem) -> bytes:
    import pyarrow.parquet as pq

    _, group, row, column = item.locator
    wanted = (item.shard, group, column)
    if _OPEN.pid != os.getpid() or _OPEN.group != wanted:
        try:
            fh = _OPEN.get(item.shard)
            table = pq.ParquetFile(fh).read_row_group(group, columns=[column])
        except Exception as exc:
            _OPEN.drop(item.shard)
            raise SourceError(f"cannot read Parquet file {_safe(item.shard)} ({_reason(exc)})") from None
        values = table.column(0).combine_chunks()
        if hasattr(values.type, "get_field_index") and values.type.get_field_index("bytes") >= 0:
            values = values.field("bytes")
        _OPEN.group, _OPEN.group_values = wanted, values.to_pylist()
    data = _OPEN.group_values[row]
    if not data:
        raise SourceError(f"no image bytes in this row of {_safe(item.shard)}")
    return data


# ---- the CLI's input ------------------------------------------------------------------------------

def _kind_of(urls: Sequence[str]) -> str | None:
    lowered = [u.lower() for u in urls]
    if lowered and all(u.endswith(TAR_EXTENSIONS) for u in lowered):
        return "tar"
    if lowered and all(u.endswith(PARQUET_EXTENSIONS) for u in lowered):
        return "parquet"
    return None


def _folder_of_shards(files: list[str]) -> tuple[str, list[str]] | None:
    """A folder without images but with tars (preferred: img2dataset's .parquet beside them holds
    metadata only) or Parquet files: (kind, sorted files)."""
    tars = [f for f in files if f.lower().endswith(TAR_EXTENSIONS)]
    if tars:
        return "tar", tars
    parquets = [f for f in files if f.lower().endswith(PARQUET_EXTENSIONS)]
    return ("parquet", parquets) if parquets else None


def _from_shards(kind: str, urls: list[str], columns: ParquetColumns) -> list[ImageItem]:
    return list_tars(urls) if kind == "tar" else list_parquet(urls, columns)


def collect_items(
    images: str | None, manifest: str | Path | None = None, image_root: str | Path | None = None,
    stdin: TextIO | None = None, images_parquet: str | None = None, columns: ParquetColumns = ParquetColumns(),
) -> list[ImageItem]:
    """Resolve the CLI's input: a folder, a text file of paths (or of tar URLs), one image, `-`
    (paths on stdin), tar shards (a pattern, one tar, a folder of tars), Parquet files with image
    bytes (images_parquet, or .parquet inputs), or a COCO manifest with its image root; local or
    URLs. Raises UsageError when nothing usable is given."""
    given = [name for name, value in (("IMAGES", images), ("--manifest", manifest),
                                      ("--images-parquet", images_parquet)) if value is not None]
    if len(given) > 1:
        raise UsageError(f"give either {' or '.join(given)}, not both")
    if (columns.image or columns.id) and images is None and images_parquet is None:
        raise UsageError("--image-column / --id-column apply to Parquet inputs")
    if manifest is not None:
        if image_root is None:
            raise UsageError("--manifest needs --image-root (the folder its file_name entries are relative to)")
        items = read_manifest(manifest, str(image_root) if is_url(str(image_root)) else image_root)
        where = str(manifest)
    elif images_parquet is not None:
        urls = expand_urls(images_parquet)
        if not urls:
            raise UsageError(f"--images-parquet {images_parquet}: no such files")
        items = list_parquet(urls, columns)
        where = images_parquet
    elif images is None:
        raise UsageError("no input: give a folder, a text file of paths, '-' for paths on stdin, tar shards, "
                         "--images-parquet or --manifest")
    else:
        items = _collect_images(images, image_root, stdin, columns)
        where = "stdin" if images == "-" else images
    if (columns.image or columns.id) and not any(it.locator and it.locator[0] == "parquet" for it in items):
        raise UsageError("--image-column / --id-column apply to Parquet inputs")
    if not items:
        raise UsageError(f"{_safe(str(where))}: no images found (extensions: "
                         f"{', '.join(e[1:] for e in IMAGE_EXTENSIONS)}; or tar shards, Parquet files)")
    return items


def _collect_images(images: str, image_root: str | Path | None, stdin: TextIO | None,
                    columns: ParquetColumns) -> list[ImageItem]:
    if images == "-":
        stream = stdin if stdin is not None else sys.stdin
        if stream.isatty():
            raise UsageError("'-' reads image paths from stdin, but stdin is a terminal; pipe a list in")
        return read_path_list(stream, image_root, "<stdin>")
    local = not is_url(images)
    if not (local and os.path.exists(images)) and any(c in images for c in "{*?"):
        urls = expand_urls(images)
        if urls != [images]:
            kind = _kind_of(urls)
            if kind is None:
                raise UsageError(f"{images}: a pattern must name .tar or .parquet files "
                                 f"(it gives e.g. {_safe(urls[0]) if urls else 'nothing'})")
            return _from_shards(kind, urls, columns)
    if not local:
        return _collect_remote(images, image_root, columns)
    path = Path(images)
    if path.is_dir():
        if image_root is not None:
            raise UsageError("--image-root applies to --manifest and path lists, not to a folder")
        items = list_folder(images)
        if items:
            return items
        shards = _folder_of_shards(_local_files(path, TAR_EXTENSIONS + PARQUET_EXTENSIONS, recursive=False))
        return _from_shards(shards[0], [str(path / f) for f in shards[1]], columns) if shards else []
    if path.is_file():
        lower = images.lower()
        if lower.endswith(IMAGE_EXTENSIONS):
            return read_path_list([images], image_root, images)
        if lower.endswith(TAR_EXTENSIONS) or lower.endswith(PARQUET_EXTENSIONS):
            return _from_shards(_kind_of([lower]), [images], columns)
        try:
            with open(images, encoding="utf-8") as fh:
                return _from_list(list(fh), image_root, images, columns)
        except UnicodeDecodeError:
            raise UsageError(f"{images}: not a text file of image paths") from None
    raise UsageError(f"{images}: no such file or directory")


def _from_list(lines: list[str], image_root: str | Path | None, source: str, columns: ParquetColumns
               ) -> list[ImageItem]:
    """A text file of image paths, or of tar (or Parquet) URLs: a shard list (WebDataset's url list)."""
    listed = [line.strip() for line in lines if line.strip()]
    kind = _kind_of(listed)
    if kind is not None and image_root is None:
        return _from_shards(kind, listed, columns)
    return read_path_list(lines, image_root, source)


def _collect_remote(url: str, image_root: str | Path | None, columns: ParquetColumns) -> list[ImageItem]:
    """A URL: a prefix (folder of images, or of tars / Parquet files), one tar, one Parquet file,
    one image, or a text file of paths / shard URLs."""
    fs, p = _fs(url)
    lower = url.lower()
    if lower.endswith(TAR_EXTENSIONS) or lower.endswith(PARQUET_EXTENSIONS):
        return _from_shards(_kind_of([lower]), [url], columns)
    if lower.endswith(IMAGE_EXTENSIONS):
        return read_path_list([url], image_root, url)
    try:
        directory = fs.isdir(p)
        exists = directory or fs.exists(p)
    except Exception as exc:  # unreachable endpoint, missing bucket, denied: exit 2 before any work
        raise UsageError(f"{_safe(url)}: cannot list ({_reason(exc)})") from None
    if not exists:
        raise UsageError(f"{_safe(url)}: no such file or directory")
    if directory:
        if image_root is not None:
            raise UsageError("--image-root applies to --manifest and path lists, not to a folder")
        items = _list_remote_folder(url, IMAGE_EXTENSIONS)
        if items:
            return items
        shards = _folder_of_shards(_remote_files(url, TAR_EXTENSIONS + PARQUET_EXTENSIONS))
        return _from_shards(shards[0], shards[1], columns) if shards else []
    try:
        text = _read_text(url)
    except UnicodeDecodeError:
        raise UsageError(f"{_safe(url)}: not a text file of image paths") from None
    return _from_list(list(io.StringIO(text, newline=None)), image_root, url, columns)  # universal newlines, as open()
