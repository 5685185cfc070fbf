"""The dense baselines SCLIP, ClearCLIP and NACLIP (docs/algorithm.md §12) against naive versions
written here from their equations: the last-block attention head by head with explicit softmax
sums, NACLIP's Gaussian prior by a double loop, the bicubic positional embedding tap by tap, the
window averaging and the per-pixel post-processing pixel by pixel."""

from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from tagclip_cli.backbone import Backbone
from tagclip_cli.backbone.encoder import custom_last_block, custom_last_block_forward, positional_embedding_bicubic
from tagclip_cli.errors import UsageError
from tagclip_cli.methods import configure, get
from tagclip_cli.methods.dense import (
    DenseConfig,
    DenseSettings,
    centre_padding,
    dense_label_map,
    dense_logits,
    dense_queries,
    keep_ratio_size,
    slide_windows,
)
from tagclip_cli.methods.naclip import neighbourhood_prior
from tagclip_cli.quirks import Quirks
from tagclip_cli.vocab import load_vocabulary, parse_vocabulary


def two_head_clip(seed: int = 0, layers: int = 3, image: int = 64):
    """A random open_clip CLIP with 2 heads of 32 channels, patch 16 (native grid 4 x 4)."""
    import open_clip

    torch.manual_seed(seed)
    vision = open_clip.model.CLIPVisionCfg(layers=layers, width=64, head_width=32, patch_size=16, image_size=image)
    text = open_clip.model.CLIPTextCfg(context_length=77, vocab_size=49408, width=64, heads=1, layers=1)
    return open_clip.model.CLIP(embed_dim=32, vision_cfg=vision, text_cfg=text, quick_gelu=True).eval()


DENSE_METHODS = ("sclip", "clearclip", "naclip")


def dense_last_block(block, x, method: str, grid, gaussian_std: float = 5.0):
    """The registered method's last block (its attention and residual rule) on tokens x (B, T, W)."""
    found = get(method)
    settings = dataclasses.replace(found.published["voc"], gaussian_std=gaussian_std)
    return custom_last_block(block, x, found.attention(settings), grid, found.keep_residual)


def dense_method_forward(visual, images, method: str, gaussian_std: float = 5.0):
    """The registered method's projected patch tokens (B, N, D) through the backbone's custom forward."""
    found = get(method)
    settings = dataclasses.replace(found.published["voc"], gaussian_std=gaussian_std)
    return custom_last_block_forward(visual, images, found.attention(settings), found.keep_residual).tokens


@pytest.fixture(scope="module")
def model():
    return two_head_clip()


# ---- naive versions ---------------------------------------------------------------------------------

def naive_softmax_rows(scores: torch.Tensor) -> torch.Tensor:
    out = torch.empty_like(scores)
    for i in range(scores.shape[0]):
        e = torch.exp(scores[i] - scores[i].max())
        out[i] = e / e.sum()
    return out


def naive_prior(grid: tuple[int, int], std: float) -> torch.Tensor:
    n = grid[0] * grid[1]
    out = torch.zeros(1 + n, 1 + n, dtype=torch.float64)
    for i in range(n):
        for j in range(n):
            (ri, ci), (rj, cj) = divmod(i, grid[1]), divmod(j, grid[1])
            out[1 + i, 1 + j] = math.exp(-((ri - rj) ** 2 + (ci - cj) ** 2) / (2 * std * std))
    return out


def naive_last_block(block, x: torch.Tensor, method: str, grid: tuple[int, int], std: float = 5.0) -> torch.Tensor:
    """One image's tokens x (T, W) through the method's last block, from the papers' equations."""
    mha = block.attn
    w = x.shape[-1]
    heads = mha.num_heads
    d = w // heads
    y = block.ln_1(x)
    q = y @ mha.in_proj_weight[:w].T + mha.in_proj_bias[:w]
    k = y @ mha.in_proj_weight[w : 2 * w].T + mha.in_proj_bias[w : 2 * w]
    v = y @ mha.in_proj_weight[2 * w :].T + mha.in_proj_bias[2 * w :]
    outs = []
    for h in range(heads):
        qh, kh, vh = q[:, h * d : (h + 1) * d], k[:, h * d : (h + 1) * d], v[:, h * d : (h + 1) * d]
        if method == "sclip":  # SCLIP: softmax(q q^T / sqrt(d)) + softmax(k k^T / sqrt(d))
            p = naive_softmax_rows(qh @ qh.T / math.sqrt(d)) + naive_softmax_rows(kh @ kh.T / math.sqrt(d))
        elif method == "clearclip":  # ClearCLIP: softmax(q q^T / sqrt(d))
            p = naive_softmax_rows(qh @ qh.T / math.sqrt(d))
        else:  # NACLIP: softmax(k k^T / sqrt(d) + Gaussian neighbourhood)
            p = naive_softmax_rows(kh @ kh.T / math.sqrt(d) + naive_prior(grid, std).float())
        outs.append(p @ vh)
    attn = torch.cat(outs, dim=1) @ mha.out_proj.weight.T + mha.out_proj.bias
    if method != "sclip":
        return attn  # ClearCLIP, NACLIP: no residual, no feed-forward
    x = x + attn
    return x + block.mlp(block.ln_2(x))


def cubic(t: float, a: float = -0.75) -> float:
    t = abs(t)
    if t <= 1:
        return ((a + 2) * t - (a + 3)) * t * t + 1
    if t < 2:
        return ((a * t - 5 * a) * t + 8 * a) * t - 4 * a
    return 0.0


def naive_bicubic_1d(values: torch.Tensor, out_size: int, scale: float) -> torch.Tensor:
    """Resample values (n, C) along n: source position (i + 0.5) / scale - 0.5, 4 cubic taps with
    border indices clamped."""
    n = values.shape[0]
    out = torch.zeros(out_size, values.shape[1], dtype=torch.float64)
    for i in range(out_size):
        src = (i + 0.5) / scale - 0.5
        base = math.floor(src)
        t = src - base
        for tap, weight in zip(range(base - 1, base + 3), (cubic(t + 1), cubic(t), cubic(1 - t), cubic(2 - t)),
                               strict=True):
            out[i] += weight * values[min(max(tap, 0), n - 1)].double()
    return out


def naive_pos(visual, grid: tuple[int, int]) -> torch.Tensor:
    pos = visual.positional_embedding.detach()
    g0 = math.isqrt(pos.shape[0] - 1)
    if grid == (g0, g0):
        return pos  # the trained grid: no interpolation
    table = pos[1:].reshape(g0, g0, -1)
    rows = torch.stack([naive_bicubic_1d(table[:, c], grid[0], (grid[0] + 0.1) / g0) for c in range(g0)], dim=1)
    full = torch.stack([naive_bicubic_1d(rows[r], grid[1], (grid[1] + 0.1) / g0) for r in range(grid[0])])
    return torch.cat([pos[:1].double(), full.reshape(grid[0] * grid[1], -1)]).float()


def naive_tokens(visual, image: torch.Tensor, method: str, std: float = 5.0) -> torch.Tensor:
    """(N, D) projected patch tokens of one normalised image (3, H, W): open_clip's own blocks
    1..L-1, the naive last block."""
    grid = (image.shape[-2] // 16, image.shape[-1] // 16)
    x = visual.conv1(image[None])[0].flatten(1).T  # (N, W)
    x = torch.cat([visual.class_embedding[None], x]) + naive_pos(visual, grid)
    x = visual.ln_pre(x)[None]
    for block in visual.transformer.resblocks[:-1]:
        x = block(x)
    x = naive_last_block(visual.transformer.resblocks[-1], x[0], method, grid, std)
    return visual.ln_post(x[1:]) @ visual.proj


# ---- the encoder ------------------------------------------------------------------------------------

def test_neighbourhood_prior_is_the_gaussian_of_grid_distance():
    assert torch.allclose(neighbourhood_prior((3, 4), 5.0).double(), naive_prior((3, 4), 5.0), atol=1e-7)
    assert torch.allclose(neighbourhood_prior((2, 5), 0.7).double(), naive_prior((2, 5), 0.7), atol=1e-7)


@pytest.mark.parametrize("grid", [(4, 4), (3, 6), (7, 5), (28, 21)])
def test_bicubic_positional_embedding_equals_tap_by_tap(model, grid):
    ours = positional_embedding_bicubic(model.visual, grid)
    assert ours.shape == (1 + grid[0] * grid[1], 64)
    assert torch.allclose(ours, naive_pos(model.visual, grid), atol=1e-5)


@pytest.mark.parametrize("method", DENSE_METHODS)
def test_last_block_equals_the_naive_formula(model, method):
    torch.manual_seed(1)
    grid = (3, 5)
    x = torch.randn(2, 1 + 15, 64)
    block = model.visual.transformer.resblocks[-1]
    with torch.no_grad():
        ours = dense_last_block(block, x, method, grid)
        for b in range(2):
            assert torch.allclose(ours[b], naive_last_block(block, x[b], method, grid), atol=1e-5)


@pytest.mark.parametrize("method", DENSE_METHODS)
@pytest.mark.parametrize("size", [(64, 64), (48, 80), (70, 40)])
def test_dense_forward_equals_the_naive_forward(model, method, size):
    torch.manual_seed(2)
    images = torch.randn(2, 3, *size)
    with torch.no_grad():
        ours = dense_method_forward(model.visual, images, method)
        for b in range(2):
            assert torch.allclose(ours[b], naive_tokens(model.visual, images[b], method), atol=1e-5)


def test_the_methods_differ_and_std_matters(model):
    images = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        outs = {m: dense_method_forward(model.visual, images, m) for m in DENSE_METHODS}
        wide = dense_method_forward(model.visual, images, "naclip", gaussian_std=50.0)
    assert not torch.allclose(outs["sclip"], outs["clearclip"], atol=1e-3)
    assert not torch.allclose(outs["clearclip"], outs["naclip"], atol=1e-3)
    assert not torch.allclose(wide, outs["naclip"], atol=1e-4)


# ---- geometry and post-processing -------------------------------------------------------------------

def test_keep_ratio_size_is_the_authors_rescale():
    assert keep_ratio_size(375, 500, 336) == (336, 448)
    assert keep_ratio_size(500, 333, 336) == (505, 336)  # 500 * 336 / 333 = 504.5 rounds up
    assert keep_ratio_size(375, 500, 448) == (448, 597)
    assert keep_ratio_size(100, 3000, 336, 2048) == (68, 2048)  # the long side caps the scale


def test_slide_windows_cover_the_image_and_end_at_the_border():
    windows = slide_windows(336, 448, 224, 112)
    assert windows == [(0, 224, 0, 224), (0, 224, 112, 336), (0, 224, 224, 448),
                       (112, 336, 0, 224), (112, 336, 112, 336), (112, 336, 224, 448)]
    assert slide_windows(336, 505, 224, 112)[-1] == (112, 336, 281, 505)
    assert slide_windows(100, 150, 224, 112) == [(0, 100, 0, 150)]  # small images: one clipped window
    assert slide_windows(336, 448, 0, 0) == [(0, 336, 0, 448)]
    for h, w in [(336, 505), (448, 597), (200, 300)]:
        cover = np.zeros((h, w), int)
        for y1, y2, x1, x2 in slide_windows(h, w, 224, 112):
            assert y2 - y1 == min(224, h) and x2 - x1 == min(224, w)
            cover[y1:y2, x1:x2] += 1
        assert cover.min() >= 1


def test_centre_padding():
    assert centre_padding(448, 448, 16) == (0, 0, 0, 0)
    assert centre_padding(100, 597, 16) == (5, 6, 6, 6)  # 597 -> 608, 100 -> 112


@pytest.mark.parametrize("pad", [False, True])
def test_window_average_equals_windows_one_by_one(model, pad):
    backbone = Backbone(model, None, "two-head", "random", torch.device("cpu"), None)
    torch.manual_seed(3)
    pixels = torch.randn(3, 72, 100)
    text = F.normalize(torch.randn(5, 32), dim=-1)
    settings = DenseSettings(short_side=72, crop=48, stride=24, logit_scale=50, prob_threshold=0.1, pad_crops=pad)
    with torch.no_grad():
        ours = dense_logits(backbone, pixels, text, get("sclip"), settings, chunk=2)
        total = torch.zeros(5, 72, 100)
        count = torch.zeros(72, 100)
        for y1, y2, x1, x2 in slide_windows(72, 100, 48, 24):
            crop = pixels[:, y1:y2, x1:x2]
            h, w = crop.shape[1:]
            left, right, top, bottom = centre_padding(h, w, 16) if pad else (0, 0, 0, 0)
            padded = F.pad(crop, (left, right, top, bottom))
            tokens = naive_tokens(model.visual, padded, "sclip")
            grid = (padded.shape[1] // 16, padded.shape[2] // 16)
            logits = (F.normalize(tokens, dim=-1) @ text.T).T.reshape(5, *grid)
            up = F.interpolate(logits[None], size=padded.shape[1:], mode="bilinear", align_corners=False)[0]
            total[:, y1:y2, x1:x2] += up[:, top : top + h, left : left + w]
            count[y1:y2, x1:x2] += 1
    assert torch.allclose(ours, total / count, atol=1e-5)


@pytest.mark.parametrize("method", DENSE_METHODS)
def test_a_sliver_thinner_than_a_patch_still_segments(tiny_backbone, method):
    seg = get(method).build(tiny_backbone, load_vocabulary("voc"), configure(method), quirks=Quirks())
    rgb = np.full((6, 2000, 3), 128, dtype=np.uint8)  # resized to 6 x 2048: thinner than one patch
    (out,) = seg.segment([torch.zeros(3, 16, 2000)], [(6, 2000)], rgb=lambda i: rgb)
    assert out.label_map.shape == (6, 2000)


@pytest.mark.parametrize("area", [None, 0.3])
def test_label_map_equals_pixel_by_pixel(area):
    torch.manual_seed(4)
    logits = torch.randn(6, 5, 7) * 0.1
    query_class = torch.tensor([0, 0, 1, 2, 2, 3])  # 4 labels; label 4 has no query
    settings = DenseSettings(short_side=1, crop=0, stride=0, logit_scale=40, prob_threshold=0.3, area_threshold=area)
    label_map, scores = dense_label_map(logits, query_class, 5, settings)
    probs = torch.zeros(5, 5, 7)
    for y in range(5):
        for x in range(7):
            p = naive_softmax_rows(40 * logits[:, y, x][None])[0]
            for label in range(5):
                members = [p[q] for q in range(6) if query_class[q] == label]
                probs[label, y, x] = max(members) if members else 0.0
    if area is not None:
        first = probs.argmax(dim=0)
        areas = [int((first == label).sum()) for label in range(1, 5)]
        for label in range(1, 5):
            if not areas[label - 1] > area * sum(areas):
                probs[label] = 0
    expected = np.zeros((5, 7), np.int32)
    values: dict[int, list[float]] = {}
    for y in range(5):
        for x in range(7):
            best = int(probs[:, y, x].argmax())
            top = float(probs[best, y, x])
            expected[y, x] = best if top >= 0.3 else 0
            values.setdefault(int(expected[y, x]), []).append(top)
    assert (label_map == expected).all()
    assert scores.keys() == {label for label in values if label > 0}
    for label, score in scores.items():
        assert score == pytest.approx(float(np.mean(values[label])), abs=1e-6)


# ---- queries, settings, segmenter and CLI ---------------------------------------------------------

def test_published_queries():
    voc, coco = load_vocabulary("voc"), load_vocabulary("coco")
    names, index = dense_queries("sclip", voc)
    assert len(names) == 56 and index.count(0) == 26 and max(index) == 20
    assert names[index.index(4)] == "ship" and names[index.index(11)] == "table"
    assert index.count(15) == 7 and index.count(20) == 5  # person, tv monitor
    assert dense_queries("naclip", voc) == (names, index)
    names, index = dense_queries("clearclip", voc)
    assert names[0] == "background" and len(names) == 21 and names[20] == "tvmonitor" and names[4] == "ship"
    names, index = dense_queries("sclip", coco)
    assert index.count(0) == 26 and index.count(1) == 8 and max(index) == 80
    assert "tv" in names and "dining table" in names and "airplane" in names
    names, index = dense_queries("clearclip", coco, use_background=False)
    assert len(names) == 80 and 0 not in index and names[3] == "motorcycle"


def test_own_vocabulary_queries_are_its_names():
    vocab = parse_vocabulary("cat\ndog = dog animal\n[background]\nfloor\nsky\n")
    assert dense_queries("sclip", vocab) == (("floor", "sky", "cat", "dog"), (0, 0, 1, 2))
    assert dense_queries("sclip", load_vocabulary("voc"), source="vocabulary")[0][-1] == "tvmonitor"


def test_published_settings_and_bad_values():
    assert configure("sclip").settings == DenseSettings.published("sclip", "voc")
    assert configure("naclip", "coco").settings.crop == 224
    assert configure("naclip", "voc").settings.crop == 0
    voc = DenseSettings.published("clearclip", "voc")
    assert (voc.short_side, voc.crop, voc.stride, voc.logit_scale, voc.prob_threshold) == (448, 448, 224, 50, 0.5)
    assert not isinstance(configure("clses"), DenseConfig)
    with pytest.raises(UsageError):
        DenseSettings(short_side=0, crop=0, stride=0, logit_scale=1, prob_threshold=0)
    with pytest.raises(UsageError):
        DenseSettings.published("maskclip", "voc")


@pytest.mark.parametrize("method", DENSE_METHODS)
def test_segmenter_runs_the_published_pipeline(tiny_backbone, method):
    voc = load_vocabulary("voc")
    seg = get(method).build(tiny_backbone, voc, configure(method), quirks=Quirks())
    assert seg.tagger is None  # no TagCLIP pass
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (75, 100, 3), dtype=np.uint8)
    (out,) = seg.segment([torch.zeros(3, 80, 112)], [(75, 100)], rgb=lambda i: rgb)
    assert out.label_map.shape == (75, 100) and out.label_map.dtype == np.int32
    assert set(np.unique(out.label_map)) - {0} == set(out.mask_scores) == {t + 1 for t in out.tags}
    assert all(0 < s <= 1 for s in out.mask_scores.values())
    with pytest.raises(ValueError, match="RGB"):
        seg.segment([torch.zeros(3, 80, 112)], [(75, 100)])


def test_segment_cli_runs_and_resumes(tmp_path, photo_dir, tiny_checkpoint, cache_dir):
    from typer.testing import CliRunner

    from tagclip_cli.cli import app

    images = tmp_path / "in"
    images.mkdir()
    for name, path in zip("ab", sorted(photo_dir.iterdir()), strict=False):
        Image.open(path).resize((120, 90)).save(images / f"{name}.png")
    out = tmp_path / "m.json"
    args = ["segment", str(images), "--vocab", "voc", "--method", "naclip", "--out", str(out), "--checkpoint",
            str(tiny_checkpoint), "--workers", "0", "--cache-dir", str(cache_dir), "--png-dir", str(tmp_path / "png")]
    first = CliRunner().invoke(app, [*args, "--shard", "0/2"])  # half the work, then an unsharded run finishes it
    assert first.exit_code == 0, first.output
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "skipped (already done)" in " ".join(result.output.split())  # resumed from the shard's parts
    doc = json.loads(out.read_text())
    info = doc["info"]["tagclip"]
    assert info["segment"]["method"] == "naclip" and info["segment"]["dense"]["logit_scale"] == 40
    assert info["tagclip"] is None
    assert len(doc["images"]) == 2 and {p.name for p in (tmp_path / "png").iterdir()} == {"a.png", "b.png"}


@pytest.mark.parametrize(
    ("extra", "message"),
    [(["--method", "sclip", "--crf"], "does not apply to --method sclip"),
     (["--method", "naclip", "--tags", "t.parquet"], "does not use them")],
)
def test_segment_cli_refuses_dense_combinations(tmp_path, extra, message):
    from typer.testing import CliRunner

    from tagclip_cli.cli import app

    Image.new("RGB", (32, 32)).save(tmp_path / "a.png")
    result = CliRunner().invoke(app, ["segment", str(tmp_path), "--vocab", "voc", "--out", str(tmp_path / "m.json"),
                                      *extra])
    assert result.exit_code == 2, result.output
    assert message in result.output and "Traceback" not in result.output
