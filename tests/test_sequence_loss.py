"""Sequence losses and any per-sample loss: ``of="loss"`` for outputs [n, L, V] with token targets
[n, L] (ignored tokens excluded, mean or sum over a sample's tokens) and for a callable ``(outputs, targets) ->
[n]``, against an oracle written with ``F.cross_entropy`` and autograd loops (≤ 1e-10 in float64)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import pkfast
from tests._util import RTOL, rel_err
from tests._util import loss_kernel_reference as _loss_kernel_reference
from tests.models import random_trajectory

F64 = torch.float64
V, L = 11, 6


class TinyLM(nn.Module):
    """Token ids [n, L] → embedding → Linear+tanh → LayerNorm → Linear to V logits per position: [n, L, V]."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(V, 8)
        self.mix = nn.Linear(8, 8)
        self.norm = nn.LayerNorm(8)
        self.out = nn.Linear(8, V)

    def forward(self, ids):
        return self.out(self.norm(torch.tanh(self.mix(self.emb(ids)))))


def _data(n: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, V, (n, L), generator=g)
    y = torch.randint(0, V, (n, L), generator=g)
    y[:, -2:] = -100  # padding at the end of every sequence
    y[0, :3] = -100   # and a sample with few counted tokens
    return ids, y


def token_ce(out: torch.Tensor, y: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """The oracle's per-sample loss: F.cross_entropy over one sample's tokens (mean over counted tokens)."""
    return F.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1), ignore_index=-100, reduction=reduction)


def loss_kernel_reference(model, traj, X, Y, X2=None, Y2=None, per_sample=token_ce, diagonal=False):
    """Σ_s ε_s ∇ℓ(x_a; w_s)·∇ℓ(x′_b; w_s) by autograd, one sample at a time, in float64 (token cross-entropy by
    default; :func:`tests._util.loss_kernel_reference`)."""
    return _loss_kernel_reference(model, traj, X, Y, X2, Y2, per_sample=per_sample, diagonal=diagonal)


@pytest.fixture(scope="module")
def lm():
    torch.manual_seed(0)
    net = TinyLM().to(F64)
    return net, random_trajectory(net, steps=2, scale=0.2)


@pytest.mark.parametrize("method", ["auto", "jacobian", "materialized"])
def test_token_cross_entropy_kernel_equals_the_oracle(lm, method):
    net, traj = lm
    X, Y = _data(5, 1)
    X2, Y2 = _data(3, 2)
    kw = dict(of="loss", loss=nn.CrossEntropyLoss(), dtype=F64, method=method, progress=False)
    K = pkfast.gram(net, traj, X, y=Y, **kw)
    assert K.shape == (5, 5)
    assert rel_err(K, loss_kernel_reference(net, traj, X, Y)) <= RTOL[F64]
    Kx = pkfast.gram(net, traj, X, X2, y=Y, y2=Y2, **kw)
    assert rel_err(Kx, loss_kernel_reference(net, traj, X, Y, X2, Y2)) <= RTOL[F64]
    kd = pkfast.gram(net, traj, X, y=Y, diagonal=True, **kw)
    assert rel_err(kd, loss_kernel_reference(net, traj, X, Y, diagonal=True)) <= RTOL[F64]


def test_sum_over_tokens_and_a_callable_loss(lm):
    net, traj = lm
    X, Y = _data(4, 3)
    Ks = pkfast.gram(net, traj, X, of="loss", loss=nn.CrossEntropyLoss(reduction="sum"), y=Y, dtype=F64,
                     progress=False)
    ref = loss_kernel_reference(net, traj, X, Y, per_sample=lambda o, y: token_ce(o, y, "sum"))
    assert rel_err(Ks, ref) <= RTOL[F64]

    def smooth_l1(out, y):  # a per-sample loss of the user's: [n, L, V] logits vs one-hot-ish targets → [n]
        target = F.one_hot(y.clamp(min=0), V).to(out.dtype) * (y >= 0).to(out.dtype)[..., None]
        return F.smooth_l1_loss(out.softmax(-1), target, reduction="none").sum(dim=(1, 2))

    Kc = pkfast.gram(net, traj, X, of="loss", loss=smooth_l1, y=Y, dtype=F64, progress=False)
    assert rel_err(Kc, loss_kernel_reference(net, traj, X, Y, per_sample=smooth_l1)) <= RTOL[F64]
    Kcj = pkfast.gram(net, traj, X, of="loss", loss=smooth_l1, y=Y, dtype=F64, method="jacobian", progress=False)
    assert rel_err(Kcj, Kc) <= RTOL[F64]


@pytest.mark.parametrize("module", [nn.CrossEntropyLoss(), nn.CrossEntropyLoss(reduction="sum"),
                                    nn.CrossEntropyLoss(weight=torch.rand(V, dtype=F64) + 0.5, label_smoothing=0.1),
                                    nn.CrossEntropyLoss(ignore_index=3)])
def test_the_batch_decomposition_reproduces_pytorch_on_flattened_tokens(module):
    """Σ_i λ_i ℓ_i with ℓ_i the mean (or sum) over a sample's tokens is exactly the module on the batch's
    flattened tokens — the convention of language-model training."""
    g = torch.Generator().manual_seed(0)
    out = torch.randn(4, L, V, generator=g, dtype=F64)
    y = torch.randint(0, V, (4, L), generator=g)
    y[1, 2:] = module.ignore_index
    spec = pkfast.LossSpec.from_module(module)
    torch.testing.assert_close(spec.batch_loss(out, y), module(out.reshape(-1, V), y.reshape(-1)), rtol=1e-12,
                               atol=1e-12)


def test_a_recorded_language_model_is_an_exact_kernel_machine(tmp_path):
    torch.manual_seed(0)
    net = TinyLM().to(F64)
    X, Y = _data(8, 4)
    opt, lossf = torch.optim.SGD(net.parameters(), lr=0.3, momentum=0.5), nn.CrossEntropyLoss()
    with pkfast.TrajectoryRecorder(net, opt, tmp_path / "t", loss=lossf, targets=Y) as rec:
        for s in range(4):
            idx = torch.arange(s % 2 * 4, s % 2 * 4 + 4)
            opt.zero_grad()
            lossf(net(X[idx]).reshape(-1, V), Y[idx].reshape(-1)).backward()
            opt.step()
            rec.step(batch_indices=idx)
    km = pkfast.KernelMachine(net, pkfast.Trajectory.load(tmp_path / "t"), X, nodes=4, progress=False)
    Xq, _ = _data(3, 5)
    with torch.no_grad():
        want = net(Xq).reshape(3, -1)
    assert torch.allclose(km.predict(Xq), want, atol=1e-9)
    assert km.certificate(Xq).update.max() < 1e-10  # the recorded steps are the recomputed token-loss steps


def test_sketched_sequence_loss_features(lm):
    net, traj = lm
    X, Y = _data(4, 6)
    K = pkfast.gram(net, traj, X, of="loss", loss="cross_entropy", y=Y, dtype=F64, progress=False)
    G = torch.stack([pkfast.sketch(net, traj, X, k=512, seed=s, of="loss", loss="cross_entropy", y=Y, dtype=F64,
                                   progress=False).gram() for s in range(8)]).mean(0)
    assert rel_err(G, K) < 0.1  # unbiased: the mean of 8 sketches at k = 512 is within a few percent


def test_sequence_and_callable_loss_errors(lm):
    net, traj = lm
    X, Y = _data(4, 7)
    with pytest.raises(ValueError, match=r"targets y have 5 tokens per sample \(shape \(4, 5\)\), but the model has 66 "
                                         r"outputs per sample: expected outputs \[n, 5, V\]"):
        pkfast.gram(net, traj, X, of="loss", loss="cross_entropy", y=Y[:, :5], progress=False)
    bad = Y.clone()
    bad[0, 0] = V
    with pytest.raises(ValueError, match=rf"y holds class {V}; the model has {V} classes"):
        pkfast.gram(net, traj, X, of="loss", loss="cross_entropy", y=bad, progress=False)
    with pytest.raises(ValueError, match=r"must return per-sample losses of shape \[n\]; for n = 1 it returned \(\) "
                                         r"\(a reduced loss\?"):
        pkfast.gram(net, traj, X, of="loss", loss=lambda o, y: token_ce(o, y), y=Y, progress=False)
    with pytest.raises(ValueError, match=r"the recorded loss is a Python callable"):
        pkfast.LossSpec.from_module({"kind": "callable", "name": "mod.f"})
