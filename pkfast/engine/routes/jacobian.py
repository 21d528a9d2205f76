"""routes.jacobian: every trainable parameter's per-sample Jacobian by ``vmap(jacrev)`` (the torch.func
tutorial's method), written into one reused ``[n, C, P]`` panel per side and multiplied as GEMM (SYRK on
symmetric diagonal tiles). The route of models without any layer rule, and of ``method="jacobian"``."""

from __future__ import annotations

from collections.abc import Callable

import torch

from pkfast.engine.functional import FunctionalModel
from pkfast.engine.products import TileLayout
from pkfast.engine.costs import route_counts
from pkfast.engine.routes.base import Combo, Data, Route, Side

__all__ = ["JacobianRoute"]


class JacobianRoute(Route):
    method = "jacobian"

    def __init__(self, layout: TileLayout, fm: FunctionalModel, *, requested: str = "jacobian", choices: tuple = ()) -> None:
        super().__init__(layout)
        self.fm = fm
        self.requested, self.choices = requested, tuple(choices)
        self.panel_width = fm.num_params
        self.bytes_per_sample = layout.num_outputs * fm.num_params * fm.itemsize
        self.chunk = fm.default_chunk()
        self._buf: dict[str, torch.Tensor] = {}

    def summary(self) -> str:
        counts = f"{route_counts(self.choices)}: " if self.choices else ""
        return f"{self.requested}: {counts}all {self.fm.num_params:,} parameters by vmap(jacrev)"

    def record(self) -> dict:
        return {"summary": self.summary(), "routes": [f"{c.name}:{c.route}" for c in self.choices]}

    def begin(self, data: Data, row_block: int, col_block: int, chunk: int, progress: bool) -> None:
        self.chunk = chunk
        C, P, fm = self.layout.num_outputs, self.panel_width, self.fm
        self._buf = {"rows": torch.empty(row_block, C, P, dtype=fm.dtype, device=fm.device),
                     "cols": torch.empty(col_block, C, P, dtype=fm.dtype, device=fm.device)}

    def side(self, combo: Combo, X: torch.Tensor, Y: torch.Tensor | None, slot: str, rows: slice,
             tick: Callable[[int], None] | None = None) -> Side:
        n = X.shape[0]
        out = self._buf[slot][:n]
        return Side(n, self.fm.jacobian(combo, X, out=out, chunk=self.chunk, Y=Y, tick=tick))

    def product(self, acc: torch.Tensor, left: Side, right: Side, weight: float, same: bool) -> None:
        self.layout.panel_product(acc, left.panel, right.panel, weight, same)

    def end(self) -> None:
        self._buf = {}
