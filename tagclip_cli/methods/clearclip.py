"""ClearCLIP (Lan et al., ECCV 2024), a dense baseline (docs/algorithm.md §12): the last block's
attention is softmax(s q q^T) per head (s = d^-0.5), and the block returns the attention branch
alone (no residual, no MLP); windows are zero-padded to whole patches. Its query names: the single
word "background" and a few renamed classes."""

from __future__ import annotations

from torch import Tensor

from tagclip_cli.backbone.encoder import AttentionInputs
from tagclip_cli.methods.dense import COCO_RENAMES, VOC_RENAMES, DenseConfig, DenseMethod, DenseSettings
from tagclip_cli.methods.registry import register

CLEARCLIP_VOC_QUERIES = {**VOC_RENAMES}
CLEARCLIP_COCO_QUERIES = {**COCO_RENAMES}


def clearclip_attention(inputs: AttentionInputs) -> Tensor:
    """softmax(s q q^T), (B, h, T, T)."""
    q = inputs.q
    return (q.shape[-1] ** -0.5 * q @ q.transpose(-1, -2)).softmax(dim=-1)


class ClearclipConfig(DenseConfig):
    """ClearCLIP's settings (`DenseConfig`)."""


# From the authors' VOC21 and COCO-Object configs (ViT-B/16).
CLEARCLIP_PUBLISHED = {
    "voc": DenseSettings(short_side=448, crop=448, stride=224, logit_scale=50, prob_threshold=0.5,
                         pad_crops=True),
    "coco": DenseSettings(short_side=448, crop=448, stride=224, logit_scale=50, prob_threshold=0.4,
                          pad_crops=True),
}

CLEARCLIP = register(DenseMethod(
    name="clearclip", summary="ClearCLIP: q-q attention, no residual or MLP in the last block, published settings",
    attention_for=lambda settings: clearclip_attention, keep_residual=False, published=CLEARCLIP_PUBLISHED,
    background_queries=("background",), query_tables={"voc": CLEARCLIP_VOC_QUERIES, "coco": CLEARCLIP_COCO_QUERIES},
    config_type=ClearclipConfig,
))
