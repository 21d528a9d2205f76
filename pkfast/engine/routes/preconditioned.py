r"""engine.routes.preconditioned: the preconditioned path kernel of an adaptive optimizer's trajectory (docs/math.md §9),

.. math:: K(x, x') = \sum_s \varepsilon_s\, J(x; w_s)\, \mathrm{diag}(P_s)\, J(x'; w_s)^\top,

with P_s the diagonal preconditioner step s applied (:meth:`pkfast.Trajectory.preconditioner`). Every point of
step s takes P_s: ``rule="left"`` w_s; ``"exact"`` every Gauss–Legendre node of the segment w_s → w_{s+1} and the
column side's w_s. ``"trapezoid"`` is Σ_s ε_s/2 [J(w_s) P_s J(w_s)ᵀ + J(w_{s+1}) P_s J(w_{s+1})ᵀ] (both ends of
step s with P_s); merged per point as the Euclidean rule is, point k carries the weight (ε_{k−1}+ε_k)/2 and the
diagonal D_k = (ε_{k−1} P_{k−1} + ε_k P_k)/(ε_{k−1}+ε_k) (ε_{−1} = ε_T = 0): the same sum, T+1 Jacobians.

How it is computed: a diagonal P breaks the layer routes' pair factorisation K_l = Σ (a·a′)(δ·δ′) (the
Kronecker structure of a layer's gradient is not preserved by an arbitrary diagonal), so no layer is factorised:
:class:`PreconditionedLayeredRoute` materialises every layer with a rule from its factors (streamed or in the
panel, as the cost model says) and scales each gradient column by √D in the layer's gradient layout, the
parameters without a rule by ``jacrev`` scaled likewise; ``method="jacobian"`` (:class:`PreconditionedRoute`)
scales the ``vmap(jacrev)`` panels. A sketch projects the scaled Jacobian densely (J √D R: still unbiased).

Example (an Adam run recorded with its preconditioner: the default kernel is the preconditioned one):
    >>> import tempfile, torch, pkfast
    >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
    <torch._C.Generator object at ...>
    >>> net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2)).double()
    >>> opt = torch.optim.Adam(net.parameters(), lr=0.01)
    >>> X, y = torch.randn(6, 3, dtype=torch.float64), torch.tensor([0, 1, 0, 1, 1, 0])
    >>> rec = pkfast.TrajectoryRecorder(net, opt, tempfile.mkdtemp() + "/run")
    >>> for _ in range(2):
    ...     opt.zero_grad(); torch.nn.functional.cross_entropy(net(X), y).backward(); opt.step(); rec.step()
    >>> rec.close()
    >>> traj = pkfast.Trajectory.load(rec.path)
    >>> K = pkfast.gram(net, traj, X, dtype=torch.float64, progress=False)          # Σ ε_s J_s diag(P_s) J_sᵀ
    >>> E = pkfast.gram(net, traj, X, dtype=torch.float64, progress=False, preconditioner=None)   # Euclidean
    >>> traj.has_preconditioner, bool(torch.allclose(K, E))
    (True, False)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import torch

from pkfast.engine.costs import LayerChoice, RouteKind
from pkfast.engine.functional import FunctionalModel
from pkfast.engine.products import TileLayout
from pkfast.engine.quadrature import EvalPoint
from pkfast.engine.routes.base import Combo, Side
from pkfast.engine.routes.jacobian import JacobianRoute
from pkfast.engine.routes.layered import LayeredRoute

__all__ = ["Preconditioner", "PreconditionedRoute", "PreconditionedLayeredRoute", "preconditioner_for",
           "preconditioned_choices", "NOTE"]

#: Why a layer that could be factorised is not (the plan's note per layer).
NOTE = "preconditioned: materialized (a diagonal P breaks the factorisation)"


class Preconditioner:
    """√D of each evaluation point of ``rule`` over ``fm``'s trainable parameters (its panel columns' order),
    on the compute device and dtype, from the trajectory's recorded rows (read in their dtype, combined in
    float64)."""

    def __init__(self, fm: FunctionalModel, rule: str, step_sizes: torch.Tensor, fn: str) -> None:
        self.fm, self.rule, self.fn = fm, rule, fn
        self.eps = [float(e) for e in step_sizes]
        traj = fm.trajectory
        entries = traj.preconditioner(0, as_dict=True) if traj.num_steps else {}
        missing = [h for h in fm.hits if h not in entries]
        if missing:
            raise ValueError(f"{fn}: the trajectory's recorded preconditioner has no entry for the trainable "
                             f"parameter(s) {', '.join(map(repr, missing[:3]))} (it covers "
                             f"{', '.join(map(repr, list(entries)[:5]))}…): they did not train when it was recorded. "
                             "Freeze them (requires_grad=False) or pass preconditioner=None")
        self._cache: dict[tuple[int, ...], torch.Tensor] = {}

    def row(self, step: int) -> torch.Tensor:
        """P_step in float64 over the trainable parameters in the functional model's order (CPU)."""
        parts = self.fm.trajectory.preconditioner(step, as_dict=True)
        return torch.cat([parts[h].reshape(-1).to(torch.float64) for h in self.fm.hits])

    def key(self, point: EvalPoint) -> tuple[int, ...]:
        """The steps whose preconditioner the point takes (trapezoid: the step ending and the step starting there)."""
        if self.rule == "trapezoid":
            if point.tau != 0.0:
                raise ValueError(f"{self.fn}: the trapezoid rule evaluates recorded points only; found {point}")
            return tuple(s for s in (point.step - 1, point.step) if 0 <= s < len(self.eps))
        return (point.step,)

    def diagonal(self, key: tuple[int, ...]) -> torch.Tensor:
        """D for the steps ``key``: P_s, or the ε-weighted mean of two steps' (float64, CPU)."""
        w = [self.eps[s] for s in key]
        if len(key) == 1 or sum(w) == 0.0:
            return self.row(key[-1])
        return sum(wi * self.row(s) for wi, s in zip(w, key)) / sum(w)

    def scale(self, combo: Combo) -> torch.Tensor:
        """√D of the combination's points (all of one step: one D), ``[P]`` on the compute device and dtype."""
        keys = {self.key(p) for p, _ in combo}
        if len(keys) != 1:
            raise ValueError(f"{self.fn}: a kernel term combines points of different steps {sorted(keys)}; the "
                             "preconditioned kernel takes one step's preconditioner per term")
        key = keys.pop()
        if key not in self._cache:
            if len(self._cache) > 4:
                self._cache.clear()
            self._cache[key] = self.diagonal(key).clamp_min(0.0).sqrt().to(self.fm.device, self.fm.dtype)
        return self._cache[key]

    @property
    def describe(self) -> str:
        return "panels scaled by √P_s, the recorded preconditioner of each point's step"


def preconditioner_for(preconditioner: str | None, fm: FunctionalModel, rule: str, fn: str) -> Preconditioner | None:
    """The :class:`Preconditioner` of a computation whose validated option is ``preconditioner``, or None."""
    if preconditioner != "recorded":
        return None
    return Preconditioner(fm, rule, fm.trajectory.step_sizes, fn)


def preconditioned_choices(choices: tuple[LayerChoice, ...]) -> tuple[LayerChoice, ...]:
    """The materialised choices of a preconditioned kernel, each layer that has a factorised form noting why it
    does not take it."""
    return tuple(dataclasses.replace(c, reason=NOTE + ("; streamed in slices" if c.stream else ""))
                 if c.route is RouteKind.MATERIALIZED and "factorized" in c.options else c for c in choices)


def _in_layout(L: Any, params: dict[str, torch.Tensor]) -> torch.Tensor:
    """Layer ``L``'s entries of a parameter-shaped vector (``params``: by parameter name) in the layout of its
    materialised gradient (:meth:`~pkfast.layers.base.LayerRule.gradient_layout`), as the kernel machine's panels."""
    roles = dict(zip(("weight", "bias"), L.rule.param_names))
    own = {p.rsplit(".", 1)[-1]: params[p] for p in L.params}
    return L.rule.gradient_layout(L, {r: own.get(n) for r, n in roles.items()})


class PreconditionedRoute(JacobianRoute):
    """The Jacobian route with each side's panel scaled column-wise by √D of its term's step(s): the panel
    product is then Σ_p J_p D_p J′_p = J diag(D) J′ᵀ."""

    def __init__(self, layout: TileLayout, fm: FunctionalModel, pre: Preconditioner, *, requested: str,
                 choices: tuple = ()) -> None:
        super().__init__(layout, fm, requested=requested, choices=choices)
        self.pre = pre

    def summary(self) -> str:
        return f"{super().summary()}, preconditioned ({self.pre.describe})"

    def passes(self) -> str:
        return (f"preconditioned by the recorded P_s: every layer by vmap(jacrev), {self.pre.describe} "
                "(a diagonal P breaks the (a·a′)(δ·δ′) factorisation of the layer routes)")

    def side(self, combo: Combo, X: torch.Tensor, Y: torch.Tensor | None, slot: str, rows: slice,
             tick: Callable[[int], None] | None = None) -> Side:
        s = super().side(combo, X, Y, slot, rows, tick)
        s.panel.mul_(self.pre.scale(combo))
        return s


class PreconditionedLayeredRoute(LayeredRoute):
    """The layered route with every layer materialised (none factorised) and every gradient column scaled by √D of
    its term's step(s): the panel (Jacobian part, then the in-panel layers in their gradient layout) as it is
    formed, each streamed layer's gradient slice as it is formed (:attr:`Side.scale`). The products are then
    J diag(D) J′ᵀ, layer by layer."""

    def __init__(self, *args: Any, pre: Preconditioner, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.pre = pre
        self._scales: tuple[Any, torch.Tensor | None, dict[str, torch.Tensor]] | None = None
        assert not self.groups.factorized, "a preconditioned kernel materialises every layer"

    def summary(self) -> str:
        return f"{super().summary()}, preconditioned ({self.pre.describe})"

    def passes(self) -> str:
        line = (f"preconditioned by the recorded P_s: layers materialised (a diagonal P breaks the (a·a′)(δ·δ′) "
                f"factorisation), {self.pre.describe}")
        base = super().passes()
        return f"{line}\n{base}" if base else line

    def _fallback_route(self) -> JacobianRoute:
        return PreconditionedRoute(self.layout, self.fm, self.pre, requested=self.requested, choices=self.choices)

    def scales(self, combo: Combo) -> tuple[torch.Tensor | None, dict[str, torch.Tensor]]:
        """(√D in the panel's column order, √D of each streamed layer as ``[groups, units, width]``)."""
        root = self.pre.scale(combo)
        if self._scales is not None and self._scales[0] is root:
            return self._scales[1], self._scales[2]
        params = self.fm.params(root)
        G = self.groups
        parts = [params[n].reshape(-1) for n in G.jac_names] + [_in_layout(L, params) for L in G.paneled]
        panel = torch.cat(parts) if parts else None
        streamed = {}
        for L in G.streamed:
            units, width = L.rule.units(L)
            streamed[L.name] = _in_layout(L, params).view(-1, units, width)
        self._scales = (root, panel, streamed)
        return panel, streamed

    def side(self, combo: Combo, X: torch.Tensor, Y: torch.Tensor | None, slot: str, rows: slice,
             tick: Callable[[int], None] | None = None) -> Side:
        s = super().side(combo, X, Y, slot, rows, tick)
        if self.fallback is not None:  # (the Jacobian route it fell back to scales its own panels)
            return s
        panel, streamed = self.scales(combo)
        if s.panel is not None and panel is not None:
            s.panel.mul_(panel)
        s.scale = streamed
        return s
