"""adaptive: the coefficient algebra of the exact kernel machine for Adam, AdamW (amsgrad), RMSprop (momentum,
centered) and Adagrad (docs/math.md §6.2), and every optimizer's per-sample gradient weights (clipping and
gradient accumulation included).

Each of these optimizers, given its recorded diagonal preconditioner P_t (``Trajectory.preconditioner``), takes
a step that is linear in the step's gradient g_t and the earlier ones:

    m_t = β_t m_{t−1} + c_t A_t ⊙ g_t,      Δ_t = −σ_t B_t ⊙ m_t − δ_t w_t,
    g_t = Σ_i λ_{t,i} ∇ℓ(x_i; w_t) + γ_t w_t,

with (A_t, B_t) = (1, P_t) for Adam/AdamW (the preconditioner meets the momentum; c_t = 1 − β1, β_t = β1,
σ_t = lr_t/(1 − β1^k), k the step count) and (P_t, 1) for RMSprop and Adagrad (the preconditioner meets the
gradient; RMSprop: β_t = μ its momentum, σ_t = lr_t; Adagrad: β_t = 0, σ_t = lr/(1 + (k−1)·lr_decay)); γ_t is
coupled weight decay (inside g, not clipped), δ_t = lr_t λ decoupled decay (AdamW). λ_{t,i} = c_s × the
micro-batch's loss weight × the loss convention's per-sample weight, c_s the recorded clipping coefficient.

P_t is taken as recorded: the influence a training point has *through* P_t (the second moments depend on every
gradient) is attributed to no training point.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np
import torch

from pkfast.loss import LossSpec
from pkfast.trajectory.points import Trajectory
from pkfast.trajectory.recording import GroupHyper, OptimizerKind, Recording

__all__ = ["AdaptivePlan", "read_plan", "row_weights", "preconditioner_flat", "decay_only", "flat_by_name"]

#: a per-step weight-decay coefficient: one for every parameter, or one per parameter group ({recorded name: value})
Decay = float | dict


@dataclass
class AdaptivePlan:
    """Per-step scalars of the adaptive update (module docstring): ``at_gradient`` True where P_t multiplies the
    gradient (A_t = P_t: RMSprop, Adagrad), False where it multiplies the momentum (B_t = P_t: Adam, AdamW)."""

    kind: OptimizerKind
    at_gradient: bool
    beta: list[float]
    c: list[float]
    sigma: list[float]
    coupled: list[Decay]
    decoupled: list[Decay]


def decay_only(groups) -> bool:
    """Whether parameter groups differ in their weight decay alone (the Trainer's AdamW: no decay for biases and
    normalisation weights), which the adaptive machine takes per parameter.

    Example:
        >>> decay_only([GroupHyper(lr=0.1, weight_decay=0.01), GroupHyper(lr=0.1, weight_decay=0.0)])
        True
        >>> decay_only([GroupHyper(lr=0.1), GroupHyper(lr=0.2)])
        False
    """
    plain = [dataclasses.replace(g, weight_decay=0.0, extra={}) for g in groups]
    return all(p == plain[0] for p in plain)


def _decay(rec: Recording, st, h: GroupHyper) -> Decay:
    """The step's weight decay: h's, or {parameter name: its group's} where groups differ (group_params)."""
    if len(st.groups) <= 1:
        return float(h.weight_decay or 0.0)
    members = rec.optimizer.extra.get("group_params") if rec.optimizer is not None else None
    if not members or len(members) != len(st.groups):
        raise ValueError(f"pkfast.KernelMachine: step {st.index}: parameter groups with different weight decay, but "
                         "the recording does not name each group's parameters (group_params); re-record with "
                         "pkfast.TrajectoryRecorder")
    return {n: float(g.weight_decay or 0.0) for g, names in zip(st.groups, members) for n in names}


def _scaled(d: Decay, k: float) -> Decay:
    return k * d if isinstance(d, float) else {n: k * v for n, v in d.items()}


def _step_count(fn: str, st, kind: OptimizerKind) -> int:
    ref = st.optimizer_state
    if ref is None:
        raise ValueError(f"{fn}: step {st.index} of this {kind.value} recording has no optimizer state row; expected "
                         "every step's preconditioner as TrajectoryRecorder records it: re-record the run")
    if ref.skipped:
        raise ValueError(f"{fn}: step {st.index} did not update {list(ref.skipped)[:3]} (no gradient), so "
                         f"{kind.value} left their moments behind the others'; the exact machine needs every trainable "
                         "parameter updated at every step: freeze them (requires_grad=False) or give them a gradient")
    if ref.step_count is None:
        raise ValueError(f"{fn}: step {st.index}: the parameters' optimizer step counts differ "
                         f"({sorted(set(ref.step_counts or ()))[:4]}); the exact machine needs one bias correction "
                         "per step: start recording with a fresh optimizer")
    return ref.step_count


def read_plan(fn: str, trajectory: Trajectory, steps: list[GroupHyper]) -> AdaptivePlan:
    """The adaptive update's per-step scalars from the recording, refusing what the exact machine cannot rebuild
    (no preconditioner rows, parameters skipped by a step, momentum from before the recording)."""
    rec = trajectory.recording
    kind = rec.optimizer.kind
    if not trajectory.has_preconditioner:
        raise ValueError(
            f"{fn}: the trajectory was trained with {rec.optimizer.class_name} but records no per-step preconditioner "
            "(a trajectory from checkpoints holds the optimizer state at its checkpoints only); the exact machine needs "
            "P_t of every step: record the run with pkfast.TrajectoryRecorder (or its Trainer/Lightning callback), or "
            "use pkfast.gram for the path kernel")
    eps = trajectory.step_sizes.tolist()
    plan = AdaptivePlan(kind, kind in (OptimizerKind.RMSPROP, OptimizerKind.ADAGRAD), [], [], [], [], [])
    first = None
    for st, h, lr in zip(rec.steps, steps, eps):
        k = _step_count(fn, st, kind)
        first = k if first is None else first
        if k != first + st.index:
            raise ValueError(f"{fn}: step {st.index} has optimizer step count {k}; expected {first + st.index} (one "
                             "optimizer step per recorded step): record every optimizer step")
        wd = _decay(rec, st, h)
        if kind in (OptimizerKind.ADAM, OptimizerKind.ADAMW):
            b1 = float(h.betas[0])
            beta, c, sigma = b1, 1.0 - b1, lr / (1.0 - b1 ** k)
            decoupled = kind is OptimizerKind.ADAMW or bool(h.decoupled_weight_decay)
        else:
            b1 = float(h.momentum or 0.0) if kind is OptimizerKind.RMSPROP else 0.0
            beta, c, decoupled = b1, 1.0, False
            sigma = lr if kind is OptimizerKind.RMSPROP else lr / (1.0 + (k - 1) * float(h.lr_decay or 0.0))
        if first > 1 and b1 and st.index == 0:
            raise ValueError(f"{fn}: the optimizer had taken {first - 1} steps when recording started, so its "
                             "momentum holds unrecorded gradients; start recording with a fresh optimizer")
        plan.beta.append(beta)
        plan.c.append(c)
        plan.sigma.append(sigma)
        plan.coupled.append(0.0 if decoupled else wd)
        plan.decoupled.append(_scaled(wd, lr) if decoupled else 0.0)
    return plan


def row_weights(fn: str, rec: Recording, loss: LossSpec, y: torch.Tensor, C: int, *, adaptive: bool
                ) -> list[torch.Tensor]:
    """λ_{s,i} of every row of every step's batch (float64; the micro-batches one after the other, as
    ``batch_indices``): the clipping coefficient c_s × the micro-batch's loss weight × the loss convention's
    per-sample weight within its micro-batch. Refuses a step clipped by more than one scalar, and unequal
    micro-batches whose loss weights were not recorded.

    Example:
        >>> import numpy as np, torch
        >>> from pkfast.trajectory.recording import StepRecord
        >>> st = StepRecord(0, 0.1, micro_batches=(np.array([0, 1, 2]), np.array([3])), micro_weights=(0.75, 0.25),
        ...                 clip_coef=0.5)   # a mean loss over 3 + 1 points, clipped by half
        >>> row_weights("f", Recording(steps=(st,)), LossSpec.from_module(torch.nn.CrossEntropyLoss()),
        ...             torch.tensor([0, 1, 2, 0]), 3, adaptive=False)
        [tensor([0.1250, 0.1250, 0.1250, 0.1250], dtype=torch.float64)]
    """
    opt = rec.optimizer
    measured = opt is not None and opt.extra.get("clip_measured") is True
    out = []
    for st in rec.steps:
        if st.clip_scalar is False or (adaptive and not measured and st.clip_coef is None):
            raise ValueError(
                f"{fn}: step {st.index}'s gradient was changed between backward() and optimizer.step() by something "
                "other than one factor for all parameters (clip_grad_value_, per-tensor scaling, a gradient set by "
                "hand)" + ("" if st.clip_scalar is False else ", or its clipping was not measured") + "; the exact "
                "machine needs g_s = c_s × the backward passes' gradient: clip with clip_grad_norm_ (one coefficient)")
        c = 1.0 if st.clip_coef is None else float(st.clip_coef)
        mbs, mw = st.micro_batches or (), st.micro_weights
        if len(mbs) > 1 and mw is None and st.extra.get("num_items_in_batch") is not None:
            # (the Trainer with a model taking num_items_in_batch: each micro-batch's summed loss over the items of
            # the whole accumulated batch, i.e. the loss convention over the whole batch)
            mbs, mw = (np.concatenate([np.asarray(b) for b in mbs]),), None
        if len(mbs) > 1 and mw is None:
            raise ValueError(f"{fn}: step {st.index} accumulated {len(mbs)} micro-batches but their loss weights were "
                             "not recorded; pass rec.step(micro_batches=…, micro_weights=[the factor each "
                             "micro-batch's loss was multiplied by]) so each point's share of the gradient is known")
        parts = [c * (1.0 if mw is None else float(mw[j])) * loss.batch_weights(y[torch.from_numpy(np.array(b, dtype=np.int64))], C)
                 for j, b in enumerate(mbs)]
        out.append(torch.cat(parts) if parts else torch.zeros(0, dtype=torch.float64))
    return out


def flat_by_name(fn: str, trajectory: Trajectory, names_slices: list[tuple[str, slice]], parts: dict, what: str
                 ) -> torch.Tensor:
    """Per-parameter values ``parts`` ({recorded name: tensor or number}) over the functional model's trainable
    parameters, flattened in its order (float64): ``names_slices`` gives each parameter's name in the model and its
    columns in the trajectory's weight row."""
    by_start = {trajectory.slice_of(n).start: n for n in trajectory.names}
    out = []
    for name, sl in names_slices:
        hit = by_start.get(sl.start)
        if hit not in parts:
            raise ValueError(f"{fn}: the model's trainable parameter {name!r} has no recorded {what} (the recorded "
                             f"ones: {list(parts)[:5]}); expected the parameters the optimizer trained: pass the model "
                             "as recorded, with the same parameters trainable")
        v = parts[hit]
        out.append(v.reshape(-1).to(torch.float64) if isinstance(v, torch.Tensor) else
                   torch.full((sl.stop - sl.start,), float(v), dtype=torch.float64))
    return torch.cat(out)


def preconditioner_flat(fn: str, trajectory: Trajectory, names_slices: list[tuple[str, slice]], s: int
                        ) -> torch.Tensor:
    """P_s over the functional model's trainable parameters, flattened in its order (float64, :func:`flat_by_name`),
    refusing negative or non-finite entries."""
    P = flat_by_name(fn, trajectory, names_slices, trajectory.preconditioner(s, as_dict=True), "preconditioner")
    if not bool(torch.isfinite(P).all()) or bool((P < 0).any()):
        raise ValueError(f"{fn}: step {s}'s recorded preconditioner holds negative or non-finite entries; expected "
                         "1/(√v + ε) > 0: the state file is damaged or edited, re-record the run")
    return P
