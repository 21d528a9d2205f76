r"""attribution.lds: the linear datamodeling score (LDS) of a score matrix — per query, how well the sum of its
scores over a training subset predicts what a model retrained on that subset outputs — and its confidence
interval.

For query q, subsets S_1 … S_m (``masks``, one row per subset) and the retrained models' measurements
o_j(q) (``outputs``), the LDS is the Spearman rank correlation over j of

.. math:: g_j(q) = \sum_{i \in S_j} \mathrm{score}(q, i) \quad\text{and}\quad o_j(q),

the Pearson correlation of their ranks, ties given their average rank. Any score matrix works: pkfast's
(:func:`pkfast.attribution.scores`, kernel-machine contributions) or a peer's.
"""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np

__all__ = ["lds", "lds_ci", "average_ranks"]

_FN = "pkfast.attribution.lds"


def _array(name: str, a: Any, ndim: int, fn: str = _FN) -> np.ndarray:
    if hasattr(a, "detach"):  # a torch tensor
        a = a.detach().cpu().numpy()
    a = np.asarray(a)
    if a.ndim != ndim:
        raise ValueError(f"{fn}: {name} must be {ndim}-dimensional; found shape {a.shape}")
    return a


def average_ranks(x: np.ndarray) -> np.ndarray:
    """Ranks (1 … n) of each column of ``x`` ([n, k]), tied values sharing the average of their ranks.

    Example:
        >>> average_ranks(np.array([[10.0], [30.0], [20.0], [30.0]]))[:, 0].tolist()
        [1.0, 3.5, 2.0, 3.5]
    """
    n, k = x.shape
    order = np.argsort(x, axis=0, kind="stable")
    s = np.take_along_axis(x, order, axis=0)
    ranks = np.empty((n, k), dtype=np.float64)
    for c in range(k):  # one pass per column over runs of equal values
        col, r = s[:, c], np.empty(n, dtype=np.float64)
        start = np.flatnonzero(np.r_[True, col[1:] != col[:-1]])
        end = np.r_[start[1:], n]
        for a, b in zip(start, end):
            r[a:b] = (a + b + 1) / 2.0  # the mean of ranks a+1 … b
        ranks[order[:, c], c] = r
    return ranks


def lds(scores: Any, masks: Any, outputs: Any) -> np.ndarray:
    """Per-query linear datamodeling scores.

    Args:
        scores: [M, N] attribution scores (query × training point), numpy or torch.
        masks: [S, N] bool, which training points subset j held (S ≥ 3 subsets).
        outputs: [S, M] the measurement (e.g. the loss or the margin) of the model retrained on subset j, on
            each query.

    Returns:
        [M] float64: the Spearman correlation over the subsets between the subset's summed scores and the
        retrained output, per query; NaN (with a warning) for a query whose sums or outputs are all equal.

    Example:
        >>> import numpy as np
        >>> from pkfast.attribution import lds
        >>> rng = np.random.default_rng(0)
        >>> scores = rng.normal(size=(2, 20))                      # 2 queries, 20 training points
        >>> masks = rng.random((30, 20)) < 0.5                     # 30 random half-subsets
        >>> outputs = (masks @ scores.T) + 0.1 * rng.normal(size=(30, 2))   # outputs ≈ linear in the subsets
        >>> bool((lds(scores, masks, outputs) > 0.9).all())
        True
    """
    S_ = _array("scores", scores, 2).astype(np.float64)
    Mk = _array("masks", masks, 2)
    O = _array("outputs", outputs, 2).astype(np.float64)
    M, N = S_.shape
    if Mk.dtype != np.bool_:
        raise TypeError(f"{_FN}: masks must be boolean (subset membership); found dtype {Mk.dtype}; pass masks != 0 "
                        "if it holds 0/1")
    if Mk.shape[1] != N:
        raise ValueError(f"{_FN}: masks has {Mk.shape[1]} columns; expected one per training point of scores ({N})")
    if O.shape != (Mk.shape[0], M):
        raise ValueError(f"{_FN}: outputs has shape {O.shape}; expected (subsets, queries) = ({Mk.shape[0]}, {M}): "
                         "one row per subset of masks, one column per query of scores")
    if Mk.shape[0] < 3:
        raise ValueError(f"{_FN}: found {Mk.shape[0]} subsets; a rank correlation needs at least 3 (≥ 50 are usual)")
    if not (np.isfinite(S_).all() and np.isfinite(O).all()):
        raise ValueError(f"{_FN}: scores and outputs must be finite; found NaN or inf")
    g = Mk.astype(np.float64) @ S_.T  # [S, M]: each subset's summed scores per query
    rg, ro = average_ranks(g), average_ranks(O)
    rg -= rg.mean(0)
    ro -= ro.mean(0)
    den = np.sqrt((rg * rg).sum(0) * (ro * ro).sum(0))
    flat = den == 0
    if flat.any():
        warnings.warn(f"{_FN}: {int(flat.sum())} of {M} queries have constant summed scores or outputs over the "
                      "subsets; their LDS is NaN", stacklevel=2)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(flat, np.nan, (rg * ro).sum(0) / np.where(flat, 1.0, den))


def lds_ci(per_query: Any, *, level: float = 0.95, n_boot: int = 2000, seed: int = 0) -> tuple[float, float, float]:
    """(mean, low, high): the mean of per-query LDS values (NaNs dropped) and its percentile bootstrap interval
    over the queries, resampled ``n_boot`` times with ``seed``.

    Example:
        >>> from pkfast.attribution import lds_ci
        >>> mean, lo, hi = lds_ci([0.3, 0.5, 0.4, 0.6, 0.2], n_boot=500)
        >>> round(mean, 2), lo <= mean <= hi
        (0.4, True)
    """
    fn = "pkfast.attribution.lds_ci"
    v = _array("per_query", per_query, 1, fn).astype(np.float64)
    v = v[np.isfinite(v)]
    if v.size == 0:
        raise ValueError(f"{fn}: no finite per-query LDS value to summarise")
    if not 0.0 < level < 1.0:
        raise ValueError(f"{fn}: level must be in (0, 1); found {level}")
    rng = np.random.default_rng(seed)
    means = v[rng.integers(0, v.size, size=(n_boot, v.size))].mean(1)
    a = (1.0 - level) / 2.0
    lo, hi = np.quantile(means, [a, 1.0 - a])
    return float(v.mean()), float(lo), float(hi)
