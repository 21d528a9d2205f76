"""pkfast.attribution: top-k proponents/opponents, scores and self-influence, streamed over the training set,
against brute force (the whole score matrix from pkfast.gram or PathFeatures.gram), exact and sketched alike."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

import pkfast
from pkfast.attribution import Exact, scores, self_influence, top_k
from tests.models import mlp, random_trajectory

F64 = torch.float64


def _problem(n=30, m=4):
    torch.manual_seed(0)
    net = mlp(3, 8, 3).double()
    traj = random_trajectory(net, steps=2, scale=0.3)
    g = torch.Generator().manual_seed(1)
    X, y = torch.randn(n, 3, generator=g, dtype=F64), torch.randint(0, 3, (n,), generator=g)
    X[7], y[7] = X[3], y[3]  # a duplicate: equal scores, the lower index must come first
    Xq, yq = torch.randn(m, 3, generator=g, dtype=F64), torch.randint(0, 3, (m,), generator=g)
    return net, traj, X, y, Xq, yq


def _brute_top(S, k):
    """Top-k by a stable descending sort of the full matrix (ties: lower index first)."""
    v, i = torch.sort(S, dim=1, descending=True, stable=True)
    w, j = torch.sort(-S, dim=1, descending=True, stable=True)
    return i[:, :k], v[:, :k], j[:, :k], -w[:, :k]


@pytest.mark.parametrize("block", [None, 7, 1])
def test_exact_top_k_scores_and_self_influence_equal_brute_force(tmp_path, block):
    net, traj, X, y, Xq, yq = _problem()
    kw = dict(loss="cross_entropy", dtype=F64)
    train, query = Exact(net, traj, X, y, **kw), Exact(net, traj, Xq, yq, **kw)
    S = pkfast.gram(net, traj, Xq, X, of="loss", y=yq, y2=y, progress=False, **kw)
    got = top_k(query, train, k=5, block=block, progress=False)
    pi, pv, oi, ov = _brute_top(S, 5)
    assert torch.equal(got.proponents, pi) and torch.equal(got.opponents, oi)
    torch.testing.assert_close(got.proponent_scores, pv, rtol=1e-12, atol=0)
    torch.testing.assert_close(got.opponent_scores, ov, rtol=1e-12, atol=0)
    assert bool((got.opponent_scores < 0).all()) and bool((got.proponent_scores > 0).all())
    torch.testing.assert_close(scores(query, train, block=block, progress=False), S, rtol=1e-12, atol=0)
    out = tmp_path / "s.npy"
    on_disk = scores(query, train, out=out, block=block, progress=False)
    assert isinstance(on_disk, np.memmap) and np.allclose(np.load(out), S.numpy(), rtol=1e-12, atol=0)
    d = pkfast.gram(net, traj, X, of="loss", y=y, diagonal=True, progress=False, **kw)
    torch.testing.assert_close(self_influence(train, block=block, progress=False), d, rtol=1e-12, atol=0)


def test_ties_keep_the_lower_index_first():
    net, traj, X, y, Xq, yq = _problem()
    train = Exact(net, traj, X, y, loss="cross_entropy", dtype=F64)
    got = top_k(Exact(net, traj, X[3:4], y[3:4], loss="cross_entropy", dtype=F64), train, k=30, block=4,
                progress=False)
    order = got.proponents[0].tolist()
    assert order.index(3) < order.index(7) and order.index(7) == order.index(3) + 1  # equal scores, adjacent


@pytest.mark.parametrize("storage", [None, torch.bfloat16])
def test_sketched_top_k_and_self_influence_equal_brute_force_on_the_features(tmp_path, storage):
    net, traj, X, y, Xq, yq = _problem()
    kw = dict(k=256, seed=2, of="loss", loss="cross_entropy", progress=False)
    dt = torch.float32
    store = dict(out=tmp_path / "t.npy", storage_dtype=storage, memory_budget="64KB") if storage else {}
    train = pkfast.sketch(net.float(), traj, X.float(), y=y, **kw, **store)
    query = pkfast.sketch(net, traj, Xq.float(), y=yq, **kw)
    assert query.features.dtype == dt
    S = query.gram(train)
    got = top_k(query, train, k=4, block=6, progress=False)
    pi, pv, oi, ov = _brute_top(S, 4)
    torch.testing.assert_close(got.proponent_scores, pv, rtol=1e-5, atol=1e-6 * float(S.abs().max()))
    torch.testing.assert_close(got.opponent_scores, ov, rtol=1e-5, atol=1e-6 * float(S.abs().max()))
    assert (got.proponents == pi).float().mean() >= 0.9  # indices may swap only between near-equal scores
    torch.testing.assert_close(self_influence(train, block=5, progress=False), train.gram(diagonal=True),
                               rtol=1e-5, atol=0)


def test_sketched_scores_rank_like_the_exact_ones():
    """The same API on both: at k = 4096 the sketched scores of each query order the training points as the
    exact ones do (Spearman ≥ 0.9)."""
    net, traj, X, y, Xq, yq = _problem(n=60)
    kw = dict(loss="cross_entropy")
    exact = scores(Exact(net, traj, Xq, yq, **kw, dtype=F64), Exact(net, traj, X, y, **kw, dtype=F64),
                   progress=False)
    sk = dict(k=4096, seed=0, of="loss", dtype=F64, progress=False, **kw)
    approx = scores(pkfast.sketch(net, traj, Xq, y=yq, **sk), pkfast.sketch(net, traj, X, y=y, **sk), progress=False)

    def ranks(a):
        return a.argsort(1).argsort(1).double()

    ra, rb = ranks(exact), ranks(approx)
    rho = ((ra - ra.mean(1, keepdim=True)) * (rb - rb.mean(1, keepdim=True))).sum(1) / (
        ra.std(1) * rb.std(1) * (ra.shape[1] - 1))
    assert float(rho.min()) >= 0.9, rho


def test_mismatched_sides_and_arguments_are_refused():
    net, traj, X, y, Xq, yq = _problem()
    train = Exact(net, traj, X, y, loss="cross_entropy")
    feats = pkfast.sketch(net, traj, X, y=y, k=64, of="loss", loss="cross_entropy", progress=False)
    other = pkfast.sketch(net, traj, Xq, y=yq, k=64, seed=9, of="loss", loss="cross_entropy", progress=False)
    with pytest.raises(TypeError, match=r"query and train must both be exact or both sketched"):
        top_k(feats, train)
    with pytest.raises(ValueError, match=r"different sketches.*seed differs"):
        top_k(other, feats)
    with pytest.raises(ValueError, match=r"share one model, trajectory, loss and options"):
        top_k(Exact(net, traj, Xq, yq, loss="mse"), train)
    with pytest.raises(ValueError, match=r"k must be an integer in \[1, 30\]"):
        top_k(Exact(net, traj, Xq, yq, loss="cross_entropy"), train, k=31)
    with pytest.raises(TypeError, match=r"must be pkfast.attribution.Exact .* or pkfast.PathFeatures"):
        scores(X, train)
    with pytest.raises(TypeError, match=r"'of' is set by the attribution itself"):
        Exact(net, traj, X, y, of="output")


def test_features_have_the_attribution_defaults_and_stream_from_the_file(tmp_path, monkeypatch):
    """attribution.features: of="loss", k = ATTRIBUTION_K, a bfloat16 store with out; stored features stream
    through PathFeatures.read (from the file) to the same scores as in memory."""
    from pkfast.attribution import ATTRIBUTION_K, features

    net, traj, X, y, Xq, yq = _problem()
    mem = features(net.float(), traj, X.float(), y, loss="cross_entropy", k=256, progress=False)
    assert mem.of == "loss" and mem.k == 256 and mem.features.dtype == torch.float32
    out = tmp_path / "t.npy"
    st = features(net, traj, X.float(), y, loss="cross_entropy", k=256, out=out, memory_budget="64KB", progress=False)
    assert st.features.dtype == torch.bfloat16
    reads = []
    real = os.preadv
    monkeypatch.setattr(os, "preadv", lambda fd, bufs, offset: reads.append(offset) or real(fd, bufs, offset))
    sub = st[5:12]
    torch.testing.assert_close(sub.read(0, 7), st.features[5:12].float(), rtol=0, atol=0)
    assert len(reads) == 1  # read from the file (PathFeatures.read), at the slice's rows, not through the map
    monkeypatch.undo()
    q = features(net, traj, Xq.float(), yq, loss="cross_entropy", k=256, progress=False)
    torch.testing.assert_close(scores(q, st, block=4, progress=False), q.gram(st), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(scores(q, st, progress=False), scores(q, mem, progress=False), rtol=2e-2, atol=2e-2 *
                               float(q.gram(mem).abs().max()))
    assert ATTRIBUTION_K == 16384 and features.__kwdefaults__["k"] == ATTRIBUTION_K


# ---------------------------------------------------------------------------------------------- stored scores
def _stored_problem(tmp_path):
    net, traj, X, y, Xq, yq = _problem()
    kw = dict(loss="cross_entropy", dtype=F64)
    return Exact(net, traj, Xq, yq, **kw), Exact(net, traj, X, y, **kw), tmp_path / "s.npy"


def test_stored_scores_rerun_returns_them_and_other_inputs_are_refused_unless_overwrite(tmp_path, monkeypatch):
    """scores(out=) as gram(out=): the same call again computes nothing; other queries, or a file pkfast did not
    write, are refused with what to do (not overwritten silently); overwrite=True recomputes."""
    query, train, out = _stored_problem(tmp_path)
    S = scores(query, train, progress=False)
    scores(query, train, out=out, block=7, progress=False)
    before = out.read_bytes()
    with monkeypatch.context() as m:
        m.setattr(Exact, "block", lambda *a, **k: pytest.fail("recomputed a finished block"))
        again = scores(query, train, out=out, block=7, progress=False)
    assert out.read_bytes() == before and np.allclose(np.asarray(again), S.numpy(), rtol=1e-12, atol=0)
    other = Exact(query.model, query.trajectory, query.X + 1, query.y, loss="cross_entropy", dtype=F64)
    other_train = Exact(query.model, query.trajectory, train.X, train.y, loss="cross_entropy", dtype=F64)
    with pytest.raises(pkfast.store.writer.StoreError, match=r"differs: the data X.*pass overwrite=True"):
        scores(other, other_train, out=out, progress=False)
    assert out.read_bytes() == before
    new = scores(other, other_train, out=out, overwrite=True, progress=False)
    ref = pkfast.gram(query.model, query.trajectory, other.X, train.X, of="loss", y=other.y, y2=train.y,
                      loss="cross_entropy", dtype=F64, progress=False)
    assert np.allclose(np.asarray(new), ref.numpy(), rtol=1e-12, atol=0)
    foreign = tmp_path / "foreign.npy"
    np.save(foreign, np.zeros(3))
    with pytest.raises(pkfast.store.writer.StoreError, match=r"not written by pkfast.attribution.scores\(out=…\) "
                                                              r".*pass overwrite=True to replace it"):
        scores(query, train, out=foreign, progress=False)
    assert np.array_equal(np.load(foreign), np.zeros(3))
    with pytest.raises(ValueError, match=r"overwrite=True applies to stored scores"):
        scores(query, train, overwrite=True, progress=False)


def test_interrupted_stored_scores_resume_computing_only_the_missing_blocks(tmp_path, monkeypatch):
    query, train, out = _stored_problem(tmp_path)
    scores(query, train, out=tmp_path / "ref.npy", block=7, progress=False)
    orig, calls, armed = Exact.block, [], [True]

    def failing(self, other, rows):
        calls.append(rows)
        if armed[0] and len(calls) == 3:
            armed[0] = False
            raise RuntimeError("interrupted")
        return orig(self, other, rows)

    monkeypatch.setattr(Exact, "block", failing)
    with pytest.raises(RuntimeError, match="interrupted"):
        scores(query, train, out=out, block=7, progress=False)
    assert not pkfast.open_gram(out).complete and len(pkfast.open_gram(out).done) == 2
    calls.clear()
    got = scores(query, train, out=out, block=3, progress=False)  # the stored blocks are kept, whatever block says
    assert len(calls) == 5 - 2  # 30 training rows in blocks of 7: 5 blocks, 2 finished before the interruption
    assert out.read_bytes() == (tmp_path / "ref.npy").read_bytes()
    assert pkfast.open_gram(out).complete and pkfast.open_gram(out).verify() == []
    assert isinstance(got, np.memmap)
    # a damaged finished block is reported (by the function writing it) and recomputed alone
    m = pkfast.open_gram(out).manifest
    with open(out, "r+b") as f:
        f.seek(m["data_offset"] + 8)  # query 0, training point 1: block 0
        f.write(b"\xff" * 8)
    calls.clear()
    with pytest.warns(RuntimeWarning, match=r"^pkfast\.attribution\.scores: 1 finished tile\(s\) .* no longer match"):
        scores(query, train, out=out, block=7, progress=False)
    assert len(calls) == 1 and out.read_bytes() == (tmp_path / "ref.npy").read_bytes()


def test_sketched_stored_scores_resume_and_refuse_other_features(tmp_path):
    from pkfast.attribution import features

    net, traj, X, y, Xq, yq = _problem()
    kw = dict(loss="cross_entropy", k=64, progress=False)
    train, query = features(net, traj, X, y, **kw), features(net, traj, Xq, yq, **kw)
    out = tmp_path / "s.npy"
    S = scores(query, train, out=out, block=8, progress=False)
    assert np.allclose(np.asarray(S), (query.features.reshape(4, -1) @ train.features.reshape(30, -1).T).numpy())
    with pytest.raises(pkfast.store.writer.StoreError, match=r"differs: the data X"):
        scores(train[:4], train, out=out, progress=False)


def test_stored_scores_in_an_unwritable_place_say_so(tmp_path):
    query, train, _ = _stored_problem(tmp_path)
    with pytest.raises(pkfast.store.writer.StoreError, match=r"cannot create files in /proc/self .*not a writable "
                                                              r"location.*choose another out path"):
        scores(query, train, out="/proc/self/s.npy", progress=False)
    with pytest.raises(FileNotFoundError, match=r"its directory .*missing does not exist"):
        scores(query, train, out=tmp_path / "missing" / "s.npy", progress=False)
