"""Surviving faults: SIGINT/SIGTERM, out-of-memory batches.

Signals. SIGINT and SIGTERM raise `Interrupted` in the main process; the job runner then writes the
rows of every completed window (the `finally` of `jobs._run_windows`) and the CLI exits 130 / 143. A
part file being written when the signal arrives is finished first (`deferred_signals`), and every
part is atomic anyway, so a rerun of the same command resumes where the run stopped. DataLoader
workers ignore both signals: the main process decides, and the workers exit when it does (they watch
their parent).

Out of memory. `OomSplitter` wraps the per-batch mapper (the model step): when a batch raises an
out-of-memory error it is split in halves and each half retried, down to single images; an image
that does not fit alone becomes a failed result with reason "out of memory". Later batches are cut
to the size that worked, so a too-large --batch-size costs one failure, not one per batch.
"""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Generic, TypeVar

if TYPE_CHECKING:  # data.py imports this module (worker signal handling)
    from tagclip_cli.data import DecodedImage

log = logging.getLogger(__name__)

OOM_REASON = "out of memory"
Result = TypeVar("Result")


class Interrupted(BaseException):
    """SIGINT (Ctrl-C) or SIGTERM (`kill`, a cluster preempting the job) arrived.

    A BaseException, like KeyboardInterrupt, so that `except Exception` in library code does not
    swallow it; not a KeyboardInterrupt, so that the CLI framework does not turn SIGTERM into 130."""

    def __init__(self, signum: int) -> None:
        self.signum = signum
        self.exit_code = 128 + signum  # the shell convention: 130 for SIGINT, 143 for SIGTERM
        super().__init__(signal.Signals(signum).name)


def _raise_interrupted(signum: int, frame: object) -> None:
    raise Interrupted(signum)


def install_signal_handlers() -> None:
    """SIGINT and SIGTERM -> `Interrupted` in the main thread (call once, from the CLI)."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, _raise_interrupted)
        signal.signal(signal.SIGTERM, _raise_interrupted)


def ignore_signals_in_worker(worker_id: int | None = None) -> None:
    """DataLoader `worker_init_fn`: a Ctrl-C or a SIGTERM to the process group must not kill the
    decoders before the main process has written its completed rows."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


@contextmanager
def deferred_signals() -> Iterator[None]:
    """Hold SIGINT and SIGTERM until the block is done (a part file is being written); a signal
    that arrived meanwhile is raised again right after, through the usual handler. A no-op outside
    the main thread (only the main thread can change handlers; Python runs them there anyway).

    Swapping the Python-level handlers, not the thread's signal mask: any thread of the process
    (torch's, pyarrow's) may receive the signal, and Python runs its handler in the main thread."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    pending: list[int] = []

    def hold(signum: int, frame: object) -> None:
        pending.append(signum)

    previous = {signum: signal.signal(signum, hold) for signum in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            # None: a handler installed outside Python; the default is the closest we can restore.
            signal.signal(signum, handler if handler is not None else signal.SIG_DFL)
        if pending:
            signal.raise_signal(pending[0])


def is_out_of_memory(exc: BaseException) -> bool:
    """CUDA's OutOfMemoryError, and the RuntimeErrors other backends raise when an allocation fails."""
    import torch  # here, not at the top: the CLI installs the signal handlers before any command

    if isinstance(exc, torch.OutOfMemoryError):
        return True
    if isinstance(exc, RuntimeError):
        text = str(exc)
        return "out of memory" in text or "can't allocate memory" in text
    return False


def _release_cached_memory() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()


class OomSplitter(Generic[Result]):
    """mapper(images) -> results, retried in halves on out-of-memory (see the module docstring).

    `mapper` must turn an image whose `error` is set into a failed result without running the
    model (the annotate and segment mappers do), and return one result per image in image order.
    The batch size that fits is remembered per input shape (batches hold images of one size), and
    only from splits where every image then succeeded: one image too large to fit on its own must
    not shrink the batches of all the others."""

    def __init__(self, mapper: Callable[[list[DecodedImage]], list[Result]]) -> None:
        self.mapper = mapper
        self.limits: dict[tuple | None, int] = {}  # pixels shape -> largest batch known to fit
        self.failed = 0  # images given up on

    def __call__(self, images: list[DecodedImage]) -> list[Result]:
        if not images:
            return self.mapper(images)
        limit = self.limits.get(_shape(images), len(images))
        results: list[Result] = []
        for start in range(0, len(images), limit):
            results.extend(self._run(images[start : start + limit])[0])
        return results

    def _run(self, images: list[DecodedImage]) -> tuple[list[Result], bool]:
        """(results, clean): clean is False when some image failed for lack of memory."""
        try:
            return self.mapper(images), True
        except Exception as exc:
            if not is_out_of_memory(exc):
                raise
        # Out of the except block: the traceback (and the tensors its frames hold) is released.
        _release_cached_memory()
        if len(images) == 1:
            image = images[0].failed(OOM_REASON)
            self.failed += 1
            log.warning("%s: out of memory even alone; marked failed", image.item.image_id)
            return self.mapper([image]), False
        half = (len(images) + 1) // 2
        log.warning("out of memory on a batch of %d images; retrying in halves", len(images))
        first, first_clean = self._run(images[:half])
        second, second_clean = self._run(images[half:])
        clean = first_clean and second_clean
        key = _shape(images)
        if clean and half < self.limits.get(key, len(images) + 1):
            self.limits[key] = half
            log.warning("batches of %d images of this size fit; using that from now on", half)
        return first + second, clean


def _shape(images: list[DecodedImage]) -> tuple | None:
    pixels = next((im.pixels for im in images if im.pixels is not None), None)
    return tuple(pixels.shape) if pixels is not None else None
