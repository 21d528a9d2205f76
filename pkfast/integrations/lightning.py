"""integrations.lightning: record a Lightning run as a pkfast trajectory (``pip install 'pkfast[lightning]'``;
``lightning`` or ``pytorch_lightning``).

    from pkfast.integrations.lightning import TrajectoryCallback
    trainer = lightning.Trainer(max_steps=100, callbacks=[TrajectoryCallback(
        "run/traj", batch_indices=lambda batch: batch["index"])])
    trainer.fit(module, loader)

The recorder starts at ``on_train_start`` with the module's trainable parameters (names as in
``module.named_parameters()``) and the first optimizer, and records after each optimizer step
(``on_train_batch_end`` when the optimizer stepped: gradient accumulation and skipped steps record nothing).
``batch_indices``, a function of the batch, gives each step's training indices (e.g. a dataset that returns its
index with each sample) — what the exact kernel machine needs. The fingerprints of the inputs (``fingerprint=True``)
are taken from calls of the LightningModule itself (``self(x)`` in ``training_step``), not of a submodule.
"""

from __future__ import annotations

import os
from typing import Any, Callable

try:
    import lightning.pytorch as pl
except ImportError:  # the older package name
    import pytorch_lightning as pl

from pkfast.integrations import LoopRecorder

__all__ = ["TrajectoryCallback"]


class TrajectoryCallback(pl.Callback):
    """A Lightning ``Callback`` recording the trajectory to ``path`` (every ``every`` optimizer steps; other
    arguments as :class:`pkfast.TrajectoryRecorder`); ``batch_indices(batch)`` → the step's training indices."""

    def __init__(self, path: str | os.PathLike, *, every: int = 1, batch_indices: Callable[[Any], Any] | None = None,
                 overwrite: bool = False, resume: bool = False, fsync: bool = False, buffers: bool = True,
                 loss: Any = None, targets: Any = None, meta: dict | None = None, fingerprint: bool = True) -> None:
        self._loop = LoopRecorder(path, every=every, overwrite=overwrite, resume=resume, fsync=fsync,
                                  buffers=buffers, loss=loss, targets=targets, meta=meta, fingerprint=fingerprint)
        self._indices = batch_indices

    @property
    def recorder(self):
        return self._loop.recorder

    def on_train_start(self, trainer, pl_module):
        if len(trainer.optimizers) != 1:
            raise ValueError(f"pkfast.integrations.lightning.TrajectoryCallback: the module has "
                             f"{len(trainer.optimizers)} optimizers; a trajectory has one step size per step")
        self._loop.start(pl_module, trainer.optimizers[0], f"lightning {pl.__version__}")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        rec = self._loop.recorder
        if rec is None or rec.pending == 0:
            return
        self._loop.after_step(None if self._indices is None else self._indices(batch))

    def on_train_end(self, trainer, pl_module):
        self._loop.finish()
