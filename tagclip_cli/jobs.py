"""Batch jobs: streaming results to atomic part files, resume, and the final merge.

Layout beside the output `OUT`: a work directory `OUT.parts/` holding `config.json` (what the run
was started with; a different configuration refuses to resume) and part files named by the global
indices they cover. Every part is written atomically, so whatever is visible is complete; a killed
run restarts by skipping the indices already in parts. The final output is the merge of all parts,
ordered by index, written atomically; the work directory is removed afterwards.
"""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from tagclip_cli.data import ImageItem
from tagclip_cli.errors import ConfigMismatchError, UsageError
from tagclip_cli.writers import atomic_path, write_json_atomic, write_parquet_atomic

log = logging.getLogger(__name__)


@dataclass
class Summary:
    total: int = 0
    done: int = 0
    skipped: int = 0
    failed: int = 0
    failures: list[tuple[str, str]] = field(default_factory=list)


class PartStore:
    """The work directory of one output: its configuration and its atomic part files."""

    def __init__(self, out: Path, config: dict, overwrite: bool = False) -> None:
        self.out = Path(out)
        self.dir = self.out.with_name(self.out.name + ".parts")
        self.config = config
        if not self.out.parent.exists():
            raise UsageError(f"{self.out.parent}: output directory does not exist")
        if overwrite:
            shutil.rmtree(self.dir, ignore_errors=True)
        elif self.out.exists() and not self.dir.exists():
            raise ConfigMismatchError(f"{self.out}: output exists; pass --overwrite to replace it")
        try:
            self.dir.mkdir(exist_ok=True)
        except OSError as exc:
            raise UsageError(f"{self.dir}: cannot create the work directory ({exc.strerror or exc})") from exc
        config_path = self.dir / "config.json"
        if config_path.exists():
            previous = json.loads(config_path.read_text())
            if previous != config:
                changed = sorted(k for k in set(previous) | set(config) if previous.get(k) != config.get(k))
                raise ConfigMismatchError(
                    f"{self.out}: an unfinished run with a different configuration is there "
                    f"(differs in: {', '.join(changed)}); rerun with the same options, or pass --overwrite"
                )
        else:
            write_json_atomic(config, config_path)

    def part_files(self, suffix: str = ".parquet") -> list[Path]:
        return sorted(self.dir.glob(f"part-*{suffix}"))

    def done_indices(self) -> set[int]:
        done: set[int] = set()
        for part in self.part_files():
            done.update(pq.read_table(part, columns=["index"]).column("index").to_pylist())
        return done

    def write_part(self, table: pa.Table) -> Path:
        indices = table.column("index")
        lo, hi = pc.min(indices).as_py(), pc.max(indices).as_py()
        path = self.dir / f"part-{lo:012d}-{hi:012d}.parquet"
        with atomic_path(path) as tmp:
            pq.write_table(table, tmp, compression="zstd")
        return path

    def merge(self, schema: pa.Schema) -> int:
        """Write the final output from all parts (sorted by index, one row per index)."""
        tables = [pq.read_table(p).cast(schema) for p in self.part_files()]
        merged = pa.concat_tables(tables) if tables else schema.empty_table()
        merged = merged.sort_by("index")
        indices = merged.column("index").to_numpy()
        if len(indices) > 1 and (indices[1:] == indices[:-1]).any():
            keep = [0] + [i for i in range(1, len(indices)) if indices[i] != indices[i - 1]]
            merged = merged.take(keep)
        rows = write_parquet_atomic([merged], self.out, schema)
        return rows

    def cleanup(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)


def run_batches(
    items: Sequence[ImageItem],
    store: PartStore,
    batches: Callable[[Sequence[ImageItem]], Iterable[list[dict]]],
    process: Callable[[list[dict]], list[dict]],
    schema: pa.Schema,
    part_size: int = 256,
    on_progress: Callable[[int], None] | None = None,
    fail_fast: bool = False,
) -> Summary:
    """Process the items not yet in the store, streaming rows to part files.

    batches(todo) yields lists of decoded records; process(records) returns one row per record.
    On any interruption the rows already computed are written before the exception propagates."""
    summary = Summary(total=len(items))
    done = store.done_indices()
    todo = [it for it in items if it.index not in done]
    summary.skipped = len(items) - len(todo)
    if on_progress and summary.skipped:
        on_progress(summary.skipped)
    buffer: list[dict] = []

    def flush() -> None:
        if buffer:
            store.write_part(pa.Table.from_pylist(buffer, schema=schema))
            buffer.clear()

    try:
        for records in batches(todo):
            rows = process(records)
            for row in rows:
                if row["status"] == "failed":
                    summary.failed += 1
                    summary.failures.append((row["image_id"], row["error"]))
                else:
                    summary.done += 1
            buffer.extend(rows)
            if on_progress:
                on_progress(len(rows))
            if len(buffer) >= part_size:
                flush()
            if fail_fast and summary.failed:
                break
    finally:
        flush()
    return summary
