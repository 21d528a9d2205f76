"""The shared per-layer-rule harness: one call checks a layer rule on given shapes against the float64 oracle.

:func:`check_layer_rule` puts the module under test (``body``) in a small float64 model —
``head(tanh(body(x)).flatten(1))`` with a Linear head to ``C = 3`` outputs — moves its parameters along a short
random trajectory (T = 2 steps), and checks through public seams only:

- the plan (:func:`pkfast.plan`) routes every parameterised layer of ``body`` through its rule
  (:func:`pkfast.layers.rule_for`), not silently through the Jacobian route — under ``method="auto"`` and
  under each route the rule offers (``"materialized"`` always, ``"factorized"`` where the rule is
  ``factorizable``); or, with ``expect_route=``, the route you say, with ``reason=`` in the printed plan;
- every one of those routes agrees with :func:`pkfast.reference.gram_reference` to ``tol`` (default 1e-10,
  relative Frobenius) for the trace Gram and the full ``[N, M, C, C]`` block Gram, each with ``X2 = None``
  (a symmetric Gram) and with a second sample set, for the diagonal, for ``rule="trapezoid"``, and for the
  cross-entropy loss kernel (``of="loss"``) against an autograd oracle (:func:`tests._util.loss_kernel_reference`).

It returns the ``auto`` plan with the model, trajectory and samples it used (:class:`Checked`), for checks of
your own; it raises ``AssertionError`` saying which check, route and error failed.

**A new layer rule's test is one call.** Register the rule (:func:`pkfast.layers.register`), then give the
harness a factory of the module and the shape of one sample (or a sample generator ``(n, generator) ->
tensor``, e.g. :func:`tokens`)::

    from pkfast.layers import register
    from tests.layers.harness import check_layer_rule

    register(MyLayer, MyLayerRule())

    def test_my_layer_rule_is_exact():
        check_layer_rule(lambda: MyLayer(5, 6), (4, 5))   # 4 positions of 5 features per sample

A module that is not called as ``body(x)`` (several inputs, a tuple out) takes ``call=lambda body, x: …``;
one in eval mode with set-up buffers (a BatchNorm's running statistics) is built so by its factory.
"""

from __future__ import annotations

from typing import Callable, Iterable, NamedTuple, Sequence

import torch
import torch.nn.functional as F
from torch import nn

import pkfast
from pkfast.gram import GramPlan
from pkfast.layers import rule_for
from pkfast.reference import gram_reference
from tests._util import RTOL, loss_kernel_reference, rel_err
from tests.models import random_trajectory

__all__ = ["check_layer_rule", "Checked", "tokens", "Wrapped", "C"]

F64 = torch.float64
#: outputs of the harness model
C = 3
#: the routes a layer rule can offer
RULE_ROUTES = ("factorized", "materialized")

Sample = Sequence[int] | Callable[[int, torch.Generator], torch.Tensor]


class Wrapped(nn.Module):
    """``head(tanh(call(body, x)).flatten(1))``: the module under test with a Linear head to C outputs."""

    def __init__(self, body: nn.Module, width: int, call: Callable | None = None) -> None:
        super().__init__()
        self.body = body
        self.head = nn.Linear(width, C)
        self.call = call

    def forward(self, x):
        h = self.body(x) if self.call is None else self.call(self.body, x)
        return self.head(torch.tanh(h).flatten(1))


class Checked(NamedTuple):
    """What :func:`check_layer_rule` checked: the ``auto`` plan, the model, its trajectory, the sample sets."""

    plan: GramPlan
    model: nn.Module
    trajectory: pkfast.Trajectory
    X: torch.Tensor
    X2: torch.Tensor


def tokens(vocab: int, length: int, pad: int | None = None) -> Callable[[int, torch.Generator], torch.Tensor]:
    """A sample generator of token ids ``[n, length]`` in ``0 … vocab-1``; with ``pad``, every sequence's last
    position is ``pad`` (a padding index)."""

    def draw(n: int, g: torch.Generator) -> torch.Tensor:
        ids = torch.randint(0, vocab, (n, length), generator=g)
        if pad is not None:
            ids[:, -1] = pad
        return ids

    return draw


def _draw(sample: Sample, n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if callable(sample):
        x = sample(n, g)
    else:
        x = torch.randn(n, *sample, generator=g)
    return x.to(F64) if x.is_floating_point() else x


def _under_test(p) -> list:
    """The plan's records of the layers of ``body``."""
    return [L for L in p.layers if L.name == "body" or L.name.startswith("body.")]


def _plan_row(p, name: str) -> str:
    """The printed plan's table row of layer ``name``."""
    rows = [line for line in str(p).splitlines() if line.split(" ", 1)[0] == name]
    assert rows, f"no row for layer {name!r} in the plan:\n{p}"
    return rows[0]


def _offered(net: nn.Module, name: str) -> tuple[str, ...]:
    rule, why = rule_for(net.get_submodule(name))
    assert rule is not None, f"layer {name!r} has no rule ({why or 'none registered'})"
    return RULE_ROUTES if rule.factorizable else ("materialized",)


def check_layer_rule(
    make_module: Callable[[], nn.Module],
    sample: Sample,
    *,
    call: Callable | None = None,
    outputs: Iterable[str] = ("trace", "full"),
    of: Iterable[str] = ("output", "loss"),
    diagonal: bool = True,
    trapezoid: bool = True,
    exact: bool = False,
    expect_route: str | dict[str, str] | None = None,
    reason: str | dict[str, str] | None = None,
    tol: float = RTOL[F64],
    n: int = 4,
    m: int = 3,
    seed: int = 0,
):
    """Check the layer rule of ``make_module()`` against the float64 oracle on samples of shape ``sample``.

    Args:
        make_module: builds the module under test (it may hold several layers, e.g. a Linear and a norm).
        sample: one sample's shape (standard normal floats) or a generator ``(n, torch.Generator) -> [n, …]``.
        call: how the model calls the module, ``call(body, x) -> tensor`` (default ``body(x)``).
        outputs: the Gram layouts to check (``"trace"``, ``"full"``).
        of: ``"output"`` (the Gram) and/or ``"loss"`` (the cross-entropy loss kernel).
        diagonal, trapezoid: also check ``diagonal=True`` and ``rule="trapezoid"``.
        exact: also check ``rule="exact"`` (3 nodes; asymmetric, never mirrored) against ``method="jacobian"``
            (the oracle has no quadrature), with ``X2 = None`` and with X2.
        expect_route: the route ``method="auto"`` must give the layers of the module (one string, or
            ``{layer name: route}`` for some of them, names as in the plan: ``"body"``, ``"body.out_proj"``).
            Default: a route of the layer's rule for every layer (never ``"jacobian"``).
        reason: text that the printed plan's row of the module's layer (or ``{layer name: text}``) must hold.
        tol: relative Frobenius tolerance.
        n, m: sizes of the two sample sets.

    Returns:
        :class:`Checked`: the ``auto`` plan, the model, its trajectory and the two sample sets.
    """
    torch.manual_seed(seed)
    body = make_module()
    x1 = _draw(sample, 1, seed + 99)
    with torch.no_grad():
        width = (body(x1.float() if x1.is_floating_point() else x1) if call is None
                 else call(body, x1.float() if x1.is_floating_point() else x1)).flatten(1).shape[1]
    net = Wrapped(body, width, call).to(F64)
    traj = random_trajectory(net, steps=2, scale=0.2, seed=seed)
    X, X2 = _draw(sample, n, seed + 1), _draw(sample, m, seed + 2)

    # ------------------------------------------------------------------ the plan: routed through the rule
    p = pkfast.plan(net, traj, X, dtype=F64)
    layers = _under_test(p)
    assert layers, f"the module under test has no parameterised layer in the plan:\n{p}"
    auto = {L.name: str(L.method) for L in layers}
    want = dict.fromkeys(auto, expect_route) if isinstance(expect_route, str) else dict(expect_route or {})
    for name, route in auto.items():
        if name in want:
            assert route == want[name], f"{name}: route {route!r}, expected {want[name]!r}\n{p}"
        else:
            assert route in _offered(net, name), f"{name}: route {route!r}, not its rule's\n{p}"
    if reason is not None:
        for name, text in (dict.fromkeys(auto, reason) if isinstance(reason, str) else reason).items():
            assert text in _plan_row(p, name), f"{name}: {text!r} not in the plan\n{p}"
    ruled = [name for name in auto if name not in want or want[name] in RULE_ROUTES]
    offered = {name: _offered(net, name) for name in ruled}
    methods = ["auto"] + [r for r in RULE_ROUTES if any(r in o for o in offered.values())]
    for method in methods[1:]:  # a forced route is taken by every layer that offers it
        forced = {L.name: str(L.method) for L in _under_test(pkfast.plan(net, traj, X, method=method, dtype=F64))}
        for name, o in offered.items():
            assert forced[name] == (method if method in o else auto[name]), (method, name, forced[name])

    # ------------------------------------------------------------------ every route against the oracle
    def agree(ref, what, **kw):
        for method in methods:
            K = pkfast.gram(net, traj, method=method, dtype=F64, progress=False, **kw)
            assert K.shape == ref.shape, (what, method, K.shape, ref.shape)
            err = rel_err(K, ref)
            assert err <= tol, f"{what}, method={method!r}: relative error {err:.3g} > {tol:g}"

    of = tuple(of)
    if "output" in of:
        for out in outputs:
            for x2, side in ((None, "X2=None"), (X2, "X2")):
                agree(gram_reference(net, traj, X, x2, outputs=out), f"{out} Gram, {side}", X=X, X2=x2, outputs=out)
            if diagonal:
                agree(gram_reference(net, traj, X, outputs=out, diagonal=True), f"{out} diagonal", X=X,
                      outputs=out, diagonal=True)
        if trapezoid:
            agree(gram_reference(net, traj, X, X2, rule="trapezoid"), "trapezoid", X=X, X2=X2, rule="trapezoid")
        if exact:
            for x2, side in ((None, "X2=None"), (X2, "X2")):
                kw = dict(X=X, X2=x2, rule="exact", nodes=3)
                agree(pkfast.gram(net, traj, method="jacobian", dtype=F64, progress=False, **kw),
                      f"exact rule, {side}", **kw)
    if "loss" in of:
        g = torch.Generator().manual_seed(seed + 3)
        y, y2 = torch.randint(0, C, (n,), generator=g), torch.randint(0, C, (m,), generator=g)
        ce = lambda o, t: F.cross_entropy(o, t)  # noqa: E731  (one sample: its own loss)
        kw = dict(of="loss", loss="cross_entropy", y=y)
        agree(loss_kernel_reference(net, traj, X, y, X2, y2, per_sample=ce), "loss kernel", X=X, X2=X2, y2=y2, **kw)
        if diagonal:
            agree(loss_kernel_reference(net, traj, X, y, per_sample=ce, diagonal=True), "loss diagonal", X=X,
                  diagonal=True, **kw)
    return Checked(p, net, traj, X, X2)
