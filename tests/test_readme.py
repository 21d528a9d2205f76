"""The README's Python snippets, run in order as one script (they continue one another), in a scratch directory."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"


def test_readme_snippets_run(tmp_path):
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(encoding="utf-8"), re.S)
    assert len(blocks) >= 8  # the API walk-through, the routes, the kernel machine, storage, correctness
    script = tmp_path / "readme.py"
    script.write_text("\n".join(blocks), encoding="utf-8")
    env = {**os.environ, "PYTHONPATH": str(README.parent)}
    r = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "float64" in r.stdout and "sketch error" in r.stdout  # the last snippets ran and printed
    _check_figures(r.stdout)


def _check_figures(out: str) -> None:
    """The numbers the README's comments quote are the ones its snippets print (this test is the named run)."""
    err = float(re.search(r"sketch error ([\d.]+)", out).group(1))
    assert abs(err - 0.138) < 0.02  # the figure quoted beside it (seeded; BLAS rounding may move the last digit)
    assert float(re.search(r"lightning machine error (\S+)", out).group(1)) < 1e-7
    float64, float32 = map(float, re.search(r"float64 (\S+), float32 (\S+)", out).groups())
    assert float64 < 1e-12 and float32 < 1e-5
    assert float(re.search(r"kernel machine error (\S+)", out).group(1)) < 1e-6
    assert float(re.search(r"adamw machine error (\S+)", out).group(1)) < 1e-14
    assert float(re.search(r"adamw update residual (\S+)", out).group(1)) < 1e-13
