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
    km = pkfast.KernelMachine(net, traj, X, nodes=2, progress=False)
    fwd = _certificate(km, X[:5], "forward")
    assert float(fwd.quadrature.abs().max()) > 1e-9  # (a residual to compare: nodes=2 is not exact here)
    for route in ("math", "reverse"):
        got = _certificate(km, X[:5], route)
        assert float((got.quadrature - fwd.quadrature).abs().max()) <= 1e-10, route
