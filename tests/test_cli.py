"""The pkfast command line end to end: `pkfast gram` on a digits MLP, `pkfast info`, and one-line user errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import pkfast

ROOT = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "PYTHONPATH": str(ROOT)}

FACTORY = '''
import torch

def make_net():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(64, 16), torch.nn.Tanh(), torch.nn.Linear(16, 10))
'''


def _cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "pkfast", *map(str, args)], env=ENV, cwd=cwd, capture_output=True,
                          text=True, timeout=300)


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory):
    from sklearn.datasets import load_digits

    d = tmp_path_factory.mktemp("cli")
    (d / "nets.py").write_text(FACTORY)
    X, y = load_digits(return_X_y=True)
    X = (X[:80] / 16.0).astype(np.float32)
    y = torch.tensor(y[:80])
    np.save(d / "X.npy", X[:50])
    np.save(d / "X2.npy", X[50:])
    ns = {}
    exec(FACTORY, ns)
    net = ns["make_net"]()
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    with pkfast.TrajectoryRecorder(net, opt, d / "traj") as rec:
        for s in range(4):
            idx = torch.arange(16 * s, 16 * s + 16)
            opt.zero_grad()
            torch.nn.functional.cross_entropy(net(torch.from_numpy(X[idx.numpy()])), y[idx]).backward()
            opt.step()
            rec.step(batch_indices=idx)
    return d


def test_gram_and_info_end_to_end(digits_run):
    d = digits_run
    r = _cli("gram", "--model", "nets.py:make_net", "--trajectory", "traj", "--data", "X.npy", "--out", "K.npy",
             "--memory", "2MiB", "--no-progress", cwd=d)
    assert r.returncode == 0, r.stderr
    assert "wrote K.npy: shape (50, 50)" in r.stdout
    ns = {}
    exec(FACTORY, ns)
    expected = pkfast.gram(ns["make_net"]().eval(), pkfast.Trajectory.load(d / "traj"), np.load(d / "X.npy"),
                           memory_budget="2MiB", progress=False)  # the same budget → the same tiling
    np.testing.assert_allclose(np.load(d / "K.npy"), expected.numpy(), rtol=1e-6, atol=0)

    r = _cli("info", "K.npy", "--verify", cwd=d)
    assert r.returncode == 0, r.stderr
    assert "50×50 float32" in r.stdout and "complete" in r.stdout and "valid: every finished tile" in r.stdout
    r = _cli("info", "K.npy", "--json", cwd=d)
    info = json.loads(r.stdout)
    assert info["shape"] == [50, 50] and info["complete"] and info["options"]["outputs"] == "trace"


def test_cross_gram_with_module_factory(digits_run):
    d = digits_run
    r = _cli("gram", "--model", "nets:make_net", "--trajectory", "traj", "--data", "X.npy", "--data2", "X2.npy",
             "--out", "K2.npy", "--outputs", "mean", "--rule", "trapezoid", "--no-progress", cwd=d)
    assert r.returncode == 0, r.stderr
    assert np.load(d / "K2.npy").shape == (50, 30)


def test_info_reports_a_damaged_tile(digits_run, tmp_path):
    d = digits_run
    out = tmp_path / "K.npy"
    r = _cli("gram", "--model", "nets.py:make_net", "--trajectory", "traj", "--data", "X.npy", "--out", out,
             "--memory", "2MiB", "--no-progress", cwd=d)
    assert r.returncode == 0, r.stderr
    a = np.load(out, mmap_mode="r+")
    a[0, 0] = -1.0
    a.flush()
    del a
    r = _cli("info", out, "--verify", cwd=d)
    assert r.returncode == 1 and "INVALID: 1 finished tile(s)" in r.stdout


@pytest.mark.parametrize("args,says", [
    (["gram", "--model", "nets.py", "--trajectory", "traj", "--data", "X.npy", "--out", "o.npy"], "MODULE:FACTORY"),
    (["gram", "--model", "nets.py:nope", "--trajectory", "traj", "--data", "X.npy", "--out", "o.npy"],
     "has no attribute 'nope'"),
    (["gram", "--model", "nets.py:make_net", "--trajectory", "missing", "--data", "X.npy", "--out", "o.npy"],
     "'missing' does not exist"),
    (["gram", "--model", "nets.py:make_net", "--trajectory", "traj", "--data", "nofile.npy", "--out", "o.npy"],
     "no such file 'nofile.npy'"),
    (["gram", "--model", "nets.py:make_net", "--trajectory", "traj", "--data", "X.npy", "--out", "o.txt"],
     "ending in .npy"),
    (["info", "absent.npy"], "no stored Gram at absent.npy"),
])
def test_user_mistakes_print_one_line_and_exit_2(digits_run, args, says):
    r = _cli(*args, cwd=digits_run)
    assert r.returncode == 2, (r.stdout, r.stderr)
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("pkfast: error: ") and says in lines[0], r.stderr
    assert "Traceback" not in r.stderr


def test_mismatched_data_is_refused_in_one_line(digits_run, tmp_path):
    d = digits_run
    out = tmp_path / "K.npy"
    base = ["gram", "--model", "nets.py:make_net", "--trajectory", "traj", "--out", out, "--no-progress"]
    assert _cli(*base, "--data", "X.npy", cwd=d).returncode == 0
    r = _cli(*base, "--data", "X2.npy", cwd=d)
    assert r.returncode == 2 and "differs: the --data samples" in r.stderr and "--overwrite" in r.stderr
    assert _cli(*base, "--data", "X2.npy", "--overwrite", cwd=d).returncode == 0


def test_plan_and_methods_from_the_command_line(digits_run):
    d = digits_run
    r = _cli("plan", "--model", "nets.py:make_net", "--trajectory", "traj", "--data", "X.npy", cwd=d)
    assert r.returncode == 0, r.stderr
    assert "pkfast.plan: 50×50 trace Gram" in r.stdout and "factorized" in r.stdout and "Linear" in r.stdout
    ns = {}
    exec(FACTORY, ns)
    traj = pkfast.Trajectory.load(d / "traj")
    X = np.load(d / "X.npy")
    r = _cli("gram", "--model", "nets.py:make_net", "--trajectory", "traj", "--data", "X.npy", "--out", "J.npy",
             "--method", "jacobian", "--no-progress", cwd=d)
    assert r.returncode == 0, r.stderr
    J = pkfast.gram(ns["make_net"]().eval(), traj, X, method="jacobian", progress=False)
    np.testing.assert_allclose(np.load(d / "J.npy"), J.numpy(), rtol=1e-5, atol=1e-6 * float(J.abs().max()))
    r = _cli("plan", "--model", "nets.py:make_net", "--trajectory", "traj", "--data", "X.npy", "--method",
             "materialized", cwd=d)
    assert r.returncode == 0, r.stderr
    assert "method='materialized' → materialized: materialized 2 layers" in r.stdout and "streamed in slices" in r.stdout
    r = _cli("gram", "--model", "nets.py:make_net", "--trajectory", "traj", "--data", "X.npy", "--out", "M.npy",
             "--method", "materialized", "--no-progress", cwd=d)
    assert r.returncode == 0, r.stderr
    np.testing.assert_allclose(np.load(d / "M.npy"), J.numpy(), rtol=1e-5, atol=1e-6 * float(J.abs().max()))
    info = _cli("info", "M.npy", cwd=d).stdout
    assert "method=materialized" in info and "routes: materialized: materialized 2 layers" in info
    r = _cli("gram", "--model", "nets.py:make_net", "--trajectory", "traj", "--data", "X.npy", "--out", "S.npy",
             "--method", "sketch", "--k", "32", "--seed", "7", "--no-progress", cwd=d)
    assert r.returncode == 0, r.stderr
    S = pkfast.gram(ns["make_net"]().eval(), traj, X, method="sketch", k=32, seed=7, progress=False)
    np.testing.assert_allclose(np.load(d / "S.npy"), S.numpy(), rtol=1e-5, atol=1e-6 * float(S.abs().max()))
    r = _cli("info", "S.npy", cwd=d)
    assert "method=sketch k=32 seed=7" in r.stdout
    r = _cli("gram", "--model", "nets.py:make_net", "--trajectory", "traj", "--data", "X.npy", "--out", "T.npy",
             "--k", "32", cwd=d)
    assert r.returncode == 2 and "k, seed and projection set the random projection of --method sketch" in r.stderr


def _one_line_error(r) -> str:
    """The CLI's answer to a user mistake: exit 2 and one line ``pkfast: error: …`` (no traceback)."""
    assert r.returncode == 2, (r.returncode, r.stderr)
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("pkfast: error: ") and "Traceback" not in r.stderr, r.stderr
    return lines[0]


def test_user_mistakes_are_one_line_in_the_command_line_s_words(digits_run, tmp_path):
    d = digits_run
    base = ["gram", "--model", "nets.py:make_net", "--trajectory", "traj", "--data", "X.npy", "--no-progress"]
    if not torch.cuda.is_available():
        line = _one_line_error(_cli(*base, "--out", tmp_path / "C.npy", "--device", "cuda", cwd=d))
        assert "--device cuda: CUDA is not available on this machine" in line and "--device cpu" in line
    line = _one_line_error(_cli(*base, "--out", tmp_path / "D.npy", "--device", "gpu0", cwd=d))
    assert "--device: 'gpu0' is not a device" in line
    line = _one_line_error(_cli(*base, "--out", tmp_path / "N.npy", "--nodes", "3", cwd=d))
    assert line == "pkfast: error: --nodes 3 applies to --rule exact; found --rule left"
    line = _one_line_error(_cli(*base, "--out", tmp_path / "nodir" / "K.npy", cwd=d))
    assert "its directory" in line and "does not exist" in line and "another --out path" in line
    line = _one_line_error(_cli(*base, "--out", tmp_path / "M.npy", "--memory", "1000", cwd=d))
    assert "--memory of 1,000 bytes is too small" in line and "memory_budget" not in line
    # a .npy that pkfast did not write: info says so, and suggests no overwriting
    np.save(tmp_path / "plain.npy", np.zeros((3, 3)))
    line = _one_line_error(_cli("info", tmp_path / "plain.npy"))
    assert "was not written by pkfast.gram" in line and "overwrite" not in line
    # the same file as a gram output: the CLI says how to replace it, in its words
    line = _one_line_error(_cli(*base, "--out", tmp_path / "plain.npy", cwd=d))
    assert "pass --overwrite to replace it" in line


def test_version_and_the_exact_rule_from_the_command_line(digits_run, tmp_path):
    d = digits_run
    r = _cli("--version")
    assert r.returncode == 0 and r.stdout.strip() == f"pkfast {pkfast.__version__}"
    r = _cli("gram", "--model", "nets.py:make_net", "--trajectory", "traj", "--data", "X.npy", "--data2", "X2.npy",
             "--out", tmp_path / "E.npy", "--rule", "exact", "--nodes", "3", "--dtype", "float64", "--no-progress",
             cwd=d)
    assert r.returncode == 0, r.stderr
    ns = {}
    exec(FACTORY, ns)
    traj = pkfast.Trajectory.load(d / "traj")
    E = pkfast.gram(ns["make_net"]().eval(), traj, np.load(d / "X.npy"), np.load(d / "X2.npy"), rule="exact", nodes=3,
                    dtype=torch.float64, progress=False)
    np.testing.assert_allclose(np.load(tmp_path / "E.npy"), E.numpy(), rtol=1e-12, atol=1e-14)
    info = _cli("info", tmp_path / "E.npy").stdout
    assert "rule=exact" in info


def test_issue25_command_line_messages(digits_run, tmp_path):
    """--backend triton without CUDA, a pickled --data file and info on a damaged store: one line each, in the
    command line's words (each was a traceback, numpy's text or a flag info does not have)."""
    d = digits_run
    base = ["gram", "--model", "nets.py:make_net", "--trajectory", "traj", "--no-progress"]
    if not torch.cuda.is_available():
        env = {k: v for k, v in ENV.items() if k != "TRITON_INTERPRET"}  # (the interpreter would run it)
        r = subprocess.run([sys.executable, "-m", "pkfast", *map(str, base), "--data", "X.npy", "--out",
                            str(tmp_path / "T.npy"), "--backend", "triton"], env=env, cwd=d, capture_output=True,
                           text=True, timeout=300)
        line = _one_line_error(r)
        assert "--backend triton" in line and "cannot run here" in line and "--backend torch" in line
    np.save(tmp_path / "obj.npy", np.array([{"a": 1}, None], dtype=object), allow_pickle=True)
    line = _one_line_error(_cli(*base, "--data", tmp_path / "obj.npy", "--out", tmp_path / "O.npy", cwd=d))
    assert "holds Python objects" in line and "allow_pickle" not in line and "np.save" in line
    np.savez(tmp_path / "obj.npz", x=np.array([{"a": 1}, None], dtype=object))
    line = _one_line_error(_cli(*base, "--data", tmp_path / "obj.npz", "--out", tmp_path / "Z.npy", cwd=d))
    assert "holds Python objects" in line and "allow_pickle" not in line
    out = tmp_path / "K.npy"
    assert _cli(*base, "--data", "X.npy", "--out", out, cwd=d).returncode == 0
    (tmp_path / "K.npy.pkfast" / "manifest.json").write_text("{ damaged")
    line = _one_line_error(_cli("info", out))
    assert "corrupted" in line and "pkfast gram … --overwrite" in line and "pass --overwrite" not in line


def test_a_locked_store_names_the_function_that_writes_it(tmp_path):
    from pkfast.store.writer import ChunkStore, StoreError

    net = torch.nn.Linear(3, 2)
    traj = pkfast.Trajectory.from_checkpoints([net.state_dict(), net.state_dict()], lr=0.1)
    pkfast.sketch(net, traj, torch.randn(5, 3), k=8, out=tmp_path / "F.npy", progress=False)
    first = ChunkStore.attach(tmp_path / "F.npy", fn="pkfast.sketch")
    try:
        with pytest.raises(StoreError, match=r"^pkfast\.sketch: .*being written by another process"):
            ChunkStore.attach(tmp_path / "F.npy", fn="pkfast.sketch")
    finally:
        first.close() if hasattr(first, "close") else None
