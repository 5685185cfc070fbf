"""A deliberately naive TagCLIP (and CLS-SEG) written the way the reference scripts run it.

This is the baseline of `bench_speed.py` and the oracle of `tests/test_naive_parity.py`. It follows
docs/algorithm.md §0-§8 step by step with none of the engine's optimisations:

- one image at a time (batch 1), fp32, no text cache (the classifier is encoded class by class);
- attention maps come from `torch.nn.MultiheadAttention(need_weights=True)` in every layer of every
  forward, as the reference does; the last block's value path uses the reference's additive mask
  of -100 off the diagonal (equal to the exact value path at fp32 precision) and a second, unmasked
  attention call for the recorded map;
- DMAR refines the classes one by one (one box search and one (N, N) @ (N, 1) product per class);
- CWR runs one 224 x 224 masked forward per candidate class, building the class-token mask in a
  Python loop;
- CLS-SEG re-runs the dense forward, then for every tag runs the last block forward and backward
  alone and recomputes the Sinkhorn-normalised affinity.

Independent of `tagclip_cli.tagclip` on purpose: only the backbone's weights, tokenizer and
geometry are shared, so a parity test compares two separate implementations of the spec.
With reference_compat it reproduces quirks Q1-Q3 (docs/algorithm.md §10), not Q4: its CAA always
runs in float64.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from tagclip_cli.backbone import Backbone


@dataclass
class NaiveTagResult:
    """TagCLIP output of one image: scores (F,), tags, CWR candidates, local scores (F,)."""

    scores: Tensor
    tags: list[int]
    candidates: list[int]
    p_local: Tensor
    crops_run: int = 0


@dataclass
class NaiveSegResult:
    """CLS-SEG output of one image: the tags, their normalised Grad-CAMs and refined cams on the
    patch grid (K, gh, gw), and the label map (H, W) at the requested size (0 = background,
    tag t -> t + 1)."""

    tags: list[int]
    raw_cams: Tensor
    cams: Tensor
    label_map: Tensor


def _normalise(x: Tensor) -> Tensor:
    """Min-max to [0, 1]; a constant map becomes all zeros."""
    lo, hi = x.min(), x.max()
    if hi - lo <= 0:
        return torch.zeros_like(x)
    return (x - lo) / (hi - lo)


def _box_union(score_map: np.ndarray, threshold: float, mode: int, clamp: bool) -> np.ndarray:
    """Union of the contour bounding boxes of score_map (gh, gw) in [0, 1], binarised on 8 bits.

    Returns a (gh, gw) float32 0/1 mask."""
    gh, gw = score_map.shape
    img = (score_map * 255).astype(np.uint8)
    level = int(np.float32(threshold) * np.float32(img.max()))
    _, binary = cv2.threshold(img, level, 255, cv2.THRESH_BINARY)
    contours = cv2.findContours(binary, mode, cv2.CHAIN_APPROX_SIMPLE)[0]
    mask = np.zeros((gh, gw), dtype=np.float32)
    for contour in contours:
        x, y, w, h = cv2.boundingRect(contour)
        x1, y1 = x + w, y + h
        if clamp:  # quirk Q2 (docs/algorithm.md §10)
            x1, y1 = min(x1, gw - 1), min(y1, gh - 1)
        mask[y:y1, x:x1] = 1.0
    return mask


class NaiveTagCLIP:
    """TagCLIP one image and one class at a time. `text` (C, D) may be given to skip encoding."""

    def __init__(
        self,
        backbone: Backbone,
        foreground: Sequence[str],
        background: Sequence[str],
        templates: Sequence[str],
        text: Tensor | None = None,
        reference_compat: bool = False,
    ) -> None:
        self.bb = backbone
        self.num_fg = len(foreground)
        self.names = list(foreground) + list(background)
        self.reference_compat = reference_compat
        self.text = text if text is not None else self.encode_text(self.names, templates)

    # ---- text ---------------------------------------------------------------------------------
    @torch.no_grad()
    def encode_text(self, names: Sequence[str], templates: Sequence[str]) -> Tensor:
        """(C, D): per class, the normalised mean of its normalised template embeddings."""
        model = self.bb.model
        rows = []
        for name in names:
            tokens = self.bb.tokenizer([t.format(name) for t in templates]).to(self.bb.device)
            emb = model.encode_text(tokens).float()
            emb = emb / emb.norm(dim=-1, keepdim=True)
            mean = emb.mean(dim=0)
            rows.append(mean / mean.norm())
        return torch.stack(rows)

    # ---- image forwards -------------------------------------------------------------------------
    def _embed(self, image: Tensor) -> Tensor:
        """(1, 3, H, W) -> (1, 1+N, W): patches, class token, (interpolated) positions, ln_pre."""
        visual = self.bb.model.visual
        p = self.bb.patch_size
        gh, gw = image.shape[-2] // p, image.shape[-1] // p
        x = visual.conv1(image)
        x = x.reshape(1, x.shape[1], -1).permute(0, 2, 1)
        x = torch.cat([visual.class_embedding.reshape(1, 1, -1), x], dim=1)
        pos = visual.positional_embedding
        side = int(round((pos.shape[0] - 1) ** 0.5))
        if (gh, gw) != (side, side):
            grid = pos[1:].reshape(side, side, -1).permute(2, 0, 1)[None]
            grid = F.interpolate(grid, size=(gh, gw), mode="bilinear", align_corners=False)
            pos = torch.cat([pos[:1], grid[0].permute(1, 2, 0).reshape(gh * gw, -1)], dim=0)
            if self.reference_compat:  # quirk Q1 (docs/algorithm.md §10)
                pos = pos.half().float()
        return visual.ln_pre(x + pos[None])

    @staticmethod
    def _mha(block: torch.nn.Module, y: Tensor, mask: Tensor | None) -> tuple[Tensor, Tensor]:
        """Block attention through nn.MultiheadAttention with head-averaged weights."""
        mha = block.attn
        if not mha.batch_first:
            out, weights = mha(
                y.transpose(0, 1), y.transpose(0, 1), y.transpose(0, 1), need_weights=True, attn_mask=mask
            )
            return out.transpose(0, 1), weights
        return mha(y, y, y, need_weights=True, attn_mask=mask)

    def dense(self, image: Tensor) -> tuple[Tensor, list[Tensor], Tensor]:
        """Native-resolution forward of one image (1, 3, H, W).

        Returns (projected tokens (1+N, D) with the value path in the last block, the L attention
        maps (1+N, 1+N), the tokens entering the last block (1, 1+N, W))."""
        blocks = self.bb.model.visual.transformer.resblocks
        x = self._embed(image)
        maps = []
        pre_last = x
        for index, block in enumerate(blocks):
            y = block.ln_1(x)
            if index < len(blocks) - 1:
                out, weights = self._mha(block, y, None)
            else:
                pre_last = x
                t = y.shape[1]
                off_diagonal = (1 - torch.eye(t, device=y.device)) * -100.0
                out, _ = self._mha(block, y, off_diagonal)
                _, weights = self._mha(block, y, None)
            maps.append(weights[0])
            x = x + block.ls_1(out)
            x = x + block.ls_2(block.mlp(block.ln_2(x)))
        visual = self.bb.model.visual
        tokens = visual.ln_post(x[0]) @ visual.proj
        return tokens, maps, pre_last

    def masked_class_token(self, crop: Tensor, keep: Tensor) -> Tensor:
        """Class-token embedding (D,) of one native-size crop (1, 3, S, S) whose class-token query
        may only attend to the patches where keep (N0,) is True, in every layer."""
        n = keep.shape[0]
        mask = torch.zeros(n + 1, n + 1)
        for j in range(1, n + 1):
            if not keep[j - 1]:
                mask[0, j] = -1000.0
        mask = mask.to(crop.device)
        x = self._embed(crop)
        for block in self.bb.model.visual.transformer.resblocks:
            out, _ = self._mha(block, block.ln_1(x), mask)
            x = x + block.ls_1(out)
            x = x + block.ls_2(block.mlp(block.ln_2(x)))
        visual = self.bb.model.visual
        return visual.ln_post(x[0, 0]) @ visual.proj

    # ---- the algorithm ---------------------------------------------------------------------------
    @torch.no_grad()
    def __call__(self, image: Tensor) -> NaiveTagResult:
        """TagCLIP on one normalised image (3, H, W), H and W multiples of the patch size."""
        bb = self.bb
        p = bb.patch_size
        num_layers = bb.num_layers
        image = image[None].to(bb.device)
        gh, gw = image.shape[-2] // p, image.shape[-1] // p
        tokens, maps, _ = self.dense(image)
        scale = bb.model.logit_scale.exp()

        feats = tokens[1:] / tokens[1:].norm(dim=-1, keepdim=True)
        p_coarse = (scale * feats @ self.text.t()).softmax(dim=-1)  # (N, C)

        # DMAR (docs/algorithm.md §3): the K-of-L vote and the mean of layers L-3..L-1
        patch_maps = [m[1:, 1:] for m in maps]
        votes = torch.zeros_like(patch_maps[0])
        for m in patch_maps:
            votes += (m > m.double().mean()).float()  # a float64 mean: no order-dependent ties
        lo, hi = max(1, num_layers - 3), max(1, num_layers - 1)
        attn = torch.stack(patch_maps[lo - 1 : hi]).mean(dim=0) * (votes >= 4).float()
        first = attn @ p_coarse
        p_refined = first.clone()
        for c in range(first.shape[1]):
            if first[:, c].max() <= 0:
                continue
            v = _normalise(first[:, c])
            # quirk Q2 (docs/algorithm.md §10): reference_compat clamps the box ends
            box = _box_union(v.reshape(gh, gw).cpu().numpy(), float(v.mean()), cv2.RETR_EXTERNAL, self.reference_compat)
            column_mask = torch.from_numpy(box).reshape(1, -1).to(attn.device)
            p_refined[:, c] = (attn * column_mask) @ p_coarse[:, c]

        p_local = p_refined[:, : self.num_fg].max(dim=0).values
        scores = p_local.clone()

        # CWR (docs/algorithm.md §5), one candidate at a time
        lo_v, hi_v = p_refined.min(), p_refined.max()
        threshold = lo_v + 0.5 * (hi_v - lo_v)
        candidates = [c for c in range(self.num_fg) if p_local[c] > threshold]
        native = bb.native_grid
        crops_run = 0
        for c in candidates:
            above = (_normalise(p_refined[:, c]) > 0.5).reshape(gh, gw).cpu().numpy()
            cols = np.where(above.any(axis=0))[0]
            rows = np.where(above.any(axis=1))[0]
            if len(cols):
                x0, x1, y0, y1 = int(cols[0]), int(cols[-1]) + 1, int(rows[0]), int(rows[-1]) + 1
            else:
                x0 = x1 = y0 = y1 = 0
            if self.reference_compat:  # quirk Q2 (docs/algorithm.md §10)
                x1, y1 = min(x1, gw - 1), min(y1, gh - 1)
            if x1 <= x0 or y1 <= y0:
                if self.reference_compat:  # quirk Q3 (docs/algorithm.md §10)
                    break
                continue
            box_mask = torch.from_numpy(above[y0:y1, x0:x1].astype(np.float32))[None, None]
            keep = F.interpolate(box_mask, size=native, mode="nearest").reshape(-1) > 0.5
            crop = image[:, :, y0 * p : y1 * p, x0 * p : x1 * p]
            crop = F.interpolate(crop, size=(native[0] * p, native[1] * p), mode="bilinear", align_corners=False)
            cls = self.masked_class_token(crop, keep)
            probs = (scale * (cls / cls.norm()) @ self.text.t()).softmax(dim=-1)
            scores[c] = 0.5 * p_local[c] + 0.5 * probs[c]
            crops_run += 1

        normalised = _normalise(scores)
        tags = [c for c in range(self.num_fg) if normalised[c] > 0.5]
        if not tags:
            tags = [int(scores.argmax())]
        return NaiveTagResult(scores, tags, candidates, p_local, crops_run)


def _normalise_eps(x: Tensor, eps: float = 1e-7) -> Tensor:
    """CLIP-ES's normalisation: (x - min) / (max - min + eps)."""
    x = x - x.min()
    return x / (x.max() + eps)


class NaiveClsSeg:
    """CLIP-ES CAMs for given tags, one image and one tag (one backward) at a time.

    seg_text: (F + B, D) classifier of the CLS-SEG names (foreground first, then background).
    The affinity work (Sinkhorn rounds, symmetrisation, the explicit T @ T) is redone for every
    tag, as in the reference; it runs in float64 like the engine, because a nearly flat refined
    cam magnifies float32 rounding when it is normalised."""

    def __init__(
        self,
        tagclip: NaiveTagCLIP,
        seg_text: Tensor,
        caa_layers: tuple[int, int] | None = None,
        box_threshold: float = 0.4,
    ) -> None:
        self.tc = tagclip
        self.bb = tagclip.bb
        self.seg_text = seg_text
        self.num_fg = tagclip.num_fg
        num_layers = self.bb.num_layers
        self.caa_layers = caa_layers or (max(1, num_layers - 7), num_layers - 1)
        self.box_threshold = box_threshold

    def __call__(self, image: Tensor, tags: Sequence[int], size: tuple[int, int]) -> NaiveSegResult:
        """CLS-SEG of one normalised image (3, H', W') for `tags`, label map of `size` (H, W)."""
        bb = self.bb
        p = bb.patch_size
        visual = bb.model.visual
        image = image[None].to(bb.device)
        gh, gw = image.shape[-2] // p, image.shape[-1] // p
        with torch.no_grad():
            _, maps, pre_last = self.tc.dense(image)
        last = visual.transformer.resblocks[-1]
        classes = list(tags) + list(range(self.num_fg, self.seg_text.shape[0]))
        text = self.seg_text[classes]
        scale = float(bb.model.logit_scale.exp())
        lo, hi = self.caa_layers
        raw_cams, cams = [], []
        for k in range(len(tags)):
            with torch.inference_mode(False), torch.enable_grad():
                x = pre_last.detach().clone()
                activation = last.ln_1(x).detach().requires_grad_(True)
                out, _ = self.tc._mha(last, activation, None)
                x = x + last.ls_1(out)
                x = x + last.ls_2(last.mlp(last.ln_2(x)))
                pooled = visual.ln_post(x[0, 1:]).mean(dim=0) @ visual.proj
                logits = scale * (pooled / pooled.norm()) @ text.detach().clone().t()
                target = logits.softmax(dim=-1)[k]
                target.backward()
            grad = activation.grad[0, 1:]  # (N, W)
            act = activation.detach()[0, 1:]
            weights = grad.mean(dim=0)
            # normalised twice, as CLIP-ES's CAM library does (per target layer, then after averaging)
            cam = _normalise_eps(_normalise_eps(torch.relu((act * weights).sum(dim=-1)))).reshape(gh, gw)
            raw_cams.append(cam)
            # CAA (docs/algorithm.md §8), recomputed for every tag
            affinity = torch.stack([m[1:, 1:] for m in maps[lo - 1 : hi]]).mean(dim=0).double()
            trans = affinity / affinity.sum(dim=0, keepdim=True)
            trans = trans / trans.sum(dim=1, keepdim=True)
            for _ in range(2):
                trans = trans / trans.sum(dim=0, keepdim=True)
                trans = trans / trans.sum(dim=1, keepdim=True)
            trans = (trans + trans.t()) / 2
            trans = trans @ trans
            # quirk Q2 (docs/algorithm.md §10) on the CAA box; Q4 is not reproduced here
            box = _box_union(cam.cpu().numpy(), self.box_threshold, cv2.RETR_TREE, self.tc.reference_compat)
            trans = trans * torch.from_numpy(box).double().reshape(1, -1).to(trans.device)
            refined = (trans @ cam.double().reshape(-1, 1)).reshape(gh, gw)
            cams.append(_normalise_eps(refined).float())
        height, width = size
        if not cams:
            empty = torch.zeros(0, gh, gw)
            return NaiveSegResult(list(tags), empty, empty, torch.zeros(height, width, dtype=torch.long))
        grid_cams = torch.stack(cams)
        up = F.interpolate(grid_cams[None], size=(height, width), mode="bilinear", align_corners=False)[0]
        background = 1 - up.max(dim=0).values
        index = torch.cat([background[None], up]).argmax(dim=0)
        lookup = torch.tensor([0] + [t + 1 for t in tags])
        return NaiveSegResult(list(tags), torch.stack(raw_cams), grid_cams, lookup[index.cpu()])
