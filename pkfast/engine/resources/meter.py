"""engine.resources.meter: measures the memory a route's per-sample pass allocates — every storage its operations create,
alive at once at the peak — so that the plan holds what a pass really takes, not a formula's guess.

The plan's tiles hold panels and factors (:attr:`~pkfast.engine.routes.base.Route.bytes_per_sample`), which a
formula gives exactly; a *pass* also holds transients no formula sees reliably: autograd's saved activations,
every hooked call's C-wide output gradients, the intermediate gradients of a batched backward, ``vmap``'s
batched intermediates, the first chunk's check against the vmap pass. :func:`pass_cost` runs the route's
:meth:`~pkfast.engine.routes.base.Route.side` on 1 and a few samples under :class:`PeakMeter` (a
``TorchDispatchMode`` that counts each new storage's bytes until it is freed) and fits
``peak(n) = fixed + per_sample · n`` to what stays beyond the side's own result. It sees every device's
allocations alike (CPU or CUDA); the tensors it counts are those created by torch operations inside the pass.
"""

from __future__ import annotations

import dataclasses
import weakref
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

__all__ = ["PeakMeter", "PassCost", "pass_cost"]

#: Samples of the larger measured pass; the smaller has half as many. (Not 1: a one-sample pass may hand back
#: views of its transients as its factors — a C-wide identity of cotangents is the output gradient of a
#: sample — so that what it holds cannot be told from what it frees.)
MEASURE_SAMPLES = 4


class PeakMeter(TorchDispatchMode):
    """Counts the bytes of every storage created by a torch operation while active, until it is freed;
    :attr:`peak` is the most alive at once. Views and in-place results (no new storage) add nothing.

    Example:
        >>> import torch
        >>> from pkfast.engine.resources.meter import PeakMeter
        >>> with PeakMeter() as m:
        ...     a = torch.ones(1000, dtype=torch.float64)   # 8,000 bytes
        ...     b = a * 2                                   # 8,000 more, both alive
        ...     del a, b
        ...     c = torch.ones(500, dtype=torch.float64)    # 4,000: below the peak
        >>> m.peak
        16000
    """

    def __init__(self) -> None:
        super().__init__()
        self.live = 0
        self.peak = 0
        self._seen: dict[int, int] = {}

    def _freed(self, key: int, n: int) -> None:
        if self._seen.pop(key, None) is not None:
            self.live -= n

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if not isinstance(t, torch.Tensor) or t.is_meta:
                continue
            st = t.untyped_storage()
            key, n = st.data_ptr(), st.nbytes()
            if n == 0 or key in self._seen:
                continue
            self._seen[key] = n
            self.live += n
            self.peak = max(self.peak, self.live)
            weakref.finalize(st, self._freed, key, n)
        return out


@dataclass(frozen=True)
class PassCost:
    """What one per-sample pass holds besides the tile's panels and factors: ``per_sample`` bytes for each
    sample of the pass's chunk and ``fixed`` bytes whatever the chunk (identity matrices, the first chunk's
    check against the vmap pass)."""

    per_sample: int = 0
    fixed: int = 0

    def bytes(self, chunk: int) -> int:
        """Bytes a pass over ``chunk`` samples holds at its peak."""
        return self.fixed + chunk * self.per_sample


def _held(side: Any) -> int:
    """Bytes of what a side hands back beyond its panel (the factors it keeps for the tile's product)."""
    seen: dict[int, int] = {}
    for _, f in side.factors:
        for t in tree_flatten(f)[0]:
            if isinstance(t, torch.Tensor):
                st = t.untyped_storage()
                seen[st.data_ptr()] = st.nbytes()
    return sum(seen.values())


def pass_cost(route: Any, data: Any, point: Any) -> PassCost:
    """Measure ``route``'s per-sample pass at evaluation point ``point`` on the first samples of ``data``:
    once on ``m`` = min(N, :data:`MEASURE_SAMPLES`) samples (with any one-time check the first pass runs), again
    on m and on h = ⌈m/2⌉; ``per_sample`` = (peak(m) − peak(h)) / (m − h), ``fixed`` = the rest of peak(h) plus
    what the first pass took beyond the second. Runs the route between its ``begin`` and ``end``."""
    m = min(MEASURE_SAMPLES, data.X.shape[0])
    X, Y = data.X[:m], None if data.Y is None else data.Y[:m]
    chunk = route.chunk  # (begin lowers it to the m measured samples: the plan's chunk is the route's own)
    route.begin(dataclasses.replace(data, X=X, X2=None, Y=Y, Y2=None), m, 0, m, False)
    peaks = []
    h = -(-m // 2)
    try:
        for n in (m, m, h):
            with PeakMeter() as meter:
                side = route.side(((point, 1.0),), X[:n], None if Y is None else Y[:n], "rows", slice(0, n))
            peaks.append(max(0, meter.peak - _held(side)))
            del side
    finally:
        route.end()
        route.chunk = chunk
    first, pm, ph = peaks
    per = max(0.0, (pm - ph) / (m - h) if m > h else ph)
    fixed = max(0.0, ph - per * h) + max(0, first - pm)
    return PassCost(int(per), int(fixed))
