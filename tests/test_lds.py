"""pkfast.attribution.lds (issue 29, item 1): the per-query Spearman correlation between each subset's summed
scores and the retrained models' outputs, against a direct computation with ties as average ranks; its
bootstrap interval."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pkfast.attribution import lds, lds_ci
from pkfast.attribution.lds import average_ranks


def _ranks_direct(v: list[float]) -> list[float]:
    """Rank i = 1 + #{j: v_j < v_i} + (#{j ≠ i: v_j = v_i}) / 2 — the average rank of a tie, by counting."""
    return [1 + sum(w < x for w in v) + (sum(w == x for w in v) - 1) / 2 for x in v]


def _spearman_direct(a: list[float], b: list[float]) -> float:
    ra, rb = _ranks_direct(a), _ranks_direct(b)
    ma, mb = sum(ra) / len(ra), sum(rb) / len(rb)
    num = sum((x - ma) * (y - mb) for x, y in zip(ra, rb))
    return num / (sum((x - ma) ** 2 for x in ra) * sum((y - mb) ** 2 for y in rb)) ** 0.5


def test_lds_equals_a_direct_spearman_with_ties():
    rng = np.random.default_rng(1)
    M, N, S = 3, 12, 15
    scores = rng.integers(-2, 3, size=(M, N)).astype(float)  # small integers: many tied subset sums
    masks = rng.random((S, N)) < 0.5
    outputs = np.round(rng.normal(size=(S, M)), 1)  # rounded: tied outputs too
    got = lds(scores, masks, outputs)
    for q in range(M):
        sums = [float(sum(scores[q, i] for i in range(N) if masks[j, i])) for j in range(S)]
        assert len(set(sums)) < S  # (the case has ties)
        assert got[q] == pytest.approx(_spearman_direct(sums, outputs[:, q].tolist()), abs=1e-12)


def test_perfect_reversed_and_torch_inputs():
    rng = np.random.default_rng(2)
    scores = rng.normal(size=(2, 10))
    masks = rng.random((20, 10)) < 0.5
    outputs = masks @ scores.T
    outputs[:, 1] *= -1.0
    got = lds(torch.from_numpy(scores), torch.from_numpy(masks), torch.from_numpy(outputs))
    assert got.tolist() == pytest.approx([1.0, -1.0], abs=1e-12)


def test_average_ranks_match_the_direct_count():
    v = np.array([[3.0, 1.0, 3.0, 2.0, 3.0, 0.5]]).T
    assert average_ranks(v)[:, 0].tolist() == _ranks_direct(v[:, 0].tolist())


def test_constant_outputs_give_nan_with_a_warning_and_bad_shapes_are_errors():
    masks = np.random.default_rng(0).random((5, 4)) < 0.5
    with pytest.warns(UserWarning, match="1 of 2 queries have constant"):
        got = lds(np.ones((2, 4)) * [[1.0], [0.0]] + np.arange(4) * [[1.0], [0.0]], masks,
                  np.c_[np.arange(5.0), np.zeros(5)])
    assert np.isfinite(got[0]) and np.isnan(got[1])
    with pytest.raises(ValueError, match=r"outputs has shape \(5, 3\); expected \(subsets, queries\) = \(5, 2\)"):
        lds(np.ones((2, 4)), masks, np.ones((5, 3)))
    with pytest.raises(ValueError, match="masks has 3 columns; expected one per training point of scores"):
        lds(np.ones((2, 4)), masks[:, :3], np.ones((5, 2)))
    with pytest.raises(TypeError, match="masks must be boolean"):
        lds(np.ones((2, 4)), masks.astype(int), np.ones((5, 2)))
    with pytest.raises(ValueError, match="at least 3"):
        lds(np.ones((2, 4)), masks[:2], np.ones((2, 2)))


def test_bootstrap_interval_is_seeded_contains_the_mean_and_narrows():
    rng = np.random.default_rng(3)
    few, many = rng.normal(0.4, 0.2, 10), rng.normal(0.4, 0.2, 400)
    a, b = lds_ci(few, seed=7), lds_ci(few, seed=7)
    assert a == b and a[1] <= a[0] <= a[2]
    assert lds_ci(np.r_[few, np.nan])[0] == pytest.approx(few.mean())  # NaNs dropped
    (_, lo_f, hi_f), (_, lo_m, hi_m) = a, lds_ci(many, seed=7)
    assert hi_m - lo_m < 0.5 * (hi_f - lo_f)
    with pytest.raises(ValueError, match="no finite"):
        lds_ci([np.nan])
