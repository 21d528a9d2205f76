"""sinks: where the driver hands finished tiles — a tensor in memory, or the resumable ``.npy`` store shared by
the ranks of a ``torch.distributed`` group (:mod:`pkfast.store.writer`, :mod:`pkfast.engine.distributed`).

A sink says which tiles this process computes (:meth:`Sink.open`: all of them in memory; for the store, the
unfinished ones of this rank's share, in the stored tile plan), takes each finished tile, and gives the result.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from typing import Any

import numpy as np
import torch

from pkfast.engine import distributed
from pkfast.store.writer import GramStore, StoreError, plan_tiles_of
from pkfast.engine.tiles import Tile, TilePlan

__all__ = ["Sink", "MemorySink", "StoreSink"]

log = logging.getLogger("pkfast")


class Sink:
    """Receives finished tiles. ``open`` returns (the plan to follow, the tiles this process computes, whether
    any tile is left to compute on any rank — collective work such as the sketch's features runs then)."""

    def open(self, plan: TilePlan) -> tuple[TilePlan, list[Tile], bool]:
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

    def open(self, plan: TilePlan) -> tuple[TilePlan, list[Tile], bool]:
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
        self.store: GramStore | None = None

    def open(self, plan: TilePlan) -> tuple[TilePlan, list[Tile], bool]:
        rank, world = distributed.rank_world()
        err = None
        if rank == 0:
            try:
                self.manifest = GramStore.prepare(self.path, self.manifest, overwrite=self.overwrite, fn=self.fn)
            except Exception as e:  # every rank must learn of it, or the others wait forever
                err = e
        msg = distributed.broadcast(None if err is None else f"{type(err).__name__}: {err}")
        if err is not None:
            raise err
        if msg is not None:
            raise StoreError(f"{self.fn}: rank 0 could not prepare {self.path}: {msg}")
        self.store = st = GramStore.attach(self.path, rank=rank, world=world, fn=self.fn)
        plan = _adopt(plan, st.manifest)
        done = distributed.broadcast(sorted(st.finished(verify=True)) if rank == 0 else None)  # one view
        finished = set(done)
        todo = [t for t in plan.tiles if t.index not in finished]
        if done:
            log.info("%s: resuming %s: %d of %d tiles already finished", self.fn, self.path, len(done),
                     len(plan.tiles))
        return plan, distributed.shares(todo, world)[rank], bool(todo)

    def write(self, tile: Tile, block: torch.Tensor, mirror: torch.Tensor | None) -> None:
        self.store.write_tile(tile, block, mirror)

    def close(self) -> None:
        if self.store is not None:
            self.store.close()
            self.store = None

    def result(self) -> np.memmap:
        distributed.barrier()
        return np.load(self.path, mmap_mode="r")


def _adopt(plan: TilePlan, manifest: dict[str, Any]) -> TilePlan:
    """The stored tile plan (a resumed run must cut the same tiles, whatever its memory budget)."""
    tiles = plan_tiles_of(manifest)
    p = manifest["plan"]
    if [(t.rows, t.cols, t.diagonal) for t in tiles] == [(t.rows, t.cols, t.diagonal) for t in plan.tiles] \
            and p["chunk"] == plan.chunk:
        return plan
    log.info("pkfast.gram: using the stored tile plan (%d tiles of ≤%d×%d)", len(tiles), p["row_block"], p["col_block"])
    return dataclasses.replace(plan, row_block=p["row_block"], col_block=p["col_block"], chunk=p["chunk"], tiles=tiles)
