"""The worked examples run end to end and report what they claim (examples/kernel_machine.py, --quick)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "PYTHONPATH": str(ROOT)}


def test_kernel_machine_example_quick(tmp_path):
    out = tmp_path / "km"
    r = subprocess.run([sys.executable, str(ROOT / "examples" / "kernel_machine.py"), "--quick", "--no-progress",
                        "--out", str(out)], env=ENV, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    lines = [ln for ln in r.stdout.splitlines() if ln.startswith("SUMMARY ")]
    assert len(lines) == 1, r.stdout
    S = json.loads(lines[0][len("SUMMARY "):])
    assert S == json.loads((out / "summary.json").read_text())
    assert S["ok"] and all(S["checks"].values())

    # 1. the exact kernel machine rebuilds the network: same class everywhere, logits to quadrature precision
    ex = S["exact"]
    assert ex["class_agreement"] == 1.0
    assert ex["max_abs_diff"] < 1e-6 and ex["rel_error"] < 1e-7
    assert ex["certificate_max_quadrature"] < 1e-6 and ex["certificate_max_update_residual"] < 1e-10

    # 2. Domingos' left rule is first order: halving the lr (same lr·T) halves the error; the exact rule is far below
    rows = S["left_rule"]["rows"]
    assert len(rows) >= 3
    for r_ in rows[1:]:
        assert 1.7 < r_["left_ratio"] < 2.3, rows
    assert 0.85 < S["left_rule"]["slope"] < 1.15
    assert all(r_["exact_max_abs"] < 1e-4 * r_["left_max_abs"] for r_ in rows)

    # 3. explanations: k distinct proponents/opponents, scores ordered
    e = S["explain"]
    k = S["config"]["k"]
    assert len(set(e["proponents"])) == k and len(set(e["opponents"])) == k
    assert e["proponent_scores"] == sorted(e["proponent_scores"], reverse=True)
    assert e["opponent_scores"] == sorted(e["opponent_scores"])

    # 4. the path kernel is a usable kernel: well above chance (10%) even on the tiny quick configuration
    acc = S["kernels"]["test_accuracy"]
    assert set(acc) == {"network", "path_kernel_svc", "path_kernel_krr", "rbf_svc"}
    assert acc["path_kernel_svc"] > 0.5 and acc["path_kernel_krr"] > 0.5

    names = ("explain_digit.png", "gram_heatmap.png", "left_rule_error.png")
    if importlib.util.find_spec("matplotlib") is not None:
        for n in names:
            p = out / n
            assert p.exists() and p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", n
        assert sorted(Path(f).name for f in S["figures"]) == sorted(names)
    else:
        assert S["figures"] == [] and "figures skipped" in r.stdout


def test_attribution_example_quick(tmp_path):
    """examples/attribution.py --quick: proponents share the query's label, the sketched top 5 overlaps the exact
    one, and self-influence puts most flipped labels at the top (exact and sketched)."""
    out = tmp_path / "attr"
    r = subprocess.run([sys.executable, str(ROOT / "examples" / "attribution.py"), "--quick", "--no-progress",
                        "--out", str(out)], env=ENV, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    lines = [ln for ln in r.stdout.splitlines() if ln.startswith("SUMMARY ")]
    S = json.loads(lines[0][len("SUMMARY "):])
    assert S == json.loads((out / "summary.json").read_text())
    assert S["proponents_with_the_query_label"] >= 0.8
    assert S["top5_overlap_sketch_vs_exact"] >= 0.6
    for how in ("sketch", "exact"):
        assert S["flipped_found_top10"][how] >= 0.6 and S["flipped_found_top20"][how] >= 0.8, S
    assert pkfast_store_is_complete(out / "train.npy")


def pkfast_store_is_complete(path) -> bool:
    import pkfast

    f = pkfast.PathFeatures.open(path, verify=True)
    return f.features.dtype.is_floating_point and len(f) > 0


def test_hf_lora_attribution_example_quick(tmp_path):
    """examples/hf_lora_attribution.py --quick: a Trainer-recorded LoRA fine-tune of a tiny GPT-2 continues a
    prompt's pattern, and the generated token's top proponents are training sequences of that pattern."""
    import pytest

    pytest.importorskip("transformers", reason="needs transformers (pip install 'pkfast[hf]')")
    pytest.importorskip("accelerate", reason="transformers.Trainer needs accelerate")
    out = tmp_path / "hf"
    r = subprocess.run([sys.executable, str(ROOT / "examples" / "hf_lora_attribution.py"), "--quick", "--out",
                        str(out)], env=ENV, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    S = json.loads([ln for ln in r.stdout.splitlines() if ln.startswith("SUMMARY ")][0][len("SUMMARY "):])
    assert S == json.loads((out / "summary.json").read_text())
    assert S["continues_pattern"] and S["top5_same_pattern"] >= 0.6, S


@pytest.mark.slow
def test_hf_adamw_kernel_machine_example_quick(tmp_path):
    """examples/hf_adamw_kernel_machine.py --quick: a float64 GPT-2 fine-tuned by transformers.Trainer with its
    defaults (AdamW, clipping at 1.0, linear warm-up) and accumulation 2 over sequences with different numbers of
    target tokens is rebuilt exactly by the kernel machine; the LoRA machine agrees to 1e-4; the generated
    token's top training sequence is of the prompt's pattern."""
    pytest.importorskip("transformers", reason="needs transformers (pip install 'pkfast[hf]')")
    pytest.importorskip("accelerate", reason="transformers.Trainer needs accelerate")
    out = tmp_path / "hfadam"
    r = subprocess.run([sys.executable, str(ROOT / "examples" / "hf_adamw_kernel_machine.py"), "--quick", "--out",
                        str(out)], env=ENV, cwd=tmp_path, capture_output=True, text=True, timeout=900)
    S = json.loads([ln for ln in r.stdout.splitlines() if ln.startswith("SUMMARY ")][0][len("SUMMARY "):])
    assert r.returncode == 0 and S["ok"], (S.get("checks"), r.stdout[-3000:] + r.stderr[-3000:])
    full = S["full"]
    assert full["rel_error"] < 1e-10 and full["update_residual"] < 1e-10, full
    assert full["clipped_steps"] > 0 and S["trainer"]["gradient_accumulation_steps"] == 2, S["trainer"]
    assert full["topk_patterns"][0] == full["prompt_pattern"], full
    if "lora" in S:
        assert S["lora"]["rel_error"] < 1e-4 and S["lora"]["topk_patterns"][0] == S["lora"]["prompt_pattern"]
