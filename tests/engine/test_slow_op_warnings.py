"""torch's "no batching rule" performance warning, repeated by every vmap call and backward, reaches the user as
one pkfast warning per operator (issue 25: 18 repeats per call on HF models); other warnings pass unchanged."""

from __future__ import annotations

import re
import warnings

import torch

import pkfast


class _Encoder(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.enc = torch.nn.TransformerEncoderLayer(8, 2, 16, batch_first=True, dropout=0.0)
        self.head = torch.nn.Linear(8, 3)

    def forward(self, x):
        warnings.warn("a model's own warning", RuntimeWarning)
        return self.head(self.enc(x).mean(1))


def test_batching_rule_warnings_are_reported_once_per_operator():
    torch.manual_seed(0)
    net = _Encoder().eval()
    traj = pkfast.Trajectory.from_checkpoints([net.state_dict(), net.state_dict()], lr=0.1)
    X = torch.randn(6, 5, 8)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        K = pkfast.gram(net, traj, X, method="jacobian", progress=False, dtype=torch.float64)
    texts = [str(w.message) for w in caught]
    raw = [t for t in texts if t.startswith("There is a performance drop")]
    ours = [t for t in texts if "has no batching rule" in t]
    assert not raw, raw[:2]
    assert 1 <= len(ours) <= 2 and "aten::_transformer_encoder_layer_fwd" in ours[0], ours
    named = [op for t in ours for op in re.search(r"batching rule for (.*?): torch runs", t).group(1).split(", ")]
    assert len(named) == len(set(named))  # no operator reported twice
    assert any(t == "a model's own warning" for t in texts)  # others pass through
    assert torch.isfinite(torch.as_tensor(K)).all()
