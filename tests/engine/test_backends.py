"""Backend selection, and pkfast.gram on the Triton backend (CPU interpreter in CI) against torch and the oracle."""

import logging

import pytest
import torch

import pkfast
from pkfast.engine.accumulate import select_backend
from pkfast.engine.driver import GramJob
from pkfast.reference import gram_reference
from tests._util import rel_err
from tests.models import SmallCNN, mlp, random_trajectory

def _triton_status() -> tuple[bool, str]:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False, "triton is not installed (pip install triton)"
    from pkfast.engine.accumulate.triton_launch import triton_status

    return triton_status()


_TRITON_OK, _TRITON_WHY = _triton_status()
#: Triton runs here: on CUDA, or on CPU under an interpreter that can run the kernel
needs_triton = pytest.mark.skipif(not _TRITON_OK, reason=f"Triton path unavailable: {_TRITON_WHY}")


@needs_triton
@pytest.mark.parametrize("outputs", ["trace", "full"])
@pytest.mark.parametrize("cross", [False, True], ids=["X2=None", "X2"])
@pytest.mark.parametrize("rule", ["left", "trapezoid"])
def test_triton_backend_equals_torch_backend_and_reference(outputs, cross, rule):
    net = mlp(d_in=4, hidden=5, d_out=2)
    traj = random_trajectory(net, steps=2)
    X = torch.randn(11, 4)
    X2 = torch.randn(7, 4) if cross else None
    kw = dict(outputs=outputs, rule=rule, progress=False, memory_budget=6_000, method="jacobian")  # several ragged tiles
    job = GramJob.create(net, traj, X, X2, backend="triton", outputs=outputs, rule=rule, memory_budget=6_000, method="jacobian")
    assert job.backend == "triton" and len(job.tiling.tiles) > 1
    K_triton = job.run(progress=False)
    K_torch = pkfast.gram(net, traj, X, X2, backend="torch", **kw)
    assert rel_err(K_triton, K_torch) < 1e-6
    assert rel_err(K_triton, gram_reference(net, traj, X, X2, outputs=outputs, rule=rule)) < 1e-5


@needs_triton
def test_triton_backend_float64_and_cnn():
    net = SmallCNN()
    traj = random_trajectory(net, steps=1)
    X = torch.randn(6, 1, 6, 6)
    K = pkfast.gram(net, traj, X, backend="triton", dtype=torch.float64, progress=False)
    assert rel_err(K, gram_reference(net, traj, X)) < 1e-10


@needs_triton
@pytest.mark.parametrize("precision,tol", [("tf32", 5e-3), ("bf16", 2e-2)])
def test_reduced_precision_inputs_error_is_bounded(precision, tol):
    net = mlp(d_in=4, hidden=6, d_out=2)
    traj = random_trajectory(net, steps=1)
    X = torch.randn(9, 4)
    K = pkfast.gram(net, traj, X, backend="triton", precision=precision, progress=False)
    err = rel_err(K, gram_reference(net, traj, X))
    assert err < tol


def test_auto_on_cpu_is_torch_and_logs_why(caplog):
    with caplog.at_level(logging.INFO, logger="pkfast"):
        assert select_backend("auto", torch.device("cpu")) == "torch"
    assert "uses torch: the model is on cpu" in caplog.text


def test_explicit_triton_that_cannot_run_raises(monkeypatch):
    import pkfast.engine.accumulate.triton_launch as tl

    monkeypatch.setattr(tl, "triton_status", lambda: (False, "triton is not importable (ImportError: nope)"))
    with pytest.raises(RuntimeError, match=r"backend='triton' cannot run here: triton is not importable"):
        select_backend("triton", torch.device("cpu"))


def test_auto_on_cuda_is_cublas_for_ieee(monkeypatch, caplog):
    """ieee fp32 on CUDA: cuBLAS, which ran 2.6–3.1× faster than the fused kernel on an H200 (docs/gpu.md)."""
    import pkfast.engine.accumulate.triton_launch as tl

    monkeypatch.setattr(tl, "triton_status", lambda: (True, "CUDA device NVIDIA H200"))
    with caplog.at_level(logging.INFO, logger="pkfast"):
        assert select_backend("auto", torch.device("cuda")) == "torch"
    assert "uses torch (cuBLAS) for precision='ieee'" in caplog.text


def test_auto_on_cuda_reduced_precision_is_triton_or_says_why_not(monkeypatch):
    import pkfast.engine.accumulate.triton_launch as tl

    monkeypatch.setattr(tl, "triton_status", lambda: (True, "CUDA device NVIDIA H200"))
    assert select_backend("auto", torch.device("cuda"), precision="bf16") == "triton"
    monkeypatch.setattr(tl, "triton_status", lambda: (False, "triton is not importable"))
    with pytest.raises(RuntimeError, match=r"precision='tf32' needs the Triton backend, which cannot run here: "
                                           r"triton is not importable"):
        select_backend("auto", torch.device("cuda"), precision="tf32")


def test_reduced_precision_needs_triton():
    net = mlp()
    traj = random_trajectory(net, steps=1)
    with pytest.raises(ValueError, match=r"precision='bf16' needs backend='triton'"):
        pkfast.gram(net, traj, torch.randn(3, 5), backend="torch", precision="bf16", progress=False)
    with pytest.raises(ValueError, match=r"precision='tf32' needs the Triton backend on a CUDA device"):
        pkfast.gram(net, traj, torch.randn(3, 5), precision="tf32", progress=False)
    with pytest.raises(ValueError, match=r"precision='bf16' applies to float32"):
        pkfast.gram(net, traj, torch.randn(3, 5), precision="bf16", dtype=torch.float64, progress=False)


@needs_triton
def test_an_interpreter_that_cannot_run_the_kernels_loops_is_reported(monkeypatch):
    """Triton 3.6's interpreter fails on a loop over a runtime int (docs/gpu.md): the status says so up front."""
    import pkfast.engine.accumulate.triton_launch as tl

    if "interpreter" not in tl.triton_status()[1]:
        pytest.skip("a GPU runs the compiled kernel here")
    assert tl._interpreter_loop_failure() == ""  # this interpreter runs the probe kernel
    monkeypatch.setattr(tl, "_interpreter_loop_failure",
                        lambda: "TypeError: only 0-dimensional arrays can be converted to Python scalars")
    ok, why = tl.triton_status()
    assert not ok and "cannot run the kernel's loops (TypeError: only 0-dimensional arrays" in why
