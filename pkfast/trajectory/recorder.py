"""TrajectoryRecorder: appends a model's weights after every optimizer step to an on-disk trajectory.

The format is described in :mod:`pkfast.trajectory.files`; the manifest's metadata and every step's line are
written through the typed record of :mod:`pkfast.trajectory.recording`. Appending never rewrites earlier steps,
and a crash loses at most the step being written. Every weight row gets a CRC-32 checksum line in
``weights.crc``, written after the row and before its step is committed; a resume keeps the checksums of the
rows it keeps (and computes them for a recording made before pkfast wrote checksums). With ``fingerprint=True``
each step's line also holds a CRC-32 per row of the inputs the training forward pass received
(:mod:`pkfast.trajectory.fingerprints`), which the kernel machine checks ``X_train`` against.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pkfast.store import formats
from pkfast.loss import LossSpec
from pkfast.trajectory.points import Trajectory
from pkfast.trajectory.fingerprints import KEY as FINGERPRINTS, InputCapture
from pkfast.trajectory.files import (MANIFEST, STEPS, WEIGHTS, TrajectoryWriter, complete_rows, dtype_name,
                                     keep_checksums, read_manifest, read_steps, save_targets, storage_dtype)
from pkfast.trajectory.recording import STEP_HYPER, GroupHyper, OptimizerKind, OptimizerSpec, Recording, StepRecord

__all__ = ["TrajectoryRecorder"]

class TrajectoryRecorder:
    """Record w_0 … w_T and the applied learning rates of a training run to ``path``.

    Call :meth:`step` after each ``optimizer.step()``. The learning rate is read from
    ``optimizer.param_groups`` by a hook that runs right after ``optimizer.step()``, so it is the rate that
    was *applied*, whether or not a scheduler changes it before :meth:`step` is called.

    What is recorded per point: the model's trainable parameters (``requires_grad=True``; a tensor shared by
    several modules once) and, with ``buffers=True``, its floating-point buffers (e.g. BatchNorm running
    statistics). Frozen parameters do not move and are taken from the model when the kernel is computed.

    Args:
        model: the module being trained.
        optimizer: its optimizer; every parameter group holding trainable parameters must use the same lr.
        path: a directory to create (or, with ``resume=True``, to continue).
        overwrite: replace an existing recording at ``path``.
        resume: continue an existing recording after a restart: the model's current weights must equal one
            of the recorded points ``w_k`` (the recording, its checksums included, is truncated after it).
        buffers: also record floating buffers.
        fsync: ``os.fsync`` after every step (survives power loss, not only a process crash; slower).
        meta: extra JSON-serialisable metadata stored in the manifest.
        loss: the training loss (``nn.CrossEntropyLoss``/``nn.MSELoss`` or a :class:`pkfast.LossSpec`):
            its convention (reduction, class weights, label smoothing, ignore_index) is stored so that the
            exact kernel machine (:class:`pkfast.KernelMachine`) can recompute per-sample loss derivatives.
        targets: the training targets (``[N]`` class indices or ``[N, C]``), saved as ``targets.npy`` in the
            recording (:attr:`pkfast.Trajectory.targets`).
        store_output_grads: also store, per step, the per-sample loss derivatives g_{i,s} = ∂ℓ_i/∂f at the
            outputs the training forward pass produced (pass them as ``rec.step(..., outputs=logits)``); needs
            ``loss`` and ``targets``. |B_s|·C numbers per step, in the step log. The kernel machine compares them
            with the derivatives it recomputes from the model, which exposes a training forward pass that
            differs from the model's (augmentation, dropout, train-mode normalisation): see
            :attr:`pkfast.KernelMachine.output_grad_mismatch`.
        fingerprint: also store, per step, a CRC-32 of every row of the model's tensor inputs in the training
            forward pass (taken by a forward pre-hook on ``model``: calls with autograd enabled since the last
            step; :mod:`pkfast.trajectory.fingerprints`), so that :class:`pkfast.KernelMachine` can refuse an
            ``X_train`` whose rows are not the ones the batch indices stood for (another order, other
            preprocessing). One CRC per batch row, of its float32 (integer: int64) bytes, copied to the CPU.

    Each step records the applied lr, the ordered ``batch_indices`` passed to :meth:`step` and the optimizer's
    hyperparameters at that step (momentum, dampening, nesterov, weight_decay, …), which the exact
    decomposition needs (docs/math.md §8).

    Example:
        >>> import torch, pkfast, tempfile
        >>> net = torch.nn.Linear(4, 2)
        >>> opt = torch.optim.SGD(net.parameters(), lr=0.1)
        >>> X, y = torch.randn(8, 4), torch.randn(8, 2)
        >>> d = tempfile.mkdtemp()
        >>> with pkfast.TrajectoryRecorder(net, opt, d + "/traj") as rec:
        ...     for s in range(3):
        ...         opt.zero_grad(); torch.nn.functional.mse_loss(net(X), y).backward(); opt.step()
        ...         rec.step(batch_indices=range(8))
        >>> pkfast.Trajectory.load(d + "/traj").num_steps
        3
    """

    def __init__(
        self,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        path: str | os.PathLike,
        *,
        overwrite: bool = False,
        resume: bool = False,
        buffers: bool = True,
        fsync: bool = False,
        meta: Mapping[str, Any] | None = None,
        loss: Any = None,
        targets: Any = None,
        store_output_grads: bool = False,
        fingerprint: bool = True,
    ) -> None:
        if not isinstance(model, torch.nn.Module):
            raise TypeError(f"pkfast.TrajectoryRecorder: model must be a torch.nn.Module; found {type(model).__name__}")
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(
                f"pkfast.TrajectoryRecorder: optimizer must be a torch.optim.Optimizer; found {type(optimizer).__name__}"
            )
        if overwrite and resume:
            raise ValueError("pkfast.TrajectoryRecorder: overwrite=True and resume=True exclude each other")
        self.model = model
        self.optimizer = optimizer
        self.path = Path(path)
        self._tensors: list[tuple[str, torch.Tensor]] = [
            (n, p) for n, p in model.named_parameters() if p.requires_grad
        ]
        if not self._tensors:
            raise ValueError("pkfast.TrajectoryRecorder: the model has no trainable parameters (requires_grad=True)")
        if buffers:
            self._tensors += [(n, b) for n, b in model.named_buffers() if b is not None and b.is_floating_point()]
        self._trainable_ids = {id(p) for n, p in model.named_parameters() if p.requires_grad}
        spec = [(n, tuple(t.shape)) for n, t in self._tensors]
        dtype = storage_dtype([t.dtype for _, t in self._tensors])
        self._dtype = dtype
        self._opt_spec = OptimizerSpec.of(optimizer)
        self._loss_spec = None
        if loss is not None:
            self._loss_spec = LossSpec.from_module(loss, fn="pkfast.TrajectoryRecorder")
        if store_output_grads and (loss is None or targets is None):
            raise ValueError("pkfast.TrajectoryRecorder: store_output_grads=True needs the loss and the targets "
                             f"(found loss={'set' if loss is not None else None}, "
                             f"targets={'set' if targets is not None else None})")
        self._store_g = bool(store_output_grads)
        self._targets_t = (targets.detach().cpu() if isinstance(targets, torch.Tensor)
                           else torch.as_tensor(np.asarray(targets))) if targets is not None else None
        # the manifest's meta, through the typed record (the user's meta may add keys, as it always could)
        full_meta = Recording((), self._opt_spec, None if self._loss_spec is None else self._loss_spec.to_meta(),
                              bool(buffers)).meta_json()
        full_meta = Recording.from_json({**full_meta, **dict(meta or {})}, ()).meta_json()

        if resume and (self.path / MANIFEST).exists():
            self._writer = self._resume(spec, dtype)
        else:
            self._writer = TrajectoryWriter(self.path, spec, dtype, meta=full_meta, overwrite=overwrite, fsync=fsync)
            self._writer.append_point(self._parts())
        self._writer.fsync = fsync
        if targets is not None:
            save_targets(self.path, self._targets_t.numpy())
        self._applied_lrs: list[list[float]] = []
        self._applied_hyper: list[tuple[GroupHyper, ...]] = []
        self._skipped_lr, self._skipped = 0.0, 0  # optimizer steps since the last recorded point (skip())
        self._hook = optimizer.register_step_post_hook(self._after_optimizer_step)
        self._capture = InputCapture(model) if fingerprint else None
        self.num_steps = self._writer.rows - 1

    # ------------------------------------------------------------------ internals
    def _flat(self) -> torch.Tensor:
        return torch.cat([t.detach().reshape(-1).to("cpu", self._dtype) for _, t in self._tensors])

    def _parts(self) -> list[torch.Tensor]:
        return [t for _, t in self._tensors]

    def _after_optimizer_step(self, optimizer, args, kwargs) -> None:
        lrs, hyper = [], []
        typed = self._opt_spec.kind is not OptimizerKind.OTHER
        for g in optimizer.param_groups:
            if any(id(p) in self._trainable_ids for p in g["params"]):
                lrs.append(float(g["lr"]))
                hyper.append(GroupHyper.of_group(g, STEP_HYPER, typed=typed))
        self._applied_lrs.append(lrs)
        # groups with different hyperparameters cannot be one step of one decomposition: keep them all then
        if all(h == GroupHyper() for h in hyper):  # (an optimizer with none of these settings)
            hyper = []
        self._applied_hyper.append(tuple(hyper[:1]) if all(h == hyper[0] for h in hyper) else tuple(hyper))

    def _resume(self, spec, dtype) -> TrajectoryWriter:
        manifest = read_manifest(self.path)
        if [[n, list(s)] for n, s in spec] != manifest["spec"]:
            raise ValueError(
                f"pkfast.TrajectoryRecorder: cannot resume {str(self.path)!r}: the model's entries differ from "
                "the recorded ones"
            )
        if manifest["dtype"] != dtype_name(dtype):
            raise ValueError(
                f"pkfast.TrajectoryRecorder: cannot resume {str(self.path)!r}: recorded dtype {manifest['dtype']}, "
                f"model dtype {dtype_name(dtype)}"
            )
        P = int(manifest["num_params"])
        itemsize = torch.empty((), dtype=dtype).element_size()
        wpath = self.path / WEIGHTS
        rows = complete_rows(self.path, P, itemsize)
        steps = read_steps(self.path)
        n_points = min(rows, len(steps) + 1)
        current = self._flat().numpy()
        mm = np.memmap(wpath, dtype=current.dtype, mode="r", shape=(rows, P)) if rows else None
        k = next((k for k in range(n_points - 1, -1, -1) if np.array_equal(mm[k], current)), None)
        del mm
        if k is None:
            raise ValueError(
                f"pkfast.TrajectoryRecorder: cannot resume {str(self.path)!r}: the model's current weights equal "
                f"none of the {n_points} recorded points; load the weights of the last recorded step first"
            )
        with open(wpath, "r+b") as f:
            f.truncate((k + 1) * P * itemsize)
        lines = (self.path / STEPS).read_bytes().splitlines(keepends=True)[:k] if k else []
        formats.atomic_write(self.path / STEPS, b"".join(lines))
        keep_checksums(self.path, k + 1, P, current.dtype)
        return TrajectoryWriter(self.path, spec, dtype, append=True)

    # ------------------------------------------------------------------ public
    def skip(self) -> None:
        """Account for one ``optimizer.step()`` without recording its weights (a recording every k steps): the
        next :meth:`step` records the point with the interval's weight Σ lr of the steps since the last one, its
        batches unrecorded (``optimizer_steps`` in its metadata). Such a recording serves the Gram and the
        sketch; the exact kernel machine needs every step and refuses it."""
        lr, _ = self._pop_applied("skip")
        self._take_prints(None)
        self._skipped_lr += lr
        self._skipped += 1

    def flush(self) -> None:
        """Record the current weights as the point closing the optimizer steps folded by :meth:`skip` (at the end
        of a run recorded every k steps); nothing when there are none."""
        if self._writer is None:
            raise RuntimeError("pkfast.TrajectoryRecorder.flush: the recorder is closed")
        if self._skipped:
            self._commit({"lr": self._skipped_lr, "batch_indices": None, "optimizer_steps": self._skipped})
            self._skipped_lr, self._skipped = 0.0, 0

    def _commit(self, line: dict[str, Any]) -> None:
        """Write the current weights and commit the step, its line validated as a :class:`StepRecord`."""
        typed = self._opt_spec.kind is not OptimizerKind.OTHER
        rec = StepRecord.from_json(self.num_steps, line, typed=typed)
        self._writer.append_step(self._parts(), **rec.to_json())
        self.num_steps += 1

    def _take_prints(self, n: int | None) -> dict[str, Any] | None:
        return None if self._capture is None else self._capture.take(n)

    def _pop_applied(self, fn: str) -> tuple[float, tuple[GroupHyper, ...]]:
        if self._writer is None:
            raise RuntimeError(f"pkfast.TrajectoryRecorder.{fn}: the recorder is closed")
        n = len(self._applied_lrs)
        if n != 1:
            raise RuntimeError(
                f"pkfast.TrajectoryRecorder.{fn}: expected exactly one optimizer.step() since the last record; "
                f"found {n}. Call rec.step() (or rec.skip()) once after every optimizer.step()."
            )
        lrs = self._applied_lrs.pop()
        hyper = self._applied_hyper.pop() if self._applied_hyper else ()
        if len(set(lrs)) > 1:
            raise ValueError(
                f"pkfast.TrajectoryRecorder.{fn}: parameter groups applied different learning rates {lrs}; the "
                "path kernel with one step size per step needs a single lr for all trainable parameters"
            )
        return (lrs[0] if lrs else 0.0), hyper

    def step(self, batch_indices: Sequence[int] | np.ndarray | torch.Tensor | None = None, *,
             outputs: torch.Tensor | None = None, **extra: Any) -> None:
        """Record w_{s+1} after one ``optimizer.step()``, with the lr that step applied.

        Args:
            batch_indices: the ordered indices of the training points in this step's mini-batch.
            outputs: with ``store_output_grads=True``: the batch's outputs ``[|B|, C]`` from the training forward
                pass of this step (before ``optimizer.step()``); g = ∂ℓ/∂f per sample is stored from them.
            **extra: JSON-serialisable per-step metadata (e.g. ``loss=...``).
        """
        if self._skipped and (batch_indices is not None or outputs is not None):
            raise ValueError("pkfast.TrajectoryRecorder.step: after skip() the point covers "
                             f"{self._skipped + 1} optimizer steps, whose batches are not recorded; pass no "
                             "batch_indices or outputs")
        lr, hyper = self._pop_applied("step")
        if self._skipped:  # the interval since the last point spans several optimizer steps
            lr += self._skipped_lr
            extra = {"optimizer_steps": self._skipped + 1, **extra}
            self._skipped_lr, self._skipped = 0.0, 0
        if batch_indices is not None:
            batch_indices = np.asarray(
                batch_indices.detach().cpu() if isinstance(batch_indices, torch.Tensor) else list(batch_indices)
                if not isinstance(batch_indices, np.ndarray) else batch_indices,
                dtype=np.int64,
            ).reshape(-1)
        if self._store_g:
            if outputs is None or batch_indices is None:
                raise ValueError("pkfast.TrajectoryRecorder.step: store_output_grads=True needs outputs= (the batch's "
                                 "training outputs) and batch_indices=; found "
                                 f"outputs={'set' if outputs is not None else None}, "
                                 f"batch_indices={'set' if batch_indices is not None else None}")
            f = outputs.detach().to("cpu", torch.float64).reshape(len(batch_indices), -1)
            y = self._targets_t[torch.as_tensor(batch_indices)]
            g = self._loss_spec.output_grad(f, y, tuple(outputs.shape[1:]))
            extra = {"output_grads": g.tolist(), **extra}
        elif outputs is not None:
            raise ValueError("pkfast.TrajectoryRecorder.step: outputs= is stored only with "
                             "TrajectoryRecorder(store_output_grads=True)")
        prints = self._take_prints(None if batch_indices is None else len(batch_indices))
        if prints:
            extra = {FINGERPRINTS: prints, **extra}
        if hyper:
            g = [h.to_json() for h in hyper]
            extra = {"optimizer": g[0] if len(g) == 1 else {"groups": g}, **extra}
        self._commit({"lr": lr, "batch_indices": batch_indices, **extra})

    @property
    def pending(self) -> int:
        """Optimizer steps taken since the last :meth:`step`/:meth:`skip` (0 when the optimizer skipped its step,
        e.g. on a mixed-precision overflow, or between micro-batches of gradient accumulation)."""
        return len(self._applied_lrs)

    @property
    def skipped(self) -> int:
        """Optimizer steps folded into the next point by :meth:`skip`."""
        return self._skipped

    def trajectory(self) -> Trajectory:
        """The recording so far, opened lazily (:meth:`Trajectory.load`)."""
        return Trajectory.load(self.path)

    def close(self) -> None:
        """Stop recording (removes the optimizer hook, closes the files). Idempotent."""
        if self._writer is not None:
            self._hook.remove()
            if self._capture is not None:
                self._capture.remove()
            self._writer.close()
            self._writer = None  # type: ignore[assignment]

    def __enter__(self) -> "TrajectoryRecorder":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"TrajectoryRecorder(path={str(self.path)!r}, steps={self.num_steps})"
