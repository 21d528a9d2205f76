"""layers.base: what a layer rule must provide, the per-layer record, and the affine rule Linear and Conv share.

A **layer rule** says how one module type's trainable parameters enter the kernel through the module's
captured input and the back-propagated gradient at its output, so that its P-dimensional Jacobian is never
formed by ``jacrev`` (docs/math.md §5). For a call of the module at positions s = 1..S, with factors A (one
row per position) and Δ^{(c)} = ∂f_c/∂(output) (one row per position and model output c):

- the per-sample gradient is laid out as ``units × width`` per group (:meth:`LayerRule.units`) and formed a
  slice of units at a time (:meth:`LayerRule.gradient_slice`): the *materialised* route;
- a rule whose gradient is a sum of outer products Δ_sᵀ a_s (``factorizable``) also gives the *factorised*
  route: K_l = Σ_{s,t} (a_s·a′_t)(δ_s·δ′_t), with the input Gram a_s·a′_t from :meth:`LayerRule.input_gram`;
- :meth:`LayerRule.costs` gives both routes' multiply-adds, from which the engine chooses per layer.

The engine (:mod:`pkfast.engine.routes.layered`) knows no layer type by name: everything type-specific is here and in
the rule files beside it, found through the registry of :mod:`pkfast.layers`.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, replace
from typing import Callable

import torch
from torch import nn

__all__ = ["Layer", "LayerRule", "AffineRule", "Factors"]

#: One group's factors of a layer over a set of samples: (A [n, S, width_in] (or token ids [n, S]), Δ [n, C, S, O]).
Factors = tuple[torch.Tensor, torch.Tensor]


@dataclass(frozen=True, eq=False)
class Layer:
    """One parameterised module: its identity (name, type, parameters) and the facts discovered about it (its
    rule, calls, positions, fans). Frozen: discovery returns new records (:func:`dataclasses.replace`); the
    per-computation decision (its route and cost) is a separate :class:`pkfast.engine.costs.LayerChoice`."""

    name: str                      # module path ("" for the root module)
    kind: str                      # the rule's name ("linear", "conv", "embedding", "norm", …) or "other"
    type: str                      # the module's class name
    params: tuple[str, ...]        # its trainable parameters (FunctionalModel names)
    size: int                      # number of trainable parameters
    module: nn.Module | None = None
    rule: "LayerRule | None" = None
    bias: bool = False             # a trainable bias
    groups: int = 1
    calls: int = 0
    positions: int = 0             # S, summed over calls
    fan_in: int = 0                # I per group (without the bias column); vocabulary size for an embedding
    fan_out: int = 0               # O per group
    reason: str = ""               # why it has no rule (kind "other"): the plan's note

    def without_rule(self, reason: str) -> "Layer":
        """The same layer for the Jacobian route (no rule), with the reason."""
        return replace(self, kind="other", module=None, rule=None, calls=0, reason=reason)

    @property
    def factor_in(self) -> int:
        """Columns of A per group for an affine layer (the bias adds one)."""
        return self.fan_in + (1 if self.bias else 0)


class LayerRule:
    """How a module type's parameters ``weight`` (and optionally ``bias``) enter the kernel. Subclass it (or
    :class:`AffineRule`) and :func:`pkfast.layers.register` it for a module type.

    ``name`` is what the plan shows; ``factorizable`` says whether :meth:`input_gram` exists."""

    name: str = "layer"
    factorizable: bool = True
    #: the module's own parameters the rule covers, in the roles (weight, bias); the bias is optional
    param_names: tuple[str, str] = ("weight", "bias")

    # ------------------------------------------------------------------ what the module is
    def unsupported(self, module: nn.Module) -> str:
        """Why this module cannot use the rule (it then takes the Jacobian route), or "" if it can."""
        return ""

    def site(self, module: nn.Module) -> nn.Module:
        """The module whose forward hook sees the layer's calls (its input and output): by default the module
        itself; a rule whose parameters act inside a larger forward returns a helper that its :meth:`patch`
        calls (see :mod:`pkfast.layers.attention`)."""
        return module

    def patch(self, module: nn.Module) -> contextlib.AbstractContextManager:
        """A context in which ``module`` computes its forward so that :meth:`site` is called: by default
        nothing changes. The engine enters it around the passes that capture factors, after checking once that
        the patched model gives the original model's output."""
        return contextlib.nullcontext()

    def groups(self, module: nn.Module) -> int:
        return int(getattr(module, "groups", 1))

    def fans(self, module: nn.Module) -> tuple[int, int]:
        """(I, O) per group: input columns (without the bias) and output units."""
        raise NotImplementedError

    def positions(self, module: nn.Module, shape_in: torch.Size, shape_out: torch.Size) -> int:
        """S of one call on a batch of one sample, from the shapes of its input and output."""
        raise NotImplementedError

    # ------------------------------------------------------------------ factors
    def capture(self, module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        """What the forward hook keeps of a call (inside the functional call, so buffers are the evaluated
        point's): by default the call's first positional input."""
        return args[0]

    def unfold(self, layer: Layer, captured: torch.Tensor, grad: torch.Tensor, n: int, C: int,
               dtype: torch.dtype) -> Factors:
        """One call's (A [n, S, ·], Δ [n, C, S, ·]) from what :meth:`capture` kept and the output gradient
        ``grad`` ([n, C, *output shape of one sample's call])."""
        raise NotImplementedError

    def split(self, layer: Layer, A: torch.Tensor, D: torch.Tensor) -> list[Factors]:
        """The factors of all calls (positions concatenated) as one (A_g, Δ_g) per group."""
        return [(A, D)]

    def a_columns(self, layer: Layer) -> int:
        """Values of A per position (all groups): what the factors cost in memory besides Δ."""
        return layer.fan_in * layer.groups

    def fan_labels(self, layer: Layer) -> tuple[str, str]:
        """How the plan prints the layer's I and O."""
        return str(layer.fan_in), str(layer.fan_out)

    # ------------------------------------------------------------------ the materialised gradient
    def units(self, layer: Layer) -> tuple[int, int]:
        """(units, width) of one group's per-sample gradient: it is formed ``units`` rows at a time."""
        raise NotImplementedError

    def gradient_slice(self, layer: Layer, nodes: list, g: int, u0: int, u1: int, out: torch.Tensor,
                       beta: float = 0.0) -> torch.Tensor:
        """``out[n, C, u1-u0, width] = β·out + Σ_q ω_q`` (group ``g``'s per-sample gradient at evaluation point q,
        units ``u0:u1``), where ``nodes = [(ω_q, {layer name: [factors per group]})]``; β = 0 overwrites ``out``
        (whatever it held), β ≠ 0 accumulates into it (the kernel machine's momentum recursion)."""
        raise NotImplementedError

    def per_sample_gradient(self, layer: Layer, captured: list[torch.Tensor], grads: list[torch.Tensor], n: int,
                            C: int, dtype: torch.dtype) -> torch.Tensor | None:
        """The layer's per-sample gradient ``[n, C, size]`` (the layout of :func:`materialize`) straight from its
        calls' captures and output gradients, for a rule with a faster way than through its factors; None (the
        default) forms it from the factors (:meth:`unfold`, :meth:`split`, :meth:`gradient_slice`)."""
        return None

    def gradient_note(self, layer: Layer, C: int) -> str:
        """What the plan says of how :meth:`per_sample_gradient` forms an in-panel gradient ("" : from the factors)."""
        return ""

    def gradient_layout(self, layer: Layer, grads: dict[str, torch.Tensor | None]) -> torch.Tensor:
        """A parameter gradient by role (``{"weight": …, "bias": …}``, None where unreached) flattened in the layout of
        :meth:`gradient_slice` over all groups and units (how the engine checks a rule against autograd)."""
        raise NotImplementedError

    # ------------------------------------------------------------------ the factorised kernel
    def input_gram(self, Ar: torch.Tensor, Ac: torch.Tensor, mm: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
                   dtype: torch.dtype) -> torch.Tensor:
        """``[r, S, c, S′]`` in ``dtype``: a_s·a′_t between every row position and column position (``mm(P, Q)``
        is P Qᵀ on the engine's backend)."""
        raise NotImplementedError

    def input_gram_diagonal(self, A: torch.Tensor, A2: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """``[n, S, S]``: a_s·a′_t of each sample with itself."""
        raise NotImplementedError

    def project_input(self, A: torch.Tensor, R: torch.Tensor) -> torch.Tensor:
        """``[n, S, r]``: R_inᵀ a_s at every position, for the Kronecker-factored sketch (``R``: ``[width_in, r]``,
        one row per column of A — a vocabulary row for an embedding)."""
        raise NotImplementedError

    # ------------------------------------------------------------------ cost
    def costs(self, layer: Layer, C: int, full: bool) -> tuple[float | None, float, float]:
        """(factorised multiply-adds per pair or None, materialised per pair, materialised per sample) of one
        kernel term, summed over groups; the pass that yields A and Δ is common to both and not counted."""
        cc = C * C if full else C
        return None, 2.0 * cc * layer.size, 2.0 * C * layer.positions * layer.size


def materialize(layer: Layer, groups: list[Factors], n: int) -> torch.Tensor:
    """The layer's per-sample gradient ``[n, C, size]``: every group's :meth:`LayerRule.gradient_slice` over all
    its units — a layout of no particular convention: panels only need rows and columns to agree."""
    units, width = layer.rule.units(layer)
    nodes = [(1.0, {layer.name: groups})]
    parts = [layer.rule.gradient_slice(layer, nodes, g, 0, units, D.new_empty(n, D.shape[1], units, width))
             .reshape(n, D.shape[1], -1) for g, (_, D) in enumerate(groups)]
    return torch.cat(parts, dim=2) if len(parts) > 1 else parts[0]


class AffineRule(LayerRule):
    """A layer ``y_s = W a_s + b`` at positions s (the bias a trainable column of ones in A; ``groups`` split
    W block-diagonally): the per-sample gradient of output c is Σ_s δ_s a_sᵀ. Subclasses say what the
    positions, fans and inputs are (:meth:`fans`, :meth:`positions`, :meth:`unfold`); a rule for a module
    that stores its weight in another layout overrides :meth:`weight_matrix`."""

    def weight_matrix(self, layer: Layer, W: torch.Tensor) -> torch.Tensor:
        """The weight (or its gradient) as the ``[O·groups, I]`` matrix of ``y = W a``."""
        return W.reshape(W.shape[0], -1)

    def split(self, layer: Layer, A: torch.Tensor, D: torch.Tensor) -> list[Factors]:
        out = []
        Ig, Og = layer.fan_in, layer.fan_out
        for g in range(layer.groups):
            Ag = A[:, :, g * Ig:(g + 1) * Ig] if layer.groups > 1 else A
            if layer.bias:
                Ag = torch.cat([Ag, Ag.new_ones(Ag.shape[0], Ag.shape[1], 1)], dim=2)
            Dg = D[..., g * Og:(g + 1) * Og] if layer.groups > 1 else D
            out.append((Ag, Dg))  # views where possible: the products take strided operands
        return out

    def a_columns(self, layer: Layer) -> int:
        return layer.factor_in * layer.groups

    def fan_labels(self, layer: Layer) -> tuple[str, str]:
        return str(layer.fan_in) + ("+1" if layer.bias else ""), str(layer.fan_out)  # +1: the bias column

    def units(self, layer: Layer) -> tuple[int, int]:
        return layer.fan_out, layer.factor_in

    def gradient_slice(self, layer: Layer, nodes: list, g: int, u0: int, u1: int, out: torch.Tensor,
                       beta: float = 0.0) -> torch.Tensor:
        if len(nodes) == 1 and beta == 0.0:
            om, feats = nodes[0]
            A, D = feats[layer.name][g]
            n, C, S, _ = D.shape
            Du = D[..., u0:u1]
            if S == 1:  # an outer product per sample, written in place
                torch.mul(Du[:, :, 0, :, None], A[:, None, 0:1, :], out=out)
                if om != 1.0:
                    out.mul_(om)
            else:
                Dt = Du.transpose(2, 3).reshape(n, C * (u1 - u0), S)
                out.view(n, C * (u1 - u0), -1).baddbmm_(Dt, A, beta=0.0, alpha=om)
            return out
        # several points (quadrature nodes), or accumulating: their positions side by side, one pass over out
        Dts, As = [], []
        for om, feats in nodes:
            A, D = feats[layer.name][g]
            n, C, S, _ = D.shape
            Dts.append(D[..., u0:u1].transpose(2, 3).reshape(n, C * (u1 - u0), S))
            As.append(A if om == 1.0 else A * om)
        Dt, A = (Dts[0], As[0]) if len(nodes) == 1 else (torch.cat(Dts, 2), torch.cat(As, 1))
        out.view(n, C * (u1 - u0), -1).baddbmm_(Dt, A, beta=beta)
        return out

    def gradient_layout(self, layer: Layer, grads: dict[str, torch.Tensor | None]) -> torch.Tensor:
        m, (wn, bn) = layer.module, self.param_names
        W = grads.get("weight")
        W = self.weight_matrix(layer, torch.zeros_like(getattr(m, wn)) if W is None else W)
        b = grads.get("bias") if layer.bias else None
        if layer.bias and b is None:
            b = torch.zeros_like(getattr(m, bn))
        parts = []
        Og = layer.fan_out
        for gi in range(layer.groups):
            blk = W[gi * Og:(gi + 1) * Og]
            if layer.bias:
                blk = torch.cat([blk, b.reshape(-1)[gi * Og:(gi + 1) * Og, None]], dim=1)
            parts.append(blk.reshape(-1))
        return torch.cat(parts)

    def input_gram(self, Ar: torch.Tensor, Ac: torch.Tensor, mm: Callable, dtype: torch.dtype) -> torch.Tensor:
        r, S = Ar.shape[:2]
        c, S2 = Ac.shape[:2]
        return mm(Ar.reshape(r * S, -1), Ac.reshape(c * S2, -1)).view(r, S, c, S2)

    def input_gram_diagonal(self, A: torch.Tensor, A2: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        return torch.bmm(A, A2.transpose(1, 2))

    def project_input(self, A: torch.Tensor, R: torch.Tensor) -> torch.Tensor:
        return torch.matmul(A, R)

    def costs(self, layer: Layer, C: int, full: bool) -> tuple[float | None, float, float]:
        S, g, Ip, O = layer.positions, layer.groups, layer.factor_in, layer.fan_out
        cc = C * C if full else C
        fact_pair = 2.0 * S * S * Ip * g + 2.0 * S * S * cc * O * g + S * S * cc * g
        return fact_pair, 2.0 * cc * O * Ip * g, 2.0 * C * S * O * Ip * g


def positions_of(shape: torch.Size, per_position: int) -> int:
    """Positions of a tensor of ``shape`` holding ``per_position`` values at each."""
    return math.prod(shape) // per_position

