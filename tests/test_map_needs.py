"""The dense forward makes only the attention maps its methods declare (`MapNeeds`): DMAR's vote
counted layer by layer equals the vote of stored maps bit for bit, kept ranges equal the same
layers of a full forward, and layers nobody reads skip their map (fp32 outputs unchanged)."""

from __future__ import annotations

import pytest
import torch

from tagclip_cli.backbone import MapNeeds, load_backbone
from tagclip_cli.backbone import encoder as encoder_module
from tagclip_cli.tagclip import (
    VOTES,
    TagCLIPConfig,
    Tagger,
    VoteCounter,
    refine_with_votes,
    refined_attention,
    vote_mask,
)
from tagclip_cli.vocab import load_vocabulary


def _pixels(seed: int, batch: int, height: int, width: int) -> torch.Tensor:
    return torch.randn(batch, 3, height, width, generator=torch.Generator().manual_seed(seed))


def test_votes_counted_in_the_forward_equal_the_vote_of_stored_maps(tiny_backbone):
    layers = tiny_backbone.num_layers
    for pixels in (_pixels(0, 3, 64, 96), _pixels(1, 1, 96, 48)):
        needs = MapNeeds(keep=(layers - 3, layers - 1), readers=((VOTES, lambda: VoteCounter(layers)),))
        with torch.inference_mode():
            full = tiny_backbone.dense_forward(pixels)
            streamed = tiny_backbone.dense_forward(pixels, needs=needs)
        assert torch.equal(streamed.tokens, full.tokens)
        assert streamed.attn.shape[1] == 3 and streamed.attn_from == layers - 3
        assert torch.equal(streamed.maps(layers - 3, layers - 1), full.attn[:, layers - 4 : layers - 1])
        for j in range(pixels.shape[0]):
            one, stored = streamed.image(j), full.attn[j, :, 1:, 1:]
            for k in range(1, layers + 1):
                mask = one.reads[VOTES] >= k
                assert torch.equal(mask, vote_mask(stored, k))
                refined = refine_with_votes(one.maps(layers - 3, layers - 1)[:, 1:, 1:], mask)
                assert torch.equal(refined, refined_attention(stored, (layers - 3, layers - 1), k))
            assert 0 < int((one.reads[VOTES] > 0).sum()) < one.reads[VOTES].numel()  # votes vary


def test_tagger_with_counted_votes_equals_tagger_with_every_map(tiny_backbone, monkeypatch):
    voc = load_vocabulary("voc")
    images = [_pixels(2, 1, 64, 96)[0], _pixels(3, 1, 96, 64)[0], _pixels(4, 1, 64, 96)[0]]
    for config in (TagCLIPConfig(), TagCLIPConfig.coco_stuff()):
        tagger = Tagger(tiny_backbone, voc, config, text=None)
        assert tagger.map_needs().readers and tagger.map_needs().keep == tagger.layers
        ours = tagger.tag(images)
        with monkeypatch.context() as patch:  # every map stored, the vote taken from them afterwards
            patch.setattr(Tagger, "map_needs", lambda self: MapNeeds(keep=(1, self.backbone.num_layers)))
            stored = tagger.tag(images)
        for a, b in zip(ours, stored, strict=True):
            assert torch.equal(a.attn_refined, b.attn_refined) and torch.equal(a.p_refined, b.p_refined)
            assert torch.equal(a.scores, b.scores) and a.tags == b.tags
    assert Tagger(tiny_backbone, voc, TagCLIPConfig(use_dmar=False)).map_needs() == MapNeeds()


def test_needs_combine_and_unkept_maps_are_refused():
    a = MapNeeds(keep=(9, 11), readers=(("votes", object),))
    b = MapNeeds(keep=(5, 11), readers=(("votes", int), ("other", float)))
    both = a | b
    assert both.keep == (5, 11) and [name for name, _ in both.readers] == ["votes", "other"]
    assert (MapNeeds() | MapNeeds()).keep is None
    assert MapNeeds(keep=(2, 3)).layer_made(1) and not MapNeeds(keep=(2, 3)).layer_made(0)


def test_layers_nobody_reads_make_no_map(tiny_backbone, tiny_checkpoint, cache_dir, monkeypatch):
    calls = []
    real = encoder_module.softmax_attention
    monkeypatch.setattr(encoder_module, "softmax_attention", lambda *a: calls.append(1) or real(*a))
    pixels = _pixels(5, 2, 64, 96)
    layers = tiny_backbone.num_layers
    with torch.inference_mode():
        full = tiny_backbone.dense_forward(pixels)
        assert len(calls) == layers
        calls.clear()
        kept = tiny_backbone.dense_forward(pixels, needs=MapNeeds(keep=(2, 3)))
        # fp32: the layers without a map keep the explicit softmax (bitwise outputs), the last
        # block (value path) needs none
        assert len(calls) == layers - 1
        bare = tiny_backbone.dense_forward(pixels, needs=MapNeeds())
    assert torch.equal(kept.tokens, full.tokens) and torch.equal(bare.tokens, full.tokens)
    assert torch.equal(kept.attn, full.attn[:, 1:3]) and bare.attn is None
    with pytest.raises(ValueError, match=r"kept: 2\.\.3"):
        kept.maps(1, 2)
    half = load_backbone(checkpoint=tiny_checkpoint, cache_dir=cache_dir, precision="bf16")
    calls.clear()
    with torch.inference_mode():
        fused = half.dense_forward(pixels, needs=MapNeeds())  # bf16: fused attention, no softmax of ours
    assert not calls
    assert torch.nn.functional.cosine_similarity(fused.tokens, full.tokens, dim=-1).min() > 0.98
