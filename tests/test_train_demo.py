"""The demo-model training script's bf16 mixed precision and the patch-alignment diagnostic's geometry."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def _load(name: str):
    if str(BENCH) not in sys.path:
        sys.path.insert(0, str(BENCH))  # patch_alignment imports bench_synthetic
    spec = importlib.util.spec_from_file_location(name, BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


TINY = {
    "embed_dim": 16,
    "quick_gelu": True,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 32, "patch_size": 16, "head_width": 16},
    "text_cfg": {"context_length": 8, "vocab_size": 64, "width": 32, "heads": 2, "layers": 1},
}


def test_bf16_shadow_gives_fp32_master_grads_close_to_fp32() -> None:
    import open_clip

    train = _load("train_demo_clip")
    torch.manual_seed(0)
    master = open_clip.CLIP(**TINY)
    images, tokens = torch.randn(4, 3, 32, 32), torch.randint(1, 63, (4, 8))

    def loss_of(model, x):
        a = torch.nn.functional.normalize(model.encode_image(x).float(), dim=-1)
        b = torch.nn.functional.normalize(model.encode_text(tokens).float(), dim=-1)
        return open_clip.loss.ClipLoss()(a, b, model.logit_scale.float().exp())

    loss_of(master, images).backward()
    reference = {n: p.grad.clone() for n, p in master.named_parameters()}
    master.zero_grad(set_to_none=True)

    shadow = train.BF16Shadow(master)
    with torch.no_grad():  # the master moves on; sync_weights must carry that into the bf16 copy
        master.visual.proj.add_(0.01)
    shadow.sync_weights()
    assert shadow.model.visual.proj.dtype == torch.bfloat16
    assert torch.equal(shadow.model.visual.proj, master.visual.proj.to(torch.bfloat16))
    with torch.no_grad():
        master.visual.proj.sub_(0.01)
    shadow.sync_weights()
    loss_of(shadow.model, images.to(torch.bfloat16)).backward()
    shadow.grads_to_master()
    for name, p in master.named_parameters():
        assert p.grad is not None and p.grad.dtype == torch.float32, name
        ref = reference[name]
        if ref.abs().max() > 1e-6:  # bf16 has ~3 significant digits
            cos = torch.nn.functional.cosine_similarity(p.grad.flatten(), ref.flatten(), dim=0)
            assert cos > 0.95, (name, float(cos))
    assert all(p.grad is None for p in shadow.model.parameters())


def test_patch_coverage_shares() -> None:
    align = _load("patch_alignment")
    labels = np.zeros((32, 48), np.uint8)
    labels[:16, :8] = 2  # half of patch 0
    labels[16:, 32:] = 1  # all of patch 5
    cov = align.coverage(labels, 16, 3)
    assert cov.shape == (6, 4)
    assert cov.sum(axis=1) == pytest.approx(np.ones(6))
    assert cov[0, 2] == pytest.approx(0.5) and cov[5, 1] == pytest.approx(1.0) and cov[3, 0] == pytest.approx(1.0)
