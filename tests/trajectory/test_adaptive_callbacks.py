"""The training loops' defaults, recorded completely (issue 26): a Hugging Face Trainer run with its defaults (AdamW,
max_grad_norm=1.0, warm-up) and gradient accumulation 2, and a Lightning run with Adam, gradient_clip_val and
accumulate_grad_batches=2 — every recorded update is recomputed, independently and in float64, from the recorded
preconditioner, clipping coefficient and weighted micro-batches (tests/trajectory/adaptive_reference.py)."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.func import functional_call

import pkfast
from tests.trajectory.adaptive_reference import check_updates


def test_hf_trainer_defaults_with_accumulation_are_recorded_completely(tmp_path):
    transformers = pytest.importorskip("transformers", reason="needs transformers (pip install 'pkfast[hf]')")
    pytest.importorskip("accelerate", reason="transformers.Trainer needs accelerate")
    from pkfast.integrations.hf import INDEX_KEY, TrajectoryCallback

    ids = torch.randint(0, 23, (12, 6), generator=torch.Generator().manual_seed(0))
    labels = ids.clone()
    labels[::2, :2] = -100  # unequal numbers of targets per sequence: the micro-batches' weights are not 1/2

    class Indexed(torch.utils.data.Dataset):
        def __len__(self):
            return len(ids)

        def __getitem__(self, i):
            return {"input_ids": ids[i], "labels": labels[i], INDEX_KEY: i}

    cfg = transformers.GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=23, n_positions=8, bos_token_id=0,
                                  eos_token_id=0, attn_pdrop=0.0, resid_pdrop=0.0, embd_pdrop=0.0)
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(cfg).double()
    cb = TrajectoryCallback(tmp_path / "traj")
    args = transformers.TrainingArguments(  # the defaults: AdamW (torch), max_grad_norm=1.0, weight_decay 0
        output_dir=str(tmp_path / "out"), max_steps=3, per_device_train_batch_size=2, gradient_accumulation_steps=2,
        learning_rate=0.01, warmup_steps=1, weight_decay=0.01, report_to=[], use_cpu=True, seed=0,
        save_strategy="no", logging_strategy="no", disable_tqdm=True, remove_unused_columns=False)
    transformers.Trainer(model=model, args=args, train_dataset=Indexed(), callbacks=[cb]).train()

    traj = pkfast.Trajectory.load(tmp_path / "traj", verify=True)
    rec = traj.recording
    assert rec.optimizer.kind is pkfast.trajectory.recording.OptimizerKind.ADAMW and traj.has_preconditioner
    assert all(len(s.micro_batches) == 2 and len(s.batch_indices) == 4 for s in rec.steps)
    assert [s.optimizer_state.step_count for s in rec.steps] == [1, 2, 3]
    assert all(s.extra["num_items_in_batch"] > 0 for s in rec.steps)  # GPT-2's loss: Σ tokens / items in the batch
    assert rec.steps[0].lr == 0.0 and rec.steps[1].lr > 0  # warm-up from 0
    c = traj.clip_coefs()
    assert bool((c <= 1).all()) and bool((c < 1).any()), c  # max_grad_norm=1.0 clipped

    def batch_grad(s, w, st):
        params = {n: v.clone().requires_grad_(True) for n, v in w.items()}
        n_items = torch.tensor(st.extra["num_items_in_batch"])
        loss = 0.0
        for mb in st.micro_batches:
            b = torch.as_tensor(mb.copy())
            out = functional_call(model, params, (), {"input_ids": ids[b], "labels": labels[b],
                                                      "num_items_in_batch": n_items})
            loss = loss + out.loss
        names = [n for n, v in params.items() if v.requires_grad and v.is_floating_point()]
        grads = torch.autograd.grad(loss, [params[n] for n in names], allow_unused=True)
        return {n: torch.zeros_like(params[n]) if g is None else g for n, g in zip(names, grads)}

    model.train()
    check_updates(traj, batch_grad, tol=1e-10)


def test_lightning_adam_with_clipping_and_accumulation_is_recorded_completely(tmp_path):
    try:
        import lightning.pytorch as pl
    except ImportError:
        pl = pytest.importorskip("pytorch_lightning", reason="needs lightning (pip install 'pkfast[lightning]')")
    from pkfast.integrations.lightning import TrajectoryCallback

    g = torch.Generator().manual_seed(0)
    X, y = torch.randn(24, 5, generator=g, dtype=torch.float64), torch.randint(0, 3, (24,), generator=g)

    class Indexed(torch.utils.data.Dataset):
        def __len__(self):
            return 24

        def __getitem__(self, i):
            return {"index": i, "x": X[i], "y": y[i]}

    class Module(pl.LightningModule):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.net = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3)).double()

        def forward(self, x):
            return self.net(x)

        def training_step(self, batch, i):
            return nn.functional.cross_entropy(self(batch["x"]), batch["y"])

        def configure_optimizers(self):
            return torch.optim.Adam(self.parameters(), lr=0.05, weight_decay=0.01)

    m = Module()
    cb = TrajectoryCallback(tmp_path / "traj", batch_indices=lambda b: b["index"])
    loader = torch.utils.data.DataLoader(Indexed(), batch_size=4, shuffle=True,
                                         generator=torch.Generator().manual_seed(1))
    trainer = pl.Trainer(max_epochs=1, callbacks=[cb], accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, accumulate_grad_batches=2,
                         gradient_clip_val=0.1)
    trainer.fit(m, loader)
    traj = pkfast.Trajectory.load(tmp_path / "traj", verify=True)
    rec = traj.recording
    assert traj.num_steps == 3 and traj.has_preconditioner
    assert all(len(s.micro_batches) == 2 and s.micro_weights == (0.5, 0.5) for s in rec.steps)
    seen = sorted(int(i) for s in rec.steps for i in s.batch_indices)
    assert seen == list(range(24))
    c = traj.clip_coefs()
    assert bool((c < 1).all()), c  # gradient_clip_val=0.1 (norm) clipped every step

    def batch_grad(s, w, st):
        params = {n: v.clone().requires_grad_(True) for n, v in w.items()}
        loss = 0.0
        for mb, wt in zip(st.micro_batches, st.micro_weights):
            b = torch.as_tensor(mb.copy())
            loss = loss + wt * nn.functional.cross_entropy(functional_call(m, params, (X[b],)), y[b])
        grads = torch.autograd.grad(loss, list(params.values()))
        return dict(zip(params, grads))

    check_updates(traj, batch_grad, tol=1e-10)
