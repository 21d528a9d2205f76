"""gram: the public doors to a path-kernel Gram — :func:`gram` computes it (in memory, or stored tile by tile
with ``out=``), :func:`plan` says how it would be computed (each layer's route, costs, tiles).

Both build a :class:`~pkfast.engine.driver.GramJob` (options validated once, data, route, tiling) and the driver's
one tile loop does the work; a :class:`~pkfast.store.sinks.StoreSink` makes the result a resumable ``.npy``.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import torch

from pkfast.engine.resources.threads import ThreadPolicy, check_threads
from pkfast.engine.driver import GramJob
from pkfast.engine.quadrature import DEFAULT_NODES
from pkfast.store.sinks import StoreSink
from pkfast.store.writer import GramStore
from pkfast.trajectory.points import Trajectory

__all__ = ["gram", "plan", "GramPlan"]

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
    projection: str = "auto",
    output_fn: Any = None,
    threads: int | str | None = None,
    preconditioner: str | None = "auto",
    head: str | None = "auto",
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
        X: ``[N, *features]`` samples (torch tensor or numpy array), or a mapping of such arrays (a tokenizer's
            ``BatchEncoding``, ``{"input_ids": …, "attention_mask": …}``: passed as keyword arguments) or a tuple
            (positional), split per sample along the first dimension (:mod:`pkfast.engine.inputs`).
        X2: optional ``[M, *features]`` samples for a cross-Gram (the same structure as X). ``None`` means X2 = X: only the upper
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
            apply; ℓ is per sample), a :class:`pkfast.LossSpec`, ``"cross_entropy"``/``"mse"``, or a function
            ``(outputs, targets) -> [n]`` of per-sample losses. Cross-entropy also takes token targets ``[n, L]``
            for outputs ``[n, L, V]`` (a language model): ℓ is the mean over the sample's tokens that are not
            ``ignore_index`` (the sum with ``reduction="sum"``), see :mod:`pkfast.loss`. Default: the loss
            recorded with the trajectory.
        y, y2: targets of ``X`` and ``X2`` for ``of="loss"`` (``[n]`` classes, ``[n, L]`` tokens, or what the loss
            function takes).
        diagonal: only K(x_a, x_a): ``[N]`` (trace/mean) or ``[N, C, C]`` (full). Requires ``X2=None``.
        backend: ``"auto"`` (torch — cuBLAS on CUDA — for ``precision="ieee"``, the Triton kernel for
            tf32/bf16 on CUDA; the choice is logged to the ``pkfast`` logger), ``"torch"`` (BLAS/cuBLAS ``addmm``) or ``"triton"`` (the fused kernel; raises
            if it cannot run — except under ``TRITON_INTERPRET=1``, where it runs on CPU tensors, slowly).
        dtype: ``torch.float32`` (default) or ``torch.float64``: the dtype of Jacobians and accumulation.
        memory_budget: bytes (or a string such as ``"2GiB"``) of working memory for Jacobian panels and tile
            accumulators; tiles are sized from it. Default: half of the free memory of the compute device.
            The returned Gram itself is not counted.
        progress: show a progress bar (tqdm, on stderr) with throughput in kernel entries per second.
        threads: CPU threads: ``"auto"`` (default, or the ``PKFAST_THREADS`` environment variable) runs with
            torch's thread count lowered to the cores other processes leave free, re-decided at each tile
            (on a shared machine, oversubscribed OpenMP regions cost a time slice each: see
            :mod:`pkfast.engine.resources.threads`); ``"all"``: torch's count; an integer pins it (bitwise
            reproducible runs). torch's count is restored afterwards.
        preconditioner: for a trajectory of an adaptive optimizer (Adam, AdamW, RMSprop, Adagrad):
            ``"recorded"`` computes the preconditioned path kernel K = Σ_s ε_s J_s diag(P_s) J′_sᵀ with each step's
            recorded diagonal preconditioner P_s (every point of step s takes P_s; ``"trapezoid"`` is
            Σ_s ε_s/2 [J(w_s) P_s J(w_s)ᵀ + J(w_{s+1}) P_s J(w_{s+1})ᵀ]: :mod:`pkfast.engine.routes.preconditioned`),
            the kernel whose kernel machine is the trained network; no layer is then factorised (a diagonal P
            breaks the factorisation): each is materialised and scaled by √P_s, whatever ``method`` asks (the plan
            says so; ``method="jacobian"`` scales the Jacobian panels). ``None`` (or ``"none"``): the Euclidean
            kernel. ``"auto"`` (default): ``"recorded"`` where the trajectory records one, else Euclidean — with
            a warning where the recorded optimizer is adaptive but its preconditioner was not recorded.
            ``"recorded"`` on a trajectory without one is refused. The stored manifest records the choice.
        precision: input precision of the Gram products: ``"ieee"`` (exact fp32/fp64), ``"tf32"`` or
            ``"bf16"`` (Triton only; fp32 accumulation; relative error ≈ 1e-3 and ≈ 4e-3 of the entries'
            scale respectively, see ``tests/engine/test_triton_kernel.py``).
        out: a path ending in ``.npy``: write the Gram there tile by tile instead of returning it in memory
            (out-of-core; the working memory stays within ``memory_budget`` whatever N is). A manifest and a
            journal of finished tiles go beside it in ``<out>.pkfast/``. Running the same call again after a
            crash or a kill resumes from the finished tiles and gives a bitwise identical file; a call with a
            different model, trajectory, data or options is refused (saying which differs). Under
            ``torch.distributed`` (e.g. ``torchrun``) every rank computes a disjoint, equal-work share of the
            tiles into the same file. See :mod:`pkfast.store.writer`.
        overwrite: with ``out``, discard an existing output (and its progress) and start afresh.
        method: how the Jacobian products are formed (:func:`pkfast.plan` shows the choice per layer):

            - ``"auto"`` (default): per layer with a rule (:mod:`pkfast.layers`: ``nn.Linear``, also over extra
              leading dimensions; ``nn.Conv1d``/``nn.Conv2d``; ``nn.Embedding``; the affine of LayerNorm,
              GroupNorm, BatchNorm (eval) and RMSNorm; any type registered with ``pkfast.layers.register``) the
              cheaper exact route by the cost model — ``factorized`` (Σ_{s,t} (a_s·a′_t + 1)(δ_s·δ′_t) from the
              layer's inputs and output gradients, never forming its P-dimensional Jacobian) or ``materialized``
              (its per-sample gradient formed from those factors); every other parameter (custom parameters,
              tied weights) through ``torch.func.jacrev``. A model with no layer rule runs exactly the
              ``"jacobian"`` route.
            - ``"factorized"``: factorise every layer whose rule has a factorised form (norm affines have none and
              are materialised), whatever the cost model says.
            - ``"materialized"``: materialise every supported layer's per-sample gradient from its factors and
              multiply the panels (the Gram's full N²·C·P product, as SYRK on symmetric tiles). A layer whose
              factors are smaller than its gradient (every dense layer) is streamed: its gradient is formed a
              slice of output units at a time in a small reused workspace, so no tile-sized Jacobian panel is
              held and none is recomputed when the Jacobians exceed ``memory_budget``.
            - ``"jacobian"``: materialise every Jacobian with ``vmap(jacrev)``, as in the torch.func tutorial.
            - ``"sketch"``: approximate and unbiased: Gram of the random path features
              Φ(x) = Σ_s √ε_s J_s(x) R_s (:func:`pkfast.sketch`), with ``k`` columns (default 1024) from the
              random ``seed`` (default 0); each layer with a factorised rule is projected from its factors by a
              Kronecker-factored R where that is cheaper (``projection``; :func:`pkfast.plan` shows the choice).
              Symmetric rules only. The features of X (and X2) are computed once, then the tiles are their
              products, in memory or stored with ``out`` and shared across ranks like any Gram.
        k, seed, projection: the sketch's dimension, seed and projection — ``"auto"`` (per layer by cost),
            ``"dense"`` (every parameter by a dense Gaussian: an entry's standard deviation is
            √((K(x,x)·K(x′,x′) + K(x,x′)²)/k)) or ``"kronecker"`` (every factorisable layer factored) — for
            ``method="sketch"`` only; see :mod:`pkfast.sketch`.
        output_fn: reduces what the model returns to its outputs ``[n, *out]``. Default
            (:func:`pkfast.engine.inputs.reduce_output`): a tensor as it is; a mapping or Hugging Face ``ModelOutput``
            its ``"logits"`` (else its only tensor); a tuple its first element.
        head: a final linear head y = W h + b (``nn.Linear`` or Hugging Face ``Conv1D``, V outputs from d inputs)
            collapsed for the trace, mean and full kernels: its V outputs per position cost d + 1 output gradients
            (Σ_c ∇f_c·∇f′_c = V(h·h′ + 1) + Σ_jk (WᵀW)_jk ∇h_j·∇h′_k, exactly; the full V×V blocks are
            Q K Qᵀ + I·K_z/V from the collapsed outputs' blocks with W = QR at each point; docs/math.md §7.4). ``"auto"``
            (default) detects it — the last Linear-like module with V > d + 1, called once, untied or tied to one
            ``nn.Embedding`` lookup (the cross term added; trace and mean only), followed only by a selection of
            positions (checked on two samples) — and the plan says so; a module name requires that one (an error
            says why it cannot be); None never collapses. Not used for ``of="loss"``, output sketches,
            ``method="sketch"``, a recorded preconditioner or the trace under ``rule="exact"``.

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
    with ThreadPolicy(check_threads(_FN, threads), _FN):  # planning too: its probes are many small operations
        job = GramJob.create(model, trajectory, X, X2, y=y, y2=y2, fn=_FN, outputs=outputs, rule=rule,
                             diagonal=diagonal, backend=backend, dtype=dtype, memory_budget=memory_budget,
                             precision=precision, nodes=nodes, of=of, loss=loss, method=method, k=k, seed=seed,
                             projection=projection, output_fn=output_fn, threads=threads,
                             preconditioner=preconditioner, head=head)
        if out is not None:
            return job.run(store_sink(job, out, overwrite=overwrite), progress=progress)
        if overwrite:
            raise ValueError(f"{_FN}: overwrite=True applies to a stored Gram; expected out='….npy' with it, found "
                             "out=None")
        return job.run(progress=progress)


def store_sink(job: GramJob, out: str | os.PathLike, *, overwrite: bool) -> StoreSink:
    """The sink that writes ``job``'s Gram to ``out`` (resuming it), with the manifest describing it."""
    lay = job.layout
    manifest = GramStore.new_manifest(
        shape=job.result_shape, dtype=np.dtype(str(job.dtype).replace("torch.", "")), options=job.record(),
        fingerprints=job.fingerprints(), plan=job.tiling, diagonal=lay.diagonal, num_outputs=lay.width,
        scale=1.0 / lay.width if lay.outputs == "mean" else 1.0)
    return StoreSink(out, manifest, overwrite=overwrite, fn=_FN)


def plan(
    model: torch.nn.Module,
    trajectory: Trajectory,
    X: torch.Tensor | np.ndarray,
    X2: torch.Tensor | np.ndarray | None = None,
    **options: Any,
) -> "GramPlan":
    """What :func:`gram` would do with these arguments, without doing it: the route of every parameterised
    layer (``factorized``, ``materialized``, ``jacobian`` or ``unused``) with its positions S, fan-in I, fan-out
    O, estimated multiply-add FLOPs of each feasible route and memory per sample, and the tiling.

    Takes the arguments of :func:`gram` (except ``out``, ``overwrite`` and ``progress``). ``print()`` the
    result for a table; ``.layers`` holds each layer's frozen :class:`~pkfast.engine.costs.LayerChoice` (its
    ``.route``, costs and the layer's facts: ``.name``, ``.type``, ``.positions``, …).

    Example:
        >>> import torch, pkfast
        >>> net = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.Tanh(), torch.nn.Linear(256, 10))
        >>> traj = pkfast.Trajectory.from_checkpoints([net.state_dict(), net.state_dict()], lr=0.1)
        >>> p = pkfast.plan(net, traj, torch.randn(100, 64))
        >>> [(L.name, str(L.route)) for L in p.layers]
        [('0', 'factorized'), ('2', 'factorized')]
    """
    for k in ("out", "overwrite", "progress"):
        if k in options:
            raise TypeError(f"pkfast.plan: {k!r} is an option of the computation, not of the plan; drop it")
    with ThreadPolicy(check_threads("pkfast.plan", options.get("threads")), "pkfast.plan"):
        job = GramJob.create(model, trajectory, X, X2, fn="pkfast.plan", **options)
    return GramPlan(job)


def _formed(L, C: int) -> str:
    """The plan's note on how an in-panel layer's per-sample gradient is formed (its rule's, "" from its factors)."""
    return L.rule.gradient_note(L, C) if L.rule is not None and L.route.value in ("materialized", "dense") else ""


class GramPlan:
    """The plan of a Gram computation (see :func:`plan`): ``.method`` (the resolved method), ``.layers`` (each
    layer's route and costs), ``.tiles`` (the tiling, :class:`~pkfast.engine.tiles.Tiling`), ``.flops``
    (estimated multiply-adds, all terms). Frozen: it is what :func:`gram` runs."""

    def __init__(self, job: "GramJob") -> None:
        self.job = job
        self.method = job.method
        self.requested = job.opts.method
        #: one line: the routes the parameters took, e.g. "auto: factorized 3, materialized 1, jacobian 2 layers"
        self.routes = job.route.summary()
        self.layers = job.choices
        self.tiles = job.tiling
        self.flops = sum(L.flops for L in self.layers)

    def __str__(self) -> str:
        j = self.job
        N = j.X.shape[0]
        M = N if j.X2 is None else j.X2.shape[0]
        o = j.opts
        shape = f"{N}" if o.diagonal else f"{N}×{M}"
        what = ("loss kernel" if o.of == "loss" else f"{o.outputs} Gram" if o.output_sketch is None else
                f"Gram of the {o.output_sketch.describe()}")
        head = (f"pkfast.plan: {'diagonal of a ' if o.diagonal else ''}{shape} {what}, C={j.layout.width}, "
                f"{len(j.terms)} terms (rule={o.rule!r}), method={self.requested!r} → {self.routes}")
        if j.fm.head is not None:
            head += f"\nstructured {j.fm.head.describe(o.outputs)} (exact; head=None computes every output's gradient)"

        if o.preconditioner is not None:
            at_checkpoints = getattr(j.fm.trajectory, "preconditioner_source", None) == "checkpoints"
            head += (("\npreconditioner: at checkpoints only (K = Σ ε_s J_s diag(P_s) J′_sᵀ, P_s from the optimizer "
                      "state saved with w_{s+1}: an approximation between checkpoints)" if at_checkpoints else
                      "\npreconditioner: recorded (K = Σ ε_s J_s diag(P_s) J′_sᵀ, the kernel of the trained network)")
                     if o.preconditioner == "recorded" else
                     "\npreconditioner: none (the Euclidean kernel; the optimizer is adaptive)")
        rows = [("layer", "type", "route", "S", "I", "O", "params", "GFLOP", "other routes (GFLOP)", "KiB/sample", "note")]
        for L in self.layers:
            others = ", ".join(f"{k} {v / 1e9:.3g}" for k, v in L.options.items() if k != L.route.value)
            if L.kind == "other":
                S = I = O = "-"
            else:
                S, (I, O) = str(L.positions), L.rule.fan_labels(L)
                if L.groups > 1:
                    I, O = f"{I}×{L.groups}g", f"{O}×{L.groups}g"
            rows.append((L.name or "(root)", L.type, L.route.value, S, I, O, f"{L.size:,}", f"{L.flops / 1e9:.3g}", others or "-",
                         f"{L.bytes_per_sample / 1024:.3g}", L.reason or ("streamed in slices" if L.stream else
                                                                 _formed(L, j.fm.num_outputs))))
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        lines = [head]
        if j.fm.passes.describe():
            lines.append(f"per-sample passes: {j.fm.passes.describe()}")
        if j.route.passes():
            lines.append(j.route.passes())
        lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
        lines.append(f"total ≈ {self.flops / 1e9:.3g} GFLOP in {self.tiles!r}")
        if self.tiles.problem:
            lines += ["DOES NOT FIT: " + self.tiles.problem] + self._cheaper()
        return "\n".join(lines)

    def _cheaper(self) -> list[str]:
        """What to do when no tile fits: the layers that take most per sample, and the cheaper kernels."""
        j, o = self.job, self.job.opts
        big = sorted(self.layers, key=lambda L: -L.bytes_per_sample)[:3]
        total = sum(L.bytes_per_sample for L in self.layers) or 1
        out = ["  largest per sample: " + ", ".join(
            f"{L.name or '(root)'} ({L.type}, {L.bytes_per_sample / 2**20:.3g} MiB, "
            f"{100 * L.bytes_per_sample / total:.0f}%)" for L in big)]
        tips = []
        if o.of != "loss" and j.num_outputs > 1:
            tips.append(f"of='loss' (the loss kernel: 1 output per sample instead of C={j.num_outputs})")
        if o.method != "sketch":
            tips.append("method='sketch' with k= (k random features per sample instead of the Jacobian)")
        if self.job.fm.itemsize > 4:
            tips.append("dtype=torch.float32 (half the bytes)")
        tips.append(f"memory_budget of at least {self.tiles.tile_bytes:,} bytes")
        return out + ["  cheaper: " + "; ".join(tips)]

    __repr__ = __str__


