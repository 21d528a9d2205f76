"""Overhead of :class:`pkfast.TrajectoryRecorder` next to the training step it records.

Trains an MLP 64-256-256-10 (tanh) on scikit-learn's digits (standardised) with SGD (lr 0.05, batch 64,
cross-entropy) twice per repeat — once without recording, once recording every step to a temporary
directory — and reports the median wall time per step of both, their ratio, and the bytes written per step.
The two modes are interleaved (and their order alternates between repeats) so that drift in machine load
affects both alike. Both runs use the same initial weights and the same mini-batches.

Run as a script (prints a table)::

    python benchmarks/bench_recorder.py [--steps 300] [--repeats 5] [--threads N]

or through pytest-benchmark::

    pytest benchmarks/bench_recorder.py --benchmark-only

The pytest variant runs 100 steps x 5 rounds with one torch thread: on a small, shared machine a second
intra-op thread that gets descheduled makes a step of this tiny model wait for a time slice (runs 50x
slower than usual were seen), which swamps what is being measured. The script uses torch's default thread
count unless ``--threads`` is given; on a loaded machine read its median, not its max.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from pkfast import Trajectory, TrajectoryRecorder

from _common import load_digits_data as load_data  # noqa: E402  (benchmarks/ is on sys.path)

LR = 0.05
BATCH = 64
WIDTHS = (64, 256, 256, 10)


def make_model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    layers: list[torch.nn.Module] = []
    for i, (a, b) in enumerate(zip(WIDTHS[:-1], WIDTHS[1:])):
        layers.append(torch.nn.Linear(a, b))
        if i < len(WIDTHS) - 2:
            layers.append(torch.nn.Tanh())
    return torch.nn.Sequential(*layers)


def make_batches(n: int, steps: int, seed: int = 0) -> list[torch.Tensor]:
    """Mini-batch indices for ``steps`` steps: shuffled epochs, cut into batches of ``BATCH``."""
    g = torch.Generator().manual_seed(seed)
    out: list[torch.Tensor] = []
    while len(out) < steps:
        perm = torch.randperm(n, generator=g)
        out.extend(perm[i : i + BATCH] for i in range(0, n - BATCH + 1, BATCH))
    return out[:steps]


def _dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.iterdir() if p.is_file())


def train(X, y, batches, record_to: Path | None = None) -> dict:
    """One training run; wall time covers the whole loop (and, when recording, the recorder's set-up and close)."""
    net = make_model(0)
    opt = torch.optim.SGD(net.parameters(), lr=LR)
    t0 = time.perf_counter()
    rec = TrajectoryRecorder(net, opt, record_to) if record_to is not None else None
    for idx in batches:
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(net(X[idx]), y[idx])
        loss.backward()
        opt.step()
        if rec is not None:
            rec.step(batch_indices=idx)
    if rec is not None:
        rec.close()
    seconds = time.perf_counter() - t0
    out = {"seconds": seconds, "per_step": seconds / len(batches), "loss": float(loss.detach())}
    if record_to is not None:
        P = sum(p.numel() for p in net.parameters())
        total = _dir_bytes(record_to)
        step_bytes = (record_to / "weights.bin").stat().st_size - P * 4 + (record_to / "steps.jsonl").stat().st_size
        out.update(total_bytes=total, bytes_per_step=step_bytes / len(batches), num_params=P)
    return out


def measure(steps: int = 300, repeats: int = 5, warmup_steps: int = 20, tmp_root: str | None = None) -> dict:
    """Interleaved repeats of training without / with the recorder; medians per step and the ratio."""
    X, y = load_data()
    batches = make_batches(X.shape[0], steps)
    tmp = Path(tempfile.mkdtemp(prefix="pkfast-bench-", dir=tmp_root))
    try:
        # warm-up (allocator, autograd, page cache for the temporary directory)
        train(X, y, batches[:warmup_steps])
        train(X, y, batches[:warmup_steps], tmp / "warmup")
        shutil.rmtree(tmp / "warmup")

        plain, recorded = [], []
        for r in range(repeats):
            order = ("plain", "rec") if r % 2 == 0 else ("rec", "plain")
            for mode in order:
                if mode == "plain":
                    plain.append(train(X, y, batches))
                else:
                    d = tmp / f"rec{r}"
                    recorded.append(train(X, y, batches, d))
                    if r == 0:
                        traj = Trajectory.load(d)  # sanity: the recording is complete and readable
                        assert traj.num_steps == steps
                        del traj
                    shutil.rmtree(d)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    # both modes train identically: the final loss must agree bit for bit
    assert len({run["loss"] for run in plain + recorded}) == 1, "recording changed the training run"
    med_plain = statistics.median(run["per_step"] for run in plain)
    med_rec = statistics.median(run["per_step"] for run in recorded)
    return {
        "steps": steps,
        "repeats": repeats,
        "num_params": recorded[0]["num_params"],
        "plain_per_step": [run["per_step"] for run in plain],
        "rec_per_step": [run["per_step"] for run in recorded],
        "median_plain_s": med_plain,
        "median_rec_s": med_rec,
        "ratio": med_rec / med_plain,
        "overhead_s": med_rec - med_plain,
        "bytes_per_step": recorded[0]["bytes_per_step"],
        "total_bytes": recorded[0]["total_bytes"],
        "torch_threads": torch.get_num_threads(),
    }


def format_table(res: dict) -> str:
    ms = 1e3
    lines = [
        f"pkfast TrajectoryRecorder overhead: MLP {'-'.join(map(str, WIDTHS))} (tanh), digits, SGD lr {LR}, "
        f"batch {BATCH}, {res['steps']} steps, {res['repeats']} interleaved repeats, "
        f"P = {res['num_params']:,} float32, torch threads = {res['torch_threads']}",
        f"{'mode':<14}{'median ms/step':>16}{'min ms/step':>14}{'max ms/step':>14}",
        f"{'no recorder':<14}{res['median_plain_s'] * ms:>16.3f}{min(res['plain_per_step']) * ms:>14.3f}"
        f"{max(res['plain_per_step']) * ms:>14.3f}",
        f"{'recorder':<14}{res['median_rec_s'] * ms:>16.3f}{min(res['rec_per_step']) * ms:>14.3f}"
        f"{max(res['rec_per_step']) * ms:>14.3f}",
        f"overhead ratio (median recorder / median no recorder): {res['ratio']:.3f}x "
        f"({res['overhead_s'] * ms:+.3f} ms/step)",
        f"bytes written per step: {res['bytes_per_step']:,.0f} (weight row {res['num_params'] * 4:,} + step line "
        f"{res['bytes_per_step'] - res['num_params'] * 4:,.0f}); whole recording {res['total_bytes']:,} bytes",
    ]
    return "\n".join(lines)


# ---------------------------------------------------------------------- pytest-benchmark
def test_recorder_overhead(benchmark, tmp_path):
    """Times the recorded training run with pytest-benchmark; the unrecorded run is timed in each round's
    set-up (interleaved), and the ratio and bytes per step go to ``extra_info``."""
    import pytest

    pytest.importorskip("sklearn")
    steps, rounds = 100, 5
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        _run_benchmark(benchmark, tmp_path, steps, rounds)
    finally:
        torch.set_num_threads(threads)


def _run_benchmark(benchmark, tmp_path, steps: int, rounds: int) -> None:
    X, y = load_data()
    batches = make_batches(X.shape[0], steps)
    train(X, y, batches[:20])  # warm-up
    train(X, y, batches[:20], tmp_path / "warmup")
    shutil.rmtree(tmp_path / "warmup")
    plain: list[float] = []
    recorded: list[dict] = []
    dirs: list[Path] = []

    def setup():
        # the previous round's recording: checked once, then deleted (as the script does) so that the
        # page cache does not fill with dirty pages whose write-back slows later rounds
        if dirs:
            if len(dirs) == 1:
                traj = Trajectory.load(dirs[0])
                assert traj.num_steps == steps
                assert traj.num_params == recorded[0]["num_params"]
                del traj
            shutil.rmtree(dirs[-1])
        plain.append(train(X, y, batches)["per_step"])  # interleaved, untimed by pytest-benchmark
        dirs.append(tmp_path / f"rec{len(dirs)}")
        return (dirs[-1],), {}

    def run(d):
        recorded.append(train(X, y, batches, d))

    benchmark.pedantic(run, setup=setup, rounds=rounds, iterations=1, warmup_rounds=0)

    assert len(recorded) == rounds == len(plain)
    assert Trajectory.load(dirs[-1]).num_steps == steps
    shutil.rmtree(dirs[-1])
    P = recorded[0]["num_params"]
    assert recorded[0]["bytes_per_step"] > P * 4  # a weight row and a step line per step
    med_plain = statistics.median(plain)
    med_rec = statistics.median(r["per_step"] for r in recorded)
    benchmark.extra_info.update(
        steps=steps,
        num_params=P,
        median_ms_per_step_no_recorder=med_plain * 1e3,
        median_ms_per_step_recorder=med_rec * 1e3,
        overhead_ratio=med_rec / med_plain,
        bytes_per_step=recorded[0]["bytes_per_step"],
        torch_threads=torch.get_num_threads(),
    )
    assert med_rec > 0 and med_plain > 0


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    ap.add_argument("--tmp", default=os.environ.get("PKFAST_BENCH_TMP"), help="parent of the temporary directory")
    args = ap.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    print(format_table(measure(args.steps, args.repeats, tmp_root=args.tmp)))


if __name__ == "__main__":
    main()
