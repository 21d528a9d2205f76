"""layers.conv: ``nn.Conv1d`` / ``nn.Conv2d`` — a Linear over the unfolded input patches, one position per
output location (groups split the weight block-diagonally)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from pkfast.layers.base import AffineRule, Factors, Layer

__all__ = ["ConvRule"]


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
        x = captured.reshape(-1, m.in_channels, *sp_in).to(dtype)  # [n·B′, Cin, *spatial]
        nb = x.shape[0]
        pad = m.padding
        if isinstance(pad, str) or m.padding_mode != "zeros":
            mode = "constant" if m.padding_mode == "zeros" else m.padding_mode
            x = F.pad(x, m._reversed_padding_repeated_twice, mode=mode)
            pad = (0,) * nd
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
