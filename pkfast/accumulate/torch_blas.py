"""The torch (BLAS / cuBLAS) accumulation path: ``addmm_`` into the tile accumulator."""

from __future__ import annotations

import torch


def accumulate(acc: torch.Tensor, A: torch.Tensor, B: torch.Tensor, alpha: float, *, upper_only: bool = False) -> None:
    if A.dtype != acc.dtype:
        A, B = A.to(acc.dtype), B.to(acc.dtype)
    acc.addmm_(A, B.T, alpha=alpha)


def accumulate_diagonal(acc: torch.Tensor, A: torch.Tensor, B: torch.Tensor, alpha: float, *, full: bool) -> None:
    """A, B: [n, C, K]."""
    if A.dtype != acc.dtype:
        A, B = A.to(acc.dtype), B.to(acc.dtype)
    if full:
        acc.baddbmm_(A, B.transpose(1, 2), alpha=alpha)
    else:
        n = A.shape[0]
        acc.add_(torch.bmm(A.reshape(n, 1, -1), B.reshape(n, -1, 1)).reshape(n), alpha=alpha)
