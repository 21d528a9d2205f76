"""Layer rules (pkfast.layers): every built-in rule family — Linear, Conv1d/Conv2d, Embedding, the norms — and the
public registry with a user's own rules (a Linear storing its weight transposed, an RMSNorm-style module), each
correctness check one call of the shared harness (tests/layers/harness.py) against the float64 oracle; then
what the rules refuse and the reasons the plan gives.

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
from tests.layers.harness import check_layer_rule, tokens
from tests.models import random_trajectory

F64 = torch.float64


def _bn(bn: nn.Module) -> nn.Module:
    """A BatchNorm in eval mode with non-trivial running statistics."""
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        bn.running_mean.copy_(torch.randn(bn.running_mean.shape, generator=g))
        bn.running_var.copy_(torch.rand(bn.running_var.shape, generator=g) + 0.5)
    return bn.eval()


def _row(p, name: str) -> str:
    """The printed plan's row of layer ``name``."""
    return next(line for line in str(p).splitlines() if line.split(" ", 1)[0] == name)


# ---------------------------------------------------------------------------------------------- affine rules
#: name → (module factory, one sample's shape or a sample generator)
AFFINE_CASES = {
    "linear": (lambda: nn.Linear(5, 4), (5,)),
    "linear_nobias": (lambda: nn.Linear(5, 4, bias=False), (5,)),
    "linear_over_positions": (lambda: nn.Linear(5, 4), (3, 5)),
    "conv1d_same_reflect_dilated": (lambda: nn.Conv1d(2, 4, 3, padding="same", dilation=2, padding_mode="reflect"),
                                    (2, 9)),
    "conv1d_strided_grouped_nobias": (lambda: nn.Conv1d(4, 4, 2, stride=2, groups=2, bias=False), (4, 8)),
    "conv2d_padded": (lambda: nn.Conv2d(1, 3, 3, padding=1), (1, 4, 4)),
    "conv2d_strided_grouped": (lambda: nn.Conv2d(4, 4, 3, stride=2, padding=1, groups=2), (4, 5, 5)),
    "conv2d_nobias_rect_kernel": (lambda: nn.Conv2d(2, 3, (2, 3), stride=(1, 2), bias=False), (2, 4, 5)),
}


@pytest.mark.parametrize("name", list(AFFINE_CASES))
def test_affine_rule_equals_reference(name):
    """Linear and Conv (bias or not, stride, padding incl. 'same' and reflect, dilation, groups): every route of
    the affine rule, trace and block Gram, diagonal, trapezoid and loss kernel."""
    make, sample = AFFINE_CASES[name]
    check_layer_rule(make, sample)


@pytest.mark.parametrize("padding_idx", [None, 0], ids=["plain", "padding_idx"])
def test_embedding_rule_equals_reference(padding_idx):
    """An Embedding (max_norm off) over token ids, with padding at every sequence's end."""
    check_layer_rule(lambda: nn.Embedding(7, 4, padding_idx=padding_idx), tokens(7, 3, pad=0))


@pytest.mark.parametrize("kw", [dict(max_norm=1.0), dict(scale_grad_by_freq=True)], ids=["max_norm", "scale_grad"])
def test_embedding_options_that_change_the_gradient_have_no_rule(kw):
    """max_norm renormalises the looked-up rows, scale_grad_by_freq rescales their gradient: no rule, and the
    plan says why."""
    rule, why = rule_for(nn.Embedding(7, 4, **kw))
    assert rule is None and "max_norm / scale_grad_by_freq change the lookup's gradient" in why
    net = nn.Sequential(nn.Embedding(7, 4, **kw), nn.Flatten(), nn.Linear(12, 3)).to(F64)
    p = pkfast.plan(net, random_trajectory(net, steps=1), torch.randint(0, 7, (4, 3)))
    assert str({L.name: L for L in p.layers}["0"].method) == "jacobian" and "max_norm" in _row(p, "0"), p


class TiedBody(nn.Module):
    """An Embedding whose weight is also a Linear's (tied input and output embeddings, as language models)."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(7, 4)
        self.out = nn.Linear(4, 7, bias=False)
        self.out.weight = self.emb.weight

    def forward(self, ids):
        return self.out(torch.tanh(self.emb(ids).mean(1)))


def test_tied_weights_take_the_jacobian_route_and_stay_exact():
    """A tensor shared by two modules is neither's alone: both take the Jacobian route (the plan says "tied")
    and the Gram is exact."""
    check_layer_rule(TiedBody, tokens(7, 3), expect_route="jacobian", reason={"body.emb": "tied"},
                     diagonal=False, trapezoid=False)


# ---------------------------------------------------------------------------------------------- the norm rule
#: name → (module factory, one sample's shape): the affine of every norm type, after a layer that feeds it
NORM_CASES = {
    "layernorm": (lambda: nn.Sequential(nn.Linear(5, 6), nn.LayerNorm(6)), (5,)),
    "layernorm_seq_nobias": (lambda: nn.Sequential(nn.Linear(5, 6), nn.LayerNorm(6, bias=False)), (4, 5)),
    "layernorm_2d_shape": (lambda: nn.LayerNorm((4, 5)), (4, 5)),
    "groupnorm": (lambda: nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.GroupNorm(2, 4)), (1, 4, 4)),
    "batchnorm2d": (lambda: nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), _bn(nn.BatchNorm2d(4))), (1, 4, 4)),
    "batchnorm1d": (lambda: nn.Sequential(nn.Linear(5, 6), _bn(nn.BatchNorm1d(6))), (5,)),
    "batchnorm1d_seq": (lambda: nn.Sequential(nn.Conv1d(2, 4, 3), _bn(nn.BatchNorm1d(4))), (2, 7)),
    "rmsnorm": (lambda: nn.Sequential(nn.Linear(5, 6), nn.RMSNorm(6, eps=1e-6)), (5,)),
}
#: cases also checked with the exact (quadrature) rule
NORM_EXACT = {"layernorm_seq_nobias", "groupnorm", "batchnorm1d"}


@pytest.mark.parametrize("name", list(NORM_CASES))
def test_norm_rule_equals_reference(name):
    """The affine of every norm type through its rule (materialised from x̂ and Δ; the norm rule does not
    factorise, so auto materialises it): trace and block Gram, X2 = None and X2, diagonal, trapezoid, the
    loss kernel, and for some the exact rule (quadrature nodes inside a segment) against the Jacobian route."""
    make, shape = NORM_CASES[name]
    check_layer_rule(make, shape, exact=name in NORM_EXACT)


def test_batchnorm_running_statistics_are_taken_from_each_point():
    """Running statistics recorded with the trajectory (and changing along it) are used at each point."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), _bn(nn.BatchNorm2d(4)), nn.Tanh(), nn.Flatten(),
                        nn.Linear(4 * 5 * 5, 3)).to(F64)
    bn = net[1]
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
    assert "1.running_mean" in traj.names
    X = torch.randn(4, 1, 5, 5, dtype=F64)
    for rule in ("left", "trapezoid"):
        K = pkfast.gram(net, traj, X, rule=rule, dtype=F64, progress=False)
        assert rel_err(K, gram_reference(net, traj, X, rule=rule)) <= RTOL[F64]


def test_batch_statistics_are_not_a_norm_rule():
    """A BatchNorm without running statistics mixes the samples of a batch: no rule (the Jacobian route says why)."""
    bn = nn.BatchNorm1d(6, track_running_stats=False).eval()
    rule, why = rule_for(bn)
    assert rule is None and "batch statistics" in why
    assert rule_for(nn.BatchNorm1d(6).train())[0] is None  # train mode: batch statistics too


def test_norm_streams_when_its_factors_are_smaller():
    """A BatchNorm1d over [n, 6] (one position, with bias): factors 1·(6 + C·6) ≤ gradient C·12 → streamed; the
    sliced gradient (one unit per slice) is exact."""
    net, traj, X, X2 = check_layer_rule(NORM_CASES["batchnorm1d"][0], (5,), outputs=("trace",), of=("output",),
                                        diagonal=False, trapezoid=False)[1:]
    p = pkfast.plan(net, traj, X, method="materialized")
    assert str({L.name: L for L in p.layers}["body.1"].method) == "materialized"
    assert "streamed in slices" in _row(p, "body.1"), p
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


def _user_body() -> nn.Module:
    return nn.Sequential(TLinear(5, 6), MyRMSNorm(6), nn.Tanh(), TLinear(6, 3))


def test_user_rules_are_routed_and_exact(user_rules):
    """A user's rules, once registered, are the ones found and every route they offer is exact."""
    assert isinstance(rule_for(TLinear(2, 2))[0], TLinearRule) and isinstance(rule_for(MyRMSNorm(2))[0], NormRule)
    p = check_layer_rule(_user_body, (5,)).plan
    assert {L.name: str(L.method) != "jacobian" for L in p.layers} == {"body.0": True, "body.1": True,
                                                                       "body.3": True, "head": True}, p


def test_without_a_rule_user_layers_take_the_jacobian_route():
    """Unregistered, the same modules have no rule: the whole Gram takes the Jacobian route, still exact."""
    assert rule_for(TLinear(2, 2)) == (None, "") and rule_for(MyRMSNorm(2)) == (None, "")
    net = nn.Sequential(*_user_body()).to(F64)
    traj = random_trajectory(net, steps=1)
    X = torch.randn(4, 5, dtype=F64)
    p = pkfast.plan(net, traj, X)
    assert str(p.method) == "jacobian" and {str(L.method) for L in p.layers} == {"jacobian"}, p
    check_layer_rule(_user_body, (5,), expect_route="jacobian", outputs=("full",), of=("output",), diagonal=False,
                     trapezoid=False)


class Misfit(TLinear):
    """A TLinear with the wrong plain LinearRule: LinearRule reads in_features/out_features, which TLinear lacks;
    given them here, the rule rebuilds the gradient as if W were [out, in]."""

    def __init__(self, i: int, o: int) -> None:
        super().__init__(i, o)
        self.in_features, self.out_features = i, o


@pytest.fixture
def misfit_rule():
    register(Misfit, LinearRule())
    yield
    unregister(Misfit)


def test_a_rule_that_does_not_fit_is_caught_by_the_gradient_check(misfit_rule):
    """The plain LinearRule on a transposed-weight module rebuilds the wrong gradient layout: the engine's check
    sends the layer to the Jacobian route with the reason in the plan, and the Gram stays exact."""
    check_layer_rule(lambda: Misfit(5, 6), (5,), expect_route="jacobian", reason="does not fit the module",
                     diagonal=False, trapezoid=False, of=("output",))


def test_the_harness_fails_a_rule_the_plan_does_not_use(misfit_rule):
    """The harness itself: a layer whose rule the engine refused fails it (unless expect_route says so), naming
    the layer and its route — a rule can never pass by silently taking the Jacobian route."""
    with pytest.raises(AssertionError, match=r"body: route 'jacobian', not its rule's"):
        check_layer_rule(lambda: Misfit(5, 6), (5,))
    with pytest.raises(AssertionError, match=r"body: 'no such reason' not in the plan"):
        check_layer_rule(lambda: Misfit(5, 6), (5,), expect_route="jacobian", reason="no such reason")


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

