"""SCLIP (Wang et al., ECCV 2024), a dense baseline (docs/algorithm.md §12): the last block's
attention is correlative, softmax(s q q^T) + softmax(s k k^T) per head (s = d^-0.5; the rows sum
to 2), with the block's residual and MLP kept. Its query names: 26 scene words for the
background and several names for person (and on VOC for tv monitor); NACLIP uses the same."""

from __future__ import annotations

from torch import Tensor

from tagclip_cli.backbone.encoder import AttentionInputs
from tagclip_cli.methods.dense import COCO_RENAMES, VOC_RENAMES, DenseConfig, DenseMethod, DenseSettings
from tagclip_cli.methods.registry import register

SCENE_BACKGROUND = (
    "sky", "wall", "tree", "wood", "grass", "road", "sea", "river", "mountain", "sands", "desk", "bed",
    "building", "cloud", "lamp", "door", "window", "wardrobe", "ceiling", "shelf", "curtain", "stair",
    "floor", "hill", "rail", "fence",
)
PERSON_QUERIES = ("person", "person in shirt", "person in jeans", "person in dress", "person in sweater",
                  "person in skirt", "person in jacket")
SCLIP_VOC_QUERIES = {
    **VOC_RENAMES, "person": PERSON_QUERIES,
    "tvmonitor": ("television monitor", "tv monitor", "monitor", "television", "screen"),
}
SCLIP_COCO_QUERIES = {**COCO_RENAMES, "person": (*PERSON_QUERIES, "body")}


def sclip_attention(inputs: AttentionInputs) -> Tensor:
    """softmax(s q q^T) + softmax(s k k^T), (B, h, T, T)."""
    q, k = inputs.q, inputs.k
    scale = q.shape[-1] ** -0.5
    probs = (scale * q @ q.transpose(-1, -2)).softmax(dim=-1)
    return probs + (scale * k @ k.transpose(-1, -2)).softmax(dim=-1)


class SclipConfig(DenseConfig):
    """SCLIP's settings (`DenseConfig`)."""


# From the authors' VOC21 and COCO-Object configs (ViT-B/16; the class's 224 / 112 windows).
SCLIP_PUBLISHED = {
    "voc": DenseSettings(short_side=336, crop=224, stride=112, logit_scale=65, prob_threshold=0.1,
                         area_threshold=0.1),
    "coco": DenseSettings(short_side=336, crop=224, stride=112, logit_scale=50, prob_threshold=0.1),
}

SCLIP = register(DenseMethod(
    name="sclip", summary="SCLIP: correlative self-attention in the last block, published settings",
    attention_for=lambda settings: sclip_attention, keep_residual=True, published=SCLIP_PUBLISHED,
    background_queries=SCENE_BACKGROUND, query_tables={"voc": SCLIP_VOC_QUERIES, "coco": SCLIP_COCO_QUERIES},
    config_type=SclipConfig,
))
