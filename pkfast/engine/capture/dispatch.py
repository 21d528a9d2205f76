"""engine.capture.dispatch: data-dependent control flow, found before the layers are routed and caught if it shows later.

The factorised and materialised routes (:mod:`pkfast.engine.capture`) learn each layer's calls on one sample and
expect every sample, at every evaluation point, to call it the same way on its own rows of the batch. A layer
called on a data-dependent subset of the batch — a mixture of experts's ``out[mk] = expert(x[mk])`` — breaks
that: :func:`find_dispatch` runs a few samples alone and together at a few evaluation points, and names each
layer whose calls differ between samples, between points, or whose call's leading dimension is not the batch's;
those (and, in a model that dispatches, the layers no probed sample calls) take the Jacobian route, exact for
any control flow. A call structure that only shows at run time (routing the probed samples do not exercise)
raises :class:`CallsChanged` instead of a ``KeyError``; the Gram's layered route then falls back to the
Jacobian route for the rest of the computation
(:meth:`~pkfast.engine.routes.layered.LayeredRoute.fall_back`).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable

import torch
from torch.func import functional_call

from pkfast.engine.quadrature import EvalPoint

__all__ = ["CallsChanged", "PROBE_SAMPLES", "find_dispatch", "check_call", "check_calls"]

log = logging.getLogger("pkfast")

#: How many samples :func:`find_dispatch` runs alone (and together) at each probed evaluation point.
PROBE_SAMPLES = 8

#: (input shape, output shape) of each call of a layer, in call order.
Signature = tuple[tuple[tuple[int, ...] | None, tuple[int, ...] | None], ...]


#: What to do about a call structure the plan did not see, for :class:`CallsChanged`'s messages.
_TODO = (f"; put samples that take every route among the first {PROBE_SAMPLES} (planning probes them), or use "
         "method='jacobian'")


class CallsChanged(Exception):
    """A hooked layer's calls at run time are not those the plan was made for (a call it did not see, one
    missing, another shape): data-dependent control flow that the samples probed at planning did not show.
    Not a RuntimeError: the per-sample passes' fallbacks must not take it for an operator vmap cannot run."""


def _signatures(fm, layers: list, x: torch.Tensor, point: EvalPoint, patched: Callable) -> dict[str, Signature]:
    """Each layer's calls in one forward pass of ``x`` at ``point`` (no gradients)."""
    seen: dict[str, list] = {L.name: [] for L in layers}

    def hook_for(name: str):
        def hook(mod, args, output):
            a = args[0] if args and isinstance(args[0], torch.Tensor) else None
            seen[name].append((None if a is None else tuple(a.shape),
                               tuple(output.shape) if isinstance(output, torch.Tensor) else None))
        return hook

    flat, statics = fm.state(point)
    handles = [L.rule.site(L.module).register_forward_hook(hook_for(L.name)) for L in layers]
    try:
        with torch.no_grad(), patched():
            functional_call(fm.model, (fm.params(flat), statics), (fm.prepare(x),))
    finally:
        for h in handles:
            h.remove()
    return {n: tuple(v) for n, v in seen.items()}


def _batched_like(single: Signature, batched: Signature, k: int) -> bool:
    """Whether a batch of ``k`` calls the layer as each sample does, on the whole batch (or shared)."""
    if len(single) != len(batched):
        return False
    for (si, so), (bi, bo) in zip(single, batched):
        if (si, so) == (bi, bo):  # a shared call (the same input for every sample)
            continue
        if not all(_stacked(s, b, k) for s, b in ((si, bi), (so, bo))):
            return False
    return True


def _stacked(s: tuple | None, b: tuple | None, k: int) -> bool:
    """Whether shape ``b`` stacks ``k`` of shape ``s`` along one axis (batch-first or not, or flattened into it)."""
    if s is None or b is None:  # no positional tensor (the capture's own check names it)
        return s is b
    if len(s) != len(b):
        return False
    return any(b[a] == k * s[a] and s[:a] + s[a + 1:] == b[:a] + b[a + 1:] for a in range(len(s)))


def _why(name: str, singles: list[Signature], batched: Signature | None, k: int, step: int) -> str:
    """Why the layer's calls are data-dependent ("" if they are not), for the plan."""
    route = "Jacobian route (exact)"
    used = sum(1 for s in singles if s and all(i is None or (i and i[0] > 0) for i, _ in s))
    if any(i is not None and 0 in i[:1] for s in singles for i, _ in s):
        return (f"called on a data-dependent subset of the batch (mask dispatch: empty for {k - used} of "
                f"{k} probed samples at w_{step}): {route}")
    if len(set(singles)) > 1:
        return (f"called on a data-dependent subset of the batch (mask dispatch: used by {used} of {k} probed "
                f"samples at w_{step}): {route}")
    if batched is not None and not _batched_like(singles[0], batched, k):
        lead = sorted({i[0] for i, _ in batched if i}) if batched else []
        return (f"called on a data-dependent subset of the batch (mask dispatch: leading dimension "
                f"{', '.join(map(str, lead)) or 'none'} in a batch of {k} at w_{step}): {route}")
    return ""


def find_dispatch(fm, layers: list, X: torch.Tensor, patched: Callable = contextlib.nullcontext) -> dict[str, str]:
    """``{layer name: why}`` for each of ``layers`` (those with a rule) whose calls depend on the data: they
    differ between up to :data:`PROBE_SAMPLES` samples run alone, between the trajectory's first, middle and
    last points, or a batch of them calls the layer on a subset of its rows. In a model with such a layer, the
    layers that no probed sample calls are named too (their calls are data-dependent as well). ``patched``: the
    context of the rules' forward patches. A model that cannot be run this way is left to the other checks."""
    k = min(PROBE_SAMPLES, X.shape[0])
    last = fm.trajectory.num_points - 1
    why: dict[str, str] = {}
    seen: dict[str, set] = {L.name: set() for L in layers}
    try:
        for step in sorted({0, last // 2, last}):
            point = EvalPoint(step)
            singles = [_signatures(fm, layers, X[i:i + 1], point, patched) for i in range(k)]
            batched = _signatures(fm, layers, X[:k], point, patched) if k > 1 else None
            for L in layers:
                s = [sig[L.name] for sig in singles]
                seen[L.name] |= set(s)
                if L.name not in why:
                    why[L.name] = _why(L.name, s, None if batched is None else batched[L.name], k, step)
    except Exception as e:  # noqa: BLE001 — a model the probe cannot run: the capture's own checks handle it
        log.info("pkfast: the dispatch probe could not run the model (%s: %s)", type(e).__name__, e)
        return {}
    for L in layers:
        if not why[L.name] and len(seen[L.name]) > 1:
            why[L.name] = (f"its calls differ between evaluation points (data-dependent control flow, e.g. "
                           f"routing that changes between steps): Jacobian route (exact)")
    why = {n: w for n, w in why.items() if w}
    if why:
        for L in layers:
            if L.name not in why and seen[L.name] == {()}:
                why[L.name] = ("not called by the probed samples, in a model that dispatches on its data "
                               f"({next(iter(why))!r}): Jacobian route (exact)")
    return why


def check_call(name: str, key: str, probes: dict[str, torch.Tensor], output: torch.Tensor, strict: bool) -> None:
    """Raise :class:`CallsChanged` for a hooked call the plan has no probe for (``strict``, a per-sample pass:
    or one whose output's shape is not the probe's)."""
    if key not in probes:
        raise CallsChanged(f"pkfast: layer {name!r}'s call structure at run time differs from the planned one "
                           f"(call {key!r}, output shape {tuple(output.shape)}, was not seen when planning): "
                           "data-dependent control flow (e.g. mask dispatch) that the probed samples did not show"
                           + _TODO)
    if strict and tuple(output.shape) != tuple(probes[key].shape):
        raise CallsChanged(f"pkfast: layer {name!r}'s call structure at run time differs from the planned one "
                           f"(call {key!r}: output shape {tuple(output.shape)}, planned "
                           f"{tuple(probes[key].shape)}): data-dependent control flow (e.g. mask dispatch)" + _TODO)


def check_calls(planned, made) -> None:
    """Raise :class:`CallsChanged` when a per-sample pass made fewer hooked calls than ``planned`` (keys)."""
    missing = sorted(set(planned) - set(made))
    if missing:
        raise CallsChanged(f"pkfast: the call structure at run time differs from the planned one (planned calls "
                           f"{', '.join(map(repr, missing[:3]))} were not made): data-dependent control flow "
                           "(e.g. mask dispatch) that the probed samples did not show" + _TODO)
