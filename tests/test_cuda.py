"""The CUDA path against the CPU path, through the CLI in subprocesses (what users run).

Marked `cuda`: on a machine without CUDA the `pytest_collection_modifyitems` hook in conftest.py
deselects them (reported as deselected, not skipped); `pytest -m cuda` runs only these
(benchmarks/gpu_check.sh does, on the GPU machine). What they check:

- fp32 on cuda equals fp32 on cpu: identical tags, scores within 1e-4, label maps equal on at
  least 99.9% of the pixels (annotate, and segment with CLS-SEG);
- bf16 and fp16 autocast run (annotate and segment) and give the fp32 tags on >= 95% of images;
- the out-of-memory splitter (tagclip_cli/faults.py) splits a batch that does not fit under a
  memory cap (`torch.cuda.set_per_process_memory_fraction`) and still finishes every image;
- `torchrun --nproc-per-node 1` writes what a plain run writes, and NCCL initialises under it.

The model is the trained shapes demo (`--model shapes-demo`, tagclip_cli/weights/) on generated
shapes scenes, a third of them resized to a non-square, non-native size (so the positional
embedding is interpolated); the OOM test runs it on scenes upscaled to 1024x768.

The comparison helpers are exercised on CPU too (a CPU run against a copy of itself and a perturbed one)
by the unmarked test at the end, so that a broken helper shows up without a GPU.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
SCENES = 48  # 95% agreement then allows at most two images with other tags
SEG_SCENES = 20  # segment on CPU is the slow part of the check; 95% then allows one image
SCORE_TOL = 1e-4
PIXEL_SHARE = 0.999
TAG_SHARE = 0.95
# shapes-demo on a 1024x768 image (3,073 tokens, 8 layers, 4 heads) holds ~0.3 GB of attention maps plus
# ~0.3 GB per layer while it runs: one image fits under the cap, a batch of 16 (~12 GB) does not.
OOM_CAP_BYTES = 3 * 2**30


# ---- running the CLI ------------------------------------------------------------------------------

def run_tagclip(*args: str, cache: Path, prefix: tuple[str, ...] = ("-m", "tagclip_cli"),
                timeout: int = 600) -> subprocess.CompletedProcess:
    """`python <prefix> args` with this source tree first on the path; asserts exit 0."""
    env = dict(os.environ, TAGCLIP_CACHE_DIR=str(cache), COLUMNS="200",
               PYTHONPATH=os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p))
    proc = subprocess.run([sys.executable, *prefix, *args], capture_output=True, text=True, env=env,
                          timeout=timeout, cwd=REPO)
    assert proc.returncode == 0, f"{' '.join(args[:2])} exited {proc.returncode}:\n{proc.stderr[-4000:]}"
    return proc


def annotate(images: Path, out: Path, device: str, cache: Path, precision: str = "fp32",
             model: tuple[str, ...] = ("--model", "shapes-demo"), vocab: str = "shapes",
             extra: tuple[str, ...] = (),
             prefix: tuple[str, ...] = ("-m", "tagclip_cli")) -> subprocess.CompletedProcess:
    return run_tagclip("annotate", str(images), *model, "--vocab", vocab, "--out", str(out), "--device", device,
                       "--precision", precision, "--workers", "2", "--overwrite", *extra, cache=cache, prefix=prefix)


def segment(images: Path, root: Path, device: str, cache: Path, precision: str = "fp32") -> tuple[Path, Path]:
    """CLS-SEG (TagCLIP in the same pass) -> (tags Parquet, folder of label PNGs)."""
    root.mkdir(parents=True, exist_ok=True)
    tags, pngs = root / "tags.parquet", root / "labels"
    run_tagclip("segment", str(images), "--model", "shapes-demo", "--vocab", "shapes",
                "--out", str(root / "masks.json"), "--tags-out", str(tags), "--png-dir", str(pngs),
                "--device", device, "--precision", precision, "--workers", "2", "--overwrite", cache=cache)
    return tags, pngs


# ---- comparing outputs ----------------------------------------------------------------------------

@dataclass
class TagComparison:
    images: int
    same_tags: int
    max_score_diff: float
    differing: list[str]

    @property
    def tag_share(self) -> float:
        return self.same_tags / self.images


def read_tags(path: Path) -> dict[str, dict]:
    """{image_id: row} of a tags Parquet; every row must be ok."""
    rows = {r["image_id"]: r for r in pq.read_table(path).to_pylist()}
    bad = {k: r["error"] for k, r in rows.items() if r["status"] != "ok"}
    assert not bad, f"{path.name}: failed rows {bad}"
    return rows


def compare_tags(a: Path, b: Path) -> TagComparison:
    """Tag sets and scores of two tags Parquet files over the same images."""
    ra, rb = read_tags(a), read_tags(b)
    assert ra.keys() == rb.keys(), "the two runs cover different images"
    same, worst, differing = 0, 0.0, []
    for key, row in ra.items():
        other = rb[key]
        if sorted(row["tags"]) == sorted(other["tags"]):
            same += 1
        else:
            differing.append(f"{key}: {row['tags']} vs {other['tags']}")
        worst = max(worst, float(np.abs(np.asarray(row["scores"]) - np.asarray(other["scores"])).max()))
    return TagComparison(len(ra), same, worst, differing)


def compare_label_dirs(a: Path, b: Path) -> tuple[int, int, float]:
    """(agreeing pixels, pixels, worst per-image share) of two folders of label PNGs."""
    names = sorted(p.relative_to(a) for p in a.rglob("*.png"))
    assert names, f"no label PNGs in {a}"
    assert names == sorted(p.relative_to(b) for p in b.rglob("*.png")), "different label PNG files"
    agree = total = 0
    worst = 1.0
    for name in names:
        la, lb = np.asarray(Image.open(a / name)), np.asarray(Image.open(b / name))
        assert la.shape == lb.shape, f"{name}: {la.shape} vs {lb.shape}"
        same = int((la == lb).sum())
        agree, total = agree + same, total + la.size
        worst = min(worst, same / la.size)
    return agree, total, worst


def same_rows(a: Path, b: Path) -> None:
    """Two tags Parquet files with the same rows: identical tags, scores within SCORE_TOL."""
    ta, tb = pq.read_table(a), pq.read_table(b)
    assert ta.column_names == tb.column_names
    assert ta.num_rows == tb.num_rows
    cmp = compare_tags(a, b)
    assert cmp.same_tags == cmp.images, cmp.differing[:5]
    assert cmp.max_score_diff <= SCORE_TOL


# ---- inputs ---------------------------------------------------------------------------------------

def shapes_scenes(root: Path, count: int) -> Path:
    """count generated shapes scenes (224x224 PNGs); every third resized to 320x240 (JPEG)."""
    from tagclip_cli.synthetic import write_folder_dataset

    write_folder_dataset(root / "scenes", count, seed=17)
    images = root / "images"
    images.mkdir(parents=True, exist_ok=True)
    for i, path in enumerate(sorted((root / "scenes" / "images").glob("*.png"))):
        if i % 3 == 2:
            with Image.open(path) as im:
                im.convert("RGB").resize((320, 240), Image.BICUBIC).save(images / f"{path.stem}.jpg", quality=92)
        else:
            shutil.copy(path, images / path.name)
    return images


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cuda-cache")


@pytest.fixture(scope="module")
def scenes(tmp_path_factory) -> Path:
    return shapes_scenes(tmp_path_factory.mktemp("cuda-scenes"), SCENES)


@pytest.fixture(scope="module")
def fp32_tags(scenes, cache, tmp_path_factory) -> dict[str, Path]:
    """annotate in fp32 on each device: {device: tags Parquet}."""
    root = tmp_path_factory.mktemp("fp32-tags")
    out = {}
    for device in ("cpu", "cuda"):
        out[device] = root / f"{device}.parquet"
        annotate(scenes, out[device], device, cache)
    return out


@pytest.fixture(scope="module")
def seg_scenes(tmp_path_factory) -> Path:
    return shapes_scenes(tmp_path_factory.mktemp("cuda-seg-scenes"), SEG_SCENES)


@pytest.fixture(scope="module")
def fp32_segments(seg_scenes, cache, tmp_path_factory) -> dict[str, tuple[Path, Path]]:
    """segment (CLS-SEG) in fp32 on each device: {device: (tags Parquet, label PNG folder)}."""
    root = tmp_path_factory.mktemp("fp32-seg")
    return {device: segment(seg_scenes, root / device, device, cache) for device in ("cpu", "cuda")}


# ---- the tests ------------------------------------------------------------------------------------

@pytest.mark.cuda
def test_annotate_cuda_equals_cpu(fp32_tags):
    cmp = compare_tags(fp32_tags["cpu"], fp32_tags["cuda"])
    assert cmp.images == SCENES
    assert cmp.same_tags == cmp.images, cmp.differing[:5]
    assert cmp.max_score_diff <= SCORE_TOL, f"max |score(cuda) - score(cpu)| = {cmp.max_score_diff:.2e}"


@pytest.mark.cuda
def test_segment_cuda_equals_cpu(fp32_segments):
    (cpu_tags, cpu_png), (cuda_tags, cuda_png) = fp32_segments["cpu"], fp32_segments["cuda"]
    cmp = compare_tags(cpu_tags, cuda_tags)
    assert cmp.same_tags == cmp.images, cmp.differing[:5]
    assert cmp.max_score_diff <= SCORE_TOL
    agree, total, worst = compare_label_dirs(cpu_png, cuda_png)
    assert agree / total >= PIXEL_SHARE, f"label maps agree on {agree / total:.5f} of pixels (worst image {worst:.4f})"


@pytest.mark.cuda
@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_autocast_agrees_with_fp32(precision, scenes, seg_scenes, fp32_tags, fp32_segments, cache, tmp_path):
    out = tmp_path / f"{precision}.parquet"
    annotate(scenes, out, "cuda", cache, precision=precision)
    cmp = compare_tags(fp32_tags["cuda"], out)
    assert cmp.tag_share >= TAG_SHARE, f"{precision}: fp32 tags on {cmp.same_tags}/{cmp.images}: {cmp.differing[:5]}"
    tags, pngs = segment(seg_scenes, tmp_path / "seg", "cuda", cache, precision=precision)
    seg = compare_tags(fp32_segments["cuda"][0], tags)
    assert seg.tag_share >= TAG_SHARE, f"segment {precision}: fp32 tags on {seg.same_tags}/{seg.images}"
    agree, total, _ = compare_label_dirs(fp32_segments["cuda"][1], pngs)
    print(f"{precision}: label maps agree with fp32 on {agree / total:.4f} of pixels")  # reported, not a criterion


def big_images(root: Path, count: int) -> Path:
    """count shapes scenes upscaled to 1024x768 (JPEG)."""
    scenes = shapes_scenes(root / "src", count)
    out = root / "big"
    out.mkdir(parents=True, exist_ok=True)
    for path in sorted(scenes.iterdir()):
        with Image.open(path) as im:
            im.convert("RGB").resize((1024, 768), Image.BICUBIC).save(out / f"{path.stem}.jpg", quality=90)
    return out


@pytest.mark.cuda
def test_oom_splitter_finishes_under_a_memory_cap(tmp_path, cache):
    images = big_images(tmp_path / "big", 16)
    free = tmp_path / "uncapped.parquet"
    annotate(images, free, "cuda", cache, extra=("--batch-size", "16"))
    fraction = OOM_CAP_BYTES / torch.cuda.get_device_properties(0).total_memory
    # The cap must be set inside the process that runs the pipeline: run the CLI module there.
    code = ("import runpy, sys, torch; torch.cuda.set_per_process_memory_fraction(float(sys.argv.pop(1))); "
            "sys.argv[0] = 'tagclip'; runpy.run_module('tagclip_cli', run_name='__main__')")
    launcher = ("-c", code, f"{fraction:.6f}")
    capped = tmp_path / "capped.parquet"
    proc = annotate(images, capped, "cuda", cache, extra=("--batch-size", "16"), prefix=launcher)
    # faults.OomSplitter logs each split: without one the cap tested nothing.
    assert "out of memory" in proc.stderr.lower(), "the capped run never split a batch: lower OOM_CAP_BYTES"
    same_rows(free, capped)  # every image done, and the halves give what the full batch gave


@pytest.mark.cuda
def test_torchrun_one_process_writes_the_plain_output(scenes, fp32_tags, cache, tmp_path):
    out = tmp_path / "torchrun.parquet"
    annotate(scenes, out, "cuda", cache, prefix=("-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "1",
                                                 "-m", "tagclip_cli"))
    same_rows(fp32_tags["cuda"], out)
    plain, ranked = (pq.read_table(p).drop_columns(["scores"]).to_pylist() for p in (fp32_tags["cuda"], out))
    assert ranked == plain  # ids, paths, sizes, status, tags: the same


NCCL_SCRIPT = """
import os, torch, torch.distributed as dist
torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
dist.init_process_group(backend="cpu:gloo,cuda:nccl")  # the backend tagclip_cli.jobs.session joins with
got = [None] * dist.get_world_size()
dist.all_gather_object(got, {"rank": dist.get_rank()})
x = torch.ones(4, device="cuda")
dist.all_reduce(x)
assert got == [{"rank": 0}] and x.sum().item() == 4, (got, x)
dist.destroy_process_group()
print("nccl ok", torch.cuda.nccl.version())
"""


@pytest.mark.cuda
def test_nccl_process_group_under_torchrun(tmp_path, cache):
    """With one process jobs.session does not join a group (nothing to share), so the NCCL backend
    it uses for several ranks is checked here directly, with the collectives jobs/session.py calls."""
    script = tmp_path / "nccl_check.py"
    script.write_text(NCCL_SCRIPT)
    proc = run_tagclip(str(script), cache=cache,
                       prefix=("-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "1"))
    assert "nccl ok" in proc.stdout


# ---- the helpers, on CPU (not marked: runs everywhere) --------------------------------------------

@pytest.mark.slow
def test_comparison_helpers_cpu_against_cpu(tmp_path, cache):
    """The same helpers the CUDA tests use, on a CPU run and a copy of it: they agree fully, and a
    perturbed copy is caught (scores, tags, label pixels). One run: the CLI's determinism across
    runs is tests/e2e's business."""
    images = shapes_scenes(tmp_path / "scenes", 3)
    tags_a, png_a = segment(images, tmp_path / "a", "cpu", cache)
    tags_b, png_b = tmp_path / "b.parquet", tmp_path / "b-labels"
    shutil.copy(tags_a, tags_b)
    shutil.copytree(png_a, png_b)
    same_rows(tags_a, tags_b)
    cmp = compare_tags(tags_a, tags_b)
    assert (cmp.images, cmp.same_tags, cmp.tag_share) == (3, 3, 1.0)
    agree, total, worst = compare_label_dirs(png_a, png_b)
    assert agree == total and worst == 1.0

    table = pq.read_table(tags_b)
    rows = table.to_pylist()
    rows[0]["scores"] = [s + 1e-3 for s in rows[0]["scores"]]
    rows[1]["tags"] = [*rows[1]["tags"], "not-a-tag"]
    bad = tmp_path / "perturbed.parquet"
    pq.write_table(pa.Table.from_pylist(rows, schema=table.schema), bad)
    cmp = compare_tags(tags_a, bad)
    assert cmp.same_tags == 2 and cmp.max_score_diff == pytest.approx(1e-3, rel=1e-3)
    with pytest.raises(AssertionError):
        same_rows(tags_a, bad)

    first = sorted(png_b.rglob("*.png"))[0]
    with Image.open(first) as im:
        labels = np.asarray(im).copy()
    labels[:2] = labels[:2] + 1  # two rows of pixels change label
    Image.fromarray(labels).save(first)  # grayscale: the same values, as compare_label_dirs reads them
    agree, total, worst = compare_label_dirs(png_a, png_b)
    assert total - agree == 2 * labels.shape[1] and worst < 1.0
