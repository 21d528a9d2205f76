"""features: :class:`PathFeatures`, random path features of a sample set with the fingerprint of the sketch that
made them — their products estimate the path kernel — and their two file formats: one ``.npz``
(:meth:`PathFeatures.save` / :meth:`PathFeatures.load`) and the chunked store written by ``pkfast.sketch(out=…)``
(:func:`write_store` / :meth:`PathFeatures.open`: the chunked store of :mod:`pkfast.store.writer` with one row
per sample and row chunks, in a storage dtype)."""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pkfast import _checks

from pkfast.store import formats
from pkfast.options import OUTPUTS
from pkfast.store import ranks
from pkfast.store.reader import PATH_FEATURES, StoredGram, StoreError, open_chunks, row_chunks
from pkfast.store.writer import ChunkStore

__all__ = ["PathFeatures", "STORAGE_DTYPES", "storage_numpy_dtype", "store_options", "to_storage", "write_store"]

FORMAT = "pkfast-path-features"
VERSION = 1
#: ``options["kind"]`` of a feature store (a stored-Gram manifest whose rows are samples' features).
STORE_KIND = PATH_FEATURES
#: dtypes features may be stored in; half precision is widened to float32 for products.
STORAGE_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def storage_numpy_dtype(dtype: torch.dtype) -> np.dtype:
    """The ``.npy`` dtype of a storage dtype: bfloat16 (which numpy lacks) as its 16-bit patterns in int16."""
    return np.dtype("<i2") if dtype == torch.bfloat16 else np.dtype(str(dtype).replace("torch.", "")).newbyteorder("<")


def to_storage(phi: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Features converted for the store (bfloat16 as int16 bits); refuses values float16 cannot hold."""
    t = phi.to(dtype)
    if dtype == torch.float16 and not bool(torch.isfinite(t).all()) and bool(torch.isfinite(phi).all()):
        big = float(phi.abs().max())
        raise ValueError(f"pkfast.sketch: a feature of magnitude {big:.3g} overflows float16 (max 65504); store in "
                         "torch.bfloat16 (float32's range) or torch.float32")
    return t.view(torch.int16) if dtype == torch.bfloat16 else t


def store_options(parts: dict[str, Any], *, k: int, seed: int, rule: str, of: str, storage: torch.dtype) -> dict:
    """The manifest options of a feature store: the sketch's record and the features' fingerprint."""
    return {"kind": STORE_KIND, "k": int(k), "seed": int(seed), "rule": rule, "of": of,
            "storage": str(storage).replace("torch.", ""), "parts": dict(parts),
            "fingerprint": formats.digest(sorted(parts.items()))}


def write_store(out: str | os.PathLike, compute: Callable[[slice], torch.Tensor], *, shape: tuple[int, int, int],
                rows: int, storage: torch.dtype, options: dict[str, Any], fingerprints: dict[str, str],
                overwrite: bool, fn: str, progress: bool) -> "PathFeatures":
    """Features of ``shape`` ``(N, C, k)`` written into the store at ``out`` in chunks of ``rows`` samples
    (this rank's unfinished ones; the finished ones of an earlier run are kept), ``compute(rows)`` giving the
    features of those samples; ``options`` from :func:`store_options`, ``fingerprints`` from
    :func:`pkfast.store.formats.fingerprints`. Returns the finished store, opened."""
    manifest = ChunkStore.new_manifest(shape=shape, dtype=storage_numpy_dtype(storage), options=options,
                                       fingerprints=fingerprints, chunks=row_chunks(shape[0], rows),
                                       blocks=(rows, rows, rows), symmetric=False, diagonal=True,
                                       num_outputs=shape[1], scale=1.0)
    ranks.fill(out, manifest, lambda chunk: to_storage(compute(chunk.rows), storage), overwrite=overwrite, fn=fn,
               progress=progress)
    return PathFeatures.open(out)


class PathFeatures:
    """Sketched path features Φ ∈ R^{N×C×k} of N samples (see :mod:`pkfast.sketch`): Φ(x)Φ(x′)ᵀ estimates
    the path kernel K(x, x′) without bias.

    Attributes:
        features: ``[N, C, k]`` CPU tensor.
        k, seed, rule, of: how the sketch was made.
        num_outputs: C (1 for ``of="loss"``).
        fingerprint: a digest of the model's architecture and trainable parameter names/shapes, the
            trajectory's weights and step sizes, rule, k, seed, of, loss, dtype and random stream. Features
            are multiplied together only when their fingerprints agree.
        parts: the fingerprint's components (which one differs is named when a product is refused).

    Example:
        >>> import torch, pkfast
        >>> from pkfast.sketch import sketch
        >>> net = torch.nn.Sequential(torch.nn.Linear(3, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2))
        >>> w0 = {k: v.clone() for k, v in net.state_dict().items()}
        >>> traj = pkfast.Trajectory.from_checkpoints([w0, {k: v * 0.9 for k, v in w0.items()}], lr=0.1)
        >>> X, X2 = torch.randn(5, 3), torch.randn(4, 3)
        >>> phi = sketch(net, traj, X, k=256, seed=1, progress=False)
        >>> phi  # doctest: +ELLIPSIS
        PathFeatures(N=5, C=2, k=256, seed=1, rule='left', of='output', dtype=float32, fingerprint='...')
        >>> phi.gram().shape, phi.gram(outputs="full").shape, phi.gram(diagonal=True).shape
        (torch.Size([5, 5]), torch.Size([5, 5, 2, 2]), torch.Size([5]))
        >>> phi.gram(sketch(net, traj, X2, k=256, seed=1, progress=False)).shape  # cross-Gram: same seed
        torch.Size([5, 4])
    """

    def __init__(self, features: torch.Tensor, *, k: int, seed: int, rule: str, of: str,
                 parts: dict[str, Any]) -> None:
        if not isinstance(features, torch.Tensor) or features.ndim != 3 or features.shape[2] != k:
            raise ValueError(f"pkfast.PathFeatures: features must be a [N, C, k={k}] tensor; found "
                             f"{type(features).__name__} of shape {tuple(getattr(features, 'shape', ()))}")
        self.features = features
        self.k = int(k)
        self.seed = int(seed)
        self.rule = rule
        self.of = of
        self.parts = dict(parts)
        self.fingerprint = formats.digest(sorted(self.parts.items()))
        #: (file, byte offset of this set's first row) of features opened from a store: :meth:`read` reads rows
        #: from the file (not through the memory map, whose touched pages would stay resident)
        self._file: tuple[Path, int] | None = None

    @property
    def num_outputs(self) -> int:
        return int(self.features.shape[1])

    def __len__(self) -> int:
        return int(self.features.shape[0])

    def __getitem__(self, rows: slice | torch.Tensor | list[int]) -> "PathFeatures":
        """The features of some samples (a slice, index list or boolean mask): the same sketch, so products with
        the rest stay allowed. A slice of memory-mapped features stays mapped."""
        if isinstance(rows, int):
            rows = slice(rows, rows + 1)
        out = PathFeatures(self.features[rows], k=self.k, seed=self.seed, rule=self.rule, of=self.of, parts=self.parts)
        if self._file is not None and isinstance(rows, slice) and rows.step in (None, 1):
            start = rows.indices(len(self))[0]
            out._file = (self._file[0], self._file[1] + start * self._row_bytes)
        return out

    @property
    def _row_bytes(self) -> int:
        return self.features[0].numel() * self.features.element_size()

    def read(self, start: int, stop: int) -> torch.Tensor:
        """Rows ``start:stop`` of the features as a new tensor, widened to float32 if stored in half precision.
        Stored features are read from their file, so streaming over a large store keeps the process's resident
        memory to one block (pages of a memory map stay resident once touched)."""
        if self._file is None:
            return _widen(self.features[start:stop])
        n = max(0, min(stop, len(self)) - start)
        buf = bytearray(n * self._row_bytes)
        with open(self._file[0], "rb", buffering=0) as f:
            got = os.preadv(f.fileno(), [buf], self._file[1] + start * self._row_bytes)
        if got != len(buf):
            raise StoreError(f"pkfast.PathFeatures.read: {self._file[0]} is shorter than its manifest says")
        raw = torch.frombuffer(buf, dtype=self.features.dtype if self.features.dtype != torch.bfloat16 else torch.int16)
        if self.features.dtype == torch.bfloat16:
            raw = raw.view(torch.bfloat16)
        return _widen(raw.view(n, *self.features.shape[1:]))

    def __repr__(self) -> str:
        N, C, k = self.features.shape
        dt = str(self.features.dtype).replace("torch.", "")
        return (f"PathFeatures(N={N}, C={C}, k={k}, seed={self.seed}, rule={self.rule!r}, of={self.of!r}, "
                f"dtype={dt}, fingerprint='{self.fingerprint[:12]}…')")

    # ------------------------------------------------------------------ products
    def _check_compatible(self, other: "PathFeatures", fn: str) -> None:
        if not isinstance(other, PathFeatures):
            raise TypeError(f"{fn}: other must be PathFeatures (from pkfast.sketch.sketch or PathFeatures.load); "
                            f"found {type(other).__name__}")
        if other.fingerprint == self.fingerprint:
            return
        diffs = []
        for key in sorted(set(self.parts) | set(other.parts)):
            a, b = self.parts.get(key), other.parts.get(key)
            if a == b:
                continue
            if key in ("model", "trajectory"):
                what = {"model": "model (architecture, trainable parameter names/shapes, fixed values)",
                        "trajectory": "trajectory (weights or step sizes)"}[key]
                diffs.append(f"{what} differs")
            else:
                diffs.append(f"{key} differs ({a!r} vs {b!r})")
        raise ValueError(
            f"{fn}: these features come from different sketches, so their product estimates no kernel: "
            f"{'; '.join(diffs) or 'fingerprints differ'}. Sketch both sample sets with the same model, "
            "trajectory, rule, k, seed, of, loss, dtype and device kind")

    def gram(self, other: "PathFeatures | None" = None, *, outputs: str = "trace",
             diagonal: bool = False) -> torch.Tensor:
        """The sketched Gram Φ Φ′ᵀ (an unbiased estimate of :func:`pkfast.gram` with the same options).

        Args:
            other: features of a second sample set from the same sketch (same fingerprint) for a cross-Gram
                ``[N, M]``; ``None``: the Gram of these samples with themselves.
            outputs: ``"trace"`` → ``[N, M]`` (Σ_c Φ_c(x)·Φ_c(x′)); ``"mean"`` → the trace / C;
                ``"full"`` → ``[N, M, C, C]``. For ``of="loss"`` (one output) all three give ``[N, M]``, as
                in :func:`pkfast.gram`.
            diagonal: only K̂(x_a, x_a): ``[N]`` or ``[N, C, C]`` (requires ``other=None``).
        """
        fn = "pkfast.PathFeatures.gram"
        outputs = _checks.check_choice(fn, "outputs", outputs, OUTPUTS)
        if not isinstance(diagonal, bool):
            raise TypeError(f"{fn}: diagonal must be True or False; found {diagonal!r}")
        if other is not None:
            self._check_compatible(other, fn)
            if diagonal:
                raise ValueError(f"{fn}: diagonal=True computes K(x_a, x_a) of these features alone; expected "
                                 "other=None, found other")
        if self.of == "loss" and outputs == "full":
            outputs = "trace"  # one output: the three modes coincide (as pkfast.gram does)
        A = _widen(self.features)
        N, C, k = A.shape
        if diagonal:
            if outputs == "full":
                return torch.bmm(A, A.transpose(1, 2))
            d = A.reshape(N, C * k).square().sum(1)
            return d / C if outputs == "mean" else d
        B = A if other is None else _widen(other.features)
        M = B.shape[0]
        if outputs == "full":
            G = A.reshape(N * C, k) @ B.reshape(M * C, k).T
            return G.view(N, C, M, C).permute(0, 2, 1, 3).contiguous()
        G = A.reshape(N, C * k) @ B.reshape(M, C * k).T
        return G / C if outputs == "mean" else G

    # ------------------------------------------------------------------ files
    def save(self, path: str | os.PathLike) -> Path:
        """Write the features and their metadata to one ``.npz`` file at ``path`` (exactly that name; written
        to a temporary file and renamed). :meth:`load` reads it back bitwise."""
        path = Path(path)
        meta = {"format": FORMAT, "version": VERSION, "k": self.k, "seed": self.seed, "rule": self.rule,
                "of": self.of, "parts": self.parts, "fingerprint": self.fingerprint,
                "shape": list(self.features.shape), "dtype": str(self.features.dtype).replace("torch.", "")}
        with formats.atomic_file(path) as f:
            np.savez(f, features=self.features.detach().cpu().numpy(), meta=np.array(json.dumps(meta)))
        return path

    @classmethod
    def open(cls, path: str | os.PathLike, *, verify: bool = False) -> "PathFeatures":
        """Features stored by ``pkfast.sketch(..., out=path)``, memory-mapped read-only (in their storage dtype).

        Checks the manifest's checksum, the file's size and header, and that every chunk is finished (an
        unfinished store says how many are missing: run the same ``sketch`` call again to finish it); with
        ``verify``, also re-reads every chunk against its CRC."""
        fn = "pkfast.PathFeatures.open"
        path = Path(path)
        m, done = open_chunks(path, kind=STORE_KIND, fn=fn)
        o = m["options"]
        n = len(m["plan"]["tiles"])
        if len(done) < n:
            raise StoreError(f"{fn}: {path} is unfinished: {len(done)} of {n} chunks are written; run the same "
                             "pkfast.sketch(..., out=…) call again to finish it")
        if verify:
            bad = StoredGram(path, m, done).verify()
            if bad:
                raise StoreError(f"{fn}: {path}: {len(bad)} chunk(s) no longer match their checksum (chunks "
                                 f"{bad[:8]}); the file was modified or damaged — run the same sketch call again "
                                 "to recompute them")
        arr = np.load(path, mmap_mode="r")
        with warnings.catch_warnings():  # read-only on purpose: torch warns that it cannot write to it
            warnings.simplefilter("ignore", UserWarning)
            t = torch.from_numpy(arr)
        if o["storage"] == "bfloat16":
            t = t.view(torch.bfloat16)
        out = cls(t, k=o["k"], seed=o["seed"], rule=o["rule"], of=o["of"], parts=o["parts"])
        out._file = (path, int(m["data_offset"]))
        if out.fingerprint != o["fingerprint"]:
            raise StoreError(f"{fn}: {path}: the manifest's fingerprint does not match its sketch record (edited?)")
        return out

    @classmethod
    def load(cls, path: str | os.PathLike) -> "PathFeatures":
        """Features saved by :meth:`save`."""
        fn = "pkfast.PathFeatures.load"
        try:
            with np.load(path, allow_pickle=False) as z:
                if "features" not in z.files or "meta" not in z.files:
                    raise ValueError(f"{fn}: {path} holds {sorted(z.files)}; expected 'features' and 'meta' "
                                     "(a file written by PathFeatures.save)")
                arr = z["features"]
                meta = json.loads(str(z["meta"][()]))
        except (OSError, EOFError) as e:
            raise ValueError(f"{fn}: cannot read {path} as a .npz file: {e}") from e
        formats.check_format(meta, name=FORMAT, readable=(VERSION,), current=VERSION, where=str(path), fn=fn)
        if list(arr.shape) != meta["shape"] or str(arr.dtype) != meta["dtype"]:
            raise ValueError(f"{fn}: {path}: the array is {arr.dtype} {tuple(arr.shape)} but its metadata says "
                             f"{meta['dtype']} {tuple(meta['shape'])}")
        out = cls(torch.from_numpy(arr), k=meta["k"], seed=meta["seed"], rule=meta["rule"], of=meta["of"],
                  parts=meta["parts"])
        if out.fingerprint != meta["fingerprint"]:
            raise ValueError(f"{fn}: {path}: the metadata's fingerprint does not match its contents (edited?)")
        return out




def _widen(t: torch.Tensor) -> torch.Tensor:
    """Half-precision stored features as float32 for products (other dtypes as they are)."""
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t
