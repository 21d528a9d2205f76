"""products: the layout of a tile's accumulator and the panel product every route adds into it.

A Gram of C outputs per sample is accumulated per tile as ``[r, c]`` (trace and mean), ``[r·C, c·C]`` (the full
block, sample-major) or, for the diagonal, ``[r]`` / ``[r, C, C]``. :class:`TileLayout` knows which, multiplies
``[n, C, K]`` panels into it on the selected backend (:mod:`pkfast.engine.accumulate`), and turns a finished
accumulator into the result's blocks (:meth:`TileLayout.finish`: the mean's scaling, the mirrored lower
triangle of a symmetric diagonal tile, the transposed block of a mirrored off-diagonal tile).
:func:`factor_pair_product` is the factorised product of one layer's (A, Δ) factors that both the Gram's layer
routes and the kernel machine's sweep add into their accumulators.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from pkfast.engine.accumulate import accumulate, accumulate_diagonal
from pkfast.engine.tiles import Tile

__all__ = ["TileLayout", "factor_pair_product", "symmetrize_upper_", "WORKSPACE_BYTES"]

#: Working memory of the position-pair blocks of :func:`factor_pair_product` (layers with S > 1 positions).
WORKSPACE_BYTES = 64 * 2**20

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
    #: the model's C where the computed outputs stand for more (a collapsed head's d + 1 per position for its V:
    #: the mean divides by it, and the full blocks are expanded to it); None: ``num_outputs``
    stands_for: int | None = None

    @property
    def full(self) -> bool:
        return self.outputs == "full"

    @property
    def width(self) -> int:
        """The model's C: what ``outputs="mean"`` divides the trace by, and the side of a full block."""
        return self.num_outputs if self.stands_for is None else self.stands_for

    @property
    def expands(self) -> bool:
        """Whether the products fill a collapsed accumulator (:meth:`part_shape`) that is expanded into the
        result's full blocks (:class:`~pkfast.layers.head.HeadBlocks`)."""
        return self.full and self.stands_for is not None

    def acc_shape(self, tile: Tile) -> tuple[int, ...]:
        return self._shape(tile, self.width)

    def part_shape(self, tile: Tile) -> tuple[int, ...]:
        """The accumulator of one term's products over the computed outputs, where the layout :attr:`expands`."""
        return self._shape(tile, self.num_outputs)

    def _shape(self, tile: Tile, C: int) -> tuple[int, ...]:
        r, c = tile.shape
        if self.diagonal:
            return (r, C, C) if self.full else (r,)
        return (r * C, c * C) if self.full else (r, c)

    def acc_numel(self, tile: Tile) -> int:
        return math.prod(self.acc_shape(tile))

    def block_numel(self) -> int:
        """Accumulator entries per sample pair (diagonal: per sample), the collapsed part included."""
        if not self.full:
            return 1
        return self.width ** 2 + (self.num_outputs ** 2 if self.expands else 0)

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
            acc.div_(self.width)
        if self.diagonal:
            return acc, None
        C = self.width
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


def factor_pair_product(acc: torch.Tensor, L: Any, Ar: torch.Tensor, Dr: torch.Tensor, Ac: torch.Tensor,
                        Dc: torch.Tensor, weight: float, *, full: bool,
                        mm: Callable[..., torch.Tensor], workspace_bytes: int = WORKSPACE_BYTES,
                        upper: bool = False) -> None:
    """``acc += weight · Σ_{s,t} (a_s · a′_t)(δ_s · δ′_t)``: one layer's kernel between row samples (factors
    ``Ar``, ``Dr`` of shape ``[r, Cr, S, O]``) and column samples (``Ac``, ``Dc``: ``[c, Cc, S′, O]``), from
    its input Gram (``L.rule.input_gram``) and its output-gradient Gram, never forming a gradient.

    ``acc`` is ``[r·Cr, c·Cc]`` (``full``: every output pair) or ``[r, c]`` (the trace, Cr = Cc). ``mm(a, b,
    upper=False)`` is ``a @ b.T`` on the caller's backend (``upper``: only the upper triangle is needed, for a
    symmetric tile of one position). Layers of several positions are multiplied in blocks of sample pairs
    whose S·S′ temporaries fit ``workspace_bytes``."""
    r, Cr, Sr, O = Dr.shape
    c, Cc, Sc = Dc.shape[0], Dc.shape[1], Dc.shape[2]
    if Sr == 1 and Sc == 1:  # (the upper triangle of the (r·C)² block needs only the upper triangle of AA's r×r)
        AA = L.rule.input_gram(Ar, Ac, lambda a, b: mm(a, b, upper), acc.dtype).view(r, c)
        if full:
            DD = mm(Dr.reshape(r * Cr, O), Dc.reshape(c * Cc, O), upper).view(r, Cr, c, Cc)
            acc.view(r, Cr, c, Cc).add_(DD.mul_(AA[:, None, :, None]), alpha=weight)
        else:
            DD = mm(Dr.reshape(r, Cr * O), Dc.reshape(c, Cc * O), upper)
            acc.add_(DD.mul_(AA), alpha=weight)
        return
    per_pair = Sr * Sc * acc.element_size() * (2 + (2 * Cr * Cc if full else 1))
    side = max(1, int(math.sqrt(workspace_bytes / per_pair)))
    accv = acc.view(r, Cr, c, Cc) if full else acc
    for i0 in range(0, r, side):
        i1 = min(r, i0 + side)
        for j0 in range(i0 if upper else 0, c, side):
            j1 = min(c, j0 + side)
            _pair_block(accv, L, Ar, Dr, Ac, Dc, weight, full, mm, (i0, i1), (j0, j1))


def _pair_block(accv, L, Ar, Dr, Ac, Dc, weight, full, mm, rows, cols) -> None:
    """One block of sample pairs of :func:`factor_pair_product` for layers of several positions."""
    (i0, i1), (j0, j1) = rows, cols
    rb, cb = i1 - i0, j1 - j0
    _, Cr, Sr, O = Dr.shape
    Cc, Sc = Dc.shape[1], Dc.shape[2]
    AA = L.rule.input_gram(Ar[i0:i1], Ac[j0:j1], mm, accv.dtype)  # [rb, S, cb, S′]
    if full:
        DD = mm(Dr[i0:i1].reshape(rb * Cr * Sr, O), Dc[j0:j1].reshape(cb * Cc * Sc, O)).view(rb, Cr, Sr, cb, Cc, Sc)
        accv[i0:i1, :, j0:j1, :].add_(torch.einsum("isjt,icsjdt->icjd", AA, DD), alpha=weight)
    else:
        DD = mm(Dr[i0:i1].transpose(1, 2).reshape(rb * Sr, Cr * O),
                Dc[j0:j1].transpose(1, 2).reshape(cb * Sc, Cc * O)).view(rb, Sr, cb, Sc)
        accv[i0:i1, j0:j1].add_(DD.mul_(AA).sum(dim=(1, 3)), alpha=weight)
