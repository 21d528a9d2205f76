"""Factors from batched passes (issue 15 §2, where every parameter has a layer rule): one batched forward and C
batched backward passes instead of vmap(jacrev), the same numbers; calls that are not batch-first use vmap."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import pkfast
from pkfast.reference import gram_reference
from pkfast.engine import capture
from tests._util import RTOL, rel_err
from tests.models import SmallCNN, mlp, random_trajectory
from tests.test_sequence_loss import TinyLM, _data, loss_kernel_reference

F64 = torch.float64


@pytest.fixture
def count(monkeypatch):
    """How many chunks each capture path formed."""
    used = {"batched": 0, "vmap": 0}
    orig = capture.Capture._batched

    def spy(self, *a, **k):
        r = orig(self, *a, **k)
        used["batched" if r is not None else "vmap"] += 1
        return r

    monkeypatch.setattr(capture.Capture, "_batched", spy)
    return used


def _both(monkeypatch, *args, **kw):
    """The Gram with batched capture (default) and with it switched off (the vmap pass)."""
    K = pkfast.gram(*args, **kw)
    orig = capture.Capture.__init__

    def off(self, *a, **k):
        orig(self, *a, **k)
        self.batched = False

    monkeypatch.setattr(capture.Capture, "__init__", off)
    Kv = pkfast.gram(*args, **kw)
    monkeypatch.setattr(capture.Capture, "__init__", orig)
    return K, Kv


@pytest.mark.parametrize("outputs", ["trace", "full"])
@pytest.mark.parametrize("rule", ["left", "exact"])
def test_batched_capture_equals_the_reference_and_the_vmap_pass(monkeypatch, count, outputs, rule):
    for make, data in ((lambda: mlp(), lambda n: torch.randn(n, 5)),
                       (SmallCNN, lambda n: torch.randn(n, 1, 6, 6)),
                       (lambda: nn.Sequential(nn.Linear(5, 6), nn.LayerNorm(6), nn.Tanh(), nn.Linear(6, 3)),
                        lambda n: torch.randn(n, 5))):
        torch.manual_seed(0)
        net = make().to(F64)
        traj = random_trajectory(net, steps=2, scale=0.2)
        X, X2 = data(5).to(F64), data(3).to(F64)
        kw = dict(outputs=outputs, rule=rule, dtype=F64, progress=False)
        K, Kv = _both(monkeypatch, net, traj, X, X2, **kw)
        assert rel_err(K, Kv) <= RTOL[F64]
        if rule == "left":
            assert rel_err(K, gram_reference(net, traj, X, X2, outputs=outputs)) <= RTOL[F64]
    assert count["batched"] > 0


def test_batched_capture_of_a_sequence_loss_kernel(monkeypatch, count):
    torch.manual_seed(0)
    net = TinyLM().to(F64)
    traj = random_trajectory(net, steps=2, scale=0.2)
    X, Y = _data(5, 1)
    K = pkfast.gram(net, traj, X, of="loss", loss="cross_entropy", y=Y, dtype=F64, progress=False)
    assert count["batched"] > 0 and count["vmap"] == 0
    assert rel_err(K, loss_kernel_reference(net, traj, X, Y)) <= RTOL[F64]


def test_a_call_that_is_not_batch_first_uses_the_vmap_pass(count):
    class PositionsFirst(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(3, 4)
            self.head = nn.Linear(4, 2)

        def forward(self, x):  # x [n, L, 3] → the Linear sees [L, n, 3]
            return self.head(torch.tanh(self.lin(x.transpose(0, 1))).mean(0))

    torch.manual_seed(0)
    net = PositionsFirst().to(F64)
    traj = random_trajectory(net, steps=1)
    X = torch.randn(4, 5, 3, dtype=F64)
    K = pkfast.gram(net, traj, X, dtype=F64, progress=False)
    assert count["vmap"] >= 1  # the batched pass declined (and stays off for this route)
    assert rel_err(K, gram_reference(net, traj, X)) <= RTOL[F64]


class WithPositions(nn.Module):
    """Tokens plus a positional embedding of ``arange(L)``: a call every sample shares (no batch axis).
    ``mix=True`` also averages the positional output over its first axis — which, once the batched pass gives
    that output a batch axis, mixes the samples: the check against the vmap pass must catch it."""

    def __init__(self, mix: bool = False) -> None:
        super().__init__()
        self.tok, self.pos, self.out = nn.Embedding(7, 4), nn.Embedding(5, 4), nn.Linear(4, 3)
        self.mix = mix

    def forward(self, ids):
        pe = self.pos(torch.arange(ids.shape[1]))
        if self.mix:
            pe = pe + pe.mean(dim=0, keepdim=True)
        return self.out(torch.tanh(self.tok(ids) + pe)).sum(1)


@pytest.mark.parametrize("mix", [False, True])
def test_a_call_shared_by_all_samples(count, mix):
    """A shared call gets a probe with a batch axis in the batched pass (the same numbers as the reference);
    where that would mix samples, the first chunk's check against the vmap pass keeps the vmap pass."""
    torch.manual_seed(0)
    net = WithPositions(mix).to(F64)
    traj = random_trajectory(net, steps=2)
    X, X2 = torch.randint(0, 7, (6, 5)), torch.randint(0, 7, (4, 5))
    K = pkfast.gram(net, traj, X, X2, outputs="full", dtype=F64, progress=False)
    assert rel_err(K, gram_reference(net, traj, X, X2, outputs="full")) <= RTOL[F64]
    if mix:
        assert count["vmap"] >= 1 and count["batched"] == 0
    else:
        assert count["batched"] > 0 and count["vmap"] == 0


def test_the_plan_says_how_the_factors_are_obtained():
    class WithScale(nn.Module):  # a bare parameter: no layer rule, probed where it meets the samples
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(3, 2)
            self.scale = nn.Parameter(torch.ones(2))

        def forward(self, x):
            return self.lin(x) * self.scale

    torch.manual_seed(0)
    X = torch.randn(5, 3)
    net = mlp(d_in=3, hidden=4, d_out=2)
    assert "factors from one batched forward and 2 backward passes per chunk" in str(
        pkfast.plan(net, random_trajectory(net, steps=1), X, outputs="full"))
    net = WithScale()
    assert ("factors from one batched forward and 2 backward passes per chunk; parameters without a layer rule "
            "(scale) by probes where they meet the samples") in str(
        pkfast.plan(net, random_trajectory(net, steps=1), X, method="materialized"))
