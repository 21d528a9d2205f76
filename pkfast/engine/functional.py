"""Jacobian panels: per-sample ∂f/∂w of a model's outputs w.r.t. its trainable parameters at a trajectory point.

:class:`FunctionalModel` turns an ``nn.Module`` plus a :class:`~pkfast.Trajectory` into a pure function of
the trainable parameters (``torch.func.functional_call``); :meth:`FunctionalModel.jacobian` evaluates
``vmap(jacrev(f))`` in chunks of samples and writes the result into one ``[n, C, P]`` buffer laid out for
the Gram GEMM (sample-major, outputs, then parameters in ``named_parameters`` order).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch.func import functional_call

from pkfast.store import formats

from pkfast.engine import per_sample
from pkfast._checks import preview
from pkfast.engine.costs import chunk_for
from pkfast.engine.inputs import Packing, adapt, reduce_output
from pkfast.engine.quadrature import EvalPoint
from pkfast.trajectory.points import Trajectory

__all__ = ["FunctionalModel", "EvalPoint", "compile_prefix_map"]

log = logging.getLogger("pkfast")


class FunctionalModel:
    """A module as a pure function of its trainable parameters, evaluated at trajectory points.

    Trainable parameters (``requires_grad=True``; tied tensors once, under their first name) enter the
    kernel; their values come from the trajectory. Frozen parameters and buffers are held fixed: at their
    recorded values where the trajectory stores them, else at the model's own values.
    """

    def __init__(self, model: torch.nn.Module, trajectory: Trajectory, *, dtype: torch.dtype, device: torch.device,
                 fn: str = "pkfast", loss: Any = None, packing: Packing | None = None,
                 output_fn: Callable[[Any], torch.Tensor] | None = None) -> None:
        #: with a :class:`~pkfast.loss.LossSpec`, the function is the per-sample loss ℓ(f(x; w), y) (C = 1)
        self.loss = loss
        #: the model as the engine calls it: on packed samples, returning one tensor (:mod:`pkfast.engine.inputs`)
        self.model = adapt(model, packing, output_fn)
        self._adapt = (model, packing, output_fn)
        self.trajectory = trajectory
        self.dtype = dtype
        self.device = device
        statics_fixed = self._bind(model, trajectory, fn)
        self.sizes = [math.prod(s) for s in self.shapes]
        self.num_params = sum(self.sizes)
        self._contiguous = _contiguous_run(self._slices)
        self._statics_fixed = {n: self._cast(t) for n, t in statics_fixed.items()}
        self._cache_key: object = None
        self._cache: tuple[torch.Tensor, dict[str, torch.Tensor]] | None = None
        self.num_outputs: int | None = None
        #: the model's output shape for one sample (known after :meth:`probe`)
        self.output_shape: tuple[int, ...] | None = None
        #: how per-sample Jacobians are taken: vmap(jacrev), or a loop where vmap/torch.func cannot run the model
        self.passes = per_sample.Passes()
        #: the collapsed output head the model stands for (:mod:`pkfast.layers.head`; set by the Gram's planning)
        self.head: Any = None

    def _bind(self, model: torch.nn.Module, trajectory: Trajectory, fn: str) -> dict[str, torch.Tensor]:
        """Match the model's parameters and buffers with the trajectory's entries: sets the trainable ones
        (``names``, ``shapes``, their slices of a trajectory row, tied aliases stored twice) and the statics read
        from the trajectory; returns the statics held at the model's values. Refuses a trajectory entry that
        matches nothing and a model with nothing trainable."""
        traj_names, traj_shapes = set(trajectory.names), dict(trajectory.spec)
        # every name under which each tensor is reachable (tied weights have several)
        aliases = _aliases(model.named_parameters(remove_duplicate=False))
        for mod in model.modules():  # a tied head's untied copy reads the tied tensor's entry (pkfast.layers.head)
            for a in getattr(mod, "_pkfast_reads", ()):
                aliases[id(mod.weight)].append(a)
        buffer_aliases = _aliases((n, b) for n, b in model.named_buffers(remove_duplicate=False) if b is not None)
        self.names: list[str] = []
        #: each trainable parameter's entry in the trajectory (its name there), in :attr:`names`' order
        self.hits: list[str] = []
        self.shapes: list[torch.Size] = []
        self._slices: list[slice] = []
        self._tied: list[tuple[str, slice, str, slice]] = []  # aliases of one tensor stored twice
        self._statics_from_traj: list[tuple[str, slice, torch.Size]] = []
        statics_fixed: dict[str, torch.Tensor] = {}
        used: set[str] = set()
        # the model's names as the trajectory spells them (torch.compile's "_orig_mod." added or dropped)
        tmap = compile_prefix_map([a for v in (*aliases.values(), *buffer_aliases.values()) for a in v],
                                  trajectory.names)
        for n, p in model.named_parameters():
            names = [tmap.get(a, a) for a in aliases[id(p)]]
            hit = next((a for a in names if a in traj_names), None)
            if p.requires_grad:
                self._add_trainable(fn, n, p, names, hit, traj_names, traj_shapes)
            elif hit is not None:
                self._check_static_shape(fn, n, p, traj_shapes[hit])
                self._statics_from_traj.append((n, trajectory.slice_of(hit), p.shape))
            else:
                statics_fixed[n] = p.detach()
            used.update(names)
        for n, b in model.named_buffers():
            names = [tmap.get(a, a) for a in buffer_aliases[id(b)]]
            hit = next((a for a in names if a in traj_names), None)
            if hit is not None and b.is_floating_point():
                self._check_static_shape(fn, n, b, traj_shapes[hit])
                self._statics_from_traj.append((n, trajectory.slice_of(hit), b.shape))
            else:
                statics_fixed[n] = b.detach()
            used.update(names)
        extra = [n for n in trajectory.names if n not in used]
        if extra:
            raise ValueError(
                f"{fn}: trajectory entry {extra[0]!r} matches no parameter or buffer of the model "
                f"({len(extra)} unmatched); was the trajectory recorded from a different model?"
                + _prefix_hint(extra[0], trajectory.names)
            )
        if not self.names:
            raise ValueError(f"{fn}: the model has no trainable parameters (requires_grad=True); the kernel is empty")
        return statics_fixed

    def _add_trainable(self, fn: str, n: str, p: torch.Tensor, names: list[str], hit: str | None,
                       traj_names: set[str], traj_shapes: dict[str, torch.Size]) -> None:
        """Enter the trainable parameter ``n`` (reachable as ``names``), stored in the trajectory as ``hit``."""
        trajectory = self.trajectory
        if hit is None:
            raise ValueError(
                f"{fn}: the trajectory has no entry for the model's trainable parameter {n!r} "
                f"(shape {tuple(p.shape)}); trajectory entries: {preview(trajectory.names)}"
                + _prefix_hint(n, trajectory.names)
            )
        if traj_shapes[hit] != p.shape:
            raise ValueError(
                f"{fn}: parameter {n!r} has shape {tuple(p.shape)} in the model but "
                f"{tuple(traj_shapes[hit])} in the trajectory"
            )
        self.names.append(n)
        self.hits.append(hit)
        self.shapes.append(p.shape)
        self._slices.append(trajectory.slice_of(hit))
        self._tied += [(hit, trajectory.slice_of(hit), a, trajectory.slice_of(a))
                       for a in names if a != hit and a in traj_names]

    @property
    def itemsize(self) -> int:
        """Bytes per value in the compute dtype."""
        return _itemsize(self.dtype)

    def fingerprint(self) -> str:
        """Digest of the architecture and of every value not taken from the trajectory (buffers, frozen
        parameters): with the trajectory's fingerprint, what fixes the function whose kernel is computed."""
        statics = sorted(self._statics_fixed.items())
        # an adapted model (packed inputs, reduced outputs) also by how it was adapted; a plain one as before
        adapted = [] if self.model is self._adapt[0] else [repr(getattr(self.model, "_pkfast_adapted", None))]
        return formats.digest(type(self.model).__qualname__, repr(self.model), self.names,
                              [tuple(s) for s in self.shapes], [n for n, _ in statics], *[t for _, t in statics],
                              *adapted)

    @staticmethod
    def _check_static_shape(fn, n, t, shape) -> None:
        if t.shape != shape:
            raise ValueError(f"{fn}: {n!r} has shape {tuple(t.shape)} in the model but {tuple(shape)} in the trajectory")

    def _cast(self, t: torch.Tensor) -> torch.Tensor:
        return t.to(self.device, self.dtype if t.is_floating_point() else t.dtype)

    # ------------------------------------------------------------------ weights at a point
    def _row(self, k: int) -> torch.Tensor:
        row = self.trajectory.flat(k)
        for a, sa, b, sb in self._tied:
            if not torch.equal(row[sa], row[sb]):
                raise ValueError(
                    f"pkfast: {a!r} and {b!r} are one (tied) tensor in the model but hold different values in "
                    f"the trajectory at point w_{k}; the trajectory does not come from this model"
                )
        return row.to(self.device, self.dtype)

    def state(self, point: EvalPoint) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(trainable weights flattened [P], statics) at ``point``. Caches the last point."""
        key = (point.step, float(point.tau))
        if key == self._cache_key and self._cache is not None:
            return self._cache
        row = base = self._row(point.step)  # statics stay at the segment start
        if point.tau != 0.0:
            nxt = self._row(point.step + 1)
            row = torch.lerp(row, nxt, float(point.tau)) if point.tau != 1.0 else nxt
        flat = row[self._contiguous] if self._contiguous is not None else torch.cat([row[s] for s in self._slices])
        statics = dict(self._statics_fixed)
        for n, sl, shape in self._statics_from_traj:
            statics[n] = base[sl].view(shape)
        self._cache_key, self._cache = key, (flat, statics)
        return flat, statics

    def params(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        return {n: t.view(s) for n, t, s in zip(self.names, flat.split(self.sizes), self.shapes)}

    # ------------------------------------------------------------------ function and Jacobian
    def _f_single(self, params: dict[str, torch.Tensor], statics: dict[str, torch.Tensor], x: torch.Tensor):
        out = functional_call(self.model, (params, statics), (x.unsqueeze(0),))
        if not isinstance(out, torch.Tensor):
            raise TypeError(f"pkfast: the model must return a tensor; it returned {type(out).__name__}")
        return out.reshape(-1)

    def _loss_single(self, params, statics, x, y):
        return self.loss.per_sample(self._f_single(params, statics, x), y, self.output_shape).reshape(1)

    def outputs(self, point: EvalPoint, X: torch.Tensor) -> torch.Tensor:
        """f(X; w) as [n, C] (the model applied to the batch, outputs flattened per sample)."""
        flat, statics = self.state(point)
        with torch.no_grad():
            out = functional_call(self.model, (self.params(flat), statics), (self.prepare(X),))
        return out.reshape(X.shape[0], -1)

    def prepare(self, X: torch.Tensor) -> torch.Tensor:
        return X.to(self.device, self.dtype) if X.is_floating_point() else X.to(self.device)

    def probe(self, X: torch.Tensor, fn: str, name: str = "X") -> int:
        """Run the model on one sample to learn C and to turn a shape mismatch into a clear error."""
        flat, statics = self.state(EvalPoint(0))
        x = self.prepare(X[:1])
        try:
            with torch.no_grad():
                out = functional_call(self.model, (self.params(flat), statics), (x,))
        except Exception as e:  # the model's own error says which layer disagreed
            if X.shape[0] > 1:  # … unless a batch runs where one sample does not: batch dependence, said as such
                try:
                    per_sample.check_independent(self, X, fn, name)
                except ValueError as dep:
                    if "depends on the rest of its batch" in str(dep):
                        raise dep from None
                except Exception:  # noqa: BLE001 - the batch fails too: the model's own error below
                    pass
            raise ValueError(
                f"{fn}: the model cannot be applied to {name}: per-sample shape {tuple(X.shape[1:])}, dtype "
                f"{X.dtype}; the model raised {type(e).__name__}: {e}"
            ) from e
        if not isinstance(out, torch.Tensor):
            model, packing, output_fn = self._adapt
            if output_fn is None and not getattr(self.model, "_pkfast_reduces", False):
                # a ModelOutput, dict or tuple: reduced by the default rule (pkfast.engine.inputs.reduce_output)
                try:
                    reduce_output(out)
                except TypeError as e:
                    raise TypeError(f"{fn}: {e}") from None
                self.model = adapt(model, packing, None, reduce=True)
                self.model._pkfast_reduces = True
                return self.probe(X, fn, name)
            raise TypeError(f"{fn}: the model must return a tensor; it returned {type(out).__name__}")
        if out.ndim == 0 or out.shape[0] != 1:
            raise ValueError(
                f"{fn}: the model must map a batch [n, *features] to outputs [n, *out]; for one sample of shape "
                f"{tuple(x.shape)} it returned shape {tuple(out.shape)}"
            )
        C = int(out[0].numel())
        self.passes.choose(self, X)  # (vmap refuses random operations: a random forward pass is named here)
        per_sample.check_independent(self, X, fn, name, random_checked=self.passes.mode == "vmap")
        self.model_outputs = C
        self.output_shape = tuple(out.shape[1:])
        if self.loss is not None:
            C = 1  # the function is the per-sample loss
        if self.num_outputs is None:
            self.num_outputs = C
        return C

    def jacobian(
        self,
        combo: Sequence[tuple[EvalPoint, float]],
        X: torch.Tensor,
        out: torch.Tensor | None = None,
        *,
        chunk: int | None = None,
        Y: torch.Tensor | None = None,
        tick: Callable[[int], None] | None = None,
    ) -> torch.Tensor:
        """Σ_q ω_q J(X; w(point_q)) as ``[n, C, P]`` (one term for ordinary rules, m nodes for quadrature).

        Args:
            combo: ``(EvalPoint, weight)`` pairs.
            X: the samples ``[n, *features]`` (any device; moved per chunk).
            out: optional preallocated ``[n, C, P]`` buffer (overwritten).
            chunk: samples per ``vmap(jacrev)`` call (default from :data:`pkfast.engine.costs.DEFAULT_CHUNK_BYTES`).
            tick: called with the number of samples after each chunk and point (progress inside a tile).
        """
        n = X.shape[0]
        C, P = self.num_outputs, self.num_params
        assert C is not None, "probe() first"
        if out is None:
            out = torch.empty(n, C, P, dtype=self.dtype, device=self.device)
        if chunk is None:
            chunk = self.default_chunk()
        if self.loss is not None and Y is None:
            raise ValueError("pkfast: loss-gradient Jacobians need the targets Y of the samples")
        f, in_dims = (self._loss_single, (None, None, 0, 0)) if self.loss is not None else (self._f_single, (None, None, 0))
        Yd = None if self.loss is None else Y.to(self.device)
        for qi, (point, weight) in enumerate(combo):
            flat, statics = self.state(point)
            params = self.params(flat)
            for a in range(0, n, chunk):
                b = min(n, a + chunk)
                jac = self.passes.jacobian(f, 0, in_dims, params, statics, self.prepare(X[a:b]),
                                           *(() if Yd is None else (Yd[a:b],)))
                dst = out[a:b]
                parts = [jac[nm].reshape(b - a, C, -1) for nm in self.names]  # (a scalar parameter's is [n, C])
                if qi == 0:
                    torch.cat(parts, dim=2, out=dst)
                    if weight != 1.0:
                        dst.mul_(weight)
                else:
                    dst.add_(torch.cat(parts, dim=2), alpha=weight)
                if tick is not None:
                    tick(b - a)
        return out

    def check_loss_function(self, X: torch.Tensor, Y: torch.Tensor, fn: str) -> None:
        """For a callable loss: it maps one sample's outputs and targets to one loss (checked on the first sample;
        nothing is evaluated for the built-in losses)."""
        if self.loss is not None and self.loss.kind == "callable":
            self.loss.check_callable(self.outputs(EvalPoint(0), X[:1]).reshape(1, *self.output_shape), Y[:1], fn)

    def default_chunk(self) -> int:
        """Samples per ``vmap(jacrev)`` call: a whole Jacobian per sample within the cost model's chunk budget."""
        return chunk_for((self.num_outputs or 1) * self.num_params * _itemsize(self.dtype), most=None)


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


#: The attribute under which ``torch.compile`` keeps the original module: its names gain this prefix.
COMPILE_PREFIX = "_orig_mod."


def _without_prefix(name: str) -> str:
    return ".".join(part for part in name.split(".") if part != COMPILE_PREFIX[:-1])


def compile_prefix_map(model_names: Sequence[str], traj_names: Sequence[str]) -> dict[str, str]:
    """{model name: trajectory name} for the model's names that the trajectory spells with ``torch.compile``'s
    ``_orig_mod.`` prefix added or dropped (a trajectory recorded from a compiled module loaded into the plain
    one, or the other way round) — only where that is unambiguous: the trajectory has no entry of that name
    itself and exactly one entry equal to it with every ``_orig_mod.`` removed.

    Example:
        >>> compile_prefix_map(["0.weight", "0.bias"], ["_orig_mod.0.weight", "_orig_mod.0.bias"])
        {'0.weight': '_orig_mod.0.weight', '0.bias': '_orig_mod.0.bias'}
        >>> compile_prefix_map(["w"], ["w", "_orig_mod.w"])  # already matched by name: nothing to map
        {}
    """
    traj = set(traj_names)
    if all(n in traj for n in model_names) or not any(COMPILE_PREFIX in n for n in (*model_names, *traj_names)):
        return {}
    by_stripped: dict[str, list[str]] = {}
    for t in traj_names:
        by_stripped.setdefault(_without_prefix(t), []).append(t)
    out = {}
    for n in model_names:
        hits = by_stripped.get(_without_prefix(n), [])
        if n not in traj and len(hits) == 1:
            out[n] = hits[0]
    if out:
        log.info("pkfast: %d model name(s) matched to the trajectory with torch.compile's %r prefix %s (e.g. %r → %r)",
                 len(out), COMPILE_PREFIX, "added" if COMPILE_PREFIX in next(iter(out.values())) else "dropped",
                 *next(iter(out.items())))
    return out


def _prefix_hint(name: str, traj_names: Sequence[str]) -> str:
    """What to say when a name did not match and torch.compile's prefix is involved (else nothing)."""
    if not any(COMPILE_PREFIX in n for n in (name, *traj_names)):
        return ""
    hits = [t for t in traj_names if _without_prefix(t) == _without_prefix(name)]
    found = (f"the trajectory has {len(hits)} entries that match it with '_orig_mod.' added or dropped "
             f"({preview(hits)}), so the match is ambiguous" if len(hits) > 1 else
             "no entry matches it with '_orig_mod.' added or dropped either")
    return (f". Names with '_orig_mod.' come from a torch.compile'd module, whose parameters are the original "
            f"module's under that prefix: pkfast adds or drops it where that is unambiguous, but {found}; record "
            "from (or load into) the same module — compiled or not — or rename the entries")


def _aliases(named) -> dict[int, list[str]]:
    """Every name under which each tensor of ``(name, tensor)`` pairs is reachable, by the tensor's id."""
    out: dict[int, list[str]] = {}
    for n, t in named:
        out.setdefault(id(t), []).append(n)
    return out


def _contiguous_run(slices: list[slice]) -> slice | None:
    """One slice if the trainable entries are adjacent and in order in a trajectory row, else None."""
    for s0, s1 in zip(slices, slices[1:]):
        if s0.stop != s1.start:
            return None
    return slice(slices[0].start, slices[-1].stop)

