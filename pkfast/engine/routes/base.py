"""routes.base: the interface every route implements — what it holds per sample, and how it forms each side of
a kernel term and adds their product into a tile.

The driver (:mod:`pkfast.engine.driver`) runs one loop for every route: plan tiles from the route's
:attr:`~Route.bytes_per_sample` → for each tile and each term, :meth:`Route.side` for the rows and (unless the
tile is a symmetric diagonal one) the columns → :meth:`Route.product` into the tile's accumulator → finish
the tile → hand it to a sink. Routes:

- :class:`~pkfast.engine.routes.jacobian.JacobianRoute`: every parameter's Jacobian by ``vmap(jacrev)``, panels
  multiplied as GEMM/SYRK;
- :class:`~pkfast.engine.routes.layered.LayeredRoute`: layers with a rule (:mod:`pkfast.layers`) factorised or
  materialised from their inputs and output gradients, the other parameters by ``jacrev``;
- :class:`~pkfast.engine.routes.sketch.SketchRoute`: products of random path features computed once.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from pkfast.engine.products import TileLayout
from pkfast.engine.quadrature import EvalPoint, Term

__all__ = ["Route", "Side", "Data", "Combo"]

#: One side of a term: Σ_q ω_q (the quantity at point q).
Combo = tuple[tuple[EvalPoint, float], ...]


@dataclass
class Data:
    """The samples of a computation: rows ``X`` (targets ``Y`` for a loss kernel) and columns ``X2``/``Y2``
    (None: the columns are the rows)."""

    X: torch.Tensor
    X2: torch.Tensor | None = None
    Y: torch.Tensor | None = None
    Y2: torch.Tensor | None = None
    #: how structured samples (a mapping or tuple of arrays) were packed into X and X2 (:mod:`pkfast.engine.inputs`)
    packing: Any = None

    @property
    def cols(self) -> torch.Tensor:
        return self.X if self.X2 is None else self.X2

    @property
    def cols_y(self) -> torch.Tensor | None:
        return self.Y if self.Y2 is None else self.Y2


@dataclass
class Side:
    """What a route formed for one side of a term on ``n`` samples: a ``[n, C, K]`` panel (or None) and, for
    the layered route, the factors of each evaluation point ``[(ω_q, {layer: [(A_g, Δ_g)]})]``."""

    n: int
    panel: torch.Tensor | None = None
    factors: list[tuple[float, dict[str, list]]] = field(default_factory=list)
    #: per streamed layer, a column scale of its gradient ``[groups, units, width]`` (the preconditioned route's √P)
    scale: dict[str, torch.Tensor] | None = None


class Route:
    """How a Gram's tiles are formed. A route is built once from a finished plan: subclasses set the planning
    figures in ``__init__`` (never later) and implement :meth:`side` and :meth:`product`."""

    #: the job-level method this route resolves to (``GramPlan.method``, error messages): "jacobian",
    #: "factorized" (some layer factorised), "materialized" or "sketch"
    method: str = "route"
    #: working bytes per sample held for a tile (panel and factors, all evaluation points of a side)
    bytes_per_sample: int = 0
    #: samples per ``vmap`` call it prefers (the tiling may lower it)
    chunk: int = 1
    #: bytes held besides the tiles whatever their size (a workspace)
    reserved: int = 0
    #: accumulator bytes per entry, as a multiple of one entry (factorised products need temporaries)
    acc_multiplier: int = 1
    #: with one term, keep a tile-row's side for the next tile of the same rows (and plan tiles for it)
    row_reuse: bool = True

    def __init__(self, layout: TileLayout) -> None:
        self.layout = layout

    def terms(self, terms: list[Term]) -> list[Term]:
        """The terms the driver loops over for a rule's ``terms`` (the sketch folds them into its features)."""
        return terms

    def summary(self) -> str:
        """One line: which routes the parameters took (the plan's header, the manifest, ``pkfast info``)."""
        return self.label

    def passes(self) -> str:
        """One line for the plan: how the per-sample quantities are computed ("" for the model's own passes)."""
        return ""

    def record(self) -> dict[str, Any]:
        """What a stored result records of the route (JSON-serialisable)."""
        return {"summary": self.summary()}

    def begin(self, data: Data, row_block: int, col_block: int, chunk: int, progress: bool) -> None:
        """Allocate what the tiles reuse (panels of ``row_block``/``col_block`` samples) before the first tile;
        ``chunk``: the samples per pass the tiling settled on (at most :attr:`chunk`)."""
        self.chunk = chunk

    def side(self, combo: Combo, X: torch.Tensor, Y: torch.Tensor | None, slot: str, rows: slice,
             tick: Callable[[int], None] | None = None) -> Side:
        """Σ_q ω_q of the route's quantity for samples ``X`` (``rows``: their indices in the row or column set),
        into the buffers of ``slot`` (``"rows"`` or ``"cols"``: a row side stays valid while columns are formed).
        ``tick(n)`` is called as each chunk of n samples is formed at each point (progress inside a tile)."""
        raise NotImplementedError

    def product(self, acc: torch.Tensor, left: Side, right: Side, weight: float, same: bool) -> None:
        """``acc += weight · ⟨left, right⟩`` in the layout; ``same``: right is left on a symmetric diagonal tile."""
        raise NotImplementedError

    def end(self) -> None:
        """Drop what :meth:`begin` allocated."""
