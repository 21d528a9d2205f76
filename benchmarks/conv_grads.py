"""Per-sample convolution gradients on the CIFAR ResNet's layers (issue 28, item 3): the patch route
(``F.unfold`` + one batched GEMM, the factors' ``materialize``) against the weight-gradient convolution with the
samples folded into the groups (``ConvRule.per_sample_gradient``), side by side, with the GEMM floor of the same
multiply-adds at the fp32 matmul throughput measured now; then the ResNet's loss (and trace) kernel by
``pkfast.gram`` with the in-panel gradient formed by patches only (before) and by the rule's choice (after).

    python benchmarks/conv_grads.py [--n 4,64] [--C 1,10] [--gram-n 64] [--kernels loss,trace] [--width 16] [--repeat 5] [--threads 2]

Times are the best of ``--repeat`` runs after one warm-up. On a shared machine they are noisy: compare the two
columns of one row, measured back to back.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))

import pkfast  # noqa: E402
from pkfast.layers.base import Layer, materialize  # noqa: E402
from pkfast.layers.conv import ConvRule  # noqa: E402

from _common import measure_matmul_gflops, timeit  # noqa: E402
from architectures import ResNet18, resnet_kernels  # noqa: E402


def conv_shapes(width: int) -> list[tuple[str, nn.Conv2d, tuple[int, ...], tuple[int, ...]]]:
    """(name, module, one sample's input shape, its output shape) of every distinct conv of the ResNet."""
    net, seen, out = ResNet18(width).eval(), set(), []
    hooks = [m.register_forward_hook(lambda m, a, y, name=name: out.append((name, m, tuple(a[0].shape[1:]),
                                                                            tuple(y.shape[1:]))))
             for name, m in net.named_modules() if isinstance(m, nn.Conv2d)]
    net(torch.randn(1, 3, 32, 32))
    for h in hooks:
        h.remove()
    uniq = []
    for name, m, si, so in out:
        key = (m.in_channels, m.out_channels, m.kernel_size, m.stride, si)
        if key not in seen:
            seen.add(key)
            uniq.append((name, m, si, so))
    return uniq


def _layer(m: nn.Conv2d, positions: int) -> Layer:
    rule = ConvRule()
    I, O = rule.fans(m)
    return Layer("m", "conv", "Conv2d", ("m.weight",), m.weight.numel(), module=m, rule=rule, bias=False,
                 groups=m.groups, calls=1, positions=positions, fan_in=I, fan_out=O)


def bench_layers(ns: list[int], Cs: list[int], width: int, repeat: int, gflops: float) -> None:
    print(f"{'layer':<22}{'Cin→Cout k s':<16}{'S':>6}{'n':>4}{'C':>4}{'patches ms':>12}{'conv ms':>10}"
          f"{'floor ms':>10}{'rule':>9}{'  faster':>9}")
    for name, m, si, so in conv_shapes(width):
        S = math.prod(so[1:])
        L = _layer(m, S)
        for n in ns:
            for C in Cs:
                g = torch.Generator().manual_seed(0)
                x = torch.randn(n, *si, generator=g)
                d = torch.randn(n, C, *so, generator=g)
                old = timeit(lambda: materialize(L, L.rule.split(L, *L.rule.unfold(L, x, d, n, C, x.dtype)), n),
                             repeat=repeat).best
                new = timeit(lambda: L.rule._conv_gradient(L, x, d, n, C, x.dtype), repeat=repeat).best
                floor = 2.0 * n * C * S * L.fan_out * L.fan_in / (gflops * 1e9)
                shape = f"{m.in_channels}→{m.out_channels} {m.kernel_size[0]} {m.stride[0]}"
                print(f"{name:<22}{shape:<16}{S:>6}{n:>4}{C:>4}{old * 1e3:>12.3f}{new * 1e3:>10.3f}"
                      f"{floor * 1e3:>10.3f}{L.rule.formation(L, C):>9}"
                      f"{'  conv' if new < old else '  patches':>9}", flush=True)


def bench_gram(n: int, width: int, repeat: int, kernels: str) -> None:
    """pkfast.gram of the ResNet's kernels with the in-panel conv gradients by patches only (before), then by the
    rule (after), the two alternating run by run (a shared machine's load then weighs on both alike); best times."""
    rule_choice = ConvRule.formation
    forms = {"patches (before)": lambda self, L, C: "patches", "rule (after)": rule_choice}
    for k in resnet_kernels(n, width):
        if k.name.split()[-1] not in kernels.split(","):
            continue
        kw = k.pkfast_kwargs()
        times, grams = {lab: [] for lab in forms}, {}
        for r in range(repeat + 1):  # the first round is the warm-up
            for lab, form in forms.items():
                ConvRule.formation = form
                t0 = time.perf_counter()
                grams[lab] = pkfast.gram(k.model, k.traj, k.X, progress=False, **kw)
                if r:
                    times[lab].append(time.perf_counter() - t0)
        ConvRule.formation = rule_choice
        best = {lab: min(v) for lab, v in times.items()}
        a, b = grams.values()
        err = float((a - b).norm() / b.norm())
        print(f"{k.name} N={n}: " + ", ".join(f"{lab} {s:.3f} s" for lab, s in best.items())
              + f"; ×{best['patches (before)'] / best['rule (after)']:.2f}; rel. difference {err:.1e}", flush=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", default="4,64", help="samples per gradient formation (comma-separated)")
    p.add_argument("--C", default="1,10", help="outputs (comma-separated)")
    p.add_argument("--gram-n", type=int, default=64, help="N of the Gram timings (0: skip)")
    p.add_argument("--kernels", default="loss,trace", help="which of the ResNet's Grams to time")
    p.add_argument("--width", type=int, default=16)
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    gf = measure_matmul_gflops(((1024, 1024, 1024),))["best"]
    print(f"fp32 matmul floor: {gf:.1f} GFLOP/s on {torch.get_num_threads()} threads")
    with torch.no_grad():
        bench_layers([int(v) for v in a.n.split(",")], [int(v) for v in a.C.split(",")], a.width, a.repeat, gf)
    if a.gram_n:
        bench_gram(a.gram_n, a.width, max(1, a.repeat // 2), a.kernels)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
