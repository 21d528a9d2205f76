"""Kernels over combinations of the outputs (pkfast.engine.output_sketch): the output sketch is an unbiased
estimate of the trace kernel whose variance is the documented formula and whose error falls as 1/√r; the
pseudo-NTK is (1/C) Σ_{c,d} G_cd exactly (float64, against outputs="full"); a target error chooses r by a pilot
and meets it; the plan, a stored Gram's manifest and the CLI say which kernel was computed; refusals say why."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import pkfast
from pkfast import OutputSketch
from pkfast.engine.output_sketch import OutputProjection, directions_for_target, sketch_variance
from pkfast.store.reader import StoreError

F64 = torch.float64
C = 12


def _setup(head_nonlinear: bool = True):
    torch.manual_seed(0)
    layers = [torch.nn.Linear(3, 8), torch.nn.Tanh(), torch.nn.Linear(8, C)]
    if head_nonlinear:  # no linear head: the outputs' Gram blocks are not near-diagonal
        layers += [torch.nn.Tanh(), torch.nn.Linear(C, C), torch.nn.Sigmoid()]
    net = torch.nn.Sequential(*layers).double()
    w0 = {k: v.clone() for k, v in net.state_dict().items()}
    w1 = {k: v + 0.05 * torch.randn_like(v) for k, v in w0.items()}
    traj = pkfast.Trajectory.from_checkpoints([w0, w1, w0], lr=[0.1, 0.05])
    X = torch.randn(4, 3, generator=torch.Generator().manual_seed(1), dtype=F64)
    return net, traj, X


def _gram(net, traj, X, X2=None, **kw):
    return pkfast.gram(net, traj, X, X2, dtype=F64, progress=False, **kw)


@pytest.mark.parametrize("kind", ["rademacher", "gaussian"])
def test_output_sketch_is_unbiased_with_the_documented_variance(kind):
    net, traj, X = _setup()
    G = _gram(net, traj, X, outputs="full")  # [N, N, C, C]
    K = G.diagonal(dim1=-2, dim2=-1).sum(-1)
    torch.testing.assert_close(K, _gram(net, traj, X), rtol=1e-12, atol=0)
    r, n = 3, 200
    est = torch.stack([_gram(net, traj, X, outputs=OutputSketch(r=r, kind=kind, seed=s)) for s in range(n)])
    var = sketch_variance(G, r, kind)
    z = (est.mean(0) - K) / (var / n).sqrt().clamp_min(1e-300)
    assert float(z.abs().max()) < 4.5, z  # every entry's mean within 4.5 standard errors of the trace kernel
    ratio = est.var(0)[var > 1e-12 * var.max()] / var[var > 1e-12 * var.max()]
    assert 0.75 < float(ratio.mean()) < 1.3  # the formula's variance (200 draws: ±10% per entry)


@pytest.mark.parametrize("kind", ["rademacher", "gaussian"])
def test_variance_formula_and_inverse_sqrt_r_on_blocks(kind):
    g = torch.Generator().manual_seed(2)
    A, B = torch.randn(6, 6, generator=g, dtype=F64), torch.randn(6, 6, generator=g, dtype=F64)
    for G in (A @ A.T, A @ B.T):  # a diagonal block (PSD) and an off-diagonal one
        rms = {}
        for r in (2, 8):
            draws = torch.stack([(lambda U: (U * (G @ U)).sum())(OutputSketch(r=r, kind=kind, seed=s).matrix(
                6, F64, torch.device("cpu"))) for s in range(6000)])
            assert abs(float(draws.mean() - torch.trace(G))) < 5 * math.sqrt(float(sketch_variance(G, r, kind)) / 6000)
            assert 0.9 < float(draws.var() / sketch_variance(G, r, kind)) < 1.1
            rms[r] = float(((draws - torch.trace(G)) ** 2).mean().sqrt())
        assert 1.8 < rms[2] / rms[8] < 2.2  # error ∝ 1/√r: 4× the directions, half the error


def test_rademacher_never_worse_and_exact_on_a_diagonal_block():
    G = torch.diag(torch.arange(1.0, 7.0, dtype=F64))
    assert float(sketch_variance(G, 4, "rademacher")) == 0.0 < float(sketch_variance(G, 4, "gaussian"))


def test_pntk_is_the_kernel_of_the_summed_outputs():
    net, traj, X = _setup()
    G = _gram(net, traj, X, outputs="full")
    P = _gram(net, traj, X, outputs="pntk")
    torch.testing.assert_close(P, G.sum((-1, -2)) / C, rtol=1e-12, atol=1e-15)
    X2 = X[:2] + 0.5
    P2 = _gram(net, traj, X, X2, outputs="pntk")
    G2 = _gram(net, traj, X, X2, outputs="full")
    torch.testing.assert_close(P2, G2.sum((-1, -2)) / C, rtol=1e-12, atol=1e-15)
    Pd = _gram(net, traj, X, outputs="pntk", diagonal=True)
    torch.testing.assert_close(Pd, P.diagonal(), rtol=1e-12, atol=1e-15)


def test_sequence_outputs_with_an_output_fn():
    """[n, L, V] outputs after an output_fn: the sketch combines all L·V of them; the pseudo-NTK sums them."""
    torch.manual_seed(0)
    emb, head = torch.nn.Embedding(7, 5), torch.nn.Linear(5, 9)
    net = torch.nn.Sequential(emb, torch.nn.Tanh(), head).double()
    w0 = {k: v.clone() for k, v in net.state_dict().items()}
    traj = pkfast.Trajectory.from_checkpoints([w0, {k: 0.9 * v for k, v in w0.items()}], lr=0.1)
    ids = torch.randint(0, 7, (3, 4), generator=torch.Generator().manual_seed(0))
    pick = lambda o: o[:, 1:]  # noqa: E731 - positions 1…3
    G = pkfast.gram(net, traj, ids, outputs="full", output_fn=pick, dtype=F64, progress=False)
    P = pkfast.gram(net, traj, ids, outputs="pntk", output_fn=pick, dtype=F64, progress=False)
    torch.testing.assert_close(P, G.sum((-1, -2)) / 27, rtol=1e-12, atol=1e-15)
    S = pkfast.gram(net, traj, ids, outputs=OutputSketch(r=27 * 50, seed=3), output_fn=pick, dtype=F64,
                    progress=False)
    K = G.diagonal(dim1=-2, dim2=-1).sum(-1)
    assert float((S - K).abs().max() / K.abs().max()) < 0.1


def test_target_error_chooses_r_by_a_pilot_and_meets_it(caplog):
    net, traj, X = _setup()
    G = _gram(net, traj, X, outputs="full")
    with caplog.at_level("INFO", logger="pkfast"):
        plan = pkfast.plan(net, traj, X, outputs=OutputSketch(target=0.05))
    assert "chosen by a pilot for a 0.05 relative standard error" in str(plan)
    r = int(str(plan).split("output sketch: ")[1].split()[0])
    assert 1 <= r <= C and "chose r =" in caplog.text
    Gd = G[range(4), range(4)]  # the diagonal blocks
    rel = (sketch_variance(Gd, r, "rademacher").sqrt() / Gd.diagonal(dim1=-2, dim2=-1).sum(-1))
    assert float(rel.max()) <= 0.05 * 1.5  # the pilot's estimate from 32 directions, within its own error
    q = torch.tensor([[1.0, 1.0, 1.0]])
    assert directions_for_target(q, 0.1, 50) == 1  # no variance: one direction
    assert directions_for_target(torch.tensor([[0.0, 2.0]]), 0.1, 50) == 50  # capped at C


def test_plan_store_and_refusals(tmp_path):
    net, traj, X = _setup()
    text = str(pkfast.plan(net, traj, X, outputs="sketch"))
    assert "output sketch: 64 rademacher output directions" in text and "unbiased estimate of the trace" in text
    assert "pseudo-NTK" in str(pkfast.plan(net, traj, X, outputs="pntk"))
    out = tmp_path / "k.npy"
    pkfast.gram(net, traj, X, out=out, outputs=OutputSketch(r=4, seed=1), progress=False)
    assert pkfast.open_gram(out).options["output_sketch"] == {"r": 4, "kind": "rademacher", "seed": 1}
    with pytest.raises(StoreError, match="output_sketch"):
        pkfast.gram(net, traj, X, out=out, outputs=OutputSketch(r=4, seed=2), progress=False)
    with pytest.raises(ValueError, match="loss kernel has one output"):
        pkfast.gram(net, traj, X, outputs="sketch", of="loss", loss="mse", y=torch.zeros(4, C, dtype=F64))
    with pytest.raises(ValueError, match="expected one of 'trace', 'mean', 'full', 'sketch', 'pntk'"):
        pkfast.gram(net, traj, X, outputs="skech")
    with pytest.raises(ValueError, match="r \\(the number of output directions\\) must be an integer ≥ 1"):
        OutputSketch(r=0)
    with pytest.raises(ValueError, match="not both"):
        OutputSketch(r=4, target=0.1)
    with pytest.raises(ValueError, match="kind must be one of"):
        OutputSketch(kind="uniform")
    assert repr(OutputProjection(OutputSketch(r=2))).startswith("OutputProjection(")


def test_cli_outputs_sketch(tmp_path, capsys):
    from pkfast.cli import main

    net, traj, X = _setup(head_nonlinear=False)
    (tmp_path / "nets.py").write_text("import torch\n\ndef make():\n    torch.manual_seed(0)\n    return torch.nn."
                                      "Sequential(torch.nn.Linear(3, 8), torch.nn.Tanh(), torch.nn.Linear(8, 12))"
                                      ".double()\n")
    traj.save(tmp_path / "traj")
    np.save(tmp_path / "X.npy", X.numpy())
    args = ["plan", "--model", f"{tmp_path / 'nets.py'}:make", "--trajectory", str(tmp_path / "traj"), "--data",
            str(tmp_path / "X.npy"), "--outputs", "sketch", "--directions", "5"]
    assert main(args) == 0
    assert "output sketch: 5 rademacher output directions" in capsys.readouterr().out
    assert main(args[:-3] + ["trace", "--directions", "5"]) != 0
    assert "expected --outputs sketch" in capsys.readouterr().err
