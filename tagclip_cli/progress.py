"""Progress of the long steps inside a command (encoding the prompts, loading the model).

The library says what it is doing (`task`); the command line decides how that shows, by installing
a reporter (`reporting`): a bar on stderr, or nothing (--quiet). Without a reporter (the Python API, the
tests) a task costs nothing and shows nothing.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from contextvars import ContextVar

# reporter(label, total) -> a context giving advance(n); total None: a step without a count
Reporter = Callable[[str, "int | None"], AbstractContextManager[Callable[[int], object]]]

_REPORTER: ContextVar[Reporter | None] = ContextVar("tagclip_progress", default=None)


@contextmanager
def reporting(reporter: Reporter | None) -> Iterator[None]:
    """Show the tasks run inside the block with `reporter` (None: nothing)."""
    token = _REPORTER.set(reporter)
    try:
        yield
    finally:
        _REPORTER.reset(token)


@contextmanager
def task(label: str, total: int | None = None) -> Iterator[Callable[[int], object]]:
    """One long step: yields advance(n) (n of `total` done); shown by the installed reporter, if any."""
    reporter = _REPORTER.get()
    if reporter is None:
        yield lambda n: None
        return
    with reporter(label, total) as advance:
        yield advance
