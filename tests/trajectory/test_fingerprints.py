"""Input fingerprints (issue 25, data order): the recorder keeps a CRC-32 per batch row of what the model received in
each step's training forward pass, in the step's own line (crash-safe and resumed like the rest of it); forwards
that are not the batch's (evaluation under no_grad, torch.func transforms, other data) never become a fingerprint."""

from __future__ import annotations

import json
import zlib

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pkfast import Trajectory, TrajectoryRecorder
from pkfast.cli import describe_trajectory, main as cli_main
from pkfast.trajectory.fingerprints import KEY, row_crcs, step_prints

N = 16


def _net():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.Tanh(), torch.nn.Linear(6, 3))


def _data():
    g = torch.Generator().manual_seed(7)
    return torch.randn(N, 4, generator=g), torch.randint(0, 3, (N,), generator=g)


def _batch(s):
    return torch.randperm(N, generator=torch.Generator().manual_seed(100 + s))[:5].tolist()


def _lines(path):
    return [json.loads(line) for line in (path / "steps.jsonl").read_text().splitlines()]


def _crcs(rows: torch.Tensor) -> list[int]:
    return [zlib.crc32(r.tobytes()) for r in rows.to(torch.float32).numpy()]


def _record(path, steps=4, *, net=None, forward=None, **kw):
    net = _net() if net is None else net
    X, y = _data()
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    with TrajectoryRecorder(net, opt, path, **kw) as rec:
        for s in range(steps):
            idx = _batch(s)
            opt.zero_grad()
            (forward or (lambda net, X, idx: F.cross_entropy(net(X[idx]), y[idx])))(net, X, idx).backward()
            opt.step()
            rec.step(batch_indices=idx)
    return net


def test_each_step_keeps_the_crc_of_every_batch_row(tmp_path):
    X, _ = _data()

    def forward(net, X, idx):
        with torch.no_grad():
            net(X)  # an evaluation pass between steps: not the batch, not fingerprinted
        return net(X[idx]).sum()

    net = _record(tmp_path / "t", forward=forward)
    for s, line in enumerate(_lines(tmp_path / "t")):
        assert line[KEY] == {"0": {"shape": [4], "dtype": "float32", "crc32": _crcs(X[_batch(s)])}}
    assert not net._forward_pre_hooks  # close() removed the recorder's hook


def test_canonical_form_ignores_the_float_width_and_the_integer_width():
    X = torch.randn(3, 2, 2, dtype=torch.float64)
    assert row_crcs(X).tolist() == row_crcs(X.float()).tolist() == _crcs(X.reshape(3, -1))
    ids = torch.tensor([[1, 5], [7, 0]])
    assert row_crcs(ids.to(torch.int8)).tolist() == row_crcs(ids).tolist()
    assert row_crcs(X[[0, 0]]).tolist()[0] == row_crcs(X[[0, 0]]).tolist()[1] != row_crcs(X[[1]]).tolist()[0]


def test_micro_batches_concatenate_and_ambiguous_forwards_record_nothing(tmp_path):
    X, _ = _data()

    def accumulate(net, X, idx):  # two micro-batches whose rows add up to the batch: kept, in order
        return net(X[idx[:2]]).sum() + net(X[idx[2:]]).sum()

    _record(tmp_path / "acc", forward=accumulate)
    assert _lines(tmp_path / "acc")[1][KEY]["0"]["crc32"] == _crcs(X[_batch(1)])

    def extra_pass(net, X, idx):  # a second pass on other data with autograd on: which rows were the batch?
        return net(X[idx]).sum() + net(X[: len(idx)]).sum()

    _record(tmp_path / "amb", forward=extra_pass)
    assert all(KEY not in line for line in _lines(tmp_path / "amb"))

    def twice(net, X, idx):  # the same batch twice: unambiguous
        return net(X[idx]).sum() + net(X[idx]).pow(2).sum()

    _record(tmp_path / "twice", forward=twice)
    assert _lines(tmp_path / "twice")[0][KEY]["0"]["crc32"] == _crcs(X[_batch(0)])


def test_torch_func_calls_during_training_are_not_fingerprinted(tmp_path):
    X, _ = _data()

    def with_vmap(net, X, idx):
        torch.func.vmap(net)(X[: len(idx)])  # (functorch-wrapped rows: no data, the call is ignored)
        return net(X[idx]).sum()

    _record(tmp_path / "t", forward=with_vmap)
    assert _lines(tmp_path / "t")[2][KEY]["0"]["crc32"] == _crcs(X[_batch(2)])


def test_keyword_inputs_are_fingerprinted_by_name(tmp_path):
    class TwoInputs(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin, self.emb = torch.nn.Linear(4, 3), torch.nn.Embedding(10, 3)

        def forward(self, x, ids=None):
            return self.lin(x) + self.emb(ids).sum(1)

    X, _ = _data()
    ids = torch.randint(0, 10, (N, 2), generator=torch.Generator().manual_seed(1))
    _record(tmp_path / "t", net=TwoInputs(), forward=lambda net, X, idx: net(X[idx], ids=ids[idx]).sum())
    got = _lines(tmp_path / "t")[0][KEY]
    assert sorted(got) == ["0", "ids"] and got["ids"]["dtype"] == "int64" and got["ids"]["shape"] == [2]
    assert got["ids"]["crc32"] == [zlib.crc32(r.tobytes()) for r in ids[_batch(0)].numpy()]


def test_fingerprint_false_records_none_and_leaves_no_hook(tmp_path):
    net = _record(tmp_path / "t", fingerprint=False)
    assert all(KEY not in line for line in _lines(tmp_path / "t"))
    assert not net._forward_pre_hooks
    assert describe_trajectory(tmp_path / "t")["input_fingerprints"] == 0


def test_steps_without_batch_indices_or_skipped_keep_none(tmp_path):
    net, (X, y) = _net(), _data()
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    with TrajectoryRecorder(net, opt, tmp_path / "t") as rec:
        for s in range(3):
            opt.zero_grad()
            net(X[_batch(s)]).sum().backward()
            opt.step()
            rec.skip() if s == 0 else rec.step(batch_indices=_batch(s) if s == 2 else None)
    lines = _lines(tmp_path / "t")
    assert KEY not in lines[0] and lines[1][KEY]["0"]["crc32"] == _crcs(X[_batch(2)])


def test_resume_after_a_crash_keeps_the_fingerprints_consistent(tmp_path):
    """A crash mid-step, a resume at w_2: the steps kept and those recorded after carry their batches' CRCs, and
    the log equals the uninterrupted recording's byte for byte."""
    X, y = _data()
    _record(tmp_path / "full", steps=5)
    path = tmp_path / "crashed"
    _record(path, steps=3)
    with open(path / "steps.jsonl", "ab") as f:
        f.write(b'{"lr":0.1,"batch_indices":[1,2],"input_fingerprints":{"0":{"sha')
    net = _net()
    net.load_state_dict(Trajectory.load(path).point(2))
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    with TrajectoryRecorder(net, opt, path, resume=True) as rec:
        for s in range(2, 5):
            opt.zero_grad()
            F.cross_entropy(net(X[_batch(s)]), y[_batch(s)]).backward()
            opt.step()
            rec.step(batch_indices=_batch(s))
    lines = _lines(path)
    assert [line[KEY]["0"]["crc32"] for line in lines] == [_crcs(X[_batch(s)]) for s in range(5)]
    assert (path / "steps.jsonl").read_bytes() == (tmp_path / "full" / "steps.jsonl").read_bytes()


def test_pkfast_info_says_whether_inputs_are_fingerprinted(tmp_path, capsys):
    _record(tmp_path / "t")
    assert describe_trajectory(tmp_path / "t")["input_fingerprints"] == 4
    assert cli_main(["info", str(tmp_path / "t")]) == 0
    assert "input fingerprints: 4/4 steps" in capsys.readouterr().out
    _record(tmp_path / "off", fingerprint=False)
    assert cli_main(["info", str(tmp_path / "off")]) == 0
    assert "input fingerprints: none" in capsys.readouterr().out


def test_old_recordings_without_fingerprints_load_as_before(tmp_path):
    _record(tmp_path / "t")
    lines = _lines(tmp_path / "t")
    (tmp_path / "t" / "steps.jsonl").write_text("".join(
        json.dumps({k: v for k, v in line.items() if k != KEY}, separators=(",", ":")) + "\n" for line in lines))
    traj = Trajectory.load(tmp_path / "t")
    assert traj.num_steps == 4 and all(KEY not in s.extra for s in traj.recording.steps)
    assert np.array_equal(traj.batch_indices(3), _batch(3))


def test_edited_fingerprint_entries_are_refused_saying_what_was_expected():
    good = {"shape": [4], "dtype": "float32", "crc32": [1, 2]}
    assert step_prints(3, {}) is None
    assert step_prints(3, {KEY: {"0": good}})["0"].crc32.tolist() == [1, 2]
    for bad, expected in [({"0": [1, 2]}, "a JSON object"), ({"0": dict(good, dtype="float99")}, "a torch dtype name"),
                          ({"0": dict(good, crc32=[-1])}, "CRC-32 values"), ({"0": dict(good, shape="4")}, "sizes"),
                          ([1], "a JSON object")]:
        with pytest.raises(ValueError, match=rf"step 3: {KEY}: expected .*{expected}.*re-record"):
            step_prints(3, {KEY: bad})
