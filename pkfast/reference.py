"""The float64 reference oracle: the simplest possible path-kernel Gram, judged correct by inspection.

Per-sample, per-output ``torch.autograd.grad`` loops on a float64 copy of the model, the rules written out
literally, no tiling, no ``torch.func``. Every fast path in pkfast is tested against :func:`gram_reference`.
It is O(N·C) backward passes per point: use it on small problems only.
"""

from __future__ import annotations

import copy

import numpy as np
import torch

from pkfast.trajectory.points import Trajectory

__all__ = ["gram_reference", "jacobian_reference"]


def _load_point(net: torch.nn.Module, trajectory: Trajectory, k: int) -> None:
    """Copy w_k into ``net`` (parameters and buffers found in the trajectory, by name)."""
    point = trajectory.point(k)
    named = dict(net.named_parameters(remove_duplicate=False))
    named.update(dict(net.named_buffers(remove_duplicate=False)))
    with torch.no_grad():
        for name, value in point.items():
            named[name].copy_(value.to(torch.float64))


def jacobian_reference(net: torch.nn.Module, X: torch.Tensor) -> torch.Tensor:
    """``[n, C, P]``: ∂f_c(x_a)/∂w for the trainable parameters of ``net`` (float64), by autograd loops."""
    params = [p for p in net.parameters() if p.requires_grad]  # parameters() lists a tied tensor once
    rows = []
    for a in range(X.shape[0]):
        x = X[a : a + 1]
        out = net(x).reshape(-1)
        J = []
        for c in range(out.numel()):
            grads = torch.autograd.grad(out[c], params, retain_graph=True, allow_unused=True)
            J.append(torch.cat([(torch.zeros_like(p) if g is None else g).reshape(-1) for g, p in zip(grads, params)]))
        rows.append(torch.stack(J))
    return torch.stack(rows)


def gram_reference(
    model: torch.nn.Module,
    trajectory: Trajectory,
    X,
    X2=None,
    *,
    outputs: str = "trace",
    rule: str = "left",
    diagonal: bool = False,
) -> torch.Tensor:
    """Float64 path-kernel Gram with the same meaning as :func:`pkfast.gram` (small inputs only).

    >>> import torch, pkfast
    >>> from pkfast.reference import gram_reference
    >>> net = torch.nn.Linear(3, 2)
    >>> w0 = {k: v.clone() for k, v in net.state_dict().items()}
    >>> traj = pkfast.Trajectory.from_checkpoints([w0, w0], lr=0.5)
    >>> X = torch.randn(4, 3, dtype=torch.float64)
    >>> K = gram_reference(net, traj, X, outputs="full")
    >>> bool(torch.allclose(K[0, 1], 0.5 * (X[0] @ X[1] + 1) * torch.eye(2, dtype=torch.float64)))
    True
    """
    net = copy.deepcopy(model).to(torch.float64)
    Xa = torch.as_tensor(np.asarray(X)) if isinstance(X, np.ndarray) else X
    Xb = Xa if X2 is None else (torch.as_tensor(np.asarray(X2)) if isinstance(X2, np.ndarray) else X2)
    dev = next(net.parameters()).device
    Xa = Xa.to(dev, torch.float64) if Xa.is_floating_point() else Xa.to(dev)
    Xb = Xb.to(dev, torch.float64) if Xb.is_floating_point() else Xb.to(dev)

    eps = [float(e) for e in trajectory.step_sizes]
    T = len(eps)
    # weight of each point in the sum over points
    if rule == "left":
        weights = {s: eps[s] for s in range(T)}
    elif rule == "trapezoid":
        weights = {}
        for s in range(T):
            weights[s] = weights.get(s, 0.0) + eps[s] / 2
            weights[s + 1] = weights.get(s + 1, 0.0) + eps[s] / 2
    else:
        raise ValueError(f"gram_reference: unknown rule {rule!r}")

    K = None
    for k, w in weights.items():
        _load_point(net, trajectory, k)
        Ja = jacobian_reference(net, Xa)
        Jb = Ja if X2 is None else jacobian_reference(net, Xb)
        Kk = torch.einsum("acp,bdp->abcd", Ja, Jb) * w  # [N, M, C, C]
        K = Kk if K is None else K + Kk
    assert K is not None
    C = K.shape[-1]
    if diagonal:
        K = torch.stack([K[a, a] for a in range(K.shape[0])])
        if outputs == "full":
            return K.cpu()
        tr = torch.diagonal(K, dim1=-2, dim2=-1).sum(-1)
        return (tr / C if outputs == "mean" else tr).cpu()
    if outputs == "full":
        return K.cpu()
    tr = torch.diagonal(K, dim1=-2, dim2=-1).sum(-1)
    return (tr / C if outputs == "mean" else tr).cpu()
