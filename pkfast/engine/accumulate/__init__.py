"""Accumulate: ``G_tile += α · A Bᵀ`` for per-point Jacobian blocks, on the selected backend.

``A`` is ``[rows, K]`` and ``B`` is ``[cols, K]`` (2-D views of Jacobian panels: rows are samples for the
trace Gram, sample×output pairs for the full block Gram). The accumulator is at least float32.

Backends:
    ``"torch"``   ``addmm_`` (MKL/OpenBLAS on CPU, cuBLAS on CUDA); blocked upper-triangle products on
                  symmetric diagonal tiles. Works everywhere; the only backend for ``precision="ieee"`` on CPU.
    ``"triton"``  the fused Triton kernel (:mod:`pkfast.engine.accumulate.triton_kernel`): CUDA tensors, or CPU
                  tensors under ``TRITON_INTERPRET=1`` (for testing; very slow). Input modes ieee/tf32/bf16.
    ``"auto"``    torch (cuBLAS) for ``precision="ieee"``, which measured 2.6–3.1× faster than the fused kernel on an
                  H200 (docs/gpu.md); the Triton kernel for tf32/bf16 on CUDA. The choice is logged (logger
                  ``pkfast``).
"""

from __future__ import annotations

import logging

import torch

from pkfast.engine.accumulate import torch_blas

__all__ = ["BACKENDS", "PRECISIONS", "BackendUnavailable", "select_backend", "accumulate", "accumulate_diagonal"]

log = logging.getLogger("pkfast")

BACKENDS = ("auto", "torch", "triton")
#: Input precision of the Gram products: exact fp32 ("ieee"), TF32 tensor cores, or bf16 inputs with fp32
#: accumulation. Only "ieee" is available on the torch backend.
PRECISIONS = ("ieee", "tf32", "bf16")


class BackendUnavailable(RuntimeError):
    """An explicitly requested backend cannot run on this machine or device (a user's choice, not a bug)."""


def select_backend(requested: str, device: torch.device, *, precision: str = "ieee", fn: str = "pkfast") -> str:
    """Resolve ``backend="auto"`` for ``device``; an explicit backend that cannot run raises."""
    from pkfast.engine.accumulate.triton_launch import triton_status

    if requested == "torch":
        if precision != "ieee":
            raise ValueError(f"{fn}: precision={precision!r} needs backend='triton'; the torch backend computes in ieee fp32/fp64")
        return "torch"
    if requested == "triton":
        ok, why = triton_status()
        if not ok:
            raise BackendUnavailable(f"{fn}: backend='triton' cannot run here: {why}. Use backend='torch' or "
                                     "'auto'.")
        if device.type != "cuda" and "interpreter" not in why:
            raise BackendUnavailable(f"{fn}: backend='triton' needs the model on a CUDA device; found it on {device}. "
                                     "Move the model to CUDA or use backend='torch' or 'auto'.")
        return "triton"
    # auto
    if device.type != "cuda":
        if precision != "ieee":
            raise ValueError(f"{fn}: precision={precision!r} needs the Triton backend on a CUDA device; the model is on {device}")
        log.info("pkfast: backend='auto' uses torch: the model is on %s (Triton runs on CUDA devices)", device)
        return "torch"
    if precision == "ieee":
        # Measured on an H200 (benchmarks/gpu_check.py, docs/gpu.md): cuBLAS fp32 ran 2.6–3.1× faster than the
        # fused kernel in ieee mode, the upper-triangle launch included.
        log.info("pkfast: backend='auto' uses torch (cuBLAS) for precision='ieee' on %s; the fused Triton kernel "
                 "serves tf32/bf16 (or ask for backend='triton')", device)
        return "torch"
    ok, why = triton_status()
    if ok:
        return "triton"
    raise RuntimeError(f"{fn}: precision={precision!r} needs the Triton backend, which cannot run here: {why}")


def accumulate(acc: torch.Tensor, A: torch.Tensor, B: torch.Tensor, alpha: float, *, backend: str,
               upper_only: bool = False, precision: str = "ieee") -> None:
    """``acc += alpha · A @ B.T`` in place. With ``upper_only`` (A is B on a diagonal tile) only the upper
    triangle of ``acc`` must be correct; the caller mirrors it."""
    if backend == "triton":
        from pkfast.engine.accumulate.triton_launch import accumulate_triton

        accumulate_triton(acc, A, B, float(alpha), upper=upper_only, input_precision=precision)
    else:
        torch_blas.accumulate(acc, A, B, alpha, upper_only=upper_only)


def accumulate_diagonal(acc: torch.Tensor, A: torch.Tensor, B: torch.Tensor, alpha: float, *, full: bool) -> None:
    """Per-sample blocks: ``acc[a] += alpha · A[a] B[a]ᵀ`` ([n, C, C]) or its trace ([n]). Memory-bound: torch."""
    torch_blas.accumulate_diagonal(acc, A, B, alpha, full=full)
