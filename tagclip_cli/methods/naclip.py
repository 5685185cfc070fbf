"""NACLIP (Hajimiri et al., WACV 2025), a dense baseline (docs/algorithm.md §12): the last block's
attention is softmax(s k k^T + prior) per head (s = d^-0.5) with a Gaussian neighbourhood prior on
the patch grid, and the block returns the attention branch alone (no residual, no MLP). It uses
SCLIP's query names."""

from __future__ import annotations

import torch
from torch import Tensor

from tagclip_cli.backbone.encoder import AttentionInputs, LastBlockAttention
from tagclip_cli.methods.dense import DenseConfig, DenseMethod, DenseSettings
from tagclip_cli.methods.registry import register
from tagclip_cli.methods.sclip import SCENE_BACKGROUND, SCLIP_COCO_QUERIES, SCLIP_VOC_QUERIES


def neighbourhood_prior(grid: tuple[int, int], std: float, device: torch.device | None = None) -> Tensor:
    """NACLIP's additive attention bias (1+N, 1+N) fp32 on a (gh, gw) grid: between patches i and j,
    exp(-|p_i - p_j|^2 / (2 std^2)) with p the (row, column) grid position; 0 in the class token's
    row and column."""
    rows = torch.arange(grid[0], dtype=torch.float32, device=device)
    cols = torch.arange(grid[1], dtype=torch.float32, device=device)
    pos = torch.cartesian_prod(rows, cols)  # (N, 2), row-major like the patch tokens
    dist2 = (pos[:, None, :] - pos[None, :, :]).square().sum(dim=-1)
    out = torch.zeros(1 + pos.shape[0], 1 + pos.shape[0], device=device)
    out[1:, 1:] = torch.exp(-dist2 / (2 * std**2))
    return out


def naclip_attention(gaussian_std: float = 5.0) -> LastBlockAttention:
    """The attention softmax(s k k^T + `neighbourhood_prior`(std)), (B, h, T, T)."""

    def attention(inputs: AttentionInputs) -> Tensor:
        k = inputs.k
        prior = neighbourhood_prior(inputs.grid, gaussian_std, k.device).to(k.dtype)
        return (k.shape[-1] ** -0.5 * k @ k.transpose(-1, -2) + prior).softmax(dim=-1)

    return attention


class NaclipConfig(DenseConfig):
    """NACLIP's settings (`DenseConfig`; gaussian_std is the prior's width)."""


# From the authors' VOC21 and COCO-Object configs (ViT-B/16; the class's 224 / 112 windows).
NACLIP_PUBLISHED = {
    "voc": DenseSettings(short_side=336, crop=0, stride=0, logit_scale=40, prob_threshold=0.1),
    "coco": DenseSettings(short_side=336, crop=224, stride=112, logit_scale=40, prob_threshold=0.1),
}

NACLIP = register(DenseMethod(
    name="naclip", summary="NACLIP: k-k attention with a neighbourhood prior, no residual or MLP, published settings",
    attention_for=lambda settings: naclip_attention(settings.gaussian_std), keep_residual=False,
    published=NACLIP_PUBLISHED,
    background_queries=SCENE_BACKGROUND, query_tables={"voc": SCLIP_VOC_QUERIES, "coco": SCLIP_COCO_QUERIES},
    config_type=NaclipConfig,
))
