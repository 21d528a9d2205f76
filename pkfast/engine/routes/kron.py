r"""routes.kron: Kronecker-factored random projections of a layer's per-sample gradient, formed from its factors
without the gradient (docs/math.md §7.2); the per-layer choice between them and the dense projection is the cost
model's (:func:`pkfast.engine.costs.choose_projections`).

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

import torch

from pkfast.layers.base import Layer
from pkfast.options import PROJECTIONS

__all__ = ["PROJECTIONS", "side_matrix", "add_layer_features"]


def _seed(seed: int, point: int, layer: str, group: int, side: str) -> int:
    h = hashlib.blake2b(f"pkfast.kron|{int(seed)}|{int(point)}|{layer}|{int(group)}|{side}".encode(), digest_size=8)
    return int.from_bytes(h.digest(), "little") & (2**63 - 1)


def side_matrix(seed: int, point: int, layer: str, group: int, side: str, rows: int, r: int, *,
                dtype: torch.dtype, device: torch.device, generator: torch.Generator) -> torch.Tensor:
    """R_in (``side="in"``) or R_out (``"out"``) of one layer group at one weight point: ``[rows, r]`` iid N(0, 1),
    deterministic in its arguments (and the device kind and torch version, as the dense blocks)."""
    generator.manual_seed(_seed(seed, point, layer, group, side))
    return torch.randn(rows, r, generator=generator, dtype=dtype, device=device)


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
