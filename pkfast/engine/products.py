"""products: the layout of a tile's accumulator and the panel product every route adds into it.

A Gram of C outputs per sample is accumulated per tile as ``[r, c]`` (trace and mean), ``[r·C, c·C]`` (the full
block, sample-major) or, for the diagonal, ``[r]`` / ``[r, C, C]``. :class:`TileLayout` knows which, multiplies
``[n, C, K]`` panels into it on the selected backend (:mod:`pkfast.engine.accumulate`), and turns a finished
accumulator into the result's blocks (:meth:`TileLayout.finish`: the mean's scaling, the mirrored lower
triangle of a symmetric diagonal tile, the transposed block of a mirrored off-diagonal tile).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from pkfast.engine.accumulate import accumulate, accumulate_diagonal
from pkfast.engine.tiles import Tile

__all__ = ["TileLayout"]

#: Rows copied at a time when a square accumulator is symmetrised in place.
SYM_SLAB = 256


@dataclass(frozen=True)
class TileLayout:
    """Where a tile's kernel entries go: ``outputs`` (trace/mean/full), ``diagonal``, C, and the backend and
    input precision of the products."""

    outputs: str
    diagonal: bool
    num_outputs: int
    backend: str = "torch"
    precision: str = "ieee"

    @property
    def full(self) -> bool:
        return self.outputs == "full"

    def acc_shape(self, tile: Tile) -> tuple[int, ...]:
        C, (r, c) = self.num_outputs, tile.shape
        if self.diagonal:
            return (r, C, C) if self.full else (r,)
        return (r * C, c * C) if self.full else (r, c)

    def acc_numel(self, tile: Tile) -> int:
        return math.prod(self.acc_shape(tile))

    def panel_product(self, acc: torch.Tensor, A: torch.Tensor, B: torch.Tensor, weight: float, same: bool) -> None:
        """``acc += weight · A Bᵀ`` for ``[r, C, K]`` panels in this layout; ``same``: a symmetric diagonal tile
        (B is A), only the upper triangle of ``acc`` is needed."""
        (r, C, K), c = A.shape, B.shape[0]
        if self.diagonal:
            accumulate_diagonal(acc, A, B, weight, full=self.full)
        elif self.full:
            accumulate(acc, A.view(r * C, K), B.view(c * C, K), weight, backend=self.backend, upper_only=same,
                       precision=self.precision)
        else:
            accumulate(acc, A.view(r, C * K), B.view(c, C * K), weight, backend=self.backend, upper_only=same,
                       precision=self.precision)

    def finish(self, tile: Tile, acc: torch.Tensor, *, mirrored: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        """A finished accumulator as the CPU block for ``[tile.rows, tile.cols]`` in the result's layout, and the
        block for ``[tile.cols, tile.rows]`` when ``mirrored`` (a symmetric plan) and the tile is off the
        diagonal (else None).

        Both are *views* of the accumulator (permuted/transposed, not contiguous): finishing a tile never holds
        a second tile-sized array, so the memory budget bounds the peak (the store copies small row slabs)."""
        acc = acc.to("cpu")
        if self.outputs == "mean":
            acc.div_(self.num_outputs)
        if self.diagonal:
            return acc, None
        C = self.num_outputs
        r, c = tile.shape
        if tile.diagonal:  # only the upper triangle of the (r·C)×(r·C) accumulator is trusted
            symmetrize_upper_(acc)
        block = acc.view(r, C, c, C).permute(0, 2, 1, 3) if self.full else acc
        mirror = None
        if mirrored and not tile.diagonal:
            mirror = block.permute(1, 0, 3, 2) if self.full else block.T
        return block, mirror


def symmetrize_upper_(acc: torch.Tensor) -> None:
    """Copy the upper triangle of the square ``acc`` onto its lower triangle, in place, in slabs of columns
    (temporaries of at most ``SYM_SLAB`` × ``SYM_SLAB``)."""
    n = acc.shape[0]
    for j0 in range(0, n, SYM_SLAB):
        j1 = min(n, j0 + SYM_SLAB)
        if j0:
            acc[j0:j1, :j0].copy_(acc[:j0, j0:j1].T)  # disjoint regions: below and above the diagonal
        d = acc[j0:j1, j0:j1]
        d.copy_(torch.triu(d) + torch.triu(d, 1).T)
