"""Before/after: one benchmark script run from two source trees of pkfast, interleaved, in one session.

    python benchmarks/versions.py --before /path/to/old/checkout [--after .] [--rounds 2] -- \\
        methods.py --workloads a,b,d --n 512 --steps 4 --baselines none

Each round runs the script once from each tree (``PYTHONPATH=<tree>``, working directory the tree, the tree's
own ``benchmarks/<script>``), before then after, so a drift in the machine's speed hits both alike. The script
must write CSV rows with ``--csv`` (``methods.py``, ``run.py`` and ``architectures.py`` do); this tool passes a
temporary path, keeps the best ``best_s`` (or ``seconds``) per case and version, and prints one table: before s, after s, after/before. The fp32
matmul throughput (the floor's unit) is measured before the first and after the last round and printed beside
it: compare runs only when it did not move much. An old checkout is made with
``git worktree add /tmp/old <commit>``. ``--same-script`` runs the after tree's script with either tree's
pkfast (``PYTHONPATH``), for workloads the old script does not have.
"""

from __future__ import annotations

import argparse
import csv
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch


def matmul_gflops(n: int = 2048, k: int = 8192, repeat: int = 5) -> float:
    """Best fp32 ``torch.mm`` throughput on an n×k by k×n product (GFLOP/s)."""
    a, b = torch.randn(n, k), torch.randn(k, n)
    torch.mm(a, b)
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - t0)
    return 2.0 * n * n * k / best / 1e9


def run(tree: Path, script: str, args: list[str], csv_path: Path, script_tree: Path | None = None
        ) -> list[dict[str, str]]:
    """One run of ``benchmarks/<script>`` with ``tree``'s pkfast (the script from ``script_tree``, default ``tree``)."""
    env = dict(os.environ, PYTHONPATH=str(tree))
    cmd = [sys.executable, str((script_tree or tree) / "benchmarks" / script), *args, "--csv", str(csv_path)]
    r = subprocess.run(cmd, cwd=tree, env=env, capture_output=True, text=True)
    if r.returncode != 0:
        sys.stderr.write(r.stdout[-4000:] + r.stderr[-4000:])
        raise SystemExit(f"versions.py: {' '.join(cmd)} failed in {tree} (exit {r.returncode})")
    with open(csv_path) as f:
        rows = list(csv.DictReader(f))
    csv_path.unlink()
    return rows


def key(row: dict[str, str]) -> tuple[str, ...]:
    """A case: the workload, its sizes and what was timed (the method or the baseline)."""
    return tuple(row.get(c, "") for c in ("workload", "kernel", "N", "T", "pkfast_method", "method"))


def seconds(row: dict[str, str]) -> str:
    """The case's best time: ``best_s`` (methods.py, run.py) or ``seconds`` (architectures.py)."""
    return row.get("best_s") or row.get("seconds") or ""


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if "--" not in argv:
        raise SystemExit("versions.py: give the benchmark after '--', e.g. -- methods.py --workloads a")
    i = argv.index("--")
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--before", required=True, type=Path, help="the old source tree (a checkout or worktree)")
    p.add_argument("--after", default=Path("."), type=Path, help="the new source tree (default: this one)")
    p.add_argument("--rounds", type=int, default=2, help="interleaved rounds (default 2)")
    p.add_argument("--same-script", action="store_true",
                   help="run the after tree's benchmark script for both versions (only pkfast differs: for a "
                        "workload the old tree's script lacks)")
    a = p.parse_args(argv[:i])
    script, args = argv[i + 1], argv[i + 2:]
    trees = {"before": a.before.resolve(), "after": a.after.resolve()}
    best: dict[tuple[str, ...], dict[str, float]] = {}
    tmp = Path(tempfile.mkdtemp())
    gf0 = matmul_gflops()
    for rnd in range(a.rounds):
        for label, tree in trees.items():
            rows = run(tree, script, args, tmp / f"{label}{rnd}.csv", trees["after"] if a.same_script else None)
            for row in rows:
                if row.get("status", "ok") != "ok" or not seconds(row):
                    continue
                slot = best.setdefault(key(row), {})
                slot[label] = min(slot.get(label, float("inf")), float(seconds(row)))
            print(f"round {rnd + 1}/{a.rounds}: {label} done", file=sys.stderr, flush=True)
    gf1 = matmul_gflops()
    print(f"{script} {' '.join(args)}; best of {a.rounds} interleaved rounds per version")
    print(f"fp32 matmul floor unit: {gf0:.0f} GFLOP/s before the first round, {gf1:.0f} after the last")
    print(f"{'case (workload, N, T, route, what)':<58} {'before s':>10} {'after s':>10} {'after/before':>13}")
    for k, v in best.items():
        b, f = v.get("before", float("nan")), v.get("after", float("nan"))
        print(f"{' '.join(x for x in k if x):<58} {b:>10.4g} {f:>10.4g} {f / b:>13.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
