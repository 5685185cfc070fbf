"""PIAA (Wang et al., ICML 2026): a tagger that learns from the unlabelled collection it tags
(docs/algorithm.md §13).

Pure tensor functions (shapes in the docstrings: N patches, D embedding width, C classes, B images,
P patches per image, K bank size) plus `PatchBank`, the bounded memory of the fit. No labels are
used anywhere.

Fit, over every image of a collection (224 x 224 centre crop, `crop_pixels`):
1. the dense variant's (SCLIP by default) final projected patch tokens, L2-normalised (f);
   per patch p = softmax(60 f t^T) over the class prompts t, its entropy H(p) and its argmax;
2. per class the K = 512 patches of lowest entropy among all patches of that argmax
   (`PatchBank`: an exact top-K of the union, so banks of parts of the collection merge exactly);
3. a Gaussian discriminant on the bank (`discriminant`): soft-weighted class means (a class
   without patches takes its text embedding), one shared covariance, shrunk and pseudo-inverted,
   a uniform prior -> W (D, C), b (C,);
4. refinement (`refine`): q = softmax(T (f W + b)); patches grouped by the argmax of f W + b, kept
   where their own q is at least the group's mean + std; the discriminant refitted on the kept
   patches, regrouped by q's argmax and weighted by q.

Score (`piaa_scores`): 0.1 softmax(alpha cos(class token, t)) + 0.9 softmax(beta max_patches
softmax((f W + b) / 500)).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

from tagclip_cli.backbone import Backbone
from tagclip_cli.errors import UsageError
from tagclip_cli.methods.dense import DenseMethod, dense_tokens
from tagclip_cli.methods.registry import get as get_method
from tagclip_cli.tagclip import tags_from_scores
from tagclip_cli.vocab import Vocabulary

log = logging.getLogger(__name__)

PIAA_TEMPLATES = ("a photo of a {}",)
PIAA_SETTINGS = ("voc", "coco", "nus")


@dataclass(frozen=True)
class PiaaConfig:
    """Every constant of PIAA, with the authors' VOC values as defaults (`PiaaConfig.published`).

    dense: the dense variant whose last-block patch tokens are the patch features; text_scale:
    the fit's patch softmax scale; bank_size: K patches kept per class; refine_temperature: T of
    the refinement's q; image_scale: alpha of the class-token branch; patch_temperature: the
    divisor of the discriminant logits per patch; patch_scale: beta of the patch branch;
    image_weight: the class-token branch's share of the final score; input_size: the square crop;
    entropy_floor: probabilities are clamped to it inside the log of the entropy;
    keep_singleton_groups: the refinement keeps a group of one patch (False, as the authors: it is
    dropped, its class falls back to its text embedding; docs/algorithm.md §10 Q5); tag_threshold /
    class_thresholds: the tag rule (docs/algorithm.md §13, the same rule as TagCLIP's §6)."""

    dense: str = "sclip"
    text_scale: float = 60.0
    bank_size: int = 512
    refine_temperature: float = 100.0
    image_scale: float = 80.0
    patch_temperature: float = 500.0
    patch_scale: float = 200.0
    image_weight: float = 0.1
    input_size: int = 224
    entropy_floor: float = 1e-10
    keep_singleton_groups: bool = False
    tag_threshold: float = 0.5
    class_thresholds: tuple[float, ...] | None = None

    def __post_init__(self) -> None:
        if self.bank_size < 1 or self.input_size < 1:
            raise UsageError("PIAA: bank_size and input_size must be >= 1")
        if not 0.0 <= self.image_weight <= 1.0:
            raise UsageError("PIAA: image_weight must be in [0, 1]")

    @classmethod
    def published(cls, setting: str, **kw) -> PiaaConfig:
        """The authors' values for a dataset setting: voc, coco or nus (docs/algorithm.md §13)."""
        if setting not in PUBLISHED_PIAA:
            raise UsageError(f"PIAA has no published setting '{setting}' (choose from {', '.join(PIAA_SETTINGS)})")
        return cls(**{**PUBLISHED_PIAA[setting], **kw})


# The authors' learn.py / test.py values per dataset (ViT-B/16); unset keys keep the VOC defaults.
PUBLISHED_PIAA: dict[str, dict] = {
    "voc": {},
    "coco": {"refine_temperature": 0.01, "patch_scale": 400.0},
    "nus": {"refine_temperature": 500.0, "image_scale": 10.0, "patch_scale": 400.0},
}

# The authors' prompt names for the classes of our built-in vocabularies whose names differ.
PIAA_VOC_NAMES = {"diningtable": "dining table", "pottedplant": "potted plant", "tvmonitor": "tv monitor"}
PIAA_COCO_NAMES = {
    "motorbike": "motorcycle", "aeroplane": "airplane", "sofa": "couch", "pottedplant": "potted plant",
    "diningtable": "dining table", "tvmonitor": "tv",
}


def prompt_names(classes: tuple[str, ...], builtin: str | None) -> tuple[str, ...]:
    """The names PIAA prompts with: the authors' names for the built-in voc / coco vocabularies,
    else the class names as written."""
    table = {"voc": PIAA_VOC_NAMES, "coco": PIAA_COCO_NAMES}.get(builtin or "", {})
    return tuple(table.get(name, name) for name in classes)


# ---- preprocessing --------------------------------------------------------------------------------

def crop_pixels(rgb: np.ndarray, size: int, mean: tuple[float, ...], std: tuple[float, ...]) -> Tensor:
    """(3, size, size) float32 normalised crop of an (H, W, 3) uint8 RGB image, as CLIP's own
    transform: the short side resized to size with PIL's bicubic filter (the long side
    int(size * long / short)), the centre crop (offsets rounded), then (x / 255 - mean) / std."""
    height, width = rgb.shape[:2]
    short, long = min(height, width), max(height, width)
    new_long = int(size * long / short)
    new_h, new_w = (size, new_long) if height <= width else (new_long, size)
    image = Image.fromarray(np.ascontiguousarray(rgb))
    if (new_h, new_w) != (height, width):
        image = image.resize((new_w, new_h), Image.BICUBIC)
    top, left = int(round((new_h - size) / 2.0)), int(round((new_w - size) / 2.0))
    image = image.crop((left, top, left + size, top + size))
    arr = torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1).float().div(255)
    return arr.sub(torch.tensor(mean)[:, None, None]).div(torch.tensor(std)[:, None, None])


# ---- the fit: per-patch confidence and the bank -----------------------------------------------------

def patch_confidence(
    features: Tensor, text: Tensor, scale: float, floor: float = 1e-10
) -> tuple[Tensor, Tensor, Tensor]:
    """For L2-normalised patch features (N, D) and class prompts (C, D): probabilities
    p = softmax(scale f t^T) (N, C), their entropies -sum p log(max(p, floor)) (N,) and the
    argmax class of f t^T (N,) long."""
    logits = features @ text.T
    probs = (logits * scale).softmax(dim=-1)
    entropy = -(probs * probs.clamp_min(floor).log()).sum(dim=-1)
    return probs, entropy, logits.argmax(dim=-1)


@dataclass
class PatchBank:
    """Per class, the `size` patches of lowest entropy among all patches added with that class:
    features (M, D), entropy (M,), weight (M,) (the patch's probability of its class), label (M,)
    long (its class) and key (M,) long (a unique id of the patch in the collection: image index x
    patches per image + patch). Patches are ordered by (entropy, key), so ties are broken by key and
    the bank is a function of the set of patches added: adding in any order or chunking, or merging
    the banks of any split of the collection, gives the same bank (M <= C x size rows), sorted by
    (label, entropy, key)."""

    size: int
    features: Tensor
    entropy: Tensor
    weight: Tensor
    label: Tensor
    key: Tensor

    @classmethod
    def empty(cls, size: int, dim: int) -> PatchBank:
        return cls(size, torch.zeros(0, dim), torch.zeros(0), torch.zeros(0), torch.zeros(0, dtype=torch.long),
                   torch.zeros(0, dtype=torch.long))

    def __len__(self) -> int:
        return int(self.label.shape[0])

    def add(self, features: Tensor, entropy: Tensor, weight: Tensor, label: Tensor, key: Tensor) -> None:
        """Offer patches (N, D), (N,), (N,), (N,), (N,) (keys unique and new); keep the top `size`
        per class."""
        self.features = torch.cat([self.features, features.float().cpu()])
        self.entropy = torch.cat([self.entropy, entropy.float().cpu()])
        self.weight = torch.cat([self.weight, weight.float().cpu()])
        self.label = torch.cat([self.label, label.long().cpu()])
        self.key = torch.cat([self.key, key.long().cpu()])
        self._select()

    def merge(self, other: PatchBank) -> None:
        """Merge another bank (of the same size) into this one: the top `size` of the union."""
        self.add(other.features, other.entropy, other.weight, other.label, other.key)

    def _select(self) -> None:
        order = torch.argsort(self.key, stable=True)
        order = order[torch.argsort(self.entropy[order], stable=True)]
        order = order[torch.argsort(self.label[order], stable=True)]
        label = self.label[order]
        starts = torch.searchsorted(label, label, right=False)  # first row of each row's class
        keep = order[(torch.arange(len(label)) - starts) < self.size]
        for name in ("features", "entropy", "weight", "label", "key"):
            setattr(self, name, getattr(self, name)[keep])

    def state(self) -> dict[str, Tensor]:
        """The bank as named tensors (for a file); `from_state` reads it back."""
        return {"features": self.features, "entropy": self.entropy, "weight": self.weight, "label": self.label,
                "key": self.key, "size": torch.tensor(self.size)}

    @classmethod
    def from_state(cls, state: dict[str, Tensor]) -> PatchBank:
        return cls(int(state["size"]), state["features"], state["entropy"], state["weight"], state["label"],
                   state["key"])


def offer_patches(bank: PatchBank, features: Tensor, text: Tensor, config: PiaaConfig, keys: Tensor) -> None:
    """Add the patches of a batch to the bank: features (B, P, D) raw patch tokens (L2-normalised
    here), keys (B, P) long, their unique ids."""
    flat = F.normalize(features.float(), dim=-1).reshape(-1, features.shape[-1])
    probs, entropy, label = patch_confidence(flat, text.to(flat), config.text_scale, config.entropy_floor)
    weight = probs.gather(1, label[:, None])[:, 0]
    bank.add(flat, entropy, weight, label, keys.reshape(-1))


# ---- the fit: discriminant and refinement ---------------------------------------------------------

def class_means(features: Tensor, groups: Tensor, weights: Tensor, text: Tensor) -> Tensor:
    """(C, D) weighted means: class c's mean is sum w x / sum w over its patches (features (N, D),
    groups (N,) long, weights (N,)); a class without patches takes its text embedding text[c]."""
    means = text.to(features).clone()
    for c in groups.unique().tolist():
        members = groups == c
        w = weights[members][:, None]
        means[c] = (w * features[members]).sum(dim=0) / w.sum()
    return means


def shared_precision(centred: Tensor) -> Tensor:
    """(D, D) shrunk precision of centred vectors (N, D), N >= 2: D pinv(S + tr(S / (N - 1)) I),
    S = (N - 1) x their sample covariance (the scatter about their own mean)."""
    n, dim = centred.shape
    if n < 2:
        raise UsageError("PIAA: the fit needs at least 2 patches")
    cov = centred.T.cov()
    return dim * torch.linalg.pinv((n - 1) * cov + cov.trace() * torch.eye(dim, dtype=cov.dtype, device=cov.device))


def discriminant(features: Tensor, groups: Tensor, weights: Tensor, text: Tensor) -> tuple[Tensor, Tensor]:
    """Gaussian discriminant with a shared covariance and a uniform prior over the C classes of
    text (C, D), fitted on features (N, D) in classes groups (N,) long with weights (N,):
    W (D, C) = (mu P)^T and b (C,) = log(1 / C) - mu_c P mu_c / 2, mu = `class_means`,
    P = `shared_precision` of each patch minus its class mean."""
    means = class_means(features, groups, weights, text)
    precision = shared_precision(features - means[groups])
    num_classes = text.shape[0]
    weight = (means @ precision).T
    bias = math.log(1.0 / num_classes) - torch.einsum("cd,de,ce->c", means, precision, means) / 2
    return weight, bias


def refine(features: Tensor, weight: Tensor, bias: Tensor, temperature: float,
           drop_singletons: bool = True) -> tuple[Tensor, Tensor]:
    """The refinement's selection: q = softmax(T (f W + b)) (N, C); patches grouped by the argmax
    of f W + b; a patch is kept (N,) bool where its group's q is >= the mean + the sample std of
    that q over the group (compared in float32, the threshold summed in float64). A group of one
    patch has no spread: drop_singletons (the default, as the authors, whose sample std of one value
    is NaN) drops it, else it is kept (std 0) (docs/algorithm.md §10 Q5)."""
    logits = features @ weight + bias
    q = (logits * temperature).softmax(dim=-1)
    groups = logits.argmax(dim=-1)
    own = q.gather(1, groups[:, None])[:, 0]
    keep = torch.zeros_like(groups, dtype=torch.bool)
    for c in groups.unique().tolist():
        members = groups == c
        values = own[members]
        if len(values) == 1:  # Q5: no spread to compare with; the authors' NaN std drops the patch
            keep[members] = not drop_singletons
            continue
        threshold = (values.mean().double() + values.std().double()).float()
        keep[members] = values >= threshold
    return keep, q


@dataclass(frozen=True)
class PiaaModel:
    """A fitted PIAA discriminant: weight (D, C), bias (C,)."""

    weight: Tensor
    bias: Tensor

    def state(self) -> dict[str, Tensor]:
        return {"weight": self.weight.contiguous(), "bias": self.bias.contiguous()}

    @classmethod
    def from_state(cls, state: dict[str, Tensor]) -> PiaaModel:
        return cls(state["weight"].float(), state["bias"].float())


def fit(bank: PatchBank, text: Tensor, config: PiaaConfig) -> PiaaModel:
    """The discriminant of a filled bank, refined once (steps 3-4 of the module docstring); text
    (C, D) L2-normalised class prompts."""
    if len(bank) < 2:
        raise UsageError("PIAA: the fit needs at least 2 patches (is the collection empty?)")
    text = text.float().cpu()
    features = bank.features
    weight, bias = discriminant(features, bank.label, bank.weight, text)
    keep, q = refine(features, weight, bias, config.refine_temperature, not config.keep_singleton_groups)
    if keep.sum() < 2:  # nothing to refit on (the reference would fit NaNs): keep the first fit
        log.warning("PIAA: the refinement kept %d patch(es); the unrefined discriminant is used", int(keep.sum()))
        return PiaaModel(weight, bias)
    q = q[keep]
    groups = q.argmax(dim=-1)
    weight, bias = discriminant(features[keep], groups, q.gather(1, groups[:, None])[:, 0], text)
    return PiaaModel(weight, bias)


# ---- scoring --------------------------------------------------------------------------------------

def tempered_softmax(logits: Tensor, temperature: float) -> Tensor:
    """softmax(logits / temperature) over the last dim, as exp((x - max x) / T) normalised."""
    z = torch.exp((logits - logits.amax(dim=-1, keepdim=True)) / temperature)
    return z / z.sum(dim=-1, keepdim=True)


def piaa_scores(image_embeddings: Tensor, patch_features: Tensor, text: Tensor, model: PiaaModel,
                config: PiaaConfig) -> Tensor:
    """Final scores (B, C) of B images: class-token embeddings (B, D) and patch tokens (B, P, D)
    (both normalised here), text (C, D). image = softmax(alpha cos(cls, t)); patch =
    softmax(beta max_p tempered_softmax(f_p W + b, patch_temperature)); the mix
    image_weight x image + (1 - image_weight) x patch."""
    text = text.to(image_embeddings)
    image = (F.normalize(image_embeddings.float(), dim=-1) @ text.T * config.image_scale).softmax(dim=-1)
    patches = F.normalize(patch_features.float(), dim=-1)
    logits = patches @ model.weight.to(patches) + model.bias.to(patches)
    best = tempered_softmax(logits, config.patch_temperature).amax(dim=1)
    patch = (best * config.patch_scale).softmax(dim=-1)
    return config.image_weight * image + (1 - config.image_weight) * patch


# ---- batching -------------------------------------------------------------------------------------

class Piaa:
    """PIAA on one backbone and vocabulary: the class prompts, the patch features of crops, filling a
    bank, fitting and scoring. builtin: the name of a built-in vocabulary (voc, coco) for the
    authors' prompt names.
    The dense variant's last-block attention takes its published VOC settings (only NACLIP's
    neighbourhood width is read, the same in every setting)."""

    def __init__(self, backbone: Backbone, vocab: Vocabulary, config: PiaaConfig, builtin: str | None = None) -> None:
        self.backbone, self.vocab, self.config = backbone, vocab, config
        dense = get_method(config.dense, "masks")
        if not isinstance(dense, DenseMethod):
            raise UsageError(f"PIAA: --dense must be a dense variant (sclip, clearclip, naclip), not '{config.dense}'")
        self.dense = dense
        self.prompts = prompt_names(vocab.classes, builtin)
        self.text = backbone.text_classifier(self.prompts, PIAA_TEMPLATES).float()

    def crop(self, rgb: np.ndarray) -> Tensor:
        """`crop_pixels` of one (H, W, 3) uint8 image with the model's constants: (3, S, S)."""
        return crop_pixels(rgb, self.config.input_size, self.backbone.mean, self.backbone.std)

    @torch.inference_mode()
    def patch_features(self, crops: Tensor) -> Tensor:
        """The dense variant's projected patch tokens (B, P, D) of crops (B, 3, S, S)."""
        return dense_tokens(self.backbone, crops.to(self.backbone.device), self.dense, self.dense.published["voc"])

    def offer(self, bank: PatchBank, crops: Tensor, indices: Tensor) -> None:
        """Offer the patches of crops (B, 3, S, S) of collection items indices (B,) long to bank."""
        features = self.patch_features(crops)
        patches = features.shape[1]
        keys = indices.long()[:, None].cpu() * patches + torch.arange(patches)
        offer_patches(bank, features.cpu(), self.text.cpu(), self.config, keys)

    def new_bank(self) -> PatchBank:
        return PatchBank.empty(self.config.bank_size, self.backbone.embed_dim)

    def fit(self, bank: PatchBank) -> PiaaModel:
        return fit(bank, self.text.cpu(), self.config)

    @torch.inference_mode()
    def score(self, crops: Tensor, model: PiaaModel) -> Tensor:
        """Final scores (B, C) on the CPU of crops (B, 3, S, S)."""
        crops = crops.to(self.backbone.device)
        cls = self.backbone.encode_image(crops)
        return piaa_scores(cls.cpu(), self.patch_features(crops).cpu(), self.text.cpu(), model, self.config)

    def tags(self, scores: Tensor) -> list[list[int]]:
        """Each row's tags (docs/algorithm.md §13: §6's rule on the final scores (B, C))."""
        threshold = (torch.tensor(self.config.class_thresholds) if self.config.class_thresholds is not None
                     else self.config.tag_threshold)
        return [tags_from_scores(row, threshold) for row in scores]
