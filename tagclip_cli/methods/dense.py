"""What the dense baselines SCLIP, ClearCLIP and NACLIP share (docs/algorithm.md §12): their
inference settings, query names, the keep-ratio resize, sliding windows, the window average of
cosine logits and the per-pixel label rule, and `DenseMethod`, the base of the three method
modules (sclip.py, clearclip.py, naclip.py), each of which gives only its last-block attention,
its published settings and its query names.

Shapes: Q text queries, (h, w) the resized image, (H, W) the original image.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from tagclip_cli.backbone import Backbone, imagenet_templates
from tagclip_cli.backbone.encoder import LastBlockAttention
from tagclip_cli.cams import _mean_by_label
from tagclip_cli.errors import UsageError
from tagclip_cli.methods.base import SETTINGS, SegOutput
from tagclip_cli.quirks import Quirks
from tagclip_cli.tagclip import TagCLIPConfig
from tagclip_cli.vocab import Vocabulary, load_vocabulary


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
        """The authors' VOC21 ("voc") or COCO-Object ("coco") configuration of a dense method."""
        from tagclip_cli.methods.registry import get

        found = get(method)
        if not isinstance(found, DenseMethod) or setting not in found.published:
            raise UsageError(f"no published settings for method '{method}', setting '{setting}'")
        return found.published[setting]


# The renames both query sets make, per built-in vocabulary (class name -> the authors' names).
VOC_RENAMES = {"boat": ("ship",), "diningtable": ("table",)}
COCO_RENAMES = {
    "motorbike": ("motorcycle",), "aeroplane": ("airplane",), "sofa": ("couch",),
    "pottedplant": ("potted plant",), "diningtable": ("dining table",), "tvmonitor": ("tv",),
}


@dataclass(frozen=True)
class DenseConfig:
    """A dense baseline's config: its settings for one dataset setting (`DenseMethod.published`)."""

    settings: DenseSettings
    setting: str = "voc"  # the dataset setting it was made for (the run record lists it)


@dataclass(frozen=True, eq=False)
class DenseMethod:
    """The `Method` of a dense baseline, declared by its module: name, summary, attention_for
    (settings -> the last block's mixing weights, `encoder.LastBlockAttention`), keep_residual (the
    last block keeps its residual and MLP), published ({setting: DenseSettings}),
    background_queries and query_tables ({"voc" | "coco": {class: names}}), config_type."""

    name: str
    summary: str
    attention_for: Callable[[DenseSettings], LastBlockAttention]
    keep_residual: bool
    published: dict[str, DenseSettings]
    background_queries: tuple[str, ...]
    query_tables: dict[str, dict[str, tuple[str, ...]]]
    config_type: type[DenseConfig] = DenseConfig
    kind: str = "masks"
    needs_tags: bool = False
    needs_rgb: bool = True  # resizes the RGB image itself
    options: frozenset[str] = frozenset({"rcs"})  # --rcs: ResCLIP on this method (methods/resclip.py)
    settings: tuple[str, ...] = SETTINGS

    def attention(self, settings: DenseSettings) -> LastBlockAttention:
        """The last block's mixing weights (`encoder.AttentionInputs` -> (B, h, T, T))."""
        return self.attention_for(settings)

    def window_tokens(self, backbone: Backbone, crops: Tensor, text: Tensor, settings: DenseSettings) -> Tensor:
        """Projected patch tokens (B, N, D) fp32 of windows crops (B, 3, H, W) (`dense_tokens`; a
        method that needs more than a changed last-block attention, e.g. the queries' text (Q, D),
        has its own, as ResCLIP and SC-CLIP)."""
        return dense_tokens(backbone, crops, self, settings)

    def config(self, setting: str = "voc", rcs: bool = False, **options) -> DenseConfig:
        """The published settings of setting; "cocostuff" has none and takes VOC's. rcs: ResCLIP
        on this method instead (its `resclip.ResClipConfig`, docs/algorithm.md §14)."""
        if setting not in self.settings:
            raise UsageError(f"unknown setting '{setting}' (choose from {', '.join(self.settings)})")
        if rcs:
            from tagclip_cli.methods.resclip import resclip_config

            return resclip_config(self.name, setting, **options)  # type: ignore[return-value]
        return self.config_type(self.published.get(setting, self.published["voc"]), setting, **options)

    def build(self, backbone: Backbone, vocab: Vocabulary, config: DenseConfig, *, quirks: Quirks,
              tagclip: TagCLIPConfig | None = None, run_tagclip: bool = True) -> DenseSegments:
        if not isinstance(config, DenseConfig):  # --rcs: ResCLIP on this method
            return _resclip().build(backbone, vocab, config, quirks=quirks, tagclip=tagclip)
        use_background = (tagclip or TagCLIPConfig()).use_background
        return DenseSegments(backbone, vocab, self, config.settings, use_background)

    def record(self, config: DenseConfig, quirks: Quirks) -> dict:
        from tagclip_cli.methods.record import legacy_record

        if not isinstance(config, DenseConfig):  # --rcs
            return _resclip().record(config, quirks)
        return legacy_record(self.name, quirks, setting=config.setting, dense=asdict(config.settings))


def _resclip():
    from tagclip_cli.methods.registry import get

    return get("resclip")


# ---- pure functions -------------------------------------------------------------------------------

def _builtin_classes(name: str) -> tuple[str, ...]:
    return load_vocabulary(name).classes


def dense_queries(method: str | DenseMethod, vocab: Vocabulary, use_background: bool = True,
                  source: str = "published") -> tuple[tuple[str, ...], tuple[int, ...]]:
    """The text queries of a dense baseline and the class of each: (names (Q,), class (Q,)) with
    class 0 = background and c + 1 = vocabulary class c.

    source "published": for the built-in voc and coco vocabularies, the authors' names (the
    method's `query_tables` and `background_queries`). Any other vocabulary, or source
    "vocabulary": one query per class name, the vocabulary's background names for the
    background. use_background False drops the background queries."""
    if isinstance(method, str):
        from tagclip_cli.methods.registry import get

        method = get(method)  # type: ignore[assignment]
    table: dict[str, tuple[str, ...]] | None = None
    background: tuple[str, ...] = tuple(vocab.background)
    if source == "published":
        for builtin in ("voc", "coco"):
            if vocab.classes == _builtin_classes(builtin):
                table = method.query_tables[builtin]
                background = method.background_queries
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


def dense_tokens(backbone: Backbone, pixels: Tensor, method: DenseMethod, settings: DenseSettings) -> Tensor:
    """Projected patch tokens (B, N, D) fp32 of normalised images (B, 3, H, W) under the method's
    last block (`Backbone.custom_last_block_forward`, bicubic positional embedding)."""
    return backbone.custom_last_block_forward(pixels, method.attention(settings), method.keep_residual).tokens


def dense_logits(
    backbone: Backbone, pixels: Tensor, text: Tensor, method: DenseMethod, settings: DenseSettings, chunk: int = 16
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
        tokens = method.window_tokens(backbone, crops, text, settings)  # (B, n, D)
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

class DenseSegments:
    """A dense baseline on one backbone and vocabulary: per image, from its RGB pixels, the
    keep-ratio resize, the window-averaged logits of its queries (with the 80 ImageNet templates)
    and the label rule. Runs no TagCLIP (tagger None)."""

    needs_rgb = True
    tagger = None

    def __init__(self, backbone: Backbone, vocab: Vocabulary, method: DenseMethod, settings: DenseSettings,
                 use_background: bool = True) -> None:
        self.backbone = backbone
        self.vocab = vocab
        self.method = method
        self.settings = settings
        names, index = dense_queries(method, vocab, use_background, settings.queries)
        self.query_class = torch.tensor(index, dtype=torch.long)
        self.text = backbone.text_classifier(names, imagenet_templates())

    def segment(
        self, images: Sequence[Tensor], sizes: Sequence[tuple[int, int]], tags: Sequence[Sequence[int]] | None = None,
        rgb: Callable[[int], np.ndarray] | None = None, keep_cams: bool = False,
    ) -> list[SegOutput]:
        """One SegOutput per image from rgb(i) (the normalised images are not used)."""
        if rgb is None:
            raise ValueError(f"{self.method.name} resizes the RGB images itself (rgb=...)")
        return [self._one(rgb(i), tuple(size)) for i, size in enumerate(sizes)]

    @torch.inference_mode()
    def _one(self, rgb: np.ndarray, size: tuple[int, int]) -> SegOutput:
        """One (H, W, 3) uint8 image, label map at size (H, W) (docs/algorithm.md §12)."""
        settings = self.settings
        resized = keep_ratio_size(rgb.shape[0], rgb.shape[1], settings.short_side, settings.max_long)
        pixels = dense_pixels(rgb, resized, self.backbone.mean, self.backbone.std).to(self.backbone.device)
        logits = dense_logits(self.backbone, pixels, self.text, self.method, settings)
        logits = F.interpolate(logits[None], size=size, mode="bilinear", align_corners=False)[0]
        label_map, scores = dense_label_map(logits, self.query_class, self.vocab.num_classes + 1, settings)
        return SegOutput(label_map, scores, sorted(label - 1 for label in scores))
