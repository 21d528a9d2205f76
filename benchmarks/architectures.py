"""Real-shaped architectures (issues 15 and 28): CIFAR-shaped ResNets and GPT-style language models, pkfast
against the torch.func tutorial and Captum's ``TracInCP``, with a floor measured in the same run.

    python benchmarks/architectures.py [--models resnet,gpt|all|lm-vocab,gpt-bare,resnet-alt] [--n 256] \\
        [--repeat 2] [--width 16] [--methods pkfast,tutorial,captum] [--baseline-memory 0.95] [--csv PATH] [--quick]

Workloads (synthetic data shaped like the real thing; N samples, T = 1 step, float32, eval mode; the models are
in ``arch_models.py``):

``resnet``
    ResNet-18 topology for CIFAR (3×3 stem, BasicBlocks [2, 2, 2, 2], BatchNorm with running statistics,
    global average pool, C = 10) at base width ``--width`` (16: channels 16/32/64/128, P = 0.70 M; 64 is the
    usual 11 M-parameter net, whose tutorial Jacobians would not fit in this machine's memory), on 3×32×32
    images. Kernels: the **trace Gram** (``outputs="trace"``) and the **loss kernel** (cross-entropy on
    random labels).
``gpt``
    A GPT-style LM: token and position embeddings, ``--layers`` (4) causal pre-norm
    ``nn.TransformerEncoderLayer`` blocks of width ``--d`` (128, 4 heads, MLP 4d, GELU), final LayerNorm,
    a Linear head to a 512-token vocabulary; sequences of 128 tokens (Zipf-distributed ids). Kernel: the
    **next-token loss kernel** (``of="loss"``: mean token cross-entropy per sequence, the last position
    ignored).

Issue 28's workloads, written the other ways people write these models:

``lm-vocab``
    ``vocab_head.LM``: Embedding(32,000, d) plus a learned positional bare ``nn.Parameter``, ``--layers``
    ``nn.TransformerEncoderLayer`` blocks (d = ``--d``, 4 heads, MLP 256), LayerNorm and an untied
    ``Linear(d → 32,000)`` head; sequences of 64 tokens. Kernel: the **next-token trace kernel** over the last
    position's V = 32,000 logits, which pkfast computes through the collapsed head (``head="auto"``: d + 1 output
    gradients instead of V). One more pkfast row, the **same network with the head removed** (its trace kernel
    over the C = d hidden outputs; its row shares the kernel's floor, and its ``pkfast_speedup`` is its time over
    the V-output kernel's): issue 28's reference (target: the V-output kernel ≤ 2× its time). The
    tutorial's Jacobians ``[N, V, P]`` do not fit in memory: its row says skipped, with the estimate.
``gpt-bare``
    ``GPTBare``: token Embedding plus a bare positional ``nn.Parameter`` (``pos[:L]``), an
    ``nn.TransformerEncoder`` of post-norm ReLU blocks (d = ``--d``, ``--layers``), untied head to 512 tokens,
    sequences of 128; the **next-token loss kernel** as for ``gpt``.
``resnet-alt``
    ``ResNetAlt``: the CIFAR ResNet-20 layout (three stages of three basic blocks at widths w/2w/4w,
    w = ``--width``) with GroupNorm and a layer-scale bare ``nn.Parameter`` ``gamma`` on each residual branch;
    **trace Gram** (C = 10) and **loss kernel**.

pkfast keeps bare parameters on the batched pass: the printed plan (put it in the log) says "parameters without a
layer rule (pos) by probes where they meet the samples".

Per kernel, in one run and on a quiet machine: ``pkfast.gram`` (default route; the plan is printed), the
torch.func tutorial (``vmap(jacrev)`` + einsum per parameter; for a loss kernel, of the per-sample loss), and
Captum ``TracInCP`` (loss kernels: ``influence`` of the samples on themselves, one checkpoint with the step's
learning rate; minutes per kernel — ``--methods pkfast,tutorial`` leaves it out). Times are the best of
``--repeat`` runs after one warm-up run (pkfast's first, cold call is reported too); a method (or a floor) whose
first run takes over ``--slow`` seconds is timed by one more run only. Errors are relative Frobenius differences
from pkfast's Gram.

**The floor** (measured in the same run): one batched forward with autograd plus the backward passes the
kernel needs — C for a C-output Gram, one for a loss kernel — over the N samples, plus the Gram product
(``N² · C · P`` FLOPs: one triangle of the ``2 N² C P`` of the full product, as a symmetric rank update) at the
matmul throughput measured now (``torch.mm`` of a Jacobian-panel shape). For ``lm-vocab``'s collapsed head the
kernel needs d + 1 output gradients, not V: its floor is one batched forward of the head-removed network and
**d + 1 backward passes** through it (d for the hidden outputs R h, one counted for the head's own output), plus
``N² · (d · P_below + d + 1)`` FLOPs (the d outputs over the P_below parameters below the head — the V × d
embedding counted by the L rows one sequence's gradient can touch, L · d — and the head's own part V (h·h′ + 1)).
Reported as ms per sample per step, with each method's ratio to it.

``--quick``: tiny versions of the issue-28 workloads (N = 8, no Captum), a smoke test
(tests/test_architectures_bench.py).
"""

from __future__ import annotations

import argparse
import copy
import gc
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))

import pkfast  # noqa: E402

import baselines as bl  # noqa: E402
from _common import append_csv, environment, format_environment, measure_matmul_gflops, rel_fro_error, timeit  # noqa: E402
from arch_models import (BasicBlock, GPT, GPTBare, PerSampleLoss, ResNet18, ResNetAlt, class_ce,  # noqa: E402,F401
                         token_ce)
from vocab_head import LM  # noqa: E402

SEED = 0


# ---------------------------------------------------------------------------------------------- workloads
class Kernel:
    """One kernel to compute: what pkfast is asked, and the same thing for the tutorial and Captum.

    ``reference``: another kernel pkfast computes in the same run for comparison (lm-vocab: the head-removed
    network). ``floor``: ``(model, backward passes, product FLOPs)`` when the floor is not the kernel's own
    model with C passes and ``N² C P`` FLOPs (lm-vocab's collapsed head). ``tol``: the relative difference from
    pkfast's Gram above which a baseline's row says DIFFERS."""

    def __init__(self, name: str, model: nn.Module, traj: pkfast.Trajectory, X: torch.Tensor, *,
                 y: torch.Tensor | None = None, loss: Callable | None = None, pack: Callable | None = None,
                 split: Callable | None = None, C: int = 1, reference: Kernel | None = None,
                 floor: tuple[nn.Module, int, float] | None = None, tol: float = 1e-5) -> None:
        self.name, self.model, self.traj, self.X, self.y = name, model, traj, X, y
        self.loss, self.pack, self.split, self.C = loss, pack, split, C
        self.reference, self.floor, self.tol = reference, floor, tol

    @property
    def of_loss(self) -> bool:
        return self.y is not None

    def pkfast_kwargs(self) -> dict[str, Any]:
        return dict(of="loss", loss=nn.CrossEntropyLoss(), y=self.y) if self.of_loss else {}


def _trajectory(model: nn.Module, lr: float = 0.05) -> pkfast.Trajectory:
    """T = 1: the model's weights w_0 and a step of learning rate ``lr`` (w_1 only sets the step count)."""
    w0 = copy.deepcopy(model.state_dict())
    return pkfast.Trajectory.from_checkpoints([w0, w0], lr=lr)


def _image_kernels(prefix: str, net: nn.Module, n: int) -> list[Kernel]:
    """The trace Gram (C = 10) and the loss kernel (cross-entropy on random labels) of ``net`` on N random
    3×32×32 images."""
    g = torch.Generator().manual_seed(SEED)
    X = torch.randn(n, 3, 32, 32, generator=g)
    y = torch.randint(0, 10, (n,), generator=g)
    traj = _trajectory(net)
    pack = lambda x, t: torch.cat([x.flatten(1), t[:, None].to(x.dtype)], 1)  # noqa: E731
    split = lambda xy: (xy[:, :-1].reshape(-1, 3, 32, 32), xy[:, -1].long())  # noqa: E731
    return [Kernel(f"{prefix} trace", net, traj, X, C=10),
            Kernel(f"{prefix} loss", net, traj, X, y=y, loss=class_ce, pack=pack, split=split)]


def _next_token_kernel(name: str, net: nn.Module, n: int, V: int, L: int) -> Kernel:
    """The next-token loss kernel of ``net`` on N Zipf-distributed sequences of L tokens (the last position's
    target ignored)."""
    g = torch.Generator().manual_seed(SEED)
    zipf = 1.0 / torch.arange(1, V + 1, dtype=torch.float64)
    ids = torch.multinomial(zipf / zipf.sum(), n * (L + 1), replacement=True, generator=g).view(n, L + 1)
    X, y = ids[:, :L], ids[:, 1:].clone()
    y[:, -1] = -100  # as if the last position's next token were padding
    traj = _trajectory(net)
    pack = lambda x, t: torch.cat([x, t], 1)  # noqa: E731
    split = lambda xy: (xy[:, :L], xy[:, L:])  # noqa: E731
    return Kernel(name, net, traj, X, y=y, loss=token_ce, pack=pack, split=split)


def resnet_kernels(n: int, width: int) -> list[Kernel]:
    """issue 15: the CIFAR ResNet-18 (BatchNorm with running statistics), trace and loss kernels."""
    torch.manual_seed(SEED)
    net = ResNet18(width).eval()
    with torch.no_grad():  # BatchNorm as after training: running statistics that are not the identity
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 1.5)
    return _image_kernels("resnet", net, n)


def gpt_kernels(n: int, d: int, layers: int) -> list[Kernel]:
    """issue 15: the pre-norm GPT (V = 512, seq 128), next-token loss kernel."""
    torch.manual_seed(SEED)
    return [_next_token_kernel("gpt loss", GPT(512, d, layers).eval(), n, 512, 128)]


def gpt_bare_kernels(n: int, d: int, layers: int, V: int = 512, L: int = 128) -> list[Kernel]:
    """issue 28: ``GPTBare`` (bare positional parameter), next-token loss kernel."""
    torch.manual_seed(SEED)
    return [_next_token_kernel("gpt-bare loss", GPTBare(V, d, layers, 4, L).eval(), n, V, L)]


def resnet_alt_kernels(n: int, width: int, blocks: int = 3) -> list[Kernel]:
    """issue 28: ``ResNetAlt`` (GroupNorm, layer-scale gamma), trace and loss kernels."""
    torch.manual_seed(SEED)
    return _image_kernels("resnet-alt", ResNetAlt(width, 10, blocks).eval(), n)


def lm_vocab_kernels(n: int, d: int, layers: int, V: int = 32000, L: int = 64) -> list[Kernel]:
    """issue 28: the next-token trace kernel over ``vocab_head.LM``'s V logits (collapsed head), with the same
    network's head removed (C = d hidden outputs, the same parameters below the head) as its reference, and the
    floor of the collapsed computation (see the module docstring)."""
    torch.manual_seed(SEED)
    net = LM(V, d, layers, L).eval()
    hidden = copy.copy(net)
    hidden._modules = dict(net._modules)
    hidden.head = None  # the same network, head removed (shares every other parameter)
    X = torch.randint(0, V, (n, L), generator=torch.Generator().manual_seed(SEED))
    traj = _trajectory(net)
    w0 = {k: v for k, v in traj.point(0).items() if not k.startswith("head.")}
    ref = Kernel(f"pkfast head removed (C={d})", hidden, pkfast.Trajectory.from_checkpoints([w0, w0], lr=0.05),
                 X, C=d)
    # the parameters below the head, the embedding counted by the L rows one sequence's gradient can touch
    P_below = sum(p.numel() for p in hidden.parameters() if p.requires_grad) - (V - L) * d
    # tol: the tutorial's float32 einsum over the head's Jacobian rows [V, V·d] is off by ~3e-7·V from a float64
    # reference (1.9e-5 at V = 100, 1.6e-4 at V = 500; pkfast's collapsed head 1.2e-7)
    return [Kernel("lm-vocab trace", net, traj, X, C=V, reference=ref, tol=1e-3,
                   floor=(hidden, d + 1, float(n) * n * (d * P_below + d + 1)))]


# ---------------------------------------------------------------------------------------------- methods
def floor_passes(k: Kernel) -> Callable[[], None]:
    """One batched forward with autograd and the kernel's backward passes (C, or one for a loss; lm-vocab: d + 1
    through the head-removed network, the (d+1)-th again over one of its d outputs)."""
    model, passes = (k.model, None) if k.floor is None else k.floor[:2]
    params = [p for p in model.parameters() if p.requires_grad]

    def run() -> None:
        out = model(k.X)
        if k.of_loss:
            torch.autograd.grad(k.loss(out, k.y).sum(), params)
            return
        f = out.reshape(out.shape[0], -1)
        n_pass = f.shape[1] if passes is None else passes
        for c in range(n_pass):
            torch.autograd.grad(f[:, c % f.shape[1]].sum(), params, retain_graph=c < n_pass - 1)
    return run


def run_pkfast(k: Kernel) -> Callable[[], torch.Tensor]:
    return lambda: pkfast.gram(k.model, k.traj, k.X, progress=False, **k.pkfast_kwargs())


def run_tutorial(k: Kernel) -> Callable[[], torch.Tensor]:
    if not k.of_loss:
        return bl.prepare_torch_func_tutorial(k.model, k.traj, k.X)
    wrapped = PerSampleLoss(k.model, k.loss, k.split)
    w0 = {f"model.{n}": t for n, t in k.traj.point(0).items()}  # the same weights, under the wrapper's names
    traj = pkfast.Trajectory.from_checkpoints([w0, w0], lr=float(k.traj.step_sizes[0]))
    return bl.prepare_torch_func_tutorial(wrapped, traj, k.pack(k.X, k.y))


def run_captum(k: Kernel) -> Callable[[], torch.Tensor]:
    """Captum ``TracInCP`` scores of the samples on themselves: Σ_checkpoints lr · ∇ℓ(x_a) · ∇ℓ(x_b)."""
    if not k.of_loss:
        raise bl.Skipped("— (TracInCP computes loss kernels only)")
    try:
        from captum.influence import TracInCP
    except ImportError:
        raise bl.Skipped("skipped (pip install captum)") from None
    from torch.utils.data import DataLoader, TensorDataset

    lr = float(k.traj.step_sizes[0])
    tmp = tempfile.mkdtemp(prefix="pkfast-captum-")
    path = str(Path(tmp) / "w0.pt")
    torch.save({n: t for n, t in k.traj.point(0).items()}, path)
    model = copy.deepcopy(k.model)

    def load(m: nn.Module, p: str) -> float:
        m.load_state_dict(torch.load(p, weights_only=True), strict=False)
        return lr

    loader = DataLoader(TensorDataset(k.X, k.y), batch_size=64, shuffle=False)

    def run() -> torch.Tensor:
        tracin = TracInCP(model, loader, checkpoints=[path], checkpoints_load_func=load, loss_fn=k.loss,
                          batch_size=64, sample_wise_grads_per_batch=False)
        # test batches of 64 as well: one batch of all N exhausts 24 GiB on the ResNet at N = 256
        return torch.cat([tracin.influence((k.X[a:a + 64], k.y[a:a + 64]), show_progress=False)
                          for a in range(0, k.X.shape[0], 64)])
    return run


#: the CSV's leading columns, in order (the environment's follow)
FIELDS = ["kernel", "method", "N", "T", "C", "P", "seconds", "cold_seconds", "ms_per_sample_step", "floor_seconds",
          "floor_ms_per_sample_step", "x_floor", "passes_seconds", "product_seconds", "gflops", "rel_err_vs_pkfast",
          "pkfast_speedup", "status"]

METHODS = {"pkfast": run_pkfast, "torch.func tutorial": run_tutorial, "captum TracInCP": run_captum}


# ---------------------------------------------------------------------------------------------- the run
def _measure_floor(k: Kernel, repeat: int, gflops: float, slow: float) -> dict[str, float]:
    """The kernel's floor, measured now: its passes (best of ``repeat`` after a warm-up run, or of one if that
    took over ``slow`` seconds) plus its Gram product at ``gflops``."""
    N = k.X.shape[0]
    C = 1 if k.of_loss else k.C
    P = sum(p.numel() for p in k.model.parameters() if p.requires_grad)
    passes = floor_passes(k)
    t0 = time.perf_counter()
    passes()
    t_pass = timeit(passes, repeat=1 if time.perf_counter() - t0 > slow else repeat, warmup=0).best
    t_prod = (float(N) * N * C * P if k.floor is None else k.floor[2]) / (gflops * 1e9)
    floor = t_pass + t_prod
    what = "" if k.floor is None else f" ({k.floor[1]} backward passes: the collapsed head's d + 1)"
    print(f"floor: passes {t_pass:.2f} s{what} + Gram product {t_prod:.2f} s at {gflops:.0f} GFLOP/s = {floor:.2f} s")
    return {"floor_seconds": floor, "floor_ms_per_sample_step": 1e3 * floor / N, "passes_seconds": t_pass,
            "product_seconds": t_prod, "gflops": gflops}


def _time_method(k: Kernel, name: str, fn: Callable[[], torch.Tensor], repeat: int, slow: float,
                 floor: dict[str, float]) -> tuple[dict[str, Any], torch.Tensor]:
    """Time ``fn`` (one warm-up run, then the best of ``repeat``, or of one if the warm-up took over ``slow``
    seconds); its CSV row and its Gram."""
    N, T = k.X.shape[0], 1
    t0 = time.perf_counter()
    first = fn()  # the warm-up run (for pkfast: its cold first call)
    cold = time.perf_counter() - t0
    del first
    t = timeit(fn, repeat=1 if cold > slow else repeat, warmup=0)
    best, K = t.best, t.result.detach().float().cpu()
    del t
    row = {"kernel": k.name, "method": name, "N": N, "T": T, "C": 1 if k.of_loss else k.C,
           "P": sum(p.numel() for p in k.model.parameters() if p.requires_grad), "seconds": best,
           "cold_seconds": cold, "ms_per_sample_step": 1e3 * best / (N * T), **floor,
           "x_floor": best / floor["floor_seconds"]}
    print(f"{name:>20}: {best:8.2f} s (first call {cold:.2f} s)  {row['ms_per_sample_step']:7.2f} ms/sample/step"
          f"  {row['x_floor']:5.2f}× floor")
    return row, K


def bench_kernel(k: Kernel, repeat: int, gflops: float, slow: float) -> list[dict[str, Any]]:
    """One kernel: its plan, its floor, every method in :data:`METHODS` (and pkfast on ``k.reference``), the
    methods' differences from pkfast's Gram and their times relative to pkfast's."""
    C = 1 if k.of_loss else k.C
    print(f"\n== {k.name}: N={k.X.shape[0]}, T=1, C={C}, P={sum(p.numel() for p in k.model.parameters()):,}")
    print(pkfast.plan(k.model, k.traj, k.X, **k.pkfast_kwargs()))
    floor = _measure_floor(k, repeat, gflops, slow)
    rows, results = [], {}
    for name, make in METHODS.items():
        gc.collect()
        try:
            fn = make(k)
        except bl.Skipped as e:
            print(f"{name:>20}: {e}")
            rows.append({"kernel": k.name, "method": name, "status": str(e)})
            continue
        row, results[name] = _time_method(k, name, fn, repeat, slow, floor)
        rows.append(row)
    ref = results.get("pkfast")
    for r in rows:
        if r["method"] in results and ref is not None:
            r["rel_err_vs_pkfast"] = err = rel_fro_error(results[r["method"]], ref)
            r["status"] = "ok" if err <= k.tol else "DIFFERS"
            print(f"{r['method']:>20}: relative Frobenius difference from pkfast's Gram {err:.1e}"
                  f"{'' if err <= k.tol else f' DIFFERS (> {k.tol:g})'}")
    if k.reference is not None and "pkfast" in METHODS:
        rk = k.reference
        print(f"-- the reference, {rk.name}: P={sum(p.numel() for p in rk.model.parameters()):,}")
        print(pkfast.plan(rk.model, rk.traj, rk.X))
        row, _ = _time_method(rk, rk.name, run_pkfast(rk), repeat, slow, floor)
        rows.append({**row, "kernel": k.name, "status": "reference (another kernel: the head-removed network's)"})
    base = next((r for r in rows if r["method"] == "pkfast" and "seconds" in r), None)
    if base:
        for r in rows:
            if "seconds" in r and r is not base:
                r["pkfast_speedup"] = r["seconds"] / base["seconds"]
                print(f"{'':>20}  {r['method']} takes {r['pkfast_speedup']:.2f}× pkfast's time")
    if base and k.reference is not None and "pkfast" in METHODS:
        print(f"{'':>20}  the V = {k.C:,} kernel costs {1 / rows[-1]['pkfast_speedup']:.2f}× the head-removed "
              "network's (issue 28's target ≤ 2×)")
    return rows


#: short names ``--methods`` accepts for the baselines
ALIASES = {"tutorial": "torch.func tutorial", "captum": "captum TracInCP"}

#: ``--quick``: tiny issue-28 workloads for the smoke test (N = 8; well under a minute)
QUICK = dict(n=8, repeat=1, width=4, d=16, layers=2, models="lm-vocab,gpt-bare,resnet-alt", methods="pkfast,tutorial")


def make_kernels(models: str, a: argparse.Namespace) -> list[Kernel]:
    """The kernels of the ``--models`` named (``all``: every workload), at ``a``'s sizes."""
    small = a.quick  # the quick run's vocabularies, sequences and depths
    makers = {
        "resnet": lambda: resnet_kernels(a.n, a.width),
        "gpt": lambda: gpt_kernels(a.n, a.d, a.layers),
        "lm-vocab": lambda: lm_vocab_kernels(a.n, a.d, a.layers, *((100, 8) if small else (32000, 64))),
        "gpt-bare": lambda: gpt_bare_kernels(a.n, a.d, a.layers, *((64, 16) if small else (512, 128))),
        "resnet-alt": lambda: resnet_alt_kernels(a.n, a.width, 1 if small else 3),
    }
    names = list(makers) if models == "all" else models.split(",")
    unknown = [m for m in names if m not in makers]
    if unknown:
        raise SystemExit(f"architectures.py: unknown --models {', '.join(unknown)} (choose from {', '.join(makers)} "
                         "or all)")
    return [k for m in names for k in makers[m]()]


def _select_methods(spec: str) -> None:
    """Keep the :data:`METHODS` named in ``spec`` (full names or :data:`ALIASES`)."""
    want = {ALIASES.get(m.strip(), m.strip()) for m in spec.split(",")}
    unknown = want - set(METHODS)
    if unknown:
        raise SystemExit(f"architectures.py: unknown --methods {', '.join(sorted(unknown))} (choose from "
                         f"{', '.join(METHODS)}, or {', '.join(ALIASES)})")
    for m in list(METHODS):
        if m not in want:
            METHODS.pop(m)


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; exit status 1 if a baseline's Gram differs from pkfast's."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="resnet,gpt",
                   help="resnet, gpt, lm-vocab, gpt-bare, resnet-alt (comma-separated) or all (default resnet,gpt)")
    p.add_argument("--n", type=int, default=256)
    p.add_argument("--repeat", type=int, default=2)
    p.add_argument("--width", type=int, default=16, help="ResNet base width (default 16)")
    p.add_argument("--d", type=int, default=128, help="GPT width (default 128)")
    p.add_argument("--layers", type=int, default=4, help="GPT blocks (default 4)")
    p.add_argument("--methods", default=",".join(METHODS),
                   help="pkfast, 'torch.func tutorial' (tutorial), 'captum TracInCP' (captum); default all three")
    p.add_argument("--slow", type=float, default=20.0,
                   help="a method whose first run takes longer is timed by one more run only (default 20 s)")
    p.add_argument("--csv", default=None, help="default results/architectures_cpu.csv (--quick: a temporary file)")
    p.add_argument("--baseline-memory", type=float, default=bl.MEMORY_FRACTION,
                   help="share of the available memory a baseline's estimated need may take (default 0.9; the "
                        "ResNet-18 tutorial at N = 256 needs 0.95 on a 24 GiB machine)")
    p.add_argument("--quick", action="store_true", help=f"smoke test: {QUICK} (overrides those options)")
    a = p.parse_args(argv)
    if a.quick:
        vars(a).update(QUICK)
        torch.set_num_threads(1)  # tiny ops: a second thread only waits on a shared machine
    csv = a.csv or (str(Path(tempfile.gettempdir()) / "architectures_quick.csv") if a.quick else
                    str(Path(__file__).resolve().parent / "results" / "architectures_cpu.csv"))
    bl.MEMORY_FRACTION = a.baseline_memory
    _select_methods(a.methods)
    kernels = make_kernels(a.models, a)
    env = environment()
    print(format_environment(env))
    rows = []
    for k in kernels:
        C = 1 if k.of_loss else k.C
        P = sum(q.numel() for q in k.model.parameters())
        shapes = ((256, 1024, 256),) if a.quick else ((2048, 8192, 2048),)
        gflops = measure_matmul_gflops(shapes, gram_shape=(a.n, min(C * P, 2_000_000)))["best"]
        rows += [{**r, **env} for r in bench_kernel(k, a.repeat, gflops, a.slow)]
    order = list(dict.fromkeys(FIELDS + [k for r in rows for k in r]))  # one column order for every run
    append_csv(csv, [{k: r.get(k, "") for k in order} for r in rows])
    print(f"\nrows appended to {csv}")
    return 1 if any(r.get("status") == "DIFFERS" for r in rows) else 0


if __name__ == "__main__":
    raise SystemExit(main())
