"""distributed: how the ranks of an initialised ``torch.distributed`` group share a computation — disjoint,
equal-work shares of the tiles, one view of what is already finished, and row blocks computed per rank and
all-gathered. Without an initialised group everything here is the one-process case (rank 0 of 1).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from pkfast.engine.tiles import Tile

__all__ = ["rank_world", "shares", "tile_cost", "broadcast", "gather_rows", "barrier"]


def rank_world() -> tuple[int, int]:
    """(rank, world size) of the initialised ``torch.distributed`` group, else (0, 1)."""
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def tile_cost(tile: Tile, jacobian_pairs: float = 64.0) -> float:
    """Relative work of a tile: its products (a diagonal tile computes one triangle) plus its Jacobians, each
    sample's Jacobian weighted as ``jacobian_pairs`` Gram entries."""
    r, c = tile.shape
    if tile.diagonal:
        return r * c / 2 + jacobian_pairs * r
    return r * c + jacobian_pairs * (r + c)


def shares(tiles: Sequence[Tile], world: int) -> list[list[Tile]]:
    """Split ``tiles`` into ``world`` deterministic shares of about equal :func:`tile_cost` (largest first to the
    least-loaded rank, ties to the lower index); each share in tile order."""
    load = [0.0] * world
    out: list[list[Tile]] = [[] for _ in range(world)]
    for t in sorted(tiles, key=lambda t: (-tile_cost(t), t.index)):
        r = min(range(world), key=lambda k: (load[k], k))
        load[r] += tile_cost(t)
        out[r].append(t)
    return [sorted(s, key=lambda t: t.index) for s in out]


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
