r"""sketch: randomized Johnson–Lindenstrauss path features Φ(x) ∈ R^{C×k} whose products estimate the path kernel.

The math (path-kernel-math.md §6(iii)). For a symmetric rule the path kernel is a sum of weighted per-point
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

import functools
import hashlib
import json
import logging
import math
import numbers
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from pkfast import _checks
from pkfast.gram import OF, OUTPUTS, _loss_spec
from pkfast.jacobians import FunctionalModel
from pkfast.rules import RULES, Term, terms_for
from pkfast.store import _digest, model_fingerprint, trajectory_fingerprint
from pkfast.tiles import default_memory_budget
from pkfast.trajectory import Trajectory

log = logging.getLogger("pkfast")

__all__ = ["sketch", "sketch_gram", "PathFeatures", "required_k", "projection_block", "block_rows"]

_FN = "pkfast.sketch"
_FORMAT = "pkfast-path-features"
_VERSION = 1
#: Random numbers per generated block of R (rows = max(1, _BLOCK_ELEMS // k)): 32 MiB in float32. Fixed,
#: so the projection does not depend on the memory budget or chunking. Changing it changes every sketch.
_BLOCK_ELEMS = 2**23
#: Rules whose terms are symmetric (one point per term) and can therefore be sketched.
SKETCH_RULES = ("left", "trapezoid")


# ---------------------------------------------------------------------------------------------- the error bound
def required_k(epsilon: float, delta: float, entries: int) -> int:
    """The sketch size k = ⌈6·ln(4E/δ)/ε²⌉ for which, with probability ≥ 1 − δ, all E entries satisfy
    |K̂ − K| ≤ ε·√(K(x,x)·K(x′,x′)) (path-kernel-math.md §6(iii); requires 0 < ε ≤ ½).

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


# ---------------------------------------------------------------------------------------------- the random projection
def block_rows(k: int) -> int:
    """Rows of R per generated block for sketch size ``k`` (fixed by k alone)."""
    return max(1, _BLOCK_ELEMS // int(k))


def _block_seed(seed: int, point: int, block: int) -> int:
    """A 63-bit generator seed for block ``block`` of the projection of weight point ``point``."""
    h = hashlib.blake2b(f"pkfast.sketch|{int(seed)}|{int(point)}|{int(block)}".encode(), digest_size=8)
    return int.from_bytes(h.digest(), "little") & (2**63 - 1)


def projection_block(seed: int, point: int, block: int, rows: int, k: int, *, dtype: torch.dtype = torch.float32,
                     device: torch.device | str = "cpu", generator: torch.Generator | None = None,
                     out: torch.Tensor | None = None) -> torch.Tensor:
    """Rows ``block·block_rows(k) … +rows`` of the projection R_point, **unscaled** (iid N(0, 1), shape
    ``[rows, k]``; the sketch scales by 1/√k). Deterministic in (seed, point, block, rows, k, dtype, device
    kind). ``generator``: a generator on ``device`` to reseed (saves creating one per block); ``out``: a
    contiguous ``[rows, k]`` tensor to fill (same values)."""
    device = torch.device(device)
    g = generator if generator is not None else torch.Generator(device=device)
    g.manual_seed(_block_seed(seed, point, block))
    if out is not None:
        return torch.randn(rows, k, generator=g, out=out)
    return torch.randn(rows, k, generator=g, dtype=dtype, device=device)


def _rng_identity(device: torch.device) -> str:
    """What the random stream depends on besides the seed: torch's version and the device kind (GPU model)."""
    ver = ".".join(torch.__version__.split("+")[0].split(".")[:2])
    if device.type == "cuda":
        return f"torch {ver} cuda {torch.cuda.get_device_name(device)}"
    return f"torch {ver} {device.type}"


# ---------------------------------------------------------------------------------------------- features
class PathFeatures:
    """Sketched path features Φ ∈ R^{N×C×k} of N samples (see :mod:`pkfast.sketch`): Φ(x)Φ(x′)ᵀ estimates
    the path kernel K(x, x′) without bias.

    Attributes:
        features: ``[N, C, k]`` CPU tensor.
        k, seed, rule, of: how the sketch was made.
        num_outputs: C (1 for ``of="loss"``).
        fingerprint: a digest of the model's architecture and trainable parameter names/shapes, the
            trajectory's weights and step sizes, rule, k, seed, of, loss, dtype and random stream. Features
            are multiplied together only when their fingerprints agree.
        parts: the fingerprint's components (which one differs is named when a product is refused).

    Example:
        >>> import torch, pkfast
        >>> from pkfast.sketch import sketch
        >>> net = torch.nn.Sequential(torch.nn.Linear(3, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2))
        >>> w0 = {k: v.clone() for k, v in net.state_dict().items()}
        >>> traj = pkfast.Trajectory.from_checkpoints([w0, {k: v * 0.9 for k, v in w0.items()}], lr=0.1)
        >>> X, X2 = torch.randn(5, 3), torch.randn(4, 3)
        >>> phi = sketch(net, traj, X, k=256, seed=1, progress=False)
        >>> phi  # doctest: +ELLIPSIS
        PathFeatures(N=5, C=2, k=256, seed=1, rule='left', of='output', dtype=float32, fingerprint='...')
        >>> phi.gram().shape, phi.gram(outputs="full").shape, phi.gram(diagonal=True).shape
        (torch.Size([5, 5]), torch.Size([5, 5, 2, 2]), torch.Size([5]))
        >>> phi.gram(sketch(net, traj, X2, k=256, seed=1, progress=False)).shape  # cross-Gram: same seed
        torch.Size([5, 4])
    """

    def __init__(self, features: torch.Tensor, *, k: int, seed: int, rule: str, of: str,
                 parts: dict[str, Any]) -> None:
        if not isinstance(features, torch.Tensor) or features.ndim != 3 or features.shape[2] != k:
            raise ValueError(f"pkfast.PathFeatures: features must be a [N, C, k={k}] tensor; found "
                             f"{type(features).__name__} of shape {tuple(getattr(features, 'shape', ()))}")
        self.features = features
        self.k = int(k)
        self.seed = int(seed)
        self.rule = rule
        self.of = of
        self.parts = dict(parts)
        self.fingerprint = _digest(sorted(self.parts.items()))

    @property
    def num_outputs(self) -> int:
        return int(self.features.shape[1])

    def __len__(self) -> int:
        return int(self.features.shape[0])

    def __repr__(self) -> str:
        N, C, k = self.features.shape
        dt = str(self.features.dtype).replace("torch.", "")
        return (f"PathFeatures(N={N}, C={C}, k={k}, seed={self.seed}, rule={self.rule!r}, of={self.of!r}, "
                f"dtype={dt}, fingerprint='{self.fingerprint[:12]}…')")

    # ------------------------------------------------------------------ products
    def _check_compatible(self, other: "PathFeatures", fn: str) -> None:
        if not isinstance(other, PathFeatures):
            raise TypeError(f"{fn}: other must be PathFeatures (from pkfast.sketch.sketch or PathFeatures.load); "
                            f"found {type(other).__name__}")
        if other.fingerprint == self.fingerprint:
            return
        diffs = []
        for key in sorted(set(self.parts) | set(other.parts)):
            a, b = self.parts.get(key), other.parts.get(key)
            if a == b:
                continue
            if key in ("model", "trajectory"):
                what = {"model": "model (architecture, trainable parameter names/shapes, fixed values)",
                        "trajectory": "trajectory (weights or step sizes)"}[key]
                diffs.append(f"{what} differs")
            else:
                diffs.append(f"{key} differs ({a!r} vs {b!r})")
        raise ValueError(
            f"{fn}: these features come from different sketches, so their product estimates no kernel: "
            f"{'; '.join(diffs) or 'fingerprints differ'}. Sketch both sample sets with the same model, "
            "trajectory, rule, k, seed, of, loss, dtype and device kind")

    def gram(self, other: "PathFeatures | None" = None, *, outputs: str = "trace",
             diagonal: bool = False) -> torch.Tensor:
        """The sketched Gram Φ Φ′ᵀ (an unbiased estimate of :func:`pkfast.gram` with the same options).

        Args:
            other: features of a second sample set from the same sketch (same fingerprint) for a cross-Gram
                ``[N, M]``; ``None``: the Gram of these samples with themselves.
            outputs: ``"trace"`` → ``[N, M]`` (Σ_c Φ_c(x)·Φ_c(x′)); ``"mean"`` → the trace / C;
                ``"full"`` → ``[N, M, C, C]``. For ``of="loss"`` (one output) all three give ``[N, M]``, as
                in :func:`pkfast.gram`.
            diagonal: only K̂(x_a, x_a): ``[N]`` or ``[N, C, C]`` (requires ``other=None``).
        """
        fn = "pkfast.PathFeatures.gram"
        outputs = _checks.check_choice(fn, "outputs", outputs, OUTPUTS)
        if not isinstance(diagonal, bool):
            raise TypeError(f"{fn}: diagonal must be True or False; found {diagonal!r}")
        if other is not None:
            self._check_compatible(other, fn)
            if diagonal:
                raise ValueError(f"{fn}: diagonal=True computes K(x_a, x_a) of these features alone; expected "
                                 "other=None, found other")
        if self.of == "loss" and outputs == "full":
            outputs = "trace"  # one output: the three modes coincide (as pkfast.gram does)
        A = self.features
        N, C, k = A.shape
        if diagonal:
            if outputs == "full":
                return torch.bmm(A, A.transpose(1, 2))
            d = A.reshape(N, C * k).square().sum(1)
            return d / C if outputs == "mean" else d
        B = A if other is None else other.features
        M = B.shape[0]
        if outputs == "full":
            G = A.reshape(N * C, k) @ B.reshape(M * C, k).T
            return G.view(N, C, M, C).permute(0, 2, 1, 3).contiguous()
        G = A.reshape(N, C * k) @ B.reshape(M, C * k).T
        return G / C if outputs == "mean" else G

    # ------------------------------------------------------------------ files
    def save(self, path: str | os.PathLike) -> Path:
        """Write the features and their metadata to one ``.npz`` file at ``path`` (exactly that name; written
        to a temporary file and renamed). :meth:`load` reads it back bitwise."""
        path = Path(path)
        meta = {"format": _FORMAT, "version": _VERSION, "k": self.k, "seed": self.seed, "rule": self.rule,
                "of": self.of, "parts": self.parts, "fingerprint": self.fingerprint,
                "shape": list(self.features.shape), "dtype": str(self.features.dtype).replace("torch.", "")}
        tmp = path.with_name(path.name + f".tmp{os.getpid()}")
        try:
            with open(tmp, "wb") as f:
                np.savez(f, features=self.features.detach().cpu().numpy(), meta=np.array(json.dumps(meta)))
            os.replace(tmp, path)
        finally:
            if tmp.exists():
                tmp.unlink()
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> "PathFeatures":
        """Features saved by :meth:`save`."""
        fn = "pkfast.PathFeatures.load"
        try:
            with np.load(path, allow_pickle=False) as z:
                if "features" not in z.files or "meta" not in z.files:
                    raise ValueError(f"{fn}: {path} holds {sorted(z.files)}; expected 'features' and 'meta' "
                                     "(a file written by PathFeatures.save)")
                arr = z["features"]
                meta = json.loads(str(z["meta"][()]))
        except (OSError, EOFError) as e:
            raise ValueError(f"{fn}: cannot read {path} as a .npz file: {e}") from e
        if meta.get("format") != _FORMAT or meta.get("version") != _VERSION:
            raise ValueError(f"{fn}: {path} is not a pkfast path-features file of version {_VERSION}; found format "
                             f"{meta.get('format')!r} version {meta.get('version')!r}")
        if list(arr.shape) != meta["shape"] or str(arr.dtype) != meta["dtype"]:
            raise ValueError(f"{fn}: {path}: the array is {arr.dtype} {tuple(arr.shape)} but its metadata says "
                             f"{meta['dtype']} {tuple(meta['shape'])}")
        out = cls(torch.from_numpy(arr), k=meta["k"], seed=meta["seed"], rule=meta["rule"], of=meta["of"],
                  parts=meta["parts"])
        if out.fingerprint != meta["fingerprint"]:
            raise ValueError(f"{fn}: {path}: the metadata's fingerprint does not match its contents (edited?)")
        return out


# ---------------------------------------------------------------------------------------------- the sketcher
class _Sketcher:
    """A validated sketch: the functional model, the terms, the fingerprint parts; :meth:`features` per sample set."""

    def __init__(self, model: Any, trajectory: Any, X: Any, *, k: Any, seed: Any, rule: str, of: str, loss: Any,
                 dtype: Any, memory_budget: Any, device: Any, fn: str) -> None:
        self.fn = fn
        model = _checks.check_model(fn, model)
        if not isinstance(trajectory, Trajectory):
            raise TypeError(f"{fn}: trajectory must be a pkfast.Trajectory; found {type(trajectory).__name__}")
        if isinstance(k, bool) or not isinstance(k, numbers.Integral) or k < 1:
            raise ValueError(f"{fn}: k (the sketch size, columns of each projection) must be an integer ≥ 1; "
                             f"found {k!r}")
        if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
            raise TypeError(f"{fn}: seed must be an integer; found {seed!r}")
        rule = _checks.check_choice(fn, "rule", rule, RULES)
        if rule not in SKETCH_RULES:
            raise ValueError(
                f"{fn}: rule={rule!r} cannot be sketched: the exact path kernel is asymmetric (K(x, x′) ≠ K(x′, x)), "
                "while Φ(x)·Φ(x′) is the Gram of one feature map and hence symmetric; expected rule='left' or "
                "'trapezoid' (use pkfast.gram(..., rule='exact') for the exact kernel)")
        of = _checks.check_choice(fn, "of", of, OF)
        dtype = _checks.check_dtype(fn, dtype)
        budget = _checks.check_memory_budget(fn, memory_budget)
        if device is None:
            device = next(iter(model.parameters()), torch.empty(0)).device
        elif not isinstance(device, (str, torch.device)):
            raise TypeError(f"{fn}: device must be a torch.device or a string such as 'cuda'; found "
                            f"{type(device).__name__}")
        device = torch.device(device)
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        spec = None
        if of == "loss":
            spec = _loss_spec(loss, trajectory, fn)
        elif loss is not None:
            raise ValueError(f"{fn}: loss applies to of='loss'; found of={of!r}")

        self.fm = FunctionalModel(model, trajectory, dtype=dtype, device=device, fn=fn, loss=spec)
        self.C = self.fm.probe(X, fn, "X")
        self.spec, self.k, self.seed, self.rule, self.of, self.dtype, self.device = (
            spec, int(k), int(seed), rule, of, dtype, device)
        self.terms: list[Term] = terms_for(rule, trajectory.step_sizes)
        self.budget = budget if budget is not None else default_memory_budget(device)
        self.rng = _rng_identity(device)

    @functools.cached_property
    def parts(self) -> dict[str, Any]:
        """The fingerprint's components; hashing the trajectory's weights is left until features are returned."""
        return {"model": model_fingerprint(self.fm), "trajectory": trajectory_fingerprint(self.fm.trajectory),
                "rule": self.rule, "k": self.k, "seed": self.seed, "of": self.of,
                "loss": None if self.spec is None else self.spec.to_meta(),
                "dtype": str(self.dtype).replace("torch.", ""), "rng": self.rng, "block_elems": _BLOCK_ELEMS}

    def check_samples(self, X: torch.Tensor, name: str) -> None:
        self.fm.probe(X, self.fn, name)

    def check_targets(self, y: Any, n: int, name: str) -> torch.Tensor:
        y = _checks.as_target_tensor(self.fn, name, y, n)
        self.spec.check_targets(y, self.fm.model_outputs, name, self.fn)
        return y

    def plan(self, n_samples: int) -> tuple[str, int, int]:
        """(loop order, samples per chunk, samples per vmap call) from the memory budget.

        ``"chunks"``: sample chunks outermost, each R block regenerated per chunk (needs one block of R);
        ``"terms"``: terms outermost, each R_s generated once and held whole (P·k values) while every chunk is
        projected (needs R_s, and on a non-CPU device the features of all samples). The second is chosen when
        the first needs several chunks and the second fits with not too many more (see the module docstring)."""
        C, P, k = self.C, self.fm.num_params, self.k
        s = torch.empty((), dtype=self.dtype).element_size()
        u = C * P * s  # one sample's Jacobian
        o = C * k * s  # one sample's feature accumulator
        rb = min(block_rows(k), P) * k * s  # one block of R
        vchunk = max(1, min(self.fm.default_chunk(), self.budget // (8 * u)))
        fixed = 2 * vchunk * u
        n = (self.budget - fixed - rb) // (u + o)
        if n < 1:
            need = fixed + rb + u + o
            raise ValueError(
                f"{self.fn}: memory_budget of {self.budget:,} bytes is too small; one sample needs {need:,} bytes "
                f"(its Jacobian is {u:,} bytes = outputs × trainable parameters × itemsize, its features {o:,}, "
                f"one block of the projection {rb:,}). Raise memory_budget to at least {need:,}.")
        n = min(n, n_samples)
        if n < n_samples:
            phi = 0 if self.device.type == "cpu" else n_samples * o  # on CPU the features are the result
            n_t = min(n_samples, (self.budget - fixed - P * k * s - phi) // u)
            # per chunk, "chunks" generates and reads R, "terms" only reads it; generating costs ≳ 2 reads
            if n_t >= 1 and 2 + math.ceil(n_samples / n_t) <= 3 * math.ceil(n_samples / n):
                return "terms", n_t, min(vchunk, n_t)
        return "chunks", n, min(vchunk, n)

    def features(self, X: torch.Tensor, Y: torch.Tensor | None, *, progress: bool, what: str = "X") -> PathFeatures:
        """:meth:`project` as :class:`PathFeatures`, with the fingerprint."""
        return PathFeatures(self.project(X, Y, progress=progress, what=what), k=self.k, seed=self.seed, rule=self.rule,
                            of=self.of, parts=self.parts)

    def project(self, X: torch.Tensor, Y: torch.Tensor | None, *, progress: bool, what: str = "X") -> torch.Tensor:
        """The features Φ(X), a CPU ``[N, C, k]`` tensor."""
        C, P, k = self.C, self.fm.num_params, self.k
        N = X.shape[0]
        out = torch.zeros(N, C, k, dtype=self.dtype)
        order, n, vchunk = self.plan(N)
        chunks = [(a, min(N, a + n)) for a in range(0, N, n)]
        rows = block_rows(k)
        blocks = [(p0, min(P, p0 + rows)) for p0 in range(0, P, rows)]
        log.info("%s: %s: %d samples in %d chunk(s) of ≤%d, %d terms, %d block(s) of R (P=%d, k=%d), %s outermost",
                 self.fn, what, N, len(chunks), n, len(self.terms), len(blocks), P, k, order)
        if not self.terms:
            return out
        dev = self.device
        J = torch.empty(n, C, P, dtype=self.dtype, device=dev)
        gen = torch.Generator(device=dev)
        bar = tqdm(total=len(chunks) * len(self.terms), unit="term", desc=f"{self.fn} {what} N={N} k={k}",
                   disable=not progress, leave=False)

        def project(term: Term, a: int, b: int, acc: torch.Tensor, R: torch.Tensor | None) -> None:
            """acc [b−a, C, k] += √(w/k) · J(X[a:b]; term) · R_term, block by block (R: the whole R_term, or None
            to generate each block here)."""
            (point, omega), = term.left  # symmetric rules: one point per term, ω = 1
            assert point.tau == 0.0 and omega == 1.0 and term.symmetric
            m = b - a
            Jm = self.fm.jacobian(term.left, X[a:b], out=J[:m], chunk=vchunk,
                                  Y=None if Y is None else Y[a:b]).view(m * C, P)
            A = acc.view(m * C, k)
            alpha = math.sqrt(term.weight / k)
            for bi, (p0, p1) in enumerate(blocks):
                Rb = R[p0:p1] if R is not None else projection_block(
                    self.seed, point.step, bi, p1 - p0, k, dtype=self.dtype, device=dev, generator=gen)
                A.addmm_(Jm[:, p0:p1], Rb, alpha=alpha)
            bar.update(1)

        try:
            if order == "chunks":
                acc = torch.empty(n, C, k, dtype=self.dtype, device=dev)
                for a, b in chunks:
                    acc_m = acc[: b - a].zero_()
                    for term in self.terms:
                        project(term, a, b, acc_m, None)
                    out[a:b] = acc_m.to("cpu")
            else:
                phi = out if dev.type == "cpu" else torch.zeros(N, C, k, dtype=self.dtype, device=dev)
                R = torch.empty(P, k, dtype=self.dtype, device=dev)
                for term in self.terms:
                    step = term.left[0][0].step
                    for bi, (p0, p1) in enumerate(blocks):
                        projection_block(self.seed, step, bi, p1 - p0, k, dtype=self.dtype, device=dev,
                                         generator=gen, out=R[p0:p1])
                    for a, b in chunks:
                        project(term, a, b, phi[a:b], R)
                if phi is not out:
                    out.copy_(phi)
        finally:
            bar.close()
        return out


def _targets_or_refuse(fn: str, of: str, y: Any, y2: Any, has_x2: bool) -> None:
    if of == "loss":
        if y is None or (has_x2 and y2 is None):
            raise ValueError(f"{fn}: of='loss' needs the targets: y for X" + (" and y2 for X2" if has_x2 else "")
                             + "; found None")
    elif y is not None or y2 is not None:
        raise ValueError(f"{fn}: y and y2 apply to of='loss'; found of={of!r}")


# ---------------------------------------------------------------------------------------------- public entry points
def sketch(
    model: torch.nn.Module,
    trajectory: Trajectory,
    X: torch.Tensor | np.ndarray,
    *,
    k: int = 1024,
    seed: int = 0,
    rule: str = "left",
    of: str = "output",
    loss: Any = None,
    y: Any = None,
    dtype: torch.dtype | str | None = None,
    memory_budget: int | str | None = None,
    progress: bool = True,
    device: torch.device | str | None = None,
) -> PathFeatures:
    r"""Sketched path features Φ(x) = Σ_s √w_s J_s(x) R_s ∈ R^{C×k} of the samples ``X`` (see :mod:`pkfast.sketch`).

    ``Φ(x)·Φ(x′)`` is an unbiased estimate of the path kernel of :func:`pkfast.gram` with the same ``rule``,
    ``of`` and ``loss``; an entry's standard deviation is about √((K(x,x)K(x′,x′) + K(x,x′)²)/k), and
    k ≥ 6 ln(4E/δ)/ε² bounds all E entries by ε√(K(x,x)K(x′,x′)) with probability ≥ 1 − δ
    (:func:`required_k`).

    Args:
        model, trajectory, X: as in :func:`pkfast.gram` (``X``: ``[N, *features]``).
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
        progress: a tqdm progress bar (stderr) over chunks × terms.
        device: the compute device (default: the model's).

    Returns:
        :class:`PathFeatures` with ``features`` a CPU ``[N, C, k]`` tensor.

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
    Xt = _checks.as_input_tensor(_FN, "X", X)
    _targets_or_refuse(_FN, of, y, None, False)
    job = _Sketcher(model, trajectory, Xt, k=k, seed=seed, rule=rule, of=of, loss=loss, dtype=dtype,
                    memory_budget=memory_budget, device=device, fn=_FN)
    Y = job.check_targets(y, Xt.shape[0], "y") if of == "loss" else None
    return job.features(Xt, Y, progress=progress)


def sketch_gram(
    model: torch.nn.Module,
    trajectory: Trajectory,
    X: torch.Tensor | np.ndarray,
    X2: torch.Tensor | np.ndarray | None = None,
    *,
    k: int = 1024,
    seed: int = 0,
    outputs: str = "trace",
    rule: str = "left",
    diagonal: bool = False,
    of: str = "output",
    loss: Any = None,
    y: Any = None,
    y2: Any = None,
    dtype: torch.dtype | str | None = None,
    memory_budget: int | str | None = None,
    progress: bool = True,
    device: torch.device | str | None = None,
    _fn: str = "pkfast.sketch_gram",
) -> torch.Tensor:
    """The sketched path-kernel Gram: :func:`sketch` of ``X`` (and of ``X2`` with the same projections),
    then :meth:`PathFeatures.gram`. Same shapes and meaning as :func:`pkfast.gram` (``outputs``, ``diagonal``,
    ``of``/``loss``/``y``/``y2``), an unbiased estimate of it; see :func:`sketch` for ``k``, ``seed`` and the
    error.

    >>> import torch, pkfast
    >>> from pkfast.sketch import sketch_gram
    >>> net = torch.nn.Sequential(torch.nn.Linear(3, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2))
    >>> w0 = {k: v.clone() for k, v in net.state_dict().items()}
    >>> traj = pkfast.Trajectory.from_checkpoints([w0, {k: v * 0.9 for k, v in w0.items()}], lr=0.1)
    >>> sketch_gram(net, traj, torch.randn(5, 3), torch.randn(3, 3), k=64, outputs="full", progress=False).shape
    torch.Size([5, 3, 2, 2])

    ``_fn`` (internal): the name that error messages give the caller, e.g. ``"pkfast.gram"`` when
    ``pkfast.gram(..., method="sketch")`` delegates here.
    """
    fn = _fn
    outputs = _checks.check_choice(fn, "outputs", outputs, OUTPUTS)
    if not isinstance(diagonal, bool):
        raise TypeError(f"{fn}: diagonal must be True or False; found {diagonal!r}")
    if diagonal and X2 is not None:
        raise ValueError(f"{fn}: diagonal=True computes K(x_a, x_a) over X alone; expected X2=None, found X2")
    Xt = _checks.as_input_tensor(fn, "X", X)
    X2t = None
    if X2 is not None:
        X2t = _checks.as_input_tensor(fn, "X2", X2)
        _checks.check_feature_shapes(fn, Xt, X2t)
    _targets_or_refuse(fn, of, y, y2, X2 is not None)
    job = _Sketcher(model, trajectory, Xt, k=k, seed=seed, rule=rule, of=of, loss=loss, dtype=dtype,
                    memory_budget=memory_budget, device=device, fn=fn)
    Y = job.check_targets(y, Xt.shape[0], "y") if of == "loss" else None
    Y2 = None
    if X2t is not None:
        job.check_samples(X2t, "X2")
        Y2 = job.check_targets(y2, X2t.shape[0], "y2") if of == "loss" else None
    phi = job.features(Xt, Y, progress=progress, what="X")
    other = None if X2t is None else job.features(X2t, Y2, progress=progress, what="X2")
    return phi.gram(other, outputs=outputs, diagonal=diagonal)
