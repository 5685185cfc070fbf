"""Feedback that guides (issue 24, part 5): a light start, progress bars for the slow steps, refused
reruns that say what changed, "did you mean" for misspelt names, and the masks Parquet in show /
evaluate."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "open_clip", "pyarrow", "PIL", "numpy", "torchvision", "safetensors")


def _imported_by(argv: list[str]) -> list[str]:
    """The heavy modules a fresh `tagclip ARGV` process has imported when it exits."""
    code = (
        "import sys\n"
        f"sys.argv = ['tagclip', *{argv!r}]\n"
        "from tagclip_cli.cli import main\n"
        "try:\n    main()\nexcept SystemExit:\n    pass\n"
        f"print('HEAVY:', *[m for m in {HEAVY!r} if m in sys.modules])\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip().splitlines()[-1].split()[1:]


@pytest.mark.parametrize("argv", [["--help"], ["annotate", "--help"], ["segment", "--help"], ["show", "--help"],
                                  ["evaluate", "--help"], ["--version"]])
def test_help_imports_no_heavy_module(argv):
    # `tagclip --help` starts in a fraction of a second because torch, open_clip, pyarrow, PIL and
    # numpy are imported only inside the commands that need them
    assert _imported_by(argv) == []


# ---- a refused rerun names each changed setting, before any model loads --------------------------------

def _annotate(photo_dir, out, checkpoint, cache_dir, *extra, quiet=True):
    from typer.testing import CliRunner

    from tagclip_cli.cli import app

    args = ["annotate", str(photo_dir), "--vocab", "voc", "--out", str(out), "--checkpoint", str(checkpoint),
            "--workers", "0", "--cache-dir", str(cache_dir), *(["--quiet"] if quiet else []), *extra]
    return CliRunner().invoke(app, args, env={"COLUMNS": "400"})


@pytest.mark.parametrize("quiet", [False, True])
def test_text_encoding_shows_a_bar_unless_quiet(photo_dir, tiny_checkpoint, tmp_path, quiet):
    from tagclip_cli.tagclip import tagclip_templates
    from tagclip_cli.vocab import load_vocabulary

    voc = load_vocabulary("voc")
    prompts = len(set(voc.classes) | set(voc.background)) * len(tagclip_templates())
    args = ["--batch-size", "4", *(["--quiet"] if quiet else [])]
    result = _annotate(photo_dir, tmp_path / "tags.parquet", tiny_checkpoint, tmp_path / "cache", *args, quiet=False)
    assert result.exit_code == 0, result.output
    bar = [line for line in result.output.splitlines() if line.startswith("encoding prompts")]
    if quiet:
        assert result.output == ""  # no bar, no log, no summary
    else:
        assert len(bar) == 1 and bar[0].split()[-2] == f"{prompts}/{prompts}", result.output
        # the prompts are cached now: a second run into another file encodes nothing
        again = _annotate(photo_dir, tmp_path / "again.parquet", tiny_checkpoint, tmp_path / "cache", quiet=False)
        assert again.exit_code == 0 and "encoding prompts" not in again.output
        assert "tagging" in again.output


def _error(result) -> str:
    lines = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, result.output
    return lines[0]


def test_records_describe_each_change_with_old_and_new_value():
    from tagclip_cli.record import RecordIO, describe_changes, only_thresholds_changed

    old = RecordIO.from_dict({"model": {"model": "ViT-B-16", "weights": "openai"}, "precision": "fp32",
                              "classes": ["cat", "dog"], "tagclip": {"tag_threshold": 0.5, "use_background": True},
                              "max_side": 1024})
    new = RecordIO.from_dict({"model": {"model": "ViT-B-16", "weights": "openai"}, "precision": "bf16",
                              "classes": ["cat", "dog", "cow"], "tagclip": {"tag_threshold": 0.6,
                                                                            "use_background": False},
                              "max_side": 1024})
    assert describe_changes(old, new) == (
        '--precision: fp32 -> bf16; --vocab classes: ["cat", "dog"] -> ["cat", "dog", "cow"] (+ cow); '
        "--tag-threshold: 0.5 -> 0.6; background scoring (--no-background): on -> off")
    assert not only_thresholds_changed(old, new)
    thresholds = RecordIO.with_changes(old, tagclip={"tag_threshold": 0.3, "use_background": True},
                                       thresholds={"default": 0.3, "per_class": {"cat": 0.2}})
    assert only_thresholds_changed(old, thresholds)
    assert describe_changes(old, thresholds) == ("--tag-threshold: 0.5 -> 0.3; --thresholds default: none -> 0.3; "
                                                 "--thresholds cat: none -> 0.2")
    assert not only_thresholds_changed(old, old)


def test_rerun_with_other_settings_is_refused_before_the_model_loads(photo_dir, tiny_checkpoint, tmp_path):
    cache = tmp_path / "cache"
    out = tmp_path / "tags.parquet"
    first = _annotate(photo_dir, out, tiny_checkpoint, cache)
    assert first.exit_code == 0, first.output
    done = out.read_bytes()

    threshold = _annotate(photo_dir, out, tiny_checkpoint, cache, "--tag-threshold", "0.7")
    assert threshold.exit_code == 2
    assert _error(threshold) == (
        f"error: {out}: output exists (made with other settings: --tag-threshold: 0.5 -> 0.7); only thresholds "
        f"changed: `tagclip retag {out} --tag-threshold 0.7 --out {tmp_path / 'tags.retagged.parquet'}` re-derives "
        "its tags from the stored scores without the model, or pass --overwrite to recompute it")

    # 'nope' is no model open_clip can build: had it been loaded, the error would say so
    other_model = _annotate(photo_dir, out, tiny_checkpoint, cache, "--model", "nope", "--max-side", "512")
    assert other_model.exit_code == 2
    assert _error(other_model) == (
        f"error: {out}: output exists (made with other settings: --model: openai-vit-w64-p16-l6 -> nope; "
        "--max-side: 1024 -> 512); pass --overwrite to replace it")

    # other weights (here a file that is no checkpoint at all: loading it would fail) are told apart
    # by their hash alone
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint")
    other_weights = _annotate(photo_dir, out, junk, cache)
    assert other_weights.exit_code == 2
    assert "(made with other settings: --pretrained/--checkpoint: checkpoint:" in _error(other_weights)
    assert "not a readable CLIP checkpoint" not in other_weights.output

    again = _annotate(photo_dir, out, tiny_checkpoint, cache)
    assert again.exit_code == 0 and out.read_bytes() == done
    assert not Path(f"{out}.parts").exists()


# ---- did you mean ------------------------------------------------------------------------------------

def test_did_you_mean_picks_the_closest_choice_or_nothing():
    from tagclip_cli.errors import did_you_mean, with_suggestion

    assert did_you_mean("shapes_demo", ["ViT-B-16", "shapes-demo"]) == "did you mean 'shapes-demo'?"
    assert did_you_mean("vit-b-16", ["ViT-B-32", "ViT-B-16"]) == "did you mean 'ViT-B-16'?"
    assert did_you_mean("zebra", ["cat", "dog"]) == ""
    assert with_suggestion("bad", "zebra", ["cat"]) == "bad"


def test_unknown_model_names_the_closest_in_one_line(tmp_path):
    from tagclip_cli.backbone import load_backbone
    from tagclip_cli.errors import ModelLoadError

    with pytest.raises(ModelLoadError) as info:
        load_backbone("shapes_demo", cache_dir=tmp_path)
    assert str(info.value) == "unknown model 'shapes_demo'; did you mean 'shapes-demo'?"
    with pytest.raises(ModelLoadError) as info:
        load_backbone("qwertyuiop", cache_dir=tmp_path)
    message = str(info.value)
    assert message.startswith("unknown model 'qwertyuiop' (built-in: shapes-demo; open_clip has ")
    assert "did you mean" not in message and "\n" not in message and len(message) < 200


def test_unknown_vocabulary_method_setting_and_precision_suggest_a_name():
    from tagclip_cli import methods
    from tagclip_cli.backbone import check_precision
    from tagclip_cli.commands import check_segment_options
    from tagclip_cli.errors import UsageError, VocabularyError
    from tagclip_cli.vocab import load_vocabulary

    with pytest.raises(VocabularyError, match=r"no such vocabulary file \(built-in .*\); did you mean 'coco'\?$"):
        load_vocabulary("cocoo")
    with pytest.raises(VocabularyError) as info:
        load_vocabulary("cocoo.txt")  # a file name: missing, not misspelt
    assert "did you mean" not in str(info.value)
    paths = {"out": Path("m.json"), "tags_in": None, "tags_out": None, "png_dir": None, "save_cams": None}
    with pytest.raises(UsageError, match=r"not 'clseg'; did you mean 'clses'\?$"):
        check_segment_options("clseg", "voc", False, paths, False, False, False, None)
    with pytest.raises(UsageError, match=r"not 'coco_stuff'; did you mean 'cocostuff'\?$"):
        check_segment_options("clses", "coco_stuff", False, paths, False, False, False, None)
    with pytest.raises(UsageError, match=r"unknown segmentation method 'mask-clip' .*; did you mean 'maskclip'\?$"):
        methods.get("mask-clip", "masks")
    with pytest.raises(UsageError, match=r"did you mean 'bf16'\?$"):
        check_precision("bf61", "cpu")


def test_unknown_class_in_a_thresholds_file_suggests_the_class(tmp_path):
    from tagclip_cli.errors import UsageError
    from tagclip_cli.thresholds import read_threshold_file

    path = tmp_path / "t.tsv"
    path.write_text("dog\t0.3\naeroplan\t0.4\n")
    with pytest.raises(UsageError) as info:
        read_threshold_file(path, ["aeroplane", "dog", "cat"], 0.5)
    assert str(info.value) == (f"{path}:2: unknown class 'aeroplan' (not one of the 3 classes); "
                               "did you mean 'aeroplane'?")


# ---- show and evaluate read the masks Parquet --------------------------------------------------------

SHAPES = ROOT / "examples" / "shapes"


def _cli(*args: str):
    from typer.testing import CliRunner

    from tagclip_cli.cli import app

    result = CliRunner().invoke(app, [str(a) for a in args], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    return result


@pytest.fixture(scope="module")
def both_mask_files(tiny_checkpoint, tmp_path_factory):
    """The masks of one segment run of the tiny model on the shapes examples, written as the COCO
    JSON (with the tags Parquet) and as the masks Parquet."""
    work = tmp_path_factory.mktemp("masks")
    common = ["segment", SHAPES / "images", "--vocab", "shapes", "--checkpoint", tiny_checkpoint, "--workers", "0",
              "--cache-dir", work / "cache", "--tag-threshold", "0.2", "--quiet"]
    _cli(*common, "--out", work / "masks.json", "--tags-out", work / "tags.parquet")
    _cli(*common, "--out", work / "masks.parquet")
    return work


def test_show_draws_the_masks_parquet_as_the_masks_json(both_mask_files):
    work = both_mask_files
    coco = json.loads((work / "masks.json").read_text())
    assert len(coco["annotations"]) >= 4  # masks to draw
    for masks in ("masks.json", "masks.parquet"):
        _cli("show", "--images", SHAPES / "images", "--tags", work / "tags.parquet", "--masks", work / masks,
             "--out", work / f"gallery-{masks}", "--workers", "0", "--quiet")
    overlays = sorted((work / "gallery-masks.json" / "overlays").iterdir())
    assert len(overlays) == 8
    for png in overlays:
        assert (work / "gallery-masks.parquet" / "overlays" / png.name).read_bytes() == png.read_bytes()


def test_evaluate_scores_the_masks_parquet_as_the_masks_json(both_mask_files):
    work = both_mask_files
    reports = {}
    for masks in ("masks.json", "masks.parquet"):
        _cli("evaluate", "--gt", "folder", "--root", SHAPES / "labels", "--classes", SHAPES / "classes.txt",
             "--masks", work / masks, "--report", work / f"{masks}.report.json", "--quiet")
        reports[masks] = json.loads((work / f"{masks}.report.json").read_text())
    assert reports["masks.parquet"]["settings"]["pred_kind"] == "masks-parquet"
    for report in reports.values():
        report.pop("created")
        report["settings"].pop("pred")
        report["settings"].pop("pred_kind")
    assert reports["masks.parquet"] == reports["masks.json"]
    assert "miou" in json.dumps(reports["masks.json"]).lower()
