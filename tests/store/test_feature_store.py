"""pkfast.sketch(out=…): path features written chunk by chunk into a store — equal to the in-memory features,
half-precision storage, resume after SIGKILL to the same bytes, refusal of mixed features, damaged and unfinished
stores, and the chunks shared by torch.distributed ranks (gloo). The storage machinery is the stored Gram's
(tests/store/test_gram_store.py); these tests cover what features add."""

from __future__ import annotations

import json
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

import pkfast
from pkfast.store import writer as store

from . import store_worker as sw
from tests.store.test_gram_store import ENV, WORKER, _run_ranks
from tests.models import mlp, random_trajectory

F64 = torch.float64
BUDGET = "6KB"  # a few samples per chunk: many chunks


def _problem(n=40, dtype=F64):
    torch.manual_seed(0)
    net = mlp(3, 8, 2).to(dtype)
    traj = random_trajectory(net, steps=2, scale=0.3)
    return net, traj, torch.randn(n, 3, generator=torch.Generator().manual_seed(1), dtype=dtype)


def _manifest(out):
    return json.loads((store.sidecar(out) / "manifest.json").read_text())


def test_stored_features_equal_in_memory_and_reopen(tmp_path):
    net, traj, X = _problem()
    ref = pkfast.sketch(net, traj, X, k=64, seed=3, dtype=F64, progress=False)
    out = tmp_path / "f.npy"
    got = pkfast.sketch(net, traj, X, k=64, seed=3, dtype=F64, progress=False, out=out, memory_budget=BUDGET)
    assert len(_manifest(out)["plan"]["tiles"]) >= 4  # chunked
    torch.testing.assert_close(got.features, ref.features, rtol=1e-12, atol=1e-14)
    assert got.fingerprint == ref.fingerprint  # the same sketch: products with in-memory features are allowed
    torch.testing.assert_close(got.gram(ref), ref.gram(), rtol=1e-12, atol=1e-14)
    again = pkfast.PathFeatures.open(out, verify=True)
    assert torch.equal(again.features, got.features) and again.fingerprint == ref.fingerprint
    assert np.load(out).shape == (40, 2, 64)  # a plain .npy
    with pytest.raises(pkfast.store.writer.StoreError, match=r"holds path features .* open it with pkfast.PathFeatures.open"):
        pkfast.open_gram(out)
    gram_out = tmp_path / "g.npy"
    pkfast.gram(net, traj, X, out=gram_out, progress=False)
    with pytest.raises(pkfast.store.writer.StoreError, match=r"is a stored Gram, not path features"):
        pkfast.PathFeatures.open(gram_out)


@pytest.mark.parametrize("storage, rel", [(torch.float16, 2.0**-11), (torch.bfloat16, 2.0**-8)])
def test_half_precision_storage_rounds_each_value_once(tmp_path, storage, rel):
    """Each stored value is the float32 feature rounded once (relative error ≤ the unit roundoff, values far
    from underflow), the file is half the size, and products are formed in float32."""
    net, traj, X = _problem(dtype=torch.float32)
    ref = pkfast.sketch(net, traj, X, k=64, seed=3, progress=False)
    out = tmp_path / "h.npy"
    got = pkfast.sketch(net, traj, X, k=64, seed=3, progress=False, out=out, storage_dtype=storage,
                        memory_budget=BUDGET)
    assert got.features.dtype == storage
    big = ref.features.abs() > 1e-3 * float(ref.features.abs().max())
    err = ((got.features.float() - ref.features).abs() / ref.features.abs())[big]
    assert float(err.max()) <= rel * 1.0001
    assert Path(out).stat().st_size < 0.55 * 40 * 2 * 64 * 4 + 4096
    assert got.gram().dtype == torch.float32
    torch.testing.assert_close(got.gram(), ref.gram(), rtol=20 * rel, atol=20 * rel * float(ref.gram().abs().max()))
    with pytest.raises(ValueError, match=r"storage_dtype applies to stored features"):
        pkfast.sketch(net, traj, X, k=64, storage_dtype=storage, progress=False)
    with pytest.raises(ValueError, match=r"storage_dtype must be one of"):
        pkfast.sketch(net, traj, X, k=64, out=tmp_path / "x.npy", storage_dtype=torch.int8, progress=False)


def test_float16_overflow_is_refused_with_what_to_do(tmp_path):
    net, _, X = _problem(dtype=torch.float32)
    traj = random_trajectory(net, steps=2, scale=0.3, lr=[1e12, 1e12])  # √ε = 1e6: features far beyond 65504
    with pytest.raises(ValueError, match=r"overflows float16 \(max 65504\); store in torch.bfloat16"):
        pkfast.sketch(net, traj, X, k=64, progress=False, out=tmp_path / "o.npy", storage_dtype="float16")


def test_a_different_sketch_or_data_is_refused_not_mixed(tmp_path):
    net, traj, X = _problem()
    out = tmp_path / "f.npy"
    kw = dict(k=64, seed=3, dtype=F64, progress=False, out=out, memory_budget=BUDGET)
    pkfast.sketch(net, traj, X, **kw)
    cases = [(dict(kw, seed=4), r"the options \(.*seed"), (dict(kw, projection="dense"), r"the options"),
             (dict(kw, storage_dtype=torch.float16), r"the options"), (dict(kw, k=32), r"the options")]
    for args, what in cases:  # (the budget only sets the chunking of a new store: a default one fits all)
        with pytest.raises(pkfast.store.writer.StoreError, match=r"differs: " + what):
            pkfast.sketch(net, traj, X, **dict(args, memory_budget=None))
    with pytest.raises(pkfast.store.writer.StoreError, match=r"differs: the data X"):
        pkfast.sketch(net, traj, X + 1, **kw)
    traj2 = random_trajectory(net, steps=2, scale=0.3, seed=5)
    with pytest.raises(pkfast.store.writer.StoreError, match=r"differs: the trajectory"):
        pkfast.sketch(net, traj2, X, **kw)
    again = pkfast.sketch(net, traj, X, **dict(kw, seed=4, overwrite=True))
    assert again.seed == 4
    with pytest.raises(ValueError, match=r"overwrite=True applies to stored features"):
        pkfast.sketch(net, traj, X, k=64, overwrite=True, progress=False)


def test_unfinished_and_damaged_stores(tmp_path, monkeypatch):
    """An interrupted run leaves an unfinished store that open() refuses and the same call finishes, computing
    only the missing chunks; a chunk whose bytes were damaged is recomputed on the next call."""
    net, traj, X = _problem()
    out = tmp_path / "f.npy"
    kw = dict(k=64, seed=3, dtype=F64, progress=False, out=out, memory_budget=BUDGET)
    ref = pkfast.sketch(net, traj, X, **dict(kw, out=tmp_path / "ref.npy"))
    n_chunks = len(_manifest(tmp_path / "ref.npy")["plan"]["tiles"])
    from pkfast.engine.routes.sketch import Sketcher

    orig, calls, armed = Sketcher.project, [], [True]

    def failing(self, X, Y, **a):
        calls.append(X.shape[0])
        if armed[0] and len(calls) == 3:
            armed[0] = False
            raise RuntimeError("interrupted")
        return orig(self, X, Y, **a)

    monkeypatch.setattr(Sketcher, "project", failing)
    with pytest.raises(RuntimeError, match="interrupted"):
        pkfast.sketch(net, traj, X, **kw)
    with pytest.raises(pkfast.store.writer.StoreError, match=rf"unfinished: 2 of {n_chunks} chunks are written; run the same"):
        pkfast.PathFeatures.open(out)
    calls.clear()
    got = pkfast.sketch(net, traj, X, **kw)
    assert len(calls) == n_chunks - 2  # only the missing chunks
    assert Path(out).read_bytes() == Path(tmp_path / "ref.npy").read_bytes()
    # damage one finished chunk's bytes: open(verify=True) reports it, the same call recomputes it alone
    m = _manifest(out)
    with open(out, "r+b") as f:
        f.seek(m["data_offset"] + 5 * 2 * 64 * 8)
        f.write(b"\xff" * 8)
    with pytest.raises(pkfast.store.writer.StoreError, match=r"1 chunk\(s\) no longer match their checksum"):
        pkfast.PathFeatures.open(out, verify=True)
    calls.clear()
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        got = pkfast.sketch(net, traj, X, **kw)
    assert any("no longer match their checksum" in str(x.message) for x in w) and len(calls) == 1
    assert torch.equal(got.features, ref.features)


@pytest.mark.parametrize("storage", ["float32", "bfloat16"])
def test_resume_after_sigkill_gives_the_same_bytes(tmp_path, storage):
    ref = tmp_path / "ref.npy"
    args = ("--features", storage, "--budget", "8000")
    subprocess.run([sys.executable, WORKER, str(ref), *args], check=True, env=ENV, timeout=300)
    assert len(_manifest(ref)["plan"]["tiles"]) > 3
    out = tmp_path / "f.npy"
    r = subprocess.run([sys.executable, WORKER, str(out), *args, "--kill-at", "2"], env=ENV, timeout=300)
    assert r.returncode == -9
    subprocess.run([sys.executable, WORKER, str(out), *args], check=True, env=ENV, timeout=300)
    assert Path(out).read_bytes() == Path(ref).read_bytes()
    f = pkfast.PathFeatures.open(out, verify=True)
    assert f.features.shape == (sw.N, 3, 64) and str(f.features.dtype) == f"torch.{storage}"


def test_two_gloo_ranks_share_the_chunks(tmp_path):
    """Two ranks write disjoint chunks of one store: the features equal one process's (to float32 rounding)."""
    args = ("--features", "float32", "--budget", "8000")
    ref = tmp_path / "one.npy"
    subprocess.run([sys.executable, WORKER, str(ref), *args], check=True, env=ENV, timeout=300)
    out = tmp_path / "two.npy"
    res = _run_ranks(out, extra=args)
    assert [r for r, _ in res] == [0, 0], res
    a, b = np.load(out), np.load(ref)
    assert np.linalg.norm(a - b) <= 1e-6 * np.linalg.norm(b)
    counts = [len((store.sidecar(out) / f"tiles.{r}.log").read_text().splitlines()) for r in range(2)]
    assert min(counts) > 0
