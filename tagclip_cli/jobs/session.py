"""The running placement: the torch.distributed process group (gloo / NCCL), one device per rank,
and the collectives the job layer uses (leader first, errors raised on every rank, gather)."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import timedelta

from tagclip_cli import errors
from tagclip_cli.errors import UsageError
from tagclip_cli.jobs.placement import Placement

log = logging.getLogger(__name__)


DIST_TIMEOUT = timedelta(hours=24)  # ranks wait this long for the slowest one at the end


class Session:
    """A running placement: the torch.distributed process group (if any) and this rank's device."""

    def __init__(self, placement: Placement, device: str) -> None:
        self.placement = placement
        self.device = device

    def leader_first(self, on_leader: Callable[[], object], on_others: Callable[[], object]) -> object:
        """Run on_leader on rank 0, then on_others on every other rank; a TagclipError on any rank is
        raised on every rank (so nobody waits forever for a rank that gave up)."""
        result: object = None
        error: Exception | None = None
        if self.placement.leader:
            try:
                result = on_leader()
            except Exception as exc:  # re-raised below, after telling the others
                error = exc
        self._raise_everywhere(error)
        if not self.placement.leader:
            try:
                result = on_others()
            except Exception as exc:
                error = exc
        self._raise_everywhere(error)
        return result

    def _raise_everywhere(self, error: Exception | None) -> None:
        if not self.placement.distributed:
            if error is not None:
                raise error
            return
        import torch.distributed as dist

        message = None if error is None else f"{type(error).__name__}\x00{error}"
        gathered: list[str | None] = [None] * self.placement.group_size
        dist.all_gather_object(gathered, message)
        if error is not None:
            raise error
        for rank, other in enumerate(gathered):
            if other is not None:
                kind, text = other.split("\x00", 1)
                cls = getattr(errors, kind, None)
                if not (isinstance(cls, type) and issubclass(cls, errors.TagclipError)):
                    cls = UsageError  # same message and exit code 2 on every rank
                raise cls(text if rank == 0 else f"rank {rank}: {text}")

    def gather(self, obj: object) -> list[object]:
        """Every rank's obj, on every rank (a barrier too)."""
        if not self.placement.distributed:
            return [obj]
        import torch.distributed as dist

        gathered: list[object] = [None] * self.placement.group_size
        dist.all_gather_object(gathered, obj)
        return gathered


@contextmanager
def session(placement: Placement, device: str) -> Iterator[Session]:
    """Join torchrun's process group when there is more than one rank (gloo for the CPU control
    messages, NCCL for CUDA tensors) and pin one device per rank: cuda:LOCAL_RANK."""
    if not placement.distributed:
        yield Session(placement, device)
        return
    import torch
    import torch.distributed as dist

    if device.startswith("cuda"):
        wanted = f"cuda:{placement.local_rank}"
        if device not in ("cuda", wanted):
            log.warning("--device %s ignored under torchrun: rank %d uses %s (LOCAL_RANK)",
                        device, placement.group_rank, wanted)
        device = wanted
        torch.cuda.set_device(placement.local_rank)
        backend = "cpu:gloo,cuda:nccl"
    else:
        backend = "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend=backend, timeout=DIST_TIMEOUT)
    log.debug("joined the process group: %s, backend %s, device %s", placement.describe(), backend, device)
    try:
        yield Session(placement, device)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
