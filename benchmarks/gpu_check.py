"""GPU readiness in one run (``make gpu-check``): on a machine with a CUDA GPU, under 8 minutes, one table and
PASS or FAIL. Without CUDA it says so and exits 0.

    python benchmarks/gpu_check.py [--budget-s 300] [--out DIR]

1. **The Triton kernel's tests on the GPU** — ``tests/engine/test_triton_kernel.py`` and ``tests/engine/test_backends.py`` (every
   input precision: ieee, tf32, bf16; general and upper-triangle launches; odd shapes, strides, float64), run by
   pytest in a subprocess with the GPU visible (``TRITON_INTERPRET`` unset).
2. **The kernel against cuBLAS** — ``G += Σ_s α_s A_s A_sᵀ`` by ``accumulate_triton`` and by ``torch.addmm``
   (cuBLAS) on Jacobian-panel shapes, per precision: median ms, GEMM-equivalent TFLOP/s, the ratio to cuBLAS
   and the relative error against cuBLAS at the same precision (``benchmarks/bench_accumulate.py``, part 1).
3. **pkfast.gram on CUDA** — the benchmark workloads (digits MLP, CNN, transformer block) on the GPU with the
   default route and with ``method="jacobian"``, against the same Gram computed on the CPU (relative Frobenius
   error ≤ 1e-4 in float32), with seconds on each device.

FAIL if a test fails, a kernel result is off (ieee ≤ 1e-5, tf32 ≤ 5e-3, bf16 ≤ 2e-2 relative to cuBLAS) or a GPU
Gram disagrees with the CPU one. The table also goes to ``--out`` (default ``benchmarks/results``) as
``gpu_check.txt`` with the environment.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import subprocess
import sys
import time
import traceback
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))

#: (S steps, n samples, K = C·P) stacks for the kernel against cuBLAS: a digits-MLP panel, a wide one, steps
SHAPES = [(1, 2048, 850020), (1, 4096, 65536), (8, 2048, 65536)]
#: end-to-end workloads (key, N, T) on both devices
GRAMS = [("a", 1797, 2), ("b", 1024, 2), ("d", 1024, 2)]


def run_tests(timeout: int, log: Path | None) -> tuple[bool, str]:
    """Run the kernel's tests with the GPU visible; the whole pytest output goes to ``log`` when given, and the
    summary line (with the failed tests' names) is returned."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(ROOT)
    cmd = [sys.executable, "-m", "pytest", "-q", "-rf", "--tb=short", "-p", "no:cacheprovider",
           "tests/engine/test_triton_kernel.py", "tests/engine/test_backends.py"]
    if importlib.util.find_spec("xdist") is not None:
        # Each test shape compiles the autotune configs anew (about 6 s a test on an H200 machine, one process):
        # compile in parallel.
        cmd += ["-n", str(max(1, min(8, (os.cpu_count() or 2) // 2)))]
    try:
        r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as e:
        out = e.stdout.decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
        if log is not None:
            log.write_text(out)
        return False, f"timed out after {timeout} s"
    if log is not None:
        log.write_text(r.stdout + r.stderr)
    lines = [ln for ln in r.stdout.splitlines() if ln.strip()]
    failed = [ln for ln in lines if ln.startswith("FAILED")][:10]
    last = lines[-1:] or ["(no output)"]
    return r.returncode == 0, "\n   ".join([last[0].strip("= ")] + failed)


def kernel_rows() -> list[dict]:
    from _common import environment
    from bench_accumulate import bench_kernel

    return bench_kernel(SHAPES, ["ieee", "tf32", "bf16"], environment())


def gram_rows() -> list[dict]:
    import pkfast
    from _common import make_workload, rel_fro_error

    rows = []
    for key, n, steps in GRAMS:
        try:
            cpu = make_workload(key, n, steps)
            t0 = time.perf_counter()
            K_cpu = pkfast.gram(cpu.model, cpu.traj, cpu.X, progress=False)
            s_cpu = time.perf_counter() - t0
            gpu = make_workload(key, n, steps, device="cuda")
            for method in ("auto", "jacobian"):
                pkfast.gram(gpu.model, gpu.traj, gpu.X[:64], progress=False, method=method)  # warm-up (autotune)
                torch.cuda.synchronize()
                t0 = time.perf_counter()
                K = pkfast.gram(gpu.model, gpu.traj, gpu.X, progress=False, method=method)
                torch.cuda.synchronize()
                err = rel_fro_error(K, K_cpu)
                rows.append({"workload": key, "N": n, "T": steps, "method": method,
                             "gpu_s": time.perf_counter() - t0, "cpu_s": s_cpu, "rel_err": err, "ok": err <= 1e-4})
        except Exception:  # one workload's crash is reported, and the others still run
            traceback.print_exc()
            rows.append({"workload": key, "N": n, "T": steps, "method": "crashed", "gpu_s": float("nan"),
                         "cpu_s": float("nan"), "rel_err": float("nan"), "ok": False})
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--budget-s", type=int, default=300, help="seconds for the test subprocess (default 300)")
    p.add_argument("--out", default=str(HERE / "results"), help="folder for gpu_check.txt")
    a = p.parse_args(argv)
    if not torch.cuda.is_available():
        print(f"gpu_check: no CUDA device here (torch {torch.__version__}, CUDA "
              f"{torch.version.cuda or 'not built'}): nothing to check; run it on a machine with a GPU")
        return 0
    t_start = time.perf_counter()
    lines = [f"pkfast GPU check on {torch.cuda.get_device_name()} (torch {torch.__version__}, CUDA {torch.version.cuda})"]
    out = Path(a.out)
    ok_tests, summary = run_tests(a.budget_s, out / "gpu_check_pytest.log" if out.is_dir() else None)
    lines.append(f"1. Triton kernel tests on the GPU: {'PASS' if ok_tests else 'FAIL'} ({summary})")
    print(lines[-1], flush=True)
    lines.append("2. kernel vs cuBLAS (GEMM-equivalent TFLOP/s; ratio = cuBLAS ms / kernel ms)")
    try:
        krows = kernel_rows()
    except Exception:  # a crash in one part must not hide the others' results
        krows = [{"status": "crashed"}]
        lines.append("   " + traceback.format_exc().replace("\n", "\n   "))
    lines.append(f"   {'S×n×K':>18} {'prec':>5} {'method':>13} {'ms':>8} {'TFLOP/s':>8} {'ratio':>6} {'rel err':>8}")
    for r in krows:
        if r["status"] == "crashed":
            continue
        err = r["rel_err_vs_torch"]
        lines.append(f"   {r['S']}×{r['n']}×{r['K']:>8} {r['precision']:>5} {r['method']:>13} {r['ms_p50']:>8.3f} "
                     f"{r['gemm_equiv_tflops']:>8.1f} {r['speedup_vs_torch']:>6.2f} "
                     f"{'' if err == '' else f'{err:.1e}':>8}{'' if r['status'] == 'ok' else ' FAIL'}")
    ok_kernel = all(r["status"] == "ok" for r in krows)
    print("\n".join(lines[2:]), flush=True)
    n_before = len(lines)
    lines.append("3. pkfast.gram on CUDA vs the CPU result (float32, trace Gram, rule left)")
    try:
        grows = gram_rows()
    except Exception:
        grows = [{"ok": False, "crashed": True}]
        lines.append("   " + traceback.format_exc().replace("\n", "\n   "))
    lines.append(f"   {'workload':>8} {'N':>5} {'T':>2} {'method':>9} {'GPU s':>8} {'CPU s':>8} {'rel err':>8}")
    for r in grows:
        if r.get("crashed"):
            continue
        lines.append(f"   {r['workload']:>8} {r['N']:>5} {r['T']:>2} {r['method']:>9} {r['gpu_s']:>8.3f} "
                     f"{r['cpu_s']:>8.3f} {r['rel_err']:>8.1e}{'' if r['ok'] else ' FAIL'}")
    print("\n".join(lines[n_before:]), flush=True)
    ok = ok_tests and ok_kernel and all(r["ok"] for r in grows)
    lines.append(f"{'PASS' if ok else 'FAIL'} in {time.perf_counter() - t_start:.0f} s")
    text = "\n".join(lines)
    print(lines[-1])
    if out.is_dir():
        (out / "gpu_check.txt").write_text(text + "\n")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
