"""The command line matches the library (issue 25): the loss kernel (``gram --of loss --targets``),
``--output-fn``, ``plan --method sketch --k``, ``pkfast sketch`` and ``pkfast attribution scores|top-k|
self-influence``, each against the library call it stands for, and their mistakes as one-line errors."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

import pkfast
from pkfast import attribution
from pkfast.cli import main
from tests.test_cli import ENV

F64 = torch.float64

FACTORY = '''
import torch

def make_net():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3)).double()

class Wrapped(torch.nn.Sequential):
    """make_net's layers (the same names) returning (logits, extra) or {"logits": …}: what --output-fn reduces."""
    def __init__(self, kind):
        torch.manual_seed(0)
        super().__init__(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
        self.double()
        self.kind = kind
    def forward(self, x):
        o = super().forward(x)
        return (o, o.sum()) if self.kind == "tuple" else {"logits": o, "other": o * 2}

def make_tuple():
    return Wrapped("tuple")

def make_dict():
    return Wrapped("dict")

def doubled(o):
    return 2 * o[0]

class Tokens(torch.nn.Module):
    """[n, 6] -> [n, L=4, V=3]: a sequence model's shape, for --output-fn last-token."""
    def __init__(self):
        super().__init__()
        torch.manual_seed(1)
        self.lin = torch.nn.Linear(6, 12).double()
    def forward(self, x):
        return torch.tanh(self.lin(x)).view(x.shape[0], 4, 3)

def make_tokens():
    return Tokens()
'''


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli2")
    (d / "nets.py").write_text(FACTORY)
    ns: dict = {}
    exec(FACTORY, ns)
    net = ns["make_net"]()
    g = torch.Generator().manual_seed(1)
    X, y = torch.randn(24, 6, generator=g, dtype=F64), torch.randint(0, 3, (24,), generator=g)
    Xq, yq = torch.randn(4, 6, generator=g, dtype=F64), torch.randint(0, 3, (4,), generator=g)
    for name, a in (("X", X), ("y", y), ("Xq", Xq), ("yq", yq)):
        np.save(d / f"{name}.npy", a.numpy())
    lossf = torch.nn.CrossEntropyLoss()
    opt = torch.optim.SGD(net.parameters(), lr=0.2)
    with pkfast.TrajectoryRecorder(net, opt, d / "traj", loss=lossf, targets=y) as rec:
        for s in range(3):
            idx = torch.arange(8 * s, 8 * s + 8)
            opt.zero_grad()
            lossf(net(X[idx]), y[idx]).backward()
            opt.step()
            rec.step(batch_indices=idx)
    return d, ns, pkfast.Trajectory.load(d / "traj"), X, y, Xq, yq


def _main(d, monkeypatch, capsys, *args):
    monkeypatch.chdir(d)
    rc = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return rc, out, err


def _error(rc, err):
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert rc == 2 and len(lines) == 1 and lines[0].startswith("pkfast: error: ") and "Traceback" not in err, err
    return lines[0]


BASE = ["--model", "nets.py:make_net", "--trajectory", "traj", "--dtype", "float64", "--no-progress"]


def test_gram_of_loss_equals_the_library(run, monkeypatch, capsys, tmp_path):
    d, ns, traj, X, y, Xq, yq = run
    net = ns["make_net"]().eval()
    rc, out, err = _main(d, monkeypatch, capsys, "gram", *BASE, "--data", "X.npy", "--of", "loss", "--targets",
                         "y.npy", "--out", tmp_path / "L.npy")
    assert rc == 0, err
    L = pkfast.gram(net, traj, X, of="loss", y=y, dtype=F64, progress=False)  # the recorded loss
    np.testing.assert_allclose(np.load(tmp_path / "L.npy"), L.numpy(), rtol=1e-10, atol=0)
    rc, out, err = _main(d, monkeypatch, capsys, "gram", *BASE, "--data", "Xq.npy", "--data2", "X.npy", "--of", "loss",
                         "--loss", "cross_entropy", "--targets", "yq.npy", "--targets2", "y.npy", "--out",
                         tmp_path / "C.npy")
    assert rc == 0, err
    C = pkfast.gram(net, traj, Xq, X, of="loss", loss="cross_entropy", y=yq, y2=y, dtype=F64, progress=False)
    np.testing.assert_allclose(np.load(tmp_path / "C.npy"), C.numpy(), rtol=1e-10, atol=0)
    rc, out, _ = _main(d, monkeypatch, capsys, "info", tmp_path / "C.npy")
    assert rc == 0 and "of=loss" in out


def test_loss_kernel_flag_mistakes_are_one_line(run, monkeypatch, capsys, tmp_path):
    d = run[0]
    o = ["--out", tmp_path / "E.npy"]
    line = _error(*_main(d, monkeypatch, capsys, "gram", *BASE, "--data", "X.npy", "--of", "loss", *o)[::2])
    assert "--of loss needs --targets Y.npy" in line
    line = _error(*_main(d, monkeypatch, capsys, "gram", *BASE, "--data", "X.npy", "--targets", "y.npy", *o)[::2])
    assert "--targets apply to the loss kernel; expected --of loss" in line
    line = _error(*_main(d, monkeypatch, capsys, "gram", *BASE, "--data", "Xq.npy", "--data2", "X.npy", "--of",
                         "loss", "--targets", "yq.npy", *o)[::2])
    assert "needs --targets2" in line
    line = _error(*_main(d, monkeypatch, capsys, "gram", *BASE, "--data", "X.npy", "--of", "loss", "--targets",
                         "yq.npy", *o)[::2])
    assert "holds (4,) targets; expected one per sample of --data (24)" in line


@pytest.mark.parametrize("factory,spec,fn", [
    ("make_tuple", "first", lambda o: o[0]), ("make_dict", "logits", lambda o: o["logits"]),
    ("make_tuple", "nets.py:doubled", lambda o: 2 * o[0]),
])
def test_output_fn_by_name_or_import_spec(run, monkeypatch, capsys, tmp_path, factory, spec, fn):
    d, ns, traj, X = run[:4]
    args = ["--model", f"nets.py:{factory}"] + BASE[2:]
    rc, _, err = _main(d, monkeypatch, capsys, "gram", *args, "--data", "Xq.npy", "--output-fn", spec, "--out",
                       tmp_path / "O.npy")
    assert rc == 0, err
    K = pkfast.gram(ns[factory]().eval(), traj, run[5], output_fn=fn, dtype=F64, progress=False)
    np.testing.assert_allclose(np.load(tmp_path / "O.npy"), K.numpy(), rtol=1e-10, atol=0)


def test_output_fn_last_token(run, monkeypatch, capsys, tmp_path):
    d, ns, Xq = run[0], run[1], run[5]
    net = ns["make_tokens"]()
    w0 = {k: v.clone() for k, v in net.state_dict().items()}
    pkfast.Trajectory.from_checkpoints([w0, {k: 0.9 * v for k, v in w0.items()}], lr=0.1).save(tmp_path / "tt")
    rc, _, err = _main(d, monkeypatch, capsys, "gram", "--model", "nets.py:make_tokens", "--trajectory", tmp_path / "tt",
                       "--dtype", "float64", "--no-progress", "--data", "Xq.npy", "--output-fn", "last-token",
                       "--outputs", "full", "--out", tmp_path / "LT.npy")
    assert rc == 0, err
    K = pkfast.gram(net, pkfast.Trajectory.load(tmp_path / "tt"), Xq, output_fn=lambda o: o[:, -1], outputs="full",
                    dtype=F64, progress=False)
    assert K.shape == (4, 4, 3, 3)
    np.testing.assert_allclose(np.load(tmp_path / "LT.npy"), K.numpy(), rtol=1e-10, atol=0)


def test_output_fn_mistakes(run, monkeypatch, capsys, tmp_path):
    d = run[0]
    o = ["--data", "Xq.npy", "--out", tmp_path / "B.npy"]
    line = _error(*_main(d, monkeypatch, capsys, "gram", *BASE, *o, "--output-fn", "softmax")[::2])
    assert "--output-fn must be one of logits, first, last-token or MODULE:FUNCTION" in line
    line = _error(*_main(d, monkeypatch, capsys, "gram", *BASE, *o, "--output-fn", "nets.py:nope")[::2])
    assert "--output-fn: module 'nets.py' has no attribute 'nope'" in line


def test_plan_with_the_sketch_dimension_and_the_loss_kernel(run, monkeypatch, capsys):
    d = run[0]
    # a fixed budget: the default (half the free memory) moves between two calls, and the plan prints it
    rc, out, err = _main(d, monkeypatch, capsys, "plan", *BASE[:-1], "--data", "X.npy", "--method", "sketch", "--k",
                         "64", "--seed", "3", "--memory", "1GiB")
    assert rc == 0, err
    assert "method='sketch'" in out
    ref = pkfast.plan(run[1]["make_net"]().eval(), run[2], run[3], method="sketch", k=64, seed=3, dtype=F64,
                      memory_budget="1GiB")
    assert out.strip() == str(ref).strip()
    rc, out, err = _main(d, monkeypatch, capsys, "plan", *BASE[:-1], "--data", "X.npy", "--of", "loss", "--targets",
                         "y.npy")
    assert rc == 0 and "24×24 loss kernel" in out, err


def test_sketch_writes_the_library_s_features(run, monkeypatch, capsys, tmp_path):
    d, ns, traj, X, y = run[:5]
    rc, out, err = _main(d, monkeypatch, capsys, "sketch", *BASE, "--data", "X.npy", "--k", "64", "--seed", "5",
                         "--out", tmp_path / "F.npy")
    assert rc == 0 and "features of 24 samples × 3 output(s) × k=64" in out, err
    ref = pkfast.sketch(ns["make_net"]().eval(), traj, X, k=64, seed=5, dtype=F64, progress=False)
    got = pkfast.PathFeatures.open(tmp_path / "F.npy")
    assert got.fingerprint == ref.fingerprint
    torch.testing.assert_close(got.features, ref.features, rtol=1e-12, atol=1e-14)
    rc, out, err = _main(d, monkeypatch, capsys, "sketch", *BASE, "--data", "X.npy", "--k", "64", "--seed", "6",
                         "--out", tmp_path / "F.npy")
    line = _error(rc, err)
    assert "differs" in line and "--overwrite" in line
    line = _error(*_main(d, monkeypatch, capsys, "sketch", *BASE, "--data", "X.npy", "--of", "loss", "--out",
                         tmp_path / "G.npy")[::2])
    assert "--of loss needs --targets" in line


EXACT = BASE + ["--train", "X.npy", "--train-targets", "y.npy"]
QUERY = ["--query", "Xq.npy", "--query-targets", "yq.npy"]


def _exact(run):
    d, ns, traj, X, y, Xq, yq = run
    net = ns["make_net"]().eval()
    return Exact_(net, traj, Xq, yq), Exact_(net, traj, X, y)


def Exact_(net, traj, X, y):
    return attribution.Exact(net, traj, X, y, dtype=F64)


def test_attribution_scores_top_k_and_self_influence_exact(run, monkeypatch, capsys, tmp_path):
    d = run[0]
    query, train = _exact(run)
    S = attribution.scores(query, train, progress=False)
    rc, out, err = _main(d, monkeypatch, capsys, "attribution", "scores", *EXACT, *QUERY, "--out", tmp_path / "S.npy",
                         "--block", "5")
    assert rc == 0 and "4×24 scores" in out, err
    np.testing.assert_allclose(np.load(tmp_path / "S.npy"), S.numpy(), rtol=1e-10, atol=0)
    rc, out, _ = _main(d, monkeypatch, capsys, "info", tmp_path / "S.npy")
    assert rc == 0 and "attribution scores (queries × training points): exact loss kernel" in out
    # other queries into the same file: refused in the command's words
    line = _error(*_main(d, monkeypatch, capsys, "attribution", "scores", *EXACT, "--query", "X.npy",
                         "--query-targets", "y.npy", "--out", tmp_path / "S.npy")[::2])
    assert "differs: the --query samples" in line and "--overwrite" in line
    rc, out, err = _main(d, monkeypatch, capsys, "attribution", "top-k", *EXACT, *QUERY, "--k", "3", "--json")
    assert rc == 0, err
    best, got = attribution.top_k(query, train, 3, progress=False), json.loads(out)
    assert got["proponents"] == best.proponents.tolist() and got["opponents"] == best.opponents.tolist()
    np.testing.assert_allclose(got["proponent_scores"], best.proponent_scores.numpy(), rtol=1e-10)
    rc, out, _ = _main(d, monkeypatch, capsys, "attribution", "top-k", *EXACT, *QUERY, "--k", "2")
    assert out.splitlines()[0].startswith(f"query 0: proponents {int(best.proponents[0, 0])} (")
    rc, out, err = _main(d, monkeypatch, capsys, "attribution", "self-influence", *EXACT, "--out", tmp_path / "SI.npy",
                         "--top", "3")
    assert rc == 0, err
    si = attribution.self_influence(train, progress=False)
    np.testing.assert_allclose(np.load(tmp_path / "SI.npy"), si.numpy(), rtol=1e-10, atol=0)
    assert out.splitlines()[1] == f"training point {int(si.argmax())}: {float(si.max()):.6g}"


def test_attribution_from_sketched_feature_stores(run, monkeypatch, capsys, tmp_path):
    d = run[0]
    for data, targets, name in (("X.npy", "y.npy", "T.npy"), ("Xq.npy", "yq.npy", "Q.npy")):
        rc, _, err = _main(d, monkeypatch, capsys, "sketch", *BASE, "--data", data, "--of", "loss", "--targets", targets,
                           "--k", "128", "--out", tmp_path / name)
        assert rc == 0, err
    feats = ["--train-features", tmp_path / "T.npy", "--query-features", tmp_path / "Q.npy", "--no-progress"]
    rc, out, err = _main(d, monkeypatch, capsys, "attribution", "top-k", *feats, "--k", "4", "--json")
    assert rc == 0, err
    T, Q = pkfast.PathFeatures.open(tmp_path / "T.npy"), pkfast.PathFeatures.open(tmp_path / "Q.npy")
    assert json.loads(out)["proponents"] == attribution.top_k(Q, T, 4, progress=False).proponents.tolist()
    rc, out, err = _main(d, monkeypatch, capsys, "attribution", "self-influence", "--train-features",
                         tmp_path / "T.npy", "--json", "--top", "24")
    si = attribution.self_influence(T, progress=False)
    assert rc == 0 and json.loads(out)["indices"] == torch.argsort(si, descending=True, stable=True).tolist(), err
    # mixed sources, a missing store, features of the outputs: one line each
    line = _error(*_main(d, monkeypatch, capsys, "attribution", "top-k", *feats, "--model", "nets.py:make_net")[::2])
    assert "--model belong to exact scores" in line
    line = _error(*_main(d, monkeypatch, capsys, "attribution", "scores", "--train-features", tmp_path / "T.npy",
                         "--out", tmp_path / "x.npy")[::2])
    assert "--query-features is missing" in line
    _main(d, monkeypatch, capsys, "sketch", *BASE, "--data", "X.npy", "--k", "16", "--out", tmp_path / "O.npy")
    line = _error(*_main(d, monkeypatch, capsys, "attribution", "self-influence", "--train-features",
                         tmp_path / "O.npy")[::2])
    assert "of=output" in line and "pkfast sketch --of loss" in line


def test_attribution_without_its_inputs_is_one_line_in_a_subprocess(run):
    r = subprocess.run([sys.executable, "-m", "pkfast", "attribution", "top-k", "--model", "nets.py:make_net"],
                       env=ENV, cwd=run[0], capture_output=True, text=True, timeout=300)
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert r.returncode == 2 and len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    assert "top-k needs --trajectory, --train, --train-targets, --query, --query-targets" in lines[0]


def test_threads_flag(run, monkeypatch, capsys, tmp_path):
    """--threads reaches the library (a pinned count gives the library's Gram; a bad value is one line)."""
    d, ns, traj, X, y, Xq, yq = run
    net = ns["make_net"]().eval()
    rc, out, err = _main(d, monkeypatch, capsys, "gram", *BASE, "--data", "X.npy", "--threads", "1", "--out",
                         tmp_path / "K.npy")
    assert rc == 0, err
    K = pkfast.gram(net, traj, X, dtype=F64, progress=False)
    np.testing.assert_allclose(np.load(tmp_path / "K.npy"), K.numpy(), rtol=1e-12, atol=0)
    line = _error(*_main(d, monkeypatch, capsys, "gram", *BASE, "--data", "X.npy", "--threads", "many", "--out",
                         tmp_path / "E.npy")[::2])
    assert "threads must be 'auto'" in line and "found 'many'" in line
