"""A Gram larger than this machine's RAM, written out of core with bounded memory (not in the default tests).

    python benchmarks/out_of_core.py [--n 80000] [--out /tmp/pkfast_ooc/gram.npy] [--memory 2GiB] [--steps 2]

Computes the trace Gram of a small tanh MLP (16-32-1, P = 577) along a ``--steps``-step trajectory for ``--n``
standard-normal points: N = 80,000 is 25.6 GB of float32 on disk, more than the 24 GB of RAM here. Prints N, the
file size, wall time, tiles/s and the peak RSS (``ru_maxrss``), then checks a few random blocks against an
in-memory cross-Gram of those rows and columns. Run it again with the same arguments after killing it
(Ctrl-C or SIGKILL) and it resumes from the finished tiles. ``--keep`` leaves the file (it is deleted otherwise).
"""

from __future__ import annotations

import argparse
import resource
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch

import pkfast
from pkfast.store.writer import sidecar


def problem(n: int, steps: int, seed: int = 0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.Tanh(), torch.nn.Linear(32, 1))
    g = torch.Generator().manual_seed(seed)
    points = [{k: v.detach().clone() for k, v in model.state_dict().items()}]
    for _ in range(steps):
        points.append({k: v + 0.05 * torch.randn(v.shape, generator=g) for k, v in points[-1].items()})
    traj = pkfast.Trajectory.from_checkpoints(points, lr=0.1)
    X = torch.randn(n, 16, generator=g)
    return model.eval(), traj, X


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=80_000)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--out", default="/tmp/pkfast_ooc/gram.npy")
    p.add_argument("--memory", default="2GiB", help="pkfast.gram memory_budget (default 2GiB)")
    p.add_argument("--checks", type=int, default=3, help="random 64×64 blocks checked against an in-memory cross-Gram")
    p.add_argument("--keep", action="store_true", help="keep the output file")
    a = p.parse_args(argv)

    model, traj, X = problem(a.n, a.steps)
    out = Path(a.out)
    nbytes = a.n * a.n * 4
    free = shutil.disk_usage(out.parent if out.parent.exists() else Path(out.anchor)).free
    print(f"N = {a.n:,}: trace Gram {nbytes / 1e9:.1f} GB float32; {free / 1e9:.1f} GB free; "
          f"memory_budget {a.memory}; P = {sum(q.numel() for q in model.parameters())}, T = {a.steps}", flush=True)
    t0 = time.perf_counter()
    K = pkfast.gram(model, traj, X, out=out, memory_budget=a.memory, progress=True)
    wall = time.perf_counter() - t0
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    g = pkfast.open_gram(out)
    print(f"done: {out} {out.stat().st_size / 1e9:.2f} GB on disk, {g.num_tiles} tiles, wall {wall:.1f} s "
          f"({g.num_tiles / wall:.2f} tiles/s), peak RSS {rss / 2**30:.2f} GiB; complete={g.complete}", flush=True)

    rng = np.random.default_rng(0)
    worst = 0.0
    for _ in range(a.checks):
        r0, c0 = (int(v) for v in rng.integers(0, a.n - 64, size=2))
        ref = pkfast.gram(model, traj, X[r0:r0 + 64], X[c0:c0 + 64], progress=False).numpy()
        got = np.asarray(K[r0:r0 + 64, c0:c0 + 64])
        worst = max(worst, float(np.abs(got - ref).max() / np.abs(ref).max()))
    print(f"spot checks: {a.checks} random 64×64 blocks vs in-memory cross-Grams, max relative error {worst:.2e}")
    del K
    if not a.keep:
        out.unlink()
        shutil.rmtree(sidecar(out))
    return 0 if worst < 1e-4 and g.complete else 1


if __name__ == "__main__":
    sys.exit(main())
