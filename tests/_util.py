"""Test helpers shared across modules (public seams only: ``Trajectory.point`` and autograd)."""

from __future__ import annotations

import copy

import torch

#: Relative Frobenius tolerance of fast paths against the float64 reference, per compute dtype.
RTOL = {torch.float64: 1e-10, torch.float32: 1e-5}


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """‖a − b‖_F / ‖b‖_F in float64."""
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


def load_point(net: torch.nn.Module, trajectory, k: int) -> None:
    """Copy the trajectory's point w_k into ``net`` (parameters and buffers, by name; tied names included)."""
    named = dict(net.named_parameters(remove_duplicate=False))
    named.update(dict(net.named_buffers(remove_duplicate=False)))
    with torch.no_grad():
        for name, value in trajectory.point(k).items():
            named[name].copy_(value.to(named[name].dtype))


def loss_kernel_reference(model, traj, X, Y, X2=None, Y2=None, *, per_sample, diagonal=False) -> torch.Tensor:
    """Σ_s ε_s ∇ℓ(x_a; w_s)·∇ℓ(x′_b; w_s) by autograd, one sample at a time, in float64; ``per_sample(out, y)``
    is the loss of one sample's output ``out`` ([1, …]) and target ``y`` ([1, …])."""
    net = copy.deepcopy(model).to(torch.float64)
    params = [p for p in net.parameters() if p.requires_grad]

    def grads(Xs, Ys):
        rows = []
        for i in range(Xs.shape[0]):
            loss = per_sample(net(Xs[i:i + 1]), Ys[i:i + 1])
            g = torch.autograd.grad(loss.reshape(()), params, allow_unused=True)
            rows.append(torch.cat([(torch.zeros_like(p) if gi is None else gi).reshape(-1) for gi, p in zip(g, params)]))
        return torch.stack(rows)

    K = 0
    for s, eps in enumerate(traj.step_sizes.tolist()):
        load_point(net, traj, s)
        A = grads(X, Y)
        B = A if X2 is None else grads(X2, Y2)
        K = K + eps * ((A * B).sum(1) if diagonal else A @ B.T)
    return K
