"""The input list as columns: `ItemList`, a read-only sequence of `ImageItem`s held as Arrow and
NumPy arrays (ids, paths or tar members, shard numbers, locators), never one Python object per
image. An `ImageItem` is made only when one is asked for (`items[i]`, iteration), so a 10-million
image list costs tens of bytes per image in every process, and forked DataLoader workers read
the same buffers without copy-on-write growth (no reference counts are touched per item).

`ItemBuilder` fills the columns while a source is listed, a chunk at a time; `ItemList.take`
gives a share (this rank's items, those still to do) as an array of positions over the same
columns. `ItemList.of` turns any sequence of `ImageItem`s into columns (the Python API, tests).
"""

from __future__ import annotations

import os
from array import array
from collections.abc import Iterator, Sequence
from dataclasses import replace

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from tagclip_cli.fileio import output_text
from tagclip_cli.sourcebase import ImageItem

PLAIN, TAR, PARQUET, ERROR = 0, 1, 2, 3  # the locator kinds, as stored in `kinds`
KIND_NAMES = {TAR: "tar", PARQUET: "parquet", ERROR: "error"}
CHUNK = 1 << 16  # values buffered as Python objects before they become an Arrow chunk
COLUMN_CODES = {"shard_of": "i", "units": "q", "kinds": "B", "loc_a": "q", "loc_b": "q", "rows": "q"}
COLUMN_TYPES = {"shard_of": np.int32, "units": np.int64, "kinds": np.uint8, "loc_a": np.int64, "loc_b": np.int64,
                "rows": np.int64}
# Local indices: a `--shard` task over tars that lists only its own shards numbers sample p of shard s
# LOCAL_BASE + (s << SHARD_SHIFT) + p; they sort as the global indices will, and `tagclip merge`
# turns them into global ones once every shard's count is known (jobs/listing.py `Numbering`).
LOCAL_BASE = 1 << 62
SHARD_SHIFT = 32


def local_indices(shard: int, count: int) -> np.ndarray:
    """The local indices of the `count` rows of tar shard number `shard`."""
    return LOCAL_BASE + (shard << SHARD_SHIFT) + np.arange(count, dtype=np.int64)


def _strings(values: list[str]) -> pa.Array:
    return pa.array(values, pa.large_string())


def _join(*parts) -> pa.Array:
    """Strings joined element-wise (literals repeated), as large_string."""
    values = [pa.scalar(p, pa.large_string()) if isinstance(p, str) else p for p in parts]
    return pc.binary_join_element_wise(*values, pa.scalar("", pa.large_string()))


def _take(column: pa.Array | pa.ChunkedArray, rows: np.ndarray) -> pa.Array:
    """column[rows] (rows increasing) as one array, taken chunk by chunk (no copy of the whole)."""
    if isinstance(column, pa.Array):
        return column.take(pa.array(rows))
    taken, start = [], 0
    for chunk in column.chunks:
        lo, hi = np.searchsorted(rows, [start, start + len(chunk)])
        if hi > lo:
            taken.append(chunk.take(pa.array(rows[lo:hi] - start)))
        start += len(chunk)
    return pa.concat_arrays(taken) if taken else pa.array([], column.type)


def common_folder(chunks: list[pa.Array]) -> str:
    """The longest prefix ending in "/" that every string of the chunks starts with ("" if none):
    that of the smallest and the largest (in code point order, as UTF-8 bytes sort)."""
    column = pa.chunked_array(chunks, pa.large_string())
    if not len(column):
        return ""
    extremes = pc.min_max(column)
    low, high = extremes["min"].as_py(), extremes["max"].as_py()
    shared = len(os.path.commonprefix([low, high]))
    return low[:low.rfind("/", 0, shared) + 1]


def _concat(chunks: list[pa.Array]) -> pa.ChunkedArray:
    """The chunks as one column without copying them (a concatenation would hold both at once)."""
    return pa.chunked_array(chunks, pa.large_string())


class ItemList(Sequence):
    """Items 0..n-1 as columns (see the module docstring).

    ids: image_id after `id_prefix` (large_string, already fit for UTF-8 outputs; a path list's
    lines share their folders: `front_coded`). paths: per item, the path after
    `prefix` (PLAIN and ERROR items), the member name (TAR), unused (PARQUET); None means the path
    is `prefix + id`. raw_paths: the few paths that are not valid UTF-8 (opened as they are; the
    outputs get them escaped). coco_ids: int64 or None. For tar / Parquet inputs: shards (the
    files), shard_of (int32 into shards), units (the unit of work: shard or row group), kinds
    (uint8), loc_a / loc_b (data offset and size, or row group and row in it), rows (a Parquet
    row's number in its file), columns (each shard's image column), errors (position -> reason)."""

    def __init__(self, ids: pa.Array, paths: pa.Array | None = None, prefix: str = "",
                 coco_ids: pa.Array | None = None, raw_paths: dict[int, str] | None = None,
                 shard_cols: dict | None = None, id_prefix: str = "") -> None:
        self.ids = ids
        self.id_prefix = id_prefix
        self.paths = paths
        self.prefix = prefix
        self.coco_ids = coco_ids
        self.raw_paths = raw_paths or {}
        cols = shard_cols or {}
        self.shards: list[str] = cols.get("shards", [])
        self.shard_of: np.ndarray | None = cols.get("shard_of")
        self.units: np.ndarray | None = cols.get("units")
        self.kinds: np.ndarray | None = cols.get("kinds")
        self.loc_a: np.ndarray | None = cols.get("loc_a")
        self.loc_b: np.ndarray | None = cols.get("loc_b")
        self.rows: np.ndarray | None = cols.get("rows")
        self.columns: list[str | None] = cols.get("columns", [])
        self.errors: dict[int, str] = cols.get("errors", {})
        self.input_key: str | None = None  # what it was listed from (jobs.plan), when known
        self.planned_in: str | None = None  # the work directory whose plan it was read from
        self.held: np.ndarray | None = None  # the positions of the rows when only a share is held (`hold`)
        self.held_for: tuple | None = None
        self.total = len(ids)

    def hold(self, positions: np.ndarray, total: int, owner: tuple) -> ItemList:
        """Make this list, whose rows are the items at `positions` (increasing) of a list of `total`,
        stand for that list in the share of `owner` only (jobs/plan.py reads no more of a plan):
        len() is total, item(i) is item i (IndexError for an item not held), the errors and raw
        paths are keyed by position. owner: what jobs.placement deals this share to."""
        self.held, self.total, self.held_for = np.asarray(positions, dtype=np.int64), total, owner
        return self

    # ---- the sequence ----
    def __len__(self) -> int:
        return self.total

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self.item(j) for j in range(*i.indices(len(self)))]
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError(i)
        return self.item(i)

    def __iter__(self) -> Iterator[ImageItem]:
        for i in range(len(self)):
            yield self.item(i)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Sequence) or len(other) != len(self):
            return False
        return all(a == b for a, b in zip(self, other, strict=True))

    __hash__ = None  # type: ignore[assignment]

    @property
    def positions(self) -> np.ndarray:
        """The global index of each item (0..n-1 here, those held of a `hold` list; a `take` share
        has its own)."""
        return np.arange(len(self), dtype=np.int64) if self.held is None else self.held

    def item(self, i: int) -> ImageItem:
        """Item i as an `ImageItem` (made now, not kept)."""
        r = i if self.held is None else self._row(i)
        image_id = self.id_prefix + self.ids[r].as_py()
        coco_id = None if self.coco_ids is None else self.coco_ids[r].as_py()
        kind = PLAIN if self.kinds is None else int(self.kinds[r])
        if kind == PLAIN:
            return ImageItem(i, image_id, self._plain_path(i, r, image_id), coco_id)
        shard = self.shards[self.shard_of[r]]
        unit = int(self.units[r])
        if kind == TAR:
            locator: tuple = ("tar", int(self.loc_a[r]), int(self.loc_b[r]))
            path = f"tar://{self.paths[r].as_py()}::{output_text(shard)}"
        elif kind == PARQUET:
            locator = ("parquet", int(self.loc_a[r]), int(self.loc_b[r]), self.columns[self.shard_of[r]])
            path = f"{output_text(shard)}#row={int(self.rows[r])}"
        else:
            locator, path = ("error", self.errors[i]), self._plain_path(i, r, image_id)
        return ImageItem(i, image_id, path, coco_id, shard, unit, locator)

    def keep(self, positions: np.ndarray, owner: tuple) -> None:
        """Keep only the rows of the items at positions (increasing, all held now), then `hold` them:
        a process that listed everything keeps its share once the whole list is written."""
        positions = np.asarray(positions, dtype=np.int64)
        rows = positions if self.held is None else np.searchsorted(self.held, positions)
        self.ids = _take(self.ids, rows)
        self.paths = None if self.paths is None else _take(self.paths, rows)
        self.coco_ids = None if self.coco_ids is None else _take(self.coco_ids, rows)
        for name in COLUMN_TYPES:
            if getattr(self, name) is not None:
                setattr(self, name, getattr(self, name)[rows])
        if self.errors or self.raw_paths:
            kept = set(positions.tolist())
            self.errors = {k: v for k, v in self.errors.items() if k in kept}
            self.raw_paths = {k: v for k, v in self.raw_paths.items() if k in kept}
        self.hold(positions, self.total, owner)

    def _row(self, i: int) -> int:
        """The row of item i in a `hold` list."""
        row = int(np.searchsorted(self.held, i))
        if row >= len(self.held) or self.held[row] != i:
            raise IndexError(f"item {i} is not in the share this process holds")
        return row

    def _plain_path(self, i: int, row: int, image_id: str) -> str:
        raw = self.raw_paths.get(i) if self.raw_paths else None
        if raw is not None:
            return raw
        return self.prefix + (image_id if self.paths is None else self.paths[row].as_py())

    # ---- columns ----
    def unit_column(self) -> np.ndarray | None:
        """(n,) int64: each item's unit of work (tar shard / row group), or None for plain files."""
        return self.units

    def path_column(self, start: int = 0, stop: int | None = None) -> pa.Array:
        """The `path` of items start..stop as one string array (what items.parquet stores)."""
        if self.held is not None:
            raise ValueError("a list of which only a share is held has no whole table")
        stop = len(self) if stop is None else stop
        base = (self.ids if self.paths is None else self.paths).slice(start, stop - start)
        head = self.prefix + (self.id_prefix if self.paths is None else "")
        plain = _join(head, base) if head else base
        if self.kinds is None:
            out = plain
        else:
            kinds = pa.array(self.kinds[start:stop])
            shards = pa.array([output_text(s) for s in self.shards] or [""], pa.large_string())
            shard = shards.take(pa.array(np.maximum(self.shard_of[start:stop], 0)))
            tar = _join("tar://", base, "::", shard)
            rows = pc.cast(pa.array(self.rows[start:stop]), pa.large_string())
            parquet = _join(shard, "#row=", rows)
            out = pc.if_else(pc.equal(kinds, TAR), tar, pc.if_else(pc.equal(kinds, PARQUET), parquet, plain))
        if self.raw_paths:
            fixed = [(i - start, output_text(p)) for i, p in self.raw_paths.items() if start <= i < stop]
            if fixed:
                values = out.to_pylist()
                for at, text in fixed:
                    values[at] = text
                out = pa.array(values, pa.large_string())
        return out.cast(pa.string())

    def id_column(self, start: int, stop: int) -> pa.Array | pa.ChunkedArray:
        """The image_id of items start..stop (large_string)."""
        ids = self.ids.slice(start, stop - start)
        return _join(self.id_prefix, ids) if self.id_prefix else ids

    def table(self, start: int = 0, stop: int | None = None) -> pa.Table:
        """Items start..stop as items.parquet's columns: index, image_id, path, coco_id."""
        stop = len(self) if stop is None else stop
        coco = (pa.nulls(stop - start, pa.int64()) if self.coco_ids is None
                else self.coco_ids.slice(start, stop - start))
        ids = self.id_column(start, stop).cast(pa.string())
        same = self.paths is None and not self.prefix and self.kinds is None and not self.raw_paths
        return pa.table({
            "index": pa.array(np.arange(start, stop, dtype=np.int64)),
            "image_id": ids,
            "path": ids if same else self.path_column(start, stop),  # a path list's lines are both
            "coco_id": coco,
        })

    def take(self, positions: np.ndarray) -> ItemShare:
        """The items at these (increasing) positions, as a share of the same columns."""
        return ItemShare(self, np.asarray(positions, dtype=np.int64))

    @classmethod
    def front_coded(cls, ids: list[pa.Array]) -> ItemList:
        """A list of these ids (chunks of large_string, emptied as they are read), held after the
        folder prefix they all share (`common_folder`): the lines of a path list of ten million
        images under one folder cost the folder's length less per image (~25 bytes in benchmarks/)."""
        prefix = common_folder(ids)
        kept = []
        while ids:
            chunk = ids.pop(0)
            kept.append(pc.utf8_slice_codeunits(chunk, len(prefix)) if prefix else chunk)
        return cls(_concat(kept), id_prefix=prefix)

    @classmethod
    def of(cls, items: Sequence[ImageItem]) -> ItemList:
        """Columns for any sequence of items (whose indices must be 0..n-1, in order)."""
        if isinstance(items, ItemList):
            return items
        builder = ItemBuilder()
        for position, item in enumerate(items):
            if item.index != position:
                raise ValueError(f"item #{position} has index {item.index}; items must be numbered 0..n-1 in order")
            builder.add_item(item)
        return builder.build()


class ItemShare(Sequence):
    """Some items of an `ItemList` (by position): a rank's share, the items still to do."""

    def __init__(self, base: ItemList, positions: np.ndarray) -> None:
        self.base = base
        self.positions = positions

    def __len__(self) -> int:
        return len(self.positions)

    def __getitem__(self, i):
        if isinstance(i, slice):  # a share too: no list of objects
            return ItemShare(self.base, self.positions[i])
        return self.base.item(int(self.positions[i]))

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Sequence) or len(other) != len(self):
            return False
        return all(a == b for a, b in zip(self, other, strict=True))

    __hash__ = None  # type: ignore[assignment]

    def __iter__(self) -> Iterator[ImageItem]:
        for p in self.positions:
            yield self.base.item(int(p))

    def take(self, positions: np.ndarray) -> ItemShare:
        """Those of these items whose global positions are given (a subset of self.positions)."""
        return ItemShare(self.base, np.asarray(positions, dtype=np.int64))

    def unit_column(self) -> np.ndarray | None:
        """(n,) int64: the unit of work of each of these items, or None for plain files."""
        units = self.base.unit_column()
        if units is None:
            return None
        return units[self.positions if self.base.held is None else np.searchsorted(self.base.held, self.positions)]


class ItemBuilder:
    """Columns filled while listing: ids (and paths) buffered a chunk at a time as Python strings,
    then kept as Arrow arrays; the shard columns only when a tar / Parquet item is added."""

    def __init__(self, prefix: str = "", same_paths: bool = False) -> None:
        self.prefix = prefix
        self.same_paths = same_paths  # path = prefix + id for every item: no path column
        self.id_chunks: list[pa.Array] = []
        self.path_chunks: list[pa.Array] = []
        self.ids: list[str] = []
        self.paths: list[str] = []
        self.coco: list[int | None] | None = None  # only manifests have them
        self.raw_paths: dict[int, str] = {}
        self.count = 0
        self.shards: list[str] = []
        self.shard_pos: dict[str, int] = {}
        self.columns: list[str | None] = []
        self.errors: dict[int, str] = {}
        self.cols: dict[str, array] | None = None  # compact machine integers, not Python ints

    def __len__(self) -> int:
        return self.count

    def add(self, image_id: str, path: str | None = None, coco_id: int | None = None) -> None:
        """A plain file (path None: prefix + id)."""
        self.ids.append(image_id)
        if not self.same_paths:
            self.paths.append(path if path is not None else image_id)
        if coco_id is not None or self.coco is not None:
            if self.coco is None:
                self.coco = [None] * self.count
            self.coco.append(coco_id)
        self._shard_cols(None, -1, PLAIN, 0, 0, 0, None)
        self.count += 1
        if len(self.ids) >= CHUNK:
            self._flush()

    def add_raw_path(self, image_id: str, raw_path: str) -> None:
        """A plain file whose path is not valid UTF-8: opened by raw_path, written escaped."""
        self.raw_paths[self.count] = raw_path
        self.add(image_id, None if self.same_paths else output_text(raw_path))

    def add_shard_item(self, image_id: str, text: str, shard: str, unit: int, kind: int, a: int = 0, b: int = 0,
                       row: int = 0, column: str | None = None, error: str | None = None) -> None:
        """An item inside a tar / Parquet file: text is its member name (TAR), its full path
        (ERROR), or unused (PARQUET)."""
        if kind == ERROR:
            self.errors[self.count] = error or ""
        self.ids.append(image_id)
        self.paths.append(text)
        self._shard_cols(shard, unit, kind, a, b, row, column)
        self.count += 1
        if len(self.ids) >= CHUNK:
            self._flush()

    def add_tar_members(self, ids: list[str], members: list[str], shard: str, unit: int, offsets: list[int],
                        sizes: list[int]) -> None:
        """A tar shard's readable samples at once (ids and member names, data offsets and sizes)."""
        if not ids:
            return
        self._shard_cols(shard, unit, TAR, offsets[0], sizes[0], 0, None)  # the columns exist, the shard too
        for name in ("shard_of", "units", "kinds", "rows"):
            self.cols[name].extend(array(COLUMN_CODES[name], [self.cols[name][-1]]) * (len(ids) - 1))
        self.cols["loc_a"].extend(array("q", offsets[1:]))
        self.cols["loc_b"].extend(array("q", sizes[1:]))
        self.ids.extend(ids)
        self.paths.extend(members)
        self.count += len(ids)
        if len(self.ids) >= CHUNK:
            self._flush()

    def add_item(self, item: ImageItem) -> None:
        """An `ImageItem` as it is (ids and paths made fit for UTF-8 outputs, raw paths kept)."""
        locator = item.locator or ()
        image_id = output_text(item.image_id)
        if item.shard is None and not locator:
            if output_text(item.path) != item.path:
                self.add_raw_path(image_id, item.path)
            else:
                self.add(image_id, item.path, item.coco_id)
            return
        kind = {"tar": TAR, "parquet": PARQUET}.get(locator[0] if locator else "", ERROR)
        row = int(item.path.rsplit("#row=", 1)[1]) if kind == PARQUET else 0
        text = item.path[len("tar://"):].rsplit("::", 1)[0] if kind == TAR else item.path
        a, b = locator[1:3] if kind in (TAR, PARQUET) else (0, 0)
        self.add_shard_item(image_id, output_text(text), item.shard or "",
                            -1 if item.shard_index is None else item.shard_index, kind, a, b, row=row,
                            column=locator[3] if kind == PARQUET else None,
                            error=locator[1] if kind == ERROR and len(locator) > 1 else None)

    def _shard_cols(self, shard: str | None, unit: int, kind: int, a: int, b: int, row: int,
                    column: str | None) -> None:
        if shard is None and self.cols is None:
            return
        if self.cols is None:
            self.cols = {name: array(code, [-1 if name in ("shard_of", "units") else 0]) * self.count
                         for name, code in COLUMN_CODES.items()}
        at = -1
        if shard is not None:
            at = self.shard_pos.get(shard, -1)
            if at < 0:
                at = self.shard_pos[shard] = len(self.shards)
                self.shards.append(shard)
                self.columns.append(column)
        for name, value in (("shard_of", at), ("units", unit), ("kinds", kind), ("loc_a", a), ("loc_b", b),
                            ("rows", row)):
            self.cols[name].append(value)

    def _flush(self) -> None:
        if self.ids:
            self.id_chunks.append(_strings(self.ids))
            self.ids = []
        if self.paths:
            self.path_chunks.append(_strings(self.paths))
            self.paths = []

    def build(self) -> ItemList:
        self._flush()
        cols = None
        if self.cols is not None:
            cols = {name: np.frombuffer(values, dtype=COLUMN_TYPES[name]) if len(values) else
                    np.zeros(0, COLUMN_TYPES[name]) for name, values in self.cols.items()}
            cols.update(shards=self.shards, columns=self.columns, errors=self.errors)
        ids = _concat(self.id_chunks)
        paths = None if self.same_paths else _concat(self.path_chunks)
        if paths is not None and not self.prefix and self.cols is None and paths.equals(ids):
            paths = None  # a path list without a root: the path is the id
        coco = None if self.coco is None else pa.array(self.coco, pa.int64())
        return ItemList(ids, paths, self.prefix, coco, self.raw_paths, cols)


def as_share(items: Sequence[ImageItem]) -> ItemShare:
    """items as a share of columns: an `ItemShare` as it is, an `ItemList` whole, and any other
    sequence of items (indices increasing, e.g. some of a list) as the share of a list that
    holds just them (positions are their indices)."""
    if isinstance(items, ItemShare):
        return items
    if isinstance(items, ItemList):
        return items.take(items.positions)
    indices = np.array([it.index for it in items], dtype=np.int64)
    if len(indices) and indices[-1] + 1 == len(indices) and (np.diff(indices) == 1).all():
        base = ItemList.of(items)
        return base.take(base.positions)
    return _SparseShare(list(items), indices)


class _SparseShare(ItemShare):
    """Some items given as objects (not from a listing): kept as they are."""

    def __init__(self, items: list[ImageItem], indices: np.ndarray) -> None:
        super().__init__(None, indices)  # type: ignore[arg-type]
        self.items = items
        self.at = {int(i): k for k, i in enumerate(indices)}

    def __getitem__(self, i):
        if isinstance(i, slice):
            return self.items[i]
        return self.items[i]

    def __iter__(self) -> Iterator[ImageItem]:
        return iter(self.items)

    def take(self, positions: np.ndarray) -> ItemShare:
        return _SparseShare([self.items[self.at[int(p)]] for p in positions], np.asarray(positions, dtype=np.int64))


class OwnedItems(ItemShare):
    """The items of the units (tar shards / row groups) one `--shard` task owns, listed without the
    rest of the input (shardsources.list_parquet_share / list_tars_share): `base` holds only their
    columns, `positions` their indices (increasing), `total` the number of items of the whole input.
    Items come out with their index; `take` gives a subset of the same kind.

    Parquet: global indices. Tars: local ones (`local_indices`); then `total` is None and `counts`
    the row count of each tar shard it owns, `shards` the number of tar shards of the input."""

    def __init__(self, base: ItemList, positions: np.ndarray, total: int | None, local: np.ndarray | None = None,
                 counts: dict[int, int] | None = None, shards: int | None = None) -> None:
        super().__init__(base, np.asarray(positions, dtype=np.int64))
        self.total = total
        self.local = np.arange(len(self.positions), dtype=np.int64) if local is None else local
        self.counts, self.shards = counts, shards
        self.input_key: str | None = None  # what it was listed from (jobs.plan), when known

    @property
    def numbered_locally(self) -> bool:
        return self.counts is not None

    def __getitem__(self, i):
        if isinstance(i, slice):
            return self._like(self.positions[i], self.local[i])
        return self._item(int(self.local[i]), int(self.positions[i]))

    def __iter__(self) -> Iterator[ImageItem]:
        for k, p in zip(self.local.tolist(), self.positions.tolist(), strict=True):
            yield self._item(k, p)

    def _item(self, k: int, index: int) -> ImageItem:
        return replace(self.base.item(k), index=index)

    def any_images(self) -> bool:
        """Whether the input has images: a task over tars knows it of its own shards only, so it says
        no only when it owns them all (others may hold images it has not looked at)."""
        if self.numbered_locally:
            return bool(len(self)) or len(self.counts) < self.shards  # type: ignore[arg-type,operator]
        return bool(self.total)

    def _like(self, positions: np.ndarray, local: np.ndarray) -> OwnedItems:
        same = OwnedItems(self.base, positions, self.total, local, self.counts, self.shards)
        same.input_key = self.input_key
        return same

    def take(self, positions: np.ndarray) -> OwnedItems:
        positions = np.asarray(positions, dtype=np.int64)
        return self._like(positions, self.local[np.searchsorted(self.positions, positions)])

    def unit_column(self) -> np.ndarray | None:
        units = self.base.unit_column()
        return None if units is None else units[self.local]

    def table(self) -> pa.Table:
        """These items as items.parquet's rows (index, image_id, path, coco_id), by their index."""
        table = self.base.table().take(pa.array(self.local))
        return table.set_column(0, "index", pa.array(self.positions))


def total_items(items: Sequence[ImageItem]) -> int | None:
    """The number of items of the whole input (of which `OwnedItems` hold a task's own); None when
    not known (a task over tars that numbered its own shards locally)."""
    return items.total if isinstance(items, OwnedItems) else len(items)


def has_parquet(items: Sequence[ImageItem]) -> bool:
    """Whether any item lives in a Parquet file (the --image-column check)."""
    if isinstance(items, ItemList):
        return items.kinds is not None and any(c is not None for c in items.columns)
    return any(it.locator and it.locator[0] == "parquet" for it in items)
