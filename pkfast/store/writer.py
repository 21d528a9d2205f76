"""writer: a chunked store being written — an array in a plain ``.npy`` filled chunk by chunk (a Gram's tiles,
path features' row chunks), with a manifest, a journal per writer rank and a lock (the layout and the reading
side are in :mod:`pkfast.store.reader`; how ranks share the chunks, in :mod:`pkfast.store.ranks`).

A chunk is *finished* only once its bytes are written and flushed (``fdatasync``) **and** its journal line is
written and flushed, in that order: a process killed at any moment leaves a chunk either finished and
verifiable, or absent from the journal and recomputed on resume. Torn or corrupted journal lines are ignored;
finished chunks whose bytes no longer match their CRC are reported and recomputed.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
import time
import warnings
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pkfast.store import formats
from pkfast._checks import preview
from pkfast._version import __version__
from pkfast.store.reader import (FORMAT, SIDE, VERSION, Chunk, Geometry, StoredGram, StoreError, check_data_file,
                                 chunk_ok, chunks_of, geometry_of, journal_entries, open_gram, tiling_of,
                                 read_manifest, sidecar)
from pkfast.engine.tiles import Tiling

__all__ = ["ChunkStore", "GramStore", "StoredGram", "open_gram", "StoreError", "sidecar", "tiling_of"]

log = logging.getLogger("pkfast")

#: Bytes of a chunk copied contiguous at a time while it is written (bounds the writer's extra memory).
WRITE_SLAB = 1 << 20


# ---------------------------------------------------------------------------------------------- the store
class ChunkStore:
    """A chunked store on disk being written (or resumed) by one process acting as ``rank`` of ``world`` writers.

    Use :meth:`prepare` (once, by rank 0) and :meth:`attach` (every rank) — :func:`pkfast.store.ranks.open_shared`
    does both — then :meth:`write` for each chunk, then :meth:`close`.
    """

    def __init__(self, path: Path, manifest: dict[str, Any], geometry: Geometry, rank: int, world: int) -> None:
        self.path = path
        self.side = sidecar(path)
        self.manifest = manifest
        self.geometry = geometry
        self.chunks = chunks_of(manifest)
        self.rank = rank
        self.world = world
        self._fd: int | None = None
        self._journal: Any = None
        self._lock_fd: int | None = None
        #: the public function writing the store (named in its messages)
        self.fn = "pkfast.gram"

    # ------------------------------------------------------------------ create / validate
    @staticmethod
    def new_manifest(*, shape: tuple[int, ...], dtype: np.dtype, options: dict[str, Any], fingerprints: dict[str, str],
                     chunks: Sequence[Chunk], blocks: tuple[int, int, int], symmetric: bool, diagonal: bool,
                     num_outputs: int, scale: float) -> dict[str, Any]:
        """The manifest of a new store, from explicit values: ``options`` (what changes the numbers),
        ``fingerprints`` (:func:`pkfast.store.formats.fingerprints`), the ``chunks`` with the ``blocks`` that cut
        them (row block, column block, vmap chunk), whether the array is a ``symmetric`` Gram's upper triangle
        mirrored, and whether it is stored as whole rows (``diagonal``)."""
        row_block, col_block, vmap_chunk = blocks
        m = {
            "format": FORMAT, "version": VERSION, "shape": list(shape), "dtype": np.dtype(dtype).str,
            "options": options, "fingerprints": fingerprints, "symmetric": bool(symmetric), "diagonal": bool(diagonal),
            "plan": {"row_block": row_block, "col_block": col_block, "chunk": vmap_chunk,
                     "tiles": [c.entry() for c in chunks]},
            "num_outputs": num_outputs, "scale": scale,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S"), "pkfast": __version__, "torch": torch.__version__,
            "threads": torch.get_num_threads(),
        }
        m["checksum"] = formats.manifest_checksum(m)
        return m

    @classmethod
    def prepare(cls, path: str | os.PathLike, manifest: dict[str, Any], *, overwrite: bool = False,
                fn: str = "pkfast.gram") -> dict[str, Any]:
        """Create the output (or validate an existing one for resuming); return the manifest in force."""
        path = Path(path)
        side = sidecar(path)
        if path.suffix != ".npy":
            raise ValueError(f"{fn}: out must be a path ending in .npy (the stored Gram is a standard .npy file); "
                             f"found {str(path)!r}")
        if overwrite:
            _refuse_if_locked(side, fn)
            if side.exists():
                shutil.rmtree(side)
            if path.exists():
                path.unlink()
        if side.exists() or path.exists():
            return _validate(path, manifest, fn)
        parent = path.parent
        if not parent.is_dir():  # as numpy.save: a missing directory is the caller's mistake, not created
            what = "is not a directory" if parent.exists() else "does not exist"
            raise FileNotFoundError(f"{fn}: cannot write {path}: its directory {parent} {what} (pkfast does not create "
                                    "directories: create it first, or choose another out path)")
        try:
            side.mkdir()
        except OSError as e:
            raise StoreError(f"{fn}: cannot create files in {parent} ({e.strerror or e}): it is not a writable location "
                             "(read-only, no permission, or a pseudo-filesystem such as /proc); choose another out "
                             "path") from None
        try:
            return _create(path, manifest, fn)
        except BaseException:
            shutil.rmtree(side, ignore_errors=True)
            path.unlink(missing_ok=True)
            raise

    @classmethod
    def attach(cls, path: str | os.PathLike, *, rank: int = 0, world: int = 1, fn: str = "pkfast.gram") -> "ChunkStore":
        """Open a prepared output for writing as ``rank``: takes the lock, opens the data file and the journal."""
        path = Path(path)
        m = read_manifest(path, fn=fn, writing=True)
        geo = geometry_of(m, path)
        store = cls(path, m, geo, rank, world)
        store.fn = fn
        store._lock(fn)
        store._fd = os.open(path, os.O_RDWR)
        store._journal = open(store.side / f"tiles.{rank}.log", "a")
        return store

    def _lock(self, fn: str = "pkfast.gram") -> None:
        import fcntl

        lock = self.side / f"lock.{self.rank}"
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            try:
                who = os.pread(fd, 64, 0).decode(errors="replace").strip() or "?"
            finally:
                os.close(fd)
            raise StoreError(
                f"{fn}: {self.path} is being written by another process (pid {who}, as writer rank "
                f"{self.rank}); wait for it to finish or stop it — two writers are never interleaved"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        self._lock_fd = fd

    # ------------------------------------------------------------------ progress
    def finished(self, *, verify: bool = True) -> set[int]:
        """Indices of finished chunks from every rank's journal; with ``verify``, only those whose bytes still
        match their CRC (a mismatch is warned about, and the chunk is recomputed)."""
        done = journal_entries(self.side)
        if not verify:
            return set(done)
        bad = [i for i, crcs in sorted(done.items()) if not chunk_ok(self.path, self.geometry, self.chunks[i], crcs)]
        if bad:
            warnings.warn(f"{self.fn}: {len(bad)} finished tile(s) of {self.path} no longer match their "
                          f"checksum (tiles {preview(bad, 8, str)}); the file was modified or damaged — recomputing them",
                          RuntimeWarning, stacklevel=3)
        return set(done) - set(bad)

    # ------------------------------------------------------------------ writing
    def write(self, index: int, block: Any, mirror: Any = None) -> None:
        """Write ``block`` at chunk ``index``'s place ``[rows, cols]`` (and ``mirror`` at ``[cols, rows]``),
        flush, then journal the chunk as finished. ``block``/``mirror`` are numpy arrays or CPU tensors in the
        file's layout and dtype, with any strides (views are fine: they are copied a row slab at a time)."""
        assert self._fd is not None, "attach() first"
        chunk = self.chunks[index]
        try:
            crc_a = self._write_block(block, chunk.rows, chunk.cols)
            crc_b = self._write_block(mirror, chunk.cols, chunk.rows) if mirror is not None else None
            os.fdatasync(self._fd)
            mirror_crc = "-" if crc_b is None else f"{crc_b:08x}"
            self._journal.write(formats.crc_line(f"tile {index} {crc_a:08x} {mirror_crc} {time.time_ns()}"))
            self._journal.flush()
            os.fsync(self._journal.fileno())
        except OSError as e:
            if e.errno == errno.ENOSPC:
                raise StoreError(
                    f"{self.fn}: disk full while writing tile {index} of {self.path}; the finished tiles "
                    f"are kept: free some space and run the same call again to resume"
                ) from e
            raise

    def _write_block(self, block: Any, rows: slice, cols: slice) -> int:
        """pwrite ``block`` (an array or tensor ``[rows, …]`` in the file's layout, any strides) row slab by row
        slab (each ≤ ``WRITE_SLAB`` bytes, copied contiguous), and return the CRC-32 of its bytes in file
        order."""
        n = rows.stop - rows.start
        if tuple(block.shape[:1]) != (n,):
            raise ValueError(f"pkfast: tile block has {block.shape[0]} rows; the tile's place in the file has {n}")
        per_row = max(1, int(np.prod(block.shape[1:], dtype=np.int64)) * self.geometry.dtype.itemsize)
        step = max(1, WRITE_SLAB // per_row)
        crc = 0
        for i0 in range(0, n, step):
            i1 = min(n, i0 + step)
            part = block[i0:i1]
            if isinstance(part, torch.Tensor):
                part = part.contiguous().numpy()  # one copy (a transposed view's numpy() would be strided)
            slab = np.ascontiguousarray(part, dtype=self.geometry.dtype)
            mv = memoryview(slab).cast("B")
            pos = 0
            for off, length in self.geometry.segments(slice(rows.start + i0, rows.start + i1), cols):
                chunk = mv[pos:pos + length]
                written = 0
                while written < length:
                    written += os.pwrite(self._fd, chunk[written:], off + written)
                crc = zlib.crc32(chunk, crc)
                pos += length
            if pos != len(mv):
                raise ValueError(f"pkfast: tile block rows {i0}:{i1} have {len(mv)} bytes; their place in the file "
                                 f"has {pos}")
        return crc

    def close(self) -> None:
        if self._journal is not None:
            self._journal.close()
            self._journal = None
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # releases the flock
            self._lock_fd = None

    def __enter__(self) -> "ChunkStore":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class GramStore(ChunkStore):
    """A stored Gram: the chunk store whose chunks are a tiling's tiles (``pkfast.gram(out=…)``)."""

    @staticmethod
    def new_manifest(*, shape: tuple[int, ...], dtype: np.dtype, options: dict[str, Any],  # type: ignore[override]
                     fingerprints: dict[str, str], plan: Tiling, diagonal: bool, num_outputs: int,
                     scale: float) -> dict[str, Any]:
        """The manifest of a new stored Gram: its tiles are the store's chunks; ``options`` (what changes the
        numbers, the routes used among them) and ``fingerprints`` (:func:`pkfast.store.formats.fingerprints`)."""
        chunks = [Chunk(t.index, t.rows, t.cols, t.diagonal) for t in plan.tiles]
        return ChunkStore.new_manifest(shape=shape, dtype=dtype, options=options, fingerprints=fingerprints,
                                       chunks=chunks, blocks=(plan.row_block, plan.col_block, plan.chunk),
                                       symmetric=plan.symmetric and not diagonal, diagonal=diagonal,
                                       num_outputs=num_outputs, scale=scale)


def _validate(path: Path, manifest: dict[str, Any], fn: str) -> dict[str, Any]:
    """The stored manifest of an existing output that ``manifest`` may resume (else a :class:`StoreError`)."""
    old = read_manifest(path, fn=fn, writing=True)
    if old["version"] != VERSION:
        raise StoreError(
            f"{fn}: {path} was written by an earlier pkfast (Gram format version {old['version']}); this "
            f"pkfast {__version__} resumes only version {VERSION}. Pass overwrite=True to recompute it, or "
            "finish it with the pkfast that started it (pkfast.open_gram still reads it)")
    _compare(old, manifest, path, fn)
    check_data_file(path, old, fn)
    return old


def _create(path: Path, manifest: dict[str, Any], fn: str) -> dict[str, Any]:
    """Allocate the data file at full size and write the manifest (with the data's offset) into the sidecar."""
    shape = tuple(manifest["shape"])
    dtype = np.dtype(manifest["dtype"])
    nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    free = shutil.disk_usage(path.parent).free
    if nbytes > free:
        raise StoreError(f"{fn}: not enough disk space for {path}: the Gram {shape} {dtype} needs "
                         f"{_human(nbytes)}, {_human(free)} free on that filesystem")
    arr = np.lib.format.open_memmap(path, mode="w+", dtype=dtype, shape=shape)
    del arr
    offset = path.stat().st_size - nbytes
    fd = os.open(path, os.O_RDWR)
    try:
        _allocate(fd, offset, nbytes, path, fn)
    finally:
        os.close(fd)
    manifest = dict(manifest, data_offset=int(offset))
    manifest["checksum"] = formats.manifest_checksum(manifest)
    formats.atomic_write(sidecar(path) / "manifest.json", json.dumps(manifest, indent=1))
    return manifest


def _allocate(fd: int, offset: int, nbytes: int, path: Path, fn: str) -> None:
    """Reserve the data blocks now, so that a full disk fails here and not in the middle of the run."""
    try:
        os.posix_fallocate(fd, offset, nbytes)
    except OSError as e:
        if e.errno == errno.ENOSPC:
            raise StoreError(f"{fn}: disk full: cannot allocate {_human(nbytes)} for {path}") from e
        if e.errno not in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
            raise
        log.debug("pkfast: %s does not support fallocate; the file stays sparse", path)
    except AttributeError:  # pragma: no cover - no posix_fallocate (macOS)
        pass


def _refuse_if_locked(side: Path, fn: str) -> None:
    import fcntl

    if not side.exists():
        return
    for lock in side.glob("lock.*"):
        fd = os.open(lock, os.O_RDWR)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise StoreError(f"{fn}: cannot overwrite {side.parent / side.name[:-len(SIDE)]}: another process is "
                             f"writing it ({lock.name})") from None
        finally:
            os.close(fd)


def _compare(old: dict[str, Any], new: dict[str, Any], path: Path, fn: str) -> None:
    diffs = []
    for k, v in new["fingerprints"].items():
        if old["fingerprints"].get(k) != v:
            what = formats.FINGERPRINTS[k]
            if k == "options":
                od, nd = old["options"], new["options"]
                what += " (" + ", ".join(f"{o}: {od.get(o)!r} stored, {nd.get(o)!r} now" for o in nd
                                         if od.get(o) != nd.get(o)) + ")"
            diffs.append(what)
    if list(old["shape"]) != list(new["shape"]) and not diffs:
        diffs.append(f"the shape ({tuple(old['shape'])} stored, {tuple(new['shape'])} now)")
    if diffs:
        raise StoreError(f"{fn}: {path} holds a Gram computed from different inputs — differs: {'; '.join(diffs)}. "
                         f"Refusing to mix results: pass overwrite=True to start afresh, or choose another out path")


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} TiB"  # pragma: no cover


