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
    OutputSketch         outputs= over random output directions (an unbiased trace kernel for r ≪ C passes) or the
                         pseudo-NTK
    layers               the registry of layer rules (module) — register a rule for your own layer type
    reference            the float64 oracle every fast path is tested against (module)
    attribution          training-data attribution: query × train scores, top-k proponents/opponents and
                         self-influence, exact or sketched, streamed over the training set (module)

The package, in the direction of its imports (docs/architecture.md): base modules (checks, options, loss, rules,
formats, tiles, accumulate) ← trajectory and its files ← the functional model ← layers ← routes ← store, sinks,
driver ← the public doors (gram, plan, sketch, KernelMachine, recorder, CLI).
"""

from pkfast import attribution, layers, reference
from pkfast._version import __version__
from pkfast.gram import gram, plan
from pkfast.engine.output_sketch import OutputSketch
from pkfast.loss import LossSpec
from pkfast.machine.kernel_machine import KernelMachine
from pkfast.trajectory.recorder import TrajectoryRecorder
from pkfast.sketch import PathFeatures, sketch
from pkfast.store.reader import open_gram
from pkfast.trajectory.points import Trajectory

__all__ = ["gram", "plan", "open_gram", "Trajectory", "TrajectoryRecorder", "KernelMachine", "LossSpec", "OutputSketch", "sketch",
           "PathFeatures", "layers", "reference", "attribution", "__version__"]
