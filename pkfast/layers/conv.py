"""layers.conv: ``nn.Conv1d`` / ``nn.Conv2d`` — a Linear over the unfolded input patches, one position per
output location (groups split the weight block-diagonally).

The per-sample gradient of a layer held in the panel is formed one of two ways (:meth:`ConvRule.formation`):
from the patches (``F.unfold`` then one batched GEMM Σ_s δ_s a_sᵀ), or without them, by the convolution's own
weight-gradient kernel with the samples folded into the groups (Rochette et al. 2019): input
``[B′, n·C_in, *spatial]``, output gradient ``[B′, n·g·C·O_g, *spatial′]``, ``groups = n·g``, whose weight
gradient ``[n·g·C·O_g, C_in/g, *kernel]`` is every sample's gradient at once. Both do the same multiply-adds;
the patches cost writing and reading S × I values per sample and group besides (when the conv is used:
:meth:`ConvRule.formation`)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from pkfast.layers.base import AffineRule, Factors, Layer

__all__ = ["ConvRule"]


def _padded(m: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, ...]]:
    """``x`` with the padding applied explicitly where the convolution cannot take it as a number (``"same"``, a
    non-zero padding mode), and the numeric padding still to apply."""
    nd = len(m.kernel_size)
    if isinstance(m.padding, str) or m.padding_mode != "zeros":
        mode = "constant" if m.padding_mode == "zeros" else m.padding_mode
        return F.pad(x, m._reversed_padding_repeated_twice, mode=mode), (0,) * nd
    return x, tuple(m.padding)


class ConvRule(AffineRule):
    """``nn.Conv1d`` and ``nn.Conv2d`` with any stride, padding (also ``"same"`` and non-zero padding modes),
    dilation and groups: A holds the patches (``F.unfold``), I = C_in/groups · kernel size."""

    name = "conv"

    def fans(self, module: nn.Module) -> tuple[int, int]:
        m = module
        return m.in_channels // m.groups * math.prod(m.kernel_size), m.out_channels // m.groups

    def positions(self, module: nn.Module, shape_in: torch.Size, shape_out: torch.Size) -> int:
        return math.prod(shape_out) // module.out_channels  # B′·L: every position of every image in the call

    def unfold(self, layer: Layer, captured: torch.Tensor, grad: torch.Tensor, n: int, C: int,
               dtype: torch.dtype) -> Factors:
        m = layer.module
        nd = len(m.kernel_size)
        sp_in = captured.shape[-nd:]
        x, pad = _padded(m, captured.reshape(-1, m.in_channels, *sp_in).to(dtype))  # [n·B′, Cin, *spatial]
        nb = x.shape[0]
        if nd == 1:
            x = x.unsqueeze(2)
            ks, dil, st, pad = (1, m.kernel_size[0]), (1, m.dilation[0]), (1, m.stride[0]), (0, pad[0])
        else:
            ks, dil, st = m.kernel_size, m.dilation, m.stride
        cols = F.unfold(x, ks, dilation=dil, padding=pad, stride=st)  # [n·B′, Cin·k, Lpos]
        Lpos = cols.shape[-1]
        A = cols.view(n, nb // n, cols.shape[1], Lpos).transpose(2, 3).reshape(n, -1, cols.shape[1])
        D = grad.reshape(n, C, nb // n, m.out_channels, Lpos).transpose(3, 4).reshape(n, C, -1, m.out_channels)
        return A, D

    # ------------------------------------------------------------------ the gradient without patches
    def formation(self, layer: Layer, C: int) -> str:
        """How :meth:`per_sample_gradient` forms the in-panel gradient: ``"conv"`` (the weight-gradient
        convolution, no patches) when the kernel has more than one tap and one call's positions S exceed the
        gradient's rows C·O per group — the patch matrix [S, I] is then larger than the gradient [C·O, I] it
        yields, and writing and reading it outweighs the batched GEMM's better blocking —, else ``"patches"``
        (im2col + batched GEMM; a 1×1 kernel's patches are its input, nothing to save). A rule stated from
        sizes, not timings (ties go to the patches); benchmarks/conv_grads.py measures both on the ResNet's
        layers: it picks the faster in most of them, and the rest are within ~1.5× either way."""
        per_call = layer.positions // max(1, layer.calls)
        taps = math.prod(layer.module.kernel_size)
        return "conv" if taps > 1 and per_call > C * layer.fan_out else "patches"

    def gradient_note(self, layer: Layer, C: int) -> str:
        return "gradient by weight-grad conv (no patches)" if self.formation(layer, C) == "conv" else ""

    def per_sample_gradient(self, layer: Layer, captured: list[torch.Tensor], grads: list[torch.Tensor], n: int,
                            C: int, dtype: torch.dtype) -> torch.Tensor | None:
        if self.formation(layer, C) != "conv":
            return None
        total = None
        for x, d in zip(captured, grads):
            g = self._conv_gradient(layer, x, d, n, C, dtype)
            total = g if total is None else total.add_(g)
        return total

    def _conv_gradient(self, layer: Layer, captured: torch.Tensor, grad: torch.Tensor, n: int, C: int,
                       dtype: torch.dtype) -> torch.Tensor:
        """One call's ``[n, C, size]`` (groups, then units, then the width of :meth:`units`) by the weight-gradient
        convolution with the batch folded into the groups."""
        m = layer.module
        nd, G, Og = len(m.kernel_size), layer.groups, layer.fan_out
        cin = m.in_channels
        x, pad = _padded(m, captured.reshape(-1, cin, *captured.shape[-nd:]).to(dtype))
        bp, sp, sp_out = x.shape[0] // n, x.shape[2:], grad.shape[-nd:]
        X = x.view(n, bp, cin, *sp).transpose(0, 1).reshape(bp, n * cin, *sp)  # a view when B′ = 1
        D = grad.to(dtype).reshape(n, C, bp, G, Og, *sp_out)
        Dc = D.permute(2, 0, 3, 1, 4, *range(5, 5 + nd)).reshape(bp, n * G * C * Og, *sp_out)  # view if B′ = g = 1
        w = X.new_empty(n * G * C * Og, cin // G, *m.kernel_size)  # only its shape is read
        gw = torch.ops.aten.convolution_backward(
            Dc, X, w, None, list(m.stride), list(pad), list(m.dilation), False, [0] * nd, n * G,
            [False, True, False])[1]
        gw = gw.view(n, G, C, Og, -1).transpose(1, 2)  # [n, C, G, O_g, I]
        if not layer.bias:
            return gw.reshape(n, C, -1)
        out = gw.new_empty(n, C, G, Og, gw.shape[-1] + 1)
        out[..., :-1] = gw
        out[..., -1] = D.reshape(n, C, bp, G, Og, -1).sum(dim=(2, 5))  # the bias: Σ_s δ_s
        return out.view(n, C, -1)
