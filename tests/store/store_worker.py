"""A Gram run in a child process for the storage tests: optionally killed (SIGKILL) at a chosen tile, optionally
one rank of a torch.distributed (gloo) group.

    python tests/store/store_worker.py OUT [--kill-at K] [--when before-journal|after-journal] [--dist]
                                     [--method jacobian|auto|factorized] [--budget BYTES] [--features DTYPE]

The problem (model, trajectory, X, memory budget) is fixed by seeds: see :func:`problem`. With ``--dist`` the
rank and world come from the RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT environment variables.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import pkfast  # noqa: E402
from pkfast.store import writer as store  # noqa: E402

N, D = 48, 5
#: Small enough to cut the 48×48 Gram into many tiles (see test_store.test_problem_has_many_tiles).
BUDGET = 60_000


def problem():
    torch.manual_seed(1234)
    model = torch.nn.Sequential(torch.nn.Linear(D, 9), torch.nn.Tanh(), torch.nn.Linear(9, 9), torch.nn.Tanh(),
                                torch.nn.Linear(9, 3))
    g = torch.Generator().manual_seed(7)
    start = {k: v.detach().clone() for k, v in model.state_dict().items()}
    points = [start]
    for s in range(3):
        points.append({k: v + 0.1 * torch.randn(v.shape, generator=g) for k, v in points[-1].items()})
    traj = pkfast.Trajectory.from_checkpoints(points, lr=[0.1, 0.2, 0.3])
    X = torch.randn(N, D, generator=g)
    return model, traj, X


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("out")
    p.add_argument("--kill-at", type=int, default=None, help="SIGKILL this process at its K-th chunk (0-based)")
    p.add_argument("--when", choices=("before-journal", "after-journal"), default="before-journal")
    p.add_argument("--dist", action="store_true")
    p.add_argument("--method", default="jacobian", help="pkfast.gram's method (default jacobian)")
    p.add_argument("--budget", type=int, default=BUDGET, help="memory budget in bytes")
    p.add_argument("--features", default=None, metavar="STORAGE",
                   help="write sketched path features (k=64, seed 5) in this storage dtype instead of a Gram")
    a = p.parse_args()
    torch.set_num_threads(1)
    if a.dist:
        import datetime

        torch.distributed.init_process_group("gloo", timeout=datetime.timedelta(seconds=60))
    if a.kill_at is not None:
        count = {"n": 0}
        orig_write = store.ChunkStore.write

        def write(self, index, block, mirror=None):
            if count["n"] == a.kill_at and a.when == "before-journal":
                # the chunk's bytes reach the file, its journal line never does
                chunk = self.chunks[index]
                self._write_block(block, chunk.rows, chunk.cols)
                os.kill(os.getpid(), signal.SIGKILL)
            orig_write(self, index, block, mirror)
            if count["n"] == a.kill_at and a.when == "after-journal":
                os.kill(os.getpid(), signal.SIGKILL)
            count["n"] += 1

        store.ChunkStore.write = write
    model, traj, X = problem()
    sk = dict(k=8, seed=5) if a.method == "sketch" else {}
    if a.features:
        pkfast.sketch(model, traj, X, k=64, seed=5, out=a.out, storage_dtype=a.features, memory_budget=a.budget,
                      progress=False)
    else:
        pkfast.gram(model, traj, X, out=a.out, memory_budget=a.budget, method=a.method, progress=False, **sk)
    if a.dist:
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
