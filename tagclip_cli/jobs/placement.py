"""Which share of the work this process does: `--shard I/N` and torchrun ranks (RANK, WORLD_SIZE,
LOCAL_RANK) -> a `Placement`; windows of indices, or whole tar / Parquet shards, are dealt by rank."""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from tagclip_cli.errors import UsageError
from tagclip_cli.itemlist import ItemList, ItemShare, as_share
from tagclip_cli.sources import ImageItem

# ---- work split ----------------------------------------------------------------------------------

def parse_shard(text: str) -> tuple[int, int]:
    """`I/N` (0 <= I < N) -> (I, N)."""
    match = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", text)
    if not match:
        raise UsageError(f"--shard {text}: expected I/N, e.g. 0/4 for the first of four shards")
    index, count = int(match[1]), int(match[2])
    if count < 1 or index >= count:
        raise UsageError(f"--shard {text}: I must be in 0..N-1 (shards are numbered from 0)")
    return index, count


@dataclass(frozen=True)
class Placement:
    """Which part of the work this process does.

    rank/world: the global split (windows with w % world == rank). Under torchrun, group_rank /
    group_size are RANK / WORLD_SIZE; with --shard I/N as well, the shard is split again across the
    group (rank = I * group_size + group_rank, world = N * group_size)."""

    rank: int = 0
    world: int = 1
    group_rank: int = 0
    group_size: int = 1
    local_rank: int = 0
    shard: tuple[int, int] | None = None

    @property
    def leader(self) -> bool:
        return self.group_rank == 0

    @property
    def distributed(self) -> bool:
        return self.group_size > 1

    @property
    def merges(self) -> bool:
        """Whether this run writes the final output (a shard leaves it to `tagclip merge`)."""
        return self.shard is None

    def owns(self, item: ImageItem, window: int) -> bool:
        """Whether this process does the item: by its tar / Parquet shard when it lives in one (a
        shard is read by one process only), else by its window of indices."""
        if item.shard_index is not None:
            return item.shard_index % self.world == self.rank
        return (item.index // window) % self.world == self.rank

    def owned(self, items: Sequence[ImageItem], window: int) -> np.ndarray:
        """(n,) bool: `owns` for every item of a list at once (from its columns)."""
        share = as_share(items)
        positions = share.positions
        units = None if share.base is None else share.unit_column()
        if units is None:
            units = np.array([-1 if it.shard_index is None else it.shard_index for it in share], dtype=np.int64) \
                if share.base is None else np.full(len(positions), -1, dtype=np.int64)
        by_window = (positions // window) % self.world == self.rank
        return np.where(units >= 0, units % self.world == self.rank, by_window)

    def share(self, items: Sequence[ImageItem], window: int) -> ItemShare:
        """This process's items, as positions over the list's columns: built from the windows it
        owns (or its units' numbers), so that it costs memory in proportion to the share."""
        if not isinstance(items, ItemList):
            share = as_share(items)
            return share.take(share.positions[self.owned(share, window)])
        if items.held is not None:  # read from the plan for one share (jobs/plan.py): that one only
            if items.held_for not in ((self.rank, self.world, window), (self.rank, self.world, None)):
                raise ValueError(f"the plan was read for the share {items.held_for}, not for "
                                 f"{(self.rank, self.world, window)}")
            return items.take(items.held)
        units = items.unit_column()
        if units is None:
            return items.take(window_positions(len(items), window, self.rank, self.world))
        mine = units % self.world == self.rank
        if (units < 0).any():  # plain items among shard items (a list made by hand): by window
            plain = np.zeros(len(items), dtype=bool)
            plain[window_positions(len(items), window, self.rank, self.world)] = True
            mine = np.where(units >= 0, mine, plain)
        return items.take(np.flatnonzero(mine))

    def describe(self) -> str:
        parts = []
        if self.shard:
            parts.append(f"shard {self.shard[0]}/{self.shard[1]}")
        if self.distributed:
            parts.append(f"rank {self.group_rank}/{self.group_size}")
        return ", ".join(parts) or "single process"


def window_positions(total: int, window: int, rank: int, world: int) -> np.ndarray:
    """The indices (< total) of the windows w with w % world == rank, in order (one array of them,
    no temporary of the same size: at 10M a process's share is 80 MB of positions)."""
    if world == 1:
        return np.arange(total, dtype=np.int64)
    windows = np.arange(rank, -(-total // window), world, dtype=np.int64)
    positions = (windows[:, None] * window + np.arange(window, dtype=np.int64)).ravel()
    return positions[:int(np.searchsorted(positions, total))]  # only the last window can pass the end


def placement_from_env(shard: tuple[int, int] | None = None, env: dict[str, str] | None = None) -> Placement:
    """The placement of this process from torchrun's variables (RANK, WORLD_SIZE, LOCAL_RANK) and --shard."""
    env = os.environ if env is None else env
    try:
        group_size = int(env.get("WORLD_SIZE", "1"))
        group_rank = int(env.get("RANK", "0"))
        local_rank = int(env.get("LOCAL_RANK", "0"))
    except ValueError:
        raise UsageError("RANK / WORLD_SIZE / LOCAL_RANK must be integers (set by torchrun)") from None
    if not 0 <= group_rank < max(group_size, 1):
        raise UsageError(f"RANK={group_rank} is outside WORLD_SIZE={group_size}")
    index, count = shard if shard else (0, 1)
    return Placement(
        rank=index * group_size + group_rank,
        world=count * group_size,
        group_rank=group_rank,
        group_size=group_size,
        local_rank=local_rank,
        shard=shard,
    )
