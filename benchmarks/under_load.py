"""pkfast and the torch.func tutorial on a shared machine (issue 25, "under load"): the same Gram timed quiet and
while other CPU-bound processes run, side by side in one run.

    python benchmarks/under_load.py [--n 32] [--repeat 3] [--loads quiet,1x1,2x2] [--csv benchmarks/results/under_load_cpu.csv]

Kernel: the trace Gram (C = 10) of the CIFAR-shaped ResNet-18 of ``architectures.py`` (width 16), N = 32, T = 1.
Loads: ``quiet`` (nothing else), ``AxB`` = A competing processes, each a B-thread float32 matmul loop (what a
neighbour's training job looks like to the CPU). Each row is the median of ``--repeat`` timings, the variants
interleaved so that a drifting load hits all alike; the matmul floor (best GFLOP/s of a 2048² product, this
process's threads) is measured under the same load. ``slowdown`` is a row's seconds over the same variant's quiet
seconds. Variants: ``pkfast`` (its default thread policy), ``pkfast threads=all`` (torch's thread count
whatever the load: the behaviour before the fix), ``tutorial`` (the torch.func tutorial, torch's threads).
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import pkfast  # noqa: E402
from _common import RESULTS_DIR, append_csv, environment, format_environment, measure_matmul_gflops  # noqa: E402
from architectures import resnet_kernels, run_tutorial  # noqa: E402

COMPETITOR = """
import sys, time, torch
torch.set_num_threads(int(sys.argv[1]))
a = torch.randn(1024, 1024); b = torch.randn(1024, 1024)
end = time.time() + float(sys.argv[2])
while time.time() < end:
    a @ b
"""


def _competitors(spec: str, seconds: float) -> list[subprocess.Popen]:
    if spec == "quiet":
        return []
    count, threads = (int(v) for v in spec.split("x"))
    procs = [subprocess.Popen([sys.executable, "-c", COMPETITOR, str(threads), str(seconds)]) for _ in range(count)]
    time.sleep(2.0)  # let them start and load the cores
    return procs


def _variants(n: int) -> dict[str, callable]:
    k = resnet_kernels(n, 16)[0]
    tutorial = run_tutorial(k)
    return {
        "pkfast": lambda: pkfast.gram(k.model, k.traj, k.X, progress=False),
        "pkfast threads=all": lambda: pkfast.gram(k.model, k.traj, k.X, progress=False, threads="all"),
        "tutorial": tutorial,
    }


def _time(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=32)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--loads", default="quiet,1x1,2x2")
    ap.add_argument("--variants", default=None, help="comma-separated subset of the variants")
    ap.add_argument("--csv", default=str(RESULTS_DIR / "under_load_cpu.csv"))
    a = ap.parse_args(argv)
    env = environment()
    print(format_environment(env))
    variants = _variants(a.n)
    if a.variants:
        variants = {k: v for k, v in variants.items() if k in a.variants.split(",")}
    for fn in variants.values():  # warm-up: imports, oneDNN's first convolutions, the plan's caches
        fn()
    quiet: dict[str, float] = {}
    rows = []
    for load in a.loads.split(","):
        procs = _competitors(load, seconds=3600)
        try:
            floor = measure_matmul_gflops(((1024, 2048, 1024),))["best"]
            times: dict[str, list[float]] = {k: [] for k in variants}
            for _ in range(a.repeat):
                for name, fn in variants.items():
                    times[name].append(_time(fn))
            load_avg = Path("/proc/loadavg").read_text().split()[0]
        finally:
            for p in procs:
                p.kill()
            for p in procs:
                p.wait()
        for name, ts in times.items():
            med = statistics.median(ts)
            quiet.setdefault(name, med) if load == "quiet" else None
            slow = med / quiet[name] if name in quiet else float("nan")
            print(f"{load:6s} {name:20s} {med:7.2f} s  (×{slow:.2f} quiet)  [{', '.join(f'{t:.2f}' for t in ts)}]  "
                  f"matmul {floor:.0f} GFLOP/s, load {load_avg}")
            rows.append(dict(load=load, variant=name, n=a.n, seconds=round(med, 3), slowdown=round(slow, 2),
                             runs=" ".join(f"{t:.2f}" for t in ts), matmul_gflops=round(floor, 1),
                             loadavg=load_avg, threads=torch.get_num_threads(), commit=env.get("commit", "")))
    append_csv(a.csv, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
