"""A tiny GPT-2 fine-tuned by ``transformers.Trainer`` with its defaults (AdamW, ``max_grad_norm=1.0``, a linear
schedule with warm-up, here with gradient accumulation 2), recorded by pkfast's ``TrajectoryCallback``, rebuilt by
the exact :class:`pkfast.KernelMachine`, and a generated token explained by its training sequences. Then the same
with a LoRA fine-tune (``peft``) of the same model.

    python examples/hf_adamw_kernel_machine.py [--quick] [--out hf_adamw_out] [--nodes 16] [--lora-nodes 16]

The data (as examples/hf_lora_attribution.py): 4 "patterns", each a cycle through its own 4 tokens (pattern p uses
tokens 4p … 4p+3), sequences of 12 tokens at random phases. Each sequence's first 1–4 labels are masked
(``-100``), so sequences carry different numbers of target tokens: the Trainer then divides each micro-batch's summed
token loss by ``num_items_in_batch`` (the targets of the whole accumulated batch), which the machine must weight
exactly. The model is built from a ``GPT2Config`` (random init, no download) in float64; its loss function is the
Trainer's causal-LM loss without the float32 upcast of the logits (so the run is float64 throughout).

After training, the machine ``f(x) = b(x) + Σ_i c_i(x)`` is built over the training sequences (the logits of every
next-token position as its outputs) and compared with the network on held-out sequences: the relative error of
predict against the network, and the certificate's update residual (the recorded weights replayed from the batches,
AdamW's recorded preconditioners and the clipping coefficients). A prompt of one pattern is continued by one greedy
token; ``KernelMachine.explain`` ranks the training sequences by their contribution to the logit of the token that
continues the pattern. A sensible explanation puts sequences of the prompt's pattern on top. The checks (exit 1 if
one fails): the full fine-tune's machine exact (relative error and update residual < 1e-10), the LoRA machine within
1e-4, the full fine-tune's greedy token continuing the pattern (not with ``--quick``: its 16 steps at a small
learning rate, which keep the quadrature exact, teach the pattern only partly), and each explanation's top sequence
of the prompt's pattern.

LoRA: the machine is exact in the adapters' parameters too (the network is a smooth function of them); what may be
left is the Gauss–Legendre quadrature error of each step's segment, which ``--lora-nodes`` controls (the certificate
measures it). Prints both runs and a ``SUMMARY {json}`` line (also ``<out>/summary.json``); exits 1 if a check fails.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import pkfast

PATTERNS = 4
PROMPT = 7  # the prompt's length; the generated token is the 8th
FULL = {"per": 8, "steps": 40, "n_layer": 2, "n_embd": 32, "length": 12, "vocab": 32, "lr": 1e-2, "lora_lr": 2e-2}
QUICK = {"per": 6, "steps": 16, "n_layer": 1, "n_embd": 16, "length": 8, "vocab": 16, "lr": 1e-2, "lora_lr": 2e-2}


def sequences(per: int, g: torch.Generator, length: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """[PATTERNS·per, length] token ids, their labels (the first 1–4 masked with -100) and each one's pattern."""
    ids, labels, pat = [], [], []
    for p in range(PATTERNS):
        cycle = 4 * p + torch.randperm(4, generator=g)
        for _ in range(per):
            start = int(torch.randint(0, 4, (1,), generator=g))
            s = cycle[(start + torch.arange(length)) % 4]
            lab = s.clone()
            lab[:int(torch.randint(1, 5, (1,), generator=g))] = -100
            ids.append(s)
            labels.append(lab)
            pat.append(p)
    return torch.stack(ids), torch.stack(labels), torch.tensor(pat)


class TokenData(torch.utils.data.Dataset):
    """Sequences with their labels and their index (``pkfast_index``: the callback records the batches by it)."""

    def __init__(self, ids: torch.Tensor, labels: torch.Tensor) -> None:
        self.ids, self.labels = ids, labels

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict:
        from pkfast.integrations.hf import INDEX_KEY

        return {"input_ids": self.ids[i], "labels": self.labels[i], INDEX_KEY: i}


def causal_lm_loss_f64(logits, labels, vocab_size, num_items_in_batch=None, ignore_index=-100, shift_labels=None,
                       **kwargs):
    """transformers' ``ForCausalLMLoss`` (shift, Σ over the batch's tokens / ``num_items_in_batch``, or the mean)
    without its upcast of the logits to float32, so a float64 model trains in float64."""
    if shift_labels is None:
        shift_labels = F.pad(labels, (0, 1), value=ignore_index)[..., 1:]
    red = "sum" if num_items_in_batch is not None else "mean"
    loss = F.cross_entropy(logits.reshape(-1, vocab_size), shift_labels.reshape(-1).to(logits.device),
                           ignore_index=ignore_index, reduction=red)
    return loss / num_items_in_batch if red == "sum" else loss


def build_model(transformers, cfg: dict):
    """A GPT-2 from its config (random init) in float64, eager attention, the float64 causal-LM loss."""
    cfg = transformers.GPT2Config(n_layer=cfg["n_layer"], n_embd=cfg["n_embd"], n_head=2, vocab_size=cfg["vocab"],
                                  n_positions=cfg["length"],
                                  bos_token_id=0, eos_token_id=0, attn_pdrop=0.0, resid_pdrop=0.0, embd_pdrop=0.0)
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(cfg).double()
    model.set_attn_implementation("eager")
    model.loss_function = causal_lm_loss_f64
    return model


def fine_tune(transformers, model, data: TokenData, out: Path, *, steps: int, lr: float):
    """``Trainer`` with its defaults (AdamW, max_grad_norm=1.0, linear schedule) plus warm-up, accumulation 2 and
    the usual weight decay 0.01, recorded by the callback; returns the loaded trajectory."""
    from pkfast.integrations.hf import TrajectoryCallback

    cb = TrajectoryCallback(out / "traj", overwrite=True, loss=torch.nn.CrossEntropyLoss(),
                            targets=data.labels[:, 1:])
    args = transformers.TrainingArguments(
        output_dir=str(out / "trainer"), max_steps=steps, per_device_train_batch_size=4,
        gradient_accumulation_steps=2, learning_rate=lr, warmup_steps=max(1, steps // 10), weight_decay=0.01,
        report_to=[], use_cpu=True, seed=0, save_strategy="no", logging_strategy="no", disable_tqdm=True,
        remove_unused_columns=False)  # (keeps pkfast_index for the callback)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=data, callbacks=[cb])
    trainer.train()
    traj = pkfast.Trajectory.load(out / "traj")
    a = trainer.args
    settings = {"optim": str(a.optim.value if hasattr(a.optim, "value") else a.optim),
                "max_grad_norm": a.max_grad_norm, "lr_scheduler": str(getattr(a.lr_scheduler_type, "value",
                                                                                a.lr_scheduler_type)),
                "warmup_steps": a.warmup_steps, "gradient_accumulation_steps": a.gradient_accumulation_steps,
                "learning_rate": a.learning_rate, "weight_decay": a.weight_decay}
    return traj, settings


def generate_query(model, ids: torch.Tensor, pattern: torch.Tensor, q: int) -> tuple[dict, int, int]:
    """A prompt of pattern ``q`` continued by one greedy token, as a training-length query (the model is causal:
    the padding after the token cannot change its logit); returns the query, the token, and the token that
    continues the pattern."""
    cycle = ids[pattern == q][0]
    prompt = cycle[None, :PROMPT]
    with torch.no_grad():
        tok = int(model(input_ids=prompt).logits[0, -1].argmax())
    pad = torch.zeros(1, ids.shape[1] - PROMPT - 1, dtype=torch.long)
    query = torch.cat([prompt, torch.tensor([[tok]]), pad], 1)
    return {"input_ids": query}, tok, int(cycle[PROMPT])


def rebuild(model, traj, ids, pattern, held_out, *, nodes, k: int = 5) -> dict:
    """The exact kernel machine of the recorded run: predict vs the network, the certificate, and the explanation
    of a generated token by its training sequences."""
    model.eval()
    shift = lambda o: o.logits[:, :-1]  # noqa: E731  (the logits predicting the targets ids[:, 1:])
    t0 = time.perf_counter()
    km = pkfast.KernelMachine(model, traj, {"input_ids": ids}, output_fn=shift, nodes=nodes, progress=False)
    build_s = time.perf_counter() - t0
    q = 2
    query, tok, nxt = generate_query(model, ids, pattern, q)
    Xq = {"input_ids": torch.cat([query["input_ids"], held_out])}
    with torch.no_grad():
        f = model(**Xq).logits[:, :-1].reshape(Xq["input_ids"].shape[0], -1)
    t1 = time.perf_counter()
    pred = km.predict(Xq)
    t2 = time.perf_counter()
    cert = km.certificate(query)  # (the update residual is the run's; the quadrature residual the query's)
    t3 = time.perf_counter()
    vocab = f.shape[1] // (ids.shape[1] - 1)
    target = (PROMPT - 1) * vocab + nxt  # (the logit at position PROMPT−1 of the pattern's next token)
    e = km.explain(query, k=k, target=target)
    seconds = {"build": build_s, "predict": t2 - t1, "certificate": t3 - t2, "explain": time.perf_counter() - t3}
    top = e.proponents.tolist()
    return {"trainable_parameters": traj.num_params, "steps": traj.num_steps, "nodes": km.nodes,
            "nodes_estimated_error": float(km.nodes_check.error) if km.nodes_check is not None else None,
            "clipped_steps": int((traj.clip_coefs() < 1).sum()),
            "rel_error": float((pred - f).norm() / f.norm()), "max_abs_error": float((pred - f).abs().max()),
            "update_residual": float(cert.update.max()), "max_quadrature": cert.max_quadrature,
            "prompt": query["input_ids"][0, :PROMPT].tolist(), "prompt_pattern": q, "generated_token": tok,
            "next_in_pattern": nxt, "continues_pattern": tok == nxt, "topk": top, "topk_patterns": [int(pattern[i]) for i in top],
            "topk_scores": e.proponent_scores.tolist(), "topk_coverage": e.coverage,
            "topk_same_pattern": sum(int(pattern[i]) == q for i in top) / len(top), "seconds": seconds}


def report(name: str, r: dict, ids: torch.Tensor) -> None:
    print(f"\n== {name}: {r['trainable_parameters']:,} trainable parameters, {r['steps']} AdamW steps "
          f"({r['clipped_steps']} clipped), nodes={r['nodes']} (estimated quadrature error "
          f"{r['nodes_estimated_error']:.1e}), seconds: " + ", ".join(f"{k} {v:.1f}" for k, v in r["seconds"].items()))
    print(f"   predict vs network: rel err {r['rel_error']:.2e}, max abs {r['max_abs_error']:.2e}; certificate: "
          f"update residual {r['update_residual']:.2e}, max quadrature {r['max_quadrature']:.2e}")
    print(f"   prompt {r['prompt']} (pattern {r['prompt_pattern']}) → generated {r['generated_token']} "
          f"({'continues' if r['continues_pattern'] else 'breaks'} the pattern); top training sequences of the logit "
          f"of {r['next_in_pattern']}, the pattern's next token:")
    for i, p, s in zip(r["topk"], r["topk_patterns"], r["topk_scores"]):
        print(f"     #{i:3d} pattern {p}  contribution {s:+.3e}  {ids[i].tolist()}")


def main(argv: list[str] | None = None) -> int:
    import transformers

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="a smaller model and run (well under a minute)")
    ap.add_argument("--out", default="hf_adamw_out")
    ap.add_argument("--nodes", type=int, default=16, help="quadrature nodes per step for the full fine-tune's machine "
                    "(the automatic choice aims at 1e-6; AdamW's steps move every weight by ~lr, so exactness to "
                    "1e-10 takes more)")
    ap.add_argument("--lora-nodes", type=int, default=16, help="quadrature nodes per step for the LoRA machine")
    ap.add_argument("--no-lora", action="store_true", help="skip the LoRA variant")
    a = ap.parse_args(argv)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    cfg = QUICK if a.quick else FULL
    g = torch.Generator().manual_seed(0)
    ids, labels, pattern = sequences(cfg["per"], g, cfg["length"])
    held_out = sequences(1, torch.Generator().manual_seed(1), cfg["length"])[0]
    data = TokenData(ids, labels)
    print(f"{len(ids)} training sequences of {cfg['length']} tokens, {int((labels[:, 1:] != -100).sum())} target "
          f"tokens ({(labels[:, 1:] != -100).sum(1).min()}–{(labels[:, 1:] != -100).sum(1).max()} per sequence)")
    S: dict = {"config": {"quick": a.quick, "sequences": len(ids), **cfg}}

    model = build_model(transformers, cfg)
    traj, S["trainer"] = fine_tune(transformers, model, data, out / "full", steps=cfg["steps"], lr=cfg["lr"])
    S["full"] = rebuild(model, traj, ids, pattern, held_out, nodes=a.nodes)
    report("full fine-tune", S["full"], ids)
    print("   Trainer settings:", S["trainer"])

    if not a.no_lora:
        try:
            import peft
        except ImportError:
            print("\n(LoRA skipped: peft is not installed)")
        else:
            base = build_model(transformers, cfg)
            targets = ["c_attn", "c_proj"]
            lora = peft.get_peft_model(base, peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets,
                                                             fan_in_fan_out=True, lora_dropout=0.0)).double()
            traj, _ = fine_tune(transformers, lora, data, out / "lora", steps=cfg["steps"],
                                lr=cfg["lora_lr"])
            S["lora"] = rebuild(lora, traj, ids, pattern, held_out, nodes=a.lora_nodes)
            report(f"LoRA r=4 on c_attn, c_proj (peft {peft.__version__})", S["lora"], ids)
    S["seconds"] = time.perf_counter() - t0
    runs = [S[n] for n in ("full", "lora") if n in S]
    S["checks"] = {"full_exact": S["full"]["rel_error"] < 1e-10 and S["full"]["update_residual"] < 1e-10,
                   "lora_close": "lora" not in S or S["lora"]["rel_error"] < 1e-4,
                   "continues_pattern": a.quick or S["full"]["continues_pattern"],  # (quick: too few steps)
                   "top1_prompt_pattern": all(r["topk_patterns"][0] == r["prompt_pattern"] for r in runs)}
    S["ok"] = all(S["checks"].values())
    (out / "summary.json").write_text(json.dumps(S, indent=1))
    print(f"\n{S['seconds']:.1f} s; checks {S['checks']}")
    print("SUMMARY " + json.dumps(S))
    return 0 if S["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
