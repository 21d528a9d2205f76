"""engine.costs: the one cost model — every per-layer decision (a Gram's route, a sketch's projection, the kernel
machine's pair-or-GEMM choice) and every chunk size is made here, from the layer rules' multiply-add counts, and
returned as frozen :class:`LayerChoice` records.

Words: the user's ``method=`` picks how a whole Gram is computed (``"auto"``, ``"factorized"``, …); a **route**
(:class:`RouteKind`) is how one layer's share of it is formed. A layer rule (:mod:`pkfast.layers`) supplies its
multiply-adds (:meth:`~pkfast.layers.base.LayerRule.costs`); this module compares them.

Figures: ``pairs`` is the number of kernel entries per term (times the quadrature nodes), ``samples`` the
Jacobian rows formed per term (rows + columns, summed over tiles), ``terms`` the number of kernel terms.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

__all__ = ["RouteKind", "LayerChoice", "DEFAULT_CHUNK_BYTES", "MAX_CHUNK", "chunk_for", "factor_bytes",
           "gradient_bytes", "choose_routes", "choose_projections", "projection_ranks", "pair_cheaper",
           "MIN_RANK", "kron_cost", "dense_cost", "route_counts"]

#: Working memory one ``vmap`` call of per-sample passes may take: sets the samples per call (:func:`chunk_for`).
DEFAULT_CHUNK_BYTES = 128 * 2**20
#: The most samples one per-sample call takes, whatever the memory.
MAX_CHUNK = 1024
#: The smaller side of a Kronecker projection must have at least this many columns: below it the variance
#: (≈ 2/r_in + 2/r_out of a diagonal entry, relative) is too large to be worth the speed.
MIN_RANK = 8


class RouteKind(str, enum.Enum):
    """How one layer's share of a kernel is formed.

    A Gram's routes: ``FACTORIZED`` (Σ (a·a′)(δ·δ′) from the layer's factors, its gradient never formed),
    ``MATERIALIZED`` (its per-sample gradient formed from the factors — streamed in slices when the factors are
    the smaller — and multiplied like a Jacobian panel), ``JACOBIAN`` (``vmap(jacrev)``: parameters without a
    rule), ``UNUSED`` (never called: adds 0). A sketch's projections: ``KRONECKER`` (the factors projected by
    R_in ⊗ R_out) and ``DENSE`` (the gradient formed in the panel and projected with the Jacobian part)."""

    FACTORIZED = "factorized"
    MATERIALIZED = "materialized"
    JACOBIAN = "jacobian"
    UNUSED = "unused"
    KRONECKER = "kronecker"
    DENSE = "dense"

    def __str__(self) -> str:  # the value, as stored manifests and plans have always printed it
        return self.value

    __format__ = lambda self, spec: format(self.value, spec)  # noqa: E731

    @property
    def hooked(self) -> bool:
        """Whether the layer's factors are captured by hooks (every route but the Jacobian and unused)."""
        return self in (RouteKind.FACTORIZED, RouteKind.MATERIALIZED, RouteKind.KRONECKER, RouteKind.DENSE)

    @property
    def pairs_from_factors(self) -> bool:
        """Whether the layer's share is formed from its factors kept per sample (factorised or Kronecker)."""
        return self in (RouteKind.FACTORIZED, RouteKind.KRONECKER)


@dataclass(frozen=True)
class LayerChoice:
    """One layer's route for one computation, with what the cost model found: the multiply-adds of every
    feasible route (``options``), the chosen one's (``flops``), the working bytes per sample it holds, and why it
    is not on a cheaper route (``reason``). ``layer`` is the layer's identity and discovered facts
    (:class:`pkfast.layers.base.Layer`); its fields read through (``choice.name``, ``choice.size``, …)."""

    layer: Any
    route: RouteKind
    stream: bool = False
    flops: float = 0.0
    bytes_per_sample: int = 0
    options: Mapping[str, float] = field(default_factory=lambda: MappingProxyType({}))
    reason: str = ""

    def __post_init__(self) -> None:
        object.__setattr__(self, "route", RouteKind(self.route))
        object.__setattr__(self, "options", MappingProxyType(dict(self.options)))

    def __getattr__(self, name: str) -> Any:  # the layer's identity and facts: name, type, size, positions, …
        if name.startswith("__"):
            raise AttributeError(name)
        return getattr(object.__getattribute__(self, "layer"), name)

    @property
    def method(self) -> RouteKind:
        """The route (named as ``gram(method=…)`` names it; kept for code written against earlier versions)."""
        return self.route


# ---------------------------------------------------------------------------------------------- memory
def chunk_for(bytes_per_sample: float, budget: int | None = None, most: int | None = MAX_CHUNK) -> int:
    """Samples per per-sample call: as many as ``budget`` bytes (default :data:`DEFAULT_CHUNK_BYTES`, read at call
    time) hold at ``bytes_per_sample`` each, at least 1 and at most ``most`` (None: no cap)."""
    budget = DEFAULT_CHUNK_BYTES if budget is None else budget
    n = max(1, int(budget // max(1, int(bytes_per_sample))))
    return n if most is None else min(most, n)


def factor_bytes(L: Any, C: int, itemsize: int) -> int:
    """Bytes per sample of a layer's factors: A (positions × input columns) and Δ (positions × C × outputs)."""
    return int(L.positions * (L.rule.a_columns(L) + C * L.fan_out * L.groups) * itemsize)


def gradient_bytes(L: Any, C: int, itemsize: int) -> int:
    """Bytes per sample of a layer's per-sample gradient (C × its parameters)."""
    return int(C * L.size * itemsize)


# ---------------------------------------------------------------------------------------------- a Gram's routes
def _jacobian_flops(L: Any, *, C: int, full: bool, pairs: float, samples: float, terms: int) -> float:
    """A parameter group by ``jacrev``: ~3 passes' work per Jacobian row, and its share of the panel products."""
    return terms * (2.0 * (C * C if full else C) * L.size * pairs + 6.0 * C * L.size * samples)


def _choose_route(L: Any, *, method: str, C: int, full: bool, pairs: float, samples: float, terms: int,
                  itemsize: int) -> LayerChoice:
    if L.kind == "other" or L.calls == 0 or method == "jacobian":
        flops = _jacobian_flops(L, C=C, full=full, pairs=pairs, samples=samples, terms=terms)
        route, reason = RouteKind.JACOBIAN, L.reason
        if method == "jacobian" and L.kind != "other":
            reason = "method='jacobian'"
        elif L.kind != "other":
            route, reason = RouteKind.UNUSED, "never called in the forward pass"
        return LayerChoice(L, route, flops=flops, bytes_per_sample=gradient_bytes(L, C, itemsize),
                           options={"jacobian": flops}, reason=reason)
    fp, mp, ms = L.rule.costs(L, C, full)
    mat = terms * (mp * pairs + ms * samples)
    options = {"materialized": mat} if fp is None else {"factorized": terms * fp * pairs, "materialized": mat}
    fb, gb = factor_bytes(L, C, itemsize), gradient_bytes(L, C, itemsize)
    if fp is not None and (method == "factorized" or (method == "auto" and options["factorized"] <= mat)):
        return LayerChoice(L, RouteKind.FACTORIZED, flops=options["factorized"], bytes_per_sample=fb, options=options)
    stream = fb <= gb
    return LayerChoice(L, RouteKind.MATERIALIZED, stream=stream, flops=mat, bytes_per_sample=fb if stream else gb,
                       options=options)


def choose_routes(layers: Iterable[Any], *, method: str, C: int, full: bool, pairs: float, samples: float,
                  terms: int, itemsize: int) -> tuple[LayerChoice, ...]:
    """Each layer's route for a Gram: ``method="auto"`` takes the cheaper route per layer with a rule (ties go to
    factorised), ``"factorized"`` factorises every layer whose rule can be, ``"materialized"`` materialises every
    layer with a rule, ``"jacobian"`` none. Layers without a rule (or never called) take the Jacobian route
    (or add nothing)."""
    return tuple(_choose_route(L, method=method, C=C, full=full, pairs=pairs, samples=samples, terms=terms,
                               itemsize=itemsize) for L in layers)


def route_counts(choices: Iterable[LayerChoice]) -> str:
    """How many layers took each route, e.g. ``"factorized 3, materialized 12, jacobian 2 layers"``."""
    counts: dict[str, int] = {}
    for c in choices:
        counts[c.route.value] = counts.get(c.route.value, 0) + 1
    parts = [f"{m} {counts[m]}" for m in ("factorized", "materialized", "jacobian", "unused") if counts.get(m)]
    return ", ".join(parts) + " layers" if parts else "no layers"


# ---------------------------------------------------------------------------------------------- a sketch's projections
def projection_ranks(k: int) -> tuple[int, int] | None:
    """(r_in, r_out) with r_in·r_out = k and r_in ≤ r_out as close as possible to √k, or None when the smaller is
    below :data:`MIN_RANK` (k = 4096 → (64, 64); 2048 → (32, 64); 1000 → (25, 40); a prime → None)."""
    r = math.isqrt(int(k))
    while r > 1 and k % r:
        r -= 1
    return (r, k // r) if r >= MIN_RANK else None


def kron_cost(L: Any, C: int, r_in: int, r_out: int) -> float:
    """Multiply-adds per sample and term of the Kronecker features of layer L (all groups)."""
    S, g = L.positions, L.groups
    return 2.0 * S * (L.rule.a_columns(L) * r_in + g * C * L.fan_out * r_out + g * C * r_in * r_out)


def dense_cost(L: Any, C: int, k: int, full_jacobian: bool) -> float:
    """Multiply-adds per sample and term of projecting layer L's gradient densely: forming it (from factors, or
    a ``jacrev`` row per output) and multiplying it by its k columns of R."""
    form = 6.0 * C * L.size if full_jacobian else L.rule.costs(L, C, False)[2]
    return form + 2.0 * C * L.size * k


def _choose_projection(L: Any, *, projection: str, k: int, C: int, rr: tuple[int, int] | None, times: float,
                       itemsize: int) -> LayerChoice:
    if L.kind == "other" or projection == "dense":
        flops = times * dense_cost(L, C, k, True)
        return LayerChoice(L, RouteKind.JACOBIAN, flops=flops, bytes_per_sample=gradient_bytes(L, C, itemsize),
                           options={"jacobian": flops}, reason=L.reason if L.kind == "other" else "projection='dense'")
    if L.calls == 0:
        return LayerChoice(L, RouteKind.UNUSED, reason="never called in the forward pass")
    options = {"dense": times * dense_cost(L, C, k, False)}
    if L.rule.factorizable and rr is not None:
        options["kronecker"] = times * kron_cost(L, C, *rr)
    if "kronecker" in options and (projection == "kronecker" or options["kronecker"] <= options["dense"]):
        return LayerChoice(L, RouteKind.KRONECKER, flops=options["kronecker"],
                           bytes_per_sample=factor_bytes(L, C, itemsize), options=options)
    reason = f"k={k} has no factor pair r_in·r_out with both ≥ {MIN_RANK}" if L.rule.factorizable and rr is None else ""
    return LayerChoice(L, RouteKind.DENSE, flops=options["dense"], bytes_per_sample=gradient_bytes(L, C, itemsize),
                       options=options, reason=reason)


def choose_projections(layers: Iterable[Any], *, projection: str, k: int, C: int, samples: int = 1, terms: int = 1,
                       itemsize: int = 4) -> tuple[tuple[LayerChoice, ...], tuple[int, int] | None]:
    """Each layer's projection for the sketch — ``KRONECKER`` (its factors projected), ``DENSE`` (its gradient
    formed from its factors and projected with the rest), ``JACOBIAN`` (no rule: its Jacobian projected),
    ``UNUSED`` — by the multiply-adds of each option for ``samples`` samples and ``terms`` terms; and
    (r_in, r_out), or None when no layer is Kronecker-projected."""
    rr = projection_ranks(k) if projection != "dense" else None
    times = float(samples) * terms
    choices = tuple(_choose_projection(L, projection=projection, k=k, C=C, rr=rr, times=times, itemsize=itemsize)
                    for L in layers)
    return choices, (rr if any(c.route is RouteKind.KRONECKER for c in choices) else None)


# ---------------------------------------------------------------------------------------------- the kernel machine
def pair_cheaper(L: Any, C: int) -> bool:
    """Whether a factorised pair of the layer (S² position pairs of input and output-gradient products) costs less
    than its gradients' inner product (C × its parameters): the kernel machine's pair-or-GEMM choice."""
    return bool(L.rule.factorizable and L.positions ** 2 * (L.rule.a_columns(L) + C * L.fan_out * L.groups)
                < C * L.size)
