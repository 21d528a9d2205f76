"""Recording overhead of the training-loop callbacks (issue 18), side by side in one run: the same training with
and without the callback, interleaved, best of ``--repeats``.

    python benchmarks/recording_overhead.py [--steps 60] [--repeats 3]

- ``hf``: tiny GPT-2 (2 layers, n_embd 64, vocab 500, 32 tokens, batch 8; ~0.2 M parameters) under
  ``transformers.Trainer`` (SGD, linear schedule), with ``pkfast.integrations.hf.TrajectoryCallback``.
- ``hf-lora``: the same model with a PEFT LoRA (r = 4 on c_attn): only the adapters are recorded.
- ``lightning``: an MLP 64-256-256-10 on digits-sized inputs under ``lightning.Trainer``, with
  ``pkfast.integrations.lightning.TrajectoryCallback`` recording batch indices.

Reported: seconds per optimizer step without and with the callback, the overhead per step, and the parameters
recorded per step. Needs transformers, accelerate, peft, lightning (``pip install 'pkfast[hf,peft,lightning]'``).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

HERE = Path(__file__).resolve().parent


class _Tokens(torch.utils.data.Dataset):
    def __init__(self, n: int, length: int, vocab: int) -> None:
        self.ids = torch.randint(0, vocab, (n, length), generator=torch.Generator().manual_seed(0))

    def __len__(self):
        return self.ids.shape[0]

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def hf_run(steps: int, record: bool, lora: bool) -> tuple[float, int]:
    import transformers

    from pkfast.integrations.hf import TrajectoryCallback

    cfg = transformers.GPT2Config(n_layer=2, n_embd=64, n_head=2, vocab_size=500, n_positions=32, bos_token_id=0,
                                  eos_token_id=0)
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(cfg)
    if lora:
        import peft

        model = peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn"],
                                                           fan_in_fan_out=True, lora_dropout=0.0))
    d = tempfile.mkdtemp()
    cb = [TrajectoryCallback(d + "/traj")] if record else []
    args = transformers.TrainingArguments(output_dir=d + "/out", max_steps=steps, per_device_train_batch_size=8,
                                          learning_rate=0.05, optim="sgd", report_to=[], use_cpu=True,
                                          save_strategy="no", logging_strategy="no", disable_tqdm=True)
    tr = transformers.Trainer(model=model, args=args, train_dataset=_Tokens(8 * steps, 32, 500), callbacks=cb)
    t = time.perf_counter()
    tr.train()
    sec = time.perf_counter() - t
    return sec / steps, sum(p.numel() for p in model.parameters() if p.requires_grad)


def lightning_run(steps: int, record: bool) -> tuple[float, int]:
    try:
        import lightning.pytorch as pl
    except ImportError:
        import pytorch_lightning as pl

    from pkfast.integrations.lightning import TrajectoryCallback

    X = torch.randn(64 * steps, 64, generator=torch.Generator().manual_seed(0))
    y = torch.randint(0, 10, (64 * steps,))

    class Indexed(torch.utils.data.Dataset):
        def __len__(self):
            return X.shape[0]

        def __getitem__(self, i):
            return {"index": i, "x": X[i], "y": y[i]}

    class Module(pl.LightningModule):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.net = nn.Sequential(nn.Linear(64, 256), nn.Tanh(), nn.Linear(256, 256), nn.Tanh(), nn.Linear(256, 10))

        def training_step(self, batch, i):
            return nn.functional.cross_entropy(self.net(batch["x"]), batch["y"])

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)

    d = tempfile.mkdtemp()
    cb = [TrajectoryCallback(d + "/traj", batch_indices=lambda b: b["index"])] if record else []
    m = Module()
    tr = pl.Trainer(max_steps=steps, callbacks=cb, accelerator="cpu", logger=False, enable_checkpointing=False,
                    enable_progress_bar=False, enable_model_summary=False)
    loader = torch.utils.data.DataLoader(Indexed(), batch_size=64, shuffle=True)
    t = time.perf_counter()
    tr.fit(m, loader)
    sec = time.perf_counter() - t
    return sec / steps, sum(p.numel() for p in m.parameters())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--repeats", type=int, default=3)
    a = ap.parse_args(argv)
    sys.path.insert(0, str(HERE))
    from _common import environment, format_environment, measure_matmul_gflops

    print(format_environment(environment()))
    print(f"floor: matmul {measure_matmul_gflops()['best']:.0f} GFLOP/s")
    runs = {"hf": lambda r: hf_run(a.steps, r, False), "hf-lora": lambda r: hf_run(a.steps, r, True),
            "lightning": lambda r: lightning_run(a.steps, r)}
    print(f"{'loop':10s} {'recorded P':>10s} {'s/step without':>15s} {'s/step with':>12s} {'overhead/step':>14s}")
    for name, run in runs.items():
        best = {False: float("inf"), True: float("inf")}
        for _ in range(a.repeats):
            for rec in (False, True):  # interleaved
                sec, P = run(rec)
                best[rec] = min(best[rec], sec)
        over = best[True] - best[False]
        print(f"{name:10s} {P:10d} {best[False]:15.4f} {best[True]:12.4f} {over * 1e3:10.2f} ms "
              f"({over / best[False] * 100:+.0f}%)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
