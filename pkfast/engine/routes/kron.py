r"""routes.kron: Kronecker-factored random projections of a layer's per-sample gradient, formed from its factors
without the gradient, and the per-layer choice between them and the dense projection (docs/math.md §7.2).

For a layer whose per-sample gradient of output c is G_c = Σ_s δ_{c,s} a_sᵀ (O × I′, the bias a column of ones
in a), draw R_in ∈ R^{I′×r_in} and R_out ∈ R^{O×r_out} with iid N(0, 1) entries, independently per weight
point, layer, group and side, from the seed (never stored), and set

.. math:: \phi_c = \frac{1}{\sqrt{r_{in} r_{out}}}\, R_{in}^\top G_c^\top R_{out}
          = \frac{1}{\sqrt{k}} \sum_s (R_{in}^\top a_s)(R_{out}^\top \delta_{c,s})^\top \in \mathbb{R}^{r_{in}\times r_{out}},

flattened to k = r_in·r_out features. It is the dense sketch with the layer's rows of R replaced by the
Kronecker product R_in ⊗ R_out / √k: E[R Rᵀ] = I still, so the sum over layers and steps stays unbiased. Cost
per sample: S·(a-columns·r_in + C·O·r_out + C·r_in·r_out) multiply-adds instead of forming G (C·S·O·I′) and
projecting it (C·O·I′·k); the variance is larger (docs/math.md §7.2 gives it exactly).
"""

from __future__ import annotations

import hashlib
import math

import torch

from pkfast.layers.base import Layer
from pkfast.options import PROJECTIONS

__all__ = ["PROJECTIONS", "MIN_RANK", "ranks", "side_matrix", "choose_projections", "add_layer_features"]

#: The smaller side of a Kronecker projection must have at least this many columns: below it the variance
#: (≈ 2/r_in + 2/r_out of a diagonal entry, relative) is too large to be worth the speed.
MIN_RANK = 8


def ranks(k: int) -> tuple[int, int] | None:
    """(r_in, r_out) with r_in·r_out = k and r_in ≤ r_out as close as possible to √k, or None when the smaller is
    below :data:`MIN_RANK` (k = 4096 → (64, 64); 2048 → (32, 64); 1000 → (25, 40); a prime → None)."""
    r = math.isqrt(int(k))
    while r > 1 and k % r:
        r -= 1
    return (r, k // r) if r >= MIN_RANK else None


def _seed(seed: int, point: int, layer: str, group: int, side: str) -> int:
    h = hashlib.blake2b(f"pkfast.kron|{int(seed)}|{int(point)}|{layer}|{int(group)}|{side}".encode(), digest_size=8)
    return int.from_bytes(h.digest(), "little") & (2**63 - 1)


def side_matrix(seed: int, point: int, layer: str, group: int, side: str, rows: int, r: int, *,
                dtype: torch.dtype, device: torch.device, generator: torch.Generator) -> torch.Tensor:
    """R_in (``side="in"``) or R_out (``"out"``) of one layer group at one weight point: ``[rows, r]`` iid N(0, 1),
    deterministic in its arguments (and the device kind and torch version, as the dense blocks)."""
    generator.manual_seed(_seed(seed, point, layer, group, side))
    return torch.randn(rows, r, generator=generator, dtype=dtype, device=device)


def kron_cost(L: Layer, C: int, r_in: int, r_out: int) -> float:
    """Multiply-adds per sample and term of the Kronecker features of layer L (all groups)."""
    S, g = L.positions, L.groups
    return 2.0 * S * (L.rule.a_columns(L) * r_in + g * C * L.fan_out * r_out + g * C * r_in * r_out)


def dense_cost(L: Layer, C: int, k: int, full_jacobian: bool) -> float:
    """Multiply-adds per sample and term of projecting layer L's gradient densely: forming it (from factors, or
    a ``jacrev`` row per output) and multiplying it by its k columns of R."""
    form = 6.0 * C * L.size if full_jacobian else L.rule.costs(L, C, False)[2]
    return form + 2.0 * C * L.size * k


def choose_projections(layers: list[Layer], *, projection: str, k: int, C: int, samples: int = 1, terms: int = 1,
                       itemsize: int = 4) -> tuple[int, int] | None:
    """Set each layer's ``method`` for the sketch: ``"kronecker"`` (its factors projected), ``"dense"`` (its
    gradient formed from its factors and projected with the rest), ``"jacobian"`` (no rule: its Jacobian
    projected), ``"unused"``; the multiply-adds of each option for ``samples`` samples and ``terms`` terms in
    ``options`` (the choice compares them per sample), and the bytes per sample it holds. Returns
    (r_in, r_out), or None when no layer is Kronecker-projected."""
    rr = ranks(k) if projection != "dense" else None
    times = float(samples) * terms
    for L in layers:
        L.stream = False
        if L.kind == "other" or projection == "dense":
            L.method, L.options = "jacobian", {"jacobian": times * dense_cost(L, C, k, True)}
            L.bytes_per_sample = C * L.size * itemsize
            if L.kind != "other":
                L.reason = "projection='dense'"
        elif L.calls == 0:
            L.method, L.options, L.reason = "unused", {}, "never called in the forward pass"
        else:
            L.options = {"dense": times * dense_cost(L, C, k, False)}
            if L.rule.factorizable and rr is not None:
                L.options["kronecker"] = times * kron_cost(L, C, *rr)
            if "kronecker" in L.options and (projection == "kronecker" or L.options["kronecker"] <= L.options["dense"]):
                L.method = "kronecker"
                L.bytes_per_sample = L.positions * (L.rule.a_columns(L) + C * L.fan_out * L.groups) * itemsize
            else:
                L.method = "dense"
                L.bytes_per_sample = C * L.size * itemsize
                if L.rule.factorizable and rr is None:
                    L.reason = f"k={k} has no factor pair r_in·r_out with both ≥ {MIN_RANK}"
        L.flops = L.options.get(L.method, 0.0)
    return rr if any(L.method == "kronecker" for L in layers) else None


def add_layer_features(acc: torch.Tensor, L: Layer, groups: list, rr: tuple[int, int], alpha: float, *, seed: int,
                       point: int, generator: torch.Generator) -> None:
    """``acc [n, C, k] += alpha · Σ_groups vec(R_inᵀ G_cᵀ R_out)`` for layer L from its factors ``groups``
    (``[(A_g, Δ_g [n, C, S, O])]``); ``alpha`` includes √(w_s/k)."""
    r_in, r_out = rr
    n, C = acc.shape[:2]
    for g, (A, D) in enumerate(groups):
        S, O = D.shape[2], D.shape[3]
        kw = dict(dtype=acc.dtype, device=acc.device, generator=generator)
        Rin = side_matrix(seed, point, L.name, g, "in", _rows_in(L, A), r_in, **kw)
        Rout = side_matrix(seed, point, L.name, g, "out", O, r_out, **kw)
        Ai = L.rule.project_input(A, Rin).reshape(n, S, r_in).to(acc.dtype)   # R_inᵀ a_s: [n, S, r_in]
        Do = torch.matmul(D.transpose(1, 2).reshape(n * S * C, O), Rout)       # R_outᵀ δ: [n·S·C, r_out]
        if C == 1:
            acc.view(n, r_in, r_out).baddbmm_(Ai.transpose(1, 2), Do.view(n, S, r_out), alpha=alpha)
        else:
            F = torch.bmm(Ai.transpose(1, 2), Do.view(n, S, C * r_out)).view(n, r_in, C, r_out)
            acc.view(n, C, r_in, r_out).add_(F.permute(0, 2, 1, 3), alpha=alpha)


def _rows_in(L: Layer, A: torch.Tensor) -> int:
    """Rows of R_in: one per column of A (an embedding: one per vocabulary row)."""
    return L.fan_in if A.ndim == 2 else A.shape[-1]
