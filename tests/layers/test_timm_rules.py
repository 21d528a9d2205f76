"""timm and Hugging Face encoder architectures take the cheap routes where one exists, and the plan
says why where none does; exact against the float64 reference. Models from configs with random weights
(``pretrained=False``); skipped, saying why, when the library is absent."""

from __future__ import annotations

import pytest
import torch

import pkfast
from pkfast.layers import NormRule, rule_for
from pkfast.reference import gram_reference
from tests._util import RTOL, rel_err
from tests.models import random_trajectory

F64 = torch.float64


def _timm():
    """timm, or a skip saying why (it needs a torchvision built for this torch: a mismatched one fails to load)."""
    try:
        import timm
    except Exception as e:  # noqa: BLE001 - ImportError, or torchvision's ops failing to load
        pytest.skip(f"needs timm with a working torchvision (pip install timm): {type(e).__name__}: {e}"[:200])
    return timm


def _plan(model, traj, X, **kw):
    p = pkfast.plan(model, traj, X, **kw)
    return p, {L.name: L for L in p.layers}


def test_timm_resnet_every_layer_routed_and_exact():
    timm = _timm()
    torch.manual_seed(0)
    m = timm.create_model("resnet10t", pretrained=False, num_classes=3).to(F64).eval()
    traj = random_trajectory(m, steps=1, scale=0.01)
    X = torch.randn(3, 3, 16, 16, dtype=F64)
    p, by = _plan(m, traj, X)
    assert all(str(L.method) != "jacobian" for L in p.layers), p  # Conv2d, BatchNorm2d (eval), Linear
    assert rel_err(pkfast.gram(m, traj, X, dtype=F64, progress=False), gram_reference(m, traj, X)) <= RTOL[F64]


def test_timm_vit_norms_routed_and_the_plan_says_why_the_tokens_are_not():
    timm = _timm()
    torch.manual_seed(0)
    m = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=3, img_size=16, patch_size=8,
                          depth=1).to(F64).eval()
    traj = random_trajectory(m, steps=1, scale=0.01)
    X = torch.randn(3, 3, 16, 16, dtype=F64)
    p, by = _plan(m, traj, X)
    assert isinstance(rule_for(m.get_submodule("blocks.0.norm1"))[0], NormRule), p  # timm's LayerNorm
    assert str(by["blocks.0.norm1"].method) != "jacobian", p
    assert str(by["blocks.0.attn.qkv"].method) != "jacobian" and str(by["patch_embed.proj"].method) != "jacobian", p
    top = next(line for line in str(p).splitlines() if line.startswith("(root) "))  # cls_token and pos_embed
    assert str(by[""].method) == "jacobian" and "no layer rule for VisionTransformer" in top, p
    assert rel_err(pkfast.gram(m, traj, X, dtype=F64, progress=False), gram_reference(m, traj, X)) <= RTOL[F64]


def test_timm_convnext_layer_norm_2d_routed_and_exact():
    timm = _timm()
    torch.manual_seed(0)
    m = timm.create_model("convnext_atto", pretrained=False, num_classes=3, depths=(1, 1, 1, 1)).to(F64).eval()
    traj = random_trajectory(m, steps=1, scale=0.01)
    X = torch.randn(2, 3, 32, 32, dtype=F64)
    p, by = _plan(m, traj, X)
    ln2d = [L for n, L in by.items() if type(dict(m.named_modules())[n]).__name__ == "LayerNorm2d"]
    assert ln2d and all(isinstance(rule_for(m.get_submodule(L.name))[0], NormRule) and str(L.method) != "jacobian"
                        for L in ln2d), p
    assert rel_err(pkfast.gram(m, traj, X, dtype=F64, progress=False), gram_reference(m, traj, X)) <= RTOL[F64]


def test_hf_bert_with_a_batch_encoding_routed_and_exact():
    transformers = pytest.importorskip("transformers", reason="needs transformers (pip install 'pkfast[hf]')")
    cfg = transformers.BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                  intermediate_size=32, max_position_embeddings=16, num_labels=3,
                                  hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)

    class Twin(transformers.BertForSequenceClassification):  # a tensor in, a tensor out: for the reference
        def forward(self, ids):
            return super().forward(input_ids=ids, attention_mask=(ids > 0).long()).logits

    torch.manual_seed(0)
    m = transformers.BertForSequenceClassification(cfg).to(F64).eval()
    twin = Twin(cfg).to(F64).eval()
    twin.load_state_dict(m.state_dict())
    traj = random_trajectory(m, steps=1, scale=0.01)
    ids = torch.randint(1, 50, (3, 8))
    ids[0, 6:] = 0  # padding, masked out
    X = {"input_ids": ids, "attention_mask": (ids > 0).long()}
    p, by = _plan(m, traj, X)
    assert all(str(L.method) != "jacobian" for L in p.layers), p  # embeddings, LayerNorms, Linears: every layer
    K = pkfast.gram(m, traj, X, dtype=F64, progress=False)  # the ModelOutput's logits by the default rule
    assert rel_err(K, gram_reference(twin, traj, ids)) <= RTOL[F64]
