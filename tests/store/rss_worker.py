"""Child process for test_store: the peak-RSS growth of a stored Gram run, printed as 'before after' bytes.

    python tests/store/rss_worker.py OUT.npy N BUDGET
"""

import resource
import sys

import torch

import pkfast


def main() -> None:
    out, n, budget = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.Tanh(), torch.nn.Linear(32, 1)).eval()
    w0 = {k: v.detach().clone() for k, v in model.state_dict().items()}
    traj = pkfast.Trajectory.from_checkpoints([w0, {k: v + 0.01 for k, v in w0.items()}], lr=0.1)
    X = torch.randn(n, 16)
    pkfast.gram(model, traj, X[:64], out=out + ".warm.npy", progress=False)  # imports and first-call costs
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    pkfast.gram(model, traj, X, out=out, memory_budget=budget, progress=False)
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(before, after)


if __name__ == "__main__":
    main()
