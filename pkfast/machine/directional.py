"""directional: the directional derivative J(p) v of a function of the flat weights, on every model the kernel
machine accepts — the certificate's and the quadrature check's linearisation of a step.

Forward-mode AD (``torch.func.jvp``) is the direct route, but PyTorch's fused attention kernels have no forward
derivative (``aten::_native_multi_head_attention``, ``aten::_transformer_encoder_layer_fwd``,
``aten::_scaled_dot_product_flash_attention_for_cpu``) and the flash kernels' backward has no derivative either.
So :class:`Directional` tries, in order, and keeps the first route that works for the model:

- ``"forward"``: ``torch.func.jvp``;
- ``"math"``: the same under the math attention path (the fused fast path of ``nn.MultiheadAttention`` and
  ``nn.TransformerEncoderLayer`` off, ``scaled_dot_product_attention`` on its composite MATH backend, whose
  operations all have forward derivatives) — the same function, differing from the fused kernels by rounding;
- ``"reverse"``: reverse over reverse under the math path, J v = ∂/∂u ⟨Jᵀu, v⟩ (the vector-Jacobian product is
  linear in u, so its vjp at u = 0 along v is J v exactly), for operations with a backward but no forward
  derivative (custom autograd Functions without ``jvp``).
"""

from __future__ import annotations

import contextlib
from typing import Callable

import torch
from torch.func import jvp, vjp

from pkfast.engine.per_sample import mha_fastpath_off

__all__ = ["Directional", "ROUTES", "math_attention"]

#: The routes, in the order they are tried.
ROUTES = ("forward", "math", "reverse")


@contextlib.contextmanager
def math_attention():
    """Attention on its composite path: the fused MHA/transformer fast path off and SDPA on the MATH backend
    (each restored on exit).

    Example:
        >>> import torch
        >>> from pkfast.machine.directional import math_attention
        >>> with math_attention():
        ...     torch.backends.mha.get_fastpath_enabled()
        False
    """
    with contextlib.ExitStack() as stack:
        stack.enter_context(mha_fastpath_off())
        try:
            from torch.nn.attention import SDPBackend, sdpa_kernel
        except ImportError:  # pragma: no cover - older torch: no backend selection, the fast path switch suffices
            pass
        else:
            stack.enter_context(sdpa_kernel(SDPBackend.MATH))
        yield


def _reverse_over_reverse(f: Callable, p: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    out, pull = vjp(f, p)
    _, push = vjp(lambda u: pull(u)[0], torch.zeros_like(out))
    return push(v)[0]


class Directional:
    """``J(p) v`` for ``f: [P] → tensor``, by the first route of :data:`ROUTES` that works for the model (kept
    for later calls); ``route`` forces one.

    Example:
        >>> import torch
        >>> from pkfast.machine.directional import Directional
        >>> f = lambda p: torch.stack([p[0] * p[1], p[1].sin()])
        >>> p, v = torch.tensor([1.0, 2.0], dtype=torch.float64), torch.tensor([1.0, 0.5], dtype=torch.float64)
        >>> torch.allclose(Directional()(f, p, v), Directional(route="reverse")(f, p, v))
        True
    """

    def __init__(self, route: str | None = None) -> None:
        if route is not None and route not in ROUTES:
            raise ValueError(f"pkfast: unknown differentiation route {route!r}; expected one of {ROUTES}")
        self.route = route

    def __call__(self, f: Callable, p: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        if self.route is not None:
            return self._by(self.route, f, p, v)
        failed = []
        for route in ROUTES:
            try:
                out = self._by(route, f, p, v)
            except (NotImplementedError, RuntimeError) as e:  # an operation without this derivative
                failed.append((route, e))
                continue
            self.route = route
            return out
        said = "; ".join(f"{r}: {type(e).__name__}: {str(e).splitlines()[0][:200]}" for r, e in failed)
        raise RuntimeError(
            f"pkfast: the model cannot be differentiated along a step by forward AD, by forward AD on the math "
            f"attention path, or by double backward ({said}); expected a model whose operations have forward or "
            "double-backward derivatives. Replace the operation named above by a differentiable composite one"
        ) from failed[-1][1]

    @staticmethod
    def _by(route: str, f: Callable, p: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        if route == "forward":
            return jvp(f, (p,), (v,))[1]
        with math_attention():
            if route == "math":
                return jvp(f, (p,), (v,))[1]
            return _reverse_over_reverse(f, p, v)
