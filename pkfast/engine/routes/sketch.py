"""routes.sketch: random (JL) path features Φ(x) = Σ_s √w_s J_s(x) R_s, and the route whose tiles are their
products (docs/math.md §7).

:class:`Sketcher` projects the per-sample Jacobians of each term's weight point with a Gaussian R_s generated
block by block from (seed, point, block) and never stored; :class:`SketchRoute` computes the features of the
Gram's samples once (each rank an equal slice, all-gathered) and forms each tile as Φ_rows Φ_colsᵀ on the
accumulation backend, so ``gram(method="sketch")`` is stored, resumed and shared across ranks like any Gram.
The loop order, reproducibility and error bounds are described in :mod:`pkfast.sketch`.
"""

from __future__ import annotations

import hashlib
import logging
import math
from typing import Any

import torch
from tqdm.auto import tqdm

from pkfast.engine import distributed
from pkfast.engine.capture import Capture, Groups
from pkfast.engine.costs import RouteKind, choose_projections, chunk_for, factor_bytes
from pkfast.engine.functional import FunctionalModel
from pkfast.engine.products import TileLayout
from pkfast.engine.routes.base import Combo, Data, Route, Side
from pkfast.engine.routes.kron import add_layer_features
from pkfast.engine.routes.layered import find_layers
from pkfast.engine.quadrature import EvalPoint, Term

log = logging.getLogger("pkfast")

__all__ = ["Sketcher", "SketchRoute", "projection_block", "block_rows", "BLOCK_ELEMS"]

#: A capture pass's autograd activations, as a multiple of the factors it captures (the memory plan's estimate).
ACTIVATIONS = 4
#: Random numbers per generated block of R (rows = max(1, BLOCK_ELEMS // k)): 32 MiB in float32. Fixed,
#: so the projection does not depend on the memory budget or chunking. Changing it changes every sketch.
BLOCK_ELEMS = 2**23


# ---------------------------------------------------------------------------------------------- the random projection
def block_rows(k: int) -> int:
    """Rows of R per generated block for sketch size ``k`` (fixed by k alone)."""
    return max(1, BLOCK_ELEMS // int(k))


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



# ---------------------------------------------------------------------------------------------- the sketcher
class Sketcher:
    """Projects samples to path features for validated options: the functional model, the rule's terms, k,
    seed, the projection; :meth:`project` per sample set, :attr:`parts` for the fingerprint.

    With ``projection="dense"`` (or when no layer has a rule) every parameter's Jacobian is projected by the
    Gaussian R_s block by block; otherwise each layer takes the projection :func:`~pkfast.engine.costs.
    choose_projections` gives it — Kronecker-factored from its factors, or dense from its gradient formed in the
    panel with the parameters that have no rule — learnt from the samples ``X`` (their shapes)."""

    def __init__(self, fm: FunctionalModel, terms: list[Term], *, k: int, seed: int, rule: str, of: str,
                 loss: Any, budget: int, fn: str, projection: str = "auto", X: torch.Tensor | None = None,
                 samples: int | None = None, precondition: Any = None) -> None:
        self.fn = fn
        #: a :class:`~pkfast.engine.routes.preconditioned.Preconditioner`: features of the √P_s-scaled Jacobian (dense only)
        self.pre = precondition
        self.fm, self.C, self.terms = fm, fm.num_outputs, terms
        self.spec, self.k, self.seed, self.rule, self.of = loss, int(k), int(seed), rule, of
        self.dtype, self.device = fm.dtype, fm.device
        self.budget = budget
        self.rng = _rng_identity(fm.device)
        self.projection = projection
        layers = find_layers(fm.model, fm)
        self.capture: Capture | None = None
        figures = dict(k=self.k, C=self.C, terms=len(terms), itemsize=fm.itemsize,
                       samples=samples if samples is not None else 0 if X is None else X.shape[0])
        if projection != "dense" and precondition is None and any(L.kind != "other" for L in layers) and X is not None:
            cap = Capture(fm, layers)
            layers = cap.discover(X)
            self.choices, self.ranks = choose_projections(layers, projection=projection, **figures)
            self.groups = Groups.of(fm, self.choices)
            self.capture = cap if self.groups.hooked else None
        else:
            self.choices, self.ranks = choose_projections(layers, projection="dense", **figures)
            self.groups = Groups()

    @property
    def dense_width(self) -> int:
        """Columns projected densely per output: every parameter, or the capture's panel."""
        return self.fm.num_params if self.capture is None else self.groups.panel_width

    def describe(self) -> str:
        """The projection of each parameter group, one line (the plan, the fingerprint)."""
        if self.capture is None:
            pre = "" if self.pre is None else ", preconditioned (√P_s-scaled Jacobian: a diagonal P breaks the " \
                                              "Kronecker factorisation)"
            return f"dense: all {self.fm.num_params:,} parameters{pre}"
        kron = [c.name for c in self.choices if c.route is RouteKind.KRONECKER]
        dense = [c.name or "(root)" for c in self.choices if c.route in (RouteKind.DENSE, RouteKind.JACOBIAN)]
        parts = []
        if kron:
            parts.append(f"kronecker {self.ranks[0]}×{self.ranks[1]}: {', '.join(kron)}")
        parts.append(f"dense: {', '.join(dense) if dense else 'none'}")
        return "; ".join(parts)

    @property
    def parts(self) -> dict[str, Any]:
        """The fingerprint's components (hashing the trajectory's weights is left until features are returned).
        The all-dense projection has no ``projection`` part: its features are those of earlier versions."""
        out = {"model": self.fm.fingerprint(), "trajectory": self.fm.trajectory.fingerprint(),
               "rule": self.rule, "k": self.k, "seed": self.seed, "of": self.of,
               "loss": None if self.spec is None else self.spec.to_meta(),
               "dtype": str(self.dtype).replace("torch.", ""), "rng": self.rng, "block_elems": BLOCK_ELEMS}
        if self.capture is not None:
            out["projection"] = self.describe()
        if self.pre is not None:
            out["preconditioner"] = "recorded"
        return out

    def _sample_bytes(self) -> tuple[int, int]:
        """(bytes per sample of the dense side — a Jacobian or panel row, bytes of factors and Kronecker
        temporaries per sample)."""
        s = self.fm.itemsize
        u = self.C * self.dense_width * s
        if self.capture is None:
            return u, 0
        f = sum(factor_bytes(L, self.C, s) for L in self.groups.with_factors)
        if self.ranks is not None:
            f += max((L.positions * (self.ranks[0] + self.C * self.ranks[1]) for L in self.groups.factorized),
                     default=0) * s
        return u, f

    def schedule(self, n_samples: int) -> tuple[str, int, int]:
        """(loop order, samples per chunk, samples per vmap call) from the memory budget.

        ``"chunks"``: sample chunks outermost, each R block regenerated per chunk (needs one block of R);
        ``"terms"``: terms outermost, each R_s generated once and held whole (P·k values) while every chunk is
        projected (needs R_s, and on a non-CPU device the features of all samples). The second is chosen when
        the first needs several chunks and the second fits with not too many more (see the module docstring).
        P is the densely projected width (all parameters, or the panel of those without a Kronecker projection)."""
        C, P, k = self.C, self.dense_width, self.k
        s = self.fm.itemsize
        u, f = self._sample_bytes()
        o = C * k * s  # one sample's feature accumulator
        rb = min(block_rows(k), P) * k * s  # one block of R
        if self.capture is None:
            vchunk = max(1, min(self.fm.default_chunk(), self.budget // (8 * u)))
            fixed = 2 * vchunk * u
        else:
            # factors live for one pass of vchunk samples; the pass's own activations are taken as ACTIVATIONS× them
            per = u + ACTIVATIONS * f
            vchunk = max(1, min(chunk_for(per), self.budget // (8 * max(1, per))))
            fixed = vchunk * (u + per)
        n = (self.budget - fixed - rb) // (u + o)
        if n < 1:
            need = fixed + rb + u + o
            raise ValueError(
                f"{self.fn}: memory_budget of {self.budget:,} bytes is too small; one sample needs {need:,} bytes "
                f"(its Jacobian is {u:,} bytes = outputs × densely projected parameters × itemsize, its factors "
                f"{f:,}, its features {o:,}, one block of the projection {rb:,}). Raise memory_budget to at least "
                f"{need:,}.")
        n = min(n, n_samples)
        if n < n_samples and P:
            phi = 0 if self.device.type == "cpu" else n_samples * o  # on CPU the features are the result
            n_t = min(n_samples, (self.budget - fixed - P * k * s - phi) // u)
            # per chunk, "chunks" generates and reads R, "terms" only reads it; generating costs ≳ 2 reads
            if n_t >= 1 and 2 + math.ceil(n_samples / n_t) <= 3 * math.ceil(n_samples / n):
                return "terms", n_t, min(vchunk, n_t)
        return "chunks", n, min(vchunk, n)

    def project(self, X: torch.Tensor, Y: torch.Tensor | None, *, progress: bool, what: str = "X") -> torch.Tensor:
        """The features Φ(X), a CPU ``[N, C, k]`` tensor."""
        C, P, k, cap = self.C, self.dense_width, self.k, self.capture
        N = X.shape[0]
        out = torch.zeros(N, C, k, dtype=self.dtype)
        order, n, vchunk = self.schedule(N)
        chunks = [(a, min(N, a + n)) for a in range(0, N, n)]
        rows = block_rows(k)
        blocks = [(p0, min(P, p0 + rows)) for p0 in range(0, P, rows)]
        log.info("%s: %s: %d samples in %d chunk(s) of ≤%d, %d terms, %d block(s) of R (P=%d, k=%d), %s outermost; "
                 "%s", self.fn, what, N, len(chunks), n, len(self.terms), len(blocks), P, k, order, self.describe())
        if not self.terms:
            return out
        dev = self.device
        J = torch.empty(n, C, P, dtype=self.dtype, device=dev) if P else None
        gen = torch.Generator(device=dev)
        bar = tqdm(total=len(chunks) * len(self.terms), unit="term", desc=f"{self.fn} {what} N={N} k={k}",
                   disable=not progress, leave=False)

        def project(term: Term, a: int, b: int, acc: torch.Tensor, R: torch.Tensor | None) -> None:
            """acc [b−a, C, k] += √(w/k) · (J(X[a:b]; term) · R_term + the Kronecker layers' features), the dense
            part block by block (R: the whole R_term, or None to generate each block here)."""
            (point, omega), = term.left  # symmetric rules: one point per term, ω = 1
            assert point.tau == 0.0 and omega == 1.0 and term.symmetric
            m = b - a
            y = None if Y is None else Y[a:b]
            alpha = math.sqrt(term.weight / k)
            if cap is None:
                Jm = self.fm.jacobian(term.left, X[a:b], out=J[:m], chunk=vchunk, Y=y)
                if self.pre is not None:
                    Jm.mul_(self.pre.scale(term.left))
            else:
                Jm = None if J is None else J[:m]
                for s0 in range(0, m, vchunk):  # one pass's factors at a time: projected, then dropped
                    s1 = min(m, s0 + vchunk)
                    feats = cap.evaluate(self.groups, point, X[a + s0:a + s1], None if y is None else y[s0:s1], vchunk,
                                         None if Jm is None else Jm[s0:s1])
                    for L in self.groups.factorized:
                        add_layer_features(acc[s0:s1], L, feats[L.name], self.ranks, alpha, seed=self.seed,
                                           point=point.step, generator=gen)
                    del feats
            if P:
                Jm = Jm.view(m * C, P)
                A = acc.view(m * C, k)
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


# ---------------------------------------------------------------------------------------------- the route
#: The one evaluation "point" of the sketch route's single term: the features of a sample set.
FEATURES = EvalPoint(-1)


class SketchRoute(Route):
    """Tiles as products of features Φ computed once in :meth:`begin` (kept on the host)."""

    method = "sketch"
    row_reuse = False

    def __init__(self, layout: TileLayout, sketcher: Sketcher, data_samples: int) -> None:
        super().__init__(layout)
        self.sk = sketcher
        u = layout.num_outputs * sketcher.k * sketcher.fm.itemsize
        self.bytes_per_sample = u
        self.chunk = 1  # no vmap chunks: the tiles read features
        # the features stay on the host for the whole run; on another device they are not in its budget
        self.reserved = data_samples * u if sketcher.device.type != "cpu" else 0
        self._phi: dict[str, torch.Tensor] = {}

    def terms(self, terms: list[Term]) -> list[Term]:
        return [Term(1.0, ((FEATURES, 1.0),))] if terms else []

    def summary(self) -> str:
        return f"sketch: k={self.sk.k}, seed={self.sk.seed} ({len(self.sk.terms)} terms projected)"

    def passes(self) -> str:
        line = f"projection: {self.sk.describe()}"
        return line if self.sk.capture is None else f"{line}\n{self.sk.capture.describe(self.sk.groups)}"

    def record(self) -> dict[str, Any]:
        return {"summary": self.summary(), "rng": self.sk.rng, "projection": self.sk.parts.get("projection")}

    def begin(self, data: Data, row_block: int, col_block: int, chunk: int, progress: bool) -> None:
        sk = self.sk

        def feats(X: torch.Tensor, Y: torch.Tensor | None, what: str) -> torch.Tensor:
            return distributed.gather_rows(
                lambda a, b: sk.project(X[a:b], None if Y is None else Y[a:b], progress=progress, what=what),
                X.shape[0], (self.layout.num_outputs, sk.k), sk.dtype, sk.device)

        self._phi = {"rows": feats(data.X, data.Y, "X")}
        self._phi["cols"] = self._phi["rows"] if data.X2 is None else feats(data.X2, data.Y2, "X2")

    def side(self, combo: Combo, X: torch.Tensor, Y: torch.Tensor | None, slot: str, rows: slice,
             tick: Any = None) -> Side:
        return Side(X.shape[0], self._phi[slot][rows].to(self.sk.device))

    def product(self, acc: torch.Tensor, left: Side, right: Side, weight: float, same: bool) -> None:
        self.layout.panel_product(acc, left.panel, right.panel, weight, same)

    def end(self) -> None:
        self._phi = {}
