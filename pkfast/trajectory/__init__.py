"""trajectory: the training run as pkfast reads it — weight points and step sizes (:mod:`~pkfast.trajectory.points`),
their directory format (:mod:`~pkfast.trajectory.files`), the typed record of optimizer and steps
(:mod:`~pkfast.trajectory.recording`), checkpoint files and folders
(:mod:`~pkfast.trajectory.checkpoints`) and the recorder that writes them during training
(:mod:`~pkfast.trajectory.recorder`). The training loops' callbacks are in :mod:`pkfast.integrations`."""

from pkfast.trajectory.files import TrajectoryChecksumError
from pkfast.trajectory.points import Trajectory
from pkfast.trajectory.recorder import TrajectoryRecorder

__all__ = ["Trajectory", "TrajectoryRecorder", "TrajectoryChecksumError"]
