"""Layer rules (pkfast.layers): the norm rule against the float64 oracle, and the public registry with a user's
own rules (a Linear storing its weight transposed, an RMSNorm-style module).

Tolerance: relative Frobenius error ≤ 1e-10 in float64 (tests/_util.RTOL), as for every route.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import pkfast
from pkfast.layers import LayerRule, LinearRule, NormRule, register, registered, rule_for, unregister
from pkfast.reference import gram_reference
from tests._util import RTOL, rel_err
from tests.models import random_trajectory

F64 = torch.float64


class Head(nn.Module):
    """``body`` then tanh, flatten and a Linear head to 3 outputs."""

    def __init__(self, body: nn.Module, width: int) -> None:
        super().__init__()
        self.body = body
        self.head = nn.Linear(width, 3)

    def forward(self, x):
        return self.head(torch.tanh(self.body(x)).flatten(1))


def _bn(bn: nn.Module) -> nn.Module:
    """A BatchNorm in eval mode with non-trivial running statistics."""
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        bn.running_mean.copy_(torch.randn(bn.running_mean.shape, generator=g))
        bn.running_var.copy_(torch.rand(bn.running_var.shape, generator=g) + 0.5)
    return bn.eval()


#: name → (model factory, sample factory)
NORM_CASES = {
    "layernorm": (lambda: Head(nn.Sequential(nn.Linear(5, 6), nn.LayerNorm(6)), 6), lambda n: torch.randn(n, 5)),
    "layernorm_seq_nobias": (lambda: Head(nn.Sequential(nn.Linear(5, 6), nn.LayerNorm(6, bias=False)), 4 * 6),
                             lambda n: torch.randn(n, 4, 5)),
    "layernorm_2d_shape": (lambda: Head(nn.LayerNorm((4, 5)), 20), lambda n: torch.randn(n, 4, 5)),
    "groupnorm": (lambda: Head(nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.GroupNorm(2, 4)), 4 * 5 * 5),
                  lambda n: torch.randn(n, 1, 5, 5)),
    "batchnorm2d": (lambda: Head(nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), _bn(nn.BatchNorm2d(4))), 4 * 5 * 5),
                    lambda n: torch.randn(n, 1, 5, 5)),
    "batchnorm1d": (lambda: Head(nn.Sequential(nn.Linear(5, 6), _bn(nn.BatchNorm1d(6))), 6),
                    lambda n: torch.randn(n, 5)),
    "batchnorm1d_seq": (lambda: Head(nn.Sequential(nn.Conv1d(2, 4, 3), _bn(nn.BatchNorm1d(4))), 4 * 5),
                        lambda n: torch.randn(n, 2, 7)),
    "rmsnorm": (lambda: Head(nn.Sequential(nn.Linear(5, 6), nn.RMSNorm(6, eps=1e-6)), 6), lambda n: torch.randn(n, 5)),
}


def _setup(name: str, n: int = 5, m: int = 3, steps: int = 2):
    make, data = NORM_CASES[name]
    torch.manual_seed(0)
    net = make().to(F64)
    return net, random_trajectory(net, steps=steps, scale=0.2), data(n).to(F64), data(m).to(F64)


def _norm_layers(p) -> list:
    return [L for L in p.layers if L.kind == "norm"]


@pytest.mark.parametrize("name", list(NORM_CASES))
@pytest.mark.parametrize("outputs", ["trace", "full"])
def test_norm_rule_equals_reference(name, outputs):
    """The affine of every norm type through its rule (materialised from x̂ and Δ), X2 = None and X2."""
    net, traj, X, X2 = _setup(name)
    p = pkfast.plan(net, traj, X)
    assert _norm_layers(p) and all(L.method == "materialized" for L in _norm_layers(p)), str(p)
    for x2 in (None, X2):
        ref = gram_reference(net, traj, X, x2, outputs=outputs)
        for method in ("auto", "materialized", "factorized"):
            K = pkfast.gram(net, traj, X, x2, outputs=outputs, method=method, dtype=F64, progress=False)
            assert rel_err(K, ref) <= RTOL[F64], (method, x2 is not None, rel_err(K, ref))


@pytest.mark.parametrize("name", ["layernorm_seq_nobias", "groupnorm", "batchnorm1d"])
def test_norm_rule_diagonal_rules_and_loss(name):
    """Diagonal, trapezoid, the exact rule (quadrature nodes inside a segment) and the loss kernel agree with
    the oracle or with the Jacobian route."""
    net, traj, X, X2 = _setup(name)
    for outputs in ("trace", "full"):
        ref = gram_reference(net, traj, X, outputs=outputs, diagonal=True)
        kd = pkfast.gram(net, traj, X, outputs=outputs, diagonal=True, dtype=F64, progress=False)
        assert rel_err(kd, ref) <= RTOL[F64]
    Kt = pkfast.gram(net, traj, X, X2, rule="trapezoid", dtype=F64, progress=False)
    assert rel_err(Kt, gram_reference(net, traj, X, X2, rule="trapezoid")) <= RTOL[F64]
    for x2 in (None, X2):
        J = pkfast.gram(net, traj, X, x2, rule="exact", nodes=3, method="jacobian", dtype=F64, progress=False)
        K = pkfast.gram(net, traj, X, x2, rule="exact", nodes=3, dtype=F64, progress=False)
        assert rel_err(K, J) <= RTOL[F64]
    y, y2 = torch.tensor([0, 2, 1, 1, 0]), torch.tensor([2, 0, 1])
    kw = dict(of="loss", loss="cross_entropy", y=y, y2=y2, dtype=F64, progress=False)
    J = pkfast.gram(net, traj, X, X2, method="jacobian", **kw)
    assert rel_err(pkfast.gram(net, traj, X, X2, **kw), J) <= RTOL[F64]


def test_batchnorm_running_statistics_are_taken_from_each_point():
    """Running statistics recorded with the trajectory (and changing along it) are used at each point."""
    torch.manual_seed(0)
    net = NORM_CASES["batchnorm2d"][0]().to(F64)
    bn = net.body[1]
    points = []
    g = torch.Generator().manual_seed(5)
    for s in range(3):
        with torch.no_grad():
            for p in net.parameters():
                p.add_(0.1 * torch.randn(p.shape, generator=g, dtype=F64))
            bn.running_mean.add_(0.3 * torch.randn(4, generator=g, dtype=F64))
            bn.running_var.mul_(1.0 + 0.2 * torch.rand(4, generator=g, dtype=F64))
        points.append({k: v.clone() for k, v in net.state_dict().items()})
    traj = pkfast.Trajectory.from_checkpoints(points, lr=[0.1, 0.2])
    assert "body.1.running_mean" in traj.names
    X = torch.randn(4, 1, 5, 5, dtype=F64)
    for rule in ("left", "trapezoid"):
        K = pkfast.gram(net, traj, X, rule=rule, dtype=F64, progress=False)
        assert rel_err(K, gram_reference(net, traj, X, rule=rule)) <= RTOL[F64]


def test_batch_statistics_are_not_a_norm_rule():
    """A BatchNorm without running statistics mixes the samples of a batch: no rule (the Jacobian route says why)."""
    net = Head(nn.Sequential(nn.Linear(5, 6), nn.BatchNorm1d(6, track_running_stats=False)), 6).eval()
    rule, why = rule_for(net.body[1])
    assert rule is None and "batch statistics" in why


def test_norm_streams_when_its_factors_are_smaller():
    """A BatchNorm1d over [n, 6] (one position, with bias): factors 1·(6 + C·6) ≤ gradient C·12 → streamed; the
    sliced gradient (one unit per slice) is exact."""
    net, traj, X, X2 = _setup("batchnorm1d")
    p = pkfast.plan(net, traj, X, method="materialized")
    (bn,) = _norm_layers(p)
    assert bn.stream and "streamed in slices" in str(p)
    ref = gram_reference(net, traj, X, X2)
    K = pkfast.gram(net, traj, X, X2, method="materialized", memory_budget=20_000, dtype=F64, progress=False)
    assert rel_err(K, ref) <= RTOL[F64]


# ---------------------------------------------------------------------------------------------- the registry
class TLinear(nn.Module):
    """``y = x @ W + b`` with W stored [in, out] (as Hugging Face's Conv1D)."""

    def __init__(self, i: int, o: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(i, o) / i**0.5)
        self.bias = nn.Parameter(0.1 * torch.randn(o))

    def forward(self, x):
        return x @ self.weight + self.bias


class TLinearRule(LinearRule):
    def fans(self, m):
        return m.weight.shape[0], m.weight.shape[1]

    def weight_matrix(self, layer, W):
        return W.T


class MyRMSNorm(nn.Module):
    """An RMSNorm written by hand, as model codebases do (a weight, no bias)."""

    def __init__(self, d: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(1.0 + 0.1 * torch.randn(d))
        self.eps = eps

    def forward(self, x):
        return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps))


def my_rms(m: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + m.eps)


@pytest.fixture
def user_rules():
    """Registers the user's rules for one test, and removes them afterwards."""
    register(TLinear, TLinearRule())
    register(MyRMSNorm, NormRule(my_rms))
    yield
    unregister(TLinear)
    unregister(MyRMSNorm)


def _user_net() -> nn.Module:
    torch.manual_seed(1)
    return nn.Sequential(TLinear(5, 6), MyRMSNorm(6), nn.Tanh(), TLinear(6, 3)).to(F64)


def test_user_rules_are_routed_and_exact(user_rules):
    net = _user_net()
    traj = random_trajectory(net, steps=2, scale=0.2)
    X, X2 = torch.randn(5, 5, dtype=F64), torch.randn(3, 5, dtype=F64)
    p = pkfast.plan(net, traj, X)
    assert [(L.kind, L.method != "jacobian") for L in p.layers] == [("linear", True), ("norm", True), ("linear", True)]
    for outputs in ("trace", "full"):
        for x2 in (None, X2):
            ref = gram_reference(net, traj, X, x2, outputs=outputs)
            for method in ("auto", "factorized", "materialized"):
                K = pkfast.gram(net, traj, X, x2, outputs=outputs, method=method, dtype=F64, progress=False)
                assert rel_err(K, ref) <= RTOL[F64], (outputs, method, rel_err(K, ref))


def test_without_a_rule_user_layers_take_the_jacobian_route():
    net = _user_net()
    traj = random_trajectory(net, steps=1)
    p = pkfast.plan(net, traj, torch.randn(4, 5, dtype=F64))
    assert p.method == "jacobian" and {L.kind for L in p.layers} == {"other"}


def test_a_rule_that_does_not_fit_is_caught_by_the_gradient_check():
    """The plain LinearRule on a transposed-weight module rebuilds the wrong gradient layout: the engine's check
    sends the layer to the Jacobian route with the reason, and the Gram stays exact."""
    register(TLinear, LinearRule())
    try:
        net = nn.Sequential(TLinear(5, 6), nn.Tanh(), nn.Linear(6, 3)).to(F64)
        # LinearRule reads in_features/out_features, which TLinear lacks: give them, wrong way round on purpose
        net[0].in_features, net[0].out_features = 5, 6
        traj = random_trajectory(net, steps=1)
        X = torch.randn(4, 5, dtype=F64)
        p = pkfast.plan(net, traj, X)
        first = p.layers[0]
        assert first.method == "jacobian" and "does not fit the module" in first.reason, first
        K = pkfast.gram(net, traj, X, dtype=F64, progress=False)
        assert rel_err(K, gram_reference(net, traj, X)) <= RTOL[F64]
    finally:
        unregister(TLinear)


def test_subclass_overriding_forward_has_no_rule_and_subclass_keeping_it_does():
    class Scaled(nn.Linear):
        def forward(self, x):
            return 2 * super().forward(x)

    class Plain(nn.Linear):
        pass

    assert rule_for(Scaled(2, 2)) == (None, "Scaled overrides Linear.forward")
    assert isinstance(rule_for(Plain(2, 2))[0], LinearRule)


def test_register_refuses_what_is_not_a_rule():
    with pytest.raises(TypeError, match=r"module_type must be an nn.Module subclass; found 3"):
        register(3, LinearRule())
    with pytest.raises(TypeError, match=r"rule must be a pkfast.layers.LayerRule instance; found str"):
        register(TLinear, "linear")
    with pytest.raises(ValueError, match=r"Linear already has the rule LinearRule; pass replace=True"):
        register(nn.Linear, LinearRule())
    assert isinstance(registered()[nn.Linear], LinearRule) and isinstance(registered()[nn.Linear], LayerRule)

