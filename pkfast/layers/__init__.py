"""layers: the public registry of layer rules — how each module type's parameters enter the kernel through
its inputs and output gradients (docs/math.md §5), one file per type.

Built in: ``nn.Linear`` (:mod:`~pkfast.layers.linear`), ``nn.Conv1d``/``nn.Conv2d`` (:mod:`~pkfast.layers.conv`),
``nn.Embedding`` (:mod:`~pkfast.layers.embedding`), and the affine parameters of ``nn.LayerNorm``,
``nn.GroupNorm``, ``nn.BatchNorm1d/2d/3d`` (eval) and ``nn.RMSNorm`` (:mod:`~pkfast.layers.norm`), and the packed
q/k/v input projection of ``nn.MultiheadAttention`` (:mod:`~pkfast.layers.attention`; its ``out_proj`` is a
Linear), and, registered when first met (:mod:`~pkfast.layers.hf`), Hugging Face's ``Conv1D`` (GPT-2's
transposed Linear) and timm's ``LayerNorm``. Parameters of any other module take the generic ``torch.func.jacrev`` route.

A rule is found by the module's type: the nearest registered class in its MRO, provided the module does not
override that class's ``forward`` (a subclass with its own forward computes something else). Register a rule
for your own module type with :func:`register`; the engine then routes it like the built-in ones, and
``pkfast.plan`` shows it. Example — a Linear that stores its weight transposed, ``y = x @ W + b`` with
``W`` of shape ``[in, out]``:

    >>> import torch, pkfast
    >>> from pkfast.layers import LinearRule, register
    >>> class TLinear(torch.nn.Module):
    ...     def __init__(self, i, o):
    ...         super().__init__()
    ...         self.weight = torch.nn.Parameter(torch.randn(i, o) / i**0.5)
    ...         self.bias = torch.nn.Parameter(torch.zeros(o))
    ...     def forward(self, x):
    ...         return x @ self.weight + self.bias
    >>> class TLinearRule(LinearRule):
    ...     def fans(self, m):                 # (inputs, outputs)
    ...         return m.weight.shape[0], m.weight.shape[1]
    ...     def weight_matrix(self, layer, W):  # as the [out, in] matrix of y = W a
    ...         return W.T
    >>> register(TLinear, TLinearRule())
    >>> net = torch.nn.Sequential(TLinear(4, 8), torch.nn.Tanh(), TLinear(8, 2))
    >>> traj = pkfast.Trajectory.from_checkpoints([net.state_dict(), net.state_dict()], lr=0.1)
    >>> [L.kind for L in pkfast.plan(net, traj, torch.randn(5, 4)).layers]
    ['linear', 'linear']

The engine checks every rule on a few samples against autograd before using it (a rule that disagrees, or a
weight also used outside the module, sends the layer to the Jacobian route with the reason in the plan).
"""

from __future__ import annotations

from torch import nn

from pkfast.layers.attention import MultiheadAttentionRule
from pkfast.layers.base import AffineRule, Layer, LayerRule
from pkfast.layers.conv import ConvRule
from pkfast.layers.embedding import EmbeddingRule
from pkfast.layers.head import CollapsedHead, CollapsedHeadRule
from pkfast.layers.hf import LAZY, TransposedLinearRule
from pkfast.layers.linear import LinearRule
from pkfast.layers.norm import NormRule, batch_norm, group_norm, layer_norm, rms_norm

__all__ = ["register", "unregister", "rule_for", "registered", "LayerRule", "AffineRule", "LinearRule", "ConvRule",
           "EmbeddingRule", "NormRule", "MultiheadAttentionRule", "TransposedLinearRule", "Layer"]

_RULES: dict[type, LayerRule] = {}


def register(module_type: type, rule: LayerRule, *, replace: bool = False) -> None:
    """Use ``rule`` for modules of ``module_type`` (and subclasses that keep its ``forward``).

    Args:
        module_type: an ``nn.Module`` subclass.
        rule: a :class:`LayerRule` instance (usually of :class:`AffineRule`, :class:`LinearRule` or
            :class:`NormRule`).
        replace: allow replacing a type's registered rule (else that raises).
    """
    fn = "pkfast.layers.register"
    if not (isinstance(module_type, type) and issubclass(module_type, nn.Module)):
        raise TypeError(f"{fn}: module_type must be an nn.Module subclass; found {module_type!r}")
    if not isinstance(rule, LayerRule):
        raise TypeError(f"{fn}: rule must be a pkfast.layers.LayerRule instance; found {type(rule).__name__}")
    if module_type in _RULES and not replace and _RULES[module_type] is not rule:
        raise ValueError(f"{fn}: {module_type.__name__} already has the rule {type(_RULES[module_type]).__name__}; "
                         "pass replace=True to replace it")
    _RULES[module_type] = rule


def unregister(module_type: type) -> None:
    """Forget the rule of ``module_type`` (its parameters then take the Jacobian route)."""
    _RULES.pop(module_type, None)


def registered() -> dict[type, LayerRule]:
    """The registered rules by module type (a copy)."""
    return dict(_RULES)


def rule_for(module: nn.Module) -> tuple[LayerRule | None, str]:
    """(the rule for ``module`` or None, the reason it has none when a registered type almost matched)."""
    for cls in type(module).__mro__:
        lazy = LAZY.get((cls.__module__, cls.__qualname__))
        if lazy is not None and cls not in _RULES:  # an optional library's type, registered on first sight
            register(cls, lazy)
        rule = _RULES.get(cls)
        if rule is None:
            continue
        if type(module).forward is not cls.forward:
            return None, f"{type(module).__name__} overrides {cls.__name__}.forward"
        why = rule.unsupported(module)
        return (None, why) if why else (rule, "")
    return None, ""


register(nn.Linear, LinearRule())
register(nn.Conv1d, ConvRule())
register(nn.Conv2d, ConvRule())
register(nn.Embedding, EmbeddingRule())
register(nn.MultiheadAttention, MultiheadAttentionRule())
register(CollapsedHead, CollapsedHeadRule())
register(nn.LayerNorm, NormRule(layer_norm))
register(nn.GroupNorm, NormRule(group_norm, channel_dim=1))
for _bn in (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d):
    register(_bn, NormRule(batch_norm, channel_dim=1))
if hasattr(nn, "RMSNorm"):  # torch ≥ 2.4
    register(nn.RMSNorm, NormRule(rms_norm))
