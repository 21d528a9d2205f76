"""Shared pieces of the pkfast speed runs: workloads, the hardware floor, timing, environment and CSV output.

Workloads (one factory each, fixed seeds; each returns a :class:`Workload` with the model in eval mode, a
trajectory of ``T`` steps recorded by training the model with plain SGD for ``T`` mini-batch steps, and the
Gram inputs ``X`` as float32):

``a``  MLP 64-256-256-10 (tanh) on scikit-learn's digits (standardised), P = 85,002, C = 10.
``b``  small CNN on the digits as 1×8×8 images: Conv2d(1,16,3,pad 1)-tanh-Conv2d(16,32,3,stride 2,pad 1)-tanh-
       flatten-Linear(512,10), P = 9,930, C = 10.
``c``  wide synthetic MLP 64-1024-1024-10 (tanh) on standard-normal inputs with random labels, P = 1,126,410,
       C = 10: the Gram product dominates.

The floor (:func:`floor_seconds`) is what no implementation that materialises per-sample Jacobians can beat
on this machine: the Gram's FLOPs at the best fp32 matmul throughput measured in the same run
(:func:`measure_matmul_gflops`) plus the time of the per-sample Jacobians alone, computed once per sample and
step with pkfast's own Jacobian code (:func:`jacobian_time`).
"""

from __future__ import annotations

import csv
import datetime
import os
import platform
import socket
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

import pkfast
from pkfast.engine.resources.alloc import reuse_freed_memory
from pkfast.engine.driver import GramJob
from pkfast.engine.quadrature import EvalPoint

RESULTS_DIR = Path(__file__).resolve().parent / "results"

#: Largest relative Frobenius error between a baseline and pkfast accepted in float32.
TOLERANCE_F32 = 1e-4

SEED = 0
LR = 0.05
BATCH = 64

#: The sizes of the issue ("full") and quick ones for a busy laptop ("small"): workload → [(N, T), ...].
SIZES: dict[str, dict[str, list[tuple[int, int]]]] = {
    "full": {
        "a": [(512, 1), (512, 8), (1797, 1), (1797, 8)],
        "b": [(512, 1), (512, 8)],
        "c": [(512, 1)],
    },
    "small": {
        "a": [(256, 1), (128, 2)],
        "b": [(128, 2)],
        "c": [(64, 1)],
    },
}


# ---------------------------------------------------------------------------------------------- workloads
@dataclass
class Workload:
    """One benchmark problem: ``pkfast.gram(model, traj, X)`` with ``outputs="trace"``, ``rule="left"``."""

    key: str
    name: str
    model: nn.Module
    traj: pkfast.Trajectory
    X: torch.Tensor

    @property
    def N(self) -> int:
        return int(self.X.shape[0])

    @property
    def T(self) -> int:
        return self.traj.num_steps

    @property
    def P(self) -> int:
        return sum(p.numel() for p in self.model.parameters() if p.requires_grad)

    @property
    def C(self) -> int:
        with torch.no_grad():
            return int(self.model(self.X[:1].to(self.device)).numel())

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device


def load_digits_data() -> tuple[torch.Tensor, torch.Tensor]:
    """scikit-learn's digits (1797 × 64) as float32, each pixel standardised (constant pixels left at 0)."""
    from sklearn.datasets import load_digits

    X, y = load_digits(return_X_y=True)
    X = torch.tensor(X, dtype=torch.float32)
    std = X.std(0)
    X = (X - X.mean(0)) / torch.where(std > 0, std, torch.ones_like(std))
    return X, torch.tensor(y, dtype=torch.int64)


def mlp(widths: Sequence[int]) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(widths[:-1], widths[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(widths) - 2:
            layers.append(nn.Tanh())
    return nn.Sequential(*layers)


def digits_cnn() -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1), nn.Tanh(),
        nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.Tanh(),
        nn.Flatten(), nn.Linear(32 * 4 * 4, 10),
    )


def sgd_trajectory(model: nn.Module, X_train: torch.Tensor, y_train: torch.Tensor, steps: int, *,
                   lr: float = LR, batch: int = BATCH, seed: int = SEED) -> pkfast.Trajectory:
    """Train ``model`` for ``steps`` SGD steps (cross-entropy, mini-batches of ``batch``) and return the
    trajectory of its ``steps + 1`` state_dicts, each step weighted by ``lr``. ``model`` ends at w_0 again."""
    g = torch.Generator().manual_seed(seed)
    start = {k: v.detach().clone() for k, v in model.state_dict().items()}
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    points = [start]
    model.train()
    for _ in range(steps):
        idx = torch.randperm(X_train.shape[0], generator=g)[:batch]
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(X_train[idx]), y_train[idx]).backward()
        opt.step()
        points.append({k: v.detach().clone() for k, v in model.state_dict().items()})
    model.load_state_dict(start)
    model.eval()
    return pkfast.Trajectory.from_checkpoints(points, lr=lr)


def _subset(n: int, total: int, seed: int) -> torch.Tensor:
    if not 1 <= n <= total:
        raise ValueError(f"benchmarks: N must be in [1, {total}] for this workload; found N={n}")
    return torch.randperm(total, generator=torch.Generator().manual_seed(seed + 1))[:n].sort().values


def workload_mlp_digits(n: int = 512, steps: int = 1, *, device: str | torch.device = "cpu",
                        seed: int = SEED) -> Workload:
    """(a) MLP 64-256-256-10 (tanh) on the digits; X is ``n`` of the 1797 digits (all of them for 1797)."""
    X, y = load_digits_data()
    torch.manual_seed(seed)
    model = mlp((64, 256, 256, 10))
    traj = sgd_trajectory(model, X, y, steps, seed=seed)
    return Workload("a", "mlp 64-256-256-10 digits", model.to(device).eval(), traj, X[_subset(n, X.shape[0], seed)])


def workload_cnn_digits(n: int = 512, steps: int = 1, *, device: str | torch.device = "cpu",
                        seed: int = SEED) -> Workload:
    """(b) the small CNN on the digits as 1×8×8 images."""
    X, y = load_digits_data()
    X = X.view(-1, 1, 8, 8)
    torch.manual_seed(seed)
    model = digits_cnn()
    traj = sgd_trajectory(model, X, y, steps, seed=seed)
    return Workload("b", "cnn 16c-32c/2-fc10 digits", model.to(device).eval(), traj, X[_subset(n, X.shape[0], seed)])


def workload_wide_mlp(n: int = 512, steps: int = 1, *, device: str | torch.device = "cpu", seed: int = SEED,
                      width: int = 1024) -> Workload:
    """(c) MLP 64-``width``-``width``-10 (tanh) on standard-normal inputs (trained on 2048 random points with
    random labels); X is ``n`` fresh standard-normal points."""
    g = torch.Generator().manual_seed(seed + 2)
    X_train = torch.randn(2048, 64, generator=g)
    y_train = torch.randint(0, 10, (2048,), generator=g)
    torch.manual_seed(seed)
    model = mlp((64, width, width, 10))
    traj = sgd_trajectory(model, X_train, y_train, steps, seed=seed)
    X = torch.randn(n, 64, generator=g)
    return Workload("c", f"wide mlp 64-{width}-{width}-10 random", model.to(device).eval(), traj, X)


class TinyTransformer(nn.Module):
    """A transformer-style block on the digits read as 8 tokens (rows) of 8 pixels: token embedding + learned
    positions, pre-LayerNorm single-head self-attention (q, k, v, o projections) and a tanh MLP, both residual,
    mean-pooled into a linear head. P = 9,418 (the positions and the LayerNorm affines are parameters of no
    factorisable layer: they take pkfast's Jacobian route)."""

    def __init__(self, d: int = 32, hidden: int = 64, classes: int = 10, tokens: int = 8, width: int = 8) -> None:
        super().__init__()
        self.tokens, self.width, self.d = tokens, width, d
        self.embed = nn.Linear(width, d)
        self.pos = nn.Parameter(0.02 * torch.randn(tokens, d))
        self.ln1 = nn.LayerNorm(d)
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))
        self.ln2 = nn.LayerNorm(d)
        self.fc1 = nn.Linear(d, hidden)
        self.fc2 = nn.Linear(hidden, d)
        self.head = nn.Linear(d, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x.reshape(x.shape[0], self.tokens, self.width)) + self.pos
        a = self.ln1(h)
        att = torch.softmax(self.q(a) @ self.k(a).transpose(-1, -2) / self.d ** 0.5, dim=-1)
        h = h + self.o(att @ self.v(a))
        h = h + self.fc2(torch.tanh(self.fc1(self.ln2(h))))
        return self.head(h.mean(dim=1))


def workload_transformer_digits(n: int = 512, steps: int = 1, *, device: str | torch.device = "cpu",
                                seed: int = SEED) -> Workload:
    """(d) :class:`TinyTransformer` on the digits (8 row tokens of 8 pixels)."""
    X, y = load_digits_data()
    torch.manual_seed(seed)
    model = TinyTransformer()
    traj = sgd_trajectory(model, X, y, steps, seed=seed)
    return Workload("d", "transformer block d32 digits", model.to(device).eval(), traj, X[_subset(n, X.shape[0], seed)])


WORKLOADS: dict[str, Callable[..., Workload]] = {
    "a": workload_mlp_digits,
    "b": workload_cnn_digits,
    "c": workload_wide_mlp,
    "d": workload_transformer_digits,
}


def make_workload(key: str, n: int, steps: int, *, device: str | torch.device = "cpu") -> Workload:
    if key not in WORKLOADS:
        raise ValueError(f"benchmarks: unknown workload {key!r}; expected one of {', '.join(WORKLOADS)}")
    return WORKLOADS[key](n, steps, device=device)


# ---------------------------------------------------------------------------------------------- timing
def sync(device: torch.device | str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class Timing:
    best: float
    median: float
    times: list[float]
    result: Any = None


def timeit(fn: Callable[[], Any], *, repeat: int = 3, warmup: int | Callable[[], Any] = 1,
           device: torch.device | str = "cpu") -> Timing:
    """Run ``fn`` ``warmup`` times untimed (or call the ``warmup`` callable once), then ``repeat`` timed runs
    with :func:`time.perf_counter` (synchronising CUDA around each). Keeps the last result."""
    if callable(warmup):
        warmup()
        sync(device)
    else:
        for _ in range(warmup):
            fn()
            sync(device)
    times, result = [], None
    for _ in range(max(1, repeat)):
        result = None  # free the previous result before the next run
        sync(device)
        t0 = time.perf_counter()
        result = fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return Timing(min(times), statistics.median(times), times, result)


def rel_fro_error(K: torch.Tensor, ref: torch.Tensor) -> float:
    """‖K − ref‖_F / ‖ref‖_F, computed in float64 on the CPU."""
    K = K.detach().to("cpu", torch.float64)
    ref = ref.detach().to("cpu", torch.float64)
    if K.shape != ref.shape:
        raise ValueError(f"benchmarks: shapes differ: {tuple(K.shape)} vs reference {tuple(ref.shape)}")
    return float(torch.linalg.norm(K - ref) / torch.linalg.norm(ref))


# ---------------------------------------------------------------------------------------------- the floor
def measure_matmul_gflops(shapes: Sequence[tuple[int, int, int]] = ((2048, 8192, 2048),), *,
                          gram_shape: tuple[int, int] | None = None, repeat: int = 3,
                          device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> dict[str, float]:
    """The machine's fp32 matmul throughput in GFLOP/s (2·m·k·n / best time of ``repeat`` runs, after one
    warm-up), for each ``(m, k, n)`` in ``shapes`` (``torch.mm([m, k], [k, n])``) and, if ``gram_shape=(n,
    K)`` is given, for the Gram's own product ``torch.mm(A, A.T)`` with ``A`` of shape ``[n, K]`` (``K = C·P``;
    the same call pattern as pkfast's torch accumulation). Returns ``{label: GFLOP/s}`` plus ``"best"``."""
    out: dict[str, float] = {}
    g = torch.Generator(device=device).manual_seed(0)
    for m, k, n in shapes:
        a = torch.randn(m, k, generator=g, device=device, dtype=dtype)
        b = torch.randn(k, n, generator=g, device=device, dtype=dtype)
        t = timeit(lambda: torch.mm(a, b), repeat=repeat, device=device)
        out[f"mm {m}x{k}x{n}"] = 2.0 * m * k * n / t.best / 1e9
        del a, b
    if gram_shape is not None:
        n, K = gram_shape
        A = torch.randn(n, K, generator=g, device=device, dtype=dtype)
        t = timeit(lambda: torch.mm(A, A.T), repeat=repeat, device=device)
        out[f"gram {n}x{K}x{n}"] = 2.0 * n * K * n / t.best / 1e9
        del A
    out["best"] = max(out.values())
    return out


def gram_flops(N: int, M: int | None, C: int, P: int, T: int) -> float:
    """FLOPs of the trace Gram's products over ``T`` steps: ``N²·C·P`` per step for a symmetric Gram (one
    triangle, as SYRK), ``2·N·M·C·P`` per step for a cross Gram (GEMM)."""
    per_step = float(N) * N * C * P if M is None else 2.0 * N * M * C * P
    return per_step * T


def jacobian_time(model: nn.Module, traj: pkfast.Trajectory, X: torch.Tensor, *, repeat: int = 1,
                  warmup: int = 1, memory_budget: int | str | None = None) -> float:
    """Seconds (best of ``repeat``) to compute the per-sample Jacobians of every point of ``X`` once per step
    of ``traj`` (``rule="left"``: w_0 … w_{T-1}) with pkfast's own Jacobian code
    (:meth:`pkfast.engine.functional.FunctionalModel.jacobian`), in panels of the tile plan's row block written into
    one reused buffer — the Jacobian part of the work any exact method must do, without the Gram product."""
    job = GramJob.create(model, traj, X, outputs="trace", rule="left", memory_budget=memory_budget, method="jacobian")
    fm, plan = job.fm, job.tiling
    N, C, P = X.shape[0], job.num_outputs, fm.num_params
    rows = plan.row_block
    buf = torch.empty(rows, C, P, dtype=job.dtype, device=fm.device)
    steps = [s for s, e in enumerate(traj.step_sizes.tolist()) if e != 0.0]

    def run() -> None:
        for s in steps:
            combo = ((EvalPoint(s), 1.0),)
            for a in range(0, N, rows):
                b = min(N, a + rows)
                fm.jacobian(combo, X[a:b], out=buf[: b - a], chunk=plan.chunk)

    with reuse_freed_memory(fm.device.type == "cpu"):  # as pkfast.gram does
        return timeit(run, repeat=repeat, warmup=warmup, device=fm.device).best


def route_jacobian_time(model: nn.Module, traj: pkfast.Trajectory, X: torch.Tensor, *, method: str, repeat: int = 1,
                        warmup: int = 1, memory_budget: int | str | None = None) -> float:
    """Seconds (best of ``repeat``) of ``pkfast.gram(..., method=method)`` with its Jacobian-panel products
    switched off: everything the route does to form its per-sample Jacobians (for ``"materialized"``: the
    pass for the layer factors and the slices of per-sample gradients, in the tile plan of the real call),
    without the Gram's GEMMs. It gives the route's own floor (its Jacobians + the Gram's FLOPs at peak), which
    is lower than :func:`jacobian_time`'s when the route forms its Jacobians faster than ``vmap(jacrev)``."""
    job = GramJob.create(model, traj, X, outputs="trace", rule="left", memory_budget=memory_budget, method=method)
    if job.method == "factorized":
        raise ValueError(f"route_jacobian_time: method={method!r} factorises layers; their products are not Jacobian panels")
    # the panel products (Jacobian and streamed slices) only: the route multiplies through its layout
    object.__setattr__(job.layout, "panel_product", lambda *a, **k: None)

    def run() -> None:
        job.run(progress=False)

    return timeit(run, repeat=repeat, warmup=warmup, device=job.fm.device).best


def floor_seconds(flops: float, gflops: float, jac_seconds: float) -> float:
    """The floor: the Gram's FLOPs at ``gflops`` (the best measured matmul throughput) + the Jacobian time."""
    return flops / (gflops * 1e9) + jac_seconds


# ---------------------------------------------------------------------------------------------- memory
def available_bytes(device: torch.device | str = "cpu") -> int:
    """Free memory on ``device``: ``MemAvailable`` from /proc/meminfo on CPU, ``cudaMemGetInfo`` on CUDA."""
    device = torch.device(device)
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


# ---------------------------------------------------------------------------------------------- environment
def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(device: torch.device | str = "cpu") -> dict[str, Any]:
    """What the numbers depend on: versions, threads, CPU model, GPU name, host, load, git commit."""
    device = torch.device(device)
    env: dict[str, Any] = {
        "timestamp": datetime.datetime.now().isoformat(timespec="seconds"),
        "hostname": socket.gethostname(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "pkfast": pkfast.__version__,
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "cpu_model": cpu_model(),
        "loadavg_1m": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else "",
        "device": str(device),
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else "",
        "git_commit": _git_commit(),
    }
    return env


def _git_commit() -> str:
    """HEAD's commit, read from .git without running git (``-dirty`` is not detected)."""
    git = Path(__file__).resolve().parent.parent / ".git"
    try:
        head = (git / "HEAD").read_text().strip()
        if head.startswith("ref: "):
            ref = head[5:]
            p = git / ref
            if p.exists():
                return p.read_text().strip()[:12]
            packed = git / "packed-refs"
            if packed.exists():
                for line in packed.read_text().splitlines():
                    if line.endswith(" " + ref):
                        return line.split()[0][:12]
            return ""
        return head[:12]
    except OSError:
        return ""


def format_environment(env: dict[str, Any]) -> str:
    gpu = f", GPU {env['gpu']}" if env.get("gpu") else ""
    return (f"host {env['hostname']}, {env['cpu_model']} ({env['cpu_count']} cpus, torch threads {env['threads']}, "
            f"1-min load {env['loadavg_1m']}){gpu}; torch {env['torch']}, pkfast {env['pkfast']}, "
            f"python {env['python']}, commit {env['git_commit'] or '?'}")


# ---------------------------------------------------------------------------------------------- CSV
def append_csv(path: str | os.PathLike, rows: Sequence[dict[str, Any]]) -> Path:
    """Append ``rows`` to the CSV at ``path`` (created with a header if new; parent folders too).

    Raises ``ValueError`` if the file exists with a different header, naming both (write to a new file then).
    """
    path = Path(path)
    if not rows:
        return path
    fields = list(rows[0].keys())
    for r in rows[1:]:
        fields += [k for k in r if k not in fields]
    path.parent.mkdir(parents=True, exist_ok=True)
    new = not path.exists() or path.stat().st_size == 0
    if not new:
        with path.open(newline="") as f:
            header = next(csv.reader(f), [])
        if header != fields:
            raise ValueError(f"benchmarks.append_csv: {path} has columns {header}; these rows have {fields}. "
                             f"Write to another file (--csv PATH)")
    with path.open("a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        if new:
            w.writeheader()
        w.writerows(rows)
    return path
