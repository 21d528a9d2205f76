r"""attribution.scores: training-data attribution from the path kernel — query × train scores, top-k proponents and
opponents, and self-influence — streamed over the training set, exact or sketched through one API.

The score of training point z for query q is the loss kernel (TracIn's quantity along the recorded path)

.. math:: s(q, z) = \sum_s \varepsilon_s\, \nabla_w \ell(q; w_s) \cdot \nabla_w \ell(z; w_s),

positive when a step on z lowered q's loss (a *proponent*), negative when it raised it (an *opponent*).
Self-influence s(z, z) ranks training points by how much their own steps moved them (mislabelled points rank
high). Each function takes the two sides as either

- :class:`Exact`: samples with their model, trajectory and loss — blocks of :func:`pkfast.gram` with
  ``of="loss"`` (any route, exact to the float64 oracle's tolerance), or
- :class:`~pkfast.PathFeatures` from :func:`pkfast.sketch` (``of="loss"`` for the same quantity; in memory or
  memory-mapped from ``sketch(out=…)``): blocks of Φ_q Φ_zᵀ, an unbiased estimate.

The training side is visited ``block`` rows at a time, so an M × N score matrix is never held unless asked for
(:func:`scores` without ``out``); :func:`top_k` keeps M × k running candidates. For features with C > 1
outputs, scores are the trace over outputs, as ``PathFeatures.gram()``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from pkfast.engine import inputs
from pkfast.engine.driver import GramJob
from pkfast.store import formats, ranks
from pkfast.store.features import PathFeatures
from pkfast.store.reader import Chunk, read_manifest
from pkfast.store.writer import ChunkStore
from pkfast.gram import gram
from pkfast.sketch import sketch

__all__ = ["Exact", "features", "TopK", "scores", "top_k", "self_influence", "ATTRIBUTION_K"]

#: Bytes of a streamed block at most: its scores, and its training features (read as float32).
BLOCK_BYTES = 64 * 2**20
#: Feature size of :func:`features` by default. On the GPT-style LM of benchmarks/attribution_lm.py (400 training
#: sequences, 20 queries) the sketched scores rank training points like the exact loss kernel's at k = 16,384
#: (Spearman 0.96, top-10 overlap 0.9, median over queries) and not at 1,024 (0.71, 0.5); with Kronecker-factored
#: layers, k costs storage (N·k) and scoring (M·N·k), hardly the features' computation.
ATTRIBUTION_K = 16384
#: ``options["kind"]`` of stored scores (``scores(out=…)``): a query × train loss-kernel matrix in the stored-Gram
#: layout, one chunk per block of training columns.
SCORES = "attribution-scores"


class Exact:
    """Samples whose scores come from the exact loss kernel (:func:`pkfast.gram` with ``of="loss"``).

    Args:
        model, trajectory: as in :func:`pkfast.gram`.
        X, y: the samples and their targets.
        loss: the training loss (default: the one recorded with the trajectory).
        **options: further options of :func:`pkfast.gram` (``rule``, ``dtype``, ``memory_budget``, ``method``…).

    Example:
        >>> import torch, pkfast
        >>> from pkfast.attribution import Exact, top_k
        >>> net = torch.nn.Sequential(torch.nn.Linear(3, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2))
        >>> w0 = {k: v.clone() for k, v in net.state_dict().items()}
        >>> traj = pkfast.Trajectory.from_checkpoints([w0, {k: v * 0.9 for k, v in w0.items()}], lr=0.1)
        >>> train = Exact(net, traj, torch.randn(20, 3), torch.randint(0, 2, (20,)), loss="cross_entropy")
        >>> query = Exact(net, traj, torch.randn(2, 3), torch.tensor([0, 1]), loss="cross_entropy")
        >>> best = top_k(query, train, k=3, progress=False)
        >>> best.proponents.shape, best.opponents.shape
        (torch.Size([2, 3]), torch.Size([2, 3]))
    """

    def __init__(self, model: torch.nn.Module, trajectory: Any, X: Any, y: Any, *, loss: Any = None,
                 **options: Any) -> None:
        for bad in ("of", "y2", "X2", "out", "diagonal", "outputs"):
            if bad in options:
                raise TypeError(f"pkfast.attribution.Exact: {bad!r} is set by the attribution itself; drop it")
        self.model, self.trajectory, self.X, self.y, self.loss = model, trajectory, X, y, loss
        self.options = options

    def __len__(self) -> int:
        return inputs.num_samples(self.X)

    def _same(self, other: "Exact") -> bool:
        return other.model is self.model and other.trajectory is self.trajectory and \
            other.options == self.options and (other.loss is self.loss or other.loss == self.loss)

    def _kw(self) -> dict[str, Any]:
        return dict(self.options, of="loss", loss=self.loss, progress=False)

    def block(self, train: "Exact", rows: slice) -> torch.Tensor:
        """``[len(self), rows]``: the loss kernel between these samples and training rows ``rows``."""
        return gram(self.model, self.trajectory, self.X, inputs.take(train.X, rows), y=self.y, y2=train.y[rows],
                    **self._kw())

    def diagonal(self, rows: slice) -> torch.Tensor:
        return gram(self.model, self.trajectory, inputs.take(self.X, rows), y=self.y[rows], diagonal=True,
                    **self._kw())


Source = Exact | PathFeatures


def features(model: torch.nn.Module, trajectory: Any, X: Any, y: Any, *, loss: Any = None, k: int = ATTRIBUTION_K,
             seed: int = 0, out: str | os.PathLike | None = None, storage_dtype: Any = None,
             **options: Any) -> PathFeatures:
    """Sketched loss-kernel features of samples for attribution: :func:`pkfast.sketch` with ``of="loss"`` and the
    attribution defaults — ``k`` = :data:`ATTRIBUTION_K`, and with ``out`` a store in bfloat16 (half the bytes;
    its 2⁻⁸ rounding is far below the sketch's noise) unless ``storage_dtype`` says otherwise. Queries and training
    points must be sketched with the same ``k`` and ``seed``. ``options``: further :func:`pkfast.sketch` options.

    Example:
        >>> import torch, pkfast
        >>> from pkfast.attribution import features, top_k
        >>> net = torch.nn.Sequential(torch.nn.Linear(3, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2))
        >>> w0 = {k: v.clone() for k, v in net.state_dict().items()}
        >>> traj = pkfast.Trajectory.from_checkpoints([w0, {k: v * 0.9 for k, v in w0.items()}], lr=0.1)
        >>> X, y = torch.randn(20, 3), torch.randint(0, 2, (20,))
        >>> train = features(net, traj, X, y, loss="cross_entropy", progress=False)
        >>> query = features(net, traj, X[:2], y[:2], loss="cross_entropy", progress=False)
        >>> train.features.shape, top_k(query, train, k=3, progress=False).proponents.shape
        (torch.Size([20, 1, 16384]), torch.Size([2, 3]))
    """
    if out is not None and storage_dtype is None:
        storage_dtype = torch.bfloat16
    return sketch(model, trajectory, X, y=y, of="loss", loss=loss, k=k, seed=seed, out=out,
                  storage_dtype=storage_dtype, **options)


@dataclass
class TopK:
    """The k highest (proponents) and lowest (opponents) scores of each query, best first.

    ``proponents``/``opponents``: ``[M, k]`` training indices; ``proponent_scores``/``opponent_scores``: their
    scores (opponents' are the most negative first)."""

    proponents: torch.Tensor
    proponent_scores: torch.Tensor
    opponents: torch.Tensor
    opponent_scores: torch.Tensor


def _check(fn: str, query: Any, train: Any) -> None:
    for name, v in (("query", query), ("train", train)):
        if not isinstance(v, (Exact, PathFeatures)):
            raise TypeError(f"{fn}: {name} must be pkfast.attribution.Exact (exact scores) or pkfast.PathFeatures "
                            f"(sketched scores); found {type(v).__name__}")
    if type(query) is not type(train):
        raise TypeError(f"{fn}: query and train must both be exact or both sketched; found "
                        f"{type(query).__name__} and {type(train).__name__}")
    if isinstance(query, Exact) and not query._same(train):
        raise ValueError(f"{fn}: query and train must share one model, trajectory, loss and options (the same "
                         "objects): their scores are one kernel")
    if isinstance(query, PathFeatures):
        query._check_compatible(train, fn)


def _block_rows(fn: str, M: int, N: int, block: int | None, row_bytes: int = 0) -> int:
    if block is None:
        return max(1, min(N, BLOCK_BYTES // (8 * max(1, M) + row_bytes)))
    if isinstance(block, bool) or not isinstance(block, int) or block < 1:
        raise ValueError(f"{fn}: block must be a positive integer (training rows per step); found {block!r}")
    return block


def _blocks(fn: str, query: Source, train: Source, block: int | None, progress: bool):
    """(rows, scores [M, rows]) over the training set, ``block`` rows at a time."""
    N = len(train)
    b = _block_rows(fn, len(query), N, block, _row_bytes(train))
    q = _query_features(query)
    with tqdm(total=N, unit="train", unit_scale=True, desc=fn, disable=not progress, leave=False) as bar:
        for a in range(0, N, b):
            rows = slice(a, min(N, a + b))
            yield rows, _score_block(query, train, q, rows)
            bar.update(rows.stop - a)


def scores(query: Source, train: Source, *, out: str | os.PathLike | None = None, overwrite: bool = False,
           block: int | None = None, progress: bool = True) -> torch.Tensor | np.memmap:
    """The ``[M, N]`` scores s(q, z) of every query against every training point.

    Without ``out``, returned as a tensor. With ``out`` (a path ending in ``.npy``) they are written there as
    :func:`pkfast.gram`'s ``out`` writes a Gram — the chunked store of :mod:`pkfast.store.writer`, one chunk per
    block of training columns, journaled with its CRC, a manifest and a lock in ``<out>.pkfast/`` — and returned
    as a read-only memmap, never held in memory. The same call again returns the finished file (computing
    nothing) or resumes an interrupted one from its finished blocks; a file from other queries, training points,
    model, trajectory or options — or one pkfast did not write — is refused (saying what differs) unless
    ``overwrite=True`` discards it. ``pkfast.open_gram(out)`` opens the file with its metadata. ``block``:
    training rows per step (default: 16 Mi entries per block; a resumed file keeps its stored blocks).

    Example:
        >>> import torch, pkfast, tempfile, os, numpy as np
        >>> from pkfast.attribution import Exact, scores
        >>> net = torch.nn.Sequential(torch.nn.Linear(3, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2))
        >>> w0 = {k: v.clone() for k, v in net.state_dict().items()}
        >>> traj = pkfast.Trajectory.from_checkpoints([w0, {k: v * 0.9 for k, v in w0.items()}], lr=0.1)
        >>> train = Exact(net, traj, torch.randn(20, 3), torch.randint(0, 2, (20,)), loss="cross_entropy")
        >>> query = Exact(net, traj, torch.randn(2, 3), torch.tensor([0, 1]), loss="cross_entropy")
        >>> S = scores(query, train, progress=False)
        >>> out = os.path.join(tempfile.mkdtemp(), "scores.npy")
        >>> stored = scores(query, train, out=out, block=8, progress=False)  # the same call again returns it
        >>> S.shape, bool(np.allclose(stored, S.numpy(), rtol=1e-5))
        (torch.Size([2, 20]), True)
    """
    fn = "pkfast.attribution.scores"
    _check(fn, query, train)
    if not isinstance(overwrite, bool) or (overwrite and out is None):
        raise ValueError(f"{fn}: overwrite=True applies to stored scores; expected out='….npy' with it, found "
                         f"overwrite={overwrite!r}, out={out!r}")
    M, N = len(query), len(train)
    if out is None:
        res = torch.empty(M, N, dtype=torch.float64 if _is64(query) else torch.float32)
        for rows, S in _blocks(fn, query, train, block, progress):
            res[:, rows] = S
        return res
    b = _block_rows(fn, M, N, block, _row_bytes(train))
    q = _query_features(query)
    options, fps = _store_record(fn, query, train)
    manifest = ChunkStore.new_manifest(
        shape=(M, N), dtype=np.dtype(np.float64 if _is64(query) else np.float32), options=options, fingerprints=fps,
        chunks=[Chunk(i, slice(0, M), slice(a, min(N, a + b))) for i, a in enumerate(range(0, N, b))],
        blocks=(M, b, b), symmetric=False, diagonal=False, num_outputs=1, scale=1.0)
    ranks.fill(out, manifest, lambda chunk: _score_block(query, train, q, chunk.cols), overwrite=overwrite, fn=fn,
               progress=progress, axis=1)
    return np.load(out, mmap_mode="r")


def _store_record(fn: str, query: Source, train: Source) -> tuple[dict[str, Any], dict[str, str]]:
    """The manifest options and fingerprints of stored scores: what a resumed call must share with the first."""
    if isinstance(query, PathFeatures):
        options = {"kind": SCORES, "source": "sketched", "of": query.of, "k": query.k, "seed": query.seed,
                   "rule": query.rule, "sketch": query.fingerprint}
        return options, formats.fingerprints(query.parts["model"], query.parts["trajectory"], _content(query),
                                             _content(train), options=options)
    opts = {k: v for k, v in query.options.items() if k != "progress"}
    job = GramJob.create(query.model, query.trajectory, query.X, train.X, y=query.y, y2=train.y, fn=fn, of="loss",
                         loss=query.loss, **opts)
    options = dict(job.record(), kind=SCORES, source="exact")
    return options, formats.fingerprints(job.fm.fingerprint(), job.fm.trajectory.fingerprint(), job.data.X,
                                         job.data.X2, y=job.data.Y, y2=job.data.Y2, options=options)


def _content(features: PathFeatures) -> str:
    """A digest of which features these are: for features opened from a store, its record of the sketched
    samples and the rows taken (the file is not re-read); else their values."""
    if features._file is not None:
        path, offset = features._file
        return formats.digest(read_manifest(path)["fingerprints"]["X"], offset, len(features))
    return formats.digest(features.features)


def _row_bytes(train: Source) -> int:
    return 4 * train.features[0].numel() if isinstance(train, PathFeatures) else 0


def _query_features(query: Source) -> torch.Tensor | None:
    """Sketched queries' features ``[M, C·k]`` (read once), or None for exact ones."""
    if isinstance(query, PathFeatures):
        return query.read(0, len(query)).reshape(len(query), -1)
    return None


def _score_block(query: Source, train: Source, q: torch.Tensor | None, rows: slice) -> torch.Tensor:
    """``[M, rows]``: the scores of every query against training rows ``rows``."""
    if q is not None:
        return q @ train.read(rows.start, rows.stop).reshape(rows.stop - rows.start, -1).T
    return query.block(train, rows)


def top_k(query: Source, train: Source, k: int = 10, *, block: int | None = None, progress: bool = True) -> TopK:
    """The ``k`` proponents (highest scores) and opponents (lowest) of each query among the training points,
    streamed: M × (k + block) scores are held at a time.

    Args:
        query, train: both :class:`Exact` (exact loss-kernel scores) or both :class:`~pkfast.PathFeatures`
            (sketched, from :func:`features` with one ``k`` and ``seed``).
        k: proponents and opponents kept per query (at most the number of training points).
        block: training rows scored per step (default: blocks of at most 64 MiB).
        progress: a progress bar over the training points.

    Returns:
        :class:`TopK`: ``[M, k]`` training indices and their scores, best first. Ties keep the lower training
        index first.

    Example:
        >>> import torch, pkfast
        >>> from pkfast.attribution import Exact, scores, top_k
        >>> _ = torch.manual_seed(0)
        >>> net = torch.nn.Sequential(torch.nn.Linear(3, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2)).double()
        >>> w0 = {k: v.clone() for k, v in net.state_dict().items()}
        >>> traj = pkfast.Trajectory.from_checkpoints([w0, {k: v * 0.9 for k, v in w0.items()}], lr=0.1)
        >>> X, y = torch.randn(20, 3, dtype=torch.float64), torch.randint(0, 2, (20,))
        >>> train = Exact(net, traj, X, y, loss="cross_entropy", dtype=torch.float64)
        >>> query = Exact(net, traj, X[:2], y[:2], loss="cross_entropy", dtype=torch.float64)
        >>> best = top_k(query, train, k=3, progress=False)
        >>> S = scores(query, train, progress=False)          # the [2, 20] matrix it ranks
        >>> bool((best.proponents[:, 0] == S.argmax(1)).all()), bool((best.opponents[:, 0] == S.argmin(1)).all())
        (True, True)
        >>> torch.allclose(best.proponent_scores, S.sort(1, descending=True).values[:, :3])
        True
    """
    fn = "pkfast.attribution.top_k"
    _check(fn, query, train)
    N = len(train)
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= N:
        raise ValueError(f"{fn}: k must be an integer in [1, {N}] (the number of training points); found {k!r}")
    best = worst = None
    for rows, S in _blocks(fn, query, train, block, progress):
        idx = torch.arange(rows.start, rows.stop).expand(S.shape[0], -1)
        best = _merge(best, S, idx, k)
        worst = _merge(worst, -S, idx, k)
    return TopK(best[1], best[0], worst[1], -worst[0])


def _merge(run: tuple[torch.Tensor, torch.Tensor] | None, S: torch.Tensor, idx: torch.Tensor, k: int):
    """The k largest of the running candidates and a new block (values, training indices), ties to lower index."""
    if run is not None:
        S, idx = torch.cat([run[0], S], 1), torch.cat([run[1], idx], 1)
    order = torch.argsort(idx, dim=1, stable=True)  # lower index first among equal values
    S, idx = S.gather(1, order), idx.gather(1, order)
    v, j = torch.sort(S, dim=1, descending=True, stable=True)
    j = j[:, :k]
    return v[:, :k], idx.gather(1, j)


def self_influence(train: Source, *, block: int | None = None, progress: bool = True) -> torch.Tensor:
    """``[N]``: s(z, z) for every training point (the diagonal of the train × train scores), streamed.

    A training point's own steps moved its loss most when its self-influence is high: mislabelled and atypical
    points rank first (TracIn's self-influence, along the recorded path).

    Args:
        train: :class:`Exact` (the exact diagonal of the loss kernel, never the full Gram) or
            :class:`~pkfast.PathFeatures` (the squared norms of the sketched features).
        block: training rows per step (default: blocks of at most 64 MiB).
        progress: a progress bar over the training points.

    Example:
        >>> import torch, pkfast
        >>> from pkfast.attribution import Exact, scores, self_influence
        >>> _ = torch.manual_seed(0)
        >>> net = torch.nn.Sequential(torch.nn.Linear(3, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2)).double()
        >>> w0 = {k: v.clone() for k, v in net.state_dict().items()}
        >>> traj = pkfast.Trajectory.from_checkpoints([w0, {k: v * 0.9 for k, v in w0.items()}], lr=0.1)
        >>> X, y = torch.randn(20, 3, dtype=torch.float64), torch.randint(0, 2, (20,))
        >>> train = Exact(net, traj, X, y, loss="cross_entropy", dtype=torch.float64)
        >>> s = self_influence(train, progress=False)
        >>> s.shape, bool((s >= 0).all())                      # a kernel's diagonal: never negative
        (torch.Size([20]), True)
        >>> torch.allclose(s, scores(train, train, progress=False).diagonal())
        True
        >>> suspicious = s.argsort(descending=True)[:3]         # the points to inspect first
    """
    fn = "pkfast.attribution.self_influence"
    if not isinstance(train, (Exact, PathFeatures)):
        raise TypeError(f"{fn}: train must be pkfast.attribution.Exact or pkfast.PathFeatures; found "
                        f"{type(train).__name__}")
    N = len(train)
    b = _block_rows(fn, 1, N, block, _row_bytes(train))
    parts = []
    with tqdm(total=N, unit="train", unit_scale=True, desc=fn, disable=not progress, leave=False) as bar:
        for a in range(0, N, b):
            rows = slice(a, min(N, a + b))
            if isinstance(train, PathFeatures):
                parts.append(train.read(a, rows.stop).reshape(rows.stop - a, -1).square().sum(1))
            else:
                parts.append(train.diagonal(rows))
            bar.update(rows.stop - a)
    return torch.cat(parts)


def _is64(source: Source) -> bool:
    if isinstance(source, PathFeatures):
        return source.features.dtype == torch.float64
    dt = source.options.get("dtype")
    return dt in (torch.float64, "float64", "torch.float64")
