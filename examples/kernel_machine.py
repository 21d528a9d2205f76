"""A network trained by gradient descent is a kernel machine: a worked example on scikit-learn's digits.

Domingos (2020) wrote the output of a network trained by gradient descent as a kernel machine over its
training points, f(x; w_T) = b(x) + Σ_i c_i(x), with the path kernel K(x, x') = Σ_s ε_s ∇f(x; w_s)·∇f(x'; w_s);
Bell et al. (2023) made it exact by averaging the query-side Jacobian over each step. This script checks both
readings on a real training run and uses the kernel for attribution and as a kernel for an SVM. It runs on a
laptop CPU (about 1–2 minutes with the defaults on a 2-core machine; ``--quick``: a few seconds) and needs no
network access.

1. **Exact reconstruction.** Trains a tanh MLP (64-32-10, float64) on a subset of the digits with mini-batch
   SGD + momentum and ``nn.CrossEntropyLoss``, recording every step with :class:`pkfast.TrajectoryRecorder`
   (weights, applied lr, ordered batch indices, loss convention, targets). Rebuilds the network's test-set
   logits with ``pkfast.KernelMachine(rule="exact")`` from the training points alone and reports the max abs
   difference, the relative error, the class agreement and the certificate (quadrature residual and the
   recorded-vs-recomputed update error).
2. **Domingos' Riemann reading is first order.** Trains the same initial network by full-batch gradient
   descent with lr ∈ {0.2, 0.1, 0.05, 0.025} and T = (lr·T)/lr steps (the same gradient-flow time), and
   reports the reconstruction error of ``KernelMachine(rule="left")``: it halves with the lr (error ∝ lr),
   while that of the exact rule falls as lr^(2·nodes) down to rounding level.
3. **Attribution.** ``KernelMachine.explain``: the training digits that pushed a test prediction up
   (proponents) and down (opponents) the most.
4. **The path kernel as a kernel.** The train Gram and the test×train cross-Gram from :func:`pkfast.gram`
   (outputs="trace", rule="left") fed to ``SVC(kernel="precomputed")`` and ``KernelRidge(kernel="precomputed")``
   on one-hot targets; test accuracy against the network's and an RBF SVC's on the raw pixels. C and alpha are
   chosen by 3-fold cross-validation on the training set only.

Outputs in ``--out`` (default ``kernel_machine_out/``): ``explain_digit.png``, ``gram_heatmap.png`` and
``left_rule_error.png`` (skipped, with a message, if matplotlib is not installed), and ``summary.json``. The
last printed line is ``SUMMARY {json}`` with every reported number.

Exit status: 0 if the sanity checks pass (exact machine: 100% class agreement and max abs difference ≤ --tol;
left rule: the error falls with every halving of the lr), 1 otherwise.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from sklearn.datasets import load_digits
from sklearn.kernel_ridge import KernelRidge
from sklearn.model_selection import GridSearchCV, StratifiedKFold, train_test_split
from sklearn.svm import SVC

import pkfast

#: Grids searched by 3-fold cross-validation on the training set (never on the test set).
C_GRID = (0.1, 1.0, 10.0, 100.0)
ALPHA_GRID = (1e-3, 1e-2, 1e-1, 1.0)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Show that an SGD-trained MLP on the digits is a kernel machine over its training points "
        "(exact reconstruction, Domingos' first-order left rule, attributions, path-kernel SVM).",
    )
    p.add_argument("--out", type=Path, default=Path("kernel_machine_out"), metavar="DIR",
                   help="directory for the figures and summary.json (default: %(default)s)")
    p.add_argument("--quick", action="store_true",
                   help="a tiny smoke configuration (seconds): overrides the sizes below")
    p.add_argument("--train", type=int, default=600, help="training points (default: %(default)s)")
    p.add_argument("--test", type=int, default=300, help="test points (default: %(default)s)")
    p.add_argument("--hidden", type=int, default=32, help="hidden width of the MLP (default: %(default)s)")
    p.add_argument("--epochs", type=int, default=10, help="training epochs (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=50, help="mini-batch size (default: %(default)s)")
    p.add_argument("--lr", type=float, default=0.05, help="SGD learning rate (default: %(default)s)")
    p.add_argument("--momentum", type=float, default=0.9, help="SGD momentum, 0 for plain SGD "
                   "(default: %(default)s)")
    p.add_argument("--nodes", type=int, default=3, help="Gauss–Legendre nodes per step of the exact rule: its "
                   "error falls as lr^(2·nodes) (default: %(default)s)")
    p.add_argument("--lrs", type=str, default="0.2,0.1,0.05,0.025", metavar="LR,LR,...",
                   help="learning rates of the left-rule scan, decreasing (default: %(default)s)")
    p.add_argument("--flow-time", type=float, default=4.0, metavar="LR*T",
                   help="lr·T of every run of the left-rule scan (T = this / lr steps; default: %(default)s)")
    p.add_argument("--scan-train", type=int, default=None, metavar="N",
                   help="training points of the full-batch left-rule scan (default: min(200, --train))")
    p.add_argument("--scan-test", type=int, default=None, metavar="M",
                   help="queries of the left-rule scan (default: min(100, --test))")
    p.add_argument("-k", "--top-k", dest="k", type=int, default=5,
                   help="proponents and opponents shown (default: %(default)s)")
    p.add_argument("--explain-index", type=int, default=0, metavar="I",
                   help="the test point explained in explain_digit.png (default: %(default)s)")
    p.add_argument("--tol", type=float, default=1e-6,
                   help="max abs logit difference allowed for the exact machine (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="seed for the split, initialisation and batches "
                   "(default: %(default)s)")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    args = p.parse_args(argv)
    if args.quick:
        args.train, args.test, args.epochs, args.batch_size = 120, 60, 3, 40
        args.lrs, args.flow_time, args.scan_train, args.scan_test = "0.2,0.1,0.05", 1.0, 60, 30
    for name in ("train", "test"):
        if getattr(args, name) < 10:
            p.error(f"--{name} must be at least 10 (a stratified split needs one point per class); "
                    f"found {getattr(args, name)}")
    if args.train + args.test > 1797:
        p.error(f"--train + --test must be at most 1797 (the digits data set); found {args.train + args.test}")
    args.scan_train = min(200, args.train) if args.scan_train is None else args.scan_train
    args.scan_test = min(100, args.test) if args.scan_test is None else args.scan_test
    for name in ("hidden", "epochs", "batch_size", "nodes", "scan_train", "scan_test", "k"):
        if getattr(args, name) < 1:
            flag = "--top-k" if name == "k" else "--" + name.replace("_", "-")
            p.error(f"{flag} must be at least 1; found {getattr(args, name)}")
    for scan, full in (("scan_train", "train"), ("scan_test", "test")):
        if getattr(args, scan) > getattr(args, full):
            p.error(f"--{scan.replace('_', '-')} must not exceed --{full} ({getattr(args, full)}); "
                    f"found {getattr(args, scan)}")
    if args.lr <= 0 or args.flow_time <= 0 or args.tol <= 0:
        p.error("--lr, --flow-time and --tol must be positive")
    if not 0 <= args.momentum < 1:
        p.error(f"--momentum must be in [0, 1); found {args.momentum}")
    try:
        args.lr_list = [float(v) for v in args.lrs.split(",") if v.strip()]
    except ValueError:
        p.error(f"--lrs must be comma-separated numbers; found {args.lrs!r}")
    if len(args.lr_list) < 2 or any(v <= 0 for v in args.lr_list) or args.lr_list != sorted(args.lr_list, reverse=True):
        p.error(f"--lrs needs at least two positive, decreasing learning rates; found {args.lrs!r}")
    if not 0 <= args.explain_index < args.test:
        p.error(f"--explain-index must be in 0…{args.test - 1}; found {args.explain_index}")
    return args


# ---------------------------------------------------------------------------------------------- data, model
def load_data(n_train: int, n_test: int, seed: int):
    """Stratified train/test subsets of the digits, standardised with the training statistics (float64).
    Also returns the raw 8×8 images for the figures."""
    X, y = load_digits(return_X_y=True)
    idx_tr, idx_te = train_test_split(np.arange(len(y)), train_size=n_train, test_size=n_test,
                                      random_state=seed, stratify=y)
    mu, sd = X[idx_tr].mean(0), X[idx_tr].std(0)
    sd[sd == 0] = 1.0  # constant pixels (always 0 at the border)
    t = lambda a: torch.as_tensor(a, dtype=torch.float64)  # noqa: E731
    return (t((X[idx_tr] - mu) / sd), torch.as_tensor(y[idx_tr]), t((X[idx_te] - mu) / sd),
            torch.as_tensor(y[idx_te]), X[idx_tr].reshape(-1, 8, 8), X[idx_te].reshape(-1, 8, 8))


def make_mlp(hidden: int, seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(64, hidden), torch.nn.Tanh(), torch.nn.Linear(hidden, 10)).double()


def train_recorded(model, X, y, path: Path, *, lr: float, momentum: float, epochs: int, batch_size: int | None,
                   seed: int) -> pkfast.Trajectory:
    """SGD (mini-batch, or full batch with ``batch_size=None``) with cross-entropy, every step recorded with what
    the exact kernel machine needs: the ordered batch indices, the loss convention and the targets."""
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum)
    loss_fn = torch.nn.CrossEntropyLoss()
    gen = torch.Generator().manual_seed(seed)
    N = X.shape[0]
    with pkfast.TrajectoryRecorder(model, opt, path, overwrite=True, loss=loss_fn, targets=y) as rec:
        for _ in range(epochs):
            if batch_size is None:
                batches = [torch.arange(N)]
            else:
                perm = torch.randperm(N, generator=gen)
                batches = [perm[i:i + batch_size] for i in range(0, N, batch_size)]
            for idx in batches:
                opt.zero_grad()
                loss_fn(model(X[idx]), y[idx]).backward()
                opt.step()
                rec.step(batch_indices=idx)
    return pkfast.Trajectory.load(path)


def logits(model, X) -> torch.Tensor:
    with torch.no_grad():
        return model(X)


def at_point(model, traj: pkfast.Trajectory, k: int) -> torch.nn.Module:
    """A copy of ``model`` with the weights w_k of the recording."""
    m = copy.deepcopy(model)
    m.load_state_dict(traj.point(k), strict=False)
    return m


# ---------------------------------------------------------------------------------------------- figures
def _plt():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        return plt
    except ImportError:
        return None


def fig_explain(plt, path: Path, img_q, label_q, pred_q, e, imgs_tr, y_tr, k: int) -> None:
    fig, axes = plt.subplots(3, k, figsize=(1.9 * k, 6.6))
    for ax in axes.ravel():
        ax.axis("off")
    ax = axes[0, k // 2]
    ax.imshow(img_q, cmap="gray_r")
    ax.set_title(f"test digit (label {label_q})\npredicted {pred_q}", fontsize=10)
    axes[0, 0].text(0.0, 0.5, f"explaining class {e.target}\nΣ_i c_i = {e.total:+.3f}\n"
                    f"top-{k} coverage {e.coverage:.0%}", fontsize=9, va="center", transform=axes[0, 0].transAxes)
    for row, (ids, scores, name, cmap) in enumerate(
            ((e.proponents, e.proponent_scores, "proponent", "Greens"),
             (e.opponents, e.opponent_scores, "opponent", "Reds")), start=1):
        for j, (i, s) in enumerate(zip(ids.tolist(), scores.tolist())):
            ax = axes[row, j]
            ax.imshow(imgs_tr[i], cmap=cmap)
            ax.set_title(f"{name} #{j + 1}\ntrain {i}, label {int(y_tr[i])}\nc = {s:+.3g}", fontsize=8.5)
    fig.suptitle("KernelMachine.explain: training digits with the largest contributions c_i(x)[class]",
                 fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def fig_gram(plt, path: Path, K: np.ndarray, y: np.ndarray) -> None:
    order = np.argsort(y, kind="stable")
    Ks, ys = K[np.ix_(order, order)], y[order]
    fig, ax = plt.subplots(figsize=(6.4, 5.6))
    lim = np.percentile(np.abs(Ks), 99)
    im = ax.imshow(Ks, cmap="RdBu_r", vmin=-lim, vmax=lim, interpolation="nearest")
    bounds = np.flatnonzero(np.diff(ys)) + 0.5
    for b in bounds:
        ax.axhline(b, color="k", lw=0.6)
        ax.axvline(b, color="k", lw=0.6)
    edges = np.concatenate([[-0.5], bounds, [len(ys) - 0.5]])
    centres = (edges[:-1] + edges[1:]) / 2
    ax.set_xticks(centres, [str(c) for c in np.unique(ys)])
    ax.set_yticks(centres, [str(c) for c in np.unique(ys)])
    ax.set_xlabel("training point (sorted by class)")
    ax.set_ylabel("training point (sorted by class)")
    ax.set_title("path-kernel Gram K(x, x′) / mean diagonal\n(outputs='trace', rule='left'; clipped at the 99th pct)",
                 fontsize=10)
    fig.colorbar(im, ax=ax, shrink=0.85)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def fig_left_rule(plt, path: Path, rows: list[dict], flow_time: float, nodes: int) -> None:
    lrs = np.array([r["lr"] for r in rows])
    left = np.array([r["left_max_abs"] for r in rows])
    exact = np.array([r["exact_max_abs"] for r in rows])
    fig, ax = plt.subplots(figsize=(5.6, 4.2))
    ax.loglog(lrs, left, "o-", label="rule='left' (Domingos)")
    ax.loglog(lrs, 3 * left[-1] * lrs / lrs[-1], "k--", lw=0.8, label="∝ lr (slope 1, shifted up ×3)")
    ax.loglog(lrs, np.maximum(exact, 1e-17), "s-", label=f"rule='exact', nodes={nodes} (Gauss–Legendre)")
    ax.loglog(lrs, 3 * exact[0] * (lrs / lrs[0]) ** (2 * nodes), "k:", lw=0.8,
              label=f"∝ lr$^{{{2 * nodes}}}$ (shifted up ×3)")
    for x, y_, r in zip(lrs[1:], left[1:], rows[1:]):
        ax.annotate(f"÷{r['left_ratio']:.2f}", (x, y_), textcoords="offset points", xytext=(0, -13), ha="center",
                    fontsize=8)
    ax.set_xticks(lrs, [f"{v:g}" for v in lrs])
    ax.minorticks_off()
    ax.set_ylim(np.maximum(exact, 1e-17).min() / 10, left.max() * 30)
    ax.set_xlabel("learning rate ε  (T = %g / ε steps of full-batch GD)" % flow_time)
    ax.set_ylabel("max |KernelMachine − network| (logits)")
    ax.set_title("Kernel-machine reconstruction error vs step size", fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    t_start = time.perf_counter()
    progress = not args.no_progress
    args.out.mkdir(parents=True, exist_ok=True)
    plt = _plt()
    S: dict = {"config": {k: v for k, v in vars(args).items() if k not in ("out", "lr_list")}}
    S["config"]["out"] = str(args.out)
    timings: dict[str, float] = {}

    X_tr, y_tr, X_te, y_te, img_tr, img_te = load_data(args.train, args.test, args.seed)
    print("pkfast kernel-machine example: an SGD-trained MLP on the digits as a kernel machine")
    print(f"  pkfast {pkfast.__version__}, torch {torch.__version__}, {torch.get_num_threads()} CPU threads; "
          f"digits: {len(y_tr)} train / {len(y_te)} test points, standardised, float64")

    with tempfile.TemporaryDirectory(prefix="pkfast-km-") as tmp:
        tmp = Path(tmp)

        # ------------------------------------------------------------------ 1. train, record, reconstruct
        t0 = time.perf_counter()
        model = make_mlp(args.hidden, args.seed)
        P = sum(p.numel() for p in model.parameters())
        traj = train_recorded(model, X_tr, y_tr, tmp / "main", lr=args.lr, momentum=args.momentum,
                              epochs=args.epochs, batch_size=args.batch_size, seed=args.seed)
        timings["train"] = time.perf_counter() - t0
        model.eval()
        f_te, f_tr = logits(model, X_te), logits(model, X_tr)
        acc_net = float((f_te.argmax(1) == y_te).double().mean())
        acc_net_train = float((f_tr.argmax(1) == y_tr).double().mean())
        f0_te = logits(at_point(model, traj, 0), X_te)

        t0 = time.perf_counter()
        km = pkfast.KernelMachine(model, traj, X_tr, rule="exact", nodes=args.nodes, progress=progress)
        pred = km.predict(X_te)
        timings["kernel_machine_predict"] = time.perf_counter() - t0
        diff = (pred - f_te).abs()
        max_abs = float(diff.max())
        rel = float((pred - f_te).norm() / f_te.norm())
        agree = float((pred.argmax(1) == f_te.argmax(1)).double().mean())
        bias_share = float(f0_te.norm() / f_te.norm())  # b(x) = f(x; w_0) here: no weight decay
        t0 = time.perf_counter()
        cert = km.certificate(X_te)
        timings["certificate"] = time.perf_counter() - t0
        upd = float(cert.update.max())
        S["exact"] = {"T": traj.num_steps, "P": P, "nodes": args.nodes, "max_abs_diff": max_abs,
                      "rel_error": rel, "class_agreement": agree, "max_abs_logit": float(f_te.abs().max()),
                      "certificate_max_quadrature": cert.max_quadrature, "certificate_max_update_residual": upd,
                      "bias_norm_share": bias_share}

        print(f"\n1. Exact reconstruction: f(x; w_T) = b(x) + Σ_i c_i(x) over the {len(y_tr)} training points")
        print(f"  network     MLP 64-{args.hidden}-10 (tanh, float64), P = {P:,}; SGD lr {args.lr}, momentum "
              f"{args.momentum}, batch {args.batch_size}, {args.epochs} epochs = T {traj.num_steps} steps "
              f"({timings['train']:.1f} s)")
        print(f"  accuracy    train {acc_net_train:.1%}, test {acc_net:.1%}")
        print(f"  machine     KernelMachine(rule='exact', nodes={args.nodes}).predict on {len(y_te)} test points "
              f"({timings['kernel_machine_predict']:.1f} s)")
        print(f"  error       max |KM − net| = {max_abs:.3g} (logits up to {float(f_te.abs().max()):.3g}); "
              f"relative ‖KM − net‖/‖net‖ = {rel:.3g}")
        print(f"  agreement   {agree:.1%} of test points get the same class")
        print(f"  bias        ‖b‖/‖f‖ = ‖f(w_0)‖/‖f(w_T)‖ = {bias_share:.3f} (no weight decay: b(x) = f(x; w_0)); "
              "the rest of the logits is Σ_i c_i(x), carried by the training points")
        print(f"  certificate max quadrature residual {cert.max_quadrature:.3g} (relative to max |f(w_T) − f(w_0)|); "
              f"max update residual ‖Δ − Δ̂‖/‖Δ‖ = {upd:.3g} ({timings['certificate']:.1f} s)")

        # ------------------------------------------------------------------ 2. left rule: error ∝ lr
        t0 = time.perf_counter()
        Xs, ys, Xq = X_tr[:args.scan_train], y_tr[:args.scan_train], X_te[:args.scan_test]
        rows = []
        for i, lr in enumerate(args.lr_list):
            T = max(1, round(args.flow_time / lr))
            net = make_mlp(args.hidden, args.seed)  # the same w_0 for every lr
            tr = train_recorded(net, Xs, ys, tmp / f"scan{i}", lr=lr, momentum=0.0, epochs=T, batch_size=None,
                                seed=args.seed)
            f = logits(net, Xq)
            row = {"lr": lr, "T": T}
            for rule in ("left", "exact"):
                p_ = pkfast.KernelMachine(net, tr, Xs, rule=rule, nodes=args.nodes, progress=False).predict(Xq)
                row[f"{rule}_max_abs"] = float((p_ - f).abs().max())
                row[f"{rule}_rel"] = float((p_ - f).norm() / f.norm())
            rows.append(row)
        timings["left_rule_scan"] = time.perf_counter() - t0
        for a, b in zip(rows, rows[1:]):
            b["left_ratio"] = a["left_max_abs"] / b["left_max_abs"]
            b["exact_ratio"] = a["exact_max_abs"] / b["exact_max_abs"]
        ratios = [r["left_ratio"] for r in rows[1:]]
        slope = float(np.polyfit(np.log([r["lr"] for r in rows]), np.log([r["left_max_abs"] for r in rows]), 1)[0])
        S["left_rule"] = {"rows": rows, "slope": slope, "flow_time": args.flow_time,
                          "train_points": args.scan_train, "queries": args.scan_test}

        print(f"\n2. Domingos' left rule is first order: full-batch GD on {args.scan_train} points, same w_0, "
              f"lr·T = {args.flow_time:g}, {args.scan_test} queries ({timings['left_rule_scan']:.1f} s)")
        print(f"  {'lr':>7} {'T':>5}  {'left: max abs err':>17} {'ratio':>6} {'rel err':>9}   "
              f"{'exact (nodes=%d): max abs err' % args.nodes:>29} {'ratio':>6}")
        for r in rows:
            ratio = f"{r['left_ratio']:6.2f}" if "left_ratio" in r else f"{'':6}"
            eratio = f"{r['exact_ratio']:6.1f}" if "exact_ratio" in r else f"{'':6}"
            print(f"  {r['lr']:7.4g} {r['T']:5d}  {r['left_max_abs']:17.3e} {ratio} {r['left_rel']:9.2e}   "
                  f"{r['exact_max_abs']:29.2e} {eratio}")
        print(f"  log-log slope of the left-rule error vs lr: {slope:.2f} (1 = first order: ratio 2 per halving); "
              f"exact rule: ratio 2^{2 * args.nodes} = {2 ** (2 * args.nodes)} per halving until rounding")

        # ------------------------------------------------------------------ 3. attribution
        q = args.explain_index
        e = km.explain(X_te[q], k=args.k)
        S["explain"] = {"test_index": q, "label": int(y_te[q]), "predicted": int(f_te[q].argmax()),
                        "target": e.target, "proponents": e.proponents.tolist(),
                        "proponent_labels": [int(y_tr[i]) for i in e.proponents],
                        "proponent_scores": e.proponent_scores.tolist(), "opponents": e.opponents.tolist(),
                        "opponent_labels": [int(y_tr[i]) for i in e.opponents],
                        "opponent_scores": e.opponent_scores.tolist(), "total": e.total, "coverage": e.coverage}
        print(f"\n3. Attribution: test point {q} (label {int(y_te[q])}, predicted {int(f_te[q].argmax())}), "
              f"KernelMachine.explain(k={args.k}) for class {e.target}")
        print("  proponents  " + ", ".join(f"#{i} (label {int(y_tr[i])}) {s:+.3g}"
                                            for i, s in zip(e.proponents.tolist(), e.proponent_scores.tolist())))
        print("  opponents   " + ", ".join(f"#{i} (label {int(y_tr[i])}) {s:+.3g}"
                                            for i, s in zip(e.opponents.tolist(), e.opponent_scores.tolist())))
        print(f"  Σ_i c_i = {e.total:+.4g} (= f_c(x; w_T) − b_c(x)); the top {args.k} proponents carry "
              f"{e.coverage:.1%} of the positive contributions")

        # ------------------------------------------------------------------ 4. path kernel as an SVM kernel
        t0 = time.perf_counter()
        K = pkfast.gram(model, traj, X_tr, outputs="trace", progress=progress).double().numpy()
        K2 = pkfast.gram(model, traj, X_te, X_tr, outputs="trace", progress=progress).double().numpy()
        timings["gram"] = time.perf_counter() - t0
        scale = float(np.mean(np.diag(K)))
        K, K2 = K / scale, K2 / scale
        ytr, yte = y_tr.numpy(), y_te.numpy()
        onehot = np.eye(10)[ytr]
        t0 = time.perf_counter()
        cv = list(StratifiedKFold(3, shuffle=True, random_state=args.seed).split(X_tr.numpy(), ytr))
        svc = GridSearchCV(SVC(kernel="precomputed"), {"C": list(C_GRID)}, cv=cv).fit(K, ytr)
        krr = GridSearchCV(KernelRidge(kernel="precomputed"), {"alpha": list(ALPHA_GRID)}, cv=cv,
                           scoring=lambda est, Kx, yx: float((est.predict(Kx).argmax(1) == yx.argmax(1)).mean())
                           ).fit(K, onehot)
        rbf = GridSearchCV(SVC(kernel="rbf", gamma="scale"), {"C": list(C_GRID)}, cv=cv).fit(X_tr.numpy(), ytr)
        timings["svm"] = time.perf_counter() - t0
        acc = {
            "network": acc_net,
            "path_kernel_svc": float((svc.predict(K2) == yte).mean()),
            "path_kernel_krr": float((krr.predict(K2).argmax(1) == yte).mean()),
            "rbf_svc": float((rbf.predict(X_te.numpy()) == yte).mean()),
        }
        params = {"path_kernel_svc": f"C={svc.best_params_['C']:g}", "path_kernel_krr":
                  f"alpha={krr.best_params_['alpha']:g}", "rbf_svc": f"C={rbf.best_params_['C']:g}, gamma='scale'",
                  "network": f"MLP 64-{args.hidden}-10"}
        S["kernels"] = {"test_accuracy": acc, "params": params, "gram_scale": scale}
        print(f"\n4. The path kernel as a kernel: pkfast.gram(outputs='trace', rule='left') train {K.shape} and "
              f"test×train {K2.shape} ({timings['gram']:.1f} s), divided by the mean diagonal {scale:.4g}; "
              f"C/alpha by 3-fold CV on the training set")
        print(f"  {'model':<34} {'test accuracy':>13}   chosen")
        names = {"network": "the trained network", "path_kernel_svc": "SVC(kernel='precomputed') on K_path",
                 "path_kernel_krr": "KernelRidge on K_path, one-hot", "rbf_svc": "SVC(kernel='rbf') on pixels"}
        for key, name in names.items():
            print(f"  {name:<34} {acc[key]:13.1%}   {params[key]}")

        # ------------------------------------------------------------------ figures
        figs = []
        if plt is None:
            print("\nfigures skipped: matplotlib is not installed (pip install matplotlib)")
        else:
            p = args.out / "explain_digit.png"
            fig_explain(plt, p, img_te[q], int(y_te[q]), int(f_te[q].argmax()), e, img_tr, ytr, args.k)
            figs.append(p)
            p = args.out / "gram_heatmap.png"
            fig_gram(plt, p, K, ytr)
            figs.append(p)
            p = args.out / "left_rule_error.png"
            fig_left_rule(plt, p, rows, args.flow_time, args.nodes)
            figs.append(p)
        S["figures"] = [str(p) for p in figs]

    # ---------------------------------------------------------------------- checks and summary
    checks = {
        "exact_class_agreement_100": agree == 1.0,
        f"exact_max_abs_diff_le_{args.tol:g}": max_abs <= args.tol,
        "left_error_falls_with_lr": all(r > 1.0 for r in ratios),
    }
    ok = all(checks.values())
    timings["total"] = time.perf_counter() - t_start
    S["checks"], S["ok"], S["timings_s"] = checks, ok, {k: round(v, 2) for k, v in timings.items()}
    (args.out / "summary.json").write_text(json.dumps(S, indent=1))

    print("\nSummary")
    print(f"  exact KM vs network (test, {len(y_te)} pts): max abs diff {max_abs:.2e}, rel error {rel:.2e}, "
          f"class agreement {agree:.1%}, certificate max quadrature {cert.max_quadrature:.2e}, "
          f"max update residual {upd:.1e}")
    print("  left-rule max abs error: " + ", ".join(f"lr {r['lr']:g} (T {r['T']}) {r['left_max_abs']:.2e}"
                                                   for r in rows)
          + f"; ratios per halving " + ", ".join(f"{v:.2f}" for v in ratios) + f"; slope {slope:.2f}")
    print("  test accuracy: " + ", ".join(f"{names[k_]} {v:.1%}" for k_, v in acc.items()))
    print("  figures: " + (", ".join(str(p) for p in figs) if figs else "skipped (no matplotlib)")
          + f"; summary: {args.out / 'summary.json'}")
    print(f"{'PASS' if ok else 'FAIL'}: " + ", ".join(f"{k_} {'ok' if v else 'FAILED'}" for k_, v in checks.items())
          + f" (total {timings['total']:.1f} s)")
    print("SUMMARY " + json.dumps(S, separators=(",", ":")))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
