"""The preconditioner at checkpoints only (pkfast.trajectory.checkpoint_state): a trajectory from checkpoints with
the optimizer state saved beside each — torch state_dicts and a real Trainer run's optimizer.pt — gives P_s from
the state saved with w_{s+1}, in the parameters' own order (the Trainer's two groups reordered by name), checked
against Adam's formula computed here and against the per-step preconditioner the recorder took from the live
optimizer; pkfast.gram computes K = Σ ε_s J_s diag(P_s) J_sᵀ with it (against a jacrev reference) and the plan
says that it is known at checkpoints only; the exact kernel machine refuses it; it survives save/load."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call, jacrev

import pkfast
from pkfast.trajectory.checkpoint_state import trainer_param_order

F64 = torch.float64
B1, B2, EPS = 0.8, 0.95, 1e-6


def _net():
    torch.manual_seed(3)
    return torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.LayerNorm(6), torch.nn.Tanh(),
                               torch.nn.Linear(6, 3)).double()


def _data():
    g = torch.Generator().manual_seed(0)
    return torch.randn(10, 4, generator=g, dtype=F64), torch.randint(0, 3, (10,), generator=g)


def _trainer_groups(net, wd=0.01):
    """Two groups as transformers.Trainer builds them: the decayed parameters, then the others."""
    params = dict(net.named_parameters())
    decayed = ["0.weight", "3.weight"]  # (1 is the LayerNorm)
    return [{"params": [params[n] for n in decayed], "weight_decay": wd},
            {"params": [p for n, p in params.items() if n not in decayed], "weight_decay": 0.0}]


def _train(steps=6, groups=True):
    """Weights and deep-copied optimizer state_dicts after each AdamW step (states[0]: None, w_0 has none)."""
    X, y = _data()
    net = _net()
    opt = torch.optim.AdamW(_trainer_groups(net) if groups else net.parameters(), lr=0.05, betas=(B1, B2), eps=EPS)
    points, states = [copy.deepcopy(net.state_dict())], [None]
    for _ in range(steps):
        opt.zero_grad()
        F.cross_entropy(net(X), y).backward()
        opt.step()
        points.append(copy.deepcopy(net.state_dict()))
        states.append(copy.deepcopy(opt.state_dict()))
    return net, opt, X, y, points, states


def _expected_P(net, opt_state, groups=True):
    """Adam's P = 1/(√(v/(1−β2^t)) + ε) of every parameter, mapped to names through the group order used."""
    order = [n for g in _trainer_groups(net) for n in _names(net, g["params"])] if groups else \
        [n for n, _ in net.named_parameters()]
    out = {}
    for i, n in enumerate(order):
        st = opt_state["state"][i]
        t = float(st["step"])
        out[n] = 1.0 / ((st["exp_avg_sq"].double() / (1 - B2 ** t)).sqrt() + EPS)
    return torch.cat([out[n].reshape(-1) for n, _ in net.named_parameters()])


def _names(net, params):
    ids = {id(p): n for n, p in net.named_parameters()}
    return [ids[id(p)] for p in params]


@pytest.mark.parametrize("groups", [True, False])
def test_rows_are_the_saved_states_preconditioner(groups):
    net, _, _, _, points, states = _train(groups=groups)
    traj = pkfast.Trajectory.from_checkpoints(points[::2], lr=0.1, optimizer_states=states[::2], optimizer_params=net)
    assert traj.preconditioner_source == "checkpoints" and traj.has_preconditioner
    for s in range(traj.num_steps):  # segment s: the state saved with w_{s+1} (checkpoint 2(s+1))
        want = _expected_P(net, states[2 * (s + 1)], groups)
        torch.testing.assert_close(traj.preconditioner(s), want, rtol=1e-13, atol=0)


def _reference_gram(net, traj, X):
    """Σ_s ε_s J(w_s) diag(P_s) J(w_s)ᵀ (rule="left", trace over outputs), by jacrev."""
    K = torch.zeros(len(X), len(X), dtype=F64)
    for s in range(traj.num_steps):
        w = traj.point(s)
        J = jacrev(lambda p: functional_call(net, p, (X,)))({n: w[n] for n, _ in net.named_parameters()})
        Jm = torch.cat([J[n].reshape(len(X), 3, -1) for n, _ in net.named_parameters()], dim=2)
        P = traj.preconditioner(s).to(F64)
        K += traj.step_sizes[s].item() * torch.einsum("icp,p,jcp->ij", Jm, P, Jm)
    return K


def test_gram_uses_the_checkpoints_preconditioner_and_the_plan_says_so():
    net, _, X, _, points, states = _train()
    traj = pkfast.Trajectory.from_checkpoints(points[::2], lr=[0.1, 0.08, 0.05], optimizer_states=states[::2],
                                              optimizer_params=net)
    K = pkfast.gram(net, traj, X, rule="left", dtype=F64, progress=False)  # default "auto": the checkpoints' P
    ref = _reference_gram(net, traj, X)
    assert float((K - ref).abs().max() / ref.abs().max()) <= 1e-10
    E = pkfast.gram(net, traj, X, rule="left", dtype=F64, progress=False, preconditioner=None)
    assert float((E - ref).abs().max() / ref.abs().max()) > 1e-3  # a different kernel
    text = str(pkfast.plan(net, traj, X, rule="left"))
    assert "preconditioner: at checkpoints only" in text and "approximation between checkpoints" in text


def test_exact_machine_refuses_and_save_load_keeps_the_source(tmp_path):
    net, _, X, y, points, states = _train()
    traj = pkfast.Trajectory.from_checkpoints(points[::2], lr=0.1, optimizer_states=states[::2], optimizer_params=net,
                                              batch_indices=[list(range(10))] * 3)
    with pytest.raises(ValueError, match="saved at its checkpoints only.*exact machine needs the preconditioner"):
        pkfast.KernelMachine(net, traj, X, y, loss=torch.nn.CrossEntropyLoss(), progress=False)
    back = pkfast.Trajectory.load(traj.save(tmp_path / "t"), verify=True)
    assert back.preconditioner_source == "checkpoints"
    for s in range(traj.num_steps):
        assert torch.equal(back.preconditioner(s), traj.preconditioner(s))
    with pytest.raises(ValueError, match="checkpoints only"):
        pkfast.KernelMachine(net, back, X, y, loss=torch.nn.CrossEntropyLoss(), progress=False)


def test_trainer_param_order_is_the_trainers_grouping():
    assert trainer_param_order(_net(), 2) == ["0.weight", "3.weight", "0.bias", "1.weight", "1.bias", "3.bias"]
    assert trainer_param_order(_net(), 1) == [n for n, _ in _net().named_parameters()]


def test_refusals_say_what_is_wrong():
    net, _, _, _, points, states = _train()
    with pytest.raises(ValueError, match="pass optimizer_params="):
        pkfast.Trajectory.from_checkpoints(points[::2], lr=0.1, optimizer_states=states[::2])
    with pytest.raises(ValueError, match="shape .* order is not the one assumed"):  # the groups' order ignored
        pkfast.Trajectory.from_checkpoints(points[::2], lr=0.1, optimizer_states=states[::2],
                                           optimizer_params=[n for n, _ in net.named_parameters()])
    with pytest.raises(ValueError, match="checkpoint #1 has no optimizer state"):
        pkfast.Trajectory.from_checkpoints(points[:3], lr=0.1, optimizer_states=[None, None, states[2]],
                                           optimizer_params=net)
    with pytest.raises(ValueError, match="list of 3 optimizer states"):
        pkfast.Trajectory.from_checkpoints(points[::3], lr=0.1, optimizer_states=states[:2], optimizer_params=net)
    sgd = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    net(torch.randn(2, 4, dtype=F64)).sum().backward()
    sgd.step()
    with pytest.raises(ValueError, match="not an adaptive optimizer's .*momentum_buffer"):
        pkfast.Trajectory.from_checkpoints(points[:2], lr=0.1, optimizer_states=[None, sgd.state_dict()],
                                           optimizer_params=net)


def test_trainer_checkpoint_folders_match_the_recorded_preconditioner(tmp_path):
    """A real Trainer run (AdamW, its two parameter groups, weight decay, clipping, warm-up) saving a checkpoint
    folder every step and recorded by the callback: the folders' optimizer.pt give, segment by segment, exactly the
    P the recorder took from the live optimizer after the same step."""
    transformers = pytest.importorskip("transformers", reason="needs transformers (pip install 'pkfast[hf]')")
    pytest.importorskip("accelerate", reason="transformers.Trainer needs accelerate")
    from pkfast.integrations.hf import TrajectoryCallback

    ids = torch.randint(0, 23, (8, 6), generator=torch.Generator().manual_seed(0))

    class Data(torch.utils.data.Dataset):
        def __len__(self):
            return len(ids)

        def __getitem__(self, i):
            return {"input_ids": ids[i], "labels": ids[i]}

    cfg = transformers.GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=23, n_positions=8, bos_token_id=0,
                                  eos_token_id=0, attn_pdrop=0.0, resid_pdrop=0.0, embd_pdrop=0.0)
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(cfg)
    model.save_pretrained(tmp_path / "checkpoint-0")
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), max_steps=3, per_device_train_batch_size=4, learning_rate=0.01, warmup_steps=1,
        weight_decay=0.01, report_to=[], use_cpu=True, seed=0, save_strategy="steps", save_steps=1,
        logging_strategy="steps", logging_steps=1, disable_tqdm=True)
    cb = TrajectoryCallback(tmp_path / "traj")
    transformers.Trainer(model=model, args=args, train_dataset=Data(), callbacks=[cb]).train()
    recorded = pkfast.Trajectory.load(tmp_path / "traj")
    folders = [tmp_path / f"checkpoint-{k}" for k in range(4)]
    with pytest.warns(RuntimeWarning, match="optimizer_params="):
        plain = pkfast.Trajectory.from_checkpoints(folders)
    assert not plain.has_preconditioner
    traj = pkfast.Trajectory.from_checkpoints(folders, optimizer_params=model)
    assert traj.preconditioner_source == "checkpoints" and recorded.preconditioner_source == "recorded"
    for s in range(3):
        got, want = traj.preconditioner(s, as_dict=True), recorded.preconditioner(s, as_dict=True)
        assert set(want) <= set(got)
        for n in want:
            torch.testing.assert_close(got[n], want[n], rtol=1e-6, atol=0, msg=f"step {s}, {n}")
