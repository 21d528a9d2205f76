"""The factorised route (method="factorized"/"auto") against the float64 reference and the Jacobian route.

Tolerance: float64, relative Frobenius ≤ 1e-10 (RTOL[float64]) against :func:`pkfast.reference.gram_reference`;
float32 ≤ 1e-5. Models cover every supported layer kind and option: Linear (also over sequence positions),
Conv1d/Conv2d (stride, padding incl. 'same' and reflect, dilation, groups), Embedding (padding_idx), a
LayerNorm mixed with Linear layers (its affine through the norm rule), a layer called twice, tied
weights and a Linear subclass with its own forward (both routed to the Jacobian).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import pkfast
from pkfast import options as pk_options
from pkfast.engine.driver import GramJob
from pkfast.engine.routes import layered
from pkfast.reference import gram_reference
from tests._util import RTOL, rel_err
from tests.models import SmallCNN, mlp, random_trajectory

F64 = torch.float64


class Conv1dNet(nn.Module):
    """[n, 2, 11] sequences: dilation, 'same' padding with reflect mode, stride, groups, no bias."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv1d(2, 4, 3, padding="same", dilation=2, padding_mode="reflect")
        self.c2 = nn.Conv1d(4, 4, 2, stride=2, groups=2, bias=False)
        self.head = nn.Linear(4 * 5, 3)

    def forward(self, x):
        return self.head(torch.tanh(self.c2(torch.tanh(self.c1(x)))).flatten(1))


class SeqNet(nn.Module):
    """Token ids [n, 6] → Embedding (padding_idx 0) → LayerNorm → Linear over positions → mean pool → head."""

    def __init__(self, vocab: int = 9, d: int = 5) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, d, padding_idx=0)
        self.norm = nn.LayerNorm(d)
        self.mix = nn.Linear(d, d)
        self.head = nn.Linear(d, 2)

    def forward(self, ids):
        h = self.norm(self.emb(ids))
        h = torch.tanh(self.mix(h))
        return self.head(h.mean(dim=1))


class TwiceNet(nn.Module):
    """One Linear called twice (shared weights: its positions are the two calls), a Linear on a transposed
    sequence (positions first), and a bias-free layer."""

    def __init__(self) -> None:
        super().__init__()
        self.shared = nn.Linear(4, 4)
        self.seq = nn.Linear(3, 4, bias=False)
        self.head = nn.Linear(4, 2)

    def forward(self, x):  # x: [n, 4, 3]
        h = torch.tanh(self.seq(x.transpose(0, 1)).transpose(0, 1)).sum(1)  # the Linear sees [3?, n, 3]
        h = torch.tanh(self.shared(torch.tanh(self.shared(h))))
        return self.head(h)


class MyLinear(nn.Linear):
    def forward(self, x):
        return super().forward(x) * 2.0


class TiedNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(7, 4)
        self.mid = MyLinear(4, 4)
        self.out = nn.Linear(4, 7, bias=False)
        self.out.weight = self.emb.weight  # tied

    def forward(self, ids):
        return self.out(torch.tanh(self.mid(self.emb(ids).mean(1))))


class AttentionNet(nn.Module):
    """nn.MultiheadAttention between Linear layers: its out_proj (a Linear subclass) is never called as a module
    (the attention uses its weight through F.multi_head_attention_forward), which the planning-time gradient
    check must notice."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(3, 8)
        self.att = nn.MultiheadAttention(8, 2, batch_first=True)
        self.head = nn.Linear(8, 2)

    def forward(self, x):
        h = self.inp(x)
        a, _ = self.att(h, h, h)
        return self.head(torch.tanh(a).mean(1))


def _seq_ids(n: int, seed: int = 0, vocab: int = 9) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (n, 6), generator=g)
    ids[:, -1] = 0  # padding at the end of every sequence
    return ids


CASES = {
    "mlp": (lambda: mlp(), lambda n, s: torch.randn(n, 5, generator=torch.Generator().manual_seed(s))),
    "cnn": (SmallCNN, lambda n, s: torch.randn(n, 1, 6, 6, generator=torch.Generator().manual_seed(s))),
    "conv1d": (Conv1dNet, lambda n, s: torch.randn(n, 2, 11, generator=torch.Generator().manual_seed(s))),
    "seq": (SeqNet, _seq_ids),
    "twice": (TwiceNet, lambda n, s: torch.randn(n, 4, 3, generator=torch.Generator().manual_seed(s))),
    "tied": (TiedNet, lambda n, s: torch.randint(0, 7, (n, 3), generator=torch.Generator().manual_seed(s))),
    "attention": (lambda: AttentionNet().eval(), lambda n, s: torch.randn(n, 5, 3, generator=torch.Generator().manual_seed(s))),
}


def _setup(name: str, n: int = 6, m: int = 4):
    make, data = CASES[name]
    torch.manual_seed(0)
    net = make().to(F64)
    traj = random_trajectory(net, steps=2, scale=0.2)
    X, X2 = data(n, 1), data(m, 2)
    if X.is_floating_point():
        X, X2 = X.to(F64), X2.to(F64)
    return net, traj, X, X2


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("outputs", ["trace", "full"])
@pytest.mark.parametrize("cross", [False, True], ids=["X2=None", "X2"])
def test_factorized_equals_reference(name, outputs, cross):
    net, traj, X, X2 = _setup(name)
    X2 = X2 if cross else None
    ref = gram_reference(net, traj, X, X2, outputs=outputs)
    for method in ("factorized", "auto"):
        K = pkfast.gram(net, traj, X, X2, outputs=outputs, method=method, dtype=F64, progress=False)
        assert K.shape == ref.shape
        assert rel_err(K, ref) <= RTOL[F64], (method, rel_err(K, ref))


@pytest.mark.parametrize("name", ["mlp", "cnn", "seq"])
@pytest.mark.parametrize("outputs", ["trace", "full"])
def test_factorized_diagonal_and_rules(name, outputs):
    net, traj, X, _ = _setup(name)
    for rule in ("trapezoid",):
        ref = gram_reference(net, traj, X, outputs=outputs, rule=rule)
        K = pkfast.gram(net, traj, X, outputs=outputs, rule=rule, method="factorized", dtype=F64, progress=False)
        assert rel_err(K, ref) <= RTOL[F64]
    refd = gram_reference(net, traj, X, outputs=outputs, diagonal=True)
    Kd = pkfast.gram(net, traj, X, outputs=outputs, diagonal=True, method="factorized", dtype=F64, progress=False)
    assert rel_err(Kd, refd) <= RTOL[F64]
    # the exact (asymmetric) rule: the Jacobian route is checked against brute force in test_exact.py
    for kw in (dict(), dict(diagonal=True)):
        J = pkfast.gram(net, traj, X, outputs=outputs, rule="exact", nodes=3, method="jacobian", dtype=F64, progress=False, **kw)
        K = pkfast.gram(net, traj, X, outputs=outputs, rule="exact", nodes=3, method="factorized", dtype=F64, progress=False, **kw)
        assert rel_err(K, J) <= RTOL[F64]
        if not kw:
            assert rel_err(K, K.transpose(0, 1)) > 1e-6  # genuinely asymmetric: nothing was mirrored


def test_loss_kernel_factorized():
    net, traj, X, X2 = _setup("mlp")
    y, y2 = torch.tensor([0, 1, 2, 0, 1, 2]), torch.tensor([2, 2, 1, 0])
    for loss, yy, yy2 in (("cross_entropy", y, y2), ("mse", torch.randn(6, 3, dtype=F64), torch.randn(4, 3, dtype=F64))):
        for X2_, y2_ in ((None, None), (X2, yy2)):
            kw = dict(of="loss", loss=loss, y=yy, y2=y2_, dtype=F64, progress=False)
            J = pkfast.gram(net, traj, X, X2_, method="jacobian", **kw)
            K = pkfast.gram(net, traj, X, X2_, method="factorized", **kw)
            assert rel_err(K, J) <= RTOL[F64]


def test_float32_and_tiny_tiles():
    """float32 against the float64 reference, with a memory budget small enough to force many tiles."""
    net, traj, X, X2 = _setup("cnn", n=9, m=5)
    ref = gram_reference(net, traj, X, X2)
    net32 = net.float()
    K = pkfast.gram(net32, traj, X.float(), X2.float(), method="factorized", memory_budget=40_000, progress=False)
    job = GramJob.create(net32, traj, X.float(), X2.float(), method="factorized",
                                                    memory_budget=40_000)
    assert len(job.tiling.tiles) > 1
    assert rel_err(K, ref) <= RTOL[torch.float32]


def test_subblocked_products(monkeypatch):
    """Positions S > 1 with a workspace of a few pairs: the products are cut into many sub-blocks."""
    monkeypatch.setattr(layered, "WORKSPACE_BYTES", 4000)
    for name in ("cnn", "seq"):
        net, traj, X, X2 = _setup(name)
        for outputs in ("trace", "full"):
            ref = gram_reference(net, traj, X, X2, outputs=outputs)
            K = pkfast.gram(net, traj, X, X2, outputs=outputs, method="factorized", dtype=F64, progress=False)
            assert rel_err(K, ref) <= RTOL[F64]


def test_triton_backend_serves_factorized_products():
    """The factorised GEMMs through the Triton kernel (interpreter on CPU; small shapes)."""
    from pkfast.engine.accumulate.triton_launch import triton_status

    ok, why = triton_status()
    if not ok:
        pytest.skip(why)
    net, traj, X, X2 = _setup("mlp", n=5, m=3)
    net, X, X2 = net.float(), X.float(), X2.float()
    ref = gram_reference(net, traj, X, X2, outputs="full")
    K = pkfast.gram(net, traj, X, X2, outputs="full", method="factorized", backend="triton", progress=False)
    assert rel_err(K, ref) <= RTOL[torch.float32]


def test_auto_records_and_prints_the_routes_it_used(tmp_path):
    """method="auto" on a model whose layers take different routes: the plan's header, its .routes and the
    stored manifest say which (not just "factorized"), and the stored method is the one asked for."""
    net, traj, X, _ = _setup("seq")
    p = pkfast.plan(net, traj, X)
    counts = {}
    for L in p.layers:
        counts[L.method] = counts.get(L.method, 0) + 1
    assert len(counts) >= 2, counts  # a mix: factorised linears, the materialised embedding and norm
    want = "auto: " + ", ".join(f"{m} {counts[m]}" for m in ("factorized", "materialized", "jacobian", "unused")
                                if m in counts) + " layers"
    assert p.routes == want and f"method='auto' → {want}" in str(p)
    pkfast.gram(net, traj, X, dtype=F64, progress=False, out=tmp_path / "g.npy")
    opts = pkfast.open_gram(tmp_path / "g.npy").options
    assert opts["method"] == "auto" and opts["summary"] == want
    assert opts["routes"] == [f"{L.name}:{L.method}" for L in p.layers]


def test_stored_factorized_equals_in_memory(tmp_path):
    net, traj, X, _ = _setup("seq")
    K = pkfast.gram(net, traj, X, method="factorized", dtype=F64, progress=False)
    S = pkfast.gram(net, traj, X, method="factorized", dtype=F64, progress=False, out=tmp_path / "g.npy")
    assert np.array_equal(np.asarray(S), K.numpy())
    opts = pkfast.open_gram(tmp_path / "g.npy").options
    assert opts["method"] == "factorized" and "emb:factorized" in opts["routes"]
    with pytest.raises(pkfast.store.writer.StoreError, match="options"):
        pkfast.gram(net, traj, X, method="jacobian", dtype=F64, progress=False, out=tmp_path / "g.npy")


# ---------------------------------------------------------------------------------------------- the plan
def _routes(p) -> dict[str, str]:
    return {L.name: L.method for L in p.layers}


def test_plan_mlp_is_factorized():
    net = nn.Sequential(nn.Linear(64, 256), nn.Tanh(), nn.Linear(256, 256), nn.Tanh(), nn.Linear(256, 10))
    traj = random_trajectory(net, steps=2)
    p = pkfast.plan(net, traj, torch.randn(300, 64))
    assert p.method == "factorized" and _routes(p) == {"0": "factorized", "2": "factorized", "4": "factorized"}
    for L in p.layers:  # the cost model's reason: factorising beats materialising by orders of magnitude here
        assert L.options["factorized"] * 20 < L.options["materialized"]
        assert (L.positions, L.fan_out) == (1, L.module.out_features)
    text = str(p)
    assert "factorized" in text and "Linear" in text and "GFLOP" in text
    pj = pkfast.plan(net, traj, torch.randn(300, 64), method="jacobian")
    assert pj.method == "jacobian" and set(_routes(pj).values()) == {"jacobian"}


def test_plan_large_spatial_conv_is_materialized():
    """A 3×3 conv over 32×32 positions: S² = 1e6 pairs of positions per sample pair ≫ I·O, so auto materialises
    its per-sample gradient (§6(ii)); the small linear head stays factorised; method='factorized' forces it."""
    net = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.Tanh(), nn.Flatten(), nn.Linear(16 * 32 * 32, 10))
    traj = random_trajectory(net, steps=1)
    X = torch.randn(8, 3, 32, 32)
    p = pkfast.plan(net, traj, X)
    conv = p.layers[0]
    assert (conv.positions, conv.fan_in, conv.fan_out) == (1024, 27, 16)
    assert _routes(p) == {"0": "materialized", "3": "factorized"}
    assert conv.options["materialized"] < conv.options["factorized"]
    assert _routes(pkfast.plan(net, traj, X, method="factorized")) == {"0": "factorized", "3": "factorized"}
    # and the materialised route is exact too (on a small input)
    Xs = torch.randn(3, 3, 32, 32, dtype=F64)
    netd = net.to(F64)
    K = pkfast.gram(netd, traj, Xs, dtype=F64, progress=False)
    ref = gram_reference(netd, traj, Xs)
    assert rel_err(K, ref) <= RTOL[F64]


def test_plan_routes_unsupported_to_jacobian():
    net, traj, X, _ = _setup("tied")
    # (by default its tied head is collapsed, the lookup then on its own rule: tests/layers/test_head.py)
    assert "tied to 'emb'" in str(pkfast.plan(net, traj, X))
    p = pkfast.plan(net, traj, X, head=None)
    r = _routes(p)
    assert r["emb"] == "jacobian" and r["out"] == "jacobian" and r["mid"] == "jacobian"
    reasons = {L.name: L.reason for L in p.layers}
    assert "tied" in reasons["emb"] and "overrides" in reasons["mid"]
    net, traj, X, _ = _setup("attention")
    r = _routes(pkfast.plan(net, traj, X))
    # nn.MultiheadAttention: its packed input projection by the attention rule, out_proj as a Linear
    assert r["att.out_proj"] != "jacobian" and r["att"] != "jacobian" and r["head"] == "factorized", r
    net, traj, X, _ = _setup("seq")
    p = pkfast.plan(net, traj, X)
    assert _routes(p)["norm"] == "materialized"  # its affine through the norm rule (pkfast.layers.norm)
    for L in p.layers:  # auto takes the cheaper route of each supported layer (a 9-word vocabulary: materialise)
        if L.kind != "other":
            assert L.method == min(L.options, key=L.options.get), L
    assert _routes(p)["emb"] == "materialized"
    assert _routes(pkfast.plan(net, traj, X, method="factorized"))["emb"] == "factorized"


def test_plan_unused_layer_and_no_candidates():
    class Unused(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(3, 2)
            self.b = nn.Linear(3, 2)  # never called
            self.scale = nn.Parameter(torch.ones(2))

        def forward(self, x):
            return self.a(x) * self.scale

    net = Unused().to(F64)
    traj = random_trajectory(net, steps=2)
    X = torch.randn(4, 3, dtype=F64)
    p = pkfast.plan(net, traj, X)
    assert _routes(p) == {"": "jacobian", "a": "factorized", "b": "unused"}
    K = pkfast.gram(net, traj, X, dtype=F64, progress=False)
    assert rel_err(K, gram_reference(net, traj, X)) <= RTOL[F64]
    # a model with no supported layer runs the plain Jacobian route
    pr = nn.PReLU(3).to(F64)
    assert pkfast.plan(pr, random_trajectory(pr, steps=1), X).method == "jacobian"


def test_method_errors():
    net, traj, X, _ = _setup("mlp")
    with pytest.raises(ValueError, match=r"unknown method='fast'; expected one of 'auto', 'jacobian', 'factorized'"):
        pkfast.gram(net, traj, X, method="fast")
    with pytest.raises(TypeError, match="'out' is an option of the computation"):
        pkfast.plan(net, traj, X, out="x.npy")


def test_gram_method_sketch_is_the_sketch_module(tmp_path):
    """gram(method="sketch") is the Gram of pkfast.sketch's features (tested in test_sketch.py) with the same k
    and seed, tiled (many tiles under a small budget), stored and resumable like any Gram."""
    net, traj, X, X2 = _setup("mlp", n=60)
    F1 = pkfast.sketch(net, traj, X, k=64, seed=3, dtype=F64, progress=False)
    F2 = pkfast.sketch(net, traj, X2, k=64, seed=3, dtype=F64, progress=False)
    for kw in (dict(), dict(outputs="full"), dict(diagonal=True), dict(outputs="mean", diagonal=True)):
        for x2, other in ((None, None), (X2, F2)):
            if x2 is not None and kw.get("diagonal"):
                continue
            for budget in (None, 90_000):
                K = pkfast.gram(net, traj, X, x2, method="sketch", k=64, seed=3, dtype=F64, progress=False,
                                memory_budget=budget, **kw)
                assert rel_err(K, F1.gram(other, **kw)) <= RTOL[F64], (kw, budget)
    job = GramJob.create(net, traj, X, method="sketch", k=64, seed=3,
                                                    memory_budget=90_000, dtype=F64)
    assert len(job.tiling.tiles) > 1
    out = tmp_path / "s.npy"
    S = pkfast.gram(net, traj, X, method="sketch", k=64, seed=3, dtype=F64, progress=False, out=out, memory_budget=90_000)
    assert rel_err(torch.from_numpy(np.array(S)), F1.gram()) <= RTOL[F64]
    opts = pkfast.open_gram(out).options
    assert (opts["method"], opts["k"], opts["seed"]) == ("sketch", 64, 3)
    with pytest.raises(pkfast.store.writer.StoreError, match="options"):  # another seed is another Gram
        pkfast.gram(net, traj, X, method="sketch", k=64, seed=4, dtype=F64, progress=False, out=out)
    with pytest.raises(ValueError, match=r"k, seed and projection set the random projection of method='sketch'; found method='auto'"):
        pkfast.gram(net, traj, X, k=8)
    plan = str(pkfast.plan(net, traj, X, method="sketch", k=64))  # the plan shows each layer's projection
    assert "method='sketch' → sketch: k=64, seed=0" in plan and "projection: kronecker 8×8:" in plan, plan
    with pytest.raises(ValueError, match="rule='exact' cannot be sketched"):
        pkfast.gram(net, traj, X, method="sketch", rule="exact")


def test_layer_called_with_keyword_input_takes_the_jacobian_route():
    class KwNet(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(3, 4)
            self.b = nn.Linear(4, 2)

        def forward(self, x):
            return self.b(torch.tanh(self.a(input=x)))  # the hook cannot see a keyword input

    net = KwNet().to(F64)
    traj = random_trajectory(net, steps=2)
    X = torch.randn(5, 3, dtype=F64)
    p = pkfast.plan(net, traj, X)
    assert _routes(p) == {"a": "jacobian", "b": "factorized"}
    assert "positional" in {L.name: L.reason for L in p.layers}["a"]
    assert rel_err(pkfast.gram(net, traj, X, dtype=F64, progress=False), gram_reference(net, traj, X)) <= RTOL[F64]


def test_weight_also_used_outside_the_module_takes_the_jacobian_route():
    """A weight reached both through its module and through F.linear (an output projection tied to the input
    embedding, as language models do): the factorisation of the module's calls alone would miss the second
    use, so the gradient check at planning time sends the layer to the Jacobian route; a module never called
    whose weight is used functionally likewise. The Gram stays exact."""
    class TiedLM(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(7, 4)
            self.mix = nn.Linear(4, 4)
            self.proj = nn.Linear(4, 3)  # never called: its weight is used through F.linear

        def forward(self, ids):
            h = torch.tanh(self.mix(self.emb(ids).mean(1)))
            return torch.nn.functional.linear(h, self.emb.weight) + torch.nn.functional.linear(h, self.proj.weight).sum(1, keepdim=True)

    net = TiedLM().to(F64)
    traj = random_trajectory(net, steps=2)
    X = torch.randint(0, 7, (5, 3))
    p = pkfast.plan(net, traj, X)
    r = _routes(p)
    assert r["emb"] == "jacobian" and r["proj"] == "jacobian" and r["mix"] == "factorized", r
    reasons = {L.name: L.reason for L in p.layers}
    assert "outside its forward" in reasons["emb"] and "without calling" in reasons["proj"]
    for method in ("auto", "factorized"):
        K = pkfast.gram(net, traj, X, method=method, dtype=F64, progress=False)
        assert rel_err(K, gram_reference(net, traj, X)) <= RTOL[F64]



# ---------------------------------------------------------------------------------------------- method="materialized"
class GroupedConvNet(nn.Module):
    """A grouped, strided conv whose factors are smaller than its gradient (S = 4 positions): streamed with S > 1
    (the batched Δᵀ A product per slice), then a Linear head (S = 1: the outer-product slices)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 8, 3, stride=2, padding=1, groups=2)
        self.head = nn.Linear(8 * 2 * 2, 3)

    def forward(self, x):
        return self.head(torch.tanh(self.conv(x)).flatten(1))


STREAM_CASES = {**CASES, "grouped": (GroupedConvNet, lambda n, s: torch.randn(n, 4, 4, 4, generator=torch.Generator().manual_seed(s)))}


def _setup_any(name, n=6, m=4):
    if name != "grouped":
        return _setup(name, n, m)
    make, data = STREAM_CASES[name]
    torch.manual_seed(0)
    net = make().to(F64)
    return net, random_trajectory(net, steps=2, scale=0.2), data(n, 1).to(F64), data(m, 2).to(F64)


@pytest.mark.parametrize("name", list(STREAM_CASES))
@pytest.mark.parametrize("outputs", ["trace", "full"])
def test_materialized_equals_reference(name, outputs, monkeypatch):
    """Every supported layer materialised from its factors (streamed where its factors are the smaller), with
    the default workspace and with one so small that every slice is a single output unit (ragged last slices)."""
    net, traj, X, X2 = _setup_any(name)
    for ws in (pk_options.STREAM_BYTES, 1):
        monkeypatch.setattr(pk_options, "STREAM_BYTES", ws)
        for x2 in (None, X2):
            ref = gram_reference(net, traj, X, x2, outputs=outputs)
            K = pkfast.gram(net, traj, X, x2, outputs=outputs, method="materialized", dtype=F64, progress=False)
            assert rel_err(K, ref) <= RTOL[F64], (ws, x2 is not None, rel_err(K, ref))


def test_materialized_plan_streams_the_layers_whose_factors_are_smaller():
    net, traj, X, _ = _setup_any("grouped")
    p = pkfast.plan(net, traj, X, method="materialized")
    assert p.method == "materialized" and _routes(p) == {"conv": "materialized", "head": "materialized"}
    conv, head = p.layers
    assert (conv.positions, conv.groups, conv.stream, head.stream) == (4, 2, True, True)
    assert "streamed in slices" in str(p)
    assert p.job.route.panel_width == 0  # nothing goes through a tile-sized panel
    # a 3×3 conv over 32×32 positions: its factors (S·(I + C·O) per sample) exceed its gradient: kept in the panel
    big = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.Tanh(), nn.Flatten(), nn.Linear(16 * 32 * 32, 10))
    pb = pkfast.plan(big, random_trajectory(big, steps=1), torch.randn(8, 3, 32, 32), method="materialized")
    c0, h = pb.layers
    assert (c0.method, c0.stream, h.method, h.stream) == ("materialized", False, "materialized", True)
    assert pb.job.route.panel_width == c0.size
    assert c0.bytes_per_sample == 10 * c0.size * 4  # its gradient; the head's: its factors
    assert h.bytes_per_sample == (16 * 32 * 32 + 1 + 10 * 10) * 4
    # mixed with factorised layers under auto: the seq model's 9-word embedding is materialised and streamed
    net, traj, X, X2 = _setup("seq")
    p = pkfast.plan(net, traj, X)
    emb = {L.name: L for L in p.layers}["emb"]
    assert (emb.method, emb.stream, p.method) == ("materialized", True, "factorized")


@pytest.mark.parametrize("name", ["mlp", "grouped", "seq"])
def test_materialized_rules_diagonal_and_loss(name, monkeypatch):
    """Diagonal, trapezoid, the exact rule (m nodes: a side's gradient is the ω-weighted sum over its nodes,
    formed in the workspace) and the loss kernel, against the reference or the Jacobian route."""
    monkeypatch.setattr(pk_options, "STREAM_BYTES", 300)  # several slices per layer
    net, traj, X, X2 = _setup_any(name)
    for outputs in ("trace", "full"):
        ref = gram_reference(net, traj, X, outputs=outputs, rule="trapezoid")
        K = pkfast.gram(net, traj, X, outputs=outputs, rule="trapezoid", method="materialized", dtype=F64, progress=False)
        assert rel_err(K, ref) <= RTOL[F64]
        refd = gram_reference(net, traj, X, outputs=outputs, diagonal=True)
        Kd = pkfast.gram(net, traj, X, outputs=outputs, diagonal=True, method="materialized", dtype=F64, progress=False)
        assert rel_err(Kd, refd) <= RTOL[F64]
        for x2 in (None, X2):
            J = pkfast.gram(net, traj, X, x2, outputs=outputs, rule="exact", nodes=3, method="jacobian", dtype=F64,
                            progress=False)
            K = pkfast.gram(net, traj, X, x2, outputs=outputs, rule="exact", nodes=3, method="materialized", dtype=F64,
                            progress=False)
            assert rel_err(K, J) <= RTOL[F64]
    if name == "mlp":
        y, y2 = torch.tensor([0, 1, 2, 0, 1, 2]), torch.tensor([2, 2, 1, 0])
        for X2_, y2_ in ((None, None), (X2, y2)):
            kw = dict(of="loss", loss="cross_entropy", y=y, y2=y2_, dtype=F64, progress=False)
            assert rel_err(pkfast.gram(net, traj, X, X2_, method="materialized", **kw),
                           pkfast.gram(net, traj, X, X2_, method="jacobian", **kw)) <= RTOL[F64]


def test_materialized_float32_many_tiles_stored_and_triton(tmp_path):
    """float32 with a budget forcing many tiles (the workspace is reused across them), stored and resumed, and
    the slices multiplied by the Triton kernel under the interpreter."""
    net, traj, X, X2 = _setup_any("grouped", n=9, m=5)
    ref = gram_reference(net, traj, X, X2)
    net32, X32, X232 = net.float(), X.float(), X2.float()
    job = GramJob.create(net32, traj, X32, X232, method="materialized", memory_budget=12_000)
    assert len(job.tiling.tiles) > 1
    K = pkfast.gram(net32, traj, X32, X232, method="materialized", memory_budget=12_000, progress=False)
    assert rel_err(K, ref) <= RTOL[torch.float32]
    S = pkfast.gram(net32, traj, X32, method="materialized", memory_budget=12_000, progress=False, out=tmp_path / "m.npy")
    assert rel_err(torch.from_numpy(np.array(S)), gram_reference(net, traj, X)) <= RTOL[torch.float32]
    opts = pkfast.open_gram(tmp_path / "m.npy").options
    assert opts["method"] == "materialized" and "conv:materialized" in opts["routes"]
    with pytest.raises(pkfast.store.writer.StoreError, match="options"):
        pkfast.gram(net32, traj, X32, method="factorized", memory_budget=12_000, progress=False, out=tmp_path / "m.npy")
    from pkfast.engine.accumulate.triton_launch import triton_status

    ok, why = triton_status()
    if not ok:
        pytest.skip(why)
    Kt = pkfast.gram(net32, traj, X32[:4], X232[:3], outputs="full", method="materialized", backend="triton",
                     progress=False)
    assert rel_err(Kt, gram_reference(net, traj, X[:4], X2[:3], outputs="full")) <= RTOL[torch.float32]
