"""engine.capture: the per-sample factors of the layers with a rule and the Jacobian of the parameters without one,
from hooked batched passes (or ``vmap(jacrev)`` where those cannot run).

- :mod:`~pkfast.engine.capture.hooks`: :class:`Capture` — hooks on the layers with a rule, their discovery and
  checks, and the passes that fill a panel and the factors; :class:`Groups` — the layers sorted by route;
- :mod:`~pkfast.engine.capture.entry`: the per-sample gradients of parameters without a rule (a bare
  ``nn.Parameter``, a custom module's gain) from probes where they meet the samples, in the batched pass;
- :mod:`~pkfast.engine.capture.backward`: the output gradients of a batched forward at its probes;
- :mod:`~pkfast.engine.capture.dispatch`: data-dependent control flow, found before the layers are routed.
"""

from pkfast.engine.capture.hooks import Capture, Groups

__all__ = ["Capture", "Groups"]
