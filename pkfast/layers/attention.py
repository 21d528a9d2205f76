"""layers.attention: ``nn.MultiheadAttention`` — its packed q/k/v input projection as one affine layer.

``nn.MultiheadAttention`` applies ``in_proj_weight`` ([3E, E]) and ``out_proj`` inside
``F.multi_head_attention_forward``, without calling a module, so no hook sees them. While pkfast captures
factors, this rule swaps the module's forward (:meth:`MultiheadAttentionRule.patch`) for an equivalent one
that

- computes the input projection by one call of a helper module (:meth:`MultiheadAttentionRule.site`):
  ``y = x W_inᵀ + b_in`` over the positions of the distinct inputs concatenated — the query's, then the key's
  and value's if they are other tensors — so that the layer is a Linear from E to 3E whose factors are the
  inputs and the gradients at ``y``. A cross-attention call also computes the 3E outputs of each input that
  it does not use (the key/value columns of the query's positions, …); their output gradient is zero, so
  the per-sample gradient Σ_s δ_s a_sᵀ is exact (docs/math.md §5.5);
- calls ``out_proj`` as a module, so the ordinary Linear rule covers it;
- computes attention as ``F.multi_head_attention_forward`` does (masks, ``is_causal``, ``need_weights``,
  ``add_zero_attn``, batch-first or not, unbatched inputs).

The engine checks once per model that the patched forward reproduces the model's output, and checks every
rule against autograd, before using it. Not covered (those modules take the Jacobian route, with the reason
in the plan): ``add_bias_kv=True`` and separate q/k/v weights (``kdim``/``vdim`` ≠ ``embed_dim``).
"""

from __future__ import annotations

import contextlib
import functools
import math
import weakref

import torch
import torch.nn.functional as F
from torch import nn

from pkfast.layers.linear import LinearRule

__all__ = ["MultiheadAttentionRule", "attention_forward"]


class InProjection(nn.Module):
    """``x W_inᵀ + b_in`` with its owner's (evaluated) parameters: the hook site of the input projection.
    Holds no parameters and is not a submodule of its owner (a weak reference keeps it from keeping the owner
    alive)."""

    def __init__(self, owner: nn.MultiheadAttention) -> None:
        super().__init__()
        self._owner = weakref.ref(owner)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m = self._owner()
        return F.linear(x, m.in_proj_weight, m.in_proj_bias)


class MultiheadAttentionRule(LinearRule):
    """``nn.MultiheadAttention``'s ``in_proj_weight``/``in_proj_bias`` as a Linear E → 3E at the positions of
    its distinct inputs (see the module docstring)."""

    name = "attention"
    param_names = ("in_proj_weight", "in_proj_bias")

    def __init__(self) -> None:
        self._sites: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

    def unsupported(self, module: nn.Module) -> str:
        if not module._qkv_same_embed_dim:
            return "separate q/k/v projection weights (kdim or vdim differs from embed_dim)"
        if module.bias_k is not None or module.bias_v is not None:
            return "add_bias_kv=True (learned key/value biases appended to the sequence)"
        return ""

    def fans(self, module: nn.Module) -> tuple[int, int]:
        return module.embed_dim, 3 * module.embed_dim

    def site(self, module: nn.Module) -> nn.Module:
        site = self._sites.get(module)
        if site is None:
            site = self._sites[module] = InProjection(module)
        return site

    @contextlib.contextmanager
    def patch(self, module: nn.Module):
        had = "forward" in module.__dict__
        before = module.__dict__.get("forward")
        module.forward = functools.partial(attention_forward, module, self.site(module))
        try:
            yield
        finally:
            if had:
                module.forward = before
            else:
                del module.forward


def _attn_mask_4d(mask: torch.Tensor, B: int, h: int, Lq: int, S: int) -> torch.Tensor:
    if mask.dim() == 2:
        if tuple(mask.shape) != (Lq, S):
            raise RuntimeError(f"The shape of the 2D attn_mask is {tuple(mask.shape)}, but should be {(Lq, S)}.")
        return mask[None, None]
    if mask.dim() == 3:
        if tuple(mask.shape) != (B * h, Lq, S):
            raise RuntimeError(f"The shape of the 3D attn_mask is {tuple(mask.shape)}, but should be {(B * h, Lq, S)}.")
        return mask.view(B, h, Lq, S)
    raise RuntimeError(f"attn_mask's dimension {mask.dim()} is not supported")


def attention_forward(m: nn.MultiheadAttention, site: nn.Module, query: torch.Tensor, key: torch.Tensor,
                      value: torch.Tensor, key_padding_mask: torch.Tensor | None = None, need_weights: bool = True,
                      attn_mask: torch.Tensor | None = None, average_attn_weights: bool = True,
                      is_causal: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``m(query, key, value, …)`` (``nn.MultiheadAttention.forward`` without its fused fast path), with the
    input projection computed by ``site`` and the output projection by calling ``m.out_proj``."""
    batched = query.dim() == 3
    key_padding_mask = F._canonical_mask(mask=key_padding_mask, mask_name="key_padding_mask",
                                         other_type=F._none_or_dtype(attn_mask), other_name="attn_mask",
                                         target_type=query.dtype)
    attn_mask = F._canonical_mask(mask=attn_mask, mask_name="attn_mask", other_type=None, other_name="",
                                  target_type=query.dtype, check_other=False)
    # batch-first [B, L, E] inputs, keeping which of them are the same tensor
    same_qk, same_kv, same_qv = query is key, key is value, query is value
    if not batched:
        query, key, value = query.unsqueeze(0), key.unsqueeze(0), value.unsqueeze(0)
        if key_padding_mask is not None:
            key_padding_mask = key_padding_mask.unsqueeze(0)
    elif not m.batch_first:
        query, key, value = query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1)
    if key.shape != value.shape:
        raise AssertionError(f"key shape {key.shape} does not match value shape {value.shape}")
    B, Lq, E = query.shape
    S, h = key.shape[1], m.num_heads
    d = E // h
    if E != m.embed_dim:
        raise AssertionError(f"was expecting embedding dimension of {m.embed_dim}, but got {E}")

    # the input projection: one call over the distinct inputs' positions
    inputs, start = [query], {"q": 0}
    start["k"] = 0 if same_qk else Lq
    if not same_qk:
        inputs.append(key)
    if same_kv:
        start["v"] = start["k"]
    elif same_qv:
        start["v"] = 0
    else:
        start["v"] = sum(t.shape[1] for t in inputs)
        inputs.append(value)
    y = site(torch.cat(inputs, dim=1) if len(inputs) > 1 else query)
    q = y[:, start["q"]:start["q"] + Lq, :E]
    k = y[:, start["k"]:start["k"] + S, E:2 * E]
    v = y[:, start["v"]:start["v"] + S, 2 * E:]

    if is_causal and attn_mask is None:
        raise RuntimeError("Need attn_mask if specifying the is_causal hint. You may use the Transformer module "
                           "method `generate_square_subsequent_mask` to create this mask.")
    if is_causal and key_padding_mask is None and not need_weights:
        attn_mask = None  # scaled_dot_product_attention applies the causal mask itself
    elif key_padding_mask is not None:
        is_causal = False
    q = q.reshape(B, Lq, h, d).transpose(1, 2)
    k = k.reshape(B, S, h, d).transpose(1, 2)
    v = v.reshape(B, S, h, d).transpose(1, 2)
    mask = None if attn_mask is None else _attn_mask_4d(attn_mask, B, h, Lq, S)
    if m.add_zero_attn:
        k = torch.cat([k, k.new_zeros(B, h, 1, d)], dim=2)
        v = torch.cat([v, v.new_zeros(B, h, 1, d)], dim=2)
        mask = None if mask is None else F.pad(mask, (0, 1))
        if key_padding_mask is not None:
            key_padding_mask = F.pad(key_padding_mask, (0, 1))
        S += 1
    if key_padding_mask is not None:
        kpm = key_padding_mask.view(B, 1, 1, S)
        mask = kpm if mask is None else mask + kpm
    dropout_p = m.dropout if m.training else 0.0

    weights = None
    if need_weights:
        scores = torch.matmul(q * math.sqrt(1.0 / d), k.transpose(-2, -1))
        if mask is not None:
            scores = scores + mask
        weights = torch.softmax(scores, dim=-1)
        if dropout_p > 0.0:
            weights = F.dropout(weights, p=dropout_p)
        out = torch.matmul(weights, v)
        if average_attn_weights:
            weights = weights.mean(dim=1)
    else:
        out = F.scaled_dot_product_attention(q, k, v, mask, dropout_p, is_causal)
    out = m.out_proj(out.transpose(1, 2).reshape(B, Lq, E))
    if not batched:
        return out.squeeze(0), None if weights is None else weights.squeeze(0)
    if not m.batch_first:
        out = out.transpose(0, 1)
    return out, weights
