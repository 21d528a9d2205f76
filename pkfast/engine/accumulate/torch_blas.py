"""The torch (BLAS / cuBLAS) accumulation path: ``addmm_`` into the tile accumulator.

On a symmetric diagonal tile (A is B) only the upper triangle is needed. torch exposes no SYRK, so the
tile is split into row blocks and only the blocks on or above the block diagonal are multiplied: with
``nb`` blocks that is (nb+1)/(2·nb) of the GEMM's FLOPs, in GEMMs still large enough to run at full speed.
"""

from __future__ import annotations

import torch

#: Smallest row block of the blocked SYRK. Below this, GEMMs with a very long inner dimension (C·P) lose
#: more to per-call overhead and cache blocking than the skipped lower blocks save (see csrc/README.md).
SYRK_MIN_BLOCK = 256
#: Most blocks per side: (nb+1)/(2nb) → 1/2 as nb grows; 4 blocks already reach 62.5 % of the GEMM FLOPs.
SYRK_MAX_BLOCKS = 4


#: Below SYRK_MIN_BLOCK·2 rows a diagonal tile is two row blocks once they are at least this tall: two blocks
#: beat one GEMM from 64 rows up (n = 64–160: 5–17 % faster; 176 rows with K = 11.3 M: 2.20 → 1.90 s), and three
#: or four blocks do not (csrc/README.md, stops 10 and 11).
SYRK_SMALL_BLOCK = 32


def syrk_blocks(n: int) -> int:
    if n < 2 * SYRK_MIN_BLOCK:
        return max(1, min(2, n // SYRK_SMALL_BLOCK))
    return max(1, min(SYRK_MAX_BLOCKS, n // SYRK_MIN_BLOCK))


def accumulate(acc: torch.Tensor, A: torch.Tensor, B: torch.Tensor, alpha: float, *, upper_only: bool = False) -> None:
    if A.dtype != acc.dtype:
        A, B = A.to(acc.dtype), B.to(acc.dtype)
    n = A.shape[0]
    nb = syrk_blocks(n) if upper_only else 1
    if nb == 1:
        acc.addmm_(A, B.T, alpha=alpha)
        return
    edges = [round(i * n / nb) for i in range(nb + 1)]
    for i in range(nb):
        r = slice(edges[i], edges[i + 1])
        # the row block against every column from its own start: one GEMM per block row
        c = slice(edges[i], n)
        acc[r, c].addmm_(A[r], B[c].T, alpha=alpha)


def accumulate_diagonal(acc: torch.Tensor, A: torch.Tensor, B: torch.Tensor, alpha: float, *, full: bool) -> None:
    """A, B: [n, C, K]."""
    if A.dtype != acc.dtype:
        A, B = A.to(acc.dtype), B.to(acc.dtype)
    if full:
        acc.baddbmm_(A, B.transpose(1, 2), alpha=alpha)
    else:
        n = A.shape[0]
        acc.add_(torch.bmm(A.reshape(n, 1, -1), B.reshape(n, -1, 1)).reshape(n), alpha=alpha)
