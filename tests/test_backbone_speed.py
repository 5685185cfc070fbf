"""The backbone's speed paths: the fused CWR forward and the compute precision."""

from __future__ import annotations

import pytest
import torch
from torch.nn import MultiheadAttention

from tagclip_cli.backbone import load_backbone
from tagclip_cli.errors import UsageError


def masked_cls_unfused(bb, crops: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """The CWR forward written plainly: every block through nn.MultiheadAttention with the
    class-token row of an additive (B * heads, T, T) mask, every token through every block."""
    b, n = keep.shape
    mask = torch.zeros(b, 1 + n, 1 + n)
    mask[:, 0, 1:] = (~keep).float() * -1000.0
    mask = mask.repeat_interleave(bb.num_heads, dim=0)
    x = bb.embed(crops)
    for block in bb.visual.transformer.resblocks:
        y = block.ln_1(x)
        attn: MultiheadAttention = block.attn
        out, _ = attn(y, y, y, need_weights=False, attn_mask=mask)
        x = x + out
        x = x + block.mlp(block.ln_2(x))
    return bb.project_tokens(x[:, :1])[:, 0]


def test_fused_masked_forward_equals_unfused_in_chunks(tiny_backbone):
    g = torch.Generator().manual_seed(3)
    crops = torch.randn(5, 3, 224, 224, generator=g)
    keep = torch.rand(5, 196, generator=g) > 0.4
    keep[0] = True  # all visible
    keep[1] = False  # nothing visible: the class token attends only to itself
    expected = masked_cls_unfused(tiny_backbone, crops, keep)
    whole = tiny_backbone.masked_cls_forward(crops, keep)
    chunked = tiny_backbone.masked_cls_forward(crops, keep, chunk_size=2)  # chunks of 2, 2, 1
    assert whole.shape == (5, tiny_backbone.embed_dim) and whole.dtype == torch.float32
    torch.testing.assert_close(whole, expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(chunked, expected, atol=1e-5, rtol=0)
    # the masks matter: the same crop with a different mask gives a different embedding
    other = tiny_backbone.masked_cls_forward(crops[:1], ~keep[2:3])
    assert not torch.allclose(other, tiny_backbone.masked_cls_forward(crops[:1], keep[2:3]), atol=1e-4)


def test_masked_forward_of_no_crops(tiny_backbone):
    out = tiny_backbone.masked_cls_forward(torch.zeros(0, 3, 224, 224), torch.zeros(0, 196, dtype=torch.bool))
    assert out.shape == (0, tiny_backbone.embed_dim)


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_half_precisions_need_cuda(tiny_checkpoint, cache_dir, precision):
    with pytest.raises(UsageError, match="needs a CUDA device"):
        load_backbone(checkpoint=tiny_checkpoint, cache_dir=cache_dir, precision=precision)


def test_unknown_precision_is_a_usage_error(tiny_checkpoint, cache_dir):
    with pytest.raises(UsageError, match="fp32, bf16, fp16"):
        load_backbone(checkpoint=tiny_checkpoint, cache_dir=cache_dir, precision="fp8")


def test_autocast_keeps_attention_maps_in_fp32(tiny_checkpoint, cache_dir):
    """The autocast path (CUDA in real use; exercised here with CPU autocast by setting the field
    directly): the forwards run in bf16, the attention maps stay fp32 softmax rows, and the
    results stay close to fp32."""
    bb = load_backbone(checkpoint=tiny_checkpoint, cache_dir=cache_dir)
    pixels = torch.randn(2, 3, 64, 96, generator=torch.Generator().manual_seed(0))
    reference = bb.dense_forward(pixels)
    assert reference.attn.dtype == torch.float32
    bb.precision = "bf16"
    half = bb.dense_forward(pixels)
    assert half.attn.dtype == torch.float32 and half.tokens.dtype == torch.float32
    torch.testing.assert_close(half.attn.sum(-1), torch.ones(2, bb.num_layers, 25), atol=1e-5, rtol=0)
    assert (half.attn - reference.attn).abs().max() < 0.05
    assert (half.tokens - reference.tokens).abs().max() > 0  # bf16 did run
    cos = torch.nn.functional.cosine_similarity(half.tokens, reference.tokens, dim=-1)
    assert cos.min() > 0.98
    keep = torch.ones(1, 196, dtype=torch.bool)
    crop = torch.randn(1, 3, 224, 224)
    bb.precision = "fp32"
    full = bb.masked_cls_forward(crop, keep)
    bb.precision = "bf16"
    assert torch.nn.functional.cosine_similarity(bb.masked_cls_forward(crop, keep), full).min() > 0.98


@pytest.mark.parametrize(
    ("precision", "message"),
    [("bf16", "--precision: precision bf16 needs a CUDA device; on cpu use fp32"), ("fp64", "must be one of")],
)
def test_annotate_precision_errors_are_one_line_usage_errors(photo_dir, tiny_checkpoint, tmp_path, precision, message):
    from typer.testing import CliRunner

    from tagclip_cli.cli import app

    out = tmp_path / "tags.parquet"
    result = CliRunner().invoke(
        app,
        [
            "annotate",
            str(photo_dir),
            "--vocab",
            "voc",
            "--out",
            str(out),
            "--checkpoint",
            str(tiny_checkpoint),
            "--device",
            "cpu",
            "--precision",
            precision,
        ],
    )
    assert result.exit_code == 2
    assert message in " ".join(result.output.split())
    assert "Traceback" not in result.output
    assert not out.exists()
