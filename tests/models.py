"""Small models and synthetic trajectories shared by the tests."""

from __future__ import annotations

import torch
from torch import nn

import pkfast


def mlp(d_in: int = 5, hidden: int = 7, d_out: int = 3) -> nn.Module:
    return nn.Sequential(nn.Linear(d_in, hidden), nn.Tanh(), nn.Linear(hidden, hidden), nn.Tanh(), nn.Linear(hidden, d_out))


class SmallCNN(nn.Module):
    """1×6×6 images → 4 outputs, with stride, padding and groups."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 4, 3, padding=1)
        self.conv2 = nn.Conv2d(4, 4, 3, stride=2, padding=1, groups=2)
        self.head = nn.Linear(4 * 3 * 3, 4)

    def forward(self, x):
        h = torch.tanh(self.conv1(x))
        h = torch.tanh(self.conv2(h))
        return self.head(h.flatten(1))


def random_trajectory(model: nn.Module, steps: int = 3, scale: float = 0.1, lr=None, seed: int = 0) -> pkfast.Trajectory:
    """A trajectory of random moves of the trainable parameters (buffers fixed; tied tensors stay tied)."""
    g = torch.Generator().manual_seed(seed)
    start = {k: v.detach().clone() for k, v in model.state_dict().items()}
    points = [start]
    with torch.no_grad():
        for _ in range(steps):
            for p in model.parameters():  # each tensor once
                if p.requires_grad:
                    p.add_(scale * torch.randn(p.shape, generator=g, dtype=p.dtype))
            points.append({k: v.detach().clone() for k, v in model.state_dict().items()})
        model.load_state_dict(start)
    if lr is None:
        lr = [0.1 * (s + 1) for s in range(steps)]
    return pkfast.Trajectory.from_checkpoints(points, lr=lr)
