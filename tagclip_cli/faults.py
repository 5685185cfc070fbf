"""Surviving faults: SIGINT/SIGTERM, out-of-memory batches.

Signals. SIGINT raises KeyboardInterrupt (Python's default) and SIGTERM raises `Terminated`, in the
main process; the job runner then writes the rows of every completed window (`run_job`'s
`finally`) and the CLI exits 130 / 143. A part file being written when the signal arrives is
finished first (`deferred_signals`), and every part is atomic anyway, so a rerun of the same command
resumes where the run stopped. DataLoader workers ignore both signals: the main process decides,
and the workers exit when it does (they watch their parent).

Out of memory. `OomSplitter` wraps the per-batch processing: when a batch raises an out-of-memory
error it is split in halves and each half retried, down to single images; an image that does not
fit alone becomes a failed row with reason "out of memory". Later batches are cut to the size that
worked, so a too-large --batch-size costs one failure, not one per batch.
"""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch

log = logging.getLogger(__name__)

OOM_REASON = "out of memory"
SIGTERM_EXIT = 128 + signal.SIGTERM  # 143
SIGINT_EXIT = 128 + signal.SIGINT  # 130


class Terminated(BaseException):
    """SIGTERM arrived (e.g. `kill`, a cluster preempting the job). A BaseException, like
    KeyboardInterrupt, so that `except Exception` in library code does not swallow it."""


def _raise_terminated(signum: int, frame: object) -> None:
    raise Terminated()


def install_signal_handlers() -> None:
    """SIGTERM -> `Terminated` in the main thread (SIGINT keeps Python's KeyboardInterrupt)."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _raise_terminated)


def ignore_signals_in_worker(worker_id: int | None = None) -> None:
    """DataLoader `worker_init_fn`: a Ctrl-C or a SIGTERM to the process group must not kill the
    decoders before the main process has written its completed rows."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


@contextmanager
def deferred_signals() -> Iterator[None]:
    """Hold SIGINT and SIGTERM until the block is done (a part file is being written); a signal
    that arrived meanwhile is delivered right after. A no-op outside the main thread."""
    if threading.current_thread() is not threading.main_thread() or not hasattr(signal, "pthread_sigmask"):
        yield
        return
    held = {signal.SIGINT, signal.SIGTERM}
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, held)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def is_out_of_memory(exc: BaseException) -> bool:
    """CUDA's OutOfMemoryError, and the RuntimeErrors other backends raise when an allocation fails."""
    if isinstance(exc, torch.OutOfMemoryError):
        return True
    if isinstance(exc, RuntimeError):
        text = str(exc)
        return "out of memory" in text or "can't allocate memory" in text
    return False


def _release_cached_memory() -> None:
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


class OomSplitter:
    """process(records) -> rows, retried in halves on out-of-memory (see the module docstring).

    `process` must turn a record whose "error" is set into a failed row without running the model
    (the annotate and segment processors do), and return one row per record in record order."""

    def __init__(self, process: Callable[[list[dict]], list[dict]], max_batch: int | None = None) -> None:
        self.process = process
        self.max_batch = max_batch  # the largest batch known to fit (None: not limited yet)
        self.failed = 0  # images given up on

    def __call__(self, records: list[dict]) -> list[dict]:
        limit = self.max_batch or len(records) or 1
        rows: list[dict] = []
        for start in range(0, len(records), limit):
            rows.extend(self._run(records[start : start + limit]))
        return rows

    def _run(self, records: list[dict]) -> list[dict]:
        try:
            return self.process(records)
        except Exception as exc:
            if not is_out_of_memory(exc):
                raise
        # Out of the except block: the traceback (and the tensors its frames hold) is released.
        _release_cached_memory()
        if len(records) == 1:
            record = dict(records[0], pixels=None, error=OOM_REASON)
            self.failed += 1
            log.warning("%s: out of memory even alone; marked failed", record["item"].image_id)
            return self.process([record])
        half = (len(records) + 1) // 2
        if self.max_batch is None or half < self.max_batch:
            log.warning("out of memory on a batch of %d images; continuing with batches of %d", len(records), half)
            self.max_batch = half
        return self._run(records[:half]) + self._run(records[half:])
