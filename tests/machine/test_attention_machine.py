"""The kernel machine on attention models (issue 25): the certificate runs where forward-mode AD does not (fused
attention kernels), by the math attention path or double backward, and agrees with forward AD where both run."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import pkfast
from pkfast.machine.directional import Directional

PATCH, NPATCH, D, C, N = 4, 4, 8, 3, 16


class TinyViT(nn.Module):
    """Patches → Linear embedding → one attention block → mean over tokens → head."""

    def __init__(self, kind: str = "encoder") -> None:
        super().__init__()
        self.kind = kind
        self.emb = nn.Linear(PATCH, D)
        if kind == "encoder":
            self.att = nn.TransformerEncoderLayer(D, 2, dim_feedforward=16, dropout=0.0, activation="gelu",
                                                  batch_first=True)
        else:
            self.att = nn.MultiheadAttention(D, 2, batch_first=True)
        self.head = nn.Linear(D, C)

    def forward(self, x):
        h = self.emb(x.view(x.shape[0], NPATCH, PATCH))
        h = self.att(h) if self.kind == "encoder" else self.att(h, h, h, need_weights=False)[0]
        return self.head(h.mean(1))


def mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(PATCH * NPATCH, 8), nn.Tanh(), nn.Linear(8, C))


def trained(tmp_path, net, *, steps=6, lr=0.5, momentum=0.9, seed=0):
    """``net`` (float64, eval mode) trained by SGD on halves of a fixed data set while recording."""
    torch.manual_seed(seed)
    net = net.double().eval()
    g = torch.Generator().manual_seed(1)
    X = torch.randn(N, PATCH * NPATCH, generator=g, dtype=torch.float64)
    y = torch.randint(0, C, (N,), generator=g)
    lossf, opt = nn.CrossEntropyLoss(), torch.optim.SGD(net.parameters(), lr=lr, momentum=momentum)
    with pkfast.TrajectoryRecorder(net, opt, tmp_path / "t", loss=lossf, targets=y) as rec:
        for s in range(steps):
            idx = torch.arange(s % 2 * (N // 2), s % 2 * (N // 2) + N // 2)
            opt.zero_grad()
            lossf(net(X[idx]), y[idx]).backward()
            opt.step()
            rec.step(batch_indices=idx)
    return net, pkfast.Trajectory.load(tmp_path / "t"), X


def _certificate(km, X, route=None):
    km._directional = Directional(route)
    return km.certificate(X)


@pytest.mark.parametrize("kind", ["encoder", "mha"])
def test_certificate_runs_on_attention_models(tmp_path, kind):
    """Before: NotImplementedError (no forward AD for aten::_transformer_encoder_layer_fwd /
    aten::_native_multi_head_attention)."""
    net, traj, X = trained(tmp_path, TinyViT(kind), lr=0.1, momentum=0.0)
    km = pkfast.KernelMachine(net, traj, X, nodes=8, progress=False)
    cert = km.certificate(X[:4])
    assert km._directional.route == "math"  # forward AD failed on the fused kernel; the math path ran
    assert cert.quadrature.shape == (6, 4, C)
    # a wrong derivative would not telescope: with 8 nodes the residual is the quadrature's, tiny
    assert cert.max_quadrature < 1e-8
    # the double-backward route gives the same residual
    rev = _certificate(km, X[:4], "reverse")
    assert float((rev.quadrature - cert.quadrature).abs().max()) <= 1e-10


def test_fallback_routes_agree_with_forward_ad_on_an_mlp(tmp_path):
    net, traj, X = trained(tmp_path, mlp(), lr=0.3)
    km = pkfast.KernelMachine(net, traj, X, nodes=2, check_nodes=False, progress=False)
    fwd = _certificate(km, X[:5], "forward")
    assert float(fwd.quadrature.abs().max()) > 1e-9  # (a residual to compare: nodes=2 is not exact here)
    for route in ("math", "reverse"):
        got = _certificate(km, X[:5], route)
        assert float((got.quadrature - fwd.quadrature).abs().max()) <= 1e-10, route



class _Tanh(torch.autograd.Function):
    """tanh with a backward and no forward-mode derivative (no ``jvp``): forward AD fails on it."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x):
        return torch.tanh(x)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(output)

    @staticmethod
    def backward(ctx, g):
        (y,) = ctx.saved_tensors
        return g * (1 - y * y)


class _NoJvpTanh(nn.Module):
    def forward(self, x):
        return _Tanh.apply(x)


def test_an_operation_without_forward_derivative_takes_double_backward(tmp_path):
    """A custom autograd Function without jvp: the certificate runs by double backward and equals forward AD's on
    the same network written with nn.Tanh (same parameter names, same trajectory)."""
    net, traj, X = trained(tmp_path, nn.Sequential(nn.Linear(PATCH * NPATCH, 8), _NoJvpTanh(), nn.Linear(8, C)),
                           lr=0.3)
    km = pkfast.KernelMachine(net, traj, X, nodes=2, check_nodes=False, progress=False)
    cert = km.certificate(X[:5])
    assert km._directional.route == "reverse"
    twin = nn.Sequential(nn.Linear(PATCH * NPATCH, 8), nn.Tanh(), nn.Linear(8, C)).double()
    ref = pkfast.KernelMachine(twin, traj, X, nodes=2, check_nodes=False, progress=False).certificate(X[:5])
    assert float(ref.quadrature.abs().max()) > 1e-9
    assert float((cert.quadrature - ref.quadrature).abs().max()) <= 1e-10


# ---------------------------------------------------------------------------------------------- the nodes
def rel_error(km, net, X):
    with torch.no_grad():
        f = net(X)
    return float((km.predict(X) - f).abs().max() / (f - km.bias(X)).abs().max())


def test_auto_nodes_raise_the_quadrature_where_two_nodes_are_off(tmp_path):
    """A tiny ViT trained with momentum: 2 nodes are off by ~3e-3 of the output change (before: silently, as the
    default); nodes=None measures that at construction and takes more."""
    net, traj, X = trained(tmp_path, TinyViT("encoder"))
    km = pkfast.KernelMachine(net, traj, X, progress=False)
    assert km.nodes > 2 and km.nodes_check.auto
    assert km.nodes_check.estimates[2] > 1e-4  # what the default used to be
    assert km.nodes_check.error <= pkfast.machine.nodes.QUAD_TOL
    assert rel_error(km, net, X) <= 1e-6  # the network, to the tolerance
    assert f"nodes={km.nodes} (auto)" in repr(km)
    with pytest.warns(UserWarning, match=rf"(?s)nodes=2 is too few.*nodes={km.nodes} meets it.*check_nodes=False"):
        two = pkfast.KernelMachine(net, traj, X, nodes=2, progress=False)
    assert two.nodes == 2 and rel_error(two, net, X) > 1e-3  # an explicit count is kept (and was warned about)


def test_a_smooth_mlp_keeps_two_nodes_after_one_check(tmp_path):
    net, traj, X = trained(tmp_path, mlp(), lr=0.1, momentum=0.0)
    km = pkfast.KernelMachine(net, traj, X, progress=False)
    assert km.nodes == 2 and list(km.nodes_check.estimates) == [2]
    assert rel_error(km, net, X) <= 1e-6


def test_the_check_can_be_skipped_and_is_not_run_for_the_left_rule(tmp_path, recwarn):
    net, traj, X = trained(tmp_path, TinyViT("encoder"))
    km = pkfast.KernelMachine(net, traj, X, nodes=2, check_nodes=False, progress=False)
    assert km.nodes == 2 and km.nodes_check is None
    assert pkfast.KernelMachine(net, traj, X, check_nodes=False, progress=False).nodes == 2
    assert pkfast.KernelMachine(net, traj, X, rule="left", progress=False).nodes_check is None
    assert not [w for w in recwarn if "nodes" in str(w.message)]


def test_no_count_enough_warns_with_what_was_found(tmp_path, monkeypatch):
    from pkfast.machine import nodes
    monkeypatch.setattr(nodes, "CANDIDATES", (1, 2))
    monkeypatch.setattr(nodes, "QUAD_TOL", 1e-30)
    net, traj, X = trained(tmp_path, TinyViT("encoder"))
    with pytest.warns(UserWarning, match=r"(?s)no Gauss–Legendre node count up to 2.*1 nodes: .*2 nodes: .*using "
                                         r"nodes=2.*Pass a larger nodes="):
        km = pkfast.KernelMachine(net, traj, X, progress=False)
    assert km.nodes == 2 and set(km.nodes_check.estimates) == {1, 2}
