"""The evaluation driver: match predictions to ground-truth images and classes, compute the
metrics, and write (JSON) or render (terminal table) the report."""

from __future__ import annotations

import datetime as _dt
import json
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from tagclip_cli import __version__
from tagclip_cli.errors import UsageError
from tagclip_cli.evaluate.classes import match_classes
from tagclip_cli.evaluate.datasets import load_ground_truth
from tagclip_cli.evaluate.ground_truth import GroundTruth, GtImage, ImageIndex
from tagclip_cli.evaluate.metrics import AP_VARIANTS, IGNORE, ConfusionMatrix, ap_per_class, tag_prf
from tagclip_cli.evaluate.predictions import (
    MaskPredictions,
    TagPredictions,
    open_mask_predictions,
    prediction_kind,
    read_tags_parquet,
)
from tagclip_cli.fileio import atomic_path, json_scalar

log = logging.getLogger(__name__)



# Called as progress(advance, total) while images are evaluated.
Progress = Callable[[int, int], None]


@dataclass(frozen=True)
class EvaluateConfig:
    """Settings of one evaluation run (all reported)."""

    gt: str
    root: Path
    pred: Path | None = None  # or cams:
    split: Path | None = None
    ap: str = "paper"
    difficult: str = "positive"
    classes_file: Path | None = None
    vocab: str | None = None
    allow_unmatched: bool = False
    require_all: bool = False
    cams: Path | None = None  # a segment --save-cams directory (instead of pred)
    bg_thresholds: tuple[float, ...] | None = None  # --bg-threshold sweep over the cams
    crf: bool = False  # --crf: the cams through the dense CRF
    images: Path | None = None  # --images: where the CRF finds the images (default: the paths saved)


def match_images(
    gt_images: Sequence[GtImage], candidates: Sequence[tuple[str, ...]], source: Path
) -> tuple[dict[int, int], int]:
    """Map ground-truth image index -> prediction index. Returns also the number of predictions
    that match no ground-truth image. Two predictions for one image are an error."""
    index = ImageIndex(gt_images)
    gt_to_pred: dict[int, int] = {}
    extra = 0
    for j, names in enumerate(candidates):
        i = index.find(names)
        if i is None:
            extra += 1
            continue
        if i in gt_to_pred:
            first = candidates[gt_to_pred[i]][0]
            raise UsageError(f"{source}: '{first}' and '{names[0]}' both match image '{gt_images[i].key}'")
        gt_to_pred[i] = j
    return gt_to_pred, extra


def _image_counts(
    gt: GroundTruth, gt_to_pred: Mapping[int, int], extra: int, failed: int, require_all: bool
) -> dict[str, Any]:
    missing = [im.key for i, im in enumerate(gt.images) if i not in gt_to_pred]
    if not gt_to_pred:
        raise UsageError(
            f"no prediction matches a {gt.name} ground-truth image "
            f"(e.g. ground truth '{gt.images[0].key}'); check --root, --split and --pred"
        )
    if missing:
        message = (
            f"{len(missing)} of {len(gt.images)} ground-truth images have no prediction (e.g. {', '.join(missing[:5])})"
        )
        if require_all:
            raise UsageError(message)
        log.warning("%s; they are left out of the metrics", message)
    if extra:
        log.warning("%d predictions match no ground-truth image in the split; ignored", extra)
    return {
        "ground_truth": len(gt.images),
        "with_prediction": len(gt_to_pred),
        "evaluated": len(gt_to_pred) - failed,
        "failed": failed,
        "missing_prediction": len(missing),
        "missing_examples": missing[:20],
        "predictions_not_in_ground_truth": extra,
    }


AP_DESCRIPTIONS = {
    "paper": "non-interpolated: mean precision at the rank of each positive (docs/algorithm.md §6)",
    "voc07": "VOC2007 11-point interpolated (recall 0, 0.1, ..., 1)",
}
TIES_RULE = (
    "equal scores form one threshold; each positive in a tied group gets the precision after the "
    "whole group (scikit-learn average_precision_score convention)"
)


def evaluate_tags(
    gt: GroundTruth,
    preds: TagPredictions,
    config: EvaluateConfig,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Classification report: per-class AP, mAP, tag precision/recall/F1."""
    match = match_classes(
        preds.classes,
        gt.label_classes,
        synonyms=gt.label_synonyms,
        one_to_one=True,
        allow_unmatched=config.allow_unmatched,
        what=f"{gt.name} ground truth",
    )
    candidates = [(i, p) for i, p in zip(preds.image_ids, preds.paths, strict=True)]
    gt_to_pred, extra = match_images(gt.images, candidates, preds.source)
    pairs = sorted(gt_to_pred.items())
    failed = sum(1 for _, j in pairs if not preds.ok[j])
    images = _image_counts(gt, gt_to_pred, extra, failed, config.require_all)
    pairs = [(i, j) for i, j in pairs if preds.ok[j]]
    if not pairs:
        raise UsageError(f"{preds.source}: every matched prediction has status 'failed'")
    eval_images = [gt.images[i] for i, _ in pairs]
    labels_all = gt.labels(eval_images)
    if progress:
        progress(len(eval_images), len(eval_images))
    columns = [(p, g) for p, g in enumerate(match.pred_to_gt) if g is not None]
    gt_cols = [g for _, g in columns]
    rows = [j for _, j in pairs]
    scores = preds.scores[np.ix_(rows, [p for p, _ in columns])]
    labels = labels_all[:, gt_cols]
    class_of_pred = {preds.classes[p]: k for k, (p, _) in enumerate(columns)}
    tagged = np.zeros(scores.shape, dtype=bool)
    for r, j in enumerate(rows):
        for tag in preds.tags[j]:
            k = class_of_pred.get(tag)
            if k is not None:
                tagged[r, k] = True
    ap = ap_per_class(scores, labels, config.ap)
    prf = tag_prf(tagged, labels)
    evaluated = ~np.isnan(ap)
    skipped = [gt.label_classes[g] for g, ok in zip(gt_cols, evaluated, strict=True) if not ok]
    if skipped:
        log.warning("%d classes have no positive image and are left out of mAP: %s", len(skipped), ", ".join(skipped))
    per_class = []
    for k, g in enumerate(gt_cols):
        valid = labels[:, k] != IGNORE
        per_class.append(
            {
                "class": gt.label_classes[g],
                "pred_class": preds.classes[columns[k][0]],
                "ap": json_scalar(float(ap[k])),
                "positives": int((labels[:, k] == 1).sum()),
                "ignored": int((~valid).sum()),
                "tagged": int(tagged[valid, k].sum()),
                "precision": json_scalar(float(prf["precision"][k])),
                "recall": json_scalar(float(prf["recall"][k])),
                "f1": json_scalar(float(prf["f1"][k])),
            }
        )
    return {
        "task": "classification",
        "images": images,
        "class_matching": match.to_json(),
        "metrics": {
            "mAP": json_scalar(float(ap[evaluated].mean())) if evaluated.any() else None,
            "classes_in_mAP": int(evaluated.sum()),
            "classes_without_positives": skipped,
            "tags_overall": {k: json_scalar(v) for k, v in prf["overall"].items()},
            "tags_per_class_mean": {k: json_scalar(v) for k, v in prf["per_class"].items()},
            "per_class": per_class,
        },
        "metric_settings": {
            "ap": config.ap,
            "ap_definition": AP_DESCRIPTIONS[config.ap],
            "ties": TIES_RULE,
            "classes_without_positives": "skipped (not counted in the mean)",
            "tags": "the `tags` column as written; overall = all (image, class) cells pooled; "
            "per-class mean = mean precision and recall over classes with a positive, F1 of the means",
            "failed_rows": "excluded from every metric, counted in images.failed",
        },
    }


def evaluate_masks(
    gt: GroundTruth,
    preds: MaskPredictions,
    config: EvaluateConfig,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Segmentation report: per-class IoU, mIoU, pixel accuracy from one streaming confusion."""
    if gt.map_classes is None:
        raise UsageError(f"--gt {gt.name} has image-level ground truth only; --pred must be a tags Parquet")
    k = len(gt.map_classes)
    skip = [gt.map_background] if gt.map_background is not None else []
    match = match_classes(
        preds.classes,
        gt.map_classes,
        synonyms=gt.map_synonyms,
        skip_gt=skip,
        one_to_one=not gt.map_synonyms,
        allow_unmatched=config.allow_unmatched,
        what=f"{gt.name} ground truth",
    )
    void = k
    # Prediction value -> ground-truth index: 0 is background (void when the dataset has none).
    lut = np.array(
        [gt.map_background if gt.map_background is not None else void]
        + [g if g is not None else void for g in match.pred_to_gt],
        dtype=np.int32,
    )
    gt_to_pred, extra = match_images(gt.images, [names for names, _ in preds.entries], preds.source)
    images = _image_counts(gt, gt_to_pred, extra, 0, config.require_all)
    confusions = [ConfusionMatrix(k) for _ in preds.variants]
    for i, j in sorted(gt_to_pred.items()):
        image = gt.images[i]
        gt_map = gt.load_map(image)
        for confusion, pred_raw in zip(confusions, preds.load_variants(preds.entries[j][1], *gt_map.shape),
                                       strict=True):
            if pred_raw.shape != gt_map.shape:
                raise UsageError(
                    f"{preds.source}: prediction for '{image.key}' is {pred_raw.shape[1]}x{pred_raw.shape[0]} "
                    f"but the ground truth is {gt_map.shape[1]}x{gt_map.shape[0]}"
                )
            confusion.update(gt_map, lut[pred_raw])
        if progress:
            progress(1, len(gt_to_pred))
    summaries = [c.summary() for c in confusions]
    # A sweep reports every variant and details the best (the first of equals), as eval_cam.py.
    best = max(range(len(summaries)), key=lambda v: (np.nan_to_num(summaries[v]["miou"], nan=-1.0), -v))
    summary, confusion = summaries[best], confusions[best]
    absent = [n for n, p in zip(gt.map_classes, summary["present"], strict=True) if not p]
    per_class = [
        {
            "class": name,
            "iou": json_scalar(float(summary["iou"][c])),
            "gt_pixels": int(summary["gt_pixels"][c]),
            "pred_pixels": int(summary["pred_pixels"][c]),
            "in_mean": bool(summary["present"][c]),
        }
        for c, name in enumerate(gt.map_classes)
    ]
    sweep = {}
    if hasattr(preds, "describe"):  # saved cams (evaluate --cams): the background rule of each variant
        sweep = {
            "sweep": [
                {"bg_threshold": v, "background": preds.describe(v), "mIoU": json_scalar(s["miou"]),
                 "pixel_accuracy": json_scalar(s["pixel_accuracy"])}
                for v, s in zip(preds.variants, summaries, strict=True)
            ],
            "best": {"bg_threshold": preds.variants[best], "background": preds.describe(preds.variants[best])},
            "crf": bool(getattr(preds, "crf", False)),
        }
    return {
        "task": "segmentation",
        "images": images,
        "class_matching": match.to_json(),
        **sweep,
        "metrics": {
            "mIoU": json_scalar(summary["miou"]),
            "pixel_accuracy": json_scalar(summary["pixel_accuracy"]),
            "mean_class_accuracy": json_scalar(summary["mean_class_accuracy"]),
            "classes_in_mIoU": int(summary["present"].sum()),
            "classes_without_gt_pixels": absent,
            "unlabelled_prediction_pixels": summary["void_pixels"],
            "per_class": per_class,
            "confusion": confusion.matrix.tolist(),
        },
        "metric_settings": {
            "miou": "one confusion matrix over all evaluated images; IoU = TP / (GT + Pred - TP); "
            "mean over classes with ground-truth pixels",
            "ignore": "ground-truth 255 (and COCO crowd-only pixels) ignored",
            "background_included": gt.map_background is not None,
            "confusion": "rows = ground truth, columns = prediction, last column = predicted none "
            "of the classes (counts as a miss)",
        },
    }


def evaluate(config: EvaluateConfig, progress: Progress | None = None) -> dict[str, Any]:
    """Run one evaluation and return the full report (JSON-serialisable)."""
    if config.ap not in AP_VARIANTS:
        raise UsageError(f"--ap must be one of {', '.join(AP_VARIANTS)}, not {config.ap}")
    if (config.pred is None) == (config.cams is None):
        raise UsageError("give either --pred (tags or masks) or --cams (a segment --save-cams directory)")
    if config.cams is None and (config.bg_thresholds is not None or config.crf or config.images is not None):
        raise UsageError("--bg-threshold, --crf and --images apply to --cams DIR (saved cams)")
    kind = "cams" if config.cams is not None else prediction_kind(config.pred)
    if config.vocab is not None and kind != "masks-png":
        raise UsageError("--vocab is only for a --pred directory of PNGs")
    if kind == "cams":
        from tagclip_cli.evaluate.sweep import CamPredictions

        cams = CamPredictions(config.cams, config.bg_thresholds, config.crf, config.images)
    gt = load_ground_truth(
        config.gt, config.root, config.split, difficult=config.difficult, classes_file=config.classes_file
    )
    if kind == "cams":
        result = evaluate_masks(gt, cams, config, progress)
    elif kind == "tags":
        result = evaluate_tags(gt, read_tags_parquet(config.pred), config, progress)
    else:
        result = evaluate_masks(gt, open_mask_predictions(config.pred, config.vocab), config, progress)
    return {
        "tool": f"tagclip-cli {__version__}",
        "created": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "settings": {
            "gt": config.gt,
            "root": str(config.root),
            "ground_truth": gt.description,
            "split": gt.split_rule,
            "pred": str(config.pred if config.cams is None else config.cams),
            "pred_kind": kind,
            "allow_unmatched": config.allow_unmatched,
            "notes": list(gt.notes),
        },
        "units": "fractions in [0, 1] (the terminal table shows percentages)",
        **result,
    }


def _json_safe(value: Any) -> Any:
    """NaN -> None and numpy scalars -> Python, recursively (the report is strict JSON)."""
    if isinstance(value, Mapping):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    if isinstance(value, np.ndarray):
        return [_json_safe(v) for v in value.tolist()]
    return json_scalar(value)


def write_report(report: Mapping[str, Any], path: Path) -> None:
    """Write the JSON report atomically (temp file in the same directory, fsync, rename)."""
    report = _json_safe(report)
    path = Path(path)
    directory = path.parent if str(path.parent) else Path(".")
    if not directory.is_dir():
        raise UsageError(f"{path}: directory {directory} does not exist")
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as fh:
        json.dump(report, fh, indent=2, allow_nan=False)
        fh.write("\n")


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.2f}"


def render_report(report: Mapping[str, Any], console: Any) -> None:
    """Print the per-class table and the summary lines with rich (percentages)."""
    from rich.table import Table

    settings = report["settings"]
    images = report["images"]
    metrics = report["metrics"]
    title = f"{settings['gt']} - {report['task']} - {images['evaluated']} images"
    if report["task"] == "classification":
        table = Table(title=title)
        for col in ("class", "AP", "positives", "tagged", "P", "R", "F1"):
            table.add_column(col, justify="left" if col == "class" else "right")
        for row in metrics["per_class"]:
            table.add_row(
                row["class"], _pct(row["ap"]), str(row["positives"]), str(row["tagged"]),
                _pct(row["precision"]), _pct(row["recall"]), _pct(row["f1"]),
            )  # fmt: skip
        overall, per_class = metrics["tags_overall"], metrics["tags_per_class_mean"]
        table.add_section()
        label = "mAP" if report["metric_settings"]["ap"] == "paper" else "mAP (VOC07 11-point)"
        table.add_row(label, _pct(metrics["mAP"]), "", "", "", "", "", style="bold")
        table.add_row("tags overall", "", "", "", _pct(overall["precision"]), _pct(overall["recall"]),
                      _pct(overall["f1"]))  # fmt: skip
        table.add_row("tags per-class mean", "", "", "", _pct(per_class["precision"]),
                      _pct(per_class["recall"]), _pct(per_class["f1"]))  # fmt: skip
        console.print(table)
        if metrics["classes_without_positives"]:
            console.print(f"classes without positives (not in mAP): {', '.join(metrics['classes_without_positives'])}")
    else:
        if "sweep" in report:
            sweep = Table(title=f"{settings['gt']} - background sweep over saved cams"
                                + (" (dense CRF)" if report["crf"] else ""))
            for col in ("background", "mIoU", "pixel accuracy"):
                sweep.add_column(col, justify="left" if col == "background" else "right")
            for row in report["sweep"]:
                sweep.add_row(row["background"], _pct(row["mIoU"]), _pct(row["pixel_accuracy"]))
            console.print(sweep)
            console.print(f"per class at the best: {report['best']['background']}")
        table = Table(title=title)
        for col in ("class", "IoU", "GT pixels", "pred pixels"):
            table.add_column(col, justify="left" if col == "class" else "right")
        for row in metrics["per_class"]:
            iou = _pct(row["iou"]) if row["in_mean"] else f"({_pct(row['iou'])})"
            table.add_row(row["class"], iou, str(row["gt_pixels"]), str(row["pred_pixels"]))
        table.add_section()
        table.add_row("mIoU", _pct(metrics["mIoU"]), "", "", style="bold")
        table.add_row("pixel accuracy", _pct(metrics["pixel_accuracy"]), "", "")
        console.print(table)
        if metrics["classes_without_gt_pixels"]:
            absent = ", ".join(metrics["classes_without_gt_pixels"])
            console.print(f"classes without ground-truth pixels (not in mIoU): {absent}")
    notes = [f"{images['evaluated']} of {images['ground_truth']} ground-truth images evaluated"]
    if images["failed"]:
        notes.append(f"{images['failed']} failed rows excluded")
    if images["missing_prediction"]:
        notes.append(f"{images['missing_prediction']} without prediction")
    console.print("; ".join(notes))
