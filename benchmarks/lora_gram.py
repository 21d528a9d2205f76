"""The path kernel of a LoRA fine-tune is cheap (issue 18): the same tiny GPT-2 fine-tuned for T steps in full
and with LoRA, each recorded by the Trainer callback, then ``pkfast.gram`` of N sequences (next-token logits of
the last position, trace over the vocabulary), side by side in one run.

    python benchmarks/lora_gram.py [--steps 10] [--n 32]

GPT-2: 2 layers, n_embd 64, 4 heads, vocab 200, 32 tokens. LoRA: r = 8 on c_attn and c_proj (peft).
Needs transformers, accelerate and peft.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent


class _Tokens(torch.utils.data.Dataset):
    def __init__(self, ids):
        self.ids = ids

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def main(argv: list[str] | None = None) -> int:
    import peft
    import transformers

    import pkfast
    from pkfast.integrations.hf import TrajectoryCallback

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--n", type=int, default=32)
    a = ap.parse_args(argv)
    sys.path.insert(0, str(HERE))
    from _common import environment, format_environment, measure_matmul_gflops

    print(format_environment(environment()))
    print(f"floor: matmul {measure_matmul_gflops()['best']:.0f} GFLOP/s")
    cfg = transformers.GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=200, n_positions=32, bos_token_id=0,
                                  eos_token_id=0)
    ids = torch.randint(0, 200, (8 * a.steps, 32), generator=torch.Generator().manual_seed(0))
    X = {"input_ids": ids[:a.n]}
    last = lambda o: o.logits[:, -1]  # noqa: E731
    rows = []
    for name in ("full", "lora"):
        torch.manual_seed(0)
        model = transformers.GPT2LMHeadModel(cfg)
        if name == "lora":
            model = peft.get_peft_model(model, peft.LoraConfig(r=8, lora_alpha=16, target_modules=["c_attn", "c_proj"],
                                                               fan_in_fan_out=True, lora_dropout=0.0))
        d = tempfile.mkdtemp()
        args = transformers.TrainingArguments(output_dir=d + "/out", max_steps=a.steps, per_device_train_batch_size=8,
                                              learning_rate=0.01, optim="sgd", report_to=[], use_cpu=True,
                                              save_strategy="no", logging_strategy="no", disable_tqdm=True)
        transformers.Trainer(model=model, args=args, train_dataset=_Tokens(ids),
                             callbacks=[TrajectoryCallback(d + "/traj")]).train()
        traj = pkfast.Trajectory.load(d + "/traj")
        model.eval()
        t = time.perf_counter()
        K = pkfast.gram(model, traj, X, output_fn=last, progress=False)
        sec = time.perf_counter() - t
        rows.append((name, traj.num_params, sec, K))
    print(f"{'fine-tune':9s} {'recorded P':>10s} {'gram seconds':>12s}")
    for name, P, sec, _ in rows:
        print(f"{name:9s} {P:10d} {sec:12.2f}")
    print(f"LoRA's path-kernel Gram ({a.n}×{a.n}, T={a.steps}) is {rows[0][2] / rows[1][2]:.1f}× cheaper")
    return 0


if __name__ == "__main__":
    sys.exit(main())
