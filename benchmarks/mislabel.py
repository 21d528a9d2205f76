"""Mislabel detection on scikit-learn's digits (issue 16 §4): rank training points by self-influence and count
the flipped labels among the top 10% and 20%, pkfast (exact path kernel and sketched) beside Kronfluence
(identity and EK-FAC) on the same model, with the final per-sample loss and chance as references.

    .venv-attr/bin/python benchmarks/mislabel.py [--n-train 1200] [--epochs 20] [--flip 0.1] [--seeds 3] \\
        [--k 1024] [--csv PATH]

(Kronfluence lives in its own environment, ``.venv-attr``: see benchmarks/README.md; without it its rows are
skipped.) Per seed: 10% of the training labels are replaced by a different random class; an MLP 64-128-10
(tanh) is trained on them by SGD (batches of 64, learning rate 0.1, ``--epochs`` epochs) with every step
recorded; then each method scores every training point:

- ``pkfast exact``: the path kernel's self-influence Σ_s ε_s ‖∇_w ℓ(z; w_s)‖² over every recorded step
  (``pkfast.attribution.self_influence`` of ``Exact``, the loss kernel's diagonal);
- ``pkfast sketch``: the same from ``pkfast.sketch(k=--k, of="loss")`` features (unbiased estimate);
- ``Kronfluence identity`` / ``EK-FAC``: ``Analyzer.compute_self_scores`` at the final weights, factors
  fitted on the training set (default damping);
- ``final loss``: the per-sample training loss at the final weights; ``chance``: 10% / 20%.

Reported: recall of flipped points in the top 10% and 20% (mean ± standard deviation over seeds), the test
accuracy of the trained model, and each method's seconds.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))

import pkfast  # noqa: E402
from pkfast.attribution import Exact, self_influence  # noqa: E402

from _common import append_csv, environment, format_environment, load_digits_data, mlp  # noqa: E402

LR, BATCH = 0.1, 64


def train(X: torch.Tensor, y: torch.Tensor, epochs: int, seed: int) -> tuple[nn.Module, pkfast.Trajectory]:
    """SGD on (X, y), every step recorded: the model at its final weights and the trajectory w_0 … w_T."""
    torch.manual_seed(seed)
    net = mlp([64, 128, 10])
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.SGD(net.parameters(), lr=LR)
    points = [{k: v.detach().clone() for k, v in net.state_dict().items()}]
    for _ in range(epochs):
        perm = torch.randperm(X.shape[0], generator=g)
        for i in range(0, X.shape[0], BATCH):
            idx = perm[i:i + BATCH]
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(net(X[idx]), y[idx]).backward()
            opt.step()
            points.append({k: v.detach().clone() for k, v in net.state_dict().items()})
    net.eval()
    return net, pkfast.Trajectory.from_checkpoints(points, lr=LR)


def kronfluence_self(net: nn.Module, X: torch.Tensor, y: torch.Tensor, strategy: str) -> torch.Tensor:
    from kronfluence.analyzer import Analyzer, prepare_model
    from kronfluence.arguments import FactorArguments
    from kronfluence.task import Task

    class Classification(Task):
        def compute_train_loss(self, batch, model, sample=False):
            inputs, labels = batch
            logits = model(inputs)
            if sample:
                with torch.no_grad():
                    labels = torch.multinomial(F.softmax(logits.detach(), -1), 1).flatten()
            return F.cross_entropy(logits, labels, reduction="sum")

        def compute_measurement(self, batch, model):
            inputs, labels = batch
            return F.cross_entropy(model(inputs), labels, reduction="sum")

    task = Classification()
    model = prepare_model(net, task)
    data = torch.utils.data.TensorDataset(X, y)
    with tempfile.TemporaryDirectory() as d:
        an = Analyzer(analysis_name="mislabel", model=model, task=task, cpu=True, output_dir=d, disable_tqdm=True)
        an.fit_all_factors(factors_name=strategy, dataset=data, per_device_batch_size=256,
                           factor_args=FactorArguments(strategy=strategy), overwrite_output_dir=True)
        an.compute_self_scores(scores_name="self", factors_name=strategy, train_dataset=data,
                               per_device_train_batch_size=256, overwrite_output_dir=True)
        return an.load_self_scores("self")["all_modules"].detach().clone()


def recall(score: torch.Tensor, flipped: torch.Tensor, frac: float) -> float:
    top = torch.argsort(score, descending=True)[: int(round(frac * score.numel()))]
    return float(flipped[top].sum()) / float(flipped.sum())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n-train", type=int, default=1200)
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument("--flip", type=float, default=0.1)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--k", type=int, default=1024)
    ap.add_argument("--csv", default=None)
    a = ap.parse_args(argv)
    print(format_environment(environment()))
    try:
        import kronfluence  # noqa: F401
        kron = ["identity", "ekfac"]
    except ImportError:
        print("kronfluence is not installed in this environment: its rows are skipped (see benchmarks/README.md)")
        kron = []
    X_all, y_all = load_digits_data()
    results: dict[str, list[tuple[float, float, float]]] = {}
    accs = []
    for seed in range(a.seeds):
        g = torch.Generator().manual_seed(100 + seed)
        perm = torch.randperm(X_all.shape[0], generator=g)
        tr, te = perm[: a.n_train], perm[a.n_train:]
        X, y = X_all[tr], y_all[tr].clone()
        flipped = torch.zeros(a.n_train, dtype=torch.bool)
        flip = torch.randperm(a.n_train, generator=g)[: int(a.flip * a.n_train)]
        y[flip] = (y[flip] + torch.randint(1, 10, (flip.numel(),), generator=g)) % 10
        flipped[flip] = True
        net, traj = train(X, y, a.epochs, seed)
        with torch.no_grad():
            accs.append(float((net(X_all[te]).argmax(1) == y_all[te]).float().mean()))
        methods = {
            "pkfast exact": lambda: self_influence(Exact(net, traj, X, y, loss="cross_entropy"), progress=False),
            "pkfast sketch": lambda: self_influence(pkfast.sketch(net, traj, X, y=y, k=a.k, seed=seed, of="loss",
                                                                  loss="cross_entropy", progress=False)),
            "final loss": lambda: F.cross_entropy(net(X), y, reduction="none").detach(),
        }
        for s in kron:
            methods[f"Kronfluence {s}"] = lambda s=s: kronfluence_self(net, X, y, s)
        for name, run in methods.items():
            t0 = time.perf_counter()
            score = run()
            dt = time.perf_counter() - t0
            results.setdefault(name, []).append((recall(score, flipped, 0.1), recall(score, flipped, 0.2), dt))
        print(f"seed {seed}: T = {len(traj.step_sizes)} steps, test accuracy {accs[-1]:.3f}; " + ", ".join(
            f"{n} {r[-1][0]:.2f}/{r[-1][1]:.2f}" for n, r in results.items()))
    print(f"\nMislabel detection, digits: N = {a.n_train} training points, {a.flip:.0%} flipped, MLP 64-128-10, "
          f"{a.epochs} epochs of SGD (test accuracy {statistics.mean(accs):.3f}); {a.seeds} seeds")
    print(f"{'method':22s} {'top 10%':>14s} {'top 20%':>14s} {'seconds':>8s}")
    rows = []
    for name, r in list(results.items()) + [("chance", [(0.1, 0.2, 0.0)] * a.seeds)]:
        m10, m20 = statistics.mean(x[0] for x in r), statistics.mean(x[1] for x in r)
        s10 = statistics.stdev(x[0] for x in r) if len(r) > 1 else 0.0
        s20 = statistics.stdev(x[1] for x in r) if len(r) > 1 else 0.0
        sec = statistics.mean(x[2] for x in r)
        print(f"{name:22s} {m10:7.3f} ± {s10:.3f} {m20:7.3f} ± {s20:.3f} {sec:8.2f}")
        rows.append(dict(method=name, n_train=a.n_train, flip=a.flip, epochs=a.epochs, seeds=a.seeds, k=a.k,
                         top10=round(m10, 4), top10_sd=round(s10, 4), top20=round(m20, 4), top20_sd=round(s20, 4),
                         seconds=round(sec, 3)))
    if a.csv:
        append_csv(a.csv, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
