"""pytest-benchmark versions of the speed runs: ``pkfast.gram`` and the torch.func tutorial baseline on each
workload of ``_common.py`` at a small size (one warm-up round, then one timed round).

    pytest benchmarks --benchmark-only -q                 # these and the other benchmark files
    pytest benchmarks/test_bench_gram.py --benchmark-only --benchmark-group-by=group

Each test also checks its result against the other method (relative Frobenius error ≤ 1e-4 in float32); the
other method's result is computed once per workload, untimed. For the full sizes, the floor and the other
baselines, use ``python benchmarks/run.py``.
"""

from __future__ import annotations

import functools

import pytest

pytest.importorskip("sklearn")
pytest.importorskip("pytest_benchmark")

import torch  # noqa: E402

import pkfast  # noqa: E402

import baselines as bl  # noqa: E402
from _common import TOLERANCE_F32, make_workload, rel_fro_error  # noqa: E402

#: workload → (N, T) for the pytest runs: small enough for a busy two-core machine.
CASES = {"a": (128, 2), "b": (128, 2), "c": (32, 1), "d": (128, 2)}


@functools.lru_cache(maxsize=None)
def _workload(key: str):
    n, T = CASES[key]
    return make_workload(key, n, T)


def _pkfast(wl, method: str = "auto") -> torch.Tensor:
    return pkfast.gram(wl.model, wl.traj, wl.X, outputs="trace", rule="left", progress=False, method=method)


@functools.lru_cache(maxsize=None)
def _pkfast_result(key: str) -> torch.Tensor:
    return _pkfast(_workload(key))


@functools.lru_cache(maxsize=None)
def _tutorial_result(key: str) -> torch.Tensor:
    wl = _workload(key)
    return bl.torch_func_tutorial(wl.model, wl.traj, wl.X)


def _info(benchmark, wl) -> None:
    benchmark.group = f"gram {wl.key}: {wl.name}, N={wl.N}, T={wl.T}"
    benchmark.extra_info.update(workload=wl.key, model=wl.name, N=wl.N, T=wl.T, P=wl.P, C=wl.C,
                                threads=torch.get_num_threads())


@pytest.mark.parametrize("method", ["auto", "materialized", "jacobian"])
@pytest.mark.parametrize("key", list(CASES))
def test_pkfast_gram(benchmark, key, method):
    """pkfast.gram with the default route (per-layer factorised/materialised), with every supported layer's
    per-sample gradient materialised from its factors, and with every Jacobian from vmap(jacrev)."""
    wl = _workload(key)
    _info(benchmark, wl)
    benchmark.extra_info["method"] = method
    K = benchmark.pedantic(_pkfast, args=(wl, method), rounds=1, iterations=1, warmup_rounds=1)
    err = rel_fro_error(K, _tutorial_result(key))
    benchmark.extra_info["rel_err_vs_torch_func_tutorial"] = err
    assert K.shape == (wl.N, wl.N)
    assert err <= TOLERANCE_F32, f"pkfast.gram vs torch.func tutorial on workload {key}: relative error {err:.3e}"


@pytest.mark.parametrize("key", list(CASES))
def test_torch_func_tutorial(benchmark, key):
    wl = _workload(key)
    _info(benchmark, wl)
    fn = bl.prepare_torch_func_tutorial(wl.model, wl.traj, wl.X)
    K = benchmark.pedantic(fn, rounds=1, iterations=1, warmup_rounds=1)
    err = rel_fro_error(K, _pkfast_result(key))
    benchmark.extra_info["rel_err_vs_pkfast"] = err
    assert err <= TOLERANCE_F32, f"torch.func tutorial vs pkfast.gram on workload {key}: relative error {err:.3e}"
