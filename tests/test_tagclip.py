"""TagCLIP steps on small hand-computed tensors (docs/algorithm.md §2-§6)."""

from __future__ import annotations

import math

import pytest
import torch

from tagclip_cli.errors import UsageError
from tagclip_cli.quirks import Quirks
from tagclip_cli.tagclip import (
    CwrBox,
    TagCLIPConfig,
    Tagger,
    box_mask,
    class_box_masks,
    coarse_scores,
    crop_for_cwr,
    cwr_box,
    cwr_candidates,
    dense_per_image,
    dmar,
    fuse,
    layer_range,
    minmax,
    refined_attention,
    tagclip_templates,
    tags_from_scores,
    vote_mask,
)
from tagclip_cli.vocab import parse_vocabulary


def test_coarse_scores_softmax_over_all_classes():
    feats = torch.tensor([[2.0, 0.0], [0.0, 1.0]])  # normalised to e1, e2
    text = torch.tensor([[1.0, 0.0], [0.0, 1.0], [math.sqrt(0.5), math.sqrt(0.5)]])
    p = coarse_scores(feats, text, logit_scale=10.0)
    logits = torch.tensor([[10.0, 0.0, 10 * math.sqrt(0.5)], [0.0, 10.0, 10 * math.sqrt(0.5)]])
    assert torch.allclose(p, logits.softmax(-1), atol=1e-6)
    assert torch.allclose(p.sum(-1), torch.ones(2))


def test_vote_mask_counts_layers_above_their_own_mean():
    # Three 2x2 maps; means 0.25, 0.5, 1.0.
    attn = torch.tensor(
        [
            [[0.7, 0.1], [0.1, 0.1]],  # above mean: (0,0)
            [[0.9, 0.6], [0.4, 0.1]],  # above mean: (0,0), (0,1)
            [[2.0, 1.5], [0.5, 0.0]],  # above mean: (0,0), (0,1)
        ]
    )
    assert vote_mask(attn, 1).tolist() == [[True, True], [False, False]]
    assert vote_mask(attn, 2).tolist() == [[True, True], [False, False]]
    assert vote_mask(attn, 3).tolist() == [[True, False], [False, False]]
    assert vote_mask(attn, 4).tolist() == [[False, False], [False, False]]


def test_refined_attention_is_layer_mean_times_vote_mask():
    attn = torch.tensor(
        [
            [[0.7, 0.1], [0.1, 0.1]],
            [[0.9, 0.6], [0.4, 0.1]],
            [[2.0, 1.5], [0.5, 0.0]],
        ]
    )
    a = refined_attention(attn, (2, 3), k=2)  # mean of layers 2 and 3, vote mask row 0 only
    assert torch.allclose(a, torch.tensor([[1.45, 1.05], [0.0, 0.0]]))


def test_box_mask_union_of_blob_boxes_and_border_compat():
    score = torch.zeros(6, 8)
    score[1, 1] = 1.0  # blob A: single cell
    score[3, 2] = 0.9
    score[4, 3] = 0.9  # blob B: diagonal pair (8-connected) -> box rows 3-4, cols 2-3
    score[5, 6:8] = 0.8  # blob C: touches the bottom and right borders
    fixed = box_mask(score, 0.5)
    expected = torch.zeros(6, 8, dtype=torch.bool)
    expected[1, 1] = True
    expected[3:5, 2:4] = True
    expected[5, 6:8] = True
    assert torch.equal(fixed, expected)
    compat = box_mask(score, 0.5, reference_compat=True)
    expected_compat = expected.clone()
    expected_compat[5, :] = False  # bottom row lost: end clamped to 5 (exclusive)
    assert torch.equal(compat, expected_compat)


def test_box_mask_threshold_is_on_8bit_values():
    # normalised values 0, 0.5, 1.0: floor(255*0.5)=127 is not > floor(255*0.5)=127.
    score = torch.tensor([[0.0, 0.5, 1.0]])
    assert box_mask(score, 0.5).tolist() == [[False, False, True]]
    assert box_mask(score, 0.49).tolist() == [[False, True, True]]
    # relative to the mean (0.5): same as 0.5
    assert box_mask(score, 0.0, relative_to_mean=True).tolist() == [[False, False, True]]


def test_box_mask_of_constant_map_is_empty():
    assert not box_mask(torch.ones(3, 3), 0.5).any()


def test_dmar_restricts_each_class_to_its_boxes():
    grid = (1, 4)
    a = torch.eye(4) * 0.5 + 0.125  # every patch attends everywhere, more to itself
    p = torch.tensor([[0.9, 0.1], [0.8, 0.2], [0.1, 0.9], [0.2, 0.8]])
    first = a @ p
    masks = class_box_masks(first, grid)
    # class 0 is high on patches 0-1, class 1 on patches 2-3 (above their column means)
    assert masks[:, 0].tolist() == [True, True, False, False]
    assert masks[:, 1].tolist() == [False, False, True, True]
    refined = dmar(p, a, grid)
    expected0 = a[:, :2] @ p[:2, 0]
    expected1 = a[:, 2:] @ p[2:, 1]
    assert torch.allclose(refined[:, 0], expected0)
    assert torch.allclose(refined[:, 1], expected1)


def test_cwr_candidates_use_range_of_whole_refined_matrix():
    p_refined = torch.tensor([[0.0, 0.2, 0.6], [0.4, 1.0, 0.1]])  # min 0, max 1 -> threshold 0.5
    p_local = torch.tensor([0.4, 1.0])  # foreground only (2 classes); background column 2
    assert cwr_candidates(p_refined, p_local, 0.5).tolist() == [1]
    assert cwr_candidates(p_refined, p_local, 0.3).tolist() == [0, 1]


def test_cwr_box_and_empty_cases():
    col = torch.tensor([0.0, 0.0, 0.0, 0.9, 1.0, 0.0, 0.0, 0.2, 0.0])  # 3x3 grid: cells (1,0),(1,1)
    box = cwr_box(col, (3, 3), cls=4, threshold=0.5, reference_compat=False)
    assert (box.y0, box.y1, box.x0, box.x1) == (1, 2, 0, 2)
    assert box.patch_mask.tolist() == [[True, True]]
    assert not box.empty
    constant = cwr_box(torch.ones(9), (3, 3), cls=0, threshold=0.5, reference_compat=False)
    assert constant.empty
    # compat: a box on the last row is clamped to an empty range
    bottom = torch.tensor([0.0] * 6 + [1.0, 1.0, 1.0])
    assert not cwr_box(bottom, (3, 3), 0, 0.5, reference_compat=False).empty
    assert cwr_box(bottom, (3, 3), 0, 0.5, reference_compat=True).empty


def test_crop_for_cwr_shapes_and_mask():
    image = torch.arange(3 * 32 * 48, dtype=torch.float32).reshape(3, 32, 48)
    box = CwrBox(0, 0, 1, 1, 3, torch.tensor([[True, False]]))
    crop, mask = crop_for_cwr(image, box, patch_size=16, native_grid=(2, 2))
    assert crop.shape == (3, 32, 32)
    assert mask.tolist() == [True, False, True, False]


def test_fuse_only_candidates():
    local = torch.tensor([0.2, 0.4, 0.6])
    glob = torch.tensor([0.8, 0.0, 0.0])
    fused = torch.tensor([True, False, False])
    assert torch.allclose(fuse(local, glob, fused, 0.5), torch.tensor([0.5, 0.4, 0.6]))
    assert torch.allclose(fuse(local, glob, fused, 0.25), torch.tensor([0.65, 0.4, 0.6]))


def test_tag_rule_strict_threshold_and_fallback():
    assert tags_from_scores(torch.tensor([0.0, 0.25, 0.5]), 0.5) == [2]  # normalised: 0, .5, 1
    assert tags_from_scores(torch.tensor([0.0, 0.26, 0.5]), 0.5) == [1, 2]
    assert tags_from_scores(torch.tensor([0.2, 0.2, 0.2]), 0.5) == [0]  # all equal: argmax
    assert tags_from_scores(torch.tensor([0.0, 0.7, 0.7]), 0.5) == [1, 2]


def test_templates_are_the_85_prompt_ensemble():
    templates = tagclip_templates()
    assert len(templates) == 85 and len(set(templates)) == 85
    assert "a bad photo of a {}." in templates and "this is one {} in the scene." in templates
    assert all(t.count("{}") == 1 for t in templates)


def test_minmax_constant_and_range():
    assert minmax(torch.tensor([2.0, 2.0])).tolist() == [0.0, 0.0]
    assert minmax(torch.tensor([1.0, 2.0, 3.0])).tolist() == [0.0, 0.5, 1.0]


def test_config_layers_default_and_generic():
    cfg = TagCLIPConfig()
    assert cfg.layers_for(12) == (9, 11)
    assert cfg.layers_for(24) == (21, 23)
    assert TagCLIPConfig(refine_layers=(1, -1)).layers_for(12) == (1, 11)
    with pytest.raises(ValueError):
        TagCLIPConfig(refine_layers=(0, 3)).layers_for(12)


def test_layer_range_is_one_convention_for_dmar_and_caa():
    """Values <= 0 count from L at both ends, the low end is clamped to 1 (docs/algorithm.md §3, §8)."""
    assert layer_range((-3, -1), 12) == (9, 11)
    assert layer_range((1, -1), 12) == (1, 11)
    assert layer_range((-7, 0), 12) == (5, 12)
    assert layer_range((-7, -1), 6) == (1, 5)
    assert layer_range((2, 4), 12) == (2, 4)
    with pytest.raises(UsageError, match=r"CAA layers \(3, 20\) give 3..20, outside 1..12"):
        layer_range((3, 20), 12, "CAA layers")
    with pytest.raises(ValueError, match="outside"):
        layer_range((-1, -3), 12)


VOCAB = parse_vocabulary("cat\ndog\nbird\n[background]\nsky\ngrass\n")


def _images(bb, sizes):
    g = torch.Generator().manual_seed(1)
    return [torch.randn(3, h, w, generator=g) for h, w in sizes]


def test_tagger_intermediates_and_shapes(tiny_backbone):
    tagger = Tagger(tiny_backbone, VOCAB)
    outs = tagger.tag(_images(tiny_backbone, [(64, 96), (64, 96), (48, 32)]))
    assert [o.grid for o in outs] == [(4, 6), (4, 6), (3, 2)]
    for o in outs:
        n = o.grid[0] * o.grid[1]
        assert o.p_coarse.shape == (n, 5) and o.p_refined.shape == (n, 5)
        assert o.attn_refined.shape == (n, n)
        assert torch.allclose(o.p_local, o.p_refined[:, :3].amax(0))
        assert o.scores.shape == (3,)
        ran = {b.cls for b in o.boxes}
        for c in range(3):
            if c in ran:
                assert o.scores[c] == pytest.approx(0.5 * o.p_local[c] + 0.5 * o.p_global[c])
            else:
                assert o.scores[c] == o.p_local[c] and math.isnan(o.p_global[c])
        assert o.tags == tags_from_scores(o.scores, 0.5)


def test_tagger_batches_equal_single_images(tiny_backbone):
    tagger = Tagger(tiny_backbone, VOCAB)
    imgs = _images(tiny_backbone, [(64, 96), (48, 32), (64, 96)])
    together = tagger.tag(imgs)
    alone = [tagger.tag([im])[0] for im in imgs]
    for a, b in zip(together, alone, strict=True):
        assert torch.allclose(a.scores, b.scores, atol=1e-5)


def test_ablation_switches(tiny_backbone):
    img = _images(tiny_backbone, [(64, 64)])
    coarse_only = Tagger(tiny_backbone, VOCAB, TagCLIPConfig(use_dmar=False, use_cwr=False)).tag(img)[0]
    assert coarse_only.attn_refined is None and not coarse_only.boxes
    assert torch.allclose(coarse_only.scores, coarse_only.p_coarse[:, :3].amax(0))
    no_bg = Tagger(tiny_backbone, VOCAB, TagCLIPConfig(use_background=False)).tag(img)[0]
    assert no_bg.p_coarse.shape[1] == 3


def test_reference_compat_stops_cwr_at_first_empty_box(tiny_backbone, monkeypatch):
    import tagclip_cli.tagclip as tc

    calls = []
    real = tc.cwr_box

    def fake_box(column, grid, cls, threshold, compat):
        calls.append(cls)
        box = real(column, grid, cls, threshold, compat)
        if len(calls) == 1:  # make the first candidate's box empty
            return CwrBox(cls, 0, 0, 0, 0, box.patch_mask[:0, :0])
        return box

    monkeypatch.setattr(tc, "cwr_box", fake_box)
    img = _images(tiny_backbone, [(64, 64)])
    fixed = Tagger(tiny_backbone, VOCAB, TagCLIPConfig(cwr_threshold=0.0)).tag(img)[0]
    assert len(fixed.candidates) >= 2
    assert len(fixed.boxes) == len(fixed.candidates) - 1  # only the empty one skipped
    calls.clear()
    compat = Tagger(tiny_backbone, VOCAB, TagCLIPConfig(cwr_threshold=0.0), quirks=Quirks.reference()).tag(img)[0]
    assert compat.boxes == []  # stopped at the first (empty) box
    assert torch.equal(compat.scores, compat.p_local)


def test_dense_per_image_batches_same_sizes_and_keeps_each_image(tiny_backbone, monkeypatch):
    """Images of one size share a forward; each image's DenseOutput equals its own forward."""
    images = _images(tiny_backbone, [(64, 96), (48, 32), (64, 96)])
    calls = []
    real = tiny_backbone.dense_forward

    def counting(pixels, **kw):
        calls.append(pixels.shape[0])
        return real(pixels, **kw)

    monkeypatch.setattr(tiny_backbone, "dense_forward", counting)
    with torch.inference_mode():
        out = list(dense_per_image(tiny_backbone, images, keep_pre_last=True))
    assert [i for i, _ in out] == [0, 2, 1] and calls == [2, 1]
    for i, one in out:
        with torch.inference_mode():
            alone = real(images[i][None], keep_pre_last=True)
        assert one.grid == alone.grid and one.tokens.shape == alone.tokens.shape[1:]
        torch.testing.assert_close(one.tokens, alone.tokens[0], atol=1e-5, rtol=0)
        torch.testing.assert_close(one.attn, alone.attn[0], atol=1e-6, rtol=0)
        torch.testing.assert_close(one.pre_last, alone.pre_last[0], atol=1e-5, rtol=0)
