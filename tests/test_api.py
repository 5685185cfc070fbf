"""The Python API (docs/api.md): its surface, the docs' example run as written there, and the
results equal to what the commands write for the same images."""

from __future__ import annotations

import inspect
import json
import logging
import re
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image
from typer.testing import CliRunner

import tagclip_cli as tc
from tagclip_cli import defaults
from tagclip_cli.cli import app
from tagclip_cli.errors import UsageError
from tagclip_cli.synthetic import generate_scene

DOCS = Path(__file__).resolve().parents[1] / "docs" / "api.md"


def docs_snippet(marker: str) -> str:
    """The fenced code block right after `<!-- snippet: marker -->` in docs/api.md."""
    found = re.search(rf"<!-- snippet: {re.escape(marker)} -->\s*```python\n(.*?)```", DOCS.read_text(), re.S)
    assert found, f"docs/api.md has no snippet {marker!r}"
    return found.group(1)


def test_all_lists_the_api_and_every_name_resolves():
    assert set(tc.__all__) == {"ImageMasks", "ImageTags", "Model", "__version__", "annotate", "commands",
                               "load_model", "merge", "segment", "vocabulary"}
    for name in tc.__all__:
        assert getattr(tc, name) is not None
    assert set(tc.__all__) <= set(dir(tc))
    assert (tc.annotate, tc.segment, tc.merge) == (tc.commands.annotate, tc.commands.segment, tc.commands.merge)


def test_no_module_shadows_an_api_name():
    """Importing tagclip_cli.X sets the package attribute X to the module: an API function named like
    a module would turn into that module once anything imports it."""
    package = Path(tc.__file__).parent
    for name in set(tc.__all__) - {"commands"}:
        assert not (package / f"{name}.py").exists() and not (package / name).is_dir(), name
    import tagclip_cli.pipeline  # noqa: F401  (imports most of the package)

    assert tc.segment is tc.commands.segment and callable(tc.annotate)
    with pytest.raises(AttributeError):
        tc.no_such_name  # noqa: B018


def test_every_documented_function_has_a_section_in_the_docs():
    text = DOCS.read_text()
    for name in ("tc.load_model", "tc.vocabulary", "model.tag", "model.segment", "tc.annotate"):
        assert f"## `{name}" in text, name


def test_commands_functions_take_the_commands_defaults():
    """One place for each default: the functions', the command options' and the dataclasses' agree."""
    from tagclip_cli.pipeline import JobOptions, ModelOptions
    from tagclip_cli.tagclip import TagCLIPConfig

    annotate = inspect.signature(tc.commands.annotate).parameters
    segment = inspect.signature(tc.commands.segment).parameters
    assert annotate["batch_size"].default == segment["batch_size"].default == JobOptions.batch_size == 8
    assert annotate["workers"].default == JobOptions.workers == defaults.WORKERS
    assert annotate["part_size"].default == JobOptions.part_size == defaults.PART_SIZE
    assert annotate["tag_threshold"].default == TagCLIPConfig.tag_threshold == 0.5
    assert annotate["pretrained"].default == ModelOptions.pretrained == "openai"
    assert segment["method"].default == "clses" and segment["setting"].default == "voc"
    help_text = CliRunner().invoke(app, ["annotate", "--help"], env={"COLUMNS": "200"}).output
    line = next(line for line in help_text.splitlines() if "--batch-size" in line)
    assert "[default: 8]" in line


def test_builtin_model_loads_without_the_random_init_warning(caplog):
    """open_clip warned "No pretrained weights loaded ... initialized randomly" before our weights
    were loaded into the built-in model; the weights now go in as open_clip builds it."""
    from safetensors.torch import load_file

    from tagclip_cli.backbone.loading import WEIGHTS_DIR, _load_builtin

    with caplog.at_level(logging.DEBUG):
        net = _load_builtin("shapes-demo")
    assert not [r for r in caplog.records if "initialized randomly" in r.getMessage()]
    stored = load_file(str(WEIGHTS_DIR / "shapes-demo.safetensors"))
    loaded = net.state_dict()
    assert set(loaded) == set(stored)
    assert all(np.array_equal(loaded[k].float().numpy(), v.float().numpy()) for k, v in stored.items())


def test_vocabulary_from_a_name_a_file_and_a_list(tmp_path):
    assert tc.vocabulary("voc").num_classes == 20
    assert tc.vocabulary("voc", no_background=True).background == ()
    assert tc.vocabulary("voc", background=["sky", "grass"]).background == ("sky", "grass")
    (tmp_path / "v.txt").write_text("cat\ndog\n")
    assert tc.vocabulary(tmp_path / "v.txt").classes == ("cat", "dog")
    assert tc.vocabulary(["cat", "dog"]).classes == ("cat", "dog")
    voc = tc.vocabulary("coco")
    assert tc.vocabulary(voc) is voc
    with pytest.raises(UsageError, match="no such vocabulary file"):
        tc.vocabulary(tmp_path / "missing.txt")


def test_docs_example_tags_and_segments_pil_images(capsys):
    exec(compile(docs_snippet("api-tag-and-segment"), "docs/api.md", "exec"), {})
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 6
    for line in lines[:3]:  # tags, then every class's score
        tags, scores = line.split("] ")
        assert scores.count(":") == 12
    for line in lines[3:]:
        assert line.startswith("(224, 224) [")


@pytest.fixture(scope="module")
def scene_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("scenes")
    for i in range(3):
        Image.fromarray(generate_scene(i).image).save(root / f"scene{i}.png")
    Image.fromarray(generate_scene(3).image[:100, :180]).save(root / "scene3.png")  # another size
    (root / "broken.png").write_bytes(b"not a png")
    return root


@pytest.fixture(scope="module")
def model(tiny_checkpoint, cache_dir):
    return tc.load_model(checkpoint=tiny_checkpoint, device="cpu", cache_dir=cache_dir)


def cli(*args: str) -> None:
    result = CliRunner().invoke(app, list(args))
    assert result.exit_code in (0, 1), result.output  # 1: the broken file is a failed row


def test_model_tag_equals_annotate_output(scene_dir, model, tiny_checkpoint, cache_dir, tmp_path):
    out = tmp_path / "tags.parquet"
    cli("annotate", str(scene_dir), "--vocab", "shapes", "--out", str(out), "--checkpoint", str(tiny_checkpoint),
        "--cache-dir", str(cache_dir), "--device", "cpu", "--workers", "0", "--tag-threshold", "0.3")
    rows = {r["image_id"]: r for r in pq.read_table(out).to_pylist()}
    paths = sorted(scene_dir.iterdir())
    results = model.tag(paths, "shapes", tag_threshold=0.3)
    pil = model.tag([Image.open(p) if p.name != "broken.png" else p for p in paths], "shapes", tag_threshold=0.3)
    classes = tc.vocabulary("shapes").classes
    for path, result, from_pil in zip(paths, results, pil, strict=True):
        row = rows[path.name]
        if path.name == "broken.png":
            assert result.error is not None and row["status"] != "ok" and result.tags == []
            continue
        assert result.tags == list(row["tags"]) and (result.width, result.height) == (row["width"], row["height"])
        assert [result.scores[c] for c in classes] == list(row["scores"])  # the same float32 values
        assert from_pil == result
    assert any(r.tags for r in results)


def test_model_segment_equals_segment_output(scene_dir, model, tiny_checkpoint, cache_dir, tmp_path):
    out, pngs = tmp_path / "masks.json", tmp_path / "png"
    cli("segment", str(scene_dir), "--vocab", "shapes", "--out", str(out), "--png-dir", str(pngs),
        "--checkpoint", str(tiny_checkpoint), "--cache-dir", str(cache_dir), "--device", "cpu", "--workers", "0",
        "--tag-threshold", "0.3")
    coco = json.loads(out.read_text())
    ids = {im["file_name"]: im["id"] for im in coco["images"]}
    names = {c["id"]: c["name"] for c in coco["categories"]}
    paths = sorted(p for p in scene_dir.iterdir() if p.name != "broken.png")
    results = model.segment(paths, "shapes", tag_threshold=0.3)
    for path, result in zip(paths, results, strict=True):
        label_png = np.asarray(Image.open(pngs / f"{path.stem}.png"))
        assert np.array_equal(result.label_map, label_png)
        anns = [a for a in coco["annotations"] if a["image_id"] == ids[path.name]]
        assert {names[a["category_id"]]: a["score"] for a in anns} == pytest.approx(result.scores, abs=1e-6)
        for name, mask in result.masks.items():
            assert np.array_equal(mask, result.label_map == tc.vocabulary("shapes").classes.index(name) + 1)
    assert any(r.masks for r in results)


def test_model_segment_with_given_tags_and_a_baseline(scene_dir, model):
    paths = sorted(p for p in scene_dir.iterdir() if p.name != "broken.png")[:2]
    given = model.segment(paths, "shapes", tags=[["circle"], []])
    assert set(given[0].tags) == {"circle"} and given[0].tag_scores is None
    assert set(given[0].masks) <= {"circle"} and given[1].masks == {} and given[1].error is None
    assert given[1].label_map.shape == (224, 224) and not given[1].label_map.any()
    dense = model.segment([np.asarray(Image.open(p)) for p in paths], "shapes", method="sclip")
    assert all(r.label_map.shape == (224, 224) for r in dense)
    with pytest.raises(UsageError, match="--method must be one of"):
        model.segment(paths, "shapes", method="grabcut")
    with pytest.raises(ValueError, match="not in the vocabulary"):
        model.segment(paths, "shapes", tags=[["zebra"], []])
