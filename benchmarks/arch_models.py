"""The models of ``architectures.py``: the issue-15 workloads (a CIFAR ResNet-18 with BatchNorm, a pre-norm GPT
with a position ``nn.Embedding``) and issue 28's, written the other ways people write them — a GPT whose
positions are a bare ``nn.Parameter`` (``GPTBare``) and a GroupNorm ResNet with a layer-scale ``gamma`` on each
residual branch (``ResNetAlt``); the V = 32,000 LM is ``vocab_head.LM``. Also the per-sample losses the
baselines differentiate."""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["BasicBlock", "ResNet18", "GPT", "GPTBare", "ScaledBlock", "ResNetAlt", "PerSampleLoss", "token_ce",
           "class_ce"]


class BasicBlock(nn.Module):
    """ResNet's basic block: two 3×3 convolutions with BatchNorm, a projection shortcut where the shape changes."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class ResNet18(nn.Module):
    """ResNet-18 for 32×32 images (the CIFAR variant: 3×3 stem, no max-pool)."""

    def __init__(self, width: int = 16, classes: int = 10) -> None:
        super().__init__()
        w = [width, 2 * width, 4 * width, 8 * width]
        self.conv1 = nn.Conv2d(3, w[0], 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(w[0])
        blocks, cin = [], w[0]
        for i, c in enumerate(w):
            for j in range(2):
                blocks.append(BasicBlock(cin, c, 2 if (j == 0 and i > 0) else 1))
                cin = c
        self.layers = nn.Sequential(*blocks)
        self.fc = nn.Linear(cin, classes)

    def forward(self, x):
        out = self.layers(F.relu(self.bn1(self.conv1(x))))
        return self.fc(F.adaptive_avg_pool2d(out, 1).flatten(1))


class GPT(nn.Module):
    """Token ids [n, L] → next-token logits [n, L, V] (causal pre-norm transformer blocks)."""

    def __init__(self, vocab: int = 512, d: int = 128, layers: int = 4, heads: int = 4, seq: int = 128) -> None:
        super().__init__()
        self.tok, self.pos = nn.Embedding(vocab, d), nn.Embedding(seq, d)
        self.blocks = nn.ModuleList(
            nn.TransformerEncoderLayer(d, heads, 4 * d, dropout=0.0, activation="gelu", batch_first=True,
                                       norm_first=True) for _ in range(layers))
        self.norm, self.head = nn.LayerNorm(d), nn.Linear(d, vocab)

    def forward(self, ids):
        L = ids.shape[1]
        h = self.tok(ids) + self.pos(torch.arange(L, device=ids.device))
        mask = nn.Transformer.generate_square_subsequent_mask(L, dtype=h.dtype, device=h.device)
        for blk in self.blocks:
            h = blk(h, src_mask=mask, is_causal=True)
        return self.head(self.norm(h))


class GPTBare(nn.Module):
    """Token ids [n, L] → next-token logits [n, L, V], written as many users write a small GPT (issue 28's target
    model): token ``nn.Embedding`` plus a learned positional **bare** ``nn.Parameter`` (``pos[:L]`` added to the
    token embeddings; no module owns it), an ``nn.TransformerEncoder`` of post-norm ReLU blocks (MLP 4d) under a
    causal mask, and an untied ``nn.Linear`` head, no final norm."""

    def __init__(self, vocab: int = 512, d: int = 128, layers: int = 4, heads: int = 4, seq: int = 128) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.pos = nn.Parameter(0.02 * torch.randn(seq, d))
        layer = nn.TransformerEncoderLayer(d, heads, 4 * d, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.lm_head = nn.Linear(d, vocab)

    def forward(self, ids):
        L = ids.shape[1]
        h = self.emb(ids) + self.pos[:L]
        mask = nn.Transformer.generate_square_subsequent_mask(L, dtype=h.dtype, device=h.device)
        return self.lm_head(self.encoder(h, mask=mask, is_causal=True))


class ScaledBlock(nn.Module):
    """A basic block with GroupNorm and a layer-scale **bare** ``nn.Parameter`` ``gamma`` (one per channel) on the
    residual branch: ``relu(shortcut(x) + gamma · branch(x))``; the shortcut is the identity or a 1×1 convolution
    with a bias."""

    def __init__(self, cin: int, cout: int, stride: int, groups: int = 4) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.gn1 = nn.GroupNorm(groups, cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.gn2 = nn.GroupNorm(groups, cout)
        self.gamma = nn.Parameter(0.1 + 0.02 * torch.randn(cout))
        self.proj = nn.Conv2d(cin, cout, 1, stride) if stride != 1 or cin != cout else None

    def forward(self, x):
        branch = self.gn2(self.conv2(F.relu(self.gn1(self.conv1(x)))))
        short = x if self.proj is None else self.proj(x)
        return F.relu(short + self.gamma.view(1, -1, 1, 1) * branch)


class ResNetAlt(nn.Module):
    """A CIFAR ResNet in the ResNet-20 layout (3×3 stem, three stages of ``blocks`` :class:`ScaledBlock` at widths
    w/2w/4w, GroupNorm, global mean over positions, Linear to ``classes``) for 32×32 images."""

    def __init__(self, width: int = 16, classes: int = 10, blocks: int = 3) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, width, 3, 1, 1, bias=False), nn.GroupNorm(4, width), nn.ReLU())
        layers, cin = [], width
        for i, c in enumerate([width, 2 * width, 4 * width]):
            for j in range(blocks):
                layers.append(ScaledBlock(cin, c, 2 if (j == 0 and i > 0) else 1))
                cin = c
        self.stages = nn.Sequential(*layers)
        self.classifier = nn.Linear(cin, classes)

    def forward(self, x):
        return self.classifier(self.stages(self.stem(x)).mean((2, 3)))


class PerSampleLoss(nn.Module):
    """``model`` followed by its per-sample loss, on inputs that carry the targets (``[x, y]`` packed): what the
    tutorial differentiates for a loss kernel. Output ``[n, 1]``."""

    def __init__(self, model: nn.Module, loss: Callable, split: Callable) -> None:
        super().__init__()
        self.model, self.loss, self.split = model, loss, split

    def forward(self, xy):
        x, y = self.split(xy)
        return self.loss(self.model(x), y).reshape(-1, 1)


def token_ce(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-sequence mean cross-entropy over the counted tokens ([n, L, V] logits, [n, L] targets) → [n]."""
    per_tok = F.cross_entropy(out.transpose(1, 2), y, ignore_index=-100, reduction="none")
    return per_tok.sum(1) / (y != -100).sum(1).clamp_min(1)


def class_ce(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-sample cross-entropy ([n, C] logits, [n] labels) → [n]."""
    return F.cross_entropy(out, y, reduction="none")
