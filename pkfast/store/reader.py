"""reader: reading a chunked store — an array in a ``.npy`` written chunk by chunk (:mod:`pkfast.store.writer`):
its layout on disk, manifest, journal of finished chunks and their checksums — and :func:`open_gram`, the public
way to open a stored Gram (``pkfast.gram(out=…)``; path features stored by ``pkfast.sketch(out=…)`` are the other
client, opened by :meth:`pkfast.store.features.PathFeatures.open`).

Layout for ``out="gram.npy"``::

    gram.npy                 a standard .npy (``np.load(path, mmap_mode="r")`` reads it without pkfast),
                             allocated at full size when the run starts (disk full fails then, not later)
    gram.npy.pkfast/
        manifest.json        written once, atomically: shape, dtype, options, fingerprints of model,
                             trajectory and data, the chunks (``"plan"``: a Gram's tiles, or row chunks),
                             and its own checksum
        tiles.<rank>.log     append-only journal: one line per finished chunk with the CRC-32 of its
                             bytes (and of its mirror block), each line carrying its own CRC
        lock.<rank>          held (``flock``) while a process writes as that rank
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pkfast.store import formats
from pkfast.engine.tiles import Tile

__all__ = ["StoredGram", "open_gram", "StoreError", "Chunk", "chunks_of", "row_chunks", "open_chunks", "GRAM", "PATH_FEATURES", "read_manifest", "journal_entries",
           "tiling_of", "sidecar"]

FORMAT = "pkfast-gram"
#: Version 2 (pkfast 0.2): the options record the requested method and the routes used ("summary"). Version 1
#: stores open read-only (open_gram, pkfast info); resuming one is refused with what to do.
VERSION = 2
READABLE = (1, 2)
SIDE = ".pkfast"
#: What a store holds (``options["kind"]``; a Gram's options have no ``"kind"``).
GRAM, PATH_FEATURES = "gram", "path-features"
#: A store opened as the other kind: what it holds and how to open it.
_ELSEWHERE = {PATH_FEATURES: "{fn}: {path} holds path features written by pkfast.sketch(out=…), not a Gram; open it "
                             "with pkfast.PathFeatures.open",
              GRAM: "{fn}: {path} is a stored Gram, not path features; open it with pkfast.open_gram"}


class StoreError(RuntimeError):
    """A stored Gram cannot be used as asked: mismatched restart, corruption, lock held, disk full."""


def sidecar(path: str | os.PathLike) -> Path:
    p = Path(path)
    return p.with_name(p.name + SIDE)


# ---------------------------------------------------------------------------------------------- chunks
@dataclass(frozen=True)
class Chunk:
    """One unit of a store, written and journaled at once: the block ``[rows, cols]`` (and, when written with a
    mirror, ``[cols, rows]``); in a store of whole rows only ``rows`` places it. ``diagonal``: a symmetric Gram's
    tile on the diagonal (it computes one triangle). Stored in the manifest as ``[r0, r1, c0, c1, diagonal]``;
    a row chunk as ``[a, b, a, b, 1]``."""

    index: int
    rows: slice
    cols: slice
    diagonal: bool = False

    @property
    def shape(self) -> tuple[int, int]:
        return (self.rows.stop - self.rows.start, self.cols.stop - self.cols.start)

    def entry(self) -> list[int]:
        """The chunk as its manifest entry."""
        return [self.rows.start, self.rows.stop, self.cols.start, self.cols.stop, int(self.diagonal)]


def row_chunks(n: int, rows: int) -> list[Chunk]:
    """``n`` rows cut into chunks of ``rows`` (the last one ragged)."""
    return [Chunk(i, slice(a, min(n, a + rows)), slice(a, min(n, a + rows)), True)
            for i, a in enumerate(range(0, n, rows))]


def chunks_of(m: dict[str, Any]) -> list[Chunk]:
    """The chunks of a store, from its manifest."""
    return [Chunk(i, slice(r0, r1), slice(c0, c1), bool(d)) for i, (r0, r1, c0, c1, d) in enumerate(m["plan"]["tiles"])]


def tiling_of(m: dict[str, Any]) -> list[Tile]:
    """A stored Gram's tiling, as the driver's tiles."""
    return [Tile(c.index, c.rows, c.cols, c.diagonal) for c in chunks_of(m)]


# ---------------------------------------------------------------------------------------------- geometry
@dataclass(frozen=True)
class Geometry:
    """Where a chunk's bytes live in the .npy: ``shape`` in C order after ``offset`` header bytes. A store of
    whole rows (``diagonal``: a diagonal Gram ``(N, *block)``, path features ``(N, C, k)``) places a chunk by its
    rows alone; otherwise a chunk is the block ``[rows, cols]`` of an ``(N, M, *block)`` Gram."""

    shape: tuple[int, ...]
    dtype: np.dtype
    offset: int
    diagonal: bool

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * self.dtype.itemsize

    @property
    def row_bytes(self) -> int:
        """Bytes of one first-axis row."""
        return int(np.prod(self.shape[1:], dtype=np.int64)) * self.dtype.itemsize

    @property
    def entry_bytes(self) -> int:
        """Bytes of one (row, col) entry: the C×C block or a scalar (diagonal: one row)."""
        if self.diagonal:
            return self.row_bytes
        return int(np.prod(self.shape[2:], dtype=np.int64)) * self.dtype.itemsize

    def segments(self, rows: slice, cols: slice) -> Iterable[tuple[int, int]]:
        """(file offset, length) of each row segment of the block ``[rows, cols]``."""
        if self.diagonal:
            yield self.offset + rows.start * self.row_bytes, (rows.stop - rows.start) * self.row_bytes
            return
        seg = (cols.stop - cols.start) * self.entry_bytes
        for i in range(rows.start, rows.stop):
            yield self.offset + i * self.row_bytes + cols.start * self.entry_bytes, seg


def npy_header(path: Path) -> tuple[int, tuple[int, ...], np.dtype, bool]:
    with open(path, "rb") as f:
        version = np.lib.format.read_magic(f)
        if version == (1, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
        else:
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
        return f.tell(), tuple(shape), np.dtype(dtype), bool(fortran)


# ---------------------------------------------------------------------------------------------- reading
def read_manifest(path: str | os.PathLike, *, fn: str = "pkfast", writing: bool = False) -> dict[str, Any]:
    """The checked manifest of the stored Gram at ``path``; ``writing``: the caller would write there (its
    messages then say how to replace a file that is not a stored Gram)."""
    path = Path(path)
    mpath = sidecar(path) / "manifest.json"
    if not mpath.exists():
        if path.exists():
            by = fn if writing and fn.startswith("pkfast.") else "pkfast.gram"  # the writer that would resume it
            raise StoreError(f"{fn}: {path} was not written by {by}(out=…) (it has no pkfast manifest "
                             f"{mpath.name} in {mpath.parent.name}/, or the manifest was deleted)"
                             + ("; pass overwrite=True to replace it" if writing else ""))
        raise FileNotFoundError(f"{fn}: no stored Gram at {path} (expected {mpath})")
    try:
        m = json.loads(mpath.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise StoreError(f"{fn}: the manifest {mpath} is corrupted ({e}); pass overwrite=True to start afresh") from e
    if not isinstance(m, dict) or m.get("format") != FORMAT:
        raise StoreError(f"{fn}: {mpath} is not a pkfast Gram manifest (format {m.get('format') if isinstance(m, dict) else None!r})")
    formats.check_format(m, name=FORMAT, readable=READABLE, current=VERSION, where=str(mpath), fn=fn, error=StoreError,
                         advice="pass overwrite=True to recompute it")
    if m.get("checksum") != formats.manifest_checksum(m):
        raise StoreError(f"{fn}: the manifest {mpath} is corrupted (its checksum does not match its contents); "
                         f"pass overwrite=True to start afresh")
    return m


def geometry_of(m: dict[str, Any], path: Path) -> Geometry:
    return Geometry(tuple(m["shape"]), np.dtype(m["dtype"]), int(m["data_offset"]), bool(m["diagonal"]))


def check_data_file(path: Path, m: dict[str, Any], fn: str) -> None:
    if not path.exists():
        raise StoreError(f"{fn}: {path} is missing but its manifest exists; pass overwrite=True to start afresh")
    geo = geometry_of(m, path)
    size = path.stat().st_size
    if size != geo.offset + geo.nbytes:
        raise StoreError(f"{fn}: {path} is truncated or damaged: {size:,} bytes, expected {geo.offset + geo.nbytes:,} "
                         f"for a {tuple(geo.shape)} {geo.dtype} Gram; pass overwrite=True to start afresh")
    try:
        offset, shape, dtype, fortran = npy_header(path)
    except ValueError as e:
        raise StoreError(f"{fn}: {path} has a damaged .npy header ({e}); pass overwrite=True to start afresh") from e
    if (offset, shape, dtype, fortran) != (geo.offset, geo.shape, geo.dtype, False):
        raise StoreError(f"{fn}: {path}'s .npy header ({shape}, {dtype}) disagrees with its manifest "
                         f"({geo.shape}, {geo.dtype}); pass overwrite=True to start afresh")


def open_chunks(path: Path, *, kind: str, fn: str) -> tuple[dict[str, Any], set[int]]:
    """The checked manifest of the store at ``path`` — which must hold ``kind`` (:data:`GRAM` or
    :data:`PATH_FEATURES`, from its ``options["kind"]``) — and the indices of its finished chunks (from the
    journals). The one way a store is opened for reading, whatever it holds."""
    m = read_manifest(path, fn=fn)
    found = PATH_FEATURES if m["options"].get("kind") == PATH_FEATURES else GRAM
    if found != kind:
        raise StoreError(_ELSEWHERE[found].format(fn=fn, path=path))
    check_data_file(path, m, fn)
    return m, set(journal_entries(sidecar(path))) & set(range(len(m["plan"]["tiles"])))


def journal_entries(side: Path) -> dict[int, tuple[int, int | None]]:
    """{tile index: (crc, mirror crc or None)} from every rank's journal; torn or corrupted lines skipped. A tile
    journaled more than once (recomputed after damage) counts with its latest entry."""
    latest: dict[int, tuple[int, int, int | None]] = {}
    for j in sorted(side.glob("tiles.*.log")):
        with open(j, errors="replace", newline="") as f:
            for line in f:
                fields = formats.parse_crc_line(line)
                if fields is None or len(fields) != 5 or fields[0] != "tile":
                    continue
                try:
                    i, gen = int(fields[1]), int(fields[4])
                    entry = (gen, int(fields[2], 16), None if fields[3] == "-" else int(fields[3], 16))
                except ValueError:
                    continue
                if i not in latest or gen >= latest[i][0]:
                    latest[i] = entry
    return {i: (crc, mirror) for i, (_, crc, mirror) in latest.items()}


def read_crc(path: Path, geo: Geometry, rows: slice, cols: slice) -> int:
    with open(path, "rb", buffering=0) as f:
        return formats.crc32(os.pread(f.fileno(), length, off) for off, length in geo.segments(rows, cols))


def chunk_ok(path: Path, geo: Geometry, chunk: Chunk, crcs: tuple[int, int | None]) -> bool:
    """Whether a finished chunk's bytes (and its mirror's) still match the CRCs its journal line recorded."""
    if read_crc(path, geo, chunk.rows, chunk.cols) != crcs[0]:
        return False
    return crcs[1] is None or read_crc(path, geo, chunk.cols, chunk.rows) == crcs[1]


@dataclass
class StoredGram:
    """A Gram stored by ``pkfast.gram(..., out=path)``: the array (read-only memmap) and what made it.

    Attributes:
        path: the ``.npy`` file.
        manifest: the manifest (shape, dtype, options, fingerprints, tiling).
        done: indices of the finished tiles (from the journals; see :meth:`verify` for their bytes).
    """

    path: Path
    manifest: dict[str, Any]
    done: set[int]

    @property
    def array(self) -> np.memmap:
        """The Gram as a read-only ``np.memmap`` (unfinished tiles read as zeros)."""
        return np.load(self.path, mmap_mode="r")

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.manifest["shape"])

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(self.manifest["dtype"])

    @property
    def options(self) -> dict[str, Any]:
        return dict(self.manifest["options"])

    @property
    def num_tiles(self) -> int:
        return len(self.manifest["plan"]["tiles"])

    @property
    def complete(self) -> bool:
        return len(self.done) == self.num_tiles

    def verify(self) -> list[int]:
        """Re-read every finished tile and return the indices whose bytes do not match their CRC ([] = valid)."""
        geo = geometry_of(self.manifest, self.path)
        entries = journal_entries(sidecar(self.path))
        chunks = chunks_of(self.manifest)
        return [i for i in sorted(self.done) if not chunk_ok(self.path, geo, chunks[i], entries[i])]

    def __array__(self, dtype=None, copy=None):
        a = self.array
        return a if dtype is None else a.astype(dtype)

    def __repr__(self) -> str:
        return (f"StoredGram({str(self.path)!r}, shape={self.shape}, dtype={self.dtype}, "
                f"{len(self.done)}/{self.num_tiles} tiles{' (complete)' if self.complete else ''})")


def open_gram(path: str | os.PathLike) -> StoredGram:
    """Open a Gram stored by ``pkfast.gram(..., out=path)``: its array, options, fingerprints and progress.

    Checks the manifest's checksum and the data file's size and header; call :meth:`StoredGram.verify` to
    re-read every finished tile against its CRC.

    Example:
        >>> import torch, pkfast, tempfile, os
        >>> net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2))
        >>> w0 = {k: v.clone() for k, v in net.state_dict().items()}
        >>> traj = pkfast.Trajectory.from_checkpoints([w0, {k: v * 0.9 for k, v in w0.items()}], lr=0.1)
        >>> out = os.path.join(tempfile.mkdtemp(), "gram.npy")
        >>> K = pkfast.gram(net, traj, torch.randn(6, 3), out=out, progress=False)
        >>> g = pkfast.open_gram(out)
        >>> g.shape, g.complete, g.verify()
        ((6, 6), True, [])
    """
    path = Path(path)
    m, done = open_chunks(path, kind=GRAM, fn="pkfast.open_gram")
    return StoredGram(path, m, done)


