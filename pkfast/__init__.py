"""pkfast: path-kernel Gram matrices of neural networks along their training trajectory.

K(x, x') = Σ_s ε_s ∇_w f(x; w_s) · ∇_w f(x'; w_s)   (Domingos 2020), computed tile by tile.

Public surface:
    gram                 the path-kernel Gram (or cross-Gram, or its diagonal) of a model along a trajectory
    Trajectory           weight points w_0 … w_T and step sizes ε_0 … ε_{T-1}
    TrajectoryRecorder   records a trajectory to disk during training
    reference            the float64 oracle every fast path is tested against (module)
"""

from pkfast import reference
from pkfast.gram import gram
from pkfast.recorder import TrajectoryRecorder
from pkfast.trajectory import Trajectory

__version__ = "0.1.0"

__all__ = ["gram", "Trajectory", "TrajectoryRecorder", "reference", "__version__"]
