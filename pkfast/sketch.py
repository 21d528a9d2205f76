r"""sketch: randomized Johnson–Lindenstrauss path features Φ(x) ∈ R^{C×k} whose products estimate the path kernel.

The math (docs/math.md §7). For a symmetric rule the path kernel is a sum of weighted per-point
terms, K(x, x′) = Σ_s w_s J_s(x) J_s(x′)ᵀ with J_s = ∂f/∂w at the point w_s (``rule="left"``: w_s = ε_s;
``"trapezoid"``: the per-point merged weights (ε_{s-1}+ε_s)/2). Draw, independently per term, a Gaussian
R_s ∈ R^{P×k} with iid N(0, 1/k) entries and set

.. math:: \Phi(x) = \sum_s \sqrt{w_s}\, J_s(x)\, R_s \in \mathbb{R}^{C\times k},
          \qquad \hat K(x, x') = \Phi(x)\,\Phi(x')^\top .

Stacking the terms, Φ(x) = U(x)·R with U(x) = [√w_s J_s(x)]_s (C × TP) and R = [R_s]_s (TP × k) iid
N(0, 1/k): this is one JL sketch of the rows of U, so E[K̂] = U Uᵀ = K exactly (unbiased), and:

- Variance (Isserlis' theorem on the stacked sketch): for the output pair (c, c′), exactly
  Var K̂_{cc′}(x, x′) = [K_{cc}(x, x)·K_{c′c′}(x′, x′) + K_{cc′}(x, x′)²] / k. So **the standard deviation of
  an entry is √((K(x,x)·K(x′,x′) + K(x,x′)²)/k)**: relative error √(2/k) on the diagonal (k = 1024: 4.4%).
  For ``outputs="trace"`` (one R shared by the C outputs) Var = [⟨K(x,x), K(x′,x′)⟩_F + tr(K(x,x′)²)]/k with
  the C×C blocks, at most (K^tr(x,x)·K^tr(x′,x′) + ‖K(x,x′)‖_F²)/k ≤ 2·K^tr(x,x)·K^tr(x′,x′)/k.
- Uniform bound (Dasgupta–Gupta and polarisation): **to get |K̂ − K| ≤ ε·√(K(x,x)·K(x′,x′)) for all E
  entries at once with probability ≥ 1 − δ, take k ≥ 6·ln(4E/δ)/ε²** (ε ≤ ½), with E the number of
  (x, c, x′, c′) pairs you need: N·M·C for the trace Gram (the trace error is then ≤ ε √(K(x,x)K(x′,x′))
  by Cauchy–Schwarz), N·M·C² for the full block. :func:`required_k` evaluates it. It is a worst case
  over all entries; the typical entry error is the standard deviation above.
- Cost: 2·C·P·k FLOPs per sample and term for the projection (plus the Jacobians); storage N·C·k whatever
  the number of terms. A Gram from features costs 2·N·M·C·k (trace) — cheap next to the exact Gram's
  2·N·M·C·P per term when k ≪ T·P.

**Kronecker-factored layers** (docs/math.md §7.2, :mod:`pkfast.engine.routes.kron`). The statements above are those of
``projection="dense"``. By default (``"auto"``) each layer with a factorised rule whose Kronecker projection is
cheaper takes rows R_in ⊗ R_out of R instead (k = r_in·r_out), formed from its inputs and output gradients
without its gradient: still unbiased, with a larger variance given exactly in §7.2 (for a rank-one gradient the
relative error of one layer and step is about √(2/r_in + 2/r_out)); :func:`required_k`'s guarantee is the dense
projection's. ``pkfast.plan(..., method="sketch")`` shows each layer's projection.

**Stored features.** With ``out=`` the features are written chunk by chunk into the stored-Gram layout of
:mod:`pkfast.store.writer` in row chunks (one row per sample; crash-safe, resumable, shared by ranks as
:mod:`pkfast.store.ranks` says; float16/bfloat16 optional) and
returned memory-mapped; :meth:`PathFeatures.open` reopens them.

Only symmetric rules can be sketched: ``rule="exact"`` is asymmetric (K(x, x′) ≠ K(x′, x)), and Φ Φ′ᵀ is
the Gram of one feature map, hence symmetric. Sketches are not exact: exactness checks must use
:func:`pkfast.gram`.

**Reproducibility.** R is never stored: it is generated block by block over the parameters (blocks of
``max(1, 2**23 // k)`` rows, fixed by k alone), each block from a fresh ``torch.Generator`` on the compute
device seeded from (seed, term's weight point, block index). The features therefore do not depend on the
sample chunking or the memory budget (up to the GEMM's rounding: ≤ 1e-12 relative in float64), and features
of different sample sets made with the same seed use the same R and can be multiplied together
(:meth:`PathFeatures.gram` with ``other``). The random stream depends on the device kind (CPU vs CUDA; for
CUDA the GPU model), the dtype and the torch version; all of these enter the :attr:`PathFeatures.fingerprint`,
and features with different fingerprints are never multiplied.

**Loop order and its trade-off.** Jacobians are computed once per (sample, term) in both orders; what
differs is how often R is generated. Generating a random number costs far more than reading one (measured
on 2 CPU cores: 180 M/s in float32 and 60 M/s in float64, the time of about 150 and 1,000 GEMM FLOPs), while
the projection spends 2·n·C FLOPs per element of R on a chunk of n samples: regenerating R per chunk costs
about as much as the projection itself until n·C reaches the hundreds.

- ``"chunks"`` (default): sample chunks outermost (as large as the memory budget allows: each sample needs
  C·P values of Jacobian and C·k of feature accumulator on the device), then terms, then blocks of R,
  each regenerated per chunk. When all N samples fit in one chunk every block is generated exactly once.
- ``"terms"``: when several chunks are needed and the budget also holds one whole R_s (P·k values, plus the
  features of all N samples on a non-CPU device) without many more chunks, terms are outermost: each R_s is
  generated once and every chunk is projected with it. This saves (chunks − 1)·T·P·k random numbers.

The choice is logged (``pkfast`` logger, INFO). Results are the same either way (to GEMM rounding), since
every block's generator is reseeded from (seed, point, block).
"""

from __future__ import annotations

import math
import numbers
import os
from typing import Any

import numpy as np
import torch

from pkfast.store import formats
from pkfast.engine.driver import check_data, check_model_and_trajectory, functional_model
from pkfast.store.features import STORAGE_DTYPES, PathFeatures, store_options, write_store
from pkfast.options import SKETCH_RULES, Options, model_device
from pkfast.engine.routes.sketch import Sketcher, block_rows, projection_block
from pkfast.engine.quadrature import terms_for
from pkfast.engine.routes.preconditioned import preconditioner_for
from pkfast.engine.resources.threads import ThreadPolicy
from pkfast.trajectory.points import Trajectory

__all__ = ["sketch", "PathFeatures", "required_k", "projection_block", "block_rows"]

_FN = "pkfast.sketch"


# ---------------------------------------------------------------------------------------------- the error bound
def required_k(epsilon: float, delta: float, entries: int) -> int:
    """The sketch size k = ⌈6·ln(4E/δ)/ε²⌉ for which, with probability ≥ 1 − δ, all E entries satisfy
    |K̂ − K| ≤ ε·√(K(x,x)·K(x′,x′)) (docs/math.md §7; requires 0 < ε ≤ ½).

    ``entries`` is E: N·M·C for a trace Gram (N·(N+1)/2·C suffices for a symmetric one), N·M·C² for the
    full block.

    >>> from pkfast.sketch import required_k
    >>> required_k(0.5, 0.1, 16)
    156
    """
    fn = "pkfast.sketch.required_k"
    if not isinstance(epsilon, numbers.Real) or not 0 < float(epsilon) <= 0.5:
        raise ValueError(f"{fn}: epsilon must be in (0, 0.5] (the bound's range of validity); found {epsilon!r}")
    if not isinstance(delta, numbers.Real) or not 0 < float(delta) < 1:
        raise ValueError(f"{fn}: delta must be in (0, 1); found {delta!r}")
    if isinstance(entries, bool) or not isinstance(entries, numbers.Integral) or entries < 1:
        raise ValueError(f"{fn}: entries must be a positive integer (the number of Gram entries bounded); "
                         f"found {entries!r}")
    return int(math.ceil(6.0 * math.log(4.0 * int(entries) / float(delta)) / float(epsilon) ** 2))



def sketch(
    model: torch.nn.Module,
    trajectory: Trajectory,
    X: torch.Tensor | np.ndarray,
    *,
    k: int = 1024,
    seed: int = 0,
    projection: str = "auto",
    rule: str = "left",
    of: str = "output",
    loss: Any = None,
    y: Any = None,
    dtype: torch.dtype | str | None = None,
    memory_budget: int | str | None = None,
    progress: bool = True,
    device: torch.device | str | None = None,
    output_fn: Any = None,
    out: str | os.PathLike | None = None,
    storage_dtype: torch.dtype | str | None = None,
    overwrite: bool = False,
    threads: int | str | None = None,
    preconditioner: str | None = "auto",
) -> PathFeatures:
    r"""Sketched path features Φ(x) = Σ_s √w_s J_s(x) R_s ∈ R^{C×k} of the samples ``X`` (see :mod:`pkfast.sketch`).

    ``Φ(x)·Φ(x′)`` is an unbiased estimate of the path kernel of :func:`pkfast.gram` with the same ``rule``,
    ``of`` and ``loss``; an entry's standard deviation is about √((K(x,x)K(x′,x′) + K(x,x′)²)/k), and
    k ≥ 6 ln(4E/δ)/ε² bounds all E entries by ε√(K(x,x)K(x′,x′)) with probability ≥ 1 − δ
    (:func:`required_k`).

    Args:
        model, trajectory, X, output_fn: as in :func:`pkfast.gram` (``X``: ``[N, *features]``, or a mapping
            or tuple of such arrays).
        k: the sketch size (columns of each projection R_s); storage is N·C·k.
        seed: selects the projections. Features of different sample sets multiply together only when made
            with the same seed (and model, trajectory, rule, k, of, loss, dtype, device kind).
        rule: ``"left"`` (one projection per step) or ``"trapezoid"`` (one per weight point, with the merged
            weights). ``"exact"`` is refused: it is asymmetric, a feature map's Gram is symmetric.
        of, loss, y: ``of="loss"``: features of the per-sample loss gradient (C = 1), as in :func:`pkfast.gram`.
        dtype: ``torch.float32`` (default) or ``torch.float64``: Jacobians, projections and features.
        memory_budget: bytes (or ``"2GiB"``) of device working memory: a chunk of n samples needs
            n·C·(P + k) values, plus one block of R (≤ 2²³ values) or one whole R_s (P·k; see the module
            docstring on loop order). Default: half the device's free memory. It changes the chunking and the
            loop order, never the features (beyond rounding). The returned features are not counted.
        progress: a tqdm progress bar (stderr) over chunks × terms (with ``out``: over stored chunks).
        device: the compute device (default: the model's).
        out: a path ending in ``.npy``: write the features there chunk by chunk instead of holding them (a
            large training set's features, with the memory of one chunk). Crash-safe and resumable like a
            stored Gram (:mod:`pkfast.store.writer`): a chunk is journaled with its CRC once its bytes are on disk; the
            same call again resumes from the finished chunks, and a call with another model, trajectory,
            data or sketch option is refused, saying which differs. Under ``torch.distributed`` every rank
            writes its share of the chunks. Open it later with :meth:`PathFeatures.open`.
        storage_dtype: with ``out``: ``torch.float16`` or ``torch.bfloat16`` halve the file (products are
            then formed in float32 from the stored values; bfloat16 is stored as its 16-bit patterns in an
            ``int16`` ``.npy``); default: ``dtype``.
        overwrite: with ``out``, discard an existing store and start afresh.
        threads: CPU threads, as in :func:`pkfast.gram` (decided once, when the sketch starts).
        preconditioner: as in :func:`pkfast.gram`: ``"recorded"`` (the default ``"auto"`` where the trajectory
            records one) gives features of the √P_s-scaled Jacobians, Φ(x) = Σ_s √w_s J_s(x) √P_s R_s, an unbiased
            estimate of the preconditioned kernel; they are projected densely (``projection="kronecker"`` is
            refused: a diagonal P breaks the Kronecker factorisation of a layer's gradient).

    Returns:
        :class:`PathFeatures` with ``features`` a CPU ``[N, C, k]`` tensor (with ``out``: memory-mapped from
        the file, in ``storage_dtype``).

    Example:
        >>> import torch, pkfast
        >>> from pkfast.sketch import sketch
        >>> net = torch.nn.Sequential(torch.nn.Linear(3, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2))
        >>> w0 = {k: v.clone() for k, v in net.state_dict().items()}
        >>> traj = pkfast.Trajectory.from_checkpoints([w0, {k: v * 0.9 for k, v in w0.items()}], lr=0.1)
        >>> X = torch.randn(6, 3, dtype=torch.float64)
        >>> phi = sketch(net, traj, X, k=4096, dtype=torch.float64, progress=False)
        >>> K = pkfast.gram(net, traj, X, dtype=torch.float64, progress=False)
        >>> d = K.diagonal()
        >>> bool(((phi.gram() - K).abs() <= 0.5 * (d[:, None] * d[None, :]).sqrt()).all())
        True
    """
    model = check_model_and_trajectory(_FN, model, trajectory)
    opts = Options.check(_FN, trajectory=trajectory, rules=SKETCH_RULES, k=1024 if k is None else k,
                         seed=0 if seed is None else seed, rule=rule, of=of, loss=loss, dtype=dtype,
                         memory_budget=memory_budget, projection=projection, method="sketch", output_fn=output_fn,
                         threads=threads, preconditioner=preconditioner)
    with ThreadPolicy(opts.threads, _FN):  # the functional model's checks too: many small operations
        data = check_data(_FN, opts, X, y=y)
        dev = _device(device, model)
        fm = functional_model(_FN, model, trajectory, opts, data, dev)
        storage = _storage_dtype(storage_dtype, opts.dtype, out)
        if not isinstance(overwrite, bool) or (overwrite and out is None):
            raise ValueError(f"{_FN}: overwrite=True applies to stored features; expected out='….npy' with it, found "
                             f"overwrite={overwrite!r}, out={out!r}")
        sk = Sketcher(fm, terms_for(opts.rule, trajectory.step_sizes), k=opts.k, seed=opts.seed, rule=opts.rule,
                      of=opts.of, loss=opts.loss, budget=opts.budget(dev), fn=_FN, projection=opts.projection, X=data.X,
                      precondition=preconditioner_for(opts.preconditioner, fm, opts.rule, _FN))
        if out is not None:
            return _store(sk, data, out, storage, overwrite=overwrite, progress=progress)
        return PathFeatures(sk.project(data.X, data.Y, progress=progress), k=sk.k, seed=sk.seed, rule=sk.rule,
                            of=sk.of, parts=sk.parts)


#: Rows per stored chunk at most: a crash loses at most this many samples' work.
STORE_CHUNK = 1024


def _storage_dtype(storage_dtype: Any, dtype: torch.dtype, out: Any) -> torch.dtype:
    if storage_dtype is None:
        return dtype
    if out is None:
        raise ValueError(f"{_FN}: storage_dtype applies to stored features; expected out='….npy' with it, found "
                         "out=None")
    t = getattr(torch, storage_dtype, None) if isinstance(storage_dtype, str) else storage_dtype
    if t not in STORAGE_DTYPES:
        raise ValueError(f"{_FN}: storage_dtype must be one of torch.float16, torch.bfloat16, torch.float32, "
                         f"torch.float64; found {storage_dtype!r}")
    return t


def _store(sk: Sketcher, data: Any, out: str | os.PathLike, storage: torch.dtype, *, overwrite: bool,
           progress: bool) -> PathFeatures:
    """Features of ``data`` written into the store at ``out`` chunk by chunk (this rank's unfinished chunks)."""
    N = data.X.shape[0]
    rows = max(1, min(STORE_CHUNK, sk.schedule(N)[1]))
    parts = sk.parts  # (digests the trajectory: once)
    options = store_options(parts, k=sk.k, seed=sk.seed, rule=sk.rule, of=sk.of, storage=storage)
    fingerprints = formats.fingerprints(parts["model"], parts["trajectory"], data.X, y=data.Y, options=options)

    def compute(rows: slice) -> torch.Tensor:
        return sk.project(data.X[rows], None if data.Y is None else data.Y[rows], progress=False)

    return write_store(out, compute, shape=(N, sk.C, sk.k), rows=rows, storage=storage, options=options,
                       fingerprints=fingerprints, overwrite=overwrite, fn=_FN, progress=progress)


def _device(device: Any, model: torch.nn.Module) -> torch.device:
    """The compute device: ``device`` if given (a bare "cuda" is the current CUDA device), else the model's."""
    if device is None:
        return model_device(model)
    if not isinstance(device, (str, torch.device)):
        raise TypeError(f"{_FN}: device must be a torch.device or a string such as 'cuda'; found "
                        f"{type(device).__name__}")
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device
