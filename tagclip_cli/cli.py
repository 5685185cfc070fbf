"""The `tagclip` command line: parses, validates and delegates. No algorithm lives here."""

from __future__ import annotations

import logging
import sys

import typer
from rich.console import Console
from rich.logging import RichHandler

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
    level = logging.WARNING if quiet else (logging.DEBUG if verbose else logging.INFO)
    logging.basicConfig(
        level=level,
        format="%(message)s",
        handlers=[RichHandler(console=err_console, show_path=False, show_time=False, markup=False)],
        force=True,
    )


def fail(message: str, code: int = 2) -> typer.Exit:
    """Print one line to stderr and return the Exit to raise."""
    err_console.print(f"[bold red]error:[/] {message}", markup=True, highlight=False, soft_wrap=True)
    return typer.Exit(code)


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
def evaluate_command(
    gt: str = typer.Option(
        ...,
        "--gt",
        help="Ground truth: voc2007, voc2012, coco2014, coco2017, coco-object, coco-stuff-27, "
        "coco (--root = any instances JSON) or folder (--root = label PNGs, with --classes).",
    ),
    root: str = typer.Option(..., "--root", help="Dataset directory (or the COCO instances JSON)."),
    pred: str = typer.Option(
        ..., "--pred", help="Tags Parquet (classification), COCO RLE JSON or PNG dir (segmentation)."
    ),
    split: str | None = typer.Option(None, "--split", help="Image list (first token per line)."),
    report: str | None = typer.Option(None, "--report", help="Write every number and setting as JSON."),
    ap: str = typer.Option("paper", "--ap", help="AP variant: paper (non-interpolated) or voc07 (11-point)."),
    difficult: str = typer.Option(
        "positive", "--difficult", help="VOC2007 difficult objects: positive (default), negative or ignore."
    ),
    classes: str | None = typer.Option(
        None, "--classes", help="--gt folder: class names, line i = pixel value i."
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
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Debug logging."),
) -> None:
    """Score tags (mAP, P/R/F1) or masks (mIoU) against VOC, COCO, COCO-Stuff or your own labels."""
    from pathlib import Path

    from rich.progress import Progress

    from tagclip_cli import evaluate as ev

    setup_logging(quiet, verbose)
    choices = {
        "--gt": (gt, ev.GT_NAMES),
        "--ap": (ap, ev.AP_VARIANTS),
        "--difficult": (difficult, ev.DIFFICULT_MODES),
    }
    for option, (value, allowed) in choices.items():
        if value not in allowed:
            raise fail(f"{option} must be one of {', '.join(allowed)}, not '{value}'")
    config = ev.EvaluateConfig(
        gt=gt,
        root=Path(root),
        pred=Path(pred),
        split=Path(split) if split else None,
        ap=ap,
        difficult=difficult,
        classes_file=Path(classes) if classes else None,
        vocab=vocab,
        allow_unmatched=allow_unmatched,
        require_all=require_all,
    )
    try:
        with Progress(console=err_console, transient=True, disable=quiet) as bar:
            task = bar.add_task("evaluating", total=None)

            def advance(step: int, total: int) -> None:
                bar.update(task, advance=step, total=total)

            result = ev.evaluate(config, progress=advance)
        if report:
            ev.write_report(result, Path(report))
    except TagclipError as exc:
        raise fail(str(exc), exc.exit_code) from None
    except OSError as exc:
        raise fail(f"{report}: cannot write report ({exc.strerror or exc})") from None
    ev.render_report(result, Console())
    if report:
        logging.getLogger(__name__).info("report written to %s", report)


def main() -> None:
    try:
        app()
    except TagclipError as exc:
        err_console.print(f"[bold red]error:[/] {exc}", markup=True, highlight=False, soft_wrap=True)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        err_console.print("interrupted")
        sys.exit(130)
