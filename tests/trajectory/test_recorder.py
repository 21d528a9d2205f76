"""TrajectoryRecorder: recording equals hand-taken checkpoints, the applied learning rate is captured,
crash safety of the on-disk format, resume, and the error messages of every misuse."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pkfast import Trajectory, TrajectoryRecorder

N_DATA = 32


# ---------------------------------------------------------------------- helpers
def _net(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))


def _data():
    g = torch.Generator().manual_seed(123)
    X = torch.randn(N_DATA, 4, generator=g)
    y = torch.randint(0, 3, (N_DATA,), generator=g)
    return X, y


def _batch(s: int) -> list[int]:
    """A deterministic, step-dependent mini-batch of 8 ordered indices."""
    g = torch.Generator().manual_seed(1000 + s)
    return torch.randperm(N_DATA, generator=g)[:8].tolist()


def _train_step(net, opt, X, y, idx) -> float:
    opt.zero_grad()
    loss = F.cross_entropy(net(X[idx]), y[idx])
    loss.backward()
    opt.step()
    return float(loss.detach())


def _sd(net) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in net.state_dict().items()}


def _rows(traj: Trajectory) -> torch.Tensor:
    return torch.stack([traj.flat(k) for k in range(traj.num_points)])


def _lr_at(s: int) -> float:
    return 0.1 * 0.5 ** (s // 2)


def _record(path, steps: int, *, net=None, start: int = 0, **kw) -> torch.nn.Module:
    """Train ``steps`` SGD steps (lr schedule _lr_at, batches _batch) while recording to ``path``."""
    net = _net() if net is None else net
    X, y = _data()
    opt = torch.optim.SGD(net.parameters(), lr=_lr_at(start))
    with TrajectoryRecorder(net, opt, path, **kw) as rec:
        for s in range(start, start + steps):
            for g in opt.param_groups:
                g["lr"] = _lr_at(s)
            idx = _batch(s)
            _train_step(net, opt, X, y, idx)
            rec.step(batch_indices=idx)
    return net


def _assert_same_trajectory(a: Trajectory, b: Trajectory) -> None:
    assert a.spec == b.spec
    assert a.num_steps == b.num_steps
    assert torch.equal(_rows(a), _rows(b))
    assert torch.equal(a.step_sizes, b.step_sizes)
    for s in range(a.num_steps):
        ba, bb = a.batch_indices(s), b.batch_indices(s)
        assert (ba is None and bb is None) or np.array_equal(ba, bb)


def _hooks(opt) -> int:
    return len(getattr(opt, "_optimizer_step_post_hooks", {}))


# ---------------------------------------------------------------------- round trip
def test_recording_equals_hand_checkpoints_and_captures_applied_lr(tmp_path):
    net = _net()
    X, y = _data()
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    rec = TrajectoryRecorder(net, opt, tmp_path / "rec")
    assert rec.num_steps == 0
    hand = [_sd(net)]
    applied, batches = [], []
    for s in range(6):
        applied.append(opt.param_groups[0]["lr"])
        idx = _batch(s)
        batches.append(idx)
        _train_step(net, opt, X, y, idx)
        hand.append(_sd(net))
        sched.step()  # changes the lr BEFORE rec.step(): the hook must have captured the applied one
        rec.step(batch_indices=idx)
    assert rec.num_steps == 6
    assert rec.trajectory().num_steps == 6  # readable while recording
    rec.close()

    assert applied == [0.1, 0.1, 0.05, 0.05, 0.025, 0.025]
    traj = Trajectory.load(tmp_path / "rec")
    assert traj.is_memory_mapped
    assert traj.step_sizes.tolist() == applied
    ref = Trajectory.from_checkpoints(hand, lr=applied, batch_indices=batches)
    _assert_same_trajectory(traj, ref)
    for s in range(6):
        assert traj.batch_indices(s).tolist() == batches[s]
    assert traj.meta["optimizer"]["class"] == "SGD"
    assert traj.meta["optimizer"]["param_groups"][0]["lr"] == 0.1
    assert traj.meta["buffers_recorded"] is True
    assert "TrajectoryRecorder(" in repr(rec) and "steps=6" in repr(rec)


def test_batch_indices_accepts_sequences_arrays_tensors_and_none(tmp_path):
    net = _net()
    X, y = _data()
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    given = [range(3, 7), np.array([5, 1, 2]), torch.tensor([[9, 8], [7, 6]]), None, [0]]
    with TrajectoryRecorder(net, opt, tmp_path / "rec", meta={"run": "b"}) as rec:
        for s, b in enumerate(given):
            _train_step(net, opt, X, y, list(range(8)))
            rec.step(batch_indices=b, loss=1.5 * s, tag=f"s{s}")
    traj = Trajectory.load(tmp_path / "rec")
    assert traj.batch_indices(0).tolist() == [3, 4, 5, 6]
    assert traj.batch_indices(1).tolist() == [5, 1, 2]
    assert traj.batch_indices(2).tolist() == [9, 8, 7, 6]
    assert traj.batch_indices(3) is None
    assert traj.batch_indices(4).tolist() == [0]
    assert traj.meta["run"] == "b"
    lines = [json.loads(l) for l in (tmp_path / "rec" / "steps.jsonl").read_text().splitlines()]
    assert [l["loss"] for l in lines] == [0.0, 1.5, 3.0, 4.5, 6.0]
    assert lines[3]["tag"] == "s3"


def test_no_batch_indices_loads_as_none(tmp_path):
    net = _net()
    X, y = _data()
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    with TrajectoryRecorder(net, opt, tmp_path / "rec") as rec:
        for _ in range(2):
            _train_step(net, opt, X, y, list(range(8)))
            rec.step()
    traj = Trajectory.load(tmp_path / "rec")
    assert traj.batch_indices(0) is None and traj.batch_indices(1) is None


def test_context_manager_removes_hook_and_closes(tmp_path):
    net = _net()
    X, y = _data()
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    assert _hooks(opt) == 0
    with TrajectoryRecorder(net, opt, tmp_path / "rec") as rec:
        assert _hooks(opt) == 1
        for s in range(3):
            _train_step(net, opt, X, y, _batch(s))
            rec.step()
    assert _hooks(opt) == 0
    # training goes on without the recorder
    for s in range(3):
        _train_step(net, opt, X, y, _batch(s))
    with pytest.raises(RuntimeError, match="the recorder is closed"):
        rec.step()
    rec.close()  # idempotent
    assert Trajectory.load(tmp_path / "rec").num_steps == 3
    # the optimizer can be recorded again
    with TrajectoryRecorder(net, opt, tmp_path / "rec2") as rec2:
        _train_step(net, opt, X, y, _batch(0))
        rec2.step()
    assert Trajectory.load(tmp_path / "rec2").num_steps == 1


def test_context_manager_closes_on_exception(tmp_path):
    net = _net()
    X, y = _data()
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    with pytest.raises(KeyError):
        with TrajectoryRecorder(net, opt, tmp_path / "rec") as rec:
            for s in range(2):
                _train_step(net, opt, X, y, _batch(s))
                rec.step()
            raise KeyError("boom")
    assert _hooks(opt) == 0
    assert Trajectory.load(tmp_path / "rec").num_steps == 2


def test_buffers_recorded_frozen_params_and_integer_buffers_skipped(tmp_path):
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.BatchNorm1d(6), torch.nn.Tanh(), torch.nn.Linear(6, 3))
    net[0].bias.requires_grad_(False)
    X, y = _data()
    opt = torch.optim.SGD([p for p in net.parameters() if p.requires_grad], lr=0.1)
    hand = [_sd(net)]
    with TrajectoryRecorder(net, opt, tmp_path / "buf") as rec:
        for s in range(3):
            _train_step(net, opt, X, y, _batch(s))
            hand.append(_sd(net))
            rec.step()
    traj = Trajectory.load(tmp_path / "buf")
    names = set(traj.names)
    assert "1.running_mean" in names and "1.running_var" in names
    assert "1.num_batches_tracked" not in names
    assert "0.bias" not in names  # frozen
    for k, sd in enumerate(hand):
        point = traj.point(k)
        assert set(point) == names
        for n, v in point.items():
            assert torch.equal(v, sd[n]), (k, n)
    assert not torch.equal(traj.point(0)["1.running_mean"], traj.point(3)["1.running_mean"])

    with TrajectoryRecorder(net, opt, tmp_path / "nobuf", buffers=False) as rec:
        _train_step(net, opt, X, y, _batch(0))
        rec.step()
    t2 = Trajectory.load(tmp_path / "nobuf")
    assert set(t2.names) == {n for n, p in net.named_parameters() if p.requires_grad}
    assert t2.meta["buffers_recorded"] is False


def test_frozen_param_group_lr_is_ignored(tmp_path):
    net = _net()
    net[0].weight.requires_grad_(False)
    net[0].bias.requires_grad_(False)
    X, y = _data()
    opt = torch.optim.SGD(
        [{"params": net[0].parameters(), "lr": 0.9}, {"params": net[2].parameters(), "lr": 0.2}], lr=0.1
    )
    with TrajectoryRecorder(net, opt, tmp_path / "rec") as rec:
        _train_step(net, opt, X, y, _batch(0))
        rec.step()
    assert Trajectory.load(tmp_path / "rec").step_sizes.tolist() == [0.2]


def test_equal_lr_param_groups_are_fine(tmp_path):
    net = _net()
    X, y = _data()
    opt = torch.optim.SGD([{"params": net[0].parameters()}, {"params": net[2].parameters()}], lr=0.3)
    with TrajectoryRecorder(net, opt, tmp_path / "rec") as rec:
        _train_step(net, opt, X, y, _batch(0))
        rec.step()
    assert Trajectory.load(tmp_path / "rec").step_sizes.tolist() == [0.3]


def test_float64_model_recorded_in_float64(tmp_path):
    net = _net().double()
    X, y = _data()
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    hand = [_sd(net)]
    with TrajectoryRecorder(net, opt, tmp_path / "rec") as rec:
        for s in range(2):
            _train_step(net, opt, X.double(), y, _batch(s))
            hand.append(_sd(net))
            rec.step()
    traj = Trajectory.load(tmp_path / "rec")
    assert traj.dtype == torch.float64
    _assert_same_trajectory(traj, Trajectory.from_checkpoints(hand, lr=0.1))


# ---------------------------------------------------------------------- crash safety
def test_load_ignores_partial_row_and_partial_line(tmp_path):
    path = tmp_path / "rec"
    _record(path, 4)
    before = Trajectory.load(path)
    rows_before, eps_before = _rows(before).clone(), before.step_sizes
    del before
    P = rows_before.shape[1]
    with open(path / "weights.bin", "ab") as f:
        f.write(np.full(P // 2, 7.0, dtype=np.float32).tobytes())
    with open(path / "steps.jsonl", "ab") as f:
        f.write(b'{"lr":0.1,"batch_ind')
    after = Trajectory.load(path)
    assert after.num_steps == 4
    assert torch.equal(_rows(after), rows_before)
    assert torch.equal(after.step_sizes, eps_before)


def test_load_ignores_complete_row_whose_step_line_is_missing(tmp_path):
    """Crash between writing w_{s+1} and committing step s: the step does not exist."""
    path = tmp_path / "rec"
    _record(path, 3)
    ref = Trajectory.load(path)
    rows_ref = _rows(ref).clone()
    P = ref.num_params
    del ref
    with open(path / "weights.bin", "ab") as f:
        f.write(np.full(P, 3.0, dtype=np.float32).tobytes())
    assert (path / "weights.bin").stat().st_size == 5 * P * 4
    t = Trajectory.load(path)
    assert t.num_steps == 3
    assert torch.equal(_rows(t), rows_ref)
    # ... also with a partial line of the uncommitted step
    with open(path / "steps.jsonl", "ab") as f:
        f.write(b'{"lr":0.0')
    assert Trajectory.load(path).num_steps == 3


def test_load_with_step_line_but_partial_row(tmp_path):
    """A committed line whose weight row is incomplete (disk full, torn write) does not count either."""
    path = tmp_path / "rec"
    _record(path, 3)
    P = Trajectory.load(path).num_params
    with open(path / "weights.bin", "ab") as f:
        f.write(b"\0" * (P * 4 - 4))
    with open(path / "steps.jsonl", "ab") as f:
        f.write(b'{"lr":0.1,"batch_indices":null}\n')
    assert Trajectory.load(path).num_steps == 3


@pytest.mark.parametrize("crash", ["partial_row_and_line", "row_without_line"])
@pytest.mark.parametrize("resume_at", [4, 2])
def test_resume_after_crash_equals_uninterrupted(tmp_path, crash, resume_at):
    total = 7
    _record(tmp_path / "full", total)
    full = Trajectory.load(tmp_path / "full")

    path = tmp_path / "crashed"
    _record(path, 4)
    P = full.num_params
    if crash == "partial_row_and_line":
        with open(path / "weights.bin", "ab") as f:
            f.write(np.ones(P // 3, dtype=np.float32).tobytes())
        with open(path / "steps.jsonl", "ab") as f:
            f.write(b'{"lr":0.025,"bat')
    else:
        with open(path / "weights.bin", "ab") as f:
            f.write(np.ones(P, dtype=np.float32).tobytes())
    assert Trajectory.load(path).num_steps == 4

    # "restart": a fresh process builds a differently initialised model and loads a recorded point into it
    net = _net(seed=1)
    point = Trajectory.load(path).point(resume_at)
    net.load_state_dict(point)
    X, y = _data()
    opt = torch.optim.SGD(net.parameters(), lr=_lr_at(resume_at))
    with TrajectoryRecorder(net, opt, path, resume=True) as rec:
        assert rec.num_steps == resume_at
        assert Trajectory.load(path).num_steps == resume_at  # truncated after w_{resume_at}
        for s in range(resume_at, total):
            for g in opt.param_groups:
                g["lr"] = _lr_at(s)
            idx = _batch(s)
            _train_step(net, opt, X, y, idx)
            rec.step(batch_indices=idx)
        assert rec.num_steps == total
    resumed = Trajectory.load(path)
    _assert_same_trajectory(resumed, full)
    assert (path / "weights.bin").read_bytes() == (tmp_path / "full" / "weights.bin").read_bytes()
    assert (path / "steps.jsonl").read_bytes() == (tmp_path / "full" / "steps.jsonl").read_bytes()


def test_resume_on_missing_path_starts_a_new_recording(tmp_path):
    _record(tmp_path / "fresh", 2, resume=True)
    assert Trajectory.load(tmp_path / "fresh").num_steps == 2


def test_resume_with_weights_matching_no_point_raises(tmp_path):
    path = tmp_path / "rec"
    _record(path, 3)
    net = _net(seed=5)  # weights equal none of w_0 … w_3
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    with pytest.raises(ValueError, match=r"cannot resume .*current weights equal none of the 4 recorded points"):
        TrajectoryRecorder(net, opt, path, resume=True)
    assert _hooks(opt) == 0
    assert Trajectory.load(path).num_steps == 3  # nothing truncated


def test_resume_with_different_model_raises(tmp_path):
    path = tmp_path / "rec"
    _record(path, 2)
    net = torch.nn.Linear(4, 3)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="the model's entries differ from the recorded ones"):
        TrajectoryRecorder(net, opt, path, resume=True)


def test_resume_with_different_dtype_raises(tmp_path):
    path = tmp_path / "rec"
    net = _record(path, 2)
    net.double()
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="recorded dtype float32, model dtype float64"):
        TrajectoryRecorder(net, opt, path, resume=True)


def test_overwrite_and_resume_exclude_each_other(tmp_path):
    net = _net()
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="overwrite=True and resume=True exclude each other"):
        TrajectoryRecorder(net, opt, tmp_path / "rec", overwrite=True, resume=True)


# ---------------------------------------------------------------------- errors
def test_error_step_without_optimizer_step(tmp_path):
    net = _net()
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    with TrajectoryRecorder(net, opt, tmp_path / "rec") as rec:
        with pytest.raises(RuntimeError, match=r"expected exactly one optimizer\.step\(\) since the last record; found 0"):
            rec.step()


def test_error_two_optimizer_steps_between_records(tmp_path):
    net = _net()
    X, y = _data()
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    with TrajectoryRecorder(net, opt, tmp_path / "rec") as rec:
        _train_step(net, opt, X, y, _batch(0))
        rec.step()
        _train_step(net, opt, X, y, _batch(1))
        _train_step(net, opt, X, y, _batch(2))
        with pytest.raises(RuntimeError, match=r"expected exactly one optimizer\.step\(\) since the last record; found 2"):
            rec.step()
    assert Trajectory.load(tmp_path / "rec").num_steps == 1


def test_error_param_groups_with_different_lrs(tmp_path):
    net = _net()
    X, y = _data()
    opt = torch.optim.SGD([{"params": net[0].parameters(), "lr": 0.1}, {"params": net[2].parameters(), "lr": 0.2}])
    with TrajectoryRecorder(net, opt, tmp_path / "rec") as rec:
        _train_step(net, opt, X, y, _batch(0))
        with pytest.raises(ValueError, match=r"parameter groups applied different learning rates \[0\.1, 0\.2\]"):
            rec.step()


def test_error_existing_non_empty_path_without_overwrite(tmp_path):
    path = tmp_path / "rec"
    _record(path, 2)
    net = _net()
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    with pytest.raises(FileExistsError, match=r"already exists and is not empty; pass overwrite=True"):
        TrajectoryRecorder(net, opt, path)
    assert _hooks(opt) == 0
    assert Trajectory.load(path).num_steps == 2  # untouched

    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="already exists and is not empty"):
        TrajectoryRecorder(net, opt, other)
    with pytest.raises(FileExistsError, match="refusing to overwrite .*it is not a pkfast trajectory"):
        TrajectoryRecorder(net, opt, other, overwrite=True)
    assert (other / "notes.txt").read_text() == "keep me"


def test_existing_empty_directory_is_fine(tmp_path):
    (tmp_path / "empty").mkdir()
    _record(tmp_path / "empty", 1)
    assert Trajectory.load(tmp_path / "empty").num_steps == 1


def test_overwrite_replaces_existing_recording(tmp_path):
    path = tmp_path / "rec"
    _record(path, 5)
    old = Trajectory.load(path)
    old_rows = _rows(old).clone()
    del old
    net = _net(seed=3)
    _record(path, 2, net=net, overwrite=True)
    new = Trajectory.load(path)
    assert new.num_steps == 2
    assert not torch.equal(new.flat(0), old_rows[0])
    assert (path / "weights.bin").stat().st_size == 3 * new.num_params * 4
    assert len((path / "steps.jsonl").read_text().splitlines()) == 2


def test_error_model_without_trainable_params(tmp_path):
    net = _net()
    net.requires_grad_(False)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    with pytest.raises(ValueError, match=r"the model has no trainable parameters \(requires_grad=True\)"):
        TrajectoryRecorder(net, opt, tmp_path / "rec")
    assert not (tmp_path / "rec").exists()
    with pytest.raises(ValueError, match="no trainable parameters"):
        TrajectoryRecorder(torch.nn.Tanh(), opt, tmp_path / "rec")


def test_error_not_a_module(tmp_path):
    net = _net()
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    with pytest.raises(TypeError, match="model must be a torch.nn.Module; found OrderedDict"):
        TrajectoryRecorder(net.state_dict(), opt, tmp_path / "rec")


def test_error_not_an_optimizer(tmp_path):
    net = _net()
    with pytest.raises(TypeError, match="optimizer must be a torch.optim.Optimizer; found list"):
        TrajectoryRecorder(net, list(net.parameters()), tmp_path / "rec")
    sched_owner = torch.optim.SGD(net.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.StepLR(sched_owner, step_size=1)
    with pytest.raises(TypeError, match="optimizer must be a torch.optim.Optimizer; found StepLR"):
        TrajectoryRecorder(net, sched, tmp_path / "rec")
