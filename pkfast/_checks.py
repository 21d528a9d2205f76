"""User-facing validation: every message says what was expected and what was found."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import torch

_BATCH_DEPENDENT = (torch.nn.modules.batchnorm._BatchNorm,)
_RANDOM = (torch.nn.modules.dropout._DropoutNd,)


def check_choice(fn: str, name: str, value: Any, choices: Iterable[str]) -> str:
    choices = tuple(choices)
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{fn}: unknown {name}={value!r}; expected one of {', '.join(map(repr, choices))}")
    return value


def check_nodes(fn: str, nodes: Any) -> int:
    """Gauss–Legendre nodes per step: an integer in [1, 64]."""
    if isinstance(nodes, bool) or not isinstance(nodes, int) or not 1 <= nodes <= 64:
        raise ValueError(f"{fn}: nodes must be an integer in [1, 64] (Gauss–Legendre nodes per step); found {nodes!r}")
    return nodes


def preview(items: Sequence[Any], k: int = 6, fmt: Any = repr) -> str:
    """The first k items, then how many there are in all."""
    items = list(items)
    shown = ", ".join(map(fmt, items[:k]))
    return shown + (f", … ({len(items)} in all)" if len(items) > k else "")


def as_target_tensor(fn: str, name: str, y: Any, n: int) -> torch.Tensor:
    """Targets for n samples (class indices [n] or regression targets [n, …]) as a tensor."""
    if isinstance(y, (list, tuple)):
        y = np.asarray(y)
    y = as_input_tensor(fn, name, y)
    if y.shape[0] != n:
        raise ValueError(f"{fn}: {name} has {y.shape[0]} targets; expected one per sample ({n})")
    return y


def as_input_tensor(fn: str, name: str, X: Any) -> torch.Tensor:
    """Accept a torch.Tensor or numpy array of samples (first axis); reject anything else."""
    if isinstance(X, np.ndarray):
        if X.dtype == object:
            raise TypeError(f"{fn}: {name} is a numpy array of dtype object; expected a numeric array")
        X = torch.from_numpy(np.ascontiguousarray(X))
    elif not isinstance(X, torch.Tensor):
        raise TypeError(
            f"{fn}: {name} must be a torch.Tensor or numpy.ndarray of shape [n, *features]; "
            f"found {type(X).__name__}"
        )
    if X.ndim == 0:
        raise ValueError(f"{fn}: {name} must have a leading sample axis, shape [n, *features]; found a scalar")
    if X.shape[0] == 0:
        raise ValueError(f"{fn}: {name} is empty (shape {tuple(X.shape)}); expected at least one sample")
    if X.is_complex():
        raise TypeError(f"{fn}: {name} is complex ({X.dtype}); expected real or integer inputs")
    if X.is_floating_point():
        finite = torch.isfinite(X)
        if not bool(finite.all()):
            bad = (~finite).reshape(X.shape[0], -1).any(dim=1).nonzero().reshape(-1)
            raise ValueError(
                f"{fn}: {name} contains NaN or Inf in {bad.numel()} sample(s), first at index {int(bad[0])}"
            )
    return X


def check_feature_shapes(fn: str, X: torch.Tensor, X2: torch.Tensor) -> None:
    if X.shape[1:] != X2.shape[1:]:
        raise ValueError(
            f"{fn}: X and X2 must have the same per-sample shape; X has {tuple(X.shape[1:])} "
            f"(shape {tuple(X.shape)}) while X2 has {tuple(X2.shape[1:])} (shape {tuple(X2.shape)})"
        )
    if X.is_floating_point() != X2.is_floating_point():
        raise TypeError(f"{fn}: X is {X.dtype} while X2 is {X2.dtype}; expected both floating or both integer")


def check_model(fn: str, model: Any) -> torch.nn.Module:
    """The per-sample kernel exists only if each sample's output depends on that sample alone, deterministically."""
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"{fn}: model must be a torch.nn.Module; found {type(model).__name__}")
    for name, m in model.named_modules():
        where = f"module {name!r}" if name else "the model"
        if isinstance(m, _BATCH_DEPENDENT) and m.training:
            raise ValueError(
                f"{fn}: {where} ({type(m).__name__}) is in training mode, so each sample's output depends on the "
                "rest of its batch and the per-sample kernel is undefined. Call model.eval() first "
                "(BatchNorm then uses its running statistics), or use GroupNorm/LayerNorm."
            )
        if isinstance(m, _RANDOM) and m.training and float(getattr(m, "p", 0.0)) > 0:
            raise ValueError(
                f"{fn}: {where} ({type(m).__name__}, p={m.p}) is in training mode, so the model's output is random "
                "and the kernel is undefined. Call model.eval() first."
            )
    return model


def check_memory_budget(fn: str, memory_budget: Any) -> int | None:
    if memory_budget is None:
        return None
    if isinstance(memory_budget, str):
        return parse_bytes(fn, memory_budget)
    if isinstance(memory_budget, bool) or not isinstance(memory_budget, (int, float)) or memory_budget <= 0:
        raise ValueError(
            f"{fn}: memory_budget must be a positive number of bytes or a string like '2GiB'; found {memory_budget!r}"
        )
    return int(memory_budget)


_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40, "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40}


def parse_bytes(fn: str, text: str) -> int:
    """'512MiB' → 536870912; '2GB' → 2e9; '1.5G' → 1.5 GiB."""
    s = text.strip().lower().replace(" ", "")
    num = s.rstrip("abcdefghijklmnopqrstuvwxyz")
    unit = s[len(num):]
    try:
        value = float(num)
    except ValueError:
        value = -1.0
    if unit not in _UNITS or value <= 0:
        raise ValueError(
            f"{fn}: memory_budget {text!r} is not a size; expected e.g. 536870912, '512MiB', '2GB' or '1.5G'"
        )
    return int(value * _UNITS[unit])


def check_dtype(fn: str, dtype: Any) -> torch.dtype:
    if dtype is None:
        return torch.float32
    if isinstance(dtype, str):
        dtype = {"float32": torch.float32, "float64": torch.float64, "fp32": torch.float32,
                 "fp64": torch.float64, "double": torch.float64, "float": torch.float32}.get(dtype, dtype)
    if dtype not in (torch.float32, torch.float64):
        raise ValueError(f"{fn}: dtype must be torch.float32 or torch.float64; found {dtype!r}")
    return dtype
