"""Real-shaped architectures (issue 15 §4): a CIFAR-shaped ResNet-18 and a GPT-style language model, pkfast
against the torch.func tutorial and Captum's ``TracInCP``, with a floor measured in the same run.

    python benchmarks/architectures.py [--models resnet,gpt] [--n 256] [--repeat 2] [--width 16] \\
        [--baseline-memory 0.95] [--csv PATH]

Workloads (synthetic data shaped like the real thing; N samples, T = 1 step, float32, eval mode):

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

Per kernel, in one run and on a quiet machine: ``pkfast.gram`` (default route; the plan is printed), the
torch.func tutorial (``vmap(jacrev)`` + einsum per parameter; for a loss kernel, of the per-sample loss), and
Captum ``TracInCP`` (loss kernels: ``influence`` of the samples on themselves, one checkpoint with the step's
learning rate). Times are the best of ``--repeat`` runs after one warm-up run (pkfast's first, cold call is
reported too); a method whose first run takes over ``--slow`` seconds is timed by one more run only. Errors are relative Frobenius differences from pkfast's Gram.

**The floor** (measured in the same run): one batched forward with autograd plus the backward passes the
kernel needs — C for a C-output Gram, one for a loss kernel — over the N samples, plus the Gram product
(``N² · C · P`` FLOPs: one triangle of the ``2 N² C P`` of the full product, as a symmetric rank update) at the matmul throughput measured
now (``torch.mm`` of a Jacobian-panel shape). Reported as ms per sample per step, with each method's ratio
to it.
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
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))

import pkfast  # noqa: E402

import baselines as bl  # noqa: E402
from _common import append_csv, environment, format_environment, measure_matmul_gflops, rel_fro_error, timeit  # noqa: E402

SEED = 0


# ---------------------------------------------------------------------------------------------- models
class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class ResNet18(nn.Module):
    """ResNet-18 for 32×32 images (the CIFAR variant: 3×3 stem, no max-pool)."""

    def __init__(self, width: int = 16, classes: int = 10) -> None:
        super().__init__()
        w = [width, 2 * width, 4 * width, 8 * width]
        self.conv1 = nn.Conv2d(3, w[0], 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(w[0])
        blocks, cin = [], w[0]
        for i, c in enumerate(w):
            for j in range(2):
                blocks.append(BasicBlock(cin, c, 2 if (j == 0 and i > 0) else 1))
                cin = c
        self.layers = nn.Sequential(*blocks)
        self.fc = nn.Linear(cin, classes)

    def forward(self, x):
        out = self.layers(F.relu(self.bn1(self.conv1(x))))
        return self.fc(F.adaptive_avg_pool2d(out, 1).flatten(1))


class GPT(nn.Module):
    """Token ids [n, L] → next-token logits [n, L, V] (causal pre-norm transformer blocks)."""

    def __init__(self, vocab: int = 512, d: int = 128, layers: int = 4, heads: int = 4, seq: int = 128) -> None:
        super().__init__()
        self.tok, self.pos = nn.Embedding(vocab, d), nn.Embedding(seq, d)
        self.blocks = nn.ModuleList(
            nn.TransformerEncoderLayer(d, heads, 4 * d, dropout=0.0, activation="gelu", batch_first=True,
                                       norm_first=True) for _ in range(layers))
        self.norm, self.head = nn.LayerNorm(d), nn.Linear(d, vocab)

    def forward(self, ids):
        L = ids.shape[1]
        h = self.tok(ids) + self.pos(torch.arange(L, device=ids.device))
        mask = nn.Transformer.generate_square_subsequent_mask(L, dtype=h.dtype, device=h.device)
        for blk in self.blocks:
            h = blk(h, src_mask=mask, is_causal=True)
        return self.head(self.norm(h))


class PerSampleLoss(nn.Module):
    """``model`` followed by its per-sample loss, on inputs that carry the targets (``[x, y]`` packed): what the
    tutorial differentiates for a loss kernel. Output ``[n, 1]``."""

    def __init__(self, model: nn.Module, loss: Callable, split: Callable) -> None:
        super().__init__()
        self.model, self.loss, self.split = model, loss, split

    def forward(self, xy):
        x, y = self.split(xy)
        return self.loss(self.model(x), y).reshape(-1, 1)


def token_ce(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-sequence mean cross-entropy over the counted tokens ([n, L, V] logits, [n, L] targets) → [n]."""
    per_tok = F.cross_entropy(out.transpose(1, 2), y, ignore_index=-100, reduction="none")
    return per_tok.sum(1) / (y != -100).sum(1).clamp_min(1)


def class_ce(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(out, y, reduction="none")


# ---------------------------------------------------------------------------------------------- workloads
class Kernel:
    """One kernel to compute: what pkfast is asked, and the same thing for the tutorial and Captum."""

    def __init__(self, name: str, model: nn.Module, traj: pkfast.Trajectory, X: torch.Tensor, *,
                 y: torch.Tensor | None = None, loss: Callable | None = None, pack: Callable | None = None,
                 split: Callable | None = None, C: int = 1) -> None:
        self.name, self.model, self.traj, self.X, self.y = name, model, traj, X, y
        self.loss, self.pack, self.split, self.C = loss, pack, split, C

    @property
    def of_loss(self) -> bool:
        return self.y is not None

    def pkfast_kwargs(self) -> dict[str, Any]:
        return dict(of="loss", loss=nn.CrossEntropyLoss(), y=self.y) if self.of_loss else {}


def _trajectory(model: nn.Module, lr: float = 0.05) -> pkfast.Trajectory:
    """T = 1: the model's weights w_0 and a step of learning rate ``lr`` (w_1 only sets the step count)."""
    w0 = copy.deepcopy(model.state_dict())
    return pkfast.Trajectory.from_checkpoints([w0, w0], lr=lr)


def resnet_kernels(n: int, width: int) -> list[Kernel]:
    torch.manual_seed(SEED)
    net = ResNet18(width).eval()
    with torch.no_grad():  # BatchNorm as after training: running statistics that are not the identity
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 1.5)
    g = torch.Generator().manual_seed(SEED)
    X = torch.randn(n, 3, 32, 32, generator=g)
    y = torch.randint(0, 10, (n,), generator=g)
    traj = _trajectory(net)
    pack = lambda x, t: torch.cat([x.flatten(1), t[:, None].to(x.dtype)], 1)  # noqa: E731
    split = lambda xy: (xy[:, :-1].reshape(-1, 3, 32, 32), xy[:, -1].long())  # noqa: E731
    return [Kernel("resnet trace", net, traj, X, C=10),
            Kernel("resnet loss", net, traj, X, y=y, loss=class_ce, pack=pack, split=split)]


def gpt_kernels(n: int, d: int, layers: int) -> list[Kernel]:
    torch.manual_seed(SEED)
    V, L = 512, 128
    net = GPT(V, d, layers).eval()
    g = torch.Generator().manual_seed(SEED)
    zipf = 1.0 / torch.arange(1, V + 1, dtype=torch.float64)
    ids = torch.multinomial(zipf / zipf.sum(), n * (L + 1), replacement=True, generator=g).view(n, L + 1)
    X, y = ids[:, :L], ids[:, 1:].clone()
    y[:, -1] = -100  # as if the last position's next token were padding
    traj = _trajectory(net)
    pack = lambda x, t: torch.cat([x, t], 1)  # noqa: E731
    split = lambda xy: (xy[:, :L], xy[:, L:])  # noqa: E731
    return [Kernel("gpt loss", net, traj, X, y=y, loss=token_ce, pack=pack, split=split)]


# ---------------------------------------------------------------------------------------------- methods
def floor_passes(k: Kernel) -> Callable[[], None]:
    """One batched forward with autograd and the kernel's backward passes (C, or one for a loss)."""
    params = [p for p in k.model.parameters() if p.requires_grad]

    def run() -> None:
        out = k.model(k.X)
        if k.of_loss:
            torch.autograd.grad(k.loss(out, k.y).sum(), params)
            return
        f = out.reshape(out.shape[0], -1)
        for c in range(f.shape[1]):
            torch.autograd.grad(f[:, c].sum(), params, retain_graph=c < f.shape[1] - 1)
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
def bench_kernel(k: Kernel, repeat: int, gflops: float, slow: float) -> list[dict[str, Any]]:
    N, T = k.X.shape[0], 1
    P = sum(p.numel() for p in k.model.parameters() if p.requires_grad)
    C = 1 if k.of_loss else k.C
    print(f"\n== {k.name}: N={N}, T={T}, C={C}, P={P:,}")
    print(pkfast.plan(k.model, k.traj, k.X, **k.pkfast_kwargs()))
    t_pass = timeit(floor_passes(k), repeat=repeat, warmup=1).best
    t_prod = float(N) * N * C * P / (gflops * 1e9)
    floor = t_pass + t_prod
    print(f"floor: passes {t_pass:.2f} s + Gram product {t_prod:.2f} s at {gflops:.0f} GFLOP/s = {floor:.2f} s")
    rows, results = [], {}
    for name, make in METHODS.items():
        gc.collect()
        try:
            fn = make(k)
        except bl.Skipped as e:
            print(f"{name:>20}: {e}")
            rows.append({"kernel": k.name, "method": name, "status": str(e)})
            continue
        t0 = time.perf_counter()
        first = fn()  # the warm-up run (for pkfast: its cold first call)
        cold = time.perf_counter() - t0
        del first
        t = timeit(fn, repeat=1 if cold > slow else repeat, warmup=0)
        best, K = t.best, t.result.detach().float().cpu()
        del t
        results[name] = K
        row = {"kernel": k.name, "method": name, "N": N, "T": T, "C": C, "P": P, "seconds": best,
               "cold_seconds": cold, "ms_per_sample_step": 1e3 * best / (N * T),
               "floor_seconds": floor, "floor_ms_per_sample_step": 1e3 * floor / (N * T),
               "x_floor": best / floor, "passes_seconds": t_pass, "product_seconds": t_prod, "gflops": gflops}
        rows.append(row)
        print(f"{name:>20}: {best:8.2f} s (first call {cold:.2f} s)  {row['ms_per_sample_step']:7.2f} ms/sample/step"
              f"  {row['x_floor']:5.2f}× floor")
        del K
    ref = results.get("pkfast")
    for r in rows:
        if r["method"] in results and ref is not None:
            r["rel_err_vs_pkfast"] = err = rel_fro_error(results[r["method"]], ref)
            r["status"] = "ok" if err <= 1e-5 else "DIFFERS"
            print(f"{r['method']:>20}: relative Frobenius difference from pkfast's Gram {err:.1e}"
                  f"{'' if err <= 1e-5 else ' DIFFERS'}")
    base = next((r for r in rows if r["method"] == "pkfast" and "seconds" in r), None)
    if base:
        for r in rows:
            if "seconds" in r and r is not base:
                r["pkfast_speedup"] = r["seconds"] / base["seconds"]
                print(f"{'':>20}  {r['method']} takes {r['pkfast_speedup']:.2f}× pkfast's time")
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="resnet,gpt")
    p.add_argument("--n", type=int, default=256)
    p.add_argument("--repeat", type=int, default=2)
    p.add_argument("--width", type=int, default=16, help="ResNet base width (default 16)")
    p.add_argument("--d", type=int, default=128, help="GPT width (default 128)")
    p.add_argument("--layers", type=int, default=4, help="GPT blocks (default 4)")
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--slow", type=float, default=20.0,
                   help="a method whose first run takes longer is timed by one more run only (default 20 s)")
    p.add_argument("--csv", default=str(Path(__file__).resolve().parent / "results" / "architectures_cpu.csv"))
    p.add_argument("--baseline-memory", type=float, default=bl.MEMORY_FRACTION,
                   help="share of the available memory a baseline's estimated need may take (default 0.9; the "
                        "ResNet-18 tutorial at N = 256 needs 0.95 on a 24 GiB machine)")
    a = p.parse_args(argv)
    bl.MEMORY_FRACTION = a.baseline_memory
    for m in list(METHODS):
        if m not in a.methods.split(","):
            METHODS.pop(m)
    env = environment()
    print(format_environment(env))
    kernels: list[Kernel] = []
    for m in a.models.split(","):
        kernels += resnet_kernels(a.n, a.width) if m == "resnet" else gpt_kernels(a.n, a.d, a.layers)
    rows = []
    for k in kernels:
        C = 1 if k.of_loss else k.C
        P = sum(q.numel() for q in k.model.parameters())
        gflops = measure_matmul_gflops(gram_shape=(a.n, min(C * P, 2_000_000)))["best"]
        rows += [{**r, **env} for r in bench_kernel(k, a.repeat, gflops, a.slow)]
    order = list(dict.fromkeys(FIELDS + [k for r in rows for k in r]))  # one column order for every run
    append_csv(a.csv, [{k: r.get(k, "") for k in order} for r in rows])
    print(f"\nrows appended to {a.csv}")
    return 1 if any(r.get("status") == "DIFFERS" for r in rows) else 0


if __name__ == "__main__":
    raise SystemExit(main())
