"""routes.panels: every parameter's per-sample gradient as one ``[n, C, P]`` panel, formed from layer factors
captured in batched passes where layers have rules (else by ``vmap(jacrev)``), with the map from the flat
parameter vector to the panel's column order — the P-dimensional quantities the kernel machine needs.

The panel's columns are a permutation of the trainable parameters: those without a layer route in the functional
model's order, then each routed layer in its rule's gradient layout (:meth:`~pkfast.layers.base.LayerRule.
gradient_layout`). Inner products and norms do not depend on the order, so panels of queries and of training
points (and parameter vectors mapped by :meth:`Panels.to_panel`) multiply as if they were flat gradients.
"""

from __future__ import annotations

import torch

from pkfast.engine.capture import Capture, Groups
from pkfast.engine.costs import LayerChoice, RouteKind, chunk_for
from pkfast.engine.functional import FunctionalModel
from pkfast.engine.routes.base import Combo
from pkfast.engine.routes.layered import find_layers
from pkfast.layers.base import Layer

__all__ = ["Panels"]


class Panels:
    """Per-sample gradient panels of ``fm`` (outputs, or the loss when ``fm`` has one) at weighted combinations
    of trajectory points; ``X`` is a sample set whose shapes the capture learns from."""

    def __init__(self, fm: FunctionalModel, X: torch.Tensor, *, routed: bool = True) -> None:
        self.fm = fm
        layers = find_layers(fm.model, fm)
        if not routed:  # every gradient by vmap(jacrev) (the reference the layer routes are tested against)
            layers = [L.without_rule("routed=False") for L in layers]
        cap = Capture(fm, layers)
        if any(L.kind != "other" for L in layers):
            layers = list(cap.discover(X))
        self.capture = cap
        self.layers = layers
        self.width = fm.num_params
        self._use({L.name for L in layers if L.kind != "other" and L.calls})
        assert self.capture is None or self.groups.panel_width == self.width

    def _use(self, routed: set[str]) -> None:
        """Form the layers named in ``routed`` from their factors (the rest, and never-called layers, by jacrev:
        a never-called layer's gradient is zero): the groups of a panel, and of a pass handing back factors."""
        def choices(stream: bool) -> tuple[LayerChoice, ...]:
            return tuple(LayerChoice(L, RouteKind.MATERIALIZED if L.name in routed else RouteKind.JACOBIAN,
                                     stream=stream) for L in self.layers)
        #: the panel's groups (routed layers materialised into it) and those of :meth:`evaluate` (their factors)
        self.groups = Groups.of(self.fm, choices(False))
        self.factor_groups = Groups.of(self.fm, choices(True))
        if not self.groups.hooked:
            self.capture = None

    @property
    def layout(self) -> tuple[tuple[str, ...], tuple[str, ...]]:
        """(parameters by jacrev, layers from factors), in column order: panels with equal layouts multiply."""
        if self.capture is None:
            return tuple(self.fm.names), ()
        return tuple(self.groups.jac_names), tuple(L.name for L in self.groups.hooked)

    def restrict(self, layers: set[str]) -> None:
        """Send every layer formed from factors but not in ``layers`` to the jacrev part (to share another
        panel's layout)."""
        if self.capture is None:
            return
        self._use({L.name for L in self.groups.hooked if L.name in layers})

    @staticmethod
    def matched(*panels: "Panels") -> None:
        """Give panels of one model (e.g. its outputs and its loss) one column layout: a layer whose rule passed
        its checks in one but not the other is formed by jacrev in both."""
        common = set.intersection(*(set(p.layout[1]) for p in panels))
        for p in panels:
            p.restrict(common)
        assert len({p.layout for p in panels}) == 1, [p.layout for p in panels]

    def describe(self) -> str:
        """How the panels are formed, one line."""
        if self.capture is None:
            return "gradients by vmap(jacrev)"
        n = len(self.groups.hooked)
        return f"gradients of {n} layer(s) from captured factors; " + (self.capture.describe(self.groups) or "")

    def panel(self, combo: Combo, X: torch.Tensor, Y: torch.Tensor | None = None,
              out: torch.Tensor | None = None) -> torch.Tensor:
        """Σ_q ω_q ∇ (outputs or loss) at the combo's points, ``[n, C, P]`` in the panel's column order."""
        fm, n = self.fm, X.shape[0]
        if out is None:
            out = torch.empty(n, fm.num_outputs, self.width, dtype=fm.dtype, device=fm.device)
        if self.capture is None:
            return fm.jacobian(combo, X, out=out, Y=Y)
        chunk = chunk_for(fm.num_outputs * self.width * fm.itemsize)
        for qi, (point, om) in enumerate(combo):
            self.capture.evaluate(self.groups, point, X, Y, chunk, out, weight=om, add=qi > 0)
        return out

    def widths(self) -> list[int]:
        """Columns of the panel's blocks, in order: the jacrev part (if any), then each group of each layer formed
        from factors (the panel is their concatenation)."""
        return [w for _, _, w in self.slots()]

    def slots(self) -> list[tuple[Layer | None, int, int]]:
        """The panel's blocks as (layer, group, width): ``(None, 0, width)`` for the jacrev part (if any), then
        each group of each layer formed from factors."""
        if self.capture is None:
            return [(None, 0, self.width)]
        G = self.groups
        return ([(None, 0, G.jac_width)] if G.jac_width else []) + [
            (L, g, L.size // L.groups) for L in G.hooked for g in range(L.groups)]

    def evaluate(self, combo: Combo, X: torch.Tensor, Y: torch.Tensor | None = None
                 ) -> tuple[torch.Tensor | None, list[tuple[float, dict]]]:
        """One capture pass per point of the combo: (Σ_q ω_q × the jacrev part ``[n, C, jac width]``, or None
        when every parameter has a route; ``[(ω_q, factors_q)]`` with every routed layer's factors)."""
        fm, cap, n = self.fm, self.capture, X.shape[0]
        C = fm.num_outputs
        if cap is None:
            return fm.jacobian(combo, X, Y=Y), []
        G = self.factor_groups  # the pass hands back every routed layer's factors instead of its gradient
        jw = G.jac_width
        tmp = torch.empty(n, C, jw, dtype=fm.dtype, device=fm.device) if jw else None
        chunk = chunk_for(C * (jw + max((L.size for L in G.hooked), default=0)) * fm.itemsize)
        nodes = [(om, cap.evaluate(G, point, X, Y, chunk, tmp, weight=om, add=qi > 0))
                 for qi, (point, om) in enumerate(combo)]
        return tmp, nodes

    @staticmethod
    def write(slot: tuple[Layer, int, int], nodes: list[tuple[float, dict]], out: torch.Tensor, *,
              beta: float) -> None:
        """``out ← β·out + Σ_q ω_q ∇`` of one layer group (a slot of :meth:`slots`) from the nodes' factors
        (:meth:`evaluate`; weights as given), ``out`` a contiguous ``[n, C, width]`` block."""
        L, g, _ = slot
        units, width = L.rule.units(L)
        L.rule.gradient_slice(L, nodes, g, 0, units, out.view(out.shape[0], out.shape[1], units, width), beta=beta)

    def accumulate(self, combo: Combo, X: torch.Tensor, blocks: list[torch.Tensor], *, alpha: float,
                   beta: float) -> None:
        """``blocks ← β·blocks + α·Σ_q ω_q ∇outputs`` at the combo's points: the panel held as contiguous
        ``[n, C, width]`` blocks (:meth:`slots`), each layer's gradient formed from its factors straight into its
        block (no panel-sized temporary), β = 0 overwriting."""
        jac, nodes = self.evaluate(combo, X)
        nodes = [(alpha * om, f) for om, f in nodes]
        for slot, blk in zip(self.slots(), blocks):
            if slot[0] is None:
                _scale_add(blk, jac, alpha, beta)
            else:
                self.write(slot, nodes, blk, beta=beta)

    def to_panel(self, flat: torch.Tensor) -> torch.Tensor:
        """A flat parameter vector ``[P]`` (functional-model order) in the panel's column order."""
        if self.capture is None:
            return flat
        params = self.fm.params(flat)
        parts = [params[n].reshape(-1) for n in self.groups.jac_names]
        for L in self.groups.hooked:
            roles = dict(zip(("weight", "bias"), L.rule.param_names))
            own = {p.rsplit(".", 1)[-1]: params[p] for p in L.params}
            parts.append(L.rule.gradient_layout(L, {r: own.get(n) for r, n in roles.items()}))
        return torch.cat(parts)


def _scale_add(dst: torch.Tensor, src: torch.Tensor, alpha: float, beta: float) -> None:
    """dst ← β·dst + α·src (β = 0 overwrites)."""
    if beta == 0.0:
        torch.mul(src, alpha, out=dst)
    else:
        if beta != 1.0:
            dst.mul_(beta)
        dst.add_(src, alpha=alpha)
