"""pkfast.gram against the float64 reference on MLPs and CNNs, every output mode, rule, tiling and input form."""

import pytest
import torch
from torch import nn

import pkfast
from pkfast.engine.driver import GramJob
from pkfast.reference import gram_reference
from tests._util import RTOL, rel_err
from tests.models import SmallCNN, mlp, random_trajectory

OUTPUTS = ["trace", "mean", "full"]
RULES = ["left", "trapezoid"]


def _case(kind):
    if kind == "mlp":
        net = mlp()
        X, X2 = torch.randn(10, 5), torch.randn(6, 5)
    else:
        net = SmallCNN()
        X, X2 = torch.randn(7, 1, 6, 6), torch.randn(4, 1, 6, 6)
    return net, random_trajectory(net, steps=3), X, X2


@pytest.mark.parametrize("kind", ["mlp", "cnn"])
@pytest.mark.parametrize("outputs", OUTPUTS)
@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("cross", [False, True], ids=["X2=None", "X2"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
def test_gram_matches_reference(kind, outputs, rule, cross, dtype):
    net, traj, X, X2 = _case(kind)
    X2 = X2 if cross else None
    K = pkfast.gram(net, traj, X, X2, outputs=outputs, rule=rule, dtype=dtype, progress=False)
    R = gram_reference(net, traj, X, X2, outputs=outputs, rule=rule)
    assert K.dtype == dtype and K.shape == R.shape
    assert rel_err(K, R) < RTOL[dtype], f"{kind} {outputs} {rule} cross={cross} {dtype}"


@pytest.mark.parametrize("kind", ["mlp", "cnn"])
@pytest.mark.parametrize("outputs", OUTPUTS)
@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
def test_diagonal_matches_reference(kind, outputs, rule, dtype):
    net, traj, X, _ = _case(kind)
    K = pkfast.gram(net, traj, X, outputs=outputs, rule=rule, diagonal=True, dtype=dtype, progress=False)
    R = gram_reference(net, traj, X, outputs=outputs, rule=rule, diagonal=True)
    C = 3 if kind == "mlp" else 4
    assert K.shape == ((X.shape[0], C, C) if outputs == "full" else (X.shape[0],))
    assert rel_err(K, R) < RTOL[dtype]


@pytest.mark.parametrize("outputs", OUTPUTS)
@pytest.mark.parametrize("cross", [False, True], ids=["X2=None", "X2"])
def test_ragged_tiles_with_tiny_budget(outputs, cross):
    net = mlp()
    traj = random_trajectory(net, steps=2)
    X, X2 = torch.randn(37, 5), torch.randn(23, 5) if cross else None
    budget = 40_000
    job = GramJob.create(net, traj, X, X2, outputs=outputs, dtype=torch.float64, memory_budget=budget)
    shapes = [t.shape for t in job.tiling.tiles]
    assert len(shapes) > 3, job.tiling
    assert any(r != job.tiling.row_block or c != job.tiling.col_block for r, c in shapes), "no ragged tile"
    assert job.tiling.tile_bytes <= budget
    K = job.run(progress=False)
    R = gram_reference(net, traj, X, X2, outputs=outputs)
    assert rel_err(K, R) < 1e-10


def test_trace_is_sum_of_full_block_diagonals_and_mean_divides_by_C():
    net, traj, X, X2 = _case("mlp")
    full = pkfast.gram(net, traj, X, X2, outputs="full", dtype=torch.float64, progress=False)
    trace = pkfast.gram(net, traj, X, X2, outputs="trace", dtype=torch.float64, progress=False)
    mean = pkfast.gram(net, traj, X, X2, outputs="mean", dtype=torch.float64, progress=False)
    torch.testing.assert_close(trace, torch.diagonal(full, dim1=-2, dim2=-1).sum(-1), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(mean, trace / 3, rtol=1e-12, atol=1e-12)
    diag = pkfast.gram(net, traj, X, outputs="full", diagonal=True, dtype=torch.float64, progress=False)
    fullsq = pkfast.gram(net, traj, X, outputs="full", dtype=torch.float64, progress=False)
    torch.testing.assert_close(diag, torch.stack([fullsq[a, a] for a in range(X.shape[0])]), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("outputs", ["trace", "full"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
def test_symmetric_gram_is_symmetric_and_psd(outputs, dtype):
    net = SmallCNN()
    traj = random_trajectory(net, steps=3)
    X = torch.randn(21, 1, 6, 6)
    K = pkfast.gram(net, traj, X, outputs=outputs, dtype=dtype, memory_budget=200_000, progress=False)
    M = K if outputs == "trace" else K.permute(0, 2, 1, 3).reshape(21 * 4, 21 * 4)
    assert torch.equal(M, M.T), "mirrored tiles must make the Gram exactly symmetric"
    ev = torch.linalg.eigvalsh(M.double())
    assert ev.min() >= -1e-6 * ev.max()


def test_numpy_inputs_are_accepted_and_equal_tensor_inputs():
    net, traj, X, X2 = _case("mlp")
    K_np = pkfast.gram(net, traj, X.numpy(), X2.numpy(), progress=False)
    K_t = pkfast.gram(net, traj, X, X2, progress=False)
    torch.testing.assert_close(K_np, K_t)


def test_permutation_equivariance():
    net, traj, X, _ = _case("mlp")
    perm = torch.randperm(X.shape[0])
    K = pkfast.gram(net, traj, X, dtype=torch.float64, progress=False)
    Kp = pkfast.gram(net, traj, X[perm], dtype=torch.float64, progress=False)
    torch.testing.assert_close(Kp, K[perm][:, perm], rtol=1e-12, atol=1e-12)


def test_only_trainable_parameters_enter_the_kernel():
    net = mlp()
    net[0].weight.requires_grad_(False)  # frozen: does not move, not in J
    traj = random_trajectory(net, steps=2)
    X = torch.randn(6, 5)
    job = GramJob.create(net, traj, X, dtype=torch.float64)
    P_trainable = sum(p.numel() for p in net.parameters() if p.requires_grad)
    assert job.fm.num_params == P_trainable
    K = job.run(progress=False)
    R = gram_reference(net, traj, X)
    assert rel_err(K, R) < 1e-10
    net[0].weight.requires_grad_(True)
    K_all = pkfast.gram(net, traj, X, dtype=torch.float64, progress=False)
    assert rel_err(K_all, K) > 1e-3  # the frozen weight's gradients really were left out


class Tied(nn.Module):
    """An encoder and decoder sharing one weight: the shared tensor must be counted once."""

    def __init__(self):
        super().__init__()
        self.enc = nn.Linear(4, 6, bias=False)
        self.dec = nn.Linear(6, 4, bias=True)
        self.mid = nn.Linear(6, 6)
        self.dec.weight = nn.Parameter(torch.randn(4, 6))
        self.enc.weight = self.dec.weight  # enc uses dec.weight [4, 6]; used transposed below

    def forward(self, x):
        h = torch.tanh(x @ self.enc.weight)
        return self.dec(torch.tanh(self.mid(h)))


def test_tied_weights_counted_once():
    net = Tied()
    traj = random_trajectory(net, steps=2)  # state_dict lists the shared tensor under both names
    X = torch.randn(5, 4)
    job = GramJob.create(net, traj, X, dtype=torch.float64)
    assert job.fm.num_params == sum(p.numel() for p in net.parameters())
    K = job.run(progress=False)
    R = gram_reference(net, traj, X)
    assert rel_err(K, R) < 1e-10


def test_buffers_are_passed_through_eval_batchnorm():
    net = nn.Sequential(nn.Linear(5, 6), nn.BatchNorm1d(6), nn.Tanh(), nn.Linear(6, 2))
    net[1].running_mean.uniform_(-1, 1)
    net[1].running_var.uniform_(0.5, 2.0)
    net.eval()
    traj = random_trajectory(net, steps=2)
    X = torch.randn(8, 5)
    K = pkfast.gram(net, traj, X, dtype=torch.float64, progress=False)
    R = gram_reference(net, traj, X)
    assert rel_err(K, R) < 1e-10
    net[1].running_var.fill_(1.0)  # buffers recorded in the trajectory win over the model's
    K2 = pkfast.gram(net, traj, X, dtype=torch.float64, progress=False)
    torch.testing.assert_close(K2, K)


class TokenModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(11, 4)
        self.head = nn.Linear(4 * 3, 2)

    def forward(self, tokens):
        return self.head(torch.tanh(self.emb(tokens)).flatten(1))


def test_integer_inputs_embedding_model():
    net = TokenModel()
    traj = random_trajectory(net, steps=2)
    X = torch.randint(0, 11, (9, 3))
    K = pkfast.gram(net, traj, X, dtype=torch.float64, progress=False)
    R = gram_reference(net, traj, X)
    assert rel_err(K, R) < 1e-10


def test_scalar_output_model():
    net = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 1))
    traj = random_trajectory(net, steps=2)
    X = torch.randn(6, 3)
    K = pkfast.gram(net, traj, X, outputs="full", dtype=torch.float64, progress=False)
    assert K.shape == (6, 6, 1, 1)
    assert rel_err(K, gram_reference(net, traj, X, outputs="full")) < 1e-10


def test_zero_step_sizes_give_zero_gram():
    net = mlp()
    traj = random_trajectory(net, steps=2, lr=[0.0, 0.0])
    K = pkfast.gram(net, traj, torch.randn(4, 5), progress=False)
    assert K.shape == (4, 4) and torch.count_nonzero(K) == 0


def test_memory_mapped_trajectory_gives_same_gram(tmp_path):
    net, traj, X, X2 = _case("mlp")
    traj.save(tmp_path / "traj")
    lazy = pkfast.Trajectory.load(tmp_path / "traj")
    assert lazy.is_memory_mapped
    torch.testing.assert_close(pkfast.gram(net, lazy, X, X2, progress=False), pkfast.gram(net, traj, X, X2, progress=False))


def test_jacobian_chunking_does_not_change_result():
    net, traj, X, _ = _case("cnn")
    job = GramJob.create(net, traj, X, dtype=torch.float64)
    from pkfast.engine.quadrature import EvalPoint

    combo = ((EvalPoint(1), 1.0),)
    J1 = job.fm.jacobian(combo, X, chunk=1)
    J7 = job.fm.jacobian(combo, X, chunk=7)
    J3 = job.fm.jacobian(combo, X, chunk=3)
    torch.testing.assert_close(J1, J7, rtol=0, atol=1e-14)
    torch.testing.assert_close(J3, J7, rtol=0, atol=1e-14)


def test_progress_bar_reports_and_can_be_disabled(capsys):
    net, traj, X, _ = _case("mlp")
    pkfast.gram(net, traj, X, progress=True)
    err = capsys.readouterr().err
    assert "pkfast.gram" in err and "pair" in err
    pkfast.gram(net, traj, X, progress=False)
    assert capsys.readouterr().err == ""


def test_model_parameters_untouched_and_grad_mode_respected():
    net, traj, X, _ = _case("mlp")
    before = {k: v.clone() for k, v in net.state_dict().items()}
    with torch.no_grad():
        K = pkfast.gram(net, traj, X, progress=False)
    assert K.abs().sum() > 0
    for k, v in net.state_dict().items():
        assert torch.equal(v, before[k])
    assert all(p.grad is None for p in net.parameters())


def test_memory_budget_string_and_plan_respects_it():
    net, traj, X, _ = _case("mlp")
    job = GramJob.create(net, traj, torch.randn(200, 5), memory_budget="64KiB")
    assert job.tiling.budget == 64 * 1024 and job.tiling.tile_bytes <= job.tiling.budget
    assert len(job.tiling.tiles) > 1


@pytest.mark.parametrize("outputs", ["trace", "full"])
def test_large_diagonal_tile_blocked_syrk_matches_reference(outputs):
    from pkfast.engine.accumulate.torch_blas import SYRK_MIN_BLOCK

    net = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    traj = random_trajectory(net, steps=2)
    n = 2 * SYRK_MIN_BLOCK + 5
    X = torch.randn(n, 3)
    job = GramJob.create(net, traj, X, outputs=outputs, dtype=torch.float64)
    assert len(job.tiling.tiles) == 1 and job.tiling.tiles[0].diagonal
    K = job.run(progress=False)
    assert rel_err(K, gram_reference(net, traj, X, outputs=outputs)) < 1e-10


def test_one_term_gram_reuses_each_row_panel(monkeypatch):
    """A one-step trajectory on a budget that forces tiles: each tile-row's Jacobian panel is computed once and
    kept for the next tiles of that row (tiles.solve_tiling(reuse_rows=True)); the Gram equals the reference."""
    from pkfast.engine.functional import FunctionalModel

    net = mlp().double()
    traj = random_trajectory(net, steps=1)
    X = torch.randn(40, 5, dtype=torch.float64)
    job = GramJob.create(net, traj, X, method="jacobian", dtype=torch.float64, memory_budget=40_000)
    tiles = job.tiling.tiles
    assert len(tiles) > 3 and len({t.rows.start for t in tiles}) < len(tiles)
    rows = []
    orig = FunctionalModel.jacobian

    def counting(self, combo, Xc, *a, **kw):
        rows.append(Xc.shape[0])
        return orig(self, combo, Xc, *a, **kw)

    monkeypatch.setattr(FunctionalModel, "jacobian", counting)
    K = job.run(progress=False)
    expected = sum(t.rows.stop - t.rows.start for t in tiles if t.diagonal) + \
        sum(t.cols.stop - t.cols.start for t in tiles if not t.diagonal)
    assert sum(rows) == expected  # each row panel once, plus the column panels
    assert rel_err(K, gram_reference(net, traj, X)) <= 1e-10
