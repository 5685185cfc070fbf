"""End to end: `tagclip annotate` (and `segment` once it exists) on fixture datasets, then
`tagclip evaluate` on their outputs, each in a subprocess; the report is checked against an
independent computation (scikit-learn AP on the Parquet scores and the dataset's own labels)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from sklearn.metrics import average_precision_score

pytestmark = pytest.mark.slow

TAGCLIP = [sys.executable, "-m", "tagclip_cli"]


def run(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "COLUMNS": "120"}
    return subprocess.run([*TAGCLIP, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


def annotate(images: Path, vocab: str, out: Path, checkpoint: Path, cache_dir: Path, code: int = 0) -> None:
    """Run annotate; exit code 1 means some images failed (they are rows with status "failed")."""
    result = run(
        "annotate", str(images), "--vocab", vocab, "--out", str(out), "--checkpoint", str(checkpoint),
        "--device", "cpu", "--workers", "0", "--cache-dir", str(cache_dir), "-q",
        cwd=out.parent,
    )  # fmt: skip
    assert result.returncode == code, result.stderr
    assert out.is_file()


def expected_map(parquet: Path, truth: dict[str, set[str]]) -> tuple[float, int]:
    """mAP from the Parquet scores and the true label sets, with scikit-learn; classes without
    a positive are skipped."""
    table = pq.read_table(parquet)
    classes = json.loads(table.schema.metadata[b"tagclip"])["classes"]
    rows = [r for r in table.to_pylist() if r["status"] == "ok"]
    keys = [Path(r["image_id"]).stem for r in rows]
    scores = np.array([r["scores"] for r in rows], dtype=np.float32)
    labels = np.array([[c in truth[k] for c in classes] for k in keys])
    aps = [average_precision_score(labels[:, c], scores[:, c]) for c in range(len(classes)) if labels[:, c].any()]
    return float(np.mean(aps)), len(aps)


def test_annotate_then_evaluate_synthetic_folder(tmp_path: Path, tiny_checkpoint: Path, cache_dir: Path):
    from tagclip_cli.synthetic import read_folder_dataset, write_folder_dataset

    dataset = write_folder_dataset(tmp_path / "shapes_ds", count=6, seed=0)
    tags = tmp_path / "tags.parquet"
    annotate(dataset / "images", "shapes", tags, tiny_checkpoint, cache_dir)
    report_path = tmp_path / "report.json"
    result = run(
        "evaluate", "--gt", "folder", "--root", str(dataset), "--tags", str(tags),
        "--report", str(report_path),
        cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "mAP" in result.stdout and "Traceback" not in result.stderr
    report = json.loads(report_path.read_text())
    assert report["task"] == "classification"
    assert report["images"]["evaluated"] == report["images"]["ground_truth"] == 6
    # Ground truth from the label maps agrees with the generator's own record of visible objects.
    _, records = read_folder_dataset(dataset)
    truth = {k: {t for t, a in zip(r["tags"], r["areas"], strict=True) if a > 0} for k, r in records.items()}
    positives = {row["class"]: row["positives"] for row in report["metrics"]["per_class"]}
    for name, count in positives.items():
        assert count == sum(name in t for t in truth.values()), name
    expected, n_classes = expected_map(tags, truth)
    assert report["metrics"]["mAP"] == pytest.approx(expected, abs=1e-6)
    assert report["metrics"]["classes_in_mAP"] == n_classes


def test_annotate_then_evaluate_voc2007(tmp_path: Path, tiny_checkpoint: Path, cache_dir: Path, photo_dir: Path):
    voc = tmp_path / "VOCdevkit" / "VOC2007"
    shutil.copytree(photo_dir, voc / "JPEGImages")
    # An unreadable image becomes a failed row: excluded from the metrics, counted in the report.
    (voc / "JPEGImages" / "broken.jpg").write_bytes(b"not a jpeg")
    truth = {
        "astronaut": {"person"},
        "chelsea": {"cat"},
        "coffee": {"diningtable", "bottle"},
        "rocket": {"aeroplane"},
        "broken": {"dog"},
    }
    (voc / "Annotations").mkdir()
    for name, classes in truth.items():
        objects = "".join(f"<object><name>{c}</name><difficult>0</difficult></object>" for c in sorted(classes))
        (voc / "Annotations" / f"{name}.xml").write_text(f"<annotation>{objects}</annotation>")
    (voc / "ImageSets" / "Main").mkdir(parents=True)
    (voc / "ImageSets" / "Main" / "test.txt").write_text("\n".join(truth) + "\n")
    tags = tmp_path / "tags.parquet"
    annotate(voc / "JPEGImages", "voc", tags, tiny_checkpoint, cache_dir, code=1)
    report_path = tmp_path / "report.json"
    result = run(
        "evaluate", "--gt", "voc2007", "--root", str(tmp_path / "VOCdevkit"), "--tags", str(tags),
        "--report", str(report_path),
        cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    report = json.loads(report_path.read_text())
    assert report["images"]["ground_truth"] == 5
    assert report["images"]["evaluated"] == 4 and report["images"]["failed"] == 1
    expected, n_classes = expected_map(tags, truth)
    assert report["metrics"]["mAP"] == pytest.approx(expected, abs=1e-6)
    assert report["metrics"]["classes_in_mAP"] == n_classes == 5
    assert report["metrics"]["classes_without_positives"][:2] == ["bicycle", "bird"]  # dog: only a failed row


def test_evaluate_bad_paths_are_one_line(tmp_path: Path):
    pred = tmp_path / "tags.parquet"
    result = run("evaluate", "--gt", "voc2007", "--root", "VOCdevkit", "--tags", pred.name, cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip() == "error: tags.parquet: no such file or directory"
    pred.write_bytes(b"PAR1 but not really")
    result = run("evaluate", "--gt", "voc2007", "--root", "VOCdevkit", "--tags", pred.name, cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip() == "error: VOCdevkit: no such file or directory"


def test_segment_then_evaluate_synthetic_folder(tmp_path: Path, tiny_checkpoint: Path, cache_dir: Path):
    """segment -> evaluate on both mask outputs (COCO JSON and label PNGs); mIoU checked against a
    confusion matrix computed here from the PNGs and the dataset's label maps."""
    from PIL import Image

    from tagclip_cli.synthetic import write_folder_dataset

    dataset = write_folder_dataset(tmp_path / "shapes_seg", count=4, seed=3)
    masks, pngs = tmp_path / "masks.json", tmp_path / "pngs"
    result = run(
        "segment", str(dataset / "images"), "--vocab", "shapes", "--out", str(masks), "--png-dir", str(pngs),
        "--checkpoint", str(tiny_checkpoint), "--device", "cpu", "--workers", "0", "--cache-dir", str(cache_dir),
        "-q", cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    classes = (dataset / "classes.txt").read_text().split()
    n = len(classes) + 1
    confusion = np.zeros((n, n), dtype=np.int64)
    for label_path in sorted((dataset / "labels").glob("*.png")):
        truth = np.asarray(Image.open(label_path)).astype(np.int64)
        pred = np.asarray(Image.open(pngs / label_path.name)).astype(np.int64)
        keep = truth != 255
        confusion += np.bincount(truth[keep] * n + pred[keep], minlength=n * n).reshape(n, n)
    inter = np.diag(confusion)
    union = confusion.sum(0) + confusion.sum(1) - inter
    present = confusion.sum(1) > 0
    expected = float(np.mean(inter[present] / union[present]))
    for pred in (masks, pngs):
        report_path = tmp_path / f"report-{pred.name}.json"
        args = ["evaluate", "--gt", "folder", "--root", str(dataset), "--masks", str(pred),
                "--report", str(report_path)]
        if pred == pngs:
            args += ["--vocab", "shapes"]
        result = run(*args, cwd=tmp_path)
        assert result.returncode == 0, result.stderr
        report = json.loads(report_path.read_text())
        assert report["task"] == "segmentation"
        assert report["metrics"]["mIoU"] == pytest.approx(expected, abs=1e-9), pred
