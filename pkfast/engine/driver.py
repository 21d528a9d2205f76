"""driver: a Gram computation built once (validated data, functional model, kernel terms, route, tile plan) and
run by one loop for every route and every destination.

    plan tiles → for each tile: for each term, the route forms the rows' side and the columns' side and adds
    their product into the tile's accumulator → finish the tile → hand it to a sink

Tiles are the outermost loop and the terms (steps) the innermost, so a tile is finished — and can be stored —
before the next one starts. With one term, a tile-row's side is kept for the next tile of the same rows
(:func:`pkfast.engine.tiles.plan_tiles` plans for it).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any

import torch
from tqdm.auto import tqdm

from pkfast import _checks

from pkfast.store import formats

from pkfast.engine import inputs
from pkfast.engine.alloc import reuse_freed_memory
from pkfast.engine.accumulate import select_backend
from pkfast.engine.functional import FunctionalModel
from pkfast.layers.base import Layer
from pkfast.options import Options, model_device, stream_bytes
from pkfast.engine.products import Layout
from pkfast.engine.routes.base import Data, Route
from pkfast.engine.routes.jacobian import JacobianRoute
from pkfast.engine.routes.layered import LayeredRoute, choose, find_layers
from pkfast.engine.routes.sketch import Sketcher, SketchRoute
from pkfast.engine.quadrature import Term, is_symmetric, terms_for
from pkfast.store.sinks import MemorySink, Sink
from pkfast.engine.tiles import Tile, TilePlan, plan_diagonal, plan_tiles
from pkfast.trajectory.points import Trajectory

__all__ = ["GramJob", "check_data", "check_model_and_trajectory"]

log = logging.getLogger("pkfast")


def check_model_and_trajectory(fn: str, model: Any, trajectory: Any) -> torch.nn.Module:
    model = _checks.check_model(fn, model)
    if not isinstance(trajectory, Trajectory):
        raise TypeError(f"{fn}: trajectory must be a pkfast.Trajectory; found {type(trajectory).__name__}")
    return model


def check_data(fn: str, opts: Options, X: Any, X2: Any = None, y: Any = None, y2: Any = None) -> Data:
    """The samples (and, for ``of="loss"``, their targets) as tensors, checked against each other and the options."""
    if opts.diagonal and X2 is not None:
        raise ValueError(f"{fn}: diagonal=True computes K(x_a, x_a) over X alone; expected X2=None, found X2")
    X, layout = inputs.pack(fn, "X", X)
    if X2 is not None:
        if layout is None and inputs.is_structured(X2):
            raise TypeError(f"{fn}: X2 is a {type(X2).__name__} of arrays while X is one array; expected the same "
                            "structure")
        X2, _ = inputs.pack(fn, "X2", X2, layout)
        _checks.check_feature_shapes(fn, X, X2)
    if opts.of == "loss":
        if y is None or (X2 is not None and y2 is None):
            raise ValueError(f"{fn}: of='loss' needs the targets: y for X" + (" and y2 for X2" if X2 is not None else "")
                             + "; found None")
        y = _checks.as_target_tensor(fn, "y", y, X.shape[0])
        y2 = _checks.as_target_tensor(fn, "y2", y2, X2.shape[0]) if X2 is not None else None
    elif y is not None or y2 is not None:
        raise ValueError(f"{fn}: y and y2 apply to of='loss'; found of={opts.of!r}")
    return Data(X, X2, y, y2, layout)


def functional_model(fn: str, model: torch.nn.Module, trajectory: Trajectory, opts: Options, data: Data,
                     device: torch.device) -> FunctionalModel:
    """The model as a function of its trainable parameters, probed on X (and X2) to learn C; targets checked."""
    fm = FunctionalModel(model, trajectory, dtype=opts.dtype, device=device, fn=fn, loss=opts.loss,
                         layout=data.layout, output_fn=opts.output_fn)
    fm.probe(data.X, fn, "X")
    if data.X2 is not None:
        fm.probe(data.X2, fn, "X2")
    if opts.loss is not None:
        opts.loss.check_targets(data.Y, fm.model_outputs, "y", fn)
        if data.Y2 is not None:
            opts.loss.check_targets(data.Y2, fm.model_outputs, "y2", fn)
        fm.check_loss_function(data.X, data.Y, fn)
    return fm


@dataclass
class GramJob:
    """A validated Gram computation: options, samples, the functional model, the terms, the route and the plan."""

    opts: Options
    fm: FunctionalModel
    data: Data
    layout: Layout
    rule_terms: list[Term]
    route: Route
    plan: TilePlan
    layers: list[Layer]

    def __post_init__(self) -> None:
        self._acc: torch.Tensor | None = None  # the accumulator every tile of a run takes a prefix of
        self._left: Any = None                 # the rows' side kept for the next tile of the same rows
        self._rows_key: tuple[int, int] | None = None

    # ------------------------------------------------------------------ construction
    @classmethod
    def create(cls, model: Any, trajectory: Any, X: Any, X2: Any = None, *, y: Any = None, y2: Any = None,
               fn: str = "pkfast.gram", **options: Any) -> "GramJob":
        model = check_model_and_trajectory(fn, model, trajectory)
        opts = Options.check(fn, trajectory=trajectory, **options)
        data = check_data(fn, opts, X, X2, y, y2)
        device = model_device(model)
        budget = opts.budget(device)
        fm = functional_model(fn, model, trajectory, opts, data, device)
        terms = terms_for(opts.rule, trajectory.step_sizes, opts.nodes)
        N = data.X.shape[0]
        M = N if data.X2 is None else data.X2.shape[0]
        if not is_symmetric(terms) and data.X2 is None and not opts.diagonal:
            log.info("%s: rule=%r is asymmetric: computing every tile of the %d×%d Gram (no mirroring)", fn, opts.rule,
                     N, N)
        backend = select_backend(opts.backend, device, precision=opts.precision, fn=fn)
        layout = Layout(opts.outputs, opts.diagonal, fm.num_outputs, backend, opts.precision)
        symmetric = data.X2 is None and is_symmetric(terms)
        samples = N + (0 if opts.diagonal else M)
        if opts.method == "sketch":
            sk = Sketcher(fm, terms, k=1024 if opts.k is None else opts.k, seed=0 if opts.seed is None else opts.seed,
                          rule=opts.rule, of=opts.of, loss=opts.loss, budget=budget, fn=fn,
                          projection=opts.projection, X=data.X, samples=N + (0 if data.X2 is None else M))
            route: Route = SketchRoute(layout, sk, N + (0 if data.X2 is None else M))
            job = cls(opts, fm, data, layout, terms, route, None, sk.layers)  # type: ignore[arg-type]
            job.plan = job._plan_tiles(budget, symmetric)
            return job
        layers = find_layers(model, fm)
        pairs = N if opts.diagonal else (N * (N + 1) / 2 if symmetric else N * M)
        nodes = max((len(t.left) for t in terms), default=1)
        figures = dict(pairs=pairs * nodes, terms=len(terms))
        jacobian = JacobianRoute(layout, fm, requested=opts.method, layers=layers)
        job = cls(opts, fm, data, layout, terms, jacobian, None, layers)  # type: ignore[arg-type]
        if opts.method == "jacobian":
            choose(layers, method="jacobian", C=fm.num_outputs, full=layout.full, samples=samples,
                   itemsize=fm.itemsize, **figures)
            job.plan = job._plan_tiles(budget, symmetric)
            return job
        layered = LayeredRoute(layout, fm, layers, data.X)

        def fit(samples: float) -> None:
            """Choose each layer's route for ``samples`` panel rows per term, then plan the tiles."""
            layered.refit(method=opts.method, samples=samples, nodes=nodes, stream_budget=stream_bytes(budget),
                          pairs=pairs * nodes, terms=len(terms))
            # nothing routed: the plain Jacobian route does the same, without the capture machinery
            job.route = layered if layered.routed else jacobian
            job.plan = job._plan_tiles(budget, symmetric)

        fit(samples)
        if layered.routed and len(job.plan.tiles) > 1:
            # the tile shape sets how often each sample's side is formed: re-choose once with that count
            fit(sum(t.shape[0] + (0 if (t.diagonal or opts.diagonal) else t.shape[1]) for t in job.plan.tiles))
        return job

    def _plan_tiles(self, budget: int, symmetric: bool) -> TilePlan:
        r, lay, fn = self.route, self.layout, self.opts.fn
        N = self.data.X.shape[0]
        block = lay.num_outputs ** 2 if lay.full else 1
        acc = block * self.fm.itemsize * r.acc_multiplier
        if lay.diagonal:
            plan = plan_diagonal(N, bytes_per_sample=r.bytes_per_sample, acc_bytes_per_sample=acc, budget=budget,
                                 chunk=r.chunk, fn=fn, reserved=r.reserved)
        else:
            M = N if self.data.X2 is None else self.data.X2.shape[0]
            reuse = len(r.terms(self.rule_terms)) == 1 and r.row_reuse
            plan = plan_tiles(N, M, symmetric=symmetric, bytes_per_sample=r.bytes_per_sample, acc_bytes_per_pair=acc,
                              budget=budget, chunk=r.chunk, fn=fn, reuse_rows=reuse, reserved=r.reserved)
        return plan

    # ------------------------------------------------------------------ what it is
    @property
    def X(self) -> torch.Tensor:
        return self.data.X

    @property
    def X2(self) -> torch.Tensor | None:
        return self.data.X2

    @property
    def num_outputs(self) -> int:
        return self.layout.num_outputs

    @property
    def dtype(self) -> torch.dtype:
        return self.opts.dtype

    @property
    def backend(self) -> str:
        return self.layout.backend

    @property
    def terms(self) -> list[Term]:
        """The terms the tile loop runs (the rule's, or the sketch's one product of features)."""
        return self.route.terms(self.rule_terms)

    @property
    def method(self) -> str:
        """The resolved route: "jacobian", "factorized" (some layer factorised), "materialized" or "sketch"."""
        return self.route.label

    @property
    def result_shape(self) -> tuple[int, ...]:
        N, C = self.data.X.shape[0], self.num_outputs
        block = (C, C) if self.layout.full else ()
        if self.layout.diagonal:
            return (N, *block)
        M = N if self.data.X2 is None else self.data.X2.shape[0]
        return (N, M, *block)

    def flops(self) -> float:
        """Multiply-add FLOPs of the Gram products on the Jacobian route: 2·rows·cols·K per term and tile."""
        C, P, full = self.num_outputs, self.fm.num_params, self.layout.full
        k = P if full else C * P
        rowmul = C if full else 1
        if self.layout.diagonal:
            return 2.0 * self.data.X.shape[0] * C * (C if full else 1) * P * len(self.terms)
        return sum(2.0 * (t.shape[0] * rowmul) * (t.shape[1] * rowmul) * k for t in self.plan.tiles) * len(self.terms)

    def record(self) -> dict[str, Any]:
        """The options a stored result records (all that change its numbers, the routes used among them)."""
        return dict(self.opts.record(), backend=self.layout.backend, device=self.fm.device.type,
                    symmetric=self.plan.symmetric, **self.route.record())

    def fingerprints(self) -> dict[str, str]:
        """Digests of what the result depends on: model, trajectory, X (with y), X2 (with y2), options."""
        d = self.data
        return {"model": self.fm.fingerprint(), "trajectory": self.fm.trajectory.fingerprint(),
                "X": formats.digest(d.X) if d.Y is None else formats.digest(d.X, d.Y),
                "X2": "none" if d.X2 is None else formats.digest(d.X2) if d.Y2 is None else formats.digest(d.X2, d.Y2),
                "options": formats.digest(sorted(self.record().items()))}

    def describe(self) -> str:
        N = self.data.X.shape[0]
        M = N if self.data.X2 is None else self.data.X2.shape[0]
        return f"{self.opts.fn} {'diag ' if self.layout.diagonal else ''}{N}×{1 if self.layout.diagonal else M}, " \
               f"{len(self.terms)} terms"

    # ------------------------------------------------------------------ the loop
    def run(self, sink: Sink | None = None, *, progress: bool = True) -> Any:
        """Compute the tiles the sink asks for, hand each to it when finished, and return its result (default:
        the Gram in memory, a CPU tensor)."""
        sink = sink or MemorySink(self.result_shape, self.dtype, self.layout.diagonal)
        try:
            self.plan, mine, pending = sink.open(self.plan)
            terms = self.terms
            pairs = sum(t.shape[0] if self.layout.diagonal else t.shape[0] * t.shape[1] for t in mine) * len(terms)
            bar = tqdm(total=pairs, unit="pair", unit_scale=True, desc=self.describe(), disable=not progress,
                       leave=False)
            dev = self.fm.device
            with reuse_freed_memory(dev.type == "cpu"):
                if pending and terms:
                    needs_cols = not all(t.diagonal or self.layout.diagonal for t in self.plan.tiles) \
                        or not is_symmetric(terms)
                    self.route.chunk = self.plan.chunk
                    self.route.begin(self.data, self.plan.row_block, self.plan.col_block if needs_cols else 0, progress)
                most = max((self.layout.acc_numel(t) for t in mine), default=0)
                # one accumulator for every tile (each takes a contiguous prefix): a fresh tile-sized allocation per
                # tile would leave the allocator holding freed blocks of other sizes, past the memory budget
                self._acc = torch.empty(most, dtype=self.dtype, device=dev)
                self._rows_key = None
                try:
                    for tile in mine:
                        acc = self.compute_tile(tile, bar)
                        block, mirror = self.layout.finish(tile, acc, mirrored=self.plan.symmetric)
                        del acc
                        sink.write(tile, block, mirror)
                        del block, mirror
                finally:
                    bar.close()
                    self.route.end()
                    self._acc = self._left = None
        finally:
            sink.close()
        return sink.result()

    def compute_tile(self, tile: Tile, bar: Any = None) -> torch.Tensor:
        """Σ over terms of weight · ⟨rows' side, columns' side⟩ for this tile, as the accumulator (on the compute
        device; a view of the shared buffer, valid until the next tile starts)."""
        shape = self.layout.acc_shape(tile)
        acc = self._acc[: math.prod(shape)].view(shape).zero_()
        d, r, diag = self.data, self.route, self.layout.diagonal
        Xr, Yr = d.X[tile.rows], None if d.Y is None else d.Y[tile.rows]
        Xc, Yc = d.cols[tile.cols], None if d.Y is None else d.cols_y[tile.cols]
        terms = self.terms
        for term in terms:
            key = (tile.rows.start, tile.rows.stop) if len(terms) == 1 and r.row_reuse else None
            form_left = key is None or key != self._rows_key
            same = (tile.diagonal or diag) and term.symmetric
            progress = _TermProgress(bar, tile.shape[0] if diag else tile.shape[0] * tile.shape[1],
                                     (tile.shape[0] * len(term.left) if form_left else 0)
                                     + (0 if same else tile.shape[1] * len(term.right_combo)))
            if form_left:
                self._left = r.side(term.left, Xr, Yr, "rows", tile.rows, tick=progress.tick)
                self._rows_key = key
            left = self._left
            right = left if same else r.side(term.right_combo, Xc, Yc, "cols", tile.cols, tick=progress.tick)
            r.product(acc, left, right, term.weight, same)
            progress.done()
        return acc


class _TermProgress:
    """Moves the bar by one term's kernel entries: half of them as the term's sides are formed (per chunk of
    samples, so a long tile moves), the rest when their product is added."""

    def __init__(self, bar: Any, entries: int, samples: int) -> None:
        self.bar, self.entries, self.samples = bar, entries, samples
        self.shown = 0.0

    def tick(self, n: int) -> None:
        if self.bar is not None and self.samples:
            step = 0.5 * self.entries * n / self.samples
            self.bar.update(step)
            self.shown += step

    def done(self) -> None:
        if self.bar is not None:
            self.bar.update(self.entries - self.shown)

