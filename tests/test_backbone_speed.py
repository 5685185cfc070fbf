"""The backbone's speed paths: the fused CWR forward and the compute precision."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch.nn import MultiheadAttention

from tagclip_cli.backbone import load_backbone
from tagclip_cli.backbone.encoder import Workspace, self_attention, value_path_attention
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


def test_fp16_needs_cuda(tiny_checkpoint, cache_dir):
    with pytest.raises(UsageError, match="fp16 needs a CUDA device"):
        load_backbone(checkpoint=tiny_checkpoint, cache_dir=cache_dir, precision="fp16")


def test_unknown_precision_is_a_usage_error(tiny_checkpoint, cache_dir):
    with pytest.raises(UsageError, match="fp32, bf16, fp16"):
        load_backbone(checkpoint=tiny_checkpoint, cache_dir=cache_dir, precision="fp8")


def test_cpu_bf16_casts_the_image_tower_and_keeps_maps_and_text_in_fp32(tiny_checkpoint, cache_dir):
    """On CPU, bf16 casts the image tower's weights once (no autocast); the text tower, the text
    classifier and the attention maps stay fp32, and the results stay close to fp32."""
    ref = load_backbone(checkpoint=tiny_checkpoint, cache_dir=cache_dir)
    bb = load_backbone(checkpoint=tiny_checkpoint, cache_dir=cache_dir, precision="bf16")
    assert bb.dtype == torch.bfloat16 and ref.dtype == torch.float32
    assert bb.model.token_embedding.weight.dtype == torch.float32
    names, templates = ["cat", "dog"], ("a photo of a {}.",)
    torch.testing.assert_close(bb.text_classifier(names, templates), ref.text_classifier(names, templates))
    pixels = torch.randn(2, 3, 64, 96, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        full, half = ref.dense_forward(pixels), bb.dense_forward(pixels)
    assert half.attn.dtype == torch.float32 and half.tokens.dtype == torch.float32
    torch.testing.assert_close(half.attn.sum(-1), torch.ones(2, bb.num_layers, 25), atol=1e-5, rtol=0)
    assert 0 < (half.attn - full.attn).abs().max() < 0.05  # bf16 did run, and stayed close
    cos = torch.nn.functional.cosine_similarity(half.tokens, full.tokens, dim=-1)
    assert cos.min() > 0.98
    keep = torch.ones(1, 196, dtype=torch.bool)
    crop = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        half_cls, full_cls = bb.masked_cls_forward(crop, keep), ref.masked_cls_forward(crop, keep)
    assert torch.nn.functional.cosine_similarity(half_cls, full_cls).min() > 0.98


def test_autocast_path_keeps_attention_maps_in_fp32(tiny_checkpoint, cache_dir, monkeypatch):
    """The CUDA autocast path, exercised with CPU autocast: the forwards run in bf16, the maps
    stay fp32 softmax rows, and the results stay close to fp32."""
    bb = load_backbone(checkpoint=tiny_checkpoint, cache_dir=cache_dir)
    pixels = torch.randn(2, 3, 64, 96, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        reference = bb.dense_forward(pixels)
        monkeypatch.setattr(type(bb), "autocast", lambda self: torch.autocast("cpu", dtype=torch.bfloat16))
        half = bb.dense_forward(pixels)
    assert half.attn.dtype == torch.float32 and half.tokens.dtype == torch.float32
    torch.testing.assert_close(half.attn.sum(-1), torch.ones(2, bb.num_layers, 25), atol=1e-5, rtol=0)
    assert 0 < (half.attn - reference.attn).abs().max() < 0.05
    assert torch.nn.functional.cosine_similarity(half.tokens, reference.tokens, dim=-1).min() > 0.98


@pytest.mark.parametrize("value_path", [False, True])
@pytest.mark.parametrize("masked", [False, True])
def test_buffered_attention_equals_the_autograd_path(tiny_backbone, value_path, masked):
    """Without autograd the attention runs in reused buffers; it must give the same output and
    map as the plain path, also when the shape changes between calls (buffers rebuilt)."""
    g = torch.Generator().manual_seed(5)
    block = tiny_backbone.visual.transformer.resblocks[1]
    attention = value_path_attention if value_path else self_attention
    workspace = Workspace()
    for tokens in (17, 26, 17):
        x = torch.randn(3, tokens, 64, generator=g)
        mask = torch.randn(1, 1, tokens, tokens, generator=g) if masked else None
        expected_out, expected_map = attention(block, x.clone().requires_grad_(True), workspace, mask)
        with torch.no_grad():
            out, attn = attention(block, x, workspace, mask)
            into = torch.full((3, tokens, tokens), float("nan"))
            _, written = attention(block, x, workspace, mask, map_out=into)
        torch.testing.assert_close(out, expected_out.detach(), atol=1e-6, rtol=0)
        torch.testing.assert_close(attn, expected_map.detach(), atol=1e-7, rtol=0)
        assert written.data_ptr() == into.data_ptr()
        torch.testing.assert_close(into, expected_map.detach(), atol=1e-7, rtol=0)


def test_attention_buffers_survive_switching_between_inference_and_no_grad(tiny_backbone):
    """Buffers made under inference_mode cannot be written outside it; the backbone must cope
    when callers alternate (the pipeline runs under inference_mode, library users may not), and
    a dense forward with autograd on still fills every layer's map."""
    pixels = torch.randn(1, 3, 48, 64, generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        first = tiny_backbone.dense_forward(pixels)
    with torch.no_grad():
        second = tiny_backbone.dense_forward(pixels)
    with torch.inference_mode():
        third = tiny_backbone.dense_forward(pixels)
    tracked = tiny_backbone.dense_forward(pixels.clone().requires_grad_(True))
    for out in (second, third, tracked):
        torch.testing.assert_close(out.attn.detach(), first.attn, atol=1e-6, rtol=0)
        torch.testing.assert_close(out.tokens.detach(), first.tokens, atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    ("precision", "message"),
    [("fp16", "--precision: precision fp16 needs a CUDA device; on cpu use fp32 or bf16"), ("fp64", "must be one of")],
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


def test_cli_bf16_on_cpu_annotates_and_segments_close_to_fp32(photo_dir, tiny_checkpoint, tmp_path):
    """`--precision bf16` on CPU: both commands run, record the precision, and stay close to fp32."""
    import json

    import numpy as np
    import pyarrow.parquet as pq
    from pycocotools.coco import COCO
    from typer.testing import CliRunner

    from tagclip_cli.cli import app
    from tagclip_cli.record import RecordIO
    from tagclip_cli.writers import read_record

    def run(command: str, precision: str, out: Path) -> None:
        result = CliRunner().invoke(app, [command, str(photo_dir), "--vocab", "voc", "--out", str(out),
                                          "--checkpoint", str(tiny_checkpoint), "--device", "cpu",
                                          "--precision", precision, "--workers", "0", "--quiet"])
        assert result.exit_code == 0, result.output

    scores = {}
    for precision in ("fp32", "bf16"):
        out = tmp_path / f"{precision}.parquet"
        run("annotate", precision, out)
        assert json.dumps(RecordIO.to_dict(read_record(out))).count(f'"precision": "{precision}"') == 1
        table = pq.read_table(out).to_pydict()
        scores[precision] = np.array(table["scores"], dtype=np.float64)
        assert set(table["status"]) == {"ok"}
    diff = np.abs(scores["bf16"] - scores["fp32"]).max()
    assert 0 < diff < 0.1
    masks = tmp_path / "bf16.json"
    run("segment", "bf16", masks)
    coco = COCO(str(masks))
    assert len(coco.getImgIds()) == len(list(photo_dir.iterdir()))
