"""state: the optimizer-state rows of a recorded trajectory (``state.bin``), read lazily and checked against their
checksums (``state.crc``) on first read — the per-step preconditioner of an adaptive optimizer
(:mod:`pkfast.trajectory.optimizers` says what a row holds; :mod:`pkfast.trajectory.files` how it is written).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pkfast.trajectory.files import STATE_CHECKSUMS, check_row, complete_rows, read_checksums
from pkfast.trajectory.recording import OptimizerSpec, Recording

#: the ``state.kind`` of a preconditioner known at checkpoints only (:mod:`pkfast.trajectory.checkpoint_state`)
CHECKPOINT_KIND = "preconditioner_at_checkpoints"

__all__ = ["StateRows", "OptimizerRecord", "clip_coefficients"]


def clip_coefficients(recording: Recording) -> torch.Tensor:
    """c_s, each step's gradient-clipping coefficient as recorded (float64): 1 where a recording that measured
    clipping shows none, NaN where the step's gradient is not known to be one scalar times its backward passes'
    (:attr:`~pkfast.trajectory.recording.StepRecord.clip_scalar` False, or clipping not measured).

    Example:
        >>> from pkfast.trajectory.recording import StepRecord
        >>> clip_coefficients(Recording(steps=(StepRecord(0, 0.1, clip_coef=0.5), StepRecord(1, 0.1))))
        tensor([0.5000,    nan], dtype=torch.float64)
    """
    opt = recording.optimizer
    measured = opt is not None and opt.extra.get("clip_measured") is True
    return torch.tensor([float("nan") if s.clip_scalar is False else s.clip_coef if s.clip_coef is not None
                         else 1.0 if measured else float("nan") for s in recording.steps], dtype=torch.float64)


class StateRows:
    """Rows ``0 … T-1`` of a trajectory's state file: row s the optimizer state after step s (S floats each, the
    trainable parameters' entries of :attr:`entries` in the weights' order).

    Args:
        path: the trajectory directory.
        info: the manifest's ``"state"`` (``file``, ``checksums``, ``dtype``, ``num_params``, ``entries``, ``kind``).
        steps: T, the trajectory's complete steps (each needs its row).
    """

    def __init__(self, path: str | Path, info: Mapping[str, Any], steps: int) -> None:
        self.path = Path(path)
        self.info = dict(info)
        try:
            self.file = str(info["file"])
            self.crc_file = str(info.get("checksums", STATE_CHECKSUMS))
            self.np_dtype = np.dtype(info["dtype"])
            self.width = int(info["num_params"])
            self.entries = [(str(n), tuple(int(d) for d in s)) for n, s in info["entries"]]
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"pkfast.Trajectory.load: {str(self.path)!r}: the manifest's \"state\" is not a state "
                             f"file's description ({e!r}); expected file, dtype, num_params and entries as "
                             "TrajectoryRecorder writes them: re-record, or repair manifest.json") from None
        self.kind = str(info.get("kind", "preconditioner"))
        rows = complete_rows(self.path, self.width, self.np_dtype.itemsize, self.file) if self.width else steps
        if rows < steps:
            raise ValueError(f"pkfast.Trajectory.load: {str(self.path)!r} is damaged: its step log records {steps} "
                             f"steps, each with an optimizer state row, but {self.file} holds only {rows} complete "
                             "rows. The state of the later steps was lost after it was recorded; re-record, or "
                             f"restore {self.file} and {self.crc_file} from a good copy")
        self._mm = np.memmap(self.path / self.file, dtype=self.np_dtype, mode="r", shape=(steps, self.width)) \
            if self.width and steps else np.zeros((steps, self.width), dtype=self.np_dtype)
        self._crcs = read_checksums(self.path, self.crc_file) or {}
        self._ok: set[int] = set()

    def __len__(self) -> int:
        return self._mm.shape[0]

    def row(self, s: int) -> torch.Tensor:
        """Row ``s`` as a CPU tensor (its dtype the recorded state dtype), checked against its checksum on first read
        (:class:`pkfast.trajectory.TrajectoryChecksumError` on a mismatch)."""
        if not 0 <= s < len(self):
            raise IndexError(f"pkfast.Trajectory: step {s} out of range [0, {len(self)}) for its optimizer state")
        r = torch.from_numpy(np.array(self._mm[s]))
        if s not in self._ok:
            check_row(self.path, s, r, self._crcs, file=self.file, crc_file=self.crc_file)
            self._ok.add(s)
        return r

    def verify(self) -> None:
        """Check every row against its checksum now."""
        for s in range(len(self)):
            self.row(s)

    def parts(self, s: int) -> dict[str, torch.Tensor]:
        """Row ``s`` as ``{parameter name: tensor of its shape}``."""
        r, out, a = self.row(s), {}, 0
        for n, shape in self.entries:
            b = a + int(np.prod(shape, dtype=np.int64))
            out[n] = r[a:b].view(shape)
            a = b
        return out


class OptimizerRecord:
    """What :class:`pkfast.Trajectory` says about its optimizer beyond step sizes: the optimizer, each step's
    preconditioner, clipping coefficient and micro-batches (a mixin; the trajectory holds ``recording`` and the state
    rows ``_state``)."""

    _state: StateRows | None
    recording: Recording

    @property
    def optimizer(self) -> OptimizerSpec | None:
        """The recorded optimizer (kind, class, parameter groups at the start; per-step hyper-parameters are in
        :attr:`recording`'s steps), or None when not recorded."""
        return self.recording.optimizer

    @property
    def has_preconditioner(self) -> bool:
        """Whether every step carries its recorded preconditioner row (an adaptive optimizer's recording)."""
        return self._state is not None

    @property
    def preconditioner_source(self) -> str | None:
        """Where the preconditioner rows come from: ``"recorded"`` (every step's, as the step applied it: the exact
        machine's), ``"checkpoints"`` (the optimizer state saved at checkpoints only, segment s taking the one saved
        with w_{s+1}: an approximation between them, for :func:`pkfast.gram`), or None (none)."""
        if self._state is None:
            return None
        return "checkpoints" if self._state.kind == CHECKPOINT_KIND else "recorded"

    def preconditioner(self, step: int, *, as_dict: bool = False) -> torch.Tensor | dict[str, torch.Tensor]:
        """The diagonal preconditioner P_s that step ``step`` applied (:mod:`pkfast.trajectory.optimizers`: e.g.
        Adam's 1/(√v̂_s + ε)), over the trainable parameters in the weights' order (``as_dict``: by name), read
        from ``state.bin`` and checked against its checksum on first read."""
        if self._state is None:
            raise ValueError(f"pkfast.Trajectory.preconditioner: this trajectory records no optimizer state ("
                             f"optimizer: {getattr(self.optimizer, 'class_name', None)}); expected one recorded by "
                             "TrajectoryRecorder with Adam, AdamW, RMSprop or Adagrad")
        return self._state.parts(step) if as_dict else self._state.row(step)

    def clip_coefs(self) -> torch.Tensor:
        """c_s, each step's gradient-clipping coefficient (float64; NaN where not known to be one scalar)."""
        return clip_coefficients(self.recording)

    def micro_batches(self, step: int) -> list[tuple[np.ndarray, float | None]]:
        """Step ``step``'s gradient-accumulation micro-batches, in the order their backward passes ran: (ordered
        training indices, the loss weight recorded for it or None) each; one for a step without accumulation, []
        when the batch was not recorded."""
        st = self.recording.steps[step]
        w = st.micro_weights
        return [(b, None if w is None else w[j]) for j, b in enumerate(st.micro_batches or ())]
