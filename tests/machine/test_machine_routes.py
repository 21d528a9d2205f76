"""KernelMachine through the layer routes (issue 17): per-sample gradients formed from captured factors — the query
side accumulated into the momentum recursion layer block by layer block — give the same contributions, predictions,
bias, explanations and certificates as every gradient taken by vmap(jacrev) (the earlier implementation's route), to
1e-10 relative in float64, for plain SGD, momentum, dampening, Nesterov and weight decay, on an MLP, a CNN with
grouped convolutions and a model with an embedding, a LayerNorm and a bare parameter."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import pkfast
from pkfast.machine.panels import Panels
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


def _reference(km):
    """The same machine with every gradient by vmap(jacrev)."""
    km._sweeper.set_panels(Panels(km.fm, km.X, routed=False), Panels(km.fm_loss, km.X, routed=False))
    return km


@pytest.mark.parametrize("block", [1, 4])
@pytest.mark.parametrize("kind", ["mlp", "cnn", "tokens"])
@pytest.mark.parametrize("opt", [dict(), dict(momentum=0.9, weight_decay=1e-2), dict(momentum=0.8, dampening=0.3),
                                 dict(momentum=0.9, nesterov=True, weight_decay=5e-3)],
                         ids=["sgd", "momentum+wd", "dampening", "nesterov+wd"])
def test_layer_routes_equal_the_jacobian_route(tmp_path, kind, opt, block):
    model, X, y, Xq = _model(kind)
    traj = train(tmp_path, model, X, y, steps=6, lr=0.1, batch=6, **opt)
    km = pkfast.KernelMachine(model, traj, X, nodes=2, progress=False)
    assert km._sweeper.panels.capture is not None and km._sweeper.panels.capture.hooked  # layer routes in use
    sw = km._sweeper
    assert any(sw.blocked)  # pairs from both sides' factors in use (at least the S = 1 heads factorise)
    if kind == "tokens":  # an embedding's pairs too (its inputs are indices)
        assert [L.name for (L, _, _), b in zip(sw.slots, sw.blocked) if b and L is not None][0] == "emb"
    sw.block = block  # steps one by one, or blocks (6 steps: full blocks and a shorter one)
    ref = _reference(pkfast.KernelMachine(model, traj, X, nodes=2, progress=False))
    assert ref._sweeper.panels.capture is None and not any(ref._sweeper.blocked)
    c, c_ref = km.contributions(Xq, per_step=True), ref.contributions(Xq, per_step=True)
    assert rel(c, c_ref) <= 1e-10
    assert rel(km.bias(Xq), ref.bias(Xq)) <= 1e-10
    f = model(Xq).detach()
    assert rel(km.predict(Xq), f) <= 1e-5  # the network itself, to the quadrature's precision (nodes 2, lr 0.1)
    assert rel(km.predict(Xq), ref.predict(Xq)) <= 1e-10
    e, e_ref = km.explain(Xq[0], k=3), ref.explain(Xq[0], k=3)
    assert torch.equal(e.proponents, e_ref.proponents) and torch.equal(e.opponents, e_ref.opponents)
    cert, cert_ref = km.certificate(Xq[:2]), ref.certificate(Xq[:2])
    assert float(cert.update.max()) < 1e-10 and torch.allclose(cert.update, cert_ref.update, rtol=0, atol=1e-12)


def test_contributions_written_to_disk_chunk_by_chunk(tmp_path):
    """contributions(out=…) writes [M, N, C] (or per step [T, M, N, C]) query chunk by query chunk into a .npy
    equal to the in-memory result; a small memory budget forces several chunks."""
    import numpy as np

    model, X, y, Xq = _model("mlp")
    traj = train(tmp_path, model, X, y, steps=4, lr=0.1, batch=6, momentum=0.9)
    km = pkfast.KernelMachine(model, traj, X, nodes=2, progress=False, memory_budget=2 * 3 * 3 * 147 * 8)
    assert km.query_chunk < Xq.shape[0]  # chunked
    assert km._sweeper.block == 1  # a block's batch gradients must fit a quarter of the budget: one step at a time
    big = pkfast.KernelMachine(model, traj, X, nodes=2, progress=False)
    assert big._sweeper.block == 4  # (4 steps recorded: one block)
    torch.testing.assert_close(km.contributions(Xq), big.contributions(Xq), rtol=1e-12, atol=1e-15)
    for per_step in (False, True):
        path = tmp_path / f"c{per_step}.npy"
        got = km.contributions(Xq, per_step=per_step, out=path)
        assert isinstance(got, np.memmap) and got.dtype == np.float64
        np.testing.assert_array_equal(np.load(path), km.contributions(Xq, per_step=per_step).numpy())
    with pytest.raises(ValueError, match=r"out must be a path ending in .npy"):
        km.contributions(Xq, out=tmp_path / "c.txt")
