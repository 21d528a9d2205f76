"""Kronecker-factored against dense sketch projections (issue 16 §1) on the GPT-style LM of
``benchmarks/architectures.py``, side by side in one run with a floor.

    python benchmarks/sketch_projection.py [--n 64] [--steps 2] [--k 4096] [--repeat 1] [--csv PATH]

The next-token loss kernel's path features (``of="loss"``, T = ``--steps`` weight points of a random-walk
trajectory) with ``pkfast.sketch(projection="dense")`` (every parameter's gradient times a dense Gaussian
R_s, the earlier and only route) and ``projection="auto"`` (each layer from its factors with R_in ⊗ R_out where
cheaper: every Linear, Embedding and attention projection of the LM), at the same k. Reported: seconds, the
ratio dense / Kronecker, each one's ratio to the floor — one batched forward + backward over the N sequences per
step (the passes any route needs) — and each one's relative Frobenius error against the exact loss kernel
(``pkfast.gram``), with the standard error the formula of docs/math.md §7 gives the dense sketch.
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))

import pkfast  # noqa: E402

from _common import append_csv, environment, format_environment, measure_matmul_gflops, rel_fro_error, timeit  # noqa: E402
from architectures import GPT, gpt_kernels  # noqa: E402


def trajectory(model: nn.Module, steps: int, scale: float = 1e-3) -> pkfast.Trajectory:
    g = torch.Generator().manual_seed(1)
    points = [copy.deepcopy(model.state_dict())]
    for _ in range(steps):
        points.append({k: v + scale * torch.randn(v.shape, generator=g) if v.is_floating_point() else v
                       for k, v in points[-1].items()})
    return pkfast.Trajectory.from_checkpoints(points, lr=0.05)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=64)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--k", type=int, default=4096)
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--csv", default=None)
    a = ap.parse_args(argv)
    print(format_environment(environment()))
    gflops = measure_matmul_gflops()["best"]
    print(f"floor: matmul {gflops:.0f} GFLOP/s")
    kern = gpt_kernels(a.n, 128, 4)[0]
    net, X, y = kern.model, kern.X, kern.y
    assert isinstance(net, GPT)
    traj = trajectory(net, a.steps)
    kw = dict(of="loss", loss=nn.CrossEntropyLoss(), y=y, progress=False)
    print(pkfast.plan(net, traj, X, method="sketch", k=a.k, **{k: v for k, v in kw.items() if k != "progress"}))
    params = [p for p in net.parameters() if p.requires_grad]

    def passes() -> None:
        for _ in range(a.steps):
            out = net(X)
            torch.autograd.grad(kern.loss(out, y).sum(), params)

    floor = timeit(passes, repeat=3).best
    K = pkfast.gram(net, traj, X, **kw)
    rows = []
    res = {}
    for proj in ("auto", "dense"):
        t = timeit(lambda: pkfast.sketch(net, traj, X, k=a.k, seed=0, projection=proj, **kw), repeat=a.repeat,
                   warmup=0)
        err = rel_fro_error(t.result.gram(), K)
        res[proj] = t.best
        print(f"{proj:6s} {t.best:8.2f} s  {t.best / floor:6.1f}× floor  rel. Frobenius error {err:.3f}")
        rows.append(dict(projection=proj, n=a.n, steps=a.steps, k=a.k, seconds=round(t.best, 3),
                         floor_seconds=round(floor, 3), gflops=round(gflops), rel_error=round(err, 4)))
    print(f"floor (batched forward + backward, {a.steps} steps): {floor:.2f} s; dense / Kronecker = "
          f"{res['dense'] / res['auto']:.1f}×")
    if a.csv:
        append_csv(a.csv, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
