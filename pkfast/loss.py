"""Loss conventions: the per-sample loss ℓ(f, y) and the batch weights λ_{s,i} with L_s = Σ_i λ_{s,i} ℓ_i.

The exact kernel machine needs each step's batch loss written as a weighted sum of per-sample losses, in the
same convention as training (docs/math.md §4). :class:`LossSpec` holds that convention:

- ``kind="cross_entropy"``: PyTorch's cross-entropy. With class weights ``w`` and label smoothing α, a token's
  loss is (1−α)·w_y·(−log p_y) + (α/V)·Σ_c w_c·(−log p_c).

  - **One class per sample** (targets ``[n]``, outputs ``[n, C]``): ℓ_i is that token loss. ``reduction="mean"``:
    λ_i = 1/Σ_{j∈B} w_{y_j} (1/|B| without weights); ``"sum"``: λ_i = 1. Samples whose target is
    ``ignore_index`` get λ_i = 0 and leave the mean's denominator.
  - **Sequences** (targets ``[n, L]``, outputs ``[n, L, V]`` — a language model's next-token loss): ℓ_i is the
    **mean** of the sample's token losses over its n_i tokens that are not ``ignore_index`` (``"mean"``), or
    their **sum** (``"sum"``). λ_i = n_i / Σ_{j∈B} W_j with W_j = Σ of w_y over j's counted tokens (n_j without
    weights) for the mean, 1 for the sum — so Σ_i λ_i ℓ_i is exactly ``F.cross_entropy`` of the batch's
    flattened tokens (``logits.view(-1, V), targets.view(-1)``).
- ``kind="mse"``: ℓ_i = Σ (f − y)² over the sample's outputs (any shape); ``"mean"``: λ_i = 1/(|B|·C)
  (``nn.MSELoss`` averages over every element); ``"sum"``: λ_i = 1.
- ``kind="callable"``: any per-sample loss ``fn(outputs, targets) -> [n]`` (outputs in the model's shape);
  the training batch loss is the mean (λ_i = 1/|B|) or the sum (λ_i = 1) of those, as ``reduction`` says.

``LossSpec.from_module(nn.CrossEntropyLoss(...))`` reads the convention from a loss module (and a callable
becomes ``kind="callable"``); :meth:`LossSpec.batch_loss` reproduces the module's value (tested against it).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

__all__ = ["LossSpec"]

KINDS = ("cross_entropy", "mse", "callable")
REDUCTIONS = ("mean", "sum")


@dataclass(frozen=True)
class LossSpec:
    """A training loss convention (see the module docstring).

    Example:
        >>> import torch, pkfast
        >>> spec = pkfast.LossSpec.from_module(torch.nn.CrossEntropyLoss(label_smoothing=0.1))
        >>> f, y = torch.randn(4, 3), torch.tensor([0, 2, 1, 1])
        >>> bool(torch.isclose(spec.batch_loss(f, y), torch.nn.CrossEntropyLoss(label_smoothing=0.1)(f, y)))
        True
        >>> tokens = torch.randn(2, 5, 7), torch.tensor([[1, 2, 3, -100, -100], [4, 5, 6, 0, 1]])  # a sequence batch
        >>> bool(torch.isclose(spec.batch_loss(*tokens), torch.nn.CrossEntropyLoss(label_smoothing=0.1)(
        ...     tokens[0].reshape(-1, 7), tokens[1].reshape(-1))))
        True
        >>> per = pkfast.LossSpec.from_module(lambda out, y: ((out - y) ** 2).sum(-1))  # any per-sample loss
        >>> per.kind, per.reduction
        ('callable', 'mean')
    """

    kind: str = "cross_entropy"
    reduction: str = "mean"
    weight: tuple[float, ...] | None = None
    label_smoothing: float = 0.0
    ignore_index: int = -100
    fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = field(default=None, repr=False)
    _fn: str = field(default="pkfast.LossSpec", repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"{self._fn}: loss kind must be one of {KINDS}; found {self.kind!r}")
        if self.reduction not in REDUCTIONS:
            raise ValueError(f"{self._fn}: reduction must be one of {REDUCTIONS}; found {self.reduction!r} "
                             "(reduction='none' has no batch loss to decompose)")
        if not 0.0 <= float(self.label_smoothing) <= 1.0:
            raise ValueError(f"{self._fn}: label_smoothing must be in [0, 1]; found {self.label_smoothing!r}")
        if self.kind != "cross_entropy" and (self.weight is not None or self.label_smoothing):
            raise ValueError(f"{self._fn}: class weights and label smoothing apply to cross_entropy, not {self.kind}")
        if (self.kind == "callable") != (self.fn is not None):
            raise ValueError(f"{self._fn}: kind='callable' goes with fn=(outputs, targets) -> per-sample losses [n], "
                             f"and fn with kind='callable'; found kind={self.kind!r}, fn={self.fn!r}")

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_module(cls, loss: Any, fn: str = "pkfast.LossSpec") -> "LossSpec":
        """A spec from ``nn.CrossEntropyLoss`` / ``nn.MSELoss``, a ``LossSpec``, a recorded dict, the strings
        ``"cross_entropy"`` / ``"mse"`` (mean reduction), or a callable ``(outputs, targets) -> [n]`` per-sample
        losses (whose mean is the training batch loss; build ``LossSpec(kind="callable", fn=…, reduction="sum")``
        for a sum)."""
        if isinstance(loss, LossSpec):
            return loss
        if isinstance(loss, str):
            return cls(kind=loss, _fn=fn)
        if isinstance(loss, dict):
            if loss.get("kind") == "callable":
                raise ValueError(f"{fn}: the recorded loss is a Python callable ({loss.get('name')!r}), which a record "
                                 "cannot hold; pass it again as loss=")
            w = loss.get("weight")
            return cls(kind=loss["kind"], reduction=loss.get("reduction", "mean"),
                       weight=None if w is None else tuple(float(v) for v in w),
                       label_smoothing=float(loss.get("label_smoothing", 0.0)),
                       ignore_index=int(loss.get("ignore_index", -100)), _fn=fn)
        if isinstance(loss, torch.nn.CrossEntropyLoss):
            w = None if loss.weight is None else tuple(float(v) for v in loss.weight.detach().cpu().reshape(-1))
            return cls("cross_entropy", loss.reduction, w, float(loss.label_smoothing), int(loss.ignore_index), _fn=fn)
        if isinstance(loss, torch.nn.MSELoss):
            return cls("mse", loss.reduction, _fn=fn)
        if callable(loss) and not isinstance(loss, torch.nn.Module):
            return cls(kind="callable", fn=loss, _fn=fn)
        raise TypeError(
            f"{fn}: cannot read a loss convention from {type(loss).__name__}; expected nn.CrossEntropyLoss, "
            "nn.MSELoss, a pkfast.LossSpec, 'cross_entropy'/'mse', or a function (outputs, targets) -> per-sample "
            "losses [n] (docs/math.md §4)"
        )

    @property
    def name(self) -> str:
        """The callable's qualified name (what records and fingerprints hold of it)."""
        f = self.fn
        return "" if f is None else f"{getattr(f, '__module__', '?')}.{getattr(f, '__qualname__', repr(f))}"

    def to_meta(self) -> dict[str, Any]:
        """A JSON-serialisable dict (what the recorder stores); :meth:`from_module` reads it back."""
        if self.kind == "callable":
            return {"kind": "callable", "reduction": self.reduction, "name": self.name}
        return {"kind": self.kind, "reduction": self.reduction,
                "weight": None if self.weight is None else list(self.weight),
                "label_smoothing": self.label_smoothing, "ignore_index": self.ignore_index}

    def check_targets(self, y: torch.Tensor, C: int, name: str, fn: str) -> None:
        """Raise a clear error unless ``y`` are valid targets for a model with C outputs per sample."""
        if self.kind == "cross_entropy":
            if y.is_floating_point() or y.ndim < 1:
                raise ValueError(f"{fn}: cross_entropy targets {name} must be class indices of shape [n] (one class "
                                 f"per sample) or [n, L] (tokens); found {y.dtype} of shape {tuple(y.shape)}")
            L = math.prod(y.shape[1:])
            if L == 0 or C % L:
                raise ValueError(f"{fn}: cross_entropy targets {name} have {L} tokens per sample (shape "
                                 f"{tuple(y.shape)}), but the model has {C} outputs per sample: expected outputs "
                                 f"[n, {L}, V] with V classes")
            V = C // L
            bad = (y != self.ignore_index) & ((y < 0) | (y >= V))
            if bool(bad.any()):
                raise ValueError(f"{fn}: {name} holds class {int(y[bad][0])}; the model has {V} classes "
                                 f"(0…{V - 1})" if L > 1 else f"{fn}: {name} holds class {int(y[bad][0])}; the model "
                                 f"has {C} outputs (classes 0…{C - 1})")
        elif self.kind == "mse" and math.prod(y.shape[1:]) != C:
            raise ValueError(f"{fn}: mse targets {name} must have C = {C} values per sample; found shape "
                             f"{tuple(y.shape)}")

    def check_callable(self, outputs: torch.Tensor, y: torch.Tensor, fn: str) -> None:
        """For ``kind="callable"``: the function maps one sample's outputs ``[1, *out]`` and targets to one finite
        loss ``[1]`` (a reduced scalar is the usual mistake)."""
        if self.kind != "callable":
            return
        try:
            with torch.no_grad():
                r = self.fn(outputs, y)
        except Exception as e:  # noqa: BLE001 - the user's function: say what it was given
            raise ValueError(f"{fn}: the loss function {self.name} failed on one sample's outputs "
                             f"{tuple(outputs.shape)} and targets {tuple(y.shape)}: {type(e).__name__}: {e}") from e
        if not isinstance(r, torch.Tensor) or tuple(r.shape) != (outputs.shape[0],):
            raise ValueError(f"{fn}: the loss function {self.name} must return per-sample losses of shape [n]; for "
                             f"n = {outputs.shape[0]} it returned "
                             f"{tuple(r.shape) if isinstance(r, torch.Tensor) else type(r).__name__} (a reduced "
                             "loss? compute it with reduction='none' and sum over each sample's elements)")

    # ------------------------------------------------------------------ per sample and per batch
    def _w(self, like: torch.Tensor) -> torch.Tensor | None:
        return None if self.weight is None else torch.tensor(self.weight, dtype=like.dtype, device=like.device)

    def per_sample(self, f: torch.Tensor, y: torch.Tensor, shape: tuple[int, ...] | None = None) -> torch.Tensor:
        """ℓ(f, y) for one sample: ``f`` is the model's output flattened (``shape``: its per-sample shape, for a
        callable loss); returns a 0-d tensor.

        Written with plain tensor ops so that ``torch.func`` can ``vmap`` and differentiate it."""
        if self.kind == "mse":
            return ((f - y.reshape(f.shape).to(f.dtype)) ** 2).sum()
        if self.kind == "callable":
            out = f.reshape(1, *(shape if shape is not None else f.shape))
            return self.fn(out, y.unsqueeze(0)).reshape(())
        if y.ndim >= 1:
            return self._sequence(f, y)
        C = f.shape[-1]
        logp = torch.log_softmax(f, dim=-1)
        yi = y.reshape(()).to(torch.int64)
        valid = (yi != self.ignore_index).to(f.dtype)
        safe = torch.where(yi == self.ignore_index, torch.zeros_like(yi), yi)
        onehot = (torch.arange(C, device=f.device) == safe).to(f.dtype)  # F.one_hot does not vmap
        w = self._w(f)
        wy = (onehot * w).sum() if w is not None else torch.ones((), dtype=f.dtype, device=f.device)
        nll = -(onehot * logp).sum() * wy
        if self.label_smoothing:
            smooth = -((logp * w) if w is not None else logp).sum() / C
            nll = (1 - self.label_smoothing) * nll + self.label_smoothing * smooth
        return nll * valid

    def _sequence(self, f: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """A sample of L tokens: the mean (or sum) of its counted tokens' losses."""
        L = y.numel()
        V = f.numel() // L
        logp = torch.log_softmax(f.reshape(L, V), dim=-1)
        yi = y.reshape(L).to(torch.int64)
        valid = (yi != self.ignore_index).to(f.dtype)
        safe = torch.where(yi == self.ignore_index, torch.zeros_like(yi), yi)
        onehot = (torch.arange(V, device=f.device)[None, :] == safe[:, None]).to(f.dtype)
        w = self._w(f)
        wy = (onehot * w).sum(-1) if w is not None else torch.ones(L, dtype=f.dtype, device=f.device)
        nll = -(onehot * logp).sum(-1) * wy
        if self.label_smoothing:
            smooth = -((logp * w) if w is not None else logp).sum(-1) / V
            nll = (1 - self.label_smoothing) * nll + self.label_smoothing * smooth
        total = (nll * valid).sum()
        return total if self.reduction == "sum" else total / valid.sum().clamp(min=1.0)

    def batch_weights(self, y: torch.Tensor, num_outputs: int) -> torch.Tensor:
        """λ_i for the samples of one batch (targets ``y``), float64."""
        y = torch.as_tensor(y)
        n = int(y.shape[0])
        if self.reduction == "sum":
            lam = torch.ones(n, dtype=torch.float64)
        elif self.kind == "mse":
            lam = torch.full((n,), 1.0 / (n * num_outputs), dtype=torch.float64)
        elif self.kind == "callable":
            lam = torch.full((n,), 1.0 / n, dtype=torch.float64)
        else:
            yi = y.reshape(n, -1).to(torch.int64)
            valid = yi != self.ignore_index
            if self.weight is not None:
                w = torch.tensor(self.weight, dtype=torch.float64)
                den = (w[torch.where(valid, yi, 0)] * valid).sum()
            else:
                den = valid.sum().to(torch.float64)
            count = valid.sum(1).to(torch.float64) if y.ndim > 1 else torch.ones(n, dtype=torch.float64)
            lam = count / den if den > 0 else torch.zeros(n, dtype=torch.float64)
        if self.kind == "cross_entropy" and y.ndim == 1:
            lam = lam * (y.reshape(n) != self.ignore_index).to(torch.float64)
        return lam

    def batch_loss(self, f: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Σ_i λ_i ℓ(f_i, y_i): equals the loss module's value on the batch."""
        f2 = f.reshape(f.shape[0], -1)
        shape = tuple(f.shape[1:])
        per = torch.stack([self.per_sample(f2[i], y[i], shape) for i in range(f2.shape[0])])
        return (self.batch_weights(y, f2.shape[1]).to(per.dtype) * per).sum()

    def output_grad(self, f: torch.Tensor, y: torch.Tensor, shape: tuple[int, ...] | None = None) -> torch.Tensor:
        """g = ∇_f ℓ(f, y) per sample: ``f`` [n, C] → [n, C] (``shape``: the per-sample output shape, for a
        callable loss)."""
        f = f.detach().requires_grad_(True)
        with torch.enable_grad():
            per = torch.func.vmap(lambda fi, yi: self.per_sample(fi, yi, shape))(f, y)
            (g,) = torch.autograd.grad(per.sum(), f)
        return g
