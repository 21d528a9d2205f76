"""optimizers: what an optimizer step did beyond its learning rate — the preconditioner of an adaptive step, the
gradient-clipping coefficient — measured on the live optimizer by :class:`StepWatch` for the recorder.

**The preconditioner row.** For Adam, AdamW (amsgrad too), RMSprop and Adagrad the recorder stores, with every
step s, one row of S floats (S: the trainable parameters' entries, in the weights' order) in ``state.bin``: the
diagonal preconditioner P_s the step applied, computed in float64 from the optimizer's state *after* the step
updated it, then rounded once to the state dtype (``TrajectoryRecorder(state_dtype=…)``, default the weights'):

- Adam/AdamW: P = 1/(√v/√(1−β2^t) + ε), v = ``exp_avg_sq`` (amsgrad: ``max_exp_avg_sq``), t the parameter's step
  count; the update is w ← w − lr/(1−β1^t) · P ⊙ m (AdamW first w ← (1 − lr·λ) w; Adam adds λw to g).
- RMSprop: P = 1/(√(v − ḡ²) + ε) centered (ḡ = ``grad_avg``), 1/(√v + ε) otherwise (v = ``square_avg``); the
  update is w ← w − lr · P ⊙ g, or with momentum μ: b ← μ b + P ⊙ g, w ← w − lr · b.
- Adagrad: P = 1/(√Σg² + ε) (``sum``); w ← w − lr/(1 + (t−1)·lr_decay) · P ⊙ g.

Why P and not v: one vector whose product with the step's direction is the update, for every optimizer, so the
exact kernel machine and the preconditioned Gram multiply by it and need no per-optimizer formula for it (ε and
the bias correction of v are inside, computed as torch computes them, in float64); P's relative rounding in
float32 is half that of v (P ∝ v^−½). A parameter the step did not update (no gradient: Adam leaves its weights,
moments and step count unchanged) gets P = 0 and is named in the step's ``optimizer_state.skipped``.

**The clipping coefficient.** A gradient hook (``register_post_accumulate_grad_hook``) takes four float64
statistics of each parameter's accumulated gradient after every backward pass (Σg², Σg, Σ|g|, max|g|); a step
pre-hook takes them again from what ``.grad`` holds when ``optimizer.step()`` starts. c = √(Σ‖g_now‖²/Σ‖g_raw‖²);
the step is *scalar-clipped* when every parameter's four statistics agree with c·(raw) to the gradients'
rounding: ``clip_grad_norm_`` between backward and step is; ``clip_grad_value_``, a per-tensor rescaling or a
gradient set without a backward pass is not (``clip_scalar: false``, for the exact machine to refuse).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from pkfast.trajectory.recording import OptimizerKind

__all__ = ["StepWatch", "StepState", "preconditioner", "STATE_KIND"]

#: What a state row holds (the manifest's ``state.kind``).
STATE_KIND = "preconditioner"


def _step_count(state: dict) -> int:
    t = state.get("step", 0)
    return int(t.item() if isinstance(t, torch.Tensor) else t)


def preconditioner(kind: OptimizerKind, group: dict, state: dict) -> torch.Tensor | None:
    """The diagonal preconditioner P (float64, the parameter's shape) that the optimizer's state ``state`` after a
    step gives the next update, or None when the parameter has no state (never updated).

    Example:
        >>> import torch
        >>> p = torch.nn.Parameter(torch.zeros(3, dtype=torch.float64))
        >>> opt = torch.optim.Adam([p], lr=0.1, eps=1e-8)
        >>> p.grad = torch.tensor([1.0, -2.0, 0.0], dtype=torch.float64); opt.step()
        >>> preconditioner(OptimizerKind.ADAM, opt.param_groups[0], opt.state[p])   # 1/(|g| + ε) at t = 1
        tensor([1.0000e+00, 5.0000e-01, 1.0000e+08], dtype=torch.float64)
    """
    eps = float(group["eps"])
    if kind in (OptimizerKind.ADAM, OptimizerKind.ADAMW):
        v = state.get("max_exp_avg_sq" if group.get("amsgrad") else "exp_avg_sq")
        if v is None:
            return None
        bc2 = 1.0 - float(group["betas"][1]) ** _step_count(state)
        return 1.0 / (v.detach().to(torch.float64).sqrt() / math.sqrt(bc2) + eps)
    if kind is OptimizerKind.RMSPROP:
        v = state.get("square_avg")
        if v is None:
            return None
        v = v.detach().to(torch.float64)
        if group.get("centered"):
            ga = state["grad_avg"].detach().to(torch.float64)
            v = v - ga * ga
        return 1.0 / (v.sqrt() + eps)
    if kind is OptimizerKind.ADAGRAD:
        s = state.get("sum")
        return None if s is None else 1.0 / (s.detach().to(torch.float64).sqrt() + eps)
    raise ValueError(f"pkfast.trajectory.optimizers.preconditioner: expected an adaptive optimizer kind (Adam, "
                     f"AdamW, RMSprop, Adagrad); found {kind.value!r}")


@dataclass
class StepState:
    """What one optimizer step did, as :class:`StepWatch` measured it."""

    clip_coef: float | None = None  # ‖g at step‖/‖g from backward‖ (None: not measurable)
    clip_scalar: bool = True  # whether the gradient at the step is clip_coef × the backward passes' gradient
    row: torch.Tensor | None = None  # the preconditioner row (adaptive optimizers)
    step_counts: tuple[int, ...] = ()  # each state entry's step count after the step (0: never updated)
    skipped: tuple[str, ...] = ()  # trainable parameters without a gradient at the step

    def step_line(self, state_file: str | None, row: int) -> dict[str, Any]:
        """The keys this step adds to its line of ``steps.jsonl``."""
        out: dict[str, Any] = {}
        if self.clip_coef is not None and self.clip_coef != 1.0:
            out["clip_coef"] = self.clip_coef
        if not self.clip_scalar:
            out["clip_scalar"] = False
        if state_file is not None:
            counts = {c for c, n in zip(self.step_counts, self._names) if n not in self.skipped} or {0}
            ref: dict[str, Any] = {"file": state_file, "row": row}
            if len(counts) == 1 and min(counts) >= 1:
                ref["step_count"] = counts.pop()
            else:
                ref["step_counts"] = list(self.step_counts)
            if self.skipped:
                ref["skipped"] = list(self.skipped)
            out["optimizer_state"] = ref
        return out

    _names: tuple[str, ...] = ()


_STATS = 4  # Σg², Σg, Σ|g|, max|g|


def _stats(g: torch.Tensor) -> torch.Tensor:
    a = g.detach().abs()
    return torch.stack([torch.linalg.vector_norm(g.detach(), dtype=torch.float64) ** 2,
                        g.detach().sum(dtype=torch.float64), a.sum(dtype=torch.float64),
                        a.max().to(torch.float64) if a.numel() else a.new_zeros((), dtype=torch.float64)])


class StepWatch:
    """Hooks on a model's trainable parameters and its optimizer measuring, for every ``optimizer.step()``, its
    clipping coefficient and (adaptive optimizers) its preconditioner row; :attr:`steps` holds one
    :class:`StepState` per optimizer step not yet taken by the recorder (:meth:`pop`)."""

    def __init__(self, named_params: Sequence[tuple[str, torch.nn.Parameter]], optimizer: torch.optim.Optimizer,
                 kind: OptimizerKind, state_dtype: torch.dtype | None) -> None:
        self._params = list(named_params)
        self._names = tuple(n for n, _ in self._params)
        self._opt, self._kind = optimizer, kind
        self.state_dtype = state_dtype if kind.adaptive else None
        self._raw: dict[int, torch.Tensor] = {}
        self._before_grad: dict[int, torch.Tensor | None] = {}
        self.steps: list[StepState] = []
        self._handles = [p.register_post_accumulate_grad_hook(self._on_grad) for _, p in self._params
                         if hasattr(p, "register_post_accumulate_grad_hook")]
        self._handles.append(optimizer.register_step_pre_hook(self._on_step_start))  # (the end: the recorder's)

    @property
    def width(self) -> int:
        """S, the number of floats in a state row (the trainable parameters' entries)."""
        return sum(p.numel() for _, p in self._params)

    @property
    def entries(self) -> list[list]:
        return [[n, list(p.shape)] for n, p in self._params]

    def _on_grad(self, p: torch.Tensor) -> None:
        if p.grad is not None and not p.grad.is_sparse:
            self._raw[id(p)] = _stats(p.grad)

    def _on_step_start(self, optimizer, args, kwargs) -> None:
        raw, self._raw = self._raw, {}
        self.steps.append(self._measure(raw))

    def _measure(self, raw: dict[int, torch.Tensor]) -> StepState:
        """The step's clipping and skipped parameters, from the gradients ``.grad`` holds now."""
        ids = [id(p) for _, p in self._params if p.grad is not None]
        grads = {id(p): p.grad for _, p in self._params if p.grad is not None}
        st = StepState(_names=self._names)
        st.skipped = tuple(n for n, p in self._params if p.grad is None)
        if any(i not in raw or grads[i].is_sparse for i in ids):  # a gradient set without a backward pass
            st.clip_scalar = False
        elif ids:
            r = torch.stack([raw[i] for i in ids]).cpu()
            now = torch.stack([_stats(grads[i]) for i in ids]).cpu()
            st.clip_coef, st.clip_scalar = _coefficient(r, now, max(torch.finfo(grads[i].dtype).eps for i in ids))
        return st

    def on_step_end(self, optimizer: torch.optim.Optimizer) -> None:
        """Take the preconditioner row of the step that just ended (called by the recorder's step post-hook)."""
        if not self.steps:  # no pre-hook ran (hooks registered mid-step)
            self.steps.append(StepState(clip_scalar=False, _names=self._names))
        if self._raw:
            # optimizer.step(closure): a backward pass (and a loop's clipping, as Lightning's) ran inside the step,
            # after its pre-hook; the optimizers above leave .grad as it was, so measure it now
            raw, self._raw = self._raw, {}
            self.steps[-1] = self._measure(raw)
        st = self.steps[-1]
        if self.state_dtype is None:
            return
        group_of = {id(p): g for g in optimizer.param_groups for p in g["params"]}
        parts, counts = [], []
        for n, p in self._params:
            state = optimizer.state.get(p, {})
            P = None if n in st.skipped or not state else preconditioner(self._kind, group_of[id(p)], state)
            parts.append(torch.zeros(p.numel(), dtype=self.state_dtype) if P is None else
                         P.reshape(-1).to("cpu", self.state_dtype))
            counts.append(_step_count(state) if state else 0)
        st.row, st.step_counts = torch.cat(parts), tuple(counts)

    def pop(self) -> StepState:
        """The oldest measured step (a step with nothing measured when the optimizer hooks saw none)."""
        return self.steps.pop(0) if self.steps else StepState(clip_scalar=False, _names=self._names)

    def clear(self) -> None:
        self.steps.clear()

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []


def _coefficient(raw: torch.Tensor, now: torch.Tensor, eps: float) -> tuple[float | None, bool]:
    """(c, scalar): c = √(ΣΣg_now²/ΣΣg_raw²) and whether every parameter's statistics are c × its raw ones to
    ``eps``-sized rounding (rows: parameters; columns: Σg², Σg, Σ|g|, max|g|)."""
    total_raw, total_now = float(raw[:, 0].sum()), float(now[:, 0].sum())
    if total_raw == 0.0:
        return (1.0, True) if total_now == 0.0 else (None, False)
    if torch.equal(raw, now):
        return 1.0, True
    c = math.sqrt(total_now / total_raw)
    tol = 16 * eps
    ok = bool(((now[:, 0] - c * c * raw[:, 0]).abs() <= tol * c * c * raw[:, 0]).all())
    ok = ok and bool(((now[:, 1] - c * raw[:, 1]).abs() <= tol * c * raw[:, 2]).all())
    ok = ok and bool(((now[:, 2] - c * raw[:, 2]).abs() <= tol * c * raw[:, 2]).all())
    ok = ok and bool(((now[:, 3] - c * raw[:, 3]).abs() <= tol * c * raw[:, 3]).all())
    return c, ok
