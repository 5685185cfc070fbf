"""The commands that read our outputs, no model: evaluate, calibrate, retag, show and export."""

from __future__ import annotations

import logging
from pathlib import Path

import typer
from rich.console import Console

from tagclip_cli.cli.common import QUIET_OPT, THRESHOLDS_HELP, VERBOSE_OPT, err_console, fail, setup_logging, step_bar
from tagclip_cli.cli.surface import INPUT, JOB, METHOD, OUTPUT, SCORING, SELECTION, warn_renamed
from tagclip_cli.errors import with_suggestion

GT_OPT = typer.Option(
    ..., "--gt", metavar="NAME", rich_help_panel=INPUT,
    help="Ground truth: voc2007, voc2012, coco2014, coco2017, coco-object, coco-stuff-27, coco (--root = any "
    "instances JSON) or folder (--root = label PNGs, with --classes).",
)
ROOT_OPT = typer.Option(..., "--root", metavar="PATH", rich_help_panel=INPUT,
                        help="Dataset directory (or the COCO instances JSON).")
EVAL_TAGS_OPT = typer.Option(None, "--tags", metavar="FILE", rich_help_panel=INPUT,
                             help="Tags Parquet (`tagclip annotate`, or segment --tags-out): mAP and P/R/F1.")
EVAL_MASKS_OPT = typer.Option(None, "--masks", metavar="FILE|DIR", rich_help_panel=INPUT,
                              help="Masks (`tagclip segment`'s COCO RLE JSON or masks Parquet), or a folder of label "
                              "PNGs (segment --png-dir, student-predict): mIoU.")
CAMS_OPT = typer.Option(None, "--cams", metavar="DIR", rich_help_panel=INPUT,
                        help="Instead of --masks: a `segment --save-cams` directory; its label maps are remade from "
                        "the saved CAMs (see --bg-threshold, --crf).")


def _old_pred(value: str | None) -> str | None:
    """--pred, the old spelling of --tags and --masks (either kind of file): warns."""
    if value is not None:
        warn_renamed("--pred", "--tags (a tags Parquet) or --masks (masks)")
    return value


OLD_PRED_OPT = typer.Option(None, "--pred", hidden=True, callback=_old_pred)
BG_THRESHOLD_OPT = typer.Option(None, "--bg-threshold", metavar="RANGE", rich_help_panel=SCORING,
                                help="--cams: sweep a constant background score, START:STOP:STEP (e.g. 0.3:0.7:0.05), "
                                "a list a,b or one value; mIoU per value (default: the run's own rule, "
                                "(1 - max cam)^1).")
EVAL_CRF_OPT = typer.Option(False, "--crf", rich_help_panel=SCORING,
                            help="--cams: dense CRF on the saved CAMs (needs pip install 'tagclip-cli\\[crf]').")
EVAL_IMAGES_OPT = typer.Option(None, "--images", metavar="DIR", rich_help_panel=INPUT,
                               help="--cams --crf: image folder (DIR/<image id>); default: the image paths the cams "
                               "were saved with.")
SPLIT_OPT = typer.Option(None, "--split", metavar="FILE", rich_help_panel=INPUT,
                         help="Image list (first token per line).")
REPORT_OPT = typer.Option(None, "--report", metavar="FILE", rich_help_panel=OUTPUT,
                          help="Write every number and setting as JSON.")
AP_OPT = typer.Option("paper", "--ap", metavar="NAME", rich_help_panel=SCORING,
                      help="AP variant: paper (non-interpolated) or voc07 (11-point).")
DIFFICULT_OPT = typer.Option(
    "positive", "--difficult", metavar="MODE", rich_help_panel=SCORING,
    help="VOC2007 difficult objects: positive (default), negative or ignore."
)
CLASSES_OPT = typer.Option(
    None, "--classes", metavar="FILE", rich_help_panel=INPUT,
    help="--gt folder: class names, one per line (default ROOT/classes.txt)."
)
EVAL_VOCAB_OPT = typer.Option(
    None, "--vocab", metavar="NAME|FILE", rich_help_panel=INPUT,
    help="Class names of a --masks folder of PNGs (vocabulary name or file)."
)
ALLOW_UNMATCHED_OPT = typer.Option(
    False, "--allow-unmatched", rich_help_panel=SCORING,
    help="Evaluate the common classes when the class names differ."
)
REQUIRE_ALL_OPT = typer.Option(False, "--require-all", rich_help_panel=SCORING,
                               help="Fail if a ground-truth image has no prediction.")


def evaluate_command(
    gt: str = GT_OPT,
    root: str = ROOT_OPT,
    tags: str = EVAL_TAGS_OPT,
    masks: str = EVAL_MASKS_OPT,
    cams: str = CAMS_OPT,
    pred: str = OLD_PRED_OPT,
    images: str = EVAL_IMAGES_OPT,
    split: str | None = SPLIT_OPT,
    classes: str | None = CLASSES_OPT,
    vocab: str | None = EVAL_VOCAB_OPT,
    ap: str = AP_OPT,
    difficult: str = DIFFICULT_OPT,
    bg_threshold: str = BG_THRESHOLD_OPT,
    crf: bool = EVAL_CRF_OPT,
    allow_unmatched: bool = ALLOW_UNMATCHED_OPT,
    require_all: bool = REQUIRE_ALL_OPT,
    report: str | None = REPORT_OPT,
    quiet: bool = QUIET_OPT,
    verbose: bool = VERBOSE_OPT,
) -> None:
    """Score tags (mAP, P/R/F1) or masks (mIoU) against VOC, COCO, COCO-Stuff or your own labels."""
    from tagclip_cli import evaluate as ev

    setup_logging(quiet, verbose)
    choices = {
        "--gt": (gt, ev.GT_NAMES),
        "--ap": (ap, ev.AP_VARIANTS),
        "--difficult": (difficult, ev.DIFFICULT_MODES),
    }
    for option, (value, allowed) in choices.items():
        if value not in allowed:
            raise fail(with_suggestion(f"{option} must be one of {', '.join(allowed)}, not '{value}'", value,
                                       allowed))
    given = [value for value in (tags, masks, pred, cams) if value is not None]
    if len(given) != 1:
        raise fail("give one of --tags (a tags Parquet), --masks (masks: COCO JSON, masks Parquet or label PNGs) "
                   "or --cams (a segment --save-cams directory)")
    _check_prediction_option(tags, masks)
    thresholds = None
    if bg_threshold is not None:
        from tagclip_cli.cams import parse_thresholds

        thresholds = tuple(parse_thresholds(bg_threshold))
    pred = next((value for value in (tags, masks, pred) if value is not None), None)
    config = ev.EvaluateConfig(
        gt=gt, root=Path(root), pred=Path(pred) if pred is not None else None,
        cams=Path(cams) if cams is not None else None, bg_thresholds=thresholds, crf=crf,
        images=Path(images) if images is not None else None, split=Path(split) if split else None, ap=ap,
        difficult=difficult, classes_file=Path(classes) if classes else None, vocab=vocab,
        allow_unmatched=allow_unmatched, require_all=require_all,
    )
    _evaluate(config, report, quiet)


def _check_prediction_option(tags: str | None, masks: str | None) -> None:
    """--tags must be a tags Parquet and --masks must not be one (evaluate reads either from its content)."""
    from tagclip_cli import evaluate as ev
    from tagclip_cli.errors import TagclipError
    from tagclip_cli.formats import read_tags_schema

    if tags is not None and ev.prediction_kind(Path(tags)) != "tags":
        raise fail(f"--tags {tags}: not a tags Parquet (masks go to --masks)")
    if masks is not None and ev.prediction_kind(Path(masks)) == "tags":
        try:
            read_tags_schema(masks)
        except TagclipError:
            return  # a Parquet that is not a tags file: evaluate says what it is
        raise fail(f"--masks {masks}: a tags Parquet (give it as --tags)")


def _evaluate(config, report: str | None, quiet: bool) -> None:
    """Run evaluate with its progress bar, write --report, print the tables on stdout."""
    from tagclip_cli import evaluate as ev

    with step_bar("evaluating", hidden=quiet) as advance:
        result = ev.evaluate(config, progress=advance)
    if report:
        try:
            ev.write_report(result, Path(report))
        except OSError as exc:
            raise fail(f"{report}: cannot write report ({exc.strerror or exc})") from None
    ev.render_report(result, Console())
    if report:
        logging.getLogger("tagclip_cli.cli").info("report written to %s", report)


SHOW_IMAGES_OPT = typer.Option(None, "--images", metavar="DIR", rich_help_panel=INPUT,
                               help="The folder that was annotated (images as DIR/<image id>); default: the image "
                               "paths recorded in the tags file.")
SHOW_TAGS_OPT = typer.Option(..., "--tags", metavar="FILE", rich_help_panel=INPUT,
                             help="Tags Parquet written by `tagclip annotate`.")
SHOW_OUT_OPT = typer.Option(..., "--out", "-o", metavar="DIR", rich_help_panel=OUTPUT,
                            help="Gallery folder (index.html, overlays/, thumbs/).")
SHOW_MASKS_OPT = typer.Option(None, "--masks", metavar="FILE", rich_help_panel=INPUT,
                              help="Masks written by `tagclip segment` (COCO RLE JSON or masks Parquet).")
SHOW_MAX_SIDE_OPT = typer.Option(1024, "--max-side", min=64, metavar="PIXELS", rich_help_panel=OUTPUT,
                                 help="Longer side of the overlays' image part (about 1 MB per PNG at 1024).")
THUMB_SIDE_OPT = typer.Option(256, "--thumb-side", min=32, metavar="PIXELS", rich_help_panel=OUTPUT,
                              help="Longer side of the thumbnails.")
PAGE_SIZE_OPT = typer.Option(100, "--page-size", min=1, metavar="N", rich_help_panel=OUTPUT,
                             help="Cards per page in index.html.")
LIMIT_OPT = typer.Option(None, "--limit", min=1, metavar="N", rich_help_panel=SELECTION,
                         help="Show only the first N images of the tags file (with --sort doubt: the N most "
                         "doubtful).")
SHOW_WORKERS_OPT = typer.Option(2, "--workers", min=0, metavar="N", rich_help_panel=JOB,
                                help="Processes drawing overlays (0 = in this process).")
TITLE_OPT = typer.Option(None, "--title", metavar="TEXT", rich_help_panel=OUTPUT,
                         help="Page title (default: the tags file name).")
SORT_OPT = typer.Option("file", "--sort", metavar="ORDER", rich_help_panel=SELECTION,
                        help="file (the tags file's order) or doubt (images whose tag decisions are closest to their "
                        "thresholds first: the likeliest mistakes).")
FAILED_FIRST_OPT = typer.Option(False, "--failed-first", rich_help_panel=SELECTION,
                                help="With --sort doubt: failed images first.")
CLASS_OPT = typer.Option(None, "--class", metavar="NAME", rich_help_panel=SELECTION,
                         help="Only this class's doubt: its images sorted by how close its score is to its threshold "
                         "(implies --sort doubt).")
MAX_MARGIN_OPT = typer.Option(None, "--max-margin", min=0.0, max=1.0, metavar="FLOAT", rich_help_panel=SELECTION,
                              help="With --sort doubt: only images whose margin is at most this.")
SHOW_THRESHOLDS_OPT = typer.Option(None, "--thresholds", metavar="FILE", rich_help_panel=SELECTION,
                                   help="With --sort doubt: thresholds file to measure doubt against (default: the "
                                   "ones the tags file was made with).")


def show(
    tags: Path = SHOW_TAGS_OPT,
    masks: Path = SHOW_MASKS_OPT,
    images: Path = SHOW_IMAGES_OPT,
    sort: str = SORT_OPT,
    limit: int = LIMIT_OPT,
    failed_first: bool = FAILED_FIRST_OPT,
    doubt_class: str = CLASS_OPT,
    max_margin: float = MAX_MARGIN_OPT,
    thresholds: Path = SHOW_THRESHOLDS_OPT,
    out: Path = SHOW_OUT_OPT,
    title: str = TITLE_OPT,
    max_side: int = SHOW_MAX_SIDE_OPT,
    thumb_side: int = THUMB_SIDE_OPT,
    page_size: int = PAGE_SIZE_OPT,
    workers: int = SHOW_WORKERS_OPT,
    quiet: bool = QUIET_OPT,
    verbose: bool = VERBOSE_OPT,
) -> None:
    """Draw every image with its tags, scores and masks, and write an offline HTML gallery (index.html)."""
    from tagclip_cli.show import ShowConfig, build_gallery

    setup_logging(quiet, verbose)
    config = ShowConfig(images=images, tags=tags, out=out, masks=masks, max_side=max_side, thumb_side=thumb_side,
                        page_size=page_size, limit=limit, workers=workers, title=title, sort=sort,
                        failed_first=failed_first, doubt_class=doubt_class, max_margin=max_margin,
                        thresholds=thresholds)
    try:
        with step_bar("drawing", hidden=quiet) as advance:
            summary = build_gallery(config, progress=advance)
    except OSError as exc:
        raise fail(f"{out}: cannot write the gallery ({exc.strerror or exc})") from None
    log = logging.getLogger("tagclip_cli")
    for image_id, error in summary.unreadable[:20]:
        log.warning("cannot read %s: %s", image_id, error)
    if not quiet or summary.unreadable:
        err_console.print(
            f"{summary.index_html}: {summary.images} images ({summary.failed_rows} failed in the tags file, "
            f"{len(summary.unreadable)} unreadable now)",
            highlight=False,
        )
    if summary.unreadable:
        raise typer.Exit(1)


FORMAT_ARG = typer.Argument(..., metavar="FORMAT", help="yolo, voc, labelstudio, cvat or coco.")
EXPORT_TAGS_OPT = typer.Option(None, "--tags", metavar="FILE", rich_help_panel=INPUT,
                               help="Tags Parquet (`tagclip annotate` or segment --tags-out): image tags, and the "
                               "vocabulary the masks are checked against.")
EXPORT_MASKS_OPT = typer.Option(None, "--masks", metavar="FILE", rich_help_panel=INPUT,
                                help="Masks of `tagclip segment`: COCO JSON or masks Parquet.")
EXPORT_IMAGES_OPT = typer.Option(None, "--images", metavar="DIR", rich_help_panel=INPUT,
                                 help="Folder the image ids are relative to (yolo and voc link or copy images; "
                                 "default: the paths recorded in the tags file).")
EXPORT_OUT_OPT = typer.Option(..., "--out", "-o", metavar="DIR", rich_help_panel=OUTPUT,
                              help="Output folder (must not exist, or be empty; see --overwrite).")
TASK_OPT = typer.Option("segment", "--task", metavar="TASK", rich_help_panel=OUTPUT,
                        help="yolo: segment (polygons) or detect (boxes).")
COPY_OPT = typer.Option(False, "--copy", rich_help_panel=OUTPUT,
                        help="yolo, voc: copy the images instead of linking them.")
MASK_AS_OPT = typer.Option("brush", "--mask-as", metavar="KIND", rich_help_panel=OUTPUT,
                           help="labelstudio: brush (Label Studio RLE, exact) or polygon regions.")
VOC_SPLIT_OPT = typer.Option("train", "--split", metavar="NAME", rich_help_panel=OUTPUT,
                             help="voc: the image set name (ImageSets/*/<split>.txt).")
URL_PREFIX_OPT = typer.Option("/data/local-files/?d=", "--url-prefix", metavar="TEXT", rich_help_panel=OUTPUT,
                              help="labelstudio: task image URL = prefix + image id (default: Label Studio's local "
                              "files under LOCAL_FILES_DOCUMENT_ROOT).")
EXPORT_OVERWRITE_OPT = typer.Option(False, "--overwrite", rich_help_panel=OUTPUT,
                                    help="Replace a non-empty --out folder.")


def export_command(
    fmt: str = FORMAT_ARG,
    tags: Path = EXPORT_TAGS_OPT,
    masks: Path = EXPORT_MASKS_OPT,
    images: Path = EXPORT_IMAGES_OPT,
    out: Path = EXPORT_OUT_OPT,
    task: str = TASK_OPT,
    copy: bool = COPY_OPT,
    mask_as: str = MASK_AS_OPT,
    split: str = VOC_SPLIT_OPT,
    url_prefix: str = URL_PREFIX_OPT,
    overwrite: bool = EXPORT_OVERWRITE_OPT,
    quiet: bool = QUIET_OPT,
    verbose: bool = VERBOSE_OPT,
) -> None:
    """Export tags and masks as a YOLO, Pascal VOC, Label Studio, CVAT or COCO dataset folder."""
    from tagclip_cli.export import ExportConfig, export

    setup_logging(quiet, verbose)
    config = ExportConfig(format=fmt, out=out, tags=tags, masks=masks, images=images, task=task, copy=copy,
                          mask_as=mask_as, split=split, url_prefix=url_prefix, overwrite=overwrite)
    with step_bar(f"export {fmt}", hidden=quiet, columns=True) as advance:
        summary = export(config, progress=advance)
    if not quiet:
        err_console.print(
            f"{summary.out}: {fmt}, {summary.images} images, {summary.masks} masks"
            + (f", {summary.shapes} label shapes" if summary.shapes else "")
            + (f" ({summary.skipped} failed images skipped)" if summary.skipped else ""),
            highlight=False,
        )


RETAG_TAGS_ARG = typer.Argument(..., metavar="TAGS",
                                help="Tags Parquet written by `tagclip annotate` (or segment --tags-out).")
RETAG_OUT_OPT = typer.Option(..., "--out", "-o", metavar="FILE", rich_help_panel=OUTPUT,
                             help="The retagged tags Parquet (.parquet; same columns and metadata).")
RETAG_TAG_THRESHOLD_OPT = typer.Option(
    None, "--tag-threshold", min=0.0, max=1.0, metavar="FLOAT", rich_help_panel=METHOD,
    help="Threshold of the classes the file does not list (default: the one TAGS was made with)."
)
RETAG_THRESHOLDS_OPT = typer.Option(None, "--thresholds", metavar="FILE", rich_help_panel=METHOD, help=THRESHOLDS_HELP)
RETAG_OVERWRITE_OPT = typer.Option(False, "--overwrite", rich_help_panel=OUTPUT, help="Replace an existing --out.")


def retag(
    tags: Path = RETAG_TAGS_ARG,
    thresholds: Path = RETAG_THRESHOLDS_OPT,
    tag_threshold: float = RETAG_TAG_THRESHOLD_OPT,
    out: Path = RETAG_OUT_OPT,
    overwrite: bool = RETAG_OVERWRITE_OPT,
    quiet: bool = QUIET_OPT,
    verbose: bool = VERBOSE_OPT,
) -> None:
    """Re-derive the tags of a tags Parquet from its stored scores with new thresholds (no model)."""
    from tagclip_cli.fileio import check_output_path, check_output_suffix
    from tagclip_cli.thresholds import retag_file

    setup_logging(quiet, verbose)
    if thresholds is None and tag_threshold is None:
        raise fail("retag needs --thresholds FILE and/or --tag-threshold")
    check_output_suffix(out, (".parquet",))
    if out.resolve() == tags.resolve():
        raise fail(f"--out {out} is the input file; write the retagged tags to a new file")
    check_output_path(out)
    if out.exists() and not overwrite:
        raise fail(f"{out}: exists; pass --overwrite to replace it")
    rows, changed = retag_file(tags, out, thresholds, tag_threshold)
    if not quiet:
        err_console.print(f"{out}: {rows} rows, tags changed in {changed}", highlight=False)


CALIBRATE_GT_OPT = typer.Option(..., "--gt", metavar="NAME", rich_help_panel=INPUT,
                                help="Ground truth of the labelled subset, as `tagclip evaluate --gt`.")
CALIBRATE_TAGS_OPT = typer.Option(..., "--tags", metavar="FILE", rich_help_panel=INPUT,
                                  help="Tags Parquet of the labelled images (`tagclip annotate`).")
CALIBRATE_OUT_OPT = typer.Option(..., "--out", "-o", metavar="FILE", rich_help_panel=OUTPUT,
                                 help="Thresholds file to write (class<TAB>threshold).")
TARGET_OPT = typer.Option("f1", "--target", metavar="TARGET", rich_help_panel=METHOD,
                          help="f1 (best F1 per class), precision=P (most recall with precision >= P) or recall=R "
                          "(most precision with recall >= R).")
MIN_POSITIVES_OPT = typer.Option(5, "--min-positives", min=1, metavar="N", rich_help_panel=METHOD,
                                 help="Classes with fewer positive images keep their threshold.")
CALIBRATE_ALLOW_UNMATCHED_OPT = typer.Option(False, "--allow-unmatched", rich_help_panel=METHOD,
                                             help="Calibrate the common classes when the class names differ.")
CALIBRATE_DIFFICULT_OPT = typer.Option("positive", "--difficult", metavar="MODE", rich_help_panel=METHOD,
                                       help="VOC2007 difficult objects.")
CALIBRATE_CLASSES_OPT = typer.Option(None, "--classes", metavar="FILE", rich_help_panel=INPUT,
                                     help="--gt folder: class names file.")


def calibrate(
    gt: str = CALIBRATE_GT_OPT,
    root: str = ROOT_OPT,
    tags: Path = CALIBRATE_TAGS_OPT,
    split: str | None = SPLIT_OPT,
    classes: str | None = CALIBRATE_CLASSES_OPT,
    target: str = TARGET_OPT,
    min_positives: int = MIN_POSITIVES_OPT,
    difficult: str = CALIBRATE_DIFFICULT_OPT,
    allow_unmatched: bool = CALIBRATE_ALLOW_UNMATCHED_OPT,
    out: Path = CALIBRATE_OUT_OPT,
    quiet: bool = QUIET_OPT,
    verbose: bool = VERBOSE_OPT,
) -> None:
    """Pick each class's tag threshold on labelled images; print precision/recall/F1 before and after."""
    from tagclip_cli import evaluate as ev
    from tagclip_cli.fileio import check_output_path
    from tagclip_cli.thresholds import calibrate as run_calibration
    from tagclip_cli.thresholds import parse_target, write_threshold_file

    setup_logging(quiet, verbose)
    if gt not in ev.GT_NAMES:
        raise fail(with_suggestion(f"--gt must be one of {', '.join(ev.GT_NAMES)}, not '{gt}'", gt, ev.GT_NAMES))
    parse_target(target)
    check_output_path(out)
    result = run_calibration(gt, Path(root), tags, target, split=Path(split) if split else None,
                             difficult=difficult, classes_file=Path(classes) if classes else None,
                             allow_unmatched=allow_unmatched, min_positives=min_positives)
    _warn_kept(result)
    write_threshold_file(out, dict(zip(result.classes, result.after, strict=True)),
                         header=[f"tagclip calibrate --gt {gt} --target {target}: {result.images} labelled images "
                                 f"of {tags.name}"])
    _render_calibration(result)
    if not quiet:
        err_console.print(f"{out}: thresholds of {len(result.classes)} classes "
                          f"({sum(w is None for w in result.kept_because)} calibrated)", highlight=False)


def _warn_kept(result) -> None:
    """A warning per class calibrate could not calibrate, and one line for those not in the ground truth."""
    log = logging.getLogger("tagclip_cli")
    for name, why in zip(result.classes, result.kept_because, strict=True):
        if why is not None and why != "not in the ground truth":
            log.warning("%s: keeps its threshold (%s)", name, why)
    missing = [n for n, why in zip(result.classes, result.kept_because, strict=True)
               if why == "not in the ground truth"]
    if missing:
        log.warning("%d class(es) not in the ground truth keep their threshold: %s", len(missing), ", ".join(missing))


def _render_calibration(result) -> None:
    """The per-class table of `tagclip calibrate` on stdout: threshold and P/R/F1, before -> after."""
    import math

    from rich.table import Table

    def pct(value: float) -> str:
        return "-" if value is None or math.isnan(value) else f"{100 * value:.1f}"

    table = Table(title=f"calibration on {result.images} labelled images (target {result.target})")
    for column in ("class", "pos", "t", "P", "R", "F1", "t'", "P'", "R'", "F1'"):
        table.add_column(column, justify="left" if column == "class" else "right")
    b, a = result.prf_before, result.prf_after
    for p, name in enumerate(result.classes):
        if result.gt_names[p] is None:
            continue
        table.add_row(name, str(result.positives[p]),
                      f"{result.before[p]:.3f}", pct(b["precision"][p]), pct(b["recall"][p]), pct(b["f1"][p]),
                      f"{result.after[p]:.3f}", pct(a["precision"][p]), pct(a["recall"][p]), pct(a["f1"][p]))
    for label, key in (("overall (pooled)", "overall"), ("per-class mean", "per_class")):
        table.add_row(label, "", "", pct(b[key]["precision"]), pct(b[key]["recall"]), pct(b[key]["f1"]),
                      "", pct(a[key]["precision"]), pct(a[key]["recall"]), pct(a[key]["f1"]))
    Console().print(table)
    Console().print("t, P, R, F1: threshold and the tags as in the file; t', P', R', F1': the new thresholds and "
                    "the tags they give (P, R, F1 in percent)")
