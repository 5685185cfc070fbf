"""The manifest of a work directory: what each part file holds (its runs of indices, row count,
failed indices and a digest of its run record), one JSON line per part, so that resume and merge
learn it without opening the parts (reading a part costs ~1 ms: ~35 s per scan at 10M images).

Layout: `OUT.parts/manifest/<host>-<pid>-<random>.jsonl`, one file per writing process, appended
one line per part (a single `write` on an O_APPEND descriptor, then fsync and close).

Why one file per process and not one shared file: on NFS, O_APPEND is emulated by the client
(seek to the size it knows, then write), so appends of two nodes to one file can overwrite each
other; with one writer per file nothing can interleave on any filesystem, and close-to-open
consistency makes a closed line visible to the next reader that opens the file. A new process
writes a new file, so a line torn by a kill is always the last of its file and is skipped.

The part files stay the truth; the manifest is an index of them. A scan lists the directory
once: a manifest line whose part is not there is dropped (its rows are redone), and a part that
no line describes (written by an earlier tagclip-cli, or killed between the part's rename and its
line) is read once and its line appended, so an old output is indexed on its first resume.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import secrets
import socket
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from tagclip_cli.errors import UsageError
from tagclip_cli.fileio import fsync_dir
from tagclip_cli.itemlist import LOCAL_BASE
from tagclip_cli.record import METADATA_KEY

log = logging.getLogger(__name__)

PART_NAME = re.compile(r"part-(\d+)-(\d+)\.parquet$")
MANIFEST_DIR = "manifest"
VERSION = 1


@dataclass(frozen=True)
class PartEntry:
    """What one part file holds: `runs` the [start, stop) runs of its indices, flattened
    (start0, stop0, start1, ...); `failed` its indices whose status is "failed"; `record` a digest
    of the run record in its schema (parts of one configuration share it)."""

    part: str
    rows: int
    runs: tuple[int, ...]
    failed: tuple[int, ...]
    record: str

    def line(self) -> bytes:
        return (json.dumps({"v": VERSION, "part": self.part, "rows": self.rows, "runs": list(self.runs),
                            "failed": list(self.failed), "record": self.record}, separators=(",", ":"))
                + "\n").encode()

    @classmethod
    def parse(cls, line: bytes) -> PartEntry | None:
        """The entry of one manifest line, or None for a line that is not a whole, valid entry."""
        try:
            d = json.loads(line)
            entry = cls(d["part"], d["rows"], tuple(d["runs"]), tuple(d["failed"]), d["record"])
        except (ValueError, KeyError, TypeError):
            return None
        ints = all(type(v) is int for v in (entry.rows, *entry.runs, *entry.failed))
        if (d.get("v") != VERSION or not ints or len(entry.runs) % 2 or not isinstance(entry.record, str)
                or not isinstance(entry.part, str) or not PART_NAME.fullmatch(entry.part)):
            return None
        return entry

    @classmethod
    def of_table(cls, part: str, table: pa.Table) -> PartEntry:
        """The entry of a part's rows (at least the columns index and status, schema metadata kept)."""
        index = table.column("index").to_numpy()
        unique = np.unique(index)
        breaks = np.flatnonzero(np.diff(unique) != 1) + 1
        starts = unique[np.r_[0, breaks]] if len(unique) else unique
        stops = unique[np.r_[breaks - 1, len(unique) - 1]] + 1 if len(unique) else unique
        failed = pc.fill_null(pc.equal(table.column("status"), "failed"), False).to_numpy(zero_copy_only=False)
        runs = np.stack([starts, stops], axis=1).ravel() if len(unique) else unique
        return cls(part, table.num_rows, tuple(runs.tolist()), tuple(index[failed].tolist()),
                   record_digest(table.schema.metadata))


def record_digest(metadata: dict | None) -> str:
    """A digest of the run record stored in a schema's metadata ("" when there is none)."""
    raw = (metadata or {}).get(METADATA_KEY)
    return hashlib.sha256(raw).hexdigest()[:32] if raw else ""


class ManifestWriter:
    """This process's manifest file: created on the first append, one writer only."""

    def __init__(self, directory: Path) -> None:
        self.dir = directory
        self.path: Path | None = None
        self.warned = False

    def append(self, entries: Iterable[PartEntry]) -> None:
        """Append entries, each line whole, then fsync. A failure is a warning: the parts stay
        the truth, and a later scan reads a part its line is missing for."""
        data = b"".join(entry.line() for entry in entries)
        if not data:
            return
        try:
            new = self.path is None
            if new:
                self.dir.mkdir(exist_ok=True)
                host = re.sub(r"[^A-Za-z0-9.-]", "_", socket.gethostname())[:64] or "host"
                self.path = self.dir / f"{host}-{os.getpid()}-{secrets.token_hex(4)}.jsonl"
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
            try:
                view = memoryview(data)
                while view:  # one writer per file: a short write is continued in place
                    view = view[os.write(fd, view):]
                os.fsync(fd)
            finally:
                os.close(fd)
            if new:
                fsync_dir(self.dir)
        except OSError as exc:
            if not self.warned:
                log.warning("cannot write the manifest in %s (%s); resume will read the part files instead",
                            self.dir, exc.strerror or exc)
                self.warned = True


def read_manifest(directory: Path) -> dict[str, list[PartEntry]]:
    """Every whole, valid line of every manifest file, by part name (a part written twice, by
    two runs, can have two lines)."""
    found: dict[str, list[PartEntry]] = {}
    try:
        files = [e.path for e in os.scandir(directory) if e.name.endswith(".jsonl")]
    except FileNotFoundError:
        return found
    for path in files:
        try:
            data = Path(path).read_bytes()
        except OSError:
            continue
        for line in data.split(b"\n")[:-1]:  # after the last newline: nothing, or a torn line
            entry = PartEntry.parse(line)
            if entry is not None:
                found.setdefault(entry.part, []).append(entry)
    return found


def part_names(directory: Path) -> list[str]:
    """The complete part files of a work directory (temporary files do not match)."""
    return [e.name for e in os.scandir(directory) if PART_NAME.fullmatch(e.name)]


def read_part_entry(path: Path) -> PartEntry:
    """Read a part the manifest does not describe (UsageError naming it when it cannot be read)."""
    try:
        return PartEntry.of_table(path.name, pq.read_table(path, columns=["index", "status"]))
    except (OSError, pa.ArrowException) as exc:
        raise UsageError(f"{path}: cannot read this part file ({exc}); delete it and rerun the same "
                         "command to redo its images") from None


class PartIndex:
    """The entries of the part files present in a work directory, by part name (`bounds`: the first
    and last index of the parts whose indices were renumbered, in place of those of their names)."""

    def __init__(self, entries: dict[str, PartEntry], adopted: int = 0,
                 bounds: dict[str, tuple[int, int]] | None = None) -> None:
        self.entries = entries
        self.adopted = adopted
        self.bounds = bounds or {}

    def local(self) -> list[str]:
        """The parts numbered with local indices (a --shard task over tars, itemlist.LOCAL_BASE)."""
        return [name for name, entry in self.entries.items() if entry.runs and entry.runs[0] >= LOCAL_BASE]

    def renumbered(self, to_global: Callable[[np.ndarray], np.ndarray]) -> PartIndex:
        """This index with the local indices of its parts made global by to_global (runs, failed
        indices, first and last index; the runs of a part stay runs: none crosses a tar shard)."""
        names = self.local()
        if not names:
            return self
        runs = [np.asarray(self.entries[name].runs, dtype=np.int64) for name in names]
        failed = [np.asarray(self.entries[name].failed, dtype=np.int64) for name in names]
        sizes = [len(r) for r in runs] + [len(f) for f in failed]
        mapped = np.split(to_global(np.concatenate([np.zeros(0, np.int64), *runs, *failed])), np.cumsum(sizes)[:-1])
        entries, bounds = dict(self.entries), dict(self.bounds)
        for k, name in enumerate(names):
            new_runs, new_failed = mapped[k], mapped[len(names) + k]
            entries[name] = replace(self.entries[name], runs=tuple(new_runs.tolist()),
                                    failed=tuple(new_failed.tolist()))
            bounds[name] = (int(new_runs[0]), int(new_runs[-1]) - 1)
        return PartIndex(entries, self.adopted, bounds)

    @classmethod
    def scan(cls, directory: Path, writer: ManifestWriter | None = None) -> PartIndex:
        """List the part files, take their entries from the manifest, read the parts it does not
        describe (or describes in two different ways) and append their entries with `writer`."""
        known = read_manifest(directory / MANIFEST_DIR)
        entries: dict[str, PartEntry] = {}
        unknown = []
        for name in part_names(directory):
            lines = known.get(name, ())
            if lines and all(entry == lines[0] for entry in lines[1:]):
                entries[name] = lines[0]
            else:
                unknown.append(name)
        adopted = [read_part_entry(directory / name) for name in sorted(unknown)]
        if adopted:
            log.info("indexed %d part files of %s that its manifest did not describe", len(adopted), directory)
            if writer is not None:
                writer.append(adopted)
        entries.update((entry.part, entry) for entry in adopted)
        return cls(entries, len(adopted))

    def parts(self) -> list[tuple[int, int, str]]:
        """(first index, last index, name) of every part, by first index."""
        found = []
        for name in self.entries:
            if name in self.bounds:
                found.append((*self.bounds[name], name))
                continue
            match = PART_NAME.fullmatch(name)
            found.append((int(match[1]), int(match[2]), name))  # type: ignore[index]
        return sorted(found)

    def done_mask(self, total: int) -> np.ndarray:
        """(total,) bool: which indices 0..total-1 have a row in some part."""
        mask = np.zeros(total, dtype=bool)  # set run by run: no array of N integers beside it
        for entry in self.entries.values():
            runs = entry.runs
            for k in range(0, len(runs), 2):
                mask[max(runs[k], 0):max(runs[k + 1], 0)] = True
        return mask

    def done_at(self, positions: np.ndarray) -> np.ndarray:
        """(len(positions),) bool: which of these indices (increasing) have a row in some part; no
        array of all N indices (a --shard task asks about its share only)."""
        runs = np.fromiter((r for entry in self.entries.values() for r in entry.runs), dtype=np.int64)
        lo = np.searchsorted(positions, runs[0::2])  # a run covers positions lo..hi-1
        hi = np.searchsorted(positions, runs[1::2])
        done = np.zeros(len(positions), dtype=bool)  # one byte per position, set run by run
        for start, stop in zip(lo.tolist(), hi.tolist(), strict=True):
            done[start:stop] = True
        return done

    def failed_indices(self) -> np.ndarray:
        """Indices of the rows whose status is "failed", over all parts."""
        return np.fromiter((i for entry in self.entries.values() for i in entry.failed), dtype=np.int64)

    def records(self) -> dict[str, str]:
        """Each distinct run-record digest -> the first part (in index order) that has it."""
        first: dict[str, str] = {}
        for _, _, name in self.parts():
            first.setdefault(self.entries[name].record, name)
        return first
