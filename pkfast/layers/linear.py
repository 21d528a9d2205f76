"""layers.linear: ``nn.Linear`` — y = W a + b over the last dimension, each leading position a position s."""

from __future__ import annotations

import math

import torch
from torch import nn

from pkfast.layers.base import AffineRule, Factors, Layer

__all__ = ["LinearRule"]


class LinearRule(AffineRule):
    """``nn.Linear`` (also applied over extra leading dimensions, e.g. a sequence: every leading index is a
    position). A module computing ``x @ W + b`` with its weight stored ``[in, out]`` (e.g. Hugging Face's
    ``Conv1D``) is the same rule with :meth:`fans` and :meth:`weight_matrix` transposed."""

    name = "linear"

    def fans(self, module: nn.Module) -> tuple[int, int]:
        return module.in_features, module.out_features

    def groups(self, module: nn.Module) -> int:
        return 1

    def positions(self, module: nn.Module, shape_in: torch.Size, shape_out: torch.Size) -> int:
        return math.prod(shape_out[:-1])  # the batch-of-one axis and any leading dims

    def unfold(self, layer: Layer, captured: torch.Tensor, grad: torch.Tensor, n: int, C: int,
               dtype: torch.dtype) -> Factors:
        return captured.reshape(n, -1, layer.fan_in).to(dtype), grad.reshape(n, C, -1, layer.fan_out)
