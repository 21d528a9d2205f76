"""KernelMachine through the layer routes: per-sample gradients formed from captured factors — the query
side accumulated into the momentum recursion layer block by layer block — give the same contributions, predictions,
bias, explanations and certificates as every gradient taken by vmap(jacrev) (the earlier implementation's route), to
1e-10 relative in float64, for plain SGD, momentum, dampening, Nesterov and weight decay, on an MLP, a CNN with
grouped convolutions and a model with an embedding, a LayerNorm and a bare parameter.

Public seams only: the reference machine is built with every layer rule unregistered (:func:`no_layer_rules`: every
gradient by vmap(jacrev)), and whether the layer routes are in use is seen by spying on the registered rules'
documented methods (:class:`pkfast.layers.LayerRule` ``unfold``: factors captured; ``input_gram``: a pair of
per-sample gradients from the two sides' factors)."""

from __future__ import annotations

import contextlib
from collections import Counter

import pytest
import torch
import torch.nn as nn

import pkfast
from pkfast.layers import register, registered, unregister
from tests.models import SmallCNN
from tests.machine.test_exact_machine import rel, train


class Tokens(nn.Module):
    """Token ids [n, 5] → embedding → LayerNorm → Linear → tanh → mean → Linear, times a bare scale: [n, 3]."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(50, 16)  # wide enough that its pairs come from factors (blocked in the sweep)
        self.norm = nn.LayerNorm(16)
        self.fc = nn.Linear(16, 8)
        self.out = nn.Linear(8, 3)
        self.scale = nn.Parameter(torch.tensor(1.3))

    def forward(self, t):
        return self.out(torch.tanh(self.fc(self.norm(self.emb(t)))).mean(1)) * self.scale


def _model(kind):
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    if kind == "mlp":
        m = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 3))
        X, Xq = torch.randn(24, 4, generator=g), torch.randn(5, 4, generator=g)
    elif kind == "cnn":
        m = SmallCNN()
        X, Xq = torch.randn(24, 1, 6, 6, generator=g), torch.randn(5, 1, 6, 6, generator=g)
    else:
        m = Tokens()
        X, Xq = torch.randint(0, 9, (24, 5), generator=g), torch.randint(0, 9, (5, 5), generator=g)
    m = m.double()
    if X.is_floating_point():
        X, Xq = X.double(), Xq.double()
    C = 4 if kind == "cnn" else 3
    y = torch.randint(0, C, (24,), generator=g)
    return m, X, y, Xq


@contextlib.contextmanager
def no_layer_rules():
    """Every layer rule unregistered for the block (each parameter's gradient then by vmap(jacrev)), restored after."""
    rules = registered()
    for t in rules:
        unregister(t)
    try:
        yield
    finally:
        for t, rule in rules.items():
            register(t, rule, replace=True)


@pytest.fixture
def rule_calls(monkeypatch):
    """Counts calls of the registered rules' ``unfold`` and ``input_gram``, by (method, module type name)."""
    calls = Counter()
    for t, rule in registered().items():
        for meth in ("unfold", "input_gram"):
            orig = getattr(rule, meth)

            def spy(*a, _orig=orig, _key=(meth, t.__name__), **k):
                calls[_key] += 1
                return _orig(*a, **k)

            monkeypatch.setattr(rule, meth, spy)  # on the instance: shared by every type it serves
    return calls


def _steps_per_block(km, steps: int) -> None:
    """Make the sweep take the recorded steps ``steps`` at a time. NO PUBLIC SEAM: the block size follows from the
    memory budget, but a budget small enough for one-step blocks also shrinks the batch-gradient cache and the
    query chunk (every later sweep then recomputes the training side: ~5× the test's time), so this sets the
    sweep's block directly — the one private attribute these tests touch."""
    km._sweeper.block = steps


@pytest.mark.parametrize("block", [1, 4])
@pytest.mark.parametrize("kind", ["mlp", "cnn", "tokens"])
@pytest.mark.parametrize("opt", [dict(), dict(momentum=0.9, weight_decay=1e-2), dict(momentum=0.8, dampening=0.3),
                                 dict(momentum=0.9, nesterov=True, weight_decay=5e-3)],
                         ids=["sgd", "momentum+wd", "dampening", "nesterov+wd"])
def test_layer_routes_equal_the_jacobian_route(tmp_path, kind, opt, block, rule_calls):
    """Blocks of one step, or of four (6 steps: a full block and a shorter one)."""
    model, X, y, Xq = _model(kind)
    traj = train(tmp_path, model, X, y, steps=6, lr=0.1, batch=6, **opt)
    km = pkfast.KernelMachine(model, traj, X, nodes=2, progress=False)
    _steps_per_block(km, block)
    c = km.contributions(Xq, per_step=True)
    used = {meth for meth, _ in rule_calls}
    assert "unfold" in used  # layer routes in use: per-sample gradients from captured factors
    assert "input_gram" in used  # pairs from both sides' factors (at least the S = 1 heads factorise)
    if kind == "tokens":  # an embedding's pairs too (its inputs are indices)
        assert rule_calls["input_gram", "Embedding"] > 0, rule_calls
    got = dict(bias=km.bias(Xq), predict=km.predict(Xq), explain=km.explain(Xq[0], k=3), cert=km.certificate(Xq[:2]))
    before = sum(rule_calls.values())
    with no_layer_rules():
        ref = pkfast.KernelMachine(model, traj, X, nodes=2, progress=False)
        c_ref = ref.contributions(Xq, per_step=True)
        want = dict(bias=ref.bias(Xq), predict=ref.predict(Xq), explain=ref.explain(Xq[0], k=3),
                    cert=ref.certificate(Xq[:2]))
    assert sum(rule_calls.values()) == before  # the reference used no rule
    assert rel(c, c_ref) <= 1e-10
    assert rel(got["bias"], want["bias"]) <= 1e-10
    f = model(Xq).detach()
    assert rel(got["predict"], f) <= 1e-5  # the network itself, to the quadrature's precision (nodes 2, lr 0.1)
    assert rel(got["predict"], want["predict"]) <= 1e-10
    e, e_ref = got["explain"], want["explain"]
    assert torch.equal(e.proponents, e_ref.proponents) and torch.equal(e.opponents, e_ref.opponents)
    cert, cert_ref = got["cert"], want["cert"]
    assert float(cert.update.max()) < 1e-10 and torch.allclose(cert.update, cert_ref.update, rtol=0, atol=1e-12)


def test_contributions_written_to_disk_chunk_by_chunk(tmp_path):
    """contributions(out=…) writes [M, N, C] (or per step [T, M, N, C]) query chunk by query chunk into a .npy
    equal to the in-memory result; a small memory budget forces several chunks."""
    import numpy as np

    model, X, y, Xq = _model("mlp")
    traj = train(tmp_path, model, X, y, steps=4, lr=0.1, batch=6, momentum=0.9)
    # a block's batch gradients must fit a quarter of the budget: this one takes the steps one at a time, the
    # default budget all 4 recorded steps in one block
    km = pkfast.KernelMachine(model, traj, X, nodes=2, progress=False, memory_budget=2 * 3 * 3 * 147 * 8)
    assert km.query_chunk < Xq.shape[0]  # chunked
    big = pkfast.KernelMachine(model, traj, X, nodes=2, progress=False)
    assert big.query_chunk >= Xq.shape[0]
    torch.testing.assert_close(km.contributions(Xq), big.contributions(Xq), rtol=1e-12, atol=1e-15)
    for per_step in (False, True):
        path = tmp_path / f"c{per_step}.npy"
        got = km.contributions(Xq, per_step=per_step, out=path)
        assert isinstance(got, np.memmap) and got.dtype == np.float64
        np.testing.assert_array_equal(np.load(path), km.contributions(Xq, per_step=per_step).numpy())
    with pytest.raises(ValueError, match=r"out must be a path ending in .npy"):
        km.contributions(Xq, out=tmp_path / "c.txt")
