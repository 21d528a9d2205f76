"""Fine-tune a tiny GPT-2 with ``transformers.Trainer`` (LoRA if ``peft`` is installed), record it with pkfast's
``TrajectoryCallback``, generate a token, and explain that token's loss by its most influential training
sequences (the exact path kernel of the loss, top-k over the training set).

    python examples/hf_lora_attribution.py [--quick] [--out hf_lora_out]

The data: 4 "patterns", each a cycle through its own 4 tokens (pattern p uses tokens 4p … 4p+3), 12 training
sequences of 12 tokens per pattern at random phases. The model is built from a config with random weights (no
download). After training, a prompt from one pattern is continued by one greedy token; that token's loss is the
query, ℓ = −log p(token | prompt), and ``pkfast.attribution.top_k`` ranks the training sequences by the path
kernel of the loss along the recorded fine-tune (through the adapters only, with LoRA). A sensible explanation
puts sequences of the prompt's pattern on top. Prints the plan of the model's layers, the top proponents, and a
``SUMMARY {json}`` line (also written to ``<out>/summary.json``); exits 1 if a sanity check fails.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from torch import nn

import pkfast
from pkfast.attribution import Exact, top_k

PATTERNS, PER, LENGTH, VOCAB = 4, 12, 12, 32


def sequences(g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """[PATTERNS·PER, LENGTH] token ids and each sequence's pattern."""
    ids, pat = [], []
    for p in range(PATTERNS):
        cycle = 4 * p + torch.randperm(4, generator=g)
        for _ in range(PER):
            start = int(torch.randint(0, 4, (1,), generator=g))
            ids.append(cycle[(start + torch.arange(LENGTH)) % 4])
            pat.append(p)
    return torch.stack(ids), torch.tensor(pat)


class TokenData(torch.utils.data.Dataset):
    def __init__(self, ids: torch.Tensor) -> None:
        self.ids = ids

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def main(argv: list[str] | None = None) -> int:
    import transformers

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="120 training steps instead of 300 (seconds)")
    ap.add_argument("--out", default="hf_lora_out")
    a = ap.parse_args(argv)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(0)
    train_ids, pattern = sequences(g)

    cfg = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=VOCAB, n_positions=LENGTH + 1,
                                  bos_token_id=0, eos_token_id=0, attn_pdrop=0.0, resid_pdrop=0.0, embd_pdrop=0.0)
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(cfg)
    try:
        import peft

        model = peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn", "c_proj"],
                                                           fan_in_fan_out=True, lora_dropout=0.0))
        how = "LoRA r=4 on c_attn, c_proj (peft)"
        lr = 0.5
    except ImportError:
        how = "full fine-tune (peft not installed)"
        lr = 0.1
    steps = 120 if a.quick else 300
    args = transformers.TrainingArguments(output_dir=str(out / "trainer"), max_steps=steps,
                                          per_device_train_batch_size=8, learning_rate=lr, optim="sgd",
                                          lr_scheduler_type="constant", report_to=[], use_cpu=True,
                                          save_strategy="no", logging_strategy="no", disable_tqdm=True, seed=0)
    from pkfast.integrations.hf import TrajectoryCallback

    callback = TrajectoryCallback(out / "traj", overwrite=True)
    transformers.Trainer(model=model, args=args, train_dataset=TokenData(train_ids), callbacks=[callback]).train()
    traj = pkfast.Trajectory.load(out / "traj")
    print(f"recorded {traj.num_steps} steps of {traj.num_params:,} trainable parameters ({how})")

    # a prompt from pattern 2, continued by one greedy token: its loss is the query
    model.eval()
    q = 2
    cycle = train_ids[pattern == q][0]
    prompt = cycle[None, :7]
    with torch.no_grad():
        tok = int(model(input_ids=prompt).logits[0, -1].argmax())
    continues = tok == int(cycle[7])
    # the query as a training-length sequence (the model is causal: what follows the token cannot change its
    # loss), whose only counted target is the generated token (ignore_index elsewhere)
    query = torch.cat([prompt, torch.tensor([[tok]]), torch.zeros(1, LENGTH - 8, dtype=torch.long)], dim=1)
    y_query = torch.full((1, LENGTH - 1), -100)
    y_query[0, 6] = tok  # the logits at position 6 predict token 7
    shift = lambda o: o.logits[:, :-1]  # noqa: E731  (next-token logits for the targets ids[:, 1:])
    lossf = nn.CrossEntropyLoss()
    train = Exact(model, traj, {"input_ids": train_ids}, train_ids[:, 1:], loss=lossf, output_fn=shift)
    qry = Exact(model, traj, {"input_ids": query}, y_query, loss=lossf, output_fn=shift)
    best = top_k(qry, train, k=5, progress=False)
    top = best.proponents[0].tolist()
    same = sum(int(pattern[i]) == q for i in top) / len(top)
    plan = pkfast.plan(model, traj, {"input_ids": train_ids[:4]}, output_fn=shift, of="loss", loss=lossf,
                       y=train_ids[:4, 1:])
    routed = sorted({L.method for L in plan.layers if "lora_" in L.name})
    print(f"prompt {prompt[0].tolist()} → generated {tok} ({'continues' if continues else 'breaks'} the pattern)")
    print("most influential training sequences (proponents of the generated token):")
    for i, s in zip(top, best.proponent_scores[0].tolist()):
        print(f"  #{i:3d} pattern {int(pattern[i])}  score {s:+.3e}  {train_ids[i].tolist()}")
    summary = {"steps": traj.num_steps, "trainable_parameters": traj.num_params, "fine_tune": how,
               "generated_token": tok, "continues_pattern": continues, "top5": top,
               "top5_same_pattern": same, "lora_routes": routed}
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    print("SUMMARY " + json.dumps(summary))
    ok = continues and same >= 0.6
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
