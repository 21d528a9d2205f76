"""pkfast.gram(out=…): the stored Gram, resume after SIGKILL, refusal of mismatched restarts, corruption, disk
full, the writer lock, and sharing tiles across torch.distributed ranks (gloo)."""

from __future__ import annotations

import errno
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import pkfast
from pkfast.store import ranks
from pkfast.store import writer as store

from . import store_worker as sw
from tests.models import mlp, random_trajectory

WORKER = str(Path(__file__).with_name("store_worker.py"))
ENV = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}


def _bytes(path) -> bytes:
    return Path(path).read_bytes()


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted single-process run of the worker's problem, in a child process (1 thread)."""
    out = tmp_path_factory.mktemp("ref") / "gram.npy"
    subprocess.run([sys.executable, WORKER, str(out)], check=True, env=ENV, timeout=300)
    return out


def _run(out, *args, check=True):
    return subprocess.run([sys.executable, WORKER, str(out), *args], env=ENV, timeout=300, check=check,
                          capture_output=True, text=True)


# ---------------------------------------------------------------------------------------------- basics
@pytest.mark.parametrize("case", ["trace", "mean", "full", "cross", "diagonal", "full-diagonal"])
def test_stored_equals_in_memory_bitwise(tmp_path, case):
    model = mlp().double()
    traj = random_trajectory(model, steps=2)
    X = torch.randn(13, 5, dtype=torch.float64)
    kw = dict(outputs="full" if "full" in case else ("mean" if case == "mean" else "trace"),
              X2=torch.randn(6, 5, dtype=torch.float64) if case == "cross" else None,
              diagonal="diagonal" in case, memory_budget=40_000, method="jacobian", progress=False, dtype=torch.float64)
    K = pkfast.gram(model, traj, X, **kw)
    out = tmp_path / "g.npy"
    M = pkfast.gram(model, traj, X, out=out, **kw)
    assert isinstance(M, np.memmap) and M.dtype == np.float64
    assert np.array_equal(np.asarray(M), K.numpy())
    assert np.array_equal(np.load(out), K.numpy())  # a plain .npy: numpy alone reads it
    g = pkfast.open_gram(out)
    assert g.complete and g.verify() == [] and g.num_tiles > 1
    assert g.options["outputs"] == kw["outputs"] and g.shape == tuple(K.shape)


def test_problem_has_many_tiles(reference):
    g = pkfast.open_gram(reference)
    assert g.num_tiles >= 10 and g.complete and g.verify() == []
    model, traj, X = sw.problem()
    torch.set_num_threads(1)
    try:
        K = pkfast.gram(model, traj, X, memory_budget=sw.BUDGET, method="jacobian", progress=False)
    finally:
        torch.set_num_threads(os.cpu_count() or 1)
    assert np.array_equal(g.array, K.numpy())


def test_rerun_of_a_finished_gram_computes_nothing(tmp_path, monkeypatch):
    model = mlp()
    traj = random_trajectory(model)
    X = torch.randn(9, 5)
    out = tmp_path / "g.npy"
    pkfast.gram(model, traj, X, out=out, progress=False)
    before = _bytes(out)
    from pkfast.engine.driver import GramJob

    monkeypatch.setattr(GramJob, "compute_tile", lambda *a, **k: pytest.fail("recomputed a finished tile"))
    pkfast.gram(model, traj, X, out=out, progress=False)
    assert _bytes(out) == before


# ---------------------------------------------------------------------------------------------- crash and resume
@pytest.mark.parametrize("kill_at,when", [(0, "before-journal"), (0, "after-journal"), (3, "before-journal"),
                                          (7, "after-journal"), (11, "before-journal")])
def test_resume_after_sigkill_is_bitwise_identical(tmp_path, reference, kill_at, when):
    out = tmp_path / "gram.npy"
    r = _run(out, "--kill-at", str(kill_at), "--when", when, check=False)
    assert r.returncode == -9, r.stderr  # SIGKILL
    partial = pkfast.open_gram(out)
    assert len(partial.done) == kill_at + (when == "after-journal")  # a tile without its journal line is not done
    assert not partial.complete
    _run(out)  # the same call again
    assert _bytes(out) == _bytes(reference)
    assert pkfast.open_gram(out).complete


def test_torn_journal_line_is_ignored(tmp_path, reference):
    out = tmp_path / "gram.npy"
    _run(out, "--kill-at", "2", "--when", "after-journal", check=False)
    journal = store.sidecar(out) / "tiles.0.log"
    with open(journal, "a") as f:
        f.write("tile 5 0000")  # a write cut short by the crash
    assert len(pkfast.open_gram(out).done) == 3
    _run(out)
    assert _bytes(out) == _bytes(reference)


# ---------------------------------------------------------------------------------------------- refusal, corruption
@pytest.fixture
def small(tmp_path):
    model = mlp()
    traj = random_trajectory(model)
    X = torch.randn(11, 5)
    out = tmp_path / "g.npy"
    pkfast.gram(model, traj, X, out=out, memory_budget=16_000, method="jacobian", progress=False)
    return model, traj, X, out


@pytest.mark.parametrize("change,says", [
    ("X", "the data X"), ("trajectory", "the trajectory"), ("model", "the model"),
    ("outputs", "outputs: 'trace' stored, 'mean' now"), ("rule", "rule: 'left' stored, 'trapezoid' now"),
])
def test_mismatched_restart_is_refused_and_says_what_differs(small, change, says):
    model, traj, X, out = small
    kw = dict(out=out, memory_budget=16_000, method="jacobian", progress=False)
    if change == "X":
        X = X + 1
    elif change == "trajectory":
        traj = random_trajectory(model, seed=5)
    elif change == "model":
        model = torch.nn.Sequential(*list(model.children()))
        model[1] = torch.nn.Sigmoid()
    elif change == "outputs":
        kw["outputs"] = "mean"
    elif change == "rule":
        kw["rule"] = "trapezoid"
    with pytest.raises(store.StoreError, match="differs: .*" + says.replace("(", r"\(")):
        pkfast.gram(model, traj, X, **kw)
    K = pkfast.gram(model, traj, X, overwrite=True, **kw)  # starting afresh is allowed
    assert pkfast.open_gram(out).complete and K.shape[0] == 11


def test_resume_keeps_the_stored_plan_whatever_the_budget(small):
    model, traj, X, out = small
    before = _bytes(out)
    pkfast.gram(model, traj, X, out=out, memory_budget="1GiB", method="jacobian", progress=False)
    assert _bytes(out) == before


def test_corrupted_tile_is_detected_and_recomputed(small):
    model, traj, X, out = small
    good = _bytes(out)
    g = pkfast.open_gram(out)
    t = store.tiling_of(g.manifest)[1]
    arr = np.load(out, mmap_mode="r+")
    arr[t.rows.start, t.cols.start] += 1.0
    arr.flush()
    del arr
    assert pkfast.open_gram(out).verify() == [1]
    with pytest.warns(RuntimeWarning, match=r"no longer match their checksum \(tiles 1\)"):
        pkfast.gram(model, traj, X, out=out, memory_budget=16_000, method="jacobian", progress=False)
    assert _bytes(out) == good


def test_corrupted_manifest_is_reported(small):
    model, traj, X, out = small
    m = store.sidecar(out) / "manifest.json"
    m.write_text(m.read_text().replace('"rule": "left"', '"rule": "trapezoid"'))
    with pytest.raises(store.StoreError, match="manifest .* is corrupted"):
        pkfast.open_gram(out)
    with pytest.raises(store.StoreError, match="corrupted"):
        pkfast.gram(model, traj, X, out=out, progress=False)
    m.write_text("{not json")
    with pytest.raises(store.StoreError, match="corrupted"):
        pkfast.open_gram(out)


def test_truncated_output_is_reported(small):
    model, traj, X, out = small
    with open(out, "r+b") as f:
        f.truncate(out.stat().st_size - 8)
    with pytest.raises(store.StoreError, match="truncated"):
        pkfast.open_gram(out)
    with pytest.raises(store.StoreError, match="truncated"):
        pkfast.gram(model, traj, X, out=out, progress=False)


def test_existing_file_without_manifest_is_not_overwritten_silently(tmp_path):
    out = tmp_path / "g.npy"
    np.save(out, np.zeros(3))
    model = mlp()
    with pytest.raises(store.StoreError, match="no pkfast manifest"):
        pkfast.gram(model, random_trajectory(model), torch.randn(4, 5), out=out, progress=False)


def test_out_must_be_npy_and_overwrite_needs_out(tmp_path):
    model = mlp()
    traj = random_trajectory(model)
    with pytest.raises(ValueError, match="ending in .npy"):
        pkfast.gram(model, traj, torch.randn(4, 5), out=tmp_path / "g.bin", progress=False)
    with pytest.raises(ValueError, match="overwrite=True applies to a stored Gram"):
        pkfast.gram(model, traj, torch.randn(4, 5), overwrite=True, progress=False)


# ---------------------------------------------------------------------------------------------- lock, disk full
def test_second_writer_is_refused(small):
    model, traj, X, out = small
    holder = store.GramStore.attach(out)  # another writer holds the lock
    try:
        with pytest.raises(store.StoreError, match=f"being written by another process \\(pid {os.getpid()}"):
            pkfast.gram(model, traj, X, out=out, memory_budget=16_000, method="jacobian", progress=False)
        with pytest.raises(store.StoreError, match="another process is writing it"):
            pkfast.gram(model, traj, X, out=out, overwrite=True, progress=False)
    finally:
        holder.close()
    pkfast.gram(model, traj, X, out=out, memory_budget=16_000, method="jacobian", progress=False)  # free again


def test_disk_full_mid_run_is_a_clear_error_and_resumable(tmp_path, monkeypatch):
    model = mlp()
    traj = random_trajectory(model)
    X = torch.randn(11, 5)
    ref = tmp_path / "ref.npy"
    pkfast.gram(model, traj, X, out=ref, memory_budget=16_000, method="jacobian", progress=False)
    out = tmp_path / "g.npy"
    real = os.pwrite
    calls = {"n": 0}

    def pwrite(fd, data, off):
        calls["n"] += 1
        if calls["n"] == 40:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(fd, data, off)

    monkeypatch.setattr(store.os, "pwrite", pwrite)
    with pytest.raises(store.StoreError, match="disk full while writing tile .* finished tiles are kept"):
        pkfast.gram(model, traj, X, out=out, memory_budget=16_000, method="jacobian", progress=False)
    monkeypatch.setattr(store.os, "pwrite", real)
    g = pkfast.open_gram(out)
    assert 0 < len(g.done) < g.num_tiles and g.verify() == []
    pkfast.gram(model, traj, X, out=out, memory_budget=16_000, method="jacobian", progress=False)
    assert _bytes(out) == _bytes(ref)


def test_disk_full_at_start_is_a_clear_error(tmp_path, monkeypatch):
    def full(fd, off, n):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(store.os, "posix_fallocate", full)
    model = mlp()
    out = tmp_path / "g.npy"
    with pytest.raises(store.StoreError, match="disk full: cannot allocate"):
        pkfast.gram(model, random_trajectory(model), torch.randn(4, 5), out=out, progress=False)
    assert not out.exists() and not store.sidecar(out).exists()  # nothing half-made left behind


# ---------------------------------------------------------------------------------------------- sharing tiles
def test_shares_are_disjoint_complete_and_balanced():
    from pkfast.engine.tiles import solve_tiling

    plan = solve_tiling(1000, 1000, symmetric=True, bytes_per_sample=1000, acc_bytes_per_pair=4, budget=400_000, chunk=4)
    for world in (1, 2, 3, 5):
        parts = ranks.shares(plan.tiles, world)
        flat = sorted(t.index for p in parts for t in p)
        assert flat == [t.index for t in plan.tiles]
        loads = [sum(ranks.chunk_cost(t) for t in p) for p in parts]
        assert max(loads) - min(loads) <= max(ranks.chunk_cost(t) for t in plan.tiles)
        assert ranks.shares(plan.tiles, world) == parts  # deterministic


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_ranks(out, world=2, kill_rank=None, kill_at=None, extra=()):
    port = _free_port()
    procs = []
    for rank in range(world):
        env = {**ENV, "RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank),
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
        args = [sys.executable, WORKER, str(out), "--dist", *extra]
        if rank == kill_rank:
            args += ["--kill-at", str(kill_at)]
        procs.append(subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    results = []
    for p in procs:
        try:
            _, err = p.communicate(timeout=300)
        except subprocess.TimeoutExpired:
            p.kill()
            _, err = p.communicate()
        results.append((p.returncode, err))
    return results


def test_two_gloo_ranks_equal_one_process(tmp_path, reference):
    out = tmp_path / "gram.npy"
    res = _run_ranks(out)
    assert [r for r, _ in res] == [0, 0], res
    assert _bytes(out) == _bytes(reference)
    side = store.sidecar(out)
    counts = [len((side / f"tiles.{r}.log").read_text().splitlines()) for r in range(2)]
    assert min(counts) > 0  # both ranks did work


def test_two_gloo_ranks_factorized_route(tmp_path):
    """The factorised route shares tiles across ranks too: two ranks write the bytes of one process."""
    extra = ("--method", "factorized", "--budget", "16000")
    ref = tmp_path / "one.npy"
    subprocess.run([sys.executable, WORKER, str(ref), *extra], check=True, env=ENV, timeout=300)
    g = pkfast.open_gram(ref)
    assert g.options["method"] == "factorized" and g.num_tiles > 2
    out = tmp_path / "gram.npy"
    res = _run_ranks(out, extra=extra)
    assert [r for r, _ in res] == [0, 0], res
    assert _bytes(out) == _bytes(ref)
    counts = [len((store.sidecar(out) / f"tiles.{r}.log").read_text().splitlines()) for r in range(2)]
    assert min(counts) > 0


def test_two_gloo_ranks_sketch(tmp_path):
    """method='sketch' under two ranks: each projects half of the samples, the features are all-gathered, and
    the tiles are shared; the Gram equals one process's (to float32 rounding: the projections' GEMMs see
    other chunk sizes)."""
    extra = ("--method", "sketch", "--budget", "14000")
    ref = tmp_path / "one.npy"
    subprocess.run([sys.executable, WORKER, str(ref), *extra], check=True, env=ENV, timeout=300)
    assert pkfast.open_gram(ref).num_tiles > 2
    out = tmp_path / "gram.npy"
    res = _run_ranks(out, extra=extra)
    assert [r for r, _ in res] == [0, 0], res
    a, b = np.load(out), np.load(ref)
    assert np.linalg.norm(a - b) <= 1e-5 * np.linalg.norm(b)
    counts = [len((store.sidecar(out) / f"tiles.{r}.log").read_text().splitlines()) for r in range(2)]
    assert min(counts) > 0


def test_killed_two_rank_run_resumes_to_the_same_bytes(tmp_path, reference):
    out = tmp_path / "gram.npy"
    res = _run_ranks(out, kill_rank=1, kill_at=2)
    assert res[1][0] == -9
    assert not pkfast.open_gram(out).complete
    res = _run_ranks(out)
    assert [r for r, _ in res] == [0, 0], res
    assert _bytes(out) == _bytes(reference)


# ---------------------------------------------------------------------------------------------- memory
def test_peak_rss_is_bounded_by_the_memory_budget(tmp_path):
    """A 12,000² Gram (576 MB) stored with a 128 MiB budget: the process's peak RSS grows by at most the
    budget plus 24 MiB (allocator and I/O slack), far below the Gram's size."""
    n, budget = 12_000, 128 * 2**20
    r = subprocess.run([sys.executable, str(Path(__file__).with_name("rss_worker.py")), str(tmp_path / "g.npy"),
                        str(n), str(budget)], env=ENV, timeout=300, check=True, capture_output=True, text=True)
    before, after = map(int, r.stdout.split())
    grew = after - before
    assert grew <= budget + 24 * 2**20, f"peak RSS grew by {grew / 2**20:.0f} MiB with a 128 MiB budget"
    assert grew < n * n * 4 / 3
    g = pkfast.open_gram(tmp_path / "g.npy")
    assert g.complete and g.num_tiles > 1


def test_small_write_slabs_give_the_same_bytes(tmp_path, monkeypatch):
    """Tiles are written a row slab at a time: slabs of a few rows give the same file and checksums."""
    model = mlp().double()
    traj = random_trajectory(model, steps=2)
    X = torch.randn(17, 5, dtype=torch.float64)
    for outputs in ("trace", "full"):
        kw = dict(outputs=outputs, memory_budget=40_000, method="jacobian", progress=False, dtype=torch.float64)
        K = pkfast.gram(model, traj, X, **kw)
        monkeypatch.setattr(store, "WRITE_SLAB", 3 * 8 * K[0].numel() // 2)  # 1–2 rows per slab
        M = pkfast.gram(model, traj, X, out=tmp_path / f"{outputs}.npy", **kw)
        assert np.array_equal(np.asarray(M), K.numpy())
        assert pkfast.open_gram(tmp_path / f"{outputs}.npy").verify() == []
        monkeypatch.undo()


def test_files_written_by_pkfast_0_1_open_and_resuming_them_is_refused_with_what_to_do(tmp_path, capsys):
    """tests/data/v0.1 was written by pkfast 0.1.0 (commit 220157a): a recorded trajectory (format 1, unchanged)
    and a stored Gram (format 1). The trajectory loads; the Gram opens read-only with its numbers; resuming it is
    refused with the version and the way out; overwrite=True recomputes the same numbers."""
    import shutil

    src = Path(__file__).parents[1] / "data" / "v0.1"
    shutil.copytree(src, tmp_path / "v0.1")
    d = tmp_path / "v0.1"
    traj = pkfast.Trajectory.load(d / "traj")
    assert traj.num_steps == 3 and traj.targets is not None and traj.meta["loss"]["kind"] == "cross_entropy"
    g = pkfast.open_gram(d / "gram.npy")
    assert g.manifest["version"] == 1 and g.complete and g.verify() == []
    net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2)).double()
    X = torch.from_numpy(np.load(d / "X.npy"))
    K = pkfast.gram(net, traj, X, dtype=torch.float64, progress=False)
    np.testing.assert_allclose(np.asarray(g.array), K.numpy(), rtol=1e-12, atol=1e-14)
    from pkfast.cli import main

    assert main(["info", str(d / "gram.npy")]) == 0
    assert "routes: factorized (recorded by pkfast 0.1)" in capsys.readouterr().out
    with pytest.raises(store.StoreError, match=r"written by an earlier pkfast \(Gram format version 1\).*"
                                               r"Pass overwrite=True to recompute it"):
        pkfast.gram(net, traj, X, dtype=torch.float64, memory_budget=3000, progress=False, out=d / "gram.npy")
    S = pkfast.gram(net, traj, X, dtype=torch.float64, progress=False, out=d / "gram.npy", overwrite=True)
    np.testing.assert_allclose(np.asarray(S), K.numpy(), rtol=1e-12, atol=1e-14)
    assert pkfast.open_gram(d / "gram.npy").manifest["version"] == store.VERSION
