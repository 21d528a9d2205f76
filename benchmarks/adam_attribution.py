"""Issue 26, evidence: attributing an AdamW-trained digits MLP — the exact contributions against the SGD proxy and
LESS-style features, by correlation and by leave-k-out retraining.

    python benchmarks/adam_attribution.py [--n 500] [--m 20] [--epochs 4] [--k 10] \\
        [--csv benchmarks/results/adam_attribution_cpu.csv] [--log benchmarks/results/adam_attribution_cpu.log]
    python benchmarks/adam_attribution.py --quick      # smoke test: N = 128, 4 queries, 3 epochs (a few seconds)

Training: an MLP 64-64-10 (tanh, float64) on N standardised digits, torch.optim.AdamW (lr 3e-3 decaying linearly to
0, weight decay 0.01), batches of 32 in a seeded order per epoch, ``clip_grad_norm_(1.0)`` between backward and step
as ``transformers.Trainer`` does; every step recorded by ``pkfast.TrajectoryRecorder`` (each step's preconditioner
P_t and clipping coefficient), and a torch checkpoint with ``optimizer.state_dict()`` saved at every epoch's end.

The quantity attributed, for a held-out query x with label y: the query's loss ℓ(x), linearised at the trained
network, φ(x) = g_xᵀ f(x) with g_x = softmax(f(x; w_T)) − onehot(y) held fixed. Every method scores training
point i by "how much i lowered the query's loss" (positive: a proponent):

| method | score s_i(x) |
|---|---|
| exact | −g_xᵀ c_i(x), c_i from ``pkfast.KernelMachine(...).contributions`` (exact: b(x) + Σ_i c_i(x) = f(x; w_T)) |
| sgd_proxy | the Euclidean loss path kernel Σ_t ε_t ∇ℓ(x; w_t)·∇ℓ_i(w_t), every step (``gram(of="loss", preconditioner=None)``; TracIn at every step) |
| tracin_cp | the same at the epoch checkpoints only (TracInCP: ``Trajectory.from_checkpoints``, ε = the summed lr of a segment) |
| less_ckpt | LESS-style: Σ_c ε_c ∇ℓ(x; w_c)ᵀ diag(P_c) ∇ℓ_i(w_c), P_c = 1/(√v̂_c + ε) from the optimizer state saved at each checkpoint (``from_checkpoints(..., optimizer_states=...)`` and ``gram(preconditioner="recorded")``) |
| less_hand | LESS as its code computes it (Xia et al., 2024): Σ_c ε_c cos(∇ℓ(x; w_c), Γ_i,c), Γ = m′/√(v′ + ε) with m′ = β1 m + (1−β1) g_i, v′ = β2 v + (1−β2) g_i² from the checkpoint's state (built here by hand, no projection) |
| precond_path | the preconditioned loss path kernel Σ_t ε_t ∇ℓ(x; w_t)ᵀ diag(P_t) ∇ℓ_i(w_t), every step's recorded P_t (``gram(of="loss", preconditioner="recorded")``) |
| random | k training points drawn at random (leave-k-out only) |

Reported per method: Pearson and Spearman correlation of s(x) with the exact score over the N training points, per
query, then mean (and min) over the M queries; and leave-k-out: for each query remove the k highest-scored training
points, retrain from the same initialisation in the same batch order with those points' losses weighted 0 (each
batch's mean keeps its denominator, so the other points' weights are unchanged — the counterfactual the
contributions describe), and measure the change of the query's loss Δℓ and of φ, Δφ = g_xᵀ(f⁻ᴿ(x) − f(x)), against
the prediction of the exact contributions Σ_{i∈R} s_i^exact(x). A method whose top-k matter more raises the query
loss more when removed. Not attributed by the contributions (docs/math.md §6.2): the influence that flows through
the preconditioner (removing a point also changes v), which the retraining does include.
"""

from __future__ import annotations

import argparse
import copy
import csv
import os
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from scipy.stats import pearsonr, spearmanr
from torch import nn
from torch.func import functional_call, grad, vmap

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import pkfast  # noqa: E402
from _common import environment, format_environment, load_digits_data, mlp  # noqa: E402

#: Gauss–Legendre nodes per step of the exact machine: the default's choice (to 1e-6 of the output change) leaves
#: ~1e-8 here; 4 nodes reach rounding (≈3e-14)
NODES = 4
METHODS = ("exact", "sgd_proxy", "tracin_cp", "less_ckpt", "less_hand", "precond_path")


@dataclass(frozen=True)
class Config:
    """One run's sizes and training hyperparameters."""

    n: int = 500
    m: int = 20
    epochs: int = 4
    k: int = 10
    batch: int = 32
    lr: float = 3e-3
    weight_decay: float = 0.01
    clip: float = 1.0
    hidden: int = 64
    seed: int = 0


@dataclass
class Data:
    """Training points, queries and the batch order of every epoch (fixed: retraining reuses it)."""

    Xt: torch.Tensor
    yt: torch.Tensor
    Xq: torch.Tensor
    yq: torch.Tensor
    batches: list[list[torch.Tensor]]


def make_data(cfg: Config) -> Data:
    """N training digits and M held-out queries (disjoint, seeded), float64, and the seeded batch order."""
    X, y = load_digits_data()
    g = torch.Generator().manual_seed(cfg.seed)
    perm = torch.randperm(X.shape[0], generator=g)
    tr, te = perm[:cfg.n], perm[cfg.n:cfg.n + cfg.m]
    batches = []
    for _ in range(cfg.epochs):
        order = torch.randperm(cfg.n, generator=g)
        batches.append([order[i:i + cfg.batch] for i in range(0, cfg.n, cfg.batch)])
    return Data(X[tr].double(), y[tr], X[te].double(), y[te], batches)


def new_net(cfg: Config) -> nn.Module:
    """The MLP 64-H-10 (tanh, float64) at the seeded initialisation."""
    torch.manual_seed(cfg.seed + 1)
    return mlp([64, cfg.hidden, 10]).double()


def train(cfg: Config, data: Data, *, weight: torch.Tensor | None = None, record: str | None = None):
    """AdamW with clip_grad_norm_ in the fixed batch order; a point's loss is weighted by ``weight`` (default 1)
    inside each batch's mean over its full size. ``record``: a folder for the TrajectoryRecorder recording (then
    the plain ``nn.CrossEntropyLoss`` mean is used) and the per-epoch checkpoints. Returns the network and
    ([w_0, w_1 …], [None, state_1 …]) at the epoch ends."""
    net = new_net(cfg)
    opt = torch.optim.AdamW(net.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    total = sum(len(e) for e in data.batches)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 - s / total)
    lossf = nn.CrossEntropyLoss()
    points, states = [copy.deepcopy(net.state_dict())], [None]
    rec = (pkfast.TrajectoryRecorder(net, opt, os.path.join(record, "traj"), loss=lossf, targets=data.yt)
           if record else None)
    for epoch in data.batches:
        for idx in epoch:
            opt.zero_grad()
            out = net(data.Xt[idx])
            if weight is None:
                loss = lossf(out, data.yt[idx])
            else:
                loss = (weight[idx] * F.cross_entropy(out, data.yt[idx], reduction="none")).sum() / len(idx)
            loss.backward()
            nn.utils.clip_grad_norm_(net.parameters(), cfg.clip)
            opt.step()
            if rec is not None:
                rec.step(batch_indices=idx)
            sched.step()
        points.append(copy.deepcopy(net.state_dict()))
        states.append(copy.deepcopy(opt.state_dict()))
    if rec is not None:
        rec.close()
    return net, (points, states)


def query_grads_out(net: nn.Module, data: Data) -> tuple[torch.Tensor, torch.Tensor]:
    """f(x; w_T) of the queries and g_x = ∂ℓ/∂f there (softmax − onehot)."""
    with torch.no_grad():
        f = net(data.Xq)
    return f, torch.softmax(f, 1) - F.one_hot(data.yq, 10).double()


def exact_scores(net: nn.Module, traj: pkfast.Trajectory, data: Data) -> tuple[torch.Tensor, dict]:
    """s_i(x) = −g_xᵀ c_i(x) from the exact kernel machine, and its reconstruction figures."""
    km = pkfast.KernelMachine(net, traj, data.Xt, nodes=NODES, progress=False)
    c = km.contributions(data.Xq)  # [M, N, C]
    f, g = query_grads_out(net, data)
    rebuilt = km.bias(data.Xq) + c.sum(1)
    info = {"machine_rel_err": float((rebuilt - f).norm() / f.norm()),
            "machine_max_update_residual": float(km.update_residual.max()),
            "machine_nodes": int(km.nodes)}
    return -(c * g[:, None, :]).sum(-1), info


def kernel_scores(net: nn.Module, traj: pkfast.Trajectory, data: Data, preconditioner: str | None) -> torch.Tensor:
    """[M, N]: the loss path kernel (left rule) between the queries and the training points."""
    K = pkfast.gram(net, traj, data.Xq, data.Xt, of="loss", loss=nn.CrossEntropyLoss(), y=data.yq, y2=data.yt,
                    rule="left", dtype=torch.float64, preconditioner=preconditioner, progress=False)
    return torch.as_tensor(np.asarray(K))


def less_hand_scores(cfg: Config, net: nn.Module, data: Data, points: list, states: list,
                     eta: torch.Tensor) -> torch.Tensor:
    """LESS's Adam features built by hand at each checkpoint c ≥ 1: Γ_i = m′/√(v′ + ε) from the saved state and
    training point i's gradient; the score Σ_c η_c cos(∇ℓ(x; w_c), Γ_i)."""
    names = [n for n, _ in net.named_parameters()]

    def loss1(p, x, t):
        return F.cross_entropy(functional_call(net, p, (x[None],)), t[None])

    def per_sample(p, X, y):
        gs = vmap(grad(loss1), in_dims=(None, 0, 0))(p, X, y)
        return torch.cat([gs[n].reshape(X.shape[0], -1) for n in names], 1)

    score = torch.zeros(data.Xq.shape[0], data.Xt.shape[0], dtype=torch.float64)
    for c in range(1, len(points)):
        p = {n: points[c][n] for n in names}
        st, grp = states[c]["state"], states[c]["param_groups"][0]
        b1, b2 = grp["betas"]
        m = torch.cat([st[j]["exp_avg"].reshape(-1) for j in range(len(names))])
        v = torch.cat([st[j]["exp_avg_sq"].reshape(-1) for j in range(len(names))])
        gt = per_sample(p, data.Xt, data.yt)
        gam = (b1 * m + (1 - b1) * gt) / torch.sqrt(b2 * v + (1 - b2) * gt ** 2 + grp["eps"])
        gq = per_sample(p, data.Xq, data.yq)
        score += eta[c - 1] * F.normalize(gq, dim=1) @ F.normalize(gam, dim=1).T
    return score


def checkpoint_trajectories(net: nn.Module, data: Data, points: list, states: list, traj: pkfast.Trajectory):
    """The epoch checkpoints as trajectories, without and with the saved optimizer states; ε of a segment is
    the summed applied lr of its steps (read from the recording)."""
    eps = traj.step_sizes.double()
    edges = np.cumsum([0] + [len(e) for e in data.batches])
    eta = torch.stack([eps[a:b].sum() for a, b in zip(edges[:-1], edges[1:])])
    plain = pkfast.Trajectory.from_checkpoints(points, lr=eta.tolist(), optimizer_states=None)
    with_p = pkfast.Trajectory.from_checkpoints(points, lr=eta.tolist(), optimizer_states=states,
                                                optimizer_params=net)
    return plain, with_p, eta


def all_scores(cfg: Config, data: Data, workdir: str, say) -> tuple[nn.Module, dict, dict]:
    """Train once (recorded), then every method's [M, N] scores and the run's figures."""
    t0 = time.perf_counter()
    net, (points, states) = train(cfg, data, record=workdir)
    traj = pkfast.Trajectory.load(os.path.join(workdir, "traj"))
    net.eval()
    with torch.no_grad():
        acc = float((net(data.Xq).argmax(1) == data.yq).double().mean())
        train_acc = float((net(data.Xt).argmax(1) == data.yt).double().mean())
    info = {"T": traj.num_steps, "P": traj.num_params, "query_acc": acc, "train_acc": train_acc,
            "clipped_steps": int((traj.clip_coefs() < 1).sum()), "train_s": time.perf_counter() - t0}
    say(f"trained: T = {info['T']} AdamW steps, P = {info['P']}, train acc {train_acc:.3f}, query acc {acc:.3f}, "
        f"{info['clipped_steps']} steps clipped")
    scores, seconds = {}, {}
    t = time.perf_counter()
    scores["exact"], minfo = exact_scores(net, traj, data)
    seconds["exact"] = time.perf_counter() - t
    info.update(minfo)
    say(f"exact machine: rel err of b + Σ c against the network {minfo['machine_rel_err']:.2e}, "
        f"update residual {minfo['machine_max_update_residual']:.2e}")
    plain, with_p, eta = checkpoint_trajectories(net, data, points, states, traj)
    jobs = {"sgd_proxy": lambda: kernel_scores(net, traj, data, None),
            "tracin_cp": lambda: kernel_scores(net, plain, data, None),
            "less_ckpt": lambda: kernel_scores(net, with_p, data, "recorded"),
            "less_hand": lambda: less_hand_scores(cfg, net, data, points, states, eta),
            "precond_path": lambda: kernel_scores(net, traj, data, "recorded")}
    for name, job in jobs.items():
        t = time.perf_counter()
        scores[name] = job()
        seconds[name] = time.perf_counter() - t
    return net, scores, {"info": info, "seconds": seconds}


def correlations(scores: dict, ref: torch.Tensor) -> dict:
    """Per method: Pearson and Spearman of its scores with ``ref`` over the training points, per query."""
    out = {}
    for name, s in scores.items():
        pr = [pearsonr(s[q].numpy(), ref[q].numpy())[0] for q in range(ref.shape[0])]
        sr = [spearmanr(s[q].numpy(), ref[q].numpy())[0] for q in range(ref.shape[0])]
        out[name] = (np.asarray(pr, dtype=np.float64), np.asarray(sr, dtype=np.float64))
    return out


def leave_k_out(cfg: Config, data: Data, scores: dict, exact: torch.Tensor) -> dict:
    """For each method (and ``random``) and query: retrain without the query's top-k points; the actual Δℓ and Δφ
    of that query and the Δφ the exact contributions predict. Identical removal sets are retrained once."""
    base, _ = train(cfg, data, weight=torch.ones(cfg.n, dtype=torch.float64))
    f0, g = query_grads_out(base, data)
    l0 = F.cross_entropy(f0, data.yq, reduction="none")
    rng = np.random.default_rng(cfg.seed + 7)
    picks = {name: [torch.topk(s[q], cfg.k).indices for q in range(s.shape[0])] for name, s in scores.items()}
    picks["random"] = [torch.as_tensor(rng.choice(cfg.n, cfg.k, replace=False)) for _ in range(data.Xq.shape[0])]
    cache: dict[tuple, torch.Tensor] = {}
    out = {}
    for name, sets in picks.items():
        dl, dphi, pred = [], [], []
        for q, R in enumerate(sets):
            key = tuple(sorted(R.tolist()))
            if key not in cache:
                w = torch.ones(cfg.n, dtype=torch.float64)
                w[R] = 0
                net, _ = train(cfg, data, weight=w)
                with torch.no_grad():
                    cache[key] = net(data.Xq)
            f = cache[key][q]
            dl.append(float(F.cross_entropy(f[None], data.yq[q:q + 1]) - l0[q]))
            dphi.append(float(g[q] @ (f - f0[q])))
            pred.append(float(exact[q, R].sum()))
        out[name] = (np.asarray(dl), np.asarray(dphi), np.asarray(pred))
    out["_retrains"] = len(cache)
    return out


def _pearson(a: np.ndarray, b: np.ndarray) -> float:
    return float(pearsonr(a, b)[0]) if len(a) > 2 and np.std(a) > 0 and np.std(b) > 0 else float("nan")


def rows_of(cfg: Config, corr: dict, loo: dict, run: dict, env: dict) -> list[dict]:
    """One CSV row per method (``random``: leave-k-out only)."""
    rows = []
    for name in list(METHODS) + ["random"]:
        pr, sr = corr.get(name, (np.full(1, np.nan), np.full(1, np.nan)))
        dl, dphi, pred = loo[name]
        rows.append({"method": name, "pearson_mean": float(pr.mean()), "pearson_min": float(pr.min()),
                     "spearman_mean": float(sr.mean()), "spearman_min": float(sr.min()),
                     "loo_k": cfg.k, "loo_mean_dloss": float(dl.mean()), "loo_mean_dphi": float(dphi.mean()),
                     "loo_mean_pred_dphi": float(pred.mean()), "loo_corr_pred_actual": _pearson(pred, dphi),
                     "score_seconds": run["seconds"].get(name, float("nan")),
                     **{k: v for k, v in asdict(cfg).items()}, **run["info"],
                     "retrains": loo["_retrains"], "timestamp": env["timestamp"], "commit": env["git_commit"],
                     "threads": env["threads"], "loadavg_1m": env["loadavg_1m"]})
    return rows


def table(rows: list[dict]) -> str:
    """The stdout/README table."""
    head = ("| method | Pearson (mean, min) | Spearman (mean, min) | leave-k-out Δloss | Δφ actual | Δφ predicted | "
            "corr(pred, actual) |")
    lines = [head, "|" + "---|" * 7]
    for r in rows:
        corr = ("—" if r["method"] == "random" else
                f"{r['pearson_mean']:.3f}, {r['pearson_min']:.3f} | {r['spearman_mean']:.3f}, {r['spearman_min']:.3f}")
        if r["method"] == "random":
            corr = "— | —"
        lines.append(f"| {r['method']} | {corr} | {r['loo_mean_dloss']:+.4f} | {r['loo_mean_dphi']:+.4f} | "
                     f"{r['loo_mean_pred_dphi']:+.4f} | {r['loo_corr_pred_actual']:.3f} |")
    return "\n".join(lines)


def run(cfg: Config, say) -> list[dict]:
    """The whole benchmark; returns the rows."""
    env = environment("cpu")
    say(f"adam_attribution: {asdict(cfg)}")
    say(format_environment(env))
    data = make_data(cfg)
    with tempfile.TemporaryDirectory(prefix="pkfast-adam-attr-") as d:
        _, scores, info = all_scores(cfg, data, d, say)
    corr = correlations(scores, scores["exact"])
    t = time.perf_counter()
    loo = leave_k_out(cfg, data, scores, scores["exact"])
    info["info"]["loo_s"] = time.perf_counter() - t
    rows = rows_of(cfg, corr, loo, info, env)
    say(f"scores computed in " + ", ".join(f"{k} {v:.1f}s" for k, v in info["seconds"].items())
        + f"; leave-{cfg.k}-out: {loo['_retrains']} retrainings in {info['info']['loo_s']:.1f}s")
    say("score = the decrease of the query's (linearised) loss attributed to a training point; correlations with "
        f"the exact score over the N = {cfg.n} training points, per query, mean and min over M = {cfg.m} queries; "
        f"leave-{cfg.k}-out: means over the queries of the change when the method's top {cfg.k} are removed")
    say(table(rows))
    return rows


def write_csv(path: str, rows: list[dict]) -> None:
    """The rows as a fresh CSV (one run per file)."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)


def main(argv: list[str] | None = None) -> int:
    """Parse the options, run, print the table, write the CSV and log where asked."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=Config.n)
    ap.add_argument("--m", type=int, default=Config.m)
    ap.add_argument("--epochs", type=int, default=Config.epochs)
    ap.add_argument("--k", type=int, default=Config.k)
    ap.add_argument("--quick", action="store_true", help="smoke test: N = 128, M = 4, 3 epochs, k = 5")
    ap.add_argument("--csv", default=None, help="write the rows here (default: none with --quick, else "
                                                "benchmarks/results/adam_attribution_cpu.csv)")
    ap.add_argument("--log", default=None, help="copy stdout here (default as --csv, .log)")
    ap.add_argument("--threads", type=int, default=int(os.environ.get("PKFAST_BENCH_THREADS", "2")))
    a = ap.parse_args(argv)
    cfg = Config(n=128, m=4, epochs=3, k=5) if a.quick else Config(n=a.n, m=a.m, epochs=a.epochs, k=a.k)
    res = HERE / "results"
    csv_path = a.csv or (None if a.quick else str(res / "adam_attribution_cpu.csv"))
    log_path = a.log or (None if a.quick else str(res / "adam_attribution_cpu.log"))
    torch.set_num_threads(a.threads)
    lines: list[str] = []

    def say(s: str) -> None:
        print(s, flush=True)
        lines.append(s)

    t0 = time.perf_counter()
    rows = run(cfg, say)
    say(f"total {time.perf_counter() - t0:.1f}s")
    if csv_path:
        write_csv(csv_path, rows)
    if log_path:
        Path(log_path).parent.mkdir(parents=True, exist_ok=True)
        Path(log_path).write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
