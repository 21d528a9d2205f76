"""pkfast.gram and the reference against closed forms (path-kernel-math.md §5(a), §5(b))."""

import pytest
import torch
from torch import nn

import pkfast
from pkfast.reference import gram_reference
from tests.models import random_trajectory


class LinearOnFeatures(nn.Module):
    """f(x) = W φ(x) + b with φ(x) = tanh(U x) frozen: the kernel is (Σε)(φ·φ' + 1) I_C at every point."""

    def __init__(self, d_in=4, F=6, C=3):
        super().__init__()
        self.U = nn.Linear(d_in, F, bias=False)
        self.U.weight.requires_grad_(False)
        self.out = nn.Linear(F, C)

    def features(self, x):
        return torch.tanh(self.U(x))

    def forward(self, x):
        return self.out(self.features(x))


@pytest.mark.parametrize("rule", ["left", "trapezoid"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_linear_model_every_rule_is_sum_eps_times_feature_kernel(rule, dtype):
    net = LinearOnFeatures()
    traj = random_trajectory(net, steps=4, lr=[0.1, 0.3, 0.2, 0.05])
    X = torch.randn(9, 4, dtype=torch.float64)
    X2 = torch.randn(5, 4, dtype=torch.float64)
    phi, phi2 = net.double().features(X), net.features(X2)
    sum_eps = float(traj.step_sizes.sum())
    C = 3
    expected = sum_eps * (phi @ phi2.T + 1)  # per-output kernel, identical for every output
    K = pkfast.gram(net.float(), traj, X, X2, outputs="full", rule=rule, dtype=dtype, progress=False)
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    eye = torch.eye(C, dtype=torch.float64)
    torch.testing.assert_close(K.double(), expected[:, :, None, None] * eye, rtol=tol, atol=tol)
    Kt = pkfast.gram(net, traj, X, X2, outputs="trace", rule=rule, dtype=dtype, progress=False)
    torch.testing.assert_close(Kt.double(), C * expected, rtol=tol, atol=tol)


def one_hidden_kernel(U, c, V, X, X2):
    """K_g[a, b, c, c'] = δ_cc'(h·h' + 1) + (x·x' + 1)[V diag(σ'(z) ⊙ σ'(z')) Vᵀ]_cc' for tanh."""
    z, z2 = X @ U.T + c, X2 @ U.T + c
    h, h2 = torch.tanh(z), torch.tanh(z2)
    d, d2 = 1 - h**2, 1 - h2**2
    C = V.shape[0]
    first = (h @ h2.T + 1)[:, :, None, None] * torch.eye(C, dtype=X.dtype)
    second = (X @ X2.T + 1)[:, :, None, None] * torch.einsum("ch,ah,bh,dh->abcd", V, d, d2, V)
    return first + second


@pytest.mark.parametrize("rule", ["left", "trapezoid"])
def test_one_hidden_layer_tanh_matches_hand_formula(rule):
    net = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    traj = random_trajectory(net, steps=3, lr=[0.2, 0.1, 0.4])
    X = torch.randn(7, 4, dtype=torch.float64)
    X2 = torch.randn(4, 4, dtype=torch.float64)
    eps = traj.step_sizes.tolist()
    weights = {s: e for s, e in enumerate(eps)} if rule == "left" else {}
    if rule == "trapezoid":
        for s, e in enumerate(eps):
            weights[s] = weights.get(s, 0) + e / 2
            weights[s + 1] = weights.get(s + 1, 0) + e / 2
    expected = 0
    for k, w in weights.items():
        p = traj.point(k)
        expected = expected + w * one_hidden_kernel(p["0.weight"].double(), p["0.bias"].double(),
                                                    p["2.weight"].double(), X, X2)
    K = pkfast.gram(net, traj, X, X2, outputs="full", rule=rule, dtype=torch.float64, progress=False)
    torch.testing.assert_close(K, expected, rtol=1e-12, atol=1e-12)
    R = gram_reference(net, traj, X, X2, outputs="full", rule=rule)
    torch.testing.assert_close(R, expected, rtol=1e-12, atol=1e-12)
