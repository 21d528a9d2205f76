"""What a new user hit (issue 14): recurrent models, models that mix the samples of a batch, damaged
trajectories and checkpoint files, out= locations that cannot be written, packaging, progress inside a tile.
The command line's side is in tests/test_cli.py."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

import pkfast
from pkfast.store import writer as store
from pkfast.reference import gram_reference
from tests._util import RTOL, rel_err
from tests.models import mlp, random_trajectory

F64 = torch.float64
ROOT = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------------------------------- recurrent models
class Recurrent(nn.Module):
    """[n, L, 3] sequences → a recurrent layer (either batch layout inside) → the last state → Linear(·, 2)."""

    def __init__(self, cell: type, batch_first: bool) -> None:
        super().__init__()
        self.batch_first = batch_first
        self.rnn = cell(3, 5, batch_first=batch_first)
        self.head = nn.Linear(5, 2)

    def forward(self, x):
        if not self.batch_first:
            x = x.transpose(0, 1)
        out, _ = self.rnn(x)
        if not self.batch_first:
            out = out.transpose(0, 1)
        return self.head(torch.tanh(out[:, -1]))


class Packed(nn.Module):
    """Zero-padded sequences of different lengths, packed for a GRU; the output at each sample's last step."""

    def __init__(self) -> None:
        super().__init__()
        self.rnn = nn.GRU(3, 4, batch_first=True)
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        lengths = (x.abs().sum(-1) > 0).sum(1)
        packed = pack_padded_sequence(x, lengths.cpu(), batch_first=True, enforce_sorted=False)
        out, _ = pad_packed_sequence(self.rnn(packed)[0], batch_first=True, total_length=x.shape[1])
        last = out[torch.arange(x.shape[0]), lengths - 1]
        return self.head(last)


def _sequences(n: int, L: int = 6, pad: bool = False) -> torch.Tensor:
    X = torch.randn(n, L, 3, dtype=F64)
    if pad:
        for i in range(n):
            X[i, 2 + i % (L - 2):] = 0.0  # lengths 2 … L-1
    return X


@pytest.mark.parametrize("cell", [nn.RNN, nn.GRU, nn.LSTM])
@pytest.mark.parametrize("batch_first", [True, False])
def test_recurrent_models_equal_the_reference(cell, batch_first):
    torch.manual_seed(0)
    net = Recurrent(cell, batch_first).to(F64)
    traj = random_trajectory(net, steps=2, scale=0.2)
    X, X2 = _sequences(5), _sequences(3)
    p = pkfast.plan(net, traj, X)
    assert "a loop over the samples" in str(p) and "vmap cannot run this model" in str(p)
    for outputs in ("trace", "full"):
        for x2 in (None, X2):
            ref = gram_reference(net, traj, X, x2, outputs=outputs)
            for method in ("auto", "jacobian"):
                K = pkfast.gram(net, traj, X, x2, outputs=outputs, method=method, dtype=F64, progress=False)
                assert rel_err(K, ref) <= RTOL[F64], (method, outputs, rel_err(K, ref))


def test_packed_sequences_and_the_loss_kernel_and_the_exact_rule():
    torch.manual_seed(0)
    net = Packed().to(F64)
    traj = random_trajectory(net, steps=2, scale=0.2)
    X, X2 = _sequences(5, pad=True), _sequences(3, pad=True)
    ref = gram_reference(net, traj, X, X2)
    assert rel_err(pkfast.gram(net, traj, X, X2, dtype=F64, progress=False), ref) <= RTOL[F64]
    y, y2 = torch.tensor([0, 1, 1, 0, 1]), torch.tensor([1, 0, 0])
    kw = dict(of="loss", loss="cross_entropy", y=y, y2=y2, dtype=F64, progress=False)
    J = pkfast.gram(net, traj, X, X2, method="jacobian", **kw)
    assert rel_err(pkfast.gram(net, traj, X, X2, **kw), J) <= RTOL[F64]
    E = pkfast.gram(net, traj, X, rule="exact", nodes=3, dtype=F64, progress=False)
    EJ = pkfast.gram(net, traj, X, rule="exact", nodes=3, method="jacobian", dtype=F64, progress=False)
    assert rel_err(E, EJ) <= RTOL[F64]


def test_a_recorded_gru_is_an_exact_kernel_machine(tmp_path):
    torch.manual_seed(0)
    net = Recurrent(nn.GRU, True).to(F64)
    X, y = _sequences(12), torch.randint(0, 2, (12,))
    opt, lossf = torch.optim.SGD(net.parameters(), lr=0.2), nn.CrossEntropyLoss()
    with pkfast.TrajectoryRecorder(net, opt, tmp_path / "t", loss=lossf, targets=y) as rec:
        for s in range(4):
            idx = torch.arange(s % 2 * 6, s % 2 * 6 + 6)
            opt.zero_grad()
            lossf(net(X[idx]), y[idx]).backward()
            opt.step()
            rec.step(batch_indices=idx)
    km = pkfast.KernelMachine(net, pkfast.Trajectory.load(tmp_path / "t"), X, nodes=4, progress=False)
    Xq = _sequences(3)
    with torch.no_grad():
        assert torch.allclose(km.predict(Xq), net(Xq), atol=1e-9)


# ---------------------------------------------------------------------------------------------- batch-mixing models
class CenterBatch(nn.Module):
    def forward(self, x):
        return x - x.mean(dim=0, keepdim=True)


def test_models_that_mix_the_batch_are_refused_naming_the_module():
    bn = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6, track_running_stats=False), nn.Tanh(), nn.Linear(6, 2))
    bn.eval()  # eval, yet batch statistics: no running statistics to use
    traj = random_trajectory(bn, steps=1)
    X = torch.randn(6, 4)
    # one sample alone cannot even be normalised with batch statistics: said as batch dependence, not a crash
    msg = r"output of a sample depends on the rest of its batch.*fails on one sample alone in module '1' " \
          r"\(BatchNorm1d\).*give it running statistics"
    with pytest.raises(ValueError, match=msg):
        pkfast.gram(bn, traj, X, progress=False)
    with pytest.raises(ValueError, match=msg):
        pkfast.plan(bn, traj, X)
    with pytest.raises(ValueError, match=msg):
        pkfast.sketch(bn, traj, X, k=8, progress=False)
    # over sequences one sample alone runs, with other statistics: the first module whose output differs is named
    seq = nn.Sequential(nn.Conv1d(2, 3, 3), nn.BatchNorm1d(3, track_running_stats=False), nn.Flatten(),
                        nn.Linear(15, 2)).eval()
    with pytest.raises(ValueError, match=r"evaluated alone and in a batch of 4 samples of X, sample 0's outputs "
                                         r"differ by .*first module whose output differs is '1' \(BatchNorm1d\)"):
        pkfast.gram(seq, random_trajectory(seq, steps=1), torch.randn(6, 2, 7), progress=False)
    centred = nn.Sequential(nn.Linear(4, 6), CenterBatch(), nn.Tanh(), nn.Linear(6, 2))
    with pytest.raises(ValueError, match=r"depends on the rest of its batch.*'1' \(CenterBatch\).*treat each sample"):
        pkfast.gram(centred, random_trajectory(centred, steps=1), X, progress=False)


def test_the_kernel_machine_refuses_a_batch_mixing_model(tmp_path):
    net = nn.Sequential(nn.Linear(4, 6), CenterBatch(), nn.Tanh(), nn.Linear(6, 2)).to(F64)
    X, y = torch.randn(8, 4, dtype=F64), torch.randint(0, 2, (8,))
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    with pkfast.TrajectoryRecorder(net, opt, tmp_path / "t", loss=nn.CrossEntropyLoss(), targets=y) as rec:
        opt.zero_grad()
        nn.functional.cross_entropy(net(X), y).backward()
        opt.step()
        rec.step(batch_indices=range(8))
    with pytest.raises(ValueError, match="depends on the rest of its batch"):
        pkfast.KernelMachine(net, pkfast.Trajectory.load(tmp_path / "t"), X, progress=False)


def test_a_random_forward_pass_is_named_as_such():
    class Noisy(nn.Module):
        def forward(self, x):
            return nn.functional.dropout(x, 0.5, training=True)

    net = nn.Sequential(nn.Linear(4, 3), Noisy())
    with pytest.raises(ValueError, match=r"draws random numbers in its forward pass"):
        pkfast.gram(net, random_trajectory(net, steps=1), torch.randn(5, 4), progress=False)


# ---------------------------------------------------------------------------------------------- damaged files
def _record(path: Path, steps: int) -> None:
    net = mlp()
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    X, y = torch.randn(8, 5), torch.randn(8, 3)
    with pkfast.TrajectoryRecorder(net, opt, path) as rec:
        for _ in range(steps):
            opt.zero_grad()
            nn.functional.mse_loss(net(X), y).backward()
            opt.step()
            rec.step()


def test_a_truncated_weight_file_is_reported_with_the_way_out(tmp_path):
    path = tmp_path / "rec"
    _record(path, 3)
    P = pkfast.Trajectory.load(path).num_params
    with open(path / "weights.bin", "r+b") as f:
        f.truncate(2 * P * 4)  # w_0, w_1 of 4 rows
    with pytest.raises(ValueError, match=r"is damaged: its step log records 3 steps, which need 4 weight rows .* "
                                         r"holds only 2 complete rows \(w_0 … w_1\).*allow_truncated=True.*resume=True"):
        pkfast.Trajectory.load(path)
    with pytest.warns(RuntimeWarning, match="loading the complete prefix of 1 step"):
        t = pkfast.Trajectory.load(path, allow_truncated=True)
    assert t.num_steps == 1


def test_checkpoint_files_that_are_not_state_dicts_are_named_and_never_unpickled(tmp_path):
    net = mlp()
    whole = tmp_path / "model.pt"
    torch.save(net, whole)  # a pickled module, not a state_dict
    good = tmp_path / "ok.pt"
    torch.save(net.state_dict(), good)
    with pytest.raises(ValueError) as e:
        pkfast.Trajectory.from_checkpoints([good, whole], lr=0.1)
    msg = str(e.value)
    assert str(whole) in msg and "pickled Python objects" in msg and "torch.save(model.state_dict(), path)" in msg
    assert "weights_only=False" not in msg
    junk = tmp_path / "junk.pt"
    junk.write_bytes(bytes(range(256)) * 4)
    with pytest.raises(ValueError, match=re.escape(str(junk)) + r".* is not a PyTorch checkpoint .*expected a file "
                                                                 r"written by torch.save\(state_dict\)"):
        pkfast.Trajectory.from_checkpoints([good, junk], lr=0.1)
    bad_st = tmp_path / "bad.safetensors"
    bad_st.write_bytes(b"not safetensors at all")
    with pytest.raises(ValueError, match=re.escape(str(bad_st)) + r".* is not a readable safetensors file"):
        pkfast.Trajectory.from_checkpoints([good, bad_st], lr=0.1)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match=r"is a folder without model weights; expected a Hugging Face "
                                                r"checkpoint folder holding one of model.safetensors"):
        pkfast.Trajectory.from_checkpoints([good, empty], lr=0.1)


# ---------------------------------------------------------------------------------------------- out= locations
def test_out_locations_that_cannot_be_written_say_so(tmp_path):
    net = mlp()
    traj = random_trajectory(net, steps=1)
    X = torch.randn(4, 5)
    with pytest.raises(FileNotFoundError, match=r"its directory .*missing does not exist \(pkfast does not create"):
        pkfast.gram(net, traj, X, out=tmp_path / "missing" / "K.npy", progress=False)
    assert not (tmp_path / "missing").exists()
    with pytest.raises(store.StoreError, match=r"cannot create files in /proc/self .*not a writable location"):
        pkfast.gram(net, traj, X, out="/proc/self/K.npy", progress=False)
    (tmp_path / "file").write_text("x")
    with pytest.raises(FileNotFoundError, match=r"its directory .*file is not a directory"):
        pkfast.gram(net, traj, X, out=tmp_path / "file" / "K.npy", progress=False)


# ---------------------------------------------------------------------------------------------- packaging, progress
def test_packaging_uses_the_current_license_form_and_docs_name_no_machine_paths():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert isinstance(meta["project"]["license"], str)  # an SPDX expression, not the deprecated table
    for doc in ("README.md", "benchmarks/README.md"):
        assert "/work/" not in (ROOT / doc).read_text(), doc


def test_a_single_tile_moves_the_progress_bar_before_it_ends(monkeypatch, tmp_path):
    """One tile, one term, several vmap chunks: the bar advances as each chunk of the side is formed."""
    import pkfast.engine.driver as driver
    import pkfast.engine.costs as costs

    updates: list[float] = []

    class Bar:
        def __init__(self, total=None, **kw):
            self.total = total

        def update(self, n):
            updates.append(float(n))

        def close(self):
            pass

    monkeypatch.setattr(driver, "tqdm", Bar)
    monkeypatch.setattr(costs, "DEFAULT_CHUNK_BYTES", 4 * 3 * 4 * 200)  # ~4 samples of the MLP's Jacobian a call
    net = mlp()
    traj = pkfast.Trajectory.from_checkpoints([net.state_dict(), net.state_dict()], lr=0.1)
    X = torch.randn(24, 5)
    K = pkfast.gram(net, traj, X, method="jacobian", out=tmp_path / "K.npy", progress=True)
    assert np.asarray(K).shape == (24, 24)
    assert len(updates) >= 4 and sum(updates[:-1]) > 0  # moved before the tile's product was added
    assert sum(updates) == pytest.approx(24 * 24)  # the whole tile in kernel entries, nothing more



@pytest.mark.skipif(torch.cuda.is_available(), reason="with a GPU the script runs its checks (make gpu-check)")
def test_gpu_check_says_there_is_no_gpu_and_exits_0():
    import subprocess
    import sys

    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py")], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0 and "no CUDA device here" in r.stdout and "nothing to check" in r.stdout
