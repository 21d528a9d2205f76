"""ranks: how the ranks of a ``torch.distributed`` group share one chunked store — rank 0 creates it (or validates
it for resuming), every rank attaches as its own writer, all take rank 0's view of the finished chunks, split the
rest into disjoint shares of about equal cost, and wait for each other at the end. :func:`fill` is the loop that
computes and writes this rank's share. Without an initialised group this is the one-process case (rank 0 of 1).

The transport (rank and world, broadcasts, barriers) is :mod:`pkfast.engine.distributed`'s.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from typing import Any, Protocol, TypeVar

from tqdm.auto import tqdm

from pkfast.engine import distributed
from pkfast.store.reader import Chunk, StoreError
from pkfast.store.writer import ChunkStore

__all__ = ["chunk_cost", "shares", "open_shared", "all_written", "fill"]

log = logging.getLogger("pkfast")


class _Sized(Protocol):
    index: int
    diagonal: bool

    @property
    def shape(self) -> tuple[int, int]: ...


T = TypeVar("T", bound=_Sized)


# ---------------------------------------------------------------------------------------------- shares
def chunk_cost(chunk: _Sized, jacobian_pairs: float = 64.0) -> float:
    """Relative work of a chunk (a :class:`~pkfast.store.reader.Chunk` or a Gram's tile): its products (a
    diagonal one computes one triangle) plus its Jacobians, each sample's Jacobian weighted as
    ``jacobian_pairs`` Gram entries."""
    r, c = chunk.shape
    if chunk.diagonal:
        return r * c / 2 + jacobian_pairs * r
    return r * c + jacobian_pairs * (r + c)


def shares(chunks: Sequence[T], world: int) -> list[list[T]]:
    """Split ``chunks`` into ``world`` deterministic shares of about equal :func:`chunk_cost` (largest first to
    the least-loaded rank, ties to the lower index); each share in chunk order."""
    load = [0.0] * world
    out: list[list[T]] = [[] for _ in range(world)]
    for t in sorted(chunks, key=lambda t: (-chunk_cost(t), t.index)):
        r = min(range(world), key=lambda k: (load[k], k))
        load[r] += chunk_cost(t)
        out[r].append(t)
    return [sorted(s, key=lambda t: t.index) for s in out]


# ---------------------------------------------------------------------------------------------- one store, many ranks
def open_shared(path: str | os.PathLike, manifest: dict[str, Any], *, overwrite: bool,
                fn: str) -> tuple[ChunkStore, list[Chunk], bool]:
    """Open the store at ``path`` as this rank's writer: (the store, this rank's share of the unfinished chunks,
    whether any chunk is unfinished on any rank). Collective: every rank of the group calls it."""
    rank, world = distributed.rank_world()
    err = None
    if rank == 0:
        try:
            ChunkStore.prepare(path, manifest, overwrite=overwrite, fn=fn)
        except Exception as e:  # every rank must learn of it, or the others wait forever
            err = e
    msg = distributed.broadcast(None if err is None else f"{type(err).__name__}: {err}")
    if err is not None:
        raise err
    if msg is not None:
        raise StoreError(f"{fn}: rank 0 could not prepare {path}: {msg}")
    store = ChunkStore.attach(path, rank=rank, world=world, fn=fn)
    try:
        done = distributed.broadcast(sorted(store.finished(verify=True)) if rank == 0 else None)  # one view
    except BaseException:
        store.close()
        raise
    finished = set(done)
    todo = [c for c in store.chunks if c.index not in finished]
    if done:
        log.info("%s: resuming %s: %d of %d tiles already finished", fn, path, len(done), len(store.chunks))
    return store, shares(todo, world)[rank], bool(todo)


def all_written() -> None:
    """Wait until every rank has written its share (nothing with one process)."""
    distributed.barrier()


def fill(path: str | os.PathLike, manifest: dict[str, Any], compute: Callable[[Chunk], Any], *, overwrite: bool,
         fn: str, progress: bool = False, axis: int = 0) -> None:
    """Write this rank's share of the store's unfinished chunks, ``compute(chunk)`` being a chunk's block (in
    the file's layout and dtype), then wait for the other ranks. The progress bar counts rows (``axis=0``) or,
    for chunks of columns, columns (``axis=1``)."""
    store, mine, _ = open_shared(path, manifest, overwrite=overwrite, fn=fn)
    try:
        bar = tqdm(total=sum(c.shape[axis] for c in mine), unit="sample", unit_scale=True,
                   desc=f"{fn} → {os.path.basename(str(path))}", disable=not progress, leave=False)
        with bar:
            for chunk in mine:
                store.write(chunk.index, compute(chunk))
                bar.update(chunk.shape[axis])
    finally:
        store.close()
    all_written()
