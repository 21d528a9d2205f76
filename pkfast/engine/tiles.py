"""tiles: the tiling — splits the Gram's (rows × cols) grid into tiles whose working memory fits a byte budget.

The working memory of one tile is its two Jacobian panels (``b_r`` and ``b_c`` samples × C·P values), what one
per-sample pass over a chunk of samples holds at its peak (measured: :func:`pkfast.engine.resources.meter.pass_cost`; without
a measurement, twice the chunk's panel), and the tile accumulator (``b_r × b_c`` entries, × C² for the full block
Gram). A pass may take at most a quarter of the budget: the chunk is lowered until it does. Tile sides are solved
from the budget, never fixed; ragged edges are allowed. For a symmetric
Gram (X2 is None and a symmetric rule) only tiles on or above the diagonal are planned.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

__all__ = ["Tile", "Tiling", "solve_tiling", "solve_diagonal"]


@dataclass(frozen=True)
class Tile:
    """One block of the Gram: ``G[rows, cols]``. ``diagonal`` tiles of a symmetric plan have rows == cols."""

    index: int
    rows: slice
    cols: slice
    diagonal: bool = False

    @property
    def shape(self) -> tuple[int, int]:
        return (self.rows.stop - self.rows.start, self.cols.stop - self.cols.start)


class BudgetTooSmall(ValueError):
    """No tile fits ``memory_budget``: ``need`` bytes would (:func:`pkfast.plan` prints the plan anyway)."""

    def __init__(self, message: str, need: int, chunk: int, bytes_per_sample: int, held: int) -> None:
        super().__init__(message)
        self.need, self.chunk, self.bytes_per_sample, self.held = need, chunk, bytes_per_sample, held


@dataclass
class Tiling:
    n_rows: int
    n_cols: int
    row_block: int
    col_block: int
    symmetric: bool
    chunk: int
    bytes_per_sample: int
    tile_bytes: int
    budget: int
    tiles: list[Tile] = field(default_factory=list)
    #: bytes one pass over ``chunk`` samples holds at its peak (included in ``tile_bytes``)
    pass_bytes: int = 0
    #: why no tile fits the budget (a plan that cannot run: :func:`pkfast.plan` prints it; :func:`pkfast.gram`
    #: raises it); empty when the tiling runs
    problem: str = ""

    @property
    def num_pairs(self) -> int:
        """Number of (row, col) kernel entries the plan computes (upper triangle counted once)."""
        return sum(t.shape[0] * t.shape[1] for t in self.tiles)

    def __repr__(self) -> str:
        kind = "upper-triangle" if self.symmetric else "full"
        if self.problem:
            return f"Tiling({self.n_rows}×{self.n_cols}: does not fit the {self.budget / 2**20:.1f} MiB budget)"
        return (
            f"Tiling({self.n_rows}×{self.n_cols}, {len(self.tiles)} {kind} tiles of ≤{self.row_block}×"
            f"{self.col_block}, vmap chunk {self.chunk}, ~{self.tile_bytes / 2**20:.1f} MiB of "
            f"{self.budget / 2**20:.1f} MiB budget{self._pass_note()})"
        )

    def _pass_note(self) -> str:
        return f"; one pass over {self.chunk} samples holds {self.pass_bytes / 2**20:.2g} MiB" if self.pass_bytes else ""


def _panel_sizes(budget: int, fixed: int, u: int, k: int, n_rows: int, n_cols: int, square: bool) -> tuple[int, int]:
    """Largest (b_r, b_c) with b_r·u + b_c·u + b_r·b_c·k + fixed ≤ budget (square tiles if ``square``)."""
    room = budget - fixed
    # equal sides first: k b² + 2u b - room ≤ 0
    b = int((-2 * u + math.sqrt(4 * u * u + 4 * k * room)) / (2 * k)) if k else room // (2 * u)
    b = max(b, 0)
    if square:
        b = min(b, n_rows)
        return b, b
    br, bc = min(b, n_rows), min(b, n_cols)
    if br < b:  # few rows: give the rest to the columns
        bc = min(n_cols, int((room - br * u) // (u + br * k)))
    elif bc < b:
        br = min(n_rows, int((room - bc * u) // (u + bc * k)))
    return br, bc


def _chunk_and_fixed(chunk: int, u: int, budget: int, reserved: int, cost) -> tuple[int, int, int]:
    """(samples per pass, bytes held whatever the tiles' size, of which one pass's): the measured pass ``cost``
    (:class:`~pkfast.engine.resources.meter.PassCost`) within a quarter of the budget — else, unmeasured (0 is returned
    as the pass's), the chunk's output and its copy (2 × chunk × u) within a quarter."""
    if cost is None:
        chunk = max(1, min(chunk, budget // (8 * u) if u else chunk))
        return chunk, 2 * chunk * u + int(reserved), 0
    else:
        chunk = max(1, min(chunk, (budget // 4 - cost.fixed) // max(1, cost.per_sample)))
        held = cost.bytes(chunk)
    return chunk, held + int(reserved), held


def _reuse_sizes(room: int, u: int, k: int, n: int) -> tuple[int, int]:
    """Largest b_r with b_c = ⌈b_r/2⌉ and (b_r + b_c)·u + b_r²·k ≤ room (the diagonal tile's accumulator)."""
    if room <= 0:
        return 0, 0
    b = int((-1.5 * u + math.sqrt(2.25 * u * u + 4 * k * room)) / (2 * k)) if k else int(room // (1.5 * u))
    while b > 0 and (b + -(-b // 2)) * u + b * b * k > room:
        b -= 1
    b = min(b, n)
    return b, max(1, -(-b // 2)) if b else 0


def solve_tiling(
    n_rows: int,
    n_cols: int,
    *,
    symmetric: bool,
    bytes_per_sample: int,
    acc_bytes_per_pair: int,
    budget: int,
    chunk: int,
    fn: str = "pkfast.gram",
    reuse_rows: bool = False,
    reserved: int = 0,
    pass_cost=None,
) -> Tiling:
    """Plan tiles for an ``n_rows × n_cols`` Gram.

    With ``reuse_rows`` (a symmetric Gram whose engine keeps a tile-row's panel across consecutive tiles, i.e.
    one kernel term) the plan is row panels of b_r samples, each a diagonal tile followed by tiles of
    b_c = ⌈b_r/2⌉ columns: the row panel is computed once per tile-row and only the column panels are
    recomputed, ≈ N + N²/(2 b_r) panel rows in all instead of ≈ N²/b for square tiles of side b.

    Args:
        symmetric: compute only tiles with ``col ≥ row`` (square tiles; requires ``n_rows == n_cols``).
        bytes_per_sample: bytes of one sample's Jacobian (C · P · itemsize).
        acc_bytes_per_pair: bytes per Gram entry in the tile accumulator (C² or 1, × accumulator itemsize).
        budget: working-memory budget in bytes.
        chunk: the preferred samples per ``vmap`` call; reduced if the budget needs it.
        reserved: bytes held besides the tiles whatever their size (the streaming workspace of
            :mod:`pkfast.engine.routes.layered`).
        pass_cost: what one per-sample pass holds (:class:`~pkfast.engine.resources.meter.PassCost`; None: estimated).
    """
    u, k = int(bytes_per_sample), int(acc_bytes_per_pair)
    chunk, fixed, held = _chunk_and_fixed(chunk, u, budget, reserved, pass_cost)
    if symmetric and fixed + n_rows * u + n_rows * n_rows * k <= budget:
        # one diagonal tile: its column panel is its row panel, so only one panel is held
        chunk = min(chunk, n_rows)
        tiles = [Tile(0, slice(0, n_rows), slice(0, n_rows), diagonal=True)]
        used = fixed + n_rows * u + n_rows * n_rows * k
        return Tiling(n_rows, n_cols, n_rows, n_rows, True, chunk, u, used, budget, tiles, held)
    if symmetric and reuse_rows:
        br, bc = _reuse_sizes(budget - fixed, u, k, n_rows)
    else:
        br, bc = _panel_sizes(budget, fixed, u, k, n_rows, n_cols, square=symmetric)
    if br < 1 or bc < 1:
        need = fixed + 2 * u + k
        raise BudgetTooSmall(
            f"{fn}: memory_budget of {budget:,} bytes is too small for one tile; a 1×1 tile needs {need:,} bytes "
            f"(one sample's Jacobian panel and layer factors take {u:,} bytes{_reserved_note(reserved, held)}). "
            f"Raise memory_budget to at least {need:,}.", need, chunk, u, held)
    chunk = min(chunk, max(br, bc))
    tiles: list[Tile] = []
    for r0 in range(0, n_rows, br):
        rows = slice(r0, min(n_rows, r0 + br))
        if symmetric and reuse_rows:
            tiles.append(Tile(len(tiles), rows, rows, diagonal=True))
            c_start = rows.stop
        else:
            c_start = r0 if symmetric else 0
        for c0 in range(c_start, n_cols, bc):
            cols = slice(c0, min(n_cols, c0 + bc))
            tiles.append(Tile(len(tiles), rows, cols, diagonal=symmetric and c0 == r0))
    used = fixed + (br + bc) * u + br * max(br if symmetric and reuse_rows else 0, bc) * k
    return Tiling(n_rows, n_cols, br, bc, symmetric, chunk, u, used, budget, tiles, held)


def _reserved_note(reserved: int, held: int = 0) -> str:
    parts = ([f"a {reserved:,}-byte workspace"] if reserved else []) + (
        [f"{held:,} bytes that one per-sample pass holds"] if held else [])
    return ", besides " + " and ".join(parts) if parts else ""


def solve_diagonal(n: int, *, bytes_per_sample: int, acc_bytes_per_sample: int, budget: int, chunk: int,
                  fn: str = "pkfast.gram", reserved: int = 0, pass_cost=None) -> Tiling:
    """Row panels for the diagonal K(x_a, x_a): one (or two, for asymmetric rules) panels per block."""
    u = int(bytes_per_sample)
    chunk, fixed, held = _chunk_and_fixed(chunk, u, budget, reserved, pass_cost)
    b = min(n, (budget - fixed) // (2 * u + acc_bytes_per_sample))
    if b < 1:
        need = fixed + 2 * u + acc_bytes_per_sample
        raise BudgetTooSmall(
            f"{fn}: memory_budget of {budget:,} bytes is too small; one sample needs {need:,} bytes "
            f"(one sample's Jacobian panel and layer factors take {u:,} bytes{_reserved_note(reserved, held)}). "
            f"Raise memory_budget to at least {need:,}.", need, chunk, u, held)
    chunk = min(chunk, b)
    tiles = [Tile(i, slice(a, min(n, a + b)), slice(a, min(n, a + b)), diagonal=True)
             for i, a in enumerate(range(0, n, b))]
    used = fixed + 2 * b * u + b * acc_bytes_per_sample
    return Tiling(n, n, b, b, True, chunk, u, used, budget, tiles, held)
