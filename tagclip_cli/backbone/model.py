"""`Backbone`: a frozen open_clip ViT CLIP, its geometry and compute precision, and the entry points
the algorithms call (the encoder surgeries of `encoder.py`, the text classifier of `text.py`)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from tagclip_cli.backbone import encoder, text
from tagclip_cli.backbone.encoder import DenseOutput, MapNeeds, Workspace
from tagclip_cli.errors import ModelLoadError, UsageError, with_suggestion

# Compute precisions: fp32 everywhere; bf16/fp16 are CUDA autocast (weights stay fp32).
PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def default_cache_dir() -> Path:
    env = os.environ.get("TAGCLIP_CACHE_DIR")
    if env:
        return Path(env)
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "tagclip"


def check_precision(precision: str, device: torch.device | str) -> None:
    """Raise UsageError unless precision is fp32, bf16 (CUDA autocast; on CPU bf16 weights for the
    image tower) or fp16 on a CUDA device."""
    if precision not in PRECISIONS:
        raise UsageError(with_suggestion(f"precision must be one of {', '.join(PRECISIONS)}, not '{precision}'",
                                         precision, PRECISIONS))
    kind = torch.device(device).type
    if precision == "fp16" and kind != "cuda":
        raise UsageError(f"precision fp16 needs a CUDA device; on {kind} use fp32 or bf16")
    if precision == "bf16" and kind not in ("cuda", "cpu"):
        raise UsageError(f"precision bf16 is supported on CUDA and CPU, not on {kind}; use fp32")


@dataclass
class Backbone:
    """A frozen open_clip ViT CLIP plus what the algorithms need to know about it."""

    model: torch.nn.Module
    tokenizer: object
    name: str
    weights: str  # pretrained tag, "checkpoint:<sha256>", "builtin:<name>:<sha256 prefix>" or "random:<seed>"
    device: torch.device
    cache_dir: Path | None = field(default_factory=default_cache_dir)
    precision: str = "fp32"
    _workspace: Workspace = field(default_factory=Workspace, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        check_precision(self.precision, self.device)
        visual = self.model.visual
        if not hasattr(visual, "transformer") or not hasattr(visual, "conv1"):
            raise ModelLoadError(f"model '{self.name}' is not a ViT CLIP; TagCLIP needs a ViT image tower")
        if getattr(visual, "attn_pool", None) is not None:
            raise ModelLoadError(f"model '{self.name}' uses attentional pooling, which is not supported")
        block = visual.transformer.resblocks[0]
        if not isinstance(getattr(block, "attn", None), torch.nn.MultiheadAttention):
            raise ModelLoadError(f"model '{self.name}' has custom attention blocks, which are not supported")
        self.model.eval().requires_grad_(False)
        if self.precision != "fp32" and self.device.type == "cpu":
            # CPU autocast copies every weight on every call (slow); the image tower is cast once
            # instead. The text tower stays fp32, so text embeddings (and their cache) are unchanged.
            visual.to(PRECISIONS[self.precision])

    # ---- geometry -------------------------------------------------------------------------------
    @property
    def visual(self) -> torch.nn.Module:
        return self.model.visual

    @property
    def patch_size(self) -> int:
        return encoder.patch_size(self.visual)

    @property
    def native_grid(self) -> tuple[int, int]:
        return encoder.native_grid(self.visual)

    @property
    def native_size(self) -> int:
        return self.native_grid[0] * self.patch_size

    @property
    def num_layers(self) -> int:
        return len(self.visual.transformer.resblocks)

    @property
    def embed_dim(self) -> int:
        """D, the dimension of projected embeddings."""
        return encoder.embed_dim(self.visual)

    def autocast(self) -> AbstractContextManager:
        """The autocast context every image forward runs in (a no-op in fp32, and on CPU, where
        the image tower's weights are cast once instead)."""
        if self.precision == "fp32" or self.device.type == "cpu":
            return nullcontext()
        return torch.autocast(self.device.type, dtype=PRECISIONS[self.precision])

    @property
    def num_heads(self) -> int:
        return int(self.visual.transformer.resblocks[0].attn.num_heads)

    @property
    def logit_scale(self) -> float:
        return float(self.model.logit_scale.exp())

    @property
    def dtype(self) -> torch.dtype:
        return self.visual.conv1.weight.dtype

    @property
    def mean(self) -> tuple[float, float, float]:
        return tuple(getattr(self.visual, "image_mean", None) or (0.48145466, 0.4578275, 0.40821073))

    @property
    def std(self) -> tuple[float, float, float]:
        return tuple(getattr(self.visual, "image_std", None) or (0.26862954, 0.26130258, 0.27577711))

    def identity(self) -> dict:
        """What determines every output of this backbone (for caches and run metadata)."""
        return {"model": self.name, "weights": self.weights}

    # ---- text (text.py) ---------------------------------------------------------------------------
    def encode_prompts(self, prompts: Sequence[str], batch_size: int = 256) -> Tensor:
        """L2-normalised text embeddings of prompts, (P, D) fp32 on the device."""
        return text.encode_prompts(self.model, self.tokenizer, self.device, prompts, batch_size)

    def text_classifier(self, names: Sequence[str], templates: Sequence[str]) -> Tensor:
        """Prompt-ensemble classifier of `names` with the method's `templates`, (C, D) fp32 on the
        device; classes already in the on-disk cache are not encoded again (see `text.classifier`)."""
        self.warn_truncated(names, templates)
        cache = text.TextCache(self.cache_dir, self.identity(), templates) if self.cache_dir else None
        return text.classifier(self.encode_prompts, names, templates, cache).to(self.device, torch.float32)

    def warn_truncated(self, names: Sequence[str], templates: Sequence[str]) -> list[str]:
        """Warn once per class whose prompts the tokenizer cuts at the text context; returns them."""
        return text.warn_truncated(self.model, self.tokenizer, names, templates)

    # ---- image (encoder.py) -----------------------------------------------------------------------
    def positional_embedding(self, grid: tuple[int, int], fp16_round: bool = False) -> Tensor:
        """(1+gh*gw, W) positional embedding interpolated to `grid`; fp16_round: quirk Q1
        (docs/algorithm.md §10)."""
        return encoder.positional_embedding(self.visual, grid, fp16_round)

    def embed(self, pixels: Tensor, fp16_round: bool = False) -> Tensor:
        """Patch embedding + class token + positional embedding + ln_pre: (B, 3, H, W) -> (B, 1+N, W)."""
        return encoder.embed(self.visual, pixels, fp16_round)

    def _block(self, index: int) -> torch.nn.Module:
        return self.visual.transformer.resblocks[index]

    def block_forward(
        self, index: int, x: Tensor, attn_mask: Tensor | None = None, map_out: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        """Run block `index` (0-based) on (B, T, W); returns (new x, attention map (B, T, T)),
        the map written into map_out when given."""
        return encoder.block_forward(self._block(index), x, self._workspace, attn_mask, map_out)

    def value_path_block(self, index: int, x: Tensor, map_out: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Block `index` on the value path (docs/algorithm.md §1, eq. 6-8); returns (new x (B, T, W),
        the ordinary attention map (B, T, T))."""
        return encoder.value_path_block(self._block(index), x, self._workspace, map_out)

    def block_forward_ln1_leaf(self, index: int, x: Tensor, leaf: bool = True) -> tuple[Tensor, Tensor, Tensor]:
        """Block `index` with its ln_1 output as an autograd leaf (Grad-CAM; leaf=False: kept in x's
        graph); see `encoder.block_forward_ln1_leaf`. Returns (new x, ln_1 output, attention map)."""
        return encoder.block_forward_ln1_leaf(self._block(index), x, self._workspace, leaf)

    def block_keys(self, index: int, x: Tensor) -> Tensor:
        """Keys (B, T, W) of block `index` for tokens x (B, T, W) (MaskCLIP's key smoothing)."""
        return encoder.block_keys(self._block(index), x)

    def project_tokens(self, x: Tensor) -> Tensor:
        """ln_post and proj on every token: (B, T, W) -> (B, T, D)."""
        return encoder.project_tokens(self.visual, x)

    def dense_forward(self, pixels: Tensor, fp16_round_pos: bool = False, keep_pre_last: bool = False,
                      needs: MapNeeds | None = None) -> DenseOutput:
        """Dense forward (docs/algorithm.md §1) of (B, 3, H, W) normalised images, H and W multiples
        of the patch size; needs: the attention maps the caller's method uses (`MapNeeds`; None =
        every layer's map); see `encoder.dense_forward` and `DenseOutput`."""
        with self.autocast():
            return encoder.dense_forward(self.visual, pixels, self._workspace, fp16_round_pos, keep_pre_last, needs)

    def custom_last_block_forward(
        self, pixels: Tensor, attention: encoder.LastBlockAttention, keep_residual: bool, bicubic_pos: bool = True,
        capture: Sequence[int] = (),
    ) -> encoder.CustomOutput:
        """Projected patch tokens (B, N, D) fp32 of normalised images (B, 3, H, W) whose last block's
        attention is replaced by a method's `attention` (given `encoder.AttentionInputs`: q, k, the
        grid and the earlier blocks named in capture); see `encoder.custom_last_block_forward`."""
        with self.autocast():
            return encoder.custom_last_block_forward(self.visual, pixels, attention, keep_residual, bicubic_pos,
                                                     capture)

    def custom_last_block(
        self, x: Tensor, attention: encoder.LastBlockAttention, keep_residual: bool, grid: tuple[int, int],
        layers: dict[int, encoder.LayerCapture] | None = None,
    ) -> Tensor:
        """The last block with its attention replaced (`encoder.custom_last_block`) on the tokens x
        (B, 1+N, W) entering it (e.g. a `custom_last_block_forward` capture of block L-2), then
        ln_post and proj: projected patch tokens (B, N, D) fp32. Lets a method run the last block
        more than once on one forward of the earlier blocks."""
        with self.autocast():
            out = encoder.custom_last_block(self._block(-1), x, attention, grid, keep_residual, layers)
            return encoder.project_tokens(self.visual, out[:, 1:]).float()

    def block_outputs(self, pixels: Tensor, keep: Sequence[int], bicubic_pos: bool = True) -> dict[int, Tensor]:
        """The tokens (B, 1+N, W) leaving the earlier blocks of 0-based indices keep, for normalised
        images (B, 3, H, W); see `encoder.block_outputs`."""
        with self.autocast():
            return encoder.block_outputs(self.visual, pixels, keep, bicubic_pos)

    def custom_last_attention(self, x: Tensor, attention: encoder.LastBlockAttention, grid: tuple[int, int]) -> Tensor:
        """The last block's attention branch alone (no residual, no MLP) with its mixing weights
        replaced (`encoder.custom_attention`), on any tokens x (B, T', W) (e.g. patch tokens without
        the class token): (B, T', W)."""
        with self.autocast():
            return encoder.custom_attention(self._block(-1), self._block(-1).ln_1(x), attention, grid)

    def masked_cls_forward(
        self, crops: Tensor, patch_masks: Tensor, mask_value: float = -1000.0, chunk_size: int = 32
    ) -> Tensor:
        """CWR's class-token embeddings (B, D) fp32 of crops (B, 3, S, S) whose class-token query
        sees only the patches of patch_masks (B, N) bool; see `encoder.masked_cls_forward`."""
        with self.autocast():
            return encoder.masked_cls_forward(self.visual, crops, patch_masks, mask_value, chunk_size)

    def encode_image(self, pixels: Tensor) -> Tensor:
        """Standard CLIP image embedding of (B, 3, S, S) images at the native size, (B, D) fp32."""
        with self.autocast():
            return self.model.encode_image(pixels.to(self.dtype)).float()
