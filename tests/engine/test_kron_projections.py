"""Kronecker-factored sketch projections (pkfast/engine/routes/kron.py, docs/math.md §7.2): the features are the explicit
R_inᵀ Gᵀ R_out of every layer, they are unbiased whatever mix of Kronecker, dense and Jacobian parts a model
takes, their variance is the documented formula, their error falls with r as the formula says, the per-layer
choice follows the cost model and shows in the plan, and features of different projections are never mixed.

Statistical tests use fixed seeds and tolerances of a few standard errors of the empirical spread (as in
tests/test_sketch.py)."""

import copy
import math

import pytest
import torch
from torch import nn

import pkfast
from pkfast.reference import jacobian_reference
from pkfast.engine.costs import projection_ranks as ranks
from pkfast.engine.routes.kron import side_matrix
from pkfast.sketch import sketch
from tests._util import load_point
from tests.models import mlp, random_trajectory

F64 = torch.float64
SEEDS = 300
Z = 5.0


class SeqNet(nn.Module):
    """Tokens [n, S=4] → embedding → Linear → tanh → Linear → mean over positions: [n, 2] (gradients of rank ≤ 4)."""

    def __init__(self, vocab=11, d=6, h=5, c=2):
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.fc = nn.Linear(d, h)
        self.out = nn.Linear(h, c)

    def forward(self, t):
        return self.out(torch.tanh(self.fc(self.emb(t)))).mean(1)


class Mixed(nn.Module):
    """Linear layers (Kronecker), a LayerNorm (dense from its factors), a bare parameter (Jacobian), Linear(1, 1)."""

    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(4, 12)
        self.norm = nn.LayerNorm(12)
        self.scale = nn.Parameter(torch.tensor(0.7))
        self.fc2 = nn.Linear(12, 2)
        self.tiny = nn.Linear(1, 1, bias=False)

    def forward(self, x):
        h = torch.tanh(self.norm(self.fc1(x))) * self.scale
        out = self.fc2(h)
        return out + self.tiny(out[:, :1])


def _seq_problem(n=5):
    torch.manual_seed(0)
    net = SeqNet().double()
    traj = random_trajectory(net, steps=2, scale=0.3)
    X = torch.randint(0, 11, (n, 4), generator=torch.Generator().manual_seed(1))
    return net, traj, X


def _mlp_problem(n=5):
    torch.manual_seed(0)
    net = mlp(3, 6, 2).double()
    traj = random_trajectory(net, steps=2, scale=0.3)
    return net, traj, torch.randn(n, 3, generator=torch.Generator().manual_seed(1), dtype=F64)


def _layer_gradients(net, traj, X):
    """{(step, layer): G [N, C, O, I′]} per-sample gradients in the rule's layout (bias last column; an
    embedding's G is its weight gradient transposed), from the float64 reference Jacobians, with step sizes."""
    ref = copy.deepcopy(net).double()
    names = [n for n, p in net.named_parameters() if p.requires_grad]
    sizes = [p.numel() for p in net.parameters() if p.requires_grad]
    offsets = dict(zip(names, torch.tensor([0] + sizes).cumsum(0).tolist()))
    out = {}
    for s, eps in enumerate(float(e) for e in traj.step_sizes):
        load_point(ref, traj, s)
        J = jacobian_reference(ref, X) * math.sqrt(eps)  # √w_s J_s
        for mname, mod in ref.named_modules():
            if not isinstance(mod, (nn.Linear, nn.Embedding)):
                continue
            w = J[:, :, offsets[f"{mname}.weight"]: offsets[f"{mname}.weight"] + mod.weight.numel()]
            if isinstance(mod, nn.Embedding):
                G = w.reshape(*w.shape[:2], *mod.weight.shape).transpose(2, 3)
            else:
                G = w.reshape(*w.shape[:2], *mod.weight.shape)
                if mod.bias is not None:
                    b = J[:, :, offsets[f"{mname}.bias"]: offsets[f"{mname}.bias"] + mod.bias.numel()]
                    G = torch.cat([G, b[..., None]], dim=3)
            out[(s, mname)] = G
    return out


def _kron_var(U, V, ri, ro):
    """V_kron(U, V) of docs/math.md §7.2 (U, V: [O, I′])."""
    K = (U * V).sum()
    P1 = U.T @ V
    t = torch.trace(P1 @ P1)
    a, b = P1.pow(2).sum(), (U @ V.T).pow(2).sum()
    return (t + a) / ri + (t + b) / ro + (K**2 + a + U.pow(2).sum() * V.pow(2).sum() + b) / (ri * ro)


def _theory_full(blocks, K, k):
    """[N, N, C, C] variance of every full-block entry when every block is Kronecker-projected."""
    ri, ro = ranks(k)
    d = torch.diagonal(torch.diagonal(K, dim1=0, dim2=1), dim1=0, dim2=1)  # [N, C]: K_cc(x_a, x_a)
    var = (d[:, None, :, None] * d[None, :, None, :] + K**2) / k
    N, C = d.shape
    for G in blocks.values():
        for a in range(N):
            for b in range(N):
                for c in range(C):
                    for e in range(C):
                        U, V = G[a, c], G[b, e]
                        dense = (U.pow(2).sum() * V.pow(2).sum() + (U * V).sum() ** 2) / k
                        var[a, b, c, e] += _kron_var(U, V, ri, ro) - dense
    return var


def _within(est, exact, se):
    floor = 1e-12 * float(exact.abs().max())
    return float(((est - exact).abs() / se.clamp_min(floor)).max())


# ---------------------------------------------------------------------------------------------- exact properties
def test_ranks_split_k_as_evenly_as_its_divisors_allow():
    assert ranks(4096) == (64, 64) and ranks(2048) == (32, 64) and ranks(1024) == (32, 32)
    assert ranks(1000) == (25, 40) and ranks(64) == (8, 8)
    assert ranks(97) is None and ranks(16) is None and ranks(2 * 101) is None  # smaller side below 8


@pytest.mark.parametrize("rule", ["left", "trapezoid"])
def test_features_are_the_explicit_kronecker_projection(rule):
    """Φ_c = Σ_s √(w_s/k) Σ_layers vec(R_inᵀ G_cᵀ R_out), with G from reference Jacobians and R from side_matrix:
    an embedding (gathered rows of R_in), Linear layers over 4 positions with their bias column."""
    net, traj, X = _seq_problem()
    k, seed = 64, 9
    phi = sketch(net, traj, X, k=k, seed=seed, rule=rule, dtype=F64, projection="kronecker", progress=False)
    eps = [float(e) for e in traj.step_sizes]
    T = len(eps)
    weights = dict(enumerate(eps)) if rule == "left" else \
        {p: ((eps[p - 1] if p > 0 else 0) + (eps[p] if p < T else 0)) / 2 for p in range(T + 1)}
    ref = torch.zeros(X.shape[0], 2, k, dtype=F64)
    g = torch.Generator()
    net64 = copy.deepcopy(net)
    for point, w in weights.items():
        load_point(net64, traj, point)
        J = jacobian_reference(net64, X)
        traj1 = pkfast.Trajectory.from_checkpoints([traj.point(point), traj.point(point)], lr=1.0)
        G = _layer_gradients(net64, traj1, X)
        for (_, name), Gl in G.items():
            O, I = Gl.shape[2:]
            Rin = side_matrix(seed, point, name, 0, "in", I, 8, dtype=F64, device=torch.device("cpu"), generator=g)
            Rout = side_matrix(seed, point, name, 0, "out", O, 8, dtype=F64, device=torch.device("cpu"), generator=g)
            ref += math.sqrt(w / k) * (Rin.T @ Gl.transpose(2, 3) @ Rout).reshape(*Gl.shape[:2], k)
        assert J.shape[2] == sum(Gl[0, 0].numel() for Gl in G.values())  # every parameter is in a Kronecker block
    torch.testing.assert_close(phi.features, ref, rtol=1e-12, atol=1e-13)
    assert "kronecker 8×8: emb, fc, out" in phi.parts["projection"]


# ---------------------------------------------------------------------------------------------- statistics
@pytest.mark.parametrize("of", ["output", "loss"])
def test_unbiased_for_a_mix_of_kronecker_dense_and_jacobian_parts(of):
    """Linear layers Kronecker-factored, a LayerNorm and Linear(1, 1) dense from their factors, a bare parameter
    through its Jacobian: the mean of 300 sketches is the exact Gram within 5 standard errors (and not 0.8 of it)."""
    torch.manual_seed(3)
    net = Mixed().double()
    traj = random_trajectory(net, steps=2, scale=0.2)
    X = torch.randn(4, 4, generator=torch.Generator().manual_seed(2), dtype=F64)
    kw = dict(of="loss", loss="cross_entropy", y=torch.tensor([0, 1, 1, 0])) if of == "loss" else dict(outputs="full")
    plan = pkfast.plan(net, traj, X, method="sketch", k=64, **kw)
    routes = {L.name: L.method for L in plan.layers}
    assert routes == {"fc1": "kronecker", "norm": "dense", "fc2": "kronecker", "tiny": "dense", "": "jacobian"}, routes
    text = str(plan)
    assert "projection: kronecker 8×8: fc1, fc2; dense: (root), norm, tiny" in text, text
    K = pkfast.gram(net, traj, X, dtype=F64, progress=False, **kw)
    full = "outputs" in kw
    G = torch.stack([sketch(net, traj, X, k=64, seed=s, dtype=F64, progress=False,
                            **{a: b for a, b in kw.items() if a != "outputs"}).gram(outputs="full" if full else "trace")
                     for s in range(SEEDS)])
    se = G.std(0) / math.sqrt(SEEDS)
    assert _within(G.mean(0), K, se) <= Z
    assert _within(G.mean(0), 0.8 * K, se) > Z


@pytest.mark.parametrize("problem", [_mlp_problem, _seq_problem], ids=["rank-one", "sequence"])
def test_variance_matches_the_documented_formula(problem):
    """Every full-block entry's variance over 300 seeds agrees with docs/math.md §7.2 within 5 standard errors of
    the variance estimate, for rank-one gradients (an MLP) and gradients over 4 positions with an embedding."""
    net, traj, X = problem()
    k = 64
    K = pkfast.gram(net, traj, X, outputs="full", dtype=F64, progress=False)
    G = torch.stack([sketch(net, traj, X, k=k, seed=s, dtype=F64, projection="kronecker", progress=False)
                     .gram(outputs="full") for s in range(SEEDS)])
    theory = _theory_full(_layer_gradients(net, traj, X), K, k)
    c = G - G.mean(0)
    var = c.pow(2).mean(0) * SEEDS / (SEEDS - 1)
    se_var = ((c.pow(4).mean(0) - c.pow(2).mean(0) ** 2) / SEEDS).sqrt()
    assert _within(var, theory, se_var) <= Z
    # the formula has power: the dense sketch's variance (§7) is far from what the Kronecker sketch shows
    d = torch.diagonal(torch.diagonal(K, dim1=0, dim2=1), dim1=0, dim2=1)
    dense = (d[:, None, :, None] * d[None, :, None, :] + K**2) / k
    assert _within(var, dense, se_var) > Z


def test_error_falls_with_r_as_the_formula_says():
    """RMS relative error of the Gram over 24 seeds at r = 8, 16, 32, 64 (k = r²): decreasing, and within 20% of
    the formula's prediction at every r (for rank-one gradients it falls like 1/√r, not 1/√k)."""
    net, traj, X = _mlp_problem(n=6)
    K = pkfast.gram(net, traj, X, outputs="full", dtype=F64, progress=False)
    blocks = _layer_gradients(net, traj, X)
    scale = float(K.pow(2).mean().sqrt())
    got, want = [], []
    for r in (8, 16, 32, 64):
        k = r * r
        mse = torch.stack([(sketch(net, traj, X, k=k, seed=s, dtype=F64, projection="kronecker", progress=False)
                            .gram(outputs="full") - K).pow(2) for s in range(24)]).mean()
        got.append(math.sqrt(float(mse)) / scale)
        want.append(math.sqrt(float(_theory_full(blocks, K, k).mean())) / scale)
    assert all(a > b for a, b in zip(got, got[1:])), got
    assert all(0.8 <= g / w <= 1.25 for g, w in zip(got, want)), (got, want)
    assert want[0] / want[-1] < 8 ** 0.5 * 1.2  # ~√(64/8): far from the dense sketch's 64/8


# ---------------------------------------------------------------------------------------------- choice and records
def test_the_choice_follows_the_cost_model_and_k_without_a_factor_pair_stays_dense():
    net, traj, X = _seq_problem()
    p = pkfast.plan(net, traj, X, method="sketch", k=4096)
    for L in p.layers:
        assert L.method == "kronecker" and L.options["kronecker"] < L.options["dense"], (L.name, L.options)
    p = pkfast.plan(net, traj, X, method="sketch", k=97)
    assert {L.method for L in p.layers} == {"dense"}
    assert all("k=97 has no factor pair" in L.reason for L in p.layers)
    dense = pkfast.plan(net, traj, X, method="sketch", k=4096, projection="dense")
    assert {L.method for L in dense.layers} == {"jacobian"} and "projection: dense: all" in str(dense)
    with pytest.raises(ValueError, match=r"unknown projection='sparse'; expected one of 'auto', 'dense', 'kronecker'"):
        sketch(net, traj, X, k=64, projection="sparse", progress=False)
    with pytest.raises(ValueError, match=r"k, seed and projection set the random projection of method='sketch'"):
        pkfast.gram(net, traj, X, projection="dense", progress=False)


def test_features_of_different_projections_are_never_multiplied_and_dense_keeps_its_fingerprint():
    net, traj, X = _seq_problem()
    auto = sketch(net, traj, X, k=64, seed=1, progress=False)
    dense = sketch(net, traj, X, k=64, seed=1, projection="dense", progress=False)
    assert "projection" not in dense.parts  # the all-dense features are those of earlier versions
    with pytest.raises(ValueError, match=r"projection differs \(None vs 'kronecker 8×8"):
        dense.gram(auto)
    # the Gram route is the product of the same features
    Kx = pkfast.gram(net, traj, X, method="sketch", k=64, seed=1, dtype=torch.float32, progress=False)
    torch.testing.assert_close(Kx, auto.gram(), rtol=1e-5, atol=1e-6)
