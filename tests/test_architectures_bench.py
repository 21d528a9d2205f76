"""Smoke test of benchmarks/architectures.py --quick (issue 28, item 4): tiny versions of the new workloads —
lm-vocab (V-output trace kernel through the collapsed head, with the head-removed reference), gpt-bare (a bare
positional nn.Parameter) and resnet-alt (GroupNorm, layer-scale gamma) — run, every time and floor is finite,
pkfast's Gram agrees with the torch.func tutorial's, and the printed plans show the structured head and the bare
parameters kept on the batched pass."""

from __future__ import annotations

import csv
import math
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

KERNELS = {"lm-vocab trace", "gpt-bare loss", "resnet-alt trace", "resnet-alt loss"}


def test_architectures_quick(tmp_path):
    out = tmp_path / "arch.csv"
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "architectures.py"), "--quick", "--csv", str(out)],
                       capture_output=True, text=True, timeout=180)
    assert r.returncode == 0, (r.stdout[-3000:], r.stderr[-3000:])
    rows = list(csv.DictReader(out.open()))
    by = {(row["kernel"], row["method"]): row for row in rows}
    assert {row["kernel"] for row in rows} == KERNELS
    assert {row["method"] for row in rows} == {"pkfast", "torch.func tutorial", "pkfast head removed (C=16)"}
    for kernel in KERNELS:
        for method in ("pkfast", "torch.func tutorial"):
            row = by[(kernel, method)]
            for key in ("seconds", "floor_seconds", "passes_seconds", "product_seconds", "x_floor"):
                assert math.isfinite(float(row[key])) and float(row[key]) >= 0, (kernel, method, key, row[key])
        tut = by[(kernel, "torch.func tutorial")]
        # float32 against float32; the tutorial's sum over the V-output head's Jacobian rows is the noisier
        tol = 1e-3 if kernel == "lm-vocab trace" else 1e-5
        assert float(tut["rel_err_vs_pkfast"]) <= tol, (kernel, tut["rel_err_vs_pkfast"])
        assert tut["status"] == "ok", (kernel, tut["status"])
    ref = by[("lm-vocab trace", "pkfast head removed (C=16)")]
    assert ref["status"].startswith("reference"), ref["status"]
    assert math.isfinite(float(ref["pkfast_speedup"])) and float(ref["pkfast_speedup"]) > 0
    assert ref["C"] == "16" and by[("lm-vocab trace", "pkfast")]["C"] == "100"
    # the plans: the collapsed head, and the bare parameters on the batched pass
    assert "structured head 'head' (Linear 16→100)" in r.stdout
    assert "17 output gradients per position instead of 100" in r.stdout
    probes = "by probes where they meet the samples"
    assert f"parameters without a layer rule (pos) {probes}" in r.stdout
    assert f"parameters without a layer rule (stages.0.gamma, stages.1.gamma, stages.2.gamma) {probes}" in r.stdout
    assert "factors from vmap(jacrev) per sample" not in r.stdout
    assert "(17 backward passes: the collapsed head's d + 1)" in r.stdout
