"""checks: the validation helpers of the typed recording (:mod:`pkfast.trajectory.recording`) and its optimizer
state records (:mod:`pkfast.trajectory.optimizers`): each raises a ValueError saying what was expected, what was
found and what to do."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

_FN = "pkfast.Recording"


def _bad(where: str, expected: str, found: Any, todo: str = "") -> ValueError:
    tail = f". {todo}" if todo else ""
    return ValueError(f"{_FN}: {where}: expected {expected}; found {found!r}{tail}")


_FIX = "the recording's JSON files were edited or written by another tool: re-record, or repair the value"


def _number(where: str, v: Any, *, low: float | None = None, below: float | None = None) -> float:
    if isinstance(v, list) and len(v) == 1:  # a one-element tensor hyper-parameter (torch allows lr=tensor([…]))
        v = v[0]
    ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
    ok = ok and (low is None or v >= low) and (below is None or v < below)
    if not ok:
        rng = "" if low is None else f" ≥ {low:g}" + ("" if below is None else f" and < {below:g}")
        raise _bad(where, f"a finite number{rng}", v, _FIX)
    return float(v)


def _flag(where: str, v: Any) -> bool:
    if not isinstance(v, bool):
        raise _bad(where, "true or false", v, _FIX)
    return v


def _count(where: str, v: Any, low: int) -> int:
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < low:
        raise _bad(where, f"an integer ≥ {low}", v, _FIX)
    return int(v)


def _indices(where: str, v: Any) -> np.ndarray:
    try:
        a = np.asarray(v)
    except (TypeError, ValueError):
        a = None
    if a is None or a.dtype == object or (a.size and not np.issubdtype(a.dtype, np.integer)):
        raise _bad(where, "a list of integer training indices", v if a is None else type(v).__name__,
                   "pass the ordered indices into the training set")
    a = a.astype(np.int64).reshape(-1)
    a.flags.writeable = False
    return a


def _set(obj: Any, name: str, value: Any) -> None:
    """Replace field ``name`` of a frozen dataclass with its validated value."""
    object.__setattr__(obj, name, value)
