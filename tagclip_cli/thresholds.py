"""Per-class tag thresholds: the `--thresholds FILE` format, what the outputs record, and the
calibration that picks each class's threshold on labelled images (`tagclip calibrate`).

A tag is kept when its min-max normalised score over the foreground classes is above its class's
threshold, or is the image's argmax when no class passes (docs/algorithm.md §6; the rule itself is
`tagclip_cli.tagclip.tags_from_scores`). The calibration here is pure numpy on those normalised
scores; it imports no model code.

Threshold file: one `class<TAB>threshold` per line, threshold in [0, 1]; blank lines and lines
starting with `#` are ignored; classes not listed keep the default threshold (`--tag-threshold`).
Class names may contain spaces ("potted plant"), hence the tab.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from tagclip_cli.errors import UsageError, with_suggestion
from tagclip_cli.record import RecordIO, RunRecord

__all__ = [
    "DEFAULT_MIN_POSITIVES", "CalibrationResult", "ClassCalibration", "ThresholdFileError", "Thresholds",
    "calibrate", "calibrate_class", "candidate_thresholds", "format_threshold", "normalised_scores",
    "parse_target", "read_threshold_file", "retag_file", "retag_record", "retag_table",
    "thresholds_from_record", "thresholds_record", "write_threshold_file",
]  # fmt: skip

DEFAULT_MIN_POSITIVES = 5  # fewer positive images than this: a class keeps its default threshold


class ThresholdFileError(UsageError):
    """A thresholds file that cannot be used; the message names the file and line (exit code 2)."""


@dataclass(frozen=True)
class Thresholds:
    """The threshold of every foreground class: `default`, except the classes in `per_class`."""

    default: float
    per_class: Mapping[str, float]

    def vector(self, classes: Sequence[str]) -> tuple[float, ...]:
        """(F,) thresholds in vocabulary order (for TagCLIPConfig.class_thresholds)."""
        return tuple(float(self.per_class.get(name, self.default)) for name in classes)



def thresholds_record(default: float, vector: Sequence[float], classes: Sequence[str]) -> dict:
    """What an output made with per-class thresholds records under "thresholds" in its run
    metadata: the default and every class whose threshold differs from it (vocabulary order).
    `annotate`, `segment` and `retag` all record through this, so the same thresholds give the
    same metadata."""
    per_class = {name: float(t) for name, t in zip(classes, vector, strict=True) if float(t) != float(default)}
    return {"default": float(default), "per_class": per_class}


def read_threshold_file(path: str | Path, classes: Sequence[str], default: float) -> Thresholds:
    """Parse a `class<TAB>threshold` file against the vocabulary `classes`.

    Raises ThresholdFileError naming the file and line for: a line without a tab, a class not in
    `classes`, a class listed twice, a threshold that is not a number or is outside [0, 1]."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ThresholdFileError(f"{path}: no such thresholds file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ThresholdFileError(f"{path}: cannot read thresholds file ({exc})") from None
    known = set(classes)
    per_class: dict[str, float] = {}
    for lineno, raw in enumerate(text.splitlines(), start=1):
        line = raw.rstrip("\r")
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        where = f"{path}:{lineno}"
        name, tab, value = line.rpartition("\t")
        name = name.strip()
        if not tab or not name:
            raise ThresholdFileError(f"{where}: expected 'class<TAB>threshold', got {line.strip()!r}")
        if name not in known:
            raise ThresholdFileError(with_suggestion(
                f"{where}: unknown class {name!r} (not one of the {len(classes)} classes)", name, classes))
        if name in per_class:
            raise ThresholdFileError(f"{where}: class {name!r} is listed twice")
        try:
            threshold = float(value.strip())
        except ValueError:
            raise ThresholdFileError(f"{where}: threshold {value.strip()!r} of {name!r} is not a number") from None
        if not (0.0 <= threshold <= 1.0):  # also refuses NaN
            raise ThresholdFileError(f"{where}: threshold {value.strip()} of {name!r} is outside [0, 1]")
        per_class[name] = threshold
    return Thresholds(default=float(default), per_class=per_class)


def format_threshold(value: float) -> str:
    """The shortest decimal that reads back to the same float32 (the precision tags compare in)."""
    return str(np.float32(value))


def write_threshold_file(path: str | Path, thresholds: Mapping[str, float], header: Sequence[str] = ()) -> None:
    """Write `class<TAB>threshold` lines (vocabulary order as given), atomically, after `#` header lines."""
    from tagclip_cli.fileio import write_bytes_atomic

    lines = [f"# {h}" for h in header] + [f"{name}\t{format_threshold(t)}" for name, t in thresholds.items()]
    write_bytes_atomic(("\n".join(lines) + "\n").encode("utf-8"), path)


def thresholds_from_record(record: RunRecord) -> Thresholds:
    """The thresholds a tags file was made with: its recorded "thresholds", else the TagCLIP
    tag_threshold (0.5 when the file records none, e.g. tags taken from another file)."""
    recorded = record.thresholds
    if isinstance(recorded, Mapping):
        return Thresholds(float(recorded.get("default", 0.5)), dict(recorded.get("per_class") or {}))
    default = record.tag_threshold
    return Thresholds(float(0.5 if default is None else default), {})


# ---- calibration ----------------------------------------------------------------------------------


def normalised_scores(scores: np.ndarray) -> np.ndarray:
    """Per image, min-max normalise (N, F) float32 scores over the foreground classes, as the tag
    rule does (`tagclip.minmax`: a constant row maps to 0). Returns (N, F) float32."""
    scores = np.asarray(scores, dtype=np.float32)
    lo = scores.min(axis=1, keepdims=True)
    span = scores.max(axis=1, keepdims=True) - lo
    safe = np.where(span > 0, span, np.float32(1.0))
    return np.where(span > 0, (scores - lo) / safe, np.float32(0.0)).astype(np.float32)


def parse_target(text: str) -> tuple[str, float | None]:
    """`--target`: "f1" (maximise F1), "precision=P" (the highest recall whose precision is >= P)
    or "recall=R" (the highest precision whose recall is >= R). Raises UsageError."""
    text = text.strip().lower()
    if text == "f1":
        return "f1", None
    kind, eq, value = text.partition("=")
    if eq and kind in ("precision", "recall"):
        try:
            level = float(value)
        except ValueError:
            level = math.nan
        if 0.0 < level <= 1.0:
            return kind, level
    raise UsageError(f"--target must be f1, precision=P or recall=R with 0 < P, R <= 1, not {text!r}")


@dataclass(frozen=True)
class ClassCalibration:
    """One class's calibration: the chosen threshold (None: not reachable, keep the default) and
    its precision/recall/F1 on the labelled images under the per-class rule `norm > t` alone."""

    threshold: float | None
    precision: float
    recall: float
    f1: float


def candidate_thresholds(norm: np.ndarray) -> np.ndarray:
    """The thresholds worth trying for one class's (N,) normalised scores: 0, the midpoints between
    consecutive distinct scores, and 1; float32, ascending. Each gives a different kept set
    (`norm > t`), and a midpoint sits as far as possible from the scores on both sides."""
    values = np.unique(np.asarray(norm, dtype=np.float64))
    mids = (values[:-1] + values[1:]) / 2.0
    return np.unique(np.concatenate([[0.0], mids, [1.0]]).astype(np.float32))


def calibrate_class(norm: np.ndarray, positive: np.ndarray, target: str = "f1", level: float | None = None
                    ) -> ClassCalibration:
    """Pick one class's threshold on labelled images.

    norm: (N,) float32 normalised scores of the class; positive: (N,) bool ground truth.
    A threshold t keeps the images with norm > t (float32, as the tag rule compares).
    target "f1": the t of the highest F1 (ties: the lowest t, i.e. the higher recall);
    "precision": the lowest t whose precision >= level (most recall), None if none reaches it;
    "recall": the highest t whose recall >= level (most precision).
    The argmax fallback of the tag rule is left out: it depends on the other classes."""
    norm = np.asarray(norm, dtype=np.float32)
    positive = np.asarray(positive, dtype=bool)
    cands = candidate_thresholds(norm)
    pos_sorted = np.sort(norm[positive])
    neg_sorted = np.sort(norm[~positive])
    # kept = scores strictly above t: count = n - (number <= t)
    tp = len(pos_sorted) - np.searchsorted(pos_sorted, cands, side="right")
    fp = len(neg_sorted) - np.searchsorted(neg_sorted, cands, side="right")
    n_pos = len(pos_sorted)
    kept = tp + fp
    precision = np.where(kept > 0, tp / np.maximum(kept, 1), 0.0)
    recall = tp / n_pos if n_pos else np.zeros(len(cands))
    f1 = np.where(precision + recall > 0, 2 * precision * recall / np.maximum(precision + recall, 1e-300), 0.0)
    if target == "f1":
        best = int(np.argmax(f1))  # the first maximum = the lowest threshold among ties
    elif target == "precision":
        ok = np.flatnonzero((precision >= level) & (kept > 0))
        if not len(ok):
            return ClassCalibration(None, float(precision.max()), 0.0, 0.0)
        best = int(ok[0])
    elif target == "recall":
        ok = np.flatnonzero(recall >= level)
        if not len(ok):
            return ClassCalibration(None, 0.0, float(recall.max()), 0.0)
        best = int(ok[-1])
    else:
        raise ValueError(f"unknown target {target!r}")
    return ClassCalibration(float(cands[best]), float(precision[best]), float(recall[best]), float(f1[best]))


# ---- tagclip retag --------------------------------------------------------------------------------


def retag_record(record: RunRecord, classes: Sequence[str], default: float,
                 vector: Sequence[float] | None) -> RunRecord:
    """The run record of a retagged file: the input's, with the tag threshold and per-class
    thresholds it was retagged with, exactly as `annotate` with those options records them."""
    changes: dict = {"thresholds": thresholds_record(default, vector, classes) if vector is not None else None}
    for key in ("tagclip", "tagger"):  # TagCLIP's settings, or another tagging method's (PIAA)
        settings = getattr(record, key)
        if isinstance(settings, Mapping):
            changes[key] = {**json.loads(json.dumps(settings)), "tag_threshold": float(default)}
    return RecordIO.with_changes(record, **changes)


def _tag_matrix_of(tags: pa.Array, classes: Sequence[str]) -> np.ndarray:
    """(N, F) bool: the classes named in each row's tags list (names not in classes are dropped)."""
    import pyarrow.compute as pc

    n = len(tags)
    out = np.zeros((n, len(classes)), dtype=bool)
    names = pc.list_flatten(tags)
    if len(names):
        rows = pc.list_parent_indices(tags).to_numpy()
        cols = pc.index_in(names, value_set=pa.array(list(classes), pa.string())).to_numpy(zero_copy_only=False)
        known = ~np.isnan(cols.astype(np.float64)) if cols.dtype.kind == "f" else np.ones(len(cols), bool)
        out[rows[known], cols[known].astype(np.int64)] = True
    return out


def retag_table(table: pa.Table, classes: Sequence[str], threshold: float | Sequence[float], source: Path,
                first_row: int = 0) -> tuple[pa.Table, int]:
    """(`table` (tags Parquet rows) with the `tags` of its ok rows re-derived from `scores`, the
    number of ok rows whose tags changed). The rule is `tagclip.tag_matrix`: the same float32
    arithmetic as annotate; the tags are listed in class order, as annotate lists them. Failed
    rows are kept as they are. Vectorised with Arrow and numpy (no Python loop over rows).
    Raises FormatError for an ok row whose scores do not fit the classes."""
    import pyarrow.compute as pc
    import torch

    from tagclip_cli.errors import FormatError
    from tagclip_cli.tagclip import tag_matrix

    n_classes = len(classes)
    ok = pc.fill_null(pc.equal(table.column("status"), "ok"), False).combine_chunks()
    ok_np = ok.to_numpy(zero_copy_only=False)
    scores = pc.filter(table.column("scores"), ok).combine_chunks()
    lengths = pc.fill_null(pc.list_value_length(scores), -1).to_numpy(zero_copy_only=False)
    rows = np.flatnonzero(ok_np)
    if (lengths != n_classes).any():
        k = int(np.flatnonzero(lengths != n_classes)[0])
        got = "no" if lengths[k] < 0 else int(lengths[k])
        raise FormatError(f"{source}: row {first_row + rows[k]} has {got} scores, expected {n_classes} (one per class)")
    matrix = np.ascontiguousarray(
        pc.list_flatten(scores).to_numpy(zero_copy_only=False).astype(np.float32).reshape(len(rows), n_classes))
    if not np.isfinite(matrix).all():
        k = int(np.flatnonzero(~np.isfinite(matrix).all(axis=1))[0])
        raise FormatError(f"{source}: row {first_row + rows[k]} has NaN or infinite scores")
    thr = threshold if isinstance(threshold, float) else torch.tensor(list(threshold), dtype=torch.float32)
    keep = tag_matrix(torch.from_numpy(matrix), thr).numpy() if len(rows) else np.zeros((0, n_classes), bool)
    old = table.column("tags").combine_chunks()
    changed = int((keep != _tag_matrix_of(pc.filter(old, ok), classes)).any(axis=1).sum())
    # the new tags of every row: ok rows from `keep`, failed rows their old list
    per_row = np.zeros(table.num_rows, dtype=np.int64)
    per_row[rows] = keep.sum(axis=1)
    r, c = np.nonzero(keep)
    names = pa.array(list(classes), pa.string()).take(pa.array(c)) if len(c) else pa.array([], pa.string())
    tags_type = table.schema.field("tags").type
    if ok_np.all():
        offsets = np.concatenate([[0], np.cumsum(per_row)]).astype(np.int32)
        new = pa.ListArray.from_arrays(pa.array(offsets), names).cast(tags_type)
    else:  # failed rows keep what they had (rare: a Python merge of this batch is fine)
        fresh = iter(pa.ListArray.from_arrays(
            pa.array(np.concatenate([[0], np.cumsum(keep.sum(axis=1))]).astype(np.int32)), names).to_pylist())
        new = pa.array([next(fresh) if is_ok else old_tags for is_ok, old_tags in zip(ok_np, old.to_pylist(),
                                                                                     strict=True)], type=tags_type)
    position = table.schema.get_field_index("tags")
    return table.set_column(position, table.schema.field("tags"), new), changed


def retag_file(src: Path, out: Path, thresholds_file: Path | None, tag_threshold: float | None) -> tuple[int, int]:
    """`tagclip retag`: write `out`, a copy of the tags Parquet `src` with every ok row's tags
    re-derived from its stored scores under the new thresholds (no model), atomically and
    streaming. The default threshold is tag_threshold, else the one src was made with.
    Returns (rows, rows whose tags changed)."""
    from tagclip_cli.formats import iter_tag_tables, read_tags_schema, tag_classes, tags_arrow_schema
    from tagclip_cli.writers import write_parquet_atomic

    record = read_tags_schema(src)
    classes = tag_classes(src, record)
    default = float(tag_threshold) if tag_threshold is not None else thresholds_from_record(record).default
    vector = read_threshold_file(thresholds_file, classes, default).vector(classes) if thresholds_file else None
    schema = tags_arrow_schema(src)
    schema = schema.with_metadata({**(schema.metadata or {}),
                                   **RecordIO.metadata(retag_record(record, classes, default, vector))})
    threshold: float | Sequence[float] = vector if vector is not None else default
    changed = 0
    seen = 0

    def tables():
        nonlocal changed, seen
        for table in iter_tag_tables(src):
            new, differ = retag_table(table, classes, threshold, src, seen)
            changed += differ
            seen += table.num_rows
            yield new

    rows = write_parquet_atomic(tables(), out, schema)
    return rows, changed


# ---- tagclip calibrate ----------------------------------------------------------------------------


@dataclass
class CalibrationResult:
    """What `tagclip calibrate` found: per prediction class (vocabulary order) the threshold before
    and after, why it kept the old one (None: calibrated), and the per-class P/R/F1 of the tags
    before (the file's tags column) and after (re-derived with the new thresholds), on the
    labelled images; `overall` pools every (image, class) cell."""

    classes: tuple[str, ...]
    gt_names: tuple[str | None, ...]
    positives: list[int]
    before: list[float]
    after: list[float]
    kept_because: list[str | None]
    prf_before: dict[str, Any]
    prf_after: dict[str, Any]
    images: int
    target: str


def _calibrated(norm: np.ndarray, labels: np.ndarray, before: list[float], pred_to_gt: Sequence[int | None],
                positives: list[int], target: str, min_positives: int) -> tuple[list[float], list[str | None]]:
    """(thresholds after calibration, why each kept class kept its threshold) from the (n, f)
    normalised scores and labels (1 positive, 0 negative, IGNORE)."""
    from tagclip_cli.evaluate.metrics import IGNORE

    kind, level = parse_target(target)
    after = list(before)
    kept: list[str | None] = [None] * len(before)
    for p in range(len(before)):
        if pred_to_gt[p] is None:
            kept[p] = "not in the ground truth"
            continue
        if positives[p] < min_positives:
            kept[p] = f"{positives[p]} positive image(s) < {min_positives}"
            continue
        valid = labels[:, p] != IGNORE
        result = calibrate_class(norm[valid, p], labels[valid, p] == 1, kind, level)
        if result.threshold is None:
            kept[p] = f"{target} not reachable"
            continue
        after[p] = result.threshold
    return after, kept


def calibrate(
    gt_name: str,
    root: Path,
    pred: Path,
    target: str = "f1",
    *,
    split: Path | None = None,
    difficult: str = "positive",
    classes_file: Path | None = None,
    allow_unmatched: bool = False,
    min_positives: int = DEFAULT_MIN_POSITIVES,
) -> CalibrationResult:
    """Pick each class's threshold on the labelled images of `gt_name` (any `tagclip evaluate`
    ground truth: `evaluate.REGISTRY`), matching classes by name and images by file name as
    evaluate does. Classes with fewer than min_positives positive images, classes the ground
    truth lacks, and classes whose target cannot be reached keep the threshold the tags file was
    made with (a warning each)."""
    import torch

    from tagclip_cli.evaluate import load_ground_truth, match_classes, match_images, read_tags_parquet
    from tagclip_cli.evaluate.metrics import IGNORE, tag_prf
    from tagclip_cli.tagclip import tag_matrix

    parse_target(target)  # a bad target fails before the ground truth is read
    gt = load_ground_truth(gt_name, root, split, difficult=difficult, classes_file=classes_file)
    preds = read_tags_parquet(pred)
    match = match_classes(preds.classes, gt.label_classes, synonyms=gt.label_synonyms, one_to_one=True,
                          allow_unmatched=allow_unmatched, what=f"{gt.name} ground truth")
    gt_to_pred, _extra = match_images(gt.images, list(zip(preds.image_ids, preds.paths, strict=True)), preds.source)
    pairs = [(i, j) for i, j in sorted(gt_to_pred.items()) if preds.ok[j]]
    if not pairs:
        raise UsageError(f"{pred}: no ok prediction matches a {gt.name} ground-truth image; check --root and --pred")
    labels_gt = gt.labels([gt.images[i] for i, _ in pairs])
    rows = [j for _, j in pairs]
    scores = preds.scores[rows]
    n, f = scores.shape
    labels = np.full((n, f), IGNORE, dtype=np.int64)  # classes the ground truth lacks: ignored
    for p, g in enumerate(match.pred_to_gt):
        if g is not None:
            labels[:, p] = labels_gt[:, g]
    before = list(thresholds_from_record(preds.record).vector(preds.classes))
    positives = [int((labels[:, p] == 1).sum()) for p in range(f)]
    after, kept = _calibrated(normalised_scores(scores), labels, before, match.pred_to_gt, positives, target,
                              min_positives)
    tagged_before = np.zeros((n, f), dtype=bool)
    position = {name: i for i, name in enumerate(preds.classes)}
    for r, j in enumerate(rows):
        for tag in preds.tags[j]:
            tagged_before[r, position[tag]] = True
    tagged_after = tag_matrix(torch.from_numpy(scores), torch.tensor(after, dtype=torch.float32)).numpy()
    return CalibrationResult(
        classes=preds.classes,
        gt_names=tuple(gt.label_classes[g] if g is not None else None for g in match.pred_to_gt),
        positives=positives, before=before, after=after, kept_because=kept,
        prf_before=tag_prf(tagged_before, labels), prf_after=tag_prf(tagged_after, labels),
        images=n, target=target,
    )
