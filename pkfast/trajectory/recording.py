"""recording: the typed, validated record of how a training run moved — its optimizer, each step's step size,
batch and hyper-parameters, and its loss convention — read from and written to a trajectory's JSON files.

What the recording holds. A :class:`Recording` is the optimizer (:class:`OptimizerSpec`: its kind, the class it
was, its parameter groups' hyper-parameters as :class:`GroupHyper`, and whether it held state before recording
began), one :class:`StepRecord` per step (the step size ε_s, the ordered batch as its micro-batches, the
hyper-parameters each parameter group applied, how many optimizer steps the point covers, the stored loss
derivatives), the loss convention, and whatever else the run's manifest carried. On disk these are the manifest's
``meta`` and the lines of ``steps.jsonl`` (:mod:`pkfast.trajectory.files`), in the format pkfast has always written:
:meth:`Recording.from_json` reads every trajectory earlier versions wrote, and :meth:`Recording.to_json` writes the
same keys, adding a key only where a record holds something earlier versions could not record.

Adaptive optimizers, clipping, accumulation. :class:`OptimizerKind` names Adam, AdamW, RMSprop and Adagrad, and
:class:`GroupHyper` holds their betas, eps, amsgrad, decoupled weight decay, centered, alpha, lr_decay and
initial accumulator. A step's gradient-clipping coefficient (:attr:`StepRecord.clip_coef`, and
:attr:`StepRecord.clip_scalar` False where the gradient was not scaled by one scalar), its gradient-accumulation
micro-batches and their loss weights (:attr:`StepRecord.micro_batches`, :attr:`StepRecord.micro_weights`),
per-group step sizes (:attr:`StepRecord.group_lrs`) and a reference to its preconditioner row in the trajectory's
files (:attr:`StepRecord.optimizer_state`, a :class:`StateRef`: file, row, step count(s), skipped parameters) are
optional fields, None (or one micro-batch) for SGD; a step line gains their keys only when they are set, so
readers that do not know them read the rest (docs/recording.md).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from enum import Enum
from pathlib import Path
from typing import Any

import numpy as np

from pkfast.trajectory.checks import _FIX, _FN, _bad, _count, _flag, _indices, _number, _set
from pkfast.trajectory.files import MANIFEST, TARGETS, complete_rows, jsonable, read_manifest, read_steps

__all__ = ["OptimizerKind", "GroupHyper", "OptimizerSpec", "StateRef", "StepRecord", "Recording", "STEP_HYPER"]


#: The optimizer hyper-parameters recorded with every step (those an exact decomposition reads).
STEP_HYPER = ("momentum", "dampening", "nesterov", "weight_decay", "maximize", "betas", "eps", "amsgrad",
              "decoupled_weight_decay", "centered", "alpha", "lr_decay", "initial_accumulator_value")

#: The keys of a step line that are not the record's typed fields (the rest is the user's per-step metadata).
_STEP_KEYS = ("lr", "batch_indices", "optimizer", "output_grads", "optimizer_steps", "micro_batches", "group_lrs",
              "clip_coef", "optimizer_state", "clip_scalar", "micro_weights")
#: The manifest meta keys the recording types.
_META_KEYS = ("optimizer", "buffers_recorded", "loss")


class OptimizerKind(str, Enum):
    """The update rule a recording's optimizer applies, named by its ``torch.optim`` class (OTHER: any other)."""

    SGD = "SGD"
    ADAM = "Adam"
    ADAMW = "AdamW"
    RMSPROP = "RMSprop"
    ADAGRAD = "Adagrad"
    OTHER = "other"

    @classmethod
    def of(cls, class_name: str) -> "OptimizerKind":
        """The kind of an optimizer class named ``class_name`` (OTHER when pkfast does not model its rule)."""
        return next((k for k in cls if k.value == class_name and k is not cls.OTHER), cls.OTHER)

    @property
    def adaptive(self) -> bool:
        """Whether the step is preconditioned by optimizer state (Adam, AdamW, RMSprop, Adagrad)."""
        return self in (OptimizerKind.ADAM, OptimizerKind.ADAMW, OptimizerKind.RMSPROP, OptimizerKind.ADAGRAD)


# ---------------------------------------------------------------------------------------------- hyper-parameters
#: GroupHyper's typed fields and their checks: (low, below) for numbers, None for flags.
_HYPER = {"lr": (0.0, None), "momentum": (0.0, None), "dampening": (None, None), "nesterov": None,
          "weight_decay": (0.0, None), "maximize": None, "betas": (0.0, 1.0), "eps": (0.0, None), "amsgrad": None,
          "decoupled_weight_decay": None, "centered": None, "alpha": (0.0, None), "lr_decay": (0.0, None),
          "initial_accumulator_value": (0.0, None)}


@dataclass(frozen=True)
class GroupHyper:
    """One parameter group's hyper-parameters (None: the optimizer has no such setting, or it was not recorded).

    ``extra`` holds the group's other settings as recorded (``foreach``, ``fused``, ``initial_lr``, …, and every
    setting of an optimizer of kind OTHER, whose rule pkfast does not model)."""

    lr: float | None = None
    momentum: float | None = None
    dampening: float | None = None
    nesterov: bool | None = None
    weight_decay: float | None = None
    maximize: bool | None = None
    betas: tuple[float, float] | None = None
    eps: float | None = None
    amsgrad: bool | None = None
    decoupled_weight_decay: bool | None = None
    centered: bool | None = None
    alpha: float | None = None
    lr_decay: float | None = None
    initial_accumulator_value: float | None = None
    extra: Mapping[str, Any] = field(default_factory=dict, hash=False)

    def __post_init__(self) -> None:
        for name, check in _HYPER.items():
            v = getattr(self, name)
            if v is None:
                continue
            where = f"hyper-parameter {name!r}"
            if check is None:
                _set(self, name, _flag(where, v))
            elif name == "betas":
                if not isinstance(v, (list, tuple)) or len(v) != 2:
                    raise _bad(where, "two numbers (β1, β2) in [0, 1)", v, _FIX)
                _set(self, name, tuple(_number(where, b, low=0.0, below=1.0) for b in v))
            else:
                _set(self, name, _number(where, v, low=check[0], below=check[1]))
        if not isinstance(self.extra, Mapping):
            raise _bad("GroupHyper.extra", "a mapping of further settings", self.extra)
        _set(self, "extra", {str(k): jsonable(v) for k, v in self.extra.items()})

    @classmethod
    def from_json(cls, d: Mapping[str, Any], *, typed: bool = True, where: str = "a parameter group") -> "GroupHyper":
        """A group from its JSON dict; ``typed=False`` keeps every setting in ``extra`` (an OTHER optimizer)."""
        if not isinstance(d, Mapping):
            raise _bad(where, "a JSON object of hyper-parameters", d, _FIX)
        known = {k: v for k, v in d.items() if typed and k in _HYPER and v is not None}
        try:
            return cls(**known, extra={k: v for k, v in d.items() if k not in known})
        except ValueError as e:
            raise ValueError(str(e).replace(f"{_FN}: ", f"{_FN}: {where}: ", 1)) from None

    @classmethod
    def of_group(cls, group: Mapping[str, Any], keys: Sequence[str] | None = None, *, typed: bool = True
                 ) -> "GroupHyper":
        """A ``torch.optim`` parameter group's hyper-parameters (only ``keys`` when given; never its params)."""
        d = {k: jsonable(v) for k, v in group.items() if k != "params" and (keys is None or k in keys)}
        return cls.from_json(d, typed=typed)

    def to_json(self) -> dict[str, Any]:
        out = {f.name: (list(v) if isinstance(v, tuple) else v) for f in fields(self)
               if f.name != "extra" and (v := getattr(self, f.name)) is not None}
        return {**out, **self.extra}


@dataclass(frozen=True)
class OptimizerSpec:
    """The optimizer of a recording: its kind, class, parameter groups (at the start of recording) and whether it
    already held state (momentum buffers, moments) when recording began."""

    kind: OptimizerKind
    class_name: str
    module: str = ""
    groups: tuple[GroupHyper, ...] = ()
    state_before_recording: bool = False
    extra: Mapping[str, Any] = field(default_factory=dict, hash=False)

    def __post_init__(self) -> None:
        if not isinstance(self.kind, OptimizerKind):
            raise _bad("optimizer kind", "one of " + ", ".join(k.value for k in OptimizerKind), self.kind)
        if not isinstance(self.class_name, str) or not self.class_name:
            raise _bad("optimizer class", "the optimizer's class name", self.class_name, _FIX)
        if not isinstance(self.module, str):
            raise _bad("optimizer module", "the optimizer's module name", self.module, _FIX)
        if not all(isinstance(g, GroupHyper) for g in self.groups):
            raise _bad("optimizer groups", "GroupHyper entries", self.groups)
        _set(self, "groups", tuple(self.groups))
        _set(self, "state_before_recording", _flag("state_before_recording", self.state_before_recording))

    @classmethod
    def of(cls, optimizer: Any) -> "OptimizerSpec":
        """The description of a live ``torch.optim.Optimizer``."""
        name = type(optimizer).__name__
        kind = OptimizerKind.of(name)
        groups = tuple(GroupHyper.of_group(g, typed=kind is not OptimizerKind.OTHER) for g in optimizer.param_groups)
        # a momentum buffer (or Adam moments) from before the recording makes the first recorded updates depend on
        # unrecorded history: the exact kernel machine refuses such a recording
        had_state = any(bool(st) for st in optimizer.state.values())
        return cls(kind, name, type(optimizer).__module__, groups, had_state)

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> "OptimizerSpec":
        if not isinstance(d, Mapping) or not isinstance(d.get("class"), str):
            raise _bad("the manifest's meta.optimizer", 'a JSON object with the optimizer\'s "class"', d, _FIX)
        kind = OptimizerKind.of(d["class"])
        groups = d.get("param_groups", [])
        if not isinstance(groups, list):
            raise _bad("meta.optimizer.param_groups", "a list of parameter groups", groups, _FIX)
        typed = kind is not OptimizerKind.OTHER
        rest = {k: v for k, v in d.items() if k not in ("class", "module", "param_groups", "state_before_recording")}
        return cls(kind, d["class"], d.get("module", ""),
                   tuple(GroupHyper.from_json(g, typed=typed, where=f"meta.optimizer.param_groups[{i}]")
                         for i, g in enumerate(groups)),
                   d.get("state_before_recording", False), rest)

    def to_json(self) -> dict[str, Any]:
        return {"class": self.class_name, "module": self.module, "param_groups": [g.to_json() for g in self.groups],
                "state_before_recording": self.state_before_recording, **self.extra}


# ---------------------------------------------------------------------------------------------- steps
@dataclass(frozen=True)
class StateRef:
    """Where one step's optimizer state lies in the trajectory's files (written for adaptive optimizers): row
    ``row`` of the file ``file`` (relative to the trajectory directory), the optimizer's step count ``t`` that
    its bias correction used (``step_count``: shared by every updated parameter; ``step_counts``: one per state
    entry, in the state file's entry order, where they differ), and the trainable parameters the step did not
    update (``skipped``: no gradient, so Adam left their weights, moments and step count unchanged)."""

    file: str
    row: int
    step_count: int | None = None
    step_counts: tuple[int, ...] | None = None
    skipped: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not isinstance(self.file, str) or not self.file or Path(self.file).is_absolute() or ".." in Path(
                self.file).parts:
            raise _bad("optimizer_state.file", "a file name inside the trajectory directory", self.file, _FIX)
        _set(self, "row", _count("optimizer_state.row", self.row, 0))
        if self.step_count is not None:
            _set(self, "step_count", _count("optimizer_state.step_count", self.step_count, 1))
        if self.step_counts is not None:
            _set(self, "step_counts", tuple(_count("optimizer_state.step_counts", c, 0) for c in self.step_counts))
        if isinstance(self.skipped, str) or not all(isinstance(n, str) for n in self.skipped):
            raise _bad("optimizer_state.skipped", "a list of parameter names", self.skipped, _FIX)
        _set(self, "skipped", tuple(self.skipped))

    @classmethod
    def from_json(cls, d: Any) -> "StateRef":
        if not isinstance(d, Mapping) or not {"file", "row"} <= set(d):
            raise _bad("optimizer_state", 'a JSON object {"file": …, "row": …}', d, _FIX)
        return cls(d["file"], d["row"], d.get("step_count"), d.get("step_counts"), d.get("skipped", ()))

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"file": self.file, "row": self.row}
        for k in ("step_count", "step_counts", "skipped"):
            if getattr(self, k):
                out[k] = list(v) if isinstance(v := getattr(self, k), tuple) else v
        return out


@dataclass(frozen=True, eq=False)
class StepRecord:
    """Step ``index`` of a recording: the interval from w_s to w_{s+1}.

    Attributes:
        index: s.
        lr: ε_s, the step size applied (over several optimizer steps: their sum).
        micro_batches: the ordered training indices of the step's batch, one array per gradient-accumulation
            micro-batch (one today), or None when the batch was not recorded.
        groups: the hyper-parameters the trainable parameter groups applied at this step: one entry when every
            group used the same, () when none were recorded.
        optimizer_steps: how many optimizer steps the point w_{s+1} covers (> 1 for a recording every k steps;
            None: one, not written).
        output_grads: the stored per-sample loss derivatives ∂ℓ_i/∂f of the batch (float64), or None.
        group_lrs: the step size of each trainable group where they differ (None: every group applied ``lr``).
        clip_coef: the gradient-clipping coefficient c_s of the step, ‖g_clipped‖/‖g_raw‖ as measured by the
            recorder between the backward passes and ``optimizer.step()`` (None: not measured; 1.0 is written only
            when a step's gradient was measured unchanged and the recording measures clipping).
        clip_scalar: False when the gradient was changed between backward and ``optimizer.step()`` by something
            other than one scalar for all parameters (``clip_grad_value_``, per-tensor scaling): the step's update
            is then not ``c_s`` times the batch gradient and the exact machine must refuse it. None: not measured.
        micro_weights: the factor each micro-batch's loss was multiplied by before its ``backward()`` (e.g.
            ``1/k`` for ``loss / k`` over ``k`` accumulation micro-batches), or None when not recorded.
        optimizer_state: where the step's optimizer state lies (None: not recorded; always None for SGD).
        extra: the per-step metadata passed to ``rec.step(**extra)``, as recorded.
    """

    index: int
    lr: float
    micro_batches: tuple[np.ndarray, ...] | None = None
    groups: tuple[GroupHyper, ...] = ()
    optimizer_steps: int | None = None
    output_grads: np.ndarray | None = None
    group_lrs: tuple[float, ...] | None = None
    clip_coef: float | None = None
    optimizer_state: StateRef | None = None
    clip_scalar: bool | None = None
    micro_weights: tuple[float, ...] | None = None
    extra: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        at = f"step {self.index}"
        _set(self, "index", _count("step index", self.index, 0))
        _set(self, "lr", _number(f"{at}: lr (its step size)", self.lr, low=0.0))
        if self.micro_batches is not None:
            if isinstance(self.micro_batches, np.ndarray) or not isinstance(self.micro_batches, Sequence) or \
                    not self.micro_batches:
                raise _bad(f"{at}: micro_batches", "a non-empty list of index lists (one per micro-batch)",
                           self.micro_batches, "pass [batch_indices] for a step without gradient accumulation")
            _set(self, "micro_batches", tuple(_indices(f"{at}: micro-batch {j}", b)
                                                  for j, b in enumerate(self.micro_batches)))
        if not all(isinstance(g, GroupHyper) for g in self.groups):
            raise _bad(f"{at}: groups", "GroupHyper entries", self.groups)
        _set(self, "groups", tuple(self.groups))
        if self.optimizer_steps is not None:
            _set(self, "optimizer_steps", _count(f"{at}: optimizer_steps", self.optimizer_steps, 1))
        if self.output_grads is not None:
            g = np.array(self.output_grads, dtype=np.float64)
            g.flags.writeable = False
            _set(self, "output_grads", g)
        if self.group_lrs is not None:
            _set(self, "group_lrs", tuple(_number(f"{at}: group_lrs", v, low=0.0) for v in self.group_lrs))
        if self.clip_coef is not None:
            _set(self, "clip_coef", _number(f"{at}: clip_coef", self.clip_coef, low=0.0))
        if self.clip_scalar is not None:
            _set(self, "clip_scalar", _flag(f"{at}: clip_scalar", self.clip_scalar))
        if self.micro_weights is not None:
            mw = tuple(_number(f"{at}: micro_weights", v, low=0.0) for v in self.micro_weights)
            if self.micro_batches is None or len(mw) != len(self.micro_batches):
                raise _bad(f"{at}: micro_weights", "one loss weight per micro-batch "
                           f"({0 if self.micro_batches is None else len(self.micro_batches)})", list(mw), _FIX)
            _set(self, "micro_weights", mw)
        if self.optimizer_state is not None and not isinstance(self.optimizer_state, StateRef):
            raise _bad(f"{at}: optimizer_state", "a StateRef", self.optimizer_state)
        if not isinstance(self.extra, Mapping):
            raise _bad(f"{at}: extra", "a mapping of per-step metadata", self.extra)
        _set(self, "extra", dict(self.extra))

    @property
    def batch_indices(self) -> np.ndarray | None:
        """The step's whole ordered batch (its micro-batches one after the other), or None if not recorded."""
        mb = self.micro_batches
        if mb is None:
            return None
        return mb[0] if len(mb) == 1 else np.concatenate(mb)

    @property
    def covers(self) -> int:
        """How many optimizer steps the step covers (1 unless recorded every k steps)."""
        return 1 if self.optimizer_steps is None else self.optimizer_steps

    @classmethod
    def from_json(cls, index: int, line: Mapping[str, Any], *, typed: bool = True) -> "StepRecord":
        """Step ``index`` from its line of ``steps.jsonl`` (``typed=False``: an OTHER optimizer's hyper-parameters
        are kept as recorded)."""
        if not isinstance(line, Mapping) or "lr" not in line:
            raise _bad(f"step {index}", 'a JSON object with its step size "lr"', line, _FIX)
        mb = line.get("micro_batches")
        if mb is None and line.get("batch_indices") is not None:
            mb = [line["batch_indices"]]
        h = line.get("optimizer")
        if h is None:
            groups = []
        elif isinstance(h, Mapping) and "groups" in h:
            if not isinstance(h["groups"], list):
                raise _bad(f"step {index}: optimizer.groups", "a list of parameter groups", h["groups"], _FIX)
            groups = [GroupHyper.from_json(g, typed=typed, where=f"step {index}: group {j}")
                      for j, g in enumerate(h["groups"])]
        else:
            groups = [GroupHyper.from_json(h, typed=typed, where=f"step {index}: optimizer")]
        st = line.get("optimizer_state")
        return cls(index, line["lr"], mb, tuple(groups), line.get("optimizer_steps"), line.get("output_grads"),
                   line.get("group_lrs"), line.get("clip_coef"), None if st is None else StateRef.from_json(st),
                   line.get("clip_scalar"), line.get("micro_weights"), {k: v for k, v in line.items() if k not in _STEP_KEYS})

    def to_json(self) -> dict[str, Any]:
        """The step's line of ``steps.jsonl`` (keys in the order pkfast has always written them)."""
        b = self.batch_indices
        out: dict[str, Any] = {"lr": self.lr, "batch_indices": None if b is None else b.tolist()}
        if self.groups:
            g = [h.to_json() for h in self.groups]
            out["optimizer"] = g[0] if len(g) == 1 else {"groups": g}
        if self.output_grads is not None:
            out["output_grads"] = self.output_grads.tolist()
        if self.optimizer_steps is not None:
            out["optimizer_steps"] = self.optimizer_steps
        if self.micro_batches is not None and len(self.micro_batches) > 1:
            out["micro_batches"] = [m.tolist() for m in self.micro_batches]
        for k in ("group_lrs", "clip_coef"):
            if getattr(self, k) is not None:
                out[k] = list(self.group_lrs) if k == "group_lrs" else self.clip_coef
        if self.micro_weights is not None:
            out["micro_weights"] = list(self.micro_weights)
        if self.clip_scalar is not None:
            out["clip_scalar"] = self.clip_scalar
        if self.optimizer_state is not None:
            out["optimizer_state"] = self.optimizer_state.to_json()
        return {**out, **{k: jsonable(v) for k, v in self.extra.items()}}

    def __eq__(self, other: object) -> bool:
        return isinstance(other, StepRecord) and self.index == other.index and self.to_json() == other.to_json()

    __hash__ = None  # type: ignore[assignment]


# ---------------------------------------------------------------------------------------------- the recording
@dataclass(frozen=True, eq=False)
class Recording:
    """A training run's record: its optimizer (None: not recorded, e.g. a trajectory from checkpoints), its steps,
    its loss convention (the dict :meth:`pkfast.LossSpec.to_meta` writes and :meth:`pkfast.LossSpec.from_module`
    reads), whether
    buffers were recorded, whether targets were saved with it, and the manifest's other metadata (``extra``).

    Example:
        >>> from pkfast.trajectory.recording import Recording, StepRecord
        >>> rec = Recording(steps=(StepRecord(0, 0.1, micro_batches=[[2, 0, 1]]),))
        >>> meta, lines = rec.to_json()
        >>> lines
        [{'lr': 0.1, 'batch_indices': [2, 0, 1]}]
        >>> Recording.from_json(meta, lines) == rec
        True
    """

    steps: tuple[StepRecord, ...]
    optimizer: OptimizerSpec | None = None
    loss: Mapping[str, Any] | None = None
    buffers_recorded: bool | None = None
    has_targets: bool = False
    extra: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not all(isinstance(s, StepRecord) for s in self.steps):
            raise _bad("steps", "StepRecord entries", type(self.steps).__name__)
        _set(self, "steps", tuple(self.steps))
        wrong = next((i for i, s in enumerate(self.steps) if s.index != i), None)
        if wrong is not None:
            raise _bad(f"step #{wrong}", f"index {wrong} (steps in order from 0)", self.steps[wrong].index)
        if self.optimizer is not None and not isinstance(self.optimizer, OptimizerSpec):
            raise _bad("optimizer", "an OptimizerSpec or None", self.optimizer)
        if self.loss is not None and (not isinstance(self.loss, Mapping) or not isinstance(self.loss.get("kind"), str)):
            raise _bad("the manifest's meta.loss", 'a loss convention {"kind": …, "reduction": …}', self.loss,
                       "record the loss as TrajectoryRecorder(loss=nn.CrossEntropyLoss(…)) or pass loss= again")
        if self.buffers_recorded is not None:
            _set(self, "buffers_recorded", _flag("meta.buffers_recorded", self.buffers_recorded))
        _set(self, "has_targets", _flag("has_targets", self.has_targets))
        _set(self, "extra", dict(self.extra))

    @property
    def num_steps(self) -> int:
        return len(self.steps)

    def __eq__(self, other: object) -> bool:
        return (isinstance(other, Recording) and self.has_targets == other.has_targets
                and self.to_json() == other.to_json())

    __hash__ = None  # type: ignore[assignment]

    @classmethod
    def from_json(cls, meta: Mapping[str, Any] | None, lines: Sequence[Mapping[str, Any]], *,
                  has_targets: bool = False) -> "Recording":
        """A recording from a manifest's ``meta`` and the lines of its ``steps.jsonl``."""
        meta = dict(meta or {})
        opt = meta.get("optimizer")
        spec = None if opt is None else OptimizerSpec.from_json(opt)
        typed = spec is None or spec.kind is not OptimizerKind.OTHER
        steps = tuple(StepRecord.from_json(s, line, typed=typed) for s, line in enumerate(lines))
        return cls(steps, spec, meta.get("loss"), meta.get("buffers_recorded"), has_targets,
                   {k: v for k, v in meta.items() if k not in _META_KEYS})

    def meta_json(self) -> dict[str, Any]:
        """The manifest's ``meta`` (keys in the order the recorder has always written them)."""
        out: dict[str, Any] = {}
        if self.optimizer is not None:
            out["optimizer"] = self.optimizer.to_json()
        if self.buffers_recorded is not None:
            out["buffers_recorded"] = self.buffers_recorded
        if self.loss is not None:
            out["loss"] = jsonable(dict(self.loss))
        return {**out, **jsonable(dict(self.extra))}

    def to_json(self) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        """``(meta, lines)``: the manifest's ``meta`` and the lines of ``steps.jsonl``."""
        return self.meta_json(), [s.to_json() for s in self.steps]

    @classmethod
    def from_files(cls, path: str | Path) -> "Recording":
        """The recording of a trajectory directory: its complete steps (as :meth:`pkfast.Trajectory.load` reads
        them: a torn trailing step is not one)."""
        path = Path(path)
        if not (path / MANIFEST).exists():
            raise FileNotFoundError(f"{_FN}.from_files: {str(path)!r} is not a recorded trajectory (no {MANIFEST} "
                                    "inside); expected a directory written by TrajectoryRecorder or Trajectory.save")
        manifest = read_manifest(path)
        rows = complete_rows(path, int(manifest["num_params"]), np.dtype(manifest["dtype"]).itemsize)
        lines = read_steps(path)[: max(0, rows - 1)]
        return cls.from_json(manifest.get("meta", {}), lines, has_targets=(path / TARGETS).exists())
