"""The README's snippets for reading our outputs elsewhere, run as they are written there: the text
is taken from README.md, so a snippet that stops working fails here."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
from pycocotools import mask as mask_utils

from tagclip_cli.writers import segment_schema, tag_row, tags_schema, write_masks_parquet, write_parquet_atomic

README = Path(__file__).resolve().parents[1] / "README.md"
CLASSES = ["circle", "square", "triangle"]


def snippet(marker: str) -> str:
    """The fenced code block right after `<!-- snippet: marker -->` in README.md."""
    found = re.search(rf"<!-- snippet: {re.escape(marker)} -->\s*```python\n(.*?)```", README.read_text(), re.S)
    assert found, f"README.md has no snippet {marker!r}"
    return found.group(1)


def command_line(start: str) -> str:
    """The README's one-line command that starts with `start` (inside a ```bash block)."""
    for line in README.read_text().splitlines():
        if line.startswith(start):
            return line
    raise AssertionError(f"README.md has no line starting with {start!r}")


def run_python(code: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HOME": str(cwd / "hf"), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


class Item:
    def __init__(self, index: int, image_id: str) -> None:
        self.index, self.image_id, self.path, self.coco_id = index, image_id, f"/data/{image_id}", None


def test_hugging_face_datasets_snippet_loads_the_tags_parquet(tmp_path):
    meta = {"tool": "tagclip-cli", "classes": CLASSES}
    rows = [
        tag_row(Item(0, "broken.jpg"), None, None, "not an image"),
        tag_row(Item(1, "a.jpg"), 32, 24, None, ["square", "circle"], [0.5, 0.7, 0.1]),
        tag_row(Item(2, "b.jpg"), 32, 24, None, ["triangle"], [0.1, 0.2, 0.9]),
    ]
    schema = tags_schema(meta)
    write_parquet_atomic([pa.Table.from_pylist(rows, schema=schema)], tmp_path / "labels.parquet", schema)
    result = run_python(snippet("hf-datasets"), tmp_path)
    assert result.returncode == 0, result.stderr
    # the failed row is filtered out; a.jpg's tags as class indices, in the file's tag order
    assert result.stdout.strip().splitlines()[-1] == "2 a.jpg [1, 0] True"


def test_masks_parquet_one_liner_decodes_a_mask(tmp_path):
    mask = np.zeros((24, 32), np.uint8)
    mask[2:10, 5:20] = 1
    rle = mask_utils.encode(np.asfortranarray(mask))
    entry = {"category_id": 1, "counts": rle["counts"].decode(), "area": int(mask.sum()),
             "bbox": [5.0, 2.0, 15.0, 8.0], "score": 0.5}
    row = {**tag_row(Item(0, "a.jpg"), 32, 24, None, ["circle"], [0.9, 0.1, 0.0]), "coco_id": None,
           "masks": [entry]}
    schema = segment_schema({"classes": CLASSES})
    write_masks_parquet([pa.Table.from_pylist([row], schema=schema)], tmp_path / "masks.parquet", schema)
    line = command_line(".venv/bin/python -c \"import pyarrow.parquet as pq; from pycocotools")
    code = re.match(r'\.venv/bin/python -c "(.*)"$', line).group(1)
    result = run_python(code, tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["a.jpg", str(int(mask.sum())), str(int(mask.sum()))]
