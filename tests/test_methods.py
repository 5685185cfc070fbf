"""Methods as plug-ins (tagclip_cli/methods): the registry lists the built-ins with their facts, and a
toy method defined and registered in this file alone is usable from the CLI (`segment --method`,
in-process and, through TAGCLIP_METHODS, in a subprocess) and from the Python API, with the
masks its rule gives by hand."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from tagclip_cli import methods
from tagclip_cli.errors import UsageError
from tagclip_cli.formats import rle_decode
from tagclip_cli.methods import SegOutput
from tagclip_cli.quirks import Quirks

ROOT = Path(__file__).resolve().parents[1]


# ---- the toy method: bright pixels are the first class --------------------------------------------

@dataclass(frozen=True)
class BrightConfig:
    level: float = 128.0  # a pixel whose mean RGB value is above this is the class
    label: int = 1


class BrightSegments:
    needs_rgb = True

    def __init__(self, vocab, config: BrightConfig) -> None:
        self.vocab = vocab
        self.config = config

    def segment(self, images, sizes, tags=None, rgb=None, keep_cams=False):
        out = []
        for i, _ in enumerate(sizes):
            grey = rgb(i).astype(np.float64).mean(axis=-1)
            bright = grey > self.config.level
            label_map = np.where(bright, self.config.label, 0).astype(np.int32)
            scores = {self.config.label: float(grey[bright].mean() / 255)} if bright.any() else {}
            out.append(SegOutput(label_map, scores, sorted(label - 1 for label in scores)))
        return out


@dataclass(frozen=True)
class Bright:
    """A method's facts as dataclass fields (any object with the protocol's attributes will do)."""

    name: str = "toy-bright"
    kind: str = "masks"
    summary: str = "toy: pixels brighter than a level are the first class"
    needs_tags: bool = False
    needs_rgb: bool = True
    options: frozenset[str] = frozenset()
    settings: tuple[str, ...] = ("voc",)  # no coco values: --setting coco is refused

    def config(self, setting: str = "voc", **options) -> BrightConfig:
        return BrightConfig(**options)

    def build(self, backbone, vocab, config, *, quirks, tagclip=None, run_tagclip=True) -> BrightSegments:
        return BrightSegments(vocab, config)

    def record(self, config: BrightConfig, quirks: Quirks) -> dict:
        return {"method": self.name, "level": config.level, "label": config.label}


TOY = Bright()


@pytest.fixture
def toy():
    methods.register(TOY)
    yield TOY
    methods.unregister(TOY.name)


@pytest.fixture(scope="module")
def images(tmp_path_factory, photo_dir) -> Path:
    root = tmp_path_factory.mktemp("bright")
    for i, path in enumerate(sorted(photo_dir.iterdir())[:2]):
        Image.open(path).convert("RGB").resize((60, 45)).save(root / f"p{i}.png")
    return root


def expected_masks(images: Path) -> dict[str, np.ndarray]:
    """The toy's rule by hand: mean RGB above 128."""
    return {p.name: np.asarray(Image.open(p).convert("RGB"), dtype=np.float64).mean(axis=-1) > 128.0
            for p in sorted(images.iterdir())}


def masks_of(path: Path) -> dict[str, np.ndarray]:
    doc = json.loads(path.read_text())
    names = {im["id"]: im for im in doc["images"]}
    out = {im["file_name"]: np.zeros((im["height"], im["width"]), bool) for im in doc["images"]}
    for ann in doc["annotations"]:
        im = names[ann["image_id"]]
        assert ann["category_id"] == 1
        out[im["file_name"]] |= rle_decode(ann["segmentation"]["counts"], im["height"], im["width"])
    return out


# ---- the registry ------------------------------------------------------------------------------------

def test_builtin_methods_and_their_facts():
    assert methods.names("masks")[:5] == ("clses", "maskclip", "sclip", "clearclip", "naclip")
    assert methods.names("tags") == ("tagclip", "piaa")
    facts = {n: (methods.get(n).needs_tags, methods.get(n).needs_rgb) for n in methods.names()}
    assert facts == {"tagclip": (False, False), "clses": (True, False), "maskclip": (True, False),
                     "sclip": (False, True), "clearclip": (False, True), "naclip": (False, True),
                     "resclip": (False, True), "scclip": (False, True), "piaa": (False, False)}
    assert methods.get("piaa").needs_fit and not getattr(methods.get("tagclip"), "needs_fit", False)
    assert methods.get("clses").options == {"crf", "save_cams"}
    assert methods.configure("clses", "coco", crf=True).crf is True
    with pytest.raises(UsageError, match="does not take --crf"):
        methods.configure("naclip", crf=True)
    with pytest.raises(UsageError, match="choose from clses, maskclip"):
        methods.get("grabcut", "masks")
    with pytest.raises(UsageError, match="segmentation method 'tagclip'"):
        methods.get("tagclip", "masks")  # a tags method is not a mask method


def test_register_refuses_a_clash_and_a_half_method(toy):
    assert "toy-bright" in methods.names("masks")
    with pytest.raises(ValueError, match="already registered"):
        methods.register(Bright(summary="another"))
    with pytest.raises(TypeError, match="Method protocol"):
        methods.register(object())  # type: ignore[arg-type]


def test_quirks_are_all_on_or_all_off():
    on, off = Quirks.reference(), Quirks()
    assert (on.q1_fp16_positions, on.q2_clamp_box_ends, on.q3_stop_cwr_at_empty_box, on.q4_caa_float32) == (True,) * 4
    assert not any((off.q1_fp16_positions, off.q2_clamp_box_ends, off.q3_stop_cwr_at_empty_box, off.q4_caa_float32))


# ---- the toy method from the CLI and the API ---------------------------------------------------------

def cli_args(images: Path, out: Path, tiny_checkpoint: Path, cache_dir: Path, *extra: str) -> list[str]:
    return ["segment", str(images), "--vocab", "voc", "--method", "toy-bright", "--out", str(out),
            "--checkpoint", str(tiny_checkpoint), "--workers", "0", "--cache-dir", str(cache_dir), *extra]


def test_toy_method_from_the_cli_and_the_api(toy, images, tmp_path, tiny_checkpoint, cache_dir):
    from tagclip_cli.cli import app
    from tagclip_cli.pipeline import ModelOptions, SegmentOptions, run_segment
    from tagclip_cli.sources import list_folder
    from tagclip_cli.tagclip import TagCLIPConfig
    from tagclip_cli.vocab import load_vocabulary

    out = tmp_path / "cli.json"
    result = CliRunner().invoke(app, cli_args(images, out, tiny_checkpoint, cache_dir))
    assert result.exit_code == 0, result.output
    expected = expected_masks(images)
    got = masks_of(out)
    assert got.keys() == expected.keys() and all(e.any() and (~e).any() for e in expected.values())
    for name, mask in expected.items():
        assert np.array_equal(got[name], mask)
    record = json.loads(out.read_text())["info"]["tagclip"]  # the run record: the method's own entry
    assert record["segment"] == {"method": "toy-bright", "level": 128.0, "label": 1} and record["tagclip"] is None

    api_out = tmp_path / "api.json"
    opts = SegmentOptions(items=list_folder(images), vocab=load_vocabulary("voc"), out=api_out,
                          model=ModelOptions(checkpoint=tiny_checkpoint, cache_dir=cache_dir), tagclip=TagCLIPConfig(),
                          method="toy-bright", segment=methods.configure("toy-bright"), workers=0)
    assert run_segment(opts).failed == 0
    api = masks_of(api_out)
    assert api.keys() == got.keys() and all(np.array_equal(api[k], got[k]) for k in got)


def test_toy_method_refuses_what_it_does_not_take(toy, images, tmp_path, tiny_checkpoint, cache_dir):
    from tagclip_cli.cli import app

    for extra, message in ((["--crf"], "--crf"), (["--setting", "coco"], "setting"),
                           (["--tags-out", str(tmp_path / "t.parquet")], "--tags-out")):
        result = CliRunner().invoke(app, cli_args(images, tmp_path / "x.json", tiny_checkpoint, cache_dir, *extra))
        assert result.exit_code == 2, (extra, result.output)
        assert message in result.output
    assert not (tmp_path / "x.json").exists()


def test_toy_method_as_a_plugin_in_a_subprocess(images, tmp_path, tiny_checkpoint, cache_dir):
    """TAGCLIP_METHODS=module:attribute registers the object in a fresh process (no fixture here)."""
    assert "toy-bright" not in methods.names()
    out = tmp_path / "plugin.json"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests")]),
           methods.PLUGIN_ENV: "test_methods:TOY", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "tagclip_cli", *cli_args(images, out, tiny_checkpoint, cache_dir)],
                          capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr
    got = masks_of(out)
    for name, mask in expected_masks(images).items():
        assert np.array_equal(got[name], mask)
    env.pop(methods.PLUGIN_ENV)
    proc = subprocess.run([sys.executable, "-m", "tagclip_cli", *cli_args(images, tmp_path / "no.json", tiny_checkpoint,
                                                                         cache_dir)],
                          capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 2 and "--method must be one of clses" in proc.stderr
