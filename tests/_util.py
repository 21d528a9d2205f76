"""Test helpers shared across modules."""

import torch

#: Relative Frobenius tolerance of fast paths against the float64 reference, per compute dtype.
RTOL = {torch.float64: 1e-10, torch.float32: 1e-5}


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """‖a − b‖_F / ‖b‖_F in float64."""
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-300))
