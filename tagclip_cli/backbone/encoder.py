"""The encoder surgeries on an open_clip ViT image tower (`visual`): docs/algorithm.md §0 (the
positional embedding at any grid, quirk Q1), §1 (dense features: the value-path last block, eq. 6-8,
and the attention maps of every layer), §5 (CWR's masked class-token forward), §8 (the last
block with its ln_1 output as an autograd leaf, for Grad-CAM) and a last block whose attention a
method replaces (§12's dense baselines; the encoder knows no method).

Plain functions of open_clip modules and tensors; `Backbone` wraps them with its buffers and
precision. Every block of a ViT is

    x -> x + ls_1(attention(ln_1(x))) -> x + ls_2(mlp(ln_2(x)))        (`residual_block`)

and the surgeries differ only in the attention branch:

- `self_attention`: the ordinary softmax attention, also returning its head-averaged map;
- `value_path_attention`: MaskCLIP's value path, out_proj(v) for every token (no query/key
  mixing), while the map returned is still the ordinary softmax;
- `fused_attention`: `scaled_dot_product_attention` without a map (CWR), optionally for the
  first few queries only;
- `custom_attention`: mixing weights given by a method (e.g. q-q / k-k similarities in place of
  q-k), optionally from earlier blocks' q and k (`custom_last_block_forward(capture=...)`).

Shapes: B images, T = 1 + N tokens (class token first), W width, h heads of d = W / h, D the
projected dimension, L blocks.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import Tensor


class AttentionReader(Protocol):
    """Reads the head-averaged attention maps of a dense forward as they are made, layer by layer,
    so that a method that needs of each map only a statistic (DMAR's vote: a comparison with the
    map's mean, docs/algorithm.md §3) never has them stored. One reader per forward."""

    def read(self, layer: int, attn: Tensor) -> None:
        """Layer `layer` (0-based) has map attn (B, T, T) fp32; the buffer is reused after the call."""
        ...

    def result(self) -> Tensor:
        """What the reader made of every layer's map, batch-first (B, ...)."""
        ...


@dataclass(frozen=True)
class MapNeeds:
    """The attention maps a dense forward makes, declared by the methods that use them.

    keep: 1-based inclusive layer range (lo, hi) whose maps are kept in `DenseOutput.attn` (a mean
    over a range of layers, e.g. DMAR's refinement or CLS-SEG's affinity); None = none kept.
    readers: (name, factory) pairs; each factory makes a fresh `AttentionReader` per forward,
    which is fed the map of every layer; its result is `DenseOutput.reads[name]`.
    A layer whose map nobody keeps or reads is not made: its attention is fused where that is
    exact (not in fp32, whose outputs stay bitwise those of the explicit softmax), and the last
    block's softmax (the value path does not use it) is skipped."""

    keep: tuple[int, int] | None = None
    readers: tuple[tuple[str, Callable[[], AttentionReader]], ...] = ()

    def __or__(self, other: MapNeeds) -> MapNeeds:
        """Both needs: the smallest range holding both kept ranges, the readers of both (by name)."""
        ranges = [r for r in (self.keep, other.keep) if r is not None]
        keep = (min(r[0] for r in ranges), max(r[1] for r in ranges)) if ranges else None
        names = {name for name, _ in self.readers}
        return MapNeeds(keep, self.readers + tuple(r for r in other.readers if r[0] not in names))

    def layer_made(self, index: int) -> bool:
        """Whether the map of 0-based layer index is made."""
        return bool(self.readers) or (self.keep is not None and self.keep[0] <= index + 1 <= self.keep[1])


@dataclass
class DenseOutput:
    """Result of a dense forward of B same-sized images (or of one image, without the B dimension,
    from `image`).

    tokens: (B, 1+N, D) projected tokens (class token first), value path in the last block.
    attn: (B, K, 1+N, 1+N) head-averaged softmax attention (fp32) of the K kept layers, 1-based
    layers attn_from..attn_from+K-1 (every layer unless the forward was given `MapNeeds`); None
    when no map was kept. Read a range with `maps`.
    grid: (gh, gw) patch grid, N = gh * gw.
    pre_last: (B, 1+N, W) tokens entering block L (only when requested).
    reads: the results of the forward's `AttentionReader`s by name, each (B, ...).
    """

    tokens: Tensor
    attn: Tensor | None
    grid: tuple[int, int]
    pre_last: Tensor | None = None
    attn_from: int = 1
    reads: dict[str, Tensor] = field(default_factory=dict)

    def image(self, j: int) -> DenseOutput:
        """Image j of the batch: tokens (1+N, D), attn (K, 1+N, 1+N), pre_last (1+N, W), reads (...)."""
        pre_last = self.pre_last[j] if self.pre_last is not None else None
        attn = self.attn[j] if self.attn is not None else None
        reads = {name: value[j] for name, value in self.reads.items()}
        return DenseOutput(self.tokens[j], attn, self.grid, pre_last, self.attn_from, reads)

    def maps(self, lo: int, hi: int) -> Tensor:
        """The kept maps of 1-based layers lo..hi, ([B,] hi-lo+1, 1+N, 1+N); ValueError if not kept."""
        count = 0 if self.attn is None else self.attn.shape[-3]
        if not self.attn_from <= lo <= hi < self.attn_from + count:
            kept = f"{self.attn_from}..{self.attn_from + count - 1}" if count else "none"
            raise ValueError(f"the maps of layers {lo}..{hi} were not kept by the dense forward (kept: {kept})")
        return self.attn[..., lo - self.attn_from : hi - self.attn_from + 1, :, :]


class Workspace:
    """Buffers for the attention probabilities, one per role, reused while the shape, dtype and
    device stay the same: the (B, h, T, T) scores of a 500x375 batch of 8 are ~200 MB per layer,
    and fresh allocations that size come from the OS as new pages each time (measured: ~20% of
    the CPU time spent zeroing them)."""

    def __init__(self) -> None:
        self._buffers: dict[str, Tensor | None] = {}

    def get(self, role: str, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> Tensor:
        """The buffer for `role`, (re)allocated when it does not fit. A buffer made under
        inference_mode cannot be written outside it, so it is then replaced."""
        buf = self._buffers.get(role)
        stale = buf is not None and buf.is_inference() and not torch.is_inference_mode_enabled()
        if stale or buf is None or buf.shape != shape or buf.dtype != dtype or buf.device != device:
            buf = self._buffers[role] = None  # free the old buffer before allocating its successor
            self._buffers[role] = buf = torch.empty(shape, dtype=dtype, device=device)
        return buf


# ---- geometry and embedding (docs/algorithm.md §0) ---------------------------------------------

def patch_size(visual: torch.nn.Module) -> int:
    return int(visual.conv1.kernel_size[0])


def native_grid(visual: torch.nn.Module) -> tuple[int, int]:
    """The (gh0, gw0) patch grid the positional embedding was trained on (square)."""
    side = math.isqrt(visual.positional_embedding.shape[0] - 1)
    return (side, side)


def embed_dim(visual: torch.nn.Module) -> int:
    """D, the dimension of projected embeddings."""
    return int(visual.proj.shape[1]) if visual.proj is not None else int(visual.conv1.out_channels)


def positional_embedding(visual: torch.nn.Module, grid: tuple[int, int], fp16_round: bool = False) -> Tensor:
    """(1+gh*gw, W) positional embedding: the native patch grid bilinearly interpolated to `grid`.

    fp16_round: quirk Q1 (docs/algorithm.md §10), the reference rounds an interpolated embedding
    through fp16."""
    pos = visual.positional_embedding
    if tuple(grid) == native_grid(visual):
        return pos
    gh0, gw0 = native_grid(visual)
    patch_pos = pos[1:].T.reshape(1, -1, gh0, gw0).float()
    patch_pos = F.interpolate(patch_pos, size=grid, mode="bilinear", align_corners=False)
    out = torch.cat([pos[:1].float(), patch_pos.reshape(pos.shape[1], -1).T]).to(pos.dtype)
    if fp16_round:  # quirk Q1 (docs/algorithm.md §10)
        out = out.half().to(pos.dtype)
    return out


def positional_embedding_bicubic(visual: torch.nn.Module, grid: tuple[int, int]) -> Tensor:
    """(1+gh*gw, W) positional embedding as SCLIP, ClearCLIP and NACLIP interpolate it
    (docs/algorithm.md §12): bicubic, with the scale factors (g + 0.1) / g0 given to the
    interpolation itself (so its sampling positions follow those factors, not the output size).
    The native grid is returned as it is."""
    pos = visual.positional_embedding
    if tuple(grid) == native_grid(visual):
        return pos
    gh0, gw0 = native_grid(visual)
    patch_pos = pos[1:].T.reshape(1, -1, gh0, gw0)
    scale = ((grid[0] + 0.1) / gh0, (grid[1] + 0.1) / gw0)
    patch_pos = F.interpolate(patch_pos, scale_factor=scale, mode="bicubic", align_corners=False,
                              recompute_scale_factor=False)
    return torch.cat([pos[:1], patch_pos.reshape(pos.shape[1], -1).T])


def embed(visual: torch.nn.Module, pixels: Tensor, fp16_round: bool = False, bicubic_pos: bool = False) -> Tensor:
    """Patch embedding + class token + positional embedding + ln_pre: (B, 3, H, W) -> (B, 1+N, W).

    H and W need not be multiples of the patch size: the patch convolution drops the remainder.
    bicubic_pos: the dense baselines' interpolation (`positional_embedding_bicubic`)."""
    p = patch_size(visual)
    grid = (pixels.shape[-2] // p, pixels.shape[-1] // p)
    x = visual.conv1(pixels.to(visual.conv1.weight.dtype))
    x = x.flatten(2).transpose(1, 2)
    cls = visual.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
    x = torch.cat([cls, x], dim=1)
    pos = positional_embedding_bicubic(visual, grid) if bicubic_pos else positional_embedding(visual, grid, fp16_round)
    x = x + pos.to(x.dtype)
    return visual.ln_pre(x)


def project_tokens(visual: torch.nn.Module, x: Tensor) -> Tensor:
    """ln_post and proj on every token: (B, T, W) -> (B, T, D)."""
    x = visual.ln_post(x)
    return x @ visual.proj if visual.proj is not None else x


# ---- attention pieces ----------------------------------------------------------------------------

def split_qkv(mha: torch.nn.MultiheadAttention, x: Tensor, queries: int | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """Per-head queries, keys and values of ln_1 output x (B, T, W): k and v (B, h, T, d), q
    (B, h, T, d), or (B, h, Q, d) for the first `queries` tokens only (their projection alone is
    computed)."""
    b, t, w = x.shape
    h = mha.num_heads
    if queries is None:
        qkv = F.linear(x, mha.in_proj_weight, mha.in_proj_bias)
        q, k, v = qkv.reshape(b, t, 3, h, w // h).permute(2, 0, 3, 1, 4)
        return q, k, v
    q = F.linear(x[:, :queries], mha.in_proj_weight[:w], mha.in_proj_bias[:w])
    q = q.reshape(b, queries, h, w // h).transpose(1, 2)
    kv = F.linear(x, mha.in_proj_weight[w:], mha.in_proj_bias[w:])
    k, v = kv.reshape(b, t, 2, h, w // h).permute(2, 0, 3, 1, 4)
    return q, k, v


def merge_heads(mha: torch.nn.MultiheadAttention, mixed: Tensor) -> Tensor:
    """The attention branch's output: heads (B, h, T, d) concatenated and out_proj, (B, T, W)."""
    b, _, _, _ = mixed.shape
    return mha.out_proj(mixed.transpose(1, 2).reshape(b, -1, mha.embed_dim))


def softmax_attention(q: Tensor, k: Tensor, attn_mask: Tensor | None, workspace: Workspace | None) -> Tensor:
    """Per-head attention probabilities softmax(q k^T / sqrt(d) + mask), (B, h, T, T) fp32.

    The scores and the softmax are fp32 whatever the compute precision (autocast or bf16 weights):
    the maps feed DMAR's K-of-L vote (docs/algorithm.md §3), whose comparisons with each map's mean
    must not depend on it. Only q and k are cast, (B, h, T, d), not the (B, h, T, T) scores.
    workspace None: fresh tensors (autograd can follow them); otherwise computed in place in the
    workspace's "probs" buffer."""
    q = q * q.shape[-1] ** -0.5
    if workspace is None:
        with torch.autocast(q.device.type, enabled=False):
            scores = q.float() @ k.float().transpose(-1, -2)
        if attn_mask is not None:
            scores = scores + attn_mask.float()
        return scores.softmax(dim=-1)
    b, h, t, d = q.shape
    probs = workspace.get("probs", (b * h, t, t), torch.float32, q.device)
    with torch.autocast(q.device.type, enabled=False):
        torch.bmm(q.reshape(b * h, t, d).float(), k.reshape(b * h, t, d).float().transpose(1, 2), out=probs)
    if attn_mask is not None:
        probs.view(b, h, t, t).add_(attn_mask.float())
    torch.softmax(probs, dim=-1, out=probs)  # in place: the scores become the probabilities
    return probs.view(b, h, t, t)


def head_average(probs: Tensor, map_out: Tensor | None = None) -> Tensor:
    """The attention map (B, T, T) of probabilities (B, h, T, T): the mean over heads, written into
    map_out (B, T, T) when given (and then returned)."""
    if map_out is None:
        return probs.mean(dim=1)
    if probs.requires_grad:  # out= does not support autograd
        return map_out.copy_(probs.mean(dim=1))
    return torch.mean(probs, dim=1, out=map_out)


def mix_values(probs: Tensor, v: Tensor, workspace: Workspace | None) -> Tensor:
    """probs (B, h, T, T) fp32 applied to the values v (B, h, T, d), in v's dtype: (B, h, T, d)."""
    if workspace is None:
        return probs.to(v.dtype) @ v
    b, h, t, d = v.shape
    flat = probs.reshape(b * h, t, t)
    if probs.dtype != v.dtype:
        low = workspace.get("probs_low", (b * h, t, t), v.dtype, v.device)
        low.copy_(flat)
    else:
        low = flat
    return torch.bmm(low, v.reshape(b * h, t, d)).view(b, h, t, d)


def _buffers_for(y: Tensor, workspace: Workspace) -> Workspace | None:
    """The workspace, unless autograd must follow the attention of y (then fresh tensors)."""
    return None if torch.is_grad_enabled() and y.requires_grad else workspace


def self_attention(
    block: torch.nn.Module, y: Tensor, workspace: Workspace, attn_mask: Tensor | None = None,
    map_out: Tensor | None = None, need_map: bool = True,
) -> tuple[Tensor, Tensor | None]:
    """Ordinary multi-head attention of block on its ln_1 output y (B, T, W).

    Returns (the branch's output before the residual (B, T, W), head-averaged map (B, T, T) fp32,
    None unless need_map); map_out (B, T, T), if given, receives the map. attn_mask: additive,
    broadcast to (B, h, T, T)."""
    mha: torch.nn.MultiheadAttention = block.attn
    buffers = _buffers_for(y, workspace)
    q, k, v = split_qkv(mha, y)
    probs = softmax_attention(q, k, attn_mask, buffers)
    attn = head_average(probs, map_out) if need_map else None  # before mix_values (it may reuse buffers)
    return merge_heads(mha, mix_values(probs, v, buffers)), attn


def value_path_attention(
    block: torch.nn.Module, y: Tensor, workspace: Workspace, attn_mask: Tensor | None = None,
    map_out: Tensor | None = None, need_map: bool = True,
) -> tuple[Tensor, Tensor | None]:
    """MaskCLIP's value path (docs/algorithm.md §1, eq. 6-8) on ln_1 output y (B, T, W): every
    token's branch output is out_proj of its own values, with no query/key mixing, so each patch
    token stays a local feature that the text classifier can read.

    Returns (branch output (B, T, W), head-averaged map (B, T, T) fp32): the map is still the
    ordinary softmax attention of the layer (DMAR and CAA use every layer's map); attn_mask and
    map_out act on it as in `self_attention`. need_map False: no softmax at all, the map is None."""
    mha: torch.nn.MultiheadAttention = block.attn
    q, k, v = split_qkv(mha, y)
    attn = None
    if need_map:
        attn = head_average(softmax_attention(q, k, attn_mask, _buffers_for(y, workspace)), map_out)
    return merge_heads(mha, v), attn


def fused_attention(mha: torch.nn.MultiheadAttention, x: Tensor, attn_mask: Tensor | None,
                    queries: int | None = None) -> Tensor:
    """Attention output (before the residual) of ln_1 output x (B, T, W) without materialising the
    map: (B, Q, W) for the first `queries` tokens as queries (all T when None)."""
    q, k, v = split_qkv(mha, x, queries)
    if attn_mask is not None:
        attn_mask = attn_mask.to(q.dtype)
    return merge_heads(mha, F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask))


# ---- blocks -----------------------------------------------------------------------------------

def residual_block(block: torch.nn.Module, x: Tensor, attn_out: Tensor) -> Tensor:
    """The rest of a block once its attention branch attn_out (B, T', W) is computed: add it to the
    residual stream x (B, T', W) of the same tokens, then the MLP branch. Returns (B, T', W)."""
    x = x + block.ls_1(attn_out)
    return x + block.ls_2(block.mlp(block.ln_2(x)))


def block_forward(
    block: torch.nn.Module, x: Tensor, workspace: Workspace, attn_mask: Tensor | None = None,
    map_out: Tensor | None = None, need_map: bool = True,
) -> tuple[Tensor, Tensor | None]:
    """An ordinary block on (B, T, W); returns (new x, attention map (B, T, T), None unless need_map)."""
    out, attn = self_attention(block, block.ln_1(x), workspace, attn_mask, map_out, need_map)
    return residual_block(block, x, out), attn


def value_path_block(
    block: torch.nn.Module, x: Tensor, workspace: Workspace, map_out: Tensor | None = None, need_map: bool = True,
) -> tuple[Tensor, Tensor | None]:
    """A block with the value path in place of its attention (docs/algorithm.md §1, eq. 6-8): the
    last block of the dense forward. Returns (new x (B, T, W), ordinary attention map (B, T, T),
    None unless need_map)."""
    out, attn = value_path_attention(block, block.ln_1(x), workspace, map_out=map_out, need_map=need_map)
    return residual_block(block, x, out), attn


def fused_block(block: torch.nn.Module, x: Tensor) -> Tensor:
    """An ordinary block on (B, T, W) with fused attention (no map): the new x."""
    return residual_block(block, x, fused_attention(block.attn, block.ln_1(x), None))


# ---- a changed last-block attention (the training-free segmenters of docs/algorithm.md §12) --------

@dataclass
class LayerCapture:
    """What a custom forward keeps of an earlier block on request: q and k (B, h, T, d) of its
    attention (from its ln_1 output), x (B, T, W) the tokens leaving it."""

    q: Tensor
    k: Tensor
    x: Tensor


@dataclass
class AttentionInputs:
    """What a replacement last-block attention sees: its own per-head q and k (B, h, T, d), cast to
    float32 at least (float64 stays float64), the (gh, gw) patch grid of the T = 1 + N tokens, and
    the captured earlier blocks by 0-based index (`LayerCapture`)."""

    q: Tensor
    k: Tensor
    grid: tuple[int, int]
    layers: dict[int, LayerCapture]


# attention(inputs) -> per-head mixing weights P (B, h, T, T) in the inputs' dtype; the block's
# branch output is then out_proj of P @ v.
LastBlockAttention = Callable[[AttentionInputs], Tensor]


@dataclass
class CustomOutput:
    """Result of `custom_last_block_forward`: tokens (B, N, D) fp32, the projected patch tokens;
    layers: the captured earlier blocks (`LayerCapture`) by 0-based index."""

    tokens: Tensor
    layers: dict[int, LayerCapture]


def custom_attention(block: torch.nn.Module, y: Tensor, attention: LastBlockAttention, grid: tuple[int, int],
                     layers: dict[int, LayerCapture] | None = None) -> Tensor:
    """The attention branch of block on ln_1 output y (B, T, W) with the mixing weights of
    `attention`: out_proj of P @ v per head, (B, T, W). P is computed without autocast from q and k
    in float32 at least; the product with v is in v's dtype."""
    mha: torch.nn.MultiheadAttention = block.attn
    q, k, v = split_qkv(mha, y)
    work = torch.promote_types(q.dtype, torch.float32)  # fp32 at least (float64 stays float64)
    with torch.autocast(y.device.type, enabled=False):
        probs = attention(AttentionInputs(q.to(work), k.to(work), grid, layers or {}))
    return merge_heads(mha, probs.to(v.dtype) @ v)


def custom_last_block(block: torch.nn.Module, x: Tensor, attention: LastBlockAttention, grid: tuple[int, int],
                      keep_residual: bool, layers: dict[int, LayerCapture] | None = None) -> Tensor:
    """A last block with its attention replaced (`custom_attention`) on tokens x (B, T, W) ->
    (B, T, W): keep_residual keeps the residual and the MLP around it (`residual_block`); otherwise
    the attention branch alone is returned (no residual, no MLP, no layer scale)."""
    out = custom_attention(block, block.ln_1(x), attention, grid, layers)
    return residual_block(block, x, out) if keep_residual else out


def custom_last_block_forward(
    visual: torch.nn.Module, pixels: Tensor, attention: LastBlockAttention, keep_residual: bool,
    bicubic_pos: bool = True, capture: Sequence[int] = (),
) -> CustomOutput:
    """Projected patch tokens (B, N, D) fp32 of normalised images (B, 3, H, W) whose last block runs
    `custom_last_block`: blocks 1..L-1 as usual (fused attention: no map is needed), then ln_post
    and proj. bicubic_pos: the positional embedding of `positional_embedding_bicubic` (else
    `positional_embedding`). capture: 0-based indices of earlier blocks whose q, k and output
    tokens are kept (`LayerCapture`) and handed to `attention`. Sizes that are not multiples of the
    patch size lose the remainder in the patch convolution."""
    p = patch_size(visual)
    grid = (pixels.shape[-2] // p, pixels.shape[-1] // p)
    blocks = visual.transformer.resblocks
    x = embed(visual, pixels, bicubic_pos=bicubic_pos)
    layers: dict[int, LayerCapture] = {}
    for i, block in enumerate(blocks[:-1]):
        y = block.ln_1(x)
        x = residual_block(block, x, fused_attention(block.attn, y, None))
        if i in capture:
            q, k, _ = split_qkv(block.attn, y)
            layers[i] = LayerCapture(q, k, x)
    x = custom_last_block(blocks[-1], x, attention, grid, keep_residual, layers)
    return CustomOutput(project_tokens(visual, x[:, 1:]).float(), layers)


def block_outputs(visual: torch.nn.Module, pixels: Tensor, keep: Sequence[int],
                  bicubic_pos: bool = True) -> dict[int, Tensor]:
    """The tokens (B, 1+N, W) leaving the blocks of 0-based indices keep (each < L - 1) for
    normalised images (B, 3, H, W): blocks 1..L-1 as usual (fused attention), the last block not
    run; bicubic_pos as in `custom_last_block_forward`."""
    blocks = visual.transformer.resblocks
    x = embed(visual, pixels, bicubic_pos=bicubic_pos)
    out: dict[int, Tensor] = {}
    for i, block in enumerate(blocks[: max(keep) + 1]):
        x = residual_block(block, x, fused_attention(block.attn, block.ln_1(x), None))
        if i in keep:
            out[i] = x
    return out


def block_forward_ln1_leaf(
    block: torch.nn.Module, x: Tensor, workspace: Workspace, leaf: bool = True
) -> tuple[Tensor, Tensor, Tensor]:
    """An ordinary block whose ln_1 output is made a fresh autograd leaf (Grad-CAM, docs/algorithm.md
    §8). Call under `torch.enable_grad()` with x (B, T, W) not requiring grad. Returns (new x, the
    ln_1 leaf (B, T, W) requiring grad, attention map (B, T, T)). The ln_1 output feeds only the
    attention, so the gradient on the leaf is the gradient the reference records with a hook on ln_1.
    leaf=False keeps ln_1 in x's graph (training through a Grad-CAM: the demo model's cam loss)."""
    ln1 = block.ln_1(x)
    if leaf:
        ln1 = ln1.detach().requires_grad_(True)
    out, attn = self_attention(block, ln1, workspace)
    return residual_block(block, x, out), ln1, attn


def block_keys(block: torch.nn.Module, x: Tensor) -> Tensor:
    """Keys of block for tokens x (B, T, W): ln_1 then the key projection, heads concatenated,
    (B, T, W). MaskCLIP's key smoothing (docs/algorithm.md §9) uses the last block's keys."""
    mha: torch.nn.MultiheadAttention = block.attn
    w = x.shape[-1]
    weight = mha.in_proj_weight[w : 2 * w]
    bias = mha.in_proj_bias[w : 2 * w] if mha.in_proj_bias is not None else None
    return F.linear(block.ln_1(x), weight, bias)


# ---- the surgeries ------------------------------------------------------------------------------

def dense_forward(
    visual: torch.nn.Module, pixels: Tensor, workspace: Workspace, fp16_round_pos: bool = False,
    keep_pre_last: bool = False, needs: MapNeeds | None = None,
) -> DenseOutput:
    """Dense features at native resolution (docs/algorithm.md §1) of (B, 3, H, W) normalised
    images, H and W multiples of the patch size: blocks 1..L-1 as usual, block L on the value path,
    every token through ln_post and proj. needs: the attention maps made (`MapNeeds`: kept ranges
    and readers); None = every layer's map kept. fp16_round_pos: quirk Q1 (docs/algorithm.md §10).
    See `DenseOutput` for shapes."""
    p = patch_size(visual)
    if pixels.shape[-2] % p or pixels.shape[-1] % p:
        raise ValueError(f"image size {tuple(pixels.shape[-2:])} is not a multiple of the patch size {p}")
    grid = (pixels.shape[-2] // p, pixels.shape[-1] // p)
    t = 1 + grid[0] * grid[1]
    blocks = visual.transformer.resblocks
    if needs is None:
        needs = MapNeeds(keep=(1, len(blocks)))
    readers = {name: make() for name, make in needs.readers}
    lo, hi = needs.keep or (1, 0)
    # Layer-major storage: each kept layer's map is one contiguous (B, T, T) block written in place;
    # the returned (B, K, T, T) is a view of it.
    kept = torch.empty(hi - lo + 1, pixels.shape[0], t, t, device=pixels.device) if needs.keep else None
    x = embed(visual, pixels, fp16_round_pos)
    # Exact: fp32 without autocast; a layer without a map then keeps the explicit softmax (bitwise).
    exact = x.dtype == torch.float32 and not torch.is_autocast_enabled(pixels.device.type)
    pre_last = None
    for i, block in enumerate(blocks):
        map_out = None
        if needs.layer_made(i):
            inside = kept is not None and lo <= i + 1 <= hi
            map_out = kept[i + 1 - lo] if inside else workspace.get("map", (x.shape[0], t, t), torch.float32, x.device)
        if i == len(blocks) - 1:
            pre_last = x if keep_pre_last else None
            # The step that makes patch tokens local features: block L on the value path (eq. 6-8).
            x, _ = value_path_block(block, x, workspace, map_out, need_map=map_out is not None)
        elif map_out is None and not exact:
            x = fused_block(block, x)
        else:
            x, _ = block_forward(block, x, workspace, map_out=map_out, need_map=map_out is not None)
        for reader in readers.values() if map_out is not None else ():
            reader.read(i, map_out)
    tokens = project_tokens(visual, x).float()
    reads = {name: reader.result() for name, reader in readers.items()}
    attn = kept.transpose(0, 1) if kept is not None else None
    return DenseOutput(tokens, attn, grid, pre_last, lo, reads)


def masked_cls_forward(
    visual: torch.nn.Module, crops: Tensor, patch_masks: Tensor, mask_value: float = -1000.0, chunk_size: int = 32
) -> Tensor:
    """Class-token embeddings of crops where the class-token query only sees masked-in patches (CWR,
    docs/algorithm.md §5).

    crops: (B, 3, S, S) normalised, S = native size. patch_masks: (B, N) bool, N = native grid
    cells, True = the class token may attend to that patch. Returns (B, D) fp32 (not normalised).
    Every layer uses the mask; patch queries are unrestricted. No attention map is needed, so the
    attention is fused, and in the last block only the class token is computed (the patch tokens'
    outputs there would be thrown away). Crops run in chunks of chunk_size so that memory does not
    grow with the number of candidates."""
    out = []
    for start in range(0, crops.shape[0], chunk_size):
        chunk = slice(start, start + chunk_size)
        out.append(_masked_cls_chunk(visual, crops[chunk], patch_masks[chunk], mask_value))
    if not out:
        return torch.zeros(0, embed_dim(visual), device=crops.device)
    return torch.cat(out)


def _masked_cls_chunk(visual: torch.nn.Module, crops: Tensor, patch_masks: Tensor, mask_value: float) -> Tensor:
    b, n = patch_masks.shape
    x = embed(visual, crops)
    additive = torch.zeros(b, 1, 1 + n, 1 + n, device=crops.device, dtype=x.dtype)
    additive[:, 0, 0, 1:] = (~patch_masks.bool()).to(x.dtype) * mask_value
    blocks = visual.transformer.resblocks
    for block in blocks[:-1]:
        x = residual_block(block, x, fused_attention(block.attn, block.ln_1(x), additive))
    last = blocks[-1]
    cls_out = fused_attention(last.attn, last.ln_1(x), additive[:, :, :1], queries=1)
    cls = residual_block(last, x[:, :1], cls_out)
    return project_tokens(visual, cls)[:, 0].float()
