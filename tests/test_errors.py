"""One test per user-facing error of pkfast.gram: each says what was expected and what was found."""

import re
import numpy as np
import pytest
import torch
from torch import nn

import pkfast
from tests.models import mlp, random_trajectory


@pytest.fixture
def setup():
    net = mlp()
    return net, random_trajectory(net, steps=2), torch.randn(6, 5)


def gram(*args, **kw):
    kw.setdefault("progress", False)
    return pkfast.gram(*args, **kw)


def test_model_must_be_a_module(setup):
    _, traj, X = setup
    with pytest.raises(TypeError, match=r"model must be a torch.nn.Module; found function"):
        gram(lambda x: x, traj, X)


def test_trajectory_must_be_a_trajectory(setup):
    net, _, X = setup
    with pytest.raises(TypeError, match=r"trajectory must be a pkfast.Trajectory; found dict"):
        gram(net, {}, X)


@pytest.mark.parametrize("kw,match", [
    (dict(outputs="diag"), r"unknown outputs='diag'; expected one of 'trace', 'mean', 'full'"),
    (dict(rule="simpson"), r"unknown rule='simpson'; expected one of 'left', 'trapezoid'"),
    (dict(backend="cuda"), r"unknown backend='cuda'; expected one of 'auto', 'torch', 'triton'"),
    (dict(precision="fp8"), r"unknown precision='fp8'; expected one of 'ieee', 'tf32', 'bf16'"),
])
def test_unknown_choices(setup, kw, match):
    with pytest.raises(ValueError, match=match):
        gram(*setup, **kw)


def test_bad_dtype(setup):
    with pytest.raises(ValueError, match=r"dtype must be torch.float32 or torch.float64; found torch.float16"):
        gram(*setup, dtype=torch.float16)


@pytest.mark.parametrize("budget,match", [
    (-5, r"memory_budget must be a positive number of bytes .*found -5"),
    ("lots", r"memory_budget 'lots' is not a size; expected e.g."),
    (True, r"memory_budget must be a positive number"),
])
def test_bad_memory_budget(setup, budget, match):
    with pytest.raises(ValueError, match=match):
        gram(*setup, memory_budget=budget)


def test_memory_budget_too_small_says_how_much_is_needed(setup):
    with pytest.raises(ValueError, match=r"too small for one tile; a 1×1 tile needs [\d,]+ bytes .*Raise memory_budget"):
        gram(*setup, memory_budget=100)
    with pytest.raises(ValueError, match=r"too small; one sample needs [\d,]+ bytes"):
        gram(*setup, memory_budget=100, diagonal=True)


def test_diagonal_with_X2(setup):
    net, traj, X = setup
    with pytest.raises(ValueError, match=r"diagonal=True computes K\(x_a, x_a\) over X alone; expected X2=None"):
        gram(net, traj, X, X, diagonal=True)


def test_diagonal_must_be_bool(setup):
    with pytest.raises(TypeError, match=r"diagonal must be True or False; found 'yes'"):
        gram(*setup, diagonal="yes")


@pytest.mark.parametrize("X,exc,match", [
    ([[0.0] * 5], TypeError, r"X must be a torch.Tensor or numpy.ndarray of shape \[n, \*features\]; found list"),
    (torch.zeros(0, 5), ValueError, r"X is empty \(shape \(0, 5\)\); expected at least one sample"),
    (torch.tensor(1.0), ValueError, r"X must have a leading sample axis"),
    (np.array([None, 1], dtype=object), TypeError, r"numpy array of dtype object"),
    (torch.zeros(3, 5, dtype=torch.complex64), TypeError, r"X is complex"),
])
def test_bad_X(setup, X, exc, match):
    net, traj, _ = setup
    with pytest.raises(exc, match=match):
        gram(net, traj, X)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_X_names_first_sample(setup, bad):
    net, traj, X = setup
    X = X.clone()
    X[4, 2] = bad
    with pytest.raises(ValueError, match=r"X contains NaN or Inf in 1 sample\(s\), first at index 4"):
        gram(net, traj, X)


def test_non_finite_X2(setup):
    net, traj, X = setup
    X2 = X.clone()
    X2[1, 0] = float("nan")
    with pytest.raises(ValueError, match=r"X2 contains NaN or Inf .* first at index 1"):
        gram(net, traj, X, X2)


def test_X_X2_feature_shape_mismatch(setup):
    net, traj, X = setup
    with pytest.raises(ValueError, match=r"same per-sample shape; X has \(5,\) .* while X2 has \(4,\)"):
        gram(net, traj, X, torch.randn(3, 4))


def test_X_X2_integer_float_mismatch(setup):
    net, traj, X = setup
    with pytest.raises(TypeError, match=r"X is torch.float32 while X2 is torch.int64"):
        gram(net, traj, X, torch.zeros(3, 5, dtype=torch.long))


def test_features_that_do_not_fit_the_model(setup):
    net, traj, _ = setup
    with pytest.raises(ValueError, match=r"cannot be applied to X: per-sample shape \(7,\).*RuntimeError"):
        gram(net, traj, torch.randn(4, 7))


def test_model_returning_non_tensor(setup):
    class Bad(nn.Module):
        def __init__(self, keys=("y",)):
            super().__init__()
            self.lin = nn.Linear(5, 2)
            self.keys = keys

        def forward(self, x):
            return {k: self.lin(x) * (i + 1) for i, k in enumerate(self.keys)} if self.keys else "oops"

    X = torch.randn(3, 5)
    net = Bad()  # one tensor in a dict: the default rule takes it
    K = gram(net, random_trajectory(net, steps=1), X, progress=False)
    assert torch.equal(K, gram(net.lin, random_trajectory(net.lin, steps=1), X, progress=False))
    net = Bad(("y", "z"))
    with pytest.raises(TypeError, match=r"returned a dict with keys \['y', 'z'\] and no 'logits'; pass output_fn="):
        gram(net, random_trajectory(net, steps=1), X)
    net = Bad(())
    with pytest.raises(TypeError, match=r"the model returned a str; expected a tensor, a mapping or ModelOutput"):
        gram(net, random_trajectory(net, steps=1), X)


def test_model_collapsing_the_batch(setup):
    class Pool(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(5, 2)

        def forward(self, x):
            return self.lin(x).sum()

    net = Pool()
    with pytest.raises(ValueError, match=r"must map a batch \[n, \*features\] to outputs \[n, \*out\].*returned shape \(\)"):
        gram(net, random_trajectory(net, steps=1), torch.randn(3, 5))


def test_batchnorm_in_training_mode_refused():
    net = nn.Sequential(nn.Linear(5, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))
    traj = random_trajectory(net, steps=1)
    with pytest.raises(ValueError, match=r"module '1' \(BatchNorm1d\) is in training mode.*Call model.eval\(\)"):
        gram(net, traj, torch.randn(3, 5))
    net.eval()
    assert gram(net, traj, torch.randn(3, 5)).shape == (3, 3)


def test_dropout_in_training_mode_refused():
    net = nn.Sequential(nn.Linear(5, 4), nn.Dropout(0.5), nn.Linear(4, 2))
    traj = random_trajectory(net, steps=1)
    with pytest.raises(ValueError, match=r"module '1' \(Dropout, p=0.5\) is in training mode.*random.*model.eval\(\)"):
        gram(net, traj, torch.randn(3, 5))


def test_functional_randomness_refused():
    class Noisy(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(5, 2)

        def forward(self, x):
            return nn.functional.dropout(self.lin(x), 0.3, training=True)

    net = Noisy()
    with pytest.raises(ValueError, match=r"draws random numbers in its forward pass"):
        gram(net, random_trajectory(net, steps=1), torch.randn(3, 5))


def test_trajectory_missing_a_trainable_parameter(setup):
    net, traj, X = setup
    other = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 7), nn.Tanh(), nn.Linear(7, 3), nn.Linear(3, 3))
    with pytest.raises(ValueError, match=r"no entry for the model's trainable parameter '5.weight' \(shape \(3, 3\)\)"):
        gram(other, traj, X)


def test_trajectory_shape_mismatch(setup):
    _, traj, X = setup
    other = mlp(hidden=8)
    with pytest.raises(ValueError, match=r"parameter '0.weight' has shape \(8, 5\) in the model but \(7, 5\) in the trajectory"):
        gram(other, traj, X)


def test_trajectory_with_entry_the_model_lacks(setup):
    _, traj, X = setup
    smaller = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 7))
    with pytest.raises(ValueError, match=r"trajectory entry '4.weight' matches no parameter or buffer of the model"):
        gram(smaller, traj, X)


def test_model_without_trainable_parameters(setup):
    net, traj, X = setup
    for p in net.parameters():
        p.requires_grad_(False)
    with pytest.raises(ValueError, match=r"no trainable parameters"):
        gram(net, traj, X)


def test_non_finite_weight_names_point_and_parameter(setup):
    net, _, X = setup
    sds = [{k: v.clone() for k, v in net.state_dict().items()} for _ in range(3)]
    sds[2]["2.bias"][1] = float("nan")
    traj = pkfast.Trajectory.from_checkpoints(sds, lr=0.1)
    with pytest.raises(ValueError, match=r"weight point w_2 has non-finite values in '2.bias' \(1 NaN, 0 Inf\)"):
        gram(net, traj, X, rule="trapezoid")


def test_inconsistent_tied_weights_in_trajectory():
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(3, 3)
            self.b = nn.Linear(3, 3)
            self.b.weight = self.a.weight

        def forward(self, x):
            return self.b(torch.tanh(self.a(x)))

    net = Tied()
    sd = {k: v.clone() for k, v in net.state_dict().items()}
    sd2 = {k: v.clone() for k, v in sd.items()}
    sd2["b.weight"] += 1.0
    traj = pkfast.Trajectory.from_checkpoints([sd, sd2], lr=0.1)
    with pytest.raises(ValueError, match=r"'a.weight' and 'b.weight' are one \(tied\) tensor .* at point w_1"):
        gram(net, traj, torch.randn(2, 3), rule="trapezoid")


def test_bad_step_sizes():
    net = mlp()
    sd = {k: v.clone() for k, v in net.state_dict().items()}
    with pytest.raises(ValueError, match=r"step sizes must be finite and >= 0; step 1 has -0.1"):
        pkfast.Trajectory.from_checkpoints([sd, sd, sd], lr=[0.1, -0.1])


def test_plan_names_a_misspelt_option():
    net = torch.nn.Linear(3, 2)
    traj = pkfast.Trajectory.from_checkpoints([net.state_dict(), net.state_dict()], lr=0.1)
    with pytest.raises(TypeError, match=r"pkfast.plan: unknown option\(s\) 'outptus'; expected some of .*outputs"):
        pkfast.plan(net, traj, torch.randn(4, 3), outptus="full")


def _vocab_lm():
    """A vocabulary-sized head: 3,000 outputs, so one sample's trace panel alone is ~35 MiB."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Embedding(3000, 32), torch.nn.Flatten(), torch.nn.Linear(128, 64),
                              torch.nn.Tanh(), torch.nn.Linear(64, 3000))
    traj = pkfast.Trajectory.from_checkpoints([net.state_dict(), net.state_dict()], lr=0.1)
    return net, traj, torch.randint(0, 3000, (16, 4))


def test_plan_prints_what_does_not_fit_and_what_to_do():
    """Defect 7: plan() raised when one tile did not fit; now it prints the plan, marks the largest layers and
    names the cheaper kernels, while gram() with the same options refuses with the same figures."""
    net, traj, X = _vocab_lm()
    # (with its head collapsed, the default, this LM fits: issue 28; every output's gradient does not)
    assert not pkfast.plan(net, traj, X, memory_budget="64MiB").tiles.problem
    p = pkfast.plan(net, traj, X, memory_budget="64MiB", head=None)
    text = str(p)
    assert p.tiles.problem and p.tiles.tiles == []
    assert "DOES NOT FIT: pkfast.plan: memory_budget of 67,108,864 bytes is too small for one tile" in text
    assert re.search(r"largest per sample: 4 \(Linear, [\d.]+ MiB, 9\d%\)", text)
    assert "of='loss'" in text and "method='sketch'" in text and f"at least {p.tiles.tile_bytes:,} bytes" in text
    with pytest.raises(ValueError, match=r"pkfast.gram: memory_budget of 67,108,864 bytes is too small for one "
                                         r"tile.*cheaper kernel: of='loss'.*pkfast.plan\(\.\.\.\)"):
        pkfast.gram(net, traj, X, memory_budget="64MiB", progress=False, head=None)
    # the loss kernel it suggests fits the same budget
    assert not pkfast.plan(net, traj, X, memory_budget="64MiB", of="loss", y=torch.randint(0, 3000, (16,)),
                           loss="cross_entropy").tiles.problem


def test_plan_counts_the_measured_per_sample_pass(setup):
    """The tiling holds what one per-sample pass takes at its peak (measured), and the plan says how much."""
    p = pkfast.plan(*setup, memory_budget="1GiB", method="jacobian")
    assert p.tiles.pass_bytes > 0 and p.tiles.pass_bytes <= p.tiles.tile_bytes
    assert f"one pass over {p.tiles.chunk} samples holds" in repr(p.tiles)


class _Compiled(nn.Module):
    """A module named like torch.compile's wrapper (its parameters under ``_orig_mod.``), without compiling."""

    def __init__(self, inner):
        super().__init__()
        self._orig_mod = inner

    def forward(self, x):
        return self._orig_mod(x)


def test_a_trajectory_of_a_compiled_module_loads_into_the_plain_one_and_back():
    """torch.compile prefixes parameter names with '_orig_mod.': pkfast matches them with the prefix added or
    dropped (unambiguous here), and the Gram is the one of the plain names."""
    torch.manual_seed(0)
    net = mlp(hidden=6).double()
    X = torch.randn(4, 5, dtype=torch.float64)
    traj = random_trajectory(net, steps=2)
    K = pkfast.gram(net, traj, X, progress=False)
    pts = [traj.point(k) for k in range(traj.num_steps + 1)]
    compiled_traj = pkfast.Trajectory.from_checkpoints([{f"_orig_mod.{n}": t for n, t in p.items()} for p in pts],
                                                       lr=traj.step_sizes.tolist())
    assert compiled_traj.names[0].startswith("_orig_mod.")
    torch.testing.assert_close(pkfast.gram(net, compiled_traj, X, progress=False), K, rtol=1e-12, atol=0)
    torch.testing.assert_close(pkfast.gram(_Compiled(net), traj, X, progress=False), K, rtol=1e-12, atol=0)
    compiled = torch.compile(net)  # the real wrapper's names (it compiles only when called)
    assert sorted(n for n, _ in compiled.named_parameters()) == sorted(compiled_traj.names)


def test_an_ambiguous_compile_prefix_is_named_in_the_error():
    torch.manual_seed(0)
    net = mlp(hidden=6).double()
    traj = random_trajectory(net, steps=1)
    both = [dict(p, **{f"_orig_mod.{n}": t for n, t in p.items()}) for p in (traj.point(0), traj.point(1))]
    twice = pkfast.Trajectory.from_checkpoints(both, lr=0.1)
    with pytest.raises(ValueError, match=r"matches no parameter or buffer.*torch\.compile'd module.*2 entries that "
                                         r"match it with '_orig_mod\.' added or dropped.*ambiguous"):
        pkfast.gram(_Compiled(net), twice, torch.randn(3, 5, dtype=torch.float64), progress=False)
    with pytest.raises(ValueError, match=r"trajectory entry '_orig_mod\.0\.weight' matches no parameter.*"
                                         r"so the match is ambiguous"):
        pkfast.gram(net, twice, torch.randn(3, 5, dtype=torch.float64), progress=False)
