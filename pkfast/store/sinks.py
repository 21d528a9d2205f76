"""sinks: where the driver hands finished tiles — a tensor in memory, or a stored Gram: the chunked store of
:mod:`pkfast.store.writer` whose chunks are the tiles, shared by the ranks of a ``torch.distributed`` group
(:mod:`pkfast.store.ranks`).

A sink says which tiles this process computes (:meth:`Sink.open`: all of them in memory; for the store, the
unfinished ones of this rank's share, in the stored tiling), takes each finished tile, and gives the result.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from typing import Any

import numpy as np
import torch

from pkfast.store import ranks
from pkfast.store.writer import ChunkStore, tiling_of
from pkfast.engine.tiles import Tile, Tiling

__all__ = ["Sink", "MemorySink", "StoreSink"]

log = logging.getLogger("pkfast")


class Sink:
    """Receives finished tiles. ``open`` returns (the plan to follow, the tiles this process computes, whether
    any tile is left to compute on any rank — collective work such as the sketch's features runs then)."""

    def open(self, plan: Tiling) -> tuple[Tiling, list[Tile], bool]:
        raise NotImplementedError

    def write(self, tile: Tile, block: torch.Tensor, mirror: torch.Tensor | None) -> None:
        raise NotImplementedError

    def close(self) -> None:
        """Release what :meth:`open` took (also after an error)."""

    def result(self) -> Any:
        raise NotImplementedError


class MemorySink(Sink):
    """The Gram as a CPU tensor of ``shape`` (every tile computed here)."""

    def __init__(self, shape: tuple[int, ...], dtype: torch.dtype, diagonal: bool) -> None:
        self.out = torch.zeros(shape, dtype=dtype)
        self.diagonal = diagonal

    def open(self, plan: Tiling) -> tuple[Tiling, list[Tile], bool]:
        return plan, list(plan.tiles), bool(plan.tiles)

    def write(self, tile: Tile, block: torch.Tensor, mirror: torch.Tensor | None) -> None:
        if self.diagonal:
            self.out[tile.rows] = block
            return
        self.out[tile.rows, tile.cols] = block
        if mirror is not None:
            self.out[tile.cols, tile.rows] = mirror

    def result(self) -> torch.Tensor:
        return self.out


class StoreSink(Sink):
    """The Gram in the ``.npy`` at ``path``: rank 0 creates it (or validates it for resuming) from ``manifest``,
    every rank attaches as its own writer, finished tiles are skipped, the rest shared by cost across ranks."""

    def __init__(self, path: str | os.PathLike, manifest: dict[str, Any], *, overwrite: bool, fn: str) -> None:
        self.path, self.manifest, self.overwrite, self.fn = path, manifest, overwrite, fn
        self.store: ChunkStore | None = None

    def open(self, plan: Tiling) -> tuple[Tiling, list[Tile], bool]:
        self.store, mine, pending = ranks.open_shared(self.path, self.manifest, overwrite=self.overwrite, fn=self.fn)
        self.manifest = self.store.manifest
        plan = _adopt(plan, self.manifest)
        tiles = {t.index: t for t in plan.tiles}
        return plan, [tiles[c.index] for c in mine], pending

    def write(self, tile: Tile, block: torch.Tensor, mirror: torch.Tensor | None) -> None:
        self.store.write(tile.index, block, mirror)

    def close(self) -> None:
        if self.store is not None:
            self.store.close()
            self.store = None

    def result(self) -> np.memmap:
        ranks.all_written()
        return np.load(self.path, mmap_mode="r")


def _adopt(plan: Tiling, manifest: dict[str, Any]) -> Tiling:
    """The stored tiling (a resumed run must cut the same tiles, whatever its memory budget)."""
    tiles = tiling_of(manifest)
    p = manifest["plan"]
    if [(t.rows, t.cols, t.diagonal) for t in tiles] == [(t.rows, t.cols, t.diagonal) for t in plan.tiles] \
            and p["chunk"] == plan.chunk:
        return plan
    log.info("pkfast.gram: using the stored tiling (%d tiles of ≤%d×%d)", len(tiles), p["row_block"], p["col_block"])
    return dataclasses.replace(plan, row_block=p["row_block"], col_block=p["col_block"], chunk=p["chunk"], tiles=tiles)
