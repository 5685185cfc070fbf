"""CLS-SEG and MaskCLIP (tagclip_cli/methods/clses.py, maskclip.py) and the mask writers:
hand-computed small tensors for every step, the batched Grad-CAM against a tag-by-tag loop, COCO
RLE round trips, the dense CRF on an image where it must change the mask.
(tests/test_naive_parity.py compares CLS-SEG with the naive per-tag implementation in
benchmarks/naive.py.)"""

from __future__ import annotations

import json
import sys
from fractions import Fraction
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import torch.nn.functional as F
from conftest import sample_photos  # noqa: E402
from PIL import Image

from tagclip_cli.cams import (
    CAM_EPS,
    CamRule,
    CrfUnavailableError,
    crf_label_map,
    label_map_from_cams,
    normalise_cam,
    require_crf,
    resize_bilinear,
)
from tagclip_cli.data import Preprocess
from tagclip_cli.errors import UsageError
from tagclip_cli.formats import TagsFile, rle_decode
from tagclip_cli.methods import configure
from tagclip_cli.methods.clses import (
    ClsSegConfig,
    ClsSegSegments,
    caa_affinity,
    caa_refine,
    caa_refine_squared,
    caa_transition,
    cam_box_mask,
    cam_box_masks,
    grad_cams,
    sinkhorn,
)
from tagclip_cli.methods.maskclip import MaskClipSegments, label_map_from_scores, maskclip_scores
from tagclip_cli.quirks import Quirks
from tagclip_cli.sources import ImageItem
from tagclip_cli.vocab import load_vocabulary
from tagclip_cli.writers import (
    label_png_path,
    mask_entries,
    rle_encode,
    segment_row,
    segment_schema,
    tag_row,
    tags_schema,
    voc_palette,
    write_coco_json,
    write_label_png,
)

# ---- config ---------------------------------------------------------------------------------------

@pytest.mark.parametrize(
    ("layers", "setting", "expected"),
    [(12, "voc", (5, 11)), (12, "coco", (5, 12)), (6, "voc", (1, 5)), (6, "coco", (1, 6)), (24, "voc", (17, 23))],
)
def test_caa_layers_follow_the_reference_and_clamp(layers, setting, expected):
    assert ClsSegConfig.for_setting(setting).layers_for(layers) == expected


def test_settings_and_bad_values():
    assert ClsSegConfig().box_threshold == 0.4
    assert ClsSegConfig.coco().box_threshold == 0.7
    with pytest.raises(UsageError, match="method"):
        configure("grabcut")
    with pytest.raises(UsageError, match="setting"):
        ClsSegConfig.for_setting("ade")
    with pytest.raises(UsageError, match="outside"):
        ClsSegConfig(caa_layers=(3, 20)).layers_for(12)


# ---- normalisation, Sinkhorn, CAA -----------------------------------------------------------------

def test_normalise_cam_is_the_reference_min_max_with_epsilon():
    cams = torch.tensor([[1.0, 2.0, 4.0], [5.0, 5.0, 5.0]], dtype=torch.float64)
    out = normalise_cam(cams)
    torch.testing.assert_close(out[0], torch.tensor([0.0, 1 / (3 + CAM_EPS), 3 / (3 + CAM_EPS)], dtype=torch.float64))
    assert out[1].tolist() == [0.0, 0.0, 0.0]  # a constant map is 0
    assert normalise_cam(cams, eps=0.0)[0].tolist() == [0.0, 1 / 3, 1.0]


def test_sinkhorn_one_round_by_hand():
    # columns [1,3] and [2,4] -> [1/4, 3/4], [1/3, 2/3]; rows then sum to 7/12 and 17/12
    a = torch.tensor([[1.0, 2.0], [3.0, 4.0]], dtype=torch.float64)
    t = sinkhorn(a, 1)
    expected = [[Fraction(3, 7), Fraction(4, 7)], [Fraction(9, 17), Fraction(8, 17)]]
    torch.testing.assert_close(t, torch.tensor([[float(v) for v in row] for row in expected], dtype=torch.float64))
    torch.testing.assert_close(t.sum(dim=1), torch.ones(2, dtype=torch.float64))
    torch.testing.assert_close(t.sum(dim=0), torch.tensor([114 / 119, 124 / 119], dtype=torch.float64))


def test_sinkhorn_rows_sum_to_one_and_columns_converge():
    gen = torch.Generator().manual_seed(0)
    a = torch.rand(5, 5, generator=gen, dtype=torch.float64) + 0.1
    three = sinkhorn(a, 3)
    torch.testing.assert_close(three.sum(dim=1), torch.ones(5, dtype=torch.float64))
    col_error = lambda t: (t.sum(dim=0) - 1).abs().max()  # noqa: E731
    assert col_error(sinkhorn(a, 1)) > col_error(three) > col_error(sinkhorn(a, 30))
    assert col_error(sinkhorn(a, 30)) < 1e-9
    doubly = torch.full((4, 4), 0.25, dtype=torch.float64)
    torch.testing.assert_close(sinkhorn(doubly, 3), doubly)


def test_transition_is_the_symmetrised_sinkhorn():
    a = torch.tensor([[1.0, 2.0], [3.0, 4.0]], dtype=torch.float64)
    t = caa_transition(a, rounds=1)
    torch.testing.assert_close(t, t.T)
    torch.testing.assert_close(t[0, 1], torch.tensor((4 / 7 + 9 / 17) / 2, dtype=torch.float64))
    torch.testing.assert_close(t[0, 0], torch.tensor(3 / 7, dtype=torch.float64))


def test_caa_refine_applies_the_squared_affinity_to_the_boxed_cam():
    t = torch.tensor([[0.5, 0.5, 0.0], [0.5, 0.25, 0.25], [0.0, 0.25, 0.75]], dtype=torch.float64)
    cams = torch.tensor([[1.0, 0.0, 1.0]], dtype=torch.float64)
    box = torch.tensor([[True, True, False]])
    # (T^2 with column 2 dropped) @ [1, 0, 1] = first column of T^2 = T @ [.5, .5, 0]
    torch.testing.assert_close(caa_refine(cams, t, box)[0], torch.tensor([0.5, 0.375, 0.125], dtype=torch.float64))
    full = torch.ones_like(box)
    torch.testing.assert_close(caa_refine(cams, t, full)[0], (t @ t) @ cams[0])
    torch.testing.assert_close(caa_refine(cams, t, full, power=1)[0], t @ cams[0])


def test_reference_order_refinement_is_float32_and_agrees_with_float64():
    """The reference_compat CAA: T @ T first, box columns kept, then each cam, in float32 (the
    reference's arithmetic); the same values as the float64 default on a well-conditioned case."""
    gen = torch.Generator().manual_seed(4)
    affinity = torch.rand(30, 30, generator=gen) + 0.05
    cams = torch.rand(3, 30, generator=gen)
    boxes = torch.rand(3, 30, generator=gen) > 0.3
    t32 = caa_transition(affinity, 3)
    ours32 = caa_refine_squared(cams, t32, boxes)
    assert ours32.dtype == torch.float32 and ours32.shape == (3, 30)
    exact = caa_refine(cams.double(), caa_transition(affinity.double(), 3), boxes)
    torch.testing.assert_close(ours32.double(), exact, rtol=1e-5, atol=0)
    by_hand = torch.stack([((t32 @ t32) * b.float()) @ c for c, b in zip(cams, boxes, strict=True)])
    torch.testing.assert_close(ours32, by_hand, rtol=1e-6, atol=0)
    assert caa_refine_squared(cams[:0], t32, boxes[:0]).shape == (0, 30)


def test_reference_compat_refines_in_float32_and_default_in_float64(tiny_backbone, voc, photos):
    tags = [0, 5]
    for compat in (False, True):
        seg = ClsSegSegments(tiny_backbone, voc, quirks=Quirks(compat), run_tagclip=False)
        dense = seg._dense(photos[:1])[0]
        raw, refined = seg.seg_cams(dense, tags)
        flat = raw.reshape(len(tags), -1)
        boxes = cam_box_masks(flat, dense.grid, seg.config.box_threshold, compat)
        affinity = caa_affinity(dense.attn, seg.layers, dense.attn_from)
        t64 = caa_transition(affinity.double(), seg.config.sinkhorn_rounds)
        in64 = normalise_cam(caa_refine(flat.double(), t64, boxes, 2), seg.config.rule.cam_eps).float()
        if compat:
            t = caa_transition(affinity.float(), seg.config.sinkhorn_rounds)
            expected = normalise_cam(caa_refine_squared(flat.float(), t, boxes), seg.config.rule.cam_eps)
            assert not torch.equal(expected, in64)  # float32 rounding shows ...
            assert (expected - in64).abs().max() < 1e-3  # ... but it is rounding only
        else:
            expected = in64
        assert torch.equal(refined.reshape(len(tags), -1), expected)


def test_cam_box_mask_uses_the_8bit_rule_without_renormalising():
    cam = torch.zeros(6, 8)
    cam[1:3, 1:3] = 0.999999  # 8-bit 254 (the eps-normalised maximum), not 255
    cam[4, 6] = 0.4  # 8-bit 102: above 0.4 * 254 = 101.6 -> 101, but not above 0.4 * 255 = 102
    mask = cam_box_mask(cam, 0.4)
    expected = torch.zeros(6, 8, dtype=torch.bool)
    expected[1:3, 1:3] = True
    expected[4, 6] = True
    assert torch.equal(mask, expected)
    # a blob at the bottom-right border: the reference clamps the exclusive end, dropping the last row/column
    cam = torch.zeros(4, 4)
    cam[2:4, 2:4] = 1.0
    assert cam_box_mask(cam, 0.4).sum() == 4
    compat = cam_box_mask(cam, 0.4, reference_compat=True)
    assert compat.sum() == 1 and compat[2, 2]


def test_box_mask_is_the_union_of_all_contour_boxes():
    cam = torch.zeros(7, 7)
    cam[1, 1:4] = 1.0  # an L shape: its box is rows 1..3, cols 1..3
    cam[1:4, 1] = 1.0
    cam[5, 5] = 1.0  # a second blob
    mask = cam_box_mask(cam, 0.4)
    assert mask[1:4, 1:4].all() and mask[5, 5] and mask.sum() == 10


# ---- resizing and label maps ----------------------------------------------------------------------

@pytest.mark.parametrize(("src", "dst"), [((3, 4), (48, 64)), ((5, 7), (37, 90)), ((8, 8), (5, 3)), ((2, 3), (2, 3))])
def test_resize_bilinear_equals_interpolate(src, dst):
    maps = torch.rand(3, *src, generator=torch.Generator().manual_seed(1))
    ref = F.interpolate(maps[None], size=dst, mode="bilinear", align_corners=False)[0]
    torch.testing.assert_close(resize_bilinear(maps, dst), ref, atol=1e-6, rtol=0)
    band = slice(1, dst[0] - 1)
    torch.testing.assert_close(resize_bilinear(maps, dst, band), ref[:, band], atol=1e-6, rtol=0)


def test_label_map_rule_foreground_iff_best_cam_above_half():
    # maps at the output size (the resize is the identity): 4 pixels, 2 tags (vocabulary classes 3 and 7)
    cams = torch.tensor([[[0.6, 0.5, 0.2, 0.9]], [[0.1, 0.3, 0.45, 0.95]]])
    labels, scores = label_map_from_cams(cams, [4, 8], (1, 4))
    # pixel 0: 0.6 > bg 0.4 -> tag 0; pixel 1: 0.5 ties the background -> background;
    # pixel 2: best 0.45 < 0.55 -> background; pixel 3: 0.95 beats 0.9 and bg 0.05 -> tag 1
    assert labels.tolist() == [[4, 0, 0, 8]]
    assert scores == pytest.approx({4: 0.6, 8: 0.95})
    squared, _ = label_map_from_cams(cams, [4, 8], (1, 4), background_power=2.0)  # bg (1-0.45)^2 = 0.3025
    assert squared.tolist() == [[4, 4, 8, 8]]
    empty, none = label_map_from_cams(torch.zeros(0, 1, 4), [], (1, 4))
    assert empty.tolist() == [[0, 0, 0, 0]] and none == {}


def test_label_map_bands_equal_one_pass(monkeypatch):
    import tagclip_cli.cams as seg

    cams = torch.rand(3, 6, 9, generator=torch.Generator().manual_seed(2))
    whole, whole_scores = label_map_from_cams(cams, [1, 2, 3], (61, 83))
    monkeypatch.setattr(seg, "ROW_CHUNK_PIXELS", 83 * 3 * 4)  # bands of 4 rows
    banded, banded_scores = label_map_from_cams(cams, [1, 2, 3], (61, 83))
    assert np.array_equal(whole, banded)
    assert whole_scores == pytest.approx(banded_scores)
    # the mask score is the mean upsampled cam over the mask
    up = resize_bilinear(cams, (61, 83)).numpy()
    for label, score in whole_scores.items():
        assert score == pytest.approx(float(up[label - 1][whole == label].mean()), rel=1e-6)


# ---- MaskCLIP -------------------------------------------------------------------------------------

def test_maskclip_scores_denoising_and_key_smoothing():
    text = torch.eye(3)  # classes = axes
    feats = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [1.0, 0.1, 0.0]])
    logits, probs = maskclip_scores(feats, text, 100.0)
    torch.testing.assert_close(logits, F.normalize(feats, dim=-1))
    assert probs.argmax(dim=1).tolist() == [0, 1, 0]
    # class 2 never wins anywhere: its best probability is tiny -> dropped (-100)
    denoised, _ = maskclip_scores(feats, text, 100.0, prompt_denoising=0.5)
    assert (denoised[:, 2] == -100).all() and torch.equal(denoised[:, :2], logits[:, :2])
    # orthogonal keys: smoothing is the identity; identical keys: every patch gets the sum
    smooth, p = maskclip_scores(feats, text, 100.0, keys=torch.eye(3), key_smoothing=1.0)
    torch.testing.assert_close(smooth, p)
    smooth, p = maskclip_scores(feats, text, 100.0, keys=torch.ones(3, 4), key_smoothing=1.5)
    torch.testing.assert_close(smooth, p.sum(dim=0, keepdim=True).expand(3, 3))
    # only patches whose best probability is below the threshold are smoothed
    partial, p = maskclip_scores(feats, text, 100.0, keys=torch.ones(3, 4), key_smoothing=0.0)
    torch.testing.assert_close(partial, p)


def test_label_map_from_scores_maps_background_classes_to_zero():
    # 2x2 grid, classes: fg 0, fg 1, background 2
    scores = torch.tensor([[0.9, 0.1, 0.0], [0.1, 0.8, 0.0], [0.0, 0.1, 0.7], [0.6, 0.0, 0.1]])
    labels, mean = label_map_from_scores(scores, (2, 2), [1, 2, 0], (2, 2))
    assert labels.tolist() == [[1, 2], [0, 1]]
    assert mean == pytest.approx({1: 0.75, 2: 0.8})


# ---- the dense CRF --------------------------------------------------------------------------------

def test_crf_snaps_a_leaking_mask_to_the_colour_edge():
    import pydensecrf.densecrf  # noqa: F401  (the crf extra is part of .[dev]: a missing one fails here)
    h, w = 40, 60
    rgb = np.zeros((h, w, 3), np.uint8)
    rgb[:, :30] = (220, 30, 30)  # red object on the left, blue background on the right
    rgb[:, 30:] = (30, 30, 220)
    cam = torch.zeros(1, h, w)
    cam[0, 8:32, 6:40] = 0.8  # the cam leaks 10 columns into the blue half
    plain, _ = label_map_from_cams(cam, [5], (h, w))
    crf, scores = crf_label_map(rgb, cam, [5], CamRule())
    assert (plain[:, 30:40] == 5).sum() == 24 * 10
    assert (crf[:, 30:] == 5).sum() == 0  # the leak is gone
    assert np.array_equal(crf[:, :30], plain[:, :30])  # the red part is kept
    assert scores == pytest.approx({5: 0.8})


def test_missing_crf_extra_is_one_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "pydensecrf", None)  # import fails as if not installed
    monkeypatch.setitem(sys.modules, "pydensecrf.densecrf", None)
    with pytest.raises(CrfUnavailableError, match=r"pip install 'tagclip-cli\[crf\]'") as info:
        require_crf()
    assert "\n" not in str(info.value) and info.value.exit_code == 2


# ---- model tests (tiny random CLIP) ---------------------------------------------------------------

@pytest.fixture(scope="module")
def voc():
    return load_vocabulary("voc")


@pytest.fixture(scope="module")
def photos(tiny_backbone):
    pre = Preprocess(tiny_backbone.patch_size, tiny_backbone.mean, tiny_backbone.std)
    arrays = list(sample_photos().values())
    sizes = [(200, 150), (150, 200), (170, 131)]
    return [pre(Image.fromarray(arrays[i]).resize(size)) for i, size in enumerate(sizes)]


@pytest.fixture(scope="module")
def segmenter(tiny_backbone, voc):
    return ClsSegSegments(tiny_backbone, voc)


def _cam_one_tag(backbone, pre_last, text, k):
    """Grad-CAM of target k with its own forward and its own backward call (the reference's loop)."""
    out, ln1, _ = backbone.block_forward_ln1_leaf(backbone.num_layers - 1, pre_last.clone()[None])
    pooled = backbone.project_tokens(out[:, 1:]).mean(dim=1)
    probs = (backbone.logit_scale * F.normalize(pooled, dim=-1) @ text.T).softmax(dim=-1)[0]
    probs[k].backward()
    weights = ln1.grad[0, 1:].mean(dim=0)
    return torch.relu((ln1.detach()[0, 1:] * weights).sum(dim=-1))


def test_batched_cams_equal_tag_by_tag(tiny_backbone, segmenter, photos):
    dense = segmenter._dense(photos[:1])[0]
    tags = [0, 3, 7, 14, 19]
    rows = torch.tensor([*tags, *range(20, 45)])
    text = segmenter.text[rows].clone()
    batched = grad_cams(tiny_backbone, dense.pre_last.clone(), text, len(tags), batch=16)  # one backward
    with torch.enable_grad():
        one_by_one = torch.stack([_cam_one_tag(tiny_backbone, dense.pre_last.clone(), text, k)
                                  for k in range(len(tags))])
    assert batched.shape == (len(tags), dense.grid[0] * dense.grid[1])
    assert batched.abs().max() > 0
    torch.testing.assert_close(batched, one_by_one, atol=1e-5 * float(batched.abs().max()), rtol=0)
    chunked = grad_cams(tiny_backbone, dense.pre_last.clone(), text, len(tags), batch=2)  # 3 backward calls
    torch.testing.assert_close(chunked, batched, atol=1e-6 * float(batched.abs().max()), rtol=0)
    # each cam really depends on its own target: two different tags give different maps
    assert not torch.allclose(normalise_cam(batched[:1]), normalise_cam(batched[1:2]))


def test_grad_cams_work_inside_inference_mode(tiny_backbone, segmenter, photos):
    dense = segmenter._dense(photos[:1])[0]
    rows = torch.tensor([2, *range(20, 45)])
    outside = grad_cams(tiny_backbone, dense.pre_last, segmenter.text[rows], 1)
    with torch.inference_mode():  # the pipeline runs under inference_mode
        inside = grad_cams(tiny_backbone, dense.pre_last, segmenter.text[rows], 1)
    torch.testing.assert_close(inside, outside)


def test_segment_shares_one_dense_forward_and_tags_input_gives_the_same_masks(tiny_backbone, voc, photos, monkeypatch):
    seg = ClsSegSegments(tiny_backbone, voc)
    calls = []
    original = tiny_backbone.dense_forward

    def counting(pixels, *args, **kwargs):
        calls.append(pixels.shape[0])
        return original(pixels, *args, **kwargs)

    monkeypatch.setattr(tiny_backbone, "dense_forward", counting)
    sizes = [(150, 200), (200, 150), (131, 170)]  # (height, width): the label maps' size
    first = seg.segment(photos, sizes)
    assert sum(calls) == len(photos)  # TagCLIP's dense forward is the only one
    tags = [out.tag_output.tags for out in first]
    calls.clear()
    again = ClsSegSegments(tiny_backbone, voc, run_tagclip=False).segment(photos, sizes, tags=tags)
    assert sum(calls) == len(photos)
    for a, b, size, image_tags in zip(first, again, sizes, tags, strict=True):
        assert a.label_map.shape == size and a.label_map.dtype == np.int32
        assert set(np.unique(a.label_map)) <= {0, *(t + 1 for t in image_tags)}
        assert np.array_equal(a.label_map, b.label_map)
        assert a.mask_scores == pytest.approx(b.mask_scores)
        assert set(a.mask_scores) == set(np.unique(a.label_map)) - {0}


def test_maskclip_segmenter_uses_the_value_path_logits(tiny_backbone, voc, photos):
    seg = MaskClipSegments(tiny_backbone, voc)
    size = tuple(photos[0].shape[-2:])  # label map at the model's input size: 16 pixels per patch
    out = seg.segment(photos[:1], [size])[0]
    dense = out.tag_output.dense
    logits = F.normalize(dense.tokens[1:], dim=-1) @ seg.text.T  # (N, 45)
    nf = voc.num_classes
    grid_labels = torch.where(logits.argmax(dim=1) < nf, logits.argmax(dim=1) + 1, 0).reshape(dense.grid)
    # at the patch centres the upsampled scores are 97% the patch's own: the argmax agrees almost everywhere
    centres = out.label_map[8::16, 8::16]
    assert (torch.from_numpy(centres) == grid_labels).float().mean() > 0.9
    assert out.tags == sorted(label - 1 for label in out.mask_scores)
    for value in out.mask_scores.values():
        assert 0.0 < value <= 1.0  # a softmax probability


# ---- writers: RLE, PNG, COCO JSON -----------------------------------------------------------------

def test_rle_of_a_rectangle():
    mask = np.zeros((7, 9), bool)
    mask[2:5, 3:7] = True
    rle = rle_encode(mask)
    assert rle["size"] == [7, 9] and isinstance(rle["counts"], str)
    (entry,) = mask_entries(mask.astype(np.int32) * 3, {3: 0.25})
    assert entry["category_id"] == 3 and entry["area"] == 12
    assert entry["bbox"] == [3.0, 2.0, 4.0, 3.0] and entry["score"] == 0.25
    assert entry["counts"] == rle["counts"]


@pytest.mark.parametrize("shape", [(1, 1), (1, 17), (13, 1), (31, 47), (64, 64)])
def test_rle_round_trip_equals_the_label_map(shape):
    gen = np.random.default_rng(sum(shape))
    coarse = gen.integers(0, 5, size=(max(1, shape[0] // 4), max(1, shape[1] // 4)))
    labels = np.kron(coarse, np.ones((4, 4), int))[: shape[0], : shape[1]]
    labels = np.pad(labels, ((0, shape[0] - labels.shape[0]), (0, shape[1] - labels.shape[1])), mode="edge")
    labels[gen.random(shape) < 0.05] = 7  # speckle
    entries = mask_entries(labels, {})
    rebuilt = np.zeros(shape, int)
    for entry in entries:
        mask = rle_decode(entry["counts"], *shape)
        assert entry["area"] == mask.sum()
        assert not rebuilt[mask].any()  # masks of one image never overlap
        rebuilt[mask] = entry["category_id"]
    assert np.array_equal(rebuilt, labels)
    assert [e["category_id"] for e in entries] == sorted(set(np.unique(labels)) - {0})


def test_label_png_palette_and_path(tmp_path):
    palette = voc_palette()
    assert palette[:9] == [0, 0, 0, 128, 0, 0, 0, 128, 0]
    assert palette[255 * 3 : 256 * 3] == [224, 224, 192]
    labels = np.array([[0, 1, 20], [15, 0, 3]], np.int32)
    path = label_png_path(tmp_path, "sub/dir/photo.v1.JPG")
    assert path == tmp_path / "sub/dir/photo.v1.png"
    write_label_png(labels, path)
    with Image.open(path) as image:
        assert image.mode == "P" and image.getpalette()[:6] == [0, 0, 0, 128, 0, 0]
        assert np.array_equal(np.asarray(image), labels)
    big = np.array([[0, 300]], np.int32)  # more than 255 classes: 16-bit grayscale
    write_label_png(big, tmp_path / "big.png")
    with Image.open(tmp_path / "big.png") as image:
        assert np.array_equal(np.asarray(image).astype(int), big)
    assert label_png_path(tmp_path, "../../etc/x.jpg") == tmp_path / "__/__/etc/x.png"
    assert label_png_path(tmp_path, "/abs/y.png") == tmp_path / "abs/y.png"


def _segment_rows(classes):
    items = [ImageItem(0, "a.jpg", "/in/a.jpg"), ImageItem(1, "b.jpg", "/in/b.jpg"), ImageItem(2, "c.jpg", "/in/c.jpg")]
    a = np.zeros((4, 5), np.int32)
    a[1:3, 1:4] = 2
    a[3, 4] = 1
    c = np.full((2, 3), 1, np.int32)
    scores = [0.1 * (i + 1) for i in range(len(classes))]
    return [
        segment_row(items[0], 5, 4, None, ["dog"], scores, mask_entries(a, {1: 0.9, 2: 0.8})),
        segment_row(items[1], None, None, "truncated image"),
        segment_row(items[2], 3, 2, None, ["cat"], scores, mask_entries(c, {1: 0.7})),
    ], [a, None, c]


def test_coco_json_loads_in_pycocotools_and_round_trips(tmp_path):
    from pycocotools.coco import COCO

    classes = ["cat", "dog", "bird"]
    config = {"tool": "tagclip-cli", "tool_version": "0", "classes": classes}
    schema = segment_schema(config)
    rows, maps = _segment_rows(classes)
    tables = [pa.Table.from_pylist(rows[:2], schema=schema), pa.Table.from_pylist(rows[2:], schema=schema)]
    out = tmp_path / "masks.json"
    assert write_coco_json(iter(tables), out, schema, tags_out=tmp_path / "tags.parquet") == 3
    assert not list(tmp_path.glob(".*"))  # no temporary or spool file left
    coco = COCO(str(out))
    assert [c["id"] for c in coco.loadCats(coco.getCatIds())] == [1, 2, 3]
    assert sorted(coco.getImgIds()) == [0, 1, 2]
    for image_id, label_map in ((0, maps[0]), (2, maps[2])):
        rebuilt = np.zeros_like(label_map)
        for ann in coco.loadAnns(coco.getAnnIds(imgIds=[image_id])):
            assert ann["iscrowd"] == 0 and isinstance(ann["segmentation"]["counts"], str)
            rebuilt[coco.annToMask(ann) > 0] = ann["category_id"]
        assert np.array_equal(rebuilt, label_map)
    failed = coco.imgs[1]
    assert failed["tagclip_status"] == "failed" and failed["tagclip_error"] == "truncated image"
    assert coco.getAnnIds(imgIds=[1]) == []
    doc = json.loads(out.read_text())
    assert [a["id"] for a in doc["annotations"]] == [1, 2, 3]
    assert [a["score"] for a in doc["annotations"]] == pytest.approx([0.9, 0.8, 0.7])
    assert doc["images"][0]["tagclip_tags"] == ["dog"] and doc["images"][0]["file_name"] == "a.jpg"
    tags = pq.read_table(tmp_path / "tags.parquet")
    assert tags.schema.names == tags_schema().names
    assert tags.column("tags").to_pylist() == [["dog"], [], ["cat"]]
    assert json.loads(tags.schema.metadata[b"tagclip"])["classes"] == classes


def test_coco_json_uses_manifest_ids(tmp_path):
    schema = segment_schema({"classes": ["cat"]})
    item = ImageItem(0, "139", "/coco/000000000139.jpg", coco_id=139)
    row = segment_row(item, 2, 2, None, ["cat"], [0.5], mask_entries(np.ones((2, 2), np.int32), {1: 0.6}))
    write_coco_json([pa.Table.from_pylist([row], schema=schema)], tmp_path / "m.json", schema)
    doc = json.loads((tmp_path / "m.json").read_text())
    assert doc["images"][0]["id"] == 139 and doc["annotations"][0]["image_id"] == 139


# ---- tags from a file -----------------------------------------------------------------------------

def _tags_parquet(path, classes, rows):
    schema = tags_schema({"classes": classes})
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), path)


def test_tags_file_lookup(tmp_path, voc):
    items = [ImageItem(0, "a.jpg", "a.jpg"), ImageItem(1, "b.jpg", "b.jpg"), ImageItem(2, "c.jpg", "c.jpg")]
    scores = [0.0] * voc.num_classes
    rows = [
        tag_row(items[1], 10, 10, None, ["dog", "person"], scores),  # other order than the inputs
        tag_row(items[0], 10, 10, None, ["cat"], scores),
        tag_row(items[2], None, None, "truncated image"),
    ]
    path = tmp_path / "labels.parquet"
    _tags_parquet(path, list(voc.classes), rows)
    tags = TagsFile(path, voc)
    assert tags.lookup(items[0]).tags == [voc.classes.index("cat")]
    assert tags.lookup(items[1]).names == ["dog", "person"]
    assert "truncated image" in tags.lookup(items[2]).error
    assert "no tags" in tags.lookup(ImageItem(3, "d.jpg", "d.jpg")).error
    _tags_parquet(tmp_path / "coco.parquet", ["person", "bicycle"], [])
    with pytest.raises(UsageError, match="other classes"):
        TagsFile(tmp_path / "coco.parquet", voc)
    (tmp_path / "junk.parquet").write_text("not parquet")
    with pytest.raises(UsageError, match="not a tags Parquet"):
        TagsFile(tmp_path / "junk.parquet", voc)


def test_segmenter_refuses_crf_without_the_extra(tiny_backbone, voc, monkeypatch):
    monkeypatch.setitem(sys.modules, "pydensecrf", None)
    monkeypatch.setitem(sys.modules, "pydensecrf.densecrf", None)
    with pytest.raises(CrfUnavailableError):
        ClsSegSegments(tiny_backbone, voc, ClsSegConfig(crf=True))


def test_crf_segmenter_needs_rgb_and_uses_it(tiny_backbone, voc, photos):
    import pydensecrf.densecrf  # noqa: F401  (the crf extra is part of .[dev]: a missing one fails here)
    seg = ClsSegSegments(tiny_backbone, voc, ClsSegConfig(crf=True))
    size = tuple(photos[0].shape[-2:])
    rgb = np.asarray(Image.fromarray(list(sample_photos().values())[0]).resize((size[1], size[0])))
    out = seg.segment(photos[:1], [size], tags=[[14]], rgb=lambda i: rgb)[0]
    assert out.label_map.shape == size and set(np.unique(out.label_map)) <= {0, 15}
    with pytest.raises(ValueError, match="RGB"):
        seg.segment(photos[:1], [size], tags=[[14]])


# ---- CLI checks before any work -------------------------------------------------------------------

@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--method", "grabcut"], "--method must be one of clses, maskclip"),
        (["--method", "maskclip", "--crf"], "--crf refines CLS-SEG cams"),
        (["--setting", "ade"], "--setting must be one of voc, coco, cocostuff"),
        (["--key-smoothing"], "MaskCLIP options"),
        (["--tags", "x.parquet", "--tags-out", "y.parquet"], "--tags-out"),
    ],
)
def test_segment_cli_refuses_bad_combinations(tmp_path, extra, message):
    from typer.testing import CliRunner

    from tagclip_cli.cli import app

    Image.new("RGB", (32, 32)).save(tmp_path / "a.png")
    result = CliRunner().invoke(app, ["segment", str(tmp_path), "--vocab", "voc", "--out",
                                      str(tmp_path / "m.json"), *extra])
    assert result.exit_code == 2, result.output
    assert message in result.output and "Traceback" not in result.output
    assert not (tmp_path / "m.json.parts").exists()


def test_segment_cli_missing_crf_extra(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from tagclip_cli.cli import app

    monkeypatch.setitem(sys.modules, "pydensecrf", None)
    monkeypatch.setitem(sys.modules, "pydensecrf.densecrf", None)
    Image.new("RGB", (32, 32)).save(tmp_path / "a.png")
    result = CliRunner().invoke(app, ["segment", str(tmp_path), "--vocab", "voc", "--out", str(tmp_path / "m.json"),
                                      "--crf"])
    assert result.exit_code == 2
    assert "pip install 'tagclip-cli[crf]'" in result.output  # brackets survive the rich markup


def test_segment_config_reads_back_equal(tiny_backbone, voc):
    """config.json must compare equal on resume: no tuples (JSON gives lists back)."""
    from tagclip_cli.pipeline import ModelOptions, SegmentOptions, segment_config
    from tagclip_cli.tagclip import TagCLIPConfig

    opts = SegmentOptions(items=[], vocab=voc, out=Path("m.json"), model=ModelOptions(), tagclip=TagCLIPConfig(),
                          segment=configure("maskclip", "coco", key_smoothing=True), method="maskclip")
    from tagclip_cli.record import RecordIO

    config = RecordIO.to_dict(segment_config(tiny_backbone, opts, None))
    assert json.loads(json.dumps(config)) == config
    assert config["segment"]["caa_layers"] == [-7, 0] and config["segment"]["box_threshold"] == 0.7
