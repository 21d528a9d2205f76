"""Peak memory against the plan and the budget (issue 25, "memory as planned"): each case runs in a fresh process
and reports the growth of its peak RSS over one ``pkfast.gram`` call beside ``memory_budget`` and the plan's
estimate (``pkfast.plan(...).tiles.used``).

    python benchmarks/memory.py [--cases mlp5000,resnet,...] [--csv benchmarks/results/memory_cpu.csv] [--label L]

Before/after in one run (what benchmarks/results/memory_cpu.csv holds): ``benchmarks/memory_compare.sh``.

Cases (float32, T = 1 step, eval mode; models built from code, data generated):

``mlp5000``   MLP 16-16-5000 (tanh), P = 85,272, the trace Gram over C = 5,000 outputs, N = 8 — the reported case.
``resnet``    the CIFAR-shaped ResNet-18 of ``architectures.py`` (width 16, P = 0.70 M), trace Gram (C = 10), N = 64.
``resnetloss`` the same ResNet's cross-entropy loss kernel, N = 64.
``gpt``       a GPT-style LM (d = 64, 2 ``nn.TransformerEncoderLayer`` blocks, vocabulary 256, 32 tokens) whose
              positions are a bare ``nn.Parameter`` (a model the other benchmarks do not contain), next-token
              loss kernel, N = 64.
``bare``      an MLP 64-1024-10 with a learned bare output scale ``nn.Parameter``, trace Gram, N = 512.
``jacobian``  the same with ``method="jacobian"`` (``vmap(jacrev)`` for every parameter), N = 128.

Peak RSS growth is the kernel's peak-RSS mark (VmHWM, reset before the call) minus the RSS before it; before
it, the same model ran a 2-sample Gram so that one-time costs (imports, oneDNN's first convolution) are not
counted. A case passes when the growth is
at most 1.25 × ``memory_budget``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))

import pkfast  # noqa: E402

from _common import RESULTS_DIR, append_csv, environment, format_environment  # noqa: E402

#: case → the budgets it runs with (None: pkfast's default, half the free memory)
CASES = {
    "mlp5000": ("1GiB", "512MiB", None),
    "resnet": ("256MiB", "1GiB"),
    "resnetloss": ("256MiB",),
    "gpt": ("64MiB", "256MiB"),
    "bare": ("64MiB", "256MiB"),
    "jacobian": ("64MiB", "256MiB"),
}
SLACK = 1.25


class BareGPT(nn.Module):
    """A GPT-style LM whose positions are a bare parameter (no module owns it)."""

    def __init__(self, vocab: int = 256, d: int = 64, layers: int = 2, seq: int = 32) -> None:
        super().__init__()
        self.tok, self.pos = nn.Embedding(vocab, d), nn.Parameter(0.02 * torch.randn(seq, d))
        self.blocks = nn.ModuleList(nn.TransformerEncoderLayer(d, 4, 4 * d, dropout=0.0, batch_first=True,
                                                               norm_first=True) for _ in range(layers))
        self.head = nn.Linear(d, vocab)

    def forward(self, ids):
        h = self.tok(ids) + self.pos[: ids.shape[1]]
        for blk in self.blocks:
            h = blk(h)
        return self.head(h)


class ScaledMLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(64, 1024), nn.Tanh(), nn.Linear(1024, 10))
        self.scale = nn.Parameter(torch.ones(()))

    def forward(self, x):
        return self.scale * self.net(x)


def _case(name: str) -> tuple[nn.Module, torch.Tensor, dict]:
    import architectures as arch
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    if name == "mlp5000":
        return nn.Sequential(nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 5000)), torch.randn(8, 16, generator=g), \
            dict(outputs="trace")
    if name in ("resnet", "resnetloss"):
        k = arch.resnet_kernels(64, 16)[name == "resnetloss"]
        return k.model, k.X, k.pkfast_kwargs() or dict(outputs="trace")
    if name == "gpt":
        ids = torch.randint(0, 256, (64, 33), generator=g)
        return BareGPT().eval(), ids[:, :32], dict(of="loss", loss=nn.CrossEntropyLoss(), y=ids[:, 1:])
    if name == "bare":
        return ScaledMLP(), torch.randn(512, 64, generator=g), dict(outputs="trace")
    if name == "jacobian":
        return ScaledMLP(), torch.randn(128, 64, generator=g), dict(outputs="trace", method="jacobian")
    raise SystemExit(f"unknown case {name!r}; expected one of {', '.join(CASES)}")


def _status(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def _reset_peak() -> int:
    """Reset the kernel's peak-RSS mark (VmHWM) to the current RSS and return it (Linux ≥ 4.0)."""
    Path("/proc/self/clear_refs").write_text("5")
    return _status("VmRSS")


def worker(name: str, budget: str | None) -> dict:
    model, X, kw = _case(name)
    w0 = {k: v.detach().clone() for k, v in model.state_dict().items()}
    traj = pkfast.Trajectory.from_checkpoints([w0, w0], lr=0.05)
    small = {k: (v[:2] if k == "y" else v) for k, v in kw.items()}
    pkfast.gram(model, traj, X[:2], progress=False, **small)  # one-time costs
    opts = dict(kw, **({"memory_budget": budget} if budget else {}))
    plan = pkfast.plan(model, traj, X, **opts)
    before = _reset_peak()
    t = time.perf_counter()
    pkfast.gram(model, traj, X, progress=False, **opts)
    seconds = time.perf_counter() - t
    after = _status("VmHWM")
    return dict(case=name, budget_mib=round(plan.tiles.budget / 2**20, 1), plan_mib=round(plan.tiles.tile_bytes / 2**20, 1),
                peak_growth_mib=round((after - before) / 2**20, 1),
                ratio_to_budget=round((after - before) / plan.tiles.budget, 3), tiles=len(plan.tiles.tiles),
                routes=plan.routes, seconds=round(seconds, 2))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", default=",".join(CASES))
    ap.add_argument("--csv", default=str(RESULTS_DIR / "memory_cpu.csv"))
    ap.add_argument("--label", default="", help="the version measured (a column of the CSV): run the script with "
                    "PYTHONPATH=<an older checkout> and --label <its commit> to compare before/after in one run")
    ap.add_argument("--worker", nargs=2, metavar=("CASE", "BUDGET"), help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        print(json.dumps(worker(a.worker[0], None if a.worker[1] == "default" else a.worker[1])))
        return
    env = environment()
    print(format_environment(env))
    rows, failed = [], 0
    for name in a.cases.split(","):
        for budget in CASES[name]:
            r = subprocess.run([sys.executable, __file__, "--worker", name, budget or "default"],
                               capture_output=True, text=True)
            if r.returncode:
                print(f"{name} {budget}: FAILED\n{r.stderr[-2000:]}")
                failed += 1
                continue
            row = json.loads(r.stdout.strip().splitlines()[-1])
            ok = row["ratio_to_budget"] <= SLACK
            failed += not ok
            print(f"{name:11s} budget {row['budget_mib']:>8.1f} MiB  plan {row['plan_mib']:>8.1f} MiB  "
                  f"peak growth {row['peak_growth_mib']:>8.1f} MiB  ({row['ratio_to_budget']:.2f}× budget"
                  f"{'' if ok else ' — OVER'})  {row['tiles']} tiles  {row['seconds']} s  [{row['routes']}]")
            rows.append(dict(row, version=a.label, commit=env.get("commit", "")))
    append_csv(a.csv, rows)
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
