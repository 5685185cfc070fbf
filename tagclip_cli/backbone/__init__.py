"""The CLIP backbone: the only package that knows open_clip internals.

- `loading`: open_clip models, checkpoint files, the built-in models, offline handling
  (`load_backbone`, `read_state_dict`, `builtin_models`).
- `model`: `Backbone`, a frozen ViT CLIP with its geometry and precision; the methods the
  algorithms call.
- `text`: prompt embeddings and the prompt-ensemble classifier with its on-disk cache; the
  templates come from the method that uses them.
- `encoder`: the encoder surgeries of docs/algorithm.md §0, §1, §5 and §8: the dense forward whose
  last block runs on the value path (eq. 6-8), the attention maps, the masked class-token forward
  of CWR (the maps made only where a method declares a need, `MapNeeds`, and read layer by layer
  by its `AttentionReader`s), the last block with an ln_1 leaf for Grad-CAM, and a last block whose attention a method
  replaces (`Backbone.custom_last_block_forward`, with earlier blocks' q, k and tokens on request).
"""

from tagclip_cli.backbone.encoder import (
    AttentionInputs,
    AttentionReader,
    CustomOutput,
    DenseOutput,
    LayerCapture,
    MapNeeds,
    fused_attention,
)
from tagclip_cli.backbone.loading import WEIGHTS_DIR, builtin_models, load_backbone, read_state_dict
from tagclip_cli.backbone.model import PRECISIONS, Backbone, check_precision, default_cache_dir
from tagclip_cli.backbone.text import TEXT_CACHE_VERSION, imagenet_templates

__all__ = [
    "PRECISIONS",
    "TEXT_CACHE_VERSION",
    "WEIGHTS_DIR",
    "AttentionInputs",
    "AttentionReader",
    "Backbone",
    "CustomOutput",
    "DenseOutput",
    "builtin_models",
    "check_precision",
    "default_cache_dir",
    "fused_attention",
    "imagenet_templates",
    "LayerCapture",
    "MapNeeds",
    "load_backbone",
    "read_state_dict",
]
