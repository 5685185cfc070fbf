"""The commands that run the model: annotate, segment, merge (their shards) and reproduce. Each
parses its options and calls its function in `tagclip_cli.commands` with them, by the same names."""

from __future__ import annotations

import os
import sys
from contextlib import contextmanager
from pathlib import Path

import typer
from rich.console import Console

from tagclip_cli import defaults
from tagclip_cli.cli.common import (
    BACKGROUND_OPT,
    BATCH_SIZE_OPT,
    CACHE_DIR_OPT,
    CHECKPOINT_OPT,
    DEVICE_OPT,
    FAIL_FAST_OPT,
    ID_COLUMN_OPT,
    IMAGE_COLUMN_OPT,
    IMAGE_ROOT_OPT,
    IMAGES_ARG,
    IMAGES_PARQUET_OPT,
    MANIFEST_OPT,
    MODEL_OPT,
    OVERWRITE_OPT,
    PART_SIZE_OPT,
    PRECISION_OPT,
    PRETRAINED_OPT,
    QUIET_OPT,
    REFERENCE_COMPAT_OPT,
    SHARD_OPT,
    THRESHOLDS_HELP,
    VERBOSE_OPT,
    VOCAB_OPT,
    WORKERS_OPT,
    err_console,
    fail,
    finish,
    is_leader,
    progress_factory,
    setup_logging,
)
from tagclip_cli.cli.surface import INPUT, METHOD, MODEL, OUTPUT
from tagclip_cli.errors import TagclipError

ANNOTATE_OUT_OPT = typer.Option(
    ..., "--out", "-o", metavar="FILE", rich_help_panel=OUTPUT,
    help="Output tags Parquet (.parquet, one row per image), or '-' for JSON Lines on stdout (scores as "
    "{class: score}; no resume)."
)
ANNOTATE_NO_BACKGROUND_OPT = typer.Option(False, "--no-background", rich_help_panel=METHOD,
                                          help="Score against foreground classes only.")
ANNOTATE_TAG_THRESHOLD_OPT = typer.Option(
    defaults.TAG_THRESHOLD, "--tag-threshold", min=0.0, max=1.0, metavar="FLOAT", rich_help_panel=METHOD,
    help="Keep classes whose normalised score is above this."
)
THRESHOLDS_OPT = typer.Option(None, "--thresholds", metavar="FILE", rich_help_panel=METHOD, help=THRESHOLDS_HELP)
ANNOTATE_MAX_SIDE_OPT = typer.Option(
    defaults.MAX_SIDE, "--max-side", min=16, metavar="PIXELS", rich_help_panel=MODEL,
    help="Downscale images whose longer side exceeds this before the native-resolution forward "
    "(attention memory grows with the 4th power of the side; VOC/COCO images are below the default).",
)

ANNOTATE_METHOD_OPT = typer.Option(
    defaults.TAG_METHOD, "--method", metavar="NAME", rich_help_panel=METHOD,
    help="tagclip (TagCLIP, the paper's) or piaa (PIAA: fits a patch-level classifier on the collection first, then "
    "scores it; its model is written to OUT.piaa.safetensors and reused; docs/methods.md).")
DENSE_OPT = typer.Option(None, "--dense", metavar="NAME", rich_help_panel=METHOD,
                         help="PIAA: the dense variant giving the patch features: sclip (default), clearclip or "
                         "naclip.")
PIAA_SETTING_OPT = typer.Option(None, "--setting", metavar="NAME", rich_help_panel=METHOD,
                                help="PIAA: the authors' constants for voc (default), coco or nus (docs/algorithm.md "
                                "§13).")
BANK_SIZE_OPT = typer.Option(None, "--bank-size", metavar="N", rich_help_panel=METHOD,
                             help=f"PIAA: patches kept per class by the fit (default {defaults.PIAA_BANK_SIZE}); "
                             "memory is classes x this, whatever the collection.")
PIAA_MODEL_OPT = typer.Option(None, "--piaa-model", metavar="FILE", rich_help_panel=METHOD,
                              help="PIAA: score with this fitted model (an OUT.piaa.safetensors of another run) "
                              "instead of fitting here.")
FIT_ON_OPT = typer.Option(None, "--fit-on", metavar="IMAGES", rich_help_panel=INPUT,
                          help="PIAA: fit on this collection (any IMAGES input) instead of the images being tagged.")


def annotate(
    images: str = IMAGES_ARG,
    vocab: str = VOCAB_OPT,
    manifest: str = MANIFEST_OPT,
    image_root: str = IMAGE_ROOT_OPT,
    images_parquet: str = IMAGES_PARQUET_OPT,
    image_column: str = IMAGE_COLUMN_OPT,
    id_column: str = ID_COLUMN_OPT,
    fit_on: str = FIT_ON_OPT,
    model: str = MODEL_OPT,
    pretrained: str = PRETRAINED_OPT,
    checkpoint: Path = CHECKPOINT_OPT,
    precision: str = PRECISION_OPT,
    max_side: int = ANNOTATE_MAX_SIDE_OPT,
    method: str = ANNOTATE_METHOD_OPT,
    dense: str = DENSE_OPT,
    setting: str = PIAA_SETTING_OPT,
    bank_size: int = BANK_SIZE_OPT,
    piaa_model: Path = PIAA_MODEL_OPT,
    background: Path = BACKGROUND_OPT,
    no_background: bool = ANNOTATE_NO_BACKGROUND_OPT,
    tag_threshold: float = ANNOTATE_TAG_THRESHOLD_OPT,
    thresholds: Path = THRESHOLDS_OPT,
    reference_compat: bool = REFERENCE_COMPAT_OPT,
    out: str = ANNOTATE_OUT_OPT,
    shard: str = SHARD_OPT,
    device: str = DEVICE_OPT,
    batch_size: int = BATCH_SIZE_OPT,
    workers: int = WORKERS_OPT,
    overwrite: bool = OVERWRITE_OPT,
    fail_fast: bool = FAIL_FAST_OPT,
    part_size: int = PART_SIZE_OPT,
    cache_dir: Path = CACHE_DIR_OPT,
    quiet: bool = QUIET_OPT,
    verbose: bool = VERBOSE_OPT,
) -> None:
    """Tag every image with TagCLIP (or PIAA): the score of every class and the predicted tags, to Parquet."""
    options = dict(locals())  # the options, by the names commands.annotate takes
    del options["quiet"], options["verbose"]
    from tagclip_cli import commands
    from tagclip_cli.jobs.sinks import OutputClosed

    leader = is_leader()
    setup_logging(quiet or not leader, verbose)
    try:
        with _stdout_for_results(out == "-") as stdout:
            summary = commands.annotate(**options, progress=progress_factory(quiet), stdout=stdout)
    except OutputClosed:
        raise typer.Exit(0) from None
    except TagclipError as exc:
        if not leader:  # rank 0 has the same error (jobs.Session) and prints it once
            raise typer.Exit(exc.exit_code) from None
        raise
    finish(summary, None if out == "-" else Path(out), quiet)


@contextmanager
def _stdout_for_results(streaming: bool):
    """With --out -, yield the real stdout for results and send any stray print to stderr meanwhile.

    When the reader goes away (`| head`), raise OutputClosed with fd 1 pointed at /dev/null so that
    the interpreter's final flush does not complain."""
    from tagclip_cli.jobs.sinks import OutputClosed

    if not streaming:
        yield None
        return
    real = sys.stdout
    sys.stdout = sys.stderr
    try:
        yield real
    except (BrokenPipeError, OutputClosed):
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, real.fileno())
        os.close(devnull)
        raise OutputClosed() from None
    finally:
        sys.stdout = real


def merge(
    out: Path = typer.Argument(..., metavar="OUT",
                               help="The output given to the shards' --out (its OUT.parts/ holds the parts)."),
    quiet: bool = QUIET_OPT,
    verbose: bool = VERBOSE_OPT,
) -> None:
    """Merge the parts of separately run shards (--shard I/N) into OUT, once every image has a result."""
    from tagclip_cli import commands

    setup_logging(quiet, verbose)
    rows = commands.merge(out)
    if not quiet:
        err_console.print(f"{out}: merged {rows} rows", highlight=False)


SEGMENT_OUT_OPT = typer.Option(
    ..., "--out", "-o", metavar="FILE", rich_help_panel=OUTPUT,
    help="Output COCO JSON (.json: RLE masks, one annotation per image and present class), or a masks Parquet "
    "(.parquet: one row per mask, for runs too large for one JSON).")
TAGS_IN_OPT = typer.Option(None, "--tags", metavar="FILE", rich_help_panel=INPUT,
                           help="Tags Parquet of an earlier `tagclip annotate` run: segment its tags instead of "
                           "running TagCLIP here.")
TAGS_OUT_OPT = typer.Option(None, "--tags-out", metavar="FILE", rich_help_panel=OUTPUT,
                            help="Also write the tags Parquet (.parquet, as annotate would) from the same pass.")
PNG_DIR_OPT = typer.Option(None, "--png-dir", metavar="DIR", rich_help_panel=OUTPUT,
                           help="Also write palette label PNGs (0 = background, class = vocabulary index + 1) as "
                           "DIR/<image id>.png.")
# The choices are the registry's (tagclip_cli.methods), checked when the command runs; the text
# names the built-ins without importing them (the registry loads torch).
METHOD_OPT = typer.Option(
    defaults.SEGMENT_METHOD, "--method", metavar="NAME", rich_help_panel=METHOD,
    help="clses (CLS-SEG: TagCLIP tags -> CLIP-ES, the paper's), maskclip (baseline: dense logits, argmax), or the "
    "dense baselines sclip, clearclip, naclip, resclip (ResCLIP on NACLIP) and scclip (SC-CLIP) with their "
    "published settings (docs/methods.md); plug-ins add more (TAGCLIP_METHODS=module, or a package's "
    "'tagclip_cli.methods' entry point).")
CRF_OPT = typer.Option(False, "--crf", rich_help_panel=METHOD,
                       help="Dense CRF on the RGB image (paper's parameters; needs pip install "
                       "'tagclip-cli\\[crf]').")
SETTING_OPT = typer.Option(
    defaults.SEGMENT_SETTING, "--setting", metavar="NAME", rich_help_panel=METHOD,
    help="CAA layers and box threshold: voc (layers L-7..L-1, 0.4), coco (layers L-7..L, 0.7) or cocostuff (coco's, "
    "plus TagCLIP's COCO-Stuff values and no background label), as the reference (docs/algorithm.md §11); for "
    "sclip / clearclip / naclip their published VOC21 or COCO-Object settings.")
SAVE_CAMS_OPT = typer.Option(None, "--save-cams", metavar="DIR", rich_help_panel=OUTPUT,
                             help="Also save each image's refined CAMs (float16 .npz: cams, tags) as DIR/<image "
                             "id>.npz, for `evaluate --cams DIR --bg-threshold`.")
CAMS_GRID_OPT = typer.Option(False, "--cams-grid", rich_help_panel=OUTPUT,
                             help="--save-cams on the patch grid instead of at the image size (about 256x smaller "
                             "files).")
RCS_OPT = typer.Option(False, "--rcs", rich_help_panel=METHOD,
                       help="sclip / clearclip / naclip: add ResCLIP's RCS and SFR to the last block, with ResCLIP's "
                       "published settings (naclip --rcs = --method resclip).")
KEY_SMOOTHING_OPT = typer.Option(False, "--key-smoothing", rich_help_panel=METHOD,
                                 help="MaskCLIP: smooth with last-layer keys.")
PROMPT_DENOISING_OPT = typer.Option(False, "--prompt-denoising", rich_help_panel=METHOD,
                                    help="MaskCLIP: drop classes whose best probability is below 0.5.")
SEGMENT_NO_BACKGROUND_OPT = typer.Option(False, "--no-background", rich_help_panel=METHOD,
                                         help="No background classes.")
SEGMENT_TAG_THRESHOLD_OPT = typer.Option(
    None, "--tag-threshold", min=0.0, max=1.0, metavar="FLOAT", rich_help_panel=METHOD,
    help="TagCLIP: keep classes whose normalised score is above this (default 0.5; 0.1 with --setting cocostuff).")
SEGMENT_THRESHOLDS_OPT = typer.Option(None, "--thresholds", metavar="FILE", rich_help_panel=METHOD,
                                      help="TagCLIP: " + THRESHOLDS_HELP)
SEGMENT_MAX_SIDE_OPT = typer.Option(defaults.MAX_SIDE, "--max-side", min=16, metavar="PIXELS", rich_help_panel=MODEL,
                                    help="Downscale longer sides above this for the model (masks keep the image "
                                    "size).")


def segment(
    images: str = IMAGES_ARG,
    vocab: str = VOCAB_OPT,
    tags_in: Path = TAGS_IN_OPT,
    manifest: str = MANIFEST_OPT,
    image_root: str = IMAGE_ROOT_OPT,
    images_parquet: str = IMAGES_PARQUET_OPT,
    image_column: str = IMAGE_COLUMN_OPT,
    id_column: str = ID_COLUMN_OPT,
    model: str = MODEL_OPT,
    pretrained: str = PRETRAINED_OPT,
    checkpoint: Path = CHECKPOINT_OPT,
    precision: str = PRECISION_OPT,
    max_side: int = SEGMENT_MAX_SIDE_OPT,
    method: str = METHOD_OPT,
    setting: str = SETTING_OPT,
    crf: bool = CRF_OPT,
    rcs: bool = RCS_OPT,
    key_smoothing: bool = KEY_SMOOTHING_OPT,
    prompt_denoising: bool = PROMPT_DENOISING_OPT,
    background: Path = BACKGROUND_OPT,
    no_background: bool = SEGMENT_NO_BACKGROUND_OPT,
    tag_threshold: float = SEGMENT_TAG_THRESHOLD_OPT,
    thresholds: Path = SEGMENT_THRESHOLDS_OPT,
    reference_compat: bool = REFERENCE_COMPAT_OPT,
    out: Path = SEGMENT_OUT_OPT,
    tags_out: Path = TAGS_OUT_OPT,
    png_dir: Path = PNG_DIR_OPT,
    save_cams: Path = SAVE_CAMS_OPT,
    cams_grid: bool = CAMS_GRID_OPT,
    shard: str = SHARD_OPT,
    device: str = DEVICE_OPT,
    batch_size: int = BATCH_SIZE_OPT,
    workers: int = WORKERS_OPT,
    overwrite: bool = OVERWRITE_OPT,
    fail_fast: bool = FAIL_FAST_OPT,
    part_size: int = PART_SIZE_OPT,
    cache_dir: Path = CACHE_DIR_OPT,
    quiet: bool = QUIET_OPT,
    verbose: bool = VERBOSE_OPT,
) -> None:
    """Segment every image with CLS-SEG or a dense baseline into a COCO RLE JSON or a masks Parquet.

    Methods: CLS-SEG (the paper's), MaskCLIP, SCLIP, ClearCLIP, NACLIP, ResCLIP, SC-CLIP; optionally also label
    PNGs, the tags and the CAMs."""
    options = dict(locals())  # the options, by the names commands.segment takes
    del options["quiet"], options["verbose"]
    from tagclip_cli import commands

    setup_logging(quiet or not is_leader(), verbose)
    summary = commands.segment(**options, progress=progress_factory(quiet, "segmenting"))
    finish(summary, out, quiet)


REPRODUCE_OUT_OPT = typer.Option(..., "--out", "-o", metavar="DIR", rich_help_panel=OUTPUT,
                                 help="Work folder: one subfolder per row (outputs, report.json), results.json. "
                                 "Rerun the same command to resume; finished rows are skipped.")
VOC2007_OPT = typer.Option(None, "--voc2007", metavar="DIR", rich_help_panel=INPUT,
                           help="VOC2007 (or VOCdevkit) root: Annotations, JPEGImages, ImageSets/Main/test.txt.")
VOC2012_OPT = typer.Option(None, "--voc2012", metavar="DIR", rich_help_panel=INPUT,
                           help="VOC2012 root: JPEGImages, SegmentationClass, ImageSets/Segmentation/val.txt.")
COCO2014_OPT = typer.Option(None, "--coco2014", metavar="DIR", rich_help_panel=INPUT,
                            help="COCO 2014 root: annotations/instances_val2014.json, val2014/.")
COCO2017_OPT = typer.Option(None, "--coco2017", metavar="DIR", rich_help_panel=INPUT,
                            help="COCO 2017 root: annotations/instances_val2017.json, val2017/ (COCO-Object, and the "
                            "images of COCO-Stuff).")
COCOSTUFF_OPT = typer.Option(None, "--cocostuff", metavar="DIR", rich_help_panel=INPUT,
                             help="COCO-Stuff root: stuffthingmaps_trainval2017/val2017 (or the label PNGs "
                             "themselves).")
COCOSTUFF_SPLIT_OPT = typer.Option(None, "--cocostuff-split", metavar="FILE", rich_help_panel=INPUT,
                                   help="COCO-Stuff image list (default: every label PNG); the reference uses its "
                                   "imageset/cocostuff/val.txt.")
ROWS_OPT = typer.Option(None, "--rows", metavar="NAMES", rich_help_panel=METHOD,
                        help="Only these rows (comma-separated names; default the paper's eight; the ResCLIP, "
                        "SC-CLIP and PIAA rows, e.g. voc2012-miou-resclip, voc2007-map-piaa, only when named).")


def reproduce(
    voc2007: Path = VOC2007_OPT,
    voc2012: Path = VOC2012_OPT,
    coco2014: Path = COCO2014_OPT,
    coco2017: Path = COCO2017_OPT,
    cocostuff: Path = COCOSTUFF_OPT,
    cocostuff_split: Path = COCOSTUFF_SPLIT_OPT,
    model: str = MODEL_OPT,
    pretrained: str = PRETRAINED_OPT,
    checkpoint: Path = CHECKPOINT_OPT,
    rows: str = ROWS_OPT,
    out: Path = REPRODUCE_OUT_OPT,
    device: str = DEVICE_OPT,
    batch_size: int = BATCH_SIZE_OPT,
    workers: int = WORKERS_OPT,
    cache_dir: Path = CACHE_DIR_OPT,
    quiet: bool = QUIET_OPT,
    verbose: bool = VERBOSE_OPT,
) -> None:
    """The paper's eight numbers with --reference-compat in one resumable run, and a table of ours vs published.

    VOC07 / COCO14 mAP; VOC12, COCO-Object, COCO-Stuff-27 mIoU with and without CRF."""
    from tagclip_cli.commands import model_options
    from tagclip_cli.reproduce import PAPER_ROWS, ReproduceOptions, render_results, run_reproduce

    setup_logging(quiet, verbose)
    roots = {name: path for name, path in (("voc2007", voc2007), ("voc2012", voc2012), ("coco2014", coco2014),
                                            ("coco2017", coco2017), ("cocostuff", cocostuff)) if path is not None}
    if cocostuff_split is not None and not cocostuff_split.is_file():
        raise fail(f"--cocostuff-split {cocostuff_split}: file not found")
    chosen = PAPER_ROWS if rows is None else tuple(r.strip() for r in rows.split(",") if r.strip())
    opts = ReproduceOptions(
        out=out, roots=roots, model=model_options(model, pretrained, checkpoint, device, cache_dir),
        rows=chosen, cocostuff_split=cocostuff_split, batch_size=batch_size, workers=workers,
        progress=progress_factory(quiet, "reproducing"),
    )
    render_results(run_reproduce(opts), Console())
