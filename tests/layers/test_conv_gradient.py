"""The convolution's per-sample gradient without patches (pkfast.layers.conv: the weight-gradient convolution
with the samples folded into the groups) against autograd, one sample and output at a time, and against the
patch route; then every Gram the harness checks with that formation forced, against the float64 reference.

Tolerance: relative error ≤ 1e-10 in float64 (tests/_util.RTOL)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from pkfast.layers import rule_for
from pkfast.layers.base import Layer, materialize
from pkfast.layers.conv import ConvRule
from tests._util import RTOL, rel_err
from tests.layers.harness import check_layer_rule
from tests.layers.test_rules import AFFINE_CASES

F64 = torch.float64

#: name → (module factory, one sample's input shape (a leading B′ > 1: several images per sample), calls)
CASES = {
    "conv2d_bias": (lambda: nn.Conv2d(3, 4, 3, padding=1), (3, 6, 6), 1),
    "conv2d_strided_dilated": (lambda: nn.Conv2d(2, 3, 3, stride=2, dilation=2, padding=2, bias=False), (2, 9, 9), 1),
    "conv2d_grouped_rect": (lambda: nn.Conv2d(4, 6, (2, 3), stride=(1, 2), groups=2), (4, 5, 7), 1),
    "conv2d_same_circular": (lambda: nn.Conv2d(2, 2, 4, padding="same", padding_mode="circular"), (2, 6, 5), 1),
    "conv2d_reflect_two_calls": (lambda: nn.Conv2d(2, 3, 3, padding=1, padding_mode="reflect"), (2, 5, 5), 2),
    "conv2d_several_images": (lambda: nn.Conv2d(2, 3, 3, stride=2), (3, 2, 7, 7), 1),
    "conv1d_same_dilated": (lambda: nn.Conv1d(2, 4, 3, padding="same", dilation=2), (2, 11), 1),
    "conv1d_grouped_replicate": (lambda: nn.Conv1d(4, 2, 3, groups=2, padding=2, padding_mode="replicate"),
                                 (4, 9), 2),
}


def _layer(m: nn.Module, calls: int, positions: int) -> Layer:
    rule, _ = rule_for(m)
    I, O = rule.fans(m)
    return Layer("m", rule.name, type(m).__name__, ("m.weight",) + (("m.bias",) if m.bias is not None else ()),
                 sum(p.numel() for p in m.parameters()), module=m, rule=rule, bias=m.bias is not None,
                 groups=m.groups, calls=calls, positions=positions, fan_in=I, fan_out=O)


def _expected(m, layer, xs, gs, n, C):
    """Σ over calls of autograd's gradient of ⟨m(x_i), g_ic⟩, in the rule's layout: [n, C, size]."""
    rows = []
    for i in range(n):
        per_c = []
        for c in range(C):
            f = sum((m(x[i]) * g[i, c]).sum() for x, g in zip(xs, gs))
            grads = torch.autograd.grad(f, list(m.parameters()))
            per_c.append(layer.rule.gradient_layout(layer, dict(zip(("weight", "bias"), grads))))
        rows.append(torch.stack(per_c))
    return torch.stack(rows)


@pytest.mark.parametrize("C", [1, 3])
@pytest.mark.parametrize("name", list(CASES))
def test_conv_gradient_equals_autograd_and_the_patch_route(name, C, monkeypatch):
    make, shape, calls = CASES[name]
    torch.manual_seed(0)
    m = make().to(F64)
    n = 3
    xs = [torch.randn(n, *shape, dtype=F64) for _ in range(calls)]
    with torch.no_grad():
        outs = [m(x.reshape(-1, *shape[-(len(m.kernel_size) + 1):])).reshape(n, *shape[:-len(m.kernel_size) - 1],
                                                                          -1, *m(x[0]).shape[-len(m.kernel_size):])
                for x in xs]
    gs = [torch.randn(n, C, *o.shape[1:], dtype=F64) for o in outs]
    positions = calls * math.prod(outs[0].shape[1:]) // m.out_channels
    layer = _layer(m, calls, positions)
    want = _expected(m, layer, xs, gs, n, C)

    monkeypatch.setattr(ConvRule, "formation", lambda self, L, C: "conv")
    got = layer.rule.per_sample_gradient(layer, xs, gs, n, C, F64)
    assert got is not None and got.shape == want.shape
    assert rel_err(got, want) <= RTOL[F64], (name, C, rel_err(got, want))

    units = [layer.rule.unfold(layer, x, g, n, C, F64) for x, g in zip(xs, gs)]
    A, D = torch.cat([u[0] for u in units], 1), torch.cat([u[1] for u in units], 2)
    patches = materialize(layer, layer.rule.split(layer, A, D), n)
    assert rel_err(patches, want) <= RTOL[F64], (name, C, "patches", rel_err(patches, want))
    monkeypatch.setattr(ConvRule, "formation", lambda self, L, C: "patches")
    assert layer.rule.per_sample_gradient(layer, xs, gs, n, C, F64) is None  # the engine then takes the factors


def test_formation_rule_follows_positions_against_gradient_rows():
    """The conv formation where one call's positions exceed the gradient's rows C·O (the patches would be larger
    than the gradient) and the kernel has more than one tap, the patches otherwise."""
    big = _layer(nn.Conv2d(16, 16, 3, padding=1), 1, 32 * 32)
    small = _layer(nn.Conv2d(128, 128, 3, padding=1), 1, 4 * 4)
    assert big.rule.formation(big, 1) == "conv" and big.rule.formation(big, 10) == "conv"
    assert small.rule.formation(small, 1) == "patches"
    mid = _layer(nn.Conv2d(32, 32, 3, padding=1), 2, 2 * 16 * 16)  # two calls of 256 positions
    assert mid.rule.formation(mid, 1) == "conv" and mid.rule.formation(mid, 10) == "patches"
    tie = _layer(nn.Conv2d(64, 64, 3, padding=1), 1, 8 * 8)  # S = C·O: the patches
    pointwise = _layer(nn.Conv2d(16, 32, 1, stride=2), 1, 16 * 16)  # a 1×1 kernel's patches are its input
    assert tie.rule.formation(tie, 1) == "patches" and pointwise.rule.formation(pointwise, 1) == "patches"


CONV_CASES = [k for k in AFFINE_CASES if k.startswith("conv")]


@pytest.mark.parametrize("formation", ["conv", "patches"])
@pytest.mark.parametrize("name", CONV_CASES)
def test_grams_with_either_formation_equal_reference(name, formation, monkeypatch):
    """Trace, block, diagonal, trapezoid (two quadrature nodes per step) and loss kernels, every route, with the
    in-panel gradient formed only one way."""
    monkeypatch.setattr(ConvRule, "formation", lambda self, L, C: formation)
    make, sample = AFFINE_CASES[name]
    check_layer_rule(make, sample)


def test_plan_says_which_layers_form_their_gradient_by_the_convolution():
    """A large map (S = 64 > C·O = 2·3) by the convolution, a small one (S = 4 < 2·4) by the patches; and the Gram
    with that mix equals the reference."""
    import pkfast
    from pkfast.reference import gram_reference
    from tests.models import random_trajectory

    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.Tanh(), nn.Conv2d(3, 4, 3, stride=4, padding=1),
                        nn.Tanh(), nn.Flatten(), nn.Linear(16, 2)).to(F64)
    traj = random_trajectory(net, steps=2)
    X = torch.randn(5, 1, 8, 8, dtype=F64)
    p = pkfast.plan(net, traj, X, method="materialized", dtype=F64)
    rows = {line.split(" ", 1)[0]: line for line in str(p).splitlines()}
    assert "weight-grad conv" in rows["0"] and "weight-grad conv" not in rows["2"], str(p)
    K = pkfast.gram(net, traj, X, method="materialized", dtype=F64, progress=False)
    assert rel_err(K, gram_reference(net, traj, X)) <= RTOL[F64]
