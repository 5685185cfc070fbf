"""The `tagclip` command line: parses, validates and delegates. No algorithm lives here."""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
import sys
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

import typer
from rich.console import Console
from rich.logging import RichHandler
from rich.markup import escape

from tagclip_cli import __version__
from tagclip_cli.errors import TagclipError

app = typer.Typer(
    name="tagclip",
    help="Training-free pseudo-labels from a frozen CLIP: multi-label tags (TagCLIP) and masks (CLS-SEG).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

# Logs and progress go to stderr so that `--out -` can stream results on stdout.
err_console = Console(stderr=True)


def setup_logging(quiet: bool = False, verbose: bool = False) -> None:
    """Our messages through rich on stderr; third-party chatter (open_clip logs on the root logger)
    only at --verbose."""
    level = logging.WARNING if quiet else (logging.DEBUG if verbose else logging.INFO)
    ours = logging.getLogger("tagclip_cli")
    ours.handlers[:] = [RichHandler(console=err_console, show_path=False, show_time=False, markup=False)]
    ours.setLevel(level)
    ours.propagate = False
    logging.getLogger().setLevel(logging.DEBUG if verbose else logging.CRITICAL)


def print_error(message: str) -> None:
    """The one way an error reaches the user: `error: <message>` as one line on stderr."""
    # escape: a message may contain brackets (pip install 'tagclip-cli[crf]', a file named
    # "[draft].jpg") that must print as they are, not be read as rich markup
    err_console.print(f"[bold red]error:[/] {escape(message)}", markup=True, highlight=False, soft_wrap=True)


def fail(message: str, code: int = 2) -> typer.Exit:
    """Print one line to stderr and return the Exit to raise."""
    print_error(message)
    return typer.Exit(code)


def user_errors(command: Callable) -> Callable:
    """Wrap a command so that a TagclipError becomes its one-line message and exit code."""

    @functools.wraps(command)
    def run(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except TagclipError as exc:
            raise fail(str(exc), exc.exit_code) from None

    return run


# Logging options of every command. `-v` is not among them: it is --vocab in annotate and segment
# (evaluate keeps -v as a hidden spelling of --verbose, as before).
QUIET_OPT = typer.Option(False, "--quiet", "-q", help="Only warnings and errors.")
VERBOSE_OPT = typer.Option(False, "--verbose", help="Debug logging.")


def version_callback(value: bool) -> None:
    if value:
        typer.echo(f"tagclip-cli {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(
        False, "--version", callback=version_callback, is_eager=True, help="Show the version and exit."
    ),
) -> None:
    """tagclip: TagCLIP tags and CLS-SEG masks for whole image collections."""


@app.command("evaluate")
@user_errors
def evaluate_command(
    gt: str = typer.Option(
        ...,
        "--gt",
        help="Ground truth: voc2007, voc2012, coco2014, coco2017, coco-object, coco-stuff-27, "
        "coco (--root = any instances JSON) or folder (--root = label PNGs, with --classes).",
    ),
    root: str = typer.Option(..., "--root", help="Dataset directory (or the COCO instances JSON)."),
    pred: str = typer.Option(
        None, "--pred", help="Tags Parquet (classification), COCO RLE JSON or PNG dir (segmentation)."
    ),
    cams: str = typer.Option(None, "--cams", help="Instead of --pred: a `segment --save-cams` directory; its label "
                             "maps are remade from the saved CAMs (see --bg-threshold, --crf)."),
    bg_threshold: str = typer.Option(None, "--bg-threshold", help="--cams: sweep a constant background score, "
                                     "START:STOP:STEP (e.g. 0.3:0.7:0.05), a list a,b or one value; mIoU per value "
                                     "(default: the run's own rule, (1 - max cam)^1)."),
    crf: bool = typer.Option(False, "--crf", help="--cams: dense CRF on the saved CAMs (needs pip install "
                             "'tagclip-cli\\[crf]')."),
    images: str = typer.Option(None, "--images", help="--cams --crf: image folder (DIR/<image id>); default: the "
                               "image paths the cams were saved with."),
    split: str | None = typer.Option(None, "--split", help="Image list (first token per line)."),
    report: str | None = typer.Option(None, "--report", help="Write every number and setting as JSON."),
    ap: str = typer.Option("paper", "--ap", help="AP variant: paper (non-interpolated) or voc07 (11-point)."),
    difficult: str = typer.Option(
        "positive", "--difficult", help="VOC2007 difficult objects: positive (default), negative or ignore."
    ),
    classes: str | None = typer.Option(
        None, "--classes", help="--gt folder: class names, one per line (default ROOT/classes.txt)."
    ),
    vocab: str | None = typer.Option(
        None, "--vocab", help="Class names of a --pred PNG directory (vocabulary name or file)."
    ),
    allow_unmatched: bool = typer.Option(
        False, "--allow-unmatched", help="Evaluate the common classes when the class names differ."
    ),
    require_all: bool = typer.Option(
        False, "--require-all", help="Fail if a ground-truth image has no prediction."
    ),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="Only warnings and errors on stderr."),
    verbose: bool = VERBOSE_OPT,
    verbose_short: bool = typer.Option(False, "-v", hidden=True, help="Old spelling of --verbose."),
) -> None:
    """Score tags (mAP, P/R/F1) or masks (mIoU) against VOC, COCO, COCO-Stuff or your own labels."""
    from pathlib import Path

    from rich.progress import Progress

    from tagclip_cli import evaluate as ev

    setup_logging(quiet, verbose or verbose_short)
    choices = {
        "--gt": (gt, ev.GT_NAMES),
        "--ap": (ap, ev.AP_VARIANTS),
        "--difficult": (difficult, ev.DIFFICULT_MODES),
    }
    for option, (value, allowed) in choices.items():
        if value not in allowed:
            raise fail(f"{option} must be one of {', '.join(allowed)}, not '{value}'")
    if (pred is None) == (cams is None):
        raise fail("give either --pred (tags or masks) or --cams (a segment --save-cams directory)")
    thresholds = None
    if bg_threshold is not None:
        from tagclip_cli.cams import parse_thresholds

        thresholds = tuple(parse_thresholds(bg_threshold))
    config = ev.EvaluateConfig(
        gt=gt,
        root=Path(root),
        pred=Path(pred) if pred is not None else None,
        cams=Path(cams) if cams is not None else None,
        bg_thresholds=thresholds,
        crf=crf,
        images=Path(images) if images is not None else None,
        split=Path(split) if split else None,
        ap=ap,
        difficult=difficult,
        classes_file=Path(classes) if classes else None,
        vocab=vocab,
        allow_unmatched=allow_unmatched,
        require_all=require_all,
    )
    # No live display (not even its blank line) when stderr is a file or pipe.
    show = not quiet and err_console.is_terminal
    with Progress(console=err_console, transient=True, disable=not show) as bar:
        task = bar.add_task("evaluating", total=None)

        def advance(step: int, total: int) -> None:
            bar.update(task, advance=step, total=total)

        result = ev.evaluate(config, progress=advance)
    if report:
        try:
            ev.write_report(result, Path(report))
        except OSError as exc:
            raise fail(f"{report}: cannot write report ({exc.strerror or exc})") from None
    ev.render_report(result, Console())
    if report:
        logging.getLogger(__name__).info("report written to %s", report)


def main() -> None:
    from tagclip_cli.faults import Interrupted, install_signal_handlers

    install_signal_handlers()  # SIGINT / SIGTERM -> Interrupted: finish the current part, exit 130 / 143
    try:
        app()
    except TagclipError as exc:  # raised outside a command (commands print their own: user_errors)
        print_error(str(exc))
        sys.exit(exc.exit_code)
    except Interrupted as exc:
        err_console.print(f"interrupted ({exc}); completed results are kept: rerun the same command to resume",
                          highlight=False, soft_wrap=True)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        err_console.print("interrupted")
        sys.exit(130)


# ---- shared options ---------------------------------------------------------------------------

def _model_options(model: str | None, pretrained: str, checkpoint: Path | None, device: str, cache_dir: Path | None,
                   precision: str = "fp32"):
    from tagclip_cli.backbone import check_precision
    from tagclip_cli.pipeline import ModelOptions

    if checkpoint is not None and not checkpoint.is_file():
        raise fail(f"{checkpoint}: checkpoint file not found")
    resolved = _resolve_device(device)
    try:
        check_precision(precision, resolved)
    except TagclipError as exc:
        raise fail(f"--precision: {exc}") from None
    return ModelOptions(
        model=model or "ViT-B-16",
        pretrained=pretrained,
        checkpoint=checkpoint,
        device=resolved,
        cache_dir=cache_dir,
        model_explicit=model is not None,
        precision=precision,
    )


def _resolve_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise fail(f"--device {device}: CUDA is not available on this machine (use --device cpu)")
    return device


def _load_vocab(vocab: str, background: Path | None, no_background: bool):
    """The vocabulary with its background set; a VocabularyError is a usage error (exit 2)."""
    from tagclip_cli.vocab import load_vocabulary

    voc = load_vocabulary(vocab)
    if no_background:
        return voc.with_background(())
    if background is not None:
        return voc.with_background_file(background)
    return voc


def _progress(quiet: bool, label: str = "tagging"):
    from contextlib import contextmanager

    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    @contextmanager
    def factory(total: int):
        if quiet:
            yield lambda n: None
            return
        with Progress(
            TextColumn("[progress.description]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeRemainingColumn(),
            console=err_console,
            transient=False,
        ) as prog:
            task = prog.add_task(label, total=total)
            yield lambda n: prog.advance(task, n)

    return factory


def _report(summary, out: Path | None, quiet: bool = False) -> None:
    """Failures (first 20) as warnings, then one summary line on stderr (with --quiet only if
    something failed). torchrun ranks other than 0 report nothing: rank 0 reports for all."""
    if not summary.leader:
        return
    log = logging.getLogger("tagclip_cli")
    for image_id, error in summary.failures[:20]:
        log.warning("failed: %s: %s", image_id, error)
    if summary.failed > 20:
        log.warning("... and %d more failures (see the status/error columns)", summary.failed - 20)
    if summary.note and summary.failed and not summary.merged:
        log.warning(summary.note)
    elif summary.note:
        log.info(summary.note)
    earlier = f" (+{summary.failed_before} failed in the earlier run)" if summary.failed_before else ""
    if not quiet or summary.failed or summary.failed_before:
        err_console.print(
            f"{out if out is not None else '<stdout>'}: {summary.done} done, {summary.skipped} skipped "
            f"(already done), {summary.failed} failed{earlier}",
            highlight=False,
        )


THRESHOLDS_HELP = ("Per-class thresholds: a file of 'class<TAB>threshold' lines (e.g. from `tagclip calibrate`); "
                   "classes not listed keep --tag-threshold.")


def _class_thresholds(path: Path | None, classes, default: float) -> tuple[float, ...] | None:
    """The (F,) per-class thresholds of a --thresholds file (ThresholdFileError: exit 2, file and line)."""
    if path is None:
        return None
    from tagclip_cli.thresholds import read_threshold_file

    return read_threshold_file(path, classes, default).vector(classes)


# Input and job options shared by `annotate` and `segment`.
IMAGES_ARG = typer.Argument(
    None, help="Folder of images (recursive), a text file of image paths (one per line), one image, or '-' to "
    "read paths from stdin (e.g. from find); or WebDataset tar shards: one .tar, a pattern such as "
    "'data/{00000..00127}.tar', a folder of tars or a text file of tar URLs; or .parquet files with image "
    "bytes. Local paths or URLs (s3://, gs://, hf://, https://). Omit with --manifest or --images-parquet."
)
MANIFEST_OPT = typer.Option(
    None, "--manifest", help="COCO JSON whose 'images' (id, file_name) are the inputs; ids become image_id."
)
IMAGE_ROOT_OPT = typer.Option(
    None, "--image-root", help="Folder the manifest's file_name (or a path list's relative paths) are under; "
    "image ids are relative to it."
)
IMAGES_PARQUET_OPT = typer.Option(
    None, "--images-parquet", help="Parquet file(s) with the image bytes in a column (a file, a glob or a "
    "{a,b} pattern; img2dataset or Hugging Face datasets output), read one row group at a time."
)
IMAGE_COLUMN_OPT = typer.Option(
    None, "--image-column", help="Parquet column with the image: binary, or a {bytes, path} struct "
    "(default: 'image', else 'jpg')."
)
ID_COLUMN_OPT = typer.Option(
    None, "--id-column", help="Parquet column giving image ids (default: 'key', else 'path', else the row "
    "number); ids are '<file name>/<id>'."
)
DEVICE_OPT = typer.Option("auto", "--device", help="cpu, cuda, cuda:N or auto.")
PRECISION_OPT = typer.Option(
    "fp32", "--precision", help="fp32 (default); bf16 (CUDA autocast, or bf16 image-tower weights on CPU: "
    "several times faster on CPUs with AMX/AVX512-BF16) or fp16 (CUDA). Attention maps stay fp32 softmax."
)
BACKGROUND_OPT = typer.Option(
    None, "--background", help="File of background class names (replaces the vocabulary's)."
)
# The choices are the registry's (tagclip_cli.methods), checked when the command runs; the text
# names the built-ins without importing them (the registry loads torch).
METHOD_HELP = ("clses (CLS-SEG: TagCLIP tags -> CLIP-ES, the paper's), maskclip (baseline: dense logits, argmax), or "
               "the dense baselines sclip, clearclip, naclip, resclip (ResCLIP on NACLIP) and scclip (SC-CLIP) "
               "with their published settings (README 'Compare methods'); plug-ins add more "
               "(TAGCLIP_METHODS=module, or a package's 'tagclip_cli.methods' entry "
               "point).")
REFERENCE_COMPAT_OPT = typer.Option(
    False, "--reference-compat",
    help="Reproduce the reference implementation's quirks exactly (to match published numbers).",
)
BATCH_SIZE_OPT = typer.Option(8, "--batch-size", min=1, help="Images per forward.")
WORKERS_OPT = typer.Option(2, "--workers", min=0, help="DataLoader worker processes for decoding.")
OVERWRITE_OPT = typer.Option(False, "--overwrite", help="Replace an existing output or unfinished run.")
FAIL_FAST_OPT = typer.Option(False, "--fail-fast", help="Stop at the first image that cannot be read.")
CACHE_DIR_OPT = typer.Option(
    None, "--cache-dir", help="Text-embedding cache (default ~/.cache/tagclip or $TAGCLIP_CACHE_DIR)."
)
SHARD_OPT = typer.Option(
    None, "--shard", help="Do only shard I of N (I/N, from 0) of the work, e.g. one SLURM array task; "
    "no merge: run `tagclip merge OUT` when all shards are done."
)

PART_SIZE_OPT = typer.Option(
    256, "--part-size", min=1, help="Rows per part file in OUT.parts/ (per process): what a crash can cost at most."
)


def _collect_items(images: str | None, manifest: str | None, image_root: str | None,
                   images_parquet: str | None = None, image_column: str | None = None,
                   id_column: str | None = None):
    """The input items (sources.py); manifest and image root stay strings so that URLs survive."""
    from tagclip_cli.sources import ParquetColumns, collect_items, is_url

    def local(value: str | None):
        return Path(value) if value is not None and not is_url(value) else value

    return collect_items(images, local(manifest), local(image_root), images_parquet=images_parquet,
                         columns=ParquetColumns(image_column, id_column))


def _placement(shard: str | None, out: str, overwrite: bool, images: str | None):
    """Where this process sits (torchrun env, --shard); refuses combinations that cannot work."""
    from tagclip_cli.jobs.placement import parse_shard, placement_from_env

    placement = placement_from_env(parse_shard(shard) if shard else None)
    if placement.shard and overwrite:
        raise fail("--overwrite cannot be combined with --shard (one shard would delete the others' results); "
                   "remove OUT and OUT.parts yourself to start over")
    if placement.distributed and out == "-":
        raise fail("--out - (JSON Lines on stdout) works in a single process; with torchrun write Parquet")
    if placement.distributed and images == "-":
        raise fail("'-' (paths on stdin) cannot be shared by torchrun ranks; write the list to a file")
    return placement


VOCAB_OPT = typer.Option(..., "--vocab", "-v", help="Vocabulary file, or a built-in name (voc, coco, coco-stuff).")
MODEL_OPT = typer.Option(
    None, "--model", help="open_clip model name (default ViT-B-16, the paper's), or a built-in demo model such as "
    "shapes-demo."
)
PRETRAINED_OPT = typer.Option(
    "openai", "--pretrained", help="open_clip pretrained tag (default openai; needs network once). 'random' = "
    "seeded random weights."
)
CHECKPOINT_OPT = typer.Option(
    None, "--checkpoint", help="Weights file: OpenAI TorchScript .pt, or a state dict .pt/.bin/.safetensors "
    "(OpenAI or open_clip keys)."
)


@app.command()
@user_errors
def annotate(
    images: str = IMAGES_ARG,
    vocab: str = VOCAB_OPT,
    out: str = typer.Option(
        ..., "--out", "-o", help="Output Parquet file (one row per image), or '-' for JSON Lines on stdout "
        "(scores as {class: score}; no resume)."
    ),
    manifest: str = MANIFEST_OPT,
    image_root: str = IMAGE_ROOT_OPT,
    images_parquet: str = IMAGES_PARQUET_OPT,
    image_column: str = IMAGE_COLUMN_OPT,
    id_column: str = ID_COLUMN_OPT,
    shard: str = SHARD_OPT,
    model: str = MODEL_OPT,
    pretrained: str = PRETRAINED_OPT,
    checkpoint: Path = CHECKPOINT_OPT,
    device: str = DEVICE_OPT,
    precision: str = PRECISION_OPT,
    background: Path = BACKGROUND_OPT,
    no_background: bool = typer.Option(False, "--no-background", help="Score against foreground classes only."),
    tag_threshold: float = typer.Option(
        0.5, "--tag-threshold", min=0.0, max=1.0, help="Keep classes whose normalised score is above this."
    ),
    thresholds: Path = typer.Option(None, "--thresholds", help=THRESHOLDS_HELP),
    reference_compat: bool = REFERENCE_COMPAT_OPT,
    batch_size: int = BATCH_SIZE_OPT,
    workers: int = WORKERS_OPT,
    max_side: int = typer.Option(
        1024, "--max-side", min=16,
        help="Downscale images whose longer side exceeds this before the native-resolution forward "
        "(attention memory grows with the 4th power of the side; VOC/COCO images are below the default).",
    ),
    overwrite: bool = OVERWRITE_OPT,
    fail_fast: bool = FAIL_FAST_OPT,
    part_size: int = PART_SIZE_OPT,
    cache_dir: Path = CACHE_DIR_OPT,
    quiet: bool = QUIET_OPT,
    verbose: bool = VERBOSE_OPT,
) -> None:
    """Tag every image with TagCLIP: the fused score of every class and the predicted tags, to Parquet."""
    from tagclip_cli.fileio import check_output_path
    from tagclip_cli.jobs.sinks import OutputClosed
    from tagclip_cli.pipeline import AnnotateOptions, run_annotate
    from tagclip_cli.quirks import Quirks
    from tagclip_cli.tagclip import TagCLIPConfig

    placement = _placement(shard, out, overwrite, images)
    setup_logging(quiet or not placement.leader, verbose)
    voc = _load_vocab(vocab, background, no_background)
    items = _collect_items(images, manifest, image_root, images_parquet, image_column, id_column)
    cfg = TagCLIPConfig(tag_threshold=tag_threshold, use_background=not no_background,
                        class_thresholds=_class_thresholds(thresholds, voc.classes, tag_threshold))
    model_opts = _model_options(model, pretrained, checkpoint, device, cache_dir, precision)
    out_path = None if out == "-" else Path(out)
    if out_path is not None:
        check_output_path(out_path)  # before the model loads: a bad --out fails in a second
    try:
        with _stdout_for_results(out_path is None) as stdout:
            opts = AnnotateOptions(
                items=items, vocab=voc, out=out_path, stdout=stdout,
                model=model_opts,
                tagclip=cfg, quirks=Quirks(reference_compat), batch_size=batch_size, workers=workers,
                max_side=max_side, overwrite=overwrite, fail_fast=fail_fast, placement=placement, part_size=part_size,
            )
            summary = run_annotate(opts, progress=_progress(quiet))
    except OutputClosed:
        raise typer.Exit(0) from None
    except TagclipError as exc:
        if not placement.leader:  # rank 0 has the same error (jobs.Session) and prints it once
            raise typer.Exit(exc.exit_code) from None
        raise
    _report(summary, out_path, quiet)
    if (summary.failed or summary.failed_before) and summary.leader:
        raise typer.Exit(1)  # the output has failed rows, whichever run met them


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


@app.command()
@user_errors
def merge(
    out: Path = typer.Argument(..., help="The output given to the shards' --out (its OUT.parts/ holds the parts)."),
    quiet: bool = QUIET_OPT,
    verbose: bool = VERBOSE_OPT,
) -> None:
    """Merge the parts of separately run shards (--shard I/N) into OUT, once every image has a result."""
    from tagclip_cli.jobs.parts import merge_output

    setup_logging(quiet, verbose)
    rows = merge_output(out)
    if not quiet:
        err_console.print(f"{out}: merged {rows} rows", highlight=False)


@app.command()
@user_errors
def show(
    images: Path = typer.Option(..., "--images", help="The image folder that was annotated."),
    tags: Path = typer.Option(..., "--tags", help="Tags Parquet written by `tagclip annotate`."),
    out: Path = typer.Option(..., "--out", "-o", help="Gallery folder (index.html, overlays/, thumbs/)."),
    masks: Path = typer.Option(None, "--masks", help="COCO RLE masks JSON written by `tagclip segment`."),
    max_side: int = typer.Option(1024, "--max-side", min=64,
                                 help="Longer side of the overlays' image part (about 1 MB per PNG at 1024)."),
    thumb_side: int = typer.Option(256, "--thumb-side", min=32, help="Longer side of the thumbnails."),
    page_size: int = typer.Option(100, "--page-size", min=1, help="Cards per page in index.html."),
    limit: int = typer.Option(None, "--limit", min=1, help="Show only the first N images of the tags file (with "
                              "--sort doubt: the N most doubtful)."),
    workers: int = typer.Option(2, "--workers", min=0, help="Processes drawing overlays (0 = in this process)."),
    title: str = typer.Option(None, "--title", help="Page title (default: the tags file name)."),
    sort: str = typer.Option("file", "--sort", help="file (the tags file's order) or doubt (images whose tag "
                             "decisions are closest to their thresholds first: the likeliest mistakes)."),
    failed_first: bool = typer.Option(False, "--failed-first", help="With --sort doubt: failed images first."),
    doubt_class: str = typer.Option(None, "--class", help="Only this class's doubt: its images sorted by how close "
                                    "its score is to its threshold (implies --sort doubt)."),
    max_margin: float = typer.Option(None, "--max-margin", min=0.0, max=1.0,
                                     help="With --sort doubt: only images whose margin is at most this."),
    thresholds: Path = typer.Option(None, "--thresholds", help="With --sort doubt: thresholds file to measure "
                                    "doubt against (default: the ones the tags file was made with)."),
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
    from rich.progress import Progress

    try:
        with Progress(console=err_console, transient=True, disable=quiet or not err_console.is_terminal) as bar:
            task = bar.add_task("drawing", total=None)
            summary = build_gallery(config, progress=lambda step, total: bar.update(task, advance=step, total=total))
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


@app.command()
@user_errors
def segment(
    images: str = IMAGES_ARG,
    vocab: str = VOCAB_OPT,
    out: Path = typer.Option(..., "--out", "-o", help="Output COCO JSON (RLE masks, one annotation per image "
                             "and present class), or a masks Parquet when it ends in .parquet (one row per mask, "
                             "for runs too large for one JSON)."),
    tags_in: Path = typer.Option(None, "--tags", help="Tags Parquet of an earlier `tagclip annotate` run: "
                                 "segment its tags instead of running TagCLIP here."),
    tags_out: Path = typer.Option(None, "--tags-out", help="Also write the tags Parquet (as annotate would) "
                                  "from the same pass."),
    png_dir: Path = typer.Option(None, "--png-dir", help="Also write palette label PNGs (0 = background, "
                                 "class = vocabulary index + 1) as DIR/<image id>.png."),
    method: str = typer.Option("clses", "--method", help=METHOD_HELP),
    crf: bool = typer.Option(False, "--crf", help="Dense CRF on the RGB image (paper's parameters; "
                             "needs pip install 'tagclip-cli\\[crf]')."),
    setting: str = typer.Option("voc", "--setting", help="CAA layers and box threshold: voc (layers L-7..L-1, "
                                "0.4), coco (layers L-7..L, 0.7) or cocostuff (coco's, plus TagCLIP's COCO-Stuff "
                                "values and no background label), as the reference (docs/algorithm.md §11); "
                                "for sclip / clearclip / naclip their published VOC21 or COCO-Object settings."),
    save_cams: Path = typer.Option(None, "--save-cams", help="Also save each image's refined CAMs (float16 .npz: "
                                   "cams, tags) as DIR/<image id>.npz, for `evaluate --cams DIR --bg-threshold`."),
    cams_grid: bool = typer.Option(False, "--cams-grid", help="--save-cams on the patch grid instead of at the "
                                   "image size (about 256x smaller files)."),
    rcs: bool = typer.Option(False, "--rcs", help="sclip / clearclip / naclip: add ResCLIP's RCS and SFR to the "
                             "last block, with ResCLIP's published settings (naclip --rcs = --method resclip)."),
    key_smoothing: bool = typer.Option(False, "--key-smoothing", help="MaskCLIP: smooth with last-layer keys."),
    prompt_denoising: bool = typer.Option(False, "--prompt-denoising",
                                          help="MaskCLIP: drop classes whose best probability is below 0.5."),
    manifest: str = MANIFEST_OPT,
    image_root: str = IMAGE_ROOT_OPT,
    images_parquet: str = IMAGES_PARQUET_OPT,
    image_column: str = IMAGE_COLUMN_OPT,
    id_column: str = ID_COLUMN_OPT,
    shard: str = SHARD_OPT,
    model: str = MODEL_OPT,
    pretrained: str = PRETRAINED_OPT,
    checkpoint: Path = CHECKPOINT_OPT,
    device: str = DEVICE_OPT,
    precision: str = PRECISION_OPT,
    background: Path = BACKGROUND_OPT,
    no_background: bool = typer.Option(False, "--no-background", help="No background classes."),
    tag_threshold: float = typer.Option(
        None, "--tag-threshold", min=0.0, max=1.0, help="TagCLIP: keep classes whose normalised score is above this "
        "(default 0.5; 0.1 with --setting cocostuff)."
    ),
    thresholds: Path = typer.Option(None, "--thresholds", help="TagCLIP: " + THRESHOLDS_HELP),
    reference_compat: bool = REFERENCE_COMPAT_OPT,
    batch_size: int = BATCH_SIZE_OPT,
    workers: int = WORKERS_OPT,
    max_side: int = typer.Option(1024, "--max-side", min=16,
                                 help="Downscale longer sides above this for the model (masks keep the image size)."),
    overwrite: bool = OVERWRITE_OPT,
    fail_fast: bool = FAIL_FAST_OPT,
    part_size: int = PART_SIZE_OPT,
    cache_dir: Path = CACHE_DIR_OPT,
    quiet: bool = QUIET_OPT,
    verbose: bool = VERBOSE_OPT,
) -> None:
    """Segment every image (CLS-SEG, MaskCLIP, SCLIP, ClearCLIP or NACLIP) into a COCO RLE JSON or a masks
    Parquet, optionally with label PNGs and tags."""
    from tagclip_cli import methods
    from tagclip_cli.cams import require_crf
    from tagclip_cli.fileio import check_output_path
    from tagclip_cli.pipeline import SegmentOptions, run_segment
    from tagclip_cli.quirks import Quirks
    from tagclip_cli.tagclip import TagCLIPConfig

    _check_method(method, setting, crf, key_smoothing or prompt_denoising, tags_in is not None or tags_out is not None,
                  save_cams, cams_grid)
    if tags_in is not None and tags_out is not None:
        raise fail("--tags-out writes the tags of TagCLIP run here; with --tags the tags are already in that file")
    if thresholds is not None and tags_in is not None:
        raise fail("--thresholds applies to the TagCLIP tags computed here; with --tags, re-derive that file's "
                   "tags first: tagclip retag TAGS --thresholds FILE --out NEW")
    if str(out) == "-":
        raise fail("segment writes a COCO JSON or masks Parquet file; --out - is not supported "
                   "(use annotate for JSON Lines)")
    placement = _placement(shard, str(out), overwrite, images)
    setup_logging(quiet or not placement.leader, verbose)
    if crf:
        require_crf()
    for path in (out, tags_out):
        if path is not None:
            check_output_path(path)
    if png_dir is not None and png_dir.exists() and not png_dir.is_dir():
        raise fail(f"--png-dir {png_dir}: exists and is not a directory")
    seg_cfg = methods.configure(method, setting, crf=crf, key_smoothing=key_smoothing,
                                prompt_denoising=prompt_denoising, rcs=rcs,
                                save_cams=None if save_cams is None else ("grid" if cams_grid else "image"))
    voc = _load_vocab(vocab, background, no_background)
    items = _collect_items(images, manifest, image_root, images_parquet, image_column, id_column)
    tag_kw = {}
    if tag_threshold is not None:
        tag_kw["tag_threshold"] = tag_threshold
    if setting == "cocostuff":  # TagCLIP's COCO-Stuff values (layers 1..L-1, thresholds 0.1, no background)
        cfg = TagCLIPConfig.coco_stuff(**tag_kw)
    else:
        cfg = TagCLIPConfig(use_background=not no_background, **tag_kw)
    if thresholds is not None:
        cfg = dataclasses.replace(cfg, class_thresholds=_class_thresholds(thresholds, voc.classes, cfg.tag_threshold))
    model_opts = _model_options(model, pretrained, checkpoint, device, cache_dir, precision)
    opts = SegmentOptions(
        items=items, vocab=voc, out=out, model=model_opts, tagclip=cfg, segment=seg_cfg, method=method,
        quirks=Quirks(reference_compat),
        tags_in=tags_in, tags_out=tags_out, png_dir=png_dir, cams_dir=save_cams, batch_size=batch_size, workers=workers,
        max_side=max_side, part_size=part_size, overwrite=overwrite, fail_fast=fail_fast, placement=placement,
    )
    summary = run_segment(opts, progress=_progress(quiet, "segmenting"))
    _report(summary, out, quiet)
    if (summary.failed or summary.failed_before) and summary.leader:
        raise typer.Exit(1)  # the output has failed rows, whichever run met them


def _check_method(method: str, setting: str, crf: bool, maskclip_options: bool, tags_files: bool,
                  save_cams: Path | None, cams_grid: bool) -> None:
    """segment --method / --setting and the options a method may not take (the registry's facts):
    usage errors before anything loads."""
    from tagclip_cli import methods

    if method not in methods.names("masks"):
        raise fail(f"--method must be one of {', '.join(methods.names('masks'))}, not '{method}'")
    if setting not in methods.SETTINGS:
        raise fail(f"--setting must be one of {', '.join(methods.SETTINGS)}, not '{setting}'")
    spec = methods.get(method, "masks")
    _check_save_cams(save_cams, cams_grid, method, "save_cams" in spec.options)
    if crf and "crf" not in spec.options:
        raise fail(f"--crf refines CLS-SEG cams; it does not apply to --method {method}")
    if maskclip_options and not {"key_smoothing", "prompt_denoising"} <= spec.options:
        raise fail("--key-smoothing and --prompt-denoising are MaskCLIP options (--method maskclip)")
    if not spec.needs_tags and tags_files:
        raise fail(f"--tags and --tags-out are for TagCLIP's tags; --method {method} does not use them")


def _check_save_cams(save_cams: Path | None, cams_grid: bool, method: str, saves_cams: bool) -> None:
    """--save-cams DIR / --cams-grid: usage errors before anything loads."""
    if cams_grid and save_cams is None:
        raise fail("--cams-grid chooses the layout of --save-cams DIR; give --save-cams too")
    if save_cams is None:
        return
    if not saves_cams:
        raise fail("--save-cams saves CLS-SEG's refined CAMs; it needs --method clses")
    if save_cams.exists() and not save_cams.is_dir():
        raise fail(f"--save-cams {save_cams}: exists and is not a directory")


@app.command()
@user_errors
def reproduce(
    out: Path = typer.Option(..., "--out", "-o", help="Work folder: one subfolder per row (outputs, report.json), "
                             "results.json. Rerun the same command to resume; finished rows are skipped."),
    checkpoint: Path = CHECKPOINT_OPT,
    voc2007: Path = typer.Option(None, "--voc2007", help="VOC2007 (or VOCdevkit) root: Annotations, JPEGImages, "
                                 "ImageSets/Main/test.txt."),
    voc2012: Path = typer.Option(None, "--voc2012", help="VOC2012 root: JPEGImages, SegmentationClass, "
                                 "ImageSets/Segmentation/val.txt."),
    coco2014: Path = typer.Option(None, "--coco2014", help="COCO 2014 root: annotations/instances_val2014.json, "
                                  "val2014/."),
    coco2017: Path = typer.Option(None, "--coco2017", help="COCO 2017 root: annotations/instances_val2017.json, "
                                  "val2017/ (COCO-Object, and the images of COCO-Stuff)."),
    cocostuff: Path = typer.Option(None, "--cocostuff", help="COCO-Stuff root: stuffthingmaps_trainval2017/val2017 "
                                   "(or the label PNGs themselves)."),
    cocostuff_split: Path = typer.Option(None, "--cocostuff-split", help="COCO-Stuff image list (default: every "
                                         "label PNG); the reference uses its imageset/cocostuff/val.txt."),
    rows: str = typer.Option(None, "--rows", help="Only these rows (comma-separated names; default the paper's "
                             "eight; the ResCLIP and SC-CLIP rows, e.g. voc2012-miou-resclip, only when named)."),
    model: str = MODEL_OPT,
    pretrained: str = PRETRAINED_OPT,
    device: str = DEVICE_OPT,
    batch_size: int = BATCH_SIZE_OPT,
    workers: int = WORKERS_OPT,
    cache_dir: Path = CACHE_DIR_OPT,
    quiet: bool = QUIET_OPT,
    verbose: bool = VERBOSE_OPT,
) -> None:
    """The paper's eight numbers (VOC07 / COCO14 mAP; VOC12, COCO-Object, COCO-Stuff-27 mIoU with and without CRF)
    with --reference-compat, in one resumable run, and a table of ours vs published."""
    from tagclip_cli.reproduce import PAPER_ROWS, ReproduceOptions, render_results, run_reproduce

    setup_logging(quiet, verbose)
    roots = {name: path for name, path in (("voc2007", voc2007), ("voc2012", voc2012), ("coco2014", coco2014),
                                            ("coco2017", coco2017), ("cocostuff", cocostuff)) if path is not None}
    if cocostuff_split is not None and not cocostuff_split.is_file():
        raise fail(f"--cocostuff-split {cocostuff_split}: file not found")
    chosen = PAPER_ROWS if rows is None else tuple(r.strip() for r in rows.split(",") if r.strip())
    opts = ReproduceOptions(
        out=out, roots=roots, model=_model_options(model, pretrained, checkpoint, device, cache_dir),
        rows=chosen, cocostuff_split=cocostuff_split, batch_size=batch_size, workers=workers,
        progress=_progress(quiet, "reproducing"),
    )
    render_results(run_reproduce(opts), Console())


@app.command("export")
@user_errors
def export_command(
    fmt: str = typer.Argument(..., metavar="FORMAT", help="yolo, voc, labelstudio, cvat or coco."),
    tags: Path = typer.Option(None, "--tags", help="Tags Parquet (`tagclip annotate` or segment --tags-out): "
                              "image tags, and the vocabulary the masks are checked against."),
    masks: Path = typer.Option(None, "--masks", help="Masks of `tagclip segment`: COCO JSON or masks Parquet."),
    images: Path = typer.Option(None, "--images", help="Folder the image ids are relative to (yolo and voc "
                                "link or copy images; default: the paths recorded in the tags file)."),
    out: Path = typer.Option(..., "--out", "-o", help="Output folder (must not exist, or be empty; see --overwrite)."),
    task: str = typer.Option("segment", "--task", help="yolo: segment (polygons) or detect (boxes)."),
    copy: bool = typer.Option(False, "--copy", help="yolo, voc: copy the images instead of linking them."),
    mask_as: str = typer.Option("brush", "--mask-as", help="labelstudio: brush (Label Studio RLE, exact) or "
                                "polygon regions."),
    split: str = typer.Option("train", "--split", help="voc: the image set name (ImageSets/*/<split>.txt)."),
    url_prefix: str = typer.Option("/data/local-files/?d=", "--url-prefix", help="labelstudio: task image URL = "
                                   "prefix + image id (default: Label Studio's local files under "
                                   "LOCAL_FILES_DOCUMENT_ROOT)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace a non-empty --out folder."),
    quiet: bool = QUIET_OPT,
    verbose: bool = VERBOSE_OPT,
) -> None:
    """Export tags and masks as a YOLO, Pascal VOC, Label Studio, CVAT or COCO dataset folder."""
    from tagclip_cli.export import ExportConfig, export

    setup_logging(quiet, verbose)
    config = ExportConfig(format=fmt, out=out, tags=tags, masks=masks, images=images, task=task, copy=copy,
                          mask_as=mask_as, split=split, url_prefix=url_prefix, overwrite=overwrite)
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    with Progress(TextColumn("[progress.description]{task.description}"), BarColumn(), MofNCompleteColumn(),
                  TimeRemainingColumn(), console=err_console, transient=True,
                  disable=quiet or not err_console.is_terminal) as bar:
        bar_task = bar.add_task(f"export {fmt}", total=None)
        summary = export(config, progress=lambda step, total: bar.update(bar_task, advance=step, total=total))
    if not quiet:
        err_console.print(
            f"{summary.out}: {fmt}, {summary.images} images, {summary.masks} masks"
            + (f", {summary.shapes} label shapes" if summary.shapes else "")
            + (f" ({summary.skipped} failed images skipped)" if summary.skipped else ""),
            highlight=False,
        )


@app.command("train-student")
@user_errors
def train_student_command(
    masks: Path = typer.Option(..., "--masks", help="Masks of `tagclip segment` (COCO JSON or masks Parquet)."),
    tags: Path = typer.Option(None, "--tags", help="Tags Parquet of the same run: checked against the masks "
                              "and its vocabulary names the classes."),
    images: Path = typer.Option(None, "--images", help="Folder the image ids are relative to (default: the "
                                "paths recorded in the tags file)."),
    out: Path = typer.Option(..., "--out", "-o", help="Run folder: dataset/, train.txt, val.txt, data.yaml, "
                             "student/ (Ultralytics' run: weights/best.pt, results.csv), student.json."),
    student: str = typer.Option("yolo11n-seg.yaml", "--student", help="Ultralytics model: a yaml it ships "
                                "(from scratch; -seg for masks, plain for boxes) or a local .pt to fine-tune."),
    val_fraction: float = typer.Option(0.2, "--val-fraction", help="Share of images held out for validation, "
                                       "by a seeded hash of the image id (0: validate on the training images)."),
    seed: int = typer.Option(0, "--seed", help="Seed of the split and of Ultralytics' training."),
    epochs: int = typer.Option(100, "--epochs", help="Ultralytics epochs."),
    imgsz: int = typer.Option(640, "--imgsz", help="Ultralytics training image size."),
    batch: int = typer.Option(16, "--batch", help="Ultralytics batch size."),
    device: str = typer.Option("auto", "--device", help="Ultralytics device: cpu, 0, 0,1, ... (auto: GPU 0 "
                               "if there is one)."),
    workers: int = typer.Option(8, "--workers", help="Ultralytics data-loading workers (0: in process)."),
    amp: bool = typer.Option(False, "--amp/--no-amp", help="Mixed precision on CUDA (Ultralytics checks it "
                             "with yolo26n.pt, which must then be in its weights folder: offline it warns)."),
    copy: bool = typer.Option(False, "--copy", help="Copy the images into dataset/ instead of linking them."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace a previous train-student run in --out."),
    quiet: bool = QUIET_OPT,
    verbose: bool = VERBOSE_OPT,
) -> None:
    """Train a YOLO student (Ultralytics, offline) on the masks: export, seeded train/val split, train."""
    from tagclip_cli.student import StudentConfig, train_student

    setup_logging(quiet, verbose)
    if quiet:
        os.environ["YOLO_VERBOSE"] = "False"  # read by Ultralytics when it is imported
    if device == "auto":
        import torch

        device = "0" if torch.cuda.is_available() else "cpu"
    config = StudentConfig(masks=masks, out=out, tags=tags, images=images, student=student,
                           val_fraction=val_fraction, seed=seed, epochs=epochs, imgsz=imgsz, batch=batch,
                           device=device, workers=workers, amp=amp, copy=copy, overwrite=overwrite)
    run = train_student(config)
    if not quiet:
        shown = {k.removeprefix("metrics/"): round(v, 4) for k, v in run.metrics.items()}
        err_console.print(f"{run.out}: {run.task} student trained on {run.train_images} images, validated on "
                          f"{run.val_images}; weights {run.weights}; {shown}", highlight=False, soft_wrap=True)


@app.command("student-predict")
@user_errors
def student_predict_command(
    weights: Path = typer.Argument(..., help="Trained student weights (train-student's student/weights/best.pt)."),
    images: Path = typer.Argument(..., help="Folder of images (ids relative to it, as for segment)."),
    png_dir: Path = typer.Option(..., "--png-dir", help="Output: one label PNG per image and categories.json, "
                                 "what `tagclip evaluate --pred DIR` reads."),
    imgsz: int = typer.Option(640, "--imgsz", help="Inference image size (the training one)."),
    conf: float = typer.Option(0.25, "--conf", help="Ultralytics confidence threshold."),
    device: str = typer.Option("cpu", "--device", help="Ultralytics device: cpu, 0, ..."),
    quiet: bool = QUIET_OPT,
    verbose: bool = VERBOSE_OPT,
) -> None:
    """Write a trained student's masks as label PNGs, to score it with `tagclip evaluate`."""
    from tagclip_cli.student import predict_label_pngs

    setup_logging(quiet, verbose)
    os.environ["YOLO_VERBOSE"] = "False"
    count = predict_label_pngs(weights, images, png_dir, imgsz=imgsz, device=device, conf=conf)
    if not quiet:
        err_console.print(f"{png_dir}: {count} label PNGs", highlight=False)


@app.command()
@user_errors
def retag(
    tags: Path = typer.Argument(..., help="Tags Parquet written by `tagclip annotate` (or segment --tags-out)."),
    out: Path = typer.Option(..., "--out", "-o", help="The retagged tags Parquet (same columns and metadata)."),
    thresholds: Path = typer.Option(None, "--thresholds", help=THRESHOLDS_HELP),
    tag_threshold: float = typer.Option(
        None, "--tag-threshold", min=0.0, max=1.0,
        help="Threshold of the classes the file does not list (default: the one TAGS was made with)."
    ),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing --out."),
    quiet: bool = QUIET_OPT,
    verbose: bool = VERBOSE_OPT,
) -> None:
    """Re-derive the tags of a tags Parquet from its stored scores with new thresholds (no model)."""
    from tagclip_cli.fileio import check_output_path
    from tagclip_cli.thresholds import retag_file

    setup_logging(quiet, verbose)
    if thresholds is None and tag_threshold is None:
        raise fail("retag needs --thresholds FILE and/or --tag-threshold")
    if out.resolve() == tags.resolve():
        raise fail(f"--out {out} is the input file; write the retagged tags to a new file")
    check_output_path(out)
    if out.exists() and not overwrite:
        raise fail(f"{out}: exists; pass --overwrite to replace it")
    rows, changed = retag_file(tags, out, thresholds, tag_threshold)
    if not quiet:
        err_console.print(f"{out}: {rows} rows, tags changed in {changed}", highlight=False)


@app.command()
@user_errors
def calibrate(
    gt: str = typer.Option(..., "--gt", help="Ground truth of the labelled subset, as `tagclip evaluate --gt`."),
    root: str = typer.Option(..., "--root", help="Dataset directory (or the COCO instances JSON)."),
    pred: Path = typer.Option(..., "--pred", help="Tags Parquet of the labelled images (`tagclip annotate`)."),
    out: Path = typer.Option(..., "--out", "-o", help="Thresholds file to write (class<TAB>threshold)."),
    target: str = typer.Option("f1", "--target", help="f1 (best F1 per class), precision=P (most recall with "
                               "precision >= P) or recall=R (most precision with recall >= R)."),
    min_positives: int = typer.Option(5, "--min-positives", min=1,
                                      help="Classes with fewer positive images keep their threshold."),
    split: str | None = typer.Option(None, "--split", help="Image list (first token per line)."),
    difficult: str = typer.Option("positive", "--difficult", help="VOC2007 difficult objects."),
    classes: str | None = typer.Option(None, "--classes", help="--gt folder: class names file."),
    allow_unmatched: bool = typer.Option(False, "--allow-unmatched",
                                         help="Calibrate the common classes when the class names differ."),
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
        raise fail(f"--gt must be one of {', '.join(ev.GT_NAMES)}, not '{gt}'")
    parse_target(target)
    check_output_path(out)
    result = run_calibration(gt, Path(root), pred, target, split=Path(split) if split else None,
                             difficult=difficult, classes_file=Path(classes) if classes else None,
                             allow_unmatched=allow_unmatched, min_positives=min_positives)
    log = logging.getLogger("tagclip_cli")
    for name, why in zip(result.classes, result.kept_because, strict=True):
        if why is not None and why != "not in the ground truth":
            log.warning("%s: keeps its threshold (%s)", name, why)
    missing = [n for n, why in zip(result.classes, result.kept_because, strict=True)
               if why == "not in the ground truth"]
    if missing:
        log.warning("%d class(es) not in the ground truth keep their threshold: %s", len(missing), ", ".join(missing))
    write_threshold_file(out, dict(zip(result.classes, result.after, strict=True)),
                         header=[f"tagclip calibrate --gt {gt} --target {target}: {result.images} labelled images "
                                 f"of {pred.name}"])
    _render_calibration(result)
    if not quiet:
        err_console.print(f"{out}: thresholds of {len(result.classes)} classes "
                          f"({sum(w is None for w in result.kept_because)} calibrated)", highlight=False)


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
