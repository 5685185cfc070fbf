"""CLS-SEG: TagCLIP's tags fed to CLIP-ES (docs/algorithm.md §8, with its origami prompt, §7).

Pure tensor functions (shapes in the docstrings; N patches on a (gh, gw) grid, K tags of one image,
B background classes, L layers) plus `ClsSegSegments`, which runs them over batches, sharing one
dense forward per image with TagCLIP. The label rule and the CRF are cams.py's (`CamRule`, shared
with `evaluate --cams`); quirks Q2 and Q4 come from the run's `Quirks` (docs/algorithm.md §10).

Per image:
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
`CamRule.normalise_after_resize` for the other order).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from tagclip_cli.backbone import Backbone, DenseOutput, MapNeeds
from tagclip_cli.cams import (
    CAM_LAYOUTS,
    CamRule,
    crf_label_map,
    crf_label_map_upsampled,
    label_map_from_cams,
    label_map_from_upsampled,
    normalise_cam,
    require_crf,
    resize_bilinear,
)
from tagclip_cli.errors import UsageError
from tagclip_cli.methods.base import SETTINGS, SegOutput
from tagclip_cli.methods.registry import register
from tagclip_cli.methods.tagged import TaggedSegments
from tagclip_cli.quirks import Quirks
from tagclip_cli.tagclip import TagCLIPConfig, box_mask, layer_range
from tagclip_cli.vocab import Vocabulary

# CLS-SEG names classes with CLIP-ES's single template (docs/algorithm.md §7).
CLS_SEG_TEMPLATES = ("a clean origami {}.",)


@dataclass(frozen=True)
class ClsSegConfig:
    """Every knob of CLS-SEG, with the paper's (VOC) values as defaults.

    caa_layers: 1-based inclusive layer range averaged for CAA; a value <= 0 counts from L
    (0 = L, -1 = L-1), and the low end is clamped to 1. VOC: (-7, -1) = layers 5..11 of ViT-B;
    COCO: (-7, 0) = layers 5..12 (`ClsSegConfig.coco()`). rule: how cams become labels (and the
    CRF's parameters), what `evaluate --cams` reapplies."""

    caa_layers: tuple[int, int] = (-7, -1)
    box_threshold: float = 0.4  # CAA box mask: normalised cam above this (COCO 0.7)
    sinkhorn_rounds: int = 3  # column-then-row normalisations (1 + 2 more in the reference)
    affinity_power: int = 2  # the symmetrised affinity is squared once
    cam_batch: int = 16  # tags per vectorised backward (memory bound; all tags of most images at once)
    crf: bool = False
    rule: CamRule = CamRule()
    # COCO-Stuff (docs/algorithm.md §11): Grad-CAM's softmax over [tags + these names] instead of
    # the vocabulary's background set (and rule.label_background False: no background label).
    cam_background: tuple[str, ...] | None = None  # None = the background set TagCLIP uses
    # --save-cams: the refined cams kept (float16) at the image size ("image") or on the patch
    # grid ("grid"); the label map is then made from exactly the values saved, so that
    # `evaluate --cams` reproduces it (docs/algorithm.md §8 step 11).
    save_cams: str | None = None

    def __post_init__(self) -> None:
        if not 0.0 <= self.box_threshold <= 1.0:
            raise UsageError(f"box threshold {self.box_threshold} outside [0, 1]")
        if self.cam_batch < 1 or self.sinkhorn_rounds < 0 or self.affinity_power < 0:
            raise UsageError("cam_batch must be >= 1, sinkhorn_rounds and affinity_power >= 0")
        if self.save_cams not in (None, *CAM_LAYOUTS):
            raise UsageError(f"save_cams must be one of {', '.join(CAM_LAYOUTS)}, not '{self.save_cams}'")

    def layers_for(self, num_layers: int) -> tuple[int, int]:
        """The CAA layer range (1-based, inclusive) for a model with num_layers blocks (`layer_range`)."""
        return layer_range(self.caa_layers, num_layers, "CAA layers")

    @classmethod
    def coco(cls, **kw) -> ClsSegConfig:
        """The reference's COCO setting: CAA layers L-7..L and box threshold 0.7."""
        return cls(caa_layers=(-7, 0), box_threshold=0.7, **kw)

    @classmethod
    def coco_stuff(cls, **kw) -> ClsSegConfig:
        """The reference's COCO-Stuff setting (TagCLIP's CLIP-ES/generate_cams_cocostuff.py and
        eval_cam_cocostuff.py): the COCO CAA layers and box threshold, Grad-CAM against the one
        background name "background", and no background label (argmax over the tags alone)."""
        rule = dataclasses.replace(kw.pop("rule", CamRule()), label_background=False)
        return cls(caa_layers=(-7, 0), box_threshold=0.7, rule=rule, cam_background=("background",), **kw)

    @classmethod
    def for_setting(cls, setting: str, **kw) -> ClsSegConfig:
        """The voc, coco or cocostuff setting (docs/algorithm.md §11)."""
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


def caa_affinity(attn: Tensor, layers: tuple[int, int], first: int = 1) -> Tensor:
    """(N, N) mean of the patch-to-patch attention of 1-based layers lo..hi.

    attn: (K, 1+N, 1+N) head-averaged maps of one image, of layers first..first+K-1 (every layer
    by default; class-token row/column are dropped)."""
    lo, hi = layers
    return attn[lo - first : hi - first + 1, 1:, 1:].mean(dim=0)


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



# ---- batching -------------------------------------------------------------------------------------

class ClsSegSegments(TaggedSegments):
    """CLS-SEG on batches of preprocessed images with one backbone and vocabulary (see `TaggedSegments`
    for where the tags and the dense forward come from)."""

    def __init__(self, backbone: Backbone, vocab: Vocabulary, config: ClsSegConfig | None = None,
                 tagclip: TagCLIPConfig | None = None, quirks: Quirks | None = None, run_tagclip: bool = True) -> None:
        super().__init__(backbone, vocab, tagclip, quirks or Quirks(), run_tagclip)
        self.config = config or ClsSegConfig()
        self.needs_rgb = self.config.crf
        if self.config.crf:
            require_crf()
        background = vocab.background if self.tagclip.use_background else ()
        if self.config.cam_background is not None:  # COCO-Stuff: Grad-CAM against "background" only
            background = self.config.cam_background
        self.num_background = len(background)
        self.layers = self.config.layers_for(backbone.num_layers)
        # The origami template; foreground rows first, then background.
        self.text = backbone.text_classifier(tuple(vocab.seg_names) + tuple(background), CLS_SEG_TEMPLATES)

    def map_needs(self) -> MapNeeds:
        """CAA reads the maps of its own layer range (kept by the dense forward)."""
        return MapNeeds(keep=self.layers)

    def seg_cams(self, dense: DenseOutput, tags: list[int] | tuple[int, ...]) -> tuple[Tensor, Tensor]:
        """(raw normalised Grad-CAMs, normalised refined cams), each (K, gh, gw), for one image."""
        cfg = self.config
        eps = cfg.rule.cam_eps
        grid = dense.grid
        k = len(tags)
        nf = self.vocab.num_classes
        rows = torch.tensor([*tags, *range(nf, nf + self.num_background)], dtype=torch.long, device=self.text.device)
        cams = grad_cams(self.backbone, dense.pre_last, self.text[rows], k, cfg.cam_batch)
        # Twice, as the reference (per target layer, then after averaging the one layer): with the
        # epsilon this matters when a cam's values are tiny (~1e-7, e.g. random weights).
        raw = normalise_cam(normalise_cam(cams, eps), eps)
        with torch.inference_mode():
            boxes = cam_box_masks(raw.cpu(), grid, cfg.box_threshold, self.quirks.q2_clamp_box_ends).to(raw.device)
            affinity = caa_affinity(dense.maps(*self.layers), self.layers, self.layers[0])
            if self.quirks.q4_caa_float32 and cfg.affinity_power == 2:  # quirk Q4 (docs/algorithm.md §10)
                # The reference's float32 arithmetic and order (see caa_refine_squared).
                transition = caa_transition(affinity.float(), cfg.sinkhorn_rounds)
                refined = caa_refine_squared(raw.float(), transition, boxes)
            else:
                # float64: the refined cam is often nearly flat before its normalisation, which
                # would magnify float32 rounding in the Sinkhorn rounds and products into noise.
                transition = caa_transition(affinity.double(), cfg.sinkhorn_rounds)
                refined = caa_refine(raw.double(), transition, boxes, cfg.affinity_power)
            refined = normalise_cam(refined, eps).float()
        return raw.reshape(k, *grid), refined.reshape(k, *grid)

    def _one(self, dense: DenseOutput, tags: list[int], size: tuple[int, int], rgb: np.ndarray | None,
             keep_cams: bool) -> SegOutput:
        cfg = self.config
        rule = cfg.rule
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
                label_map, scores = crf_label_map(rgb, refined, labels, rule)
            else:
                label_map, scores = label_map_from_cams(
                    refined, labels, size, rule.background_power, rule.normalise_after_resize, rule.cam_eps,
                    rule.label_background,
                )
        out = SegOutput(label_map, scores, tags, refined if keep_cams else None, raw if keep_cams else None)
        out.saved_cams = None if saved is None else saved.cpu().numpy()
        return out

    def _saved_cams(self, refined: Tensor, size: tuple[int, int]) -> Tensor:
        """The cams --save-cams writes, float16: (K, H, W) at the image size or (K, gh, gw)."""
        if self.config.save_cams == "grid":
            return refined.half()
        up = resize_bilinear(refined, size)
        if self.config.rule.normalise_after_resize:
            up = normalise_cam(up, self.config.rule.cam_eps)
        return up.half()

    def _label_saved(
        self, saved: Tensor, labels: list[int], size: tuple[int, int], rgb: np.ndarray | None
    ) -> tuple[np.ndarray, dict[int, float]]:
        """The label map of float16 saved cams, by the rule `evaluate --cams` applies to the files."""
        rule = self.config.rule
        cams = saved.float()
        if self.config.save_cams == "grid":
            if rgb is not None:
                return crf_label_map(rgb, cams, labels, rule)
            return label_map_from_cams(cams, labels, size, rule.background_power, rule.normalise_after_resize,
                                       rule.cam_eps, rule.label_background)
        if rgb is not None:
            return crf_label_map_upsampled(rgb, cams, labels, rule)
        return label_map_from_upsampled(cams, labels, rule.background_power, rule.label_background)


# ---- the method -----------------------------------------------------------------------------------

class ClsSeg:
    """The `Method` of CLS-SEG (the paper's segmenter)."""

    name = "clses"
    kind = "masks"
    summary = "CLS-SEG: TagCLIP tags -> CLIP-ES (Grad-CAM + class-aware attention affinity), the paper's"
    needs_tags = True
    needs_rgb = False  # only with the CRF (ClsSegSegments.needs_rgb)
    options = frozenset({"crf", "save_cams"})
    settings = SETTINGS

    def config(self, setting: str = "voc", **options) -> ClsSegConfig:
        """The setting's CAA values; options: crf (bool), save_cams ("image" | "grid")."""
        return ClsSegConfig.for_setting(setting, **options)

    def build(self, backbone: Backbone, vocab: Vocabulary, config: ClsSegConfig, *, quirks: Quirks,
              tagclip: TagCLIPConfig | None = None, run_tagclip: bool = True) -> ClsSegSegments:
        return ClsSegSegments(backbone, vocab, config, tagclip, quirks, run_tagclip)

    def record(self, config: ClsSegConfig, quirks: Quirks) -> dict:
        from tagclip_cli.methods.record import legacy_record

        return legacy_record(self.name, quirks, clses=config)


CLS_SEG = register(ClsSeg())
