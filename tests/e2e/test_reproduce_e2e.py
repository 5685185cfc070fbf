"""End to end: `tagclip reproduce` on tiny synthetic datasets laid out like VOCdevkit, COCO and
COCO-Stuff (tests/paper_datasets.py) with the tiny random model, resumed; and `segment --save-cams`
followed by `evaluate --cams` (the background sweep), in subprocesses."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tagclip_cli.cams import crf_available

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from paper_datasets import VOC12_IMAGES, write_paper_datasets  # noqa: E402

pytestmark = pytest.mark.slow

TAGCLIP = [sys.executable, "-m", "tagclip_cli"]
needs_crf = pytest.mark.skipif(not crf_available(), reason="pydensecrf2 not installed")


def run(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "COLUMNS": "160"}
    return subprocess.run([*TAGCLIP, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


def model_args(checkpoint: Path, cache_dir: Path) -> list[str]:
    return ["--checkpoint", str(checkpoint), "--device", "cpu", "--workers", "0", "--cache-dir", str(cache_dir)]


@pytest.fixture(scope="module")
def reproduced(tmp_path_factory, tiny_checkpoint: Path, cache_dir: Path):
    root = tmp_path_factory.mktemp("paper")
    roots = write_paper_datasets(root / "data")
    out = root / "repro"
    args = ["reproduce", "--out", str(out), *model_args(tiny_checkpoint, cache_dir), "-q"]
    for name, path in roots.items():
        args += [f"--{name}", str(path)]
    first = run(*args, cwd=root)
    assert first.returncode == 0, first.stderr
    return roots, out, args, first


def results(out: Path) -> dict[str, dict]:
    return {r["row"]: r for r in json.loads((out / "results.json").read_text())["rows"]}


@needs_crf
def test_reproduce_runs_all_eight_rows_and_prints_one_table(reproduced):
    from tagclip_cli import evaluate as ev

    roots, out, _, first = reproduced
    rows = results(out)
    assert list(rows) == ["voc2007-map", "coco2014-map", "voc2012-miou", "voc2012-miou-crf", "coco-object-miou",
                          "coco-object-miou-crf", "coco-stuff-27-miou", "coco-stuff-27-miou-crf"]
    for row in rows.values():
        assert row["status"] == "done" and row["images"] == 3, row
        assert 0.0 <= row["ours"] <= 100.0
    published = {name: (r["paper"], r["reference_repo"]) for name, r in rows.items()}
    assert published["voc2007-map"] == (92.8, 92.8) and published["coco2014-map"] == (68.8, 68.7)
    assert published["coco-stuff-27-miou"] == (30.1, 30.3) and published["coco-stuff-27-miou-crf"] == (31.0, 31.1)
    for title in ("VOC2007 test, mAP", "COCO-Stuff-27 (val2017), CLS-SEG + CRF mIoU"):
        assert title in first.stdout
    # each row's outputs are kept; the segmentation rows saved one cam file per image
    assert (out / "voc2007-map" / "tags.parquet").is_file() and (out / "coco2014-map" / "tags.parquet").is_file()
    for name in ("voc2012-miou", "coco-object-miou", "coco-stuff-27-miou"):
        assert len(list((out / name / "cams").glob("*.npz"))) == 3
    # the numbers are evaluate's on those outputs
    masks_json = out / "voc2012-miou" / "masks.json"
    report = ev.evaluate(ev.EvaluateConfig(gt="voc2012", root=roots["voc2012"], pred=masks_json))
    assert rows["voc2012-miou"]["ours"] == pytest.approx(100 * report["metrics"]["mIoU"], abs=1e-9)
    # COCO-Stuff: the 171-class vocabulary, no background label (every pixel a tag)
    masks = ev.CocoMaskPredictions(out / "coco-stuff-27-miou" / "masks.json")
    assert len(masks.classes) == 171
    for _, handle in masks.entries:
        assert masks.load(handle, 64, 80).min() >= 1


@needs_crf
def test_reproduce_rerun_skips_finished_rows_and_redoes_a_missing_one(reproduced, tmp_path: Path):
    _, out, args, _ = reproduced
    before = results(out)
    again = run(*args, cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    assert {r["status"] for r in results(out).values()} == {"skipped"}
    (out / "voc2012-miou-crf" / "report.json").unlink()
    third = run(*args, "--rows", "voc2012-miou,voc2012-miou-crf", cwd=tmp_path)
    assert third.returncode == 0, third.stderr
    rows = results(out)
    assert list(rows) == ["voc2012-miou", "voc2012-miou-crf"]
    assert rows["voc2012-miou"]["status"] == "skipped" and rows["voc2012-miou-crf"]["status"] == "done"
    assert rows["voc2012-miou-crf"]["ours"] == before["voc2012-miou-crf"]["ours"]


def test_sweep_over_saved_cams_reproduces_the_segment_run(reproduced, tmp_path: Path):
    roots, out, _, _ = reproduced
    cams = out / "voc2012-miou" / "cams"
    report = tmp_path / "sweep.json"
    result = run("evaluate", "--gt", "voc2012", "--root", str(roots["voc2012"]), "--cams", str(cams),
                 "--bg-threshold", "0.3:0.7:0.05", "--report", str(report), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    sweep = json.loads(report.read_text())
    assert [s["bg_threshold"] for s in sweep["sweep"]] == [0.3, 0.35, 0.4, 0.45, 0.5, 0.55, 0.6, 0.65, 0.7]
    segment_miou = json.loads((out / "voc2012-miou" / "report.json").read_text())["metrics"]["mIoU"]
    at_half = next(s for s in sweep["sweep"] if s["bg_threshold"] == 0.5)
    assert at_half["mIoU"] == segment_miou  # exactly: the same float16 cams, the same rule
    assert sweep["metrics"]["mIoU"] == max(s["mIoU"] for s in sweep["sweep"])
    assert "background sweep" in result.stdout and "constant 0.35" in result.stdout


@needs_crf
def test_crf_over_saved_grid_cams_equals_segment_crf(reproduced, tmp_path: Path, tiny_checkpoint, cache_dir):
    roots, _, _, _ = reproduced
    images = roots["voc2012"] / "JPEGImages"
    masks, cams = tmp_path / "crf.json", tmp_path / "cams"
    seg = run("segment", str(images), "--vocab", "voc", "--out", str(masks), "--crf", "--reference-compat",
              "--save-cams", str(cams), "--cams-grid", *model_args(tiny_checkpoint, cache_dir), "-q", cwd=tmp_path)
    assert seg.returncode == 0, seg.stderr
    saved = np.load(cams / f"{next(iter(VOC12_IMAGES))}.npz")
    assert saved["cams"].dtype == np.float16 and saved["cams"].shape[1:] == (4, 5)  # the 64x80 image's grid
    reports = {}
    for name, extra in (("masks", ["--masks", str(masks)]), ("cams", ["--cams", str(cams), "--crf"])):
        reports[name] = tmp_path / f"{name}.json"
        result = run("evaluate", "--gt", "voc2012", "--root", str(roots["voc2012"]), *extra, "--report",
                     str(reports[name]), cwd=tmp_path)
        assert result.returncode == 0, result.stderr
    miou = {name: json.loads(path.read_text())["metrics"]["mIoU"] for name, path in reports.items()}
    assert miou["cams"] == miou["masks"]


def test_cams_bad_inputs_are_one_line_usage_errors(reproduced, tmp_path: Path):
    roots, out, _, _ = reproduced
    gt = ["evaluate", "--gt", "voc2012", "--root", str(roots["voc2012"])]
    cases = [
        ([*gt, "--cams", str(tmp_path / "nowhere")], "not a directory of saved cams"),
        ([*gt, "--cams", str(tmp_path)], "no cams.json"),
        ([*gt, "--cams", str(out / "voc2012-miou" / "cams"), "--bg-threshold", "0.7:0.3:0.05"], "start <= stop"),
        ([*gt, "--cams", str(out / "voc2012-miou" / "cams"), "--bg-threshold", "0.3:1.2:0.1"], "outside [0, 1]"),
        ([*gt, "--masks", str(out / "voc2012-miou" / "masks.json"), "--bg-threshold", "0.5"], "apply to --cams"),
        ([*gt, "--masks", str(out / "voc2012-miou" / "masks.json"), "--cams", str(out / "voc2012-miou" / "cams")],
         "give one of --tags"),
        (["evaluate", "--gt", "coco-stuff-27", "--root", str(roots["cocostuff"]), "--cams",
          str(out / "coco-stuff-27-miou" / "cams"), "--bg-threshold", "0.5"], "no background label"),
    ]
    # the first in a subprocess (the real exit code and stderr), the rest in this process (faster)
    result = run(*cases[0][0], cwd=tmp_path)
    assert result.returncode == 2 and result.stdout == "", result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and cases[0][1] in lines[0], result.stderr
    from typer.testing import CliRunner

    from tagclip_cli.cli import app

    for args, message in cases[1:]:
        result = CliRunner().invoke(app, args, env={"COLUMNS": "400"})
        assert result.exit_code == 2, (args, result.output)
        lines = result.output.strip().splitlines()
        assert len(lines) == 1 and message in lines[0], (args, result.output)


def test_piaa_rows_fit_as_the_authors_when_the_split_is_there(tmp_path: Path, tiny_checkpoint: Path, cache_dir: Path):
    """The opt-in PIAA rows: VOC2007 fitted on its trainval list, COCO2014 (no train2014/ here) on
    the evaluated images, each with its published number and PIAA's constants of the dataset."""
    import pyarrow.parquet as pq

    roots = write_paper_datasets(tmp_path / "data")
    main = roots["voc2007"] / "VOC2007" / "ImageSets" / "Main"
    trainval = sorted(p.stem for p in (roots["voc2007"] / "VOC2007" / "JPEGImages").glob("*.jpg"))[:2]
    (main / "trainval.txt").write_text("".join(f"{n}\n" for n in trainval))
    out = tmp_path / "repro"
    proc = run("reproduce", "--out", str(out), *model_args(tiny_checkpoint, cache_dir), "-q", "--voc2007",
               str(roots["voc2007"]), "--coco2014", str(roots["coco2014"]), "--rows",
               "voc2007-map-piaa,coco2014-map-piaa", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    rows = results(out)
    assert list(rows) == ["voc2007-map-piaa", "coco2014-map-piaa"]
    assert (rows["voc2007-map-piaa"]["paper"], rows["coco2014-map-piaa"]["paper"]) == (91.7, 73.0)
    assert rows["voc2007-map-piaa"]["note"] == "fitted on trainval.txt"
    assert rows["coco2014-map-piaa"]["note"].startswith("fitted on the evaluated images")
    for name, setting, temperature, fitted in (("voc2007-map-piaa", "voc", 100.0, 2),
                                               ("coco2014-map-piaa", "coco", 0.01, 3)):
        assert rows[name]["status"] == "done" and rows[name]["images"] == 3 and 0 <= rows[name]["ours"] <= 100
        tagger = json.loads(pq.read_schema(out / name / "tags.parquet").metadata[b"tagclip"])["tagger"]
        assert tagger["method"] == "piaa" and tagger["setting"] == setting and tagger["reference_compat"]
        assert tagger["refine_temperature"] == temperature and tagger["fit"]["inputs"]["images"] == fitted
    assert "SCLIP + PIAA" in proc.stdout
