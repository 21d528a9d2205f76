"""Tile plans: every Gram entry covered exactly once (or mirrored), ragged edges, the budget respected."""

import pytest

from pkfast.engine.tiles import solve_diagonal, solve_tiling


def coverage(plan):
    count = [[0] * plan.n_cols for _ in range(plan.n_rows)]
    for t in plan.tiles:
        for i in range(t.rows.start, t.rows.stop):
            for j in range(t.cols.start, t.cols.stop):
                count[i][j] += 1
                if plan.symmetric and not t.diagonal:
                    count[j][i] += 1
    return count


@pytest.mark.parametrize("n,m,symmetric", [(37, 37, True), (37, 23, False), (5, 300, False), (300, 5, False),
                                            (1, 1, True), (64, 64, True)])
@pytest.mark.parametrize("budget", [3_000, 20_000, 10**9])
def test_every_entry_exactly_once_and_budget_respected(n, m, symmetric, budget):
    plan = solve_tiling(n, m, symmetric=symmetric, bytes_per_sample=120, acc_bytes_per_pair=4, budget=budget, chunk=8)
    assert all(c == 1 for row in coverage(plan) for c in row)
    assert plan.tile_bytes <= budget
    if symmetric:
        assert all(t.cols.start >= t.rows.start for t in plan.tiles)
        assert plan.row_block == plan.col_block
    if budget == 10**9:
        assert len(plan.tiles) == 1  # everything fits: one tile


def test_skinny_cross_gram_gives_budget_to_the_long_side():
    plan = solve_tiling(10_000, 3, symmetric=False, bytes_per_sample=1000, acc_bytes_per_pair=4, budget=2_000_000, chunk=8)
    assert plan.col_block == 3
    assert plan.row_block > 1000  # far more than the square side sqrt-solution would allow


def test_too_small_budget_raises():
    with pytest.raises(ValueError, match=r"memory_budget of 10 bytes is too small for one tile"):
        solve_tiling(4, 4, symmetric=True, bytes_per_sample=100, acc_bytes_per_pair=4, budget=10, chunk=1)


def test_diagonal_plan_covers_rows_once():
    plan = solve_diagonal(41, bytes_per_sample=100, acc_bytes_per_sample=36, budget=5_000, chunk=4)
    rows = [i for t in plan.tiles for i in range(t.rows.start, t.rows.stop)]
    assert rows == list(range(41)) and len(plan.tiles) > 1
    assert plan.tile_bytes <= 5_000


@pytest.mark.parametrize("n", [37, 64, 1])
@pytest.mark.parametrize("budget", [3_000, 20_000, 10**9])
def test_row_reuse_plan_covers_once_within_budget(n, budget):
    """reuse_rows: per row panel a diagonal tile then column tiles of half its height; the panel rows every
    tile-row computes (its own panel once, then the columns) stay below the square plan's."""
    plan = solve_tiling(n, n, symmetric=True, bytes_per_sample=120, acc_bytes_per_pair=4, budget=budget, chunk=8,
                      reuse_rows=True)
    assert all(c == 1 for row in coverage(plan) for c in row)
    assert plan.tile_bytes <= budget
    assert all(t.cols.start >= t.rows.start for t in plan.tiles)
    for t in plan.tiles:
        if t.diagonal:
            assert t.rows == t.cols
        else:
            assert t.cols.stop - t.cols.start <= plan.col_block <= -(-plan.row_block // 2)

    def panel_rows(p, reuse):
        rows, last = 0, None
        for t in p.tiles:
            if not (reuse and t.rows == last):
                rows += t.rows.stop - t.rows.start
            last = t.rows
            if not t.diagonal:
                rows += t.cols.stop - t.cols.start
        return rows

    square = solve_tiling(n, n, symmetric=True, bytes_per_sample=120, acc_bytes_per_pair=4, budget=budget, chunk=8)
    assert panel_rows(plan, True) <= panel_rows(square, False)
    if len(square.tiles) > 3:
        assert panel_rows(plan, True) < 0.8 * panel_rows(square, False)
