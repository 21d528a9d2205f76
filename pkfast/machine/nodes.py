"""nodes: how many Gauss–Legendre nodes per step the kernel machine needs — estimated at construction, not assumed.

The machine's prediction f(x; w_T) = f(x; w_0) + Σ_s J̄_s(x) Δ_s is exact up to the per-step quadrature residual
r_s(x) = f(x; w_{s+1}) − f(x; w_s) − Σ_q ω_q J(x; w_s + τ_q Δ_s) Δ_s (:meth:`KernelMachine.certificate`), which
needs no reference. Smooth networks with small steps meet rounding with 2 nodes; attention (softmax, LayerNorm)
with large or momentum-amplified steps may need 8 (a small ViT with momentum: 0.45 of the output change with 2
nodes, 0.023 with 4, 3.4e-4 with 8). So the machine measures r_s on a sample — at most :data:`SAMPLE_STEPS` steps
spread over the trajectory × at most :data:`SAMPLE_INPUTS` training inputs — and estimates the prediction error
of the n-node rule as

    e(n) = (T / |S|) · max_{x, c} Σ_{s ∈ S} |r_s(x)_c|  /  max_{x, c} |f(x; w_T)_c − f(x; w_0)_c|,

the sampled residuals' sum extrapolated to all T steps, relative to the output change (the scale of the
contributions). ``nodes=None`` takes the first n of :data:`CANDIDATES` with e(n) ≤ :data:`QUAD_TOL` (the cost:
two forward passes and n directional derivatives per sampled step on the sampled inputs); an explicit ``nodes``
is checked and warned about when it is too few, with the nodes that would do.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import numpy as np
import torch

from pkfast.engine.quadrature import DEFAULT_NODES, EvalPoint, gauss_legendre

__all__ = ["QUAD_TOL", "CANDIDATES", "NodesCheck", "choose_nodes"]

#: The largest estimated prediction error e(n), relative to the output change, that the automatic choice accepts
#: (raised to the computation dtype's rounding, 100 u max|f| / scale, when that is larger: float32).
QUAD_TOL = 1e-6
#: The node counts ``nodes=None`` tries, in order.
CANDIDATES = (2, 4, 8, 16)
#: The most steps and training inputs the estimate samples.
SAMPLE_STEPS, SAMPLE_INPUTS = 16, 8
_FN = "pkfast.KernelMachine"


@dataclass
class NodesCheck:
    """What the quadrature check found (:attr:`KernelMachine.nodes_check`).

    Attributes:
        nodes: the nodes the machine uses.
        estimates: the estimated relative prediction error e(n) of each node count tried.
        tol: the tolerance the estimates were held to.
        steps, inputs: the sample size (steps × training inputs).
        auto: whether ``nodes`` was chosen (``nodes=None``) rather than given.

    Example:
        >>> from pkfast.machine.nodes import NodesCheck
        >>> print(NodesCheck(4, {2: 3e-3, 4: 2e-7}, 1e-6, steps=16, inputs=8, auto=True))
        nodes=4 (auto): estimated quadrature error 2e-07 of the output change (tol 1e-06; 2 nodes: 0.003)
        on 16 steps × 8 training inputs
    """

    nodes: int
    estimates: dict[int, float] = field(default_factory=dict)
    tol: float = QUAD_TOL
    steps: int = 0
    inputs: int = 0
    auto: bool = True

    @property
    def error(self) -> float | None:
        """e(nodes): the estimated relative prediction error of the nodes in use (None if not estimated)."""
        return self.estimates.get(self.nodes)

    def __str__(self) -> str:
        others = "; ".join(f"{n} nodes: {e:.2g}" for n, e in self.estimates.items() if n != self.nodes)
        return (f"nodes={self.nodes} ({'auto' if self.auto else 'given'}): estimated quadrature error "
                f"{self.error:.2g} of the output change (tol {self.tol:.2g}{'; ' + others if others else ''}) on "
                f"{self.steps} steps × {self.inputs} training inputs")


class _Sample:
    """The sampled steps and training inputs, their output changes f(w_{s+1}) − f(w_s), and the scale."""

    def __init__(self, machine) -> None:
        fm, T, N = machine.fm, machine.trajectory.num_steps, machine.X.shape[0]
        self.T = T
        self.steps = sorted({int(s) for s in np.linspace(0, T - 1, min(T, SAMPLE_STEPS)).round()})
        idx = torch.from_numpy(np.unique(np.linspace(0, N - 1, min(N, SAMPLE_INPUTS)).round().astype(np.int64)))
        X = machine.X[idx]
        self.M, self.Xd = X.shape[0], fm.prepare(X)
        self.diff = {s: fm.outputs(EvalPoint(s + 1), X) - fm.outputs(EvalPoint(s), X) for s in self.steps}
        fT = fm.outputs(EvalPoint(T), X)
        change, size = float((fT - fm.outputs(EvalPoint(0), X)).abs().max()), float(fT.abs().max())
        self.scale = change or size or 1.0
        self.floor = 100 * torch.finfo(fm.dtype).eps * size / self.scale

    def estimate(self, machine, n: int) -> float:
        """e(n), the extrapolated relative prediction error of the n-node rule."""
        gl = gauss_legendre(n)
        acc = torch.zeros_like(next(iter(self.diff.values())))
        for s in self.steps:
            combo = tuple((EvalPoint(s, tau), om) for tau, om in gl)
            acc += (self.diff[s] - machine._segment_linear(self.Xd, self.M, s, combo)).abs()
        return float(acc.max()) * self.T / len(self.steps) / self.scale


def choose_nodes(machine, requested: int | None) -> NodesCheck:
    """The nodes for ``machine`` (a :class:`pkfast.KernelMachine` with its functional model and training inputs):
    ``requested=None``: the first of :data:`CANDIDATES` whose estimate meets the tolerance (the most accurate one,
    with a warning, if none does); an explicit count: kept, with a warning naming the count that would do if its
    estimate exceeds the tolerance.

    Example:
        >>> km.nodes_check = choose_nodes(km, None)  # doctest: +SKIP
    """
    if machine.trajectory.num_steps == 0:
        return NodesCheck(requested or DEFAULT_NODES, auto=requested is None)
    sample = _Sample(machine)
    tol = max(QUAD_TOL, sample.floor)
    est: dict[int, float] = {}
    found = NodesCheck(0, est, tol, steps=len(sample.steps), inputs=sample.M, auto=requested is None)
    first = (requested,) if requested is not None else ()
    for n in first + tuple(c for c in CANDIDATES if requested is None or c > requested):
        est[n] = sample.estimate(machine, n)
        if est[n] <= tol:
            break
    good = [n for n, e in est.items() if e <= tol]
    if requested is not None:
        found.nodes = requested
        if est[requested] > tol:
            warnings.warn(_too_few(found, good), stacklevel=3)
        return found
    if good:
        found.nodes = good[0]
        return found
    found.nodes = min(est, key=lambda n: (est[n], n))
    warnings.warn(_none_enough(found), stacklevel=3)
    return found


def _too_few(found: NodesCheck, good: list[int]) -> str:
    n = found.nodes
    fix = (f"nodes={good[0]} meets it (estimated {found.estimates[good[0]]:.2g}): pass nodes={good[0]} or "
           "nodes=None (chosen automatically)" if good else
           f"no count up to {CANDIDATES[-1]} meets it ({_tried(found)}): the network is not smooth along the "
           "steps (ReLU kinks?) or the steps are large; pass a larger nodes and check with certificate(X)")
    return (f"{_FN}: nodes={n} is too few for this trajectory: the estimated quadrature error of the prediction is "
            f"{found.estimates[n]:.2g} of the output change, above the tolerance {found.tol:.2g} (measured on "
            f"{found.steps} steps × {found.inputs} training inputs), so predictions and contributions are off by "
            f"about that much; {fix}. check_nodes=False skips this check")


def _none_enough(found: NodesCheck) -> str:
    return (f"{_FN}: no Gauss–Legendre node count up to {CANDIDATES[-1]} makes the quadrature of the steps "
            f"accurate to {found.tol:.2g} of the output change ({_tried(found)}; measured on {found.steps} steps × "
            f"{found.inputs} training inputs); using nodes={found.nodes} (the most accurate; the sweep's cost grows with "
            f"the nodes), so predictions and contributions are off by about {found.error:.2g} of the output change. Expected a network smooth along the steps: ReLU "
            "kinks or very large steps slow the quadrature down. Pass a larger nodes= explicitly (check_nodes=False "
            "to skip this check), train with smaller steps or smooth activations (GELU, SiLU), and measure the "
            "error on your queries with certificate(X)")


def _tried(found: NodesCheck) -> str:
    return ", ".join(f"{n} nodes: {e:.2g}" for n, e in found.estimates.items())
