"""distributed: the collectives pkfast's ranks use — rank and world of the initialised ``torch.distributed``
group, rank 0's value on every rank, a barrier, and row blocks computed per rank and all-gathered. How the ranks
share a stored result's chunks is :mod:`pkfast.store.ranks`. Without an initialised group everything here is the
one-process case (rank 0 of 1).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

__all__ = ["rank_world", "broadcast", "gather_rows", "barrier"]


def rank_world() -> tuple[int, int]:
    """(rank, world size) of the initialised ``torch.distributed`` group, else (0, 1)."""
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def broadcast(value: Any) -> Any:
    """Rank 0's ``value`` on every rank (a picklable object); the value itself with one process."""
    if rank_world()[1] == 1:
        return value
    box = [value]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]


def gather_rows(compute: Callable[[int, int], torch.Tensor], n: int, row_shape: tuple[int, ...], dtype: torch.dtype,
                device: torch.device) -> torch.Tensor:
    """A CPU ``[n, *row_shape]`` tensor whose rows ``a:b`` are ``compute(a, b)``: each rank computes an equal
    slice of the rows and the slices are all-gathered (on ``device`` under NCCL, else on the CPU)."""
    rank, world = rank_world()
    if world == 1:
        return compute(0, n)
    per = -(-n // world)
    a, b = min(n, rank * per), min(n, (rank + 1) * per)
    part = torch.zeros(per, *row_shape, dtype=dtype)
    if b > a:
        part[: b - a] = compute(a, b)
    dev = device if torch.distributed.get_backend() == "nccl" else torch.device("cpu")
    parts = [torch.empty_like(part, device=dev) for _ in range(world)]
    torch.distributed.all_gather(parts, part.to(dev))
    return torch.cat([q.cpu() for q in parts])[:n]


def barrier() -> None:
    """Wait for every rank (nothing with one process)."""
    if rank_world()[1] > 1:
        torch.distributed.barrier()
