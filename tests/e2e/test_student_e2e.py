"""`tagclip train-student` end to end, offline: the shapes demo pseudo-labels 200 generated scenes
(annotate + segment with `shapes-demo`), a YOLO11n-seg student is trained on them from its yaml for
2 epochs on CPU, and its masks on 40 held-out scenes are scored against their TRUE label maps with
`tagclip evaluate --gt folder`. Every Ultralytics run happens under a socket guard that fails and
records any attempt to resolve or reach a host (the test asserts there was none), and the import
of Ultralytics is blocked in a subprocess to test the install hint."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tagclip_cli.student import is_val
from tagclip_cli.synthetic import OBJECT_CLASSES, write_folder_dataset

SIZE = 96  # scenes and student image size (a multiple of YOLO's stride 32): small for CPU speed
TRAIN_SCENES, HELD_OUT_SCENES, SEED = 200, 40, 5

# sitecustomize.py that makes `import ultralytics` fail as it does where it is not installed.
BLOCK_ULTRALYTICS = '''
import sys

class _NoUltralytics:
    def find_spec(self, name, path=None, target=None):
        if name == "ultralytics" or name.startswith("ultralytics."):
            raise ModuleNotFoundError(f"No module named '{name}'", name=name)
        return None

sys.meta_path.insert(0, _NoUltralytics())
'''

# sitecustomize.py that refuses every name lookup and every IP connection, writing each attempt to
# $TAGCLIP_NET_LOG: a run that leaves no log never tried the network.
NO_NETWORK = '''
import os
import socket

_LOG = os.environ["TAGCLIP_NET_LOG"]
_LOCAL = {None, "localhost", "127.0.0.1", "::1", b"localhost"}


def _refuse(what):
    with open(_LOG, "a") as fh:
        fh.write(what + "\\n")
    raise OSError(f"network blocked by the test: {what}")


_getaddrinfo, _connect, _connect_ex = socket.getaddrinfo, socket.socket.connect, socket.socket.connect_ex


def getaddrinfo(host, *args, **kwargs):
    if host not in _LOCAL:
        _refuse(f"getaddrinfo {host!r}")
    return _getaddrinfo(host, *args, **kwargs)


def _check(sock, address):
    if sock.family in (socket.AF_INET, socket.AF_INET6) and address[0] not in _LOCAL:
        _refuse(f"connect {address!r}")


def connect(self, address):
    _check(self, address)
    return _connect(self, address)


def connect_ex(self, address):
    _check(self, address)
    return _connect_ex(self, address)


socket.getaddrinfo, socket.socket.connect, socket.socket.connect_ex = getaddrinfo, connect, connect_ex
'''


def _site(root: Path, source: str) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "sitecustomize.py").write_text(source)
    return root


def run_tagclip(*args: str, cache: Path, site: Path | None = None, env: dict | None = None,
                check: bool = True) -> subprocess.CompletedProcess:
    """`python -m tagclip_cli ARGS`, with `site` (a folder holding a sitecustomize.py) first on the path."""
    env = dict(os.environ, TAGCLIP_CACHE_DIR=str(cache), COLUMNS="200", YOLO_CONFIG_DIR=str(cache / "ultralytics"),
               **(env or {}))
    if site is not None:
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(site), env.get("PYTHONPATH")) if p)
    proc = subprocess.run([sys.executable, "-m", "tagclip_cli", *args], capture_output=True, text=True, env=env,
                          timeout=900)
    if check:
        assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def one_line_error(proc: subprocess.CompletedProcess, *needles: str) -> None:
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), proc.stderr[-3000:]
    for needle in needles:
        assert needle in lines[0], lines[0]


def test_without_ultralytics_says_how_to_install(tmp_path):
    site = _site(tmp_path / "site", BLOCK_ULTRALYTICS)
    proc = run_tagclip("train-student", "--masks", str(tmp_path / "masks.json"), "--out", str(tmp_path / "run"),
                       cache=tmp_path / "cache", site=site, check=False)
    one_line_error(proc, "pip install 'tagclip-cli[student]'")
    assert not (tmp_path / "run").exists()


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> dict:
    """Pseudo-labels of 200 scenes by the shapes demo (one pass: masks + tags), 40 held-out scenes
    with their true label maps, and a small second run whose tags are not those of the big one."""
    root = tmp_path_factory.mktemp("student")
    cache = root / "cache"
    scenes = write_folder_dataset(root / "scenes", TRAIN_SCENES, SEED, size=SIZE)
    held_out = write_folder_dataset(root / "held-out", HELD_OUT_SCENES, SEED, start=TRAIN_SCENES, size=SIZE)
    masks, tags = root / "masks.json", root / "labels.parquet"
    run_tagclip("segment", str(scenes / "images"), "--model", "shapes-demo", "--vocab", "shapes",
                "--out", str(masks), "--tags-out", str(tags), "--workers", "0", "-q", cache=cache)
    # another run: a few of the scenes tagged with another threshold, then segmented from those tags
    few = write_folder_dataset(root / "few", 6, SEED, size=SIZE)
    few_tags, few_masks = root / "few-labels.parquet", root / "few-masks.json"
    run_tagclip("annotate", str(few / "images"), "--model", "shapes-demo", "--vocab", "shapes",
                "--tag-threshold", "0.3", "--out", str(few_tags), "--workers", "0", "-q", cache=cache)
    run_tagclip("segment", str(few / "images"), "--model", "shapes-demo", "--vocab", "shapes",
                "--tags", str(few_tags), "--out", str(few_masks), "--workers", "0", "-q", cache=cache)
    return {"root": root, "cache": cache, "scenes": scenes, "held_out": held_out, "masks": masks, "tags": tags,
            "few": few, "few_tags": few_tags, "few_masks": few_masks}


@pytest.fixture(scope="module")
def trained(demo) -> dict:
    """train-student from yolo11n-seg.yaml, 2 epochs on CPU, under the network guard."""
    root = demo["root"]
    log = root / "network.log"
    site = _site(root / "no-network", NO_NETWORK)
    out = root / "run"
    proc = run_tagclip("train-student", "--masks", str(demo["masks"]), "--tags", str(demo["tags"]),
                       "--out", str(out), "--student", "yolo11n-seg.yaml", "--epochs", "2", "--imgsz", str(SIZE),
                       "--batch-size", "16", "--device", "cpu", "--workers", "0", "--val-fraction", "0.2",
                       "--seed", "0", cache=demo["cache"], site=site, env={"TAGCLIP_NET_LOG": str(log)})
    return {"out": out, "proc": proc, "log": log, "site": site}


@pytest.mark.slow
def test_train_student_writes_weights_split_and_validation(demo, trained):
    out = trained["out"]
    assert not trained["log"].exists(), trained["log"].read_text()  # no lookup, no connection
    weights = out / "student" / "weights" / "best.pt"
    assert weights.is_file() and weights.stat().st_size > 100_000
    # the split: every scene once, held out exactly where the seeded hash says
    train = [Path(p).name for p in (out / "train.txt").read_text().split()]
    val = [Path(p).name for p in (out / "val.txt").read_text().split()]
    assert sorted(train + val) == sorted(f"{i:06d}.png" for i in range(TRAIN_SCENES))
    assert val == [name for name in sorted(train + val) if is_val(name, 0, 0.2)]
    assert 20 <= len(val) <= 60
    for path in (out / "train.txt").read_text().split()[:3]:
        assert Path(path).is_file()  # a link to the scene, beside its YOLO label file
        assert Path(path.replace("/images/", "/labels/")).with_suffix(".txt").is_file()
    # Ultralytics' validation on the held-out images: a row per epoch, and the final metrics
    with open(out / "student" / "results.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 2
    assert any(k.strip() == "metrics/mAP50(M)" for k in rows[0])
    summary = json.loads((out / "student.json").read_text())
    assert summary["task"] == "segment" and summary["classes"] == list(OBJECT_CLASSES)
    assert summary["val_images"] == len(val) and summary["train_images"] == len(train)
    assert 0.0 <= summary["metrics"]["metrics/mAP50(M)"] <= 1.0
    assert "trained on" in trained["proc"].stderr


@pytest.mark.slow
def test_student_scored_on_held_out_true_masks(demo, trained, tmp_path):
    pred = tmp_path / "student-png"
    log = tmp_path / "network.log"
    run_tagclip("student-predict", str(trained["out"] / "student" / "weights" / "best.pt"),
                str(demo["held_out"] / "images"), "--out", str(pred), "--imgsz", str(SIZE), "--conf", "0.01",
                cache=demo["cache"], site=trained["site"], env={"TAGCLIP_NET_LOG": str(log)})
    assert not log.exists(), log.read_text()
    assert len(list(pred.glob("*.png"))) == HELD_OUT_SCENES
    report = tmp_path / "report.json"
    run_tagclip("evaluate", "--gt", "folder", "--root", str(demo["held_out"]), "--masks", str(pred),
                "--require-all", "--report", str(report), cache=demo["cache"])
    doc = json.loads(report.read_text())
    assert doc["task"] == "segmentation"
    assert doc["images"]["evaluated"] == HELD_OUT_SCENES
    assert 0.0 <= doc["metrics"]["mIoU"] <= 1.0  # the number the loop produces, whatever it is


@pytest.mark.slow
@pytest.mark.parametrize("case", ["tags-of-another-run", "masks-of-another-run", "unmapped-class",
                                  "empty-train", "empty-val", "missing-pt"])
def test_bad_input_one_line_exit_2_before_training(demo, tmp_path, case):
    masks, tags, extra = demo["masks"], demo["tags"], []
    few_ids = sorted(p.name for p in (demo["few"] / "images").iterdir())
    if case == "tags-of-another-run":  # tagged with another threshold: the 'tagclip' settings differ
        tags, needles = demo["few_tags"], ("different 'tagclip'", "different runs")
    elif case == "masks-of-another-run":  # segmented from the few scenes' tags file, not this one
        masks, needles = demo["few_masks"], ("another tags file", "different runs")
    elif case == "unmapped-class":  # a masks file whose category was renamed by hand
        doc = json.loads(masks.read_text())
        doc["categories"][3]["name"] = "starfish"
        masks = tmp_path / "renamed.json"
        masks.write_text(json.dumps(doc))
        needles = ("starfish", "cannot map")
    elif case == "empty-train":
        fraction = 0.999
        assert all(is_val(i, 0, fraction) for i in few_ids)  # the seeded hash holds out all six
        masks, tags, extra, needles = demo["few_masks"], demo["few_tags"], ["--val-fraction", str(fraction)], (
            "training split is empty",)
    elif case == "empty-val":
        fraction = 0.01
        assert not any(is_val(i, 0, fraction) for i in few_ids)
        masks, tags, extra, needles = demo["few_masks"], demo["few_tags"], ["--val-fraction", str(fraction)], (
            "validation split is empty",)
    else:
        extra, needles = ["--student", str(tmp_path / "yolo11n-seg.pt")], ("no such file", "never downloads")
    out = tmp_path / "run"
    proc = run_tagclip("train-student", "--masks", str(masks), "--tags", str(tags), "--out", str(out),
                       "--epochs", "1", "--imgsz", str(SIZE), "--device", "cpu", "--workers", "0", *extra,
                       cache=demo["cache"], check=False)
    one_line_error(proc, *needles)
    assert "Traceback" not in proc.stderr
    assert not out.exists()  # nothing exported, nothing trained
