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


def main() -> None:
    try:
        app()
    except TagclipError as exc:
        err_console.print(f"[bold red]error:[/] {exc}", markup=True, highlight=False, soft_wrap=True)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        err_console.print("interrupted")
        sys.exit(130)
