"""integrations.hf: record a Hugging Face ``Trainer`` run as a pkfast trajectory (``pip install 'pkfast[hf]'``).

    from pkfast.integrations.hf import TrajectoryCallback
    trainer = transformers.Trainer(model, args, train_dataset=ds,
                                   callbacks=[TrajectoryCallback("run/traj", every=1)])
    trainer.train()
    traj = pkfast.Trajectory.load("run/traj")                     # w_0 … w_T and the applied lrs

The recorder starts at ``on_train_begin`` (w_0: the weights the first step starts from) and records after each
optimizer step (``on_step_end``: after gradient accumulation, clipping and the scheduler; a step the optimizer
skipped, e.g. on an fp16 overflow, records nothing).

**Batch indices**: the Trainer's sampler does not expose them, so a dataset that should have them recorded
returns each sample's index under the key ``"pkfast_index"`` (:data:`INDEX_KEY`); the callback's forward
pre-hook takes that key out of the model's inputs (the model never sees it) while the model trains, and each
step records the indices of its micro-batches. With them, targets and the loss convention (``targets=``,
``loss=``), an SGD run (``optim="sgd"``, ``max_grad_norm=0``) feeds the exact kernel machine, which checks its
``X_train`` against the fingerprints of the model's inputs recorded at each step (``fingerprint=True``). The Trainer
drops inputs the model's ``forward`` does not name unless ``TrainingArguments(remove_unused_columns=False)``.
"""

from __future__ import annotations

import os
from typing import Any

import torch
import transformers

from pkfast.integrations import LoopRecorder

__all__ = ["TrajectoryCallback", "INDEX_KEY"]

#: the key under which a dataset's samples carry their index, for the recorded batches
INDEX_KEY = "pkfast_index"


class TrajectoryCallback(transformers.TrainerCallback):
    """A ``TrainerCallback`` recording the trajectory to ``path`` (every ``every`` optimizer steps; other
    arguments as :class:`pkfast.TrajectoryRecorder`). ``.recorder`` is the live recorder during training."""

    def __init__(self, path: str | os.PathLike, *, every: int = 1, overwrite: bool = False, resume: bool = False,
                 fsync: bool = False, buffers: bool = True, loss: Any = None, targets: Any = None,
                 meta: dict | None = None, fingerprint: bool = True) -> None:
        self._loop = LoopRecorder(path, every=every, overwrite=overwrite, resume=resume, fsync=fsync,
                                  buffers=buffers, loss=loss, targets=targets, meta=meta, fingerprint=fingerprint)
        self._seen: list[torch.Tensor] = []
        self._hook = None

    @property
    def recorder(self):
        return self._loop.recorder

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        if model is None or optimizer is None:
            raise RuntimeError("pkfast.integrations.hf.TrajectoryCallback: the Trainer passed no model or optimizer "
                               "to on_train_begin")
        self._loop.start(model, optimizer, f"transformers.Trainer {transformers.__version__}")
        self._seen = []
        # (before the recorder's own hook: the inputs it fingerprints are the model's, without the index key)
        self._hook = model.register_forward_pre_hook(self._take_indices, with_kwargs=True, prepend=True)

    def _take_indices(self, module, args, kwargs):
        idx = kwargs.pop(INDEX_KEY, None)
        if idx is not None and module.training:
            self._seen.append(torch.as_tensor(idx).reshape(-1).cpu())
        return args, kwargs

    def on_step_end(self, args, state, control, **kwargs):
        seen, self._seen = self._seen, []
        self._loop.after_step(torch.cat(seen) if seen else None)

    def on_train_end(self, args, state, control, **kwargs):
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
        self._loop.finish()
