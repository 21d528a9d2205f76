"""One process against two: ``pkfast gram`` alone and under ``torchrun --nproc_per_node=2`` on the same problem.

    python benchmarks/distributed.py [--n 1797] [--steps 2] [--memory 3GiB] [--workdir DIR]

Builds workload (a) of ``_common.py`` (MLP 64-256-256-10 on the digits, SGD trajectory), saves the model
factory, the trajectory and X into ``--workdir``, then times three command-line runs writing a stored Gram:

* one process with torch's default thread count,
* one process with one thread (``OMP_NUM_THREADS=1``),
* two ranks (``torchrun --standalone --nproc_per_node=2``, gloo on CPU; torchrun gives each rank one thread).

Each wall time includes process start-up (~2 s) and is printed with the tile count. The two-rank file must be
byte-for-byte the one-thread single-process file (each rank computes whole tiles, in the same order, with the
same thread count); the default-thread file must agree to float32 rounding. On a machine with as many cores as
ranks, two ranks do not beat one process using both cores for BLAS: the point of ranks is more devices/nodes.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import make_workload  # noqa: E402

FACTORY = '''import torch.nn as nn


def make_net():
    return nn.Sequential(nn.Linear(64, 256), nn.Tanh(), nn.Linear(256, 256), nn.Tanh(), nn.Linear(256, 10))
'''


def _run(cmd: list[str], cwd: Path, env: dict[str, str]) -> float:
    t0 = time.perf_counter()
    r = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if r.returncode != 0:
        raise SystemExit(f"distributed.py: {' '.join(cmd)} failed ({r.returncode}):\n{r.stderr[-3000:]}")
    return wall


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=1797)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--memory", default="3GiB", help="memory budget per process (sets the tile plan; default 3GiB)")
    p.add_argument("--workdir", default=None, help="where inputs and outputs go (default: a temporary folder)")
    a = p.parse_args(argv)

    d = Path(a.workdir or tempfile.mkdtemp(prefix="pkfast_dist_"))
    d.mkdir(parents=True, exist_ok=True)
    wl = make_workload("a", a.n, a.steps)
    (d / "nets.py").write_text(FACTORY)
    wl.traj.save(d / "traj")
    np.save(d / "X.npy", wl.X.numpy())
    common = ["--model", "nets.py:make_net", "--trajectory", "traj", "--data", "X.npy", "--memory", a.memory,
              "--no-progress", "--overwrite"]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    py = [sys.executable, "-m", "pkfast", "gram"]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "pkfast",
                "gram"]

    print(f"workload a: N={a.n}, T={a.steps}, P={wl.P:,}, C={wl.C}, memory {a.memory} per process; in {d}", flush=True)
    runs = [
        ("1 process, default threads", py + common + ["--out", "one.npy"], env),
        ("1 process, 1 thread", py + common + ["--out", "one1.npy"], {**env, "OMP_NUM_THREADS": "1"}),
        ("2 ranks (torchrun, gloo), 1 thread each", torchrun + common + ["--out", "two.npy"],
         {**env, "OMP_NUM_THREADS": "1"}),
    ]
    walls = {}
    for label, cmd, e in runs:
        walls[label] = _run(cmd, d, e)
        print(f"  {label:42s} {walls[label]:7.1f} s", flush=True)

    import pkfast

    g = pkfast.open_gram(d / "two.npy")
    one, two = (np.load(d / f, mmap_mode="r") for f in ("one.npy", "two.npy"))
    same = (d / "one1.npy").read_bytes() == (d / "two.npy").read_bytes()
    rel = float(np.linalg.norm(np.asarray(one) - np.asarray(two)) / np.linalg.norm(np.asarray(one)))
    print(f"  {g.num_tiles} tiles; 2-rank file == 1-thread single-process file byte for byte: {same}; "
          f"relative Frobenius difference to the default-thread run: {rel:.1e}")
    first = walls[runs[0][0]]
    for label, _, _ in runs[1:]:
        print(f"  {label}: {walls[label] / first:.2f}× the default single-process wall time")
    return 0 if same and rel < 1e-5 and g.complete else 1


if __name__ == "__main__":
    raise SystemExit(main())
