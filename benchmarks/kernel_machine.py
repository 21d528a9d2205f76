"""The exact kernel machine at the scale of training runs (issue 17): ``KernelMachine.contributions`` for M
queries on digits, before/after in one run, with the reconstruction error and the certificate's residuals.

    python benchmarks/kernel_machine.py [--before /tmp/before] [--workloads small,mlp,cnn,mlp-long] [--m 100] \\
        [--csv PATH]

Workloads (digits, SGD with momentum 0.9, batches of 64, lr 0.05, every step recorded by
``TrajectoryRecorder``; ``rule="exact"``, nodes = 2, float64; queries: M held-out digits):

| key | model | P | T steps | N train |
|---|---|---|---|---|
| small | MLP 64-32-32-10 (tanh) | 3,466 | 60 | 400 |
| mlp | MLP 64-256-256-10 (tanh) | 85,002 | 100 | 1,000 |
| cnn | Conv(1→16, 3×3)-tanh-Conv(16→32, 3×3, stride 2)-tanh-Linear(512→10) on 1×8×8 | 9,930 | 100 | 1,000 |
| mlp-long | MLP 64-256-256-10 | 85,002 | 1,000 | 1,000 |
| mlp-sgd | MLP 64-256-256-10, plain SGD (no momentum: the factorised cross kernel) | 85,002 | 100 | 1,000 |
| small-adamw, mlp-adamw, cnn-adamw | as small, mlp, cnn, trained by AdamW (lr 1e-3, weight decay 0.01) with
  ``clip_grad_norm_(1.0)`` as ``transformers.Trainer`` does, each step's preconditioner recorded | | | |

The adaptive workloads against their SGD-momentum twins (issue 26: the Adam machine within 3× of the SGD
machine's time on the same workload):

    python benchmarks/kernel_machine.py --workloads small,small-adamw,mlp,mlp-adamw,cnn,cnn-adamw \
        --csv benchmarks/results/adam_machine_cpu.csv

Each (workload, source tree) runs in a child process with ``PYTHONPATH`` at the tree (``--before``: an older
checkout, e.g. ``git worktree add /tmp/before <commit>``; the after tree is this one), interleaved. Reported:
seconds of ``contributions`` (the machine's construction excluded), the relative error of b(x) + Σ_i c_i(x)
against the network f(x; w_T), the largest certificate residuals (on 8 queries), and the largest difference
between the two trees' contributions relative to their largest magnitude. ``--skip-before mlp-long`` by
default: the old code needs about 47 minutes for it.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
SPECS = {"small": ("mlp", [64, 32, 32, 10], 60, 400, 0.9), "mlp": ("mlp", [64, 256, 256, 10], 100, 1000, 0.9),
         "cnn": ("cnn", None, 100, 1000, 0.9), "mlp-long": ("mlp", [64, 256, 256, 10], 1000, 1000, 0.9),
         "mlp-sgd": ("mlp", [64, 256, 256, 10], 100, 1000, 0.0),
         "small-adamw": ("mlp", [64, 32, 32, 10], 60, 400, "adamw"),
         "mlp-adamw": ("mlp", [64, 256, 256, 10], 100, 1000, "adamw"),
         "cnn-adamw": ("cnn", None, 100, 1000, "adamw")}


def child(key: str, m: int, out: str) -> None:
    """Run one workload with whatever pkfast is on the path; save contributions and print a JSON line."""
    import numpy as np
    import torch
    from torch import nn

    sys.path.insert(0, str(HERE))
    import pkfast
    from _common import digits_cnn, load_digits_data, mlp

    torch.set_num_threads(int(os.environ.get("PKFAST_BENCH_THREADS", torch.get_num_threads())))
    kind, widths, T, N, momentum = SPECS[key]
    X, y = load_digits_data()
    X, y = X.double(), y
    g = torch.Generator().manual_seed(0)
    perm = torch.randperm(X.shape[0], generator=g)
    tr, te = perm[:N], perm[N:N + m]
    Xt, yt = X[tr], y[tr]
    if kind == "cnn":
        Xt = Xt.view(-1, 1, 8, 8)
    torch.manual_seed(0)
    net = (mlp(widths) if kind == "mlp" else digits_cnn()).double()
    adamw = momentum == "adamw"
    opt = (torch.optim.AdamW(net.parameters(), lr=1e-3, weight_decay=0.01) if adamw else
           torch.optim.SGD(net.parameters(), lr=0.05, momentum=momentum))
    lossf = nn.CrossEntropyLoss()
    d = tempfile.mkdtemp(prefix="pkfast-km-")
    with pkfast.TrajectoryRecorder(net, opt, d + "/traj", loss=lossf, targets=yt) as rec:
        s = 0
        while s < T:
            order = torch.randperm(N, generator=g)
            for i in range(0, N - 63, 64):
                if s == T:
                    break
                idx = order[i:i + 64]
                opt.zero_grad()
                lossf(net(Xt[idx]), yt[idx]).backward()
                if adamw:
                    nn.utils.clip_grad_norm_(net.parameters(), 1.0)
                opt.step()
                rec.step(batch_indices=idx)
                s += 1
    net.eval()
    Xq = X[te].view(-1, 1, 8, 8) if kind == "cnn" else X[te]
    rss0 = _rss_mib()
    t0 = time.perf_counter()
    km = pkfast.KernelMachine(net, pkfast.Trajectory.load(d + "/traj"), Xt, progress=False)
    t1 = time.perf_counter()
    c = km.contributions(Xq)
    sec = time.perf_counter() - t1
    with torch.no_grad():
        f = net(Xq)
    rebuilt = km.bias(Xq) + c.sum(1)
    cert = km.certificate(Xq[:8])
    np.save(out, c.numpy())
    print(json.dumps({"seconds": sec, "construct_s": t1 - t0, "rss_before_mib": rss0, "peak_rss_mib": _peak_mib(),
                      "rel_error": float((rebuilt - f).norm() / f.norm()),
                      "max_quadrature": cert.max_quadrature, "max_update_residual": float(cert.update.max()),
                      "P": sum(p.numel() for p in net.parameters()), "T": T, "N": N, "M": m}))


def _rss_mib() -> float:
    """This process's resident memory now (MiB; Linux)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _peak_mib() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--before", default=None, help="an older checkout to compare with")
    ap.add_argument("--workloads", default="small,mlp,cnn,mlp-long")
    ap.add_argument("--skip-before", default="mlp-long")
    ap.add_argument("--m", type=int, default=100)
    ap.add_argument("--csv", default=None)
    ap.add_argument("--child", nargs=2, metavar=("KEY", "OUT"), help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.child:
        child(a.child[0], a.m, a.child[1])
        return 0
    import numpy as np

    sys.path.insert(0, str(HERE))
    from _common import append_csv, environment, format_environment, measure_matmul_gflops

    print(format_environment(environment()))
    print(f"floor: matmul {measure_matmul_gflops()['best']:.0f} GFLOP/s")
    trees = [("after", str(HERE.parent))]
    if a.before:
        trees.insert(0, ("before", str(Path(a.before).resolve())))
    rows = []
    print(f"{'workload':9s} {'P':>7s} {'T':>5s} {'N':>5s} {'tree':7s} {'seconds':>9s} {'rel.err':>9s} "
          f"{'quad.res':>9s} {'upd.res':>9s} {'Δ vs before':>11s} {'build s':>8s} {'peak MiB':>8s}")
    tmp = Path(tempfile.mkdtemp(prefix="pkfast-km-bench-"))
    done: dict[str, dict] = {}
    for key in a.workloads.split(","):
        res = {}
        for name, tree in trees:
            if name == "before" and key in a.skip_before.split(","):
                continue
            out = tmp / f"{key}-{name}.npy"
            env = {**os.environ, "PYTHONPATH": tree}
            r = subprocess.run([sys.executable, __file__, "--child", key, str(out), "--m", str(a.m)], env=env,
                               capture_output=True, text=True)
            if r.returncode != 0:
                why = (r.stderr.strip().splitlines() or [f"exit status {r.returncode}"])[-1][:200]
                print(f"{key:9s} {name}: failed: {why}")
                continue
            info = json.loads(r.stdout.strip().splitlines()[-1])
            res[name] = (info, np.load(out))
            diff = ""
            if name == "after" and "before" in res:
                b, c = res["before"][1], res["after"][1]
                diff = f"{float(np.abs(b - c).max() / np.abs(b).max()):.1e}"
            print(f"{key:9s} {info['P']:7d} {info['T']:5d} {info['N']:5d} {name:7s} {info['seconds']:9.2f} "
                  f"{info['rel_error']:9.1e} {info['max_quadrature']:9.1e} {info['max_update_residual']:9.1e} "
                  f"{diff:>11s} {info['construct_s']:8.2f} {info['peak_rss_mib']:8.0f}")
            rows.append(dict(workload=key, tree=name, **info, diff_vs_before=diff))
        if "before" in res and "after" in res:
            print(f"{'':9s} speed-up {res['before'][0]['seconds'] / res['after'][0]['seconds']:.1f}×")
        twin = key.removesuffix("-adamw")
        if key.endswith("-adamw") and "after" in res and twin in done:
            a_, s_ = res["after"][0], done[twin]
            print(f"{'':9s} AdamW / SGD-momentum: contributions {a_['seconds'] / s_['seconds']:.2f}×, construction "
                  f"{a_['construct_s'] / s_['construct_s']:.2f}×, total "
                  f"{(a_['seconds'] + a_['construct_s']) / (s_['seconds'] + s_['construct_s']):.2f}×, peak memory "
                  f"{(a_['peak_rss_mib'] - a_['rss_before_mib']) / max(s_['peak_rss_mib'] - s_['rss_before_mib'], 1):.2f}× "
                  "(growth over the trained process)")
        if "after" in res:
            done[key] = res["after"][0]
    if a.csv:
        append_csv(a.csv, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
