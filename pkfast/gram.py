"""gram: the public entry point — validate, plan tiles, then for each tile accumulate every kernel term.

Data flow: trajectory → jacobians (per point, per panel) → tiles (the plan) → accumulate (per term into the
tile accumulator) → the Gram (each finished tile written once, mirrored when symmetric). Tiles are the
outermost loop and the rule's terms (steps) the innermost, so a tile is finished — and can be stored —
before the next one starts.
"""

from __future__ import annotations

import dataclasses
import math
import logging
import os
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from pkfast._alloc import reuse_freed_memory
from pkfast import _checks
from pkfast.accumulate import BACKENDS, PRECISIONS, accumulate, accumulate_diagonal, select_backend
from pkfast import factorized as _fz
from pkfast.jacobians import DEFAULT_CHUNK_BYTES, FunctionalModel
from pkfast import store as _store
from pkfast.loss import LossSpec
from pkfast.rules import DEFAULT_NODES, RULES, Term, is_symmetric, terms_for
from pkfast.tiles import Tile, TilePlan, default_memory_budget, plan_diagonal, plan_tiles
from pkfast.trajectory import Trajectory

log = logging.getLogger("pkfast")

__all__ = ["gram", "plan", "GramPlan", "OUTPUTS"]

#: ``"trace"``: Σ_c ∇f_c(x)·∇f_c(x′), shape [N, M] (the torch.func tutorial's convention);
#: ``"mean"``: the trace divided by C (neural-tangents' ``trace_axes`` convention);
#: ``"full"``: the C×C block per pair, shape [N, M, C, C].
OUTPUTS = ("trace", "mean", "full")
#: ``"output"``: kernels of the model's outputs; ``"loss"``: of the per-sample loss (TracIn's quantity).
OF = ("output", "loss")

_FN = "pkfast.gram"


def gram(
    model: torch.nn.Module,
    trajectory: Trajectory,
    X: torch.Tensor | np.ndarray,
    X2: torch.Tensor | np.ndarray | None = None,
    *,
    outputs: str = "trace",
    rule: str = "left",
    diagonal: bool = False,
    backend: str = "auto",
    dtype: torch.dtype | str | None = None,
    memory_budget: int | str | None = None,
    progress: bool = True,
    precision: str = "ieee",
    out: str | os.PathLike | None = None,
    overwrite: bool = False,
    nodes: int = DEFAULT_NODES,
    of: str = "output",
    loss: Any = None,
    y: Any = None,
    y2: Any = None,
    method: str = "auto",
    k: int | None = None,
    seed: int | None = None,
) -> torch.Tensor | np.memmap:
    r"""The path-kernel Gram matrix of ``model`` along ``trajectory`` between samples ``X`` (and ``X2``).

    .. math:: K(x, x') = \sum_s \varepsilon_s\, J(x; w_s)\, J(x'; w_s)^\top, \qquad J = \partial f/\partial w

    (``rule="left"``; ``"trapezoid"`` averages both ends of each step). Only trainable parameters
    (``requires_grad=True``) enter J.

    Args:
        model: a ``torch.nn.Module`` mapping ``[n, *features]`` to ``[n, *out]``; C = prod(out). It must be
            in eval mode where that matters (BatchNorm, Dropout): each sample's output must depend on that
            sample alone. Its device is the compute device.
        trajectory: the weight points and step sizes (:class:`pkfast.Trajectory`).
        X: ``[N, *features]`` samples (torch tensor or numpy array).
        X2: optional ``[M, *features]`` samples for a cross-Gram. ``None`` means X2 = X: only the upper
            triangle of tiles is computed and mirrored.
        outputs: ``"trace"`` → ``[N, M]``, the sum over the C outputs of the output-wise kernels;
            ``"mean"`` → the same divided by C (neural-tangents divides its traced NTK by C);
            ``"full"`` → ``[N, M, C, C]``, the block ``K[a, b, c, c'] = Σ_s ε_s ∇f_c(x_a)·∇f_{c'}(x_b)``.
        rule: ``"left"`` (Σ_{s<T} ε_s K_g(w_s), Domingos' Riemann sum), ``"trapezoid"``
            (Σ_s ε_s/2 [K_g(w_s) + K_g(w_{s+1})]) or ``"exact"`` (Σ_s ε_s J̄_s(x) J(x′; w_s)ᵀ, Bell et al.'s exact
            path kernel: the row side's Jacobian averaged over each step segment by Gauss–Legendre quadrature
            with ``nodes`` points, the column side at the segment start). ``"exact"`` is **asymmetric**:
            K(x, x′) ≠ K(x′, x)ᵀ for nonlinear models, so a Gram of X with itself is computed in full and never
            mirrored (``pkfast.open_gram(...).options["symmetric"]`` is False for it; the log says so).
        nodes: Gauss–Legendre nodes per segment for ``rule="exact"`` (default 2: error O(ε⁴) in the step size;
            1 is the midpoint rule).
        of: ``"output"`` (default: Jacobians of the model's outputs) or ``"loss"``: the loss-gradient kernel
            Σ_s ε_s ∇_w ℓ(x; w_s)·∇_w ℓ(x′; w_s) (with ``rule="left"``: the quantity Captum's TracInCP sums
            over checkpoints), with per-sample loss ℓ from ``loss`` and targets ``y`` (and ``y2`` for ``X2``).
            The result has one "output": ``[N, M]``.
        loss: for ``of="loss"``: ``nn.CrossEntropyLoss``/``nn.MSELoss`` (their class weights and label smoothing
            apply; the reduction does not: ℓ is per sample), a :class:`pkfast.LossSpec`, or
            ``"cross_entropy"``/``"mse"``. Default: the loss recorded with the trajectory.
        y, y2: targets of ``X`` and ``X2`` for ``of="loss"``.
        diagonal: only K(x_a, x_a): ``[N]`` (trace/mean) or ``[N, C, C]`` (full). Requires ``X2=None``.
        backend: ``"auto"`` (Triton on CUDA when it can run, else torch; the reason is logged to the
            ``pkfast`` logger), ``"torch"`` (BLAS/cuBLAS ``addmm``) or ``"triton"`` (the fused kernel; raises
            if it cannot run — except under ``TRITON_INTERPRET=1``, where it runs on CPU tensors, slowly).
        dtype: ``torch.float32`` (default) or ``torch.float64``: the dtype of Jacobians and accumulation.
        memory_budget: bytes (or a string such as ``"2GiB"``) of working memory for Jacobian panels and tile
            accumulators; tiles are sized from it. Default: half of the free memory of the compute device.
            The returned Gram itself is not counted.
        progress: show a progress bar (tqdm, on stderr) with throughput in kernel entries per second.
        precision: input precision of the Gram products: ``"ieee"`` (exact fp32/fp64), ``"tf32"`` or
            ``"bf16"`` (Triton only; fp32 accumulation; relative error ≈ 1e-3 and ≈ 4e-3 of the entries'
            scale respectively, see ``tests/test_triton_kernel.py``).
        out: a path ending in ``.npy``: write the Gram there tile by tile instead of returning it in memory
            (out-of-core; the working memory stays within ``memory_budget`` whatever N is). A manifest and a
            journal of finished tiles go beside it in ``<out>.pkfast/``. Running the same call again after a
            crash or a kill resumes from the finished tiles and gives a bitwise identical file; a call with a
            different model, trajectory, data or options is refused (saying which differs). Under
            ``torch.distributed`` (e.g. ``torchrun``) every rank computes a disjoint, equal-work share of the
            tiles into the same file. See :mod:`pkfast.store`.
        overwrite: with ``out``, discard an existing output (and its progress) and start afresh.
        method: how the Jacobian products are formed (:func:`pkfast.plan` shows the choice per layer):

            - ``"auto"`` (default): per supported layer (``nn.Linear``, also over extra leading dimensions;
              ``nn.Conv1d``/``nn.Conv2d``; ``nn.Embedding``) the cheaper exact route by the cost model —
              ``factorized`` (Σ_{s,t} (a_s·a′_t + 1)(δ_s·δ′_t) from the layer's inputs and output gradients, never
              forming its P-dimensional Jacobian) or ``materialized`` (its per-sample gradient Δᵀ A); every
              other parameter (norm affines, custom parameters, tied weights) through ``torch.func.jacrev``.
              A model with no supported layer runs exactly the ``"jacobian"`` route.
            - ``"factorized"``: factorise every supported layer, whatever the cost model says.
            - ``"materialized"``: materialise every supported layer's per-sample gradient from its factors and
              multiply the panels (the Gram's full N²·C·P product, as SYRK on symmetric tiles). A layer whose
              factors are smaller than its gradient (every dense layer) is streamed: its gradient is formed a
              slice of output units at a time in a small reused workspace, so no tile-sized Jacobian panel is
              held and none is recomputed when the Jacobians exceed ``memory_budget``.
            - ``"jacobian"``: materialise every Jacobian with ``vmap(jacrev)``, as in the torch.func tutorial.
            - ``"sketch"``: approximate and unbiased: Gram of the random path features
              Φ(x) = Σ_s √ε_s J_s(x) R_s (:func:`pkfast.sketch`), with ``k`` columns (default 1024; the standard
              deviation of an entry is √((K(x,x)·K(x′,x′) + K(x,x′)²)/k)) from the random ``seed`` (default 0).
              Symmetric rules only. The features of X (and X2) are computed once, then the tiles are their
              products, in memory or stored with ``out`` and shared across ranks like any Gram.
        k, seed: the sketch's dimension and seed (``method="sketch"`` only).

    Returns:
        A CPU ``torch.Tensor`` of dtype ``dtype``: ``[N, M]``, ``[N, M, C, C]``, ``[N]`` or ``[N, C, C]``; with
        ``out``, the stored Gram as a read-only ``np.memmap`` of that shape (:func:`pkfast.open_gram` opens it
        later with its metadata).

    Example:
        >>> import torch, pkfast
        >>> net = torch.nn.Sequential(torch.nn.Linear(3, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2))
        >>> w0 = {k: v.clone() for k, v in net.state_dict().items()}
        >>> w1 = {k: v * 0.9 for k, v in w0.items()}
        >>> traj = pkfast.Trajectory.from_checkpoints([w0, w1], lr=0.1)
        >>> K = pkfast.gram(net, traj, torch.randn(5, 3), progress=False)
        >>> K.shape, bool(torch.allclose(K, K.T))
        (torch.Size([5, 5]), True)
    """
    if (k is not None or seed is not None) and method != "sketch":
        raise ValueError(f"{_FN}: k and seed set the random projection of method='sketch'; found method={method!r}")
    job = GramJob.create(model, trajectory, X, X2, outputs=outputs, rule=rule, diagonal=diagonal,
                         backend=backend, dtype=dtype, memory_budget=memory_budget, precision=precision,
                         nodes=nodes, of=of, loss=loss, y=y, y2=y2, method=method, k=k, seed=seed)
    if out is not None:
        return job.run_stored(out, overwrite=overwrite, progress=progress)
    if overwrite:
        raise ValueError(f"{_FN}: overwrite=True applies to a stored Gram; expected out='….npy' with it, found out=None")
    return job.run(progress=progress)


def plan(
    model: torch.nn.Module,
    trajectory: Trajectory,
    X: torch.Tensor | np.ndarray,
    X2: torch.Tensor | np.ndarray | None = None,
    **options: Any,
) -> "GramPlan":
    """What :func:`gram` would do with these arguments, without doing it: the route of every parameterised
    layer (``factorized``, ``materialized``, ``jacobian`` or ``unused``) with its positions S, fan-in I, fan-out
    O, estimated multiply-add FLOPs of each feasible route and memory per sample, and the tile plan.

    Takes the arguments of :func:`gram` (except ``out``, ``overwrite`` and ``progress``). ``print()`` the
    result for a table; ``.layers`` holds the per-layer records (:class:`pkfast.factorized.Layer`).

    Example:
        >>> import torch, pkfast
        >>> net = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.Tanh(), torch.nn.Linear(256, 10))
        >>> traj = pkfast.Trajectory.from_checkpoints([net.state_dict(), net.state_dict()], lr=0.1)
        >>> p = pkfast.plan(net, traj, torch.randn(100, 64))
        >>> [(L.name, L.method) for L in p.layers]
        [('0', 'factorized'), ('2', 'factorized')]
    """
    for k in ("out", "overwrite", "progress"):
        if k in options:
            raise TypeError(f"pkfast.plan: {k!r} is an option of the computation, not of the plan; drop it")
    if options.get("method") == "sketch":
        raise ValueError("pkfast.plan: method='sketch' has no layer routes (it is a Gram of random features: see "
                         "pkfast.sketch); expected 'auto', 'jacobian', 'factorized' or 'materialized'")
    job = GramJob.create(model, trajectory, X, X2, **options)
    return GramPlan(job)


class GramPlan:
    """The plan of a Gram computation (see :func:`plan`): ``.method`` (the resolved route), ``.layers``,
    ``.tiles`` (the :class:`~pkfast.tiles.TilePlan`), ``.flops`` (estimated multiply-adds, all terms)."""

    def __init__(self, job: "GramJob") -> None:
        self.job = job
        self.method = job.method
        self.requested = job.requested_method
        self.layers = job.layers
        self.tiles = job.plan
        self.flops = sum(L.flops for L in self.layers)

    def __str__(self) -> str:
        j = self.job
        N = j.X.shape[0]
        M = N if j.X2 is None else j.X2.shape[0]
        shape = f"{N}" if j.diagonal else f"{N}×{M}"
        head = (f"pkfast.plan: {'diagonal of a ' if j.diagonal else ''}{shape} {j.outputs} Gram, C={j.num_outputs}, "
                f"{len(j.terms)} terms (rule={j.rule!r}), method={self.requested!r} → {self.method} route")
        rows = [("layer", "type", "route", "S", "I", "O", "params", "GFLOP", "other routes (GFLOP)", "KiB/sample", "note")]
        for L in self.layers:
            others = ", ".join(f"{k} {v / 1e9:.3g}" for k, v in L.options.items() if k != L.method)
            if L.kind == "other":
                S = I = O = "-"
            else:
                S, I, O = str(L.positions), str(L.fan_in) + ("+1" if L.bias else ""), str(L.fan_out)
                if L.groups > 1:
                    I, O = f"{I}×{L.groups}g", f"{O}×{L.groups}g"
            rows.append((L.name or "(root)", L.type, L.method, S, I, O, f"{L.size:,}", f"{L.flops / 1e9:.3g}", others or "-",
                         f"{L.bytes_per_sample / 1024:.3g}", L.reason or ("streamed in slices" if L.stream else "")))
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        lines = [head] + ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
        lines.append(f"total ≈ {self.flops / 1e9:.3g} GFLOP in {self.tiles!r}")
        return "\n".join(lines)

    __repr__ = __str__


@dataclass
class GramJob:
    """A validated Gram computation: the functional model, the kernel terms and the tile plan."""

    fm: FunctionalModel
    X: torch.Tensor
    X2: torch.Tensor | None
    outputs: str
    rule: str
    diagonal: bool
    backend: str
    dtype: torch.dtype
    terms: list[Term]
    plan: TilePlan
    num_outputs: int
    precision: str = "ieee"
    nodes: int = DEFAULT_NODES
    of: str = "output"
    Y: torch.Tensor | None = None
    Y2: torch.Tensor | None = None
    method: str = "jacobian"
    layers: list | None = None
    engine: Any = None
    requested_method: str = "auto"
    sketcher: Any = None
    k: int | None = None
    seed: int | None = None

    # ------------------------------------------------------------------ construction and validation
    @classmethod
    def create(cls, model: Any, trajectory: Any, X: Any, X2: Any = None, *, outputs: str = "trace",
               rule: str = "left", diagonal: bool = False, backend: str = "auto", dtype: Any = None,
               memory_budget: Any = None, precision: str = "ieee", nodes: int = DEFAULT_NODES,
               of: str = "output", loss: Any = None, y: Any = None, y2: Any = None,
               method: str = "auto", k: int | None = None, seed: int | None = None) -> "GramJob":
        model = _checks.check_model(_FN, model)
        if not isinstance(trajectory, Trajectory):
            raise TypeError(f"{_FN}: trajectory must be a pkfast.Trajectory; found {type(trajectory).__name__}")
        outputs = _checks.check_choice(_FN, "outputs", outputs, OUTPUTS)
        rule = _checks.check_choice(_FN, "rule", rule, RULES)
        backend = _checks.check_choice(_FN, "backend", backend, BACKENDS)
        precision = _checks.check_choice(_FN, "precision", precision, PRECISIONS)
        dtype = _checks.check_dtype(_FN, dtype)
        budget = _checks.check_memory_budget(_FN, memory_budget)
        if not isinstance(diagonal, bool):
            raise TypeError(f"{_FN}: diagonal must be True or False; found {diagonal!r}")
        if diagonal and X2 is not None:
            raise ValueError(f"{_FN}: diagonal=True computes K(x_a, x_a) over X alone; expected X2=None, found X2")
        X = _checks.as_input_tensor(_FN, "X", X)
        if X2 is not None:
            X2 = _checks.as_input_tensor(_FN, "X2", X2)
            _checks.check_feature_shapes(_FN, X, X2)

        of = _checks.check_choice(_FN, "of", of, OF)
        method = _checks.check_choice(_FN, "method", method, _fz.METHODS)
        nodes = _checks.check_nodes(_FN, nodes)
        if nodes != DEFAULT_NODES and rule != "exact":
            raise ValueError(f"{_FN}: nodes={nodes} applies to rule='exact'; found rule={rule!r}")
        spec = None
        if of == "loss":
            spec = _loss_spec(loss, trajectory)
            if y is None or (X2 is not None and y2 is None):
                raise ValueError(f"{_FN}: of='loss' needs the targets: y for X" + (" and y2 for X2" if X2 is not None else "")
                                 + "; found None")
            y = _checks.as_target_tensor(_FN, "y", y, X.shape[0])
            y2 = _checks.as_target_tensor(_FN, "y2", y2, X2.shape[0]) if X2 is not None else None
            if outputs == "full":
                outputs = "trace"  # one output: the three modes coincide
        elif loss is not None or y is not None or y2 is not None:
            raise ValueError(f"{_FN}: loss, y and y2 apply to of='loss'; found of={of!r}")

        if precision != "ieee" and dtype == torch.float64:
            raise ValueError(f"{_FN}: precision={precision!r} applies to float32; dtype=torch.float64 computes in ieee fp64")
        device = next(iter(model.parameters()), torch.empty(0)).device
        budget = budget if budget is not None else default_memory_budget(device)
        if method == "sketch":
            return cls._create_sketch(model, trajectory, X, X2, outputs=outputs, rule=rule, diagonal=diagonal,
                                      backend=backend, dtype=dtype, budget=budget, precision=precision, of=of,
                                      loss=loss, spec=spec, y=y, y2=y2, k=1024 if k is None else k,
                                      seed=0 if seed is None else seed, device=device)
        fm = FunctionalModel(model, trajectory, dtype=dtype, device=device, fn=_FN, loss=spec)
        C = fm.probe(X, _FN, "X")
        if X2 is not None:
            fm.probe(X2, _FN, "X2")
        _check_targets(spec, fm, y, y2)
        terms = terms_for(rule, trajectory.step_sizes, nodes)
        if not is_symmetric(terms) and X2 is None and not diagonal:
            log.info("pkfast.gram: rule=%r is asymmetric: computing every tile of the %d×%d Gram (no mirroring)",
                     rule, X.shape[0], X.shape[0])
        backend = select_backend(backend, device, precision=precision, fn=_FN)
        itemsize = torch.empty((), dtype=dtype).element_size()
        full = outputs == "full"
        N = X.shape[0]
        M = N if X2 is None else X2.shape[0]
        symmetric = X2 is None and is_symmetric(terms)
        layers, engine = _fz.find_layers(model, fm), None
        if method != "jacobian":
            engine = _fz.Engine(fm, layers, backend=backend, precision=precision)
            engine.discover(X)
        pairs = N if diagonal else (N * (N + 1) / 2 if symmetric else N * M)
        nodes_left = max((len(t.left) for t in terms), default=1)
        block = C * C if full else 1

        def route_and_plan(samples: float):
            """Choose each layer's route for ``samples`` panel rows per term, then plan the tiles."""
            eng, reserved = engine, 0
            _fz.choose(layers, method=method, C=C, full=full, pairs=pairs * nodes_left, samples=samples,
                       terms=len(terms), itemsize=itemsize)
            if eng is not None:
                eng.route()
                if not eng.hooked:  # nothing to factorise: the plain Jacobian route, unchanged
                    eng = None
            if eng is None:
                u = C * fm.num_params * itemsize
                chunk = fm.default_chunk()
                acc_mult = 1
            else:
                feat = sum(L.bytes_per_sample for L in eng.with_factors) * nodes_left
                u = C * eng.panel_width * itemsize + feat
                chunk = max(1, min(1024, DEFAULT_CHUNK_BYTES // max(1, u)))
                acc_mult = 3 if eng.factorized else 1
                if eng.streamed:  # the streaming workspace is held besides the tiles: at most a quarter of the budget
                    eng.stream_bytes = reserved = max(1, min(_fz.STREAM_BYTES, budget // 4))
            if diagonal:
                p = plan_diagonal(N, bytes_per_sample=u, acc_bytes_per_sample=block * itemsize * acc_mult,
                                  budget=budget, chunk=chunk, fn=_FN, reserved=reserved)
            else:
                p = plan_tiles(N, M, symmetric=symmetric, bytes_per_sample=u,
                               acc_bytes_per_pair=block * itemsize * acc_mult, budget=budget, chunk=chunk, fn=_FN,
                               reuse_rows=len(terms) == 1, reserved=reserved)
            return eng, p

        samples = N + (0 if diagonal else M)
        engine, plan = route_and_plan(samples)
        if engine is not None and len(plan.tiles) > 1:
            # the tile shape sets how often each sample's panel rows are formed: re-choose once with that count
            touched = sum((t.rows.stop - t.rows.start) + (0 if (t.diagonal or diagonal) else t.cols.stop - t.cols.start)
                          for t in plan.tiles)
            engine, plan = route_and_plan(touched)
        return cls(fm, X, X2, outputs, rule, diagonal, backend, dtype, terms, plan, C, precision, nodes, of, y, y2,
                   _route_label(engine), layers, engine, method)

    @classmethod
    def _create_sketch(cls, model, trajectory, X, X2, *, outputs, rule, diagonal, backend, dtype, budget, precision,
                       of, loss, spec, y, y2, k, seed, device) -> "GramJob":
        """``method="sketch"``: the features Φ of X (and X2) are computed once (:mod:`pkfast.sketch`), then the
        tiles are products Φ_rows Φ_colsᵀ on the accumulation backend, stored and shared like any Gram."""
        from pkfast.sketch import _Sketcher  # pkfast.sketch imports this module

        sk = _Sketcher(model, trajectory, X, k=k, seed=seed, rule=rule, of=of, loss=loss, dtype=dtype,
                       memory_budget=budget, device=device, fn=_FN)
        fm, C = sk.fm, sk.C
        if X2 is not None:
            sk.check_samples(X2, "X2")
        _check_targets(spec, fm, y, y2)
        backend = select_backend(backend, device, precision=precision, fn=_FN)
        itemsize = torch.empty((), dtype=dtype).element_size()
        N = X.shape[0]
        M = N if X2 is None else X2.shape[0]
        u = C * sk.k * itemsize
        held = (N + (0 if X2 is None else M)) * u  # the features, kept on the host for the whole run
        block = C * C if outputs == "full" else 1
        room = max(budget - (held if device.type != "cpu" else 0), 1)
        if diagonal:
            plan = plan_diagonal(N, bytes_per_sample=u, acc_bytes_per_sample=block * itemsize, budget=room,
                                 chunk=1, fn=_FN)  # (no vmap chunks: the tiles read features)
        else:
            plan = plan_tiles(N, M, symmetric=X2 is None, bytes_per_sample=u, acc_bytes_per_pair=block * itemsize,
                              budget=room, chunk=1, fn=_FN)
        return cls(fm, X, X2, outputs, rule, diagonal, backend, dtype, sk.terms, plan, C, precision, DEFAULT_NODES,
                   of, y, y2, "sketch", [], None, "sketch", sketcher=sk, k=sk.k, seed=sk.seed)

    def _sketch_features(self, progress: bool) -> None:
        """Φ of X (and X2) into ``self._phi``/``self._phi2`` (CPU). Under torch.distributed each rank projects
        an equal slice of the samples and the slices are all-gathered (the projections depend only on the seed)."""
        rank, world = _distributed()
        sk = self.sketcher

        def feats(X, Y, what):
            if world == 1:
                return sk.project(X, Y, progress=progress, what=what)
            n = X.shape[0]
            per = -(-n // world)
            a, b = min(n, rank * per), min(n, (rank + 1) * per)
            part = torch.zeros(per, self.num_outputs, sk.k, dtype=self.dtype)
            if b > a:
                part[: b - a] = sk.project(X[a:b], None if Y is None else Y[a:b], progress=progress, what=what)
            dev = self.fm.device if torch.distributed.get_backend() == "nccl" else torch.device("cpu")
            parts = [torch.empty_like(part, device=dev) for _ in range(world)]
            torch.distributed.all_gather(parts, part.to(dev))
            return torch.cat([q.cpu() for q in parts])[:n]

        self._phi = feats(self.X, self.Y, "X")
        self._phi2 = None if self.X2 is None else feats(self.X2, self.Y2, "X2")

    def _compute_tile_sketch(self, tile: Tile, bar: Any = None) -> torch.Tensor:
        dev = self.fm.device
        r, c = tile.shape
        acc = self._zero_acc(tile)
        A = self._phi[tile.rows].to(dev)
        same = tile.diagonal or self.diagonal
        B = A if same else (self._phi if self._phi2 is None else self._phi2)[tile.cols].to(dev)
        self._accumulate_panels(acc, A, B, 1.0, same)
        if bar is not None:
            bar.update((r if self.diagonal else r * c) * len(self.terms))
        return acc

    # ------------------------------------------------------------------ shapes
    @property
    def result_shape(self) -> tuple[int, ...]:
        N, C = self.X.shape[0], self.num_outputs
        block = (C, C) if self.outputs == "full" else ()
        if self.diagonal:
            return (N, *block)
        M = N if self.X2 is None else self.X2.shape[0]
        return (N, M, *block)

    def flops(self) -> float:
        """Multiply-add FLOPs of the Gram products (excluding Jacobians): 2·rows·cols·K per term and tile."""
        C, P = self.num_outputs, self.fm.num_params
        k = C * P if self.outputs != "full" else P
        rowmul = 1 if self.outputs != "full" else C
        if self.diagonal:
            return 2.0 * self.X.shape[0] * C * (C if self.outputs == "full" else 1) * P * len(self.terms)
        return sum(2.0 * (t.shape[0] * rowmul) * (t.shape[1] * rowmul) * k for t in self.plan.tiles) * len(self.terms)

    # ------------------------------------------------------------------ compute
    def run(self, *, progress: bool = True) -> torch.Tensor:
        """Compute every tile and return the Gram in memory (CPU tensor)."""
        out = torch.zeros(self.result_shape, dtype=self.dtype)
        if not self.terms:
            return out  # every step size is zero
        total = (self.X.shape[0] if self.diagonal else self.plan.num_pairs) * len(self.terms)
        bar = tqdm(total=total, unit="pair", unit_scale=True, desc=self._desc(), disable=not progress, leave=False)
        t0 = time.perf_counter()
        if self.sketcher is not None:
            self._sketch_features(progress)
        with reuse_freed_memory(self.fm.device.type == "cpu"):
            self._buffers()
            try:
                for tile in self.plan.tiles:
                    acc = self.compute_tile(tile, bar)
                    self.write_tile(out, tile, acc)
            finally:
                bar.close()
                self._free()
        self.elapsed = time.perf_counter() - t0
        return out

    def run_stored(self, path: str | os.PathLike, *, overwrite: bool = False, progress: bool = True) -> np.memmap:
        """Compute the unfinished tiles into the ``.npy`` at ``path`` (resuming; sharing tiles across the ranks
        of an initialised ``torch.distributed`` group) and return it as a read-only memmap."""
        rank, world = _distributed()
        np_dtype = np.dtype(str(self.dtype).replace("torch.", ""))
        manifest = _store.GramStore.new_manifest(self, self.plan, self.result_shape, np_dtype)
        err = None
        if rank == 0:
            try:
                manifest = _store.GramStore.prepare(path, manifest, overwrite=overwrite, fn=_FN)
            except Exception as e:  # every rank must learn of it, or the others wait forever
                err = e
        if world > 1:
            msg = [None if err is None else f"{type(err).__name__}: {err}"]
            torch.distributed.broadcast_object_list(msg, src=0)
            if msg[0] is not None and err is None:
                raise _store.StoreError(f"{_FN}: rank 0 could not prepare {path}: {msg[0]}")
        if err is not None:
            raise err
        st = _store.GramStore.attach(path, rank=rank, world=world, fn=_FN)
        try:
            self._adopt_plan(st.manifest)
            done = st.finished(verify=True) if rank == 0 else None
            if world > 1:
                box = [sorted(done) if done is not None else None]
                torch.distributed.broadcast_object_list(box, src=0)  # one view of what is finished
                done = set(box[0])
            todo = [t for t in self.plan.tiles if t.index not in done]
            mine = _store.shares(todo, world)[rank]
            if self.sketcher is not None and todo and self.terms:
                self._sketch_features(progress)  # every rank takes part (the features are all-gathered)
            if done:
                log.info("pkfast.gram: resuming %s: %d of %d tiles already finished", path, len(done), len(self.plan.tiles))
            desc = self._desc() + (f" rank {rank}/{world}" if world > 1 else "")
            bar = tqdm(total=len(mine), unit="tile", desc=desc, disable=not progress, leave=False)
            t0 = time.perf_counter()
            with reuse_freed_memory(self.fm.device.type == "cpu"):
                if mine and self.terms:
                    self._buffers()
                try:
                    for tile in mine:
                        if self.terms:
                            acc = self.compute_tile(tile)
                        else:
                            acc = self._zero_acc(tile)
                        block, mirror = self.finish_tile(tile, acc)
                        del acc
                        st.write_tile(tile, block, mirror)
                        del block, mirror
                        bar.update(1)
                finally:
                    bar.close()
                    self._free()
            self.elapsed = time.perf_counter() - t0
        finally:
            st.close()
        if world > 1:
            torch.distributed.barrier()
        return np.load(path, mmap_mode="r")

    def _adopt_plan(self, manifest: dict[str, Any]) -> None:
        """Use the stored tile plan (a resumed run must cut the same tiles, whatever its memory budget)."""
        tiles = _store.plan_tiles_of(manifest)
        p = manifest["plan"]
        if [(t.rows, t.cols, t.diagonal) for t in tiles] != [(t.rows, t.cols, t.diagonal) for t in self.plan.tiles] \
                or p["chunk"] != self.plan.chunk:
            log.info("pkfast.gram: using the stored tile plan (%d tiles of ≤%d×%d)", len(tiles), p["row_block"], p["col_block"])
            self.plan = dataclasses.replace(self.plan, row_block=p["row_block"], col_block=p["col_block"],
                                            chunk=p["chunk"], tiles=tiles)

    def _desc(self) -> str:
        N = self.X.shape[0]
        M = N if self.X2 is None else self.X2.shape[0]
        return f"pkfast.gram {'diag ' if self.diagonal else ''}{N}×{M if not self.diagonal else 1}, {len(self.terms)} terms"

    @property
    def width(self) -> int:
        """Columns per output of a Jacobian panel: every trainable parameter on the Jacobian route; on the
        factorised route the ``"jacobian"`` parameters plus the ``"materialized"`` layers (maybe 0)."""
        if self.sketcher is not None:
            return 0  # the tiles read the features; no Jacobian panels
        return self.fm.num_params if self.engine is None else self.engine.panel_width

    def _buffers(self) -> None:
        self._A_rows = None
        C, P = self.num_outputs, self.width
        dev = self.fm.device
        self._A = torch.empty(self.plan.row_block, C, P, dtype=self.dtype, device=dev)
        needs_b = not all((t.diagonal or self.diagonal) for t in self.plan.tiles) or not is_symmetric(self.terms)
        self._B = torch.empty(self.plan.col_block if needs_b else 0, C, P, dtype=self.dtype, device=dev)
        # one accumulator for every tile (each tile takes a contiguous prefix): a fresh tile-sized allocation
        # per tile would leave the allocator holding freed blocks of other sizes, past the memory budget
        most = max((math.prod(self._acc_shape(t)) for t in self.plan.tiles), default=0)
        self._acc = torch.empty(most, dtype=self.dtype, device=dev)

    def _free(self) -> None:
        self._A = self._B = self._acc = None  # type: ignore[assignment]
        if self.engine is not None:
            self.engine.release()
        self._A_rows = None
        self._phi = self._phi2 = None

    def compute_tile(self, tile: Tile, bar: Any = None) -> torch.Tensor:
        """Σ over terms of weight · A Bᵀ for this tile, as the accumulator (on the compute device)."""
        if self.sketcher is not None:
            return self._compute_tile_sketch(tile, bar)
        if self.engine is not None:
            return self._compute_tile_factorized(tile, bar)
        r, c = tile.shape
        Xr = self.X[tile.rows]
        Xc = (self.X if self.X2 is None else self.X2)[tile.cols]
        chunk = self.plan.chunk
        acc = self._zero_acc(tile)
        Yr = None if self.Y is None else self.Y[tile.rows]
        Yc = None if self.Y is None else (self.Y if self.Y2 is None else self.Y2)[tile.cols]
        for term in self.terms:
            # one term: a tile-row's panel is kept for the next tile of the same rows (see tiles.plan_tiles)
            key = (tile.rows.start, tile.rows.stop) if len(self.terms) == 1 else None
            if key is not None and key == getattr(self, "_A_rows", None):
                A = self._A[:r]
            else:
                A = self.fm.jacobian(term.left, Xr, out=self._A[:r], chunk=chunk, Y=Yr)
                self._A_rows = key
            same = (tile.diagonal or self.diagonal) and term.symmetric
            B = A if same else self.fm.jacobian(term.right_combo, Xc, out=self._B[:c], chunk=chunk, Y=Yc)
            self._accumulate_panels(acc, A, B, term.weight, same)
            if bar is not None:
                bar.update(r if self.diagonal else r * c)
        return acc

    def _compute_tile_factorized(self, tile: Tile, bar: Any = None) -> torch.Tensor:
        """:meth:`compute_tile` on the factorised route: per term, one pass per evaluation point gives the panel
        part (``"jacobian"`` parameters and ``"materialized"`` layers, multiplied as usual) and the factors of
        the ``"factorized"`` layers (multiplied pairwise)."""
        eng, P = self.engine, self.width
        r, c = tile.shape
        full = self.outputs == "full"
        Xr = self.X[tile.rows]
        Xc = (self.X if self.X2 is None else self.X2)[tile.cols]
        Yr = None if self.Y is None else self.Y[tile.rows]
        Yc = None if self.Y is None else (self.Y if self.Y2 is None else self.Y2)[tile.cols]
        chunk = self.plan.chunk
        acc = self._zero_acc(tile)

        def side(combo, X, Y, buf):
            feats = []
            for qi, (point, om) in enumerate(combo):
                f = eng.evaluate(point, X, Y, chunk, buf if P else None, weight=om, add=qi > 0)
                feats.append((om, f))
            return feats

        for term in self.terms:
            A = self._A[:r] if P else None
            fr = side(term.left, Xr, Yr, A)
            same = (tile.diagonal or self.diagonal) and term.symmetric
            if same:
                B, fc = A, fr
            else:
                B = self._B[:c] if P else None
                fc = side(term.right_combo, Xc, Yc, B)
            if P:
                self._accumulate_panels(acc, A, B, term.weight, same)
            eng.accumulate_streamed(acc, fr, fc, term.weight, same=same, product=self._accumulate_panels)
            for om, f1 in fr:
                for om2, f2 in fc:
                    eng.accumulate(acc, f1, f2, term.weight * om * om2, full=full, diagonal=self.diagonal,
                                   upper_only=same and not self.diagonal)
            if bar is not None:
                bar.update(r if self.diagonal else r * c)
        return acc

    def _accumulate_panels(self, acc: torch.Tensor, A: torch.Tensor, B: torch.Tensor, weight: float,
                           same: bool) -> None:
        """``acc += weight · A Bᵀ`` for ``[r, C, K]`` panels in the accumulator's layout (diagonal, full block or
        trace); ``same``: a symmetric diagonal tile, only its upper triangle is needed."""
        (r, C, K), c = A.shape, B.shape[0]
        if self.diagonal:
            accumulate_diagonal(acc, A, B, weight, full=self.outputs == "full")
        elif self.outputs == "full":
            accumulate(acc, A.view(r * C, K), B.view(c * C, K), weight, backend=self.backend, upper_only=same,
                       precision=self.precision)
        else:
            accumulate(acc, A.view(r, C * K), B.view(c, C * K), weight, backend=self.backend, upper_only=same,
                       precision=self.precision)

    def _acc_shape(self, tile: Tile) -> tuple[int, ...]:
        C, (r, c) = self.num_outputs, tile.shape
        full = self.outputs == "full"
        if self.diagonal:
            return (r, C, C) if full else (r,)
        return (r * C, c * C) if full else (r, c)

    def _zero_acc(self, tile: Tile) -> torch.Tensor:
        """A zeroed accumulator for ``tile``: a view of the shared buffer while one is held (valid until the next
        tile starts), else a new tensor."""
        shape = self._acc_shape(tile)
        buf = getattr(self, "_acc", None)
        if buf is not None:
            return buf[: math.prod(shape)].view(shape).zero_()
        return torch.zeros(shape, dtype=self.dtype, device=self.fm.device)

    def finish_tile(self, tile: Tile, acc: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """A finished accumulator as the CPU block for ``[tile.rows, tile.cols]`` in the result's layout (scaled
        for ``outputs="mean"``), and the mirrored block for ``[tile.cols, tile.rows]`` when the plan is
        symmetric and the tile is off the diagonal (else None).

        Both are *views* of the accumulator (permuted/transposed, not contiguous): finishing a tile never holds a
        second tile-sized array, so the memory budget bounds the peak (the store copies small row slabs)."""
        acc = acc.to("cpu")
        if self.outputs == "mean":
            acc.div_(self.num_outputs)
        if self.diagonal:
            return acc, None
        C = self.num_outputs
        r, c = tile.shape
        if tile.diagonal:  # only the upper triangle of the (r·C)×(r·C) accumulator is trusted
            _symmetrize_upper_(acc)
        block = acc.view(r, C, c, C).permute(0, 2, 1, 3) if self.outputs == "full" else acc
        mirror = None
        if self.plan.symmetric and not tile.diagonal:
            mirror = block.permute(1, 0, 3, 2) if self.outputs == "full" else block.T
        return block, mirror

    def write_tile(self, out: torch.Tensor, tile: Tile, acc: torch.Tensor) -> None:
        """Write a finished tile into ``out`` (mirroring it when the plan is symmetric)."""
        block, mirror = self.finish_tile(tile, acc)
        if self.diagonal:
            out[tile.rows] = block
            return
        out[tile.rows, tile.cols] = block
        if mirror is not None:
            out[tile.cols, tile.rows] = mirror


#: Rows copied at a time when a square accumulator is symmetrised in place.
_SYM_SLAB = 256


def _check_targets(spec: LossSpec | None, fm: FunctionalModel, y: torch.Tensor | None, y2: torch.Tensor | None) -> None:
    """For ``of="loss"``: the targets fit the loss and the model's outputs (probed)."""
    if spec is not None:
        spec.check_targets(y, fm.model_outputs, "y", _FN)
        if y2 is not None:
            spec.check_targets(y2, fm.model_outputs, "y2", _FN)


def _route_label(engine: "_fz.Engine | None") -> str:
    """The resolved route of a job: ``"jacobian"`` (no engine), ``"materialized"`` (every supported layer's
    per-sample gradient formed from its factors) or ``"factorized"`` (at least one layer factorised)."""
    if engine is None:
        return "jacobian"
    return "factorized" if engine.factorized else "materialized"


def _symmetrize_upper_(acc: torch.Tensor) -> None:
    """Copy the upper triangle of the square ``acc`` onto its lower triangle, in place, in slabs of columns
    (temporaries of at most ``_SYM_SLAB`` × ``_SYM_SLAB``)."""
    n = acc.shape[0]
    for j0 in range(0, n, _SYM_SLAB):
        j1 = min(n, j0 + _SYM_SLAB)
        if j0:
            acc[j0:j1, :j0].copy_(acc[:j0, j0:j1].T)  # disjoint regions: below and above the diagonal
        d = acc[j0:j1, j0:j1]
        d.copy_(torch.triu(d) + torch.triu(d, 1).T)


def _loss_spec(loss: Any, trajectory: Trajectory, fn: str = _FN) -> LossSpec:
    """The loss of ``of="loss"``: ``loss`` as a :class:`LossSpec`, else the one recorded with the trajectory."""
    if loss is None:
        rec = trajectory.meta.get("loss")
        if rec is None:
            raise ValueError(f"{fn}: of='loss' needs a loss (nn.CrossEntropyLoss(), nn.MSELoss(), a pkfast.LossSpec "
                             "or 'cross_entropy'/'mse'); none was passed and the trajectory recorded none")
        return LossSpec.from_module(rec, fn=fn)
    return LossSpec.from_module(loss, fn=fn)


def _distributed() -> tuple[int, int]:
    """(rank, world size) of the initialised ``torch.distributed`` group, else (0, 1)."""
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1
