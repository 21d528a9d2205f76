"""The LDS retraining harness: seeded subsets, retraining a tiny model, resuming an interrupted run, processes
sharing one folder, stale claims taken over, a mismatching folder refused."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from pkfast.attribution import Retrains, lds, retrain, subsets
from pkfast.attribution.harness import retrain_seed

ROOT = Path(__file__).resolve().parents[1]

#: A job run in subprocesses: ridge regression on each subset of 40 points (plus seeded noise, so the seed
#: matters), each call logged as "pid seed"; the ``kill_at``-th call kills the process (as a crash would).
JOB = """
import os, sys, time
import numpy as np
from pkfast.attribution import retrain, subsets
folder, log, kill_at, delay = sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4])
rng = np.random.default_rng(0)
X, Xq = rng.normal(size=(40, 3)), rng.normal(size=(4, 3))
y = X @ np.array([1.0, -2.0, 0.5]) + 0.3 * rng.normal(size=40)
calls = 0
def train(mask, seed):
    global calls
    calls += 1
    with open(log, "a") as f:
        f.write(f"{os.getpid()} {seed}\\n")
    if calls == kill_at:
        os._exit(9)
    time.sleep(delay)
    w = np.linalg.solve(X[mask].T @ X[mask] + np.eye(3), X[mask].T @ y[mask])
    return Xq @ w + 1e-3 * np.random.default_rng(seed).normal(size=4)
retrain(train, subsets(40, 10), folder, progress=False, poll=0.05)
"""


def _job(tmp_path: Path, folder: Path, log: Path, kill_at: int = 0, delay: float = 0.0) -> subprocess.Popen:
    script = tmp_path / "job.py"
    script.write_text(JOB)
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.Popen([sys.executable, str(script), str(folder), str(log), str(kill_at), str(delay)],
                            env=env, stderr=subprocess.PIPE, text=True)


def _log(log: Path) -> list[tuple[int, int]]:
    return [tuple(map(int, line.split())) for line in log.read_text().splitlines()] if log.exists() else []


def _outputs(folder: Path) -> np.ndarray:
    return np.stack([np.load(folder / f"outputs_{j:05d}.npy") for j in range(10)])


def test_subsets_sizes_and_seeding():
    m = subsets(30, 12, fraction=0.4, seed=3)
    assert m.shape == (12, 30) and m.dtype == np.bool_
    assert (m.sum(1) == 12).all()
    assert (m == subsets(30, 12, fraction=0.4, seed=3)).all()
    assert not (m == subsets(30, 12, fraction=0.4, seed=4)).all()
    assert len({r.tobytes() for r in m}) == 12  # distinct subsets
    assert (subsets(31, 3).sum(1) == round(0.5 * 31)).all()


@pytest.mark.parametrize("args, err, match", [
    ((10, 3, 0.0), ValueError, "fraction must be in"), ((10, 3, 1.0), ValueError, "fraction must be in"),
    ((10, 0), ValueError, "count must be"), ((10.0, 3), TypeError, "n_train must be an integer"),
    ((10, 3, 0.01), ValueError, "at least one point"), ((10, 3, 0.5, -1), ValueError, "seed must be"),
])
def test_subsets_errors(args, err, match):
    with pytest.raises(err, match=match):
        subsets(*args)


def test_retrain_seed_is_deterministic_and_distinct():
    seeds = [retrain_seed(0, j) for j in range(100)]
    assert seeds == [retrain_seed(0, j) for j in range(100)] and len(set(seeds)) == 100
    assert retrain_seed(1, 0) != retrain_seed(0, 0)


def _linear_problem():
    rng = np.random.default_rng(0)
    X, Xq = rng.normal(size=(40, 4)), rng.normal(size=(6, 4))
    y = X @ rng.normal(size=4) + 0.5 * rng.normal(size=40)
    return X, y, Xq


def test_lds_of_exact_influence_on_a_linear_model_is_high(tmp_path):
    X, y, Xq = _linear_problem()
    lam = 1.0

    def train(mask, seed):
        return Xq @ np.linalg.solve(X[mask].T @ X[mask] + lam * np.eye(4), X[mask].T @ y[mask])

    r = retrain(train, subsets(40, 30), tmp_path / "r", progress=False)
    assert isinstance(r, Retrains) and r.masks.shape == (30, 40) and r.outputs.shape == (30, 6)
    assert r.seconds.shape == (30,) and np.isfinite(r.seconds).all() and (r.seconds >= 0).all()
    # the exact influence: d w / d(weight of point i) = H^-1 x_i r_i at every weight 1/2 (a half subset)
    H = 0.5 * X.T @ X + lam * np.eye(4)
    resid = y - X @ np.linalg.solve(H, 0.5 * X.T @ y)
    scores = Xq @ np.linalg.solve(H, (X * resid[:, None]).T)  # [6, 40]
    per_query = r.lds(scores)
    assert (per_query > 0.9).all(), per_query
    assert np.array_equal(per_query, lds(scores, r.masks, r.outputs))
    assert r.lds(np.random.default_rng(1).normal(size=(6, 40))).mean() < 0.6  # random scores do worse


def test_retrain_a_torch_mlp_with_measure(tmp_path):
    torch.manual_seed(0)
    X, y, Xq = torch.randn(40, 3), torch.randn(40, 1), torch.randn(5, 3)

    def train(mask, seed):
        torch.manual_seed(seed)
        net = torch.nn.Sequential(torch.nn.Linear(3, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
        opt = torch.optim.SGD(net.parameters(), lr=0.1)
        m = torch.from_numpy(mask)
        for _ in range(20):
            opt.zero_grad()
            torch.nn.functional.mse_loss(net(X[m]), y[m]).backward()
            opt.step()
        return net

    def measure(net):
        with torch.no_grad():
            return net(Xq)[:, 0]

    r = retrain(train, subsets(40, 4), tmp_path / "mlp", measure=measure, progress=False)
    assert r.outputs.shape == (4, 5) and r.outputs.dtype == np.float64
    again = retrain(train, subsets(40, 4), tmp_path / "mlp2", measure=measure, progress=False)
    assert np.array_equal(r.outputs, again.outputs)  # the seeds make it reproducible
    with pytest.raises(TypeError, match="pass measure="):
        retrain(train, subsets(40, 4), tmp_path / "no-measure", progress=False)


def test_resume_after_an_interrupted_run(tmp_path):
    folder, log = tmp_path / "run", tmp_path / "calls.log"
    p = _job(tmp_path, folder, log, kill_at=4)  # dies inside subset 3
    assert p.wait(timeout=120) == 9, p.stderr.read()
    seeds = {retrain_seed(0, j): j for j in range(10)}
    assert [seeds[s] for _, s in _log(log)] == [0, 1, 2, 3]
    assert all((folder / f"outputs_{j:05d}.npy").exists() for j in range(3))
    assert not (folder / "outputs_00003.npy").exists() and (folder / "claims" / "00003.claim").exists()
    first = len(_log(log))
    p = _job(tmp_path, folder, log)  # the rerun: takes over the dead claim on 3, skips 0-2
    assert p.wait(timeout=120) == 0, p.stderr.read()
    assert [seeds[s] for _, s in _log(log)[first:]] == list(range(3, 10))
    whole, wlog = tmp_path / "whole", tmp_path / "whole.log"
    p = _job(tmp_path, whole, wlog)
    assert p.wait(timeout=120) == 0, p.stderr.read()
    assert _outputs(folder).tobytes() == _outputs(whole).tobytes()  # bitwise the uninterrupted run's
    assert not list((folder / "claims").iterdir())


def test_two_processes_share_one_folder(tmp_path):
    folder, log = tmp_path / "shared", tmp_path / "shared.log"
    ps = [_job(tmp_path, folder, log, delay=0.2) for _ in range(2)]
    for p in ps:
        assert p.wait(timeout=120) == 0, p.stderr.read()
    calls = _log(log)
    seeds = {retrain_seed(0, j): j for j in range(10)}
    assert sorted(seeds[s] for _, s in calls) == list(range(10))  # every subset exactly once between them
    assert len({pid for pid, _ in calls}) == 2  # both worked
    assert np.isfinite(_outputs(folder)).all()


def _counting_train():
    X, y, Xq = _linear_problem()
    calls = []

    def train(mask, seed):
        calls.append(seed)
        return Xq @ np.linalg.lstsq(X[mask], y[mask], rcond=None)[0]

    return train, calls


def _claim(folder: Path, j: int, **claim) -> Path:
    (folder / "claims").mkdir(parents=True, exist_ok=True)
    path = folder / "claims" / f"{j:05d}.claim"
    path.write_text(json.dumps(claim))
    return path


def test_a_dead_processes_claim_is_taken_over(tmp_path):
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    _claim(tmp_path, 1, pid=gone.pid, host=socket.gethostname(), time=time.time())
    train, calls = _counting_train()
    r = retrain(train, subsets(40, 4), tmp_path, progress=False)
    assert sorted(calls) == sorted(retrain_seed(0, j) for j in range(4)) and r.outputs.shape == (4, 6)


@pytest.mark.skipif(not Path(f"/proc/{os.getpid()}/stat").exists(), reason="process start times need Linux /proc")
def test_a_claim_whose_pid_was_reused_is_taken_over(tmp_path):
    # the pid is alive (it is this process) but started at another time: the claimer died and its pid was reused
    _claim(tmp_path, 0, pid=os.getpid(), host=socket.gethostname(), time=time.time(), started="1")
    train, calls = _counting_train()
    retrain(train, subsets(40, 4), tmp_path, progress=False)
    assert len(calls) == 4


def test_an_old_claim_of_another_host_is_taken_over_after_the_timeout(tmp_path):
    _claim(tmp_path, 0, pid=1, host="elsewhere", time=time.time() - 100)
    train, calls = _counting_train()
    retrain(train, subsets(40, 4), tmp_path, progress=False, claim_timeout=10)
    assert len(calls) == 4


def test_a_live_claim_is_waited_for(tmp_path):
    claim = _claim(tmp_path, 2, pid=1, host="elsewhere", time=time.time())  # another host's, fresh
    train, calls = _counting_train()

    def other_host_finishes():
        time.sleep(0.5)
        np.save(tmp_path / "outputs_00002.npy", np.full(6, 7.0))
        claim.unlink()

    t = threading.Thread(target=other_host_finishes)
    t.start()
    r = retrain(train, subsets(40, 4), tmp_path, progress=False, claim_timeout=60, poll=0.05)
    t.join()
    assert len(calls) == 3 and retrain_seed(0, 2) not in calls
    assert (r.outputs[2] == 7.0).all() and np.isnan(r.seconds[2])


def test_a_mismatching_folder_is_refused(tmp_path):
    train, calls = _counting_train()
    retrain(train, subsets(40, 4), tmp_path, progress=False)
    with pytest.raises(ValueError, match="other subsets or another seed.*masks_sha256"):
        retrain(train, subsets(40, 4, seed=1), tmp_path, progress=False)
    with pytest.raises(ValueError, match="seed: found 0, expected 5"):
        retrain(train, subsets(40, 4), tmp_path, progress=False, seed=5)
    with pytest.raises(ValueError, match="2-dimensional bool"):
        retrain(train, subsets(40, 4).astype(int), tmp_path / "x", progress=False)
    assert len(calls) == 4  # nothing retrained by the refused calls
