"""Training-data attribution at scale (issue 16 §4): a GPT-style LM, N training sequences, M queries, T
checkpoints, on this machine — path features on disk, top-k proponents/opponents and self-influence over the
whole training set, and agreement with the exact loss kernel on a subset.

    python benchmarks/attribution_lm.py [--n 50000] [--m 100] [--steps 5] [--k 1024] [--subset 1000] \\
        [--d 64] [--storage float16] [--dir DIR] [--csv PATH]

The model: ``architectures.GPT`` (token and position embeddings, 4 causal pre-norm Transformer blocks of width
``--d`` with 4 heads and an MLP of 4d, final LayerNorm, a Linear head to 512 tokens), sequences of 128 tokens.
The data: sequences from a fixed random sparse bigram chain (so there is something to learn); the training
run: SGD (batches of 32) on the first ``--n`` sequences, a checkpoint every 20 steps, ``--steps`` + 1
checkpoints kept: the path kernel's terms are the ``--steps`` segments between them (step size 20·lr, TracInCP's
checkpoint form). Queries: ``--m`` held-out sequences.

Measured, one phase after the other: the training features (``pkfast.attribution.features(k=--k, out=…,
storage_dtype=--storage)``, the attribution defaults: k = 16,384, bfloat16 on disk): wall time, throughput, disk, peak RSS of the process), the query features, top-10
proponents and opponents of every query over all N (``pkfast.attribution.top_k``), the self-influence of all N,
and, on the first ``--subset`` training sequences, the exact loss kernel against the queries
(``pkfast.attribution.scores`` of ``Exact``) compared with the sketched scores: Spearman correlation per query
and the overlap of the top 10 (median and 10th percentile over queries).
"""

from __future__ import annotations

import argparse
import copy
import resource
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))

import pkfast  # noqa: E402
from pkfast.attribution import ATTRIBUTION_K, Exact, features, scores, self_influence, top_k  # noqa: E402

from _common import append_csv, environment, format_environment, measure_matmul_gflops  # noqa: E402
from architectures import GPT  # noqa: E402

V, L = 512, 128


def bigram_sequences(n: int, seed: int = 0) -> torch.Tensor:
    """``[n, L + 1]`` tokens from a random sparse bigram chain (each token has 8 likely successors)."""
    g = torch.Generator().manual_seed(seed)
    succ = torch.randint(0, V, (V, 8), generator=g)
    probs = torch.softmax(torch.randn(V, 8, generator=g) * 2, 1)
    seq = torch.empty(n, L + 1, dtype=torch.long)
    seq[:, 0] = torch.randint(0, V, (n,), generator=g)
    for t in range(L):
        j = torch.multinomial(probs[seq[:, t]], 1, generator=g).squeeze(1)
        seq[:, t + 1] = succ[seq[:, t], j]
    return seq


def train(net: nn.Module, X: torch.Tensor, Y: torch.Tensor, checkpoints: int, every: int = 20,
          lr: float = 0.5) -> pkfast.Trajectory:
    g = torch.Generator().manual_seed(1)
    opt = torch.optim.SGD(net.parameters(), lr=lr)
    points = [copy.deepcopy(net.state_dict())]
    for _ in range(checkpoints):
        for _ in range(every):
            idx = torch.randint(0, X.shape[0], (32,), generator=g)
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(net(X[idx]).transpose(1, 2), Y[idx]).backward()
            opt.step()
        points.append(copy.deepcopy(net.state_dict()))
    net.eval()
    return pkfast.Trajectory.from_checkpoints(points, lr=lr * every)


def rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def spearman(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    ra, rb = a.argsort(1).argsort(1).double(), b.argsort(1).argsort(1).double()
    ra, rb = ra - ra.mean(1, keepdim=True), rb - rb.mean(1, keepdim=True)
    return (ra * rb).sum(1) / (ra.norm(dim=1) * rb.norm(dim=1))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=50_000)
    ap.add_argument("--m", type=int, default=100)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--k", type=int, default=ATTRIBUTION_K, help="feature size (default: the attribution default)")
    ap.add_argument("--subset", type=int, default=1000)
    ap.add_argument("--d", type=int, default=64)
    ap.add_argument("--storage", default="bfloat16")
    ap.add_argument("--budget", default="1GiB", help="pkfast's memory budget")
    ap.add_argument("--dir", default=None, help="where the feature store goes (default: a temporary directory)")
    ap.add_argument("--csv", default=None)
    a = ap.parse_args(argv)
    print(format_environment(environment()))
    start = time.perf_counter()
    print(f"floor: matmul {measure_matmul_gflops()['best']:.0f} GFLOP/s")
    torch.manual_seed(0)
    seq = bigram_sequences(a.n + a.m)
    X, Y = seq[:, :L], seq[:, 1:]
    net = GPT(V, a.d, 4)
    t0 = time.perf_counter()
    traj = train(net, X[: a.n], Y[: a.n], a.steps)
    print(f"model: GPT d={a.d}, 4 layers, P = {sum(p.numel() for p in net.parameters()):,}; trained "
          f"{a.steps}×20 steps in {time.perf_counter() - t0:.0f} s; T = {a.steps} checkpoint segments")
    Xt, Yt, Xq, Yq = X[: a.n], Y[: a.n], X[a.n:], Y[a.n:]
    ce = nn.CrossEntropyLoss()
    kw = dict(k=a.k, seed=0, loss=ce, memory_budget=a.budget)
    print(pkfast.plan(net, traj, Xt[:256], method="sketch", of="loss", loss=ce, y=Yt[:256],
                      k=a.k))
    d = Path(a.dir) if a.dir else Path(tempfile.mkdtemp())
    out = d / "train_features.npy"
    row = dict(n=a.n, m=a.m, steps=a.steps, k=a.k, d=a.d, storage=a.storage)
    t0 = time.perf_counter()
    train_f = features(net, traj, Xt, Yt, out=out, storage_dtype=a.storage, progress=True, **kw)
    row["features_s"] = round(time.perf_counter() - t0, 1)
    row["features_rss_gib"] = round(rss_gib(), 2)
    disk = out.stat().st_size
    row["disk_mib"] = round(disk / 2**20, 1)
    print(f"training features: {row['features_s']} s ({a.n / row['features_s']:.0f} sequences/s), "
          f"{disk / 2**20:.0f} MiB on disk ({a.storage}), peak RSS {row['features_rss_gib']} GiB")
    t0 = time.perf_counter()
    query_f = features(net, traj, Xq, Yq, progress=False, **kw)
    row["query_s"] = round(time.perf_counter() - t0, 2)
    t0 = time.perf_counter()
    best = top_k(query_f, train_f, k=10, progress=False)
    row["top_k_s"] = round(time.perf_counter() - t0, 2)
    t0 = time.perf_counter()
    si = self_influence(train_f, progress=False)
    row["self_influence_s"] = round(time.perf_counter() - t0, 2)
    print(f"query features {row['query_s']} s; top-10 proponents/opponents of {a.m} queries over {a.n:,}: "
          f"{row['top_k_s']} s; self-influence of {a.n:,}: {row['self_influence_s']} s; peak RSS {rss_gib():.2f} GiB")
    assert best.proponents.shape == (a.m, 10) and si.shape == (a.n,)
    # agreement with the exact loss kernel on a subset
    s = a.subset
    t0 = time.perf_counter()
    exact = scores(Exact(net, traj, Xq, Yq, loss=ce, memory_budget=a.budget),
                   Exact(net, traj, Xt[:s], Yt[:s], loss=ce, memory_budget=a.budget), progress=True)
    row["exact_subset_s"] = round(time.perf_counter() - t0, 1)
    approx = scores(query_f, train_f[:s], progress=False)
    rho = spearman(exact, approx)
    top_e, top_a = exact.topk(10, 1).indices, approx.topk(10, 1).indices
    overlap = torch.tensor([len(set(e.tolist()) & set(q.tolist())) / 10 for e, q in zip(top_e, top_a)])
    row.update(spearman_median=round(float(rho.median()), 4), spearman_p10=round(float(rho.quantile(0.1)), 4),
               top10_median=round(float(overlap.median()), 3), top10_mean=round(float(overlap.mean()), 3),
               top10_p10=round(float(overlap.quantile(0.1)), 3), total_rss_gib=round(rss_gib(), 2))
    print(f"exact loss kernel, {a.m} queries × {s} training sequences: {row['exact_subset_s']} s")
    print(f"agreement (sketched vs exact, per query over {s}): Spearman median {row['spearman_median']} "
          f"(10th percentile {row['spearman_p10']}); top-10 overlap median {row['top10_median']} "
          f"(mean {row['top10_mean']}, 10th percentile {row['top10_p10']})")
    row["total_s"] = round(time.perf_counter() - start, 1)
    print(f"peak RSS of the whole run {row['total_rss_gib']} GiB; wall time {row['total_s']} s")
    print(" | ".join(f"{k}={v}" for k, v in row.items()))
    if a.csv:
        append_csv(a.csv, [row])
    return 0


if __name__ == "__main__":
    sys.exit(main())
