"""routes.layered: each layer with a rule (:mod:`pkfast.layers`) takes the cheaper exact route by the cost model,
the other parameters go through ``jacrev`` (docs/math.md §5).

- ``"factorized"``: K_l = Σ_{s,t} (a_s·a′_t)(δ_s·δ′_t) from the layer's factors — GEMMs of the S×S position
  blocks and an elementwise product, never forming its gradient;
- ``"materialized"``: its per-sample gradient formed from the factors and multiplied like a Jacobian panel.
  When the factors are smaller than the gradient (every dense layer) it is *streamed*: only the factors are
  kept for a tile and the gradient is formed and multiplied a slice of units at a time in one reused
  workspace (:func:`pkfast.options.stream_bytes`), so no tile-sized panel is ever held;
- ``"jacobian"``: parameters without a rule (or whose rule failed its check), through ``jacrev``;
  ``"unused"``: layers never called add 0.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import torch

from pkfast.engine.accumulate import accumulate
from pkfast.engine.capture import Capture, Groups
from pkfast.engine.costs import LayerChoice, chunk_for, route_counts
from pkfast.engine.capture.dispatch import CallsChanged
from pkfast.engine.functional import FunctionalModel
from pkfast.engine.products import WORKSPACE_BYTES, TileLayout, factor_pair_product
from pkfast.engine.routes.base import Combo, Data, Route, Side
from pkfast.engine.routes.jacobian import JacobianRoute
from pkfast.layers import rule_for
from pkfast.layers.base import Layer

__all__ = ["LayeredRoute", "find_layers"]



def find_layers(model: torch.nn.Module, fm: FunctionalModel) -> list[Layer]:
    """Every module owning trainable parameters, as a :class:`~pkfast.layers.base.Layer`: modules with a
    registered rule (untied, unparametrized, training their ``weight``, no other parameters) are candidates for
    the layer routes; the rest are ``kind="other"`` with the reason, for the Jacobian route. Parameters belong
    to their owning module."""
    trainable = set(fm.names)
    owners: dict[int, set[int]] = {}
    for _, mod in model.named_modules(remove_duplicate=False):
        for p in mod._parameters.values():
            if p is not None:
                owners.setdefault(id(p), set()).add(id(mod))
    name_of = {id(p): n for n, p in model.named_parameters()}
    layers = []
    for mname, mod in model.named_modules():
        own = [(pn, p) for pn, p in mod._parameters.items() if p is not None and name_of.get(id(p)) in trainable]
        if not own:
            continue
        names = tuple(name_of[id(p)] for _, p in own)
        rule, reason = rule_for(mod)
        if rule is not None:
            if any(len(owners[id(p)]) > 1 for _, p in own):
                rule, reason = None, "a parameter shared with another module (tied weights)"
            elif torch.nn.utils.parametrize.is_parametrized(mod):
                rule, reason = None, "parametrized weight"
            elif rule.param_names[0] not in dict(own):
                rule, reason = None, "frozen weight (only the bias trains)"
            elif set(pn for pn, _ in own) - set(rule.param_names):
                rule, reason = None, "extra parameters"
        if rule is None and not reason:  # say why: no rule for this module type (its own parameters by jacrev)
            reason = (f"no layer rule for {type(mod).__name__} (its own parameters "
                      f"{', '.join(pn for pn, _ in own)[:60]}; register one with pkfast.layers.register)")
        extra = dict(bias=rule.param_names[1] in dict(own), groups=rule.groups(mod)) if rule is not None else {}
        layers.append(Layer(mname, rule.name if rule else "other", type(mod).__name__, names,
                            sum(p.numel() for _, p in own), module=mod if rule else None, rule=rule, reason=reason,
                            **extra))
    return layers


class LayeredRoute(Route):
    """Per side: one capture pass per evaluation point gives the panel (parameters without a route, in-panel
    materialised layers) and the factors of the factorised and streamed layers; :meth:`product` multiplies
    the panels, streams the streamed layers' gradients and adds the factorised layers' pairwise kernels."""

    def __init__(self, layout: TileLayout, fm: FunctionalModel, capture: Capture, choices: tuple[LayerChoice, ...], *,
                 requested: str, nodes: int, stream_budget: int, workspace_bytes: int | None = None) -> None:
        super().__init__(layout)
        self.fm, self.capture, self.choices, self.requested = fm, capture, tuple(choices), requested
        self.groups = g = Groups.of(fm, self.choices)
        self.workspace_bytes = WORKSPACE_BYTES if workspace_bytes is None else workspace_bytes
        self.panel_width = g.panel_width
        self.bytes_per_sample, self.chunk = self.figures(layout, fm, self.choices, g, nodes)
        self.acc_multiplier = 3 if g.factorized else 1
        self.reserved = self.stream_budget = stream_budget if g.streamed else 0
        self.method = "factorized" if g.factorized else "materialized"
        self._buf: dict[str, torch.Tensor] = {}
        self._ws: torch.Tensor | None = None
        self._begun: tuple = ()
        #: the Jacobian route this one hands over to when the model's calls change at run time (:meth:`fall_back`)
        self.fallback: JacobianRoute | None = None

    @staticmethod
    def figures(layout: TileLayout, fm: FunctionalModel, choices: tuple[LayerChoice, ...], groups: Groups,
                nodes: int) -> tuple[int, int]:
        """(working bytes per sample — the panel and every evaluation point's factors —, samples per pass)."""
        by_name = {c.name: c for c in choices}
        feat = sum(by_name[L.name].bytes_per_sample for L in groups.with_factors) * nodes
        per = layout.num_outputs * groups.panel_width * fm.itemsize + feat
        return per, chunk_for(per)

    def summary(self) -> str:
        return f"{self.requested}: {route_counts(self.choices)}"

    def passes(self) -> str:
        return self.capture.describe(self.groups)

    def record(self) -> dict:
        return {"summary": self.summary(), "routes": [f"{c.name}:{c.route}" for c in self.choices]}

    # ------------------------------------------------------------------ running
    def begin(self, data: Data, row_block: int, col_block: int, chunk: int, progress: bool) -> None:
        self.chunk, self._begun = chunk, (data, row_block, col_block, chunk, progress)
        C, P, fm = self.layout.num_outputs, self.panel_width, self.fm
        if P:
            self._buf = {"rows": torch.empty(row_block, C, P, dtype=fm.dtype, device=fm.device),
                         "cols": torch.empty(col_block, C, P, dtype=fm.dtype, device=fm.device)}

    def end(self) -> None:
        self._buf, self._ws = {}, None
        if self.fallback is not None:
            self.fallback.end()

    def fall_back(self, why: CallsChanged) -> None:
        """Form every later side by the Jacobian route (exact for any control flow), after one warning: the
        model's calls at run time are not those the plan saw (``why``), so the factors cannot be trusted. The
        caller recomputes the tile that raised; the tiles finished before it had the planned calls."""
        fb = self.fallback = self._fallback_route()
        warnings.warn(f"{why}. The rest of this computation takes the Jacobian route (vmap(jacrev) of all "
                      f"{self.fm.num_params:,} parameters): exact, but slower, with panels of "
                      f"{fb.bytes_per_sample:,} bytes per sample where the plan counted {self.bytes_per_sample:,}",
                      stacklevel=2)
        self._buf, self._ws = {}, None
        if self._begun:
            data, rows, cols, chunk, progress = self._begun
            fb.begin(data, rows, cols, min(chunk, fb.chunk), progress)

    def _fallback_route(self) -> JacobianRoute:
        """The route :meth:`fall_back` hands over to."""
        return JacobianRoute(self.layout, self.fm, requested=self.requested, choices=self.choices)

    def side(self, combo: Combo, X: torch.Tensor, Y: torch.Tensor | None, slot: str, rows: slice,
             tick: Callable[[int], None] | None = None) -> Side:
        if self.fallback is not None:
            return self.fallback.side(combo, X, Y, slot, rows, tick)
        n = X.shape[0]
        panel = self._buf[slot][:n] if self.panel_width else None
        factors = []
        for qi, (point, om) in enumerate(combo):
            f = self.capture.evaluate(self.groups, point, X, Y, self.chunk, panel, weight=om, add=qi > 0, tick=tick)
            factors.append((om, f))
        return Side(n, panel, factors)

    def product(self, acc: torch.Tensor, left: Side, right: Side, weight: float, same: bool) -> None:
        if self.fallback is not None:
            return self.fallback.product(acc, left, right, weight, same)
        lay = self.layout
        if self.panel_width:
            lay.panel_product(acc, left.panel, right.panel, weight, same)
        self._streamed(acc, left, right, weight, same)
        for om, f1 in left.factors:
            for om2, f2 in right.factors:
                for L in self.groups.factorized:
                    for (Ar, Dr), (Ac, Dc) in zip(f1[L.name], f2[L.name]):
                        if lay.diagonal:
                            _diag_product(acc, L, Ar, Dr, Ac, Dc, weight * om * om2, lay.full)
                        else:
                            self._pair_product(acc, L, Ar, Dr, Ac, Dc, weight * om * om2, lay.full, same)

    def _streamed(self, acc: torch.Tensor, left: Side, right: Side, weight: float, same: bool) -> None:
        """``acc += weight · G_rows G_colsᵀ`` for the streamed layers, where ``G = Σ_q ω_q Δ_qᵀ A_q`` is a layer's
        per-sample gradient summed over a side's evaluation points, formed a slice of units at a time into a
        reused workspace and multiplied as ``[n, C, K]`` panel slices."""
        streamed = self.groups.streamed
        if not streamed:
            return
        fm = self.fm
        C = self.layout.num_outputs
        r, c = left.n, 0 if same else right.n
        item = fm.itemsize
        budget = self.stream_budget
        for L in streamed:
            units, width = L.rule.units(L)
            per_unit = (r + c) * C * width * item
            step = max(1, min(units, budget // max(1, per_unit)))  # at least one unit, whatever the budget
            need = (r + c) * C * step * width
            ws = self._ws
            if ws is None or ws.numel() < need or ws.device != fm.device:
                ws = self._ws = torch.empty(max(need, budget // item), dtype=fm.dtype, device=fm.device)
            for g in range(len(left.factors[0][1][L.name])):
                for u0 in range(0, units, step):
                    u1 = min(units, u0 + step)
                    k = (u1 - u0) * width
                    A = L.rule.gradient_slice(L, left.factors, g, u0, u1, ws[: r * C * k].view(r, C, u1 - u0, width))
                    if left.scale is not None:  # (preconditioned: the slice's columns scaled by √P)
                        A.mul_(left.scale[L.name][g, u0:u1])
                    B = A if same else L.rule.gradient_slice(
                        L, right.factors, g, u0, u1, ws[r * C * k: (r + c) * C * k].view(c, C, u1 - u0, width))
                    if not same and right.scale is not None:
                        B.mul_(right.scale[L.name][g, u0:u1])
                    self.layout.panel_product(acc, A.view(r, C, k), B.view(B.shape[0], C, k), weight, same)

    def _mm(self, A: torch.Tensor, B: torch.Tensor, upper: bool = False) -> torch.Tensor:
        out = torch.zeros(A.shape[0], B.shape[0], dtype=A.dtype, device=A.device)
        accumulate(out, A, B, 1.0, backend=self.layout.backend, upper_only=upper, precision=self.layout.precision)
        return out

    def _pair_product(self, acc, L, Ar, Dr, Ac, Dc, weight, full, upper=False):
        factor_pair_product(acc, L, Ar, Dr, Ac, Dc, weight, full=full, mm=self._mm,
                            workspace_bytes=self.workspace_bytes, upper=upper)


def _diag_product(acc, L, Ar, Dr, Ac, Dc, weight, full):
    """``acc[i] += weight · K_l(x_i, x_i)`` ([n] for the trace, [n, C, C] for the block)."""
    AA = L.rule.input_gram_diagonal(Ar, Ac, acc.dtype)  # [n, S, S]
    if full:
        acc.add_(torch.einsum("nst,ncso,ndto->ncd", AA, Dr, Dc), alpha=weight)
    else:
        acc.add_(torch.einsum("nst,ncso,ncto->n", AA, Dr, Dc), alpha=weight)
