"""The recording of adaptive optimizers (Adam, AdamW, RMSprop, Adagrad), gradient clipping and gradient accumulation is
complete: from w_t, the recorded preconditioner P_t, hyper-parameters, clipping coefficient, micro-batches and their
loss weights, an independent float64 re-implementation of each update rule (no torch.optim) gives the recorded
w_{t+1} to 1e-10; the state rows are checksummed and survive crashes and resumes like the weight rows."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import pkfast
from pkfast.trajectory.files import TrajectoryChecksumError
from tests.trajectory.adaptive_reference import check_updates

ROOT = Path(__file__).resolve().parents[2]
N, D, C = 24, 4, 3


def _data():
    g = torch.Generator().manual_seed(0)
    return torch.randn(N, D, generator=g, dtype=torch.float64), torch.randint(0, C, (N,), generator=g)


def _net(extra: bool = False):
    torch.manual_seed(1)
    net = torch.nn.Sequential(torch.nn.Linear(D, 6), torch.nn.Tanh(), torch.nn.Linear(6, C)).double()
    if extra:  # a head used only at some steps: no gradient at the others
        net.add_module("aux", torch.nn.Linear(C, C).double())
    return net


def _forward(net, x, step):
    out = net[2](net[1](net[0](x)))
    if hasattr(net, "aux") and step % 2 == 1:
        out = out + net.aux(out)
    return out


def _micro_batches(step):
    g = torch.Generator().manual_seed(100 + step)
    perm = torch.randperm(N, generator=g)
    return [perm[:5].tolist(), perm[5:8].tolist()]  # unequal micro-batches: weights 5/8, 3/8 give the batch mean


OPTIMIZERS = {
    "adam": lambda p: torch.optim.Adam(p, lr=0.05, betas=(0.8, 0.95), eps=1e-6, weight_decay=0.01),
    "adamw": lambda p: torch.optim.AdamW(p, lr=0.05, weight_decay=0.1),
    "adamw_amsgrad": lambda p: torch.optim.AdamW(p, lr=0.05, amsgrad=True, weight_decay=0.05),
    "rmsprop": lambda p: torch.optim.RMSprop(p, lr=0.01, alpha=0.9, eps=1e-6, weight_decay=0.01),
    "rmsprop_centered_momentum": lambda p: torch.optim.RMSprop(p, lr=0.01, momentum=0.9, centered=True),
    "adagrad": lambda p: torch.optim.Adagrad(p, lr=0.1, lr_decay=0.01, initial_accumulator_value=0.1,
                                             weight_decay=0.01, eps=1e-8),
}


def _train(path, opt_name, steps=4, *, clip=0.05, extra=False, state_dtype=None, resume=False, net=None, opt=None,
           start=0, schedule=True):
    X, y = _data()
    net = net or _net(extra)
    opt = opt or OPTIMIZERS[opt_name](net.parameters())
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + 0.3 * s)) if schedule else None
    with warnings.catch_warnings():  # (a resumed run's schedule, stepped to where it stopped)
        warnings.simplefilter("ignore", UserWarning)
        for _ in range(start):
            sched and sched.step()
    rec = pkfast.TrajectoryRecorder(net, opt, path, state_dtype=state_dtype, resume=resume, overwrite=not resume)
    for s in range(start, start + steps):
        mbs = _micro_batches(s)
        weights = [len(b) / 8 for b in mbs]
        opt.zero_grad()
        for b, w in zip(mbs, weights):
            (w * F.cross_entropy(_forward(net, X[b], s), y[b])).backward()
        if clip is not None:
            torch.nn.utils.clip_grad_norm_(net.parameters(), clip)
        opt.step()
        rec.step(micro_batches=mbs, micro_weights=weights)
        sched and sched.step()
    rec.close()
    return net, opt


def _batch_grad(w, X, y, step, rec_step):
    """Σ_j weight_j ∇ mean-CE(micro-batch j) at w, in float64, by autograd (no optimizer involved)."""
    params = {n: t.clone().requires_grad_(True) for n, t in w.items()}
    loss = 0.0
    for b, wt in zip(rec_step.micro_batches, rec_step.micro_weights):
        b = torch.from_numpy(np.array(b))
        h = torch.tanh(X[b] @ params["0.weight"].T + params["0.bias"]) @ params["2.weight"].T + params["2.bias"]
        out = h + (h @ params["aux.weight"].T + params["aux.bias"] if "aux.weight" in params and step % 2 else 0)
        loss = loss + wt * F.cross_entropy(out, y[b])
    grads = torch.autograd.grad(loss, list(params.values()), allow_unused=True)
    return {n: (torch.zeros_like(t) if g is None else g) for (n, t), g in zip(params.items(), grads)}


def _check_exact(path, tol=1e-10, traj=None):
    traj = traj or pkfast.Trajectory.load(path, verify=True)
    X, y = _data()
    check_updates(traj, lambda s, w, st: _batch_grad(w, X, y, s, st), tol)
    return traj


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_the_recorded_state_reproduces_every_update_exactly(tmp_path, name):
    _train(tmp_path / "t", name)
    traj = _check_exact(tmp_path / "t")
    assert traj.has_preconditioner and traj.preconditioner(0).dtype == torch.float64
    c = traj.clip_coefs()
    assert bool((c < 1).all()) and bool((c > 0).all()), c  # max_norm 0.05 clips every step
    st = traj.recording.steps[1]
    assert [len(b) for b in st.micro_batches] == [5, 3] and st.micro_weights == (5 / 8, 3 / 8)
    assert st.optimizer_state.step_count == 2 and st.optimizer_state.file == "state.bin"
    (b0, w0), (b1, w1) = traj.micro_batches(1)
    assert b0.tolist() == _micro_batches(1)[0] and b1.tolist() == _micro_batches(1)[1] and (w0, w1) == (5 / 8, 3 / 8)
    assert traj.optimizer.kind.adaptive and traj.optimizer.extra["group_params"] == [["0.weight", "0.bias",
                                                                                      "2.weight", "2.bias"]]


def test_parameters_without_a_gradient_are_recorded_as_skipped(tmp_path):
    _train(tmp_path / "t", "adam", steps=5, extra=True)
    traj = _check_exact(tmp_path / "t")
    refs = [s.optimizer_state for s in traj.recording.steps]
    assert refs[0].skipped == ("aux.weight", "aux.bias") and refs[1].skipped == ()
    assert refs[2].step_count == 3 and refs[2].step_counts is None  # (the updated parameters' count)
    assert refs[3].step_counts == (4, 4, 4, 4, 2, 2)  # aux updated at steps 1 and 3 only: its bias correction lags
    assert bool((traj.preconditioner(0, as_dict=True)["aux.weight"] == 0).all())


def test_unclipped_steps_record_coefficient_one_and_value_clipping_is_not_scalar(tmp_path):
    _train(tmp_path / "free", "adamw", clip=None)
    traj = _check_exact(tmp_path / "free")
    assert traj.clip_coefs().tolist() == [1.0] * 4
    assert all(s.clip_coef is None and s.clip_scalar is None for s in traj.recording.steps)

    X, y = _data()
    net = _net()
    opt = torch.optim.AdamW(net.parameters(), lr=0.05)
    with pkfast.TrajectoryRecorder(net, opt, tmp_path / "value") as rec:
        for s in range(2):
            opt.zero_grad()
            F.cross_entropy(net(X), y).backward()
            torch.nn.utils.clip_grad_value_(net.parameters(), 0.01)
            opt.step()
            rec.step(batch_indices=range(N))
    traj = pkfast.Trajectory.load(tmp_path / "value")
    assert all(s.clip_scalar is False for s in traj.recording.steps)
    assert bool(traj.clip_coefs().isnan().all())


def test_a_float32_state_dtype_stores_float32_rows(tmp_path):
    _train(tmp_path / "t", "adam", state_dtype=torch.float32)
    traj = pkfast.Trajectory.load(tmp_path / "t")
    assert traj.preconditioner(0).dtype == torch.float32
    assert (tmp_path / "t" / "state.bin").stat().st_size == 4 * traj.num_params * 4
    _check_exact(tmp_path / "t", tol=1e-6)  # P rounded once to float32: ~6e-8 relative
    with pytest.raises(ValueError, match="state_dtype must be torch.float32 or torch.float64"):
        pkfast.TrajectoryRecorder(_net(), torch.optim.Adam(_net().parameters()), tmp_path / "u",
                                  state_dtype=torch.int64)


def test_a_flipped_bit_in_the_state_file_is_detected(tmp_path):
    _train(tmp_path / "t", "adamw")
    p = tmp_path / "t" / "state.bin"
    b = bytearray(p.read_bytes())
    P = pkfast.Trajectory.load(tmp_path / "t").num_params
    b[2 * P * 8 + 5] ^= 0x10  # row 2
    p.write_bytes(bytes(b))
    traj = pkfast.Trajectory.load(tmp_path / "t")
    traj.preconditioner(1)
    with pytest.raises(TrajectoryChecksumError, match=r"state row 2 \(the optimizer state after step 2\).*state.bin"):
        traj.preconditioner(2)
    with pytest.raises(TrajectoryChecksumError, match="state row 2"):
        pkfast.Trajectory.load(tmp_path / "t", verify=True)


def test_a_state_row_lost_after_recording_is_reported(tmp_path):
    _train(tmp_path / "t", "adam")
    p = tmp_path / "t" / "state.bin"
    p.write_bytes(p.read_bytes()[: -8 * 3])
    with pytest.raises(ValueError, match="holds only 3 complete rows"):
        pkfast.Trajectory.load(tmp_path / "t")


def test_a_crash_between_the_rows_and_the_commit_then_resume_equals_an_uninterrupted_run(tmp_path):
    _train(tmp_path / "full", "adam", steps=6)
    net, opt = _train(tmp_path / "crashed", "adam", steps=4)
    P = pkfast.Trajectory.load(tmp_path / "crashed").num_params
    for f in ("weights.bin", "state.bin"):  # the crash: step 4's rows written, its line never committed
        with open(tmp_path / "crashed" / f, "ab") as fh:
            fh.write(np.ones(P, dtype=np.float64).tobytes())
    assert pkfast.Trajectory.load(tmp_path / "crashed", verify=True).num_steps == 4
    _train(tmp_path / "crashed", "adam", steps=2, resume=True, net=net, opt=opt, start=4)
    for f in ("weights.bin", "weights.crc", "state.bin", "state.crc", "steps.jsonl"):
        assert (tmp_path / "crashed" / f).read_bytes() == (tmp_path / "full" / f).read_bytes(), f
    _check_exact(tmp_path / "crashed")


WORKER = textwrap.dedent("""
    import os, signal, sys
    sys.path.insert(0, sys.argv[3])
    import torch
    from test_adaptive_recording import _train
    net, opt = _train(sys.argv[1], "adamw_amsgrad", int(sys.argv[2]))
    torch.save({"net": net.state_dict(), "opt": opt.state_dict()}, sys.argv[1] + ".pt")
    os.kill(os.getpid(), signal.SIGKILL)  # no close(), no flush at exit
""")


@pytest.mark.skipif(not hasattr(__import__("signal"), "SIGKILL"), reason="needs SIGKILL")
def test_resume_after_sigkill_keeps_the_state_rows_consistent_and_checksummed(tmp_path):
    path = tmp_path / "killed"
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    r = subprocess.run([sys.executable, "-c", WORKER, str(path), "3", str(Path(__file__).parent)], env=env,
                       capture_output=True, timeout=120)
    assert r.returncode == -9, r.stderr.decode()
    assert pkfast.Trajectory.load(path, verify=True).num_steps == 3
    saved = torch.load(str(path) + ".pt")
    net = _net()
    net.load_state_dict(saved["net"])
    opt = OPTIMIZERS["adamw_amsgrad"](net.parameters())
    opt.load_state_dict(saved["opt"])
    _train(path, "adamw_amsgrad", steps=2, resume=True, net=net, opt=opt, start=3)
    _train(tmp_path / "full", "adamw_amsgrad", steps=5)
    for f in ("state.bin", "state.crc", "weights.crc", "steps.jsonl"):
        assert (path / f).read_bytes() == (tmp_path / "full" / f).read_bytes(), f
    _check_exact(path)


def test_resume_with_another_optimizer_is_refused(tmp_path):
    net, _ = _train(tmp_path / "t", "adam", steps=2)
    with pytest.raises(ValueError, match="cannot resume.*optimizer state rows"):
        pkfast.TrajectoryRecorder(net, torch.optim.SGD(net.parameters(), lr=0.1), tmp_path / "t", resume=True)


def test_save_copies_the_state_rows_and_sgd_recordings_have_none(tmp_path):
    _train(tmp_path / "t", "rmsprop_centered_momentum")
    traj = pkfast.Trajectory.load(tmp_path / "t")
    copy = pkfast.Trajectory.load(traj.save(tmp_path / "copy"), verify=True)
    assert all(torch.equal(copy.preconditioner(s), traj.preconditioner(s)) for s in range(traj.num_steps))
    assert copy.recording == traj.recording

    X, y = _data()
    net = _net()
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    with pkfast.TrajectoryRecorder(net, opt, tmp_path / "sgd") as rec:
        for s in range(2):
            opt.zero_grad()
            F.cross_entropy(net(X), y).backward()
            opt.step()
            rec.step(batch_indices=range(N))
    sgd = pkfast.Trajectory.load(tmp_path / "sgd")
    assert not sgd.has_preconditioner and not (tmp_path / "sgd" / "state.bin").exists()
    assert "optimizer_state" not in (tmp_path / "sgd" / "steps.jsonl").read_text()
    with pytest.raises(ValueError, match="records no optimizer state"):
        sgd.preconditioner(0)


def test_the_reference_update_is_not_trivially_satisfied(tmp_path):
    """The check above fails when the recording misses a piece: ignoring the clipping coefficient breaks it."""
    _train(tmp_path / "t", "adamw")
    traj = pkfast.Trajectory.load(tmp_path / "t")
    traj.clip_coefs = lambda: torch.ones(traj.num_steps, dtype=torch.float64)  # as if clipping were not recorded
    with pytest.raises(AssertionError, match="recomputed update differs"):
        _check_exact(None, traj=traj)


def test_pkfast_info_prints_the_preconditioner_clipping_and_accumulation(tmp_path, capsys):
    from pkfast.cli import describe_trajectory, main

    _train(tmp_path / "t", "adamw")
    assert main(["info", str(tmp_path / "t")]) == 0
    out = capsys.readouterr().out
    assert "preconditioner: P_s per step (float64, 51 per row, in state.bin" in out
    assert "clipping: 4/4 steps clipped, 0 not by one scalar; gradient accumulation: 4 steps" in out
    d = describe_trajectory(tmp_path / "t")
    assert d["preconditioner"]["entries"][0] == ["0.weight", [6, 4]] and d["clipped"] == 4


def test_a_point_folding_several_steps_keeps_the_last_steps_state_and_no_clip(tmp_path):
    X, y = _data()
    net = _net()
    opt = torch.optim.Adam(net.parameters(), lr=0.05)
    with pkfast.TrajectoryRecorder(net, opt, tmp_path / "t") as rec:
        for s in range(4):
            opt.zero_grad()
            F.cross_entropy(net(X), y).backward()
            torch.nn.utils.clip_grad_norm_(net.parameters(), 0.01)
            opt.step()
            rec.skip() if s % 2 == 0 else rec.step()
    traj = pkfast.Trajectory.load(tmp_path / "t", verify=True)
    steps = traj.recording.steps
    assert traj.num_steps == 2 and [s.optimizer_steps for s in steps] == [2, 2]
    assert [s.optimizer_state.step_count for s in steps] == [2, 4]  # the state at each recorded point
    assert all(s.clip_coef is None for s in steps)  # a folded point has no one clipping coefficient
    v = opt.state[net[2].bias]["exp_avg_sq"]
    bc2 = 1 - 0.999 ** 4
    want = 1 / (v.sqrt() / bc2 ** 0.5 + 1e-8)
    assert torch.allclose(traj.preconditioner(1, as_dict=True)["2.bias"], want, rtol=1e-12, atol=0)


def test_a_recorder_that_fails_to_start_leaves_no_hooks(tmp_path):
    net = _net()
    opt = torch.optim.Adam(net.parameters())
    (tmp_path / "t").mkdir()
    (tmp_path / "t" / "other").write_text("not a trajectory")
    with pytest.raises(FileExistsError):
        pkfast.TrajectoryRecorder(net, opt, tmp_path / "t")
    assert not opt._optimizer_step_pre_hooks and not opt._optimizer_step_post_hooks
    assert all(not getattr(p, "_post_accumulate_grad_hooks", None) for p in net.parameters())


def test_a_recording_from_before_clipping_was_measured_loads_with_unknown_coefficients(tmp_path):
    import json

    X, y = _data()
    net = _net()
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    with pkfast.TrajectoryRecorder(net, opt, tmp_path / "old") as rec:
        for s in range(2):
            opt.zero_grad()
            F.cross_entropy(net(X), y).backward()
            opt.step()
            rec.step(batch_indices=range(N))
    man = json.loads((tmp_path / "old" / "manifest.json").read_text())
    for k in ("clip_measured", "group_params"):  # the manifest as earlier versions wrote it
        del man["meta"]["optimizer"][k]
    (tmp_path / "old" / "manifest.json").write_text(json.dumps(man))
    traj = pkfast.Trajectory.load(tmp_path / "old", verify=True)
    assert traj.num_steps == 2 and not traj.has_preconditioner
    assert bool(traj.clip_coefs().isnan().all())  # not measured: unknown, not 1
    assert [b.tolist() for b, _ in traj.micro_batches(0)] == [list(range(N))] and traj.micro_batches(0)[0][1] is None
