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
    input projection computed by ``site`` and the output projection by calling ``m.out_proj``.

    It mirrors ``torch.nn.functional.multi_head_attention_forward`` as of PyTorch 2.13 (the version it was last
    compared with; pkfast accepts torch ≥ 2.1) for the modules this rule covers: a packed ``in_proj_weight``, no
    ``bias_k``/``bias_v``, no ``static_k``/``static_v``, no separate q/k/v weights. It is written out rather than
    called because that function applies ``in_proj_weight`` and ``out_proj.weight`` by ``F.linear`` on the
    parameters, where no module hook sees them, and torch has no public function for the attention between the
    two projections that also returns the weights. Only what the hook sites need is copied: the layout
    (unbatched, sequence-first), one projection call over the distinct inputs (:func:`_project`), the masks
    merged into one additive mask (canonicalised by torch's own ``F._canonical_mask``, as the module's forward
    does) and the weights' softmax; ``F.scaled_dot_product_attention`` attends when no weights are asked for.
    ``tests/layers/test_attention.py`` compares it with the module for every layout, mask and option.
    """
    key_padding_mask = F._canonical_mask(mask=key_padding_mask, mask_name="key_padding_mask",
                                         other_type=F._none_or_dtype(attn_mask), other_name="attn_mask",
                                         target_type=query.dtype)
    attn_mask = F._canonical_mask(mask=attn_mask, mask_name="attn_mask", other_type=None, other_name="",
                                  target_type=query.dtype, check_other=False)
    batched = query.dim() == 3
    q, k, v = _project(m, site, *_batch_first(m, batched, query, key, value))
    if key_padding_mask is not None and not batched:
        key_padding_mask = key_padding_mask.unsqueeze(0)
    if is_causal and attn_mask is None:
        raise RuntimeError("Need attn_mask if specifying the is_causal hint. You may use the Transformer module "
                           "method `generate_square_subsequent_mask` to create this mask.")
    if is_causal and key_padding_mask is None and not need_weights:
        attn_mask = None  # scaled_dot_product_attention applies the causal mask itself
    elif key_padding_mask is not None:
        is_causal = False
    B, Lq, E = q.shape
    h = m.num_heads
    q, k, v = (t.reshape(B, t.shape[1], h, E // h).transpose(1, 2) for t in (q, k, v))
    mask = _merged_mask(attn_mask, key_padding_mask, B, h, Lq, k.shape[2], m.add_zero_attn)
    if m.add_zero_attn:
        k, v = (torch.cat([t, t.new_zeros(B, h, 1, E // h)], dim=2) for t in (k, v))
    out, weights = _attend(q, k, v, mask, m.dropout if m.training else 0.0, is_causal, need_weights,
                           average_attn_weights)
    out = m.out_proj(out.transpose(1, 2).reshape(B, Lq, E))
    if not batched:
        return out.squeeze(0), None if weights is None else weights.squeeze(0)
    if not m.batch_first:
        out = out.transpose(0, 1)
    return out, weights


def _batch_first(m: nn.MultiheadAttention, batched: bool, query: torch.Tensor, key: torch.Tensor,
                 value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, tuple[bool, bool, bool]]:
    """The inputs as ``[B, L, E]`` (an unbatched input is a batch of one), and which of them were the same tensor
    (query is key, key is value, query is value), checked as ``F.multi_head_attention_forward`` checks them."""
    same = (query is key, key is value, query is value)
    if not batched:
        query, key, value = query.unsqueeze(0), key.unsqueeze(0), value.unsqueeze(0)
    elif not m.batch_first:
        query, key, value = query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1)
    if key.shape != value.shape:
        raise AssertionError(f"key shape {key.shape} does not match value shape {value.shape}")
    if query.shape[2] != m.embed_dim:
        raise AssertionError(f"was expecting embedding dimension of {m.embed_dim}, but got {query.shape[2]}")
    return query, key, value, same


def _project(m: nn.MultiheadAttention, site: nn.Module, query: torch.Tensor, key: torch.Tensor,
             value: torch.Tensor, same: tuple[bool, bool, bool]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q, k, v ``[B, L, E]`` from one call of the hook site over the positions of the distinct inputs
    concatenated (the query's, then the key's and the value's where they are other tensors): rows of the
    query's positions, columns of the query's third of the 3E outputs, and so on."""
    same_qk, same_kv, same_qv = same
    inputs = [query]

    def append(t: torch.Tensor) -> int:  # the new input's first position in the concatenation
        inputs.append(t)
        return sum(u.shape[1] for u in inputs[:-1])

    k0 = 0 if same_qk else append(key)
    v0 = k0 if same_kv else 0 if same_qv else append(value)
    y = site(torch.cat(inputs, dim=1) if len(inputs) > 1 else query)
    E, Lq, S = m.embed_dim, query.shape[1], key.shape[1]
    return y[:, :Lq, :E], y[:, k0:k0 + S, E:2 * E], y[:, v0:v0 + S, 2 * E:]


def _merged_mask(attn_mask: torch.Tensor | None, key_padding_mask: torch.Tensor | None, B: int, h: int, Lq: int,
                 S: int, zero_attn: bool) -> torch.Tensor | None:
    """The (canonical, additive) masks over the S keys as one broadcastable to ``[B, h, Lq, S]`` (``S + 1`` with
    the zero key of ``add_zero_attn``, which both masks leave open): the attention mask plus the key padding
    mask; None without either."""
    mask = None if attn_mask is None else _attn_mask_4d(attn_mask, B, h, Lq, S)
    if zero_attn:
        mask = None if mask is None else F.pad(mask, (0, 1))
        if key_padding_mask is not None:
            key_padding_mask = F.pad(key_padding_mask, (0, 1))
        S += 1
    if key_padding_mask is not None:
        kpm = key_padding_mask.view(B, 1, 1, S)
        mask = kpm if mask is None else mask + kpm
    return mask


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, dropout_p: float,
            is_causal: bool, need_weights: bool, average: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The heads' outputs ``[B, h, Lq, d]`` and, with ``need_weights``, the attention weights (averaged over the
    heads with ``average``): the softmax written out, else ``F.scaled_dot_product_attention``."""
    if not need_weights:
        return F.scaled_dot_product_attention(q, k, v, mask, dropout_p, is_causal), None
    scores = torch.matmul(q * math.sqrt(1.0 / q.shape[-1]), k.transpose(-2, -1))
    if mask is not None:
        scores = scores + mask
    weights = torch.softmax(scores, dim=-1)
    if dropout_p > 0.0:
        weights = F.dropout(weights, p=dropout_p)
    out = torch.matmul(weights, v)
    return out, weights.mean(dim=1) if average else weights
