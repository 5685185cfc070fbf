"""Where the rows of complete windows go: JSON Lines on a text stream (`--out -`), or part files."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import TextIO

import numpy as np
import pyarrow as pa

from tagclip_cli.fileio import json_scalar
from tagclip_cli.jobs.parts import PartStore

# ---- JSON Lines -----------------------------------------------------------------------------------

def _score(value: float | None) -> float | None:
    """A float32 score as the shortest decimal that reads back to the same float32 (NaN -> null)."""
    value = json_scalar(value)
    return None if value is None else float(str(np.float32(value)))


def json_row(row: dict, classes: Sequence[str]) -> dict:
    """A result row for JSON Lines: the Parquet columns, with `scores` as {class: score}."""
    out = dict(row)
    scores = row.get("scores")
    if scores is not None:
        out["scores"] = {name: _score(s) for name, s in zip(classes, scores, strict=True)}
    return out


class OutputClosed(Exception):
    """The reader of `--out -` went away (e.g. `| head`): stop quietly."""


class JsonLinesSink:
    """Writes rows as JSON Lines to a text stream, one object per image, flushed per window."""

    def __init__(self, stream: TextIO, classes: Sequence[str]) -> None:
        self.stream = stream
        self.classes = list(classes)

    def write(self, rows: Sequence[dict]) -> None:
        try:
            for row in rows:
                self.stream.write(json.dumps(json_row(row, self.classes), ensure_ascii=False, allow_nan=False))
                self.stream.write("\n")
            self.stream.flush()
        except BrokenPipeError:
            raise OutputClosed() from None

    def flush(self) -> None:
        """Nothing held back: every window is written as it completes."""

    def discard(self) -> None:
        """Nothing held back to drop."""


class PartSink:
    """Collects the rows of complete windows and writes them as part files of about part_size rows.

    Only complete windows come here: a partial window is recomputed whole on resume, so that its
    forward batches are the same as in an uninterrupted run."""

    def __init__(self, store: PartStore, schema: pa.Schema, part_size: int) -> None:
        self.store = store
        self.schema = schema
        self.part_size = part_size
        self.buffer: list[dict] = []

    def write(self, rows: Sequence[dict]) -> None:
        self.buffer.extend(rows)
        if len(self.buffer) >= self.part_size:
            self.flush()

    def flush(self) -> None:
        if self.buffer:
            self.store.write_part(pa.Table.from_pylist(self.buffer, schema=self.schema))
        self.buffer.clear()

    def discard(self) -> None:
        """Drop the held rows (the disk refused them: they are redone on resume)."""
        self.buffer.clear()
