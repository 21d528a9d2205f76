"""The exact kernel machine of adaptive optimizers (issue 26): for Adam, AdamW (amsgrad), RMSprop (plain, momentum,
centered) and Adagrad, trained with gradient clipping on some steps, unequal accumulation micro-batches and an lr
schedule, and recorded by TrajectoryRecorder, ``KernelMachine.predict`` equals the network to 1e-10, the contributions
equal an independent float64 computation (the optimizers' update rules replayed on one training point's gradients,
tests/trajectory/adaptive_reference.py), verify() shows rounding, and a wrong preconditioner is refused."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call, grad, jacrev

import pkfast
from tests.trajectory.adaptive_reference import reference_update

N, D, H, C, T = 16, 3, 5, 3, 4

OPTIMIZERS = {
    "adam": lambda p: torch.optim.Adam(p, lr=0.05, betas=(0.8, 0.95), eps=1e-6, weight_decay=0.01),
    "adam_decoupled": lambda p: torch.optim.Adam(p, lr=0.05, weight_decay=0.1, decoupled_weight_decay=True),
    "adamw": lambda p: torch.optim.AdamW(p, lr=0.05, weight_decay=0.1),
    "adam_beta1_0": lambda p: torch.optim.Adam(p, lr=0.05, betas=(0.0, 0.9)),  # (no momentum: the sum restarts)
    "adam_beta1_tiny": lambda p: torch.optim.Adam(p, lr=0.05, betas=(1e-80, 0.9)),  # (the sweep rescales its sum)
    "adamw_amsgrad": lambda p: torch.optim.AdamW(p, lr=0.05, amsgrad=True, weight_decay=0.05),
    "rmsprop": lambda p: torch.optim.RMSprop(p, lr=0.01, alpha=0.9, eps=1e-6, weight_decay=0.01),
    "rmsprop_momentum": lambda p: torch.optim.RMSprop(p, lr=0.01, momentum=0.8),
    "rmsprop_centered": lambda p: torch.optim.RMSprop(p, lr=0.01, centered=True, weight_decay=0.02),
    "rmsprop_centered_momentum": lambda p: torch.optim.RMSprop(p, lr=0.01, momentum=0.9, centered=True),
    "adagrad": lambda p: torch.optim.Adagrad(p, lr=0.1, lr_decay=0.01, initial_accumulator_value=0.1,
                                             weight_decay=0.01, eps=1e-8),
}


def _data():
    g = torch.Generator().manual_seed(0)
    return torch.randn(N, D, generator=g, dtype=torch.float64), torch.randint(0, C, (N,), generator=g)


def _net():
    torch.manual_seed(1)
    return nn.Sequential(nn.Linear(D, H), nn.Tanh(), nn.Linear(H, C)).double()


def _micro(step):
    perm = torch.randperm(N, generator=torch.Generator().manual_seed(100 + step))
    return [perm[:5].tolist(), perm[5:8].tolist()]  # unequal micro-batches, weights 5/8 and 3/8: the batch mean


def _train(path, name, *, clip_value=False, weights=True, opt=None, halves=False, net=None):
    """T steps of ``name`` with accumulation over two unequal micro-batches, clip_grad_norm_ on odd steps and a
    decaying lr (``halves``: each micro-batch's mean loss weighted 1/2, not the batch mean); returns the trained
    network and the loaded trajectory."""
    X, y = _data()
    net = net or _net()
    opt = opt or OPTIMIZERS[name]
    opt = opt(net.parameters())
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + 0.3 * s))
    with pkfast.TrajectoryRecorder(net, opt, path, loss=nn.CrossEntropyLoss(), targets=y) as rec:
        for s in range(T):
            mbs = _micro(s)
            ws = [0.5, 0.5] if halves else [len(b) / 8 for b in mbs]
            opt.zero_grad()
            for b, w in zip(mbs, ws):
                (w * F.cross_entropy(net(X[b]), y[b])).backward()
            if clip_value:
                torch.nn.utils.clip_grad_value_(net.parameters(), 0.01)
            elif s % 2:
                torch.nn.utils.clip_grad_norm_(net.parameters(), 0.05)
            opt.step()
            rec.step(micro_batches=mbs, **({"micro_weights": ws} if weights else {}))
            sched.step()
    return net, pkfast.Trajectory.load(path)


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_the_adaptive_machine_is_the_network(tmp_path, name):
    net, traj = _train(tmp_path / "t", name)
    X, _ = _data()
    assert bool((traj.clip_coefs()[1::2] < 1).all())  # the clipped steps
    km = pkfast.KernelMachine(net, traj, X, nodes=6, progress=False)
    assert float(km.update_residual.max()) < 1e-13, km.update_residual
    Xq = torch.randn(5, D, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    f = net(Xq).detach()
    pred = km.predict(Xq)
    assert float((pred - f).abs().max() / f.abs().max()) <= 1e-10
    c = km.contributions(Xq)
    scale = float(c.abs().max())
    assert torch.allclose(km.bias(Xq) + c.sum(1), pred, rtol=0, atol=1e-13 * scale)
    per = km.contributions(Xq, per_step=True)
    assert per.shape == (T, 5, N, C) and torch.allclose(per.sum(0), c, rtol=0, atol=1e-13 * scale)
    cert = km.certificate(Xq)
    assert cert.max_quadrature < 1e-11


def _reference_contributions(traj, X, y, Xq):
    """a_i(x) = Σ_t ∇f(x; w_t) · Δ_t^{(i)}: Δ_t^{(i)} the update that training point i's own (clipped, weighted)
    gradients alone give, by each optimizer's rule from the recorded P_t (adaptive_reference.reference_update with
    w = 0, so that no weight decay enters) — the left rule's contributions, computed with torch.func."""
    rec = traj.recording
    kind, net = rec.optimizer.kind.value, _net()
    members = rec.optimizer.extra["group_params"]
    clip = traj.clip_coefs()
    out = torch.zeros(Xq.shape[0], N, C, dtype=torch.float64)

    def loss_i(p, x, t):
        return F.cross_entropy(functional_call(net, p, (x[None],)), t[None])

    for i in range(N):
        buf = {}
        for s, st in enumerate(rec.steps):
            w = {n: v.to(torch.float64) for n, v in traj.point(s).items()}
            P = traj.preconditioner(s, as_dict=True)
            g = {n: torch.zeros_like(v) for n, v in w.items()}
            for b, wt in zip(st.micro_batches, st.micro_weights):
                hits = int((np.asarray(b) == i).sum())
                if hits:
                    gi = grad(loss_i)(w, X[i], y[i])
                    for n in g:
                        g[n] += clip[s] * wt * hits / len(b) * gi[n]
            hyper = {n: st.groups[0 if len(st.groups) == 1 else j] for j, ns in enumerate(members) for n in ns}
            counts = {n: st.optimizer_state.step_count for n in w}
            zero = {n: torch.zeros_like(v) for n, v in w.items()}
            step = reference_update(kind, hyper, st.lr, P, g, zero, buf, counts, set())
            J = jacrev(lambda p: functional_call(net, p, (Xq,)))(w)  # {name: [M, C, *shape]}
            for n in w:
                out[:, i] += (J[n].reshape(Xq.shape[0], C, -1) @ step[n].reshape(-1)).reshape(-1, C)
    return out


@pytest.mark.parametrize("name", ["adam", "adamw", "rmsprop_centered_momentum", "adagrad"])
def test_contributions_equal_an_independent_reference(tmp_path, name):
    net, traj = _train(tmp_path / "t", name)
    X, y = _data()
    Xq = torch.randn(3, D, generator=torch.Generator().manual_seed(8), dtype=torch.float64)
    km = pkfast.KernelMachine(net, traj, X, rule="left", progress=False)
    ref = _reference_contributions(traj, X, y, Xq)
    got = km.contributions(Xq)
    assert float((got - ref).abs().max() / ref.abs().max()) <= 1e-10
    # the points outside every batch contribute nothing; explain() and out= agree with contributions()
    seen = {int(i) for st in traj.recording.steps for b in st.micro_batches for i in b}
    assert all(float(got[:, i].abs().max()) == 0.0 for i in range(N) if i not in seen)
    e = km.explain(Xq[0], k=3, target=1)
    assert abs(e.total - float(got[0, :, 1].sum())) < 1e-13
    mm = km.contributions(Xq, out=str(tmp_path / "c.npy"))
    assert np.array_equal(np.asarray(mm), got.numpy())
    small = pkfast.KernelMachine(net, traj, X, rule="left", progress=False, memory_budget=4000)
    sw = small._sweeper  # a query at a time; batch gradients recomputed, P_t kept within a quarter of the budget
    assert small.query_chunk == 1 and not sw._grads and 0 < sw.cached_bytes <= 1000
    assert torch.allclose(small.contributions(Xq), got, rtol=0, atol=1e-13 * float(got.abs().max()))
    with pytest.raises(ValueError, match="coefficients: .* Euclidean path kernel .* contributions"):
        km.coefficients(Xq)  # (Domingos' a_i = c_i / k_p needs the machine's own, preconditioned, kernel)


def test_a_wrong_preconditioner_is_refused(tmp_path, monkeypatch):
    net, traj = _train(tmp_path / "t", "adamw")
    X, _ = _data()
    true = traj.preconditioner

    def scaled(s, as_dict=False):  # P_2 off by 1 %: what an edited state file would read as
        got = true(s, as_dict=as_dict)
        return got if s != 2 else ({n: 1.01 * v for n, v in got.items()} if as_dict else 1.01 * got)

    monkeypatch.setattr(traj, "preconditioner", scaled)
    with pytest.raises(ValueError, match=r"(?s)update residual.*on 1 of 4 steps.*first bad step 2.*preconditioner"):
        pkfast.KernelMachine(net, traj, X, progress=False)


def test_what_the_exact_machine_cannot_rebuild_is_refused(tmp_path):
    X, _ = _data()
    net, traj = _train(tmp_path / "v", "adam", clip_value=True)
    with pytest.raises(ValueError, match=r"step 0's gradient was changed .* by something other than one factor"):
        pkfast.KernelMachine(net, traj, X, progress=False)
    net, traj = _train(tmp_path / "w", "adam", weights=False)
    with pytest.raises(ValueError, match=r"accumulated 2 micro-batches but their loss weights were not recorded"):
        pkfast.KernelMachine(net, traj, X, progress=False)


def test_sgd_with_clipping_and_unequal_micro_batches_is_exact(tmp_path):
    """Defect 1 of issue 26: unequal micro-batches (and clipping) were silently wrong for SGD too; the rows now carry
    the recorded micro-batch loss weights and clipping coefficient."""
    net, traj = _train(tmp_path / "t", "sgd", opt=lambda p: torch.optim.SGD(p, lr=0.3, momentum=0.5,
                                                                             weight_decay=0.01), halves=True)
    X, _ = _data()
    km = pkfast.KernelMachine(net, traj, X, nodes=4, progress=False)
    assert float(km.update_residual.max()) < 1e-13
    assert torch.allclose(km.predict(X), net(X), rtol=0, atol=1e-12)


class _Scaled(nn.Module):
    """A layer without a gradient rule (its parameter goes to the panels' vmap(jacrev) part)."""

    def __init__(self):
        super().__init__()
        self.g = nn.Parameter(torch.linspace(0.5, 1.5, H, dtype=torch.float64))

    def forward(self, x):
        return x * self.g


@pytest.mark.parametrize("name", ["adamw", "rmsprop_momentum"])
def test_a_parameter_without_a_layer_rule(tmp_path, name):
    torch.manual_seed(2)
    net, traj = _train(tmp_path / "t", name, net=nn.Sequential(nn.Linear(D, H), nn.Tanh(), _Scaled(),
                                                               nn.Linear(H, C)).double())
    X, _ = _data()
    km = pkfast.KernelMachine(net, traj, X, nodes=6, progress=False)
    slots = km._sweeper.panels.slots()
    assert slots[0][0] is None and len(slots) > 1  # a vmap(jacrev) part and layers from factors
    f = net(X).detach()
    assert float((km.predict(X) - f).abs().max() / f.abs().max()) <= 1e-10


def _grouped(cls, **kw):
    """Two parameter groups differing in weight decay only, as transformers.Trainer builds for AdamW."""
    def make(params):
        params = list(params)
        return cls([{"params": [p for p in params if p.ndim > 1]}, {"params": [p for p in params if p.ndim == 1],
                                                                      "weight_decay": 0.0}], **kw)
    return make


@pytest.mark.parametrize("opt", [_grouped(torch.optim.AdamW, lr=0.05, weight_decay=0.2),
                                 _grouped(torch.optim.Adam, lr=0.05, weight_decay=0.05),
                                 _grouped(torch.optim.RMSprop, lr=0.01, momentum=0.5, weight_decay=0.05)])
def test_parameter_groups_with_their_own_weight_decay(tmp_path, opt):
    net, traj = _train(tmp_path / "t", None, opt=opt)
    assert len(traj.recording.steps[0].groups) == 2
    X, _ = _data()
    km = pkfast.KernelMachine(net, traj, X, nodes=6, progress=False)
    assert float(km.update_residual.max()) < 1e-13, km.update_residual
    f = net(X).detach()
    assert float((km.predict(X) - f).abs().max() / f.abs().max()) <= 1e-10


def _late(path, opt_fn):
    """One optimizer step before the recorder starts, then T recorded steps on full batches."""
    X, y = _data()
    net = _net()
    opt = opt_fn(net.parameters())
    lossf = nn.CrossEntropyLoss()
    opt.zero_grad(); lossf(net(X), y).backward(); opt.step()  # noqa: E702
    with pkfast.TrajectoryRecorder(net, opt, path, loss=lossf, targets=y) as rec:
        for s in range(T):
            idx = torch.arange(s % 2 * 8, s % 2 * 8 + 8)
            opt.zero_grad(); lossf(net(X[idx]), y[idx]).backward(); opt.step()  # noqa: E702
            rec.step(batch_indices=idx)
    return net, pkfast.Trajectory.load(path)


def test_optimizer_state_from_before_the_recording(tmp_path):
    X, _ = _data()
    net, traj = _late(tmp_path / "a", OPTIMIZERS["adamw"])  # Adam's momentum holds the unrecorded gradient
    with pytest.raises(ValueError, match=r"had taken 1 steps when recording started.*fresh optimizer"):
        pkfast.KernelMachine(net, traj, X, progress=False)
    net, traj = _late(tmp_path / "r", OPTIMIZERS["rmsprop"])  # no momentum: P_t (recorded) is all it carries
    km = pkfast.KernelMachine(net, traj, X, nodes=6, progress=False)
    f = net(X).detach()
    assert float((km.predict(X) - f).abs().max() / f.abs().max()) <= 1e-10


class _WithAux(nn.Module):
    """A network with a head its forward never uses (so the optimizer never updates it)."""

    def __init__(self, body):
        super().__init__()
        self.body, self.aux = body, nn.Linear(C, C).double()

    def forward(self, x):
        return self.body(x)


def test_a_parameter_left_without_gradient_is_refused(tmp_path):
    X, y = _data()
    net = _net()
    model = _WithAux(net)
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    lossf = nn.CrossEntropyLoss()
    with pkfast.TrajectoryRecorder(model, opt, tmp_path / "t", loss=lossf, targets=y) as rec:
        for s in range(2):
            opt.zero_grad(); lossf(net(X), y).backward(); opt.step()  # noqa: E702  (aux gets no gradient)
            rec.step(batch_indices=range(N))
    traj = pkfast.Trajectory.load(tmp_path / "t")
    with pytest.raises(ValueError, match=r"step 0 did not update \['aux.weight', 'aux.bias'\]"):
        pkfast.KernelMachine(model, traj, X, progress=False)


def _causal_lm_loss_f64(logits, labels, vocab_size, num_items_in_batch=None, ignore_index=-100, **kwargs):
    """transformers' causal-LM loss (shift; Σ over the tokens / num_items_in_batch, or the mean) without its float32
    upcast of the logits, so a float64 GPT-2 trains in float64."""
    shift = torch.nn.functional.pad(labels, (0, 1), value=ignore_index)[..., 1:]
    red = "sum" if num_items_in_batch is not None else "mean"
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, vocab_size), shift.reshape(-1),
                                             ignore_index=ignore_index, reduction=red)
    return loss / num_items_in_batch if red == "sum" else loss


@pytest.mark.parametrize("float64_loss", [False, True], ids=["trainer-loss", "float64-unequal-targets"])
def test_hf_trainer_defaults_feed_the_exact_machine(tmp_path, float64_loss):
    """transformers.Trainer with its defaults — AdamW with no decay for biases and LayerNorm weights (two groups),
    max_grad_norm=1.0, linear warm-up — and gradient accumulation 2 on a tiny GPT-2, recorded by the callback:
    the kernel machine rebuilds the network (the micro-batches' weights come from num_items_in_batch). With the
    Trainer's loss (logits upcast to float32) to 1e-6; with a float64 loss and 0–3 masked labels per sequence (so
    micro-batches carry different numbers of targets, which num_items_in_batch weights) to 1e-10."""
    transformers = pytest.importorskip("transformers", reason="needs transformers (pip install 'pkfast[hf]')")
    pytest.importorskip("accelerate", reason="transformers.Trainer needs accelerate")
    from pkfast.integrations.hf import INDEX_KEY, TrajectoryCallback
    from tests.trajectory.test_loop_callbacks import _gpt2, _Tokens

    data = _Tokens(n=12)
    masked = [1 + (3 * i) % 4 if float64_loss else 1 for i in range(len(data))]  # leading labels set to -100
    labels = data.ids.clone()
    for i, k in enumerate(masked):
        labels[i, :k] = -100  # (the first label never counts: the Trainer's item count is the shifted targets')

    class Indexed(torch.utils.data.Dataset):
        def __len__(self):
            return len(data)

        def __getitem__(self, i):
            return {"input_ids": data.ids[i], "labels": labels[i], INDEX_KEY: i}

    model = _gpt2(transformers).double()
    model.set_attn_implementation("eager")
    if float64_loss:
        model.loss_function = _causal_lm_loss_f64
    ids = data.ids
    cb = TrajectoryCallback(tmp_path / "traj", loss=nn.CrossEntropyLoss(), targets=labels[:, 1:])
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path / "out"), max_steps=3, per_device_train_batch_size=2, gradient_accumulation_steps=2,
        learning_rate=0.01, warmup_steps=1, weight_decay=0.01, report_to=[], use_cpu=True, seed=0,
        save_strategy="no", logging_strategy="no", disable_tqdm=True, remove_unused_columns=False)
    transformers.Trainer(model=model, args=args, train_dataset=Indexed(), callbacks=[cb]).train()
    traj = pkfast.Trajectory.load(tmp_path / "traj")
    rec = traj.recording
    assert rec.optimizer.kind.value == "AdamW" and len(rec.steps[0].groups) == 2
    assert all(len(s.micro_batches) == 2 for s in rec.steps) and bool((traj.clip_coefs() < 1).any())
    if float64_loss:  # the weighting matters: some step's micro-batches hold different numbers of targets
        counts = [[int((labels[list(b), 1:] != -100).sum()) for b in s.micro_batches] for s in rec.steps]
        assert any(len(set(c)) > 1 for c in counts), counts
    model.eval()
    shift = lambda o: o.logits[:, :-1]  # noqa: E731  (the next-token logits of targets ids[:, 1:])
    km = pkfast.KernelMachine(model, traj, {"input_ids": ids}, output_fn=shift, progress=False)  # auto nodes
    tol = 1e-10 if float64_loss else 1e-6  # (the Trainer's own loss upcasts the logits to float32)
    assert km.nodes_check.error < 1e-6  # (AdamW's steps move every weight by ~lr: attention needs more nodes)
    Xq = {"input_ids": torch.randint(0, 23, (2, 6), generator=torch.Generator().manual_seed(5))}
    with torch.no_grad():
        f = model(**Xq).logits[:, :-1].reshape(2, -1)
    assert float((km.predict(Xq) - f).norm() / f.norm()) < tol
    assert float(km.update_residual.max()) < (tol if float64_loss else 1e-5)


def test_hyper_parameters_changed_during_training(tmp_path):
    """β1, ε and weight decay changed between steps (as a schedule of them would): each step's recorded values."""
    X, y = _data()
    net = _net()
    opt = torch.optim.AdamW(net.parameters(), lr=0.05, betas=(0.9, 0.99), weight_decay=0.1)
    lossf = nn.CrossEntropyLoss()
    with pkfast.TrajectoryRecorder(net, opt, tmp_path / "t", loss=lossf, targets=y) as rec:
        for s in range(T):
            if s == 2:
                opt.param_groups[0].update(betas=(0.5, 0.9), eps=1e-4, weight_decay=0.3)
            idx = torch.arange(s % 2 * 8, s % 2 * 8 + 8)
            opt.zero_grad(); lossf(net(X[idx]), y[idx]).backward(); opt.step()  # noqa: E702
            rec.step(batch_indices=idx)
    traj = pkfast.Trajectory.load(tmp_path / "t")
    assert traj.recording.steps[3].groups[0].betas == (0.5, 0.9)
    km = pkfast.KernelMachine(net, traj, X, nodes=6, progress=False)
    assert float(km.update_residual.max()) < 1e-13
    f = net(X).detach()
    assert float((km.predict(X) - f).abs().max() / f.abs().max()) <= 1e-10


def test_lightning_adam_with_clipping_and_accumulation_feeds_the_exact_machine(tmp_path):
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
            return F.cross_entropy(self(batch["x"]), batch["y"])

        def configure_optimizers(self):
            return torch.optim.Adam(self.parameters(), lr=0.05, weight_decay=0.01)

    m = Module()
    cb = TrajectoryCallback(tmp_path / "traj", batch_indices=lambda b: b["index"], loss=nn.CrossEntropyLoss(),
                            targets=y)
    loader = torch.utils.data.DataLoader(Indexed(), batch_size=4, shuffle=True,
                                         generator=torch.Generator().manual_seed(1))
    trainer = pl.Trainer(max_epochs=1, callbacks=[cb], accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, accumulate_grad_batches=2,
                         gradient_clip_val=0.1)
    trainer.fit(m, loader)
    traj = pkfast.Trajectory.load(tmp_path / "traj")
    assert bool((traj.clip_coefs() < 1).all())
    km = pkfast.KernelMachine(m, traj, X, nodes=6, progress=False)
    assert float(km.update_residual.max()) < 1e-13
    f = m(X).detach()
    assert float((km.predict(X) - f).abs().max() / f.abs().max()) <= 1e-10
