"""Smoke test of benchmarks/adam_attribution.py --quick (issue 26, evidence 5b): the exact machine rebuilds the
AdamW-trained network, exact-vs-exact correlations are 1, every method's correlations and leave-k-out figures are
finite."""

from __future__ import annotations

import csv
import math
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_adam_attribution_quick(tmp_path):
    out = tmp_path / "a.csv"
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "adam_attribution.py"), "--quick", "--csv",
                        str(out), "--log", str(tmp_path / "a.log")], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = {row["method"]: row for row in csv.DictReader(out.open())}
    assert set(rows) == {"exact", "sgd_proxy", "tracin_cp", "less_ckpt", "less_hand", "precond_path", "random"}
    ex = rows["exact"]
    assert float(ex["machine_rel_err"]) <= 1e-10, ex["machine_rel_err"]
    for key in ("pearson_mean", "pearson_min", "spearman_mean", "spearman_min"):
        assert abs(float(ex[key]) - 1.0) < 1e-12, (key, ex[key])
    for name, row in rows.items():
        keys = ["loo_mean_dloss", "loo_mean_dphi", "loo_mean_pred_dphi"]
        keys += [] if name == "random" else ["pearson_mean", "spearman_mean"]
        for key in keys:
            assert math.isfinite(float(row[key])), (name, key, row[key])
    assert "| exact | 1.000, 1.000 |" in r.stdout
