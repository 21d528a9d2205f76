"""trajectory_files: the on-disk trajectory format — its reader and its append-only writer together.

Layout (a directory)::

    manifest.json   {"format": "pkfast-trajectory", "version": 1, "dtype": "float32",
                     "spec": [[name, [shape...]], ...], "num_params": P, "meta": {...}}
    weights.bin     raw row-major [T+1, P] array in ``dtype`` (native little-endian), appended row by row
    steps.jsonl     one JSON object per step s: {"lr": ε_s, "batch_indices": [...] | null, ...}
    weights.crc     one CRC-carrying line per weight row k: "k <CRC-32 of row k's bytes>" (:func:`formats.crc_line`)
    targets.npy     optional: the training targets the batch indices refer to
    state.bin       adaptive optimizers only: raw row-major [T, S] array, row s the optimizer state of step s
                    (:mod:`pkfast.trajectory.optimizers`; the manifest's "state" says its dtype, width, entries)
    state.crc       one checksum line per state row, as weights.crc

``steps.jsonl`` is the commit log: step ``s`` exists once its line is complete *and* row ``s+1`` of
``weights.bin`` is complete. A crash while writing therefore loses at most the step being written, and
earlier steps are never rewritten. :func:`read_layout` reports a recording whose weight file holds fewer
complete rows than its log has steps (data lost after the fact) instead of silently shortening it.

Integrity: row ``k``'s checksum line in ``weights.crc`` is appended after the row is flushed (fsync'd with
``fsync=True``) and before the step that row closes is committed, so every committed step's row has its
checksum; a torn or corrupted checksum line is ignored like a torn step line, and a later line for the same
row (after a resume) replaces an earlier one. A reader verifies a row against its checksum before using it
(:func:`check_row`) and raises :class:`TrajectoryChecksumError` on a mismatch. The optional state rows
follow the same rules through the same functions (each takes the file pair it reads): state row ``s`` and its
checksum are flushed after weight row ``s+1`` and before step ``s`` is committed. Recordings written before
checksums existed have no ``weights.crc``: they still load, with a one-time note that they carry none.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pkfast.store import formats
from pkfast.store.reader import StoreError

__all__ = ["TrajectoryWriter", "TrajectoryChecksumError", "read_manifest", "read_steps", "read_checksums",
           "check_row", "storage_dtype", "jsonable"]

logger = logging.getLogger("pkfast.trajectory")

FORMAT_NAME = "pkfast-trajectory"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
WEIGHTS = "weights.bin"
STEPS = "steps.jsonl"
TARGETS = "targets.npy"
CHECKSUMS = "weights.crc"
STATE = "state.bin"
STATE_CHECKSUMS = "state.crc"

NP_DTYPES = {torch.float16: np.float16, torch.float32: np.float32, torch.float64: np.float64}
TORCH_FROM_NAME = {"float16": torch.float16, "float32": torch.float32, "float64": torch.float64}


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def storage_dtype(dtypes: Sequence[torch.dtype]) -> torch.dtype:
    """The dtype in which a set of floating tensors is stored losslessly (bfloat16 widens to float32)."""
    out = None
    for dt in dtypes:
        out = dt if out is None else torch.promote_types(out, dt)
    if out is None or out == torch.bfloat16:
        return torch.float32
    if out not in NP_DTYPES:
        raise TypeError(f"pkfast.Trajectory: cannot store weights of dtype {out}; expected a floating dtype")
    return out


def jsonable(v: Any) -> Any:
    """``v`` as JSON-serialisable values (tensors and arrays as lists; unknown objects by ``repr``)."""
    if isinstance(v, (torch.Tensor, np.ndarray)):
        return v.tolist()
    if isinstance(v, (np.integer, np.floating)):
        return v.item()
    if isinstance(v, (list, tuple)):
        return [jsonable(x) for x in v]
    if isinstance(v, Mapping):
        return {str(k): jsonable(x) for k, x in v.items()}
    if isinstance(v, (str, int, float, bool)) or v is None:
        return v
    return repr(v)


# ---------------------------------------------------------------------------------------------- reading
def read_manifest(path: Path) -> dict[str, Any]:
    """The manifest of the trajectory directory ``path`` (format and version checked)."""
    fn = "pkfast.Trajectory.load"
    try:
        manifest = json.loads((path / MANIFEST).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{fn}: {str(path / MANIFEST)!r} is corrupt: {e}") from e
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_NAME:
        found = manifest.get("format") if isinstance(manifest, dict) else None
        raise ValueError(f"{fn}: {str(path)!r} is not a pkfast trajectory (format={found!r})")
    formats.check_format(manifest, name=FORMAT_NAME, readable=range(1, FORMAT_VERSION + 1), current=FORMAT_VERSION,
                         where=repr(str(path)), fn=fn)
    return manifest


def read_steps(path: Path) -> list[dict[str, Any]]:
    """Complete step records; a partial trailing line (crash mid-write) is dropped."""
    p = path / STEPS
    if not p.exists():
        return []
    out = []
    with open(p, "rb") as f:
        for line in f:
            if not line.endswith(b"\n"):
                break
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                break
    return out


def complete_rows(path: Path, num_params: int, itemsize: int, file: str = WEIGHTS) -> int:
    """Complete rows in ``weights.bin`` (or ``file``; a partial trailing row does not count)."""
    wpath = path / file
    return (wpath.stat().st_size if wpath.exists() else 0) // (num_params * itemsize)


class TrajectoryChecksumError(StoreError):
    """A weight row of a recorded trajectory does not match the checksum recorded with it (the file changed
    after it was written: a flipped bit, a partial copy, an edit)."""


def row_bytes(row: torch.Tensor | np.ndarray) -> memoryview:
    """The bytes of one weight row as stored in ``weights.bin``."""
    a = row.detach().cpu().contiguous().numpy() if isinstance(row, torch.Tensor) else np.ascontiguousarray(row)
    return memoryview(a).cast("B")


def read_checksums(path: Path, crc_file: str = CHECKSUMS) -> dict[int, int] | None:
    """{row: CRC-32} from ``weights.crc`` (or ``crc_file``; torn or corrupted lines skipped, the last line of a
    row wins), or None for a recording without checksums (written before pkfast recorded them)."""
    p = path / crc_file
    if not p.exists():
        return None
    out: dict[int, int] = {}
    for line in p.read_bytes().decode("utf-8", errors="replace").splitlines(keepends=True):
        fields = formats.parse_crc_line(line)
        if fields is None or len(fields) != 2:
            continue
        try:
            out[int(fields[0])] = int(fields[1], 16)
        except ValueError:
            continue
    return out


_NOTED: set[str] = set()


def note_no_checksums(path: Path) -> None:
    """Say once per trajectory directory (and process) that its weight rows carry no checksums."""
    key = str(Path(path).resolve())
    if key not in _NOTED:
        _NOTED.add(key)
        logger.warning("pkfast.Trajectory.load: %r carries no weight checksums (it was recorded before pkfast wrote "
                       "%s); its rows are read unverified. Resuming the recording with TrajectoryRecorder(..., "
                       "resume=True) or re-saving it (Trajectory.save) adds them", str(path), CHECKSUMS)


def check_row(path: str | os.PathLike | None, k: int, row: torch.Tensor | np.ndarray, crcs: dict[int, int], *,
              file: str = WEIGHTS, crc_file: str = CHECKSUMS) -> None:
    """Raise :class:`TrajectoryChecksumError` unless row ``k`` of ``file`` matches its checksum in ``crc_file``."""
    found = formats.crc32([row_bytes(row)])
    expected = crcs.get(k)
    if expected == found:
        return
    where = f"{str(Path(path) / file)!r}" if path is not None else file
    if file == WEIGHTS:
        what = "weight row " + str(k) + (f" (w_{k}, the point after step {k - 1})" if k else " (w_0, the initial point)")
    else:
        what = f"state row {k} (the optimizer state after step {k})"
    exp = f"{expected:08x}" if expected is not None else f"none ({crc_file} has no line for it: that file is damaged)"
    raise TrajectoryChecksumError(
        f"pkfast.Trajectory: {what} of {where} does not match its recorded checksum: expected "
        f"CRC-32 {exp}, found {found:08x}. The file changed after it was recorded (a flipped bit, a partial copy, "
        f"an edit); re-record the trajectory or restore {file} and {crc_file} from a good copy")


def keep_checksums(path: Path, rows: int, num_params: int, dtype: np.dtype, *, file: str = WEIGHTS,
                   crc_file: str = CHECKSUMS) -> None:
    """Rewrite ``weights.crc`` (or ``crc_file``) to rows ``0 … rows-1`` (a resume truncated the recording there):
    recorded checksums are kept; a row without one (a recording made before pkfast wrote checksums) gets one
    computed from the file as it is now."""
    crcs = read_checksums(path, crc_file) or {}
    missing = [k for k in range(rows) if k not in crcs]
    if missing:
        mm = np.memmap(path / file, dtype=dtype, mode="r", shape=(rows, num_params))
        for k in missing:
            crcs[k] = formats.crc32([row_bytes(mm[k])])
        del mm
        logger.info("pkfast.TrajectoryRecorder: %r: computed the missing checksums of %d recorded weight row(s) "
                    "from %s as it is now", str(path), len(missing), file)
    formats.atomic_write(path / crc_file, "".join(formats.crc_line(f"{k} {crcs[k]:08x}") for k in range(rows)))


# ---------------------------------------------------------------------------------------------- writing
class TrajectoryWriter:
    """Low-level append-only writer of the trajectory directory format (used by the recorder and ``save``)."""

    def __init__(
        self,
        path: str | os.PathLike,
        spec: Sequence[tuple[str, Sequence[int]]],
        dtype: torch.dtype,
        *,
        meta: Mapping[str, Any] | None = None,
        overwrite: bool = False,
        fsync: bool = False,
        append: bool = False,
        state: Mapping[str, Any] | None = None,
    ) -> None:
        """``state``: the optimizer-state rows' description (``{"file", "dtype", "num_params", …}``, stored as the
        manifest's ``"state"``; with ``append=True`` read from the manifest): every step then takes a state row."""
        self.path = Path(path)
        self.dtype = dtype
        self.fsync = fsync
        self.num_params = int(sum(int(np.prod(s, dtype=np.int64)) for _, s in spec))
        if not append:
            if self.path.exists() and any(self.path.iterdir()):
                if not overwrite:
                    raise FileExistsError(
                        f"pkfast: {str(self.path)!r} already exists and is not empty; pass overwrite=True to "
                        "replace it (or resume=True to the recorder to continue a recording)"
                    )
                if not (self.path / MANIFEST).exists():
                    raise FileExistsError(
                        f"pkfast: refusing to overwrite {str(self.path)!r}: it is not a pkfast trajectory"
                    )
                shutil.rmtree(self.path)
            self.path.mkdir(parents=True, exist_ok=True)
            manifest = {
                "format": FORMAT_NAME,
                "version": FORMAT_VERSION,
                "dtype": dtype_name(dtype),
                "spec": [[n, list(s)] for n, s in spec],
                "num_params": self.num_params,
                "meta": jsonable(dict(meta or {})),
                **({} if state is None else {"state": jsonable(dict(state))}),
            }
            formats.atomic_write(self.path / MANIFEST, json.dumps(manifest, indent=1), fsync=fsync)
        if append and state is None:
            state = read_manifest(self.path).get("state")
        self.state = None if state is None else dict(state)
        self._weights = RowFile(self.path, WEIGHTS, CHECKSUMS, self.num_params, dtype, self)
        self._state = None if state is None else RowFile(
            self.path, str(state["file"]), str(state.get("checksums", STATE_CHECKSUMS)), int(state["num_params"]),
            TORCH_FROM_NAME[state["dtype"]], self)
        self._s = open(self.path / STEPS, "ab")
        self.rows = self._weights.rows

    def _flush(self, f) -> None:
        f.flush()
        if self.fsync:
            os.fsync(f.fileno())

    def append_point(self, flat: torch.Tensor | Sequence[torch.Tensor]) -> None:
        """Append one weight row, given flat or as its parts in spec order (written without concatenating), then
        its checksum line once the row is flushed (and fsync'd with ``fsync``)."""
        self._weights.append(flat)
        self.rows = self._weights.rows

    def append_step(self, flat: torch.Tensor | Sequence[torch.Tensor], lr: float, batch_indices: Any = None, *,
                    state: torch.Tensor | Sequence[torch.Tensor] | None = None, **extra: Any) -> None:
        """Write w_{s+1} (and, for a writer with state rows, step s's state row ``state``), then commit step s
        (its line in steps.jsonl)."""
        if (state is None) != (self._state is None):
            raise ValueError("pkfast: this trajectory " + ("records an optimizer state row with every step; pass "
                             "state=" if state is None else "has no optimizer state rows; found state="))
        if self._state is not None and self._state.rows != self.rows - 1:
            raise ValueError(f"pkfast: {self._state.file} holds {self._state.rows} rows for {self.rows - 1} steps; "
                             "expected one per step (the recording is damaged: re-record it)")
        self.append_point(flat)
        if self._state is not None:
            self._state.append(state)
        rec = {"lr": float(lr), "batch_indices": jsonable(batch_indices)}
        rec.update({k: jsonable(v) for k, v in extra.items()})
        self._s.write((json.dumps(rec, separators=(",", ":")) + "\n").encode())
        self._flush(self._s)

    def close(self) -> None:
        for f in (self._weights, self._state, self._s):
            if f is not None and not f.closed:
                f.close()


class RowFile:
    """An append-only file of fixed-width rows (``weights.bin``, ``state.bin``) with its checksum file: each row is
    written, flushed (and fsync'd with the writer's ``fsync``), then its checksum line is appended and flushed."""

    def __init__(self, path: Path, file: str, crc_file: str, width: int, dtype: torch.dtype,
                 owner: "TrajectoryWriter") -> None:
        self.file, self.width, self.dtype, self._owner = file, width, dtype, owner
        self._f = open(path / file, "ab")
        self._c = open(path / crc_file, "ab")
        self.rows = self._f.tell() // (width * torch.empty((), dtype=dtype).element_size()) if width else 0

    @property
    def closed(self) -> bool:
        return self._f.closed

    def append(self, flat: torch.Tensor | Sequence[torch.Tensor]) -> None:
        parts = [flat] if isinstance(flat, torch.Tensor) else list(flat)
        n = sum(p.numel() for p in parts)
        if n != self.width:
            raise ValueError(f"pkfast: a row of {self.file} has {n} values; expected {self.width}")
        crc = 0
        for p in parts:
            p = p.detach()
            if p.device.type != "cpu" or p.dtype != self.dtype:
                p = p.to("cpu", self.dtype)
            # the tensor's own memory goes to the file: no intermediate bytes object
            b = row_bytes(p)
            self._f.write(b)
            crc = formats.crc32([b], crc)
        self._owner._flush(self._f)
        self._c.write(formats.crc_line(f"{self.rows} {crc:08x}").encode())
        self._owner._flush(self._c)
        self.rows += 1

    def close(self) -> None:
        for f in (self._f, self._c):
            if not f.closed:
                f.close()


def save_targets(path: Path, targets: np.ndarray) -> None:
    """Write ``targets.npy`` into the recording atomically."""
    with formats.atomic_file(path / TARGETS) as f:
        np.save(f, targets)
