"""Launcher for the Triton accumulation kernel: checks, the launch grid, and the availability probe.

``triton`` is imported lazily (inside the functions), so this module imports without it and
:func:`triton_status` can say why the path is unavailable.
"""

from __future__ import annotations

import contextlib
import functools
import numbers
import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

__all__ = ["INPUT_PRECISIONS", "triton_status", "accumulate_triton"]

_FN = "pkfast.accumulate_triton"

#: Accepted ``input_precision`` values (the kernel's ``INPUT_MODE``).
INPUT_PRECISIONS = ("ieee", "tf32", "bf16")

_FLOATS = (torch.float32, torch.float64)


def _interpret_env() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _kernel_interpreted(kernel_module: Any) -> bool:
    """Whether the kernel was built for the interpreter. ``@triton.jit`` decides this when the kernel module
    is imported, from ``TRITON_INTERPRET`` at that moment, so this can differ from the current environment."""
    fn = kernel_module.pk_accumulate_kernel
    try:
        from triton.runtime.interpreter import InterpretedFunction
    except ImportError:  # pragma: no cover - layout of other Triton versions
        return _interpret_env()
    return isinstance(fn, InterpretedFunction)


def triton_status() -> tuple[bool, str]:
    """Whether the Triton path can run here, and why (or why not).

    It can when ``triton`` imports and either a CUDA device is available or ``TRITON_INTERPRET=1`` (the CPU
    interpreter, which must be set before ``triton`` is first imported).
    """
    try:
        import triton
    except Exception as e:  # ImportError, or a broken install raising something else
        return False, f"triton is not importable ({type(e).__name__}: {e}); install triton to use this backend"
    try:
        import pkfast.engine.accumulate.triton_kernel as triton_kernel
    except Exception as e:
        return False, f"the pkfast Triton kernel failed to import ({type(e).__name__}: {e})"
    if _kernel_interpreted(triton_kernel):
        broken = _interpreter_loop_failure()
        if broken:
            return False, (f"this Triton's interpreter (triton {triton.__version__}, numpy {np.__version__}) cannot "
                           f"run the kernel's loops ({broken}); triton 3.9 can")
        return True, "Triton interpreter (TRITON_INTERPRET=1): kernels run on CPU tensors, much slower than torch"
    if _interpret_env():
        return False, ("TRITON_INTERPRET=1 was set after triton compiled the pkfast kernel; set it before "
                       "triton is first imported")
    if not torch.cuda.is_available():
        return False, ("no CUDA device is available (torch.cuda.is_available() is False) and TRITON_INTERPRET "
                       "is not '1'")
    return True, f"CUDA device {torch.cuda.get_device_name()}"


@functools.lru_cache(maxsize=1)
def _interpreter_loop_failure() -> str:
    """'' when the interpreter runs a loop over a runtime int (the probe kernel), else the error it raised."""
    import pkfast.engine.accumulate.triton_kernel as tk

    out = torch.zeros(1, dtype=torch.int32)
    try:
        tk.loop_probe_kernel[(1,)](out, 3)
    except Exception as e:  # the interpreter wraps the TypeError in its own InterpreterError
        cause = e.__cause__ or e
        return f"{type(cause).__name__}: {cause}"
    return "" if int(out[0]) == 3 else f"a loop of 3 counted {int(out[0])}"


def _same_tensor(A: torch.Tensor, B: torch.Tensor) -> bool:
    """``A`` and ``B`` view the same elements the same way (``x.view(...)`` twice gives two objects)."""
    return A is B or (A.device == B.device and A.dtype == B.dtype and A.shape == B.shape
                      and A.stride() == B.stride() and A.data_ptr() == B.data_ptr())


def _alpha_tensor(alpha: Any, S: int, stacked: bool, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """alpha as a contiguous [S] tensor of the accumulation dtype on ``device``, checked."""
    expected = "a real number" + (" or a sequence/tensor of S numbers" if stacked else "")
    if isinstance(alpha, np.ndarray):
        if not (np.issubdtype(alpha.dtype, np.floating) or np.issubdtype(alpha.dtype, np.integer)):
            raise TypeError(f"{_FN}: alpha must be {expected}; found a numpy array of dtype {alpha.dtype}")
        alpha = torch.from_numpy(np.ascontiguousarray(alpha))
    if isinstance(alpha, torch.Tensor):
        if alpha.is_complex() or alpha.dtype == torch.bool:
            raise TypeError(f"{_FN}: alpha must be a real tensor; found dtype {alpha.dtype}")
        t = alpha.detach().reshape(-1).to(device=device, dtype=torch.float64)
    elif isinstance(alpha, (numbers.Real, Sequence)) and not isinstance(alpha, (bool, str, bytes)):
        values = [alpha] if isinstance(alpha, numbers.Real) else list(alpha)
        for v in values:
            if isinstance(v, bool) or not isinstance(v, numbers.Real):
                raise TypeError(f"{_FN}: alpha must contain real numbers; found an element of type "
                                f"{type(v).__name__}")
        t = torch.tensor([float(v) for v in values], dtype=torch.float64)
    else:
        raise TypeError(f"{_FN}: alpha must be {expected}; found {type(alpha).__name__}")
    if t.numel() != S:
        what = f"a sequence of S={S} numbers (one per step of A's first axis)" if stacked else "a single number"
        raise ValueError(f"{_FN}: alpha must be {what}; found {t.numel()} value(s)")
    tc = t.to(dtype)
    ok = torch.isfinite(tc) & (t >= 0)
    if S and not bool(ok.all()):  # one device sync for a device tensor of S values
        raise ValueError(f"{_FN}: alpha must be finite (in {dtype}) and >= 0; found {t[~ok][0].item()!r}")
    return tc.to(device=device).contiguous()


def accumulate_triton(G: torch.Tensor, A: torch.Tensor, B: torch.Tensor, alpha: Any, *, upper: bool = False,
                      input_precision: str = "ieee") -> torch.Tensor:
    """``G += Σ_s alpha[s] · A[s] @ B[s]ᵀ`` in one Triton launch; returns ``G`` (modified in place).

    Args:
        G: ``[M, N]`` float32 or float64 accumulator, any strides. Must be float64 for float64 inputs.
        A: ``[M, K]`` or a stack ``[S, M, K]``; float32 or float64; any strides (transposed views need no copy).
        B: ``[N, K]`` or ``[S, N, K]`` (as ``A``: same dtype, device and number of dimensions).
        alpha: for 2-D inputs a number; for stacks a sequence or tensor of ``S`` numbers. Finite and ≥ 0.
        upper: ``G`` is a diagonal tile of a symmetric Gram and ``A`` is ``B`` (same tensor): only blocks on or
            above the block diagonal are computed and written. Elements below the diagonal inside diagonal
            blocks are written too; everything further below is left untouched. Requires ``M == N``.
        input_precision: ``"ieee"`` (exact fp32 / fp64 products), ``"tf32"`` (tensor-core tf32) or ``"bf16"``
            (inputs rounded to bfloat16 in registers); both of the latter need float32 inputs and
            accumulate in float32.

    Raises:
        TypeError: non-tensors, unsupported or mismatched dtypes, a non-number alpha.
        ValueError: shapes, devices, alpha's length or values, ``upper`` without ``A is B``, an unknown
            ``input_precision``, or a non-CUDA device without ``TRITON_INTERPRET=1``.
        RuntimeError: the Triton path cannot run here (see :func:`triton_status`).
    """
    _check_kinds(G, A, B, upper, input_precision)
    _check_dtypes(G, A, B, input_precision)
    if not (G.device == A.device == B.device):
        raise ValueError(f"{_FN}: G, A and B must be on the same device; found G on {G.device}, A on {A.device}, "
                         f"B on {B.device}")
    A3, B3 = _stacks(G, A, B, upper)
    alpha_t = _alpha_tensor(alpha, A3.shape[0], A.ndim == 3, A.dtype, G.device)
    if G.device.type != "cuda" and not _interpret_env():
        raise ValueError(f"{_FN}: expected CUDA tensors (or TRITON_INTERPRET=1 set before importing triton, to run "
                         f"CPU tensors under the interpreter); found {G.device}")
    # availability (after the argument checks, so bad arguments get their own message everywhere)
    ok, why = triton_status()
    if not ok:
        raise RuntimeError(f"{_FN}: the Triton backend cannot run here: {why}")
    if A3.numel() == 0 or B3.numel() == 0:  # S, M, N or K is 0: nothing to add
        return G
    _launch(G, A3, B3, alpha_t, upper, input_precision)
    return G


def _check_kinds(G: Any, A: Any, B: Any, upper: Any, input_precision: Any) -> None:
    """The arguments are tensors, a known ``input_precision`` and a boolean ``upper``."""
    for name, t in (("G", G), ("A", A), ("B", B)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{_FN}: {name} must be a torch.Tensor; found {type(t).__name__}")
    if not isinstance(input_precision, str) or input_precision not in INPUT_PRECISIONS:
        raise ValueError(f"{_FN}: unknown input_precision={input_precision!r}; expected one of "
                         f"{', '.join(map(repr, INPUT_PRECISIONS))}")
    if not isinstance(upper, bool):
        raise TypeError(f"{_FN}: upper must be True or False; found {upper!r}")


def _check_dtypes(G: torch.Tensor, A: torch.Tensor, B: torch.Tensor, input_precision: str) -> None:
    """A and B share a float dtype, G accumulates in at least it, and tf32/bf16 come with float32 inputs."""
    if A.dtype not in _FLOATS:
        raise TypeError(f"{_FN}: A must be float32 or float64; found {A.dtype}")
    if B.dtype != A.dtype:
        raise TypeError(f"{_FN}: A and B must have the same dtype; found A {A.dtype} and B {B.dtype}")
    if G.dtype not in _FLOATS:
        raise TypeError(f"{_FN}: G must be float32 or float64; found {G.dtype}")
    if A.dtype == torch.float64 and G.dtype != torch.float64:
        raise TypeError(f"{_FN}: float64 inputs accumulate in float64, so G must be float64; found G {G.dtype}")
    if input_precision != "ieee" and A.dtype != torch.float32:
        raise TypeError(f"{_FN}: input_precision={input_precision!r} requires float32 inputs; found {A.dtype} "
                        f"(use input_precision='ieee' for float64)")


def _stacks(G: torch.Tensor, A: torch.Tensor, B: torch.Tensor, upper: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """A and B as stacks ``[S, M, K]`` and ``[S, N, K]`` (a 2-D input is one step), their shapes checked against
    each other, ``G`` and ``upper``."""
    if A.ndim not in (2, 3) or B.ndim != A.ndim:
        raise ValueError(f"{_FN}: expected A [M, K] and B [N, K], or stacks A [S, M, K] and B [S, N, K]; "
                         f"found A {tuple(A.shape)} and B {tuple(B.shape)}")
    A3 = A if A.ndim == 3 else A.unsqueeze(0)
    B3 = B if B.ndim == 3 else B.unsqueeze(0)
    S, M, K = A3.shape
    if B3.shape[0] != S:
        raise ValueError(f"{_FN}: A and B must stack the same number of steps S; found A {tuple(A.shape)} "
                         f"(S={S}) and B {tuple(B.shape)} (S={B3.shape[0]})")
    N = B3.shape[1]
    if B3.shape[2] != K:
        raise ValueError(f"{_FN}: A and B must share the contraction size K (last axis); found A {tuple(A.shape)} "
                         f"(K={K}) and B {tuple(B.shape)} (K={B3.shape[2]})")
    if G.ndim != 2 or tuple(G.shape) != (M, N):
        raise ValueError(f"{_FN}: expected G of shape (M, N) = ({M}, {N}) for A {tuple(A.shape)} and "
                         f"B {tuple(B.shape)}; found G {tuple(G.shape)}")
    if any(st == 0 and n > 1 for st, n in zip(G.stride(), G.shape)):
        raise ValueError(f"{_FN}: G has a zero stride (stride {G.stride()}, shape {tuple(G.shape)}), so several "
                         f"elements share memory; expected a tensor that owns each element (not an expanded view)")
    if upper:
        if M != N:
            raise ValueError(f"{_FN}: upper=True needs a square diagonal tile (M == N); found M={M}, N={N}")
        if not _same_tensor(A, B):
            raise ValueError(f"{_FN}: upper=True needs A and B to be the same tensor (a diagonal tile of "
                             f"A·Aᵀ); found different tensors")
    return A3, B3


def _launch(G: torch.Tensor, A3: torch.Tensor, B3: torch.Tensor, alpha_t: torch.Tensor, upper: bool,
            input_precision: str) -> None:
    """One launch of the autotuned kernel over the tiles of G (those on or above the diagonal with ``upper``)."""
    import triton

    import pkfast.engine.accumulate.triton_kernel as tk

    S, M, K = A3.shape
    N = B3.shape[1]

    def grid(META: dict) -> tuple[int]:
        if upper:
            t = triton.cdiv(M, META["BLOCK_M"])
            return (t * (t + 1) // 2,)
        return (triton.cdiv(M, META["BLOCK_M"]) * triton.cdiv(N, META["BLOCK_N"]),)

    ctx = torch.cuda.device(G.device) if G.device.type == "cuda" else contextlib.nullcontext()
    with ctx, torch.no_grad():
        tk.pk_accumulate_kernel_autotuned[grid](
            G, A3, B3, alpha_t,
            S, M, N, K,
            A3.stride(0), A3.stride(1), A3.stride(2),
            B3.stride(0), B3.stride(1), B3.stride(2),
            G.stride(0), G.stride(1),
            UPPER=upper, INPUT_MODE=input_precision, EMULATE=_kernel_interpreted(tk),
        )
