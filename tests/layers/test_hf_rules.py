"""Layers of the training stacks: Hugging Face's ``Conv1D`` (GPT-2's transposed Linear) takes the Linear route,
registered on first sight, exact against the float64 reference (the shared harness, tests/layers/harness.py); a
tiny GPT-2 built from a config (random weights, nothing downloaded). Skipped, saying why, when ``transformers`` is
not installed."""

from __future__ import annotations

import sys

import pytest
import torch
from torch import nn

import pkfast
from pkfast.layers import TransposedLinearRule, rule_for
from pkfast.reference import gram_reference
from tests._util import RTOL, rel_err
from tests.layers.harness import check_layer_rule
from tests.models import random_trajectory

transformers = pytest.importorskip("transformers", reason="the Hugging Face tests need transformers "
                                                          "(pip install 'pkfast[hf]')")
F64 = torch.float64


def test_pkfast_does_not_import_transformers():
    import subprocess

    code = "import sys, pkfast; print('transformers' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "False"


def test_conv1d_is_a_transposed_linear_and_exact():
    """Conv1D(nf=out, nx=in) over 7 positions per sample: the transposed-Linear rule, registered on first sight,
    every route against the float64 oracle."""
    from transformers.pytorch_utils import Conv1D

    assert isinstance(rule_for(Conv1D(6, 4))[0], TransposedLinearRule)
    check_layer_rule(lambda: nn.Sequential(Conv1D(6, 4), nn.Tanh(), Conv1D(3, 6)), (7, 4))


class _Logits(nn.Module):
    """GPT-2 on token ids, returning the logits of the last position (a tensor, as pkfast takes today)."""

    def __init__(self, m: nn.Module) -> None:
        super().__init__()
        self.m = m

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.m(input_ids=ids).logits[:, -1]


def test_tiny_gpt2_blocks_take_the_linear_route_and_are_exact():
    cfg = transformers.GPT2Config(n_layer=2, n_embd=16, n_head=2, vocab_size=23, n_positions=8, bos_token_id=0,
                                  eos_token_id=0, attn_pdrop=0.0, resid_pdrop=0.0, embd_pdrop=0.0)
    torch.manual_seed(0)
    net = _Logits(transformers.GPT2LMHeadModel(cfg)).to(F64).eval()
    traj = random_trajectory(net, steps=1, scale=0.05)
    X = torch.randint(0, 23, (4, 6))
    p = pkfast.plan(net, traj, X)
    by_name = {L.name: L for L in p.layers}
    conv = [L for n, L in by_name.items() if n.endswith(("c_attn", "c_proj", "c_fc"))]
    assert len(conv) == 2 * 4 and all(isinstance(rule_for(net.get_submodule(L.name))[0], TransposedLinearRule)
                                      and str(L.method) != "jacobian" for L in conv), p
    ref = gram_reference(net, traj, X)
    K = pkfast.gram(net, traj, X, dtype=F64, progress=False)
    assert rel_err(K, ref) <= RTOL[F64], rel_err(K, ref)


def test_gpt2_called_with_a_batch_encoding_and_its_model_output():
    """The model as Hugging Face ships it: X = {"input_ids", "attention_mask"} (keyword arguments), the
    ModelOutput reduced by output_fn (the last position's logits) — equal to a twin that takes the ids tensor."""
    cfg = transformers.GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=23, n_positions=8, bos_token_id=0,
                                  eos_token_id=0, attn_pdrop=0.0, resid_pdrop=0.0, embd_pdrop=0.0)

    class Twin(transformers.GPT2LMHeadModel):
        def forward(self, ids):
            return super().forward(input_ids=ids).logits[:, -1]

    torch.manual_seed(0)
    net = transformers.GPT2LMHeadModel(cfg).to(F64).eval()
    twin = Twin(cfg).to(F64).eval()
    twin.load_state_dict(net.state_dict())
    traj = random_trajectory(net, steps=1, scale=0.05)
    ids = torch.randint(0, 23, (4, 6))
    X = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    last = lambda o: o.logits[:, -1]  # noqa: E731
    K = pkfast.gram(net, traj, X, output_fn=last, dtype=F64, progress=False)
    assert rel_err(K, pkfast.gram(twin, traj, ids, dtype=F64, progress=False)) <= RTOL[F64]
    assert rel_err(K, gram_reference(twin, traj, ids)) <= RTOL[F64]
