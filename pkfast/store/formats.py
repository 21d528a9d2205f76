"""formats: what every pkfast file format shares — versioned manifests with checksums, fsync'd atomic writes,
CRC-carrying journal lines, content digests computed from the values passed in, and the one set of
fingerprints a stored result carries (:func:`fingerprints`).

Three formats use it: the trajectory directory (:mod:`pkfast.trajectory.files`), the stored Gram
(:mod:`pkfast.store.writer`) and saved path features (:mod:`pkfast.store.features`). Each names itself (``"format"``) and
carries a ``"version"``; :func:`check_format` is the one version rule: a file of another format is refused as
such, a newer version says "upgrade pkfast", an older one that this pkfast cannot read says which version
wrote it and what to do.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import zlib
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import torch

__all__ = ["atomic_file", "atomic_write", "fsync_dir", "manifest_checksum", "check_format", "crc_line", "parse_crc_line",
           "crc32", "digest", "hash_tensor", "fingerprints", "FINGERPRINTS"]


# ---------------------------------------------------------------------------------------------- atomic files
@contextlib.contextmanager
def atomic_file(path: Path, *, fsync: bool = True) -> Iterator[BinaryIO]:
    """A binary file to write that replaces ``path`` only when the block ends without an exception: written
    to a temporary file in the same directory, then ``os.replace``d, so a reader sees the old file or the new
    one, never a part. With ``fsync`` the file and its directory are flushed to the device first (the rename
    survives a power loss, not only a crash)."""
    path = Path(path)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            yield f
            f.flush()
            if fsync:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    if fsync:
        fsync_dir(path.parent)


def atomic_write(path: Path, data: str | bytes, *, fsync: bool = True) -> None:
    """Replace ``path`` by ``data`` atomically (:func:`atomic_file`)."""
    with atomic_file(path, fsync=fsync) as f:
        f.write(data.encode() if isinstance(data, str) else data)


def fsync_dir(path: Path) -> None:
    """Flush a directory's entries (a new or renamed file in it) to the device, where the platform allows."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


# ---------------------------------------------------------------------------------------------- manifests
def manifest_checksum(m: dict[str, Any]) -> str:
    """Digest of a manifest's contents without its own ``"checksum"`` field."""
    body = {k: v for k, v in m.items() if k != "checksum"}
    return hashlib.blake2b(json.dumps(body, sort_keys=True).encode(), digest_size=16).hexdigest()


def check_format(meta: Any, *, name: str, readable: Iterable[int], current: int, where: str, fn: str,
                 error: type[Exception] = ValueError, advice: str = "") -> int:
    """The version rule shared by pkfast's files: return ``meta["version"]`` if this pkfast reads it, else raise
    ``error`` saying what the file is, which version wrote it and what to do (``advice``)."""
    found = meta.get("format") if isinstance(meta, dict) else None
    if found != name:
        raise error(f"{fn}: {where} is not a {name} file (format {found!r})")
    version = meta.get("version")
    readable = tuple(readable)
    if version in readable:
        return int(version)
    if isinstance(version, int) and version > current:
        raise error(f"{fn}: {where} has format version {version}; this pkfast reads up to version {current} "
                    f"(it was written by a newer pkfast: upgrade pkfast to read it)")
    raise error(f"{fn}: {where} has {name} format version {version!r}; this pkfast reads versions "
                f"{', '.join(map(str, readable))}" + (f" — {advice}" if advice else ""))


# ---------------------------------------------------------------------------------------------- journal lines
def crc32(buffers: Iterable[Any], crc: int = 0) -> int:
    """The CRC-32 of the concatenated byte buffers, continued from ``crc``: the one checksum of stored data (the
    tiles of a stored Gram, the weight rows of a recorded trajectory) and of journal lines (:func:`crc_line`)."""
    for b in buffers:
        crc = zlib.crc32(b, crc)
    return crc


def crc_line(body: str) -> str:
    """``body`` followed by the CRC-32 of its bytes, as one line."""
    return f"{body} {crc32([body.encode()]):08x}\n"


def parse_crc_line(line: str) -> list[str] | None:
    """Fields of a :func:`crc_line`, or None if the line is torn (no newline) or corrupted (CRC mismatch)."""
    if not line.endswith("\n"):
        return None
    body, _, crc = line[:-1].rpartition(" ")
    try:
        if int(crc, 16) != crc32([body.encode()]):
            return None
    except ValueError:
        return None
    return body.split(" ")


# ---------------------------------------------------------------------------------------------- digests
def hash_tensor(h: "hashlib._Hash", t: torch.Tensor | np.ndarray, rows: int = 4096) -> None:
    """Feed shape, dtype and the bytes of ``t`` to ``h`` in row blocks (never a full copy of a memmap)."""
    if isinstance(t, torch.Tensor):
        t = t.detach().to("cpu")
        h.update(f"{tuple(t.shape)}|{t.dtype}|".encode())
        flat = t.contiguous().reshape(t.shape[0] if t.ndim else 1, -1)
        for a in range(0, flat.shape[0], rows):
            h.update(flat[a:a + rows].contiguous().view(torch.uint8).numpy().tobytes())
    else:
        h.update(f"{tuple(t.shape)}|{t.dtype}|".encode())
        flat = t.reshape(t.shape[0] if t.ndim else 1, -1)
        for a in range(0, flat.shape[0], rows):
            h.update(np.ascontiguousarray(flat[a:a + rows]).tobytes())


def digest(*parts: Any) -> str:
    """A 128-bit hex digest of values: tensors and arrays by shape, dtype and bytes, anything else by ``repr``."""
    h = hashlib.blake2b(digest_size=16)
    for p in parts:
        if isinstance(p, (torch.Tensor, np.ndarray)):
            hash_tensor(h, p)
        else:
            h.update(repr(p).encode())
            h.update(b"\x00")
    return h.hexdigest()


#: What each fingerprint of a stored result digests, in the words a refused resume uses.
FINGERPRINTS = {"model": "the model (architecture or fixed values)", "trajectory": "the trajectory",
                "X": "the data X", "X2": "the data X2", "options": "the options"}


def fingerprints(model: str, trajectory: str, X: Any, X2: Any = None, *, y: Any = None, y2: Any = None,
                 options: dict[str, Any]) -> dict[str, str]:
    """The fingerprints of a stored result (a Gram, or path features with ``X2=None``): the digests of the
    model and the trajectory as given (``FunctionalModel.fingerprint()``, ``Trajectory.fingerprint()``), of the
    samples with their targets, and of the recorded ``options``. A resume is allowed only when all agree."""
    return {"model": model, "trajectory": trajectory,
            "X": digest(X) if y is None else digest(X, y),
            "X2": "none" if X2 is None else digest(X2) if y2 is None else digest(X2, y2),
            "options": digest(sorted(options.items()))}
