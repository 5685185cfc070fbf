"""Metrics in pure numpy: AP (paper and VOC07), tag precision/recall/F1, the pixel confusion and
mIoU. Rules in the package docstring (`tagclip_cli.evaluate`); AP: docs/algorithm.md §6."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

IGNORE = -1  # ground-truth pixel / label excluded from every count
AP_VARIANTS = ("paper", "voc07")



def _threshold_curve(scores: np.ndarray, positives: np.ndarray) -> tuple[np.ndarray, ...]:
    """Precision, recall and number of positives at each distinct score, highest first."""
    order = np.argsort(-scores, kind="stable")
    sorted_scores = scores[order]
    sorted_pos = positives[order]
    tp = np.cumsum(sorted_pos)
    # The last index of each run of equal scores: one threshold per distinct score.
    ends = np.flatnonzero(np.r_[sorted_scores[1:] != sorted_scores[:-1], True])
    tp_at = tp[ends].astype(np.float64)
    precision = tp_at / (ends + 1)
    recall = tp_at / tp[-1]
    new_positives = np.diff(np.r_[0.0, tp_at])
    return precision, recall, new_positives


def average_precision(scores: np.ndarray, positives: np.ndarray, variant: str = "paper") -> float:
    """AP of one class. ``scores`` (N,) float, ``positives`` (N,) bool. NaN if no positive.

    ``paper``: mean of the precision at the rank of each positive; tied scores share the
    precision measured after the whole tied group (rules in the `tagclip_cli.evaluate` docstring).
    ``voc07``: mean over recall levels 0, 0.1, ..., 1 of the best precision at recall >= level.
    """
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    positives = np.asarray(positives, dtype=bool).reshape(-1)
    if scores.shape != positives.shape:
        raise ValueError(f"scores {scores.shape} and positives {positives.shape} differ in shape")
    if not positives.any():
        return math.nan
    if not np.isfinite(scores).all():
        raise ValueError("scores contain NaN or infinity")
    precision, recall, new_positives = _threshold_curve(scores, positives)
    if variant == "paper":
        return float((new_positives * precision).sum() / new_positives.sum())
    if variant == "voc07":
        points = []
        for level in np.linspace(0.0, 1.0, 11):
            reached = recall >= level - 1e-12
            points.append(precision[reached].max() if reached.any() else 0.0)
        return float(np.mean(points))
    raise ValueError(f"unknown AP variant {variant!r} (choose from {', '.join(AP_VARIANTS)})")


def ap_per_class(scores: np.ndarray, labels: np.ndarray, variant: str = "paper") -> np.ndarray:
    """AP per column. ``scores`` (N, C) float; ``labels`` (N, C) int: 1 positive, 0 negative,
    ``IGNORE`` (-1) left out of that column. Returns (C,) float64, NaN for classes without a
    positive."""
    scores = np.asarray(scores)
    labels = np.asarray(labels)
    if scores.shape != labels.shape or scores.ndim != 2:
        raise ValueError(f"scores {scores.shape} and labels {labels.shape} must be the same (N, C)")
    out = np.full(scores.shape[1], math.nan)
    for c in range(scores.shape[1]):
        keep = labels[:, c] != IGNORE
        out[c] = average_precision(scores[keep, c], labels[keep, c] == 1, variant)
    return out


def _ratio(num: float, den: float) -> float:
    return float(num / den) if den > 0 else 0.0


def _f1(precision: float, recall: float) -> float:
    return 2 * precision * recall / (precision + recall) if precision + recall > 0 else 0.0


def tag_prf(predicted: np.ndarray, labels: np.ndarray) -> dict[str, Any]:
    """Precision / recall / F1 of predicted tags. ``predicted`` (N, C) bool; ``labels`` (N, C) int
    (1, 0, ``IGNORE``).

    Returns ``overall`` (all cells pooled), ``per_class`` (mean of per-class precision and recall
    over classes with a positive, F1 of the means; a class never predicted has precision 0) and
    per-class arrays ``precision``, ``recall``, ``f1``, ``tp``, ``fp``, ``fn``.
    """
    predicted = np.asarray(predicted, dtype=bool)
    labels = np.asarray(labels)
    valid = labels != IGNORE
    truth = labels == 1
    tp = (predicted & truth & valid).sum(axis=0)
    fp = (predicted & ~truth & valid).sum(axis=0)
    fn = (~predicted & truth & valid).sum(axis=0)
    precision = np.array([_ratio(t, t + f) for t, f in zip(tp, fp, strict=True)])
    recall = np.array([_ratio(t, t + f) if t + f > 0 else math.nan for t, f in zip(tp, fn, strict=True)])
    f1 = np.array([_f1(p, r) if not math.isnan(r) else math.nan for p, r in zip(precision, recall, strict=True)])
    has_pos = (tp + fn) > 0
    overall_p = _ratio(tp.sum(), tp.sum() + fp.sum())
    overall_r = _ratio(tp.sum(), tp.sum() + fn.sum())
    class_p = float(precision[has_pos].mean()) if has_pos.any() else math.nan
    class_r = float(recall[has_pos].mean()) if has_pos.any() else math.nan
    return {
        "overall": {"precision": overall_p, "recall": overall_r, "f1": _f1(overall_p, overall_r)},
        "per_class": {
            "precision": class_p,
            "recall": class_r,
            "f1": _f1(class_p, class_r) if has_pos.any() else math.nan,
        },
        "precision": precision,
        "recall": recall,
        "f1": f1,
        "tp": tp,
        "fp": fp,
        "fn": fn,
    }


class ConfusionMatrix:
    """Pixel confusion ``(K, K+1)`` accumulated one image at a time.

    Row = ground-truth class, column = predicted class; the last column counts pixels predicted
    as none of the K classes ("void"). Ground-truth pixels equal to ``IGNORE`` are skipped.
    """

    def __init__(self, num_classes: int) -> None:
        self.num_classes = num_classes
        self.matrix = np.zeros((num_classes, num_classes + 1), dtype=np.int64)

    def update(self, gt: np.ndarray, pred: np.ndarray) -> None:
        """Add one image. ``gt`` (H, W) int in [0, K) or IGNORE; ``pred`` (H, W) int in [0, K]."""
        if gt.shape != pred.shape:
            raise ValueError(f"ground truth {gt.shape} and prediction {pred.shape} differ in shape")
        k = self.num_classes
        keep = gt != IGNORE
        g = gt[keep].astype(np.int64)
        p = pred[keep].astype(np.int64)
        if g.size and (g.min() < 0 or g.max() >= k):
            raise ValueError(f"ground-truth values outside [0, {k})")
        if p.size and (p.min() < 0 or p.max() > k):
            raise ValueError(f"prediction values outside [0, {k}]")
        self.matrix += np.bincount(g * (k + 1) + p, minlength=k * (k + 1)).reshape(k, k + 1)

    def summary(self) -> dict[str, Any]:
        """mIoU over classes with ground-truth pixels, per-class IoU (C,), pixel accuracy,
        mean class accuracy, and the per-class pixel counts."""
        k = self.num_classes
        m = self.matrix
        tp = np.diag(m[:, :k]).astype(np.float64)
        gt_pixels = m.sum(axis=1).astype(np.float64)
        pred_pixels = m[:, :k].sum(axis=0).astype(np.float64)
        union = gt_pixels + pred_pixels - tp
        with np.errstate(divide="ignore", invalid="ignore"):
            iou = np.where(union > 0, tp / union, math.nan)
            accuracy = np.where(gt_pixels > 0, tp / gt_pixels, math.nan)
        present = gt_pixels > 0
        total = m.sum()
        return {
            "miou": float(iou[present].mean()) if present.any() else math.nan,
            "iou": iou,
            "pixel_accuracy": float(tp.sum() / total) if total else math.nan,
            "mean_class_accuracy": float(accuracy[present].mean()) if present.any() else math.nan,
            "gt_pixels": gt_pixels.astype(np.int64),
            "pred_pixels": pred_pixels.astype(np.int64),
            "void_pixels": int(m[:, k].sum()),
            "present": present,
        }

