r"""engine.output_sketch: kernels over random (or fixed) combinations of a model's outputs — the unbiased output
sketch of the trace kernel and the pseudo-NTK — for models with many outputs and no linear head to collapse them.

**The output sketch** (``outputs="sketch"`` or :class:`OutputSketch`). With C outputs and r random directions
u_1 … u_r ∈ R^C (Rademacher ±1 or standard Gaussian entries, from ``seed``, shared by x and x′), the model
f̃(x) = Uᵀ f(x)/√r has r outputs and its trace kernel is

.. math:: \hat K(x, x') = \frac1r \sum_j u_j^\top G(x, x') u_j, \qquad G_{cd}(x, x') = \sum_s \varepsilon_s
          \nabla f_c(x; w_s) \cdot \nabla f_d(x'; w_s),

an unbiased estimate of the trace kernel K = tr G (E[u uᵀ] = I) for r backward passes per sample instead of C.
Its variance per entry: Gaussian (‖G‖_F² + tr(G²))/r; Rademacher (‖G‖_F² + tr(G²) − 2 Σ_c G_cc²)/r (never more).
On the diagonal G is symmetric PSD, so the relative standard error of K̂(x, x) is √(2‖G‖_F²/r)/tr G at most, and
that of an off-diagonal entry relative to √(K(x, x) K(x′, x′)) is at most the geometric mean of its two
diagonal ones (‖G(x,x′)‖_F² = tr(G(x,x) G(x′,x′)) ≤ ‖G(x,x)‖_F ‖G(x′,x′)‖_F). ``OutputSketch(target=0.05)``
chooses r from that bound: a pilot of r₀ directions on a few samples estimates each sample's relative variance
of uᵀGu, and r is the smallest count whose standard error meets ``target`` on every pilot sample (at most C).

**The pseudo-NTK** (``outputs="pntk"``, Mohamadi et al. 2023): the kernel of the one output Σ_c f_c/√C,
(1/C) Σ_{c,d} G_cd — C times cheaper than the trace; it approximates the output-averaged kernel (trace / C) where
the output-wise kernels' cross terms are small (wide networks at initialisation), and is a different kernel
elsewhere: a named approximation, not an estimate with a variance.

Example:
    >>> import torch
    >>> sk = OutputSketch(r=4, kind="gaussian", seed=1)
    >>> project = OutputProjection(sk)
    >>> project(torch.ones(2, 10)).shape                      # 10 outputs → 4 directions
    torch.Size([2, 4])
    >>> OutputSketch.of("pntk").describe()
    'pseudo-NTK: the kernel of Σ_c f_c/√C (one output)'
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

__all__ = ["OutputSketch", "OutputProjection", "KINDS", "sketch_variance", "directions_for_target"]

#: the directions' distributions
KINDS = ("rademacher", "gaussian")
#: the default number of directions of ``outputs="sketch"``
DEFAULT_R = 64
#: the pilot's directions and samples for ``target=``
PILOT_R, PILOT_SAMPLES = 32, 8


@dataclass(frozen=True)
class OutputSketch:
    """Which combinations of the outputs the kernel is taken over: ``r`` random directions of ``kind`` from
    ``seed`` (an unbiased estimate of the trace kernel), or with ``target`` the r a pilot finds enough for that
    relative standard error of the diagonal; ``pntk=True``: the pseudo-NTK's one fixed direction 1/√C."""

    r: int | None = None
    kind: str = "rademacher"
    seed: int = 0
    target: float | None = None
    pntk: bool = False
    #: the target a pilot chose ``r`` for (set by pkfast when it resolves ``target``; not for users)
    chosen_for: float | None = None

    def __post_init__(self) -> None:
        fn = "pkfast.OutputSketch"
        if self.r is not None and (isinstance(self.r, bool) or not isinstance(self.r, numbers.Integral) or self.r < 1):
            raise ValueError(f"{fn}: r (the number of output directions) must be an integer ≥ 1; found {self.r!r}")
        if self.kind not in KINDS:
            raise ValueError(f"{fn}: kind must be one of {', '.join(map(repr, KINDS))}; found {self.kind!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, numbers.Integral):
            raise TypeError(f"{fn}: seed must be an integer; found {self.seed!r}")
        if self.target is not None:
            if isinstance(self.target, bool) or not isinstance(self.target, numbers.Real) or not 0 < self.target < 1:
                raise ValueError(f"{fn}: target (the relative standard error of the diagonal to reach) must be in "
                                 f"(0, 1); found {self.target!r}")
            if self.r is not None:
                raise ValueError(f"{fn}: give r (the directions) or target (the error that chooses them), not both")
        if self.pntk and (self.r is not None or self.target is not None):
            raise ValueError(f"{fn}: the pseudo-NTK has one fixed direction; r and target do not apply")

    @classmethod
    def of(cls, outputs: Any) -> "OutputSketch | None":
        """The sketch an ``outputs=`` value asks for (``"sketch"``, ``"pntk"`` or an OutputSketch), else None."""
        if isinstance(outputs, OutputSketch):
            return outputs
        if outputs == "sketch":
            return cls()
        if outputs == "pntk":
            return cls(pntk=True)
        return None

    @property
    def directions(self) -> int:
        """r (the default where neither r nor target was given; the pilot's answer replaces a target)."""
        return 1 if self.pntk else (self.r or DEFAULT_R)

    def record(self) -> dict[str, Any]:
        """What a stored Gram records of it."""
        if self.pntk:
            return {"pntk": True}
        return {"r": self.directions, "kind": self.kind, "seed": int(self.seed),
                **({} if self.chosen_for is None else {"target": float(self.chosen_for)})}

    def describe(self) -> str:
        if self.pntk:
            return "pseudo-NTK: the kernel of Σ_c f_c/√C (one output)"
        how = (f" (chosen by a pilot for a {self.chosen_for:g} relative standard error of the diagonal)"
               if self.chosen_for is not None else "")
        return (f"output sketch: {self.directions} {self.kind} output directions{how}, seed {self.seed} — an unbiased "
                "estimate of the trace kernel")

    def matrix(self, C: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """U/√r ``[C, r]`` (pseudo-NTK: the column 1/√C), the same for every call with this sketch and C."""
        if self.pntk:
            return torch.full((C, 1), 1.0 / math.sqrt(C), dtype=dtype, device=device)
        r = self.directions
        g = torch.Generator().manual_seed(int(self.seed))
        U = (torch.randint(0, 2, (C, r), generator=g, dtype=torch.int64).to(torch.float64) * 2 - 1
             if self.kind == "rademacher" else torch.randn(C, r, generator=g, dtype=torch.float64))
        return (U / math.sqrt(r)).to(device, dtype)


class OutputProjection:
    """``output_fn`` composed with the sketch: the model's outputs ``[n, *out]`` (by ``inner``, else the default
    rule) flattened to ``[n, C]`` and multiplied by :meth:`OutputSketch.matrix` → ``[n, r]``."""

    def __init__(self, sketch: OutputSketch, inner: Callable[[Any], torch.Tensor] | None = None) -> None:
        self.sketch, self.inner = sketch, inner
        self._U: dict[tuple[int, torch.dtype, torch.device], torch.Tensor] = {}
        self.__qualname__ = f"output_sketch({getattr(inner, '__qualname__', 'outputs')})"

    @property
    def num_outputs(self) -> int | None:
        """C, the model's outputs per sample, once the projection has been applied."""
        return next(iter(self._U))[0] if self._U else None

    @property
    def takes_reduced(self) -> bool:
        """Whether it expects the model's output already reduced to a tensor by the default rule
        (:func:`pkfast.engine.inputs.adapt` applies that rule first when there is no ``inner``)."""
        return self.inner is None

    def __call__(self, out: Any) -> torch.Tensor:
        y = self.inner(out) if self.inner is not None else out
        if not isinstance(y, torch.Tensor):
            raise TypeError(f"the output sketch expects the outputs as a tensor [n, *out]; found {type(y).__name__}")
        y = y.reshape(y.shape[0], -1)
        key = (y.shape[1], y.dtype, y.device)
        if key not in self._U:
            self._U[key] = self.sketch.matrix(*key)
        return y @ self._U[key]

    def __repr__(self) -> str:
        return f"OutputProjection({self.sketch!r})"


def sketch_variance(G: torch.Tensor, r: int, kind: str) -> torch.Tensor:
    """The variance of K̂ = (1/r) Σ_j u_jᵀ G u_j for blocks ``G`` ``[..., C, C]`` (the module's formula)."""
    v = (G * G).sum((-1, -2)) + (G * G.transpose(-1, -2)).sum((-1, -2))
    if kind == "rademacher":
        v = v - 2 * (torch.diagonal(G, dim1=-2, dim2=-1) ** 2).sum(-1)
    return v / r


def directions_for_target(q: torch.Tensor, target: float, C: int) -> int:
    """r for a relative standard error ``target`` of the diagonal, from pilot values ``q`` ``[n, r₀]`` (each
    sample's u_jᵀ G(x, x) u_j for r₀ directions): the largest relative variance over the samples / target²,
    rounded up, between 1 and C."""
    mean = q.mean(1)
    rel = q.var(1, unbiased=True) / mean.clamp_min(torch.finfo(q.dtype).tiny) ** 2
    rel = rel[mean > 0]
    if rel.numel() == 0:
        return 1
    return int(min(C, max(1, math.ceil(float(rel.max()) / target ** 2))))
