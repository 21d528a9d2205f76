"""integrations.hf: record a Hugging Face ``Trainer`` run as a pkfast trajectory (``pip install 'pkfast[hf]'``).

    from pkfast.integrations.hf import TrajectoryCallback
    trainer = transformers.Trainer(model, args, train_dataset=ds,
                                   callbacks=[TrajectoryCallback("run/traj", every=1)])
    trainer.train()
    traj = pkfast.Trajectory.load("run/traj")                     # w_0 … w_T and the applied lrs

The recorder starts at ``on_train_begin`` (w_0: the weights the first step starts from) and records after each
optimizer step (``on_step_end``: after gradient accumulation, clipping and the scheduler; a step the optimizer
skipped, e.g. on an fp16 overflow, records nothing). Batch indices are not recorded (the Trainer's sampler does
not expose them): the trajectory serves ``gram``, ``plan``, ``sketch`` and :mod:`pkfast.attribution`; the
exact kernel machine needs them and refuses.
"""

from __future__ import annotations

import os
from typing import Any

import transformers

from pkfast.integrations import LoopRecorder

__all__ = ["TrajectoryCallback"]


class TrajectoryCallback(transformers.TrainerCallback):
    """A ``TrainerCallback`` recording the trajectory to ``path`` (every ``every`` optimizer steps; other
    arguments as :class:`pkfast.TrajectoryRecorder`). ``.recorder`` is the live recorder during training."""

    def __init__(self, path: str | os.PathLike, *, every: int = 1, overwrite: bool = False, resume: bool = False,
                 fsync: bool = False, buffers: bool = True, loss: Any = None, meta: dict | None = None) -> None:
        self._loop = LoopRecorder(path, every=every, overwrite=overwrite, resume=resume, fsync=fsync,
                                  buffers=buffers, loss=loss, meta=meta)

    @property
    def recorder(self):
        return self._loop.recorder

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        if model is None or optimizer is None:
            raise RuntimeError("pkfast.integrations.hf.TrajectoryCallback: the Trainer passed no model or optimizer "
                               "to on_train_begin")
        self._loop.start(model, optimizer, f"transformers.Trainer {transformers.__version__}")

    def on_step_end(self, args, state, control, **kwargs):
        self._loop.after_step()

    def on_train_end(self, args, state, control, **kwargs):
        self._loop.finish()
