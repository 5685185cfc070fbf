"""`tagclip segment` in a subprocess on real photos with a random-weight checkpoint: COCO JSON that
pycocotools loads, masks at the image size, label PNGs equal to the JSON, tags from the same pass or
from a file, the CRF, MaskCLIP, shards + merge, and the one-line errors."""

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
from PIL import Image

from tagclip_cli.vocab import load_vocabulary


def run_tagclip(*args: str, cache: Path, check: bool = True, env: dict | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ, TAGCLIP_CACHE_DIR=str(cache), COLUMNS="200", **(env or {}))
    proc = subprocess.run([sys.executable, "-m", "tagclip_cli", *args], capture_output=True, text=True, env=env,
                          timeout=600)
    if check:
        assert proc.returncode == 0, proc.stderr
    return proc


def label_maps(path: Path) -> dict[str, np.ndarray]:
    """{file_name: (H, W) label map} of a COCO masks JSON, decoded with pycocotools' own COCO API."""
    from pycocotools.coco import COCO

    coco = COCO(str(path))
    maps = {}
    for image in coco.imgs.values():
        if image["tagclip_status"] != "ok":
            continue
        labels = np.zeros((image["height"], image["width"]), np.int32)
        for ann in coco.loadAnns(coco.getAnnIds(imgIds=[image["id"]])):
            mask = coco.annToMask(ann)
            assert mask.shape == labels.shape
            assert not labels[mask > 0].any()  # one class per pixel
            labels[mask > 0] = ann["category_id"]
        maps[image["file_name"]] = labels
    return maps


@pytest.fixture(scope="module")
def inputs(photo_dir, tmp_path_factory) -> Path:
    """The sample photos at half size, plus one file that is not an image."""
    root = tmp_path_factory.mktemp("seg-inputs")
    for path in sorted(photo_dir.iterdir()):
        with Image.open(path) as im:
            im.resize((im.width // 2, im.height // 2)).save(root / path.name, quality=92)
    (root / "broken.jpg").write_text("this is not a JPEG")
    return root


@pytest.fixture(scope="module")
def one_pass(inputs, tiny_checkpoint, tmp_path_factory) -> dict:
    """TagCLIP + CLS-SEG in one pass with --png-dir and --tags-out."""
    work = tmp_path_factory.mktemp("seg-one-pass")
    cache = tmp_path_factory.mktemp("seg-cache")
    out, tags, pngs = work / "masks.json", work / "labels.parquet", work / "png"
    proc = run_tagclip("segment", str(inputs), "--vocab", "voc", "--out", str(out), "--tags-out", str(tags),
                       "--png-dir", str(pngs), "--checkpoint", str(tiny_checkpoint), "--workers", "0",
                       cache=cache, check=False)
    return {"proc": proc, "out": out, "tags": tags, "pngs": pngs, "cache": cache, "work": work}


def test_segment_writes_coco_json_pngs_and_tags(one_pass, inputs):
    proc = one_pass["proc"]
    assert proc.returncode == 1, proc.stderr  # one input is not an image
    assert "broken.jpg" in proc.stderr and "Traceback" not in proc.stderr
    assert "4 done" in proc.stderr and "1 failed" in proc.stderr
    doc = json.loads(one_pass["out"].read_text())
    voc = load_vocabulary("voc")
    assert [c["name"] for c in doc["categories"]] == list(voc.classes)
    assert [c["id"] for c in doc["categories"]] == list(range(1, 21))
    images = {im["file_name"]: im for im in doc["images"]}
    assert sorted(images) == sorted(p.name for p in inputs.iterdir())
    assert images["broken.jpg"]["tagclip_status"] == "failed" and images["broken.jpg"]["tagclip_error"]
    assert [im["id"] for im in doc["images"]] == list(range(5))  # the global index
    assert not any(a["image_id"] == images["broken.jpg"]["id"] for a in doc["annotations"])
    maps = label_maps(one_pass["out"])
    assert len(maps) == 4
    tags = {r["image_id"]: r for r in pq.read_table(one_pass["tags"]).to_pylist()}
    for name, labels in maps.items():
        with Image.open(inputs / name) as im:
            assert labels.shape == (im.height, im.width)
        png = np.asarray(Image.open(one_pass["pngs"] / name.replace(".jpg", ".png")))
        assert np.array_equal(png, labels)  # the PNG agrees with the JSON pixel for pixel
        present = {voc.classes[v - 1] for v in np.unique(labels) if v > 0}
        assert present and present <= set(tags[name]["tags"])  # masks only for tagged classes
        assert images[name]["tagclip_tags"] == tags[name]["tags"]
        assert len(tags[name]["scores"]) == 20
    for ann in doc["annotations"]:
        assert ann["iscrowd"] == 0 and isinstance(ann["segmentation"]["counts"], str)
        assert 0.5 < ann["score"] <= 1.0  # mean refined cam in a mask: a pixel is foreground iff its cam > 0.5
    assert tags["broken.jpg"]["status"] == "failed"
    assert not (one_pass["pngs"] / "broken.png").exists()
    assert not Path(str(one_pass["out"]) + ".parts").exists()


def test_segment_with_tags_file_gives_the_same_masks(one_pass, inputs, tiny_checkpoint):
    out = one_pass["work"] / "from-tags.json"
    proc = run_tagclip("segment", str(inputs), "--vocab", "voc", "--out", str(out), "--tags", str(one_pass["tags"]),
                       "--checkpoint", str(tiny_checkpoint), "--workers", "0", cache=one_pass["cache"], check=False)
    assert proc.returncode == 1  # broken.jpg failed in the tags file too
    first, again = label_maps(one_pass["out"]), label_maps(out)
    assert first.keys() == again.keys()
    for name in first:
        assert np.array_equal(first[name], again[name])
    doc = json.loads(out.read_text())
    assert doc["info"]["tagclip"]["tags_input"]["sha256"]


@pytest.mark.slow
def test_crf_and_maskclip(one_pass, inputs, tiny_checkpoint):
    crf_out = one_pass["work"] / "crf.json"
    run_tagclip("segment", str(inputs), "--vocab", "voc", "--out", str(crf_out), "--tags", str(one_pass["tags"]),
                "--crf", "--checkpoint", str(tiny_checkpoint), "--workers", "0", cache=one_pass["cache"], check=False)
    plain, crf = label_maps(one_pass["out"]), label_maps(crf_out)
    assert plain.keys() == crf.keys()
    changed = [np.mean(plain[n] != crf[n]) for n in plain]
    assert max(changed) > 0.01  # the CRF moves mask boundaries
    voc = load_vocabulary("voc")
    tags = {r["image_id"]: r["tags"] for r in pq.read_table(one_pass["tags"]).to_pylist()}
    for name in plain:  # ... but only among the image's own tags
        assert {voc.classes[v - 1] for v in np.unique(crf[name]) if v > 0} <= set(tags[name])
    mc_out = one_pass["work"] / "maskclip.json"
    run_tagclip("segment", str(inputs), "--vocab", "voc", "--out", str(mc_out), "--method", "maskclip",
                "--key-smoothing", "--prompt-denoising", "--checkpoint", str(tiny_checkpoint), "--workers", "0",
                cache=one_pass["cache"], check=False)
    maps = label_maps(mc_out)
    assert len(maps) == 4
    doc = json.loads(mc_out.read_text())
    assert doc["info"]["tagclip"]["segment"]["method"] == "maskclip"
    assert all(0 < a["score"] <= 1 for a in doc["annotations"])


def test_missing_crf_extra_is_one_line(tmp_path, tiny_checkpoint):
    shadow = tmp_path / "shadow" / "pydensecrf"  # an installed-looking package whose import fails
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text("raise ImportError('hidden for this test')\n")
    photo = tmp_path / "in"
    photo.mkdir()
    Image.new("RGB", (32, 32)).save(photo / "a.png")
    proc = run_tagclip("segment", str(photo), "--vocab", "voc", "--out", str(tmp_path / "m.json"), "--crf",
                       "--checkpoint", str(tiny_checkpoint), cache=tmp_path / "c", check=False,
                       env={"PYTHONPATH": str(shadow.parent)})
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "pip install 'tagclip-cli[crf]'" in lines[0], proc.stderr
    assert not (tmp_path / "m.json.parts").exists() and not (tmp_path / "m.json").exists()


@pytest.mark.slow
def test_shards_then_merge_equal_one_run(one_pass, inputs, tiny_checkpoint, tmp_path):
    out, tags = tmp_path / "masks.json", tmp_path / "labels.parquet"
    for shard in ("0/2", "1/2"):
        run_tagclip("segment", str(inputs), "--vocab", "voc", "--out", str(out), "--tags-out", str(tags),
                    "--shard", shard, "--batch-size", "1", "--checkpoint", str(tiny_checkpoint), "--workers", "0",
                    cache=one_pass["cache"], check=False)
    assert not out.exists() and (tmp_path / "masks.json.parts").is_dir()
    run_tagclip("merge", str(out), cache=one_pass["cache"])
    merged, single = json.loads(out.read_text()), json.loads(one_pass["out"].read_text())
    assert merged["images"] == single["images"]
    assert merged["annotations"] == single["annotations"]
    assert pq.read_table(tags).to_pylist() == pq.read_table(one_pass["tags"]).to_pylist()
    shutil.rmtree(tmp_path / "masks.json.parts", ignore_errors=True)


@pytest.mark.parametrize("method", [["resclip"], ["sclip", "--rcs"], ["scclip"]])
def test_resclip_and_scclip_run_resume_and_match_their_pngs(method, photo_dir, tiny_checkpoint, tmp_path):
    """ResCLIP (alone and on SCLIP) and SC-CLIP through the CLI on two small photos and a broken
    file: half the inputs by --shard, then the full run resumes from it; the JSON's masks equal the
    label PNGs; the run record names the method's settings."""
    images = tmp_path / "in"
    images.mkdir()
    for name, path in zip("ab", sorted(photo_dir.iterdir()), strict=False):
        Image.open(path).resize((96, 72)).save(images / f"{name}.jpg", quality=92)
    (images / "broken.jpg").write_text("this is not a JPEG")
    cache = tmp_path / "cache"
    out, pngs = tmp_path / "masks.json", tmp_path / "png"
    args = ["segment", str(images), "--vocab", "voc", "--method", *method, "--out", str(out), "--png-dir", str(pngs),
            "--checkpoint", str(tiny_checkpoint), "--workers", "0"]
    first = run_tagclip(*args, "--shard", "0/2", cache=cache, check=False)
    assert first.returncode in (0, 1), first.stderr
    full = run_tagclip(*args, cache=cache, check=False)
    assert full.returncode == 1, full.stderr  # broken.jpg
    assert "Traceback" not in first.stderr + full.stderr
    assert "broken.jpg" in first.stderr + full.stderr  # named by whichever run met it
    assert "skipped (already done)" in " ".join(full.stderr.split())
    maps = label_maps(out)
    assert len(maps) == 2
    for name, labels in maps.items():
        png = np.asarray(Image.open(pngs / name.replace(".jpg", ".png")))
        assert np.array_equal(png, labels)
    segment = json.loads(out.read_text())["info"]["tagclip"]["segment"]
    assert segment["method"] == ("scclip" if method == ["scclip"] else "resclip")
    if method != ["scclip"]:
        assert segment["resclip"]["base"] == ("sclip" if "--rcs" in method else "naclip")
        assert segment["resclip"]["sfr_tau"] == 2.2 and segment["dense"]["logit_scale"] == 40
    else:
        assert segment["scclip"]["pre_layer"] == 9 and segment["dense"]["prob_threshold"] == 0.15


def test_rcs_needs_a_dense_baseline(inputs, tmp_path):
    proc = run_tagclip("segment", str(inputs), "--vocab", "voc", "--method", "maskclip", "--rcs", "--out",
                       str(tmp_path / "m.json"), cache=tmp_path / "cache", check=False)
    assert proc.returncode == 2 and "--rcs" in proc.stderr and "Traceback" not in proc.stderr
