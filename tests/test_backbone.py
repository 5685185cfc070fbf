"""Backbone: loading formats, the text cache, and the encoder surgeries against open_clip itself."""

from __future__ import annotations

import logging

import pytest
import torch
import torch.nn.functional as F
from conftest import make_tiny_clip

from tagclip_cli.backbone import (
    Backbone,
    load_backbone,
    read_state_dict,
)
from tagclip_cli.errors import ModelLoadError


def test_geometry_comes_from_the_model(tiny_backbone):
    assert tiny_backbone.patch_size == 16
    assert tiny_backbone.native_grid == (14, 14)
    assert tiny_backbone.num_layers == 6


def test_vit_l14_shaped_model_is_generic(cache_dir):
    net = make_tiny_clip(layers=8, patch=14, image=112)
    bb = Backbone(net, None, "tiny-l14", "random", torch.device("cpu"), cache_dir)
    assert (bb.patch_size, bb.native_grid, bb.num_layers) == (14, (8, 8), 8)
    out = bb.dense_forward(torch.randn(2, 3, 70, 98))
    assert out.grid == (5, 7)
    assert out.tokens.shape == (2, 36, 32)
    assert out.attn.shape == (2, 8, 36, 36)
    cls = bb.masked_cls_forward(torch.randn(3, 3, 112, 112), torch.ones(3, 64, dtype=torch.bool))
    assert cls.shape == (3, 32)


def test_blocks_match_open_clip(tiny_backbone):
    """Our manual attention equals open_clip's block forward; maps are softmax rows."""
    x = torch.randn(2, 1 + 20, 64)
    for i, block in enumerate(tiny_backbone.visual.transformer.resblocks):
        ours, attn = tiny_backbone.block_forward(i, x)
        assert torch.allclose(ours, block(x), atol=1e-5)
        assert torch.allclose(attn.sum(-1), torch.ones(2, 21), atol=1e-5)


def test_value_path_equals_reference_masking(tiny_backbone):
    """Last block on the value path == nn.MultiheadAttention with a -100 off-diagonal mask."""
    x = torch.randn(1, 1 + 12, 64)
    idx = tiny_backbone.num_layers - 1
    block = tiny_backbone.visual.transformer.resblocks[idx]
    mask = (1 - torch.eye(13)) * -100.0
    y = block.ln_1(x)
    attn_out = block.attn(y, y, y, attn_mask=mask, need_weights=False)[0]
    expected = x + attn_out
    expected = expected + block.mlp(block.ln_2(expected))
    ours, attn = tiny_backbone.value_path_block(idx, x)
    assert torch.allclose(ours, expected, atol=1e-5)
    _, plain = block.attn(y, y, y, need_weights=True)
    assert torch.allclose(attn, plain, atol=1e-6)  # the unmasked map is recorded


def test_masked_cls_forward_all_visible_equals_encode_image(tiny_backbone):
    x = torch.randn(2, 3, 224, 224)
    ours = tiny_backbone.masked_cls_forward(x, torch.ones(2, 196, dtype=torch.bool))
    assert torch.allclose(ours, tiny_backbone.encode_image(x), atol=1e-5)


def test_masked_cls_forward_batched_equals_one_by_one(tiny_backbone):
    x = torch.randn(3, 3, 224, 224)
    masks = torch.rand(3, 196) > 0.5
    together = tiny_backbone.masked_cls_forward(x, masks)
    for i in range(3):
        alone = tiny_backbone.masked_cls_forward(x[i : i + 1], masks[i : i + 1])
        assert torch.allclose(together[i], alone[0], atol=1e-5)
    # the mask matters: hiding patches changes the class token
    assert not torch.allclose(together[0], tiny_backbone.encode_image(x[:1])[0], atol=1e-4)


def test_positional_embedding_interpolation(tiny_backbone):
    native = tiny_backbone.positional_embedding((14, 14))
    assert native is tiny_backbone.visual.positional_embedding
    pos = tiny_backbone.positional_embedding((7, 21))
    assert pos.shape == (1 + 147, 64)
    assert torch.equal(pos[0], native[0])  # class-token embedding kept
    rounded = tiny_backbone.positional_embedding((7, 21), fp16_round=True)
    assert torch.equal(rounded, pos.half().float())
    assert not torch.equal(rounded, pos)


def test_dense_forward_tokens_are_projected(tiny_backbone):
    out = tiny_backbone.dense_forward(torch.randn(1, 3, 32, 48), keep_pre_last=True)
    assert out.grid == (2, 3)
    assert out.tokens.shape == (1, 7, 32)
    assert out.pre_last.shape == (1, 7, 64)
    x, _ = tiny_backbone.value_path_block(tiny_backbone.num_layers - 1, out.pre_last)
    assert torch.allclose(tiny_backbone.project_tokens(x), out.tokens, atol=1e-5)
    with pytest.raises(ValueError):
        tiny_backbone.dense_forward(torch.randn(1, 3, 30, 48))


def test_text_classifier_uses_disk_cache(tiny_checkpoint, tmp_path, caplog):
    bb = load_backbone(checkpoint=tiny_checkpoint, cache_dir=tmp_path)
    calls = []
    real = bb.encode_prompts
    bb.encode_prompts = lambda prompts, **kw: calls.append(len(prompts)) or real(prompts, **kw)
    first = bb.text_classifier(["cat", "dog"], ["a {}.", "the {}."])
    assert calls == [4]
    assert torch.allclose(first.norm(dim=-1), torch.ones(2))
    expected = F.normalize(F.normalize(real(["a cat.", "the cat."]), dim=-1).mean(0), dim=-1)
    assert torch.allclose(first[0], expected, atol=1e-6)
    again = load_backbone(checkpoint=tiny_checkpoint, cache_dir=tmp_path)
    again.encode_prompts = lambda prompts, **kw: calls.append(len(prompts)) or real(prompts, **kw)
    with caplog.at_level(logging.INFO, logger="tagclip_cli"):
        second = again.text_classifier(["dog", "cat", "bird"], ["a {}.", "the {}."])
    assert calls == [4, 2]  # only "bird" encoded
    assert torch.allclose(second[:2], first.flip(0))
    assert "2 of 3 classes from cache" in caplog.text
    other_templates = again.text_classifier(["cat"], ["a photo of {}."])
    assert calls[-1] == 1 and other_templates.shape == (1, 32)


def test_checkpoint_formats_load_the_same_weights(tmp_path, tiny_checkpoint):
    from safetensors.torch import save_file

    net = make_tiny_clip()
    sd = net.state_dict()
    st = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in sd.items()}, str(st))
    wrapped = tmp_path / "wrapped.bin"
    torch.save({"state_dict": {f"module.{k}": v for k, v in sd.items()}}, wrapped)
    x = torch.randn(1, 3, 224, 224)
    ref = net.encode_image(x)
    for path in (tiny_checkpoint, st, wrapped):
        bb = load_backbone(checkpoint=path, cache_dir=tmp_path)
        assert bb.weights.startswith("checkpoint:")
        assert torch.allclose(bb.encode_image(x), ref, atol=1e-5), path


def test_torchscript_archive_loads(tmp_path):
    net = make_tiny_clip()
    traced = torch.jit.trace(net, (torch.randn(1, 3, 224, 224), torch.randint(0, 49408, (1, 77))),
                             strict=False, check_trace=False)
    path = tmp_path / "ViT-tiny.pt"
    traced.save(str(path))
    bb = load_backbone(checkpoint=path, cache_dir=tmp_path)
    x = torch.randn(1, 3, 224, 224)
    assert torch.allclose(bb.encode_image(x), net.encode_image(x), atol=1e-5)


def test_explicit_model_with_wrong_checkpoint_is_a_clear_error(tiny_checkpoint, tmp_path):
    with pytest.raises(ModelLoadError, match="do not fit model 'ViT-B-16'"):
        load_backbone("ViT-B-16", checkpoint=tiny_checkpoint, cache_dir=tmp_path, model_explicit=True)


def test_bad_checkpoint_files(tmp_path):
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(ModelLoadError, match="junk.pt: not a readable CLIP checkpoint"):
        read_state_dict(junk)
    with pytest.raises(ModelLoadError, match="not found"):
        read_state_dict(tmp_path / "missing.pt")


def test_offline_pretrained_fails_fast_with_instructions(tmp_path, monkeypatch):
    import tagclip_cli.backbone.loading as loading

    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setattr(loading, "_hub_reachable", lambda *a, **k: False)
    with pytest.raises(ModelLoadError, match="--checkpoint"):
        load_backbone("ViT-B-16", pretrained="openai", cache_dir=tmp_path)


def test_unknown_model_and_tag(tmp_path):
    with pytest.raises(ModelLoadError, match="unknown model"):
        load_backbone("ViT-Q-99", pretrained="openai", cache_dir=tmp_path)
    with pytest.raises(ModelLoadError, match="no pretrained tag"):
        load_backbone("ViT-B-16", pretrained="nonsense", cache_dir=tmp_path)



def test_builtin_model_with_its_own_retrained_checkpoint(tmp_path):
    """`--model shapes-demo --checkpoint FILE` (weights from benchmarks/train_demo_clip.py) builds
    the built-in architecture and loads the file's weights; it was refused as an unknown model."""
    from safetensors.torch import load_file, save_file

    from tagclip_cli.backbone.loading import WEIGHTS_DIR

    sd = load_file(str(WEIGHTS_DIR / "shapes-demo.safetensors"))
    changed = dict(sd)
    changed["visual.proj"] = sd["visual.proj"] * 2  # other weights than the shipped ones
    path = tmp_path / "retrained.safetensors"
    save_file(changed, str(path))
    shipped = load_backbone("shapes-demo", cache_dir=tmp_path, model_explicit=True)
    retrained = load_backbone("shapes-demo", checkpoint=path, cache_dir=tmp_path, model_explicit=True)
    assert retrained.name == "shapes-demo" and retrained.weights.startswith("checkpoint:")
    x = torch.randn(1, 3, 224, 224)
    assert torch.allclose(retrained.encode_image(x), 2 * shipped.encode_image(x), atol=1e-4)
    with pytest.raises(ModelLoadError, match="do not fit model 'shapes-demo'"):
        load_backbone("shapes-demo", checkpoint=_tiny_saved(tmp_path), cache_dir=tmp_path, model_explicit=True)


def _tiny_saved(tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "tiny.safetensors"
    save_file({k: v.contiguous() for k, v in make_tiny_clip().state_dict().items()}, str(path))
    return path
