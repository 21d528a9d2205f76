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
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from pkfast import _checks

from pkfast.engine import inputs
from pkfast.engine.driver import check_model_and_trajectory
from pkfast.gram import gram
from pkfast.engine.functional import FunctionalModel
from pkfast.loss import LossSpec
from pkfast.options import Options, model_device
from pkfast.machine.checks import UPDATE_TOL, Certificate, SelfChecks
from pkfast.machine.nodes import NodesCheck, choose_nodes
from pkfast.machine.adaptive import decay_only, read_plan, row_weights
from pkfast.machine.data_check import check_data as check_training_data
from pkfast.machine.adaptive_sweep import AdaptiveSweep
from pkfast.machine.sweep import Sweep, one_momentum
from pkfast.engine.quadrature import DEFAULT_NODES
from pkfast.engine.resources.threads import ThreadPolicy, fitted_threads
from pkfast.trajectory.points import Trajectory
from pkfast.trajectory.recording import GroupHyper, OptimizerKind, Recording

log = logging.getLogger("pkfast")

__all__ = ["KernelMachine", "Explanation", "Certificate"]

_FN = "pkfast.KernelMachine"


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


class KernelMachine(SelfChecks):
    """A network trained by SGD or an adaptive optimizer (Adam, AdamW, RMSprop, Adagrad), recorded, rewritten as
    ``f(x) = b(x) + Σ_i c_i(x)`` over its training points.

    For an adaptive optimizer each step's preconditioner P_t is taken as recorded: c_i(x) is the effect of i's
    gradients as the optimizer applied them, and the influence i has through the second moments (and so P_t) is
    attributed to no training point (docs/math.md §6.2).

    Args:
        model: the trained architecture (its weights come from the trajectory).
        trajectory: the recording (:class:`pkfast.TrajectoryRecorder`, with each adaptive step's preconditioner,
            clipping coefficient and micro-batches; ``Trajectory.from_checkpoints`` with ``batch_indices`` also
            works and is then taken as plain SGD).
        X_train: the training inputs the batch indices refer to.
        y_train: their targets (default: those recorded with the trajectory).
        loss: the training loss convention (``nn.CrossEntropyLoss``, ``nn.MSELoss``, a
            :class:`pkfast.LossSpec`); default: the one recorded.
        rule: ``"exact"`` (Gauss–Legendre test-side Jacobians: exact to quadrature precision) or ``"left"``
            (Jacobians at w_s: Domingos' Riemann reading, error O(lr)).
        nodes: Gauss–Legendre nodes per step for ``rule="exact"``. Default ``None``: chosen at construction, the
            first of 2, 4, 8, 16 whose estimated quadrature error on a sample of steps × training inputs is at most
            :data:`~pkfast.machine.nodes.QUAD_TOL` (1e-6) of the output change (:mod:`pkfast.machine.nodes`;
            smooth networks keep 2, attention with large or momentum steps may need 8), with a warning if none
            is; an explicit count is checked the same way and warned about, with the count that would do, when
            it is too few. The choice and its estimate are :attr:`nodes` and :attr:`nodes_check`.
        check_nodes: ``False`` skips the quadrature check (``nodes=None`` then means 2).
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
        >>> km = pkfast.KernelMachine(net, pkfast.Trajectory.load(path), X, progress=False)
        >>> km.nodes, km.nodes_check.error < 1e-6   # the quadrature nodes chosen, and their estimated error
        (2, True)
        >>> Xq = torch.randn(2, 4, dtype=torch.float64)
        >>> bool(torch.allclose(km.predict(Xq), net(Xq), atol=1e-9))
        True
        >>> km.contributions(Xq).shape   # c_i(x) for every query, training point and class
        torch.Size([2, 16, 3])
    """

    @fitted_threads(_FN)  # construction replays training (verify, the nodes check): many small operations
    def __init__(self, model: torch.nn.Module, trajectory: Trajectory, X_train: Any, y_train: Any = None,
                 loss: Any = None, *, rule: str = "exact", nodes: int | None = None, dtype: Any = torch.float64,
                 memory_budget: Any = None, progress: bool = True, output_fn: Any = None, verify: bool = True,
                 update_tol: float = UPDATE_TOL, check_data: bool = True, check_nodes: bool = True) -> None:
        model = check_model_and_trajectory(_FN, model, trajectory)
        if getattr(trajectory, "preconditioner_source", None) == "checkpoints":
            raise ValueError(f"{_FN}: this trajectory's preconditioner is the optimizer state saved at its "
                             "checkpoints only (Trajectory.from_checkpoints with optimizer_states), an approximation "
                             "between them; the exact machine needs the preconditioner every step applied: record the "
                             "run with pkfast.TrajectoryRecorder (or its Trainer/Lightning callback), or use "
                             "pkfast.gram for the path kernel with the checkpoints' preconditioner")
        self.opts = Options.check(_FN, rules=("exact", "left"), strict_nodes=False, rule=rule,
                                  nodes=DEFAULT_NODES if nodes is None else nodes, dtype=dtype,
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
            check_training_data(_FN, record, X_train, self._batches, self.y, trajectory.targets)

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
        self._warn_output_grad_mismatch()
        #: ``[T]`` the update residual ‖Δ_s − Δ̂_s‖/‖Δ_s‖ of every recorded step (measured at construction when
        #: ``verify=True``, else on the first :meth:`certificate`).
        self.update_residual: torch.Tensor | None = None
        if verify:
            self.verify(update_tol)
        #: the quadrature check's findings (:class:`~pkfast.machine.nodes.NodesCheck`: the nodes, the estimated
        #: error of each count tried, the sample), or None where it did not run (``rule="left"``,
        #: ``check_nodes=False``).
        self.nodes_check: NodesCheck | None = None
        if self.rule == "exact" and check_nodes:
            self.nodes_check = choose_nodes(self, nodes)
            self.nodes = self._sweeper.nodes = self.nodes_check.nodes

    def __repr__(self) -> str:
        quad = f"nodes={self.nodes}" if self.nodes_check is None else str(self.nodes_check)
        return (f"pkfast.KernelMachine({self.trajectory.num_steps} steps, {self.X.shape[0]} training points, "
                f"{self.C} outputs, rule={self.rule!r}" + (f", {quad}" if self.rule == "exact" else "") + ")")

    def _make_sweep(self, budget: int) -> Sweep | AdaptiveSweep:
        """The backward pass over the steps: the adaptive one (:mod:`pkfast.machine.adaptive_sweep`) for a recorded
        preconditioner, else SGD's, each with the rows' weights λ (clipping, micro-batches)."""
        weights = row_weights(_FN, self._record, self.loss, self.y, self.C, adaptive=self._adaptive)
        common = dict(batches=self._batches, rule=self.rule, nodes=self.nodes, budget=budget, progress=self.progress)
        if self._adaptive:
            plan = read_plan(_FN, self.trajectory, self._steps)
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
            per_group_decay = opt is not None and opt.kind.adaptive and decay_only(step.groups)
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
        with ThreadPolicy(self.opts.threads, _FN) as threads:  # fewer threads while other processes hold the cores
            for a in range(0, X.shape[0], self.query_chunk):
                threads.update()
                yield a, X[a:a + self.query_chunk]

    # ------------------------------------------------------------------ public
    def bias(self, X: Any) -> torch.Tensor:
        """b(x) = f(x; w_0) − (weight-decay terms): the part of the prediction no training point carries, ``[M, C]``.

        Example:
        >>> import torch, pkfast, tempfile
        >>> _ = torch.manual_seed(0)
        >>> net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3)).double()
        >>> X, y = torch.randn(16, 4, dtype=torch.float64), torch.randint(0, 3, (16,))
        >>> opt, lossf, path = torch.optim.SGD(net.parameters(), lr=0.1), torch.nn.CrossEntropyLoss(), tempfile.mkdtemp()
        >>> with pkfast.TrajectoryRecorder(net, opt, path + "/t", loss=lossf, targets=y) as rec:
        ...     for s in range(4):
        ...         idx = torch.arange(s % 2 * 8, s % 2 * 8 + 8)
        ...         opt.zero_grad(); lossf(net(X[idx]), y[idx]).backward(); opt.step(); rec.step(batch_indices=idx)
        >>> km = pkfast.KernelMachine(net, pkfast.Trajectory.load(path + "/t"), X, progress=False)
        >>> Xq = torch.randn(3, 4, dtype=torch.float64)
        >>> net0 = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3)).double()
        >>> _ = net0.load_state_dict(km.trajectory.point(0))    # no weight decay: b is the initial network
        >>> bool(torch.allclose(km.bias(Xq), net0(Xq).detach(), rtol=1e-12, atol=1e-12))
        True
        """
        X = self._queries(X)
        return torch.cat([self._sweeper.run(q, samples=False)[0] for _, q in self._chunks(X)]).cpu()

    def predict(self, X: Any) -> torch.Tensor:
        """b(x) + Σ_i c_i(x) as [M, C]: the network's f(x; w_T) rebuilt from the training points.

        Example:
        >>> import torch, pkfast, tempfile
        >>> _ = torch.manual_seed(0)
        >>> net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3)).double()
        >>> X, y = torch.randn(16, 4, dtype=torch.float64), torch.randint(0, 3, (16,))
        >>> opt, lossf, path = torch.optim.SGD(net.parameters(), lr=0.1), torch.nn.CrossEntropyLoss(), tempfile.mkdtemp()
        >>> with pkfast.TrajectoryRecorder(net, opt, path + "/t", loss=lossf, targets=y) as rec:
        ...     for s in range(4):
        ...         idx = torch.arange(s % 2 * 8, s % 2 * 8 + 8)
        ...         opt.zero_grad(); lossf(net(X[idx]), y[idx]).backward(); opt.step(); rec.step(batch_indices=idx)
        >>> km = pkfast.KernelMachine(net, pkfast.Trajectory.load(path + "/t"), X, progress=False)
        >>> Xq = torch.randn(3, 4, dtype=torch.float64)
        >>> float((km.predict(Xq) - net(Xq).detach()).abs().max()) < 1e-8
        True
        """
        X = self._queries(X)
        parts = [self._sweeper.run(q, samples=False) for _, q in self._chunks(X)]
        return torch.cat([b + t for b, t, _ in parts]).cpu()

    def contributions(self, X: Any, *, per_step: bool = False, out: Any = None) -> torch.Tensor | np.ndarray:
        """c_i(x) ∈ R^C of every training point i to the prediction at each query: ``[M, N, C]``
        (``per_step=True``: ``[T, M, N, C]``, the part contributed through step r's gradient of i).

        ``out``: a path ending in ``.npy``: the result is written there query chunk by query chunk (a plain
        float64 ``.npy``) and returned as a read-only memmap, so M × N × C need not fit in memory.

        Example:
        >>> import torch, pkfast, tempfile
        >>> _ = torch.manual_seed(0)
        >>> net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3)).double()
        >>> X, y = torch.randn(16, 4, dtype=torch.float64), torch.randint(0, 3, (16,))
        >>> opt, lossf, path = torch.optim.SGD(net.parameters(), lr=0.1), torch.nn.CrossEntropyLoss(), tempfile.mkdtemp()
        >>> with pkfast.TrajectoryRecorder(net, opt, path + "/t", loss=lossf, targets=y) as rec:
        ...     for s in range(4):
        ...         idx = torch.arange(s % 2 * 8, s % 2 * 8 + 8)
        ...         opt.zero_grad(); lossf(net(X[idx]), y[idx]).backward(); opt.step(); rec.step(batch_indices=idx)
        >>> km = pkfast.KernelMachine(net, pkfast.Trajectory.load(path + "/t"), X, progress=False)
        >>> Xq = torch.randn(3, 4, dtype=torch.float64)
        >>> c = km.contributions(Xq)                             # [M, N, C]
        >>> c.shape, bool(torch.allclose(km.bias(Xq) + c.sum(1), km.predict(Xq), rtol=1e-12, atol=1e-12))
        (torch.Size([3, 16, 3]), True)
        >>> bool(torch.allclose(km.contributions(Xq, per_step=True).sum(0), c, atol=1e-12))  # [T, M, N, C]
        True
        """
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

        Example:
        >>> import torch, pkfast, tempfile
        >>> _ = torch.manual_seed(0)
        >>> net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3)).double()
        >>> X, y = torch.randn(16, 4, dtype=torch.float64), torch.randint(0, 3, (16,))
        >>> opt, lossf, path = torch.optim.SGD(net.parameters(), lr=0.1), torch.nn.CrossEntropyLoss(), tempfile.mkdtemp()
        >>> with pkfast.TrajectoryRecorder(net, opt, path + "/t", loss=lossf, targets=y) as rec:
        ...     for s in range(4):
        ...         idx = torch.arange(s % 2 * 8, s % 2 * 8 + 8)
        ...         opt.zero_grad(); lossf(net(X[idx]), y[idx]).backward(); opt.step(); rec.step(batch_indices=idx)
        >>> km = pkfast.KernelMachine(net, pkfast.Trajectory.load(path + "/t"), X, progress=False)
        >>> Xq = torch.randn(3, 4, dtype=torch.float64)
        >>> e = km.explain(Xq[0], k=2)
        >>> c = km.contributions(Xq[:1])[0, :, e.target]          # every training point's share of that logit
        >>> e.proponents.tolist() == c.argsort(descending=True)[:2].tolist()
        True
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
        (Σ_s ε_s tr J̄_s(x) J(x_i; w_s)ᵀ): ``[M, N, C]``; NaN where |k_p| ≤ tol·max|k_p| (a_i undefined).
        Refused for an adaptive optimizer, whose machine's kernel is not that Euclidean path kernel."""
        if self._adaptive:
            raise ValueError(f"{_FN}.coefficients: this machine was trained with {self._record.optimizer.class_name}, "
                             "whose kernel pairs the gradients through the preconditioners P_t; dividing by the "
                             "Euclidean path kernel would give coefficients of another kernel. Use contributions() "
                             "(exact) instead")
        X = self._queries(X)
        c = self.contributions(X)
        nodes = self.nodes if self.rule == "exact" else DEFAULT_NODES  # (nodes means nothing to the left rule)
        kp = gram(self.fm.model, self.trajectory, X, self.X, rule=self.rule, nodes=nodes, dtype=self.dtype,
                  progress=False)
        ok = kp.abs() > tol * kp.abs().max()
        a = c / kp.unsqueeze(-1)
        return torch.where(ok.unsqueeze(-1), a, torch.full_like(a, float("nan")))
