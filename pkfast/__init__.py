"""pkfast: path-kernel Gram matrices of neural networks along their training trajectory.

K(x, x') = Σ_s ε_s ∇_w f(x; w_s) · ∇_w f(x'; w_s)   (Domingos 2020), computed tile by tile.

Public surface:
    gram                 the path-kernel Gram (or cross-Gram, or its diagonal) of a model along a trajectory;
                         with out="….npy" stored tile by tile on disk, resumable and shared across ranks
    plan                 what gram() would do: each layer's route (factorized / materialized / jacobian), costs, tiles
    open_gram            a stored Gram with its options, fingerprints and progress
    Trajectory           weight points w_0 … w_T and step sizes ε_0 … ε_{T-1}
    TrajectoryRecorder   records a trajectory to disk during training (weights, lr, batches, loss, optimizer)
    KernelMachine        the trained network as f(x) = b(x) + Σ_i c_i(x) over its training points: predictions,
                         per-point contributions, explanations, Domingos coefficients, exactness certificate
    sketch, PathFeatures random JL path features Φ(x) = Σ_s √ε_s J_s(x) R_s (N×C×k, saved and reused for Grams)
    LossSpec             a training loss convention (per-sample loss and batch weights)
    reference            the float64 oracle every fast path is tested against (module)
"""

from pkfast import reference
from pkfast.gram import gram, plan
from pkfast.loss import LossSpec
from pkfast.machine import KernelMachine
from pkfast.recorder import TrajectoryRecorder
from pkfast.store import open_gram
from pkfast.sketch import PathFeatures, sketch
from pkfast.trajectory import Trajectory

__version__ = "0.1.0"

__all__ = ["gram", "plan", "open_gram", "Trajectory", "TrajectoryRecorder", "KernelMachine", "LossSpec", "sketch",
           "PathFeatures", "reference", "__version__"]
