"""fingerprints: what the model saw at each recorded step — a CRC-32 per batch row of its inputs.

The recorder (:class:`pkfast.TrajectoryRecorder`, ``fingerprint=True``, the default) watches the model's forward
calls through a forward pre-hook (:class:`InputCapture`) and stores, with each step that records its batch indices,
one CRC-32 per row of each tensor input of the training forward pass, under the step line's key
``"input_fingerprints"`` (:data:`KEY`)::

    "input_fingerprints": {"0": {"shape": [20], "dtype": "float32", "crc32": [3735928559, ...]}}

An input is named by its position (``"0"``: the first positional argument) or its keyword (``"input_ids"``), the
names :func:`pkfast.engine.inputs.pack` gives a plain tensor, a tuple and a mapping of ``X_train``. ``shape`` is
the shape of one row and ``dtype`` the dtype the model received. The CRC is taken of a row's bytes in a canonical
form — floating rows as float32, integer and boolean rows as int64, contiguous, on the CPU — so a float64
``X_train`` matches a float32 training run made from it. The fingerprints sit in the step's own line of
``steps.jsonl``: written, committed, truncated on resume and read exactly as the rest of the step.

Which forward calls count: those made with autograd enabled (evaluation under ``torch.no_grad()`` does not) and not
inside a ``torch.func`` transform or ``torch.compile`` trace, since the last :meth:`~TrajectoryRecorder.step`.
One call whose rows match the batch, several whose rows add up to it (micro-batches, in order), or several
identical calls: the step keeps them; anything else (calls on other data, row counts that do not add up,
rows whose shape changes between micro-batches) keeps no fingerprint of that input rather than a wrong one.
:func:`pkfast.machine.data_check.check_data` compares them with ``X_train``.
"""

from __future__ import annotations

import zlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

__all__ = ["KEY", "LeafPrints", "InputCapture", "row_crcs", "step_prints"]

#: The key of a step line holding its inputs' fingerprints.
KEY = "input_fingerprints"
#: Forward calls kept between two recorded steps at most (a loop that never steps keeps no unbounded list).
MAX_CALLS = 256
#: Whether a ``torch.compile`` trace is running (torch ≥ 2.3 tells; earlier versions trace no hook of ours here).
_compiling = getattr(getattr(torch, "compiler", None), "is_compiling", None) or (lambda: False)


def row_crcs(x: torch.Tensor, dtype: torch.dtype | None = None) -> np.ndarray:
    """The CRC-32 of each row of ``x`` (its first axis) in canonical form (floating: float32; integer and bool:
    int64), as int64; ``dtype``: first cast ``x`` to the dtype the model saw in training.

    Example:
        >>> import torch
        >>> x = torch.arange(6.0).reshape(2, 3)
        >>> bool((row_crcs(x) == row_crcs(x.double())).all())   # float64 rows hash as their float32 value
        True
        >>> int(row_crcs(torch.tensor([[1, 2]]))[0]) == int(row_crcs(torch.tensor([[1, 2]], dtype=torch.int8))[0])
        True
    """
    x = x.detach()
    if dtype is not None and x.dtype != dtype:
        x = x.to(dtype)
    x = x.to("cpu", torch.float32 if x.is_floating_point() else torch.int64)
    a = x.reshape(x.shape[0], -1).contiguous().numpy()
    return np.fromiter((zlib.crc32(r) for r in a), dtype=np.int64, count=a.shape[0])


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def torch_dtype(name: str) -> torch.dtype | None:
    """The torch dtype called ``name`` (``"float32"``), or None if there is none."""
    dt = getattr(torch, name, None) if isinstance(name, str) else None
    return dt if isinstance(dt, torch.dtype) else None


@dataclass(frozen=True)
class LeafPrints:
    """One input's fingerprints at one step: its row shape, the dtype the model received, a CRC-32 per row."""

    shape: tuple[int, ...]
    dtype: str
    crc32: np.ndarray

    def to_json(self) -> dict[str, Any]:
        return {"shape": list(self.shape), "dtype": self.dtype, "crc32": self.crc32.tolist()}


class InputCapture:
    """A forward pre-hook on ``model`` keeping the fingerprints of its tensor inputs per forward call until
    :meth:`take` hands over those of a step's batch."""

    def __init__(self, model: torch.nn.Module) -> None:
        self._calls: list[dict[str, LeafPrints]] = []
        self._overflow = False
        self._handle = model.register_forward_pre_hook(self._before_forward, with_kwargs=True)

    def _before_forward(self, module, args, kwargs):
        if not torch.is_grad_enabled() or _compiling():
            return None
        call = {}
        for name, v in [(str(i), a) for i, a in enumerate(args)] + list(kwargs.items()):
            if not isinstance(v, torch.Tensor) or v.ndim == 0 or v.is_complex():
                continue
            try:
                call[str(name)] = LeafPrints(tuple(v.shape[1:]), _dtype_name(v.dtype), row_crcs(v))
            except RuntimeError:  # a torch.func-wrapped or storage-less tensor: not a training batch
                return None
        if call:
            if len(self._calls) >= MAX_CALLS:
                self._overflow = True
            else:
                self._calls.append(call)
        return None

    def take(self, n: int | None) -> dict[str, dict[str, Any]] | None:
        """The fingerprints of a batch of ``n`` rows from the forward calls since the last take, as JSON (None:
        none can be told apart; ``n=None``: discard them)."""
        calls, overflow = self._calls, self._overflow
        self._calls, self._overflow = [], False
        if n is None or overflow or not calls:
            return None
        out = {}
        for name in set.intersection(*(set(c) for c in calls)):
            leaf = _choose([c[name] for c in calls], n)
            if leaf is not None:
                out[name] = leaf.to_json()
        return dict(sorted(out.items())) or None

    def remove(self) -> None:
        self._handle.remove()
        self._calls = []


def _choose(seen: list[LeafPrints], n: int) -> LeafPrints | None:
    """One input's prints for a batch of ``n`` rows from its prints in each call (see the module's docstring)."""
    if sum(len(p.crc32) for p in seen) == n and len({(p.shape, p.dtype) for p in seen}) == 1:
        return LeafPrints(seen[0].shape, seen[0].dtype, np.concatenate([p.crc32 for p in seen]))
    full = [p for p in seen if len(p.crc32) == n]
    if full and all(p.shape == full[0].shape and p.dtype == full[0].dtype and np.array_equal(p.crc32, full[0].crc32)
                    for p in full):
        return full[0]
    return None


def _bad(step: int, what: str, found: Any) -> ValueError:
    return ValueError(f"pkfast: step {step}: {KEY}: expected {what}; found {found!r:.80}. The recording's "
                      "steps.jsonl was edited or written by another tool: re-record, or remove the key from its lines "
                      "(or pass check_data=False to the kernel machine)")


def step_prints(index: int, extra: Mapping[str, Any]) -> dict[str, LeafPrints] | None:
    """The fingerprints recorded with step ``index`` (its line's extra keys ``extra``), validated; None when the step
    has none (a recording made before pkfast took them, or with ``fingerprint=False``)."""
    d = extra.get(KEY)
    if d is None:
        return None
    if not isinstance(d, Mapping):
        raise _bad(index, "a JSON object {input name: {shape, dtype, crc32}}", d)
    out = {}
    for name, v in d.items():
        if not isinstance(v, Mapping) or not {"shape", "dtype", "crc32"} <= set(v):
            raise _bad(index, f'input {name!r}: a JSON object {{"shape", "dtype", "crc32"}}', v)
        shape, dt, crc = v["shape"], v["dtype"], v["crc32"]
        if not isinstance(shape, list) or not all(isinstance(s, int) and s >= 0 for s in shape):
            raise _bad(index, f"input {name!r}: shape, a list of sizes", shape)
        if torch_dtype(dt) is None:
            raise _bad(index, f"input {name!r}: dtype, a torch dtype name", dt)
        if not isinstance(crc, list) or not all(isinstance(c, int) and 0 <= c < 2 ** 32 for c in crc):
            raise _bad(index, f"input {name!r}: crc32, a list of CRC-32 values", crc)
        out[str(name)] = LeafPrints(tuple(shape), dt, np.asarray(crc, dtype=np.int64).reshape(-1))
    return out
