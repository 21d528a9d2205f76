"""pkfast's routes side by side — method="auto" (default), "factorized", "materialized", "jacobian" — and the
baselines, on one workload at a time, same weights, results checked.

    python benchmarks/methods.py [--workloads a,b,d] [--n 1797] [--steps 8] [--baselines ...] [--csv PATH]

For each workload (``_common.py``: a = digits MLP, b = digits CNN, d = transformer-style block) it prints
``pkfast.plan`` (the route of every layer and its estimated FLOPs), then times the trace Gram
``K = Σ_s ε_s Σ_c J_c(X; w_s) J_c(X; w_s)ᵀ`` (outputs="trace", rule="left", float32, X2 = X) computed by:

* ``pkfast.gram(method=…)`` for each method of ``--methods``;
* the torch.func NTK tutorial (``vmap(jacrev)`` + einsum per parameter) and neural-tangents'
  ``empirical_ntk_fn`` implementations of ``--nt-impl`` (default 1 = Jacobian contraction, 3 = structured
  derivatives; run from the venv that has neural-tangents, see README.md).

Timing: best of ``--repeat`` runs after one warm-up; a callable whose warm-up takes longer than
``--slow`` seconds is timed once more and not repeated (its warm-up is a full run: nothing is extrapolated).
For neural-tangents the warm-up is one trajectory step (the jitted function compiles on its first call and
is then reused for every step). Every result is compared with pkfast's ``method="jacobian"`` Gram (relative
Frobenius error; above 1e-4 the row is marked FAIL and the exit status is 1). Ratios: ``×auto`` = seconds /
the ``auto`` seconds. Rows are appended to ``--csv`` (default ``benchmarks/results/methods_<device>.csv``).
"""

from __future__ import annotations

import argparse
import gc
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import pkfast  # noqa: E402

import baselines as bl  # noqa: E402
from _common import (  # noqa: E402
    RESULTS_DIR, TOLERANCE_F32, append_csv, environment, format_environment, make_workload, rel_fro_error, sync,
    timeit,
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workloads", default="a,b,d", help="comma-separated workload keys (default a,b,d)")
    p.add_argument("--n", type=int, default=1797, help="samples N (default 1797: all digits)")
    p.add_argument("--steps", type=int, default=8, help="trajectory steps T (default 8)")
    p.add_argument("--methods", default="auto,factorized,materialized,jacobian", help="pkfast methods to time")
    p.add_argument("--baselines", default="torch_func_tutorial,neural_tangents",
                   help="baselines (subset of torch_func_tutorial,neural_tangents, or none)")
    p.add_argument("--nt-impl", default="1,3", help="neural-tangents implementations (default 1,3)")
    p.add_argument("--repeat", type=int, default=3, help="timed runs of fast callables (default 3)")
    p.add_argument("--slow", type=float, default=30.0, help="seconds above which a callable is timed once")
    p.add_argument("--device", default="cpu")
    p.add_argument("--csv", default=None, help="CSV to append to ('none': do not write)")
    return p.parse_args(argv)


def _time(fn, warm, args, dev) -> Any:
    """Best of ``--repeat`` after one warm-up (``warm``: a callable, or None to warm up with ``fn`` itself); a
    warm-up slower than ``--slow`` seconds leaves one timed run."""
    t0 = time.perf_counter()
    (warm or fn)()
    sync(dev)
    first_s = time.perf_counter() - t0
    return timeit(fn, repeat=args.repeat if first_s <= args.slow else 1, warmup=0, device=dev)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    dev = torch.device(args.device)
    env = environment(dev)
    print(f"pkfast methods vs baselines: N={args.n}, T={args.steps}, trace Gram, rule='left', float32")
    print(format_environment(env), flush=True)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    path = None if (args.csv or "").lower() == "none" else Path(args.csv or RESULTS_DIR / f"methods_{dev.type}.csv")
    failed, table = False, []
    for key in [w.strip() for w in args.workloads.split(",") if w.strip()]:
        wl = make_workload(key, args.n, args.steps, device=dev)
        print(f"\n=== workload {key}: {wl.name}, P = {wl.P:,}, C = {wl.C}, N = {wl.N}, T = {wl.T}", flush=True)
        print(pkfast.plan(wl.model, wl.traj, wl.X), flush=True)
        results: dict[str, tuple[Any, ...]] = {}

        runs: list[tuple[str, Any, Any]] = []
        for m in methods:
            runs.append((f"pkfast {m}", (lambda m=m: pkfast.gram(wl.model, wl.traj, wl.X, method=m, progress=False)), None))
        timed: dict[str, Any] = {}  # the reference: the Jacobian route's own timed result when it is one of the runs
        if "jacobian" in methods:
            timed["pkfast jacobian"] = _time(runs[methods.index("jacobian")][1], None, args, dev)
            ref = timed["pkfast jacobian"].result
        else:
            ref = pkfast.gram(wl.model, wl.traj, wl.X, method="jacobian", progress=False)
        specs = []
        if args.baselines.strip().lower() != "none":
            for name in [b.strip() for b in args.baselines.split(",") if b.strip()]:
                if name == "neural_tangents":
                    specs += [(f"nt[{i}]", name, {"implementation": int(i)}) for i in args.nt_impl.split(",")]
                elif name == "torch_func_tutorial":
                    specs.append(("torch.func tutorial", name, {}))
                else:
                    raise SystemExit(f"methods.py: unknown baseline {name!r}")
        for label, name, opts in specs:
            try:
                fn = bl.prepare(name, wl.model, wl.traj, wl.X, **opts)
                if name == "neural_tangents":  # compile on one step (the jitted function is reused per step)
                    warm = fn.warm
                else:
                    warm = bl.prepare(name, wl.model, wl.traj, wl.X[:8], **opts)
                runs.append((label, fn, warm))
            except bl.Skipped as e:
                results[label] = (None, str(e))
        for label, fn, warm in runs:
            gc.collect()
            print(f"  timing {label} …", flush=True)
            rec = {"workload": key, "model": wl.name, "N": wl.N, "T": wl.T, "P": wl.P, "C": wl.C, "method": label,
                   "best_s": "", "times": "", "rel_err_vs_jacobian": "", "status": ""}  # every row: the same columns
            try:
                t = timed.pop(label) if label in timed else _time(fn, warm, args, dev)
                err = rel_fro_error(t.result, ref)
                ok = err <= TOLERANCE_F32
                failed |= not ok
                results[label] = (t.best, err, None if ok else "FAIL")
                rec.update(best_s=t.best, times=" ".join(f"{x:.4g}" for x in t.times), rel_err_vs_jacobian=err,
                           status="ok" if ok else "FAIL")
                del t
            except Exception as e:  # one broken baseline must not lose the other rows
                failed = True
                results[label] = (None, f"ERROR {type(e).__name__}: {e}")
                rec.update(status=f"ERROR {type(e).__name__}: {e}")
                traceback.print_exc()
            if path is not None:
                append_csv(path, [{**rec, **env}])
        auto = results.get("pkfast auto", (None,))[0]
        print(f"\n  {'method':<22} {'seconds':>9} {'×auto':>8} {'rel err vs jacobian':>20}")
        for label, r in results.items():
            if r[0] is None:
                print(f"  {label:<22} {'-':>9} {'-':>8}  {r[1]}")
                continue
            ratio = f"{r[0] / auto:.1f}" if auto else "-"
            print(f"  {label:<22} {r[0]:>9.3g} {ratio:>8} {r[1]:>20.2e} {r[2] or ''}")
            table.append((key, label, r[0], r[0] / auto if auto else None, r[1]))
        sys.stdout.flush()
        del wl, ref
    print("\nsummary (workload, method, seconds, ×auto, rel err vs jacobian):")
    for row in table:
        print("  " + " | ".join(str(x if not isinstance(x, float) else f"{x:.3g}") for x in row))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
