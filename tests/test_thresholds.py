"""Per-class thresholds (docs/algorithm.md §6): the tag rule with one threshold per class, the
thresholds file, `tagclip retag` and `tagclip calibrate`, and annotate --thresholds."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from conftest import sample_photos
from labelled_set import write_folder_gt, write_tags_file
from PIL import Image
from typer.testing import CliRunner

from tagclip_cli.cli import app
from tagclip_cli.record import METADATA_KEY
from tagclip_cli.tagclip import minmax, tag_matrix, tags_from_scores
from tagclip_cli.thresholds import (
    ThresholdFileError,
    calibrate_class,
    candidate_thresholds,
    normalised_scores,
    parse_target,
    read_threshold_file,
)

CLASSES = ("cat", "dog", "potted plant")


# ---- the rule ---------------------------------------------------------------------------------------


def test_per_class_thresholds_change_tags_as_computed_by_hand():
    scores = torch.tensor([0.0, 0.3, 0.5, 0.45])  # normalised: 0, 0.6, 1, 0.9
    assert tags_from_scores(scores, 0.5) == [1, 2, 3]
    # class 1 needs 0.7 (0.6 fails), class 3 needs 0.95 (0.9 fails), class 2 needs 0.2 (1 passes)
    assert tags_from_scores(scores, torch.tensor([0.5, 0.7, 0.2, 0.95])) == [2]
    # a low threshold for class 0 alone: its normalised 0 is still not above 0.0 (strict)
    assert tags_from_scores(scores, torch.tensor([0.0, 0.9, 0.9, 0.95])) == [2]
    # nothing passes: the argmax, whatever the thresholds
    assert tags_from_scores(scores, torch.tensor([1.0, 1.0, 1.0, 1.0])) == [2]


def test_a_vector_of_equal_thresholds_is_the_float_threshold_bitwise():
    gen = torch.Generator().manual_seed(0)
    scores = torch.rand(500, 7, generator=gen)
    scores[::7, 3] = scores[::7, 5]  # ties
    scores[::11] = 0.25  # constant rows
    for t in (0.1, 0.3, 0.5, 1 / 3):
        norm = minmax(scores, dim=1)
        scores_at_t = torch.where(torch.rand(500, 7, generator=gen) < 0.2, norm, scores)  # scores exactly at t
        for row in scores_at_t:
            assert tags_from_scores(row, t) == tags_from_scores(row, torch.full((7,), t))


def test_tag_matrix_rows_equal_tags_from_scores():
    gen = torch.Generator().manual_seed(1)
    scores = torch.rand(300, 6, generator=gen)
    scores[::5, 2] = scores[::5, 4] = scores[::5].amax(dim=1)  # tied maxima: the first one
    scores[::13] = 0.5
    thresholds = torch.tensor([0.2, 0.9, 0.5, 0.7, 0.95, 0.0])
    for thr in (0.5, 0.99, thresholds):
        keep = tag_matrix(scores, thr)
        for row, mask in zip(scores, keep, strict=True):
            assert torch.nonzero(mask).flatten().tolist() == tags_from_scores(row, thr)


def test_numpy_normalisation_equals_the_torch_rule_bitwise():
    gen = torch.Generator().manual_seed(2)
    scores = torch.rand(200, 9, generator=gen) * 0.03
    scores[::17] = 0.01
    assert np.array_equal(normalised_scores(scores.numpy()), minmax(scores, dim=1).numpy())


# ---- the file ---------------------------------------------------------------------------------------


def test_threshold_file_lines_comments_and_defaults(tmp_path):
    path = tmp_path / "t.tsv"
    path.write_text("# from calibrate\n\ncat\t0.25\npotted plant\t1\n", encoding="utf-8")
    th = read_threshold_file(path, CLASSES, 0.5)
    assert th.vector(CLASSES) == (0.25, 0.5, 1.0)


@pytest.mark.parametrize(
    ("text", "line", "problem"),
    [
        ("cat\t0.2\nhorse\t0.3\n", 2, "unknown class 'horse'"),
        ("cat\t1.5\n", 1, "outside [0, 1]"),
        ("# c\ncat\t-0.1\n", 2, "outside [0, 1]"),
        ("cat\tnan\n", 1, "outside [0, 1]"),
        ("cat\thigh\n", 1, "is not a number"),
        ("dog 0.3\n", 1, "expected 'class<TAB>threshold'"),
        ("dog\t0.3\ndog\t0.4\n", 2, "listed twice"),
    ],
)
def test_bad_threshold_files_name_the_line(tmp_path, text, line, problem):
    path = tmp_path / "bad.tsv"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(ThresholdFileError) as err:
        read_threshold_file(path, CLASSES, 0.5)
    assert str(err.value).startswith(f"{path}:{line}: ") and problem in str(err.value)


# ---- calibration ------------------------------------------------------------------------------------


def test_calibration_picks_the_known_optimum():
    f32 = np.float32
    # separable: any threshold between 0.45 and 0.6 gives F1 = 1; the midpoint is chosen
    norm = np.array([0.1, 0.2, 0.45, 0.6, 0.7, 0.8], dtype=f32)
    pos = np.array([0, 0, 0, 1, 1, 1], dtype=bool)
    result = calibrate_class(norm, pos)
    assert result.threshold == f32((np.float64(f32(0.45)) + np.float64(f32(0.6))) / 2)
    assert (result.precision, result.recall, result.f1) == (1.0, 1.0, 1.0)
    # one positive at 0.3: t = 0.25 keeps 5 with 4 TP (F1 8/9) beats t = 0.525 (3 TP, F1 6/7)
    norm = np.array([0.1, 0.2, 0.3, 0.45, 0.6, 0.7, 0.8], dtype=f32)
    pos = np.array([0, 0, 1, 0, 1, 1, 1], dtype=bool)
    best = calibrate_class(norm, pos)
    assert best.threshold == f32((np.float64(f32(0.2)) + np.float64(f32(0.3))) / 2)
    assert best.f1 == pytest.approx(8 / 9)
    # precision >= 0.8: the lowest such threshold (most recall) is also 0.25; precision 1: 0.525
    assert calibrate_class(norm, pos, "precision", 0.8).threshold == best.threshold
    assert calibrate_class(norm, pos, "precision", 1.0).threshold == f32((np.float64(f32(0.45)) + f32(0.6)) / 2)
    # recall >= 0.75: the highest threshold keeping 3 of the 4 positives
    assert calibrate_class(norm, pos, "recall", 0.75).threshold == f32((np.float64(f32(0.45)) + f32(0.6)) / 2)
    # the chosen threshold reproduces its numbers under the strict float32 rule
    kept = norm > best.threshold
    assert kept.tolist() == [False, False, True, True, True, True, True]


def test_candidates_and_targets():
    assert candidate_thresholds(np.array([0.0, 1.0, 0.5], np.float32)).tolist() == [0.0, 0.25, 0.75, 1.0]
    assert parse_target("F1") == ("f1", None) and parse_target("precision=0.9") == ("precision", 0.9)
    for bad in ("precision=2", "precision", "accuracy=0.5", "recall=x"):
        with pytest.raises(Exception, match="--target must be"):
            parse_target(bad)


# ---- retag and calibrate on files -------------------------------------------------------------------


def test_calibrate_then_retag_on_a_synthetic_labelled_set(tmp_path):
    # lo is always 0 and hi always 1, so a's and b's normalised scores are their raw scores
    a = [0.1, 0.2, 0.3, 0.45, 0.6, 0.7, 0.8]
    a_pos = [0, 0, 1, 0, 1, 1, 1]
    scores = [[0.0, 1.0, s, 0.9 if i < 2 else 0.05] for i, s in enumerate(a)]
    positives = [{1} | ({2} if p else set()) | ({3} if i < 2 else set()) for i, p in enumerate(a_pos)]
    tags = tmp_path / "tags.parquet"
    write_tags_file(tags, scores + [[0.0, 0.0, 0.0, 0.0]], status=["ok"] * 7 + ["failed"])
    write_folder_gt(tmp_path / "gt", positives)
    out = tmp_path / "thresholds.tsv"
    runner = CliRunner()
    result = runner.invoke(app, ["calibrate", "--gt", "folder", "--root", str(tmp_path / "gt"), "--tags", str(tags),
                                 "--out", str(out), "--min-positives", "3"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    lines = [ln for ln in out.read_text().splitlines() if not ln.startswith("#")]
    chosen = dict(line.split("\t") for line in lines)
    assert list(chosen) == ["lo", "hi", "a", "b"]
    assert np.float32(chosen["a"]) == np.float32((np.float64(np.float32(0.2)) + np.float32(0.3)) / 2)
    # b has 2 positives, lo none: they keep the file's 0.5, with a warning; hi is positive everywhere
    assert chosen["b"] == chosen["lo"] == "0.5"
    assert "b: keeps its threshold (2 positive image(s) < 3)" in result.output
    assert "lo: keeps its threshold (0 positive image(s) < 3)" in result.output
    # the table: a's threshold and F1 before (t = 0.5: 3 TP of 4, no FP -> 6/7) and after (8/9)
    row = next(ln for ln in result.output.splitlines() if ln.startswith("│ a "))
    cells = [c.strip() for c in row.strip("│ ").split("│")]
    assert cells == ["a", "4", "0.500", "100.0", "75.0", "85.7", "0.250", "80.0", "100.0", "88.9"]

    relabelled = tmp_path / "relabelled.parquet"
    result = runner.invoke(app, ["retag", str(tags), "--thresholds", str(out), "--out", str(relabelled)])
    assert result.exit_code == 0, result.output
    table = pq.read_table(relabelled)
    new_tags = table.column("tags").to_pylist()
    assert ["a" in t for t in new_tags[:7]] == [False, False, True, True, True, True, True]
    assert table.column("status").to_pylist()[7] == "failed" and new_tags[7] == []
    meta = json.loads(table.schema.metadata[METADATA_KEY])
    assert meta["thresholds"]["default"] == 0.5
    # hi is positive in every image: every threshold keeps it, the lowest (0) is chosen
    assert meta["thresholds"]["per_class"] == {"hi": 0.0, "a": float(chosen["a"])}
    # everything else is the input's, unchanged
    before = pq.read_table(tags)
    assert table.drop_columns(["tags"]).equals(before.drop_columns(["tags"]))


def test_retag_refuses_bad_files_in_one_line(tmp_path):
    tags = tmp_path / "tags.parquet"
    write_tags_file(tags, [[0.0, 1.0, 0.5, 0.2]])
    bad = tmp_path / "bad.tsv"
    bad.write_text("a\t0.3\nzebra\t0.2\n")
    runner = CliRunner()
    out = tmp_path / "out.parquet"
    result = runner.invoke(app, ["retag", str(tags), "--thresholds", str(bad), "--out", str(out)])
    assert result.exit_code == 2 and f"{bad}:2: unknown class 'zebra'" in result.output
    assert not out.exists() and "Traceback" not in result.output
    result = runner.invoke(app, ["retag", str(tags), "--thresholds", str(bad), "--out", str(tags)])
    assert result.exit_code == 2 and "is the input file" in result.output
    result = runner.invoke(app, ["retag", str(tmp_path / "nope.parquet"), "--tag-threshold", "0.3", "--out", str(out)])
    assert result.exit_code == 2 and "no such tags file" in result.output


# ---- annotate --thresholds and retag = annotate -----------------------------------------------------


@pytest.fixture(scope="module")
def small_photos(tmp_path_factory):
    root = tmp_path_factory.mktemp("small")
    for i, array in enumerate(sample_photos().values()):
        Image.fromarray(array).resize((64, 48)).save(root / f"p{i}.png")
    (root / "broken.png").write_bytes(b"")
    return root


def _annotate(args, photos, checkpoint, cache_dir, out):
    result = CliRunner().invoke(app, ["annotate", str(photos), "--vocab", "voc", "--out", str(out), "--checkpoint",
                                      str(checkpoint), "--device", "cpu", "--workers", "0", "--cache-dir",
                                      str(cache_dir), "-q", *args])
    return result


def test_annotate_with_thresholds_and_retag_agree(small_photos, tiny_checkpoint, cache_dir, tmp_path):
    from tagclip_cli.vocab import load_vocabulary

    classes = load_vocabulary("voc").classes
    plain = tmp_path / "plain.parquet"
    assert _annotate([], small_photos, tiny_checkpoint, cache_dir, plain).exit_code == 1  # broken.png
    scores = {r["image_id"]: r["scores"] for r in pq.read_table(plain).to_pylist() if r["status"] == "ok"}
    # thresholds low for the first ten classes, high for the rest: tags must change
    thresholds = {name: (0.1 if i < 10 else 0.95) for i, name in enumerate(classes)}
    tsv = tmp_path / "t.tsv"
    tsv.write_text("".join(f"{n}\t{t}\n" for n, t in thresholds.items()))
    direct = tmp_path / "direct.parquet"
    assert _annotate(["--thresholds", str(tsv)], small_photos, tiny_checkpoint, cache_dir, direct).exit_code == 1
    table = pq.read_table(direct)
    for row in table.to_pylist():
        if row["status"] != "ok":
            continue
        s = np.asarray(scores[row["image_id"]], np.float32)
        norm = (s - s.min()) / (s.max() - s.min())
        by_hand = [c for i, c in enumerate(classes) if norm[i] > np.float32(thresholds[c])] or [classes[s.argmax()]]
        assert row["tags"] == by_hand
    plain_tags = pq.read_table(plain).column("tags").to_pylist()
    assert table.column("tags").to_pylist() != plain_tags
    meta = json.loads(table.schema.metadata[METADATA_KEY])
    assert meta["thresholds"] == {"default": 0.5, "per_class": {n: t for n, t in thresholds.items() if t != 0.5}}
    assert "class_thresholds" not in meta["tagclip"]
    assert "thresholds" not in json.loads(pq.read_schema(plain).metadata[METADATA_KEY])

    retagged = tmp_path / "retagged.parquet"
    result = CliRunner().invoke(app, ["retag", str(plain), "--thresholds", str(tsv), "--out", str(retagged)])
    assert result.exit_code == 0, result.output
    again = pq.read_table(retagged)
    assert again.equals(table)
    assert again.schema.metadata == table.schema.metadata


def test_annotate_refuses_a_bad_thresholds_file_before_loading(small_photos, tmp_path):
    bad = tmp_path / "bad.tsv"
    bad.write_text("cat\t0.3\ndog\t7\n")
    out = tmp_path / "o.parquet"
    result = _annotate(["--thresholds", str(bad)], small_photos, tmp_path / "no-such.pt", tmp_path, out)
    assert result.exit_code == 2 and f"{bad}:2: threshold 7 of 'dog' is outside [0, 1]" in result.output
    assert not out.exists()


def test_segment_tag_step_uses_the_thresholds(small_photos, tiny_checkpoint, cache_dir, tmp_path):
    tsv = tmp_path / "t.tsv"
    tsv.write_text("aeroplane\t0.05\nbicycle\t0.05\nbird\t0.05\nperson\t0.99\n")
    common = ["--vocab", "voc", "--checkpoint", str(tiny_checkpoint), "--device", "cpu", "--workers", "0",
              "--cache-dir", str(cache_dir), "-q", "--thresholds", str(tsv)]
    direct = tmp_path / "direct.parquet"
    assert _annotate(["--thresholds", str(tsv)], small_photos, tiny_checkpoint, cache_dir, direct).exit_code == 1
    tags_out = tmp_path / "seg-tags.parquet"
    result = CliRunner().invoke(app, ["segment", str(small_photos), "--out", str(tmp_path / "m.json"),
                                      "--tags-out", str(tags_out), *common])
    assert result.exit_code == 1, result.output
    seg, ann = pq.read_table(tags_out), pq.read_table(direct)
    assert seg.column("tags").equals(ann.column("tags")) and seg.column("scores").equals(ann.column("scores"))
    meta = json.loads(seg.schema.metadata[METADATA_KEY])
    assert meta["thresholds"]["per_class"] == {"aeroplane": 0.05, "bicycle": 0.05, "bird": 0.05, "person": 0.99}
    # with --tags the tags are not computed here: refused, nothing written
    result = CliRunner().invoke(app, ["segment", str(small_photos), "--out", str(tmp_path / "m2.json"),
                                      "--tags", str(direct), *common])
    assert result.exit_code == 2 and "tagclip retag" in result.output
    assert not (tmp_path / "m2.json").exists()


@pytest.mark.parametrize("command", ["retag", "calibrate"])
def test_new_commands_have_help_and_the_logging_options(command):
    result = CliRunner().invoke(app, [command, "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0 and "--verbose" in result.output and "--quiet" in result.output


@pytest.mark.parametrize("with_failed", [False, True])
def test_retag_table_equals_the_rule_row_by_row(tmp_path, with_failed):
    from tagclip_cli.thresholds import retag_table

    classes = tuple(f"c{i}" for i in range(6))
    gen = torch.Generator().manual_seed(3)
    scores = torch.rand(40, 6, generator=gen)
    scores[::9] = 0.5  # constant rows: the argmax fallback
    status = ["failed" if with_failed and i % 7 == 3 else "ok" for i in range(40)]
    path = tmp_path / "t.parquet"
    write_tags_file(path, scores.tolist(), status=status, classes=classes)
    table = pq.read_table(path)
    thresholds = [0.2, 0.9, 0.5, 0.7, 0.95, 0.0]
    new, changed = retag_table(table, classes, thresholds, path)
    expected = [[] if s != "ok" else [classes[c] for c in tags_from_scores(row, torch.tensor(thresholds))]
                for row, s in zip(scores, status, strict=True)]
    assert new.column("tags").to_pylist() == expected
    old = table.column("tags").to_pylist()
    assert changed == sum(1 for a, b, s in zip(old, expected, status, strict=True) if s == "ok" and a != b) > 0
    assert new.drop_columns(["tags"]).equals(table.drop_columns(["tags"]))
