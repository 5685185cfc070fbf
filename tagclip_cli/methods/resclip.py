"""ResCLIP (Yang et al., CVPR 2025) on a dense baseline's last block (docs/algorithm.md §14): RCS
mixes the mean q-k attention of middle layers into the last block's attention after its softmax,
and SFR feeds a first pass's segmentation back into the last block's attention logits.

Published on NACLIP (`--method resclip`); `--rcs` puts it on SCLIP, ClearCLIP or NACLIP (the base's
last-block attention and residual, ResCLIP's inference settings). Pure tensor functions below
(shapes in the docstrings: B windows, h heads, N = gh * gw patches, T = 1 + N tokens, Q queries,
(H, W) a window's pixels), then the method.

Per window:
1. blocks 1..L-1 as usual; the q-k softmax maps of the RCS layers (6-9 of 12) are averaged per head
   (`rcs_map`);
2. first pass: the last block with the base's attention mixed with RCS,
   tau_r ((1 - lambda_r) A + lambda_r A_rcs) (`rcs_mix`); its patch tokens' cosines with the
   queries, upsampled to the window, refined by PAMR on the window's pixels (`pamr`), softmax over
   the queries at the logit scale (`sfr_query_probs`);
3. the label of each patch: the most frequent query index of its pixels, pixels whose best
   probability is below the SFR threshold counting as query 0 (`patch_labels`);
4. SFR matrix: same-label patch pairs 1, decayed by exp(-steps / max_steps) unless a straight path
   of same-label patches joins them (`same_label_paths`), each row blurred by a 1-D Gaussian along
   the row-major patch index, row-normalised (`sfr_matrix`), divided by its maximum;
5. second pass: each of the base's attention logits becomes tau_s ((1 - lambda_s) S + lambda_s SFR)
   (`sfr_mix`) before the softmax (NACLIP's prior added after it), then RCS as in 2; the tokens of
   this pass are the window's features, scored as the dense baselines do (`dense.dense_logits`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace

import torch
import torch.nn.functional as F
from torch import Tensor

from tagclip_cli.backbone import Backbone
from tagclip_cli.backbone.encoder import AttentionInputs, LastBlockAttention
from tagclip_cli.errors import UsageError
from tagclip_cli.methods.base import SETTINGS
from tagclip_cli.methods.dense import DenseSegments, DenseSettings
from tagclip_cli.methods.naclip import neighbourhood_prior
from tagclip_cli.methods.registry import get, register
from tagclip_cli.methods.sclip import SCENE_BACKGROUND, SCLIP_COCO_QUERIES, SCLIP_VOC_QUERIES
from tagclip_cli.quirks import Quirks
from tagclip_cli.tagclip import TagCLIPConfig
from tagclip_cli.vocab import Vocabulary

BASES = ("naclip", "sclip", "clearclip")


@dataclass(frozen=True)
class ResClipSettings:
    """ResCLIP's own constants (the authors' configs, ViT-B/16).

    rcs / sfr: switch each part on. rcs_layers: the 1-based inclusive layers whose q-k maps RCS
    averages (6-9; clamped to 1..L-1 on smaller models). rcs_tau / rcs_lambda and sfr_tau /
    sfr_lambda: the mixing weights. sfr_threshold: first-pass probability below which a pixel's
    label is query 0. pamr_steps / pamr_dilations: the first pass's PAMR. sfr_std: the Gaussian
    blur's sigma (the base's gaussian_std, 5). sfr_paths: decay same-label pairs not joined by a
    same-label path (the authors' delete_same_entity, on in every config)."""

    rcs: bool = True
    sfr: bool = True
    rcs_layers: tuple[int, int] = (6, 9)
    rcs_tau: float = 2.0
    rcs_lambda: float = 0.3
    sfr_tau: float = 2.2
    sfr_lambda: float = 0.7
    sfr_threshold: float = 0.5
    pamr_steps: int = 10
    pamr_dilations: tuple[int, ...] = (8, 16)
    sfr_std: float = 5.0
    sfr_paths: bool = True

    def __post_init__(self) -> None:
        if self.rcs_layers[0] < 1 or self.rcs_layers[0] > self.rcs_layers[1]:
            raise UsageError(f"ResCLIP: rcs_layers {self.rcs_layers} must be 1 <= lo <= hi")
        if self.pamr_steps < 0 or any(d < 1 for d in self.pamr_dilations) or self.sfr_std <= 0:
            raise UsageError("ResCLIP: pamr_steps >= 0, dilations >= 1 and sfr_std > 0")

    def layers_for(self, num_layers: int) -> tuple[int, ...]:
        """0-based indices of the RCS layers on a model of num_layers blocks (at most L-1)."""
        hi = min(self.rcs_layers[1], num_layers - 1)
        lo = min(self.rcs_layers[0], hi)
        return tuple(range(lo - 1, hi))


# From the authors' configs (cfg_voc21, cfg_coco_object, cfg_voc20; ViT-B/16). The segmentor's
# defaults fill the rest: logit scale 40, 224 / 112 windows unless slide_crop=0, prob threshold 0.
RESCLIP_DENSE = {
    "voc": DenseSettings(short_side=336, crop=0, stride=0, logit_scale=40, prob_threshold=0.1),
    "coco": DenseSettings(short_side=336, crop=224, stride=112, logit_scale=40, prob_threshold=0.1),
    "voc20": DenseSettings(short_side=336, crop=0, stride=0, logit_scale=40, prob_threshold=0.0),
}
RESCLIP_PUBLISHED = {
    "voc": ResClipSettings(rcs_lambda=0.3, sfr_tau=2.2, sfr_lambda=0.7, sfr_threshold=0.50),
    "coco": ResClipSettings(rcs_lambda=0.4, sfr_tau=1.8, sfr_lambda=0.7, sfr_threshold=0.11),
    "voc20": ResClipSettings(rcs_lambda=0.6, sfr_tau=2.1, sfr_lambda=0.6, sfr_threshold=0.10),
}


@dataclass(frozen=True)
class ResClipConfig:
    """ResCLIP on a base (naclip, sclip, clearclip): the dense inference settings and ResCLIP's."""

    settings: DenseSettings = field(default_factory=lambda: RESCLIP_DENSE["voc"])
    resclip: ResClipSettings = field(default_factory=lambda: RESCLIP_PUBLISHED["voc"])
    base: str = "naclip"
    setting: str = "voc"

    def __post_init__(self) -> None:
        if self.base not in BASES:
            raise UsageError(f"ResCLIP runs on {', '.join(BASES)}, not '{self.base}'")


# ---- RCS --------------------------------------------------------------------------------------

def rcs_map(qk: list[tuple[Tensor, Tensor]]) -> Tensor:
    """RCS's attention (B, h, T, T): the mean over layers of softmax(s q k^T) per head, s = d^-0.5,
    from each layer's (q, k), each (B, h, T, d)."""
    maps = [(q.shape[-1] ** -0.5 * q @ k.transpose(-1, -2)).softmax(dim=-1) for q, k in qk]
    return torch.stack(maps).mean(dim=0)


def rcs_mix(attn: Tensor, rcs: Tensor, tau: float, lam: float) -> Tensor:
    """tau ((1 - lam) attn + lam rcs) for attention weights attn and rcs (B, h, T, T)."""
    return tau * ((1 - lam) * attn + lam * rcs)


def sfr_mix(scores: Tensor, sfr: Tensor, tau: float, lam: float) -> Tensor:
    """tau ((1 - lam) scores + lam sfr): attention logits scores (B, h, T, T), sfr (B, 1, T, T)."""
    return tau * ((1 - lam) * scores + lam * sfr)


def base_logits(base: str, inputs: AttentionInputs) -> list[Tensor]:
    """The base's attention logits, each (B, h, T, T): naclip [s k k^T], sclip [s q q^T, s k k^T],
    clearclip [s q q^T] (s = d^-0.5)."""
    q, k = inputs.q, inputs.k
    s = q.shape[-1] ** -0.5
    qq = [s * q @ q.transpose(-1, -2)] if base in ("sclip", "clearclip") else []
    kk = [s * k @ k.transpose(-1, -2)] if base in ("sclip", "naclip") else []
    return qq + kk


def resclip_attention(base: str, cfg: ResClipSettings, rcs_layers: tuple[int, ...], gaussian_std: float,
                      sfr: Tensor | None = None) -> LastBlockAttention:
    """The last block's mixing weights (B, h, T, T) of ResCLIP on base: each base logit through
    `sfr_mix` when sfr (B, 1, T, T) is given, NACLIP's prior added, softmax (SCLIP: the sum of its
    two), then `rcs_mix` with `rcs_map` of rcs_layers (0-based, captured) when cfg.rcs."""

    def attention(inputs: AttentionInputs) -> Tensor:
        probs = 0
        for scores in base_logits(base, inputs):
            if sfr is not None:
                scores = sfr_mix(scores, sfr.to(scores.dtype), cfg.sfr_tau, cfg.sfr_lambda)
            if base == "naclip":
                scores = scores + neighbourhood_prior(inputs.grid, gaussian_std, scores.device).to(scores.dtype)
            probs = probs + scores.softmax(dim=-1)
        if cfg.rcs:
            layers = [(inputs.layers[i].q.to(inputs.q.dtype), inputs.layers[i].k.to(inputs.q.dtype))
                      for i in rcs_layers]
            probs = rcs_mix(probs, rcs_map(layers), cfg.rcs_tau, cfg.rcs_lambda)
        return probs

    return attention


# ---- SFR --------------------------------------------------------------------------------------

def _shifts(dilations: tuple[int, ...]) -> list[tuple[int, int]]:
    """The (dy, dx) offsets of the 8 neighbours at each dilation."""
    return [(dy * d, dx * d) for d in dilations for dy in (-1, 0, 1) for dx in (-1, 0, 1) if (dy, dx) != (0, 0)]


def _shifted(x: Tensor, dy: int, dx: int) -> Tensor:
    """x (B, C, H, W) read at (y + dy, x + dx), positions clamped to the border (replicate)."""
    h, w = x.shape[-2:]
    rows = (torch.arange(h, device=x.device) + dy).clamp(0, h - 1)
    cols = (torch.arange(w, device=x.device) + dx).clamp(0, w - 1)
    return x[..., rows[:, None], cols[None, :]]


def pamr(image: Tensor, mask: Tensor, steps: int = 10, dilations: tuple[int, ...] = (8, 16)) -> Tensor:
    """PAMR (Araslanov & Roth, CVPR 2020) of mask (B, C, H, W) on image (B, K, H, W), (B, C, H, W).

    Affinity to each of the 8 neighbours at every dilation (positions clamped to the border):
    -|x - x_n| / (1e-8 + 0.1 sigma) with sigma the standard deviation (unbiased) of the 3x3 values
    at every dilation (the centre once per dilation), averaged over the K channels and softmaxed
    over the neighbours; then `steps` times: mask = sum over neighbours of affinity * the
    neighbour's mask (accumulated neighbour by neighbour: no (B, C, 8n, H, W) tensor)."""
    shifts = _shifts(dilations)
    neighbours = torch.stack([_shifted(image, dy, dx) for dy, dx in shifts], dim=2)  # (B, K, 8n, H, W)
    centre = image[:, :, None]
    values = torch.cat([neighbours, centre.expand(-1, -1, len(dilations), -1, -1)], dim=2)
    sigma = values.std(dim=2, keepdim=True)
    affinity = (-(centre - neighbours).abs() / (1e-8 + 0.1 * sigma)).mean(dim=1).softmax(dim=1)  # (B, 8n, H, W)
    for _ in range(steps):
        out = torch.zeros_like(mask)
        for n, (dy, dx) in enumerate(shifts):
            out += affinity[:, n : n + 1] * _shifted(mask, dy, dx)
        mask = out
    return mask


def sfr_query_probs(tokens: Tensor, text: Tensor, pixels: Tensor, grid: tuple[int, int], logit_scale: float,
                    cfg: ResClipSettings) -> Tensor:
    """The first pass's query probabilities (B, Q, H, W): the cosines of patch tokens (B, N, D)
    with text (Q, D) on the grid, bilinearly upsampled to the windows' pixels (B, 3, H, W), PAMR on
    those pixels, softmax over the queries of logit_scale * the result."""
    logits = F.normalize(tokens.float(), dim=-1) @ text.T.float()
    logits = logits.transpose(1, 2).reshape(tokens.shape[0], -1, *grid)
    logits = F.interpolate(logits, size=pixels.shape[-2:], mode="bilinear", align_corners=False)
    if cfg.pamr_steps:
        logits = pamr(pixels.float(), logits, cfg.pamr_steps, cfg.pamr_dilations)
    return (logit_scale * logits).softmax(dim=1)


def patch_labels(probs: Tensor, patch: int, threshold: float) -> Tensor:
    """(gh, gw) long: each patch's most frequent pixel label (the smallest on ties), a pixel's
    label being its best query of probs (Q, H, W), or 0 where that query's probability is below
    threshold. Pixels past the last whole patch are not counted."""
    best, label = probs.max(dim=0)
    label = torch.where(best < threshold, torch.zeros_like(label), label)
    gh, gw = probs.shape[1] // patch, probs.shape[2] // patch
    cells = label[: gh * patch, : gw * patch].reshape(gh, patch, gw, patch).permute(0, 2, 1, 3).reshape(gh * gw, -1)
    counts = torch.zeros(gh * gw, probs.shape[0], dtype=torch.long, device=probs.device)
    counts.scatter_add_(1, cells, torch.ones_like(cells))
    return counts.argmax(dim=1).reshape(gh, gw)


def same_label_paths(labels: Tensor, reference_compat: bool = False, chunk_points: int = 1 << 22) -> Tensor:
    """(N, N) bool: pair (i, j) is joined when every patch on the straight line from patch i to
    patch j, sampled at steps + 1 points (steps = the Chebyshev distance, positions rounded half to
    even), has patch i's label of labels (gh, gw).

    reference_compat (quirk Q7, docs/algorithm.md §10): the authors sample every pair at the
    fractions k / max_steps (max_steps the largest distance on the grid) for k <= steps, so that
    only the first steps / max_steps of a shorter pair's line is checked."""
    gh, gw = labels.shape
    n = gh * gw
    device = labels.device
    idx = torch.arange(n, device=device)
    coords = torch.stack([idx // gw, idx % gw], dim=1)  # (N, 2) (row, column)
    flat = labels.flatten()
    max_steps = max(gh, gw) - 1
    k = torch.arange(max_steps + 1, device=device, dtype=torch.float32)
    out = torch.empty(n, n, dtype=torch.bool, device=device)
    rows = max(1, chunk_points // max(1, n * (max_steps + 1)))
    for start in range(0, n, rows):
        a = coords[start : start + rows]  # (r, 2)
        steps = (coords[None] - a[:, None]).abs().amax(dim=-1)  # (r, N)
        if reference_compat:  # quirk Q7 (docs/algorithm.md §10)
            t = torch.linspace(0, 1, max_steps + 1, device=device).expand(*steps.shape, -1)
        else:
            t = k / steps.clamp(min=1)[..., None]  # (r, N, S+1)
        t = t[..., None]
        points = (a[:, None, None].float() * (1 - t) + coords[None, :, None].float() * t).round().long()
        valid = k[None, None] <= steps[..., None]
        points = points.clamp(min=0)
        points = torch.minimum(points, torch.tensor([gh - 1, gw - 1], device=device))
        on_path = flat[points[..., 0] * gw + points[..., 1]] == flat[start : start + rows, None, None]
        out[start : start + rows] = (on_path | ~valid).all(dim=-1)
    return out


def gaussian_rows(matrix: Tensor, std: float) -> Tensor:
    """Each row of matrix (N, N) convolved with a normalised 1-D Gaussian (sigma std) along its
    columns, zero beyond the ends; kernel size min(N, int(6 std + 1)), made odd by adding one."""
    n = matrix.shape[1]
    size = min(n, int(6 * std + 1))
    size += 1 - size % 2
    x = torch.arange(size, device=matrix.device, dtype=matrix.dtype) - size // 2
    kernel = torch.exp(-(x**2) / (2 * std**2))
    kernel = kernel / kernel.sum()
    return F.conv1d(matrix[:, None], kernel[None, None], padding=size // 2)[:, 0]


def sfr_matrix(labels: Tensor, std: float, paths: bool = True, reference_compat: bool = False) -> Tensor:
    """SFR's attention bias (1+N, 1+N) from patch labels (gh, gw): between patches i and j 1 when
    their labels agree, else 0; with paths, agreeing pairs not joined by `same_label_paths` are
    multiplied by exp(-steps / max_steps) (Chebyshev steps; max_steps the grid's largest); each row
    blurred by `gaussian_rows`, clipped at 0, divided by its sum + 1e-8; then the whole divided by its
    maximum. 0 in the class token's row and column."""
    gh, gw = labels.shape
    flat = labels.flatten()
    same = (flat[:, None] == flat[None, :]).float()
    if paths and same.shape[0] > 1:
        idx = torch.arange(gh * gw, device=labels.device)
        rows, cols = idx // gw, idx % gw
        steps = torch.maximum((rows[:, None] - rows[None]).abs(), (cols[:, None] - cols[None]).abs()).float()
        decay = torch.exp(-steps / (max(gh, gw) - 1))
        same = torch.where(same_label_paths(labels, reference_compat), same, same * decay)
    blurred = torch.relu(gaussian_rows(same, std))
    blurred = blurred / (blurred.sum(dim=1, keepdim=True) + 1e-8)
    out = torch.zeros(gh * gw + 1, gh * gw + 1, device=labels.device)
    out[1:, 1:] = blurred
    out = out / out.max()
    if reference_compat:  # quirk Q6 (docs/algorithm.md §10)
        out = out.half().float()
    return out


# ---- the method -------------------------------------------------------------------------------

class _ResClipRun:
    """ResCLIP bound to one config and the quirks: what `DenseSegments` asks of a method (its
    name, query names and the windows' tokens)."""

    background_queries = SCENE_BACKGROUND
    query_tables = {"voc": SCLIP_VOC_QUERIES, "coco": SCLIP_COCO_QUERIES}

    def __init__(self, config: ResClipConfig, quirks: Quirks) -> None:
        self.name = "resclip"
        self.config = config
        self.quirks = quirks

    def window_tokens(self, backbone: Backbone, crops: Tensor, text: Tensor, settings: DenseSettings) -> Tensor:
        """Projected patch tokens (B, N, D) fp32 of windows crops (B, 3, H, W): the first pass with
        RCS, then (with SFR) the second pass with the SFR matrix of each window's first-pass labels."""
        cfg, base = self.config.resclip, self.config.base
        last = backbone.num_layers - 1
        rcs_layers = cfg.layers_for(backbone.num_layers) if cfg.rcs else ()
        keep_residual = base == "sclip"
        first = resclip_attention(base, cfg, rcs_layers, settings.gaussian_std)
        out = backbone.custom_last_block_forward(crops, first, keep_residual, capture=(*rcs_layers, last - 1))
        if not cfg.sfr:
            return out.tokens
        p = backbone.patch_size
        grid = (crops.shape[-2] // p, crops.shape[-1] // p)
        probs = sfr_query_probs(out.tokens, text, crops, grid, settings.logit_scale, cfg)
        compat = self.quirks.reference_compat
        sfr = torch.stack([sfr_matrix(patch_labels(one, p, cfg.sfr_threshold), cfg.sfr_std, cfg.sfr_paths, compat)
                           for one in probs])[:, None]
        second = resclip_attention(base, cfg, rcs_layers, settings.gaussian_std, sfr)
        return backbone.custom_last_block(out.layers[last - 1].x, second, keep_residual, grid, out.layers)


class ResClip:
    """ResCLIP: `config(setting, base=...)` gives the authors' settings on a base (naclip by default)."""

    name = "resclip"
    kind = "masks"
    needs_tags = False
    needs_rgb = True  # resizes the RGB image itself
    options: frozenset[str] = frozenset()
    summary = ("ResCLIP on NACLIP: RCS (middle layers' q-k attention) and SFR (feedback of a first pass), "
               "published settings")
    settings = (*SETTINGS, "voc20")

    def config(self, setting: str = "voc", base: str = "naclip", **options) -> ResClipConfig:
        """The authors' settings for setting ("cocostuff" has none and takes VOC's)."""
        if setting not in self.settings:
            raise UsageError(f"unknown setting '{setting}' (choose from {', '.join(self.settings)})")
        dense = RESCLIP_DENSE.get(setting, RESCLIP_DENSE["voc"])
        return ResClipConfig(dense, RESCLIP_PUBLISHED.get(setting, RESCLIP_PUBLISHED["voc"]), base, setting, **options)

    def build(self, backbone: Backbone, vocab: Vocabulary, config: ResClipConfig, *, quirks: Quirks,
              tagclip: TagCLIPConfig | None = None, run_tagclip: bool = True) -> DenseSegments:
        if quirks.q8_resclip_switches_on:  # quirk Q8 (docs/algorithm.md §10)
            config = replace(config, resclip=replace(config.resclip, rcs=True, sfr=True))
        use_background = (tagclip or TagCLIPConfig()).use_background
        run = _ResClipRun(config, quirks)
        return DenseSegments(backbone, vocab, run, config.settings, use_background)  # type: ignore[arg-type]

    def record(self, config: ResClipConfig, quirks: Quirks) -> dict:
        from tagclip_cli.methods.record import legacy_record

        record = legacy_record(self.name, quirks, setting=config.setting, dense=asdict(config.settings))
        record["resclip"] = {**asdict(config.resclip), "base": config.base}
        return record


RESCLIP = register(ResClip())


def resclip_config(base: str, setting: str = "voc", **options) -> ResClipConfig:
    """ResCLIP's published settings for a setting on base (what `--method BASE --rcs` runs)."""
    method = get("resclip")
    return method.config(setting, base=base, **options)  # type: ignore[attr-defined]
