"""layers.hf: rules for module types of optional libraries, registered when such a module is first met (so
pkfast never imports those libraries): Hugging Face ``transformers``' ``Conv1D`` (GPT-2, GPT, …) — a Linear that
stores its weight transposed, ``y = x @ W + b`` with ``W`` of shape ``[in, out]`` — and timm's ``LayerNorm``,
which computes ``F.layer_norm`` like ``nn.LayerNorm`` (with an optional fused kernel), and ``LayerNorm2d``, the
same over the channels of an NCHW tensor."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from pkfast.layers.base import Layer
from pkfast.layers.linear import LinearRule
from pkfast.layers.norm import NormRule, layer_norm

__all__ = ["TransposedLinearRule", "layer_norm_2d", "LAZY"]


class TransposedLinearRule(LinearRule):
    """``y = x @ W + b`` with ``W`` stored ``[in, out]``: :class:`LinearRule` with the fans and the weight
    matrix transposed."""

    name = "linear"

    def fans(self, module: nn.Module) -> tuple[int, int]:
        return module.weight.shape[0], module.weight.shape[1]

    def weight_matrix(self, layer: Layer, W: torch.Tensor) -> torch.Tensor:
        return W.T


def layer_norm_2d(m: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """timm's ``LayerNorm2d`` without its affine: layer norm over the channels (dimension 1) of NCHW."""
    return F.layer_norm(x.permute(0, 2, 3, 1), m.normalized_shape, None, None, m.eps).permute(0, 3, 1, 2)


#: rules for module types of optional libraries, by (defining module, class name): :func:`pkfast.layers.rule_for`
#: registers one when a module of that type is first met
LAZY = {("transformers.pytorch_utils", "Conv1D"): TransposedLinearRule(),
        ("timm.layers.norm", "LayerNorm"): NormRule(layer_norm),
        ("timm.layers.norm", "LayerNorm2d"): NormRule(layer_norm_2d, channel_dim=1)}
