"""Issue 28 (structured heads): the next-token trace kernel of a GPT-style LM with a V = 32,000 head against the
same network's kernel over its d = 128 hidden outputs (head removed), one run, with the matmul floor.

    python benchmarks/vocab_head.py [--n 16] [--seq 64] [--repeat 2]

LM: Embedding(32000, 128) + a learned positional nn.Parameter, 4 nn.TransformerEncoderLayer blocks (4 heads, ff
256, batch_first), a final LayerNorm and an untied head Linear(128 → 32000); the kernel is over the last
position's logits (``output_fn``-free: the model returns them). T = 1 step (two points), float32. Reported: the
seconds of ``pkfast.gram`` for (a) the V-output model (head collapsed, the default), (b) the hidden model (the
head removed: C = 128), their ratio (issue 28's target ≤ 2×), and what ``head=None`` (every output's gradient)
would need per the plan's tiling.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import pkfast  # noqa: E402
from _common import measure_matmul_gflops, timeit  # noqa: E402


class LM(nn.Module):
    def __init__(self, V=32000, d=128, blocks=4, seq=64, head=True):
        super().__init__()
        self.emb = nn.Embedding(V, d)
        self.pos = nn.Parameter(0.02 * torch.randn(seq, d))
        layer = nn.TransformerEncoderLayer(d, 4, 256, dropout=0.0, batch_first=True)
        self.blocks = nn.TransformerEncoder(layer, blocks, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, V) if head else None

    def forward(self, x):
        h = self.norm(self.blocks(self.emb(x) + self.pos[: x.shape[1]]))[:, -1]
        return h if self.head is None else self.head(h)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=16)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--repeat", type=int, default=2)
    a = ap.parse_args()
    torch.manual_seed(0)
    net = LM(seq=a.seq).eval()
    hidden = copy.copy(net)
    hidden._modules = dict(net._modules)
    hidden.head = None  # the same network, head removed (shares every other parameter)
    w0 = {k: v.clone() for k, v in net.state_dict().items()}
    w1 = {k: v + 0.01 * torch.randn_like(v) for k, v in w0.items()}
    traj = pkfast.Trajectory.from_checkpoints([w0, w1], lr=0.1)
    traj_h = pkfast.Trajectory.from_checkpoints([{k: v for k, v in w.items() if not k.startswith("head.")}
                                                 for w in (w0, w1)], lr=0.1)
    X = torch.randint(0, 32000, (a.n, a.seq))
    floor = measure_matmul_gflops()["best"]
    print(f"floor: matmul {floor:.0f} GFLOP/s; N={a.n}, seq {a.seq}, torch threads {torch.get_num_threads()}")
    print(pkfast.plan(net, traj, X))
    t_v = t_h = float("inf")
    for _ in range(a.repeat):  # interleaved
        t_v = min(t_v, timeit(lambda: pkfast.gram(net, traj, X, progress=False), repeat=1, warmup=0).best)
        t_h = min(t_h, timeit(lambda: pkfast.gram(hidden, traj_h, X, progress=False), repeat=1, warmup=0).best)
    p_none = pkfast.plan(net, traj, X, head=None)
    need = p_none.tiles.tile_bytes if p_none.tiles.problem else None
    row = dict(n=a.n, seq=a.seq, V=32000, d=128, vocab_s=t_v, hidden_s=t_h, ratio=t_v / t_h, floor_gflops=floor,
               head_none_problem=bool(p_none.tiles.problem), head_none_tile_bytes=need)
    print(f"V=32,000 next-token trace kernel {t_v:.2f} s; hidden (C=128) {t_h:.2f} s; ratio {t_v / t_h:.2f}× "
          f"(target ≤ 2×); head=None: {'does not fit, needs ' + format(need, ',') + ' bytes for one tile' if need else 'fits'}")
    print("RESULT " + json.dumps(row))


if __name__ == "__main__":
    main()
