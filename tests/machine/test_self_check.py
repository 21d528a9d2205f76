"""The kernel machine checks its recording at construction (issue 25): the recorded updates must follow from the
recorded batches, loss and optimizer, or it refuses with the likely causes (opt-out: verify=False)."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import pkfast

D, H, C, N = 4, 8, 3, 12


def _net(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(D, H), nn.Tanh(), nn.Linear(H, C)).double()


def _data():
    g = torch.Generator().manual_seed(1)
    return torch.randn(N, D, generator=g, dtype=torch.float64), torch.randint(0, C, (N,), generator=g)


def _record(path, net, X, y, *, steps=4, micro=None, lr=0.3):
    """SGD on halves of the data; ``micro``: accumulate over unequal micro-batches (what the recorder cannot see)."""
    lossf = nn.CrossEntropyLoss()
    o = torch.optim.SGD(net.parameters(), lr=lr, momentum=0.5)
    with pkfast.TrajectoryRecorder(net, o, path, loss=lossf, targets=y) as rec:
        for s in range(steps):
            idx = torch.arange(s % 2 * 6, s % 2 * 6 + 6)
            o.zero_grad()
            for part in ([idx] if micro is None else [idx[:micro], idx[micro:]]):
                (lossf(net(X[part]), y[part]) * (part.numel() / idx.numel() if micro is None else 0.5)).backward()
            o.step()
            rec.step(batch_indices=idx)
    return pkfast.Trajectory.load(path)


def test_a_complete_recording_passes_and_keeps_its_residuals(tmp_path):
    net = _net()
    X, y = _data()
    km = pkfast.KernelMachine(net, _record(tmp_path / "t", net, X, y), X, progress=False)
    assert km.update_residual.shape == (4,) and float(km.update_residual.max()) < 1e-12
    assert torch.allclose(km.predict(X[:3]), net(X[:3]), atol=1e-8)
    assert km.certificate(X[:2]).update is km.update_residual  # measured once


def test_unequal_micro_batches_are_refused(tmp_path):
    net = _net()
    X, y = _data()
    traj = _record(tmp_path / "t", net, X, y, micro=2)  # mean of the two micro-batch means ≠ the batch mean
    with pytest.raises(ValueError, match=r"(?s)exceeds 0.001 on \d+ of 4 steps.*accumulation"):
        pkfast.KernelMachine(net, traj, X, progress=False)


def test_x_train_in_another_order_is_refused(tmp_path):
    net = _net()
    X, y = _data()
    traj = _record(tmp_path / "t", net, X, y)
    perm = torch.randperm(N, generator=torch.Generator().manual_seed(5))
    with pytest.raises(ValueError, match=r"(?s)update residual.*another order"):  # (the data check, which refuses
        # this first from the recorded input fingerprints, is tests/machine/test_data_check.py's)
        pkfast.KernelMachine(net, traj, X[perm], y[perm], progress=False, check_data=False)


def test_adamw_checkpoints_read_as_sgd_are_refused(tmp_path):
    net = _net()
    X, y = _data()
    o, lossf = torch.optim.AdamW(net.parameters(), lr=0.05), nn.CrossEntropyLoss()
    states, batches = [{k: v.clone() for k, v in net.state_dict().items()}], []
    for s in range(3):
        idx = torch.arange(s % 2 * 6, s % 2 * 6 + 6)
        o.zero_grad()
        lossf(net(X[idx]), y[idx]).backward()
        o.step()
        states.append({k: v.clone() for k, v in net.state_dict().items()})
        batches.append(idx)
    traj = pkfast.Trajectory.from_checkpoints(states, lr=0.05, batch_indices=batches)
    with pytest.raises(ValueError, match=r"(?s)update residual.*optimizer other than plain SGD.*TrajectoryRecorder"):
        pkfast.KernelMachine(net, traj, X, y, loss=lossf, progress=False)
    km = pkfast.KernelMachine(net, traj, X, y, loss=lossf, progress=False, verify=False)
    assert km.update_residual is None  # not measured when the check is off ...
    assert float(km.certificate(X[:1]).update.max()) > 1e-2  # ... and the certificate still shows it


def test_float32_storage_rounding_is_not_refused(tmp_path):
    """Weights trained and stored in float32: the residual is the storage's rounding, accepted."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(D, H), nn.Tanh(), nn.Linear(H, C))
    X, y = _data()
    traj = _record(tmp_path / "t", net, X.float(), y, lr=1e-3)
    km = pkfast.KernelMachine(net, traj, X.float(), progress=False)
    assert float(km.update_residual.max()) > 1e-9  # the rounding is visible, and tolerated



@pytest.mark.parametrize("make", [
    lambda o, c: torch.optim.lr_scheduler.OneCycleLR(o, max_lr=0.3, total_steps=6, cycle_momentum=c),
    lambda o, c: torch.optim.lr_scheduler.CyclicLR(o, base_lr=0.05, max_lr=0.3, step_size_up=2, cycle_momentum=c),
], ids=["OneCycleLR", "CyclicLR"])
def test_a_cycled_momentum_is_refused_with_cycle_momentum_false_as_the_remedy(tmp_path, make):
    """OneCycleLR/CyclicLR cycle SGD's momentum by default; the refusal names the range found and the flag."""
    X, y = _data()
    for cycle in (True, False):
        net, lossf = _net(), nn.CrossEntropyLoss()
        o = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
        sched = make(o, cycle)
        with pkfast.TrajectoryRecorder(net, o, tmp_path / f"r{cycle}", loss=lossf, targets=y) as rec:
            for s in range(5):
                idx = torch.arange(s % 2 * 6, s % 2 * 6 + 6)
                o.zero_grad()
                lossf(net(X[idx]), y[idx]).backward()
                o.step()
                rec.step(batch_indices=idx)
                sched.step()
        traj = pkfast.Trajectory.load(tmp_path / f"r{cycle}")
        if cycle:
            with pytest.raises(ValueError, match=r"changed during training \(found momentum from 0\.\d+ to 0\.\d+\).*"
                                                 r"pass cycle_momentum=False to the scheduler"):
                pkfast.KernelMachine(net, traj, X, progress=False)
        else:
            pkfast.KernelMachine(net, traj, X, progress=False)  # a fixed momentum: accepted
