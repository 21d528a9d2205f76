"""Batched capture against the vmap pass (issue 15 §2): ``pkfast.gram`` with factors from batched forward and
backward passes (the default where every parameter has a layer rule) and with the ``vmap(jacrev)`` pass forced,
interleaved, best of ``--rounds``, on the digits workloads of ``methods.py`` and the models of
``architectures.py``.

    python benchmarks/capture_passes.py [--rounds 3] [--n-digits 1024] [--n-arch 128]

Prints seconds per route and vmap/batched (above 1: the batched pass is faster).
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import pkfast  # noqa: E402
from pkfast.engine import capture  # noqa: E402

import architectures as ar  # noqa: E402
from _common import make_workload  # noqa: E402

_init = capture.Capture.__init__


def _vmap_only(self, *a, **k):
    _init(self, *a, **k)
    self.batched = False


def timed(fn, batched: bool) -> float:
    capture.Capture.__init__ = _init if batched else _vmap_only
    try:
        t = time.perf_counter()
        fn()
        return time.perf_counter() - t
    finally:
        capture.Capture.__init__ = _init


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--n-digits", type=int, default=1024)
    p.add_argument("--n-arch", type=int, default=128)
    a = p.parse_args(argv)
    warnings.filterwarnings("ignore", message="There is a performance drop")  # vmap's SDPA fallback
    cases = []
    for key in ("a", "b", "d"):
        w = make_workload(key, a.n_digits, 2)
        cases.append((f"{key} N={a.n_digits} T=2", lambda w=w: pkfast.gram(w.model, w.traj, w.X, progress=False)))
    for k in ar.resnet_kernels(a.n_arch, 16) + ar.gpt_kernels(a.n_arch, 128, 4):
        cases.append((f"{k.name} N={a.n_arch} T=1", ar.run_pkfast(k)))
    for name, fn in cases:
        best = {True: float("inf"), False: float("inf")}
        for b in (True, False):  # warm-up
            timed(fn, b)
        for _ in range(a.rounds):
            for b in (True, False):
                best[b] = min(best[b], timed(fn, b))
        print(f"{name:28s} batched {best[True]:7.2f} s  vmap {best[False]:7.2f} s  "
              f"vmap/batched {best[False] / best[True]:.2f}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
