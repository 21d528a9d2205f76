"""The kernel machine refuses training data that is not what the recording saw (issue 25, defect 1: "X_train passed
in another order than the recorded indices", max |predict − f(x)| 0.38 with nothing said): X_train against the
input fingerprints the recorder took, y_train against the recorded targets; opt-out check_data=False."""

from __future__ import annotations

import json
import re
import warnings

import pytest
import torch
import torch.nn as nn

import pkfast
from pkfast.machine.data_check import check_inputs
from pkfast.trajectory.fingerprints import KEY

D, H, C, N = 4, 8, 3, 12


def _net(seed=0, dtype=torch.float64):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(D, H), nn.Tanh(), nn.Linear(H, C)).to(dtype)


def _data():
    g = torch.Generator().manual_seed(1)
    return torch.randn(N, D, generator=g, dtype=torch.float64), torch.randint(0, C, (N,), generator=g)


def _record(path, net, X, y, *, steps=4, lr=0.3, **kw):
    """SGD with momentum on halves of the data (batches 0…5, 6…11, 0…5, …)."""
    lossf = nn.CrossEntropyLoss()
    o = torch.optim.SGD(net.parameters(), lr=lr, momentum=0.5)
    with pkfast.TrajectoryRecorder(net, o, path, loss=lossf, targets=y, **kw) as rec:
        for s in range(steps):
            idx = torch.arange(s % 2 * 6, s % 2 * 6 + 6)
            o.zero_grad()
            lossf(net(X[idx]), y[idx]).backward()
            o.step()
            rec.step(batch_indices=idx)
    return pkfast.Trajectory.load(path)


def test_the_recorded_x_train_passes_also_in_float64_for_a_float32_run(tmp_path):
    net, (X, y) = _net(), _data()
    traj = _record(tmp_path / "t", net, X, y)
    assert all(KEY in s.extra for s in traj.recording.steps)
    km = pkfast.KernelMachine(net, traj, X, progress=False)
    assert torch.allclose(km.predict(X[:3]), net(X[:3]), atol=1e-8)
    net32 = _net(dtype=torch.float32)
    traj32 = _record(tmp_path / "t32", net32, X.float(), y, lr=1e-3)
    pkfast.KernelMachine(net32, traj32, X, progress=False)  # float64 rows hash as their float32 value


def test_a_permuted_x_train_is_refused_naming_step_position_and_rows(tmp_path):
    net, (X, y) = _net(), _data()
    traj = _record(tmp_path / "t", net, X, y)
    perm = torch.randperm(N, generator=torch.Generator().manual_seed(5))
    with pytest.raises(ValueError) as e:
        pkfast.KernelMachine(net, traj, X[perm], progress=False)
    msg = str(e.value)
    m = re.search(r"at step 0, position (\d+) of its batch \(training index (\d+)\)", msg)
    assert m and m.group(1) == m.group(2)  # (step 0's batch is 0…5: position p is training index p)
    moved = re.search(r"X_train appears permuted: recorded row (\d+) is at row (\d+)", msg)
    assert moved and int(perm[int(moved.group(2))]) == int(moved.group(1))  # X[perm][j] is X[perm[j]]
    assert "in the order the recorded batch indices refer to" in msg and "check_data=False" in msg
    # the same data check stands before the update residual for a permuted y_train along with it
    with pytest.raises(ValueError, match="X_train appears permuted"):
        pkfast.KernelMachine(net, traj, X[perm], y[perm], check_data=True, progress=False, verify=False)


def test_one_changed_row_is_refused_as_other_data(tmp_path):
    net, (X, y) = _net(), _data()
    traj = _record(tmp_path / "t", net, X, y)
    X2 = X.clone()
    X2[3] += 1e-3  # row 3 is in the batches of steps 0 and 2, at position 3
    with pytest.raises(ValueError, match=r"(?s)at step 0, position 3 of its batch \(training index 3\).*"
                                         r"2 of 24 recorded batch rows differ, in 2 of 4 checked steps.*"
                                         r"None of the recorded rows examined is anywhere in X_train"):
        pkfast.KernelMachine(net, traj, X2, progress=False)


def test_check_data_false_builds_and_leaves_the_update_check(tmp_path):
    net, (X, y) = _net(), _data()
    traj = _record(tmp_path / "t", net, X, y)
    perm = torch.randperm(N, generator=torch.Generator().manual_seed(5))
    with pytest.raises(ValueError, match=r"(?s)update residual.*another order"):  # the residual still sees it
        pkfast.KernelMachine(net, traj, X[perm], y[perm], check_data=False, progress=False)
    km = pkfast.KernelMachine(net, traj, X[perm], y[perm], check_data=False, verify=False, progress=False)
    assert km.X.shape == (N, D)


def test_fingerprint_false_records_nothing_to_check(tmp_path):
    net, (X, y) = _net(), _data()
    traj = _record(tmp_path / "t", net, X, y, fingerprint=False)
    assert all(KEY not in s.extra for s in traj.recording.steps)
    with pytest.raises(ValueError, match=r"(?s)update residual.*another order") as e:
        pkfast.KernelMachine(net, traj, X.flip(0), progress=False)  # (y: the recorded targets)
    assert "not the data the recording saw" not in str(e.value)


def test_an_old_recording_without_fingerprints_still_builds(tmp_path):
    net, (X, y) = _net(), _data()
    _record(tmp_path / "t", net, X, y)
    p = tmp_path / "t" / "steps.jsonl"
    lines = [json.loads(line) for line in p.read_text().splitlines()]
    p.write_text("".join(json.dumps({k: v for k, v in line.items() if k != KEY}) + "\n" for line in lines))
    km = pkfast.KernelMachine(net, pkfast.Trajectory.load(tmp_path / "t"), X, progress=False)
    assert float(km.update_residual.max()) < 1e-12


def test_y_train_unlike_the_recorded_targets_is_refused(tmp_path):
    net, (X, y) = _net(), _data()
    traj = _record(tmp_path / "t", net, X, y)
    wrong = y.clone()
    wrong[7] = (wrong[7] + 1) % C
    with pytest.raises(ValueError, match=r"y_train differs from the targets recorded with the trajectory at 1 of 12 "
                                         r"rows \(first at row 7.*check_data=False"):
        pkfast.KernelMachine(net, traj, X, wrong, progress=False)
    pkfast.KernelMachine(net, traj, X, y.to(torch.int32), progress=False)  # the same targets in another dtype


def test_edited_fingerprints_are_refused_and_unmatched_inputs_warn(tmp_path):
    net, (X, y) = _net(), _data()
    _record(tmp_path / "t", net, X, y)
    p = tmp_path / "t" / "steps.jsonl"
    lines = [json.loads(line) for line in p.read_text().splitlines()]
    lines[1][KEY]["0"]["crc32"] = lines[1][KEY]["0"]["crc32"][:-1]
    p.write_text("".join(json.dumps(line) + "\n" for line in lines))
    traj = pkfast.Trajectory.load(tmp_path / "t")
    with pytest.raises(ValueError, match=r"step 1 records 5 input fingerprints for a batch of 6.*check_data=False"):
        pkfast.KernelMachine(net, traj, X, progress=False)
    rec, batches = traj.recording, [torch.arange(s % 2 * 6, s % 2 * 6 + 6) for s in range(4)]
    with warnings.catch_warnings(record=True) as w:  # rows of another shape (cropping, padding) cannot be compared
        warnings.simplefilter("always")
        assert check_inputs("demo", rec, X[:, :3], batches) == 0
    assert any("4 of 4 steps with recorded input fingerprints could not be compared" in str(x.message) and
               "rows of shape [4], while X_train's have [3]" in str(x.message) for x in w)


def test_a_mapping_x_train_is_checked_field_by_field(tmp_path):
    class TwoFields(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.lin = nn.Linear(D + 2, C).double()

        def forward(self, a=None, b=None):
            return self.lin(torch.cat([a, b], dim=1))

    net, (X, y) = TwoFields(), _data()
    B = torch.randn(N, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    lossf = nn.CrossEntropyLoss()
    o = torch.optim.SGD(net.parameters(), lr=0.3)
    with pkfast.TrajectoryRecorder(net, o, tmp_path / "t", loss=lossf, targets=y) as rec:
        for s in range(3):
            idx = torch.arange(s % 2 * 6, s % 2 * 6 + 6)
            o.zero_grad()
            lossf(net(a=X[idx], b=B[idx]), y[idx]).backward()
            o.step()
            rec.step(batch_indices=idx)
    traj = pkfast.Trajectory.load(tmp_path / "t")
    assert sorted(traj.recording.steps[0].extra[KEY]) == ["a", "b"]
    pkfast.KernelMachine(net, traj, {"a": X, "b": B}, progress=False)
    with pytest.raises(ValueError, match=r"input 'b' was recorded with CRC-32.*X_train appears permuted"):
        pkfast.KernelMachine(net, traj, {"a": X, "b": B.flip(0)}, progress=False)
