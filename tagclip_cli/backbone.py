"""The CLIP backbone: loading open_clip models and checkpoints, the cached text classifier, and the
encoder surgeries TagCLIP and CLIP-ES need. This is the only module that knows open_clip internals.

Surgeries (all batched, generic over ViT patch size, grid and depth):
- `dense_forward`: native-resolution forward (interpolated positional embedding), blocks 1..L-1 as
  usual, block L on the value path (no query/key mixing), every token through ln_post and proj; the
  head-averaged attention maps of all L layers are returned.
- `masked_cls_forward`: the unmodified encoder at its native size, where the class-token query may
  only attend to the patches of a per-crop mask (CWR).
- `last_block` / `project_tokens` / `embed`: the pieces CLIP-ES runs with gradients.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import zipfile
from collections.abc import Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from tagclip_cli.errors import ModelLoadError, OutputWriteError, UsageError
from tagclip_cli.writers import atomic_path

log = logging.getLogger(__name__)

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
TEXT_CACHE_VERSION = 1
# Compute precisions: fp32 everywhere; bf16/fp16 are CUDA autocast (weights stay fp32).
PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}

# The five scene templates MaskCLIP and TagCLIP add to CLIP's 80 ImageNet templates.
SCENE_TEMPLATES = (
    "there is a {} in the scene.",
    "there is the {} in the scene.",
    "this is a {} in the scene.",
    "this is the {} in the scene.",
    "this is one {} in the scene.",
)
CLS_SEG_TEMPLATES = ("a clean origami {}.",)


def imagenet_templates() -> tuple[str, ...]:
    """The 80 CLIP ImageNet templates as format strings, taken from open_clip's metadata."""
    from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES

    return tuple(t("{}") for t in OPENAI_IMAGENET_TEMPLATES)


def tagclip_templates() -> tuple[str, ...]:
    """The 85-template prompt ensemble (80 ImageNet + 5 scene templates)."""
    return imagenet_templates() + SCENE_TEMPLATES


def default_cache_dir() -> Path:
    env = os.environ.get("TAGCLIP_CACHE_DIR")
    if env:
        return Path(env)
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "tagclip"


def builtin_models() -> list[str]:
    """Models shipped inside the package (config JSON + safetensors weights)."""
    return sorted(p.stem for p in WEIGHTS_DIR.glob("*.json") if p.with_suffix(".safetensors").exists())


@dataclass
class DenseOutput:
    """Result of `Backbone.dense_forward` for a batch of B same-sized images.

    tokens: (B, 1+N, D) projected tokens (class token first), value path in the last block.
    attn: (B, L, 1+N, 1+N) head-averaged softmax attention of every layer (fp32).
    grid: (gh, gw) patch grid, N = gh * gw.
    pre_last: (B, 1+N, W) tokens entering block L (only when requested).
    """

    tokens: Tensor
    attn: Tensor
    grid: tuple[int, int]
    pre_last: Tensor | None = None


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
    _buffers: dict = field(default_factory=dict, init=False, repr=False, compare=False)

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
        return int(self.visual.conv1.kernel_size[0])

    @property
    def native_grid(self) -> tuple[int, int]:
        n = self.visual.positional_embedding.shape[0] - 1
        side = math.isqrt(n)
        return (side, side)

    @property
    def native_size(self) -> int:
        return self.native_grid[0] * self.patch_size

    @property
    def num_layers(self) -> int:
        return len(self.visual.transformer.resblocks)

    @property
    def embed_dim(self) -> int:
        """D, the dimension of projected embeddings."""
        proj = self.visual.proj
        return int(proj.shape[1]) if proj is not None else int(self.visual.conv1.out_channels)

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

    # ---- text -----------------------------------------------------------------------------------
    @torch.inference_mode()
    def encode_prompts(self, prompts: Sequence[str], batch_size: int = 256) -> Tensor:
        """L2-normalised text embeddings of prompts, (P, D) fp32 on the device."""
        out = []
        for start in range(0, len(prompts), batch_size):
            tokens = self.tokenizer(list(prompts[start : start + batch_size])).to(self.device)
            emb = self.model.encode_text(tokens).float()
            out.append(F.normalize(emb, dim=-1))
        return torch.cat(out)

    def text_classifier(self, names: Sequence[str], templates: Sequence[str]) -> Tensor:
        """Prompt-ensemble classifier, (C, D): per class, mean of normalised template embeddings,
        re-normalised. Classes already in the on-disk cache are not encoded again."""
        self.warn_truncated(names, templates)
        cache = _TextCache(self.cache_dir, self.identity(), templates) if self.cache_dir else None
        cached = cache.load() if cache else {}
        missing = [n for n in dict.fromkeys(names) if n not in cached]
        if cache:
            log.info(
                "text cache: %d of %d classes from cache%s",
                len(set(names)) - len(missing),
                len(set(names)),
                f" ({cache.path})" if not missing else f", encoding {len(missing)} x {len(templates)} prompts",
            )
        if missing:
            prompts = [t.format(n) for n in missing for t in templates]
            emb = self.encode_prompts(prompts).reshape(len(missing), len(templates), -1)
            class_emb = F.normalize(emb.mean(dim=1), dim=-1).cpu()
            cached.update({n: class_emb[i] for i, n in enumerate(missing)})
            if cache:
                cache.save(cached)
        return torch.stack([cached[n] for n in names]).to(self.device, torch.float32)

    def warn_truncated(self, names: Sequence[str], templates: Sequence[str]) -> list[str]:
        """Warn once per class whose prompts the tokenizer cuts at the text context; returns them."""
        from tagclip_cli.vocab import truncated_names

        encode = getattr(self.tokenizer, "encode", None)
        context = int(getattr(self.tokenizer, "context_length", None) or getattr(self.model, "context_length", 77))
        if encode is None:  # not a BPE tokenizer we can count with (HF tokenizers): nothing to say
            return []
        long = truncated_names(list(dict.fromkeys(names)), templates, lambda text: len(encode(text)), context)
        for name in long:
            log.warning("class '%s' is longer than the %d-token text context; its prompts are truncated",
                        name, context)
        return long

    # ---- image: shared pieces ---------------------------------------------------------------
    def positional_embedding(self, grid: tuple[int, int], fp16_round: bool = False) -> Tensor:
        """(1+gh*gw, W) positional embedding: the native patch grid bilinearly interpolated to `grid`.

        fp16_round reproduces the reference's rounding of an interpolated embedding through fp16."""
        pos = self.visual.positional_embedding
        if tuple(grid) == self.native_grid:
            return pos
        gh0, gw0 = self.native_grid
        patch_pos = pos[1:].T.reshape(1, -1, gh0, gw0).float()
        patch_pos = F.interpolate(patch_pos, size=grid, mode="bilinear", align_corners=False)
        out = torch.cat([pos[:1].float(), patch_pos.reshape(pos.shape[1], -1).T]).to(pos.dtype)
        if fp16_round:
            out = out.half().to(pos.dtype)
        return out

    def embed(self, pixels: Tensor, fp16_round: bool = False) -> Tensor:
        """Patch embedding + class token + positional embedding + ln_pre: (B, 3, H, W) -> (B, 1+N, W)."""
        p = self.patch_size
        grid = (pixels.shape[-2] // p, pixels.shape[-1] // p)
        x = self.visual.conv1(pixels.to(self.dtype))
        x = x.flatten(2).transpose(1, 2)
        cls = self.visual.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
        x = torch.cat([cls, x], dim=1)
        x = x + self.positional_embedding(grid, fp16_round).to(x.dtype)
        return self.visual.ln_pre(x)

    def _attention(
        self, block: torch.nn.Module, x: Tensor, attn_mask: Tensor | None, value_path: bool,
        map_out: Tensor | None = None,
    ) -> tuple[Tensor, Tensor]:
        """One block's attention on ln_1 output x (B, T, W).

        Returns (output before the residual (B, T, W), head-averaged softmax map (B, T, T) fp32).
        With value_path the output is out_proj(v) for every token (no query/key mixing) while the
        returned map is still the ordinary softmax attention. map_out (B, T, T) fp32, if given,
        receives the map (and is returned)."""
        mha: torch.nn.MultiheadAttention = block.attn
        b, t, w = x.shape
        h = mha.num_heads
        qkv = F.linear(x, mha.in_proj_weight, mha.in_proj_bias)
        q, k, v = qkv.reshape(b, t, 3, h, w // h).permute(2, 0, 3, 1, 4)  # each (B, h, T, d)
        q = q * (w // h) ** -0.5
        # The scores and the softmax are fp32 whatever the compute precision (autocast or bf16
        # weights): the maps feed DMAR's K-of-L vote, whose comparisons with each map's mean must
        # not depend on it. Only q and k are cast, (B, h, T, d), not the (B, h, T, T) scores.
        if torch.is_grad_enabled() and x.requires_grad:
            with torch.autocast(x.device.type, enabled=False):
                scores = q.float() @ k.float().transpose(-1, -2)
            if attn_mask is not None:
                scores = scores + attn_mask.float()
            probs = scores.softmax(dim=-1)
            mixed = v if value_path else probs.to(v.dtype) @ v
            attn = probs.mean(dim=1)
            if map_out is not None:
                attn = map_out.copy_(attn)
        else:
            mixed, attn = self._attention_no_grad(q, k, v, attn_mask, value_path, map_out)
        out = mha.out_proj(mixed.transpose(1, 2).reshape(b, t, w))
        return out, attn

    def _attention_no_grad(self, q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None, value_path: bool,
                           map_out: Tensor | None) -> tuple[Tensor, Tensor]:
        """The same computation as the autograd path, in reused buffers: the (B, h, T, T) scores of a
        500x375 batch of 8 are ~200 MB per layer, and fresh allocations that size come from the OS
        as new pages each time (measured: ~20% of the CPU time spent zeroing them)."""
        b, h, t, d = q.shape
        probs = self._workspace("probs", (b * h, t, t), torch.float32, q.device)
        with torch.autocast(q.device.type, enabled=False):
            torch.bmm(q.reshape(b * h, t, d).float(), k.reshape(b * h, t, d).float().transpose(1, 2), out=probs)
        if attn_mask is not None:
            probs.view(b, h, t, t).add_(attn_mask.float())
        torch.softmax(probs, dim=-1, out=probs)  # in place: the scores become the probabilities
        probs4 = probs.view(b, h, t, t)
        attn = probs4.mean(dim=1) if map_out is None else torch.mean(probs4, dim=1, out=map_out)
        if value_path:
            return v, attn
        if probs.dtype != v.dtype:
            low = self._workspace("probs_low", (b * h, t, t), v.dtype, q.device)
            low.copy_(probs)
        else:
            low = probs
        mixed = torch.bmm(low, v.reshape(b * h, t, d)).view(b, h, t, d)
        return mixed, attn

    def _workspace(self, role: str, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> Tensor:
        """A buffer for `role`, reused while the shape, dtype and device stay the same (one per role).
        A buffer made under inference_mode cannot be written outside it, so it is then replaced."""
        buf = self._buffers.get(role)
        stale = buf is not None and buf.is_inference() and not torch.is_inference_mode_enabled()
        if stale or buf is None or buf.shape != shape or buf.dtype != dtype or buf.device != device:
            buf = self._buffers[role] = None  # free the old buffer before allocating its successor
            self._buffers[role] = buf = torch.empty(shape, dtype=dtype, device=device)
        return buf

    def block_forward(
        self, index: int, x: Tensor, attn_mask: Tensor | None = None, value_path: bool = False,
        map_out: Tensor | None = None,
    ) -> tuple[Tensor, Tensor]:
        """Run block `index` (0-based) on (B, T, W); returns (new x, attention map (B, T, T)),
        the map written into map_out when given."""
        block = self.visual.transformer.resblocks[index]
        out, attn = self._attention(block, block.ln_1(x), attn_mask, value_path, map_out)
        x = x + block.ls_1(out)
        x = x + block.ls_2(block.mlp(block.ln_2(x)))
        return x, attn

    def block_forward_ln1_leaf(self, index: int, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Block `index` (0-based) with normal attention, its ln_1 output made a fresh autograd leaf.

        For Grad-CAM on the ln_1 output (CLIP-ES): call under `torch.enable_grad()` with x (B, T, W)
        not requiring grad. Returns (new x (B, T, W), the ln_1 leaf (B, T, W) requiring grad,
        head-averaged attention (B, T, T)). The ln_1 output feeds only the attention, so the gradient
        on the leaf is the gradient the reference records with a hook on ln_1."""
        block = self.visual.transformer.resblocks[index]
        ln1 = block.ln_1(x).detach().requires_grad_(True)
        out, attn = self._attention(block, ln1, None, False)
        x = x + block.ls_1(out)
        x = x + block.ls_2(block.mlp(block.ln_2(x)))
        return x, ln1, attn

    def block_keys(self, index: int, x: Tensor) -> Tensor:
        """Keys of block `index` for tokens x (B, T, W): ln_1 then the key projection, heads
        concatenated, (B, T, W). MaskCLIP's key smoothing uses the last block's keys."""
        block = self.visual.transformer.resblocks[index]
        mha: torch.nn.MultiheadAttention = block.attn
        w = x.shape[-1]
        weight = mha.in_proj_weight[w : 2 * w]
        bias = mha.in_proj_bias[w : 2 * w] if mha.in_proj_bias is not None else None
        return F.linear(block.ln_1(x), weight, bias)

    def project_tokens(self, x: Tensor) -> Tensor:
        """ln_post and proj on every token: (B, T, W) -> (B, T, D)."""
        x = self.visual.ln_post(x)
        return x @ self.visual.proj if self.visual.proj is not None else x

    # ---- image: surgeries ---------------------------------------------------------------------
    def dense_forward(self, pixels: Tensor, fp16_round_pos: bool = False, keep_pre_last: bool = False) -> DenseOutput:
        """Native-resolution dense forward of (B, 3, H, W) normalised images, H and W multiples of
        the patch size. See `DenseOutput` for shapes."""
        p = self.patch_size
        if pixels.shape[-2] % p or pixels.shape[-1] % p:
            raise ValueError(f"image size {tuple(pixels.shape[-2:])} is not a multiple of the patch size {p}")
        grid = (pixels.shape[-2] // p, pixels.shape[-1] // p)
        t = 1 + grid[0] * grid[1]
        with self.autocast():
            x = self.embed(pixels, fp16_round_pos)
            # Layer-major storage: each layer's map is one contiguous (B, T, T) block written in
            # place; the returned (B, L, T, T) is a view of it.
            maps = torch.empty(self.num_layers, pixels.shape[0], t, t, device=pixels.device)
            last = self.num_layers - 1
            for i in range(last):
                x, _ = self.block_forward(i, x, map_out=maps[i])
            pre_last = x if keep_pre_last else None
            x, _ = self.block_forward(last, x, value_path=True, map_out=maps[last])
            tokens = self.project_tokens(x).float()
        return DenseOutput(tokens, maps.transpose(0, 1), grid, pre_last)

    def masked_cls_forward(
        self, crops: Tensor, patch_masks: Tensor, mask_value: float = -1000.0, chunk_size: int = 32
    ) -> Tensor:
        """Class-token embeddings of crops where the class-token query only sees masked-in patches.

        crops: (B, 3, S, S) normalised, S = native size. patch_masks: (B, N) bool, N = native grid
        cells, True = the class token may attend to that patch. Returns (B, D) fp32 (not normalised).
        Every layer uses the mask; patch queries are unrestricted. No attention map is needed, so the
        attention is fused (scaled_dot_product_attention), and in the last block only the class
        token is computed (the patch tokens' outputs there would be thrown away). Crops run in
        chunks of chunk_size so that memory does not grow with the number of candidates."""
        out = []
        with self.autocast():
            for start in range(0, crops.shape[0], chunk_size):
                chunk = slice(start, start + chunk_size)
                out.append(self._masked_cls_chunk(crops[chunk], patch_masks[chunk], mask_value))
        if not out:
            return torch.zeros(0, self.embed_dim, device=crops.device)
        return torch.cat(out)

    def _masked_cls_chunk(self, crops: Tensor, patch_masks: Tensor, mask_value: float) -> Tensor:
        b, n = patch_masks.shape
        x = self.embed(crops)
        additive = torch.zeros(b, 1, 1 + n, 1 + n, device=crops.device, dtype=x.dtype)
        additive[:, 0, 0, 1:] = (~patch_masks.bool()).to(x.dtype) * mask_value
        blocks = self.visual.transformer.resblocks
        for block in blocks[:-1]:
            x = x + block.ls_1(_fused_attention(block.attn, block.ln_1(x), additive))
            x = x + block.ls_2(block.mlp(block.ln_2(x)))
        last = blocks[-1]
        cls = x[:, :1] + last.ls_1(_fused_attention(last.attn, last.ln_1(x), additive[:, :, :1], queries=1))
        cls = cls + last.ls_2(last.mlp(last.ln_2(cls)))
        return self.project_tokens(cls)[:, 0].float()

    def encode_image(self, pixels: Tensor) -> Tensor:
        """Standard CLIP image embedding of (B, 3, S, S) images at the native size, (B, D) fp32."""
        with self.autocast():
            return self.model.encode_image(pixels.to(self.dtype)).float()


def check_precision(precision: str, device: torch.device | str) -> None:
    """Raise UsageError unless precision is fp32, bf16 (CUDA autocast; on CPU bf16 weights for the
    image tower) or fp16 on a CUDA device."""
    if precision not in PRECISIONS:
        raise UsageError(f"precision must be one of {', '.join(PRECISIONS)}, not '{precision}'")
    kind = torch.device(device).type
    if precision == "fp16" and kind != "cuda":
        raise UsageError(f"precision fp16 needs a CUDA device; on {kind} use fp32 or bf16")
    if precision == "bf16" and kind not in ("cuda", "cpu"):
        raise UsageError(f"precision bf16 is supported on CUDA and CPU, not on {kind}; use fp32")


def _fused_attention(mha: torch.nn.MultiheadAttention, x: Tensor, attn_mask: Tensor | None,
                     queries: int | None = None) -> Tensor:
    """Attention output (before the residual) of ln_1 output x (B, T, W) without materialising the
    map: (B, Q, W) for the first `queries` tokens as queries (all T when None)."""
    b, t, w = x.shape
    h = mha.num_heads
    if queries is None:
        qkv = F.linear(x, mha.in_proj_weight, mha.in_proj_bias)
        q, k, v = qkv.reshape(b, t, 3, h, w // h).permute(2, 0, 3, 1, 4)  # each (B, h, T, d)
    else:
        q = F.linear(x[:, :queries], mha.in_proj_weight[:w], mha.in_proj_bias[:w])
        q = q.reshape(b, queries, h, w // h).transpose(1, 2)
        kv = F.linear(x, mha.in_proj_weight[w:], mha.in_proj_bias[w:])
        k, v = kv.reshape(b, t, 2, h, w // h).permute(2, 0, 3, 1, 4)
    if attn_mask is not None:
        attn_mask = attn_mask.to(q.dtype)
    mixed = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
    return mha.out_proj(mixed.transpose(1, 2).reshape(b, -1, w))


class _TextCache:
    """Class embeddings on disk, one file per (model identity, template list)."""

    def __init__(self, cache_dir: Path, identity: dict, templates: Sequence[str]) -> None:
        key = json.dumps(
            {"v": TEXT_CACHE_VERSION, "identity": identity, "templates": list(templates)}, sort_keys=True
        )
        digest = hashlib.sha256(key.encode("utf-8")).hexdigest()[:24]
        self.path = Path(cache_dir) / "text" / f"{digest}.pt"

    def load(self) -> dict[str, Tensor]:
        if not self.path.exists():
            return {}
        try:
            data = torch.load(self.path, map_location="cpu", weights_only=True)
            return dict(data["classes"])
        except Exception as exc:  # a corrupt cache is rebuilt, never fatal
            log.warning("text cache %s unreadable (%s); re-encoding", self.path, exc)
            return {}

    def save(self, classes: dict[str, Tensor]) -> None:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with atomic_path(self.path) as tmp:
                torch.save({"classes": classes}, tmp)
        except (OSError, OutputWriteError) as exc:
            log.warning("could not write text cache %s (%s)", self.path, exc)


# ---- loading ---------------------------------------------------------------------------------

def file_sha256(path: Path, cache_dir: Path | None = None) -> str:
    """Content hash of a checkpoint, memoised by (path, size, mtime) in the cache dir."""
    path = Path(path).resolve()
    stat = path.stat()
    memo_key = hashlib.sha256(f"{path}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()[:24]
    memo = Path(cache_dir) / "hashes" / memo_key if cache_dir else None
    if memo is not None and memo.exists():
        return memo.read_text().strip()
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 22), b""):
            digest.update(chunk)
    value = digest.hexdigest()
    if memo is not None:
        try:
            memo.parent.mkdir(parents=True, exist_ok=True)
            memo.write_text(value)
        except OSError:
            pass
    return value


def read_state_dict(path: Path) -> dict[str, Tensor]:
    """A CLIP state dict from an OpenAI TorchScript archive, a torch pickle (.pt/.bin, optionally
    wrapped in {"state_dict": ...} with "module." prefixes) or a .safetensors file."""
    path = Path(path)
    if not path.is_file():
        raise ModelLoadError(f"{path}: checkpoint file not found")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            sd = load_file(str(path), device="cpu")
        elif zipfile.is_zipfile(path) and any(n.endswith("constants.pkl") for n in zipfile.ZipFile(path).namelist()):
            sd = torch.jit.load(str(path), map_location="cpu").state_dict()
        else:
            sd = torch.load(path, map_location="cpu", weights_only=True)
    except ModelLoadError:
        raise
    except Exception as exc:
        raise ModelLoadError(f"{path}: not a readable CLIP checkpoint ({type(exc).__name__}: {exc})") from exc
    if isinstance(sd, dict) and "state_dict" in sd and isinstance(sd["state_dict"], dict):
        sd = sd["state_dict"]
    if not isinstance(sd, dict) or not sd:
        raise ModelLoadError(f"{path}: no state dict found in the checkpoint")
    sd = {(k[7:] if k.startswith("module.") else k): v for k, v in sd.items()}
    for key in ("input_resolution", "context_length", "vocab_size", "attn_mask"):
        sd.pop(key, None)
    return sd


def _is_openai_layout(sd: dict[str, Tensor]) -> bool:
    return "visual.proj" in sd and "visual.conv1.weight" in sd and "token_embedding.weight" in sd


def _tokenizer_for(model: torch.nn.Module, model_name: str | None):
    import open_clip

    context = int(getattr(model, "context_length", 77))
    if model_name and (model_name in open_clip.list_models() or model_name in builtin_models()):
        try:
            return open_clip.get_tokenizer(model_name, context_length=context)
        except Exception:  # unknown name (e.g. a checkpoint-inferred model): the CLIP BPE tokenizer
            pass
    return open_clip.tokenizer.SimpleTokenizer(context_length=context)


def load_backbone(
    model: str = "ViT-B-16",
    pretrained: str | None = "openai",
    checkpoint: str | Path | None = None,
    device: str | torch.device = "cpu",
    cache_dir: Path | None = None,
    model_explicit: bool = False,
    seed: int = 0,
    precision: str = "fp32",
) -> Backbone:
    """Load a CLIP ViT.

    - `checkpoint`: a file (see `read_state_dict`). OpenAI-layout weights build their own
      architecture (QuickGELU) unless `model_explicit`, in which case open_clip's config `model`
      is created and loaded strictly.
    - `model` naming a model shipped in the package (e.g. `shapes-demo`): loaded from the package.
    - `pretrained="random"`: seeded random weights (tests and benchmarks only).
    - otherwise open_clip's `pretrained` tag, which needs network access the first time.

    precision: fp32 (default), or bf16/fp16 autocast on CUDA (UsageError elsewhere).
    """
    import open_clip

    check_precision(precision, device)

    cache_dir = default_cache_dir() if cache_dir is None else cache_dir
    device = torch.device(device)
    if checkpoint is not None:
        path = Path(checkpoint)
        sd = read_state_dict(path)
        digest = file_sha256(path, cache_dir)
        if _is_openai_layout(sd) and not model_explicit:
            try:
                net = open_clip.model.build_model_from_openai_state_dict(dict(sd), quick_gelu=True, cast_dtype=None)
                net.float().load_state_dict(sd)  # the builder rounds through fp16; reload exactly
            except Exception as exc:
                raise ModelLoadError(f"{path}: OpenAI-layout weights but not a CLIP ViT ({exc})") from exc
            name = f"openai-{_describe_openai(sd)}"
        else:
            net = _create(model, None, seed)
            try:
                net.load_state_dict(_to_open_clip_layout(net, sd), strict=True)
            except RuntimeError as exc:
                first = str(exc).splitlines()[0]
                raise ModelLoadError(
                    f"{path}: weights do not fit model '{model}' ({first}); pass the matching --model"
                ) from exc
            name = model
        weights = f"checkpoint:{digest}"
    elif model in builtin_models():
        # the weights' hash is part of the identity, so replaced weights never reuse cached text
        digest = file_sha256(WEIGHTS_DIR / f"{model}.safetensors", cache_dir)[:16]
        net, name, weights = _load_builtin(model), model, f"builtin:{model}:{digest}"
    elif pretrained in (None, "", "none", "random"):
        log.warning("model %s with RANDOM weights (seed %d): outputs are meaningless except for testing", model, seed)
        net, name, weights = _create(model, None, seed), model, f"random:{seed}"
    else:
        net = _create(model, pretrained, seed)
        name, weights = model, pretrained
    net = net.float().to(device)
    return Backbone(net, _tokenizer_for(net, name), name, weights, device, cache_dir, precision)


def _describe_openai(sd: dict[str, Tensor]) -> str:
    width = sd["visual.conv1.weight"].shape[0]
    patch = sd["visual.conv1.weight"].shape[-1]
    layers = len([k for k in sd if k.startswith("visual.") and k.endswith(".attn.in_proj_weight")])
    return f"vit-w{width}-p{patch}-l{layers}"


def _to_open_clip_layout(net: torch.nn.Module, sd: dict[str, Tensor]) -> dict[str, Tensor]:
    if "logit_scale" in sd and net.logit_scale.ndim != sd["logit_scale"].ndim:
        sd = dict(sd)
        sd["logit_scale"] = sd["logit_scale"].reshape(net.logit_scale.shape)
    return sd


def _create(model: str, pretrained: str | None, seed: int) -> torch.nn.Module:
    import open_clip

    if model not in open_clip.list_models():
        known = ", ".join(m for m in open_clip.list_models() if m.startswith("ViT-"))[:300]
        raise ModelLoadError(f"unknown model '{model}' (open_clip ViTs include: {known}, ...; built-in: "
                             f"{', '.join(builtin_models()) or 'none'})")
    if pretrained:
        try:
            tags = open_clip.list_pretrained_tags_by_model(model)
        except Exception:
            tags = []
        if pretrained not in tags and not Path(pretrained).exists():
            raise ModelLoadError(f"model '{model}' has no pretrained tag '{pretrained}' (known: {', '.join(tags)})")
    torch.manual_seed(seed)
    offline = bool(pretrained) and not Path(pretrained).exists() and not _hub_reachable()
    try:
        with _hub_offline(offline):
            return open_clip.create_model(
                model, pretrained=pretrained or None, force_quick_gelu=(pretrained == "openai"), device="cpu"
            )
    except Exception as exc:
        if not pretrained:
            raise ModelLoadError(f"could not build model '{model}': {exc}") from exc
        raise ModelLoadError(
            f"could not get the '{pretrained}' weights of {model} ({type(exc).__name__}; offline?). "
            f"Supply weights with --checkpoint FILE (OpenAI ViT-B-16.pt, or an open_clip .bin/.safetensors "
            f"with --model), or try the offline demo with --model {', '.join(builtin_models()) or 'shapes-demo'}"
        ) from exc


def _hub_reachable(host: str = "huggingface.co", timeout: float = 3.0) -> bool:
    """A quick probe, so that an offline machine fails in seconds instead of minutes of retries."""
    import socket

    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes"):
        return False
    try:
        with socket.create_connection((host, 443), timeout=timeout):
            return True
    except OSError:
        return False


@contextmanager
def _hub_offline(offline: bool):
    """Force huggingface_hub to use only its local cache while `offline`."""
    if not offline:
        yield
        return
    from huggingface_hub import constants

    saved = constants.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = saved


def _load_builtin(name: str) -> torch.nn.Module:
    import open_clip
    from safetensors.torch import load_file

    config = WEIGHTS_DIR / f"{name}.json"
    open_clip.add_model_config(config)
    net = open_clip.create_model(name, pretrained=None, device="cpu")
    sd = load_file(str(WEIGHTS_DIR / f"{name}.safetensors"), device="cpu")
    net.load_state_dict({k: v.float() for k, v in sd.items()}, strict=True)
    return net
