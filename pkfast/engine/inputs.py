"""inputs: samples and outputs as the training stacks have them. A mapping of tensors (a tokenizer's
``BatchEncoding``, ``{"input_ids": …, "attention_mask": …}``) or a tuple of tensors is split per sample along the
first dimension and packed into one ``[n, F]`` tensor that the engine indexes, chunks and vmaps like any other;
the model is adapted to unpack it into keyword (mapping) or positional (tuple) arguments and to reduce what it
returns — a ``ModelOutput``, dict or tuple — to one tensor, by ``output_fn`` or the default rule
(:func:`reduce_output`).

Packing is exact: integer fields travel as int64 when every field is integer; mixed integer and floating fields
travel as the computation's floating dtype (float32 or float64), so their integers must be below 2²⁴ (exact in
float32; token ids and masks are).
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from pkfast import _checks

__all__ = ["Packing", "pack", "adapt", "reduce_output", "num_samples", "take"]

#: integers in mixed packs must stay below this (exact in float32)
EXACT_INT = 2 ** 24


@dataclass(frozen=True)
class Packing:
    """How samples were packed: ``kind`` "mapping" (keyword arguments) or "tuple" (positional), the fields'
    names, per-sample shapes and dtypes."""

    kind: str
    keys: tuple
    shapes: tuple[tuple[int, ...], ...]
    dtypes: tuple[torch.dtype, ...]

    @property
    def integer(self) -> bool:
        """Every field integer (or bool): packed as int64, never cast."""
        return not any(d.is_floating_point for d in self.dtypes)

    def describe(self) -> str:
        fields = ", ".join(f"{k}: {list(s)} {str(d).replace('torch.', '')}"
                           for k, s, d in zip(self.keys, self.shapes, self.dtypes))
        return f"{self.kind} of {len(self.keys)} field(s) per sample ({fields})"

    def unpack(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The fields of packed samples ``[n, F]`` in their shapes and dtypes."""
        out, o = [], 0
        for shape, dt in zip(self.shapes, self.dtypes):
            size = int(np.prod(shape, dtype=np.int64))
            part = x[:, o:o + size].reshape(x.shape[0], *shape)
            out.append(part if part.dtype == dt or dt.is_floating_point and part.is_floating_point() else part.to(dt))
            o += size
        return out


def is_structured(X: Any) -> bool:
    """Whether samples are a mapping or tuple of arrays (not one tensor)."""
    return isinstance(X, Mapping) or (isinstance(X, (tuple, list)) and len(X) > 0 and all(
        isinstance(v, (torch.Tensor, np.ndarray)) for v in X))


def num_samples(X: Any) -> int:
    """Samples in ``X``: an array's first dimension, or a mapping's/tuple's first field's."""
    if isinstance(X, Mapping):
        X = next(iter(X.values()))
    elif is_structured(X):
        X = X[0]
    return int(X.shape[0])


def take(X: Any, rows: Any) -> Any:
    """Samples ``rows`` (a slice or indices) of ``X``, in X's structure (every field indexed alike)."""
    if isinstance(X, Mapping):
        return {k: v[rows] for k, v in X.items()}
    if is_structured(X):
        return type(X)(v[rows] for v in X)
    return X[rows]


def pack(fn: str, name: str, X: Any, packing: Packing | None = None) -> tuple[torch.Tensor, Packing | None]:
    """``X`` as one ``[n, *features]`` tensor and its packing (None for a plain tensor). A second sample set is
    packed against the first one's ``packing`` and must have the same fields, per-sample shapes and dtypes."""
    if not is_structured(X):
        if packing is not None:
            raise TypeError(f"{fn}: {name} is a {type(X).__name__} while the first sample set is a "
                            f"{packing.describe()}; expected the same structure")
        return _checks.as_input_tensor(fn, name, X), None
    if isinstance(X, Mapping):
        kind, items = "mapping", [(k, v) for k, v in X.items() if v is not None]
        bad = [k for k, _ in items if not isinstance(k, str)]
        if bad:
            raise TypeError(f"{fn}: {name} is a mapping with non-string key {bad[0]!r}; expected argument names")
    else:
        kind, items = "tuple", list(enumerate(X))
    if not items:
        raise ValueError(f"{fn}: {name} is an empty {kind}; expected at least one array of samples")
    fields = [(k, _checks.as_input_tensor(fn, f"{name}[{k!r}]", v)) for k, v in items]
    n = fields[0][1].shape[0]
    for k, v in fields:
        if v.shape[0] != n:
            raise ValueError(f"{fn}: {name}[{k!r}] has {v.shape[0]} samples while {name}[{fields[0][0]!r}] has {n}; "
                             "every field is split per sample along the first dimension")
    got = Packing(kind, tuple(k for k, _ in fields), tuple(tuple(v.shape[1:]) for _, v in fields),
                 tuple(v.dtype for _, v in fields))
    if packing is not None and got != packing:
        raise ValueError(f"{fn}: {name} is a {got.describe()}; expected the first sample set's {packing.describe()}")
    if got.integer:
        packed = torch.cat([v.reshape(n, -1).to(torch.int64) for _, v in fields], dim=1)
    else:
        for k, v in fields:
            if not v.is_floating_point() and v.numel() and int(v.abs().max()) >= EXACT_INT:
                raise ValueError(f"{fn}: {name}[{k!r}] holds integers up to {int(v.abs().max())}; mixed integer and "
                                 f"floating fields travel in the floating dtype, exact for integers below 2^24")
        packed = torch.cat([v.reshape(n, -1).to(torch.float64) for _, v in fields], dim=1)
    return packed, got


def reduce_output(out: Any) -> torch.Tensor:
    """The default rule for what a model returns: a tensor as it is; a mapping or ``ModelOutput`` its ``"logits"``,
    else its only tensor; a tuple or list its first element (Hugging Face's ``return_dict=False`` order)."""
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, Mapping):
        if "logits" in out and isinstance(out["logits"], torch.Tensor):
            return out["logits"]
        tensors = [k for k, v in out.items() if isinstance(v, torch.Tensor)]
        if len(tensors) == 1:
            return out[tensors[0]]
        raise TypeError(f"the model returned a {type(out).__name__} with keys {list(out)[:8]} and no 'logits'; pass "
                        "output_fn= to say which tensor is the output (e.g. output_fn=lambda o: o['last_hidden_state'])")
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    raise TypeError(f"the model returned a {type(out).__name__}; expected a tensor, a mapping or ModelOutput with "
                    "'logits', or a tuple whose first element is the output — or pass output_fn=")


def adapt(model: nn.Module, packing: Packing | None, output_fn: Callable[[Any], torch.Tensor] | None = None,
          *, reduce: bool = False) -> nn.Module:
    """``model`` taking packed samples and returning one tensor: a shallow copy sharing every parameter, buffer
    and submodule (so names, hooks and the trajectory match) whose ``forward`` unpacks ``packing`` into keyword or
    positional arguments and applies ``output_fn`` (or, with ``reduce``, :func:`reduce_output`). The model itself
    when there is nothing to adapt."""
    if packing is None and output_fn is None and not reduce:
        return model
    inner = model.forward
    final = output_fn if output_fn is not None else reduce_output
    if getattr(output_fn, "takes_reduced", False):  # (an output sketch over the default rule's outputs)
        final = lambda out: output_fn(reduce_output(out))  # noqa: E731

    def forward(x: torch.Tensor) -> torch.Tensor:
        if packing is None:
            out = inner(x)
        elif packing.kind == "mapping":
            out = inner(**dict(zip(packing.keys, packing.unpack(x))))
        else:
            out = inner(*packing.unpack(x))
        y = final(out)
        if not isinstance(y, torch.Tensor):
            raise TypeError(f"output_fn returned a {type(y).__name__}; expected a tensor of outputs [n, *out]")
        return y

    adapted = copy.copy(model)
    adapted.forward = forward  # an instance attribute: the original model is untouched
    adapted._pkfast_adapted = (packing, getattr(output_fn, "__qualname__", None) if output_fn is not None else None)
    return adapted
