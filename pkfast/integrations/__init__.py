"""integrations: recording trajectories from the training loops people use — a Hugging Face ``TrainerCallback``
(:mod:`pkfast.integrations.hf`, ``pip install 'pkfast[hf]'``) and a Lightning ``Callback``
(:mod:`pkfast.integrations.lightning`, ``pip install 'pkfast[lightning]'``). Each module imports its library; pkfast
itself imports neither."""

from __future__ import annotations

import os
from typing import Any

import torch

from pkfast.trajectory.recorder import TrajectoryRecorder

__all__ = ["LoopRecorder", "unwrap_optimizer"]


def unwrap_optimizer(opt: Any) -> torch.optim.Optimizer:
    """The ``torch.optim.Optimizer`` inside a loop's wrapper (accelerate's ``AcceleratedOptimizer``, Lightning's
    ``LightningOptimizer``), whose step hook sees every applied update."""
    for attr in ("optimizer", "_optimizer"):
        inner = getattr(opt, attr, None)
        if isinstance(inner, torch.optim.Optimizer):
            return unwrap_optimizer(inner)
    if not isinstance(opt, torch.optim.Optimizer):
        raise TypeError(f"pkfast: the training loop's optimizer is a {type(opt).__name__}; expected a "
                        "torch.optim.Optimizer (or a wrapper holding one as .optimizer)")
    return opt


class LoopRecorder:
    """What the callbacks share: a :class:`~pkfast.TrajectoryRecorder` started with the loop, a point after every
    ``every``-th optimizer step (the steps between folded into its weight by :meth:`TrajectoryRecorder.skip`), the
    last point at the end of training, crash-safe like the recorder (a kill loses at most the step being written).
    Only trainable parameters are recorded: a PEFT/LoRA fine-tune records its adapters alone."""

    def __init__(self, path: str | os.PathLike, *, every: int = 1, overwrite: bool = False, resume: bool = False,
                 fsync: bool = False, buffers: bool = True, loss: Any = None, targets: Any = None,
                 meta: dict | None = None, fingerprint: bool = True) -> None:
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise ValueError(f"pkfast: every must be a positive int (record a point every k optimizer steps); "
                             f"found {every!r}")
        self.path, self.every = path, every
        self._kw = dict(overwrite=overwrite, resume=resume, fsync=fsync, buffers=buffers, loss=loss, targets=targets,
                        fingerprint=fingerprint)
        self._meta = dict(meta or {})
        self.recorder: TrajectoryRecorder | None = None
        self.steps = 0

    def start(self, model: torch.nn.Module, optimizer: Any, source: str) -> None:
        if self.recorder is not None:
            self.recorder.close()
        self.recorder = TrajectoryRecorder(model, unwrap_optimizer(optimizer), self.path,
                                           meta={"source": source, "every": self.every, **self._meta}, **self._kw)
        self.steps = 0

    def after_step(self, batch_indices: Any = None) -> None:
        """After the loop's optimizer step (nothing happens when the optimizer did not step)."""
        rec = self.recorder
        if rec is None or rec.pending == 0:
            return
        self.steps += 1
        if self.steps % self.every:
            rec.skip()
        else:
            rec.step(batch_indices=batch_indices if self.every == 1 else None)

    def finish(self) -> None:
        """Record the steps folded since the last point, and close."""
        rec = self.recorder
        if rec is None:
            return
        if rec.pending:  # a step whose callback did not run (e.g. the loop stopped inside it)
            rec.skip()
        rec.flush()
        rec.close()
        self.recorder = None
