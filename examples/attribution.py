"""Training-data attribution with the path kernel, end to end on scikit-learn's digits.

    python examples/attribution.py [--quick] [--out DIR] [--no-progress]

1. Flip 10% of the training labels, train an MLP by SGD, keep every step's weights (the trajectory).
2. Write the training set's loss-kernel path features to disk (``pkfast.attribution.features``: Kronecker-factored
   projections, a resumable bfloat16 store), and sketch a few test points.
3. For each test point, its top-5 proponents (training points whose steps lowered its loss most) and opponents
   (raised it most), with their labels; the same from the exact loss kernel (``Exact``) for comparison.
4. Rank the training points by self-influence Σ_s ε_s ‖∇ℓ(z; w_s)‖² and count the flipped labels at the top.

Ends with one ``SUMMARY {json}`` line (also written to ``DIR/summary.json``).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import pkfast
from pkfast.attribution import Exact, features, self_influence, top_k


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer points and epochs (a test run)")
    ap.add_argument("--out", default=None, help="directory for the feature store and summary (default: a temp dir)")
    ap.add_argument("--no-progress", action="store_true")
    a = ap.parse_args(argv)
    from sklearn.datasets import load_digits

    out = Path(a.out or tempfile.mkdtemp(prefix="pkfast-attribution-"))
    out.mkdir(parents=True, exist_ok=True)
    n_train, epochs = (600, 30) if a.quick else (1200, 60)
    Xn, yn = load_digits(return_X_y=True)
    X = torch.tensor(Xn, dtype=torch.float32) / 16.0
    y_true = torch.tensor(yn)
    g = torch.Generator().manual_seed(0)
    perm = torch.randperm(X.shape[0], generator=g)
    tr, te = perm[:n_train], perm[n_train:n_train + 5]
    X_train, y_train = X[tr], y_true[tr].clone()
    flip = torch.randperm(n_train, generator=g)[: n_train // 10]
    y_train[flip] = (y_train[flip] + torch.randint(1, 10, (flip.numel(),), generator=g)) % 10
    flipped = torch.zeros(n_train, dtype=torch.bool)
    flipped[flip] = True

    # 1. train, keeping every step
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(64, 128), nn.Tanh(), nn.Linear(128, 10))
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    points = [{k: v.clone() for k, v in net.state_dict().items()}]
    for _ in range(epochs):
        order = torch.randperm(n_train, generator=g)
        for i in range(0, n_train, 64):
            idx = order[i:i + 64]
            opt.zero_grad()
            F.cross_entropy(net(X_train[idx]), y_train[idx]).backward()
            opt.step()
            points.append({k: v.clone() for k, v in net.state_dict().items()})
    net.eval()
    traj = pkfast.Trajectory.from_checkpoints(points, lr=0.1)
    print(f"trained {len(points) - 1} SGD steps on {n_train} digits ({flip.numel()} labels flipped)")

    # 2. features: the training set on disk, a few test points in memory
    progress = not a.no_progress
    train = features(net, traj, X_train, y_train, loss="cross_entropy", out=out / "train.npy", progress=progress)
    y_test = y_true[te]
    query = features(net, traj, X[te], y_test, loss="cross_entropy", progress=False)
    print(f"features: {train} → {out / 'train.npy'}")

    # 3. proponents and opponents, sketched and exact
    best = top_k(query, train, k=5, progress=False)
    exact = top_k(Exact(net, traj, X[te], y_test, loss="cross_entropy"),
                  Exact(net, traj, X_train, y_train, loss="cross_entropy"), k=5, progress=False)
    overlap = []
    for q in range(len(te)):
        pro, opp = best.proponents[q].tolist(), best.opponents[q].tolist()
        overlap.append(len(set(pro) & set(exact.proponents[q].tolist())) / 5)
        print(f"test digit {int(y_test[q])}: proponents' labels {y_train[pro].tolist()}, opponents' labels "
              f"{y_train[opp].tolist()} (flipped among opponents: {int(flipped[opp].sum())})")
    same_label = float((y_train[best.proponents] == y_test[:, None]).float().mean())

    # 4. self-influence finds the flipped labels
    si = self_influence(train, progress=False)
    si_exact = self_influence(Exact(net, traj, X_train, y_train, loss="cross_entropy"), progress=False)

    def found(score, frac):
        top = torch.argsort(score, descending=True)[: int(frac * n_train)]
        return float(flipped[top].float().sum() / flipped.sum())

    summary = {"n_train": n_train, "steps": len(points) - 1, "flipped": int(flip.numel()),
               "proponents_with_the_query_label": round(same_label, 3),
               "top5_overlap_sketch_vs_exact": round(sum(overlap) / len(overlap), 3),
               "flipped_found_top10": {"sketch": round(found(si, 0.1), 3), "exact": round(found(si_exact, 0.1), 3)},
               "flipped_found_top20": {"sketch": round(found(si, 0.2), 3), "exact": round(found(si_exact, 0.2), 3)}}
    print(f"self-influence: {summary['flipped_found_top10']['sketch']:.0%} of the flipped labels in the top 10% "
          f"(exact: {summary['flipped_found_top10']['exact']:.0%}), {summary['flipped_found_top20']['sketch']:.0%} in "
          f"the top 20%")
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    print("SUMMARY " + json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
