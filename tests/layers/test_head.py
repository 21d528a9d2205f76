"""The structured output head (pkfast.layers.head): the trace kernel over a final Linear's V outputs through its
d×d metric and the full V×V blocks through W = QR, exact against the float64 reference; and where it must not be
used, it is not."""

import numpy as np
import pytest
import torch
from torch import nn

import pkfast
from pkfast.layers.head import find_head
from pkfast.reference import gram_reference
from tests.models import random_trajectory

F64 = dict(dtype=torch.float64, progress=False)


class LM(nn.Module):
    """Embedding → Linear → tanh → head, outputs [n, L, V] (or the last position's [n, V])."""

    def __init__(self, V=40, d=6, last=False, tied=False, after=None, conv1d=False):
        super().__init__()
        self.emb = nn.Embedding(V, d)
        self.mid = nn.Linear(d, d)
        if conv1d:
            from transformers.pytorch_utils import Conv1D
            self.head = Conv1D(V, d)  # weight [d, V]
        else:
            self.head = nn.Linear(d, V)
        if tied:
            self.head.weight = self.emb.weight
        self.last, self.after = last, after

    def forward(self, x):
        y = self.head(torch.tanh(self.mid(self.emb(x))))
        y = y[:, -1] if self.last else y
        return y if self.after is None else self.after(y)


def _case(seed=0, n=5, L=3, **kw):
    torch.manual_seed(seed)
    net = LM(**kw).double()
    return net, random_trajectory(net, steps=2, seed=seed), torch.randint(0, 40, (n, L))


def _rel(a, b):
    return float((a - b).abs().max() / b.abs().max())


def _collapsed(net, traj, X, **kw):
    return "structured head" in str(pkfast.plan(net, traj, X, dtype=torch.float64, **kw))


@pytest.mark.parametrize("kw", [dict(), dict(last=True), dict(conv1d=True)], ids=["sequence", "last", "conv1d"])
def test_head_trace_mean_diagonal_cross_exact(kw):
    net, traj, X = _case(**kw)
    X2 = torch.randint(0, 40, (3, X.shape[1]))
    assert _collapsed(net, traj, X)
    for opts in (dict(), dict(outputs="mean"), dict(rule="trapezoid"), dict(method="materialized"),
                 dict(method="jacobian")):
        K = pkfast.gram(net, traj, X, **F64, **opts)
        ref = gram_reference(net, traj, X, outputs=opts.get("outputs", "trace"), rule=opts.get("rule", "left"))
        assert _rel(K, ref) <= 1e-10, opts
    assert _rel(pkfast.gram(net, traj, X, X2, **F64), gram_reference(net, traj, X, X2)) <= 1e-10
    assert _rel(pkfast.gram(net, traj, X, diagonal=True, **F64), gram_reference(net, traj, X, diagonal=True)) <= 1e-10


def test_mean_divides_by_the_models_outputs_and_the_manifest_says_so(tmp_path):
    net, traj, X = _case()
    Km = pkfast.gram(net, traj, X, outputs="mean", **F64)
    Kt = pkfast.gram(net, traj, X, **F64)
    assert _rel(Km * (3 * 40), Kt) <= 1e-12  # C = L·V = 120, not the collapsed 3·7
    pkfast.gram(net, traj, X, out=tmp_path / "K.npy", **F64)
    g = pkfast.open_gram(tmp_path / "K.npy")
    assert g.manifest["options"]["head"] == {"name": "head", "type": "Linear", "d": 6, "V": 40}
    assert g.manifest["num_outputs"] == 120


@pytest.mark.parametrize("kw, why", [
    (dict(after=lambda y: torch.log_softmax(y, -1)), "selection"),
    (dict(after=lambda y: y + 1.0), "selection"),
], ids=["softmax", "bias-after"])
def test_not_collapsed_where_the_identity_does_not_hold(kw, why):
    net, traj, X = _case(**kw)
    assert not _collapsed(net, traj, X)
    got = find_head(net, None, None, X[:2])
    assert isinstance(got, str) and why in got
    assert _rel(pkfast.gram(net, traj, X, **F64), gram_reference(net, traj, X)) <= 1e-10
    with pytest.raises(ValueError, match="head='head' cannot be collapsed"):
        pkfast.gram(net, traj, X, head="head", **F64)


@pytest.mark.parametrize("kw", [dict(), dict(last=True), dict(conv1d=True)], ids=["sequence", "last", "conv1d"])
def test_full_blocks_through_the_head_exact(kw):
    net, traj, X = _case(**kw)
    X2 = torch.randint(0, 40, (3, X.shape[1]))
    plan = str(pkfast.plan(net, traj, X, dtype=torch.float64, outputs="full"))
    assert "the full 40×40 blocks through W = QR" in plan
    for opts in (dict(), dict(rule="trapezoid"), dict(method="jacobian"), dict(memory_budget=1_200_000)):
        for diag in (False, True):
            K = pkfast.gram(net, traj, X, outputs="full", diagonal=diag, **F64, **opts)
            ref = gram_reference(net, traj, X, outputs="full", diagonal=diag, rule=opts.get("rule", "left"))
            assert K.shape == ref.shape and _rel(K, ref) <= 1e-10, (opts, diag)
    K = pkfast.gram(net, traj, X, X2, outputs="full", **F64)
    assert _rel(K, gram_reference(net, traj, X, X2, outputs="full")) <= 1e-10
    # the exact rule's node sides (each term split into single-point terms): as without the collapse
    K = pkfast.gram(net, traj, X, X2, outputs="full", rule="exact", **F64)
    assert _rel(K, pkfast.gram(net, traj, X, X2, outputs="full", rule="exact", head=None, **F64)) <= 1e-10


def test_full_blocks_memory_and_store(tmp_path):
    net, traj, X = _case()
    K = pkfast.gram(net, traj, X, outputs="full", out=tmp_path / "K.npy", memory_budget=1_200_000, **F64)
    g = pkfast.open_gram(tmp_path / "K.npy")
    assert g.shape == (5, 5, 120, 120) and g.manifest["num_outputs"] == 120
    assert _rel(torch.as_tensor(np.asarray(g.array)), gram_reference(net, traj, X, outputs="full")) <= 1e-10
    # the tiling charges the expanded [C, C] blocks (and the collapsed part) to the budget
    tiles = pkfast.plan(net, traj, X, outputs="full", memory_budget=1_200_000, dtype=torch.float64).tiles
    assert len(tiles.tiles) > 1 and tiles.tile_bytes <= 1_200_000


def test_loss_kernel_does_not_collapse():
    net, traj, X = _case(last=True)
    y = torch.randint(0, 40, (X.shape[0],))
    assert not _collapsed(net, traj, X, of="loss", loss=nn.CrossEntropyLoss(), y=y)
    with pytest.raises(ValueError, match="of='loss'"):
        pkfast.gram(net, traj, X, of="loss", loss=nn.CrossEntropyLoss(), y=y, head="head", **F64)


def test_head_none_computes_every_output():
    net, traj, X = _case()
    assert not _collapsed(net, traj, X, head=None)
    with pytest.raises(TypeError, match="head must be"):
        pkfast.gram(net, traj, X, head=3, **F64)


def _gpt2(tied):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.GPT2Config(vocab_size=48, n_positions=8, n_embd=8, n_layer=1, n_head=2,
                                  tie_word_embeddings=tied, attn_pdrop=0.0, resid_pdrop=0.0, embd_pdrop=0.0)
    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(cfg).double().eval()


def test_hf_gpt2_untied_head_through_output_fn():
    net = _gpt2(tied=False)
    traj = random_trajectory(net, steps=1, scale=0.02)
    X = torch.randint(0, 48, (3, 5))
    last = lambda out: out.logits[:, -1]  # noqa: E731
    plan = str(pkfast.plan(net, traj, X, dtype=torch.float64, output_fn=last))
    assert "structured head 'lm_head' (Linear 8→48)" in plan
    K = pkfast.gram(net, traj, X, output_fn=last, **F64)
    K0 = pkfast.gram(net, traj, X, output_fn=last, head=None, **F64)
    assert _rel(K, K0) <= 1e-10
    for diag in (False, True):  # the full blocks through the head, against every output's gradient
        K = pkfast.gram(net, traj, X, output_fn=last, outputs="full", diagonal=diag, **F64)
        K0 = pkfast.gram(net, traj, X, output_fn=last, outputs="full", diagonal=diag, head=None, **F64)
        assert _rel(K, K0) <= 1e-10


def test_full_blocks_float32_close_to_float64():
    net, traj, X = _case()
    K32 = pkfast.gram(net.float(), traj, X, outputs="full", dtype=torch.float32, progress=False)
    assert K32.dtype == torch.float32 and _rel(K32.double(), gram_reference(net, traj, X, outputs="full")) <= 1e-5


def test_vocabulary_sized_head_fits_where_every_output_did_not():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Embedding(32000, 16), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 32000))
    traj = random_trajectory(net, steps=1, scale=0.01)
    X = torch.randint(0, 32000, (4, 1))
    plan = pkfast.plan(net, traj, X, memory_budget="512MiB")
    assert "17 output gradients per position instead of 32,000" in str(plan)
    K = pkfast.gram(net, traj, X, memory_budget="512MiB", progress=False)
    assert K.shape == (4, 4) and torch.isfinite(K).all() and torch.allclose(K, K.T)
    # the head's own part alone is V·(h·h′ + 1) per step: a lower bound the lower layers add to
    assert float(K.diagonal().min()) > 0.1 * 32000


def test_kernel_machine_coefficients_through_the_head(tmp_path):
    """The kernel machine's Domingos coefficients divide by the output-trace path kernel, which goes through the
    collapsed head (V = 12 outputs, hidden width 3): they agree with the kernel computed over every output."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 12)).double()
    X = torch.randn(10, 4, dtype=torch.float64)
    y = torch.randint(0, 12, (10,))
    opt = torch.optim.SGD(net.parameters(), lr=0.3)
    with pkfast.TrajectoryRecorder(net, opt, tmp_path / "t", loss=nn.CrossEntropyLoss(), targets=y) as rec:
        for _ in range(3):
            opt.zero_grad()
            nn.CrossEntropyLoss()(net(X), y).backward()
            opt.step()
            rec.step(batch_indices=range(10))
    traj = pkfast.Trajectory.load(tmp_path / "t")
    Xq = torch.randn(3, 4, dtype=torch.float64)
    assert _collapsed(net, traj, Xq, X2=X, rule="left")
    km = pkfast.KernelMachine(net, traj, X, rule="left", progress=False)
    a, c = km.coefficients(Xq), km.contributions(Xq)
    kp = pkfast.gram(net, traj, Xq, X, rule="left", head=None, **F64)  # every output's gradient
    ok = ~torch.isnan(a[..., 0])
    assert ok.sum() >= 25
    assert torch.allclose((a * kp.unsqueeze(-1))[ok], c[ok], rtol=1e-10, atol=1e-14)


class TiedToLinear(nn.Module):
    """A head whose weight another Linear holds too: not a lookup, so no collapse."""

    def __init__(self):
        super().__init__()
        self.inp, self.head, self.other = nn.Linear(40, 6), nn.Linear(6, 40), nn.Linear(6, 40)
        self.other.weight = self.head.weight

    def forward(self, x):
        return self.head(torch.tanh(self.inp(x)))


@pytest.mark.parametrize("kw", [dict(tied=True), dict(tied=True, last=True)], ids=["sequence", "last"])
def test_tied_head_trace_exact(kw):
    """A head tied to the input embedding: the trace, mean and diagonal through its metric plus the cross term
    between the lookup and the head, against the float64 reference."""
    net, traj, X = _case(**kw)
    X2 = torch.randint(0, 40, (3, X.shape[1]))
    assert "tied to 'emb'" in str(pkfast.plan(net, traj, X, dtype=torch.float64))
    for opts in (dict(), dict(outputs="mean"), dict(rule="trapezoid"), dict(method="materialized"),
                 dict(method="jacobian"), dict(memory_budget=400_000)):
        K = pkfast.gram(net, traj, X, **F64, **opts)
        ref = gram_reference(net, traj, X, outputs=opts.get("outputs", "trace"), rule=opts.get("rule", "left"))
        assert _rel(K, ref) <= 1e-10, opts
    assert _rel(pkfast.gram(net, traj, X, X2, **F64), gram_reference(net, traj, X, X2)) <= 1e-10
    assert _rel(pkfast.gram(net, traj, X, diagonal=True, **F64), gram_reference(net, traj, X, diagonal=True)) <= 1e-10
    # many tiles (each side's cross features kept for the next tile of the same samples)
    net48, traj48, X48 = _case(n=48, **kw)
    assert len(pkfast.plan(net48, traj48, X48, dtype=torch.float64, memory_budget=300_000).tiles.tiles) > 1
    assert _rel(pkfast.gram(net48, traj48, X48, memory_budget=300_000, **F64), gram_reference(net48, traj48, X48)) <= 1e-10
    # without the cross term the kernel would be another one: the test can tell
    untied = pkfast.gram(net, traj, X, head=None, **F64)
    from pkfast.layers import tied as tied_mod
    add = tied_mod.TiedCross.add
    try:
        tied_mod.TiedCross.add = lambda *a, **k: None
        assert _rel(pkfast.gram(net, traj, X, **F64), untied) > 1e-5  # (measured 8e-4: 7 orders above the tolerance)
    finally:
        tied_mod.TiedCross.add = add


def test_tied_head_with_padding_idx_and_full_blocks_refused():
    net, traj, X = _case(tied=True)
    net.emb.padding_idx = 0
    X[:, 0] = 0
    assert _rel(pkfast.gram(net, traj, X, **F64), gram_reference(net, traj, X)) <= 1e-10
    # the full blocks' cross terms need every output: not collapsed (and a named head says why)
    assert not _collapsed(net, traj, X, outputs="full")
    with pytest.raises(ValueError, match="tied to 'emb'"):
        pkfast.gram(net, traj, X, outputs="full", head="head", **F64)
    assert _rel(pkfast.gram(net, traj, X, outputs="full", diagonal=True, **F64),
                gram_reference(net, traj, X, outputs="full", diagonal=True)) <= 1e-10


def test_exact_rule_trace_does_not_collapse():
    """rule='exact' pairs each step's start with Gauss nodes inside it, where the head differs: the trace through
    one metric WᵀW would be wrong (it was, by 7%), so it is computed over every output."""
    for kw in (dict(), dict(tied=True)):
        net, traj, X = _case(**kw)
        assert not _collapsed(net, traj, X, rule="exact")
        with pytest.raises(ValueError, match="rule='exact'"):
            pkfast.gram(net, traj, X, rule="exact", head="head", **F64)
        K0 = pkfast.gram(net, traj, X, rule="exact", head=None, **F64)
        assert _rel(pkfast.gram(net, traj, X, rule="exact", **F64), K0) <= 1e-12


def test_head_tied_to_a_non_lookup_is_not_collapsed():
    torch.manual_seed(0)
    net = TiedToLinear().double()
    got = find_head(net, None, None, torch.randn(2, 40, dtype=torch.float64))
    assert isinstance(got, str) and "other than one nn.Embedding lookup" in got


def test_hf_gpt2_tied_head():
    net = _gpt2(tied=True)
    assert net.lm_head.weight is net.transformer.wte.weight
    traj = random_trajectory(net, steps=1, scale=0.02)
    X = torch.randint(0, 48, (3, 5))
    for fn in (lambda out: out.logits[:, -1], lambda out: out.logits):
        plan = str(pkfast.plan(net, traj, X, dtype=torch.float64, output_fn=fn))
        assert "structured head 'lm_head' (Linear 8→48)" in plan and "tied to 'transformer.wte'" in plan
        for diag in (False, True):
            K = pkfast.gram(net, traj, X, output_fn=fn, diagonal=diag, **F64)
            K0 = pkfast.gram(net, traj, X, output_fn=fn, diagonal=diag, head=None, **F64)
            assert _rel(K, K0) <= 1e-10
