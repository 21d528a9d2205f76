"""layers.norm: the affine parameters of normalisation layers — y = γ ⊙ x̂ + β elementwise over E features.

With x̂_s the normalised input at position s and δ_s = ∂f_c/∂y_s, the per-sample gradients are
∂f_c/∂γ = Σ_s δ_s ⊙ x̂_s and ∂f_c/∂β = Σ_s δ_s (docs/math.md §5.4): 2·E values formed from the factors
(x̂, Δ) at the cost of one product and one sum per position, instead of a ``jacrev`` pass per output. The
elementwise form is not a Kronecker product, so the rule has only the materialised route (``factorizable``
is False): the gradient is tiny next to its factors.

Supported: ``nn.LayerNorm``, ``nn.GroupNorm``, ``nn.BatchNorm1d/2d/3d`` in eval mode with running statistics,
``nn.RMSNorm``. x̂ is computed inside the forward hook from the call's input (with the buffers of the point
being evaluated: recorded running statistics are honoured). A user's own RMSNorm-style module registers
:class:`NormRule` with its normalisation (see :func:`pkfast.layers.register`).
"""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from pkfast.layers.base import Factors, Layer, LayerRule

__all__ = ["NormRule", "layer_norm", "group_norm", "batch_norm", "rms_norm"]

Normalize = Callable[[nn.Module, torch.Tensor], torch.Tensor]


def layer_norm(m: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return F.layer_norm(x, m.normalized_shape, None, None, m.eps)


def rms_norm(m: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return F.rms_norm(x, m.normalized_shape, None, m.eps)


def group_norm(m: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return F.group_norm(x, m.num_groups, None, None, m.eps)


def batch_norm(m: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return F.batch_norm(x, m.running_mean, m.running_var, None, None, False, 0.0, m.eps)


class NormRule(LayerRule):
    """``y = weight ⊙ normalize(x) + bias``, the affine acting on the last dimensions
    (``channel_dim=None``, the shape of ``weight``: LayerNorm, RMSNorm) or on dimension 1
    (``channel_dim=1``: GroupNorm, BatchNorm).

    Args:
        normalize: ``normalize(module, x) → x̂`` for the call's input (no affine).
        channel_dim: None (the weight covers the trailing dimensions) or 1 (one weight per channel).
    """

    name = "norm"
    factorizable = False

    def __init__(self, normalize: Normalize, channel_dim: int | None = None) -> None:
        self.normalize = normalize
        self.channel_dim = channel_dim

    def unsupported(self, module: nn.Module) -> str:
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and (module.training or module.running_mean is None):
            return "batch statistics (train mode or track_running_stats=False) mix the samples of a batch"
        return ""

    def groups(self, module: nn.Module) -> int:
        return 1

    def fans(self, module: nn.Module) -> tuple[int, int]:
        E = module.weight.numel()
        return E, E

    def positions(self, module: nn.Module, shape_in: torch.Size, shape_out: torch.Size) -> int:
        return math.prod(shape_out) // module.weight.numel()

    def capture(self, module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        return self.normalize(module, args[0])

    def unfold(self, layer: Layer, captured: torch.Tensor, grad: torch.Tensor, n: int, C: int,
               dtype: torch.dtype) -> Factors:
        E = layer.fan_in
        if self.channel_dim is None:
            return captured.reshape(n, -1, E).to(dtype), grad.reshape(n, C, -1, E)
        # the call's input is [n, B′, E, *spatial] (n samples, each a batch of B′), its output gradient [n, C, …]
        x = captured.reshape(n, -1, E, math.prod(captured.shape[3:]))    # [n, B′, E, L]
        g = grad.reshape(n, C, -1, E, math.prod(grad.shape[4:]))         # [n, C, B′, E, L]
        return x.transpose(2, 3).reshape(n, -1, E).to(dtype), g.transpose(3, 4).reshape(n, C, -1, E)

    def a_columns(self, layer: Layer) -> int:
        return layer.fan_in

    def units(self, layer: Layer) -> tuple[int, int]:
        return layer.fan_in, 2 if layer.bias else 1  # per feature: (γ, β)

    def gradient_slice(self, layer: Layer, nodes: list, g: int, u0: int, u1: int, out: torch.Tensor,
                       beta: float = 0.0) -> torch.Tensor:
        if beta != 0.0:
            if beta != 1.0:
                out.mul_(beta)
            nodes = [(None, None)] + list(nodes)  # the kept β·out plays the first node
        for qi, (om, feats) in enumerate(nodes):
            if feats is None:
                continue
            A, D = feats[layer.name][g]
            Du = D[..., u0:u1]                                            # [n, C, S, U]
            gw = (Du * A[:, None, :, u0:u1]).sum(2)  # 3–9× faster than the einsum on CPU (it copies to batch)
            parts = (gw, Du.sum(2)) if layer.bias else (gw,)
            for w, part in enumerate(parts):
                if qi == 0:
                    torch.mul(part, om, out=out[..., w])
                else:
                    out[..., w].add_(part, alpha=om)
        return out

    def gradient_layout(self, layer: Layer, grads: dict[str, torch.Tensor | None]) -> torch.Tensor:
        m = layer.module
        W = grads.get("weight")
        cols = [(torch.zeros_like(m.weight) if W is None else W).reshape(-1)]
        if layer.bias:
            b = grads.get("bias")
            cols.append((torch.zeros_like(m.bias) if b is None else b).reshape(-1))
        return torch.stack(cols, dim=1).reshape(-1)

