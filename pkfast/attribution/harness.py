"""attribution.harness: retrains the user's model on seeded random training subsets, resumably and shared between
processes, and returns the masks and outputs that :func:`~pkfast.attribution.lds` scores.

The folder is the state: ``masks.npy`` and ``harness.json`` (the subsets' fingerprint and the seed) are written
first; each finished retrain is written atomically (a temporary file, then ``os.replace``) as
``outputs_{j:05d}.npy`` with its ``outputs_{j:05d}.json`` (seconds, pid, host). A rerun skips the finished subsets.
Processes (or torchrun ranks) sharing the folder split the work by *claims*: ``claims/{j:05d}.claim`` is created
with an exclusive create (``O_CREAT | O_EXCL``) holding pid, host and time (and, on Linux, the process's start time
and the boot id); a claim whose process is gone (same host: the pid dead, or reused since) or older than
``claim_timeout`` is taken over. A process that finds nothing left to claim waits for the
others' claims to finish, then returns every output.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

__all__ = ["subsets", "retrain_seed", "retrain", "Retrains"]

_FN = "pkfast.attribution.retrain"


def subsets(n_train: int, count: int, fraction: float = 0.5, seed: int = 0) -> np.ndarray:
    """``count`` seeded random subsets of ``n_train`` training points, each holding exactly
    ``round(fraction * n_train)`` of them.

    Row j is the first ``round(fraction * n_train)`` entries of the j-th permutation drawn by
    ``np.random.default_rng(seed)``: the same arguments give the same masks on every machine.

    Returns:
        [count, n_train] bool: True where subset j holds training point i.

    Example:
        >>> from pkfast.attribution import subsets
        >>> m = subsets(10, 4, fraction=0.3, seed=1)
        >>> m.shape, m.sum(1).tolist()
        ((4, 10), [3, 3, 3, 3])
        >>> bool((m == subsets(10, 4, fraction=0.3, seed=1)).all())
        True
    """
    fn = "pkfast.attribution.subsets"
    for name, v in (("n_train", n_train), ("count", count), ("seed", seed)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
            raise TypeError(f"{fn}: {name} must be an integer; found {type(v).__name__} {v!r}")
    if n_train < 1 or count < 1:
        raise ValueError(f"{fn}: n_train and count must be ≥ 1; found n_train={n_train}, count={count}")
    if seed < 0:
        raise ValueError(f"{fn}: seed must be ≥ 0 (a numpy seed); found {seed}")
    if not 0.0 < float(fraction) < 1.0:
        raise ValueError(f"{fn}: fraction must be in (0, 1) (the share of training points each subset keeps); "
                         f"found {fraction}")
    k = int(round(float(fraction) * n_train))
    if k < 1 or k >= n_train:
        raise ValueError(f"{fn}: round(fraction * n_train) = {k} with fraction={fraction}, n_train={n_train}; a "
                         "subset must keep at least one point and leave at least one out: change fraction")
    rng = np.random.default_rng(int(seed))
    masks = np.zeros((count, n_train), dtype=bool)
    for j in range(count):
        masks[j, rng.permutation(n_train)[:k]] = True
    return masks


def retrain_seed(seed: int, j: int) -> int:
    """The seed :func:`retrain` passes to ``train`` for subset ``j``: the first 32-bit word of
    ``np.random.SeedSequence([seed, j])`` — deterministic, distinct per subset, independent of which process runs it.

    Example:
        >>> from pkfast.attribution.harness import retrain_seed
        >>> retrain_seed(0, 3) == retrain_seed(0, 3), retrain_seed(0, 3) != retrain_seed(0, 4)
        (True, True)
    """
    return int(np.random.SeedSequence([int(seed), int(j)]).generate_state(1)[0])


@dataclass(frozen=True)
class Retrains:
    """What :func:`retrain` returns: ``masks`` [S, N] bool, ``outputs`` [S, M] float64 (one row per retrained
    model), the ``folder`` that holds them and ``seconds`` [S] (each retrain's wall time; NaN where unknown).

    Example:
        >>> import numpy as np
        >>> from pkfast.attribution import Retrains
        >>> r = Retrains(np.eye(3, dtype=bool), np.eye(3), None, np.ones(3))
        >>> r.lds(np.eye(3)).round(2).tolist()
        [1.0, 1.0, 1.0]
    """

    masks: np.ndarray
    outputs: np.ndarray
    folder: Path | None
    seconds: np.ndarray

    def lds(self, scores: Any) -> np.ndarray:
        """[M] per-query LDS of ``scores`` ([M, N]) against these retrains: :func:`pkfast.attribution.lds`."""
        from pkfast.attribution.lds import lds

        return lds(scores, self.masks, self.outputs)


def _fingerprint(masks: np.ndarray) -> str:
    return hashlib.sha256(np.packbits(masks, axis=1).tobytes() + str(masks.shape).encode()).hexdigest()


def _atomic_write(path: Path, write: Callable[[Any], None], binary: bool = True) -> None:
    tmp = path.with_name(f".{path.name}.{socket.gethostname()}.{os.getpid()}.tmp")
    with open(tmp, "wb" if binary else "w") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _prepare(masks: np.ndarray, folder: Path, seed: int) -> None:
    """Writes masks.npy and harness.json, or checks that the folder's match (refusing a mismatch)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "claims").mkdir(exist_ok=True)
    meta = {"count": int(masks.shape[0]), "n_train": int(masks.shape[1]),
            "fraction": float(masks.sum() / masks.size), "seed": int(seed), "masks_sha256": _fingerprint(masks)}
    info = folder / "harness.json"
    if info.exists():
        old = json.loads(info.read_text())
        diff = [f"{k}: found {old.get(k)!r}, expected {v!r}" for k, v in meta.items() if old.get(k) != v]
        if diff:
            raise ValueError(f"{_FN}: folder {folder} holds retrains of other subsets or another seed (harness.json "
                             f"differs in {'; '.join(diff)}); pass the same masks and seed to resume, or a new folder")
        return
    _atomic_write(folder / "masks.npy", lambda f: np.save(f, masks))
    _atomic_write(info, lambda f: json.dump(meta, f, indent=1), binary=False)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, under another user
        return True
    return True


def _proc(path: str) -> str:
    try:
        with open(path) as f:
            return f.read()
    except OSError:  # not Linux, or the process is gone
        return ""


def _started(pid: int) -> str:
    """The process's start time since boot (Linux), '' where unknown: with the boot id it tells a reused pid."""
    stat = _proc(f"/proc/{pid}/stat")
    return stat.rsplit(")", 1)[-1].split()[19] if stat else ""


def _boot() -> str:
    return _proc("/proc/sys/kernel/random/boot_id").strip()


def _stale(claim: dict, claim_timeout: float | None) -> bool:
    if claim.get("host") == socket.gethostname():
        pid = int(claim.get("pid", -1))
        if not _alive(pid) or claim.get("boot", "") not in ("", _boot()):
            return True
        if claim.get("started", "") not in ("", _started(pid)):  # the pid now belongs to another process
            return True
    return claim_timeout is not None and time.time() - float(claim.get("time", 0.0)) > claim_timeout


def _read_claim(path: Path) -> dict | None:
    try:
        text, mtime = path.read_text(), path.stat().st_mtime
    except FileNotFoundError:
        return None
    try:
        return json.loads(text)
    except ValueError:  # empty or half written (being written now): only its age can make it stale
        return {"host": None, "pid": -1, "time": mtime}


def _try_claim(path: Path, claim_timeout: float | None) -> bool:
    """Claims ``path`` exclusively; takes over a stale claim (moving it aside first, so one taker wins)."""
    me = json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "time": time.time(),
                     "started": _started(os.getpid()), "boot": _boot()})
    for _ in range(2):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            old = _read_claim(path)
            if old is None:
                continue  # released meanwhile: try again
            if not _stale(old, claim_timeout):
                return False
            aside = path.with_name(f"{path.name}.stale.{socket.gethostname()}.{os.getpid()}")
            try:
                os.rename(path, aside)
            except FileNotFoundError:
                return False  # another process took it over first
            if _read_claim(aside) != old:  # a fresh claim replaced the stale one meanwhile: put it back
                try:
                    os.link(aside, path)
                except FileExistsError:
                    pass
                os.unlink(aside)
                return False
            os.unlink(aside)
            continue
        with os.fdopen(fd, "w") as f:
            f.write(me)
        return True
    return False


def _as_outputs(result: Any, measure: Callable[[Any], Any] | None, j: int) -> np.ndarray:
    if measure is not None:
        result = measure(result)
    elif callable(result):
        raise TypeError(f"{_FN}: train returned a {type(result).__name__} (a model) for subset {j}; pass "
                        "measure=(model -> [M] outputs on the queries), or make train return the outputs")
    if hasattr(result, "detach"):
        result = result.detach().cpu().numpy()
    out = np.asarray(result, dtype=np.float64)
    if out.ndim != 1:
        raise ValueError(f"{_FN}: the outputs of subset {j} must be 1-dimensional ([M], one per query); found "
                         f"shape {out.shape}")
    return out


def _run_one(train: Callable, masks: np.ndarray, j: int, folder: Path, measure, seed: int) -> None:
    t0 = time.perf_counter()
    out = _as_outputs(train(masks[j].copy(), retrain_seed(seed, j)), measure, j)
    meta = {"seconds": time.perf_counter() - t0, "pid": os.getpid(), "host": socket.gethostname(),
            "seed": retrain_seed(seed, j)}
    _atomic_write(folder / f"outputs_{j:05d}.json", lambda f: json.dump(meta, f), binary=False)
    _atomic_write(folder / f"outputs_{j:05d}.npy", lambda f: np.save(f, out))


def _done(folder: Path, j: int) -> bool:
    return (folder / f"outputs_{j:05d}.npy").exists()


def _collect(masks: np.ndarray, folder: Path) -> Retrains:
    rows, seconds = [], []
    for j in range(masks.shape[0]):
        rows.append(np.load(folder / f"outputs_{j:05d}.npy"))
        meta = folder / f"outputs_{j:05d}.json"
        seconds.append(json.loads(meta.read_text()).get("seconds", np.nan) if meta.exists() else np.nan)
    sizes = {r.shape for r in rows}
    if len(sizes) != 1:
        raise ValueError(f"{_FN}: the retrains in {folder} returned outputs of different shapes {sorted(sizes)}; "
                         "train (or measure) must return the same [M] queries for every subset")
    return Retrains(masks.copy(), np.stack(rows), folder, np.asarray(seconds, dtype=np.float64))


def _bar(progress: bool, total: int, initial: int):
    if not progress:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc="pkfast retrains", unit="model")


def _advance(bar, folder: Path, S: int) -> None:
    if bar is not None:  # (others' retrains count too: the ETA is over the whole folder)
        bar.n = sum(_done(folder, j) for j in range(S))
        bar.refresh()


def _check_masks(masks: Any) -> np.ndarray:
    if hasattr(masks, "detach"):
        masks = masks.detach().cpu().numpy()
    masks = np.asarray(masks)
    if masks.ndim != 2 or masks.dtype != np.bool_:
        raise ValueError(f"{_FN}: masks must be a 2-dimensional bool array [subsets, n_train] (see "
                         f"pkfast.attribution.subsets); found shape {masks.shape}, dtype {masks.dtype}")
    if masks.shape[0] < 1:
        raise ValueError(f"{_FN}: masks holds no subset; pass at least one row")
    return masks


def retrain(train: Callable[[np.ndarray, int], Any], masks: Any, folder: str | os.PathLike, *,
            measure: Callable[[Any], Any] | None = None, seed: int = 0, progress: bool = True,
            claim_timeout: float | None = None, poll: float = 0.5) -> Retrains:
    """Retrains on every subset of ``masks`` (resumably, sharing the work with other processes on ``folder``)
    and returns the masks and the retrained models' outputs.

    Args:
        train: ``train(mask, seed)``, ``mask`` [N] bool (the training points to use) and ``seed`` =
            :func:`retrain_seed` ``(seed, j)``; returns the outputs ([M], numpy or torch: e.g. the retrained
            model's loss or margin on each query) or, with ``measure``, a model.
        masks: [S, N] bool, e.g. :func:`subsets`.
        folder: where the retrains are kept; rerunning on the same folder continues an interrupted run, and
            several processes (or torchrun ranks: call it on every rank) on one folder share the subsets.
        measure: ``measure(whatever train returned) -> [M]``, when ``train`` returns a model.
        seed: the base of each subset's seed (recorded: a rerun with another seed is refused).
        progress: a tqdm bar (stderr) with the ETA over all subsets, finished ones included.
        claim_timeout: seconds after which another host's claim counts as abandoned (None: never; a claim of this
            host is taken over as soon as its process is gone).
        poll: seconds between looks at the others' claims once nothing is left to claim.

    Returns:
        :class:`Retrains`: ``masks``, ``outputs`` [S, M], ``folder``, ``seconds`` [S]; ``.lds(scores)``.

    Example:
        >>> import numpy as np, tempfile
        >>> from pkfast.attribution import retrain, subsets
        >>> rng = np.random.default_rng(0)
        >>> X, y, Xq = rng.normal(size=(40, 3)), rng.normal(size=40), rng.normal(size=(2, 3))
        >>> def train(mask, seed):                         # least squares on the subset; outputs on 2 queries
        ...     w = np.linalg.lstsq(X[mask], y[mask], rcond=None)[0]
        ...     return Xq @ w
        >>> r = retrain(train, subsets(40, 8), tempfile.mkdtemp(), progress=False)
        >>> r.masks.shape, r.outputs.shape
        ((8, 40), (8, 2))
    """
    masks, folder = _check_masks(masks), Path(folder)
    _prepare(masks, folder, seed)
    S = masks.shape[0]
    bar = _bar(progress, S, sum(_done(folder, j) for j in range(S)))
    try:
        while True:
            pending = [j for j in range(S) if not _done(folder, j)]
            if not pending:
                break
            worked = False
            for j in pending:
                claim = folder / "claims" / f"{j:05d}.claim"
                if _done(folder, j) or not _try_claim(claim, claim_timeout):
                    continue
                try:
                    if not _done(folder, j):  # (finished between the look and the claim)
                        _run_one(train, masks, j, folder, measure, seed)
                finally:
                    claim.unlink(missing_ok=True)
                worked = True
                _advance(bar, folder, S)
            if not worked:
                time.sleep(poll)  # the rest is claimed by others: wait for them
                _advance(bar, folder, S)
    finally:
        if bar is not None:
            bar.close()
    return _collect(masks, folder)
