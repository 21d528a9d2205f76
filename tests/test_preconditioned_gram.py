"""The preconditioned path kernel K(x, x′) = Σ_s ε_s ∇f(x; w_s)ᵀ P_s ∇f(x′; w_s) of an adaptive optimizer's recorded
trajectory (pkfast.gram(..., preconditioner="recorded"), the default where the trajectory records P_s) against an
independent float64 reference built with torch.func.jacrev (not pkfast's routes), for Adam and RMSprop, every
rule, output mode, the loss kernel, cross-Grams, diagonals, stores and every method; the Euclidean kernel on
request; warnings and refusals where the preconditioner is missing; the sketch of the preconditioned kernel is
unbiased."""

from __future__ import annotations

import json
import math
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call, jacrev, vmap

import pkfast
from pkfast.engine.quadrature import gauss_legendre
from pkfast.sketch import sketch
from pkfast.store.reader import StoreError

F64 = torch.float64
N, D, C = 12, 4, 3
TOL = 1e-10


def _net():
    torch.manual_seed(1)
    return torch.nn.Sequential(torch.nn.Linear(D, 6), torch.nn.Tanh(), torch.nn.Linear(6, C)).double()


def _data():
    g = torch.Generator().manual_seed(0)
    return torch.randn(N, D, generator=g, dtype=F64), torch.randint(0, C, (N,), generator=g)


OPTIMIZERS = {"adam": lambda p: torch.optim.Adam(p, lr=0.05, betas=(0.8, 0.95), eps=1e-6),
              "rmsprop": lambda p: torch.optim.RMSprop(p, lr=0.01, alpha=0.9, eps=1e-6, momentum=0.5)}


def _record(path, name, steps=3):
    X, y = _data()
    net = _net()
    opt = OPTIMIZERS[name](net.parameters())
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + 0.5 * s))  # unequal step sizes
    rec = pkfast.TrajectoryRecorder(net, opt, path)
    for s in range(steps):
        b = list(range(s, N, 2))
        opt.zero_grad()
        F.cross_entropy(net(X[b]), y[b]).backward()
        opt.step()
        rec.step(batch_indices=b)
        sched.step()
    rec.close()
    return net, pkfast.Trajectory.load(path)


@pytest.fixture(scope="module", params=list(OPTIMIZERS))
def run(request, tmp_path_factory):
    net, traj = _record(tmp_path_factory.mktemp(request.param) / "t", request.param)
    assert traj.has_preconditioner
    return net, traj


# ---------------------------------------------------------------------------------------------- the reference
def _jac(net, w, X, y=None):
    """[n, C, P] (C = 1 for the loss) by vmap(jacrev(functional_call)), parameters in named_parameters order."""
    names = [n for n, _ in net.named_parameters()]
    params = {n: w[n].to(F64) for n in names}

    def f(p, x):
        return functional_call(net, p, (x[None],)).reshape(-1)

    def loss(p, x, t):
        return F.cross_entropy(functional_call(net, p, (x[None],)), t[None]).reshape(1)

    J = vmap(jacrev(f), in_dims=(None, 0))(params, X) if y is None else \
        vmap(jacrev(loss), in_dims=(None, 0, 0))(params, X, y)
    return torch.cat([J[n].reshape(X.shape[0], J[n].shape[1], -1) for n in names], -1)


def _lerp(traj, s, tau):
    a, b = traj.point(s), traj.point(s + 1)
    return {k: a[k] + tau * (b[k] - a[k]) for k in a}


def _P(net, traj, s):
    d = traj.preconditioner(s, as_dict=True)
    return torch.cat([d[n].reshape(-1).to(F64) for n, _ in net.named_parameters()])


def reference(net, traj, X, X2=None, *, rule="left", y=None, y2=None, nodes=2):
    """K[a, b, c, d] = Σ_s ε_s Σ_p J_s[a, c, p] P_s[p] J′_s[b, d, p] under ``rule`` (every point of step s with P_s)."""
    X2 = X if X2 is None else X2
    y2 = y if y2 is None else y2
    eps = [float(e) for e in traj.step_sizes]
    K = 0.0
    for s, e in enumerate(eps):
        P = _P(net, traj, s)
        if rule == "left":
            pairs = [(e, traj.point(s), traj.point(s))]
        elif rule == "trapezoid":
            pairs = [(e / 2, traj.point(s), traj.point(s)), (e / 2, traj.point(s + 1), traj.point(s + 1))]
        else:  # exact: the row side averaged over the segment by Gauss–Legendre, the column side at w_s
            pairs = [(e * om, _lerp(traj, s, tau), traj.point(s)) for tau, om in gauss_legendre(nodes)]
        for wt, wa, wb in pairs:
            Ja, Jb = _jac(net, wa, X, y), _jac(net, wb, X2, y2)
            K = K + wt * torch.einsum("acp,p,bdp->abcd", Ja, P, Jb)
    return K


def _rel(a, b):
    return float((a - b).abs().max() / b.abs().max())


# ---------------------------------------------------------------------------------------------- exactness
@pytest.mark.parametrize("rule", ["left", "trapezoid", "exact"])
@pytest.mark.parametrize("method", ["auto", "jacobian", "materialized", "factorized"])
def test_full_gram_equals_the_reference(run, rule, method):
    net, traj = run
    X, _ = _data()
    K = pkfast.gram(net, traj, X, outputs="full", rule=rule, method=method, dtype=F64, progress=False)
    assert _rel(K, reference(net, traj, X, rule=rule)) <= TOL


@pytest.mark.parametrize("rule", ["left", "trapezoid"])
def test_trace_cross_gram_diagonal_and_loss_kernel(run, rule):
    net, traj = run
    X, y = _data()
    X2, y2 = X[:5] * 0.7, y[:5]
    R = reference(net, traj, X, rule=rule)
    tr = torch.diagonal(R, dim1=-2, dim2=-1).sum(-1)
    kw = dict(rule=rule, dtype=F64, progress=False, preconditioner="recorded")
    assert _rel(pkfast.gram(net, traj, X, **kw), tr) <= TOL
    assert _rel(pkfast.gram(net, traj, X, diagonal=True, **kw), tr.diagonal()) <= TOL
    Rx = torch.diagonal(reference(net, traj, X, X2, rule=rule), dim1=-2, dim2=-1).sum(-1)
    assert _rel(pkfast.gram(net, traj, X, X2, **kw), Rx) <= TOL
    loss = torch.nn.CrossEntropyLoss()
    Kl = pkfast.gram(net, traj, X, X2, of="loss", loss=loss, y=y, y2=y2, **kw)
    assert _rel(Kl, reference(net, traj, X, X2, rule=rule, y=y, y2=y2)[..., 0, 0]) <= TOL


def test_the_default_is_the_recorded_preconditioner_and_none_is_euclidean(run):
    net, traj = run
    X, _ = _data()
    kw = dict(dtype=F64, progress=False)
    K = pkfast.gram(net, traj, X, **kw)
    assert torch.equal(K, pkfast.gram(net, traj, X, preconditioner="recorded", **kw))
    E = pkfast.gram(net, traj, X, preconditioner=None, **kw)
    assert torch.equal(E, pkfast.gram(net, traj, X, preconditioner="none", **kw))
    # the Euclidean kernel is the plain path kernel: Σ ε_s J_s J_sᵀ, not the preconditioned one
    eps = [float(e) for e in traj.step_sizes]
    ref = sum(e * torch.einsum("acp,bcp->ab", _jac(net, traj.point(s), X), _jac(net, traj.point(s), X))
              for s, e in enumerate(eps))
    assert _rel(E, ref) <= TOL and _rel(K, E) > 0.1
    # and the factorised layer routes still compute it (nothing forced onto the Jacobian route)
    assert pkfast.plan(net, traj, X, preconditioner=None).method == "factorized"


def test_the_plan_says_every_layer_is_materialised(run):
    net, traj = run
    X, _ = _data()
    for method in ("auto", "factorized", "materialized"):
        p = pkfast.plan(net, traj, X, method=method)
        assert p.method == "materialized" and {str(L.route) for L in p.layers} == {"materialized"}
        assert all(L.reason.startswith("preconditioned: materialized (a diagonal P breaks the factorisation)")
                   for L in p.layers)
        text = str(p)
        assert "preconditioner: recorded" in text and "preconditioned by the recorded P_s" in text
    p = pkfast.plan(net, traj, X, method="jacobian")
    assert p.method == "jacobian" and "preconditioned" in str(p)
    assert "preconditioner: none" in str(pkfast.plan(net, traj, X, preconditioner=None))


def _mixed_net():
    """A LayerNorm (its affine materialised into the panel), a Linear over positions, a parameter without a rule."""
    torch.manual_seed(2)

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.inp = torch.nn.Linear(2, 5)
            self.norm = torch.nn.LayerNorm(5)
            self.scale = torch.nn.Parameter(torch.tensor([1.5, -0.5]))  # no layer rule: by jacrev
            self.out = torch.nn.Linear(5, 3)

        def forward(self, x):  # x: [n, 2 positions, 2]
            h = torch.tanh(self.norm(self.inp(x)))
            return (self.out(h) * self.scale[None, :, None]).sum(1)

    return Net().double()


@pytest.mark.parametrize("method", ["auto", "jacobian", "materialized"])
@pytest.mark.parametrize("rule", ["left", "trapezoid", "exact"])
def test_layers_in_the_panel_streamed_and_by_jacrev_are_scaled_in_their_layout(tmp_path, method, rule):
    g = torch.Generator().manual_seed(5)
    X, y = torch.randn(N, 2, 2, generator=g, dtype=F64), torch.randint(0, C, (N,), generator=g)
    net = _mixed_net()
    opt = torch.optim.AdamW(net.parameters(), lr=0.05, weight_decay=0.1)
    rec = pkfast.TrajectoryRecorder(net, opt, tmp_path / "t")
    for s in range(3):
        opt.zero_grad()
        F.cross_entropy(net(X[s::2]), y[s::2]).backward()
        opt.step()
        rec.step()
    rec.close()
    traj = pkfast.Trajectory.load(tmp_path / "t")
    K = pkfast.gram(net, traj, X, outputs="full", rule=rule, method=method, dtype=F64, progress=False)
    assert _rel(K, reference(net, traj, X, rule=rule)) <= TOL
    Kd = pkfast.gram(net, traj, X[:5], diagonal=True, rule=rule, method=method, dtype=F64, progress=False)
    assert _rel(Kd, torch.diagonal(torch.diagonal(reference(net, traj, X[:5], rule=rule), dim1=-2, dim2=-1).sum(-1)))\
        <= TOL
    if method == "auto":
        routes = {L.name: str(L.route) for L in pkfast.plan(net, traj, X).layers}
        assert routes["norm"] == "materialized" and routes["out"] == "materialized" and routes[""] == "jacobian"


def test_stored_gram_records_the_choice_and_resumes(run, tmp_path, capsys):
    net, traj = run
    X, _ = _data()
    out = tmp_path / "K.npy"
    K = pkfast.gram(net, traj, X, dtype=F64, progress=False, out=out, memory_budget=40_000)
    mem = pkfast.gram(net, traj, X, dtype=F64, progress=False, memory_budget=40_000)
    assert np.array_equal(np.asarray(K), mem.numpy())
    g = pkfast.open_gram(out)
    assert g.options["preconditioner"] == "recorded"
    again = pkfast.gram(net, traj, X, dtype=F64, progress=False, out=out, memory_budget=40_000)  # resumes: all done
    assert np.array_equal(np.asarray(again), mem.numpy())
    with pytest.raises(StoreError, match="preconditioner: 'recorded' stored, 'none' now"):  # another kernel
        pkfast.gram(net, traj, X, dtype=F64, progress=False, out=out, memory_budget=40_000, preconditioner=None)
    from pkfast.cli import main
    main(["info", str(out)])
    assert "preconditioner=recorded" in capsys.readouterr().out


# ---------------------------------------------------------------------------------------------- missing state
def _without_state(traj):
    """The same run from its checkpoints (no optimizer state), the optimizer's record kept."""
    pts = [traj.point(k) for k in range(traj.num_points)]
    t = pkfast.Trajectory.from_checkpoints(pts, lr=[float(e) for e in traj.step_sizes])
    t.meta["optimizer"] = json.loads(json.dumps(traj.meta["optimizer"]))
    return t


def test_an_adaptive_run_without_its_preconditioner_warns_and_refuses_recorded(run):
    net, traj = run
    X, _ = _data()
    bare = _without_state(traj)
    assert not bare.has_preconditioner and bare.optimizer.kind.adaptive
    with pytest.warns(UserWarning, match="Euclidean path kernel.*not the .*-trained network"):
        K = pkfast.gram(net, bare, X, dtype=F64, progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        E = pkfast.gram(net, bare, X, dtype=F64, progress=False, preconditioner=None)  # chosen: no warning
    assert torch.equal(K, E)
    with pytest.raises(ValueError, match="preconditioner='recorded' needs a trajectory that records"):
        pkfast.gram(net, bare, X, preconditioner="recorded", progress=False)
    with pytest.raises(ValueError, match="unknown preconditioner"):
        pkfast.gram(net, traj, X, preconditioner="adam", progress=False)


def test_an_sgd_trajectory_is_unchanged(tmp_path):
    from tests.models import mlp, random_trajectory
    torch.manual_seed(0)
    net = mlp(3, 5, 2)
    traj = random_trajectory(net, steps=2)
    X = torch.randn(4, 3, dtype=F64)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        K = pkfast.gram(net, traj, X, dtype=F64, progress=False)
    out = tmp_path / "K.npy"
    pkfast.gram(net, traj, X, dtype=F64, progress=False, out=out)
    assert "preconditioner" not in pkfast.open_gram(out).options  # stores of earlier versions still resume
    assert torch.equal(K, pkfast.gram(net, traj, X, dtype=F64, progress=False, preconditioner=None))
    with pytest.raises(ValueError, match="records none"):
        pkfast.gram(net, traj, X, preconditioner="recorded", progress=False)


# ---------------------------------------------------------------------------------------------- the sketch
SEEDS = 100
Z = 5.0


@pytest.mark.parametrize("rule", ["left", "trapezoid"])
def test_the_sketch_of_the_preconditioned_kernel_is_unbiased(run, rule):
    net, traj = run
    X, _ = _data()
    X = X[:5]
    k = 16
    G = torch.stack([sketch(net, traj, X, k=k, seed=s, rule=rule, dtype=F64, progress=False).gram()
                     for s in range(SEEDS)])
    K = torch.diagonal(reference(net, traj, X, rule=rule), dim1=-2, dim2=-1).sum(-1)
    mean, se = G.mean(0), G.std(0) / math.sqrt(SEEDS)
    z = float(((mean - K).abs() / se).max())
    assert z <= Z, f"the mean of {SEEDS} preconditioned sketches is biased ({z:.1f} standard errors)"
    E = pkfast.gram(net, traj, X, rule=rule, dtype=F64, progress=False, preconditioner=None)
    assert float(((mean - E).abs() / se).max()) > Z  # the test has power: the Euclidean kernel is rejected
    # through gram(method="sketch") the same features, and the plan says the projection is dense and preconditioned
    Ks = pkfast.gram(net, traj, X, method="sketch", k=k, seed=3, rule=rule, dtype=F64, progress=False)
    assert _rel(Ks, G[3]) <= 1e-12
    assert "preconditioned" in str(pkfast.plan(net, traj, X, method="sketch", k=k))


def test_the_kronecker_projection_is_refused_with_a_preconditioner(run):
    net, traj = run
    X, _ = _data()
    with pytest.raises(ValueError, match="kronecker.*breaks the Kronecker factorisation"):
        sketch(net, traj, X, k=16, projection="kronecker", progress=False)
    phi = sketch(net, traj, X, k=16, projection="kronecker", progress=False, preconditioner=None)
    assert phi.features.shape == (N, C, 16)


# ---------------------------------------------------------------------------------------------- the CLI
NETS = f'''import torch


def make_net():
    torch.manual_seed(1)
    return torch.nn.Sequential(torch.nn.Linear({D}, 6), torch.nn.Tanh(), torch.nn.Linear(6, {C})).double()
'''


def test_the_cli_takes_the_preconditioner(tmp_path, monkeypatch, capsys):
    from pkfast.cli import main
    net, traj = _record(tmp_path / "traj", "adam", steps=2)
    X, y = _data()
    np.save(tmp_path / "X.npy", X.numpy())
    np.save(tmp_path / "y.npy", y.numpy())
    (tmp_path / "nets.py").write_text(NETS)
    monkeypatch.chdir(tmp_path)
    base = ["--model", "nets.py:make_net", "--trajectory", "traj", "--dtype", "float64", "--no-progress"]
    for choice, kw in (("auto", {}), ("none", dict(preconditioner=None))):
        assert main(["gram", *base, "--data", "X.npy", "--out", f"K_{choice}.npy", "--preconditioner", choice]) == 0
        K = pkfast.gram(net, traj, X, dtype=F64, progress=False, **kw)
        np.testing.assert_allclose(np.load(tmp_path / f"K_{choice}.npy"), K.numpy(), rtol=1e-12, atol=0)
        assert pkfast.open_gram(tmp_path / f"K_{choice}.npy").options["preconditioner"] == \
            ("recorded" if choice == "auto" else "none")
    capsys.readouterr()
    assert main(["plan", *base[:-1], "--data", "X.npy"]) == 0
    assert "preconditioner: recorded" in capsys.readouterr().out
    assert main(["sketch", *base, "--data", "X.npy", "--k", "8", "--out", "F.npy", "--of", "loss", "--targets",
                 "y.npy", "--loss", "cross_entropy"]) == 0
    assert pkfast.PathFeatures.open(tmp_path / "F.npy").parts["preconditioner"] == "recorded"


# ---------------------------------------------------------------------------------------------- attribution
def test_attribution_scores_are_the_preconditioned_loss_kernel(run, tmp_path):
    from pkfast.attribution import Exact, features, scores, self_influence
    net, traj = run
    X, y = _data()
    loss = torch.nn.CrossEntropyLoss()
    ref = reference(net, traj, X[:4], X, y=y[:4], y2=y)[..., 0, 0]
    train = Exact(net, traj, X, y, loss=loss, dtype=F64)
    query = Exact(net, traj, X[:4], y[:4], loss=loss, dtype=F64)
    assert _rel(scores(query, train, progress=False), ref) <= TOL
    stored = scores(query, train, out=tmp_path / "S.npy", progress=False)
    assert _rel(torch.from_numpy(np.array(stored)), ref) <= TOL
    assert pkfast.open_gram(tmp_path / "S.npy").options["preconditioner"] == "recorded"
    diag = torch.diagonal(reference(net, traj, X, y=y)[..., 0, 0])
    assert _rel(self_influence(train, progress=False), diag) <= TOL
    euclid = Exact(net, traj, X, y, loss=loss, dtype=F64, preconditioner=None)
    assert _rel(self_influence(euclid, progress=False), diag) > 0.1
    # sketched features carry the choice: preconditioned and Euclidean features never multiply
    fp = features(net, traj, X, y, loss=loss, k=64, dtype=F64, progress=False)
    fe = features(net, traj, X, y, loss=loss, k=64, dtype=F64, progress=False, preconditioner=None)
    assert fp.parts["preconditioner"] == "recorded" and "preconditioner" not in fe.parts
    with pytest.raises(ValueError, match="preconditioner differs"):
        scores(fp, fe, progress=False)



class _ConvEmbed(torch.nn.Module):
    """An Embedding and a grouped Conv1d with bias (their rules' gradient layouts), then a Linear."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(3)
        self.emb = torch.nn.Embedding(7, 4)
        self.conv = torch.nn.Conv1d(4, 4, 2, groups=2)
        self.head = torch.nn.Linear(4, C)

    def forward(self, tokens):  # [n, L] token ids
        h = torch.tanh(self.conv(self.emb(tokens).transpose(1, 2)))  # [n, 4, L-1]
        return self.head(h.mean(-1))


def test_embedding_and_grouped_convolution_layouts_under_adagrad(tmp_path):
    g = torch.Generator().manual_seed(6)
    X, y = torch.randint(0, 7, (N, 5), generator=g), torch.randint(0, C, (N,), generator=g)
    net = _ConvEmbed().double()
    opt = torch.optim.Adagrad(net.parameters(), lr=0.1)
    rec = pkfast.TrajectoryRecorder(net, opt, tmp_path / "t")
    for s in range(2):
        opt.zero_grad()
        F.cross_entropy(net(X[s::2]), y[s::2]).backward()
        opt.step()
        rec.step()
    rec.close()
    traj = pkfast.Trajectory.load(tmp_path / "t")
    routes = {L.name: str(L.route) for L in pkfast.plan(net, traj, X).layers}
    assert routes == {"emb": "materialized", "conv": "materialized", "head": "materialized"}, routes
    ref = reference(net, traj, X)
    for method in ("auto", "jacobian"):
        K = pkfast.gram(net, traj, X, outputs="full", method=method, dtype=F64, progress=False)
        assert _rel(K, ref) <= TOL, method
