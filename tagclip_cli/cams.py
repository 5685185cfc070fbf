"""From refined cams to a label map: upsampling, the background rule, the dense CRF.

Shared by `segment` (CLS-SEG, docs/algorithm.md §8 steps 9-11) and `evaluate --cams` (the
background-threshold sweep over saved cams), so that both decide every pixel with the same code.
Pure numpy / torch: nothing here loads a model (the evaluate package must not import the backbone).

Shapes: K cams of one image, on the patch grid (K, gh, gw) or at the image size (K, H, W).
Background rule: background score (1 - max_k cam_k) ** power (the reference's, `CamRule`), or a
constant threshold t (CLIP-ES's eval_cam.py sweep), or none at all (COCO-Stuff: every pixel gets
its best tag). The argmax runs over [background, cams], ties to background.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from tagclip_cli.errors import UsageError

CAM_EPS = 1e-7  # the reference's normalisation: (x - min) / (max - min + eps)
ROW_CHUNK_PIXELS = 1 << 22  # upsample and argmax about this many pixels x classes at a time
CAM_LAYOUTS = ("image", "grid")  # --save-cams: cams at the image size, or on the patch grid


class CrfUnavailableError(UsageError):
    """The dense CRF was asked for but the optional pydensecrf2 package is not installed."""


@dataclass(frozen=True)
class CamRule:
    """How cams become labels: the label rule of CLS-SEG (`methods.clses.ClsSegConfig.rule` holds one)
    that `evaluate --cams` needs too."""

    background_power: float = 1.0  # background score = (1 - max cam) ** power
    label_background: bool = True  # False: no background label (COCO-Stuff)
    normalise_after_resize: bool = False
    cam_eps: float = CAM_EPS
    crf_iterations: int = 10
    crf_gaussian_sxy: float = 1.0
    crf_gaussian_compat: float = 3.0
    crf_bilateral_sxy: float = 67.0
    crf_bilateral_srgb: float = 3.0
    crf_bilateral_compat: float = 4.0
    crf_unary_clip: float = 1e-5  # unary = -log(clip(p, this, 1))


def normalise_cam(cams: Tensor, eps: float = CAM_EPS) -> Tensor:
    """Per map (x - min) / (max - min + eps) over all but the first dim: (K, ...) -> (K, ...).

    The reference's normalisation (eps 1e-7): the maximum is just below 1. eps=0 is the exact
    min-max; a constant map becomes 0 either way."""
    flat = cams.reshape(cams.shape[0], -1)
    lo = flat.amin(dim=1, keepdim=True)
    shifted = flat - lo
    span = shifted.amax(dim=1, keepdim=True) + eps
    safe = torch.where(span > 0, span, torch.ones_like(span))
    return (shifted / safe).reshape(cams.shape)


def _linear_taps(in_size: int, out_size: int, device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
    """Source indices (i0, i1) and weight of i1 for 1-D linear resizing, align_corners=False
    (the rule of torch's bilinear interpolate and OpenCV's INTER_LINEAR when enlarging)."""
    scale = in_size / out_size
    src = ((torch.arange(out_size, device=device, dtype=torch.float32) + 0.5) * scale - 0.5).clamp(min=0)
    i0 = src.floor().long().clamp(max=in_size - 1)
    i1 = (i0 + 1).clamp(max=in_size - 1)
    return i0, i1, src - i0


def resize_bilinear(maps: Tensor, size: tuple[int, int], rows: slice | None = None) -> Tensor:
    """Bilinear resize (align_corners=False) of (M, h, w) maps to (M, H, W), or only output rows
    `rows` of it, (M, len(rows), W): the same numbers as `F.interpolate`, computed a band at a time
    so that many classes on a large image need not be held at full resolution at once."""
    _, h, w = maps.shape
    height, width = size
    y0, y1, ly = _linear_taps(h, height, maps.device)
    x0, x1, lx = _linear_taps(w, width, maps.device)
    if rows is not None:
        y0, y1, ly = y0[rows], y1[rows], ly[rows]
    maps = maps.float()
    vertical = maps[:, y0, :] * (1 - ly)[None, :, None] + maps[:, y1, :] * ly[None, :, None]
    return vertical[:, :, x0] * (1 - lx) + vertical[:, :, x1] * lx


def _row_bands(height: int, width: int, channels: int) -> list[slice]:
    step = max(1, ROW_CHUNK_PIXELS // max(1, width * channels))
    return [slice(y, min(height, y + step)) for y in range(0, height, step)]


def background_score(cams: Tensor, power: float = 1.0, threshold: float | None = None) -> Tensor:
    """(K, ...) cams -> (...) background score: the constant `threshold` when given, else
    (1 - max_k cam_k) ** power. With power 1 the argmax is the same as with threshold 0.5."""
    best = cams.amax(dim=0)
    if threshold is not None:
        return torch.full_like(best, threshold)
    return (1 - best).clamp(min=0) ** power


def _label_bands(
    band_maps: Callable[[slice], Tensor], k: int, labels: Sequence[int], size: tuple[int, int],
    power: float, threshold: float | None, label_background: bool,
) -> tuple[np.ndarray, dict[int, float]]:
    """The label rule over row bands: band_maps(rows) gives the (K, h, W) cams of those rows."""
    height, width = size
    out = np.zeros((height, width), dtype=np.int32)
    if k == 0:
        return out, {}
    lookup = torch.tensor([0, *labels], dtype=torch.long)
    sums = torch.zeros(k + 1, dtype=torch.float64)
    counts = torch.zeros(k + 1, dtype=torch.float64)
    for band in _row_bands(height, width, k):
        up = band_maps(band)  # (K, h, W)
        if label_background:
            background = background_score(up, power, threshold)
            winner = torch.cat([background[None], up]).argmax(dim=0).cpu()  # (h, W) in 0..K
        else:
            winner = up.argmax(dim=0).cpu() + 1  # COCO-Stuff: the best tag everywhere
        out[band] = lookup[winner].numpy()
        value = up.gather(0, (winner.to(up.device) - 1).clamp(min=0)[None])[0].cpu().double()
        sums += torch.bincount(winner.flatten(), weights=value.flatten(), minlength=k + 1)
        counts += torch.bincount(winner.flatten(), minlength=k + 1).double()
    return out, _mean_by_label(sums, counts, [0, *labels])


def label_map_from_cams(
    cams: Tensor, labels: Sequence[int], size: tuple[int, int], background_power: float = 1.0,
    normalise_after_resize: bool = False, eps: float = CAM_EPS, label_background: bool = True,
    background_threshold: float | None = None,
) -> tuple[np.ndarray, dict[int, float]]:
    """Label map (H, W) int32 and per-label mean cam inside its mask, from grid cams (K, gh, gw).

    cams are normalised refined cams on the patch grid; each is upsampled bilinearly to `size`.
    Background score = (1 - max_k cam_k) ** background_power (or the constant
    background_threshold); argmax over [background, cams] (ties go to background), so with power
    1 a pixel is foreground iff its best cam > 0.5. label_background=False: argmax over the cams
    alone. labels[k] is the output value of cam k (0 = background). normalise_after_resize
    re-normalises each upsampled map (instead of relying on the grid normalisation)."""
    scale = None
    if normalise_after_resize and cams.shape[0]:  # min/max of the full-size maps: one pass first
        full = resize_bilinear(cams, size)
        lo = full.amin(dim=(1, 2))
        span = full.amax(dim=(1, 2)) - lo + eps
        scale = (lo, torch.where(span > 0, span, torch.ones_like(span)))
        del full

    def band_maps(band: slice) -> Tensor:
        up = resize_bilinear(cams, size, band)
        if scale is not None:
            up = (up - scale[0][:, None, None]) / scale[1][:, None, None]
        return up

    return _label_bands(band_maps, cams.shape[0], labels, size, background_power, background_threshold,
                        label_background)


def label_map_from_upsampled(
    cams: Tensor, labels: Sequence[int], background_power: float = 1.0, label_background: bool = True,
    background_threshold: float | None = None,
) -> tuple[np.ndarray, dict[int, float]]:
    """`label_map_from_cams` for cams already at the image size, (K, H, W): no resizing."""
    size = (int(cams.shape[1]), int(cams.shape[2]))
    return _label_bands(lambda band: cams[:, band].float(), cams.shape[0], labels, size, background_power,
                        background_threshold, label_background)


def _mean_by_label(sums: Tensor, counts: Tensor, labels: Sequence[int]) -> dict[int, float]:
    """{label: mean value} for the labels > 0 that own at least one pixel (several rows may share a
    label: their sums and counts are pooled)."""
    total: dict[int, list[float]] = {}
    for i, label in enumerate(labels):
        if label > 0 and counts[i] > 0:
            acc = total.setdefault(int(label), [0.0, 0.0])
            acc[0] += float(sums[i])
            acc[1] += float(counts[i])
    return {label: s / c for label, (s, c) in sorted(total.items())}


def _densecrf():
    """pydensecrf's densecrf module, or CrfUnavailableError (one line, with the fix) when the
    optional pydensecrf2 package is not installed."""
    try:
        import pydensecrf.densecrf as dcrf
    except ImportError:
        raise CrfUnavailableError(
            "the dense CRF needs the optional pydensecrf2 package: pip install 'tagclip-cli[crf]' "
            "(or pip install pydensecrf2)"
        ) from None
    return dcrf


def crf_available() -> bool:
    try:
        _densecrf()
    except CrfUnavailableError:
        return False
    return True


def require_crf() -> None:
    """Raise CrfUnavailableError (one line, with the fix) when pydensecrf2 is not importable.

    Called once where a run starts (segment's job, evaluate --cams --crf, the CLS-SEG segmenter),
    before anything loads; `dense_crf` itself only turns a failed import into the same error."""
    _densecrf()


def dense_crf(rgb: np.ndarray, probs: np.ndarray, config: CamRule) -> np.ndarray:
    """Mean-field dense CRF (Kraehenbuehl & Koltun) with the paper's parameters: (C, H, W) -> (C, H, W).

    rgb: (H, W, 3) uint8 image. probs: (C, H, W) class scores in [0, 1] (here [background; cams],
    not renormalised, as the reference feeds them); unary = -log(clip(p, clip, 1)). Pairwise:
    Gaussian (sxy, compat) and bilateral (sxy, srgb, compat); `crf_iterations` rounds. config: a
    `CamRule`."""
    dcrf = _densecrf()
    c, h, w = probs.shape
    if rgb.shape != (h, w, 3):
        raise ValueError(f"CRF image {rgb.shape} does not match the score maps {(h, w)}")
    unary = -np.log(np.clip(probs.reshape(c, -1), config.crf_unary_clip, 1.0)).astype(np.float32)
    crf = dcrf.DenseCRF2D(w, h, c)
    crf.setUnaryEnergy(np.ascontiguousarray(unary))
    crf.addPairwiseGaussian(sxy=config.crf_gaussian_sxy, compat=config.crf_gaussian_compat)
    # np.array copies: pydensecrf needs a writable buffer (PIL-backed arrays are read-only)
    crf.addPairwiseBilateral(sxy=config.crf_bilateral_sxy, srgb=config.crf_bilateral_srgb,
                             rgbim=np.array(rgb, dtype=np.uint8, order="C"), compat=config.crf_bilateral_compat)
    return np.asarray(crf.inference(config.crf_iterations), dtype=np.float32).reshape(c, h, w)


def crf_label_map(
    rgb: np.ndarray, cams: Tensor, labels: Sequence[int], config: CamRule, background_threshold: float | None = None,
) -> tuple[np.ndarray, dict[int, float]]:
    """Label map (H, W) and per-label mean cam inside its mask after a dense CRF on [background; cams].

    cams: (K, gh, gw) normalised refined cams, upsampled here to the image size of rgb."""
    h, w = rgb.shape[:2]
    if cams.shape[0] == 0:
        return np.zeros((h, w), dtype=np.int32), {}
    up = resize_bilinear(cams, (h, w))
    if config.normalise_after_resize:
        up = normalise_cam(up, config.cam_eps)
    return crf_label_map_upsampled(rgb, up, labels, config, background_threshold)


def crf_label_map_upsampled(
    rgb: np.ndarray, up: Tensor, labels: Sequence[int], config: CamRule, background_threshold: float | None = None,
) -> tuple[np.ndarray, dict[int, float]]:
    """`crf_label_map` for cams already at the image size, (K, H, W). The CRF sees [background;
    cams] (the background row by `background_score`), or the cams alone without a background
    label (COCO-Stuff, as the reference's eval_cam_with_crf_cocostuff.py)."""
    h, w = rgb.shape[:2]
    k = up.shape[0]
    if k == 0:
        return np.zeros((h, w), dtype=np.int32), {}
    up = up.float()
    if config.label_background:
        background = background_score(up, config.background_power, background_threshold)
        probs = torch.cat([background[None], up]).cpu().numpy()
        winner = dense_crf(rgb, probs, config).argmax(axis=0)
    else:
        probs = torch.cat([torch.zeros_like(up[:1]), up]).cpu().numpy()  # row 0 unused: values stay k + 1
        winner = dense_crf(rgb, probs[1:], config).argmax(axis=0) + 1
    lookup = np.array([0, *labels], dtype=np.int32)
    out = lookup[winner]
    value = np.take_along_axis(probs, winner[None], axis=0)[0]
    sums = torch.from_numpy(np.bincount(winner.ravel(), weights=value.ravel(), minlength=k + 1))
    counts = torch.from_numpy(np.bincount(winner.ravel(), minlength=k + 1).astype(np.float64))
    return out, _mean_by_label(sums, counts, [0, *labels])


def parse_thresholds(spec: str) -> list[float]:
    """`--bg-threshold`: "a:b:step" (a, a + step, ..., b inclusive, as CLIP-ES's lists), "t1,t2,..."
    or one value; every value in [0, 1]. Raises UsageError naming the problem."""
    text = spec.strip()
    try:
        if ":" in text:
            parts = [float(p) for p in text.split(":")]
            if len(parts) != 3:
                raise ValueError
            lo, hi, step = parts
            if step <= 0 or hi < lo:
                raise UsageError(f"--bg-threshold {spec}: needs start <= stop and a positive step (e.g. 0.3:0.7:0.05)")
            count = int(round((hi - lo) / step)) + 1
            values = [round(lo + i * step, 10) for i in range(count) if lo + i * step <= hi + 1e-9]
        else:
            values = [float(p) for p in text.split(",")]
    except ValueError:
        raise UsageError(f"--bg-threshold {spec}: not a value, a list a,b,c or a range start:stop:step") from None
    if not values or len(values) > 1000:
        raise UsageError(f"--bg-threshold {spec}: gives {len(values)} values (1 to 1000 allowed)")
    bad = [v for v in values if not 0.0 <= v <= 1.0 or v != v]
    if bad:
        raise UsageError(f"--bg-threshold {spec}: {bad[0]} is outside [0, 1]")
    return values
