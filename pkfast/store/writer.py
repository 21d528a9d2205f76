"""store: a Gram written tile by tile into a plain ``.npy`` file, with a manifest, a journal and a lock (the
layout and the reading side are in :mod:`pkfast.store.reader`).

A tile is *finished* only once its bytes are written and flushed (``fdatasync``) **and** its journal line is
written and flushed, in that order: a process killed at any moment leaves a tile either finished and
verifiable, or absent from the journal and recomputed on resume. Torn or corrupted journal lines are ignored;
finished tiles whose bytes no longer match their CRC are reported and recomputed.
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
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pkfast.store import formats
from pkfast._checks import preview
from pkfast._version import __version__
from pkfast.store.reader import (FORMAT, SIDE, VERSION, Geometry, StoredGram, StoreError, check_data_file, geometry_of,
                           journal_entries, open_gram, plan_tiles_of, read_crc, read_manifest, sidecar, tile_of)
from pkfast.engine.tiles import Tile, TilePlan

__all__ = ["GramStore", "StoredGram", "open_gram", "StoreError", "sidecar", "plan_tiles_of"]

log = logging.getLogger("pkfast")

#: Bytes of a tile copied contiguous at a time while it is written (bounds the writer's extra memory).
WRITE_SLAB = 1 << 20


# ---------------------------------------------------------------------------------------------- the store
class GramStore:
    """A Gram on disk being written (or resumed) by one process acting as ``rank`` of ``world`` writers.

    Use :meth:`create_or_resume` (one process) or :meth:`prepare` + :meth:`attach` (distributed: rank 0
    prepares, every rank attaches), then :meth:`write_tile` for each tile, then :meth:`close`.
    """

    def __init__(self, path: Path, manifest: dict[str, Any], geometry: Geometry, rank: int, world: int) -> None:
        self.path = path
        self.side = sidecar(path)
        self.manifest = manifest
        self.geometry = geometry
        self.rank = rank
        self.world = world
        self._fd: int | None = None
        self._journal: Any = None
        self._lock_fd: int | None = None

    # ------------------------------------------------------------------ create / validate
    @staticmethod
    def new_manifest(*, shape: tuple[int, ...], dtype: np.dtype, options: dict[str, Any],
                     fingerprints: dict[str, str], plan: TilePlan, diagonal: bool, num_outputs: int,
                     scale: float) -> dict[str, Any]:
        """The manifest of a new stored Gram, from explicit values: ``options`` (what changes the numbers, the
        routes used among them) and ``fingerprints`` (digests of model, trajectory, X, X2 and options)."""
        tiles = [[t.rows.start, t.rows.stop, t.cols.start, t.cols.stop, int(t.diagonal)] for t in plan.tiles]
        m = {
            "format": FORMAT, "version": VERSION, "shape": list(shape), "dtype": np.dtype(dtype).str,
            "options": options, "fingerprints": fingerprints,
            "symmetric": bool(plan.symmetric and not diagonal), "diagonal": bool(diagonal),
            "plan": {"row_block": plan.row_block, "col_block": plan.col_block, "chunk": plan.chunk,
                     "tiles": tiles},
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
            old = read_manifest(path, fn=fn, writing=True)
            if old["version"] != VERSION:
                raise StoreError(
                    f"{fn}: {path} was written by an earlier pkfast (Gram format version {old['version']}); this "
                    f"pkfast {__version__} resumes only version {VERSION}. Pass overwrite=True to recompute it, or "
                    "finish it with the pkfast that started it (pkfast.open_gram still reads it)")
            _compare(old, manifest, path, fn)
            check_data_file(path, old, fn)
            return old
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
        shape = tuple(manifest["shape"])
        dtype = np.dtype(manifest["dtype"])
        nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        try:
            free = shutil.disk_usage(parent).free
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
            formats.atomic_write(side / "manifest.json", json.dumps(manifest, indent=1))
        except BaseException:
            shutil.rmtree(side, ignore_errors=True)
            path.unlink(missing_ok=True)
            raise
        return manifest

    @classmethod
    def attach(cls, path: str | os.PathLike, *, rank: int = 0, world: int = 1, fn: str = "pkfast.gram") -> "GramStore":
        """Open a prepared output for writing as ``rank``: takes the lock, opens the data file and the journal."""
        path = Path(path)
        m = read_manifest(path, fn=fn, writing=True)
        geo = geometry_of(m, path)
        store = cls(path, m, geo, rank, world)
        store._lock()
        store._fd = os.open(path, os.O_RDWR)
        store._journal = open(store.side / f"tiles.{rank}.log", "a")
        return store

    def _lock(self) -> None:
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
                f"pkfast.gram: {self.path} is being written by another process (pid {who}, as writer rank "
                f"{self.rank}); wait for it to finish or stop it — two writers are never interleaved"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        self._lock_fd = fd

    # ------------------------------------------------------------------ progress
    def finished(self, *, verify: bool = True) -> set[int]:
        """Indices of finished tiles from every rank's journal; with ``verify``, only those whose bytes still
        match their CRC (a mismatch is warned about, and the tile is recomputed)."""
        done = journal_entries(self.side)
        if not verify:
            return set(done)
        bad = [i for i, crcs in sorted(done.items()) if not self.tile_ok(i, crcs)]
        if bad:
            warnings.warn(f"pkfast.gram: {len(bad)} finished tile(s) of {self.path} no longer match their "
                          f"checksum (tiles {preview(bad, 8, str)}); the file was modified or damaged — recomputing them",
                          RuntimeWarning, stacklevel=3)
        return set(done) - set(bad)

    def tile_ok(self, index: int, crcs: tuple[int, int | None]) -> bool:
        tile = tile_of(self.manifest, index)
        if read_crc(self.path, self.geometry, tile.rows, tile.cols) != crcs[0]:
            return False
        if crcs[1] is not None and read_crc(self.path, self.geometry, tile.cols, tile.rows) != crcs[1]:
            return False
        return True

    # ------------------------------------------------------------------ writing
    def write_tile(self, tile: Tile, block: Any, mirror: Any = None) -> None:
        """Write ``block`` at ``[tile.rows, tile.cols]`` (and ``mirror`` at ``[tile.cols, tile.rows]``), flush,
        then journal the tile as finished. ``block``/``mirror`` are numpy arrays or CPU tensors in the file's
        layout and dtype, with any strides (views are fine: they are copied a row slab at a time)."""
        assert self._fd is not None, "attach() first"
        try:
            crc_a = self._write_block(block, tile.rows, tile.cols)
            crc_b = self._write_block(mirror, tile.cols, tile.rows) if mirror is not None else None
            os.fdatasync(self._fd)
            mirror_crc = "-" if crc_b is None else f"{crc_b:08x}"
            self._journal.write(formats.crc_line(f"tile {tile.index} {crc_a:08x} {mirror_crc} {time.time_ns()}"))
            self._journal.flush()
            os.fsync(self._journal.fileno())
        except OSError as e:
            if e.errno == errno.ENOSPC:
                raise StoreError(
                    f"pkfast.gram: disk full while writing tile {tile.index} of {self.path}; the finished tiles "
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

    def __enter__(self) -> "GramStore":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


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
            what = {"model": "the model (architecture or fixed values)", "trajectory": "the trajectory",
                    "X": "the data X", "X2": "the data X2", "options": "the options"}[k]
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


