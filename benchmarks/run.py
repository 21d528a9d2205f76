"""End-to-end speed of ``pkfast.gram`` against its floor and against the baselines, as one table.

    python benchmarks/run.py [--workloads a,b,c] [--sizes small|full] [--repeat K] [--csv PATH]

For each workload (see ``_common.py``) and size (N samples, T steps) it times, with ``time.perf_counter``
after one untimed warm-up run, the best (``--stat median``: the median) of ``--repeat`` runs of

* ``pkfast.gram(model, traj, X, outputs="trace", rule="left", method=M, progress=False)`` (the symmetric Gram;
  ``--method``, default ``materialized``: every supported layer's per-sample gradient formed from its factors
  and multiplied as Jacobian panels — the materialised route the floor is for; ``jacobian``: vmap(jacrev)),
* each baseline of ``baselines.py`` computing the same Gram (its result checked against pkfast's: relative
  Frobenius error; above 1e-4 the row is marked FAIL and the script exits with status 1),
* the floor: ``T·N²·C·P`` FLOPs (one triangle, as SYRK) at the best fp32 matmul throughput measured in this run
  (a large torch.mm and the Gram's own product shape) + the per-sample Jacobian time alone (pkfast's Jacobian
  code, every sample once per step); and the route's own floor, with the time of the same ``pkfast.gram`` call
  with its panel products switched off in place of the ``vmap(jacrev)`` time (``own jac s``, ``pk/own``).

Columns: ``pkfast s``, ``floor s``, ``pk/floor``; then per baseline its seconds, ``×pk`` = baseline seconds /
pkfast seconds (> 1: pkfast is faster) and ``err`` = its relative Frobenius error against pkfast. Rows are
appended (one per workload × size × method, with the environment) to ``--csv`` (default
``benchmarks/results/gram_<device>.csv``).

``--sizes small`` (default) takes a few minutes on two busy cores; ``--sizes full`` are the issue's sizes
(a: N ∈ {512, 1797} × T ∈ {1, 8}; b: N = 512, T ∈ {1, 8}; c: N = 512, T = 1) — run those on a quiet machine.
"""

from __future__ import annotations

import argparse
import gc
import sys
import traceback
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import pkfast  # noqa: E402
from pkfast.engine.driver import GramJob  # noqa: E402

import baselines as bl  # noqa: E402
from _common import (  # noqa: E402
    RESULTS_DIR, SIZES, TOLERANCE_F32, WORKLOADS, append_csv, available_bytes, environment, floor_seconds,
    format_environment, gram_flops, jacobian_time, make_workload, measure_matmul_gflops, rel_fro_error,
    route_jacobian_time, timeit,
)

SHORT = {"torch_func_tutorial": "torch.func", "naive_autograd": "naive", "neural_tangents": "nt"}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workloads", default="a,b,c", help="comma-separated subset of a,b,c (default: all)")
    p.add_argument("--sizes", choices=sorted(SIZES), default="small", help="size set (default: small)")
    p.add_argument("--n", default=None, help="override the N values (comma-separated) for every workload")
    p.add_argument("--steps", default=None, help="override the T values (comma-separated) for every workload")
    p.add_argument("--repeat", type=int, default=3, help="timed runs per method (default 3)")
    p.add_argument("--method", default="materialized", choices=("materialized", "jacobian", "auto", "factorized"),
                   help="pkfast.gram's method (default materialized: the materialised route the floor is for — "
                        "per-sample gradients formed from layer factors and multiplied as panels; jacobian: every "
                        "Jacobian by vmap(jacrev); methods.py compares the methods)")
    p.add_argument("--stat", choices=("best", "median"), default="best", help="statistic shown in the table")
    p.add_argument("--csv", default=None, help="CSV to append to (default benchmarks/results/gram_<device>.csv); "
                   "'none' to write nothing")
    p.add_argument("--baselines", default="torch_func_tutorial,naive_autograd,neural_tangents",
                   help=f"comma-separated subset of {','.join(bl.BASELINES)}, or 'none'")
    p.add_argument("--naive-max-n", type=int, default=bl.NAIVE_MAX_N,
                   help=f"largest N the naive autograd loop is run for (default {bl.NAIVE_MAX_N})")
    p.add_argument("--nt-impl", default="1,3",
                   help="neural-tangents implementations (1 jacobian contraction, 2 NTK-vector products, "
                        "3 structured derivatives), comma-separated (default 1,3)")
    p.add_argument("--device", default="cpu", help="compute device for pkfast and the torch baselines (default cpu)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    p.add_argument("--memory-budget", default=None, help="pkfast.gram memory_budget (default: pkfast's)")
    p.add_argument("--mm-shape", default="2048,8192,2048",
                   help="m,k,n of the square-ish torch.mm throughput probe (default 2048,8192,2048)")
    return p.parse_args(argv)


def _ints(s: str) -> list[int]:
    return [int(v) for v in s.split(",") if v.strip()]


def cases(args: argparse.Namespace) -> list[tuple[str, int, int]]:
    keys = [k.strip() for k in args.workloads.split(",") if k.strip()]
    bad = [k for k in keys if k not in WORKLOADS]
    if bad:
        raise SystemExit(f"run.py: unknown workload {bad[0]!r}; expected a subset of {','.join(WORKLOADS)}")
    out = []
    for k in keys:
        sizes = SIZES[args.sizes][k]
        ns = _ints(args.n) if args.n else sorted({n for n, _ in sizes})
        ts = _ints(args.steps) if args.steps else None
        if args.n or args.steps:
            ts = ts or sorted({t for _, t in sizes})
            out += [(k, n, t) for n in ns for t in ts]
        else:
            out += [(k, n, t) for n, t in sizes]
    return out


def baseline_specs(args: argparse.Namespace) -> list[tuple[str, str, dict[str, Any]]]:
    """(column label, baseline name, options)."""
    if args.baselines.strip().lower() == "none":
        return []
    specs = []
    for name in [b.strip() for b in args.baselines.split(",") if b.strip()]:
        if name not in bl.BASELINES:
            raise SystemExit(f"run.py: unknown baseline {name!r}; expected a subset of {','.join(bl.BASELINES)}")
        if name == "neural_tangents":
            specs += [(f"nt[{i}]", name, {"implementation": i}) for i in _ints(args.nt_impl)]
        elif name == "naive_autograd":
            specs.append((SHORT[name], name, {"max_n": args.naive_max_n}))
        else:
            specs.append((SHORT[name], name, {}))
    return specs


def _fmt_s(x: float | None) -> str:
    if x is None:
        return "-"
    return f"{x:.3g}" if x < 1000 else f"{x:.0f}"


def run_case(key: str, n: int, T: int, args, specs, mm_best: dict[str, float], notes: list[str]) -> tuple[dict, list[dict]]:
    """Time pkfast, the floor and the baselines on one workload; return (table row, CSV rows)."""
    dev = torch.device(args.device)
    stat = args.stat
    wl = make_workload(key, n, T, device=dev)
    job = GramJob.create(wl.model, wl.traj, wl.X, outputs="trace", rule="left", memory_budget=args.memory_budget,
                         method=args.method)
    C, P, plan = job.num_outputs, job.fm.num_params, job.tiling
    exec_flops = job.flops()
    del job

    # pkfast
    def pk():
        return pkfast.gram(wl.model, wl.traj, wl.X, outputs="trace", rule="left", memory_budget=args.memory_budget,
                           method=args.method, progress=False)

    t_pk = timeit(pk, repeat=args.repeat, warmup=1, device=dev)
    K = t_pk.result
    pk_s = getattr(t_pk, stat)

    # the floor: Jacobians alone + the Gram's FLOPs at the best measured matmul throughput
    jac_s = jacobian_time(wl.model, wl.traj, wl.X, repeat=args.repeat, memory_budget=args.memory_budget)
    own_s = None  # the route's own Jacobian work (no products), for the route's own floor
    if args.method in ("materialized", "jacobian"):
        own_s = route_jacobian_time(wl.model, wl.traj, wl.X, method=args.method, repeat=args.repeat,
                                    memory_budget=args.memory_budget)
    rows_n = plan.row_block
    K_len = C * P
    cap = min(available_bytes(dev) // 4, 8 * 2**30) // (4 * rows_n)  # keep the probe's A within memory
    K_probe = int(max(1, min(K_len, cap)))
    thr = measure_matmul_gflops((), gram_shape=(rows_n, K_probe), repeat=args.repeat, device=dev)
    gram_thr = thr["best"]
    best_thr = max(gram_thr, mm_best["best"])
    flops = gram_flops(n, None, C, P, T)
    floor = floor_seconds(flops, best_thr, jac_s)
    own_floor = None if own_s is None else floor_seconds(flops, best_thr, own_s)

    row: dict[str, Any] = {"workload": key, "N": n, "T": T, "P": P, "C": C, "pkfast s": pk_s, "floor s": floor,
                           "pk/floor": pk_s / floor, "jac s": jac_s, "own jac s": own_s, "own floor s": own_floor,
                           "pk/own": None if own_floor is None else pk_s / own_floor}
    base = {"workload": key, "model": wl.name, "N": n, "T": T, "P": P, "C": C, "tiles": len(plan.tiles),
            "row_block": plan.row_block, "gram_flops": flops, "pkfast_exec_flops": exec_flops,
            "jacobian_s": jac_s, "mm_gflops": mm_best["best"], "gram_shape": f"{rows_n}x{K_probe}x{rows_n}",
            "gram_shape_gflops": gram_thr, "floor_s": floor, "pkfast_method": args.method,
            "route_jacobian_s": "" if own_s is None else own_s, "route_floor_s": "" if own_floor is None else own_floor,
            "repeat": args.repeat, "stat": stat}
    csv_rows = [{**base, "method": "pkfast", "status": "ok", "best_s": t_pk.best, "median_s": t_pk.median,
                 "ratio_to_pkfast": 1.0, "rel_err_vs_pkfast": 0.0}]
    failed = False

    for label, name, opts in specs:
        gc.collect()
        rec = {**base, "method": label, "status": "ok", "best_s": "", "median_s": "", "ratio_to_pkfast": "",
               "rel_err_vs_pkfast": ""}
        try:
            fn = bl.prepare(name, wl.model, wl.traj, wl.X, **opts)
            warm: Any = 1
            if name == "naive_autograd":  # warm up on a few samples only: the full loop is the slow part
                warm = bl.prepare(name, wl.model, wl.traj, wl.X[: min(4, n)], **opts)
            t = timeit(fn, repeat=args.repeat, warmup=warm, device=dev)
            err = rel_fro_error(t.result, K)
            s = getattr(t, stat)
            ok = err <= TOLERANCE_F32
            row[label] = (s, s / pk_s, err, None if ok else "FAIL")
            rec.update(best_s=t.best, median_s=t.median, ratio_to_pkfast=s / pk_s, rel_err_vs_pkfast=err,
                       status="ok" if ok else f"FAIL: rel err {err:.2e} > {TOLERANCE_F32:g}")
            if not ok:
                failed = True
                notes.append(f"FAIL {key} N={n} T={T} {label}: relative Frobenius error vs pkfast {err:.3e} > "
                             f"{TOLERANCE_F32:g}")
            del t
        except bl.Skipped as e:
            row[label] = (None, None, None, "skipped")
            rec["status"] = str(e)
            notes.append(f"{label}: {e}")
        except Exception as e:  # an error in one baseline must not lose the other results
            failed = True
            row[label] = (None, None, None, "ERROR")
            rec["status"] = f"ERROR {type(e).__name__}: {e}"
            notes.append(f"ERROR {key} N={n} T={T} {label}: {type(e).__name__}: {e}")
            traceback.print_exc()
        csv_rows.append(rec)
    row["_failed"] = failed
    return row, csv_rows


def format_table(rows: list[dict], specs) -> str:
    head = ["workload", "N", "T", "P", "C", "pkfast s", "floor s", "pk/floor", "jac s", "own jac s", "pk/own"]
    for label, _, _ in specs:
        head += [f"{label} s", f"{label} ×pk", f"{label} err"]
    lines = []
    body = []
    for r in rows:
        cells = [r["workload"], str(r["N"]), str(r["T"]), f"{r['P']:,}", str(r["C"]), _fmt_s(r["pkfast s"]),
                 _fmt_s(r["floor s"]), f"{r['pk/floor']:.2f}", _fmt_s(r["jac s"]), _fmt_s(r["own jac s"]),
                 "-" if r["pk/own"] is None else f"{r['pk/own']:.2f}"]
        for label, _, _ in specs:
            s, ratio, err, flag = r.get(label, (None, None, None, "-"))
            if s is None:
                cells += [flag or "-", "", ""]
            else:
                cells += [_fmt_s(s), f"{ratio:.2f}", f"{err:.1e}" + (" FAIL" if flag == "FAIL" else "")]
        body.append(cells)
    widths = [max(len(h), *(len(c[i]) for c in body)) if body else len(h) for i, h in enumerate(head)]
    lines.append("  ".join(h.rjust(w) for h, w in zip(head, widths)))
    lines.append("  ".join("-" * w for w in widths))
    for cells in body:
        lines.append("  ".join(c.rjust(w) for c, w in zip(cells, widths)))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    dev = torch.device(args.device)
    specs = baseline_specs(args)
    todo = cases(args)
    env = environment(dev)
    print(f"pkfast.gram speed, sizes={args.sizes}, {args.stat} of {args.repeat} after 1 warm-up, float32, "
          f"outputs='trace', rule='left'")
    print(format_environment(env))
    m, k, n = _ints(args.mm_shape)
    mm = measure_matmul_gflops([(m, k, n)], repeat=args.repeat, device=dev)
    print(f"fp32 torch.mm {m}x{k}x{n}: {mm['best']:.1f} GFLOP/s", flush=True)

    path = None
    if args.csv is None or args.csv.lower() != "none":
        path = Path(args.csv) if args.csv else RESULTS_DIR / f"gram_{dev.type}.csv"
    rows, csv_rows, notes = [], [], []
    for key, n_, T in todo:
        print(f"  running {key} N={n_} T={T} …", flush=True)
        row, recs = run_case(key, n_, T, args, specs, mm, notes)
        rows.append(row)
        recs = [{**rec, **env} for rec in recs]
        csv_rows += recs
        if path is not None:  # each case as soon as it finishes: a long run that dies keeps what it measured
            append_csv(path, recs)
        print(format_table([row], specs), flush=True)
        gc.collect()

    print()
    print(format_table(rows, specs))
    print()
    print(f"pkfast s / floor s: pkfast.gram(method={args.method!r}) seconds (best of repeats unless --stat median). "
          "floor = T·N²·C·P FLOPs at the best measured fp32 matmul throughput + the Jacobian time alone (jac s: "
          "vmap(jacrev), every sample once per step).")
    print("own jac s: the same pkfast.gram call with its panel products switched off (the route's own Jacobian "
          "work); pk/own = pkfast s / (the Gram's FLOPs at peak + own jac s), the stricter ratio when the route "
          "forms its Jacobians faster than vmap(jacrev).")
    print("×pk = baseline seconds / pkfast seconds (> 1: pkfast faster); err = ‖K_baseline − K_pkfast‖_F / "
          "‖K_pkfast‖_F (must be ≤ 1e-4).")
    thr = {r["workload"] + f" N={r['N']} T={r['T']}": r for r in csv_rows if r["method"] == "pkfast"}
    for label, r in thr.items():
        print(f"  {label}: Gram-shape mm {r['gram_shape']}: {r['gram_shape_gflops']:.1f} GFLOP/s; "
              f"{r['tiles']} tile(s) of ≤{r['row_block']} rows; pkfast executes {r['pkfast_exec_flops'] / 1e9:.1f} "
              f"GFLOP of products vs {r['gram_flops'] / 1e9:.1f} GFLOP (SYRK count)")
    for note in dict.fromkeys(notes):  # each distinct note once (a skip reason repeats on every row)
        print("  " + note)

    if path is not None:
        print(f"appended {len(csv_rows)} rows to {path} (case by case)")
    if any(r["_failed"] for r in rows):
        print("\n*** FAILED: a baseline disagreed with pkfast or raised (see above) ***", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
