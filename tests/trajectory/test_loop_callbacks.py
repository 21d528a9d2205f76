"""Recording from the training loops people use (issue 18): the Hugging Face TrainerCallback and the Lightning
Callback record w_0 … w_T and the applied learning rates; each is checked against the loop's own record (the
Trainer's checkpoint folders and trainer_state.json; Lightning's module weights) and skipped, saying why, when its
library is absent. Models are built from configs (random weights); nothing is downloaded."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

import pkfast


class _Tokens(torch.utils.data.Dataset):
    def __init__(self, n: int = 12, length: int = 6, vocab: int = 23) -> None:
        g = torch.Generator().manual_seed(0)
        self.ids = torch.randint(0, vocab, (n, length), generator=g)

    def __len__(self) -> int:
        return self.ids.shape[0]

    def __getitem__(self, i: int) -> dict:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def _gpt2(transformers, lora: bool = False):
    cfg = transformers.GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=23, n_positions=8, bos_token_id=0,
                                  eos_token_id=0, attn_pdrop=0.0, resid_pdrop=0.0, embd_pdrop=0.0)
    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(cfg)


def _trainer(transformers, model, out, callbacks, *, steps: int = 4, save_steps: int = 2):
    args = transformers.TrainingArguments(
        output_dir=str(out), max_steps=steps, per_device_train_batch_size=3, learning_rate=0.05, optim="sgd",
        lr_scheduler_type="linear", warmup_steps=1, logging_steps=1, save_steps=save_steps, report_to=[],
        use_cpu=True, seed=0, data_seed=0, disable_tqdm=True)
    return transformers.Trainer(model=model, args=args, train_dataset=_Tokens(), callbacks=callbacks)


def test_hf_trainer_callback_records_what_the_checkpoints_hold(tmp_path):
    transformers = pytest.importorskip("transformers", reason="needs transformers (pip install 'pkfast[hf]')")
    pytest.importorskip("accelerate", reason="transformers.Trainer needs accelerate")
    from pkfast.integrations.hf import TrajectoryCallback

    model = _gpt2(transformers)
    model.save_pretrained(tmp_path / "init")  # w_0 as a folder (save_pretrained keeps a tied weight once)
    every, sparse = TrajectoryCallback(tmp_path / "traj"), TrajectoryCallback(tmp_path / "traj2", every=2)
    _trainer(transformers, model, tmp_path / "out", [every, sparse]).train()
    traj, traj2 = pkfast.Trajectory.load(tmp_path / "traj"), pkfast.Trajectory.load(tmp_path / "traj2")
    assert traj.num_steps == 4 and traj2.num_steps == 2
    log = json.loads((tmp_path / "out" / "checkpoint-4" / "trainer_state.json").read_text())["log_history"]
    lrs = [e["learning_rate"] for e in log if "learning_rate" in e]
    assert traj.step_sizes.tolist() == pytest.approx(lrs, rel=1e-6)  # the applied rates, as the Trainer logs them
    assert traj2.step_sizes.tolist() == pytest.approx([lrs[0] + lrs[1], lrs[2] + lrs[3]], rel=1e-6)
    assert traj2.step_meta(0)["optimizer_steps"] == 2
    # the same trajectory from the Trainer's checkpoint folders (lr from trainer_state.json)
    ck = pkfast.Trajectory.from_checkpoints([tmp_path / "init", tmp_path / "out" / "checkpoint-2",
                                             tmp_path / "out" / "checkpoint-4"])
    assert ck.step_sizes.tolist() == pytest.approx(traj2.step_sizes.tolist(), rel=1e-6)
    for s in range(3):
        got, want, every_step = traj2.point(s), ck.point(s), traj.point(2 * s)
        for k in got:
            assert torch.equal(got[k], want[k]) and torch.equal(every_step[k], got[k]), (s, k)
    # the recorded run gives a Gram (no batch indices: the kernel machine would refuse, saying why)
    model.eval()
    ids = _Tokens().ids[:4]
    K = pkfast.gram(model, traj, {"input_ids": ids}, output_fn=lambda o: o.logits[:, -1], progress=False)
    assert K.shape == (4, 4) and bool(torch.isfinite(K).all())


def test_peft_lora_records_only_the_adapters(tmp_path):
    transformers = pytest.importorskip("transformers", reason="needs transformers (pip install 'pkfast[hf]')")
    pytest.importorskip("accelerate", reason="transformers.Trainer needs accelerate")
    peft = pytest.importorskip("peft", reason="needs peft (pip install 'pkfast[peft]')")
    from pkfast.integrations.hf import TrajectoryCallback

    base = _gpt2(transformers)
    P_full = sum(p.numel() for p in base.parameters())
    model = peft.get_peft_model(base, peft.LoraConfig(r=2, lora_alpha=4, target_modules=["c_attn"],
                                                      fan_in_fan_out=True, lora_dropout=0.0))
    cb = TrajectoryCallback(tmp_path / "traj", buffers=False)
    _trainer(transformers, model, tmp_path / "out", [cb], steps=3, save_steps=10).train()
    traj = pkfast.Trajectory.load(tmp_path / "traj")
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert set(traj.names) == trainable and all("lora_" in n for n in traj.names)
    assert traj.num_params < P_full / 20  # the adapters alone
    model.eval()
    ids = _Tokens().ids[:3]
    f = lambda o: o.logits[:, -1]  # noqa: E731
    p = pkfast.plan(model, traj, {"input_ids": ids}, output_fn=f)
    assert all(L.method != "jacobian" for L in p.layers if "lora_" in L.name), p
    K = pkfast.gram(model, traj, {"input_ids": ids}, output_fn=f, progress=False)
    assert K.shape == (3, 3) and bool((K.diagonal() > 0).all())


def test_lightning_callback_records_steps_lrs_and_batches(tmp_path):
    try:
        import lightning.pytorch as pl
    except ImportError:
        pl = pytest.importorskip("pytorch_lightning", reason="needs lightning (pip install 'pkfast[lightning]')")
    from pkfast.integrations.lightning import TrajectoryCallback

    X, y = torch.randn(32, 5, generator=torch.Generator().manual_seed(0)), torch.randint(0, 3, (32,))

    class Indexed(torch.utils.data.Dataset):
        def __len__(self):
            return 32

        def __getitem__(self, i):
            return {"index": i, "x": X[i], "y": y[i]}

    class Module(pl.LightningModule):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.net = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3))

        def forward(self, x):
            return self.net(x)

        def training_step(self, batch, i):
            return nn.functional.cross_entropy(self(batch["x"]), batch["y"])

        def configure_optimizers(self):
            opt = torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)
            return [opt], [torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)]

    m = Module()
    w0 = {k: v.clone() for k, v in m.state_dict().items()}
    cb = TrajectoryCallback(tmp_path / "traj", batch_indices=lambda b: b["index"], loss=nn.CrossEntropyLoss(),
                            targets=y)
    loader = torch.utils.data.DataLoader(Indexed(), batch_size=8, shuffle=True,
                                         generator=torch.Generator().manual_seed(1))
    trainer = pl.Trainer(max_epochs=2, callbacks=[cb], accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(m, loader)
    traj = pkfast.Trajectory.load(tmp_path / "traj")
    assert traj.num_steps == 8
    assert traj.step_sizes.tolist() == pytest.approx([0.1] * 4 + [0.05] * 4)  # StepLR steps per epoch
    for k, v in traj.point(0).items():
        assert torch.equal(v, w0[k].to(v.dtype))
    for k, v in traj.point(8).items():
        assert torch.equal(v, m.state_dict()[k].to(v.dtype))
    seen = torch.cat([torch.as_tensor(traj.batch_indices(s)) for s in range(4)])
    assert sorted(seen.tolist()) == list(range(32))  # one epoch: every index once
    # with batches, loss and targets recorded, the exact kernel machine rebuilds the module
    assert all(list(s.extra["input_fingerprints"]) == ["0"] for s in traj.recording.steps)  # self(x) in the step
    km = pkfast.KernelMachine(m.double(), traj, X.double(), dtype=torch.float64, progress=False)
    with pytest.raises(ValueError, match="X_train appears permuted"):  # checked against those fingerprints
        pkfast.KernelMachine(m, traj, X.double().flip(0), dtype=torch.float64, progress=False)
    cert = km.certificate(X[:2].double())
    assert float(cert.update.max()) < 1e-5  # float32 training: the recomputed steps agree to its rounding


def test_every_k_steps_with_the_plain_recorder(tmp_path):
    """skip() folds optimizer steps into the next point (weight = Σ applied lr), flush() closes a trailing
    interval, and the exact kernel machine refuses such points, saying why. No optional library needed."""
    torch.manual_seed(0)
    net = nn.Linear(4, 2).double()
    X, y = torch.randn(8, 4, dtype=torch.float64), torch.randint(0, 2, (8,))
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    points = [{k: v.clone() for k, v in net.state_dict().items()}]

    def sgd_step():
        opt.zero_grad()
        nn.functional.cross_entropy(net(X), y).backward()
        opt.step()
        sched.step()

    with pkfast.TrajectoryRecorder(net, opt, tmp_path / "t", loss=nn.CrossEntropyLoss(), targets=y) as rec:
        for plan in ("skip", "step", "skip", "skip", "step", "skip"):  # lr 0.1, 0.05, 0.025, …
            sgd_step()
            if plan == "skip":
                rec.skip()
                continue
            if len(points) == 2:  # a point after skipped steps has no batch to record
                with pytest.raises(ValueError, match=r"covers 3 optimizer steps, whose batches are not recorded"):
                    rec.step(batch_indices=range(8))
            rec.step()
            points.append({k: v.clone() for k, v in net.state_dict().items()})
        rec.flush()  # the trailing skipped step ends in a last point
        points.append({k: v.clone() for k, v in net.state_dict().items()})
        with pytest.raises(RuntimeError, match=r"expected exactly one optimizer.step\(\) since the last record"):
            rec.skip()
    traj = pkfast.Trajectory.load(tmp_path / "t")
    assert traj.num_steps == 3
    assert traj.step_sizes.tolist() == pytest.approx([0.1 + 0.05, 0.025 + 0.0125 + 0.00625, 0.003125])
    assert [traj.step_meta(s)["optimizer_steps"] for s in range(3)] == [2, 3, 1]
    for s, want in enumerate(points):
        for k, v in traj.point(s).items():
            assert torch.equal(v, want[k])
    with pytest.raises(ValueError, match=r"point 1 of the recording covers 2 optimizer steps .* needs every step"):
        pkfast.KernelMachine(net, traj, X, progress=False)


def test_lightning_ckpt_files_are_read_safely(tmp_path):
    """Real Lightning .ckpt files (with hyperparameters saved) load with weights_only=True: their state_dict."""
    try:
        import lightning.pytorch as pl
    except ImportError:
        pl = pytest.importorskip("pytorch_lightning", reason="needs lightning (pip install 'pkfast[lightning]')")
    X, y = torch.randn(32, 5, generator=torch.Generator().manual_seed(0)), torch.randint(0, 3, (32,))

    class Module(pl.LightningModule):
        def __init__(self, width: int = 8):
            super().__init__()
            self.save_hyperparameters()
            self.net = nn.Sequential(nn.Linear(5, width), nn.Tanh(), nn.Linear(width, 3))

        def training_step(self, b, i):
            return nn.functional.cross_entropy(self.net(b[0]), b[1])

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    m = Module()
    ck = pl.callbacks.ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=2, save_top_k=-1)
    pl.Trainer(max_steps=4, callbacks=[ck], logger=False, enable_progress_bar=False, enable_model_summary=False,
               accelerator="cpu").fit(m, torch.utils.data.DataLoader(torch.utils.data.TensorDataset(X, y),
                                                                     batch_size=8))
    files = sorted(tmp_path.glob("*.ckpt"))
    assert len(files) == 2
    traj = pkfast.Trajectory.from_checkpoints(files, lr=0.2)
    for k, v in traj.point(1).items():
        assert torch.equal(v, m.state_dict()[k])


def test_hf_trainer_with_indices_feeds_the_exact_kernel_machine(tmp_path):
    """A dataset that returns "pkfast_index" lets the Trainer callback record each step's batch (the model never
    sees the key); with targets and the loss convention, an SGD Trainer run rebuilds as the exact kernel machine."""
    transformers = pytest.importorskip("transformers", reason="needs transformers (pip install 'pkfast[hf]')")
    pytest.importorskip("accelerate", reason="transformers.Trainer needs accelerate")
    from pkfast.integrations.hf import INDEX_KEY, TrajectoryCallback

    data = _Tokens(n=12)

    class Indexed(torch.utils.data.Dataset):
        def __len__(self):
            return len(data)

        def __getitem__(self, i):
            # the Trainer divides the summed token losses by the labels it counts before its shift: with the
            # first label ignored (never a target after the shift) that count is the targets', the plain mean
            labels = data.ids[i].clone()
            labels[0] = -100
            return {"input_ids": data.ids[i], "labels": labels, INDEX_KEY: i}

    model = _gpt2(transformers).double()
    model.set_attn_implementation("eager")  # (the certificate's forward-mode AD has no CPU flash attention)
    ids = data.ids
    cb = TrajectoryCallback(tmp_path / "traj", loss=nn.CrossEntropyLoss(), targets=ids[:, 1:])
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path / "out"), max_steps=4, per_device_train_batch_size=3, learning_rate=0.02,
        optim="sgd", max_grad_norm=0.0, lr_scheduler_type="linear", report_to=[], use_cpu=True, seed=0,
        save_strategy="no", logging_strategy="no", disable_tqdm=True, remove_unused_columns=False)
    transformers.Trainer(model=model, args=args, train_dataset=Indexed(), callbacks=[cb]).train()
    traj = pkfast.Trajectory.load(tmp_path / "traj")
    batches = [traj.batch_indices(s) for s in range(traj.num_steps)]
    assert all(b is not None and len(b) == 3 for b in batches)
    assert sorted(int(i) for b in batches for i in b) == list(range(12))  # one epoch, every sequence once
    # the model's inputs are fingerprinted as the model received them (the index key already taken out)
    assert all(sorted(s.extra["input_fingerprints"]) == ["input_ids", "labels"] for s in traj.recording.steps)
    model.eval()
    shift = lambda o: o.logits[:, :-1]  # noqa: E731  (the next-token logits of targets ids[:, 1:])
    km = pkfast.KernelMachine(model, traj, {"input_ids": ids}, output_fn=shift, nodes=4, progress=False)
    Xq = {"input_ids": torch.randint(0, 23, (2, 6), generator=torch.Generator().manual_seed(5))}
    with torch.no_grad():
        f = model(**Xq).logits[:, :-1].reshape(2, -1)  # (the machine flattens each sample's outputs)
    assert float((km.predict(Xq) - f).norm() / f.norm()) < 1e-6  # the network, to the quadrature's precision
    cert = km.certificate(Xq)
    assert float(cert.update.max()) < 1e-6  # the Trainer's loss upcasts logits to float32: ~1e-7
    assert cert.max_quadrature < 1e-5
