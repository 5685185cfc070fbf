"""CLS-SEG (TagCLIP's tags fed to CLIP-ES), the MaskCLIP baseline and the dense baselines SCLIP,
ClearCLIP and NACLIP (docs/algorithm.md §12): label maps from a frozen CLIP.

Pure tensor functions (shapes in the docstrings; N patches on a (gh, gw) grid, K tags of one image,
B background classes, L layers) plus a `Segmenter` that runs them over batches of images, sharing
one dense forward per image with TagCLIP. Implements docs/algorithm.md §8 (CLS-SEG: CLIP-ES from
tags, with its origami prompt, §7) and §9 (the MaskCLIP baseline); `reference_compat` reproduces
quirks Q2 and Q4 (docs/algorithm.md §10); the TagCLIP config's flag gives Q1 in the dense forward.

CLS-SEG per image:
1. Grad-CAM of the last block for every tag at once: block L runs once (normal attention) on the
   tokens entering it; the K targets (the softmax probability of tag k among [tags + background],
   from the mean of the projected patch tokens) get their gradients on the ln_1 output from one
   vectorised backward (one-hot cotangents, `is_grads_batched`), not from K backward calls.
2. CAA: mean attention of the CAA layers, Sinkhorn-style rounds, symmetrised; the cam's boxes mask
   the columns; the affinity is applied twice (its square) to the masked cam.
3. Normalise on the grid, upsample bilinearly to the image size, background = (1 - max cam)^1,
   argmax. Optionally a dense CRF on the RGB image.

Where this differs from the spec's wording it follows the reference (for parity with its numbers):
cams are normalised as (x - min) / (max - min + 1e-7) (the Grad-CAM twice, as the reference's CAM
library does), and the refined cam is normalised on the grid before it is upsampled (set
`normalise_after_resize` for the other order).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from tagclip_cli.backbone import Backbone, DenseOutput, imagenet_templates

# The label rule and the CRF live in cams.py (shared with `evaluate --cams`).
from tagclip_cli.cams import (
    CAM_EPS,
    CAM_LAYOUTS,
    CamRule,
    _mean_by_label,
    _row_bands,
    crf_label_map,
    crf_label_map_upsampled,
    label_map_from_cams,
    label_map_from_upsampled,
    normalise_cam,
    require_crf,
    resize_bilinear,
)
from tagclip_cli.errors import UsageError
from tagclip_cli.tagclip import (
    TagCLIPConfig,
    Tagger,
    TagOutput,
    box_mask,
    dense_per_image,
    layer_range,
    tagclip_templates,
)
from tagclip_cli.vocab import Vocabulary, load_vocabulary

log = logging.getLogger(__name__)

DENSE_METHODS = ("sclip", "clearclip", "naclip")  # the dense baselines (docs/algorithm.md §12)
METHODS = ("clses", "maskclip", *DENSE_METHODS)
SETTINGS = ("voc", "coco", "cocostuff")  # docs/algorithm.md §11
# CLS-SEG names classes with CLIP-ES's single template (docs/algorithm.md §7).
CLS_SEG_TEMPLATES = ("a clean origami {}.",)


# ---- the dense baselines' published settings (docs/algorithm.md §12) ------------------------------

@dataclass(frozen=True)
class DenseSettings:
    """Inference settings of a dense baseline (SCLIP, ClearCLIP, NACLIP), as each published them.

    The image is resized keeping its aspect ratio so that its short side is short_side (its long
    side at most max_long), with OpenCV's bilinear resize of the uint8 image; crop > 0: sliding
    crop x crop windows every `stride` pixels (crop 0: the whole image in one forward);
    pad_crops: windows whose sides are not multiples of the patch size are zero-padded on both
    sides (ClearCLIP) instead of losing the remainder in the patch convolution. Per pixel:
    softmax over the queries of logit_scale * cosine, a class's probability is the max over its
    queries; area_threshold (SCLIP, VOC): a foreground class covering at most this fraction of the
    foreground pixels is dropped; pixels whose best probability is below prob_threshold are
    background. gaussian_std: NACLIP's neighbourhood prior on the patch grid. queries:
    "published" = the authors' query names for the built-in voc / coco vocabularies
    (`dense_queries`), "vocabulary" = one query per class name, the vocabulary's background
    names for the background."""

    short_side: int
    crop: int
    stride: int
    logit_scale: float
    prob_threshold: float
    area_threshold: float | None = None
    pad_crops: bool = False
    gaussian_std: float = 5.0
    max_long: int = 2048
    queries: str = "published"

    def __post_init__(self) -> None:
        if self.short_side < 1 or self.max_long < 1 or self.crop < 0 or (self.crop and self.stride < 1):
            raise UsageError("dense settings: short_side and max_long must be >= 1, crop >= 0, stride >= 1")
        if self.queries not in ("published", "vocabulary"):
            raise UsageError(f"dense settings: queries must be published or vocabulary, not '{self.queries}'")

    @classmethod
    def published(cls, method: str, setting: str) -> DenseSettings:
        """The authors' VOC21 ("voc") or COCO-Object ("coco") configuration of method."""
        try:
            return PUBLISHED_DENSE[method][setting]
        except KeyError:
            raise UsageError(f"no published settings for method '{method}', setting '{setting}'") from None


# Read from the authors' VOC21 and COCO-Object configs (ViT-B/16); SCLIP and NACLIP leave the
# class's constructor defaults (224 / 112 windows) where a config does not set them.
PUBLISHED_DENSE: dict[str, dict[str, DenseSettings]] = {
    "sclip": {
        "voc": DenseSettings(short_side=336, crop=224, stride=112, logit_scale=65, prob_threshold=0.1,
                             area_threshold=0.1),
        "coco": DenseSettings(short_side=336, crop=224, stride=112, logit_scale=50, prob_threshold=0.1),
    },
    "clearclip": {
        "voc": DenseSettings(short_side=448, crop=448, stride=224, logit_scale=50, prob_threshold=0.5,
                             pad_crops=True),
        "coco": DenseSettings(short_side=448, crop=448, stride=224, logit_scale=50, prob_threshold=0.4,
                              pad_crops=True),
    },
    "naclip": {
        "voc": DenseSettings(short_side=336, crop=0, stride=0, logit_scale=40, prob_threshold=0.1),
        "coco": DenseSettings(short_side=336, crop=224, stride=112, logit_scale=40, prob_threshold=0.1),
    },
}

# SCLIP's and NACLIP's query names (docs/algorithm.md §12): background = 26 scene words, and a
# few classes with several names; a class scores the max over its queries.
SCENE_BACKGROUND = (
    "sky", "wall", "tree", "wood", "grass", "road", "sea", "river", "mountain", "sands", "desk", "bed",
    "building", "cloud", "lamp", "door", "window", "wardrobe", "ceiling", "shelf", "curtain", "stair",
    "floor", "hill", "rail", "fence",
)
PERSON_QUERIES = ("person", "person in shirt", "person in jeans", "person in dress", "person in sweater",
                  "person in skirt", "person in jacket")
# Per built-in vocabulary: class name -> the authors' names for it (classes not listed: their own name).
VOC_RENAMES = {"boat": ("ship",), "diningtable": ("table",)}
SCLIP_VOC_QUERIES = {
    **VOC_RENAMES, "person": PERSON_QUERIES,
    "tvmonitor": ("television monitor", "tv monitor", "monitor", "television", "screen"),
}
CLEARCLIP_VOC_QUERIES = {**VOC_RENAMES}
COCO_RENAMES = {
    "motorbike": ("motorcycle",), "aeroplane": ("airplane",), "sofa": ("couch",),
    "pottedplant": ("potted plant",), "diningtable": ("dining table",), "tvmonitor": ("tv",),
}
SCLIP_COCO_QUERIES = {**COCO_RENAMES, "person": (*PERSON_QUERIES, "body")}
CLEARCLIP_COCO_QUERIES = {**COCO_RENAMES}


@dataclass(frozen=True)
class SegmentConfig:
    """Every knob of CLS-SEG and the MaskCLIP baseline, with the paper's (VOC) values as defaults.

    caa_layers: 1-based inclusive layer range averaged for CAA; a value <= 0 counts from L
    (0 = L, -1 = L-1), and the low end is clamped to 1. VOC: (-7, -1) = layers 5..11 of ViT-B;
    COCO: (-7, 0) = layers 5..12 (`SegmentConfig.coco()`)."""

    method: str = "clses"  # "clses" (CLIP-ES from tags) or "maskclip" (baseline)
    caa_layers: tuple[int, int] = (-7, -1)
    box_threshold: float = 0.4  # CAA box mask: normalised cam above this (COCO 0.7)
    sinkhorn_rounds: int = 3  # column-then-row normalisations (1 + 2 more in the reference)
    affinity_power: int = 2  # the symmetrised affinity is squared once
    background_power: float = 1.0  # background score = (1 - max cam) ** power
    normalise_after_resize: bool = False  # False = the reference: normalise on the grid, then upsample
    cam_eps: float = CAM_EPS  # cams are normalised as (x - min) / (max - min + eps), as the reference
    cam_batch: int = 16  # tags per vectorised backward (memory bound; all tags of most images at once)
    crf: bool = False
    crf_iterations: int = 10
    crf_gaussian_sxy: float = 1.0
    crf_gaussian_compat: float = 3.0
    crf_bilateral_sxy: float = 67.0
    crf_bilateral_srgb: float = 3.0
    crf_bilateral_compat: float = 4.0
    crf_unary_clip: float = 1e-5  # unary = -log(clip(p, this, 1)) of [background; cams]
    key_smoothing: bool = False  # MaskCLIP: smooth predictions with last-layer key similarity
    key_smoothing_threshold: float = 1.0  # ... at positions whose best probability is below this
    prompt_denoising: bool = False  # MaskCLIP: drop classes whose best probability is below ...
    prompt_denoising_threshold: float = 0.5
    reference_compat: bool = False  # quirks Q2 (box edges) and Q4 (CAA in float32), docs/algorithm.md §10
    dense: DenseSettings | None = None  # sclip / clearclip / naclip: their published settings (voc by default)
    # COCO-Stuff (docs/algorithm.md §11): no background label (every pixel gets its best tag) and
    # Grad-CAM's softmax over [tags + these names] instead of the vocabulary's background set.
    label_background: bool = True
    cam_background: tuple[str, ...] | None = None  # None = the background set TagCLIP uses
    # --save-cams: the refined cams kept (float16) at the image size ("image") or on the patch
    # grid ("grid"); the label map is then made from exactly the values saved, so that
    # `evaluate --cams` reproduces it (docs/algorithm.md §8 step 11).
    save_cams: str | None = None

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise UsageError(f"unknown segmentation method '{self.method}' (choose from {', '.join(METHODS)})")
        if self.method in DENSE_METHODS and self.dense is None:
            object.__setattr__(self, "dense", DenseSettings.published(self.method, "voc"))
        if not 0.0 <= self.box_threshold <= 1.0:
            raise UsageError(f"box threshold {self.box_threshold} outside [0, 1]")
        if self.cam_batch < 1 or self.sinkhorn_rounds < 0 or self.affinity_power < 0:
            raise UsageError("cam_batch must be >= 1, sinkhorn_rounds and affinity_power >= 0")
        if self.save_cams not in (None, *CAM_LAYOUTS):
            raise UsageError(f"save_cams must be one of {', '.join(CAM_LAYOUTS)}, not '{self.save_cams}'")

    def layers_for(self, num_layers: int) -> tuple[int, int]:
        """The CAA layer range (1-based, inclusive) for a model with num_layers blocks (`layer_range`)."""
        return layer_range(self.caa_layers, num_layers, "CAA layers")

    def cam_rule(self) -> CamRule:
        """The label rule and CRF parameters (what `evaluate --cams` needs to redo the label maps)."""
        return CamRule(**{name: getattr(self, name) for name in CamRule.__dataclass_fields__})

    @classmethod
    def coco(cls, **kw) -> SegmentConfig:
        """The reference's COCO setting: CAA layers L-7..L and box threshold 0.7."""
        if kw.get("method") in DENSE_METHODS and kw.get("dense") is None:
            kw["dense"] = DenseSettings.published(kw["method"], "coco")
        return cls(caa_layers=(-7, 0), box_threshold=0.7, **kw)

    @classmethod
    def coco_stuff(cls, **kw) -> SegmentConfig:
        """The reference's COCO-Stuff setting (TagCLIP's CLIP-ES/generate_cams_cocostuff.py and
        eval_cam_cocostuff.py): the COCO CAA layers and box threshold, Grad-CAM against the one
        background name "background", and no background label (argmax over the tags alone)."""
        return cls(caa_layers=(-7, 0), box_threshold=0.7, label_background=False, cam_background=("background",),
                   **kw)

    @classmethod
    def for_setting(cls, setting: str, **kw) -> SegmentConfig:
        """The voc or coco setting: CLS-SEG's CAA values, or a dense baseline's published
        VOC21 / COCO-Object settings (`DenseSettings.published`)."""
        if setting == "voc":
            return cls(**kw)
        if setting == "coco":
            return cls.coco(**kw)
        if setting == "cocostuff":
            return cls.coco_stuff(**kw)
        raise UsageError(f"unknown setting '{setting}' (choose from {', '.join(SETTINGS)})")


# ---- pure functions -------------------------------------------------------------------------------

def grad_cams(backbone: Backbone, pre_last: Tensor, text: Tensor, num_targets: int, batch: int = 16) -> Tensor:
    """Grad-CAM of the last block for the first num_targets classes of `text`, (K, N) after ReLU.

    pre_last: (1+N, W) tokens entering block L. text: (K+B, D) L2-normalised classifier (the K
    targets first, then the background classes). Target k is the softmax over all K+B classes of
    logit_scale * cos(mean-pooled projected patch tokens, text), taken at class k; its gradient on
    block L's ln_1 output (patch tokens) gives channel weights (spatial mean), and the cam is
    ReLU(sum over channels of weight * activation).

    Block L runs forward once; the K targets' gradients come from batched backward passes
    (`torch.autograd.grad(..., is_grads_batched=True)`: one vectorised backward for up to `batch`
    targets, one-hot cotangents), not from one backward call per tag."""
    n = pre_last.shape[0] - 1
    if num_targets == 0:
        return torch.zeros(0, n, device=pre_last.device)
    last = backbone.num_layers - 1
    scale = backbone.logit_scale
    cams = []
    # The pipeline runs under inference_mode; Grad-CAM needs autograd (and non-inference tensors).
    with torch.inference_mode(False), torch.enable_grad():
        tokens = pre_last.detach().clone()[None]
        classifier = text.detach().clone().float()
        out, ln1, _ = backbone.block_forward_ln1_leaf(last, tokens)
        pooled = backbone.project_tokens(out[:, 1:]).mean(dim=1).float()  # == proj(mean(ln_post(.)))
        probs = (scale * F.normalize(pooled, dim=-1) @ classifier.T).softmax(dim=-1)[0]  # (K+B,)
        activation = ln1.detach()[0, 1:].float()  # (N, W)
        for start in range(0, num_targets, batch):
            stop = min(num_targets, start + batch)
            cotangents = torch.zeros(stop - start, probs.shape[0], device=probs.device)
            cotangents[torch.arange(stop - start), torch.arange(start, stop)] = 1.0
            (grad,) = torch.autograd.grad(probs, ln1, grad_outputs=cotangents, is_grads_batched=True,
                                          retain_graph=stop < num_targets)  # (k, 1, 1+N, W)
            weights = grad[:, 0, 1:].float().mean(dim=1)  # (k, W)
            cams.append(torch.relu(activation @ weights.T).T)  # (k, N)
    return torch.cat(cams)


def caa_affinity(attn: Tensor, layers: tuple[int, int]) -> Tensor:
    """(N, N) mean of the patch-to-patch attention of 1-based layers lo..hi.

    attn: (L, 1+N, 1+N) head-averaged maps of one image (class-token row/column are dropped)."""
    lo, hi = layers
    return attn[lo - 1 : hi, 1:, 1:].mean(dim=0)


def sinkhorn(affinity: Tensor, rounds: int) -> Tensor:
    """`rounds` times: divide by column sums, then by row sums. (N, N) -> (N, N).

    After the last round every row sums to 1; the columns approach 1 as rounds grow."""
    t = affinity
    for _ in range(rounds):
        t = t / t.sum(dim=0, keepdim=True)
        t = t / t.sum(dim=1, keepdim=True)
    return t


def caa_transition(affinity: Tensor, rounds: int = 3) -> Tensor:
    """The symmetrised Sinkhorn-normalised affinity (T + T^T) / 2, (N, N)."""
    t = sinkhorn(affinity, rounds)
    return (t + t.T) / 2


def cam_box_mask(cam: Tensor, threshold: float, reference_compat: bool = False) -> Tensor:
    """CLS-SEG's CAA box mask (docs/algorithm.md §8), (gh, gw) bool: `box_mask` of a normalised cam
    used as given (no re-normalisation), over all contours (RETR_TREE); reference_compat: quirk Q2."""
    return box_mask(cam, threshold, all_contours=True, reference_compat=reference_compat, normalise=False)


def cam_box_masks(cams: Tensor, grid: tuple[int, int], threshold: float, reference_compat: bool = False) -> Tensor:
    """(K, N) bool: `cam_box_mask` of each normalised cam of (K, N)."""
    masks = [cam_box_mask(cam.reshape(grid), threshold, reference_compat).flatten() for cam in cams]
    return torch.stack(masks) if masks else torch.zeros(0, grid[0] * grid[1], dtype=torch.bool)


def caa_refine_squared(cams: Tensor, transition: Tensor, box_masks: Tensor) -> Tensor:
    """`caa_refine` with power 2 in the reference's order of operations: T @ T formed first, the
    box columns kept, then the product with each cam; float32 in, float32 out, so that
    reference_compat rounds as the reference does (its refined cams are often nearly flat before
    the final normalisation, which magnifies any rounding difference)."""
    squared = transition @ transition
    out = [((squared * box.to(squared.dtype)) @ cam[:, None])[:, 0] for cam, box in zip(cams, box_masks, strict=True)]
    return torch.stack(out) if out else cams.clone()


def caa_refine(cams: Tensor, transition: Tensor, box_masks: Tensor, power: int = 2) -> Tensor:
    """Refined cams (K, N) = (T^power with the box columns kept) @ cam, for normalised cams (K, N).

    Computed as T applied `power` times to (box * cam), which equals (T^power * box columns) @ cam
    without forming T^power."""
    v = (cams * box_masks.to(cams.dtype)).T  # (N, K)
    for _ in range(power):
        v = transition @ v
    return v.T


# ---- MaskCLIP -------------------------------------------------------------------------------------

def maskclip_scores(
    patch_features: Tensor,
    text: Tensor,
    logit_scale: float,
    keys: Tensor | None = None,
    prompt_denoising: float | None = None,
    key_smoothing: float | None = None,
) -> tuple[Tensor, Tensor]:
    """MaskCLIP's per-patch class scores from value-path features (N, D) and text (C, D).

    Returns (decision scores (N, C), probabilities (N, C)). Without options the decision scores are
    the cosine logits. prompt_denoising=t: classes whose best softmax probability (of logit_scale *
    cos) over all patches is below t get logit -100 (dropped). key_smoothing=t (needs keys (N, W),
    the last block's keys): patches whose best probability is below t take the key-cosine-weighted
    sum of all patches' probabilities (unnormalised, as MaskCLIP). The probabilities are the
    softmax after denoising, before smoothing (what the masks' scores report)."""
    logits = F.normalize(patch_features.float(), dim=-1) @ text.T
    if prompt_denoising is not None:
        best = (logit_scale * logits).softmax(dim=-1).amax(dim=0)
        logits = torch.where((best < prompt_denoising)[None, :], torch.full_like(logits, -100.0), logits)
    probs = (logit_scale * logits).softmax(dim=-1)
    if key_smoothing is None:
        return logits, probs
    if keys is None:
        raise ValueError("key smoothing needs the last block's keys")
    k = F.normalize(keys.float(), dim=-1)
    smoothed = (k @ k.T) @ probs
    smooth = probs.amax(dim=-1, keepdim=True) < key_smoothing
    return torch.where(smooth, smoothed, probs), probs


def label_map_from_scores(
    scores: Tensor, grid: tuple[int, int], labels: Sequence[int], size: tuple[int, int], values: Tensor | None = None
) -> tuple[np.ndarray, dict[int, float]]:
    """Argmax of bilinearly upsampled per-patch scores (N, C): label map (H, W) with labels[c] for
    class c (0 for background classes), and per label the mean (upsampled) `values` (N, C; default
    the scores) of the winning class over its pixels."""
    c = scores.shape[1]
    maps = scores.T.reshape(c, *grid)
    value_maps = maps if values is None else values.T.reshape(c, *grid)
    height, width = size
    out = np.zeros((height, width), dtype=np.int32)
    lookup = torch.tensor(list(labels), dtype=torch.long)
    sums = torch.zeros(c, dtype=torch.float64)
    counts = torch.zeros(c, dtype=torch.float64)
    for band in _row_bands(height, width, c * (1 if values is None else 2)):
        winner = resize_bilinear(maps, size, band).argmax(dim=0)
        value = resize_bilinear(value_maps, size, band).gather(0, winner[None])[0]
        winner = winner.cpu()
        out[band] = lookup[winner].numpy()
        sums += torch.bincount(winner.flatten(), weights=value.cpu().double().flatten(), minlength=c)
        counts += torch.bincount(winner.flatten(), minlength=c).double()
    return out, _mean_by_label(sums, counts, labels)


# ---- the dense baselines: SCLIP, ClearCLIP, NACLIP (docs/algorithm.md §12) -------------------------

def _builtin_classes(name: str) -> tuple[str, ...]:
    return load_vocabulary(name).classes


def dense_queries(method: str, vocab: Vocabulary, use_background: bool = True,
                  source: str = "published") -> tuple[tuple[str, ...], tuple[int, ...]]:
    """The text queries of a dense baseline and the class of each: (names (Q,), class (Q,)) with
    class 0 = background and c + 1 = vocabulary class c.

    source "published": for the built-in voc and coco vocabularies, the authors' names (SCLIP and
    NACLIP: 26 scene words for the background and several names for person, and on VOC for tv
    monitor; ClearCLIP: the single word "background"; both rename a few classes). Any other
    vocabulary, or source "vocabulary": one query per class name, the vocabulary's background names
    for the background. use_background False drops the background queries."""
    table: dict[str, tuple[str, ...]] | None = None
    background: tuple[str, ...] = tuple(vocab.background)
    if source == "published":
        scene = method in ("sclip", "naclip")
        if vocab.classes == _builtin_classes("voc"):
            table = SCLIP_VOC_QUERIES if scene else CLEARCLIP_VOC_QUERIES
        elif vocab.classes == _builtin_classes("coco"):
            table = SCLIP_COCO_QUERIES if scene else CLEARCLIP_COCO_QUERIES
        if table is not None:
            background = SCENE_BACKGROUND if scene else ("background",)
    names: list[str] = []
    index: list[int] = []
    if use_background:
        names += background
        index += [0] * len(background)
    for c, name in enumerate(vocab.classes):
        queries = (table or {}).get(name, (name,))
        names += queries
        index += [c + 1] * len(queries)
    return tuple(names), tuple(index)


def keep_ratio_size(height: int, width: int, short_side: int, max_long: int = 2048) -> tuple[int, int]:
    """(height, width) after the authors' keep-ratio rescale: the largest scale with the short side
    at most short_side and the long side at most max_long, sizes rounded half up."""
    scale = min(max_long / max(height, width), short_side / min(height, width))
    return max(1, int(height * scale + 0.5)), max(1, int(width * scale + 0.5))


def dense_pixels(rgb: np.ndarray, size: tuple[int, int], mean: Sequence[float], std: Sequence[float]) -> Tensor:
    """(3, h, w) float32 normalised image: OpenCV's bilinear resize of the (H, W, 3) uint8 RGB
    image to size (h, w) (uint8 out, no antialiasing, as the authors' loaders), then
    (x / 255 - mean) / std."""
    import cv2

    h, w = size
    resized = cv2.resize(np.ascontiguousarray(rgb), (w, h), interpolation=cv2.INTER_LINEAR)
    arr = torch.from_numpy(resized.astype(np.float32)).permute(2, 0, 1) / 255.0
    return (arr - torch.tensor(mean)[:, None, None]) / torch.tensor(std)[:, None, None]


def slide_windows(height: int, width: int, crop: int, stride: int) -> list[tuple[int, int, int, int]]:
    """(y1, y2, x1, x2) windows of the authors' sliding inference: crop x crop every stride pixels,
    the last row/column of windows moved back to end at the border, windows clipped to a smaller
    image; crop 0 = the whole image."""
    if crop <= 0:
        return [(0, height, 0, width)]
    rows = max(height - crop + stride - 1, 0) // stride + 1
    cols = max(width - crop + stride - 1, 0) // stride + 1
    out = []
    for i in range(rows):
        for j in range(cols):
            y2, x2 = min(i * stride + crop, height), min(j * stride + crop, width)
            out.append((max(y2 - crop, 0), y2, max(x2 - crop, 0), x2))
    return out


def centre_padding(height: int, width: int, patch: int) -> tuple[int, int, int, int]:
    """(left, right, top, bottom) zero padding that brings both sides to multiples of patch, split
    evenly (the extra pixel on the right / bottom)."""
    pad_w = -width % patch
    pad_h = -height % patch
    return pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2


def dense_logits(
    backbone: Backbone, pixels: Tensor, text: Tensor, method: str, settings: DenseSettings, chunk: int = 16
) -> Tensor:
    """Cosine logits (Q, h, w) of a dense baseline over a resized image pixels (3, h, w) for the
    queries' classifier text (Q, D): per window (`slide_windows`), the patch tokens' cosines with
    the queries, upsampled bilinearly to the window, summed where windows overlap and divided by
    the number of windows covering each pixel. Windows run `chunk` at a time."""
    _, h, w = pixels.shape
    p = backbone.patch_size
    windows = slide_windows(h, w, settings.crop, settings.stride)
    total = torch.zeros(text.shape[0], h, w, device=pixels.device)
    count = torch.zeros(1, h, w, device=pixels.device)
    for start in range(0, len(windows), chunk):
        group = windows[start : start + chunk]
        crops = torch.stack([pixels[:, y1:y2, x1:x2] for y1, y2, x1, x2 in group])  # windows of one image: one size
        ch, cw = crops.shape[-2:]
        if settings.pad_crops:
            pad = centre_padding(ch, cw, p)
        else:  # a side shorter than one patch (the authors' code fails there) is padded to one patch
            pad = (0, max(0, p - cw), 0, max(0, p - ch))
        if any(pad):
            crops = F.pad(crops, pad)
        tokens = backbone.dense_method_forward(crops, method, settings.gaussian_std)  # (B, n, D)
        grid = (crops.shape[-2] // p, crops.shape[-1] // p)
        logits = F.normalize(tokens, dim=-1) @ text.T  # (B, n, Q)
        logits = logits.transpose(1, 2).reshape(len(group), -1, *grid)
        logits = F.interpolate(logits, size=crops.shape[-2:], mode="bilinear", align_corners=False)
        logits = logits[:, :, pad[2] : pad[2] + ch, pad[0] : pad[0] + cw]
        for (y1, y2, x1, x2), one in zip(group, logits, strict=True):
            total[:, y1:y2, x1:x2] += one
            count[:, y1:y2, x1:x2] += 1
    return total / count


def dense_label_map(
    logits: Tensor, query_class: Tensor, num_labels: int, settings: DenseSettings
) -> tuple[np.ndarray, dict[int, float]]:
    """Label map (H, W) int32 and per label the mean probability of its pixels, from query logits
    (Q, H, W) at the image size: probabilities softmax(logit_scale * logits) over the queries,
    a label's probability the max over its queries (query_class (Q,) long, label of each query,
    0 = background, num_labels labels in all); SCLIP's area threshold; argmax; pixels whose best
    probability is below prob_threshold become background."""
    probs = (settings.logit_scale * logits.float()).softmax(dim=0)
    # A label without queries (the background with --no-background) keeps probability 0.
    per_label = torch.zeros(num_labels, *probs.shape[1:], device=probs.device)
    query_class = query_class.to(probs.device)
    for label in query_class.unique().tolist():
        per_label[label] = probs[query_class == label].amax(dim=0)
    if settings.area_threshold is not None:
        winner = per_label.argmax(dim=0)
        area = torch.bincount(winner.flatten(), minlength=num_labels)[1:].float()
        keep = area > settings.area_threshold * area.sum()
        per_label[1:] *= keep.to(per_label.dtype)[:, None, None]
    best, winner = per_label.max(dim=0)
    winner = torch.where(best < settings.prob_threshold, torch.zeros_like(winner), winner)
    winner = winner.cpu()
    sums = torch.bincount(winner.flatten(), weights=best.cpu().double().flatten(), minlength=num_labels)
    counts = torch.bincount(winner.flatten(), minlength=num_labels).double()
    return winner.numpy().astype(np.int32), _mean_by_label(sums, counts, list(range(num_labels)))


# ---- batching -------------------------------------------------------------------------------------

@dataclass
class SegOutput:
    """Segmentation of one image.

    label_map: (H, W) int32 at the original image size, 0 = background, c + 1 = vocabulary class c.
    mask_scores: {label: score} for every label present: the mean of that class's map inside its
    mask (CLS-SEG: the normalised refined cam; MaskCLIP: the class's softmax probability).
    tags: the foreground classes segmented (CLS-SEG) or present (MaskCLIP).
    cams: (K, gh, gw) normalised refined cams on the grid (CLS-SEG). raw_cams: (K, gh, gw)
    normalised Grad-CAMs before CAA. tag_output: TagCLIP's result when it ran in this pass.
    saved_cams: with SegmentConfig.save_cams, the float16 cams to write (numpy, on the CPU) that
    the label map was made from."""

    label_map: np.ndarray
    mask_scores: dict[int, float]
    tags: list[int]
    cams: Tensor | None = None
    raw_cams: Tensor | None = None
    tag_output: TagOutput | None = field(default=None, repr=False)
    saved_cams: np.ndarray | None = field(default=None, repr=False)  # --save-cams: float16 (K, H, W) / (K, gh, gw)


class Segmenter:
    """Runs CLS-SEG (or MaskCLIP) on batches of preprocessed images with one backbone and vocabulary.

    With `tags` given to `segment`, TagCLIP is not run (one dense forward per image for CAA and
    Grad-CAM); otherwise TagCLIP tags the batch first and the same dense forward feeds both."""

    def __init__(
        self,
        backbone: Backbone,
        vocab: Vocabulary,
        config: SegmentConfig | None = None,
        tagclip: TagCLIPConfig | None = None,
        run_tagclip: bool = True,
    ) -> None:
        self.backbone = backbone
        self.vocab = vocab
        self.config = config or SegmentConfig()
        self.tagclip = tagclip or TagCLIPConfig()
        if self.config.crf:
            require_crf()
        dense = self.config.method in DENSE_METHODS
        self.tagger = Tagger(backbone, vocab, self.tagclip) if run_tagclip and not dense else None
        background = vocab.background if self.tagclip.use_background else ()
        if self.config.cam_background is not None:  # COCO-Stuff: Grad-CAM against "background" only
            background = self.config.cam_background
        self.num_background = len(background)
        self.layers = self.config.layers_for(backbone.num_layers)
        if dense:
            # The dense baselines: their query names and the 80 ImageNet templates (docs/algorithm.md §12).
            settings = self.config.dense
            names, index = dense_queries(self.config.method, vocab, self.tagclip.use_background, settings.queries)
            self.query_class = torch.tensor(index, dtype=torch.long)
            self.text = backbone.text_classifier(names, imagenet_templates())
        elif self.config.method == "clses":
            # CLS-SEG names with the single origami template; foreground rows first, then background.
            self.text = backbone.text_classifier(tuple(vocab.seg_names) + tuple(background), CLS_SEG_TEMPLATES)
        elif self.tagger is not None:
            self.text = self.tagger.text  # MaskCLIP: the 85-template classifier TagCLIP already built
        else:
            self.text = backbone.text_classifier(tuple(vocab.classes) + tuple(background), tagclip_templates())

    def segment(
        self,
        images: Sequence[Tensor],
        sizes: Sequence[tuple[int, int]],
        tags: Sequence[Sequence[int]] | None = None,
        rgb: Callable[[int], np.ndarray] | None = None,
        keep_cams: bool = False,
    ) -> list[SegOutput]:
        """Segment normalised images (each (3, H', W'), multiples of the patch size).

        sizes: the (height, width) of each label map (the original image size). tags: foreground
        class indices per image (None = run TagCLIP here). rgb(i): the (H, W, 3) uint8 image i,
        needed only with the CRF. keep_cams keeps the grid cams in the outputs (CLS-SEG)."""
        if self.config.method in DENSE_METHODS:
            if rgb is None:
                raise ValueError(f"{self.config.method} resizes the RGB images itself (rgb=...)")
            return [self._dense_method(rgb(i), tuple(size)) for i, size in enumerate(sizes)]
        tag_outputs: list[TagOutput | None]
        if tags is None:
            if self.tagger is None:
                raise ValueError("no tags given and TagCLIP was not set up (run_tagclip=False)")
            tag_outputs = list(self.tagger.tag(images, keep_dense=True))
            denses = [out.dense for out in tag_outputs]
            tags = [out.tags for out in tag_outputs]
        else:
            tag_outputs = [None] * len(images)
            denses = self._dense(images)
        results = []
        for i, (dense, image_tags, size) in enumerate(zip(denses, tags, sizes, strict=True)):
            image_rgb = rgb(i) if self.config.crf and rgb is not None else None
            if self.config.crf and image_rgb is None:
                raise ValueError("the CRF needs the RGB images (rgb=...)")
            if self.config.method == "clses":
                out = self._clses(dense, list(image_tags), tuple(size), image_rgb, keep_cams)
            else:
                out = self._maskclip(dense, tuple(size))
            out.tag_output = tag_outputs[i]
            results.append(out)
        return results

    @torch.inference_mode()
    def _dense(self, images: Sequence[Tensor]) -> list[DenseOutput]:
        """Dense forwards (same-size images batched), one DenseOutput per image with pre_last."""
        out: list[DenseOutput | None] = [None] * len(images)
        for i, one in dense_per_image(self.backbone, images, self.tagclip.reference_compat, keep_pre_last=True):
            out[i] = one
        return out  # type: ignore[return-value]

    def seg_cams(self, dense: DenseOutput, tags: Sequence[int]) -> tuple[Tensor, Tensor]:
        """(raw normalised Grad-CAMs, normalised refined cams), each (K, gh, gw), for one image."""
        cfg = self.config
        grid = dense.grid
        k = len(tags)
        nf = self.vocab.num_classes
        rows = torch.tensor([*tags, *range(nf, nf + self.num_background)], dtype=torch.long, device=self.text.device)
        cams = grad_cams(self.backbone, dense.pre_last, self.text[rows], k, cfg.cam_batch)
        # Twice, as the reference (per target layer, then after averaging the one layer): with the
        # epsilon this matters when a cam's values are tiny (~1e-7, e.g. random weights).
        raw = normalise_cam(normalise_cam(cams, cfg.cam_eps), cfg.cam_eps)
        with torch.inference_mode():
            boxes = cam_box_masks(raw.cpu(), grid, cfg.box_threshold, cfg.reference_compat).to(raw.device)
            affinity = caa_affinity(dense.attn, self.layers)
            if cfg.reference_compat and cfg.affinity_power == 2:  # quirk Q4 (docs/algorithm.md §10)
                # The reference's float32 arithmetic and order (see caa_refine_squared).
                transition = caa_transition(affinity.float(), cfg.sinkhorn_rounds)
                refined = caa_refine_squared(raw.float(), transition, boxes)
            else:
                # float64: the refined cam is often nearly flat before its normalisation, which
                # would magnify float32 rounding in the Sinkhorn rounds and products into noise.
                transition = caa_transition(affinity.double(), cfg.sinkhorn_rounds)
                refined = caa_refine(raw.double(), transition, boxes, cfg.affinity_power)
            refined = normalise_cam(refined, cfg.cam_eps).float()
        return raw.reshape(k, *grid), refined.reshape(k, *grid)

    def _clses(
        self, dense: DenseOutput, tags: list[int], size: tuple[int, int], rgb: np.ndarray | None, keep_cams: bool
    ) -> SegOutput:
        cfg = self.config
        if dense.pre_last is None:
            raise ValueError("CLS-SEG needs the tokens entering the last block (keep_pre_last=True)")
        raw, refined = self.seg_cams(dense, tags)
        labels = [t + 1 for t in tags]
        saved = None
        with torch.inference_mode():
            if cfg.save_cams is not None:
                # docs/algorithm.md §8 step 11: the label map is made from the float16 values saved.
                saved = self._saved_cams(refined, size)
                label_map, scores = self._label_saved(saved, labels, size, rgb)
            elif rgb is not None:
                label_map, scores = crf_label_map(rgb, refined, labels, cfg)
            else:
                label_map, scores = label_map_from_cams(
                    refined, labels, size, cfg.background_power, cfg.normalise_after_resize, cfg.cam_eps,
                    cfg.label_background,
                )
        out = SegOutput(label_map, scores, tags, refined if keep_cams else None, raw if keep_cams else None)
        out.saved_cams = None if saved is None else saved.cpu().numpy()
        return out

    def _saved_cams(self, refined: Tensor, size: tuple[int, int]) -> Tensor:
        """The cams --save-cams writes, float16: (K, H, W) at the image size or (K, gh, gw)."""
        cfg = self.config
        if cfg.save_cams == "grid":
            return refined.half()
        up = resize_bilinear(refined, size)
        if cfg.normalise_after_resize:
            up = normalise_cam(up, cfg.cam_eps)
        return up.half()

    def _label_saved(
        self, saved: Tensor, labels: list[int], size: tuple[int, int], rgb: np.ndarray | None
    ) -> tuple[np.ndarray, dict[int, float]]:
        """The label map of float16 saved cams, by the rule `evaluate --cams` applies to the files."""
        cfg = self.config
        cams = saved.float()
        if cfg.save_cams == "grid":
            if rgb is not None:
                return crf_label_map(rgb, cams, labels, cfg)
            return label_map_from_cams(cams, labels, size, cfg.background_power, cfg.normalise_after_resize,
                                       cfg.cam_eps, cfg.label_background)
        if rgb is not None:
            return crf_label_map_upsampled(rgb, cams, labels, cfg)
        return label_map_from_upsampled(cams, labels, cfg.background_power, cfg.label_background)

    @torch.inference_mode()
    def _maskclip(self, dense: DenseOutput, size: tuple[int, int]) -> SegOutput:
        cfg = self.config
        nf = self.vocab.num_classes
        keys = None
        if cfg.key_smoothing:
            if dense.pre_last is None:
                raise ValueError("key smoothing needs the tokens entering the last block")
            keys = self.backbone.block_keys(self.backbone.num_layers - 1, dense.pre_last[None])[0, 1:]
        scores, probs = maskclip_scores(
            dense.tokens[1:], self.text, self.backbone.logit_scale, keys,
            cfg.prompt_denoising_threshold if cfg.prompt_denoising else None,
            cfg.key_smoothing_threshold if cfg.key_smoothing else None,
        )
        labels = [c + 1 if c < nf else 0 for c in range(scores.shape[1])]
        label_map, mask_scores = label_map_from_scores(scores, dense.grid, labels, size, probs)
        present = sorted(label - 1 for label in mask_scores)
        return SegOutput(label_map, mask_scores, present)

    @torch.inference_mode()
    def _dense_method(self, rgb: np.ndarray, size: tuple[int, int]) -> SegOutput:
        """A dense baseline on one (H, W, 3) uint8 image, label map at size (H, W) (docs/algorithm.md §12)."""
        settings = self.config.dense
        resized = keep_ratio_size(rgb.shape[0], rgb.shape[1], settings.short_side, settings.max_long)
        pixels = dense_pixels(rgb, resized, self.backbone.mean, self.backbone.std).to(self.backbone.device)
        logits = dense_logits(self.backbone, pixels, self.text, self.config.method, settings)
        logits = F.interpolate(logits[None], size=size, mode="bilinear", align_corners=False)[0]
        label_map, scores = dense_label_map(logits, self.query_class, self.vocab.num_classes + 1, settings)
        return SegOutput(label_map, scores, sorted(label - 1 for label in scores))
