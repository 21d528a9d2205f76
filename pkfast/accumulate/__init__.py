"""Accumulate: ``G_tile += α · A Bᵀ`` for per-point Jacobian blocks, on the selected backend.

``A`` is ``[rows, K]`` and ``B`` is ``[cols, K]`` (2-D views of Jacobian panels: rows are samples for the
trace Gram, sample×output pairs for the full block Gram). The accumulator is at least float32.
"""

from __future__ import annotations

import logging

import torch

from pkfast.accumulate import torch_blas

__all__ = ["BACKENDS", "select_backend", "accumulate", "accumulate_diagonal"]

log = logging.getLogger("pkfast")

BACKENDS = ("auto", "torch")


def select_backend(requested: str, device: torch.device) -> str:
    """Resolve ``backend="auto"`` to a concrete backend for ``device``."""
    if requested == "auto":
        return "torch"
    return requested


def accumulate(acc: torch.Tensor, A: torch.Tensor, B: torch.Tensor, alpha: float, *, backend: str,
               upper_only: bool = False) -> None:
    """``acc += alpha · A @ B.T`` in place. With ``upper_only`` (A is B on a diagonal tile) only the upper
    triangle of ``acc`` must be correct; the caller mirrors it."""
    torch_blas.accumulate(acc, A, B, alpha, upper_only=upper_only)


def accumulate_diagonal(acc: torch.Tensor, A: torch.Tensor, B: torch.Tensor, alpha: float, *, full: bool) -> None:
    """Per-sample blocks: ``acc[a] += alpha · A[a] B[a]ᵀ`` ([n, C, C]) or its trace ([n])."""
    torch_blas.accumulate_diagonal(acc, A, B, alpha, full=full)
