"""GPU: the Triton accumulation kernel against torch.mm (cuBLAS) on the same shapes, and end-to-end gram throughput.

    python benchmarks/bench_accumulate.py [--shapes S:n:K,...] [--precisions ieee,tf32,bf16] [--csv PATH]
    python benchmarks/bench_accumulate.py --interpret-check      # CPU: exercise the calls under TRITON_INTERPRET=1

Part 1, the kernel. For each stack ``A [S, n, K]`` (S steps of an n-sample Jacobian panel with K = C·P) and weights
α_s, the Gram tile update ``G += Σ_s α_s A_s A_sᵀ`` is timed with ``triton.testing.do_bench(quantiles=[0.5, 0.2,
0.8])`` (median, 20th and 80th percentile, in ms) for

* ``triton``        ``pkfast.engine.accumulate.triton_launch.accumulate_triton(G, A, A, α, input_precision=…)`` (one launch,
  all S steps);
* ``triton upper``  the same with ``upper=True`` (only the blocks on or above the diagonal: about half the work);
* ``torch``         ``G.addmm_(A_s, A_sᵀ, alpha=α_s)`` for each s: cuBLAS. ``ieee`` runs with TF32 off, ``tf32`` with
  ``torch.backends.cuda.matmul.allow_tf32 = True``, ``bf16`` on bf16 copies of A made outside the timed region
  (``G += α_s · mm(A_s, A_sᵀ).float()``).

TFLOP/s are GEMM-equivalent: ``2·S·n²·K / time`` for every row, so a triangle kernel that halves the time shows twice
the TFLOP/s; ``vs torch`` = torch time / this time. Each Triton result is checked against the torch result of the same
precision (relative error on the computed triangle printed; ieee must be ≤ 1e-5).

Part 2, end to end: ``pkfast.gram`` on CUDA for workloads of ``_common.py`` (``--gram a:1797:1,...``), seconds and the
Gram's SYRK TFLOP/s (T·N²·C·P / seconds), per pkfast backend listed in ``pkfast.engine.accumulate.BACKENDS``.

Rows are appended to ``--csv`` (default ``benchmarks/results/accumulate_cuda.csv``) with the GPU name and environment.
Without CUDA it prints why and exits 0 (GPU numbers only come from running on a GPU).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import RESULTS_DIR, append_csv, environment, format_environment, gram_flops, make_workload  # noqa: E402

QUANTILES = [0.5, 0.2, 0.8]
DEFAULT_SHAPES = "1:1024:850020,1:2048:850020,1:4096:65536,1:8192:65536,8:2048:65536"
DEFAULT_GRAM = "a:1797:1,a:1797:8,c:512:1"
#: largest relative error of a Triton result against torch at the same precision
CHECK_TOL = {"ieee": 1e-5, "tf32": 5e-3, "bf16": 2e-2}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", default=DEFAULT_SHAPES, help=f"S:n:K stacks, comma-separated (default {DEFAULT_SHAPES})")
    p.add_argument("--precisions", default="ieee,tf32,bf16", help="input precisions (default ieee,tf32,bf16)")
    p.add_argument("--gram", default=DEFAULT_GRAM,
                   help=f"end-to-end cases workload:N:T, comma-separated, or 'none' (default {DEFAULT_GRAM})")
    p.add_argument("--repeat", type=int, default=3, help="timed runs of each end-to-end gram (default 3)")
    p.add_argument("--csv", default=None, help="CSV to append to (default benchmarks/results/accumulate_cuda.csv); "
                   "'none' to write nothing")
    p.add_argument("--interpret-check", action="store_true",
                   help="no timing: run the script's kernel calls on tiny CPU shapes under TRITON_INTERPRET=1 and "
                        "check them against torch (for machines without a GPU)")
    return p.parse_args(argv)


def _shapes(spec: str) -> list[tuple[int, int, int]]:
    out = []
    for item in spec.split(","):
        S, n, K = (int(v) for v in item.split(":"))
        out.append((S, n, K))
    return out


def _rel_err(x: torch.Tensor, ref: torch.Tensor, upper: bool) -> float:
    if upper:  # only the upper triangle is guaranteed for upper=True
        x, ref = torch.triu(x), torch.triu(ref)
    x, ref = x.double(), ref.double()
    return float(torch.linalg.norm(x - ref) / torch.linalg.norm(ref))


# ---------------------------------------------------------------------------------------------- the calls
def triton_call(G: torch.Tensor, A: torch.Tensor, alpha: torch.Tensor, *, upper: bool, precision: str):
    from pkfast.engine.accumulate.triton_launch import accumulate_triton  # lazily: triton may be absent

    return lambda: accumulate_triton(G, A, A, alpha, upper=upper, input_precision=precision)


def torch_call(G: torch.Tensor, A: torch.Tensor, alpha: list[float], *, precision: str):
    """cuBLAS (or CPU BLAS) doing the same update; returns (fn, context setter)."""
    if precision == "bf16":
        Ab = A.bfloat16()

        def fn():
            for s, a in enumerate(alpha):
                G.add_(torch.mm(Ab[s], Ab[s].T).float(), alpha=a)
        return fn

    def fn():
        for s, a in enumerate(alpha):
            G.addmm_(A[s], A[s].T, alpha=a)
    return fn


class _tf32:
    """``allow_tf32`` on while benchmarking the tf32 mode, off otherwise (restored afterwards)."""

    def __init__(self, on: bool) -> None:
        self.on = on

    def __enter__(self):
        self.prev = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = self.on

    def __exit__(self, *exc):
        torch.backends.cuda.matmul.allow_tf32 = self.prev


# ---------------------------------------------------------------------------------------------- part 1
def bench_kernel(shapes, precisions, env: dict[str, Any]) -> list[dict[str, Any]]:
    import triton.testing

    rows = []
    dev = torch.device("cuda")
    print(f"{'S':>3} {'n':>6} {'K':>9} {'prec':>5} {'method':>13} {'ms p50':>9} {'p20':>9} {'p80':>9} "
          f"{'TFLOP/s':>8} {'vs torch':>8} {'rel err':>8}")
    for S, n, K in shapes:
        g = torch.Generator(device=dev).manual_seed(0)
        A = torch.randn(S, n, K, device=dev, generator=g) / K**0.25
        alpha = [0.5 + 0.1 * s for s in range(S)]
        alpha_t = torch.tensor(alpha, device=dev, dtype=torch.float32)
        flops = 2.0 * S * n * n * K
        for prec in precisions:
            with _tf32(prec == "tf32"):
                # reference result of this precision (torch), one update on a zero accumulator
                G_ref = torch.zeros(n, n, device=dev)
                torch_call(G_ref, A, alpha, precision=prec)()
                G = torch.zeros(n, n, device=dev)
                ms_t = triton.testing.do_bench(torch_call(G, A, alpha, precision=prec), quantiles=QUANTILES)
                results = [("torch", ms_t, None)]
                for upper in (False, True):
                    Gk = torch.zeros(n, n, device=dev)
                    triton_call(Gk, A, alpha_t, upper=upper, precision=prec)()  # first call autotunes
                    Gk.zero_()
                    triton_call(Gk, A, alpha_t, upper=upper, precision=prec)()
                    torch.cuda.synchronize()
                    err = _rel_err(Gk, G_ref, upper)
                    ms = triton.testing.do_bench(triton_call(Gk, A, alpha_t, upper=upper, precision=prec),
                                                 quantiles=QUANTILES)
                    results.append(("triton upper" if upper else "triton", ms, err))
                    del Gk
            for method, (p50, p20, p80), err in results:
                tflops = flops / (p50 * 1e-3) / 1e12
                vs = ms_t[0] / p50
                bad = err is not None and err > CHECK_TOL[prec]
                print(f"{S:>3} {n:>6} {K:>9} {prec:>5} {method:>13} {p50:>9.3f} {p20:>9.3f} {p80:>9.3f} "
                      f"{tflops:>8.1f} {vs:>8.2f} {'' if err is None else f'{err:.1e}':>8}{' FAIL' if bad else ''}")
                rows.append({"part": "kernel", "S": S, "n": n, "K": K, "precision": prec, "method": method,
                             "ms_p50": p50, "ms_p20": p20, "ms_p80": p80, "gemm_equiv_tflops": tflops,
                             "speedup_vs_torch": vs, "rel_err_vs_torch": "" if err is None else err,
                             "status": "FAIL" if bad else "ok", "workload": "", "N": "", "T": "", "backend": "",
                             "seconds_best": "", "syrk_tflops": "", **env})
            del G, G_ref
        del A
        torch.cuda.empty_cache()
    return rows


# ---------------------------------------------------------------------------------------------- part 2
def bench_gram(cases, repeat: int, env: dict[str, Any]) -> list[dict[str, Any]]:
    import pkfast
    from pkfast.engine.accumulate import BACKENDS

    rows = []
    backends = [b for b in BACKENDS if b != "auto"] or ["auto"]
    print(f"\n{'workload':>8} {'N':>6} {'T':>3} {'backend':>8} {'best s':>9} {'median s':>9} {'SYRK TFLOP/s':>13}")
    for key, n, T in cases:
        wl = make_workload(key, n, T, device="cuda")
        C, P = wl.C, wl.P
        flops = gram_flops(n, None, C, P, T)
        for backend in backends:
            def fn():
                return pkfast.gram(wl.model, wl.traj, wl.X, outputs="trace", rule="left", backend=backend,
                                   progress=False)
            fn()  # warm-up (and autotuning)
            torch.cuda.synchronize()
            times = []
            for _ in range(max(1, repeat)):
                torch.cuda.synchronize()
                t0 = time.perf_counter()
                fn()
                torch.cuda.synchronize()
                times.append(time.perf_counter() - t0)
            best, med = min(times), sorted(times)[len(times) // 2]
            print(f"{key:>8} {n:>6} {T:>3} {backend:>8} {best:>9.3f} {med:>9.3f} {flops / best / 1e12:>13.2f}")
            rows.append({"part": "gram", "S": "", "n": "", "K": "", "precision": "", "method": "pkfast.gram",
                         "ms_p50": "", "ms_p20": "", "ms_p80": "", "gemm_equiv_tflops": "", "speedup_vs_torch": "",
                         "rel_err_vs_torch": "", "status": "ok", "workload": key, "N": n, "T": T, "backend": backend,
                         "seconds_best": best, "syrk_tflops": flops / best / 1e12, **env})
        del wl
        torch.cuda.empty_cache()
    return rows


# ---------------------------------------------------------------------------------------------- CPU check
def interpret_check(precisions) -> int:
    """Run the same calls as part 1 on tiny CPU tensors under the Triton interpreter; compare with torch."""
    os.environ["TRITON_INTERPRET"] = "1"  # before triton is first imported
    try:
        import triton  # noqa: F401
    except ImportError as e:
        print(f"bench_accumulate: triton is not importable ({e}); skipped")
        return 0
    from pkfast.engine.accumulate.triton_launch import triton_status

    ok, why = triton_status()
    if not ok:
        print(f"bench_accumulate: the Triton path cannot run here: {why}; skipped")
        return 0
    failed = False
    for S, n, K in [(1, 37, 50), (3, 32, 70)]:
        A = torch.randn(S, n, K, generator=torch.Generator().manual_seed(0))
        alpha = [0.5 + 0.1 * s for s in range(S)]
        for prec in precisions:
            ref = torch.zeros(n, n)
            if prec == "tf32":  # the interpreter rounds the operands; compare with a fp32 result, loosely
                torch_call(ref, A, alpha, precision="ieee")()
            else:
                torch_call(ref, A, alpha, precision=prec)()
            for upper in (False, True):
                G = torch.zeros(n, n)
                triton_call(G, A, torch.tensor(alpha), upper=upper, precision=prec)()
                err = _rel_err(G, ref, upper)
                bad = err > CHECK_TOL[prec]
                failed |= bad
                print(f"interpret S={S} n={n} K={K} {prec:>5} upper={upper!s:>5}: rel err vs torch {err:.1e}"
                      f"{' FAIL' if bad else ''}")
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    precisions = [p.strip() for p in args.precisions.split(",") if p.strip()]
    if args.interpret_check:
        return interpret_check(precisions)
    if not torch.cuda.is_available():
        print("bench_accumulate: CUDA is not available (torch.cuda.is_available() is False); skipped. "
              "GPU numbers only come from running this on a GPU (use --interpret-check for a CPU smoke test).")
        return 0
    try:
        import triton  # noqa: F401
        import triton.testing  # noqa: F401
    except ImportError as e:
        print(f"bench_accumulate: triton is not importable ({e}); skipped (pip install triton)")
        return 0
    env = environment("cuda")
    print(f"pkfast accumulate benchmark on {env['gpu']}")
    print(format_environment(env))
    rows = bench_kernel(_shapes(args.shapes), precisions, env)
    if args.gram.strip().lower() != "none":
        cases = []
        for item in args.gram.split(","):
            k, n, t = item.split(":")
            cases.append((k, int(n), int(t)))
        rows += bench_gram(cases, args.repeat, env)
    if args.csv is None or args.csv.lower() != "none":
        path = Path(args.csv) if args.csv else RESULTS_DIR / "accumulate_cuda.csv"
        append_csv(path, rows)
        print(f"appended {len(rows)} rows to {path}")
    return 1 if any(r["status"] != "ok" for r in rows) else 0


if __name__ == "__main__":
    raise SystemExit(main())
