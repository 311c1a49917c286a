"""Several processes (torchrun / torch.distributed) caching one dataset together.

Owns who does what when a process group is initialised: batch b of the token stream belongs to rank
b % world_size, so ranks take disjoint, deterministic parts of the input and each writes its own
shards; rank 0 alone repairs, resets the work directory, links or shuffles the shards and publishes.
Failures are shared (`all_ok`) so that no rank waits forever at a barrier for one that raised.
Without a process group every function here is the single-process identity.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Ranks:
    """This process's rank and the number of processes."""

    rank: int = 0
    world: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world > 1


def current() -> Ranks:
    """The ranks of the initialised process group, or a single process."""
    if dist.is_available() and dist.is_initialized():
        return Ranks(dist.get_rank(), dist.get_world_size())
    return Ranks()


def init_from_env(device: str) -> str:
    """Under torchrun (RANK and WORLD_SIZE set), initialise the process group; returns this rank's device."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1 or not dist.is_available() or dist.is_initialized():
        return device
    if not (device.startswith("cuda") and torch.cuda.is_available()):
        dist.init_process_group(backend="gloo")
        return device
    local = int(os.environ.get("LOCAL_RANK", "0"))
    torch.cuda.set_device(local)
    dist.init_process_group(backend="cpu:gloo,cuda:nccl")  # all_ok reduces a flag on the host
    return f"cuda:{local}"


def all_ok(ranks: Ranks, ok: bool) -> bool:
    """True when every rank reports ok (every rank must call this at the same point)."""
    if not ranks.active:
        return ok
    flag = torch.tensor([0 if ok else 1], device=_flag_device())
    dist.all_reduce(flag, op=dist.ReduceOp.SUM)
    return int(flag.item()) == 0


def _flag_device() -> torch.device:
    """Where the group's backend can reduce: this rank's GPU for a group that is NCCL alone (as a user may have
    initialised it), else the host."""
    on_host = "cpu:" in dist.get_backend_config()  # "cpu:gloo,cuda:gloo", "cpu:gloo,cuda:nccl"; NCCL alone: "cuda:nccl"
    return torch.device("cpu") if on_host else torch.device("cuda", torch.cuda.current_device())


def rows_of_rank(n_rows: int, batch_size: int, ranks: Ranks) -> int:
    """How many of the first n_rows rows fall in this rank's batches."""
    n_batches = -(-n_rows // batch_size)
    return sum(min(batch_size, n_rows - b * batch_size) for b in range(ranks.rank, n_batches, ranks.world))


def stream_rows(local_rows: np.ndarray, batch_size: int, ranks: Ranks) -> np.ndarray:
    """Where rows local_rows of this rank's share (its batches, in order) lie in the whole stream."""
    batch, within = np.divmod(local_rows, batch_size)
    return (ranks.rank + batch * ranks.world) * batch_size + within


def batches_of_rank(rows: Iterator[torch.Tensor], batch_size: int, ranks: Ranks) -> Iterator[torch.Tensor]:
    """The token rows of this rank's batches (b % world == rank), in order."""
    if not ranks.active:
        yield from rows
        return
    rows = iter(rows)
    for b in itertools.count():
        batch = list(itertools.islice(rows, batch_size))
        if not batch:
            return
        if b % ranks.world == ranks.rank:
            yield from batch
