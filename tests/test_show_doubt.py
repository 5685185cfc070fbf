"""`tagclip show --sort doubt`: images ordered by how close their tag decisions are to the
thresholds (docs/algorithm.md §6), failed first on request, one class's doubt with --class."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image
from test_show import embedded_data, gradient, write_tags
from typer.testing import CliRunner

from tagclip_cli.cli import app
from tagclip_cli.errors import UsageError
from tagclip_cli.show import ShowConfig, build_gallery, doubt_margins

CLASSES = ["cat", "dog", "car"]


@pytest.fixture()
def run(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    for i, name in enumerate(("a.png", "b.png", "c.png")):
        Image.fromarray(gradient(40, 30, i)).save(images / name)
    # normalised: a [1, 0, .625] -> closest car .125; b [.5, 1, 0] -> cat 0; c [0, 1, 0] -> cat .5
    tags = write_tags(tmp_path / "labels.parquet", CLASSES, [
        {"image_id": "a.png", "width": 40, "height": 30, "tags": ["cat", "car"], "scores": [0.9, 0.1, 0.6]},
        {"image_id": "b.png", "width": 40, "height": 30, "tags": ["dog"], "scores": [0.2, 0.3, 0.1]},
        {"image_id": "broken.png", "error": "not an image"},
        {"image_id": "c.png", "width": 40, "height": 30, "tags": ["dog"], "scores": [0.0, 0.8, 0.0]},
    ])
    return images, tags


def _order(images, tags, out, **kw):
    build_gallery(ShowConfig(images=images, tags=tags, out=out, **kw))
    return [(c["id"], c.get("doubt")) for c in embedded_data(out / "index.html")["cards"]]


def test_margins_by_hand():
    margins = doubt_margins(np.array([[0.9, 0.1, 0.6]], np.float32), np.array([0.5, 0.5, 0.6], np.float32))
    assert margins[0].tolist() == pytest.approx([0.5, 0.5, 0.025], abs=1e-6)  # float32


def test_sort_by_doubt_failed_first_and_one_class(run, tmp_path):
    images, tags = run
    plain = _order(images, tags, tmp_path / "g0")
    assert plain == [("a.png", None), ("b.png", None), ("broken.png", None), ("c.png", None)]
    assert _order(images, tags, tmp_path / "g1", sort="doubt") == [
        ("b.png", [0, 0.0, 0.5]), ("a.png", [2, 0.125, 0.5]), ("c.png", [0, 0.5, 0.5]), ("broken.png", None)]
    assert [i for i, _ in _order(images, tags, tmp_path / "g2", sort="doubt", failed_first=True)] == [
        "broken.png", "b.png", "a.png", "c.png"]
    # car's doubt only: a (0.125), then b and c (0.5 each, file order)
    assert _order(images, tags, tmp_path / "g3", doubt_class="car") == [
        ("a.png", [2, 0.125, 0.5]), ("b.png", [2, 0.5, 0.5]), ("c.png", [2, 0.5, 0.5]), ("broken.png", None)]
    # only the doubtful ones, and the most doubtful N with --limit
    assert [i for i, _ in _order(images, tags, tmp_path / "g4", sort="doubt", max_margin=0.2)] == ["b.png", "a.png"]
    assert [i for i, _ in _order(images, tags, tmp_path / "g5", sort="doubt", limit=1)] == ["b.png"]


def test_doubt_against_a_thresholds_file(run, tmp_path):
    images, tags = run
    tsv = tmp_path / "t.tsv"
    tsv.write_text("car\t0.6\ncat\t0.9\n")
    # a: car |.625 - .6| = .025; b: cat |.5 - .9| = .4 (dog .5, car .6); c: dog |1 - .5| = .5
    order = _order(images, tags, tmp_path / "g", sort="doubt", thresholds=tsv)
    assert order == [("a.png", [2, 0.025, 0.6]), ("b.png", [0, 0.4, 0.9]), ("c.png", [1, 0.5, 0.5]),
                     ("broken.png", None)]
    overlay = Image.open(tmp_path / "g" / "overlays" / "0000000_a.png")
    assert overlay.height > 30  # the legend with the doubt line is drawn below the image


def test_bad_doubt_options_are_one_line(run, tmp_path):
    images, tags = run
    with pytest.raises(UsageError, match="--class 'horse': not a class"):
        build_gallery(ShowConfig(images=images, tags=tags, out=tmp_path / "g", doubt_class="horse"))
    with pytest.raises(UsageError, match="add --sort doubt"):
        build_gallery(ShowConfig(images=images, tags=tags, out=tmp_path / "g", failed_first=True))
    result = CliRunner().invoke(app, ["show", "--images", str(images), "--tags", str(tags), "--out",
                                      str(tmp_path / "g"), "--sort", "size"])
    assert result.exit_code == 2 and "--sort must be one of file, doubt" in result.output
    result = CliRunner().invoke(app, ["show", "--images", str(images), "--tags", str(tags), "--out",
                                      str(tmp_path / "g"), "--sort", "doubt", "--failed-first", "--workers", "0"])
    assert result.exit_code == 0, result.output
