"""Trajectory: the weight points w_0 … w_T of a training run and the step sizes ε_0 … ε_{T-1} between them.

A trajectory is a ``[T+1, P]`` matrix of flattened weights (one row per point, entries in the order of
:attr:`Trajectory.spec`) plus ``T`` non-negative step sizes. It lives either in memory (a tensor) or on
disk as a memory-mapped file written by :class:`pkfast.TrajectoryRecorder` or :meth:`Trajectory.save`.

The on-disk format (a directory with a manifest, a raw weight file and a step log) is described and read
and written in :mod:`pkfast.trajectory.files`.
"""

from __future__ import annotations

import hashlib
import math
import os
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pkfast.store import formats
from pkfast.trajectory.checkpoint_state import checkpoint_states, folder_states
from pkfast.trajectory.checkpoints import as_state_dict, compare_spec, load_checkpoint_file, step_sizes_of
from pkfast.trajectory.files import (MANIFEST, STEPS, TARGETS, TORCH_FROM_NAME, WEIGHTS, TrajectoryWriter, check_row,
                                     complete_rows, dtype_name, note_no_checksums, read_checksums, read_manifest,
                                     read_steps, save_targets, storage_dtype)
from pkfast.trajectory.recording import Recording
from pkfast.trajectory.state import OptimizerRecord, StateRows

__all__ = ["Trajectory"]

class Trajectory(OptimizerRecord):
    """Weight points ``w_0 … w_T`` and step sizes ``ε_0 … ε_{T-1}`` of a training run.

    Rows (:meth:`flat`) are flattened weights in the order of :attr:`spec` (a list of
    ``(name, shape)``). Entries are the model's floating-point state: its trainable parameters (which enter
    the kernel) and optionally frozen parameters and floating buffers (which are held at their recorded
    values when the kernel is evaluated at that point).

    Build one with :meth:`from_checkpoints`, :class:`pkfast.TrajectoryRecorder` or :meth:`load`.

    Args:
        weights: ``[T+1, P]`` floating tensor or numpy array (a ``np.memmap`` stays on disk).
        step_sizes: ``T`` finite non-negative floats; ε_s weighs the interval from w_s to w_{s+1}.
        spec: ``(name, shape)`` pairs in flat order; their sizes add up to ``P``.
        batch_indices: optional length-``T`` list of the ordered training indices used at each step.
        meta: optional JSON-serialisable dict (optimizer and loss metadata, for the exact kernel).
        step_meta: optional length-``T`` list of per-step dicts (the recorder stores the optimizer's
            hyperparameters at each step under ``"optimizer"``).
        targets: optional training targets (``[N]`` class indices or ``[N, C]``) the batch indices refer to.

    Example:
        >>> import torch, pkfast
        >>> net = torch.nn.Linear(3, 2)
        >>> w0 = {k: v.clone() for k, v in net.state_dict().items()}
        >>> w1 = {k: v + 0.1 for k, v in w0.items()}
        >>> traj = pkfast.Trajectory.from_checkpoints([w0, w1], lr=0.1)
        >>> traj.num_steps, traj.num_params
        (1, 8)
    """

    def __init__(
        self,
        weights: torch.Tensor | np.ndarray,
        step_sizes: Sequence[float] | torch.Tensor | np.ndarray,
        spec: Sequence[tuple[str, Sequence[int]]],
        *,
        batch_indices: Sequence[Any] | None = None,
        meta: Mapping[str, Any] | None = None,
        source: str | None = None,
        step_meta: Sequence[Mapping[str, Any]] | None = None,
        targets: Any = None,
    ) -> None:
        self._spec: list[tuple[str, torch.Size]] = [(str(n), torch.Size(s)) for n, s in spec]
        names = [n for n, _ in self._spec]
        if len(set(names)) != len(names):
            dup = next(n for n in names if names.count(n) > 1)
            raise ValueError(f"pkfast.Trajectory: entry {dup!r} appears twice in spec")
        self._sizes = [math.prod(s) for _, s in self._spec]
        self._offsets = np.concatenate([[0], np.cumsum(self._sizes)]).astype(int).tolist()
        P = self._offsets[-1]

        if isinstance(weights, np.ndarray):
            if weights.dtype not in (np.float16, np.float32, np.float64):
                raise TypeError(f"pkfast.Trajectory: weights must be floating; found numpy dtype {weights.dtype}")
        elif isinstance(weights, torch.Tensor):
            if not weights.is_floating_point():
                raise TypeError(f"pkfast.Trajectory: weights must be floating; found {weights.dtype}")
            weights = weights.detach().cpu()
        else:
            raise TypeError(
                f"pkfast.Trajectory: weights must be a torch.Tensor or numpy array; found {type(weights).__name__}"
            )
        if weights.ndim != 2 or weights.shape[1] != P:
            raise ValueError(
                f"pkfast.Trajectory: weights must have shape [T+1, P] = [*, {P}] (P from spec); "
                f"found {tuple(weights.shape)}"
            )
        if weights.shape[0] < 2:
            raise ValueError(
                f"pkfast.Trajectory: a trajectory needs at least 2 weight points (w_0 and w_1); found "
                f"{weights.shape[0]}. For the tangent kernel at a single point w, pass [w, w] with lr=1."
            )
        self._weights = weights
        T = weights.shape[0] - 1

        eps = torch.as_tensor(np.asarray(step_sizes, dtype=np.float64), dtype=torch.float64).reshape(-1)
        if eps.numel() != T:
            raise ValueError(
                f"pkfast.Trajectory: expected {T} step sizes (one per interval between {T + 1} weight points); "
                f"found {eps.numel()}"
            )
        bad = (~torch.isfinite(eps)) | (eps < 0)
        if bad.any():
            s = int(bad.nonzero()[0])
            raise ValueError(
                f"pkfast.Trajectory: step sizes must be finite and >= 0; step {s} has {eps[s].item()!r}"
            )
        self._eps = eps

        if batch_indices is not None:
            if len(batch_indices) != T:
                raise ValueError(
                    f"pkfast.Trajectory: expected {T} batch_indices entries (one per step); found {len(batch_indices)}"
                )
            batch_indices = [None if b is None else np.asarray(b, dtype=np.int64).reshape(-1) for b in batch_indices]
        self._batch_indices = batch_indices
        if step_meta is not None and len(step_meta) != T:
            raise ValueError(f"pkfast.Trajectory: expected {T} step_meta entries (one per step); found {len(step_meta)}")
        self._step_meta = [dict(m or {}) for m in step_meta] if step_meta is not None else [{} for _ in range(T)]
        self._targets = targets
        self.meta: dict[str, Any] = dict(meta or {})
        self.source = source
        self._checked: set[int] = set()
        self._crcs: dict[int, int] | None = None  # recorded row checksums (set by load), verified on first read
        self._crc_ok: set[int] = set()
        self._state: StateRows | None = None  # an adaptive optimizer's per-step state rows (set by load)

    # ------------------------------------------------------------------ properties
    @property
    def spec(self) -> list[tuple[str, torch.Size]]:
        """``(name, shape)`` of every stored entry, in flat order."""
        return list(self._spec)

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(n for n, _ in self._spec)

    @property
    def num_steps(self) -> int:
        """T, the number of steps (intervals)."""
        return self._weights.shape[0] - 1

    @property
    def num_points(self) -> int:
        """T + 1, the number of weight points."""
        return self._weights.shape[0]

    @property
    def num_params(self) -> int:
        """P, the length of a flattened weight row (all stored entries)."""
        return self._offsets[-1]

    @property
    def step_sizes(self) -> torch.Tensor:
        """ε_0 … ε_{T-1} as a float64 tensor."""
        return self._eps.clone()

    @property
    def dtype(self) -> torch.dtype:
        w = self._weights
        if isinstance(w, torch.Tensor):
            return w.dtype
        return TORCH_FROM_NAME[np.dtype(w.dtype).name]

    @property
    def is_memory_mapped(self) -> bool:
        return isinstance(self._weights, np.memmap)

    @property
    def has_checksums(self) -> bool:
        """Whether the rows carry recorded checksums (a trajectory loaded from a recording that has them)."""
        return self._crcs is not None

    def batch_indices(self, step: int) -> np.ndarray | None:
        """The ordered training indices used at ``step``, or None if not recorded."""
        if self._batch_indices is None:
            return None
        return self._batch_indices[step]

    def step_meta(self, step: int) -> dict[str, Any]:
        """Per-step metadata (e.g. ``{"optimizer": {"momentum": 0.9, …}}`` from the recorder); {} if none."""
        return dict(self._step_meta[step])

    @property
    def recording(self) -> Recording:
        """The typed, validated record of the run (:class:`pkfast.trajectory.recording.Recording`): optimizer,
        per-step step sizes, batches and hyper-parameters, loss convention — built from :attr:`meta` and the
        per-step metadata each time it is read (they may be edited in place)."""
        lines = []
        for s in range(self.num_steps):
            b = self.batch_indices(s)
            lines.append({"lr": float(self._eps[s]), "batch_indices": None if b is None else b.tolist(),
                          **{k: v for k, v in self._step_meta[s].items() if k not in ("lr", "batch_indices")}})
        return Recording.from_json(self.meta, lines, has_targets=self._targets is not None)

    def output_grads(self, step: int) -> torch.Tensor | None:
        """The stored per-sample loss derivatives g_{i,s} = ∂ℓ_i/∂f of step ``step``'s batch, ``[|B_s|, C]``
        float64 (``TrajectoryRecorder(store_output_grads=True)``), or None if the step has none."""
        g = self._step_meta[step].get("output_grads")
        return None if g is None else torch.tensor(g, dtype=torch.float64)

    @property
    def targets(self) -> torch.Tensor | None:
        """The training targets recorded with the trajectory (``TrajectoryRecorder(targets=…)``), or None."""
        t = self._targets
        if t is None:
            return None
        return t if isinstance(t, torch.Tensor) else torch.from_numpy(np.asarray(t))

    def slice_of(self, name: str) -> slice:
        """The columns of a flattened row that hold entry ``name``."""
        i = self.names.index(name)
        return slice(self._offsets[i], self._offsets[i + 1])

    def __repr__(self) -> str:
        where = f", source={self.source!r}" if self.source else ""
        mm = ", memory-mapped" if self.is_memory_mapped else ""
        return (
            f"Trajectory(T={self.num_steps}, P={self.num_params}, entries={len(self._spec)}, "
            f"dtype={dtype_name(self.dtype)}, sum_lr={float(self._eps.sum()):.6g}{mm}{where})"
        )

    # ------------------------------------------------------------------ access
    def flat(self, k: int) -> torch.Tensor:
        """Row ``k`` (w_k flattened) as a CPU tensor. On its first read, a loaded row is checked against its recorded
        checksum (:class:`pkfast.trajectory.TrajectoryChecksumError` on a mismatch, naming the file, the row
        and both checksums); raises if it holds NaN/Inf (naming the entry)."""
        if not -self.num_points <= k < self.num_points:
            raise IndexError(f"pkfast.Trajectory: point {k} out of range [0, {self.num_points})")
        k = k % self.num_points
        w = self._weights
        row = w[k] if isinstance(w, torch.Tensor) else torch.from_numpy(np.array(w[k]))
        if k not in self._checked:
            if self._crcs is not None and k not in self._crc_ok:
                check_row(self.source, k, row, self._crcs)
                self._crc_ok.add(k)
            self._check_finite(k, row)
            self._checked.add(k)
        return row

    def point(self, k: int) -> dict[str, torch.Tensor]:
        """The weights w_k after ``k`` steps (``k = 0``: the initial weights; ``k = T``: the trained ones) as a
        ``{name: tensor}`` dict of views into :meth:`flat` (row k, read and checksum-verified on first use), in the
        order and shapes of the recorded parameters — what ``model.load_state_dict(..., strict=False)`` takes.

        Example:
            >>> import torch, pkfast
            >>> net = torch.nn.Linear(3, 2)
            >>> w0 = {k: v.clone() for k, v in net.state_dict().items()}
            >>> w1 = {k: v + 0.1 for k, v in w0.items()}
            >>> traj = pkfast.Trajectory.from_checkpoints([w0, w1], lr=0.5)
            >>> p = traj.point(1)
            >>> sorted(p), p["weight"].shape, torch.equal(p["bias"], w1["bias"])
            (['bias', 'weight'], torch.Size([2, 3]), True)
            >>> _ = net.load_state_dict(traj.point(0))           # back to the initial weights
        """
        row = self.flat(k)
        return {n: row[a:b].view(s) for (n, s), a, b in zip(self._spec, self._offsets[:-1], self._offsets[1:])}

    def _check_finite(self, k: int, row: torch.Tensor) -> None:
        if bool(torch.isfinite(row).all()):
            return
        for (name, _), a, b in zip(self._spec, self._offsets[:-1], self._offsets[1:]):
            part = row[a:b]
            if not bool(torch.isfinite(part).all()):
                n_nan = int(torch.isnan(part).sum())
                n_inf = int(torch.isinf(part).sum())
                raise ValueError(
                    f"pkfast.Trajectory: weight point w_{k} has non-finite values in {name!r} "
                    f"({n_nan} NaN, {n_inf} Inf); training diverged at or before step {max(k - 1, 0)}"
                )

    def check(self) -> None:
        """Scan every point for NaN/Inf and, where recorded, checksum mismatches (done lazily on access otherwise)."""
        for k in range(self.num_points):
            self.flat(k)

    def verify(self) -> None:
        """Check every row against its recorded checksum now, one row at a time (``load(verify=True)``); nothing
        for a trajectory without checksums."""
        if self._crcs is None:
            return
        for k in range(self.num_points):
            if k not in self._crc_ok:
                check_row(self.source, k, self._weights[k], self._crcs)
                self._crc_ok.add(k)

    # ------------------------------------------------------------------ constructors
    @classmethod
    def from_checkpoints(
        cls,
        checkpoints: Sequence[Mapping[str, torch.Tensor] | str | os.PathLike],
        lr: float | Sequence[float] | None = None,
        *,
        batch_indices: Sequence[Any] | None = None,
        optimizer_states: str | Sequence[Any] | None = "auto",
        optimizer_params: torch.nn.Module | Sequence[str] | None = None,
    ) -> "Trajectory":
        """Build a trajectory from ``T+1`` state_dicts or checkpoint files.

        Args:
            checkpoints: ``state_dict`` mappings, or paths to ``torch.save`` files (a state_dict, or a dict
                holding one under ``'state_dict'``/``'model_state_dict'``/``'model'``, as a Lightning ``.ckpt``
                does), ``.safetensors`` files, or Hugging Face checkpoint folders (``save_pretrained`` or
                ``Trainer``'s ``checkpoint-N``: ``model.safetensors``, sharded with ``model.safetensors.index.json``,
                ``pytorch_model.bin``, or a PEFT ``adapter_model.safetensors``). Floating-point entries are kept (integer buffers such as BatchNorm's
                ``num_batches_tracked`` are dropped); every checkpoint must have the same entries and shapes.
            lr: the weight ε_s of each of the ``T`` intervals: one float for all, or ``T`` floats. For
                checkpoints saved every step this is the learning rate applied at that step. For *sparse*
                checkpoints (saved every k steps) it is the learning rate × the number of optimizer steps
                between them (the Riemann-sum weight of the interval) — e.g. ``lr=[0.1 * 50] * T`` for
                checkpoints every 50 steps at lr 0.1. ``None`` (Hugging Face ``Trainer`` folders only): read from
                ``trainer_state.json`` — each folder's ``global_step`` and the last one's logged learning rates,
                summed over the steps of each interval (a first checkpoint without a trainer state is step 0;
                exact with ``logging_steps=1``, interpolated between logs otherwise, with a warning).
            batch_indices: optional ordered training indices per step.
            optimizer_states: an adaptive optimizer's state saved with each checkpoint, giving the preconditioner
                at the checkpoints only (:mod:`pkfast.trajectory.checkpoint_state`: segment s takes the state
                saved with w_{s+1}; an approximation between checkpoints, for :func:`pkfast.gram` — the exact
                kernel machine refuses it). ``"auto"``: each ``Trainer`` folder's ``optimizer.pt`` where every
                folder after the first has one; a list: one ``optimizer.state_dict()`` or file per checkpoint
                (the first may be None); None: no preconditioner (the Euclidean path kernel).
            optimizer_params: whose parameters the states index (needed with them): the trained model (the
                ``Trainer``'s parameter groups where the state has two) or the names in the optimizer's order.

        Files are read once each; the flattened weights are held in memory. For trajectories larger than
        memory, record with :class:`pkfast.TrajectoryRecorder` or convert once with :meth:`save` and use
        :meth:`load`.
        """
        if isinstance(checkpoints, (str, os.PathLike, Mapping)) or not isinstance(checkpoints, Sequence):
            raise TypeError(
                "pkfast.Trajectory.from_checkpoints: checkpoints must be a list of state_dicts or checkpoint "
                f"paths; found {type(checkpoints).__name__}"
            )
        if len(checkpoints) < 2:
            raise ValueError(
                f"pkfast.Trajectory.from_checkpoints: need at least 2 checkpoints (w_0 … w_T); found {len(checkpoints)}"
            )
        T, step_sizes = len(checkpoints) - 1, step_sizes_of(lr, checkpoints)

        rows: list[torch.Tensor] = []
        spec: list[tuple[str, torch.Size]] | None = None
        dtype: torch.dtype | None = None
        for i, ck in enumerate(checkpoints):
            if isinstance(ck, (str, os.PathLike)):
                sd = load_checkpoint_file(Path(ck))
            else:
                sd = as_state_dict(ck, where=f"#{i}")
            entries = [(k, v) for k, v in sd.items() if isinstance(v, torch.Tensor) and v.is_floating_point()]
            if spec is None:
                if not entries:
                    raise ValueError("pkfast.Trajectory.from_checkpoints: checkpoint #0 has no floating-point tensors")
                spec = [(k, v.shape) for k, v in entries]
                dtype = storage_dtype([v.dtype for _, v in entries])
            else:
                compare_spec(spec, [(k, v.shape) for k, v in entries], i)
            rows.append(torch.cat([v.detach().reshape(-1).to("cpu", dtype) for _, v in entries]))
        assert spec is not None
        traj = cls(torch.stack(rows), step_sizes, spec, batch_indices=batch_indices)
        states = folder_states(checkpoints, optimizer_params) if optimizer_states == "auto" else optimizer_states
        if states is not None:
            if isinstance(states, (str, os.PathLike, Mapping)) or len(states) != T + 1:
                raise ValueError(f"pkfast.Trajectory.from_checkpoints: optimizer_states must be 'auto', None or a list "
                                 f"of {T + 1} optimizer states (one per checkpoint, the first may be None); found "
                                 f"{type(states).__name__}{'' if isinstance(states, (str, Mapping)) else f' of {len(states)}'}")
            traj._state = checkpoint_states(list(states), spec, optimizer_params, dtype)
        return traj

    @classmethod
    def load(cls, path: str | os.PathLike, *, allow_truncated: bool = False, verify: bool = False) -> "Trajectory":
        """Open a trajectory directory lazily: weights stay on disk (``np.memmap``), rows are read on access.

        Incomplete trailing data left by a crash (a partial weight row or step line) is ignored: a crash loses at
        most the step being written. Each row's recorded checksum (``weights.crc``) is verified when the row is
        first read; a mismatch raises :class:`pkfast.trajectory.TrajectoryChecksumError` (a
        :class:`pkfast.store.StoreError`) naming the file, the row and both checksums. A recording made before pkfast
        wrote checksums loads unverified, with a one-time note (logged to ``pkfast.trajectory``).

        Args:
            path: the directory written by :class:`pkfast.TrajectoryRecorder` or :meth:`save`.
            allow_truncated: a recording whose weight file holds fewer complete rows than its log has steps
                lost data after it was written (a truncated copy, a full disk): it is refused, saying what is
                missing, unless this is True — then the complete prefix is loaded, with a warning.
            verify: check every row against its checksum now (reading the whole weight file once) instead of
                each row when it is first read.
        """
        path = Path(path)
        man_path = path / MANIFEST
        if not path.exists():
            raise FileNotFoundError(f"pkfast.Trajectory.load: {str(path)!r} does not exist; expected the directory "
                                    "a TrajectoryRecorder (or Trajectory.save) wrote — check the path")
        if not man_path.exists():
            raise FileNotFoundError(
                f"pkfast.Trajectory.load: {str(path)!r} is not a recorded trajectory (no {MANIFEST} inside)"
            )
        manifest = read_manifest(path)
        spec = [(n, torch.Size(s)) for n, s in manifest["spec"]]
        P = int(manifest["num_params"])
        np_dtype = np.dtype(manifest["dtype"])
        steps = read_steps(path)
        wpath = path / WEIGHTS
        rows = complete_rows(path, P, np_dtype.itemsize)
        if rows < 1:
            raise ValueError(f"pkfast.Trajectory.load: {str(path)!r} holds no complete weight row (w_0 is missing)")
        if not (path / STEPS).exists():  # a recorder creates it with w_0: without it, the steps' sizes are lost
            raise FileNotFoundError(
                f"pkfast.Trajectory.load: {str(path)!r} has no step log {STEPS} (the step sizes and batches of the "
                f"steps whose weights {WEIGHTS} holds: {rows - 1}); it was not copied with the rest or was deleted. "
                f"Copy the whole directory as recorded ({MANIFEST}, {WEIGHTS}, {STEPS}, …)")
        # one logged step whose row is torn is a crash at the tail (the step being written is lost, as documented);
        # fewer complete rows than logged steps means rows were lost after they were written
        if rows < len(steps):
            lost = (f"{str(path)!r} is damaged: its step log records {len(steps)} steps, which need "
                    f"{len(steps) + 1} weight rows (w_0 … w_{len(steps)}), but {WEIGHTS} holds only {rows} complete "
                    f"row{'s' if rows != 1 else ''} (w_0 … w_{rows - 1})")
            if not allow_truncated:
                raise ValueError(
                    f"pkfast.Trajectory.load: {lost}. The weights of the later steps were lost after they were "
                    f"recorded. To use the {rows - 1} complete step(s), pass allow_truncated=True; to continue "
                    f"training from w_{rows - 1}, load those weights into the model and record with "
                    "TrajectoryRecorder(..., resume=True), which cuts the log at the last complete point")
            warnings.warn(f"pkfast.Trajectory.load: {lost}; loading the complete prefix of {rows - 1} step(s)",
                          RuntimeWarning, stacklevel=2)
        T = min(len(steps), rows - 1)
        if T < 1:
            raise ValueError(
                f"pkfast.Trajectory.load: {str(path)!r} holds only w_0 and no completed step; record at least one "
                "step (rec.step()) before loading"
            )
        steps = steps[:T]
        weights = np.memmap(wpath, dtype=np_dtype, mode="r", shape=(T + 1, P))
        batch = [s.get("batch_indices") for s in steps]
        tpath = path / TARGETS
        traj = cls(
            weights,
            [s["lr"] for s in steps],
            spec,
            batch_indices=None if all(b is None for b in batch) else batch,
            meta=manifest.get("meta", {}),
            source=str(path),
            step_meta=[{k: v for k, v in s.items() if k not in ("lr", "batch_indices")} for s in steps],
            targets=np.load(tpath) if tpath.exists() else None,
        )
        traj._crcs = read_checksums(path)
        if manifest.get("state") is not None:
            traj._state = StateRows(path, manifest["state"], T)
        if traj._crcs is None:
            note_no_checksums(path)
        elif verify:
            traj.verify()
        if verify and traj._state is not None:
            traj._state.verify()
        return traj

    def save(self, path: str | os.PathLike, *, overwrite: bool = False) -> Path:
        """Write this trajectory in the on-disk format (readable lazily with :meth:`load`)."""
        meta, lines = self.recording.to_json()
        st = self._state
        writer = TrajectoryWriter(path, self.spec, self.dtype, meta=meta, overwrite=overwrite,
                                  state=None if st is None else st.info)
        try:
            writer.append_point(self.flat(0))
            for s, line in enumerate(lines):
                writer.append_step(self.flat(s + 1), state=None if st is None else st.row(s), **line)
        finally:
            writer.close()
        if self.targets is not None:
            save_targets(Path(path), self.targets.numpy())
        return Path(path)

    def fingerprint(self) -> str:
        """A digest of the spec, the step sizes and every weight point, read one point at a time (a
        memory-mapped trajectory is never copied whole): what a stored Gram or a sketch depends on."""
        h = hashlib.blake2b(digest_size=16)
        h.update(repr([(n, tuple(s)) for n, s in self._spec]).encode())
        formats.hash_tensor(h, self._eps.to(torch.float64))
        formats.hash_tensor(h, self._weights, rows=1)
        return h.hexdigest()
