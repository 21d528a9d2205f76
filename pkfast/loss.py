"""Loss conventions: the per-sample loss ℓ(f, y) and the batch weights λ_{s,i} with L_s = Σ_i λ_{s,i} ℓ_i.

The exact kernel machine needs each step's batch loss written as a weighted sum of per-sample losses, in the
same convention as training (docs/math.md §4). :class:`LossSpec` holds that convention:

- ``kind="cross_entropy"``: ℓ_i is PyTorch's ``F.cross_entropy(..., reduction="none")`` for one sample: with
  class weights ``w`` and label smoothing α, ℓ_i = (1−α)·w_{y_i}·(−log p_{y_i}) + (α/C)·Σ_c w_c·(−log p_c).
  ``reduction="mean"``: λ_i = 1/Σ_{j∈B} w_{y_j} (1/|B| without weights); ``"sum"``: λ_i = 1. Samples whose
  target is ``ignore_index`` get λ_i = 0 and leave the mean's denominator.
- ``kind="mse"``: ℓ_i = Σ_c (f_c − y_c)²; ``"mean"``: λ_i = 1/(|B|·C) (``nn.MSELoss`` averages over every
  element); ``"sum"``: λ_i = 1.

``LossSpec.from_module(nn.CrossEntropyLoss(...))`` reads the convention from a loss module;
:meth:`LossSpec.batch_loss` reproduces the module's value (tested against it).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

__all__ = ["LossSpec"]

KINDS = ("cross_entropy", "mse")
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
    """

    kind: str = "cross_entropy"
    reduction: str = "mean"
    weight: tuple[float, ...] | None = None
    label_smoothing: float = 0.0
    ignore_index: int = -100
    _fn: str = field(default="pkfast.LossSpec", repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"{self._fn}: loss kind must be one of {KINDS}; found {self.kind!r}")
        if self.reduction not in REDUCTIONS:
            raise ValueError(f"{self._fn}: reduction must be one of {REDUCTIONS}; found {self.reduction!r} "
                             "(reduction='none' has no batch loss to decompose)")
        if not 0.0 <= float(self.label_smoothing) <= 1.0:
            raise ValueError(f"{self._fn}: label_smoothing must be in [0, 1]; found {self.label_smoothing!r}")
        if self.kind == "mse" and (self.weight is not None or self.label_smoothing):
            raise ValueError(f"{self._fn}: class weights and label smoothing apply to cross_entropy, not mse")

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_module(cls, loss: Any, fn: str = "pkfast.LossSpec") -> "LossSpec":
        """A spec from ``nn.CrossEntropyLoss`` / ``nn.MSELoss``, a ``LossSpec``, a recorded dict, or the
        strings ``"cross_entropy"`` / ``"mse"`` (mean reduction)."""
        if isinstance(loss, LossSpec):
            return loss
        if isinstance(loss, str):
            return cls(kind=loss, _fn=fn)
        if isinstance(loss, dict):
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
        raise TypeError(
            f"{fn}: cannot read a loss convention from {type(loss).__name__}; expected nn.CrossEntropyLoss, "
            "nn.MSELoss, a pkfast.LossSpec or 'cross_entropy'/'mse'. Other losses: write ℓ_i and λ_i yourself "
            "(docs/math.md §4)"
        )

    def to_meta(self) -> dict[str, Any]:
        """A JSON-serialisable dict (what the recorder stores); :meth:`from_module` reads it back."""
        return {"kind": self.kind, "reduction": self.reduction,
                "weight": None if self.weight is None else list(self.weight),
                "label_smoothing": self.label_smoothing, "ignore_index": self.ignore_index}

    def check_targets(self, y: torch.Tensor, C: int, name: str, fn: str) -> None:
        """Raise a clear error unless ``y`` are valid targets for a model with C outputs."""
        if self.kind == "cross_entropy":
            if y.is_floating_point() or y.ndim != 1:
                raise ValueError(f"{fn}: cross_entropy targets {name} must be class indices of shape [n]; found "
                                 f"{y.dtype} of shape {tuple(y.shape)}")
            bad = (y != self.ignore_index) & ((y < 0) | (y >= C))
            if bool(bad.any()):
                raise ValueError(f"{fn}: {name} holds class {int(y[bad][0])}; the model has {C} outputs "
                                 f"(classes 0…{C - 1})")
        elif tuple(y.reshape(y.shape[0], -1).shape[1:]) != (C,):
            raise ValueError(f"{fn}: mse targets {name} must have C = {C} values per sample; found shape "
                             f"{tuple(y.shape)}")

    # ------------------------------------------------------------------ per sample and per batch
    def _w(self, like: torch.Tensor) -> torch.Tensor | None:
        return None if self.weight is None else torch.tensor(self.weight, dtype=like.dtype, device=like.device)

    def per_sample(self, f: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """ℓ(f, y) for one sample: ``f`` is the model's output flattened to [C]; returns a 0-d tensor.

        Written with plain tensor ops so that ``torch.func`` can ``vmap`` and differentiate it."""
        if self.kind == "mse":
            return ((f - y.reshape(f.shape).to(f.dtype)) ** 2).sum()
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

    def batch_weights(self, y: torch.Tensor, num_outputs: int) -> torch.Tensor:
        """λ_i for the samples of one batch (targets ``y``), float64."""
        y = torch.as_tensor(y)
        n = int(y.shape[0])
        if self.reduction == "sum":
            lam = torch.ones(n, dtype=torch.float64)
        elif self.kind == "mse":
            lam = torch.full((n,), 1.0 / (n * num_outputs), dtype=torch.float64)
        else:
            yi = y.reshape(n).to(torch.int64)
            valid = yi != self.ignore_index
            if self.weight is not None:
                w = torch.tensor(self.weight, dtype=torch.float64)
                den = w[yi[valid]].sum()
            else:
                den = valid.sum().to(torch.float64)
            lam = torch.full((n,), 1.0, dtype=torch.float64) / den if den > 0 else torch.zeros(n, dtype=torch.float64)
        if self.kind == "cross_entropy":
            lam = lam * (torch.as_tensor(y).reshape(n) != self.ignore_index).to(torch.float64)
        return lam

    def batch_loss(self, f: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Σ_i λ_i ℓ(f_i, y_i): equals the loss module's value on the batch."""
        f2 = f.reshape(f.shape[0], -1)
        per = torch.stack([self.per_sample(f2[i], y[i]) for i in range(f2.shape[0])])
        return (self.batch_weights(y, f2.shape[1]).to(per.dtype) * per).sum()

    def output_grad(self, f: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """g = ∇_f ℓ(f, y) per sample: ``f`` [n, C] → [n, C]."""
        f = f.detach().requires_grad_(True)
        with torch.enable_grad():
            per = torch.func.vmap(self.per_sample)(f, y)
            (g,) = torch.autograd.grad(per.sum(), f)
        return g
