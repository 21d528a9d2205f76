"""driver: a Gram computation built once (validated data, functional model, kernel terms, route, tiling) and
run by one loop for every route and every destination.

    plan tiles → for each tile: for each term, the route forms the rows' side and the columns' side and adds
    their product into the tile's accumulator → finish the tile → hand it to a sink

Tiles are the outermost loop and the terms (steps) the innermost, so a tile is finished — and can be stored —
before the next one starts. With one term, a tile-row's side is kept for the next tile of the same rows
(:func:`pkfast.engine.tiles.solve_tiling` plans for it).
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
from pkfast.engine.resources.alloc import reuse_freed_memory
from pkfast.engine.accumulate import select_backend
from pkfast.engine.functional import FunctionalModel
from pkfast.engine.capture import Capture
from pkfast.engine.capture.dispatch import CallsChanged
from pkfast.engine.costs import LayerChoice, choose_routes
from pkfast.options import Options, model_device, stream_bytes
from pkfast.engine.products import TileLayout, symmetrize_upper_
from pkfast.engine.routes.base import Data, Route
from pkfast.engine.routes.jacobian import JacobianRoute
from pkfast.engine.routes.layered import LayeredRoute, find_layers
from pkfast.engine.routes.sketch import Sketcher, SketchRoute
from pkfast.engine.quadrature import Term, is_symmetric, single_point_terms, terms_for
from pkfast.engine.output_sketch import (PILOT_R, PILOT_SAMPLES, OutputProjection, OutputSketch,
                                         directions_for_target)
from pkfast.engine.routes.preconditioned import (PreconditionedLayeredRoute, PreconditionedRoute, preconditioned_choices,
                                        preconditioner_for)
from pkfast.store.sinks import MemorySink, Sink
from pkfast.engine.resources.meter import MEASURE_SAMPLES, PassCost, pass_cost
from pkfast.engine.resources.threads import ThreadPolicy
from pkfast.layers.head import HeadBlocks, collapse, resolve_head
from pkfast.layers.tied import TiedCross
from pkfast.engine.tiles import BudgetTooSmall, Tile, Tiling, solve_diagonal, solve_tiling
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
    X, packing = inputs.pack(fn, "X", X)
    if X2 is not None:
        if packing is None and inputs.is_structured(X2):
            raise TypeError(f"{fn}: X2 is a {type(X2).__name__} of arrays while X is one array; expected the same "
                            "structure")
        X2, _ = inputs.pack(fn, "X2", X2, packing)
        _checks.check_feature_shapes(fn, X, X2)
    if opts.of == "loss":
        if y is None or (X2 is not None and y2 is None):
            raise ValueError(f"{fn}: of='loss' needs the targets: y for X" + (" and y2 for X2" if X2 is not None else "")
                             + "; found None")
        y = _checks.as_target_tensor(fn, "y", y, X.shape[0])
        y2 = _checks.as_target_tensor(fn, "y2", y2, X2.shape[0]) if X2 is not None else None
    elif y is not None or y2 is not None:
        raise ValueError(f"{fn}: y and y2 apply to of='loss'; found of={opts.of!r}")
    return Data(X, X2, y, y2, packing)


def functional_model(fn: str, model: torch.nn.Module, trajectory: Trajectory, opts: Options, data: Data,
                     device: torch.device) -> FunctionalModel:
    """The model as a function of its trainable parameters, probed on X (and X2) to learn C; targets checked."""
    fm = FunctionalModel(model, trajectory, dtype=opts.dtype, device=device, fn=fn, loss=opts.loss,
                         packing=data.packing, output_fn=opts.output_fn)
    fm.probe(data.X, fn, "X")
    if data.X2 is not None:
        fm.probe(data.X2, fn, "X2")
    if opts.loss is not None:
        opts.loss.check_targets(data.Y, fm.model_outputs, "y", fn)
        if data.Y2 is not None:
            opts.loss.check_targets(data.Y2, fm.model_outputs, "y2", fn)
        fm.check_loss_function(data.X, data.Y, fn)
    return fm


@dataclass(frozen=True)
class _Geometry:
    """The Gram's shape and budget: what the tiling is solved for."""

    N: int
    M: int
    symmetric: bool
    diagonal: bool
    budget: int
    fn: str

    @property
    def samples(self) -> int:
        """Jacobian rows formed per term with one tile: rows, and columns unless diagonal."""
        return self.N + (0 if self.diagonal else self.M)

    @property
    def pairs(self) -> float:
        """Kernel entries per term."""
        N, M = self.N, self.M
        return N if self.diagonal else (N * (N + 1) / 2 if self.symmetric else N * M)

    def tiling(self, route: Route, layout: TileLayout, fm: FunctionalModel, terms: tuple[Term, ...],
               cost: PassCost | None = None) -> Tiling:
        """The tiles for ``route``'s planning figures within the budget (``cost``: its measured pass). Where no
        tile fits, :func:`pkfast.plan` gets a tiling without tiles whose ``problem`` says so (every other caller
        gets the error)."""
        try:
            return self._solve(route, layout, fm, terms, cost)
        except BudgetTooSmall as e:
            if self.fn != "pkfast.plan":
                cheaper = "of='loss' (one output per sample), " if fm.num_outputs > 1 else ""
                raise BudgetTooSmall(f"{e} Or compute a cheaper kernel: {cheaper}method='sketch' with k=; "
                                     "pkfast.plan(...) with the same arguments prints which layers take the memory",
                                     e.need, e.chunk, e.bytes_per_sample, e.held) from None
            return Tiling(self.N, self.M, 0, 0, self.symmetric, e.chunk, e.bytes_per_sample, e.need, self.budget,
                          [], e.held, problem=str(e))

    def _solve(self, route: Route, layout: TileLayout, fm: FunctionalModel, terms: tuple[Term, ...],
               cost: PassCost | None) -> Tiling:
        acc = layout.block_numel() * fm.itemsize * route.acc_multiplier
        if layout.diagonal:
            return solve_diagonal(self.N, bytes_per_sample=route.bytes_per_sample, acc_bytes_per_sample=acc,
                                 budget=self.budget, chunk=route.chunk, fn=self.fn, reserved=route.reserved,
                                 pass_cost=cost)
        reuse = len(route.terms(list(terms))) == 1 and route.row_reuse
        return solve_tiling(self.N, self.M, symmetric=self.symmetric, bytes_per_sample=route.bytes_per_sample,
                          acc_bytes_per_pair=acc, budget=self.budget, chunk=route.chunk, fn=self.fn,
                          reuse_rows=reuse, reserved=route.reserved, pass_cost=cost)


def _measured(route: Route, data: Data, terms: tuple[Term, ...], costs: dict, budget: int) -> PassCost | None:
    """The route's pass, measured once per set of layer routes (:func:`pkfast.engine.resources.meter.pass_cost`) at the
    first term's first evaluation point; None (the tiling then estimates it) if the measurement fails."""
    key = repr(route.record())
    m = min(MEASURE_SAMPLES, data.X.shape[0])
    if key not in costs and 2 * m * route.bytes_per_sample > budget:
        log.info("pkfast: not measuring the per-sample pass: %d samples' panels alone exceed the budget", m)
        costs[key] = None
    if key not in costs:
        try:
            costs[key] = pass_cost(route, data, terms[0].left[0][0])
        except Exception as e:  # noqa: BLE001 — an op the meter cannot follow: plan without the measurement
            log.info("pkfast: the per-sample pass's memory could not be measured (%s: %s); estimating it",
                     type(e).__name__, e)
            costs[key] = None
    return costs[key]


def _choose_routes(opts: Options, fm: FunctionalModel, data: Data, layout: TileLayout, terms: tuple[Term, ...],
                   geo: _Geometry) -> tuple[Route, Tiling, tuple[LayerChoice, ...]]:
    """Each layer's route by the cost model, the route built from them and its tiling. The tile shape sets how
    often each sample's side is formed, so with several tiles the routes are chosen once more for that count."""
    layers = find_layers(fm.model, fm)
    nodes = max((len(t.left) for t in terms), default=1)
    figures = dict(C=fm.num_outputs, full=layout.full, pairs=geo.pairs * nodes, terms=len(terms), itemsize=fm.itemsize)
    costs: dict = {}
    # a recorded preconditioner: every layer materialised (a diagonal P breaks the factorisation), columns scaled
    pre = preconditioner_for(opts.preconditioner, fm, opts.rule, opts.fn)
    method = "materialized" if pre is not None and opts.method != "jacobian" else opts.method

    def jacobian_route(choices: tuple[LayerChoice, ...]) -> Route:
        if pre is None:
            return JacobianRoute(layout, fm, requested=opts.method, choices=choices)
        return PreconditionedRoute(layout, fm, pre, requested=opts.method, choices=choices)

    if opts.method == "jacobian":
        choices = choose_routes(layers, method="jacobian", samples=geo.samples, **figures)
        route = jacobian_route(choices)
        return route, geo.tiling(route, layout, fm, terms, _measured(route, data, terms, costs, geo.budget)), choices
    capture = Capture(fm, layers)
    layers = list(capture.discover(data.X))

    def fit(samples: float) -> tuple[Route, Tiling, tuple[LayerChoice, ...]]:
        choices = choose_routes(layers, method=method, samples=samples, **figures)
        if pre is not None:
            choices = preconditioned_choices(choices)
        kw = dict(requested=opts.method, nodes=nodes, stream_budget=stream_bytes(geo.budget))
        if any(c.route.hooked for c in choices):
            route: Route = LayeredRoute(layout, fm, capture, choices, **kw) if pre is None else \
                PreconditionedLayeredRoute(layout, fm, capture, choices, pre=pre, **kw)
        else:  # nothing routed: the plain Jacobian route does the same, without the capture machinery
            route = jacobian_route(choices)
        return route, geo.tiling(route, layout, fm, terms, _measured(route, data, terms, costs, geo.budget)), choices

    route, tiling, choices = fit(geo.samples)
    if isinstance(route, LayeredRoute) and len(tiling.tiles) > 1:
        route, tiling, choices = fit(sum(t.shape[0] + (0 if (t.diagonal or geo.diagonal) else t.shape[1])
                                         for t in tiling.tiles))
    return route, tiling, choices


@dataclass(frozen=True)
class GramJob:
    """A Gram computation planned once and frozen: options, samples, the functional model, the quadrature's
    terms, each layer's route (:class:`~pkfast.engine.costs.LayerChoice`), the route built from them and the
    tiling; :meth:`run` is the one tile loop."""

    opts: Options
    fm: FunctionalModel
    data: Data
    layout: TileLayout
    quadrature_terms: tuple[Term, ...]
    route: Route
    tiling: Tiling
    choices: tuple[LayerChoice, ...]
    #: a collapsed head's full blocks (``outputs="full"`` through a head), expanded per term; else None
    blocks: HeadBlocks | None = None
    #: a tied head's cross term between its lookup and itself (:mod:`pkfast.layers.tied`); else None
    tied: TiedCross | None = None

    # ------------------------------------------------------------------ planning
    @classmethod
    def create(cls, model: Any, trajectory: Any, X: Any, X2: Any = None, *, y: Any = None, y2: Any = None,
               fn: str = "pkfast.gram", **options: Any) -> "GramJob":
        """Validate everything, choose every layer's route and the tiles, and build the route once."""
        model = check_model_and_trajectory(fn, model, trajectory)
        options.setdefault("preconditioner", "auto")  # (the recorded one where the trajectory has it)
        sk = OutputSketch.of(options.get("outputs"))
        if sk is not None and sk.target is not None:
            options["outputs"] = _pilot(cls, model, trajectory, X, sk, fn, options)
        opts = Options.check(fn, trajectory=trajectory, **options)
        data = check_data(fn, opts, X, X2, y, y2)
        device = model_device(model)
        budget = opts.budget(device)
        head = resolve_head(fn, model, opts, data.X, data.packing)
        fm = functional_model(fn, model if head is None else collapse(model, head), trajectory, opts, data, device)
        fm.head = head
        terms = tuple(terms_for(opts.rule, trajectory.step_sizes, opts.nodes))
        blocks = None if head is None or opts.outputs != "full" else HeadBlocks(fm, head)
        if blocks is not None:  # (Q changes along the path: each term at one pair of points)
            terms = tuple(single_point_terms(list(terms)))
        N = data.X.shape[0]
        M = N if data.X2 is None else data.X2.shape[0]
        if not is_symmetric(terms) and data.X2 is None and not opts.diagonal:
            log.info("%s: rule=%r is asymmetric: computing every tile of the %d×%d Gram (no mirroring)", fn, opts.rule,
                     N, N)
        backend = select_backend(opts.backend, device, precision=opts.precision, fn=fn)
        layout = TileLayout(opts.outputs, opts.diagonal, fm.num_outputs, backend, opts.precision,
                            stands_for=None if head is None else fm.num_outputs // (head.d + 1) * head.V)
        geometry = _Geometry(N, M, data.X2 is None and is_symmetric(terms), opts.diagonal, budget, fn)
        if opts.method == "sketch":
            sk = Sketcher(fm, list(terms), k=1024 if opts.k is None else opts.k,
                          seed=0 if opts.seed is None else opts.seed, rule=opts.rule, of=opts.of, loss=opts.loss,
                          budget=budget, fn=fn, projection=opts.projection, X=data.X,
                          samples=N + (0 if data.X2 is None else M),
                          precondition=preconditioner_for(opts.preconditioner, fm, opts.rule, fn))
            route: Route = SketchRoute(layout, sk, N + (0 if data.X2 is None else M))
            return cls(opts, fm, data, layout, terms, route, geometry.tiling(route, layout, fm, terms), sk.choices)
        route, tiling, choices = _choose_routes(opts, fm, data, layout, terms, geometry)
        tied = None if head is None or not head.tied else TiedCross(fm, head, model.get_submodule(head.tied))
        return cls(opts, fm, data, layout, terms, route, tiling, choices, blocks, tied)

    # ------------------------------------------------------------------ what it is
    @property
    def X(self) -> torch.Tensor:
        return self.data.X

    @property
    def X2(self) -> torch.Tensor | None:
        return self.data.X2

    @property
    def num_outputs(self) -> int:
        """The model's C (a collapsed head's V per position, not its d + 1)."""
        return self.layout.width

    @property
    def dtype(self) -> torch.dtype:
        return self.opts.dtype

    @property
    def backend(self) -> str:
        return self.layout.backend

    @property
    def terms(self) -> list[Term]:
        """The terms the tile loop runs (the rule's, or the sketch's one product of features)."""
        return self.route.terms(list(self.quadrature_terms))

    @property
    def method(self) -> str:
        """The resolved method: "jacobian", "factorized" (some layer factorised), "materialized" or "sketch"."""
        return self.route.method

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
        C, P, full = self.layout.num_outputs, self.fm.num_params, self.layout.full
        k = P if full else C * P
        rowmul = C if full else 1
        if self.layout.diagonal:
            return 2.0 * self.data.X.shape[0] * C * (C if full else 1) * P * len(self.terms)
        return sum(2.0 * (t.shape[0] * rowmul) * (t.shape[1] * rowmul) * k for t in self.tiling.tiles) * len(self.terms)

    def record(self) -> dict[str, Any]:
        """The options a stored result records (all that change its numbers, the routes used among them)."""
        head = self.fm.head
        return dict(self.opts.record(), backend=self.layout.backend, device=self.fm.device.type,
                    symmetric=self.tiling.symmetric, **self.route.record(),
                    **({} if head is None else {"head": head.record()}))

    def fingerprints(self) -> dict[str, str]:
        """Digests of what the result depends on: model, trajectory, X (with y), X2 (with y2), options."""
        d = self.data
        return formats.fingerprints(self.fm.fingerprint(), self.fm.trajectory.fingerprint(), d.X, d.X2, y=d.Y,
                                    y2=d.Y2, options=self.record())

    def describe(self) -> str:
        N = self.data.X.shape[0]
        M = N if self.data.X2 is None else self.data.X2.shape[0]
        return f"{self.opts.fn} {'diag ' if self.layout.diagonal else ''}{N}×{1 if self.layout.diagonal else M}, " \
               f"{len(self.terms)} terms"

    # ------------------------------------------------------------------ the loop
    def run(self, sink: Sink | None = None, *, progress: bool = True) -> Any:
        """Compute the tiles the sink asks for, hand each to it when finished, and return its result (default:
        the Gram in memory, a CPU tensor). A store being resumed keeps the tiling it was written with."""
        sink = sink or MemorySink(self.result_shape, self.dtype, self.layout.diagonal)
        try:
            tiling, mine, pending = sink.open(self.tiling)
            terms = self.terms
            pairs = sum(t.shape[0] if self.layout.diagonal else t.shape[0] * t.shape[1] for t in mine) * len(terms)
            bar = tqdm(total=pairs, unit="pair", unit_scale=True, desc=self.describe(), disable=not progress,
                       leave=False)
            dev = self.fm.device
            with reuse_freed_memory(dev.type == "cpu"), ThreadPolicy(self.opts.threads, self.opts.fn) as threads:
                if pending and terms:
                    needs_cols = not all(t.diagonal or self.layout.diagonal for t in tiling.tiles) \
                        or not is_symmetric(terms)
                    self.route.begin(self.data, tiling.row_block, tiling.col_block if needs_cols else 0, tiling.chunk,
                                     progress)
                most = max((self.layout.acc_numel(t) for t in mine), default=0)
                # one accumulator for every tile (each takes a contiguous prefix): a fresh tile-sized allocation per
                # tile would leave the allocator holding freed blocks of other sizes, past the memory budget
                part = max((math.prod(self.layout.part_shape(t)) for t in mine), default=0) if self.blocks else 0
                loop = _Loop(torch.empty(most, dtype=self.dtype, device=dev),
                             torch.empty(part, dtype=self.dtype, device=dev))
                try:
                    for tile in mine:
                        threads.update()
                        acc = self._tile(tile, loop, bar)
                        block, mirror = self.layout.finish(tile, acc, mirrored=tiling.symmetric)
                        del acc
                        sink.write(tile, block, mirror)
                        del block, mirror
                finally:
                    bar.close()
                    self.route.end()
                    del loop
        finally:
            sink.close()
        return sink.result()

    def _tile(self, tile: Tile, loop: "_Loop", bar: Any) -> torch.Tensor:
        """:meth:`compute_tile`; where the model's calls change at run time (data-dependent control flow the plan
        did not see), the route falls back to the Jacobian route (with a warning) and the tile is recomputed."""
        try:
            return self.compute_tile(tile, loop, bar)
        except CallsChanged as e:
            fall_back = getattr(self.route, "fall_back", None)
            if fall_back is None or getattr(self.route, "fallback", None) is not None:
                raise
            fall_back(e)
            loop.left, loop.rows_key, loop.right, loop.right_key = None, None, None, None
            return self.compute_tile(tile, loop, bar)

    def compute_tile(self, tile: Tile, loop: "_Loop", bar: Any = None) -> torch.Tensor:
        """Σ over terms of weight · ⟨rows' side, columns' side⟩ for this tile, as the accumulator (on the compute
        device; a view of the loop's shared buffer, valid until the next tile starts)."""
        shape = self.layout.acc_shape(tile)
        acc = loop.acc[: math.prod(shape)].view(shape).zero_()
        d, r, diag = self.data, self.route, self.layout.diagonal
        Xr, Yr = d.X[tile.rows], None if d.Y is None else d.Y[tile.rows]
        Xc, Yc = d.cols[tile.cols], None if d.Y is None else d.cols_y[tile.cols]
        terms = self.terms
        for term in terms:
            key = (tile.rows.start, tile.rows.stop) if len(terms) == 1 and r.row_reuse else None
            form_left = key is None or key != loop.rows_key
            same = (tile.diagonal or diag) and term.symmetric
            right_key = None if same else (term.right_combo, tile.cols.start, tile.cols.stop)
            form_right = right_key is not None and right_key != loop.right_key
            progress = _TermProgress(bar, tile.shape[0] if diag else tile.shape[0] * tile.shape[1],
                                     (tile.shape[0] * len(term.left) if form_left else 0)
                                     + (tile.shape[1] * len(term.right_combo) if form_right else 0))
            if form_left:
                loop.left = left = None  # the previous rows' side is freed before the next is formed
                loop.left = r.side(term.left, Xr, Yr, "rows", tile.rows, tick=progress.tick)
                loop.rows_key = key
            left = loop.left
            if form_right:  # (a columns' side is kept while the next term has the same: single-point terms)
                loop.right = loop.right_key = None
                loop.right = r.side(term.right_combo, Xc, Yc, "cols", tile.cols, tick=progress.tick)
                loop.right_key = right_key
            right = left if same else loop.right
            if self.blocks is None:
                r.product(acc, left, right, term.weight, same)
            else:
                self._expanded_product(acc, loop, tile, left, right, term, same)
            if self.tied is not None:
                name, sl, Xs = ("rows", tile.rows, Xr) if diag else ("cols", tile.cols, Xc)
                rows = self.tied.features(term.left, Xr, ("rows", tile.rows.start, tile.rows.stop))
                cols = rows if same else self.tied.features(term.right_combo, Xs, (name, sl.start, sl.stop))
                self.tied.add(acc, rows, cols, term.weight, diagonal=diag)
            right = None
            progress.done()
        return acc

    def _expanded_product(self, acc: torch.Tensor, loop: "_Loop", tile: Tile, left: Any, right: Any, term: Term,
                          same: bool) -> None:
        """One term through a collapsed head: the route's product over the computed outputs into the loop's
        part accumulator, expanded into the tile's full blocks (:class:`~pkfast.layers.head.HeadBlocks`)."""
        shape = self.layout.part_shape(tile)
        part = loop.part[: math.prod(shape)].view(shape).zero_()
        self.route.product(part, left, right, 1.0, same)
        if same and not self.layout.diagonal:
            symmetrize_upper_(part)
        self.blocks.add(acc, part, term, diagonal=self.layout.diagonal)


class _Loop:
    """What one run of the tile loop holds between tiles: the accumulator every tile takes a prefix of, and the
    rows' side kept for the next tile of the same rows."""

    def __init__(self, acc: torch.Tensor, part: torch.Tensor) -> None:
        self.acc, self.part = acc, part
        self.left: Any = None
        self.rows_key: tuple[int, int] | None = None
        self.right: Any = None
        self.right_key: Any = None


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



def _pilot(job: type[GramJob], model: Any, trajectory: Any, X: Any, sk: OutputSketch, fn: str,
           options: dict[str, Any]) -> OutputSketch:
    """The output sketch ``target`` asks for: r from a pilot of :data:`~pkfast.engine.output_sketch.PILOT_R`
    directions on the first :data:`~pkfast.engine.output_sketch.PILOT_SAMPLES` samples of X (each sample's
    u_jᵀ G(x, x) u_j, the diagonal blocks of the projected model's full Gram), logged."""
    n = min(PILOT_SAMPLES, inputs.num_samples(X))
    probe = OutputSketch(r=PILOT_R, kind=sk.kind, seed=sk.seed + 1)
    proj = OutputProjection(probe, options.get("output_fn"))
    keep = {k: v for k, v in options.items() if k not in ("outputs", "output_fn", "diagonal", "method", "k",
                                                           "projection", "memory_budget")}
    pilot = job.create(model, trajectory, inputs.take(X, slice(0, n)), fn=fn, outputs="full", diagonal=True, output_fn=proj,
                       method="auto", memory_budget=options.get("memory_budget"), **keep)
    blocks = pilot.run(progress=False)
    q = torch.diagonal(blocks, dim1=-2, dim2=-1).to(torch.float64) * PILOT_R  # u_jᵀ G u_j per sample, direction
    r = directions_for_target(q, float(sk.target), int(proj.num_outputs or 1))
    log.info("%s: output sketch: a pilot of %d directions on %d samples chose r = %d for a %g relative standard "
             "error of the diagonal", fn, PILOT_R, n, r, sk.target)
    return OutputSketch(r=r, kind=sk.kind, seed=sk.seed, chosen_for=sk.target)
