"""Listing inputs of every kind, local or remote (fsspec): folders, path lists, COCO manifests, and
the CLI's input (which kind a path or URL is); tar shards and Parquet files are listed, and every
item's bytes read, by shardsources.py (its names are importable from here).

Every image becomes an `ImageItem` (sourcebase.py) with a stable `image_id` and a global `index`
(its position in the deterministic listing), which sharding and resume rely on. Sources know
nothing of the method; decoding lives in data.py.

Libraries: fsspec opens and lists every URL (s3://, gs://, hf://, https://, local paths) with the
storage library's own credentials and configuration (s3fs, gcsfs: `pip install tagclip-cli[remote]`).
"""

from __future__ import annotations

import io
import itertools
import json
import logging
import os
import sys
from array import array
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import TextIO

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from tagclip_cli.errors import UsageError
from tagclip_cli.fileio import output_text
from tagclip_cli.itemlist import CHUNK, ItemBuilder, ItemList, OwnedItems, has_parquet
from tagclip_cli.shardsources import (  # noqa: F401  (the tar / Parquet names, importable from here as before)
    ParquetColumns,
    expand_urls,
    list_parquet,
    list_parquet_share,
    list_tars,
    list_tars_share,
    read_bytes,
)
from tagclip_cli.sourcebase import (  # noqa: F401  (importable from here as before)
    COMPRESSED_TAR_EXTENSIONS,
    IMAGE_EXTENSIONS,
    PARQUET_EXTENSIONS,
    SHARD_EXTENSIONS,
    TAR_EXTENSIONS,
    ImageItem,
    SourceError,
    is_url,
)
from tagclip_cli.sourcebase import io_reason as _reason
from tagclip_cli.sourcebase import safe_url as _safe
from tagclip_cli.sourcebase import url_fs as _fs

log = logging.getLogger(__name__)

# a line that line.strip() empties: only characters Python calls whitespace (all below U+3001)
BLANK_LINE = "^[" + "".join(f"\\x{{{ord(c):x}}}" for c in map(chr, range(0x3001)) if c.isspace()) + "]*$"
REPEAT_SLICE = 1 << 16  # sorted ids compared (or paths checked) this many at a time
Own = tuple[int, int] | None  # a --shard task's (rank, world): list only what it owns (row groups, tar shards)


# ---- folders, path lists, manifests ---------------------------------------------------------------

def list_folder(root: str | Path, extensions: Sequence[str] = IMAGE_EXTENSIONS) -> ItemList:
    """All images under root (recursive), sorted by their relative POSIX path. root may be a URL."""
    if isinstance(root, str) and is_url(root):
        return _list_remote_folder(root, extensions)
    root = Path(root)
    if not root.exists():
        raise UsageError(f"{root}: no such file or directory")
    if not root.is_dir():
        raise UsageError(f"{root}: not a directory")
    prefix = str(root / "x")[:-1]  # the path is prefix + the relative path ("" for the folder ".")
    rels = _local_file_column(root, extensions)
    if rels is not None:
        return ItemList(rels, None, prefix)
    # Undecodable (non-UTF-8) names keep their real path for opening; the id is escaped (output_text).
    builder = ItemBuilder(prefix, same_paths=True)
    for rel in _local_files(root, extensions):
        text = output_text(rel)
        if text == rel:
            builder.add(rel)
        else:
            builder.add_raw_path(text, prefix + rel)
    return builder.build()


def _walk(root: Path, extensions: Sequence[str], recursive: bool = True) -> Iterator[list[str]]:
    """The relative POSIX paths of the files under root with one of the extensions, a directory at
    a time (unsorted); warns of directories it cannot list and of links to directories."""
    exts = tuple(e.lower() for e in extensions)
    linked_dirs: list[str] = []
    top = os.fspath(root)

    def unlisted(exc: OSError) -> None:  # os.walk skips such directories silently otherwise
        log.warning("cannot list %s (%s); images in it are not included", output_text(str(exc.filename)),
                    exc.strerror or exc)

    for dirpath, dirnames, filenames in os.walk(top, followlinks=False, onerror=unlisted):
        dirnames.sort()
        linked_dirs.extend(os.path.join(dirpath, d) for d in dirnames if os.path.islink(os.path.join(dirpath, d)))
        folder = Path(os.path.relpath(dirpath, top)).as_posix()
        lead = "" if folder == "." else folder + "/"
        yield [lead + name for name in filenames if name.lower().endswith(exts)]
        if not recursive:
            break
    if linked_dirs and recursive:  # not followed (loops, duplicates): say so rather than drop their images
        log.warning("%d symbolic link(s) to directories not followed (e.g. %s); list such images in a "
                    "text file of paths to include them", len(linked_dirs), output_text(linked_dirs[0]))


def _local_files(root: Path, extensions: Sequence[str], recursive: bool = True) -> list[str]:
    """Relative POSIX paths of the files under root with one of the extensions, sorted."""
    found = [rel for names in _walk(root, extensions, recursive) for rel in names]
    found.sort()
    return found


def _local_file_column(root: Path, extensions: Sequence[str]) -> pa.Array | None:
    """`_local_files` as one sorted Arrow string column (UTF-8 byte order is code point order,
    Python's), or None when a name is not valid UTF-8 (then the caller sorts in Python)."""
    chunks: list[pa.Array] = []
    pending: list[str] = []
    try:
        for names in _walk(root, extensions):
            pending.extend(names)
            if len(pending) >= CHUNK:
                chunks.append(pa.array(pending, pa.large_string()))
                pending = []
        chunks.append(pa.array(pending, pa.large_string()))
    except UnicodeEncodeError:
        return None
    column = pa.chunked_array(chunks, pa.large_string())
    return column.take(pc.sort_indices(column)) if len(column) > 1 else column


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


def _list_remote_folder(url: str, extensions: Sequence[str]) -> ItemList:
    base = url.rstrip("/") + "/"
    builder = ItemBuilder()
    for f in _remote_files(url, extensions):
        builder.add(output_text(f[len(base):] if f.startswith(base) else f), f)
    return builder.build()


def read_manifest(manifest: str | Path, image_root: str | Path) -> ItemList:
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
    builder = ItemBuilder()
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
        builder.add(str(coco_id), path, coco_id)
    return builder.build()


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


def read_path_list(lines: Iterable[str], image_root: str | Path | None = None, source: str = "-") -> ItemList:
    """Images named one per line (blank lines ignored), in the given order.

    Without image_root the id and the path are the line as given (relative to the working
    directory). With image_root, a path inside the root (lexically, e.g. `find ROOT` output) keeps
    its path and gets the id relative to the root; any other relative path is taken as relative to
    the root (id = the line). An absolute path outside the root is an error. Lines may be URLs.
    The lines are read as a stream into columns; a line listed twice is an error naming both."""
    listing = _PathListing(image_root, source)
    for lineno, raw in enumerate(lines, start=1):
        line = raw.rstrip("\r\n")
        if not line.strip():
            listing.blank.append(lineno)
            continue
        listing.add(line, lineno)
    items = listing.build()
    _refuse_repeats(items, listing, source)
    return items


class _PathListing:
    """The columns of a path list as it is read: ids, paths (when they differ), which lines were
    joined to the root (to quote a line in an error), the blank lines (to number the others)."""

    def __init__(self, image_root: str | Path | None, source: str) -> None:
        self.root, self.source = image_root, source
        self.remote = image_root is not None and is_url(str(image_root))
        self.base = str(image_root).rstrip("/") + "/" if self.remote else None
        self.root_abs = None if image_root is None or self.remote else os.path.abspath(image_root)
        self.inside = None if self.root_abs is None else os.path.join(str(image_root), "")
        self.joined = array("B")
        self.blank: list[int] = []
        self.ids: list[str] = []
        self.chunks: list[pa.Array] = []
        self.builder = None if image_root is None else ItemBuilder()

    def add(self, line: str, lineno: int) -> None:
        if self.builder is None:  # no root: the id is the line, the path too
            self.ids.append(line)
            if len(self.ids) >= CHUNK:
                self.chunks.append(pa.array(self.ids, pa.large_string()))
                self.ids = []
            return
        path, image_id = self._resolve(line, lineno)
        self.joined.append(path is not line)
        self.builder.add(image_id, path)

    def _resolve(self, line: str, lineno: int) -> tuple[str, str]:
        """(path, id) of a line under the root."""
        if self.remote:
            if line.startswith(self.base):
                return line, line[len(self.base):]
            if is_url(line):
                raise UsageError(f"{self.source}:{lineno}: {_safe(line)} is not under --image-root "
                                 f"{_safe(str(self.root))}")
            return self.base + line, line
        if is_url(line):
            return line, line
        rest = line[len(self.inside):] if line.startswith(self.inside) else None
        if rest and "//" not in rest and "/." not in "/" + rest and not rest.endswith("/"):
            return line, rest  # the common case (`find ROOT`), as abspath / relpath would give it
        absolute = os.path.abspath(line)
        if absolute == self.root_abs or absolute.startswith(self.root_abs + os.sep):
            return line, Path(os.path.relpath(absolute, self.root_abs)).as_posix()
        if os.path.isabs(line):
            raise UsageError(f"{self.source}:{lineno}: {line} is not under --image-root {self.root}")
        return os.path.join(self.root, line), Path(os.path.normpath(line)).as_posix()

    def build(self) -> ItemList:
        if self.builder is not None:
            return self.builder.build()
        self.chunks.append(pa.array(self.ids, pa.large_string()))
        self.ids = []
        return ItemList(pa.chunked_array(self.chunks, pa.large_string()))

    def lineno(self, position: int) -> int:
        """The line number of the item at position (blank lines are not items)."""
        number = position + 1
        for blank in self.blank:
            if blank > number:
                break
            number += 1
        return number

    def line(self, items: ItemList, position: int) -> str:
        path = items[position].path
        if self.builder is None or not self.joined[position]:
            return path
        return path[len(self.base):] if self.remote else path[len(os.path.join(str(self.root), "")):]


def _refuse_repeats(items: ItemList, listing: _PathListing, source: str) -> None:
    """UsageError naming the first line whose id was listed on an earlier line. Found by sorting
    64-bit hashes of the ids (8 bytes per id, no set of ten million strings); only ids whose hash
    repeats are compared as strings."""
    if len(items) < 2:
        return
    hashes = _id_hashes(items.ids)
    hashes.sort()
    repeated = hashes[1:][hashes[1:] == hashes[:-1]]
    del hashes
    if not len(repeated):
        return
    candidates = np.flatnonzero(np.isin(_id_hashes(items.ids), repeated))
    seen: dict[str, int] = {}
    for position in candidates.tolist():
        image_id = items.ids[position].as_py()
        if image_id in seen:
            raise UsageError(f"{source}:{listing.lineno(position)}: {listing.line(items, position)} was already "
                             f"listed on line {listing.lineno(seen[image_id])}")
        seen[image_id] = position


def _id_hashes(ids: pa.ChunkedArray | pa.Array) -> np.ndarray:
    """(n,) int64: Python's hash of every id, a slice at a time."""
    out = np.empty(len(ids), dtype=np.int64)
    at = 0
    for start in range(0, len(ids), REPEAT_SLICE):
        values = ids.slice(start, REPEAT_SLICE).to_pylist()
        out[at:at + len(values)] = np.fromiter(map(hash, values), dtype=np.int64, count=len(values))
        at += len(values)
    return out


# ---- the CLI's input ------------------------------------------------------------------------------

def _refuse_compressed(urls: Sequence[str]) -> None:
    """UsageError naming the first compressed tar among urls: such shards have no random access
    (every item would be read by decompressing the shard from its start)."""
    for url in urls:
        if url.lower().endswith(COMPRESSED_TAR_EXTENSIONS):
            raise UsageError(f"{_safe(url)}: compressed tar shards are not supported; decompress them to .tar "
                             "first (gunzip, bunzip2, unxz or unzstd)")


def _kind_of(urls: Sequence[str]) -> str | None:
    _refuse_compressed(urls)
    lowered = [u.lower() for u in urls]
    if lowered and all(u.endswith(TAR_EXTENSIONS) for u in lowered):
        return "tar"
    if lowered and all(u.endswith(PARQUET_EXTENSIONS) for u in lowered):
        return "parquet"
    return None


def _folder_of_shards(files: list[str]) -> tuple[str, list[str]] | None:
    """A folder without images but with tars (preferred: img2dataset's .parquet beside them holds
    metadata only) or Parquet files: (kind, sorted files). UsageError for a compressed tar among them."""
    _refuse_compressed(files)
    tars = [f for f in files if f.lower().endswith(TAR_EXTENSIONS)]
    if tars:
        return "tar", tars
    parquets = [f for f in files if f.lower().endswith(PARQUET_EXTENSIONS)]
    return ("parquet", parquets) if parquets else None


def _from_shards(kind: str, urls: list[str], columns: ParquetColumns, own: Own = None) -> ItemList | OwnedItems:
    """The items of tar shards or Parquet files; with own (rank, world) only those of the row
    groups or tar shards that --shard task owns: list_parquet_share reads the other files' footers,
    nothing else of them (global indices); list_tars_share reads nothing of the other shards and
    numbers its own samples locally (itemlist.local_indices)."""
    if own is None:
        return list_tars(urls) if kind == "tar" else list_parquet(urls, columns)
    rank, world = own
    if kind == "parquet":
        return OwnedItems(*list_parquet_share(urls, rank, world, columns))
    base, indices, counts = list_tars_share(urls, rank, world)
    if columns.image or columns.id:  # as collect_items says it of a whole list of tars
        raise UsageError("--image-column / --id-column apply to Parquet inputs")
    return OwnedItems(base, indices, None, counts=counts, shards=len(urls))


def collect_items(
    images: str | None, manifest: str | Path | None = None, image_root: str | Path | None = None,
    stdin: TextIO | None = None, images_parquet: str | None = None, columns: ParquetColumns = ParquetColumns(),
    own: Own = None,
) -> ItemList | OwnedItems:
    """Resolve the CLI's input: a folder, a text file of paths (or of tar URLs), one image, `-`
    (paths on stdin), tar shards (a pattern, one tar, a folder of tars), Parquet files with image
    bytes (images_parquet, or .parquet inputs), or a COCO manifest with its image root; local or
    URLs. Raises UsageError when nothing usable is given. own (rank, world): a --shard task that
    lists only its own row groups of Parquet inputs or its own tar shards (an `OwnedItems`; other
    inputs are listed whole)."""
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
        items = _from_shards("parquet", urls, columns, own)
        where = images_parquet
    elif images is None:
        raise UsageError("no input: give a folder, a text file of paths, '-' for paths on stdin, tar shards, "
                         "--images-parquet or --manifest")
    else:
        items = _collect_images(images, image_root, stdin, columns, own)
        where = "stdin" if images == "-" else images
    owned = isinstance(items, OwnedItems)  # Parquet files or tars (all unreadable: refused by the listing)
    if (columns.image or columns.id) and not owned and not has_parquet(items):
        raise UsageError("--image-column / --id-column apply to Parquet inputs")
    if not (items.any_images() if isinstance(items, OwnedItems) else items):
        raise UsageError(f"{_safe(str(where))}: no images found (extensions: "
                         f"{', '.join(e[1:] for e in IMAGE_EXTENSIONS)}; or tar shards, Parquet files)")
    pa.default_memory_pool().release_unused()  # what listing freed (chunks, sort indices) goes back
    return items


def _collect_images(images: str, image_root: str | Path | None, stdin: TextIO | None,
                    columns: ParquetColumns, own: Own = None) -> ItemList:
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
            return _from_shards(kind, urls, columns, own)
    if not local:
        return _collect_remote(images, image_root, columns, own)
    path = Path(images)
    if path.is_dir():
        if image_root is not None:
            raise UsageError("--image-root applies to --manifest and path lists, not to a folder")
        items = list_folder(images)
        shard_files = _local_files(path, SHARD_EXTENSIONS, recursive=False)
        if items:
            if shard_files:  # images win; say what is left out rather than drop it silently
                log.warning("%s holds images and %d tar / Parquet file(s) (e.g. %s); only the images are read "
                            "(name the shards to read those)", output_text(images), len(shard_files),
                            output_text(shard_files[0]))
            return items
        shards = _folder_of_shards([str(path / f) for f in shard_files])  # errors name the file by its path
        return _from_shards(shards[0], shards[1], columns, own) if shards else []
    if path.is_file():
        lower = images.lower()
        _refuse_compressed([images])
        if lower.endswith(IMAGE_EXTENSIONS):
            return read_path_list([images], image_root, images)
        if lower.endswith(TAR_EXTENSIONS) or lower.endswith(PARQUET_EXTENSIONS):
            return _from_shards(_kind_of([lower]), [images], columns, own)
        fast = _path_list_column(images) if image_root is None else None
        if fast is not None:
            return fast
        try:
            with open(images, encoding="utf-8") as fh:
                return _from_list(fh, image_root, images, columns, own)
        except UnicodeDecodeError:
            raise UsageError(f"{images}: not a text file of image paths") from None
    raise UsageError(f"{images}: no such file or directory")


def _from_list(lines: Iterable[str], image_root: str | Path | None, source: str, columns: ParquetColumns,
               own: Own = None) -> ItemList:
    """A text file of image paths, or of tar (or Parquet) URLs: a shard list (WebDataset's url list).

    Read as a stream: only a list whose first line names a shard is held whole (to check that
    every line does); a compressed tar named anywhere is refused either way."""
    stream = iter(lines)
    head: list[str] = []
    for raw in stream:
        head.append(raw)
        if raw.strip():
            break
    first = head[-1].strip().lower() if head else ""
    if image_root is None and first.endswith(SHARD_EXTENSIONS):
        rest = head + list(stream)
        listed = [line.strip() for line in rest if line.strip()]
        kind = _kind_of(listed)
        if kind is not None:
            return _from_shards(kind, listed, columns, own)
        return read_path_list(rest, image_root, source)
    items = read_path_list(itertools.chain(head, stream), image_root, source)
    _refuse_compressed_column(items)
    return items


def _path_list_column(path: str) -> ItemList | None:
    """A local text file of image paths (no --image-root) read by Arrow's CSV reader, one column,
    no quoting: the lines become the id column without a Python string per line. Lines as Python's
    text mode gives them (universal newlines); whitespace-only lines skipped (Python's whitespace).
    None when this reader cannot say the same as `read_path_list` (a byte-order mark, a control
    character 0x1f, text that is not UTF-8, a list of shards): the file is then read line by line."""
    import pyarrow.csv as csv

    with open(path, "rb") as fh:
        if fh.read(3) == b"\xef\xbb\xbf":  # Python keeps the mark in the first line, Arrow drops it
            return None
    listing = _PathListing(None, path)
    chunks: list[pa.Array] = []
    line = 0
    try:
        reader = csv.open_csv(path, read_options=csv.ReadOptions(autogenerate_column_names=True, block_size=1 << 22),
                              parse_options=csv.ParseOptions(delimiter="\x1f", quote_char=False, escape_char=False,
                                                             newlines_in_values=False, ignore_empty_lines=False),
                              convert_options=csv.ConvertOptions(column_types={"f0": pa.large_string()},
                                                                 strings_can_be_null=False))
        for batch in reader:
            if batch.num_columns != 1:  # the first line holds the delimiter
                return None
            lines = batch.column(0)
            blank = pc.match_substring_regex(lines, BLANK_LINE).to_numpy(zero_copy_only=False)
            listing.blank.extend((np.flatnonzero(blank) + line + 1).tolist())
            chunks.append(lines.filter(pa.array(~blank)) if blank.any() else lines)
            line += len(lines)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        return None
    first = next((c[0].as_py() for c in chunks if len(c)), "")
    if first.strip().lower().endswith(SHARD_EXTENSIONS):  # perhaps a list of shards: read it as before
        return None
    items = ItemList.front_coded(chunks)  # held after the folder the lines share
    _refuse_repeats(items, listing, path)
    _refuse_compressed_column(items)
    return items


def _refuse_compressed_column(items: ItemList) -> None:
    """`_refuse_compressed` for a path list held as columns (the lines are the paths, or end them),
    a slice at a time."""
    column = items.ids if items.paths is None else items.paths
    for start in range(0, len(column), REPEAT_SLICE):
        names = pc.utf8_lower(pc.utf8_rtrim_whitespace(column.slice(start, REPEAT_SLICE)))
        for ext in COMPRESSED_TAR_EXTENSIONS:
            hits = pc.ends_with(names, ext)
            if pc.any(hits).as_py():
                _refuse_compressed([items[start + int(pc.index(hits, True).as_py())].path])


def _collect_remote(url: str, image_root: str | Path | None, columns: ParquetColumns, own: Own = None) -> ItemList:
    """A URL: a prefix (folder of images, or of tars / Parquet files), one tar, one Parquet file,
    one image, or a text file of paths / shard URLs."""
    fs, p = _fs(url)
    lower = url.lower()
    _refuse_compressed([url])
    if lower.endswith(TAR_EXTENSIONS) or lower.endswith(PARQUET_EXTENSIONS):
        return _from_shards(_kind_of([lower]), [url], columns, own)
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
        shards = _folder_of_shards(_remote_files(url, SHARD_EXTENSIONS))
        return _from_shards(shards[0], shards[1], columns, own) if shards else []
    try:
        text = _read_text(url)
    except UnicodeDecodeError:
        raise UsageError(f"{_safe(url)}: not a text file of image paths") from None
    return _from_list(io.StringIO(text, newline=None), image_root, url, columns, own)  # universal newlines, as open()
