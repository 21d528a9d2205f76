"""``nn.MultiheadAttention`` on the layer routes: its packed input projection through the rule of
``pkfast.layers.attention`` and its ``out_proj`` as a Linear, in ``nn.TransformerEncoderLayer`` /
``DecoderLayer`` and called directly (masks, ``is_causal``, ``need_weights``, cross-attention, seq-first and
unbatched inputs), against the float64 reference (≤ 1e-10) through the shared harness (tests/layers/harness.py),
and the fallbacks when the rule does not apply."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import pkfast
from pkfast.layers import rule_for
from tests._util import RTOL, rel_err
from tests.layers.harness import check_layer_rule
from tests.models import random_trajectory
from tests.test_sequence_loss import loss_kernel_reference, token_ce

F64 = torch.float64
V, L, E = 11, 5, 8


class GPT(nn.Module):
    """Token and position embeddings, causal pre-norm ``TransformerEncoderLayer`` blocks, a final LayerNorm and
    a Linear head: next-token logits [n, L, V]."""

    def __init__(self, blocks: int = 2, norm_first: bool = True) -> None:
        super().__init__()
        self.tok, self.pos = nn.Embedding(V, E), nn.Embedding(L, E)
        self.blocks = nn.ModuleList(nn.TransformerEncoderLayer(E, 2, 16, dropout=0.0, batch_first=True,
                                                               norm_first=norm_first) for _ in range(blocks))
        self.norm, self.head = nn.LayerNorm(E), nn.Linear(E, V)

    def forward(self, ids):
        h = self.tok(ids) + self.pos(torch.arange(ids.shape[1], device=ids.device))
        mask = nn.Transformer.generate_square_subsequent_mask(ids.shape[1], dtype=h.dtype, device=h.device)
        for blk in self.blocks:
            h = blk(h, src_mask=mask, is_causal=True)
        return self.head(self.norm(h))


def _kpm(x):
    kpm = torch.zeros(x.shape[0], x.shape[1], dtype=torch.bool, device=x.device)
    kpm[:, -1] = True
    return kpm


def _mha(**kw):
    return lambda: nn.MultiheadAttention(E, 2, batch_first=True, **kw)


CASES = {
    "encoder post-norm, padding mask": (lambda: nn.TransformerEncoderLayer(E, 2, 16, dropout=0.0, batch_first=True),
                                        lambda b, h: b(h, src_key_padding_mask=_kpm(h))),
    "encoder seq-first": (lambda: nn.TransformerEncoderLayer(E, 2, 16, dropout=0.0),
                          lambda b, h: b(h.transpose(0, 1)).transpose(0, 1)),
    "decoder (self + cross attention)": (lambda: nn.TransformerDecoderLayer(E, 2, 16, dropout=0.0, batch_first=True),
                                         lambda b, h: b(h[:, :3], h, tgt_is_causal=False)),
    "weights returned, per head, float masks": (
        _mha(), lambda b, h: (lambda o, w: o + w.sum(1).mean(-1, keepdim=True)[..., :1])(
            *b(h, h, h, attn_mask=torch.linspace(-1, 1, h.shape[1] ** 2, dtype=h.dtype).view(h.shape[1], -1), average_attn_weights=False,
               key_padding_mask=torch.zeros(h.shape[:2], dtype=h.dtype)))),
    "cross attention, key is value, zero attention": (
        _mha(add_zero_attn=True), lambda b, h: b(h[:, :2], h, h, key_padding_mask=_kpm(h), need_weights=False)[0]),
    "three distinct inputs, 3-D mask": (
        _mha(), lambda b, h: b(h, torch.tanh(h), h * 2, need_weights=False,
                               attn_mask=torch.zeros(h.shape[0] * 2, h.shape[1], h.shape[1], dtype=torch.bool))[0]),
}


def _rule_names(net, p) -> set[str]:
    """The rule types of the plan's layers (:func:`pkfast.layers.rule_for`), "none" where a layer has none."""
    return {type(rule_for(net.get_submodule(L_.name))[0]).__name__ if rule_for(net.get_submodule(L_.name))[0]
            else "none" for L_ in p.layers}


@pytest.mark.parametrize("case", list(CASES))
def test_attention_layers_are_routed_and_exact(case):
    """Every attention-using block through its rules (the packed projection by the attention rule, out_proj and
    the feed-forward as Linears, the norms), every route against the float64 oracle."""
    block, call = CASES[case]
    net = check_layer_rule(lambda: block().eval(), (L, E), call=call, trapezoid=False).model
    assert "MultiheadAttentionRule" in _rule_names(net, pkfast.plan(net, random_trajectory(net, steps=1),
                                                                    torch.randn(2, L, E, dtype=F64)))
    # the module is left as it was: no patched forward, PyTorch's fast path as before
    mhas = [m for m in net.modules() if isinstance(m, nn.MultiheadAttention)]
    assert mhas and all("forward" not in m.__dict__ for m in mhas)
    assert torch.backends.mha.get_fastpath_enabled()


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("batched", [True, False])
@pytest.mark.parametrize("need_weights,average", [(True, True), (True, False), (False, True)])
@pytest.mark.parametrize("inputs", ["self", "kv", "qkv"])
def test_the_replacement_forward_is_the_modules_forward(batch_first, batched, need_weights, average, inputs):
    """``attention_forward`` returns what ``nn.MultiheadAttention.forward`` returns, for every input layout,
    mask kind and option (it is also checked on the user's model before it is used)."""
    from pkfast.layers.attention import MultiheadAttentionRule, attention_forward

    torch.manual_seed(0)
    Lq, S, B = (L, L, 3) if inputs == "self" else (3, L, 3)
    for zero_attn in (False, True):
        m = nn.MultiheadAttention(E, 2, batch_first=batch_first, add_zero_attn=zero_attn).to(F64).eval()
        site = MultiheadAttentionRule().site(m)
        shape = lambda n: ((B, n, E) if batch_first else (n, B, E)) if batched else (n, E)  # noqa: E731
        q = torch.randn(shape(Lq), dtype=F64)
        k = q if inputs == "self" else torch.randn(shape(S), dtype=F64)
        v = k if inputs != "qkv" else torch.randn(shape(S), dtype=F64)
        kpm = torch.rand((B, S) if batched else (S,)) < 0.3
        kpm[..., 0] = False
        masks = [dict(), dict(key_padding_mask=kpm), dict(attn_mask=torch.rand(Lq, S) < 0.3),
                 dict(attn_mask=torch.randn(Lq, S, dtype=F64), key_padding_mask=kpm.to(F64) * -5.0)]
        if inputs == "self":
            causal = nn.Transformer.generate_square_subsequent_mask(Lq, dtype=F64)
            masks.append(dict(attn_mask=causal, is_causal=True))
            masks.append(dict(attn_mask=causal, is_causal=True, key_padding_mask=kpm))
        for mk in masks:
            kw = dict(need_weights=need_weights, average_attn_weights=average, **mk)
            want, want_w = m(q, k, v, **kw)
            got, got_w = attention_forward(m, site, q, k, v, **kw)
            torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
            if want_w is None:
                assert got_w is None
            else:
                torch.testing.assert_close(got_w, want_w, rtol=1e-12, atol=1e-12)


@pytest.fixture(scope="module")
def gpt():
    torch.manual_seed(0)
    net = GPT().to(F64).eval()
    return net, random_trajectory(net, steps=2, scale=0.2)


def _tokens(n, seed):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, V, (n, L), generator=g)
    y = torch.roll(ids, -1, dims=1)
    y[:, -1] = -100  # no next token at the end
    y[0, :2] = -100
    return ids, y


def test_language_model_loss_kernel_on_the_layer_routes(gpt):
    """Next-token cross-entropy (ignored tokens), cross-Gram and diagonal, and a callable loss, of a causal
    transformer LM whose every parameter has a layer rule: the batched passes give the factors."""
    net, traj = gpt
    X, Y = _tokens(4, 1)
    X2, Y2 = _tokens(3, 2)
    p = pkfast.plan(net, traj, X, of="loss", loss=nn.CrossEntropyLoss(), y=Y, dtype=F64)
    assert _rule_names(net, p) == {"EmbeddingRule", "MultiheadAttentionRule", "LinearRule", "NormRule"}, p
    assert "jacobian" not in {str(L_.method) for L_ in p.layers}, p
    assert "factors from one batched forward and one backward pass per chunk" in str(p), p
    kw = dict(of="loss", loss=nn.CrossEntropyLoss(), dtype=F64, progress=False)
    K = pkfast.gram(net, traj, X, X2, y=Y, y2=Y2, **kw)
    assert rel_err(K, loss_kernel_reference(net, traj, X, Y, X2, Y2)) <= RTOL[F64]
    kd = pkfast.gram(net, traj, X, y=Y, diagonal=True, **kw)
    assert rel_err(kd, loss_kernel_reference(net, traj, X, Y, diagonal=True)) <= RTOL[F64]

    def last_token_nll(out, y):  # the user's own per-sample loss: the last counted token only
        return F.cross_entropy(out[:, -2], y[:, -2], reduction="none")

    Kc = pkfast.gram(net, traj, X, of="loss", loss=last_token_nll, y=Y, dtype=F64, progress=False)
    assert rel_err(Kc, loss_kernel_reference(net, traj, X, Y, per_sample=last_token_nll)) <= RTOL[F64]
    Kj = pkfast.gram(net, traj, X, y=Y, method="jacobian", **kw)
    assert rel_err(pkfast.gram(net, traj, X, y=Y, **kw), Kj) <= RTOL[F64]
    assert rel_err(Kj, loss_kernel_reference(net, traj, X, Y, per_sample=token_ce)) <= RTOL[F64]


@pytest.mark.parametrize("kw,reason", [(dict(add_bias_kv=True), "add_bias_kv"),
                                       (dict(kdim=6, vdim=6), "separate q/k/v projection weights")])
def test_unsupported_attention_takes_the_jacobian_route_with_the_reason(kw, reason):
    """No rule for these options: the attention and its out_proj (never called as a module without the rule's
    forward) take the Jacobian route, the plan says why, and the Gram stays exact."""
    d = kw.get("kdim", E)
    kv = (lambda h: h[..., :d]) if d != E else (lambda h: h)
    assert rule_for(_mha(**kw)())[0] is None and reason in rule_for(_mha(**kw)())[1]
    check_layer_rule(_mha(**kw), (L, E), call=lambda b, h: b(h, kv(h), kv(h), need_weights=False)[0],
                     expect_route={"body": "jacobian", "body.out_proj": "jacobian"}, reason={"body": reason},
                     outputs=("trace",), of=("output",), diagonal=False, trapezoid=False)


def test_a_replacement_forward_that_differs_is_not_used(monkeypatch):
    """The engine compares the patched model's output with the original before using a rule's patch."""
    import pkfast.layers.attention as att

    real = att.attention_forward

    def off(*a, **k):
        out, w = real(*a, **k)
        return out * 1.001, w

    monkeypatch.setattr(att, "attention_forward", off)
    block, call = CASES["encoder seq-first"]
    check_layer_rule(lambda: block().eval(), (L, E), call=call,
                     expect_route={"body.self_attn": "jacobian", "body.self_attn.out_proj": "jacobian"},
                     reason={"body.self_attn": "replacement forward does not reproduce the model (output differs by"},
                     outputs=("trace",), of=("output",), diagonal=False, trapezoid=False)
