"""TagCLIP (Lin et al., AAAI 2024): coarse patch scores, DMAR, CWR, fusion and the tag rule.

Pure tensor functions (shapes in the docstrings; N patches on a (gh, gw) grid, C classes = F
foreground + background, L layers) plus a small `Tagger` that batches them over images.
Implements docs/algorithm.md §2 (coarse classification), §3 (DMAR), §4 (local scores), §5 (CWR),
§6 (fusion and tags) and TagCLIP's 85-template prompt ensemble (§7); the dense features (§1) come
from the backbone. The run's `Quirks` (given to `Tagger`) reproduce quirks Q1-Q3 (docs/algorithm.md §10).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from functools import partial

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from tagclip_cli import defaults
from tagclip_cli.backbone import Backbone, DenseOutput, MapNeeds, imagenet_templates
from tagclip_cli.errors import UsageError
from tagclip_cli.quirks import Quirks
from tagclip_cli.vocab import Vocabulary

# The five scene templates MaskCLIP and TagCLIP add to CLIP's 80 ImageNet templates (docs/algorithm.md §7).
SCENE_TEMPLATES = (
    "there is a {} in the scene.",
    "there is the {} in the scene.",
    "this is a {} in the scene.",
    "this is the {} in the scene.",
    "this is one {} in the scene.",
)


def tagclip_templates() -> tuple[str, ...]:
    """The 85-template prompt ensemble (80 ImageNet + 5 scene templates), docs/algorithm.md §7."""
    return imagenet_templates() + SCENE_TEMPLATES


class LayerRangeError(UsageError, ValueError):
    """A layer range that does not fit the model."""


def layer_range(layers: tuple[int, int], num_layers: int, what: str = "layers") -> tuple[int, int]:
    """A 1-based inclusive layer range (lo, hi) for a model with num_layers blocks. A value <= 0
    counts from L (0 = L, -1 = L-1); the low end is then clamped to 1. (-3, -1) with L = 12 is
    9..11, (1, -1) is 1..L-1. Raises LayerRangeError (naming `what`) unless 1 <= lo <= hi <= L."""
    lo, hi = (v if v > 0 else num_layers + v for v in layers)
    lo = max(1, lo)
    if not 1 <= lo <= hi <= num_layers:
        raise LayerRangeError(f"{what} {tuple(layers)} give {lo}..{hi}, outside 1..{num_layers}")
    return lo, hi


@dataclass(frozen=True)
class TagCLIPConfig:
    """Every knob of TagCLIP, with the paper's values as defaults."""

    vote_k: int = 4  # DMAR: a pair votes in at least K layers
    refine_layers: tuple[int, int] | None = None  # see `layer_range`; None = (-3, -1), layers L-3..L-1
    cwr_threshold: float = 0.5  # CWR candidates: P_local > min + f * (max - min) of P_refined
    cwr_patch_threshold: float = 0.5  # CWR box: normalised P_refined column above this
    fusion_lambda: float = 0.5  # P_final = lambda * local + (1 - lambda) * global
    tag_threshold: float = defaults.TAG_THRESHOLD  # tags: normalised P_final over foreground above this
    # Per-class thresholds (F,) in vocabulary order (`tagclip_cli.thresholds`), replacing
    # tag_threshold for every class when set; None = tag_threshold for all (docs/algorithm.md §6).
    class_thresholds: tuple[float, ...] | None = None
    use_dmar: bool = True  # ablation switch: False = coarse patch scores only
    use_cwr: bool = True  # ablation switch: False = local scores only
    use_background: bool = True
    cwr_mask_value: float = -1000.0

    def layers_for(self, num_layers: int) -> tuple[int, int]:
        """DMAR's refinement layer range (1-based, inclusive) for a model with num_layers blocks."""
        return layer_range(self.refine_layers or (-3, -1), num_layers, "refine_layers")

    @classmethod
    def coco_stuff(cls, **kw) -> TagCLIPConfig:
        """The reference's COCO-Stuff setting: layers 1..L-1, thresholds 0.1, no background set."""
        return cls(refine_layers=(1, -1), cwr_threshold=0.1, tag_threshold=0.1, use_background=False, **kw)


# ---- pure functions -------------------------------------------------------------------------------

def minmax(x: Tensor, dim: int | None = None) -> Tensor:
    """Min-max normalise to [0, 1] (over all of x, or along dim). A constant input maps to 0."""
    if dim is None:
        lo, hi = x.min(), x.max()
    else:
        lo, hi = x.amin(dim=dim, keepdim=True), x.amax(dim=dim, keepdim=True)
    span = hi - lo
    return torch.where(span > 0, (x - lo) / torch.where(span > 0, span, torch.ones_like(span)), torch.zeros_like(x))


def coarse_scores(patch_features: Tensor, text_classifier: Tensor, logit_scale: float) -> Tensor:
    """P_coarse (N, C): softmax over all classes of logit_scale * cos(patch, class).

    patch_features: (N, D) projected patch tokens. text_classifier: (C, D) L2-normalised."""
    feats = F.normalize(patch_features.float(), dim=-1)
    return (logit_scale * feats @ text_classifier.T).softmax(dim=-1)


def layer_votes(attn: Tensor) -> Tensor:
    """(..., N, N) bool: the entries of each map of attn (..., N, N) above that map's own mean.

    The means are accumulated in float64: a float32 mean depends on the summation order (batch
    size, memory layout, device), and the many entries within one rounding step of it would flip
    their votes from one run to another. Row sums (each row a fixed-order contiguous run) are
    taken in float32 and added in float64; the float32 entries are compared with the float64 mean
    exactly, through the smallest float32 above it, without a float64 copy of the maps."""
    n = attn.shape[-2] * attn.shape[-1]
    if attn.dtype == torch.float32:
        rows = attn.sum(dim=-1, dtype=torch.float32)
        means = rows.sum(dim=-1, dtype=torch.float64) / n  # (...,)
        return attn >= float32_above(means)[..., None, None]  # == (attn > mean) for float32 entries
    means = attn.sum(dim=(-2, -1), keepdim=True, dtype=torch.float64) / n
    return attn > means


def vote_count_dtype(num_layers: int) -> torch.dtype:
    """The dtype of a count of votes over num_layers maps: small counts, half the memory traffic."""
    return torch.uint8 if num_layers <= 255 else torch.int32


def vote_mask(attn: Tensor, k: int) -> Tensor:
    """M_attn (N, N) bool: A_l(i, j) above the mean of A_l in at least k of the L maps (L, N, N)
    (`layer_votes`)."""
    return layer_votes(attn).sum(dim=0, dtype=vote_count_dtype(attn.shape[0])) >= k


class VoteCounter:
    """DMAR's K-of-L vote read layer by layer as the dense forward makes the maps (an
    `AttentionReader`): per patch pair, the number of layers whose map is above that map's mean
    (`layer_votes`, the same comparisons as `vote_mask`); no map is stored. result: (B, N, N)."""

    def __init__(self, num_layers: int) -> None:
        self.dtype = vote_count_dtype(num_layers)
        self.count: Tensor | None = None

    def read(self, layer: int, attn: Tensor) -> None:
        """attn: (B, 1+N, 1+N) map of one layer; the class-token row and column are left out."""
        votes = layer_votes(attn[:, 1:, 1:])
        if self.count is None:
            self.count = votes.to(self.dtype)
        else:
            self.count += votes

    def result(self) -> Tensor:
        return self.count


def float32_above(values: Tensor) -> Tensor:
    """The smallest float32 strictly greater than each float64 value: for a float32 x,
    x > v exactly when x >= float32_above(v)."""
    rounded = values.to(torch.float32)
    bump = rounded.double() <= values
    return torch.where(bump, torch.nextafter(rounded, torch.full_like(rounded, math.inf)), rounded)


def refine_with_votes(maps: Tensor, mask: Tensor) -> Tensor:
    """A (N, N): the mean of the maps (K, N, N) of the refinement layers times the vote mask (N, N) bool."""
    return maps.mean(dim=0) * mask.to(maps.dtype)


def refined_attention(attn: Tensor, layers: tuple[int, int], k: int) -> Tensor:
    """A (N, N): mean of the maps of 1-based layers lo..hi, times the K-of-L vote mask.

    attn: (L, N, N) patch-to-patch maps (class-token row and column removed)."""
    lo, hi = layers
    return refine_with_votes(attn[lo - 1 : hi], vote_mask(attn, k))


def box_mask(
    score_map: Tensor,
    threshold: float,
    relative_to_mean: bool = False,
    all_contours: bool = False,
    reference_compat: bool = False,
    normalise: bool = True,
) -> Tensor:
    """Union of the bounding boxes of the blobs of a score map, (gh, gw) bool (DMAR's class boxes,
    docs/algorithm.md §3, and CLS-SEG's CAA boxes, §8).

    The map is min-max normalised first unless `normalise` is False (CLS-SEG's cams are used as
    given: the reference's eps-normalised cam peaks just below 1, so its 8-bit maximum is usually
    254). Binarisation follows the reference on an 8-bit map: floor(255 v) > floor(t * max(floor(255 v))),
    where t is `threshold`, or mean(v) with relative_to_mean. External contours (8-connected blobs)
    unless all_contours (RETR_TREE; the union is the same). reference_compat: quirk Q2, each box's
    right/bottom end clamped to size-1 (exclusive), dropping a border row/column. The mask is on
    score_map's device."""
    v = score_map.float()
    if normalise:
        v = minmax(v)
    v = v.cpu().numpy().astype(np.float32)
    img = (v * np.float32(255)).astype(np.uint8)
    t = float(v.mean()) if relative_to_mean else threshold
    level = int(np.float32(t) * np.float32(img.max())) if img.max() > 0 else 255
    binary = np.where(img > level, 255, 0).astype(np.uint8)
    gh, gw = v.shape
    mask = np.zeros((gh, gw), dtype=bool)
    retrieval = cv2.RETR_TREE if all_contours else cv2.RETR_EXTERNAL
    for contour in cv2.findContours(binary, retrieval, cv2.CHAIN_APPROX_SIMPLE)[0]:
        x, y, w, h = cv2.boundingRect(contour)
        x1, y1 = x + w, y + h
        if reference_compat:  # quirk Q2 (docs/algorithm.md §10)
            x1, y1 = min(x1, gw - 1), min(y1, gh - 1)
        mask[y:y1, x:x1] = True
    return torch.from_numpy(mask).to(score_map.device)


def class_box_masks(first_refinement: Tensor, grid: tuple[int, int], reference_compat: bool = False) -> Tensor:
    """DMAR's class-wise masks (N, C) bool: per class, boxes of the patches above the mean of the
    normalised column of R = A @ P_coarse (classes whose max is <= 0 get no box, as in the reference)."""
    n, c = first_refinement.shape
    masks = torch.zeros(n, c, dtype=torch.bool, device=first_refinement.device)
    col_max = first_refinement.amax(dim=0)
    for cls in range(c):
        if col_max[cls] > 0:
            column = first_refinement[:, cls].reshape(grid)
            masks[:, cls] = box_mask(column, 0.0, relative_to_mean=True, reference_compat=reference_compat).flatten()
    return masks


def dmar(p_coarse: Tensor, attn_refined: Tensor, grid: tuple[int, int], reference_compat: bool = False) -> Tensor:
    """P_refined (N, C): for each class c, (A * m_c as column mask) @ P_coarse[:, c]."""
    first = attn_refined @ p_coarse
    # The box search runs on the host (OpenCV): one transfer instead of one sync per class.
    masks = class_box_masks(first.cpu(), grid, reference_compat).to(first.device)
    refined = attn_refined @ (p_coarse * masks.to(p_coarse.dtype))
    # Classes the reference does not refine (max of R <= 0, only possible with an all-zero A) keep R.
    untouched = first.amax(dim=0) <= 0
    return torch.where(untouched[None, :], first, refined)


def cwr_candidates(p_refined: Tensor, p_local: Tensor, factor: float) -> Tensor:
    """Foreground classes (indices, ascending) with P_local > min + factor * (max - min) of P_refined."""
    lo, hi = p_refined.min(), p_refined.max()
    return torch.nonzero(p_local > lo + factor * (hi - lo)).flatten()


@dataclass
class CwrBox:
    """A CWR crop on the patch grid: rows y0:y1, columns x0:x1 (exclusive ends), and its patch mask."""

    cls: int
    y0: int
    y1: int
    x0: int
    x1: int
    patch_mask: Tensor  # (y1-y0, x1-x0) bool

    @property
    def empty(self) -> bool:
        return self.y1 <= self.y0 or self.x1 <= self.x0


def cwr_box(column: Tensor, grid: tuple[int, int], cls: int, threshold: float, reference_compat: bool) -> CwrBox:
    """One bounding box around the patches whose normalised score exceeds threshold."""
    above = (minmax(column) > threshold).reshape(grid)
    rows = torch.nonzero(above.any(dim=1)).flatten()
    cols = torch.nonzero(above.any(dim=0)).flatten()
    if len(rows) == 0:
        y0 = y1 = x0 = x1 = 0
    else:
        y0, y1 = int(rows[0]), int(rows[-1]) + 1
        x0, x1 = int(cols[0]), int(cols[-1]) + 1
    if reference_compat:  # quirk Q2 (docs/algorithm.md §10)
        y1, x1 = min(y1, grid[0] - 1), min(x1, grid[1] - 1)
    return CwrBox(cls, y0, y1, x0, x1, above[y0:y1, x0:x1])


def crop_for_cwr(image: Tensor, box: CwrBox, patch_size: int, native_grid: tuple[int, int]) -> tuple[Tensor, Tensor]:
    """The crop (3, S, S) of a normalised image (3, H, W) resized bilinearly to the native size S, and
    the box's patch mask resized (nearest) to the native grid, flattened to (N0,) bool."""
    p = patch_size
    crop = image[:, box.y0 * p : box.y1 * p, box.x0 * p : box.x1 * p]
    size = (native_grid[0] * p, native_grid[1] * p)
    crop = F.interpolate(crop[None].float(), size=size, mode="bilinear", align_corners=False)[0]
    mask = F.interpolate(box.patch_mask[None, None].float(), size=native_grid, mode="nearest")[0, 0]
    return crop, mask.flatten() > 0.5


def fuse(p_local: Tensor, p_global: Tensor, fused: Tensor, lam: float) -> Tensor:
    """P_final (F,): lam * local + (1 - lam) * global where `fused` (F,) bool, else local."""
    return torch.where(fused, lam * p_local + (1 - lam) * p_global, p_local)


def tags_from_scores(scores: Tensor, threshold: float | Tensor) -> list[int]:
    """Classes whose min-max normalised score (over the F foreground scores (F,)) is > threshold
    (strictly); the argmax if none pass (docs/algorithm.md §6). threshold: one float for every
    class, or an (F,) tensor of per-class thresholds (each class against its own)."""
    if isinstance(threshold, Tensor):
        threshold = threshold.to(scores.device)
    keep = torch.nonzero(minmax(scores) > threshold).flatten().tolist()
    return keep if keep else [int(torch.argmax(scores))]


def tag_matrix(scores: Tensor, threshold: float | Tensor) -> Tensor:
    """`tags_from_scores` for a batch: scores (N, F) -> (N, F) bool, row i True at the tags of
    row i. The same float32 operations per row, so each row equals tags_from_scores exactly;
    used to re-derive tags from stored scores (`tagclip retag`, `tagclip calibrate`)."""
    if isinstance(threshold, Tensor):
        threshold = threshold.to(scores.device)
    keep = minmax(scores, dim=1) > threshold
    none = ~keep.any(dim=1)
    if none.any():
        keep[none, scores[none].argmax(dim=1)] = True  # argmax: the first maximum, as above
    return keep


def class_threshold_tensor(config: TagCLIPConfig, num_classes: int) -> float | Tensor:
    """The threshold argument of `tags_from_scores` for a config: tag_threshold, or the (F,)
    float32 per-class thresholds."""
    if config.class_thresholds is None:
        return config.tag_threshold
    if len(config.class_thresholds) != num_classes:
        raise ValueError(f"{len(config.class_thresholds)} class thresholds for {num_classes} classes")
    return torch.tensor(config.class_thresholds, dtype=torch.float32)


# ---- batching -------------------------------------------------------------------------------------

VOTES = "dmar_votes"  # the name of DMAR's vote count among a dense forward's reads

def dense_per_image(
    backbone: Backbone, images: Sequence[Tensor], fp16_round_pos: bool = False, keep_pre_last: bool = False,
    needs: MapNeeds | None = None,
) -> Iterator[tuple[int, DenseOutput]]:
    """(index, DenseOutput of that image) for normalised images (each (3, H, W)): images of the same
    size share one dense forward; one size group at a time, in order of first appearance.
    fp16_round_pos: quirk Q1 (docs/algorithm.md §10). needs: the attention maps the methods use
    (`MapNeeds`; None = every layer's map)."""
    groups: dict[tuple[int, int], list[int]] = {}
    for i, img in enumerate(images):
        groups.setdefault(tuple(img.shape[-2:]), []).append(i)
    for indices in groups.values():
        batch = torch.stack([images[i] for i in indices]).to(backbone.device, non_blocking=True)
        dense = backbone.dense_forward(batch, fp16_round_pos=fp16_round_pos, keep_pre_last=keep_pre_last, needs=needs)
        for j, i in enumerate(indices):
            yield i, dense.image(j)


@dataclass
class TagOutput:
    """TagCLIP result of one image, with every intermediate.

    p_coarse, p_refined: (N, C); attn_refined: (N, N); p_local, p_global, scores: (F,) (p_global
    is NaN where no CWR crop was run); candidates: CWR candidate classes; boxes: the crops run."""

    grid: tuple[int, int]
    p_coarse: Tensor
    attn_refined: Tensor | None
    p_refined: Tensor
    p_local: Tensor
    candidates: list[int]
    boxes: list[CwrBox]
    p_global: Tensor
    scores: Tensor
    tags: list[int]
    dense: DenseOutput | None = field(default=None, repr=False)


class Tagger:
    """Runs TagCLIP on batches of preprocessed images with one backbone and one vocabulary."""

    def __init__(
        self,
        backbone: Backbone,
        vocab: Vocabulary,
        config: TagCLIPConfig | None = None,
        text: Tensor | None = None,
        quirks: Quirks | None = None,
    ) -> None:
        """text: a precomputed (C, D) classifier of `class_names` (default: the 85-template
        ensemble, from the backbone's text cache). quirks: Q1-Q3 (docs/algorithm.md §10) are read
        from it (default: all fixed)."""
        self.backbone = backbone
        self.vocab = vocab
        self.config = config or TagCLIPConfig()
        self.quirks = quirks or Quirks()
        names = vocab.all_names if self.config.use_background else vocab.classes
        self.class_names: tuple[str, ...] = names
        if text is None:
            text = backbone.text_classifier(names, tagclip_templates())
        elif text.shape[0] != len(names):
            raise ValueError(f"text classifier has {text.shape[0]} rows for {len(names)} classes")
        self.text = text
        self.layers = self.config.layers_for(backbone.num_layers)
        self.threshold = class_threshold_tensor(self.config, vocab.num_classes)

    def map_needs(self) -> MapNeeds:
        """The attention maps DMAR reads, a declared need (`MapNeeds`): the maps of the refinement
        layers kept (their mean), every layer's vote counted as the forward runs (`VoteCounter`);
        nothing without DMAR."""
        if not self.config.use_dmar:
            return MapNeeds()
        return MapNeeds(keep=self.layers, readers=((VOTES, partial(VoteCounter, self.backbone.num_layers)),))

    @torch.inference_mode()
    def tag(self, images: Sequence[Tensor], keep_dense: bool = False, needs: MapNeeds | None = None) -> list[TagOutput]:
        """Tag normalised images (each (3, H, W), H and W multiples of the patch size).

        Images of the same size share one dense forward; the CWR crops of all images share one
        masked forward. keep_dense keeps each image's DenseOutput (with pre-last-block tokens);
        needs: the maps another method of the same pass reads (kept in that DenseOutput)."""
        outputs: list[TagOutput | None] = [None] * len(images)
        pending: list[tuple[int, CwrBox]] = []
        q1 = self.quirks.q1_fp16_positions  # quirk Q1 (docs/algorithm.md §10) in the dense forward
        wanted = self.map_needs() | needs if needs is not None else self.map_needs()
        per_image = dense_per_image(self.backbone, images, q1, keep_pre_last=keep_dense, needs=wanted)
        for i, one in per_image:
            outputs[i] = self._local(one, keep_dense)
            pending.extend((i, box) for box in outputs[i].boxes)
        self._global(images, outputs, pending)
        return outputs  # type: ignore[return-value]

    def _local(self, dense: DenseOutput, keep_dense: bool) -> TagOutput:
        cfg = self.config
        nf = self.vocab.num_classes
        p_coarse = coarse_scores(dense.tokens[1:], self.text, self.backbone.logit_scale)
        attn_refined = None
        if cfg.use_dmar:
            attn_refined = self._refined_attention(dense)
            p_refined = dmar(p_coarse, attn_refined, dense.grid, self.quirks.q2_clamp_box_ends)
        else:
            p_refined = p_coarse
        p_local = p_refined[:, :nf].amax(dim=0)
        candidates: list[int] = []
        boxes: list[CwrBox] = []
        if cfg.use_cwr:
            candidates = cwr_candidates(p_refined, p_local, cfg.cwr_threshold).tolist()
            for cls in candidates:
                q2 = self.quirks.q2_clamp_box_ends  # quirk Q2 (docs/algorithm.md §10)
                box = cwr_box(p_refined[:, cls], dense.grid, cls, cfg.cwr_patch_threshold, q2)
                if box.empty:
                    if self.quirks.q3_stop_cwr_at_empty_box:  # quirk Q3 (docs/algorithm.md §10)
                        break  # the reference stops CWR for the whole image at the first empty box
                    continue
                boxes.append(box)
        nan = torch.full_like(p_local, float("nan"))
        return TagOutput(
            dense.grid, p_coarse, attn_refined, p_refined, p_local, candidates, boxes, nan, p_local.clone(), [],
            dense if keep_dense else None,
        )

    def _refined_attention(self, dense: DenseOutput) -> Tensor:
        """DMAR's A (N, N) of one image: the votes counted in the forward (`VoteCounter`), or of
        every layer's map when the forward kept them all."""
        votes, k = dense.reads.get(VOTES), self.config.vote_k
        if votes is None:
            return refined_attention(dense.maps(1, self.backbone.num_layers)[:, 1:, 1:], self.layers, k)
        return refine_with_votes(dense.maps(*self.layers)[:, 1:, 1:], votes >= k)

    def _global(self, images: Sequence[Tensor], outputs: list[TagOutput | None], pending: list) -> None:
        bb = self.backbone
        if pending:
            crops, masks = zip(
                *(crop_for_cwr(images[i].to(bb.device), box, bb.patch_size, bb.native_grid) for i, box in pending),
                strict=True,
            )
            cls_emb = bb.masked_cls_forward(torch.stack(crops), torch.stack(masks), self.config.cwr_mask_value)
            probs = (bb.logit_scale * F.normalize(cls_emb, dim=-1) @ self.text.T).softmax(dim=-1)
            for (i, box), row in zip(pending, probs, strict=True):
                outputs[i].p_global[box.cls] = row[box.cls]
        for out in outputs:
            fused = ~torch.isnan(out.p_global)
            out.scores = fuse(out.p_local, torch.nan_to_num(out.p_global), fused, self.config.fusion_lambda)
            if isinstance(self.threshold, Tensor):
                # per-class thresholds: on the float32 scores, as `retag` sees them in the Parquet
                out.tags = tags_from_scores(out.scores.float(), self.threshold)
            else:
                out.tags = tags_from_scores(out.scores, self.threshold)

