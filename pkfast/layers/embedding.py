"""layers.embedding: ``nn.Embedding`` — a Linear on one-hot tokens: a·a′ = 1[same token], and the per-sample
gradient is Δ scattered into the rows of the tokens that occur (``padding_idx`` rows get none)."""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch import nn

from pkfast.layers.base import Factors, Layer, LayerRule

__all__ = ["EmbeddingRule"]


class EmbeddingRule(LayerRule):
    """``nn.Embedding`` without ``max_norm`` / ``scale_grad_by_freq`` (those change the lookup's gradient).
    A holds the token ids ``[n, S]``; the gradient's units are vocabulary rows, its width the dimension."""

    name = "embedding"

    def unsupported(self, module: nn.Module) -> str:
        if module.max_norm is not None or module.scale_grad_by_freq:
            return "max_norm / scale_grad_by_freq change the lookup's gradient"
        return ""

    def groups(self, module: nn.Module) -> int:
        return 1

    def fans(self, module: nn.Module) -> tuple[int, int]:
        return module.num_embeddings, module.embedding_dim

    def positions(self, module: nn.Module, shape_in: torch.Size, shape_out: torch.Size) -> int:
        return math.prod(shape_in)

    def unfold(self, layer: Layer, captured: torch.Tensor, grad: torch.Tensor, n: int, C: int,
               dtype: torch.dtype) -> Factors:
        return captured.reshape(n, -1), grad.reshape(n, C, -1, layer.fan_out)

    def split(self, layer: Layer, A: torch.Tensor, D: torch.Tensor) -> list[Factors]:
        pad = layer.module.padding_idx
        if pad is not None:
            D = D.masked_fill((A == pad)[:, None, :, None], 0.0)
        return [(A, D)]

    def a_columns(self, layer: Layer) -> int:
        return 1  # one token id per position

    def units(self, layer: Layer) -> tuple[int, int]:
        return layer.fan_in, layer.fan_out

    def gradient_slice(self, layer: Layer, nodes: list, g: int, u0: int, u1: int, out: torch.Tensor,
                       beta: float = 0.0) -> torch.Tensor:
        """Vocabulary rows ``u0:u1``, scattered from the tokens that fall in them."""
        if beta == 0.0:
            out.zero_()
        elif beta != 1.0:
            out.mul_(beta)
        for om, feats in nodes:
            A, D = feats[layer.name][g]
            n, C, S, _ = D.shape
            inside = (A >= u0) & (A < u1)
            idx = torch.where(inside, A - u0, torch.zeros_like(A))
            src = D * (inside.to(D.dtype) * om)[:, None, :, None]
            out.scatter_add_(2, idx[:, None, :, None].expand(n, C, S, D.shape[3]), src)
        return out

    def gradient_layout(self, layer: Layer, grads: dict[str, torch.Tensor | None]) -> torch.Tensor:
        W = grads.get("weight")
        return (torch.zeros_like(layer.module.weight) if W is None else W).reshape(-1)

    def input_gram(self, Ar: torch.Tensor, Ac: torch.Tensor, mm: Callable, dtype: torch.dtype) -> torch.Tensor:
        return (Ar[:, :, None, None] == Ac[None, None, :, :]).to(dtype)

    def input_gram_diagonal(self, A: torch.Tensor, A2: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        return (A[:, :, None] == A2[:, None, :]).to(dtype)

    def project_input(self, A: torch.Tensor, R: torch.Tensor) -> torch.Tensor:
        return R[A]  # a one-hot row times R is R's row of the token

    def costs(self, layer: Layer, C: int, full: bool) -> tuple[float | None, float, float]:
        S, O = layer.positions, layer.fan_out
        cc = C * C if full else C
        fact_pair = S * S + 2.0 * S * S * cc * O + S * S * cc  # token comparisons, the Δ-Gram, the product
        return fact_pair, 2.0 * cc * layer.fan_in * O, 2.0 * C * S * O
