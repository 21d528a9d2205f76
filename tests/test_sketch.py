"""pkfast.sketch: JL path features are unbiased, have the documented variance and 1/√k error, are deterministic
and chunking-independent, round-trip through files, and refuse to mix sketches or to sketch asymmetric rules.

Statistical tests use fixed seeds (deterministic) and tolerances derived from the empirical spread, not magic
numbers: "within 5 standard errors" over a few dozen entries fails by chance with probability ≲ 1e-5."""

import copy
import importlib
import logging
import math
import re

import numpy as np
import pytest
import torch

import pkfast
from pkfast.reference import jacobian_reference
from pkfast.sketch import PathFeatures, projection_block, required_k, sketch
from tests._util import load_point
from tests.models import mlp, random_trajectory

sketch_route = importlib.import_module("pkfast.engine.routes.sketch")  # the projection (pkfast.sketch is the function)

F64 = torch.float64
SEEDS = 200  # sketches per mean/variance estimate
Z = 5.0  # standard errors allowed


def _problem(seed=0, n=5, n2=3):
    """A tiny MLP (P = 80, C = 2), a 3-step trajectory with unequal steps, samples X and X2."""
    torch.manual_seed(seed)
    net = mlp(3, 6, 2)
    traj = random_trajectory(net, steps=3, scale=0.3)
    g = torch.Generator().manual_seed(seed + 1)
    return net, traj, torch.randn(n, 3, generator=g, dtype=F64), torch.randn(n2, 3, generator=g, dtype=F64)


def _within(est, exact, se, z=Z):
    """max over entries of |est − exact| / se (se floored at 1e-12 of the scale, for exactly-known entries)."""
    floor = 1e-12 * float(exact.abs().max())
    return float(((est - exact).abs() / se.clamp_min(floor)).max())


# ---------------------------------------------------------------------------------------------- statistics
@pytest.fixture(scope="module", params=["left", "trapezoid"])
def many(request):
    """SEEDS independent sketches (k = 16) of one problem: full block Grams [S, N, N, C, C] and the exact one."""
    rule = request.param
    net, traj, X, _ = _problem()
    k = 16
    G = torch.stack([sketch(net, traj, X, k=k, seed=s, rule=rule, dtype=F64, projection="dense",
                            progress=False).gram(outputs="full")
                     for s in range(SEEDS)])
    K = pkfast.gram(net, traj, X, outputs="full", rule=rule, dtype=F64, progress=False)
    return rule, k, G, K


def _trace(G):
    return torch.diagonal(G, dim1=-2, dim2=-1).sum(-1)


@pytest.mark.parametrize("outputs", ["full", "trace"])
def test_mean_over_seeds_converges_to_exact_gram(many, outputs):
    rule, k, G, K = many
    if outputs == "trace":
        G, K = _trace(G), _trace(K)
    mean, se = G.mean(0), G.std(0) / math.sqrt(SEEDS)
    assert _within(mean, K, se) <= Z, f"{rule} {outputs}: the mean of {SEEDS} sketches is biased"
    # the tolerance has power: a 20% bias would be caught
    assert _within(mean, 0.8 * K, se) > Z


def test_variance_matches_the_documented_formula(many):
    """Var K̂_cc′(x,x′) = (K_cc(x,x) K_c′c′(x′,x′) + K_cc′(x,x′)²)/k (full); the Frobenius form for the trace."""
    rule, k, G, K = many
    d = torch.diagonal(K, dim1=0, dim2=1).permute(2, 0, 1)  # [N, C, C]: K(x_a, x_a)
    dd = torch.diagonal(d, dim1=1, dim2=2)  # [N, C]: K_cc(x_a, x_a)
    theory_full = (dd[:, None, :, None] * dd[None, :, None, :] + K**2) / k
    frob = torch.einsum("acd,bcd->ab", d, d)
    tr_sq = torch.einsum("abcd,abdc->ab", K, K)
    theory_trace = (frob + tr_sq) / k
    for est, theory in ((G, theory_full), (_trace(G), theory_trace)):
        c = est - est.mean(0)
        var = c.pow(2).mean(0) * SEEDS / (SEEDS - 1)
        se_var = ((c.pow(4).mean(0) - c.pow(2).mean(0) ** 2) / SEEDS).sqrt()  # SE of a variance estimate
        assert _within(var, theory, se_var) <= Z, rule
    # the documented bound for the trace: Var ≤ 2 K^tr(x,x) K^tr(x',x') / k
    ktr = _trace(K).diagonal()
    assert bool((theory_trace <= 2 * ktr[:, None] * ktr[None, :] / k * (1 + 1e-12)).all())


def test_error_falls_like_one_over_sqrt_k():
    """RMS relative error over 78 distinct entries and 32 seeds per k; over disjoint seed sets the fitted slope
    spreads over about ±0.04 around −0.5 (checked on 10 sets), so [−0.6, −0.4] is not a lucky draw."""
    net, traj, X, _ = _problem(n=12)
    K = pkfast.gram(net, traj, X, dtype=F64, progress=False)
    ks = (8, 32, 128, 512)
    rms = []
    for k in ks:
        mse = np.mean([float(((sketch(net, traj, X, k=k, seed=s, dtype=F64, projection="dense",
                                      progress=False).gram() - K) ** 2).mean()) for s in range(32)])
        rms.append(math.sqrt(mse) / float(K.pow(2).mean().sqrt()))
    slope = np.polyfit(np.log(ks), np.log(rms), 1)[0]
    assert -0.6 <= slope <= -0.4, f"RMS relative errors {rms} give slope {slope:.3f}"


def test_loss_features_are_unbiased_for_the_loss_kernel():
    net, traj, X, _ = _problem()
    y = torch.randn(5, 2, generator=torch.Generator().manual_seed(3), dtype=F64)
    K = pkfast.gram(net, traj, X, of="loss", loss="mse", y=y, dtype=F64, progress=False)
    feats = [sketch(net, traj, X, k=16, seed=s, of="loss", loss=torch.nn.MSELoss(), y=y, dtype=F64, progress=False)
             for s in range(SEEDS)]
    assert feats[0].features.shape == (5, 1, 16) and feats[0].num_outputs == 1
    G = torch.stack([f.gram() for f in feats])
    assert G.shape == (SEEDS, 5, 5)
    assert torch.equal(feats[0].gram(outputs="full"), G[0])  # one output: full is the trace, as in pkfast.gram
    se = G.std(0) / math.sqrt(SEEDS)
    assert _within(G.mean(0), K, se) <= Z
    assert _within(G.mean(0), 0.8 * K, se) > Z
    # cross-entropy through gram(method="sketch"), with y2 for X2: the cross block of the joint features
    yc = torch.tensor([0, 1, 1, 0, 1])
    Kx = pkfast.gram(net, traj, X, X[:2], method="sketch", k=16, seed=3, of="loss", loss="cross_entropy", y=yc,
                     y2=yc[:2], dtype=F64, outputs="full", progress=False)
    phi = sketch(net, traj, X, k=16, seed=3, of="loss", loss="cross_entropy", y=yc, dtype=F64, progress=False)
    torch.testing.assert_close(Kx, phi.gram()[:, :2], rtol=1e-12, atol=1e-14)


def test_uniform_error_bound_holds_with_the_promised_probability():
    """k = required_k(ε, δ, E) keeps every entry within ε√(K(x,x)K(x′,x′)) in ≥ 1−δ of the seeds."""
    eps, delta, runs = 0.5, 0.1, 20
    net, traj, X, _ = _problem(n=4)
    K = pkfast.gram(net, traj, X, dtype=F64, progress=False)
    E = 4 * 4 * 2  # N·N·C for the trace Gram
    k = required_k(eps, delta, E)
    assert k == math.ceil(6 * math.log(4 * E / delta) / eps**2)
    d = K.diagonal()
    bound = eps * (d[:, None] * d[None, :]).sqrt()
    fails = sum(bool(((sketch(net, traj, X, k=k, seed=s, dtype=F64, projection="dense", progress=False).gram() - K)
                      .abs() > bound).any())
                for s in range(runs))
    assert fails / runs <= delta + 3 * math.sqrt(delta * (1 - delta) / runs), f"{fails} of {runs} seeds broke the bound"


# ---------------------------------------------------------------------------------------------- exact properties
def _explicit_features(net, traj, X, k, seed, rule, rows):
    """Σ_s √(w_s/k) J_s(X) R_s with reference (autograd-loop) Jacobians and R_s assembled from projection_block."""
    eps = [float(e) for e in traj.step_sizes]
    T, P = len(eps), 80
    weights = {s: e for s, e in enumerate(eps)} if rule == "left" else \
        {p: ((eps[p - 1] if p > 0 else 0) + (eps[p] if p < T else 0)) / 2 for p in range(T + 1)}
    ref_net = copy.deepcopy(net).double()
    ref = torch.zeros(X.shape[0], 2, k, dtype=F64)
    for point, w in weights.items():
        load_point(ref_net, traj, point)
        J = jacobian_reference(ref_net, X)  # [N, C, P]
        R = torch.cat([projection_block(seed, point, b, min(rows, P - rows * b), k, dtype=F64)
                       for b in range(math.ceil(P / rows))])
        ref += math.sqrt(w / k) * J @ R
    return ref


@pytest.mark.parametrize("budget, order, chunks", [(None, "chunks", 1), (30_000, "chunks", 8), (80_000, "terms", 3)])
def test_features_are_the_explicit_projection_whatever_the_loop_order(monkeypatch, caplog, budget, order, chunks):
    """Φ(x) = Σ_s √(w_s/k) J_s(x) R_s exactly (to rounding), with P split into ragged blocks of R and the sample
    chunking and loop order forced by the memory budget: "chunks" regenerates R per chunk, "terms" holds R_s."""
    monkeypatch.setattr(sketch_route, "BLOCK_ELEMS", 24 * 64)  # k = 64 → 24 rows per block: 80 = 24+24+24+8
    net, traj, X, _ = _problem(n=40)
    k, seed = 64, 11
    for rule in ("left", "trapezoid"):
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="pkfast"):
            phi = sketch(net, traj, X, k=k, seed=seed, rule=rule, dtype=F64, memory_budget=budget, projection="dense",
                         progress=False)
        assert re.search(rf"in {chunks} chunk\(s\) .* 4 block\(s\) of R .* {order} outermost", caplog.text), caplog.text
        ref = _explicit_features(net, traj, X, k, seed, rule, rows=24)
        torch.testing.assert_close(phi.features, ref, rtol=1e-12, atol=1e-14)


def test_same_seed_is_bitwise_identical_and_seeds_differ():
    net, traj, X, _ = _problem()
    a = sketch(net, traj, X, k=32, seed=5, dtype=F64, progress=False)
    b = sketch(net, traj, X, k=32, seed=5, dtype=F64, progress=False)
    c = sketch(net, traj, X, k=32, seed=6, dtype=F64, progress=False)
    assert torch.equal(a.features, b.features) and a.fingerprint == b.fingerprint
    from_numpy = sketch(net, traj, X.numpy(), k=32, seed=5, dtype=F64, progress=False, device="cpu")
    assert torch.equal(from_numpy.features, a.features) and from_numpy.fingerprint == a.fingerprint
    assert not torch.equal(a.features, c.features) and a.fingerprint != c.fingerprint
    assert float((a.features - c.features).abs().min()) > 0  # no shared column either
    f32 = sketch(net, traj, X, k=32, seed=5, progress=False)
    assert f32.features.dtype == torch.float32 and f32.fingerprint != a.fingerprint


@pytest.mark.parametrize("projection, budget", [("dense", "60KB"), ("kronecker", "4KB")])
def test_memory_budget_does_not_change_the_features_and_too_small_is_refused(caplog, projection, budget):
    net, traj, X, _ = _problem(n=13)
    big = sketch(net, traj, X, k=64, seed=2, dtype=F64, projection=projection, progress=False)
    with caplog.at_level(logging.INFO, logger="pkfast"):
        small = sketch(net, traj, X, k=64, seed=2, dtype=F64, memory_budget=budget, projection=projection,
                       progress=False, device="cpu")
    chunks = int(re.search(r"in (\d+) chunk", caplog.text).group(1))
    assert chunks >= 4, caplog.text
    assert float((small.features - big.features).abs().max()) <= 1e-12 * float(big.features.abs().max())
    assert small.fingerprint == big.fingerprint
    with pytest.raises(ValueError, match=r"memory_budget of 1,000 bytes is too small; one sample needs"):
        sketch(net, traj, X, k=64, dtype=F64, memory_budget=1000, progress=False)
    with pytest.raises(TypeError, match=r"device must be a torch.device or a string"):
        sketch(net, traj, X, k=64, dtype=F64, device=0, progress=False)


def test_save_load_round_trip_is_bitwise(tmp_path):
    net, traj, X, _ = _problem()
    for of, kw in (("output", {}), ("loss", {"loss": torch.nn.CrossEntropyLoss(), "y": [0, 1, 0, 0, 1]})):
        phi = sketch(net, traj, X, k=24, seed=9, dtype=F64, of=of, progress=False, **kw)
        path = phi.save(tmp_path / f"phi-{of}.npz")
        back = PathFeatures.load(path)
        assert torch.equal(back.features, phi.features) and back.features.dtype == F64
        assert back.fingerprint == phi.fingerprint and repr(back) == repr(phi)
        assert (back.k, back.seed, back.rule, back.of, back.num_outputs) == (24, 9, "left", of, phi.num_outputs)
        for outputs in ("trace", "mean", "full"):
            assert torch.equal(back.gram(outputs=outputs), phi.gram(outputs=outputs))
        assert torch.equal(back.gram(phi), phi.gram())  # a loaded and a fresh sketch multiply together
    np.savez(tmp_path / "other.npz", a=np.zeros(3))
    with pytest.raises(ValueError, match=r"expected 'features' and 'meta'"):
        PathFeatures.load(tmp_path / "other.npz")


@pytest.mark.parametrize("outputs", ["trace", "mean", "full"])
def test_cross_gram_is_the_block_of_the_joint_gram(outputs):
    net, traj, X, X2 = _problem()
    both = sketch(net, traj, torch.cat([X, X2]), k=48, seed=4, dtype=F64, progress=False)
    a = sketch(net, traj, X, k=48, seed=4, dtype=F64, progress=False)
    b = sketch(net, traj, X2, k=48, seed=4, dtype=F64, progress=False)
    joint = both.gram(outputs=outputs)
    cross = a.gram(b, outputs=outputs)
    assert cross.shape == ((5, 3, 2, 2) if outputs == "full" else (5, 3))
    torch.testing.assert_close(cross, joint[:5, 5:], rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(b.gram(a, outputs=outputs), joint[5:, :5], rtol=1e-12, atol=1e-14)
    # gram(method="sketch") is features-then-gram (up to the GEMMs' rounding), X2 sketched by the same projections
    torch.testing.assert_close(pkfast.gram(net, traj, X, X2, method="sketch", k=48, seed=4, outputs=outputs, dtype=F64,
                                           progress=False), cross, rtol=1e-12, atol=1e-14)
    # diagonal, mean and trace agree with the full Gram
    full = a.gram(outputs="full")
    diag = a.gram(outputs=outputs, diagonal=True)
    want = torch.stack([full[i, i] for i in range(5)])
    if outputs != "full":
        want = torch.diagonal(want, dim1=1, dim2=2).sum(-1) / (2 if outputs == "mean" else 1)
    torch.testing.assert_close(diag, want, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(pkfast.gram(net, traj, X, method="sketch", k=48, seed=4, outputs=outputs, diagonal=True,
                                           dtype=F64, progress=False), diag, rtol=1e-12, atol=1e-14)


# ---------------------------------------------------------------------------------------------- refusals
def test_features_of_different_sketches_are_never_multiplied():
    net, traj, X, X2 = _problem()
    a = sketch(net, traj, X, k=16, seed=0, dtype=F64, progress=False)
    with pytest.raises(ValueError, match=r"different sketches.*seed differs \(0 vs 1\)"):
        a.gram(sketch(net, traj, X2, k=16, seed=1, dtype=F64, progress=False))
    with pytest.raises(ValueError, match=r"k differs \(16 vs 32\)"):
        a.gram(sketch(net, traj, X2, k=32, seed=0, dtype=F64, progress=False))
    with pytest.raises(ValueError, match=r"rule differs \('left' vs 'trapezoid'\)"):
        a.gram(sketch(net, traj, X2, k=16, rule="trapezoid", dtype=F64, progress=False))
    with pytest.raises(ValueError, match=r"dtype differs \('float64' vs 'float32'\)"):
        a.gram(sketch(net, traj, X2, k=16, progress=False))
    other_traj = random_trajectory(net, steps=3, scale=0.3, seed=1)
    with pytest.raises(ValueError, match=r"trajectory \(weights or step sizes\) differs"):
        a.gram(sketch(net, other_traj, X2, k=16, dtype=F64, progress=False))
    longer = pkfast.Trajectory(torch.stack([traj.flat(i) for i in range(4)]), traj.step_sizes * 2, traj.spec)
    with pytest.raises(ValueError, match=r"trajectory \(weights or step sizes\) differs"):
        a.gram(sketch(net, longer, X2, k=16, dtype=F64, progress=False))
    with pytest.raises(ValueError, match=r"of differs"):
        a.gram(sketch(net, traj, X2, k=16, of="loss", loss="mse", y=torch.zeros(3, 2), dtype=F64, progress=False))
    with pytest.raises(TypeError, match=r"other must be PathFeatures .* found Tensor"):
        a.gram(a.features)
    with pytest.raises(ValueError, match=r"diagonal=True .* expected other=None"):
        a.gram(a, diagonal=True)


def test_invalid_arguments_say_what_was_expected():
    net, traj, X, X2 = _problem()
    kw = dict(dtype=F64, progress=False)
    with pytest.raises(ValueError, match=r"rule='exact' cannot be sketched: the exact path kernel is asymmetric"):
        sketch(net, traj, X, rule="exact", **kw)
    with pytest.raises(ValueError, match=r"^pkfast.gram: rule='exact' cannot be sketched"):
        pkfast.gram(net, traj, X, rule="exact", method="sketch", **kw)
    for bad in (0, -3, 2.5, True, "64"):
        with pytest.raises(ValueError, match=r"pkfast.sketch: k \(the sketch size.*\) must be an integer ≥ 1; found"):
            sketch(net, traj, X, k=bad, **kw)
    with pytest.raises(TypeError, match=r"seed must be an integer; found 1.5"):
        sketch(net, traj, X, seed=1.5, **kw)
    with pytest.raises(ValueError, match=r"unknown rule='mid'; expected one of 'left', 'trapezoid', 'exact'"):
        sketch(net, traj, X, rule="mid", **kw)
    with pytest.raises(ValueError, match=r"dtype must be torch.float32 or torch.float64"):
        sketch(net, traj, X, dtype=torch.float16, progress=False)
    with pytest.raises(TypeError, match=r"pkfast.sketch: trajectory must be a pkfast.Trajectory; found dict"):
        sketch(net, {}, X, **kw)
    with pytest.raises(TypeError, match=r"pkfast.sketch: model must be a torch.nn.Module"):
        sketch(lambda x: x, traj, X, **kw)
    with pytest.raises(ValueError, match=r"of='loss' needs the targets: y for X; found None"):
        sketch(net, traj, X, of="loss", loss="mse", **kw)
    with pytest.raises(ValueError, match=r"pkfast.gram: of='loss' needs the targets: y for X and y2 for X2"):
        pkfast.gram(net, traj, X, X2, method="sketch", of="loss", loss="mse", y=torch.zeros(5, 2), **kw)
    with pytest.raises(ValueError, match=r"pkfast.sketch: of='loss' needs a loss .* the trajectory recorded none"):
        sketch(net, traj, X, of="loss", y=[0, 1, 0, 1, 1], **kw)
    with pytest.raises(ValueError, match=r"y and y2 apply to of='loss'"):
        sketch(net, traj, X, y=[0, 1, 0, 1, 1], **kw)
    with pytest.raises(ValueError, match=r"y holds class 7; the model has 2 outputs"):
        sketch(net, traj, X, of="loss", loss="cross_entropy", y=[0, 1, 7, 1, 1], **kw)
    with pytest.raises(ValueError, match=r"diagonal=True computes K\(x_a, x_a\) over X alone"):
        pkfast.gram(net, traj, X, X2, method="sketch", diagonal=True, **kw)
    with pytest.raises(ValueError, match=r"X and X2 must have the same per-sample shape"):
        pkfast.gram(net, traj, X, torch.randn(3, 4, dtype=F64), method="sketch", **kw)
    with pytest.raises(ValueError, match=r"pkfast.sketch: the model cannot be applied to X: per-sample shape \(4,\)"):
        sketch(net, traj, torch.randn(3, 4, dtype=F64), **kw)
    with pytest.raises(ValueError, match=r"unknown outputs='diag'"):
        sketch(net, traj, X, k=4, **kw).gram(outputs="diag")
    with pytest.raises(ValueError, match=r"epsilon must be in \(0, 0.5\]"):
        required_k(0.7, 0.1, 10)


def test_repr_and_zero_step_sizes():
    net, traj, X, _ = _problem()
    phi = sketch(net, traj, X, k=8, seed=3, dtype=F64, progress=False)
    assert re.fullmatch(r"PathFeatures\(N=5, C=2, k=8, seed=3, rule='left', of='output', dtype=float64, "
                        r"fingerprint='[0-9a-f]{12}…'\)", repr(phi))
    frozen = pkfast.Trajectory(torch.stack([traj.flat(i) for i in range(4)]), [0.0, 0.0, 0.0], traj.spec)
    zero = sketch(net, frozen, X, k=8, dtype=F64, progress=False)
    assert zero.features.shape == (5, 2, 8) and not zero.features.any()
