"""pkfast demo: record a training run, compute its path-kernel Gram, and check it against the float64 oracle.

What it does (``make demo`` runs it with the defaults; 5–25 s on a 2-core CPU):

1. trains a small tanh MLP (64-64-10, one hidden layer) on scikit-learn's bundled digits with plain SGD
   and cross-entropy, recording every optimizer step with :class:`pkfast.TrajectoryRecorder`;
2. opens the recording lazily with :meth:`pkfast.Trajectory.load`;
3. computes the path-kernel Gram K(x, x') = Σ_s ε_s ∇_w f(x; w_s)·∇_w f(x'; w_s) (outputs="trace") on
   N training points with :func:`pkfast.gram`, and times it;
4. checks symmetry, positive semi-definiteness, and agreement with :func:`pkfast.reference.gram_reference`
   (float64 autograd loops) on a small subset.

Exit status: 0 if the agreement check passes (relative Frobenius error ≤ 1e-5 in float32), 1 otherwise.
No network access is needed.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

import pkfast
from pkfast.reference import gram_reference

#: Relative Frobenius tolerance of the float32 Gram against the float64 reference (as in the test suite).
RTOL_FLOAT32 = 1e-5


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Train a small MLP on the digits data set while recording its trajectory with pkfast, "
        "then compute and check its path-kernel Gram matrix.",
    )
    p.add_argument("-n", "--num-points", type=int, default=300, metavar="N",
                   help="training points in the Gram (default: %(default)s)")
    p.add_argument("--epochs", type=int, default=3, help="training epochs (default: %(default)s)")
    p.add_argument("--lr", type=float, default=0.05, help="SGD learning rate (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=64, help="mini-batch size (default: %(default)s)")
    p.add_argument("--hidden", type=int, default=64, help="hidden width of the MLP (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="seed for the split, initialisation and batches "
                   "(default: %(default)s)")
    p.add_argument("--out", type=Path, default=None, metavar="DIR",
                   help="keep the recorded trajectory in DIR/trajectory (default: a temporary directory, deleted "
                   "at exit)")
    p.add_argument("--ref-points", type=int, default=12,
                   help="points in the check against the float64 reference (default: %(default)s)")
    p.add_argument("--ref-max-steps", type=int, default=80,
                   help="if the trajectory has more steps than this, the reference check uses an evenly spaced "
                   "sub-trajectory of this many steps (default: %(default)s)")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    args = p.parse_args(argv)
    for name in ("num_points", "epochs", "batch_size", "hidden", "ref_points", "ref_max_steps"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1; found {getattr(args, name)}")
    if args.lr <= 0:
        p.error(f"--lr must be positive; found {args.lr}")
    return args


def load_data(seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Digits (1797 × 64), split 70/30 stratified, standardised with the training statistics."""
    X, y = load_digits(return_X_y=True)
    X_tr, X_te, y_tr, y_te = train_test_split(X, y, test_size=0.3, random_state=seed, stratify=y)
    mu, sd = X_tr.mean(0), X_tr.std(0)
    sd[sd == 0] = 1.0  # constant pixels (always 0 at the border)
    X_tr, X_te = (X_tr - mu) / sd, (X_te - mu) / sd
    f32 = lambda a: torch.as_tensor(a, dtype=torch.float32)  # noqa: E731
    return f32(X_tr), torch.as_tensor(y_tr), f32(X_te), torch.as_tensor(y_te)


def train(model: torch.nn.Module, X: torch.Tensor, y: torch.Tensor, path: Path, args: argparse.Namespace) -> float:
    """Plain mini-batch SGD with cross-entropy, recording w_0 … w_T to ``path``. Returns the wall time."""
    opt = torch.optim.SGD(model.parameters(), lr=args.lr)
    loss_fn = torch.nn.CrossEntropyLoss()
    gen = torch.Generator().manual_seed(args.seed)
    t0 = time.perf_counter()
    model.train()
    with pkfast.TrajectoryRecorder(model, opt, path, overwrite=True) as rec:
        for _ in range(args.epochs):
            perm = torch.randperm(X.shape[0], generator=gen)
            for i in range(0, X.shape[0], args.batch_size):
                idx = perm[i : i + args.batch_size]
                opt.zero_grad()
                loss = loss_fn(model(X[idx]), y[idx])
                loss.backward()
                opt.step()
                rec.step(batch_indices=idx, loss=loss.item())
    return time.perf_counter() - t0


def sub_trajectory(traj: pkfast.Trajectory, n_steps: int) -> pkfast.Trajectory:
    """``n_steps`` evenly spaced left-rule terms of ``traj``: points w_s (plus w_T) with their step sizes ε_s.

    Under ``rule="left"`` the Gram of the result is the corresponding part of the full sum, so it is a fair
    check of the engine on real trajectory points at a fraction of the reference's cost.
    """
    T = traj.num_steps
    steps = np.unique(np.linspace(0, T - 1, n_steps).round().astype(int)).tolist()
    eps = traj.step_sizes
    rows = torch.stack([traj.flat(s) for s in steps] + [traj.flat(T)])
    return pkfast.Trajectory(rows, [float(eps[s]) for s in steps], traj.spec)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    t_start = time.perf_counter()
    torch.manual_seed(args.seed)

    X_tr, y_tr, X_te, y_te = load_data(args.seed)
    n = min(args.num_points, X_tr.shape[0])
    model = torch.nn.Sequential(
        torch.nn.Linear(X_tr.shape[1], args.hidden), torch.nn.Tanh(), torch.nn.Linear(args.hidden, 10),
    )
    P = sum(p.numel() for p in model.parameters() if p.requires_grad)

    with tempfile.TemporaryDirectory(prefix="pkfast-demo-") as tmp:
        root = args.out if args.out is not None else Path(tmp)
        path = root / "trajectory"

        # 1. train while recording
        t_train = train(model, X_tr, y_tr, path, args)
        model.eval()  # no BatchNorm/Dropout here, but gram() needs per-sample outputs: always evaluate in eval mode
        with torch.no_grad():
            acc = float((model(X_te).argmax(1) == y_te).float().mean())

        # 2. open the recording lazily (weights stay memory-mapped on disk)
        traj = pkfast.Trajectory.load(path)
        T, sum_eps = traj.num_steps, float(traj.step_sizes.sum())

        # 3. the path-kernel Gram on the first n training points
        X = X_tr[:n]
        t0 = time.perf_counter()
        K = pkfast.gram(model, traj, X, outputs="trace", progress=not args.no_progress)
        t_gram = time.perf_counter() - t0

        # 4. checks
        asym = float((K - K.T).abs().max())
        evals = torch.linalg.eigvalsh(K.double())
        lam_min, lam_max = float(evals[0]), float(evals[-1])

        m = min(args.ref_points, n)
        if T <= args.ref_max_steps:
            ref_traj, K_fast = traj, K[:m, :m]  # the block of the Gram computed above
            ref_what = f"full trajectory, {T} steps"
        else:
            ref_traj = sub_trajectory(traj, args.ref_max_steps)
            K_fast = pkfast.gram(model, ref_traj, X[:m], progress=False)
            ref_what = f"sub-trajectory of {ref_traj.num_steps} evenly spaced steps"
        t0 = time.perf_counter()
        K_ref = gram_reference(model, ref_traj, X[:m])
        t_ref = time.perf_counter() - t0
        err = float((K_fast.double() - K_ref).norm() / K_ref.norm())
        ok = err <= RTOL_FLOAT32

        entries = n * n * T
        print("pkfast demo: path-kernel Gram of a digits MLP along its SGD trajectory")
        print(f"  pkfast {pkfast.__version__}, torch {torch.__version__}, {torch.get_num_threads()} CPU threads")
        print(f"  model       MLP 64-{args.hidden}-10 (tanh): P = {P:,} trainable params, C = 10 outputs")
        print(f"  training    {args.epochs} epochs of SGD (lr {args.lr}, batch {args.batch_size}) on "
              f"{X_tr.shape[0]} points in {t_train:.2f} s; test accuracy {acc:.1%} on {X_te.shape[0]} points")
        print(f"  trajectory  T = {T} steps, Σε = {sum_eps:.4g}, "
              f"{'kept in ' + str(path) if args.out is not None else 'temporary directory'}")
        print(f"  Gram        pkfast.gram(outputs='trace') on N = {n}: shape {tuple(K.shape)}, {K.dtype}, "
              f"{t_gram:.2f} s (N²·T / time = {entries / t_gram:.3g} per s)")
        print(f"  symmetry    max |K − Kᵀ| = {asym:.3g}")
        print(f"  PSD         λ_min / λ_max = {lam_min:.4g} / {lam_max:.4g} = {lam_min / lam_max:.3g} "
              f"(eigvalsh, float64)")
        print(f"  reference   gram_reference (float64) on {m} points, {ref_what}: rel. Frobenius error "
              f"{err:.3g} (tolerance {RTOL_FLOAT32:g}, reference took {t_ref:.1f} s)")
        print(f"{'PASS' if ok else 'FAIL'}: float32 Gram {'agrees' if ok else 'DISAGREES'} with the float64 "
              f"reference (total {time.perf_counter() - t_start:.1f} s)")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
