"""`tagclip annotate --method piaa` in subprocesses on the shapes-demo model's scenes: the fit pass,
its model file, resume after SIGKILL, shards, torchrun, --piaa-model, --fit-on and the refusals.

Every way of splitting or interrupting the fit must give the same model file (byte for byte) and
the same table as one uninterrupted process. One intra-op thread everywhere (OMP_NUM_THREADS=1)."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from conftest import kill_after_first_part
from PIL import Image

N_SCENES = 24
FIT = ["--bank-size", "16", "--batch-size", "2", "--workers", "0", "--device", "cpu"]


def env_for(cache: Path) -> dict[str, str]:
    env = dict(os.environ, TAGCLIP_CACHE_DIR=str(cache), COLUMNS="200", OMP_NUM_THREADS="1")
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    return env


def piaa_args(images: Path | str, out: Path, *extra: str) -> list[str]:
    return ["annotate", str(images), "--vocab", "shapes", "--model", "shapes-demo", "--method", "piaa",
            "--out", str(out), *FIT, *extra]


def tagclip(*args: str, cache: Path, ok: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "tagclip_cli", *args], capture_output=True, text=True,
                          env=env_for(cache), timeout=600)
    if ok:
        assert proc.returncode == 0, proc.stderr
    return proc


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def record(path: Path) -> dict:
    return json.loads(pq.read_schema(path).metadata[b"tagclip"])


def assert_same_rows(path: Path, reference: Path) -> None:
    table, ref = pq.read_table(path), pq.read_table(reference)
    assert table.column_names == ref.column_names
    for name in ref.column_names:
        assert table.column(name).equals(ref.column(name)), name


@pytest.fixture(scope="module")
def scenes(tmp_path_factory) -> dict:
    """24 demo scenes (three of them wider or taller, for the centre crop) and 6 others."""
    from tagclip_cli import synthetic

    root = tmp_path_factory.mktemp("piaa_scenes")
    objects = {}
    for folder, first, count in (("a", 0, N_SCENES), ("b", 100, 6)):
        (root / folder).mkdir()
        for i in range(first, first + count):
            scene = synthetic.generate_scene(i, seed=3000)
            image = Image.fromarray(scene.image)
            if i % 8 == 3:
                image = image.resize((300, 224) if i % 16 == 3 else (224, 280), Image.BICUBIC)
            image.save(root / folder / f"s{i:03d}.png")
            objects[f"s{i:03d}.png"] = scene.objects
    return {"a": root / "a", "b": root / "b", "objects": objects}


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("piaa_cache")


@pytest.fixture(scope="module")
def reference(scenes, cache, tmp_path_factory) -> Path:
    """One uninterrupted single-process run over folder a."""
    out = tmp_path_factory.mktemp("piaa_reference") / "ref.parquet"
    tagclip(*piaa_args(scenes["a"], out), cache=cache)
    return out


def test_piaa_tags_the_scenes_and_names_its_fit(scenes, cache, reference):
    import torch

    from tagclip_cli.tagclip import tags_from_scores

    model = reference.with_name("ref.parquet.piaa.safetensors")
    meta = record(reference)
    assert meta["tagclip"] is None and meta["background"] == []
    tagger = meta["tagger"]
    assert tagger["method"] == "piaa" and tagger["dense"] == "sclip" and tagger["bank_size"] == 16
    assert tagger["setting"] == "voc" and tagger["refine_temperature"] == 100.0
    assert tagger["fit"]["file"] == model.name and tagger["fit"]["sha256"] == sha256(model)
    assert tagger["fit"]["inputs"]["images"] == N_SCENES
    assert not reference.with_name("ref.parquet.piaa.parts").exists()
    rows = pq.read_table(reference).to_pylist()
    assert [r["image_id"] for r in rows] == sorted(p.name for p in scenes["a"].iterdir())
    classes = meta["classes"]
    hits = 0
    for r in rows:
        assert r["status"] == "ok" and len(r["scores"]) == len(classes)
        assert sum(r["scores"]) == pytest.approx(1.0, abs=1e-5)
        assert r["tags"] == [classes[c] for c in tags_from_scores(torch.tensor(r["scores"]), 0.5)]
        hits += bool(set(scenes["objects"][r["image_id"]]) & set(r["tags"]))
        assert len(r["tags"]) < len(classes) // 2
    assert hits >= N_SCENES // 2, hits  # a scene's shape among its tags (K = 16 on 24 scenes: 14 measured)
    # Rerun: nothing is fitted or tagged again, the model file is left alone.
    stamp = model.stat().st_mtime_ns
    again = tagclip(*piaa_args(scenes["a"], reference), cache=cache)
    assert "already complete" in " ".join(again.stderr.split()) and "fitting" not in again.stderr
    assert model.stat().st_mtime_ns == stamp


def test_sigkill_during_the_fit_then_rerun_resumes_it(scenes, cache, reference, tmp_path):
    out = tmp_path / "killed.parquet"
    work = tmp_path / "killed.parquet.piaa.parts"
    args = piaa_args(scenes["a"], out, "--part-size", "8")  # a saved part state every window of 8 images
    assert kill_after_first_part(args, env_for(cache), work, pattern="state-*.safetensors") == -signal.SIGKILL
    assert not out.exists() and not out.with_name("killed.parquet.piaa.safetensors").exists()
    from safetensors import safe_open

    with safe_open(str(next(work.glob("state-*.safetensors"))), framework="pt") as fh:  # the bank: <= C x K rows
        assert 0 < fh.get_slice("features").get_shape()[0] <= 12 * 16
    rerun = tagclip(*args, cache=cache)
    assert "images already folded in" in rerun.stderr
    assert sha256(out.with_name("killed.parquet.piaa.safetensors")) == sha256(
        reference.with_name("ref.parquet.piaa.safetensors"))
    assert_same_rows(out, reference)
    assert not work.exists()


def test_shards_fit_their_parts_then_score_equal_one_process(scenes, cache, reference, tmp_path):
    out = tmp_path / "sharded.parquet"
    model = tmp_path / "sharded.parquet.piaa.safetensors"
    first = tagclip(*piaa_args(scenes["a"], out, "--shard", "1/2"), cache=cache)
    assert "fitted its part of the PIAA fit" in " ".join(first.stderr.split()) and not model.exists()
    assert len(list((tmp_path / "sharded.parquet.piaa.parts").glob("state-*-of-00002.safetensors"))) == 1
    second = tagclip(*piaa_args(scenes["a"], out, "--shard", "0/2"), cache=cache)  # the last part: fits, scores
    assert model.exists() and "tagclip merge" in second.stderr
    tagclip(*piaa_args(scenes["a"], out, "--shard", "1/2"), cache=cache)  # the second run of shard 1 scores
    assert f"merged {N_SCENES} rows" in tagclip("merge", str(out), cache=cache).stderr
    assert sha256(model) == sha256(reference.with_name("ref.parquet.piaa.safetensors"))
    assert_same_rows(out, reference)
    mine, ref = record(out), record(reference)
    assert mine["tagger"]["fit"].pop("file") == model.name
    ref["tagger"]["fit"].pop("file")
    assert mine == ref


@pytest.mark.slow
def test_torchrun_two_ranks_fit_equal_one_process(scenes, cache, reference, tmp_path):
    out = tmp_path / "ddp.parquet"
    torchrun = Path(sys.executable).with_name("torchrun")
    proc = subprocess.run(
        [str(torchrun), "--nproc-per-node", "2", "--master-port", str(29600 + os.getpid() % 1000),
         "-m", "tagclip_cli", *piaa_args(scenes["a"], out)],
        capture_output=True, text=True, env=env_for(cache), timeout=600)
    assert proc.returncode == 0, proc.stderr
    model = tmp_path / "ddp.parquet.piaa.safetensors"
    assert sha256(model) == sha256(reference.with_name("ref.parquet.piaa.safetensors"))
    assert_same_rows(out, reference)


def test_piaa_model_and_fit_on_score_another_collection(scenes, cache, reference, tmp_path):
    ref_model = reference.with_name("ref.parquet.piaa.safetensors")
    given = tmp_path / "given.parquet"
    tagclip(*piaa_args(scenes["b"], given, "--piaa-model", str(ref_model)), cache=cache)
    assert not given.with_name("given.parquet.piaa.safetensors").exists()  # nothing fitted here
    fit = record(given)["tagger"]["fit"]
    assert fit["file"] == str(ref_model.resolve()) and fit["sha256"] == sha256(ref_model)
    fitted = tmp_path / "fitted.parquet"
    tagclip(*piaa_args(scenes["b"], fitted, "--fit-on", str(scenes["a"])), cache=cache)
    assert sha256(fitted.with_name("fitted.parquet.piaa.safetensors")) == sha256(ref_model)  # the same fit
    assert record(fitted)["tagger"]["fit"]["fit_on"] == str(scenes["a"])
    assert_same_rows(fitted, given)
    assert pq.read_table(given).num_rows == 6


def test_bad_inputs_are_refused_in_one_line(scenes, cache, reference, tmp_path):
    from tagclip_cli.jobs.fit import read_model, write_model

    tensors, identity = read_model(reference.with_name("ref.parquet.piaa.safetensors"))
    other_vocab, other_model = tmp_path / "vocab.safetensors", tmp_path / "model.safetensors"
    write_model(other_vocab, tensors, {**identity, "classes": ["cat", "dog"], "prompts": ["cat", "dog"]})
    write_model(other_model, tensors, {**identity, "model": {"model": "ViT-B-16", "weights": "openai"}})
    (tmp_path / "notes.txt").write_text("not a model\n")
    out = str(tmp_path / "x.parquet")
    cases = [
        (["--piaa-model", str(other_vocab)], "fitted for another vocabulary (2 classes: cat, dog); this run has 12"),
        (["--piaa-model", str(other_model)], "fitted with another model"),
        (["--piaa-model", str(tmp_path / "notes.txt")], "not a fitted model"),
        (["--piaa-model", str(tmp_path / "gone.safetensors")], "file not found"),
        (["--piaa-model", str(other_model), "--fit-on", str(scenes["b"])], "give one of them"),
        (["--dense", "maskclip"], "--dense must be one of sclip, clearclip, naclip"),
        (["--setting", "cocostuff"], "PIAA has no published setting 'cocostuff'"),
    ]
    for extra, message in cases:
        proc = tagclip(*piaa_args(scenes["b"], Path(out), *extra), cache=cache, ok=False)
        assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
        assert message in " ".join(proc.stderr.split()), proc.stderr
        assert len(proc.stderr.strip().splitlines()) <= 2, proc.stderr  # the message (wrapped at most once)
    tagclip_only = tagclip("annotate", str(scenes["b"]), "--vocab", "shapes", "--out", out, "--dense", "naclip",
                           cache=cache, ok=False)
    assert tagclip_only.returncode == 2 and "--dense: PIAA options; add --method piaa" in tagclip_only.stderr
    # The finished output's fit was made with other constants: refused, nothing lost.
    changed = tagclip(*piaa_args(scenes["a"], reference, "--setting", "coco"), cache=cache, ok=False)
    assert changed.returncode == 2 and "Traceback" not in changed.stderr
    assert "differs in: refine_temperature" in " ".join(changed.stderr.split())
    assert reference.exists() and reference.with_name("ref.parquet.piaa.safetensors").exists()
    assert np.isfinite(pq.read_table(reference).column("scores").to_pylist()[0]).all()


def test_the_api_retag_and_segment_take_piaa_runs(scenes, cache, reference, tmp_path):
    """tc.annotate(method="piaa") writes the command's table; `retag` re-derives PIAA's tags with
    another threshold; `segment --tags` segments them and records that PIAA made them."""
    import torch

    import tagclip_cli as tc
    from tagclip_cli.tagclip import tags_from_scores

    torch.set_num_threads(1)
    out = tmp_path / "api.parquet"
    summary = tc.annotate(str(scenes["a"]), "shapes", out, model="shapes-demo", method="piaa", bank_size=16,
                          batch_size=2, workers=0, device="cpu", cache_dir=cache)
    assert summary.done == N_SCENES
    fitted = tmp_path / "api.parquet.piaa.safetensors"
    assert sha256(fitted) == sha256(reference.with_name("ref.parquet.piaa.safetensors"))
    assert_same_rows(out, reference)
    retagged = tmp_path / "retagged.parquet"
    tagclip("retag", str(reference), "--tag-threshold", "0.3", "--out", str(retagged), cache=cache)
    assert record(retagged)["tagger"]["tag_threshold"] == 0.3
    classes = record(reference)["classes"]
    for row in pq.read_table(retagged).to_pylist():
        assert row["tags"] == [classes[c] for c in tags_from_scores(torch.tensor(row["scores"]), 0.3)]
    masks = tmp_path / "masks.parquet"
    tagclip("segment", str(scenes["a"]), "--vocab", "shapes", "--model", "shapes-demo", "--tags", str(reference),
            "--out", str(masks), "--workers", "0", "--device", "cpu", cache=cache)
    made_with = record(masks)["tags_input"]["made_with"]
    assert made_with["method"] == "piaa" and made_with["fit"]["sha256"] == sha256(
        reference.with_name("ref.parquet.piaa.safetensors"))


def test_model_tag_with_piaa_equals_the_command(scenes, cache, reference):
    """Model.tag(method="piaa") on in-memory inputs: fitted on the images themselves, or scoring
    with the command's model file, it gives the command's scores and tags."""
    import torch

    import tagclip_cli as tc
    from tagclip_cli.errors import UsageError

    torch.set_num_threads(1)
    model = tc.load_model("shapes-demo", device="cpu", cache_dir=cache)
    paths = sorted(str(p) for p in scenes["a"].iterdir())
    rows = pq.read_table(reference).to_pylist()
    fitted_model = reference.with_name("ref.parquet.piaa.safetensors")
    for kw in ({}, {"piaa_model": fitted_model}):
        tags = model.tag(paths, "shapes", method="piaa", bank_size=16, batch_size=2, **kw)
        assert [t.tags for t in tags] == [r["tags"] for r in rows]
        assert [list(t.scores.values()) for t in tags] == [pytest.approx(r["scores"], abs=0) for r in rows]
    with pytest.raises(UsageError, match="fitted for another vocabulary"):
        model.tag(paths[:2], ["cat", "dog"], method="piaa", piaa_model=fitted_model)
    with pytest.raises(UsageError, match="PIAA options; add --method piaa"):
        model.tag(paths[:2], "shapes", dense="naclip")


def test_sigkill_during_the_scoring_keeps_the_fit(scenes, cache, reference, tmp_path):
    out = tmp_path / "scored.parquet"
    args = piaa_args(scenes["a"], out, "--part-size", "2")
    parts = tmp_path / "scored.parquet.parts"
    assert kill_after_first_part(args, env_for(cache), parts) == -signal.SIGKILL
    model = tmp_path / "scored.parquet.piaa.safetensors"
    stamp = model.stat().st_mtime_ns  # the fit finished before the first scored part
    rerun = tagclip(*args, cache=cache)
    assert "fitting" not in rerun.stderr and "skipped (already done)" in rerun.stderr
    assert model.stat().st_mtime_ns == stamp
    assert sha256(model) == sha256(reference.with_name("ref.parquet.piaa.safetensors"))
    assert_same_rows(out, reference)
