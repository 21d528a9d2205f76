"""The typed recording (pkfast.trajectory.recording): it round-trips through its JSON files, refuses malformed
values saying what it expected, reads the trajectories pkfast 0.1 wrote, holds the fields adaptive optimizers will
need without changing shape, and the recorder and the training-loop recorder write the same record for one run."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import pkfast
from pkfast import cli
from pkfast.integrations import LoopRecorder
from pkfast.trajectory.recording import (GroupHyper, OptimizerKind, OptimizerSpec, Recording, StateRef,
                                         StepRecord)

V01 = Path(__file__).parents[1] / "data" / "v0.1" / "traj"


def _run(record, steps: int = 4, opt: str = "sgd"):
    """Train a small MLP for ``steps`` mini-batch steps; ``record(idx)`` after each optimizer step."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    X = torch.randn(12, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    y = torch.randint(0, 3, (12,), generator=torch.Generator().manual_seed(2))
    o = (torch.optim.SGD(net.parameters(), lr=0.2, momentum=0.9, nesterov=True, weight_decay=1e-3) if opt == "sgd"
         else torch.optim.AdamW(net.parameters(), lr=0.01))
    sched = torch.optim.lr_scheduler.StepLR(o, step_size=1, gamma=0.7)
    return net, o, X, y, sched


def _train(net, o, X, y, sched, after, steps: int = 4):
    g = torch.Generator().manual_seed(3)
    for _ in range(steps):
        idx = torch.randperm(12, generator=g)[:5]
        o.zero_grad()
        nn.functional.cross_entropy(net(X[idx]), y[idx]).backward()
        o.step()
        sched.step()
        after(idx)


def _record(path, opt: str = "sgd", **kw) -> Path:
    net, o, X, y, sched = _run(None, opt=opt)
    with pkfast.TrajectoryRecorder(net, o, path, loss=nn.CrossEntropyLoss(), targets=y, **kw) as rec:
        _train(net, o, X, y, sched, lambda idx: rec.step(batch_indices=idx))
    return Path(path)


def _lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in (path / "steps.jsonl").read_text().splitlines()]


# ---------------------------------------------------------------------------------------------- round trip
def test_a_recorded_run_round_trips_through_its_files(tmp_path):
    path = _record(tmp_path / "t")
    rec = Recording.from_files(path)
    assert rec.num_steps == 4 and rec.has_targets and rec.loss["kind"] == "cross_entropy"
    assert rec.optimizer.kind is OptimizerKind.SGD and rec.optimizer.groups[0].nesterov is True
    h = rec.steps[0].groups[0]
    assert (h.momentum, h.nesterov, h.weight_decay, h.maximize) == (0.9, True, 1e-3, False)
    assert [s.lr for s in rec.steps] == pytest.approx([0.2 * 0.7 ** s for s in range(4)])
    assert all(len(s.micro_batches) == 1 and s.batch_indices.shape == (5,) for s in rec.steps)
    meta, lines = rec.to_json()
    assert lines == _lines(path)  # what the recorder wrote is what the record writes
    assert meta == json.loads((path / "manifest.json").read_text())["meta"]
    assert Recording.from_json(meta, lines, has_targets=True) == rec
    traj = pkfast.Trajectory.load(path)
    assert traj.recording == rec  # the trajectory's view of the same files
    traj.save(tmp_path / "copy")
    assert Recording.from_files(tmp_path / "copy") == rec
    assert (tmp_path / "copy" / "steps.jsonl").read_bytes() == (path / "steps.jsonl").read_bytes()


def test_the_fields_of_adaptive_steps_are_optional_and_round_trip():
    sgd = StepRecord(0, 0.1, micro_batches=[[3, 1]])
    assert sgd.to_json() == {"lr": 0.1, "batch_indices": [3, 1]}  # nothing new is written for SGD
    assert sgd.clip_coef is None and sgd.optimizer_state is None and sgd.group_lrs is None and sgd.covers == 1
    adam = StepRecord(1, 0.01, micro_batches=[[0, 1], [2]], groups=(GroupHyper(betas=(0.9, 0.999), eps=1e-8,
                                                                                amsgrad=False, weight_decay=0.01),),
                      clip_coef=0.5, group_lrs=(0.01, 0.02), optimizer_state=StateRef("precond.bin", 1, step_count=2),
                      extra={"loss": 1.5})
    line = adam.to_json()
    assert line["batch_indices"] == [0, 1, 2] and line["micro_batches"] == [[0, 1], [2]]  # old readers: the batch
    assert line["optimizer"] == {"weight_decay": 0.01, "betas": [0.9, 0.999], "eps": 1e-8, "amsgrad": False}
    assert line["clip_coef"] == 0.5 and line["group_lrs"] == [0.01, 0.02] and line["loss"] == 1.5
    assert line["optimizer_state"] == {"file": "precond.bin", "row": 1, "step_count": 2}
    back = StepRecord.from_json(1, json.loads(json.dumps(line)))
    assert back == adam and back.batch_indices.tolist() == [0, 1, 2] and back.groups[0].betas == (0.9, 0.999)
    rec = Recording((sgd, adam), OptimizerSpec(OptimizerKind.ADAMW, "AdamW", "torch.optim.adamw"))
    assert Recording.from_json(*rec.to_json()) == rec


def test_adam_and_unknown_optimizers_are_described():
    p = [nn.Parameter(torch.zeros(3))]
    spec = OptimizerSpec.of(torch.optim.AdamW(p, lr=1e-3, amsgrad=True))
    assert spec.kind is OptimizerKind.ADAMW and spec.kind.adaptive and not OptimizerKind.SGD.adaptive
    g = spec.groups[0]
    assert g.betas == (0.9, 0.999) and g.amsgrad is True and g.lr == 1e-3 and "foreach" in g.extra
    assert OptimizerSpec.from_json(spec.to_json()) == spec

    class Odd(torch.optim.SGD):  # a rule pkfast does not model: its settings are kept as they are, untyped
        pass

    o = Odd(p, lr=0.1)
    o.param_groups[0]["eps"] = (1e-30, 1e-3)  # (Adafactor-style: not one number)
    spec = OptimizerSpec.of(o)
    assert spec.kind is OptimizerKind.OTHER and spec.groups[0].eps is None
    assert spec.groups[0].extra["eps"] == [1e-30, 1e-3]
    assert OptimizerKind.of("RMSprop") is OptimizerKind.RMSPROP and OptimizerKind.of("other") is OptimizerKind.OTHER


# ---------------------------------------------------------------------------------------------- validation
@pytest.mark.parametrize("make, says", [
    (lambda: StepRecord(0, -0.1), r"step 0: lr \(its step size\): expected a finite number ≥ 0; found -0.1"),
    (lambda: StepRecord(0, float("nan")), r"expected a finite number ≥ 0; found nan"),
    (lambda: StepRecord(0, 0.1, micro_batches=[]), r"micro_batches: expected a non-empty list .* pass \[batch_"),
    (lambda: StepRecord(0, 0.1, micro_batches=[[0.5]]), r"micro-batch 0: expected a list of integer training"),
    (lambda: StepRecord(0, 0.1, optimizer_steps=0), r"optimizer_steps: expected an integer ≥ 1; found 0"),
    (lambda: StepRecord(0, 0.1, clip_coef=-1), r"clip_coef: expected a finite number ≥ 0; found -1"),
    (lambda: GroupHyper(betas=(0.9, 1.0)), r"'betas': expected a finite number ≥ 0 and < 1; found 1.0"),
    (lambda: GroupHyper(betas=0.9), r"'betas': expected two numbers"),
    (lambda: GroupHyper(nesterov="yes"), r"'nesterov': expected true or false; found 'yes'"),
    (lambda: GroupHyper(momentum=-0.1), r"'momentum': expected a finite number ≥ 0; found -0.1"),
    (lambda: StateRef("/abs/file.bin", 0), r"optimizer_state.file: expected a file name inside the trajectory"),
    (lambda: StateRef("p.bin", -1), r"optimizer_state.row: expected an integer ≥ 0; found -1"),
    (lambda: Recording((StepRecord(1, 0.1),)), r"step #0: expected index 0 \(steps in order from 0\); found 1"),
    (lambda: Recording((), loss={"reduction": "mean"}), r"meta.loss: expected a loss convention .* record the loss"),
    (lambda: StepRecord.from_json(3, {"batch_indices": [0]}), r"step 3: expected a JSON object with its step size"),
    (lambda: StepRecord.from_json(2, {"lr": 0.1, "optimizer": {"momentum": "x"}}),
     r"step 2: optimizer: hyper-parameter 'momentum': expected a finite number ≥ 0; found 'x'"),
    (lambda: OptimizerSpec.from_json({"param_groups": []}), r"meta.optimizer: expected a JSON object with the "),
])
def test_malformed_values_are_refused_saying_what_was_expected(make, says):
    with pytest.raises(ValueError, match=says):
        make()


def test_records_are_frozen():
    s = StepRecord(0, 0.1, micro_batches=[[1, 2]])
    with pytest.raises(AttributeError):
        s.lr = 0.2  # type: ignore[misc]
    with pytest.raises(ValueError):
        s.micro_batches[0][0] = 5  # (read-only index arrays)


# ---------------------------------------------------------------------------------------------- old files
def test_the_trajectory_pkfast_0_1_wrote_loads(tmp_path):
    shutil.copytree(V01, tmp_path / "traj")
    rec = Recording.from_files(tmp_path / "traj")
    assert rec.num_steps == 3 and rec.has_targets and rec.buffers_recorded is True
    assert rec.optimizer.kind is OptimizerKind.SGD and rec.optimizer.module == "torch.optim.sgd"
    assert rec.optimizer.groups[0].lr == 0.1 and rec.optimizer.groups[0].extra["fused"] is None
    assert rec.loss == {"kind": "cross_entropy", "reduction": "mean", "weight": None, "label_smoothing": 0.0,
                        "ignore_index": -100}
    assert all(s.batch_indices.tolist() == [0, 1, 2, 3, 4, 5] and s.groups[0].momentum == 0.0 for s in rec.steps)
    # what the record would write is what pkfast 0.1 wrote (as JSON values)
    meta, lines = rec.to_json()
    assert lines == _lines(V01)
    assert meta == json.loads((V01 / "manifest.json").read_text())["meta"]


def test_a_trajectory_without_a_recording_is_plain_steps():
    net = nn.Linear(3, 2)
    w0 = {k: v.clone() for k, v in net.state_dict().items()}
    traj = pkfast.Trajectory.from_checkpoints([w0, {k: v + 1 for k, v in w0.items()}], lr=0.3,
                                              batch_indices=[[2, 0]])
    rec = traj.recording
    assert rec.optimizer is None and rec.loss is None and not rec.has_targets
    assert rec.steps[0].lr == 0.3 and rec.steps[0].batch_indices.tolist() == [2, 0] and rec.steps[0].groups == ()


# ---------------------------------------------------------------------------------------------- writers agree
def test_the_recorder_and_the_loop_recorder_write_the_same_record(tmp_path):
    """The callbacks (Hugging Face, Lightning) record through LoopRecorder; for one run it writes the record the
    plain recorder writes (the loop's name and interval in the manifest's other metadata aside)."""
    plain = Recording.from_files(_record(tmp_path / "plain"))
    net, o, X, y, sched = _run(None)
    loop = LoopRecorder(tmp_path / "loop", loss=nn.CrossEntropyLoss(), targets=y)
    loop.start(net, o, source="test-loop")
    _train(net, o, X, y, sched, loop.after_step)
    loop.finish()
    looped = Recording.from_files(tmp_path / "loop")
    assert looped.steps == plain.steps and looped.optimizer == plain.optimizer and looped.loss == plain.loss
    assert looped.extra == {"source": "test-loop", "every": 1} and plain.extra == {}


def test_adamw_is_recorded_typed_and_rebuilt_by_the_machine(tmp_path):
    path = _record(tmp_path / "adam", opt="adamw")
    rec = Recording.from_files(path)
    assert rec.optimizer.kind is OptimizerKind.ADAMW
    g = rec.steps[0].groups[0]
    assert g.betas == (0.9, 0.999) and g.eps == 1e-8 and g.amsgrad is False and g.weight_decay == 0.01
    net, _, X, _, _ = _run(None, opt="adamw")  # (the architecture; the machine takes the recorded weights)
    km = pkfast.KernelMachine(net, pkfast.Trajectory.load(path), X, nodes=4, progress=False)  # issue 26: exact
    trained, o, X, y, sched = _run(None, opt="adamw")
    _train(trained, o, X, y, sched, lambda idx: None)
    assert torch.allclose(km.predict(X), trained(X), rtol=0, atol=1e-12)


def test_pkfast_info_describes_a_trajectory(tmp_path, capsys):
    path = _record(tmp_path / "t")
    assert cli.main(["info", str(path)]) == 0
    out = capsys.readouterr().out
    assert "recorded trajectory, 4 steps" in out and "optimizer: SGD momentum=0.9" in out
    assert "batches: recorded for 4/4 steps; targets: saved" in out and "loss: cross_entropy (mean)" in out
    assert cli.main(["info", str(path), "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["kind"] == "trajectory" and d["optimizer"]["kind"] == "SGD" and d["steps"] == 4
    assert cli.main(["info", str(path), "--verify"]) == 2
    assert "--verify applies to a stored Gram" in capsys.readouterr().err
    assert np.isclose(d["lr_total"], sum(0.2 * 0.7 ** s for s in range(4)))
