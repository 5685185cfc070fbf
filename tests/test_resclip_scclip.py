"""ResCLIP and SC-CLIP (docs/algorithm.md §14, §15) against naive versions written here from their
descriptions: attention head by head with explicit softmax rows, PAMR pixel by pixel, the patch
labels, same-label paths, Gaussian rows, the local-outlier score and the outlier replacement by
loops, and each method's whole forward on open_clip's own blocks."""

from __future__ import annotations

import math
from collections import Counter

import numpy as np
import pytest
import torch
from test_dense_methods import naive_pos, naive_prior, naive_softmax_rows, two_head_clip

from tagclip_cli import methods
from tagclip_cli.backbone import Backbone
from tagclip_cli.errors import UsageError
from tagclip_cli.methods.resclip import (
    RESCLIP_PUBLISHED,
    ResClipSettings,
    _ResClipRun,
    gaussian_rows,
    pamr,
    patch_labels,
    same_label_paths,
    sfr_matrix,
    sfr_query_probs,
)
from tagclip_cli.methods.scclip import (
    ScClipSettings,
    lof_scores,
    outlier_mask,
    replace_outliers,
    scclip_tokens,
)
from tagclip_cli.quirks import Quirks
from tagclip_cli.vocab import load_vocabulary


@pytest.fixture(scope="module")
def model():
    return two_head_clip(layers=4)


@pytest.fixture(scope="module")
def backbone(model):
    import open_clip

    tokenizer = open_clip.get_tokenizer("ViT-B-16")
    return Backbone(model, tokenizer, "two-head", "random", torch.device("cpu"), None)


# ---- naive pieces -------------------------------------------------------------------------------

def qkv(block, x):
    """Per-head q, k, v lists of one image's tokens x (T, W) through block's ln_1 and in_proj."""
    mha = block.attn
    w = x.shape[-1]
    d = w // mha.num_heads
    y = block.ln_1(x)
    q = y @ mha.in_proj_weight[:w].T + mha.in_proj_bias[:w]
    k = y @ mha.in_proj_weight[w : 2 * w].T + mha.in_proj_bias[w : 2 * w]
    v = y @ mha.in_proj_weight[2 * w :].T + mha.in_proj_bias[2 * w :]
    split = [slice(h * d, (h + 1) * d) for h in range(mha.num_heads)]
    return [q[:, s] for s in split], [k[:, s] for s in split], [v[:, s] for s in split]


def mix_heads(block, probs, vs):
    out = torch.cat([p @ v for p, v in zip(probs, vs, strict=True)], dim=1)
    return out @ block.attn.out_proj.weight.T + block.attn.out_proj.bias


def embed_naive(visual, image):
    grid = (image.shape[-2] // 16, image.shape[-1] // 16)
    x = visual.conv1(image[None])[0].flatten(1).T
    x = torch.cat([visual.class_embedding[None], x]) + naive_pos(visual, grid)
    return visual.ln_pre(x), grid


def naive_pamr(image, mask, steps, dilations):
    """PAMR written per pixel: (K, H, W) image, (C, H, W) mask."""
    k, h, w = image.shape
    offsets = [(dy * d, dx * d) for d in dilations for dy in (-1, 0, 1) for dx in (-1, 0, 1) if (dy, dx) != (0, 0)]

    def at(t, y, x):
        return t[:, min(max(y, 0), h - 1), min(max(x, 0), w - 1)]

    aff = torch.zeros(len(offsets), h, w, dtype=torch.float64)
    for y in range(h):
        for x in range(w):
            centre = image[:, y, x].double()
            values = [at(image, y + oy, x + ox).double() for oy, ox in offsets] + [centre] * len(dilations)
            sigma = torch.stack(values).std(dim=0)
            scores = torch.stack([(-(centre - at(image, y + oy, x + ox).double()).abs() / (1e-8 + 0.1 * sigma)).mean()
                                  for oy, ox in offsets])
            aff[:, y, x] = torch.exp(scores - scores.max()) / torch.exp(scores - scores.max()).sum()
    m = mask.double()
    for _ in range(steps):
        new = torch.zeros_like(m)
        for y in range(h):
            for x in range(w):
                for n, (oy, ox) in enumerate(offsets):
                    new[:, y, x] += aff[n, y, x] * at(m, y + oy, x + ox)
        m = new
    return m


def naive_paths(labels, compat=False):
    gh, gw = labels.shape
    n = gh * gw
    max_steps = max(gh, gw) - 1
    out = torch.zeros(n, n, dtype=torch.bool)
    for i in range(n):
        for j in range(n):
            (ri, ci), (rj, cj) = divmod(i, gw), divmod(j, gw)
            steps = max(abs(ri - rj), abs(ci - cj))
            ok = True
            for s in range(steps + 1):
                t = (s / max_steps if max_steps else 0.0) if compat else (s / steps if steps else 0.0)
                r = round(ri * (1 - t) + rj * t)
                c = round(ci * (1 - t) + cj * t)
                ok &= bool(labels[r, c] == labels[ri, ci])
            out[i, j] = ok
    return out


def naive_sfr(labels, std, compat=False):
    gh, gw = labels.shape
    n = gh * gw
    paths = naive_paths(labels, compat)
    max_steps = max(gh, gw) - 1
    m = torch.zeros(n, n, dtype=torch.float64)
    for i in range(n):
        for j in range(n):
            if labels.flatten()[i] == labels.flatten()[j]:
                (ri, ci), (rj, cj) = divmod(i, gw), divmod(j, gw)
                m[i, j] = 1.0 if paths[i, j] else math.exp(-max(abs(ri - rj), abs(ci - cj)) / max_steps)
    size = min(n, int(6 * std + 1))
    size += 1 - size % 2
    g = [math.exp(-((t - size // 2) ** 2) / (2 * std * std)) for t in range(size)]
    g = [v / sum(g) for v in g]
    blurred = torch.zeros_like(m)
    for i in range(n):
        for j in range(n):
            blurred[i, j] = sum(g[t] * m[i, j + t - size // 2] for t in range(size) if 0 <= j + t - size // 2 < n)
    blurred = blurred / (blurred.sum(dim=1, keepdim=True) + 1e-8)
    out = torch.zeros(n + 1, n + 1, dtype=torch.float64)
    out[1:, 1:] = blurred
    return out / out.max()


# ---- ResCLIP pieces ------------------------------------------------------------------------------

def test_pamr_equals_pixel_by_pixel():
    torch.manual_seed(0)
    image, mask = torch.randn(1, 3, 6, 7), torch.randn(1, 4, 6, 7)
    ours = pamr(image, mask, steps=3, dilations=(1, 2))
    assert torch.allclose(ours[0].double(), naive_pamr(image[0], mask[0], 3, (1, 2)), atol=1e-5)


def test_patch_labels_are_the_mode_smallest_on_ties():
    torch.manual_seed(1)
    probs = torch.rand(5, 9, 13).softmax(dim=0)  # 3 x 4 patches of 3 px, one column and no row left over
    probs[:, 0, 0] = torch.tensor([0.05, 0.05, 0.1, 0.7, 0.1])
    ours = patch_labels(probs, 3, threshold=0.3)
    best, label = probs.max(dim=0)
    label[best < 0.3] = 0
    for r in range(3):
        for c in range(4):
            counts = Counter(label[3 * r : 3 * r + 3, 3 * c : 3 * c + 3].flatten().tolist())
            top = max(counts.values())
            assert ours[r, c] == min(v for v, n in counts.items() if n == top)


@pytest.mark.parametrize("compat", [False, True])
@pytest.mark.parametrize("grid", [(3, 4), (5, 2), (4, 4)])
def test_same_label_paths_equal_the_loops(compat, grid):
    torch.manual_seed(grid[0] * 10 + grid[1])
    labels = torch.randint(0, 2, grid)
    assert torch.equal(same_label_paths(labels, compat, chunk_points=50), naive_paths(labels, compat))


def test_paths_differ_with_the_quirk():
    labels = torch.tensor([[0, 0, 0, 1, 0, 0, 0]])
    fixed, compat = same_label_paths(labels), same_label_paths(labels, True)
    # 1 -> 4 crosses the 1 at 3; compat samples 1 + 3 k / 6 for k <= 3: 1, 2, 2, 2 (half to even)
    assert not fixed[1, 4] and compat[1, 4]


def test_gaussian_rows_equal_the_sum():
    torch.manual_seed(2)
    m = torch.rand(7, 40)
    ours = gaussian_rows(m, 2.0)
    size = 13
    g = torch.tensor([math.exp(-((t - 6) ** 2) / 8) for t in range(size)])
    g = g / g.sum()
    for i in range(7):
        for j in range(40):
            want = sum(g[t] * m[i, j + t - 6] for t in range(size) if 0 <= j + t - 6 < 40)
            assert abs(ours[i, j] - want) < 1e-5


@pytest.mark.parametrize("compat", [False, True])
def test_sfr_matrix_equals_the_naive_formula(compat):
    torch.manual_seed(3)
    labels = torch.randint(0, 3, (4, 5))
    ours = sfr_matrix(labels, std=1.5, reference_compat=compat)
    naive = naive_sfr(labels, 1.5, compat)
    if compat:  # quirk Q6: rounded through fp16
        assert torch.equal(ours, naive.float().half().float()) or torch.allclose(ours.double(), naive, atol=1e-3)
        assert torch.equal(ours, ours.half().float())
    else:
        assert torch.allclose(ours.double(), naive, atol=1e-6)
    assert ours[0].abs().sum() == 0 and ours[:, 0].abs().sum() == 0


def naive_resclip_block(block, x, layer_qk, base, grid, cfg, sfr=None, std=5.0):
    """ResCLIP's last block on one image's tokens x (T, W), head by head (layer_qk: per RCS layer
    the per-head (q, k) lists)."""
    qs, ks, vs = qkv(block, x)
    d = qs[0].shape[1]
    probs = []
    for h in range(len(qs)):
        logits = {"naclip": [ks[h] @ ks[h].T], "sclip": [qs[h] @ qs[h].T, ks[h] @ ks[h].T],
                  "clearclip": [qs[h] @ qs[h].T]}[base]
        p = 0
        for s in logits:
            s = s / math.sqrt(d)
            if sfr is not None:
                s = cfg.sfr_tau * ((1 - cfg.sfr_lambda) * s + cfg.sfr_lambda * sfr)
            if base == "naclip":
                s = s + naive_prior(grid, std).float()
            p = p + naive_softmax_rows(s)
        rcs = sum(naive_softmax_rows(q[h] @ k[h].T / math.sqrt(d)) for q, k in layer_qk) / len(layer_qk)
        probs.append(cfg.rcs_tau * ((1 - cfg.rcs_lambda) * p + cfg.rcs_lambda * rcs))
    out = mix_heads(block, probs, vs)
    if base != "sclip":
        return out
    x = x + out
    return x + block.mlp(block.ln_2(x))


def naive_resclip_tokens(visual, image, text, base, cfg, logit_scale):
    """ResCLIP's two passes for one normalised image (3, H, W), written out."""
    x, grid = embed_naive(visual, image)
    blocks = visual.transformer.resblocks
    layers = {}
    for i, block in enumerate(blocks[:-1]):
        layers[i] = qkv(block, x)[:2]
        x = block(x[None])[0]
    rcs_qk = [layers[i] for i in cfg.layers_for(len(blocks))]
    first = naive_resclip_block(blocks[-1], x, rcs_qk, base, grid, cfg)
    tokens = visual.ln_post(first[1:]) @ visual.proj
    probs = sfr_query_probs(tokens[None], text, image[None], grid, logit_scale, cfg)[0]
    sfr = naive_sfr(patch_labels(probs, 16, cfg.sfr_threshold), cfg.sfr_std).float()
    second = naive_resclip_block(blocks[-1], x, rcs_qk, base, grid, cfg, sfr)
    return visual.ln_post(second[1:]) @ visual.proj


@pytest.mark.parametrize("base", ["naclip", "sclip", "clearclip"])
def test_resclip_tokens_equal_the_naive_forward(model, backbone, base):
    torch.manual_seed(4)
    image = torch.randn(3, 48, 80)
    text = torch.nn.functional.normalize(torch.randn(6, 32), dim=-1)
    cfg = ResClipSettings(rcs_layers=(1, 2), sfr_threshold=0.2, sfr_std=2.0)
    config = methods.get("resclip").config("voc", base=base)
    import dataclasses

    config = dataclasses.replace(config, resclip=cfg)
    run = _ResClipRun(config, Quirks())
    with torch.no_grad():
        ours = run.window_tokens(backbone, image[None], text, config.settings)[0]
        naive = naive_resclip_tokens(model.visual, image, text, base, cfg, config.settings.logit_scale)
    assert torch.allclose(ours, naive, atol=1e-4), (ours - naive).abs().max()


def test_resclip_published_values_and_switches():
    m = methods.get("resclip")
    voc, coco = m.config("voc"), m.config("coco")
    assert (voc.settings.crop, voc.settings.logit_scale, voc.settings.prob_threshold) == (0, 40, 0.1)
    assert (coco.settings.crop, coco.settings.stride) == (224, 112)
    r = voc.resclip
    assert (r.rcs_tau, r.rcs_lambda, r.sfr_tau, r.sfr_lambda, r.sfr_threshold) == (2.0, 0.3, 2.2, 0.7, 0.5)
    assert (coco.resclip.rcs_lambda, coco.resclip.sfr_tau, coco.resclip.sfr_threshold) == (0.4, 1.8, 0.11)
    assert RESCLIP_PUBLISHED["voc20"].rcs_lambda == 0.6 and m.config("voc20").settings.prob_threshold == 0.0
    assert ResClipSettings().layers_for(12) == (5, 6, 7, 8) and ResClipSettings().layers_for(4) == (2,)
    assert m.config("voc", base="sclip").base == "sclip"
    with pytest.raises(UsageError):
        m.config("voc", base="maskclip")


def test_resclip_switches_and_quirk_q7(backbone):
    import dataclasses

    m = methods.get("resclip")
    switches = dataclasses.replace(RESCLIP_PUBLISHED["voc"], rcs=False, sfr=False)
    off = dataclasses.replace(m.config("voc"), resclip=switches)
    voc = load_vocabulary("voc")
    plain = m.build(backbone, voc, off, quirks=Quirks())
    compat = m.build(backbone, voc, off, quirks=Quirks.reference())
    assert not plain.method.config.resclip.rcs and compat.method.config.resclip.sfr
    naclip = methods.get("naclip")
    torch.manual_seed(5)
    crops = torch.randn(1, 3, 48, 48)
    with torch.no_grad():
        ours = plain.method.window_tokens(backbone, crops, plain.text, off.settings)
        base = naclip.window_tokens(backbone, crops, plain.text, off.settings)
    assert torch.allclose(ours, base, atol=1e-6)  # both switches off: NACLIP itself


# ---- SC-CLIP pieces ------------------------------------------------------------------------------

def naive_lof(x, k):
    n = x.shape[0]
    d = [[float(((x[i] - x[j]) ** 2).sum()) for j in range(n)] for i in range(n)]
    knn = [sorted(range(n), key=lambda j, i=i: (d[i][j], j))[1 : k + 1] for i in range(n)]
    kdist = [d[i][knn[i][-1]] for i in range(n)]
    lrd = [k / (sum(max(d[i][j], kdist[i]) for j in knn[i]) / k) for i in range(n)]
    return torch.tensor([sum(lrd[j] / lrd[i] for j in knn[i]) / k for i in range(n)])


def test_lof_scores_equal_the_loops():
    torch.manual_seed(6)
    x = torch.randn(40, 8)
    x[3] += 6  # an outlier
    ours = lof_scores(x, 5, chunk=100)
    assert torch.allclose(ours.double(), naive_lof(x.double(), 5).double(), rtol=1e-4)
    mask = outlier_mask(x, (5, 8), neighbours=5, share=0.05)
    assert mask.flatten()[3] and mask.sum() == 2  # 40 * 5% = 2 above the 95% quantile


def test_outlier_rows_quirk_q8():
    torch.manual_seed(7)
    x = torch.randn(12, 4)
    x[7] += 8  # patch 7 of a 2 x 6 grid = row 1, column 1
    fixed = outlier_mask(x, (2, 6), 5, 0.1)
    compat = outlier_mask(x, (2, 6), 5, 0.1, reference_compat=True)
    assert fixed[1, 1]
    assert not compat[1, 1]  # 7 // 2 = 3 rows down: outside the grid, dropped


def test_replace_outliers_equals_the_neighbour_mean():
    torch.manual_seed(8)
    tokens = torch.randn(12, 5)
    mask = torch.zeros(3, 4, dtype=torch.bool)
    mask[0, 0] = mask[0, 1] = mask[2, 3] = True
    ours = replace_outliers(tokens, mask)
    for i in range(12):
        r, c = divmod(i, 4)
        if not mask[r, c]:
            assert torch.equal(ours[i], tokens[i])
            continue
        near = [rr * 4 + cc for rr in range(r - 1, r + 2) for cc in range(c - 1, c + 2)
                if 0 <= rr < 3 and 0 <= cc < 4 and (rr, cc) != (r, c) and not mask[rr, cc]]
        assert torch.allclose(ours[i], tokens[near].mean(dim=0), atol=1e-6)


def naive_cos(t):
    u = t / t.norm(dim=-1, keepdim=True)
    return u @ u.T


def naive_aggregate(t, s, beta):
    w = torch.where(s < beta, torch.zeros_like(s), s)
    n = t.shape[0]
    return torch.stack([sum(w[i, j] * t[j] for j in range(n)) / (w[i].sum() + 1e-6) for i in range(n)])


def naive_scclip_attention(block, x, sim, scale):
    qs, ks, vs = qkv(block, x)
    d = ks[0].shape[1]
    m = (sim - sim.mean()) * scale
    m = torch.where(m < 0, torch.full_like(m, float("-inf")), m)
    probs = [(naive_softmax_rows(m) + naive_softmax_rows(k @ k.T / math.sqrt(d))) / 2 for k in ks]
    return mix_heads(block, probs, vs)


def naive_scclip_tokens(visual, image, cfg, n_layers):
    x, grid = embed_naive(visual, image)
    outs = []
    for block in visual.transformer.resblocks[:-1]:
        x = block(x[None])[0]
        outs.append(x)
    pre, post, multi = cfg.indices_for(n_layers)
    last = outs[-1]
    mask = outlier_mask(last[1:], grid, cfg.lof_neighbours, cfg.lof_share)
    patches, before = replace_outliers(last[1:], mask), replace_outliers(outs[pre][1:], mask)
    mid, after = naive_cos(before), naive_cos(outs[post][1:])
    block = visual.transformer.resblocks[-1]
    y = naive_aggregate(patches, mid, cfg.beta)
    y = naive_scclip_attention(block, y, mid, cfg.attn_scale) + cfg.res_cls * last[:1]
    y = naive_aggregate(y, after, cfg.beta)
    fused = sum(outs[i] for i in multi)
    f = naive_scclip_attention(block, fused[1:], mid, cfg.attn_scale) + cfg.res_cls * fused[:1]
    y = y + naive_aggregate(f, after, cfg.beta)
    return visual.ln_post(y) @ visual.proj


@pytest.mark.parametrize("size", [(64, 64), (48, 80)])
def test_scclip_tokens_equal_the_naive_forward(model, backbone, size):
    torch.manual_seed(9)
    images = torch.randn(2, 3, *size)
    cfg = ScClipSettings(pre_layer=2, post_layer=1, multi_layers=(1, 3), lof_neighbours=4, lof_share=0.2)
    with torch.no_grad():
        ours = scclip_tokens(backbone, images, cfg)
        for b in range(2):
            naive = naive_scclip_tokens(model.visual, images[b], cfg, 4)
            assert torch.allclose(ours[b], naive, atol=1e-4), (ours[b] - naive).abs().max()


def test_scclip_published_values():
    m = methods.get("scclip")
    voc, coco = m.config("voc"), m.config("coco")
    assert (voc.settings.crop, voc.settings.stride, voc.settings.logit_scale) == (224, 112, 50)
    assert (voc.settings.prob_threshold, voc.settings.area_threshold) == (0.15, 0.1)
    assert (coco.settings.logit_scale, coco.settings.prob_threshold, coco.settings.area_threshold) == (55, 0.35, None)
    s = voc.scclip
    assert (s.pre_layer, s.post_layer, s.multi_layers, s.res_cls) == (9, 4, (4, 10), 0.3)
    assert (s.beta, s.attn_scale) == (0.4, 3.0)
    assert s.indices_for(12) == (8, 3, (3, 4, 5, 6, 7, 8, 9))
    assert (s.lof_neighbours, s.lof_share) == (30, 0.05)


@pytest.mark.parametrize("name", ["resclip", "scclip"])
def test_methods_segment_an_image(tiny_backbone, name):
    from conftest import sample_photos

    rgb = sample_photos()["chelsea"][::4, ::4]
    m = methods.get(name)
    segs = m.build(tiny_backbone, load_vocabulary("voc"), m.config("voc"), quirks=Quirks())
    out = segs.segment([None], [rgb.shape[:2]], rgb=lambda i: rgb)[0]
    assert out.label_map.shape == rgb.shape[:2] and out.label_map.dtype == np.int32
    present = set(np.unique(out.label_map).tolist())
    assert present - {0} == set(out.mask_scores) - {0} and out.tags == sorted(c - 1 for c in present - {0})
