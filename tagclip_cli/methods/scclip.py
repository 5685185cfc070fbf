"""SC-CLIP (Bai et al., 2024: self-calibrated CLIP), a training-free segmenter (docs/algorithm.md
§15). Pure tensor functions (shapes in the docstrings: B windows, N = gh * gw patches, W width, h
heads of d channels, D the projected dimension), then the method.

Per window, with the tokens leaving blocks 1..L-1 (ViT-B/16 layer numbers, 1-based):
1. the patch tokens leaving layer 11 (the last block's input) and layer 9 have their outliers
   replaced: the top 5% of a local-outlier score over the layer-11 patches (30 neighbours,
   `outlier_mask`), each replaced by the mean of its non-outlier 3x3 neighbours
   (`replace_outliers`); the class token leaving layer 11 is kept aside;
2. the layer-11 patches are aggregated by the layer-9 cosine similarity, zeroed below 0.4 and
   row-normalised (`aggregate`);
3. the last block without residual or MLP on the patches alone, its attention the mean of
   softmax of 3 (S - mean S) with negatives masked (S the layer-9 similarity) and softmax(s k k^T)
   (`scclip_attention`), plus 0.3 times the class token;
4. aggregated again by the layer-4 similarity (same rule);
5. multi-level fusion: the tokens of layers 4-10 summed, their patches through the same
   last-block attention plus 0.3 times their summed class token, aggregated by the layer-4
   similarity, added; then ln_post and proj.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

from tagclip_cli.backbone import Backbone
from tagclip_cli.backbone.encoder import AttentionInputs, LastBlockAttention
from tagclip_cli.errors import UsageError
from tagclip_cli.methods.base import SETTINGS
from tagclip_cli.methods.dense import DenseSegments, DenseSettings
from tagclip_cli.methods.registry import register
from tagclip_cli.methods.sclip import SCENE_BACKGROUND, SCLIP_COCO_QUERIES, SCLIP_VOC_QUERIES
from tagclip_cli.quirks import Quirks
from tagclip_cli.tagclip import TagCLIPConfig
from tagclip_cli.vocab import Vocabulary


@dataclass(frozen=True)
class ScClipSettings:
    """SC-CLIP's constants (the authors' ViT-B/16 config), layers 1-based (clamped to L-1 on
    smaller models): pre_layer 9 (outliers replaced, similarity before the last block), post_layer
    4 (similarity after it), multi_layers 4-10 (fused), res_cls 0.3 (class token added), beta 0.4
    (similarities below it zeroed), attn_scale 3 (factor of the centred similarity),
    lof_neighbours 30 and lof_share 0.05 (the outliers' share)."""

    pre_layer: int = 9
    post_layer: int = 4
    multi_layers: tuple[int, int] = (4, 10)
    res_cls: float = 0.3
    beta: float = 0.4
    attn_scale: float = 3.0
    lof_neighbours: int = 30
    lof_share: float = 0.05

    def __post_init__(self) -> None:
        if min(self.pre_layer, self.post_layer, *self.multi_layers) < 1 or self.multi_layers[0] > self.multi_layers[1]:
            raise UsageError("SC-CLIP: layers must be >= 1 and multi_layers lo <= hi")
        if self.lof_neighbours < 1 or not 0 < self.lof_share < 1:
            raise UsageError("SC-CLIP: lof_neighbours >= 1 and 0 < lof_share < 1")

    def indices_for(self, num_layers: int) -> tuple[int, int, tuple[int, ...]]:
        """0-based (pre, post, multi) block indices on a model of num_layers blocks (at most L-2,
        the block before the last)."""
        top = num_layers - 2
        lo, hi = (min(v - 1, top) for v in self.multi_layers)
        return min(self.pre_layer - 1, top), min(self.post_layer - 1, top), tuple(range(lo, hi + 1))


# From the authors' configs (cfg_voc21, cfg_coco_object; the segmentor's 224 / 112 windows).
SCCLIP_DENSE = {
    "voc": DenseSettings(short_side=336, crop=224, stride=112, logit_scale=50, prob_threshold=0.15,
                         area_threshold=0.1),
    "coco": DenseSettings(short_side=336, crop=224, stride=112, logit_scale=55, prob_threshold=0.35),
}


@dataclass(frozen=True)
class ScClipConfig:
    """SC-CLIP's dense inference settings and its own constants."""

    settings: DenseSettings = field(default_factory=lambda: SCCLIP_DENSE["voc"])
    scclip: ScClipSettings = field(default_factory=ScClipSettings)
    setting: str = "voc"


# ---- pure functions ---------------------------------------------------------------------------

def lof_scores(x: Tensor, neighbours: int = 30, chunk: int = 1 << 23) -> Tensor:
    """SC-CLIP's local-outlier score (N,) of points x (N, W): with d the squared Euclidean
    distances and kNN(i) the `neighbours` nearest other points (the nearest point, itself, dropped;
    at most N - 1), reach(i, j) = max(d(i, j), kdist(i)) with kdist(i) the distance to the last of
    them, lrd(i) = k / mean_j reach(i, j), score(i) = mean over kNN(i) of lrd(j) / lrd(i)."""
    n = x.shape[0]
    k = min(neighbours, n - 1)
    rows = max(1, chunk // max(1, n * x.shape[1]))
    dist = torch.cat([torch.norm(x[i : i + rows, None] - x[None], dim=2, p=2) ** 2 for i in range(0, n, rows)])
    knn, idx = torch.topk(dist, k=k + 1, largest=False)
    knn, idx = knn[:, 1:], idx[:, 1:]
    reach = torch.max(knn, knn[:, -1:].expand_as(knn))
    lrd = k / torch.nan_to_num(reach.mean(dim=1), nan=1e-6)
    return (lrd[idx] / lrd[:, None]).mean(dim=1)


def outlier_mask(x: Tensor, grid: tuple[int, int], neighbours: int = 30, share: float = 0.05,
                 reference_compat: bool = False) -> Tensor:
    """(gh, gw) bool: the patches of x (N, W) whose `lof_scores` exceed their (1 - share) quantile
    (linear interpolation). reference_compat (quirk Q9, docs/algorithm.md §10): the authors split a
    patch index into (row, column) with the grid's height gh as the row length; on a non-square
    grid that marks other patches, and positions that fall outside the grid (where their code
    fails) are dropped."""
    gh, gw = grid
    mask = torch.zeros(gh * gw, dtype=torch.bool, device=x.device)
    if x.shape[0] < 2:
        return mask.reshape(gh, gw)
    scores = lof_scores(x, neighbours)
    index = torch.where(scores > torch.quantile(scores.float(), 1 - share))[0]
    if reference_compat:  # quirk Q9 (docs/algorithm.md §10)
        rows, cols = index // gh, index % gh
        inside = (rows < gh) & (cols < gw)
        index = rows[inside] * gw + cols[inside]
    mask[index] = True
    return mask.reshape(gh, gw)


def replace_outliers(tokens: Tensor, mask: Tensor) -> Tensor:
    """Patch tokens (N, W) on the grid of mask (gh, gw) bool with each masked patch replaced by the
    mean of its unmasked 3x3 neighbours inside the grid (kept when it has none)."""
    gh, gw = mask.shape
    grid = tokens.T.reshape(1, -1, gh, gw)
    keep = (~mask).to(tokens.dtype)[None, None]
    pad = F.pad(grid * keep, (1, 1, 1, 1))
    pad_keep = F.pad(keep, (1, 1, 1, 1))
    shifts = [(dy, dx) for dy in range(3) for dx in range(3) if (dy, dx) != (1, 1)]
    total = sum(pad[..., dy : dy + gh, dx : dx + gw] for dy, dx in shifts)
    count = sum(pad_keep[..., dy : dy + gh, dx : dx + gw] for dy, dx in shifts)
    update = mask[None, None] & (count > 0)
    out = torch.where(update, total / count.clamp(min=1), grid)
    return out.reshape(tokens.shape[1], -1).T


def cosine_similarity(tokens: Tensor) -> Tensor:
    """(B, N, N) cosine similarity of tokens (B, N, W)."""
    unit = tokens / tokens.norm(dim=-1, keepdim=True)
    return unit @ unit.transpose(-1, -2)


def aggregate(tokens: Tensor, similarity: Tensor, beta: float) -> Tensor:
    """tokens (B, N, W) mixed by similarity (B, N, N) with entries below beta set to 0 and each
    row divided by its sum + 1e-6."""
    weights = torch.where(similarity < beta, torch.zeros_like(similarity), similarity)
    return (weights / (weights.sum(dim=-1, keepdim=True) + 1e-6)) @ tokens


def scclip_attention(similarity: Tensor, scale: float) -> LastBlockAttention:
    """The last block's mixing weights (B, h, N, N) on patch tokens alone: the mean of
    softmax(m) with m = scale (S - mean(S)), entries below 0 masked (-inf), S = similarity
    (B, N, N) and its mean per image, and softmax(s k k^T) per head (s = d^-0.5)."""

    def attention(inputs: AttentionInputs) -> Tensor:
        k = inputs.k
        sim = similarity.to(k.dtype)
        m = (sim - sim.mean(dim=(1, 2), keepdim=True)) * scale
        m = m.masked_fill(m < 0, float("-inf"))[:, None]
        return (m.softmax(dim=-1) + (k.shape[-1] ** -0.5 * k @ k.transpose(-1, -2)).softmax(dim=-1)) / 2

    return attention


def scclip_tokens(backbone: Backbone, crops: Tensor, cfg: ScClipSettings, reference_compat: bool = False) -> Tensor:
    """Projected patch tokens (B, N, D) fp32 of SC-CLIP for windows crops (B, 3, H, W) (steps 1-5
    of the module docstring; every statistic per window)."""
    p = backbone.patch_size
    grid = (crops.shape[-2] // p, crops.shape[-1] // p)
    pre, post, multi = cfg.indices_for(backbone.num_layers)
    last_in = backbone.num_layers - 2
    layers = backbone.block_outputs(crops, (pre, post, last_in, *multi))
    x, cls = layers[last_in][:, 1:], layers[last_in][:, :1]
    before = layers[pre][:, 1:]
    fixed_x, fixed_before = [], []
    for one_x, one_before in zip(x, before, strict=True):
        mask = outlier_mask(one_x.float(), grid, cfg.lof_neighbours, cfg.lof_share, reference_compat)
        fixed_x.append(replace_outliers(one_x, mask))
        fixed_before.append(replace_outliers(one_before, mask))
    mid = cosine_similarity(torch.stack(fixed_before))
    after = cosine_similarity(layers[post][:, 1:])
    attention = scclip_attention(mid, cfg.attn_scale)
    x = aggregate(torch.stack(fixed_x), mid, cfg.beta)
    x = backbone.custom_last_attention(x, attention, grid) + cfg.res_cls * cls
    x = aggregate(x, after, cfg.beta)
    fused = sum(layers[i] for i in multi)
    fused = backbone.custom_last_attention(fused[:, 1:], attention, grid) + cfg.res_cls * fused[:, :1]
    x = x + aggregate(fused, after, cfg.beta)
    return backbone.project_tokens(x).float()


# ---- the method -------------------------------------------------------------------------------

class _ScClipRun:
    """SC-CLIP bound to one config and the quirks: what `DenseSegments` asks of a method."""

    name = "scclip"
    background_queries = SCENE_BACKGROUND
    query_tables = {"voc": SCLIP_VOC_QUERIES, "coco": SCLIP_COCO_QUERIES}

    def __init__(self, config: ScClipConfig, quirks: Quirks) -> None:
        self.config = config
        self.quirks = quirks

    def window_tokens(self, backbone: Backbone, crops: Tensor, text: Tensor, settings: DenseSettings) -> Tensor:
        return scclip_tokens(backbone, crops, self.config.scclip, self.quirks.q9_scclip_outlier_rows)


class ScClip:
    name = "scclip"
    kind = "masks"
    needs_tags = False
    needs_rgb = True  # resizes the RGB image itself
    options: frozenset[str] = frozenset()
    settings = SETTINGS
    summary = "SC-CLIP: outliers replaced, similarity-guided last block and multi-level fusion, published settings"
    def config(self, setting: str = "voc", **options) -> ScClipConfig:
        """The authors' settings for setting ("cocostuff" has none and takes VOC's)."""
        if setting not in self.settings:
            raise UsageError(f"unknown setting '{setting}' (choose from {', '.join(self.settings)})")
        return ScClipConfig(SCCLIP_DENSE.get(setting, SCCLIP_DENSE["voc"]), ScClipSettings(), setting, **options)

    def build(self, backbone: Backbone, vocab: Vocabulary, config: ScClipConfig, *, quirks: Quirks,
              tagclip: TagCLIPConfig | None = None, run_tagclip: bool = True) -> DenseSegments:
        use_background = (tagclip or TagCLIPConfig()).use_background
        return DenseSegments(backbone, vocab, _ScClipRun(config, quirks), config.settings,  # type: ignore[arg-type]
                             use_background)

    def record(self, config: ScClipConfig, quirks: Quirks) -> dict:
        from tagclip_cli.methods.record import legacy_record

        record = legacy_record(self.name, quirks, setting=config.setting, dense=asdict(config.settings))
        record["scclip"] = asdict(config.scclip)
        return record


SCCLIP = register(ScClip())
