"""Parameters without a layer rule in the batched pass (issue 28, item 0): a bare nn.Parameter added to the tokens,
a ViT cls token and positional embedding, a layer scale, a custom norm's gain, a learned temperature — their
per-sample gradients from probes where they meet the samples (pkfast.engine.capture.entry), the rest of the
model staying on the batched pass; exact against the float64 references. Entries that cannot be probed (a bare
weight in F.linear, an in-place add) keep the vmap pass, exactly and with the reason in the plan."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import pkfast
from pkfast.engine import costs
from pkfast.engine.capture.entry import EntryProbes
from pkfast.reference import gram_reference
from tests._util import RTOL, rel_err
from tests.engine.test_capture import count  # noqa: F401  (the fixture: chunks per capture path)
from tests.models import random_trajectory
from tests.test_sequence_loss import loss_kernel_reference

F64 = torch.float64
D, L = 6, 5


class PosLM(nn.Module):
    """Tokens plus a bare positional parameter sliced to the sequence length."""

    def __init__(self):
        super().__init__()
        self.emb, self.pos = nn.Embedding(11, D), nn.Parameter(0.3 * torch.randn(L + 2, D))
        self.lin, self.head = nn.Linear(D, D), nn.Linear(D, 3)

    def forward(self, x):
        return self.head(torch.tanh(self.lin(self.emb(x) + self.pos[: x.shape[1]])))


class ViTish(nn.Module):
    """A cls token expanded over the batch and concatenated, a [1, L+1, d] positional embedding added."""

    def __init__(self):
        super().__init__()
        self.proj, self.ln, self.head = nn.Linear(4, D), nn.LayerNorm(D), nn.Linear(D, 3)
        self.cls, self.pe = nn.Parameter(torch.randn(1, 1, D)), nn.Parameter(0.3 * torch.randn(1, L + 1, D))

    def forward(self, x):
        h = torch.cat([self.cls.expand(x.shape[0], -1, -1), self.proj(x)], dim=1) + self.pe
        return self.head(torch.tanh(self.ln(h))[:, 0])


class GainNorm(nn.Module):
    """An RMSNorm written by hand (no rule: its own module type), its gain a plain parameter."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.rand(D) + 0.5)

    def forward(self, x):
        return self.weight * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)


class ScaledBlock(nn.Module):
    """A residual block with a layer scale, a hand-written norm and a learned temperature on the logits."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.head = nn.Linear(4, D), nn.Linear(D, D), nn.Linear(D, 2)
        self.gamma, self.norm, self.t = nn.Parameter(torch.rand(D)), GainNorm(), nn.Parameter(torch.tensor(0.3))

    def forward(self, x):
        h = torch.tanh(self.a(x))
        h = self.norm(h + self.gamma * torch.tanh(self.b(h)))
        return self.head(h) / self.t.exp()


class BareLinear(nn.Module):
    """A bare weight applied by F.linear: its entry is a product, not an elementwise op."""

    def __init__(self):
        super().__init__()
        self.W, self.head = nn.Parameter(0.5 * torch.randn(D, 4)), nn.Linear(D, 2)

    def forward(self, x):
        return self.head(torch.tanh(nn.functional.linear(x, self.W)))


class InPlace(nn.Module):
    """A bare offset added in place to an activation."""

    def __init__(self):
        super().__init__()
        self.a, self.off, self.head = nn.Linear(4, D), nn.Parameter(torch.randn(D)), nn.Linear(D, 2)

    def forward(self, x):
        h = self.a(x)
        h += self.off
        return self.head(torch.tanh(h))


CASES = {"pos": (PosLM, lambda n: torch.randint(0, 11, (n, L))),
         "vit": (ViTish, lambda n: torch.randn(n, L, 4, dtype=F64)),
         "scaled": (ScaledBlock, lambda n: torch.randn(n, 4, dtype=F64))}


def _net(make):
    torch.manual_seed(0)
    net = make().to(F64)
    return net, random_trajectory(net, steps=2, scale=0.2)


@pytest.mark.parametrize("outputs", ["trace", "full"])
@pytest.mark.parametrize("case", list(CASES))
def test_parameters_without_a_rule_stay_on_the_batched_pass_exactly(count, case, outputs):
    make, data = CASES[case]
    net, traj = _net(make)
    X, X2 = data(5), data(3)
    K = pkfast.gram(net, traj, X, X2, outputs=outputs, dtype=F64, progress=False)
    assert rel_err(K, gram_reference(net, traj, X, X2, outputs=outputs)) <= RTOL[F64]
    assert count["batched"] > 0 and count["vmap"] == 0, count
    plan = str(pkfast.plan(net, traj, X, outputs=outputs, dtype=F64))
    assert "by probes where they meet the samples" in plan, plan


def test_a_loss_kernel_over_tokens_with_a_bare_positional_parameter(count):
    net, traj = _net(PosLM)
    X = torch.randint(0, 11, (6, L))
    Y = torch.randint(0, 3, (6, L))
    K = pkfast.gram(net, traj, X, of="loss", loss="cross_entropy", y=Y, dtype=F64, progress=False)
    assert rel_err(K, loss_kernel_reference(net, traj, X, Y)) <= RTOL[F64]
    assert count["batched"] > 0 and count["vmap"] == 0, count


def test_many_chunks_and_a_ragged_last_one(count, monkeypatch):
    """Only the first chunk compares the entry op with and without the copies, and the vmap pass; the later
    chunks (a smaller last one too) give the same numbers."""
    monkeypatch.setattr(costs, "DEFAULT_CHUNK_BYTES", 1)  # one sample per chunk is the floor: use a few
    monkeypatch.setattr(costs, "MAX_CHUNK", 2)
    net, traj = _net(ViTish)
    X = torch.randn(7, L, 4, dtype=F64)
    K = pkfast.gram(net, traj, X, dtype=F64, progress=False)
    assert rel_err(K, gram_reference(net, traj, X)) <= RTOL[F64]
    assert count["batched"] >= 2 and count["vmap"] == 0, count


@pytest.mark.parametrize("make, why", [(BareLinear, "linear combines a parameter of shape (6, 4)"),
                                       (InPlace, "in place (add_)")])
def test_entries_that_cannot_be_probed_keep_the_vmap_pass(count, make, why):
    net, traj = _net(make)
    X = torch.randn(5, 4, dtype=F64)
    K = pkfast.gram(net, traj, X, outputs="full", dtype=F64, progress=False)
    assert rel_err(K, gram_reference(net, traj, X, outputs="full")) <= RTOL[F64]
    assert count["vmap"] >= 1 and count["batched"] == 0, count
    plan = str(pkfast.plan(net, traj, X, outputs="full", dtype=F64))
    assert "factors from vmap(jacrev) per sample" in plan and why in plan, plan


def test_the_entry_probe_is_zero_and_per_sample():
    """At ``x + q`` the probe is [n, *q] zeros; the result is unchanged; each sample's gradient reaches only its
    own slice of the probe."""
    p = torch.randn(3, 4, dtype=F64, requires_grad=True)
    x = torch.randn(2, 3, 4, dtype=F64)
    mode = EntryProbes({"p": p}, x, 2)
    with mode:
        out = x + p[:3] * 2.0
    assert not mode.refused and len(mode.probes) == 1 and mode.probes[0].shape == (2, 3, 4)
    assert torch.equal(out.detach(), x + p.detach() * 2.0)
    g, = torch.autograd.grad(out[0].sum(), mode.probes)
    assert torch.equal(g[0], torch.ones(3, 4, dtype=F64)) and torch.equal(g[1], torch.zeros(3, 4, dtype=F64))


class GainMLP(nn.Module):
    """An MLP with a bare layer-scale gain and a learned temperature."""

    def __init__(self):
        super().__init__()
        self.a, self.head = nn.Linear(4, D), nn.Linear(D, 3)
        self.gamma, self.t = nn.Parameter(torch.rand(D) + 0.5), nn.Parameter(torch.tensor(0.2))

    def forward(self, x):
        return self.head(self.gamma * torch.tanh(self.a(x))) / self.t.exp()


@pytest.mark.parametrize("opt", ["sgd", "adamw"])
def test_the_kernel_machine_of_a_model_with_bare_parameters(tmp_path, count, opt):
    """The kernel machine's panels take the same batched pass: the trained network rebuilt exactly (SGD with
    momentum, and AdamW with its recorded preconditioner)."""
    torch.manual_seed(0)
    net = GainMLP().to(F64)
    X, y = torch.randn(16, 4, dtype=F64), torch.randint(0, 3, (16,))
    o = (torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9) if opt == "sgd"
         else torch.optim.AdamW(net.parameters(), lr=1e-2, weight_decay=0.01))
    lossf = nn.CrossEntropyLoss()
    with pkfast.TrajectoryRecorder(net, o, tmp_path / "t", loss=lossf, targets=y) as rec:
        for s in range(4):
            idx = torch.arange(s % 2, 16, 2)
            o.zero_grad()
            lossf(net(X[idx]), y[idx]).backward()
            o.step()
            rec.step(batch_indices=idx)
    km = pkfast.KernelMachine(net, pkfast.Trajectory.load(tmp_path / "t"), X, nodes=8, progress=False)
    Xq = torch.randn(3, 4, dtype=F64)
    f = net(Xq).detach()
    assert float((km.predict(Xq) - f).abs().max() / f.abs().max()) <= 1e-10
    assert float(km.update_residual.max()) <= 1e-10
    assert count["batched"] > 0 and count["vmap"] == 0, count
