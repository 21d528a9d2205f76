"""Data-dependent control flow on the default route (issue 25, defect 4): a top-1 mixture of experts with
boolean-mask dispatch (``out[mk] = expert(x[mk])``) — every expert used, one used by a single sample, one used by
none, routing that changes between steps, routing seen only after discovery — agrees with the float64 reference
on ``method="auto"``, and the plan says why the experts take the Jacobian route."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import pkfast
from pkfast.reference import gram_reference
from tests._util import rel_err

F64 = torch.float64
D, E, H, C = 4, 3, 5, 2


class MoE(nn.Module):
    """Top-1 routing by ``argmax(gate(x))``; ``guard``: skip an expert no sample of the batch routes to."""

    def __init__(self, guard: bool) -> None:
        super().__init__()
        self.guard = guard
        self.gate = nn.Linear(D, E)
        self.ex = nn.ModuleList([nn.Linear(D, H) for _ in range(E)])
        self.head = nn.Linear(H, C)
        with torch.no_grad():  # route by the largest of x[:3]: the data chooses the expert
            self.gate.weight.copy_(10.0 * torch.eye(E, D))
            self.gate.bias.zero_()

    def forward(self, x):
        idx = self.gate(x).argmax(-1)
        out = torch.zeros(x.shape[0], H, dtype=x.dtype, device=x.device)
        for e, ex in enumerate(self.ex):
            mk = idx == e
            if self.guard and not bool(mk.any()):
                continue
            out[mk] = ex(x[mk])
        return self.head(torch.tanh(out))


def _samples(experts: list[int], seed: int = 0) -> torch.Tensor:
    """One sample per entry, routed (at the gate's start weights) to that expert."""
    g = torch.Generator().manual_seed(seed)
    X = 0.3 * torch.randn(len(experts), D, generator=g, dtype=F64)
    for i, e in enumerate(experts):
        X[i, e] = 2.0 + 0.1 * i
    return X


def _trajectory(net: nn.Module, permute_gate: bool = False, seed: int = 0) -> pkfast.Trajectory:
    """Three points: random moves of every parameter but the gate's routing; ``permute_gate``: at w_1 the gate's
    rows are rolled, so every sample routes to another expert than at w_0."""
    g = torch.Generator().manual_seed(seed)
    points = [{k: v.detach().clone() for k, v in net.state_dict().items()}]
    for s in range(2):
        p = {k: v + 0.1 * torch.randn(v.shape, generator=g, dtype=v.dtype) for k, v in points[-1].items()}
        p["gate.weight"] = 10.0 * torch.eye(E, D, dtype=F64) + 0.01 * torch.randn(E, D, generator=g, dtype=F64)
        if permute_gate and s == 0:
            p["gate.weight"] = p["gate.weight"].roll(1, dims=0)
        points.append(p)
    return pkfast.Trajectory.from_checkpoints(points, lr=[0.1, 0.2])


CASES = {
    "every expert used": [0, 1, 2, 0, 1, 2, 1],
    "an expert used by one sample": [0, 2, 1, 0, 1, 0, 1],
    "an expert used by none": [0, 1, 1, 0, 0, 1, 1],
    "an expert first used after the probed samples": [0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 2, 0],
}


def _check(net, traj, X, X2=None, **kw):
    R = gram_reference(net, traj, X, X2, **kw)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        J = pkfast.gram(net, traj, X, X2, method="jacobian", dtype=F64, progress=False, **kw)
        K = pkfast.gram(net, traj, X, X2, dtype=F64, progress=False, **kw)
    assert rel_err(J, R) <= 1e-10
    assert rel_err(K, R) <= 1e-10, rel_err(K, R)


@pytest.mark.parametrize("guard", [False, True], ids=["unguarded", "guarded"])
@pytest.mark.parametrize("case", list(CASES))
def test_mask_dispatch_agrees_with_the_reference_on_the_default_route(guard, case):
    torch.manual_seed(0)
    net = MoE(guard).to(F64)
    _check(net, _trajectory(net), _samples(CASES[case]))


@pytest.mark.parametrize("guard", [False, True], ids=["unguarded", "guarded"])
def test_routing_that_changes_between_steps(guard):
    torch.manual_seed(1)
    net = MoE(guard).to(F64)
    X = _samples([0, 1, 1, 0, 0, 1, 0])  # expert 2 unused at w_0; the rolled gate sends samples to it at w_1
    traj = _trajectory(net, permute_gate=True)
    _check(net, traj, X)
    _check(net, traj, X, outputs="full")
    _check(net, traj, X[:4], X[4:])


def test_the_plan_says_why_the_experts_take_the_jacobian_route():
    torch.manual_seed(0)
    net = MoE(True).to(F64)
    X = _samples(CASES["an expert used by one sample"])
    text = str(pkfast.plan(net, _trajectory(net), X, dtype=F64))
    rows = {line.split()[0]: line for line in text.splitlines() if line.startswith(("gate", "ex.", "head"))}
    for e in range(E):
        assert "jacobian" in rows[f"ex.{e}"] and "data-dependent" in rows[f"ex.{e}"], text
    assert "without calling the module" not in text
    assert "jacobian" not in rows["head"].split()[2], text  # the head is called on the whole batch: factorised


def test_a_call_structure_seen_only_at_run_time_falls_back_exactly_with_a_warning():
    """Every probed sample routes to expert 0 at the probed points; later samples reach experts 1 and 2, whose
    calls the plan has no place for: the route falls back to the Jacobian route, warns once, and is exact."""
    torch.manual_seed(0)
    net = MoE(True).to(F64)
    X = _samples(CASES["an expert first used after the probed samples"])
    traj = _trajectory(net)
    R = gram_reference(net, traj, X)
    with pytest.warns(UserWarning, match="call structure") as got:
        K = pkfast.gram(net, traj, X, dtype=F64, progress=False)
    assert sum("call structure" in str(w.message) for w in got) == 1
    assert rel_err(K, R) <= 1e-10


def test_ordinary_calls_are_not_taken_for_dispatch():
    """Calls that are not batch-first (sequence-first), flattened over the batch, or shared by every sample (a
    positional embedding of arange(L)) keep their layer routes: only data-dependent calls are dispatch."""
    class SeqNet(nn.Module):
        def __init__(self):
            super().__init__()
            self.pos = nn.Embedding(3, 4)
            self.a = nn.Linear(4, 4)
            self.b = nn.Linear(4, 4)
            self.head = nn.Linear(4, 2)

        def forward(self, x):  # x: [n, 3, 4]
            h = x + self.pos(torch.arange(3))
            h = torch.tanh(self.a(h.transpose(0, 1))).transpose(0, 1)          # [3, n, 4]
            h = torch.tanh(self.b(h.reshape(-1, 4))).reshape(x.shape[0], 3, 4)  # [3n, 4]
            return self.head(h.mean(1))

    torch.manual_seed(0)
    net = SeqNet().to(F64)
    traj = _trajectory_of(net)
    X = torch.randn(6, 3, 4, dtype=F64)
    p = pkfast.plan(net, traj, X, dtype=F64)
    assert not any("data-dependent" in L.reason for L in p.layers), str(p)
    assert {L.name: L.route.value for L in p.layers}["head"] != "jacobian"
    assert rel_err(pkfast.gram(net, traj, X, dtype=F64, progress=False), gram_reference(net, traj, X)) <= 1e-10


def _trajectory_of(net: nn.Module) -> pkfast.Trajectory:
    g = torch.Generator().manual_seed(0)
    points = [{k: v.detach().clone() for k, v in net.state_dict().items()}]
    points.append({k: v + 0.1 * torch.randn(v.shape, generator=g, dtype=v.dtype) for k, v in points[0].items()})
    return pkfast.Trajectory.from_checkpoints(points, lr=0.1)
