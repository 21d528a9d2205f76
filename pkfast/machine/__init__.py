"""machine: the trained network as an exact kernel machine over its training points — per-sample gradient panels
from captured factors (:mod:`~pkfast.machine.panels`), the backward sweep over the steps
(:mod:`~pkfast.machine.sweep`) and :class:`~pkfast.machine.kernel_machine.KernelMachine` itself."""

from pkfast.machine.kernel_machine import KernelMachine

__all__ = ["KernelMachine"]
