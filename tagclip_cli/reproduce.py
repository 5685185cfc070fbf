"""`tagclip reproduce`: the TagCLIP paper's eight numbers in one resumable run.

Rows (docs/algorithm.md §11 for the settings; every run with `--reference-compat`):

* VOC2007 and COCO2014 mAP: `annotate` (vocabularies voc, coco) then `evaluate --gt voc2007 / coco2014`.
* opt-in (`--rows`): SCLIP + PIAA on VOC2007 and COCO2014 (docs/algorithm.md §13), `annotate --method
  piaa --setting voc / coco` fitted, as the authors, on VOC2007 trainval / the COCO train2014 images
  when the root has them (else on the evaluated images, said in the row's note), then `evaluate`.
* opt-in (`--rows`): NACLIP / SCLIP / ClearCLIP + ResCLIP and SC-CLIP on VOC2012 and COCO-Object
  (docs/algorithm.md §14, §15), `segment --method ...` then `evaluate`, against their papers' numbers.
* VOC2012, COCO-Object and COCO-Stuff-27 mIoU: `segment --save-cams` (settings voc, coco, cocostuff;
  vocabularies voc, coco, coco-stuff) then `evaluate` of its masks; the "+ CRF" rows are
  `evaluate --cams --crf` over the cams that run saved, which is the reference's own order (its
  eval_cam_with_crf scripts read the saved cams), so each dataset is segmented once.

Each row works in OUT/<row>/ (the image list, the tags / masks / cams, report.json); a row whose
report.json exists is done and a rerun skips it, and an interrupted annotate / segment resumes
(jobs/). The table compares ours with the paper and with the reference repository's own run.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tagclip_cli import defaults
from tagclip_cli.errors import UsageError

log = logging.getLogger(__name__)

PAPER = "TagCLIP paper (Lin et al., AAAI 2024, arXiv 2312.12828), as quoted in the TagCLIP README"
REFERENCE = "linyq2117/TagCLIP README, 'Results': the rows '(this repo)', the authors' run of their code"


@dataclass(frozen=True)
class Row:
    """One number of the paper: how to compute it and what was published."""

    name: str
    title: str
    dataset: str  # the ReproduceOptions root it needs: voc2007, voc2012, coco2014, coco2017, cocostuff
    metric: str  # "mAP" or "mIoU"
    gt: str  # evaluate --gt
    paper: float
    reference: float | None  # None: no separate run of the authors' repository is published
    setting: str | None = None  # segment --setting (None: an annotate row)
    vocab: str = "voc"
    crf_of: str | None = None  # a CRF row: evaluate --cams --crf over this row's saved cams
    method: str = "clses"  # segment --method
    rcs: bool = False  # segment --rcs (ResCLIP on method)
    piaa: str | None = None  # annotate --method piaa --setting (an annotate row with PIAA)


ROWS: tuple[Row, ...] = (
    Row("voc2007-map", "VOC2007 test, mAP", "voc2007", "mAP", "voc2007", 92.8, 92.8, vocab="voc"),
    Row("coco2014-map", "COCO2014 val, mAP", "coco2014", "mAP", "coco2014", 68.8, 68.7, vocab="coco"),
    Row("voc2012-miou", "VOC2012 val, CLS-SEG mIoU", "voc2012", "mIoU", "voc2012", 64.8, 64.7, "voc", "voc"),
    Row("voc2012-miou-crf", "VOC2012 val, CLS-SEG + CRF mIoU", "voc2012", "mIoU", "voc2012", 68.7, 68.6,
        vocab="voc", crf_of="voc2012-miou"),
    Row("coco-object-miou", "COCO-Object (val2017), CLS-SEG mIoU", "coco2017", "mIoU", "coco-object", 34.0, 34.0,
        "coco", "coco"),
    Row("coco-object-miou-crf", "COCO-Object (val2017), CLS-SEG + CRF mIoU", "coco2017", "mIoU", "coco-object",
        35.3, 35.2, vocab="coco", crf_of="coco-object-miou"),
    Row("coco-stuff-27-miou", "COCO-Stuff-27 (val2017), CLS-SEG mIoU", "cocostuff", "mIoU", "coco-stuff-27", 30.1,
        30.3, "cocostuff", "coco-stuff"),
    Row("coco-stuff-27-miou-crf", "COCO-Stuff-27 (val2017), CLS-SEG + CRF mIoU", "cocostuff", "mIoU",
        "coco-stuff-27", 31.0, 31.1, vocab="coco-stuff", crf_of="coco-stuff-27-miou"),
)
PAPER_ROWS = tuple(r.name for r in ROWS)  # the TagCLIP paper's eight: the default selection
# The other training-free segmenters' published ViT-B/16 mIoU (docs/algorithm.md §14, §15), opt-in
# with --rows; the paper column is each method's own paper (README "Compare methods").
ROWS += (
    Row("voc2012-miou-resclip", "VOC2012 val, NACLIP + ResCLIP mIoU", "voc2012", "mIoU", "voc2012", 61.1, None,
        "voc", "voc", method="resclip"),
    Row("coco-object-miou-resclip", "COCO-Object (val2017), NACLIP + ResCLIP mIoU", "coco2017", "mIoU",
        "coco-object", 35.0, None, "coco", "coco", method="resclip"),
    Row("voc2012-miou-sclip-resclip", "VOC2012 val, SCLIP + ResCLIP mIoU", "voc2012", "mIoU", "voc2012", 60.7,
        None, "voc", "voc", method="sclip", rcs=True),
    Row("coco-object-miou-sclip-resclip", "COCO-Object (val2017), SCLIP + ResCLIP mIoU", "coco2017", "mIoU",
        "coco-object", 34.3, None, "coco", "coco", method="sclip", rcs=True),
    Row("voc2012-miou-clearclip-resclip", "VOC2012 val, ClearCLIP + ResCLIP mIoU", "voc2012", "mIoU", "voc2012",
        59.0, None, "voc", "voc", method="clearclip", rcs=True),
    Row("coco-object-miou-clearclip-resclip", "COCO-Object (val2017), ClearCLIP + ResCLIP mIoU", "coco2017",
        "mIoU", "coco-object", 34.0, None, "coco", "coco", method="clearclip", rcs=True),
    Row("voc2012-miou-scclip", "VOC2012 val, SC-CLIP mIoU", "voc2012", "mIoU", "voc2012", 64.6, None, "voc", "voc",
        method="scclip"),
    Row("coco-object-miou-scclip", "COCO-Object (val2017), SC-CLIP mIoU", "coco2017", "mIoU", "coco-object", 37.7,
        None, "coco", "coco", method="scclip"),
)
# PIAA's published ViT-B/16 mAP with SCLIP's patch features (docs/algorithm.md §13), opt-in.
ROWS += (
    Row("voc2007-map-piaa", "VOC2007 test, SCLIP + PIAA mAP", "voc2007", "mAP", "voc2007", 91.7, None, vocab="voc",
        piaa="voc"),
    Row("coco2014-map-piaa", "COCO2014 val, SCLIP + PIAA mAP", "coco2014", "mAP", "coco2014", 73.0, None,
        vocab="coco", piaa="coco"),
)
ROW_NAMES = tuple(r.name for r in ROWS)
DATASETS = ("voc2007", "voc2012", "coco2014", "coco2017", "cocostuff")


@dataclass
class ReproduceOptions:
    """What `tagclip reproduce` was given. roots: dataset name (DATASETS) -> its root directory."""

    out: Path
    roots: dict[str, Path]
    model: Any  # pipeline.ModelOptions
    rows: tuple[str, ...] = PAPER_ROWS
    cocostuff_split: Path | None = None  # e.g. the reference's imageset/cocostuff/val.txt (4,172 images)
    batch_size: int = defaults.BATCH_SIZE
    workers: int = defaults.WORKERS
    progress: Callable | None = None  # pipeline.ProgressFactory


@dataclass
class RowResult:
    row: Row
    status: str  # "done", "skipped" (already done), "not run"
    value: float | None = None  # percent
    images: int | None = None
    note: str = ""
    report: Path | None = None
    details: dict = field(default_factory=dict)


# ---- image lists from the ground truths ------------------------------------------------------------

def _first_dir(candidates: Sequence[Path], what: str) -> Path:
    for path in candidates:
        if path.is_dir():
            return path
    raise UsageError(f"no {what} folder (looked in {', '.join(str(p) for p in candidates)})")


def image_list(row: Row, opts: ReproduceOptions) -> tuple[Path, list[str]]:
    """(image root, image paths relative to it) of the ground-truth images of a row, in split order."""
    from tagclip_cli.evaluate import load_ground_truth

    root = opts.roots[row.dataset]
    if row.dataset == "cocostuff":
        gt = load_ground_truth(row.gt, root, opts.cocostuff_split)
        coco = opts.roots.get("coco2017")
        if coco is None:
            raise UsageError("the COCO-Stuff rows segment the COCO val2017 images: give --coco2017 too")
        images = _first_dir([coco / "val2017", coco / "images" / "val2017"], "COCO val2017 image")
        return images, [f"{Path(im.key).name}.jpg" for im in gt.images]
    gt = load_ground_truth(row.gt, root)
    if row.dataset in ("voc2007", "voc2012"):
        base = gt.root if row.dataset == "voc2007" else gt.root.parent  # VOCdevkit/VOC20xx
        images = _first_dir([base / "JPEGImages"], f"{row.dataset} JPEGImages")
        return images, [f"{im.key}.jpg" for im in gt.images]
    split = "val2014" if row.dataset == "coco2014" else "val2017"
    images = _first_dir([root / split, root / "images" / split, Path(gt.root).parent.parent / split],
                        f"COCO {split} image")
    return images, [im.alt_keys[-1] for im in gt.images]  # CocoInstances: alt_keys = (id, file_name)


# ---- one row --------------------------------------------------------------------------------------

def _run_model(row: Row, opts: ReproduceOptions, work: Path) -> tuple[Path, int]:
    """annotate (tags.parquet) or segment --save-cams (masks.json, cams/) of a row, and how many
    images failed (they are left out of the metric); resumes an interrupted run."""
    from tagclip_cli.methods import configure
    from tagclip_cli.pipeline import AnnotateOptions, SegmentOptions, run_annotate, run_segment
    from tagclip_cli.quirks import Quirks
    from tagclip_cli.sources import read_path_list
    from tagclip_cli.tagclip import TagCLIPConfig
    from tagclip_cli.vocab import load_vocabulary

    image_root, names = image_list(row, opts)
    work.mkdir(parents=True, exist_ok=True)
    (work / "images.txt").write_text("".join(f"{n}\n" for n in names), encoding="utf-8")
    items = read_path_list(names, image_root, str(work / "images.txt"))
    vocab = load_vocabulary(row.vocab)
    common = {"items": items, "vocab": vocab, "model": opts.model, "batch_size": opts.batch_size,
              "workers": opts.workers, "quirks": Quirks.reference()}
    if row.piaa is not None:
        return _run_piaa(row, opts, work, image_root, common)
    if row.setting is None:
        out = work / "tags.parquet"
        summary = run_annotate(AnnotateOptions(out=out, tagclip=TagCLIPConfig(), **common),
                               opts.progress)
        return out, summary.failed + summary.failed_before
    tagclip = TagCLIPConfig.coco_stuff() if row.setting == "cocostuff" else TagCLIPConfig()
    cams = work / "cams" if row.method == "clses" else None
    seg = configure(row.method, row.setting, save_cams="image" if cams else None, rcs=row.rcs)
    out = work / "masks.json"
    summary = run_segment(SegmentOptions(out=out, tagclip=tagclip, segment=seg, cams_dir=cams, method=row.method,
                                         **common), opts.progress)
    return out, summary.failed + summary.failed_before


def piaa_fit_input(row: Row, opts: ReproduceOptions) -> Path | None:
    """What a PIAA row fits on, as the authors: VOC2007's ImageSets/Main/trainval.txt, COCO's
    train2014/ folder, when the root has it; None: the evaluated images themselves."""
    root = Path(opts.roots[row.dataset])
    if row.dataset == "voc2007":
        found = [base / "ImageSets" / "Main" / "trainval.txt" for base in (root, root / "VOC2007")]
    else:
        found = [root / "train2014", root / "images" / "train2014"]
    return next((path for path in found if path.exists()), None)


def _run_piaa(row: Row, opts: ReproduceOptions, work: Path, image_root: Path, common: dict) -> tuple[Path, int]:
    """A PIAA row: the fit (on `piaa_fit_input`, else the evaluated images), then the tags."""
    from tagclip_cli.methods import get
    from tagclip_cli.piaajob import PiaaOptions, run_annotate_piaa
    from tagclip_cli.pipeline import AnnotateOptions
    from tagclip_cli.sources import collect_items, read_path_list
    from tagclip_cli.tagclip import TagCLIPConfig

    fit_on = piaa_fit_input(row, opts)
    fit_items = None
    if fit_on is not None and fit_on.suffix == ".txt":  # VOC ids, the images beside the test ones
        names = [f"{line.strip()}.jpg" for line in fit_on.read_text().splitlines() if line.strip()]
        fit_items = read_path_list(names, image_root, str(fit_on))
    elif fit_on is not None:
        fit_items = collect_items(str(fit_on))
    piaa = PiaaOptions(get("piaa", "tags").config(row.piaa), row.piaa, None, fit_items,
                       None if fit_on is None else str(fit_on))
    out = work / "tags.parquet"
    summary = run_annotate_piaa(AnnotateOptions(out=out, tagclip=TagCLIPConfig(), **common), piaa, opts.progress)
    return out, summary.failed + summary.failed_before


def run_row(row: Row, opts: ReproduceOptions) -> RowResult:
    """Compute one row in OUT/<row>/ unless its report.json is there (then read it)."""
    from tagclip_cli import evaluate as ev
    from tagclip_cli.cams import crf_available

    work = opts.out / row.name
    report_path = work / "report.json"
    needs = [row.dataset] + (["coco2017"] if row.dataset == "cocostuff" else [])  # COCO-Stuff: val2017 images
    missing = [name for name in needs if name not in opts.roots]
    if missing:
        return RowResult(row, "not run", note=f"no {' / '.join('--' + m for m in missing)} root given")
    if row.crf_of is not None and not crf_available():
        return RowResult(row, "not run", note="the CRF needs pip install 'tagclip-cli[crf]'")
    status = "skipped"
    if not report_path.is_file():
        status = "done"
        root = opts.roots[row.dataset]
        split = opts.cocostuff_split if row.dataset == "cocostuff" else None
        if row.crf_of is not None:
            base = opts.out / row.crf_of
            if not (base / "masks.json").is_file():
                _run_model(next(r for r in ROWS if r.name == row.crf_of), opts, base)
            config = ev.EvaluateConfig(gt=row.gt, root=root, split=split, cams=base / "cams", crf=True)
        else:
            pred, failed = _run_model(row, opts, work)
            if failed:
                log.warning("%s: %d images failed and are left out (see %s)", row.name, failed, pred)
            config = ev.EvaluateConfig(gt=row.gt, root=root, split=split, pred=pred)
        log.info("%s: evaluating", row.name)
        work.mkdir(parents=True, exist_ok=True)
        ev.write_report(ev.evaluate(config), report_path)  # last: its presence marks the row done
    report = json.loads(report_path.read_text(encoding="utf-8"))
    value = report["metrics"]["mAP" if row.metric == "mAP" else "mIoU"]
    note = ""
    if row.piaa is not None:
        fit_on = piaa_fit_input(row, opts)
        note = f"fitted on {fit_on.name}" if fit_on is not None else \
            "fitted on the evaluated images (the paper: on trainval / train2014)"
    return RowResult(row, status, None if value is None else 100 * value, report["images"]["evaluated"],
                     note=note, report=report_path)


def run_reproduce(opts: ReproduceOptions) -> list[RowResult]:
    """Every selected row in ROWS order; writes OUT/results.json."""
    from tagclip_cli.fileio import write_json_atomic

    unknown = [r for r in opts.rows if r not in ROW_NAMES]
    if unknown:
        raise UsageError(f"--rows: unknown row {unknown[0]!r} (choose from {', '.join(ROW_NAMES)})")
    for name, root in opts.roots.items():
        if not Path(root).is_dir():
            raise UsageError(f"--{name} {root}: not a directory")
    if not any(r.dataset in opts.roots for r in ROWS if r.name in opts.rows):
        raise UsageError("no dataset root given: pass at least one of " + ", ".join(f"--{d}" for d in DATASETS))
    opts.out.mkdir(parents=True, exist_ok=True)
    results = []
    for row in ROWS:
        if row.name in opts.rows:
            results.append(run_row(row, opts))
    write_json_atomic({"rows": [result_json(r) for r in results], "sources": {"paper": PAPER,
                                                                              "reference": REFERENCE}},
                      opts.out / "results.json")
    return results


def result_json(result: RowResult) -> dict:
    row = result.row
    return {"row": row.name, "title": row.title, "metric": row.metric, "status": result.status,
            "ours": result.value, "paper": row.paper, "reference_repo": row.reference, "images": result.images,
            "note": result.note, "report": None if result.report is None else str(result.report)}


def render_results(results: Sequence[RowResult], console: Any) -> None:
    """The one table: ours vs published vs the reference repository's own numbers."""
    from rich.table import Table

    table = Table(title="TagCLIP: ours (--reference-compat) vs published")
    for col in ("row", "metric", "ours", "paper", "reference repo", "images", "note"):
        table.add_column(col, justify="left" if col in ("row", "note") else "right")
    for r in results:
        ours = "-" if r.value is None else f"{r.value:.1f}"
        note = r.note or ("from an earlier run" if r.status == "skipped" else "")
        reference = "-" if r.row.reference is None else f"{r.row.reference:.1f}"
        table.add_row(r.row.title, r.row.metric, ours, f"{r.row.paper:.1f}", reference,
                      "-" if r.images is None else str(r.images), note)
    console.print(table)
    console.print(f"paper: {PAPER}.\nreference repo: {REFERENCE}.", highlight=False)
