"""The README's and the docs pages' offline snippets, run as they are written there: the text is taken
from the Markdown files, so a snippet that stops working fails here. A block is marked in the page by
`<!-- snippet: NAME -->` right before its fence; one-line commands are found by how they start."""

from __future__ import annotations

import ast
import json
import os
import re
import shlex
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from pycocotools import mask as mask_utils

from tagclip_cli.writers import segment_schema, tag_row, tags_schema, write_masks_parquet, write_parquet_atomic

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = ROOT / "docs"
CLASSES = ["circle", "square", "triangle"]


def snippet(page: Path, marker: str, lang: str = "python") -> str:
    """The fenced code block right after `<!-- snippet: marker -->` in page (indented blocks too)."""
    found = re.search(rf"<!-- snippet: {re.escape(marker)} -->\s*```{lang}\n(.*?)^\s*```", page.read_text(),
                      re.S | re.M)
    assert found, f"{page.name} has no {lang} snippet {marker!r}"
    return textwrap.dedent(found.group(1)).strip("\n")


def command_line(page: Path, start: str) -> str:
    """The page's one-line command that starts with `start` (inside a ```bash block)."""
    for line in page.read_text().splitlines():
        if line.startswith(start):
            return line
    raise AssertionError(f"{page.name} has no line starting with {start!r}")


def python_c(page: Path, start: str) -> str:
    """The code of a `python -c "..."` one-liner of the page."""
    return re.match(r'python -c "(.*)"$', command_line(page, f'python -c "{start}')).group(1)


def run_python(code: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HOME": str(cwd / "hf"), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


class Item:
    def __init__(self, index: int, image_id: str) -> None:
        self.index, self.image_id, self.path, self.coco_id = index, image_id, f"/data/{image_id}", None


def write_tags(path: Path) -> None:
    meta = {"tool": "tagclip-cli", "classes": CLASSES}
    rows = [
        tag_row(Item(0, "broken.jpg"), None, None, "not an image"),
        tag_row(Item(1, "a.jpg"), 32, 24, None, ["square", "circle"], [0.5, 0.7, 0.1]),
        tag_row(Item(2, "b.jpg"), 32, 24, None, ["triangle"], [0.1, 0.2, 0.9]),
    ]
    schema = tags_schema(meta)
    write_parquet_atomic([pa.Table.from_pylist(rows, schema=schema)], path, schema)


def a_mask() -> tuple[np.ndarray, dict]:
    mask = np.zeros((24, 32), np.uint8)
    mask[2:10, 5:20] = 1
    rle = mask_utils.encode(np.asfortranarray(mask))
    return mask, {"category_id": 1, "counts": rle["counts"].decode(), "area": int(mask.sum()),
                  "bbox": [5.0, 2.0, 15.0, 8.0], "score": 0.5}


def test_hugging_face_datasets_snippet_loads_the_tags_parquet(tmp_path):
    write_tags(tmp_path / "labels.parquet")
    result = run_python(snippet(DOCS / "outputs.md", "hf-datasets"), tmp_path)
    assert result.returncode == 0, result.stderr
    # the failed row is filtered out; a.jpg's tags as class indices, in the file's tag order
    assert result.stdout.strip().splitlines()[-1] == "2 a.jpg [1, 0] True"


def test_tags_parquet_one_liner_prints_classes_and_tags(tmp_path):
    write_tags(tmp_path / "labels.parquet")
    result = run_python(python_c(DOCS / "outputs.md", "import json, pyarrow.parquet as pq"), tmp_path)
    assert result.returncode == 0, result.stderr
    classes, rows = result.stdout.strip().splitlines()
    assert classes == str(CLASSES)
    assert "{'image_id': 'a.jpg', 'tags': ['square', 'circle']}" in rows


def test_masks_json_one_liner_decodes_a_mask(tmp_path):
    mask, entry = a_mask()
    coco = {"images": [{"id": 0, "file_name": "a.jpg", "width": 32, "height": 24}],
            "categories": [{"id": k + 1, "name": n} for k, n in enumerate(CLASSES)],
            "annotations": [{**entry, "id": 1, "image_id": 0, "iscrowd": 0,
                             "segmentation": {"size": [24, 32], "counts": entry["counts"]}}]}
    (tmp_path / "masks.json").write_text(json.dumps(coco))
    result = run_python(python_c(DOCS / "outputs.md", "from pycocotools.coco import COCO"), tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == "circle (24, 32) 0.5"


def test_masks_parquet_one_liner_decodes_a_mask(tmp_path):
    mask, entry = a_mask()
    row = {**tag_row(Item(0, "a.jpg"), 32, 24, None, ["circle"], [0.9, 0.1, 0.0]), "coco_id": None,
           "masks": [entry]}
    schema = segment_schema({"classes": CLASSES})
    write_masks_parquet([pa.Table.from_pylist([row], schema=schema)], tmp_path / "masks.parquet", schema)
    result = run_python(python_c(DOCS / "outputs.md", "import pyarrow.parquet as pq; from pycocotools"), tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["a.jpg", str(int(mask.sum())), str(int(mask.sum()))]


def test_contributor_commands_are_the_ones_ci_runs():
    """.ci/run runs `make setup` then `make test`; the README's Contributing block shows exactly those."""
    section = README.read_text().split("## Contributing", 1)[1]
    block = re.search(r"```bash\n(.*?)```", section, re.S).group(1).split("\n")
    ci = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()]
    assert [line for line in block if line] == ["make setup", "make test"]
    assert ci.index("make setup") < ci.index("make test")


def tagclip(line: str, cwd: Path) -> subprocess.CompletedProcess:
    """A documented `tagclip ...` line, run with this interpreter's package."""
    words = shlex.split(line)
    assert words[0] == "tagclip", line
    env = {**os.environ, "TAGCLIP_CACHE_DIR": str(cwd / "cache"), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "tagclip_cli", *words[1:]], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=600)


@pytest.mark.slow
def test_first_run_then_calibrate_and_retag_as_documented(tmp_path):
    """README's "A first run, offline" (the same block as docs/getting-started.md), then the thresholds
    page's calibrate and retag, in a folder that holds the repository's examples/."""
    first_run = snippet(README, "first-run", "bash")
    assert snippet(DOCS / "getting-started.md", "first-run", "bash") == first_run
    (tmp_path / "examples").symlink_to(ROOT / "examples")
    outputs = {}
    for line in [*first_run.splitlines(), snippet(DOCS / "thresholds.md", "calibrate", "bash"),
                 snippet(DOCS / "thresholds.md", "retag", "bash")]:
        done = tagclip(line, tmp_path)
        assert done.returncode == 0, f"{line}\n{done.stderr}"
        outputs[line.split()[1] + (" masks" if "masks.json" in line.split()[-1] else "")] = done
    images = sorted(p.name for p in (ROOT / "examples" / "shapes" / "images").iterdir())
    labels = pq.read_table(tmp_path / "labels.parquet").to_pylist()
    assert [r["image_id"] for r in labels] == images and all(r["status"] == "ok" for r in labels)
    masks = json.loads((tmp_path / "masks.json").read_text())
    assert len(masks["images"]) == len(images) and masks["annotations"]
    assert (tmp_path / "gallery" / "index.html").is_file()
    assert len(list((tmp_path / "gallery" / "overlays").glob("*.png"))) == len(images)
    assert "mAP" in outputs["evaluate"].stdout and "mIoU" in outputs["evaluate masks"].stdout
    assert (tmp_path / "thresholds.tsv").read_text().strip()
    relabelled = pq.read_table(tmp_path / "relabelled.parquet").to_pylist()
    assert [r["scores"] for r in relabelled] == [r["scores"] for r in labels]  # retag keeps every score


@pytest.mark.slow
def test_python_api_snippet_runs_as_written(tmp_path):
    """README's "From Python" block: tag and segment two scenes, then a whole annotate job."""
    (tmp_path / "examples").symlink_to(ROOT / "examples")
    env = {**os.environ, "TAGCLIP_CACHE_DIR": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", snippet(README, "python-api")], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr
    printed = done.stdout.strip().splitlines()[-2:]
    assert [line.split(" ", 1)[0] for line in printed] == [f"examples/shapes/images/00000{i}.png" for i in (0, 1)]
    labels = pq.read_table(tmp_path / "labels.parquet").to_pylist()
    assert len(labels) == len(list((ROOT / "examples" / "shapes" / "images").iterdir()))
    assert sorted(ast.literal_eval(printed[0].split(" ", 1)[1])) == sorted(labels[0]["tags"])  # the job's tags
