"""KernelMachine: a trained network as an exact kernel machine over its training data, and attributions.

For a network trained by (mini-batch) SGD, optionally with momentum, Nesterov and weight decay, and recorded
by :class:`pkfast.TrajectoryRecorder` (weights, applied lr, ordered batch indices, loss convention, optimizer
hyperparameters: read as the typed :attr:`pkfast.Trajectory.recording`), docs/math.md §3 and §6 give

    f(x; w_T) = b(x) + Σ_i c_i(x),      c_i(x) = −Σ_r Ψ_r(x) λ_{r,i} ∇_w ℓ(x_i; w_r)   (i ∈ B_r)

with Ψ_r(x) = Σ_{s≥r} ε_s κ_{s,r} J̄_s(x) from the backward recursion over the momentum coefficients (plain
SGD: Ψ_r = ε_r J̄_r), J̄_s the test-side Jacobian averaged over the step segment by Gauss–Legendre quadrature
(``rule="exact"``) or taken at w_s (``rule="left"``, Domingos' Riemann reading), and
b(x) = f(x; w_0) − Σ_r λ^wd_r Ψ_r(x) w_r (coupled weight decay is data-free, so it is folded into the bias).
With ``rule="exact"`` this holds up to the quadrature error, which :meth:`KernelMachine.certificate` measures.

What is exact: plain SGD, SGD with momentum/dampening/Nesterov, coupled weight decay, any lr schedule, any
batching, mean/sum reductions, class weights, label smoothing, gradient clipping by one coefficient and
accumulation over weighted micro-batches (as recorded); and Adam, AdamW (amsgrad), RMSprop (momentum, centered)
and Adagrad given each step's recorded preconditioner P_t (:mod:`pkfast.machine.adaptive`, docs/math.md §6.2:
P_t is taken as recorded, so the influence a training point has *through* P_t is attributed to no training
point). What is refused: other optimizers, adaptive trajectories without the preconditioner (from checkpoints),
``maximize=True``, momentum state from before the recording, BatchNorm in train mode, missing batch indices or
loss metadata. Clipping or noise that the recording does not show appear as a large update residual in
:meth:`certificate`.
"""

from __future__ import annotations


import logging
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.func import functional_call, jvp

from pkfast import _checks

from pkfast.engine import inputs
from pkfast.engine.driver import check_model_and_trajectory
from pkfast.gram import gram
from pkfast.engine.functional import FunctionalModel
from pkfast.loss import LossSpec
from pkfast.options import Options, model_device
from pkfast.machine import adaptive, data_check
from pkfast.machine.adaptive_sweep import AdaptiveSweep
from pkfast.machine.sweep import Sweep, one_momentum
from pkfast.engine.quadrature import DEFAULT_NODES, EvalPoint
from pkfast.trajectory.points import Trajectory
from pkfast.trajectory.recording import GroupHyper, OptimizerKind, Recording

log = logging.getLogger("pkfast")

__all__ = ["KernelMachine", "Explanation", "Certificate"]

_FN = "pkfast.KernelMachine"
#: The largest relative update residual ‖Δ_s − Δ̂_s‖/‖Δ_s‖ a step may show before the machine refuses the
#: recording (:meth:`KernelMachine.verify`). Complete float64 recordings show ~1e-14, float32 ones ~1e-6; the
#: unrecorded training events seen in practice (clipping, accumulation, shuffled X_train, Adam read as SGD)
#: show 0.04–14.
UPDATE_TOL = 1e-3


@dataclass
class Explanation:
    """Top-k training points for one prediction (:meth:`KernelMachine.explain`).

    Attributes:
        target: the class (or ``(class, competitor)`` for a margin) the scores refer to.
        proponents, proponent_scores: the k highest scores (most support for the target), highest first.
        opponents, opponent_scores: the k lowest scores, lowest first.
        total: Σ_i score_i (= the target's f(x; w_T) − b(x) for the exact machine).
        coverage: Σ of the proponents' scores / Σ of all positive scores.
    """

    target: Any
    proponents: torch.Tensor
    proponent_scores: torch.Tensor
    opponents: torch.Tensor
    opponent_scores: torch.Tensor
    total: float
    coverage: float


@dataclass
class Certificate:
    """How exact the kernel machine is on some queries (:meth:`KernelMachine.certificate`).

    Attributes:
        quadrature: ``[T, M, C]`` per-step residual r_s(x) = f(x; w_{s+1}) − f(x; w_s) − J̄_s(x) Δ_s (the
            quadrature error of the segment integral; 0 up to rounding for exact quadrature).
        update: ``[T]`` relative error ‖Δ_s − Δ̂_s‖ / ‖Δ_s‖ between the recorded step and the step recomputed
            from the batch gradients and the optimizer's rule (≈ rounding when the recording is complete;
            large when something unrecorded — clipping, noise, another loss — moved the weights).
        max_quadrature: max |r_s(x)| relative to max |f(x; w_T) − f(x; w_0)|.
    """

    quadrature: torch.Tensor
    update: torch.Tensor
    max_quadrature: float


class KernelMachine:
    """A network trained by SGD, recorded, rewritten as ``f(x) = b(x) + Σ_i c_i(x)`` over its training points.

    Args:
        model: the trained architecture (its weights come from the trajectory).
        trajectory: the recording (:class:`pkfast.TrajectoryRecorder`; ``Trajectory.from_checkpoints`` with
            ``batch_indices`` also works and is then taken as plain SGD).
        X_train: the training inputs the batch indices refer to.
        y_train: their targets (default: those recorded with the trajectory).
        loss: the training loss convention (``nn.CrossEntropyLoss``, ``nn.MSELoss``, a
            :class:`pkfast.LossSpec`); default: the one recorded.
        rule: ``"exact"`` (Gauss–Legendre test-side Jacobians: exact to quadrature precision) or ``"left"``
            (Jacobians at w_s: Domingos' Riemann reading, error O(lr)).
        nodes: Gauss–Legendre nodes per step for ``rule="exact"`` (default 2).
        dtype: computation dtype (default ``torch.float64``).
        memory_budget: bytes (or ``"2GiB"``) for the query-side accumulators; sets the query chunk. Default: half
            of the free memory of the compute device (the rule of every pkfast computation).
        progress: progress bars over steps.
        verify: check at construction that the recorded weights follow from the recorded batches, loss and
            optimizer (:meth:`verify`; one batch gradient per step) and refuse with the likely causes if not.
            ``verify=False`` builds the machine anyway (its predictions then differ from the network).
        update_tol: the largest relative update residual accepted by the check (default :data:`UPDATE_TOL`).
        output_fn: reduces what the model returns to its output tensor (default: a tensor as it is, a mapping or
            ``ModelOutput``'s ``"logits"``, a tuple's first element; :func:`pkfast.engine.inputs.reduce_output`).
            ``X_train`` and queries may be mappings or tuples of arrays (:mod:`pkfast.engine.inputs`).
        check_data: refuse an ``X_train`` whose rows differ from the recorder's input fingerprints (another order,
            other preprocessing) and a ``y_train`` unlike the recorded targets (:mod:`pkfast.machine.data_check`).

    Example:
        >>> import torch, pkfast, tempfile
        >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
        <...>
        >>> net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3)).double()
        >>> X, y = torch.randn(16, 4, dtype=torch.float64), torch.randint(0, 3, (16,))
        >>> opt, lossf = torch.optim.SGD(net.parameters(), lr=0.1), torch.nn.CrossEntropyLoss()
        >>> path = tempfile.mkdtemp() + "/traj"
        >>> with pkfast.TrajectoryRecorder(net, opt, path, loss=lossf, targets=y) as rec:
        ...     for s in range(5):
        ...         idx = torch.arange(s % 2 * 8, s % 2 * 8 + 8)
        ...         opt.zero_grad(); lossf(net(X[idx]), y[idx]).backward(); opt.step()
        ...         rec.step(batch_indices=idx)
        >>> km = pkfast.KernelMachine(net, pkfast.Trajectory.load(path), X, nodes=3, progress=False)
        >>> Xq = torch.randn(2, 4, dtype=torch.float64)
        >>> bool(torch.allclose(km.predict(Xq), net(Xq), atol=1e-9))
        True
        >>> km.contributions(Xq).shape   # c_i(x) for every query, training point and class
        torch.Size([2, 16, 3])
    """

    def __init__(self, model: torch.nn.Module, trajectory: Trajectory, X_train: Any, y_train: Any = None,
                 loss: Any = None, *, rule: str = "exact", nodes: int = DEFAULT_NODES, dtype: Any = torch.float64,
                 memory_budget: Any = None, progress: bool = True, output_fn: Any = None, verify: bool = True,
                 update_tol: float = UPDATE_TOL, check_data: bool = True) -> None:
        model = check_model_and_trajectory(_FN, model, trajectory)
        self.opts = Options.check(_FN, rules=("exact", "left"), strict_nodes=False, rule=rule, nodes=nodes, dtype=dtype,
                                  memory_budget=memory_budget, output_fn=output_fn)
        self.rule, self.nodes, self.dtype = self.opts.rule, self.opts.nodes, self.opts.dtype
        self.progress = progress
        self.trajectory = trajectory
        self.X, self._packing = inputs.pack(_FN, "X_train", X_train)
        N = self.X.shape[0]
        if y_train is None:
            y_train = trajectory.targets
            if y_train is None:
                raise ValueError(f"{_FN}: y_train is needed (the targets of X_train); none was passed and the "
                                 "trajectory recorded none (TrajectoryRecorder(targets=…))")
        self.y = _checks.as_target_tensor(_FN, "y_train", y_train, N)
        self._record = record = trajectory.recording
        if loss is None:
            rec = record.loss
            if rec is None:
                raise ValueError(
                    f"{_FN}: the loss convention is needed to recompute each training point's loss gradient: pass "
                    "loss=nn.CrossEntropyLoss(...) (or MSELoss, or a pkfast.LossSpec) exactly as in training, or "
                    "record it (TrajectoryRecorder(loss=…)); none was passed and the trajectory recorded none"
                )
            loss = dict(rec)
        self.loss = LossSpec.from_module(loss, fn=_FN)
        self._steps = self._read_optimizer(record)
        self._momentum = one_momentum(self._steps, _FN)
        self._batches = self._read_batches(record, N)
        self._adaptive = record.optimizer is not None and record.optimizer.kind.adaptive
        if check_data:
            data_check.check_data(_FN, record, X_train, self._batches, self.y, trajectory.targets)

        device = model_device(model)
        adapt = dict(packing=self._packing, output_fn=self.opts.output_fn)
        self.fm = FunctionalModel(model, trajectory, dtype=self.dtype, device=device, fn=_FN, **adapt)
        self.fm_loss = FunctionalModel(model, trajectory, dtype=self.dtype, device=device, fn=_FN, loss=self.loss,
                                       **adapt)
        self.C = self.fm.probe(self.X, _FN, "X_train")
        self.fm_loss.probe(self.X, _FN, "X_train")
        self.loss.check_targets(self.y, self.C, "y_train", _FN)
        self.fm_loss.check_loss_function(self.X, self.y, _FN)
        budget = self.opts.budget(device)
        per_query = 3 * self.C * self.fm.num_params * torch.empty((), dtype=self.dtype).element_size()
        self.query_chunk = max(1, int(budget // max(1, per_query)))
        self._sweeper = self._make_sweep(budget)
        #: ``[T]`` max |g_stored − g_recomputed| / max |g_stored| per step, where the recording stored the
        #: training forward pass's loss derivatives (``TrajectoryRecorder(store_output_grads=True)``; NaN for
        #: steps without them), else None. Rounding-level values mean the model's forward pass reproduces the
        #: training one; larger ones (augmentation, dropout, train-mode normalisation) mean the decomposition —
        #: which uses the recomputed derivatives — describes the model, not the training run.
        self.output_grad_mismatch = self._output_grad_mismatch()
        if self.output_grad_mismatch is not None:
            worst = float(torch.nan_to_num(self.output_grad_mismatch, nan=0.0).max())
            if worst > 1e-6:
                warnings.warn(
                    f"{_FN}: the loss derivatives recorded during training differ from those recomputed from the model "
                    f"by up to {worst:.2e} (relative): the training forward pass was not the model's (data "
                    "augmentation, dropout or train-mode normalisation?), so the kernel machine reproduces the "
                    "trajectory's weights through the model's own gradients, not the training run's",
                    stacklevel=2)
        #: ``[T]`` the update residual ‖Δ_s − Δ̂_s‖/‖Δ_s‖ of every recorded step (measured at construction when
        #: ``verify=True``, else on the first :meth:`certificate`).
        self.update_residual: torch.Tensor | None = None
        if verify:
            self.verify(update_tol)

    def _make_sweep(self, budget: int) -> Sweep | AdaptiveSweep:
        """The backward pass over the steps: the adaptive one (:mod:`pkfast.machine.adaptive_sweep`) for a recorded
        preconditioner, else SGD's, each with the rows' weights λ (clipping, micro-batches)."""
        weights = adaptive.row_weights(_FN, self._record, self.loss, self.y, self.C, adaptive=self._adaptive)
        common = dict(batches=self._batches, rule=self.rule, nodes=self.nodes, budget=budget, progress=self.progress)
        if self._adaptive:
            plan = adaptive.read_plan(_FN, self.trajectory, self._steps)
            return AdaptiveSweep(self.fm, self.fm_loss, self.X, self.y, plan=plan, weights=weights, fn=_FN, **common)
        # (the sweep reads each step's weight decay by name)
        sweep_steps = [{"weight_decay": h.weight_decay or 0.0} for h in self._steps]
        return Sweep(self.fm, self.fm_loss, self.X, self.y, self.loss, steps=sweep_steps, momentum=self._momentum,
                     weights=weights, **common)

    # ------------------------------------------------------------------ the recording
    def _read_optimizer(self, rec: Recording) -> list[GroupHyper]:
        """Each step's hyper-parameters from the typed recording, refusing what the decomposition cannot rebuild."""
        opt = rec.optimizer
        if opt is not None and opt.kind is not OptimizerKind.SGD and not opt.kind.adaptive:
            raise ValueError(
                f"{_FN}: the trajectory was recorded with {opt.class_name}; the exact decomposition is implemented for "
                "SGD (plain, momentum, Nesterov, weight decay) and for Adam, AdamW, RMSprop and Adagrad recorded with "
                "their per-step preconditioner (docs/math.md §6). Use pkfast.gram(rule='left') for the path kernel"
            )
        steps = rec.steps
        if opt is not None and opt.state_before_recording and steps and len(steps[0].groups) == 1 \
                and steps[0].groups[0].momentum:
            raise ValueError(
                f"{_FN}: the optimizer already held momentum buffers when recording started, so the first "
                "recorded steps depend on unrecorded gradients; start recording with a fresh optimizer"
            )
        out = []
        for step in steps:
            s = step.index
            if step.covers > 1:
                raise ValueError(f"{_FN}: point {s + 1} of the recording covers {step.covers} optimizer "
                                 "steps (recorded every k steps); the exact decomposition needs every step's weights "
                                 "and batch. Record every step, or use pkfast.gram for the path kernel")
            per_group_decay = opt is not None and opt.kind.adaptive and adaptive.decay_only(step.groups)
            if len(step.groups) > 1 and not per_group_decay:
                raise ValueError(f"{_FN}: step {s}: parameter groups used different hyperparameters "
                                 f"{[g.to_json() for g in step.groups]}; one decomposition needs one lr, momentum and "
                                 "weight decay for all trainable parameters (Adam, AdamW, RMSprop, Adagrad: groups may "
                                 "differ in weight decay)")
            h = step.groups[0] if step.groups else GroupHyper()
            if h.maximize:
                raise ValueError(f"{_FN}: step {s} used maximize=True; the decomposition assumes descent")
            out.append(h)
        return out

    def _read_batches(self, rec: Recording, N: int) -> list[torch.Tensor]:
        out = []
        for step in rec.steps:
            b = step.batch_indices
            if b is None:
                raise ValueError(f"{_FN}: step {step.index} has no recorded batch indices; record them with "
                                 "rec.step(batch_indices=idx) (the ordered indices into X_train)")
            b = torch.from_numpy(b.copy())
            if b.numel() and (int(b.min()) < 0 or int(b.max()) >= N):
                bad = int(b[(b < 0) | (b >= N)][0])
                raise ValueError(f"{_FN}: step {step.index} records training index {bad}, but X_train has {N} points "
                                 f"(indices 0…{N - 1}); pass the X_train the batches were drawn from")
            out.append(b)
        return out

    # ------------------------------------------------------------------ pieces
    def _queries(self, X: Any, name: str = "X") -> torch.Tensor:
        if self._packing is None and inputs.is_structured(X):
            raise TypeError(f"{_FN}: {name} is a {type(X).__name__} of arrays while X_train is one array; expected "
                            "the same structure")
        X, _ = inputs.pack(_FN, name, X, self._packing)
        _checks.check_feature_shapes(_FN, self.X, X)
        return X

    def _chunks(self, X: torch.Tensor):
        for a in range(0, X.shape[0], self.query_chunk):
            yield a, X[a:a + self.query_chunk]

    # ------------------------------------------------------------------ public
    def bias(self, X: Any) -> torch.Tensor:
        """b(x) = f(x; w_0) − (weight-decay terms): the part of the prediction no training point carries."""
        X = self._queries(X)
        return torch.cat([self._sweeper.run(q, samples=False)[0] for _, q in self._chunks(X)]).cpu()

    def predict(self, X: Any) -> torch.Tensor:
        """b(x) + Σ_i c_i(x) as [M, C]: the network's f(x; w_T) rebuilt from the training points."""
        X = self._queries(X)
        parts = [self._sweeper.run(q, samples=False) for _, q in self._chunks(X)]
        return torch.cat([b + t for b, t, _ in parts]).cpu()

    def contributions(self, X: Any, *, per_step: bool = False, out: Any = None) -> torch.Tensor | np.ndarray:
        """c_i(x) ∈ R^C of every training point i to the prediction at each query: ``[M, N, C]``
        (``per_step=True``: ``[T, M, N, C]``, the part contributed through step r's gradient of i).

        ``out``: a path ending in ``.npy``: the result is written there query chunk by query chunk (a plain
        float64 ``.npy``) and returned as a read-only memmap, so M × N × C need not fit in memory."""
        X = self._queries(X)
        if out is None:
            outs = [self._sweeper.run(q, samples=True, per_step=per_step)[2] for _, q in self._chunks(X)]
            return torch.cat(outs, dim=1 if per_step else 0).cpu()
        if not str(out).endswith(".npy"):
            raise ValueError(f"{_FN}.contributions: out must be a path ending in .npy; found {str(out)!r}")
        M, N, T = X.shape[0], self.X.shape[0], self.trajectory.num_steps
        shape = (T, M, N, self.C) if per_step else (M, N, self.C)
        arr = np.lib.format.open_memmap(out, mode="w+", dtype=np.dtype(str(self.dtype).replace("torch.", "")),
                                        shape=shape)
        for a, q in self._chunks(X):
            c = self._sweeper.run(q, samples=True, per_step=per_step)[2].cpu().numpy()
            arr[(slice(None),) * per_step + (slice(a, a + q.shape[0]),)] = c
        arr.flush()
        del arr
        return np.load(out, mmap_mode="r")

    def explain(self, x: Any, k: int = 5, target: int | tuple[int, int] | None = None) -> Explanation:
        """The top-k proponents and opponents of one prediction.

        Args:
            x: one query (``[*features]`` or ``[1, *features]``).
            k: how many of each.
            target: a class c (score_i = c_i[c]), a pair ``(c, c′)`` (margin score c_i[c] − c_i[c′]), or None
                (the predicted class).

        Ties are broken by the lower training index.
        """
        if self._packing is None or not inputs.is_structured(x):  # (a structured query holds one sample per field)
            x = torch.as_tensor(x)
            if x.shape == self.X.shape[1:]:
                x = x.unsqueeze(0)
        x = self._queries(x)
        if x.shape[0] != 1:
            raise ValueError(f"{_FN}.explain: expected one query; found {x.shape[0]} (use contributions() for many)")
        bias, total, c = self._sweeper.run(x, samples=True)
        c = c[0].cpu()
        if target is None:
            target = int(torch.argmax(bias + total))
        if isinstance(target, tuple):
            a, b = target
            score = c[:, a] - c[:, b]
        else:
            if not 0 <= int(target) < self.C:
                raise ValueError(f"{_FN}.explain: target class {target} is outside 0…{self.C - 1}")
            score = c[:, int(target)]
        k = min(int(k), score.numel())
        order = torch.sort(-score, stable=True).indices
        pro = order[:k]
        opp = torch.sort(score, stable=True).indices[:k]
        pos = score.clamp(min=0).sum()
        cover = float(score[pro].clamp(min=0).sum() / pos) if pos > 0 else 0.0
        return Explanation(target, pro, score[pro], opp, score[opp], float(score.sum()), cover)

    def coefficients(self, X: Any, *, tol: float = 1e-12) -> torch.Tensor:
        """Domingos' a_i(x) = c_i(x) / k_p(x, x_i) ∈ R^C, with k_p the output-trace path kernel of the same rule
        (Σ_s ε_s tr J̄_s(x) J(x_i; w_s)ᵀ): ``[M, N, C]``; NaN where |k_p| ≤ tol·max|k_p| (a_i undefined)."""
        X = self._queries(X)
        c = self.contributions(X)
        nodes = self.nodes if self.rule == "exact" else DEFAULT_NODES  # (nodes means nothing to the left rule)
        kp = gram(self.fm.model, self.trajectory, X, self.X, rule=self.rule, nodes=nodes, dtype=self.dtype,
                  progress=False)
        ok = kp.abs() > tol * kp.abs().max()
        a = c / kp.unsqueeze(-1)
        return torch.where(ok.unsqueeze(-1), a, torch.full_like(a, float("nan")))

    def certificate(self, X: Any) -> Certificate:
        """Per-step quadrature residuals on the queries and the recorded-vs-recomputed update error."""
        X = self._queries(X)
        T = self.trajectory.num_steps
        fm = self.fm
        Xd = fm.prepare(X)
        quad = []
        f_prev = fm.outputs(EvalPoint(0), X)
        f0 = f_prev
        for s in range(T):
            f_next = fm.outputs(EvalPoint(s + 1), X)
            delta = fm.state(EvalPoint(s + 1))[0] - fm.state(EvalPoint(s))[0]
            lin = torch.zeros_like(f_prev)
            for point, om in self._sweeper.combo(s):
                flat, statics = fm.state(point)

                def f(p, statics=statics):
                    return functional_call(fm.model, (fm.params(p), statics), (Xd,)).reshape(X.shape[0], -1)

                lin += om * jvp(f, (flat,), (delta,))[1]
            quad.append(f_next - f_prev - lin)
            f_prev = f_next
        quad_t = torch.stack(quad).cpu()
        scale = float((f_prev - f0).abs().max()) or 1.0
        if self.update_residual is None:
            self.update_residual = self._update_residuals()
        return Certificate(quad_t, self.update_residual, float(quad_t.abs().max()) / scale)

    def verify(self, tol: float = None) -> torch.Tensor:
        """Check that the recorded steps are the steps this machine's coefficients imply; refuse if not.

        Each recorded update Δ_s = w_{s+1} − w_s is compared with the update Δ̂_s recomputed from the recorded
        batches, targets, loss and optimizer settings (no query needed: one batch gradient per step, the cost of
        replaying training once). Where ‖Δ_s − Δ̂_s‖/‖Δ_s‖ exceeds ``tol`` (default :data:`UPDATE_TOL`, raised to
        the storage dtype's rounding where weights were stored in low precision) on any step, the decomposition
        would not reproduce the network, so this raises with what it found and the likely causes. Called by the
        constructor unless ``verify=False``.

        Returns:
            ``[T]`` the relative update residual per step (also kept as :attr:`update_residual`).

        Example:
            >>> km.verify()  # doctest: +SKIP
            tensor([3.1e-16, 2.9e-16, ...], dtype=torch.float64)
        """
        tol = UPDATE_TOL if tol is None else float(tol)
        res = self._update_residuals()
        self.update_residual = res
        allowed = torch.clamp(self._rounding_floor(), min=tol)
        bad = torch.nonzero(~(res <= allowed)).flatten().tolist()
        if bad:
            raise ValueError(self._refusal(res, bad, tol))
        return res

    def _rounding_floor(self) -> torch.Tensor:
        """``[T]`` the update residual that storing the weights in the trajectory's dtype alone can cause:
        8 u ‖w_{s+1}‖ / ‖Δ_s‖ (each stored weight is within u |w| of the trained one)."""
        u = torch.finfo(self.trajectory.dtype).eps
        out = []
        for s in range(self.trajectory.num_steps):
            w0, w1 = self.fm.state(EvalPoint(s))[0], self.fm.state(EvalPoint(s + 1))[0]
            out.append(float(8 * u * w1.norm() / (w1 - w0).norm().clamp_min(1e-300)))
        return torch.tensor(out, dtype=torch.float64)

    def _refusal(self, res: torch.Tensor, bad: list[int], tol: float) -> str:
        worst = int(torch.nan_to_num(res, nan=float("inf")).argmax())
        rec = self._record
        causes = ["gradient clipping (clip_grad_norm_ between backward and step) or gradient noise that the "
                  "recording does not show",
                  "gradient accumulation over micro-batches (several backward passes per optimizer step)",
                  "X_train or y_train in another order than the recorded batch indices, or other data",
                  "a loss other than the recorded one (reduction, label smoothing, class weights, extra terms)",
                  "a training forward pass unlike the model's (dropout, data augmentation, train-mode normalisation)"]
        if rec.optimizer is not None and rec.optimizer.kind.adaptive:
            causes.insert(0, "a recorded preconditioner that is not the one the optimizer applied (an edited or "
                             "damaged state file, or an optimizer changed in the loop)")
        elif rec.optimizer is None or rec.optimizer.kind is not OptimizerKind.SGD:
            causes.insert(0, "an optimizer other than plain SGD (a trajectory from checkpoints with lr= is taken as "
                             "plain SGD; for Adam/AdamW/RMSprop/Adagrad record the run with pkfast.TrajectoryRecorder, "
                             "whose per-step preconditioner makes the machine exact)")
        return (f"{_FN}: the recorded weights do not follow from the recorded training: the update residual "
                f"‖Δ_s − Δ̂_s‖/‖Δ_s‖ exceeds {tol:g} on {len(bad)} of {len(res)} steps (worst {float(res[worst]):.3g} "
                f"at step {worst}; first bad step {bad[0]}), so the kernel machine would not reproduce the network. "
                "Likely causes: " + "; ".join(causes) + ". Fix the recording (TrajectoryRecorder around the "
                "real loop, the same X_train order and loss), or pass verify=False to build the machine anyway "
                "(its predictions then differ from the network; certificate() shows by how much)")

    def _output_grad_mismatch(self) -> torch.Tensor | None:
        T = self.trajectory.num_steps
        stored = [None if st.output_grads is None else torch.from_numpy(st.output_grads.copy())
                  for st in self._record.steps]
        if all(g is None for g in stored):
            return None
        out = torch.full((T,), float("nan"), dtype=torch.float64)
        for s, g in enumerate(stored):
            b = self._batches[s]
            if g is None or b.numel() == 0:
                continue
            if g.shape != (b.numel(), self.C):
                raise ValueError(f"{_FN}: step {s} stored output gradients of shape {tuple(g.shape)}; expected "
                                 f"({b.numel()}, {self.C}) for its batch of {b.numel()}")
            f = self.fm.outputs(EvalPoint(s), self.X[b]).to("cpu", torch.float64)
            rec = self.loss.output_grad(f, self.y[b], self.fm.output_shape)
            out[s] = float((rec - g).abs().max() / g.abs().max().clamp_min(1e-300))
        return out

    def _update_residuals(self) -> torch.Tensor:
        """``[T]`` ‖Δ_s − Δ̂_s‖/‖Δ_s‖ through the sweep's own coefficients (:meth:`Sweep.update_residuals`,
        :meth:`AdaptiveSweep.update_residuals`)."""
        return self._sweeper.update_residuals()
