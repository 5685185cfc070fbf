"""Typed exceptions that the CLI turns into one-line messages and exit codes."""

from __future__ import annotations

from collections.abc import Iterable


class TagclipError(Exception):
    """Base class: a problem the user can fix; the message is shown as one line."""

    exit_code = 2


class UsageError(TagclipError):
    """Bad arguments or inputs detected before any work was done (exit code 2)."""


class VocabularyError(UsageError, ValueError):
    """A vocabulary or class-name file that cannot be used; the message names the file and line.

    Also a ValueError, as it was before it joined the TagclipError family."""


class ModelLoadError(TagclipError):
    """Weights or a model config could not be loaded; the message says how to supply them."""


class ConfigMismatchError(TagclipError):
    """An existing output was produced with a different configuration."""


class IncompleteRunError(TagclipError):
    """A merge was asked for while some inputs still have no result (e.g. a shard has not finished)."""


class OutputLockedError(TagclipError):
    """Another live run is writing the same output (or an overlapping share of it): exit code 2,
    before any work is done."""


class OutputWriteError(TagclipError):
    """An output or part file could not be written (disk full, quota, read-only, I/O error).

    Exit code 2 like a usage error: the output was not produced and the user must act (free space)
    before rerunning; parts written earlier are intact, so the rerun resumes."""


class FormatError(UsageError):
    """A file given as one of our outputs (tags Parquet, COCO masks JSON) is missing, unreadable or
    malformed; the message names the file and the problem (exit code 2)."""


def did_you_mean(name: object, choices: Iterable[object]) -> str:
    """"did you mean 'x'?" for the choice closest to a misspelt `name` (difflib; case, '_', '-' and
    spaces count alike), or "" when none is close."""
    import difflib

    def key(text: object) -> str:
        return str(text).casefold().replace("_", "-").replace(" ", "-")

    by_key: dict[str, str] = {}
    for choice in choices:
        by_key.setdefault(key(choice), str(choice))
    close = difflib.get_close_matches(key(name), list(by_key), n=1, cutoff=0.6)
    return f"did you mean '{by_key[close[0]]}'?" if close else ""


def with_suggestion(message: str, name: object, choices: Iterable[object]) -> str:
    """message, plus "; did you mean 'x'?" when a choice is close to `name`."""
    hint = did_you_mean(name, choices)
    return f"{message}; {hint}" if hint else message
