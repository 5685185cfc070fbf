"""WebDataset tar shards and Parquet files with image bytes: listing their samples / rows into
`ImageItem`s, and reading one item's bytes (in DataLoader workers).

Items stay random-access: an image inside a tar or Parquet file carries its `shard` (that file's URL
or path) and a `locator` (where in it), so any process can read any item without reading the ones
before it. braceexpand expands shard patterns (`data/{00000..00127}.tar`); tar headers are walked by
tarscan.py (damage stepped over and reported, links read inside the shard); Parquet is read with
pyarrow, one row group at a time. A shard that cannot be read, or what a damaged one loses, is a
failed item naming the shard, never a silent gap.
"""

from __future__ import annotations

import logging
import os
import posixpath
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from tagclip_cli.errors import UsageError
from tagclip_cli.fileio import output_text
from tagclip_cli.itemlist import ERROR, PARQUET, TAR, ItemBuilder, ItemList, local_indices
from tagclip_cli.sourcebase import (
    IMAGE_EXTENSIONS,
    PARQUET_EXTENSIONS,
    TAR_EXTENSIONS,
    ImageItem,
    SourceError,
    is_url,
)
from tagclip_cli.sourcebase import io_reason as _reason
from tagclip_cli.sourcebase import safe_url as _safe
from tagclip_cli.sourcebase import url_fs as _fs
from tagclip_cli.tarscan import TarColumns, scan_columns

log = logging.getLogger(__name__)

LIST_THREADS = 8  # shards listed at once (remote listing waits on the network, not the CPU)


def _remote(url: str) -> bool:
    """Whether url is read over a network (a file:// URL is a local file)."""
    return is_url(url) and not url.startswith("file://")


def _list_threads(urls: Sequence[str]) -> int:
    """Threads listing shards at once: LIST_THREADS for remote shards (waiting on the network),
    one for local files, whose header walk is Python under the GIL (more threads only add switching:
    1M samples in local tars listed in 6.6-7.6 µs of CPU each with one thread, 8.0-8.4 with 8)."""
    if not any(_remote(str(url)) for url in urls):
        return 1
    return min(LIST_THREADS, max(1, len(urls)))


def _open_exact(fs, p: str):
    """p opened without fsspec's read cache: each read is one request of the size asked for
    (nothing read ahead); a file system without fsspec's read caches opens it as it reads."""
    try:
        return fs.open(p, "rb", cache_type="none")
    except TypeError:
        return fs.open(p, "rb")
OPEN_FILES = 4  # tar/Parquet files kept open per process while reading items


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


def _list_one_tar(url: str) -> TarColumns:
    fs, p = _fs(url)
    try:
        size = fs.size(p)
        with _open_tar(fs, p, url) as fh:
            return scan_columns(fh, size, _safe(url), IMAGE_EXTENSIONS)
    except Exception as exc:  # unreachable / vanished / denied: this shard is one failed row
        return TarColumns([], [], [], [], {}, f"cannot read tar shard {_safe(url)} ({_reason(exc)})", 0, 0)


def _open_tar(fs, p: str, url: str):
    """A tar opened for its header walk: a local file as it is (read by its descriptor); a remote
    one without fsspec's read cache, so that each read of tarscan's is one ranged request of the
    size tarscan asks for (headers and the small members between them, not the whole shard)."""
    return _open_exact(fs, p) if _remote(url) else fs.open(p, "rb")


def list_tars(urls: Sequence[str]) -> ItemList:
    """The samples of every tar shard, shard by shard in the given order: image_id
    `<shard name>/<key>`. Shards are listed in parallel threads (remote listing waits on the
    network), each one's samples turned into columns as it comes. A shard that cannot be read, or
    the lost rest of a truncated one, is one failed item naming the shard; UsageError if no shard
    could be read at all."""
    names = _shard_names(urls, TAR_EXTENSIONS)
    builder = ItemBuilder()
    problems: list[str] = []  # warned once it is known that some shard could be read
    readable = False
    with ThreadPoolExecutor(max_workers=_list_threads(urls)) as pool:
        for shard_index, (url, name, shard) in enumerate(zip(urls, names, pool.map(_list_one_tar, urls), strict=True)):
            readable = readable or bool(shard.keys) or shard.problem is None
            if shard.problem is not None:
                problems.append(shard.problem)
            _add_tar_samples(builder, url, name, shard_index, shard)
    if not readable:
        raise _none_readable(problems, urls)
    for problem in problems:
        log.warning("%s", problem)
    return builder.build()


def list_tars_share(urls: Sequence[str], rank: int, world: int) -> tuple[ItemList, np.ndarray, dict[int, int]]:
    """The samples of the tar shards a `--shard` task owns (shard % world == rank), listed without
    reading a byte of the others: each sample is numbered with its local index
    (itemlist.local_indices: its shard and its place in it), since its global index needs the row
    counts of every earlier shard; `tagclip merge` renumbers. Returns (their columns, their local
    indices, the row count of each owned shard): the same items, ids, warnings and error rows as
    `list_tars` gives for those shards. UsageError as `list_tars` gives it when no owned shard can
    be read and no other shard exists (a task whose own shards all fail while others exist writes
    their error rows instead)."""
    names, owned = _shard_names(urls, TAR_EXTENSIONS), range(rank, len(urls), world)
    builder, counts, problems, readable = ItemBuilder(), {}, [], False
    with ThreadPoolExecutor(max_workers=_list_threads(urls)) as pool:
        for shard_index, shard in zip(owned, pool.map(_list_one_tar, [urls[s] for s in owned]), strict=True):
            readable = readable or bool(shard.keys) or shard.problem is None
            if shard.problem is not None:
                problems.append(shard.problem)
            _add_tar_samples(builder, urls[shard_index], names[shard_index], shard_index, shard)
            counts[shard_index] = len(shard.keys) + (shard.problem is not None)
    if len(owned) and not readable and not _any_exists(url for s, url in enumerate(urls) if s % world != rank):
        raise _none_readable(problems, urls)
    for problem in problems:
        log.warning("%s", problem)
    indices = [local_indices(s, counts[s]) for s in owned]
    return builder.build(), np.concatenate([np.zeros(0, np.int64), *indices]), counts


def _none_readable(problems: list[str], urls: Sequence[str]) -> UsageError:
    """The error of a tar input none of whose shards can be read: the first shard's problem."""
    return UsageError(problems[0] + (f" (and the {len(urls) - 1} other shards)" if len(urls) > 1 else ""))


def _any_exists(urls: Iterable[str]) -> bool:
    """Whether any of these files exists (asked of the file system, none of them read)."""
    for url in urls:
        fs, p = _fs(url)
        try:
            if fs.exists(p):
                return True
        except Exception:  # unreachable: as if it were not there
            continue
    return False


def _add_tar_samples(builder: ItemBuilder, url: str, name: str, shard_index: int, shard: TarColumns) -> None:
    ids = [f"{name}/{key}" for key in shard.keys]
    if len(set(ids)) != len(ids):  # a key seen twice: `#2`, `#3`, ... (warned)
        seen: dict[str, int] = {}
        ids = [_unique_id(image_id, seen, url) for image_id in ids]
    if not shard.errors:  # the common shard: its columns in one go
        members = shard.members
        if not "".join(members).isascii():  # type: ignore[arg-type]
            members = [_text(m) for m in members]  # type: ignore[arg-type]
        if not (name.isascii() and "".join(shard.keys).isascii()):
            ids = [_text(i) for i in ids]
        builder.add_tar_members(ids, members, url, shard_index, shard.offsets, shard.sizes)  # type: ignore[arg-type]
    else:
        for at, (image_id, key, member, offset, size) in enumerate(
                zip(ids, shard.keys, shard.members, shard.offsets, shard.sizes, strict=True)):
            error = shard.errors.get(at)
            if error is not None:
                builder.add_shard_item(output_text(image_id), output_text(f"{url}#{key}"), url, shard_index,
                                       ERROR, error=error)
            else:
                builder.add_shard_item(output_text(image_id), output_text(member), url, shard_index, TAR,
                                       offset, size)
    if shard.problem is not None:
        builder.add_shard_item(output_text(f"{name}/<unreadable>"), output_text(url), url, shard_index, ERROR,
                               error=shard.problem)


def _text(text: str) -> str:
    """output_text, skipped for ASCII (most names)."""
    return text if text.isascii() else output_text(text)


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


def list_parquet(urls: Sequence[str], columns: ParquetColumns = ParquetColumns()) -> ItemList:
    """One item per row of every Parquet file, file by file: image_id `<file name>/<id>` (the id
    column's value, or the row number). Only the footer and the id column are read here, one row
    group at a time. A file that cannot be read (gone, not Parquet) is one failed item naming it, a
    row group whose ids cannot be read a failed item per row, each warned; UsageError if no file
    can be read, or for a missing image column (naming the columns)."""
    names = _shard_names(urls, PARQUET_EXTENSIONS)
    builder = ItemBuilder()
    groups, problems = 0, []  # row groups so far: the unit of work (one file can be a whole data set)
    for url, name in zip(urls, names, strict=True):
        try:
            groups = _list_one_parquet(url, name, columns, builder, groups)
        except UsageError:
            raise
        except FileNotFoundError:
            problems.append(f"{_safe(url)}: no such file")
        except Exception as exc:  # unreachable, denied, not Parquet
            problems.append(f"{_safe(url)}: cannot read as Parquet ({_reason(exc)})")
        else:
            continue
        log.warning("%s", problems[-1])
        builder.add_shard_item(output_text(f"{name}/<unreadable>"), output_text(url), url, groups, ERROR,
                               error=problems[-1])
        groups += 1
    if problems and len(problems) == len(urls):
        raise UsageError(problems[0] + (f" (and the {len(urls) - 1} other files)" if len(urls) > 1 else ""))
    return builder.build()


def _list_one_parquet(url: str, name: str, columns: ParquetColumns, builder: ItemBuilder, groups: int,
                      share: _GroupShare | None = None, metadata=None) -> int:
    """Add the rows of one Parquet file to the builder; returns the row groups counted so far.
    With a share, only the rows of its row groups are added (with their global indices in
    share.indices); the ids of the file's earlier row groups are still read (only the id column),
    since a repeated id is numbered (`#2`) by the rows before it."""
    import pyarrow.parquet as pq

    fs, p = _fs(url)
    with (fs.open(p, "rb") if share is None else _open_exact(fs, p)) as fh:
        pf = pq.ParquetFile(fh, metadata=metadata)
        image_col = _pick_image_column(pf.schema_arrow, columns.image, url)
        id_col = _pick_id_column(pf.schema_arrow, columns.id, url)
        seen: dict[str, int] = {}
        row = 0
        last = pf.metadata.num_row_groups if share is None else share.last(groups, pf.metadata.num_row_groups)
        for group in range(last):
            count = pf.metadata.row_group(group).num_rows
            add = share is None or share.owns(groups + group)
            if not add and id_col is None:  # ids by row number: nothing to read, none can repeat
                row += count
                continue
            ids, error = _group_ids(pf, group, id_col, url, count) if add or id_col else (None, None)
            for in_group in range(count):
                value = ids[in_group] if ids is not None else None
                image_id = output_text(_unique_id(f"{name}/{row if value is None else value}", seen, url))
                if add:
                    if share is not None:
                        share.indices.append(share.first + row)
                    if error is None:
                        builder.add_shard_item(image_id, "", url, groups + group, PARQUET, group, in_group, row,
                                               image_col)
                    else:
                        builder.add_shard_item(image_id, output_text(f"{url}#row={row}"), url, groups + group,
                                               ERROR, error=error)
                row += 1
        return groups + pf.metadata.num_row_groups


def _group_ids(pf, group: int, id_col: str | None, url: str, count: int) -> tuple[list | None, str | None]:
    """The ids of one row group (None: numbered by row), and the error that made its rows fail."""
    try:
        ids = pf.read_row_group(group, columns=[id_col]).column(0).to_pylist() if id_col else None
    except Exception as exc:  # a damaged row group: its rows fail, the others are read
        error = f"cannot read row group {group} of Parquet file {_safe(url)} ({_reason(exc)})"
        log.warning("%s", error)
        return None, error
    return (ids if ids is None or len(ids) == count else None), None


@dataclass
class _GroupShare:
    """The row groups (units) a `--shard` task owns: unit % world == rank; `first` the global index
    of the current file's first row, `indices` the global index of each row added."""

    rank: int
    world: int
    first: int = 0
    indices: list[int] = field(default_factory=list)

    def owns(self, unit: int) -> bool:
        return unit % self.world == self.rank

    def last(self, start: int, count: int) -> int:
        """1 + the last owned group of a file whose groups are units start..start+count-1 (0: none)."""
        return max((g + 1 for g in range(count) if self.owns(start + g)), default=0)


def _read_footer(url: str):
    """The footer (Parquet metadata) of one file and nothing else of it, or the reason it cannot be
    read, as a full listing words it."""
    fs, p = _fs(url)
    try:
        with _open_exact(fs, p) as fh:
            return _footer_of(fh), None
    except FileNotFoundError:
        return None, f"{_safe(url)}: no such file"
    except Exception as exc:  # unreachable, denied, not Parquet
        return None, f"{_safe(url)}: cannot read as Parquet ({_reason(exc)})"


def _footer_of(fh):
    """The Parquet metadata of an open file from exactly its footer: its last 8 bytes, then the
    metadata (two ranged reads; pyarrow alone reads the last 64 KiB, data of the last row group
    included). A file that is not plain Parquet is read by pyarrow, for its own error."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    size = fh.seek(0, os.SEEK_END)
    fh.seek(max(0, size - 8))
    tail = fh.read(8)
    length = int.from_bytes(tail[:4], "little")
    if len(tail) == 8 and tail[4:] == b"PAR1" and 12 + length <= size:
        fh.seek(size - 8 - length)
        try:
            return pq.read_metadata(pa.BufferReader(b"PAR1" + fh.read(length) + tail))
        except Exception:  # said below in pyarrow's words
            pass
    return pq.ParquetFile(fh).metadata


def list_parquet_share(urls: Sequence[str], rank: int, world: int,
                       columns: ParquetColumns = ParquetColumns()) -> tuple[ItemList, np.ndarray, int]:
    """The rows of the row groups a `--shard` task owns (unit % world == rank), listed without
    reading the others': every file's footer gives its row groups' sizes, hence the global index
    and unit of each row; only the owned groups' files are opened again to read ids (of the owned
    groups and of those before them in the same file). Returns (their columns, their global
    indices, the number of rows of the whole input): the same items, ids and indices as
    `list_parquet` gives for those rows, and the same errors."""
    names = _shard_names(urls, PARQUET_EXTENSIONS)
    with ThreadPoolExecutor(max_workers=_list_threads(urls)) as pool:
        footers = list(pool.map(_read_footer, urls))
    problems = [problem for _, problem in footers if problem is not None]
    if len(problems) == len(urls):
        raise UsageError(problems[0] + (f" (and the {len(urls) - 1} other files)" if len(urls) > 1 else ""))
    builder, share, units = ItemBuilder(), _GroupShare(rank, world), 0
    for url, name, (meta, problem) in zip(urls, names, footers, strict=True):
        if problem is not None:
            log.warning("%s", problem)
            if share.owns(units):
                share.indices.append(share.first)
                builder.add_shard_item(output_text(f"{name}/<unreadable>"), output_text(url), url, units, ERROR,
                                       error=problem)
            units, share.first = units + 1, share.first + 1
            continue
        if share.last(units, meta.num_row_groups):
            try:
                _list_one_parquet(url, name, columns, builder, units, share, meta)
            except UsageError:
                raise
            except Exception as exc:  # gone or damaged since its footer was read
                raise UsageError(f"{_safe(url)}: cannot read as Parquet ({_reason(exc)})") from None
        else:  # the columns are checked as a full listing would, from the footer alone
            schema = meta.schema.to_arrow_schema()
            _pick_image_column(schema, columns.image, url)
            _pick_id_column(schema, columns.id, url)
        units, share.first = units + meta.num_row_groups, share.first + meta.num_rows
    return builder.build(), np.asarray(share.indices, dtype=np.int64), share.first


# ---- reading one item's bytes (in DataLoader workers) ---------------------------------------------

class _OpenFiles:
    """A few open shard files per process (least recently used closed first), and for Parquet the
    image column of the last row group read: items come in order, so most reads hit the cache."""

    def __init__(self) -> None:
        self.pid = os.getpid()
        self.files: OrderedDict[str, object] = OrderedDict()
        self.group: tuple[str, int, str] | None = None
        self.group_values: list | None = None
        self.footers: dict[str, object] = {}  # Parquet metadata of the open files

    def get(self, url: str, exact: bool = False):
        """The open file of url; exact: no read-ahead (a Parquet column chunk is read in one go, and
        nothing past it: the next row group may be another process's)."""
        if self.pid != os.getpid():  # forked into a DataLoader worker: the parent's handles are not ours
            self.__init__()
        fh = self.files.pop(url, None)
        if fh is None:
            fs, p = _fs(url)
            fh = _open_exact(fs, p) if exact else fs.open(p, "rb")
            while len(self.files) >= OPEN_FILES:
                old, handle = self.files.popitem(last=False)
                handle.close()
                self.footers.pop(old, None)
        self.files[url] = fh
        return fh

    def footer(self, url: str, fh):
        """The Parquet metadata of an open file, read once (its footer alone)."""
        if url not in self.footers:
            self.footers[url] = _footer_of(fh)
        return self.footers[url]

    def drop(self, url: str) -> None:
        fh = self.files.pop(url, None)
        self.footers.pop(url, None)
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
            fh = _OPEN.get(item.shard, exact=True)
            table = pq.ParquetFile(fh, metadata=_OPEN.footer(item.shard, fh)).read_row_group(group, columns=[column])
        except Exception as exc:
            _OPEN.drop(item.shard)
            raise SourceError(f"cannot read Parquet file {_safe(item.shard)} ({_reason(exc)})") from None
        values = table.column(0).combine_chunks()
        if hasattr(values.type, "get_field_index") and values.type.get_field_index("bytes") >= 0:
            values = values.field("bytes")
        _OPEN.group, _OPEN.group_values = wanted, values.to_pylist()
    if row >= len(_OPEN.group_values):
        raise SourceError(f"row {row} of row group {group} is gone from {_safe(item.shard)} (changed since listed?)")
    data = _OPEN.group_values[row]
    if not data:
        raise SourceError(f"no image bytes in this row of {_safe(item.shard)}")
    return data
