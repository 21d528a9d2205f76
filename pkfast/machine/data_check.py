"""data_check: refuse training data that is not the data the recording saw.

A kernel machine decomposes the network over ``X_train[b]`` for each recorded batch ``b``; if ``X_train`` is in
another order than the one the batch indices referred to, or was preprocessed differently, it decomposes the network
over data it was never trained on and says nothing (the update residual of :meth:`pkfast.KernelMachine.verify`
grows, but a shuffle within similar points can stay small). Two checks, both on by default
(``KernelMachine(check_data=True)``):

- **inputs**: where the recording carries input fingerprints (:mod:`pkfast.trajectory.fingerprints`: a CRC-32 per
  batch row of what the model received, taken by :class:`pkfast.TrajectoryRecorder`), the CRC-32 of every
  ``X_train[i]`` a recorded step used is recomputed in the same canonical form, after a cast to the dtype the model
  received, and compared, on every step: one CRC per distinct training row, each computed once (the cost of
  reading ``X_train`` once). On a mismatch the refusal names the step, the position in its batch and the training
  index, and says whether the recorded rows are elsewhere in ``X_train`` (permuted) or nowhere (other data).
- **targets**: a ``y_train`` passed along with targets recorded with the trajectory must equal them.

Recordings without fingerprints (made before pkfast took them, with ``fingerprint=False``, or from checkpoints)
are not checked. Inputs whose row shape in training differs from ``X_train``'s (per-batch padding, cropping) cannot
be compared: a warning says how many steps were left unchecked.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from pkfast.engine import inputs
from pkfast.trajectory.fingerprints import row_crcs, step_prints, torch_dtype
from pkfast.trajectory.recording import Recording

__all__ = ["check_data", "check_inputs", "check_targets"]

#: Bytes of ``X_train`` rows hashed at once.
CHUNK_BYTES = 64 * 2**20
_TODO = ("Pass X_train in the order the recorded batch indices refer to (the dataset as the recorder indexed it), "
         "with the same preprocessing as in training; or pass check_data=False to build the machine anyway (it then "
         "decomposes the network over data it was not trained on)")


def check_data(fn: str, recording: Recording, X_train: Any, batches: Sequence[torch.Tensor], y_train: Any = None,
               targets: Any = None) -> int:
    """Refuse ``X_train`` (and ``y_train``) unless they are the data the recording saw; the number of steps whose
    inputs were checked (0 when the recording carries no fingerprints).

    Args:
        fn: the caller's name, for messages.
        recording: the typed recording (:attr:`pkfast.Trajectory.recording`).
        X_train: the training inputs (a tensor or array, or a mapping or tuple of them).
        batches: each step's ordered batch indices (validated against ``len(X_train)``).
        y_train, targets: the training targets given and those recorded with the trajectory (either None: no
            target check).

    Example:
        >>> import torch, pkfast, tempfile
        >>> net, X = torch.nn.Linear(3, 1), torch.randn(6, 3)
        >>> opt, path = torch.optim.SGD(net.parameters(), lr=0.1), tempfile.mkdtemp() + "/t"
        >>> with pkfast.TrajectoryRecorder(net, opt, path) as rec:
        ...     opt.zero_grad(); net(X[[4, 1]]).sum().backward(); opt.step(); rec.step(batch_indices=[4, 1])
        >>> r = pkfast.Trajectory.load(path).recording
        >>> check_data("demo", r, X, [torch.tensor([4, 1])])
        1
        >>> check_data("demo", r, X.flip(0), [torch.tensor([4, 1])])  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ValueError: demo: X_train is not the data the recording saw: at step 0, position 0 of its batch ...
    """
    checked = check_inputs(fn, recording, X_train, batches)
    if y_train is not None and targets is not None:
        check_targets(fn, y_train, targets)
    return checked


def _tensor(v: Any) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(v)) if isinstance(v, np.ndarray) else torch.as_tensor(v)


def _leaves(X: Any) -> dict[str, torch.Tensor]:
    """``X``'s inputs by the names the recorder gives the model's arguments (:mod:`pkfast.trajectory.fingerprints`)."""
    if isinstance(X, Mapping):
        return {str(k): _tensor(v) for k, v in X.items() if v is not None}
    if inputs.is_structured(X):
        return {str(i): _tensor(v) for i, v in enumerate(X)}
    return {"0": _tensor(X)}


def _label(name: str) -> str:
    return f"positional input {name}" if name.isdigit() else f"input {name!r}"


class _Rows:
    """The CRC-32 of X_train's rows for one input as the model received it (one dtype), computed when first needed."""

    def __init__(self, x: torch.Tensor, dtype: torch.dtype) -> None:
        self.x, self.dtype = x, dtype
        self.crc = np.full(x.shape[0], -1, dtype=np.int64)
        self.chunk = max(1, CHUNK_BYTES // max(1, 8 * int(np.prod(x.shape[1:], dtype=np.int64))))

    def get(self, rows: np.ndarray) -> np.ndarray:
        need = np.unique(rows[self.crc[rows] < 0])
        for a in range(0, need.size, self.chunk):
            part = need[a:a + self.chunk]
            self.crc[part] = row_crcs(self.x[torch.from_numpy(part)], self.dtype)
        return self.crc[rows]

    def where(self) -> dict[int, int]:
        """{CRC: the first row of X_train that has it}, over every row."""
        self.get(np.arange(self.x.shape[0]))
        out: dict[int, int] = {}
        for j, c in enumerate(self.crc.tolist()):
            out.setdefault(c, j)
        return out


def check_inputs(fn: str, recording: Recording, X_train: Any, batches: Sequence[torch.Tensor]) -> int:
    """The input half of :func:`check_data` (every step with fingerprints; see the module's docstring)."""
    leaves = _leaves(X_train)
    tables: dict[tuple[str, str], _Rows] = {}
    checked, total, bad_steps, bad_rows, mism, skipped = 0, 0, 0, 0, [], []
    for step, b in zip(recording.steps, batches):
        prints = step_prints(step.index, step.extra)
        if not prints:
            continue
        b = b.numpy() if isinstance(b, torch.Tensor) else np.asarray(b, dtype=np.int64)
        row_bad, compared = np.zeros(b.size, dtype=bool), False
        for name, lp in prints.items():
            x = leaves.get(name)
            if x is None or tuple(x.shape[1:]) != lp.shape:
                continue
            if lp.crc32.size != b.size:
                raise ValueError(f"{fn}: step {step.index} records {lp.crc32.size} input fingerprints for a batch of "
                                 f"{b.size}; expected one per batch row. The recording's steps.jsonl was edited: "
                                 "re-record it, or pass check_data=False")
            t = tables.setdefault((name, lp.dtype), _Rows(x, torch_dtype(lp.dtype)))
            found = t.get(b)
            diff = np.flatnonzero(found != lp.crc32)
            row_bad[diff] = True
            mism += [(step.index, int(p), int(b[p]), name, lp.dtype, int(lp.crc32[p]), int(found[p]))
                     for p in diff[:1000]]
            compared = True
        if not compared:
            skipped.append((step.index, prints))
        checked += compared
        total += b.size if compared else 0
        bad_steps += bool(row_bad.any())
        bad_rows += int(row_bad.sum())
    if mism:
        raise ValueError(_refusal(fn, mism, tables, bad_rows, total, bad_steps, checked))
    if skipped:
        warnings.warn(_unchecked(fn, skipped, leaves, checked), stacklevel=3)
    return checked


def _refusal(fn: str, mism: list, tables: dict, bad_rows: int, total: int, bad_steps: int, checked: int) -> str:
    s, p, i, name, dt, rec, found = mism[0]
    canon = "float32" if torch_dtype(dt).is_floating_point else "int64"
    head = (f"{fn}: X_train is not the data the recording saw: at step {s}, position {p} of its batch (training "
            f"index {i}), {_label(name)} was recorded with CRC-32 {rec:08x}, but X_train[{i}] gives {found:08x} "
            f"(each row hashed as {canon} after a cast to the training dtype {dt}); {bad_rows} of {total} recorded batch "
            f"rows differ, in {bad_steps} of {checked} checked steps. ")
    seen = mism[:200]
    where: dict[tuple[str, str], dict[int, int]] = {}
    moved = []
    for _, _, row, n, d, crc, _ in seen:
        if (n, d) not in where:
            where[(n, d)] = tables[(n, d)].where()
        if crc in where[(n, d)]:
            moved.append((row, where[(n, d)][crc]))
    if moved:
        ex = ", ".join(f"{a} → {b}" for a, b in moved[:3])
        what = ("X_train appears permuted" if 2 * len(moved) >= len(seen) else
                "X_train appears partly permuted or replaced")
        head += (f"{what}: recorded row {moved[0][0]} is at row {moved[0][1]} ({len(moved)} of the {len(seen)} "
                 f"differing rows examined were found at other rows of X_train: {ex}). ")
    else:
        head += ("None of the recorded rows examined is anywhere in X_train: other data, other preprocessing "
                 "(normalisation, a cast to another dtype), or data augmentation in the training loop. ")
    return head + _TODO


def _unchecked(fn: str, skipped: list, leaves: dict, checked: int) -> str:
    s, prints = skipped[0]
    common = [n for n in prints if n in leaves]
    if common:
        n = common[0]
        why = (f"at step {s} the model received {_label(n)} with rows of shape {list(prints[n].shape)}, while "
               f"X_train's have {list(leaves[n].shape[1:])} (per-batch padding or cropping?)")
    else:
        why = (f"the model received {', '.join(map(_label, prints))}, while X_train holds "
               f"{', '.join(map(_label, leaves))}")
    return (f"{fn}: {len(skipped)} of {len(skipped) + checked} steps with recorded input fingerprints could not be "
            f"compared with X_train: {why}; those steps' rows were not checked against the data the model saw "
            "(check_data=False silences this)")


def check_targets(fn: str, y_train: Any, targets: Any) -> None:
    """Refuse a ``y_train`` that differs from the targets recorded with the trajectory (compared in the recorded
    dtype; a fractional value against integer targets differs)."""
    y, r = _tensor(y_train), _tensor(targets)
    if y is r:
        return
    if y.ndim == 0 or r.ndim == 0 or y.shape[0] != r.shape[0] or y[0].numel() != r[0].numel():
        raise ValueError(f"{fn}: y_train has shape {tuple(y.shape)} while the targets recorded with the trajectory have "
                         f"{tuple(r.shape)}; pass the training targets (or leave y_train out to use the recorded "
                         "ones), or pass check_data=False")
    a, b = y.reshape(y.shape[0], -1), r.reshape(r.shape[0], -1)
    cast = a.to(b.dtype)
    bad = cast != b
    if a.is_floating_point() and not b.is_floating_point():
        bad |= cast.to(a.dtype) != a
    rows = torch.nonzero(bad.any(dim=1)).flatten()
    if rows.numel():
        i = int(rows[0])
        raise ValueError(f"{fn}: y_train differs from the targets recorded with the trajectory at {rows.numel()} of "
                         f"{a.shape[0]} rows (first at row {i}: recorded {b[i].tolist()[:6]}, found "
                         f"{a[i].tolist()[:6]}); "
                         "pass the training targets in the recorded order (or leave y_train out to use the recorded "
                         "ones), or pass check_data=False")
