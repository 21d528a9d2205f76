"""Discretisation rules: how the path integral ∫ K_g dt becomes a weighted sum of per-point kernel terms.

A rule turns the step sizes ε_0 … ε_{T-1} into a list of :class:`Term` s. Each term contributes
``weight · A Bᵀ`` to the Gram, where ``A`` is a combination of Jacobians of the row samples at some
evaluation points and ``B`` the same for the column samples. Symmetric rules use the same combination on
both sides (``right is None``), which makes every Gram over one point set symmetric PSD and lets the engine
compute only upper-triangle tiles.

- ``"left"``: Σ_{s<T} ε_s K_g(w_s) — Domingos' left Riemann sum. T terms.
- ``"trapezoid"``: Σ_s ε_s/2 (K_g(w_s) + K_g(w_{s+1})), merged per point: T+1 terms with weights
  ε_0/2, (ε_0+ε_1)/2, …, ε_{T-1}/2.

- ``"exact"``: Σ_s ε_s J̄_s(x) J(x′; w_s)ᵀ — the exact discrete path kernel of Bell et al. (2023): the row
  side averages the Jacobian over the segment w_s → w_{s+1} by Gauss–Legendre quadrature with ``nodes``
  points (τ_q = (1+ξ_q)/2, ω_q = η_q/2), the column side is the segment start. T asymmetric terms: a Gram of
  X with itself is not symmetric and is never mirrored (docs/math.md §3).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

__all__ = ["EvalPoint", "Term", "RULES", "terms_for", "gauss_legendre", "is_symmetric", "single_point_terms"]

RULES = ("left", "trapezoid", "exact")
#: Gauss–Legendre nodes per segment for ``rule="exact"`` unless told otherwise.
DEFAULT_NODES = 2


@dataclass(frozen=True)
class EvalPoint:
    """The weights ``w_step + tau · (w_{step+1} − w_step)`` (``tau=0`` is the recorded point ``w_step``)."""

    step: int
    tau: float = 0.0


@dataclass(frozen=True)
class Term:
    """``weight · A Bᵀ`` with ``A = Σ ω J(rows; left points)`` and ``B`` likewise (``right=None``: B uses left)."""

    weight: float
    left: tuple[tuple[EvalPoint, float], ...]
    right: tuple[tuple[EvalPoint, float], ...] | None = None

    @property
    def symmetric(self) -> bool:
        return self.right is None

    @property
    def right_combo(self) -> tuple[tuple[EvalPoint, float], ...]:
        return self.left if self.right is None else self.right


@functools.lru_cache(maxsize=None)  # called per step by KernelMachine sweeps
def gauss_legendre(nodes: int) -> tuple[tuple[float, float], ...]:
    """(τ_q, ω_q) on [0, 1]: Gauss–Legendre nodes and weights (Σ ω_q = 1); ``nodes=1`` is the midpoint."""
    import numpy as np

    xi, eta = np.polynomial.legendre.leggauss(int(nodes))
    return tuple((float((1 + x) / 2), float(w / 2)) for x, w in zip(xi, eta))


def terms_for(rule: str, step_sizes: torch.Tensor, nodes: int = DEFAULT_NODES) -> list[Term]:
    """The kernel terms of ``rule`` for a trajectory with these step sizes; zero-weight terms are dropped."""
    eps = [float(e) for e in step_sizes]
    T = len(eps)
    if rule == "left":
        terms = [Term(eps[s], ((EvalPoint(s), 1.0),)) for s in range(T)]
    elif rule == "trapezoid":
        w = [0.0] * (T + 1)
        for s, e in enumerate(eps):
            w[s] += e / 2
            w[s + 1] += e / 2
        terms = [Term(w[k], ((EvalPoint(k), 1.0),)) for k in range(T + 1)]
    elif rule == "exact":
        gl = gauss_legendre(nodes)
        terms = [Term(eps[s], tuple((EvalPoint(s, tau), om) for tau, om in gl), ((EvalPoint(s), 1.0),))
                 for s in range(T)]
    else:  # validated by the caller; kept as a guard for internal use
        raise ValueError(f"pkfast: unknown rule {rule!r}; expected one of {RULES}")
    return [t for t in terms if t.weight > 0.0]


def is_symmetric(terms: list[Term]) -> bool:
    return all(t.symmetric for t in terms)


def single_point_terms(terms: list[Term]) -> list[Term]:
    """The same kernel as terms whose sides are each one point: ``weight · (Σ_a ω_a J_a)(Σ_b ω_b J′_b)ᵀ`` as
    the terms ``weight ω_a ω_b · J_a J′_bᵀ`` (a symmetric one-point term stays as it is). For products that
    depend on the points themselves (a collapsed head's full blocks, :class:`pkfast.layers.head.HeadBlocks`).

    Example:
        >>> import torch
        >>> [(t.weight, t.left[0][0].tau) for t in single_point_terms(terms_for("exact", torch.tensor([0.5]), 2))]
        [(0.25, 0.21132486540518713), (0.25, 0.7886751345948129)]
    """
    out = []
    for t in terms:
        if t.symmetric and len(t.left) == 1:
            out.append(Term(t.weight * t.left[0][1] ** 2, ((t.left[0][0], 1.0),)))
            continue
        out += [Term(t.weight * wa * wb, ((a, 1.0),), ((b, 1.0),)) for a, wa in t.left for b, wb in t.right_combo]
    return [t for t in out if t.weight != 0.0]
