"""What every command shares: the typer app, logging, the one error printer, progress bars, the
end-of-run report, and the options several commands take (their defaults from `tagclip_cli.defaults`)."""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

import typer
from rich.console import Console
from rich.logging import RichHandler
from rich.markup import escape

from tagclip_cli import __version__, defaults, progress
from tagclip_cli.cli.surface import GENERAL, INPUT, JOB, METHOD, MODEL, TagclipGroup
from tagclip_cli.errors import TagclipError

app = typer.Typer(
    name="tagclip",
    help="Training-free pseudo-labels from a frozen CLIP: multi-label tags (TagCLIP) and masks (CLS-SEG).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    cls=TagclipGroup,
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
    """Wrap a command so that a TagclipError becomes its one-line message and exit code, and the
    library's long steps show as bars while it runs (`show_step`)."""

    @functools.wraps(command)
    def run(*args, **kwargs):
        try:
            with progress.reporting(show_step):
                return command(*args, **kwargs)
        except TagclipError as exc:
            raise fail(str(exc), exc.exit_code) from None

    return run


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


def progress_factory(quiet: bool, label: str = "tagging"):
    """The progress bar of a job (pipeline.ProgressFactory): total -> a context giving advance(n)."""
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


@contextmanager
def show_step(label: str, total: int | None):
    """How the commands show a long step of the library (`tagclip_cli.progress`): a bar with a count
    (encoding prompts), or a transient spinner (loading the model); nothing when our log is quiet
    (--quiet, torchrun ranks other than 0)."""
    if not logging.getLogger("tagclip_cli").isEnabledFor(logging.INFO):
        yield lambda n: None
        return
    if total is not None:
        with progress_factory(False, label)(total) as advance:
            yield advance
        return
    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    with Progress(SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(), console=err_console,
                  transient=True, disable=not err_console.is_terminal) as bar:  # not even a blank line in a log
        task = bar.add_task(label, total=None)
        yield lambda n: bar.advance(task, n)


@contextmanager
def step_bar(label: str, hidden: bool, columns: bool = False):
    """A transient bar of (step, total) updates on stderr, for evaluate, show and export; nothing
    (not even its blank line) when hidden or when stderr is a file or pipe. Yields update(step, total)."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    shown = (TextColumn("[progress.description]{task.description}"), BarColumn(), MofNCompleteColumn(),
             TimeRemainingColumn()) if columns else ()
    with Progress(*shown, console=err_console, transient=True, disable=hidden or not err_console.is_terminal) as bar:
        task = bar.add_task(label, total=None)
        yield lambda step, total: bar.update(task, advance=step, total=total)


def report(summary, out: Path | None, quiet: bool = False) -> None:
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


def finish(summary, out: Path | None, quiet: bool) -> None:
    """The end of annotate / segment: the report, then exit 1 if the output has failed rows,
    whichever run met them."""
    report(summary, out, quiet)
    if (summary.failed or summary.failed_before) and summary.leader:
        raise typer.Exit(1)


def is_leader() -> bool:
    """Whether this process reports (torchrun's rank 0 of its group, or no torchrun)."""
    from tagclip_cli.jobs.placement import placement_from_env

    return placement_from_env().leader


# ---- options several commands share -----------------------------------------------------------------

# Logging options of every command (in the General panel, with --help). `-v` is not among them: it
# is --vocab in annotate and segment (evaluate still reads -v as an old spelling of --verbose: surface.RENAMED).
QUIET_OPT = typer.Option(False, "--quiet", "-q", help="Only warnings and errors.", rich_help_panel=GENERAL)
VERBOSE_OPT = typer.Option(False, "--verbose", help="Debug logging.", rich_help_panel=GENERAL)

THRESHOLDS_HELP = ("Per-class thresholds: a file of 'class<TAB>threshold' lines (e.g. from `tagclip calibrate`); "
                   "classes not listed keep --tag-threshold.")

# Input, model and job options shared by `annotate` and `segment` (some also by `reproduce`).
IMAGES_ARG = typer.Argument(
    None, metavar="IMAGES",
    help="Folder of images (recursive), a text file of image paths (one per line), one image, or '-' to "
    "read paths from stdin (e.g. from find); or WebDataset tar shards: one .tar, a pattern such as "
    "'data/{00000..00127}.tar', a folder of tars or a text file of tar URLs; or .parquet files with image "
    "bytes. Local paths or URLs (s3://, gs://, hf://, https://). Omit with --manifest or --images-parquet."
)
MANIFEST_OPT = typer.Option(
    None, "--manifest", metavar="FILE", rich_help_panel=INPUT,
    help="COCO JSON whose 'images' (id, file_name) are the inputs; ids become image_id."
)
IMAGE_ROOT_OPT = typer.Option(
    None, "--image-root", metavar="DIR", rich_help_panel=INPUT,
    help="Folder the manifest's file_name (or a path list's relative paths) are under; image ids are relative to it."
)
IMAGES_PARQUET_OPT = typer.Option(
    None, "--images-parquet", metavar="FILES", rich_help_panel=INPUT,
    help="Parquet file(s) with the image bytes in a column (a file, a glob or a {a,b} pattern; img2dataset or "
    "Hugging Face datasets output), read one row group at a time."
)
IMAGE_COLUMN_OPT = typer.Option(
    None, "--image-column", metavar="NAME", rich_help_panel=INPUT,
    help="Parquet column with the image: binary, or a {bytes, path} struct (default: 'image', else 'jpg')."
)
ID_COLUMN_OPT = typer.Option(
    None, "--id-column", metavar="NAME", rich_help_panel=INPUT,
    help="Parquet column giving image ids (default: 'key', else 'path', else the row number); ids are "
    "'<file name>/<id>'."
)
DEVICE_OPT = typer.Option(defaults.DEVICE, "--device", metavar="DEVICE", rich_help_panel=JOB,
                          help="auto (CUDA when there is one, else CPU), cpu, cuda or cuda:N.")
PRECISION_OPT = typer.Option(
    defaults.PRECISION, "--precision", metavar="NAME", rich_help_panel=MODEL,
    help="fp32 (default); bf16 (CUDA autocast, or bf16 image-tower weights on CPU: several times faster on CPUs "
    "with AMX/AVX512-BF16) or fp16 (CUDA). Attention maps stay fp32 softmax."
)
BACKGROUND_OPT = typer.Option(
    None, "--background", metavar="FILE", rich_help_panel=METHOD,
    help="File of background class names (replaces the vocabulary's)."
)
REFERENCE_COMPAT_OPT = typer.Option(
    False, "--reference-compat", rich_help_panel=METHOD,
    help="Reproduce the reference implementation's quirks exactly (to match published numbers).",
)
BATCH_SIZE_OPT = typer.Option(defaults.BATCH_SIZE, "--batch-size", min=1, metavar="N", rich_help_panel=JOB,
                              help="Images per forward.")
WORKERS_OPT = typer.Option(defaults.WORKERS, "--workers", min=0, metavar="N", rich_help_panel=JOB,
                           help="DataLoader worker processes for decoding.")
OVERWRITE_OPT = typer.Option(False, "--overwrite", rich_help_panel=JOB,
                             help="Replace an existing output or unfinished run.")
FAIL_FAST_OPT = typer.Option(False, "--fail-fast", rich_help_panel=JOB,
                             help="Stop at the first image that cannot be read.")
CACHE_DIR_OPT = typer.Option(
    None, "--cache-dir", metavar="DIR", rich_help_panel=JOB,
    help="Text-embedding cache (default ~/.cache/tagclip or $TAGCLIP_CACHE_DIR)."
)
SHARD_OPT = typer.Option(
    None, "--shard", metavar="I/N", rich_help_panel=JOB,
    help="Do only shard I of N (from 0) of the work, e.g. one SLURM array task; no merge: run `tagclip merge OUT` "
    "when all shards are done."
)
PART_SIZE_OPT = typer.Option(
    defaults.PART_SIZE, "--part-size", min=1, metavar="N", rich_help_panel=JOB,
    help="Rows per part file in OUT.parts/ (per process): what a crash can cost at most."
)
VOCAB_OPT = typer.Option(..., "--vocab", "-v", metavar="NAME|FILE", rich_help_panel=INPUT,
                         help="Vocabulary: a built-in name (voc, coco, coco-stuff, shapes) or a file of class names.")
MODEL_OPT = typer.Option(
    None, "--model", metavar="NAME", rich_help_panel=MODEL,
    help="open_clip model name (default ViT-B-16, the paper's), or a built-in demo model such as shapes-demo."
)
PRETRAINED_OPT = typer.Option(
    defaults.PRETRAINED, "--pretrained", metavar="NAME", rich_help_panel=MODEL,
    help="open_clip pretrained tag (default openai; needs network once). 'random' = seeded random weights."
)
CHECKPOINT_OPT = typer.Option(
    None, "--checkpoint", metavar="FILE", rich_help_panel=MODEL,
    help="Weights file: OpenAI TorchScript .pt, or a state dict .pt/.bin/.safetensors (OpenAI or open_clip keys)."
)
