"""One vocabulary of options: the same name for the same thing in every command, the old spellings
still accepted (hidden, one warning each), commands and options grouped in the help with readable
placeholders, and unknown output extensions refused before anything loads."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import typer
from labelled_set import write_folder_gt, write_tags_file
from typer.testing import CliRunner

from tagclip_cli.cli import app
from tagclip_cli.cli.surface import RENAMED, rename_old_options

WIDE = {"COLUMNS": "200"}
ORDER_OF_USE = ["annotate", "segment", "show", "evaluate", "calibrate", "retag", "export", "train-student",
                "student-predict", "merge", "reproduce"]
PANELS = {"Label": ["annotate", "segment"], "Look and score": ["show", "evaluate", "calibrate", "retag"],
          "Hand over": ["export", "train-student", "student-predict"], "Jobs": ["merge", "reproduce"]}


def commands() -> dict:
    group = typer.main.get_command(app)
    ctx = group.context_class(group, info_name="tagclip")
    return {name: group.get_command(ctx, name) for name in group.list_commands(ctx)}


def visible_options(command) -> dict[str, object]:
    return {opt: p for p in command.params if not p.hidden and p.param_type_name == "option"
            for opt in (*p.opts, *p.secondary_opts)}


def help_of(*args: str) -> str:
    result = CliRunner().invoke(app, [*args, "--help"], env=WIDE)
    assert result.exit_code == 0, result.output
    return result.output


# ---- the old spellings --------------------------------------------------------------------------------------

# command, the arguments it needs besides the option, old spelling, new spelling, value, parameter, parsed value
OLD_SPELLINGS = [
    ("evaluate", ["--gt", "voc2007", "--root", "."], "-v", "--verbose", None, "verbose", True),
    ("calibrate", ["--gt", "voc2007", "--root", ".", "--out", "t.txt"], "--pred", "--tags", "p.parquet", "tags",
     Path("p.parquet")),
    ("train-student", ["--masks", "m.json", "--out", "run"], "--batch", "--batch-size", "4", "batch_size", 4),
    ("student-predict", ["best.pt", "images"], "--png-dir", "--out", "pngs", "out", Path("pngs")),
]


def test_the_table_of_old_spellings_is_the_tested_one():
    assert {(c, old): new for c, _, old, new, *_ in OLD_SPELLINGS} == {
        (c, old): new for c, table in RENAMED.items() for old, new in table.items()}


@pytest.mark.parametrize("command, needed, old, new, value, param, parsed", OLD_SPELLINGS)
def test_an_old_spelling_parses_as_the_new_one_and_warns_once(capsys, command, needed, old, new, value, param,
                                                              parsed):
    cmd = commands()[command]
    given = [old] if value is None else [old, value]
    with cmd.make_context(command, [*needed, *given, *given]) as ctx:  # twice: still one warning
        assert ctx.params[param] == parsed
    assert capsys.readouterr().err.strip() == f"warning: {old} is now {new}"
    with cmd.make_context(command, [*needed, new] + ([] if value is None else [value])) as ctx:
        assert ctx.params[param] == parsed
    assert capsys.readouterr().err == ""  # the new spelling: no warning
    if value is not None:  # the --old=VALUE form too
        with cmd.make_context(command, [*needed, f"{old}={value}"]) as ctx:
            assert ctx.params[param] == parsed
        assert "is now" in capsys.readouterr().err


@pytest.mark.parametrize("command, old", [(c, old) for c, _, old, *_ in OLD_SPELLINGS] + [("evaluate", "--pred")])
def test_old_spellings_are_hidden_from_help(command, old):
    text = help_of(command)
    assert re.search(rf"(?<![\w-]){re.escape(old)}(?![\w-])", text) is None, text
    assert old not in visible_options(commands()[command])


def test_rename_skips_option_values_and_everything_after_double_dash(capsys):
    args = ["--title", "--pred", "--pred=x", "--tags", "--pred", "--pred", "y", "--", "--pred"]
    renamed = rename_old_options(args, {"--pred": "--tags"}, ["--title", "--tags"])
    assert renamed == ["--title", "--pred", "--tags=x", "--tags", "--pred", "--tags", "y", "--", "--pred"]
    assert capsys.readouterr().err.count("is now") == 1


@pytest.fixture()
def labelled(tmp_path):
    """A tags Parquet, its folder ground truth, and the ground truth's label PNGs as mask predictions."""
    scores = [[0.0, 1.0, s, 0.9 if i < 2 else 0.05] for i, s in enumerate([0.1, 0.2, 0.3, 0.45, 0.6, 0.7, 0.8])]
    positives = [{1} | ({2} if i > 2 else set()) | ({3} if i < 2 else set()) for i in range(7)]
    write_tags_file(tmp_path / "tags.parquet", scores)
    write_folder_gt(tmp_path / "gt", positives)
    pngs = tmp_path / "pngs"
    shutil.copytree(tmp_path / "gt" / "labels", pngs)
    (pngs / "categories.json").write_text(json.dumps(["lo", "hi", "a", "b"]))
    return tmp_path


def _report(runner, tmp_path, name, *args) -> tuple[dict, str]:
    out = tmp_path / f"{name}.json"
    result = runner.invoke(app, ["evaluate", "--gt", "folder", "--root", str(tmp_path / "gt"), *args,
                                 "--report", str(out)], env=WIDE)
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    del report["created"]
    return report, result.output


def test_evaluate_pred_still_reads_tags_and_masks_as_tags_and_masks_do(labelled):
    runner = CliRunner()
    for new, path in (("--tags", labelled / "tags.parquet"), ("--masks", labelled / "pngs")):
        report, output = _report(runner, labelled, new.strip("-"), new, str(path))
        old_report, old_output = _report(runner, labelled, "pred", "--pred", str(path))
        assert old_report == report
        assert report["task"] == ("classification" if new == "--tags" else "segmentation")
        assert "is now" not in output
        assert old_output.count("warning: --pred is now --tags (a tags Parquet) or --masks (masks)") == 1


def test_calibrate_pred_writes_the_same_thresholds_as_tags(labelled):
    runner = CliRunner()
    files = {}
    for option in ("--tags", "--pred"):
        files[option] = labelled / f"thresholds{option}.txt"
        result = runner.invoke(app, ["calibrate", "--gt", "folder", "--root", str(labelled / "gt"), option,
                                     str(labelled / "tags.parquet"), "--out", str(files[option]),
                                     "--min-positives", "2"], env=WIDE)
        assert result.exit_code == 0, result.output
        assert result.output.count("is now --tags") == (option == "--pred")
    assert files["--pred"].read_bytes() == files["--tags"].read_bytes()


@pytest.mark.parametrize("args, message", [
    (["--tags", "{pngs}"], "--tags {pngs}: not a tags Parquet (masks go to --masks)"),
    (["--masks", "{tags}"], "--masks {tags}: a tags Parquet (give it as --tags)"),
    ([], "give one of --tags (a tags Parquet), --masks"),
    (["--tags", "{tags}", "--masks", "{pngs}"], "give one of --tags"),
])
def test_evaluate_refuses_the_wrong_kind_of_file_for_each_option(labelled, args, message):
    paths = {"pngs": labelled / "pngs", "tags": labelled / "tags.parquet"}
    args = [a.format(**paths) for a in args]
    result = CliRunner().invoke(app, ["evaluate", "--gt", "folder", "--root", str(labelled / "gt"), *args])
    assert result.exit_code == 2
    assert result.output.strip().startswith("error: ") and len(result.output.strip().splitlines()) == 1
    assert message.format(**paths) in result.output


# ---- one name for one thing ---------------------------------------------------------------------------------


def test_the_same_thing_has_the_same_name_in_every_command():
    cmds = commands()
    for name, command in cmds.items():
        options = visible_options(command)
        assert not {"--pred", "--batch"} & set(options), name
        assert {"--quiet", "-q", "--verbose"} <= set(options), name
        if "-v" in options:  # -v is the vocabulary wherever it exists
            assert "--vocab" in options["-v"].opts, name
        if "--device" in options:
            assert options["--device"].default == "auto", name
        if "--batch-size" in options or name == "train-student":
            assert "--batch-size" in options, name
        out_like = {o for o in options if o.endswith("-dir") and o not in ("--cache-dir",)}
        assert out_like <= {"--png-dir"} and (not out_like or name == "segment"), (name, out_like)
    outputs = {name for name, c in cmds.items() if "--out" in visible_options(c)}
    assert outputs == set(ORDER_OF_USE) - {"evaluate", "merge"}  # evaluate: --report; merge: its argument
    assert all("-o" in visible_options(cmds[name]) for name in outputs)
    tags = {name for name, c in cmds.items() if "--tags" in visible_options(c)}
    assert tags == {"segment", "show", "evaluate", "calibrate", "export", "train-student"}
    masks = {name for name, c in cmds.items() if "--masks" in visible_options(c)}
    assert masks == {"show", "evaluate", "export", "train-student"}
    images = {name for name, c in cmds.items() if "--images" in visible_options(c)}
    assert images == {"show", "evaluate", "export", "train-student"}


# ---- the help -----------------------------------------------------------------------------------------------


def test_tagclip_help_lists_the_commands_in_order_of_use_in_panels():
    text = help_of()
    assert [m for m in re.findall(r"^│ ([a-z-]+) ", text, re.M) if m in ORDER_OF_USE] == ORDER_OF_USE
    positions = [text.index(f"─ {panel} ─") for panel in PANELS]
    assert positions == sorted(positions)
    for panel, names in PANELS.items():
        assert {commands()[n].rich_help_panel for n in names} == {panel}
    assert set(commands()) == set(ORDER_OF_USE)


@pytest.mark.parametrize("command", ORDER_OF_USE)
def test_options_are_grouped_with_readable_placeholders(command):
    text = help_of(command)
    assert re.search(r"<(bool|str|text|path|int|float)[^>]*>", text) is None, text
    usage = next(line for line in text.splitlines() if "Usage:" in line)
    assert re.search(r"[a-z{}]", usage.split("[OPTIONS]")[-1]) is None, usage  # IMAGES, not {images}
    options = [p for p in commands()[command].params if p.param_type_name == "option" and not p.hidden]
    assert all(p.rich_help_panel for p in options), [p.opts for p in options if not p.rich_help_panel]
    assert "─ Options ─" not in text  # no option left in the catch-all panel
    panels = re.findall(r"─ (\w[\w ]*?) ─", text)
    assert panels[-1] == "General"
    known = ["Arguments", "Input", "Model", "Method", "Scoring", "Selection", "Output", "Job", "General"]
    assert panels == sorted(panels, key=known.index), panels


def test_show_images_is_optional():
    text = help_of("show")
    line = next(ln for ln in text.splitlines() if "--images" in ln)
    assert "*" not in line.split("--images")[0]
    assert not next(p for p in commands()["show"].params if p.name == "images").required


# ---- output extensions --------------------------------------------------------------------------------------


@pytest.mark.parametrize("args, message", [
    (["annotate", "{missing}", "--vocab", "{missing}/v.txt", "--out", "{tmp}/labels.csv"],
     "--out {tmp}/labels.csv: unknown output extension '.csv'; supported: .parquet, or '-' for JSON Lines on stdout"),
    (["annotate", "{missing}", "--vocab", "{missing}/v.txt", "--out", "{tmp}/labels"],
     "--out {tmp}/labels: no output extension; supported: .parquet, or '-' for JSON Lines on stdout"),
    (["segment", "{missing}", "--vocab", "{missing}/v.txt", "--out", "{tmp}/masks.txt"],
     "--out {tmp}/masks.txt: unknown output extension '.txt'; supported: .json, .parquet"),
    (["segment", "{missing}", "--vocab", "{missing}/v.txt", "--out", "{tmp}/m.json", "--tags-out", "{tmp}/t.json"],
     "--tags-out {tmp}/t.json: unknown output extension '.json'; supported: .parquet"),
    (["retag", "{missing}/tags.parquet", "--tag-threshold", "0.3", "--out", "{tmp}/t.csv"],
     "--out {tmp}/t.csv: unknown output extension '.csv'; supported: .parquet"),
])
def test_an_unknown_output_extension_is_refused_first(tmp_path, args, message):
    """Refused before the inputs are even looked at (the images and vocabulary here do not exist), so
    before any model loads; nothing is written."""
    where = {"tmp": tmp_path, "missing": tmp_path / "missing"}
    result = CliRunner().invoke(app, [a.format(**where) for a in args])
    assert result.exit_code == 2, result.output
    assert result.output.strip() == "error: " + message.format(**where)
    assert list(tmp_path.iterdir()) == []
