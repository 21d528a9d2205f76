"""Checksums of a recorded trajectory's weight rows (``weights.crc``): a flipped bit in ``weights.bin`` is caught
when the row is read (or at load with ``verify=True``), an untouched recording reads fine, a recording made
before checksums loads with a one-time note, and a resume after a crash (or a SIGKILL) leaves valid checksums."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pkfast import Trajectory, TrajectoryRecorder
from pkfast.cli import describe_trajectory
from pkfast.store import StoreError
from pkfast.trajectory import files

ROOT = Path(__file__).resolve().parents[2]


def _net(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))


def _train(net, opt, s: int) -> None:
    g = torch.Generator().manual_seed(s)
    X, y = torch.randn(16, 4, generator=g), torch.randint(0, 3, (16,), generator=g)
    opt.zero_grad()
    F.cross_entropy(net(X), y).backward()
    opt.step()


def _record(path: Path, steps: int, *, net=None, start: int = 0, **kw) -> torch.nn.Module:
    net = _net() if net is None else net
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    with TrajectoryRecorder(net, opt, path, **kw) as rec:
        for s in range(start, start + steps):
            _train(net, opt, s)
            rec.step(batch_indices=list(range(16)))
    return net


def _flip_bit(path: Path, row: int, P: int, col: int = 3, bit: int = 0) -> None:
    off = (row * P + col) * 4
    with open(path / "weights.bin", "r+b") as f:
        f.seek(off)
        b = f.read(1)[0]
        f.seek(off)
        f.write(bytes([b ^ (1 << bit)]))


def _all_rows_verified(path: Path) -> None:
    t = Trajectory.load(path, verify=True)
    assert t.has_checksums
    crcs = files.read_checksums(path)
    assert set(range(t.num_points)) <= set(crcs)
    for k in range(t.num_points):
        t.flat(k)


def test_an_untouched_recording_has_a_checksum_per_row_and_reads_fine(tmp_path):
    _record(tmp_path / "t", 4)
    t = Trajectory.load(tmp_path / "t", verify=True)
    assert t.has_checksums and t.num_points == 5
    t.check()
    assert len((tmp_path / "t" / "weights.crc").read_text().splitlines()) == 5
    assert describe_trajectory(tmp_path / "t")["checksums"] is True


def test_a_flipped_bit_is_caught_when_its_row_is_read(tmp_path):
    _record(tmp_path / "t", 4)
    P = Trajectory.load(tmp_path / "t").num_params
    _flip_bit(tmp_path / "t", 2, P, bit=0)  # the lowest mantissa bit: still a finite, plausible weight
    t = Trajectory.load(tmp_path / "t")  # lazy: the damage is not read yet
    t.flat(0), t.flat(1), t.point(3)
    with pytest.raises(files.TrajectoryChecksumError,
                       match=r"weight row 2 \(w_2, the point after step 1\) of '.*weights\.bin' does not match its "
                             r"recorded checksum: expected CRC-32 [0-9a-f]{8}, found [0-9a-f]{8}.*re-record the "
                             r"trajectory or restore weights\.bin"):
        t.point(2)
    with pytest.raises(StoreError):  # the store's error type
        t.flat(2)


def test_verify_true_checks_every_row_at_load(tmp_path):
    _record(tmp_path / "t", 3)
    P = Trajectory.load(tmp_path / "t").num_params
    _flip_bit(tmp_path / "t", 3, P, col=P - 1, bit=5)
    Trajectory.load(tmp_path / "t")  # lazy by default
    with pytest.raises(files.TrajectoryChecksumError, match=r"weight row 3 .*expected CRC-32"):
        Trajectory.load(tmp_path / "t", verify=True)


def test_a_row_whose_checksum_line_is_missing_is_reported(tmp_path):
    _record(tmp_path / "t", 3)
    crc = tmp_path / "t" / "weights.crc"
    lines = crc.read_text().splitlines(keepends=True)
    crc.write_text("".join(lines[:1] + lines[2:]))
    with pytest.raises(files.TrajectoryChecksumError, match=r"row 1 .*expected CRC-32 none .*damaged"):
        Trajectory.load(tmp_path / "t").flat(1)


def test_a_recording_without_checksums_loads_with_a_one_time_note(tmp_path, caplog):
    _record(tmp_path / "old", 3)
    (tmp_path / "old" / "weights.crc").unlink()  # as pkfast wrote it before checksums
    with caplog.at_level(logging.WARNING, logger="pkfast.trajectory"):
        t = Trajectory.load(tmp_path / "old", verify=True)
        Trajectory.load(tmp_path / "old")
    notes = [r for r in caplog.records if "carries no weight checksums" in r.getMessage()]
    assert len(notes) == 1 and str(tmp_path / "old") in notes[0].getMessage()
    assert not t.has_checksums
    t.check()
    assert describe_trajectory(tmp_path / "old")["checksums"] is False


def test_resuming_a_recording_without_checksums_adds_them(tmp_path):
    net = _record(tmp_path / "old", 3)
    (tmp_path / "old" / "weights.crc").unlink()
    _record(tmp_path / "old", 2, net=net, start=3, resume=True)
    _all_rows_verified(tmp_path / "old")
    assert Trajectory.load(tmp_path / "old").num_steps == 5


@pytest.mark.parametrize("crash", ["row_without_checksum", "row_and_checksum_without_step", "torn_checksum_line"])
def test_resume_after_a_crash_keeps_valid_checksums(tmp_path, crash):
    full = tmp_path / "full"
    _record(full, 6)
    path = tmp_path / "crashed"
    net = _record(path, 4)
    P = Trajectory.load(path).num_params
    with open(path / "weights.bin", "ab") as f:  # the crash: w_5 written, step 4 never committed
        f.write(np.ones(P, dtype=np.float32).tobytes())
    if crash != "row_without_checksum":
        line = files.formats.crc_line(f"5 {files.formats.crc32([np.ones(P, dtype=np.float32).tobytes()]):08x}")
        with open(path / "weights.crc", "ab") as f:
            f.write(line.encode() if crash == "row_and_checksum_without_step" else line.encode()[:5])
    _all_rows_verified(path)  # the uncommitted row is not part of the trajectory
    _record(path, 2, net=net, start=4, resume=True)
    _all_rows_verified(path)
    assert (path / "weights.bin").read_bytes() == (full / "weights.bin").read_bytes()
    assert (path / "weights.crc").read_bytes() == (full / "weights.crc").read_bytes()


WORKER = textwrap.dedent("""
    import os, signal, sys
    import torch, torch.nn.functional as F
    import pkfast
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    rec = pkfast.TrajectoryRecorder(net, opt, sys.argv[1])
    for s in range(int(sys.argv[2])):
        g = torch.Generator().manual_seed(s)
        X, y = torch.randn(16, 4, generator=g), torch.randint(0, 3, (16,), generator=g)
        opt.zero_grad(); F.cross_entropy(net(X), y).backward(); opt.step()
        rec.step(batch_indices=list(range(16)))
    torch.save(net.state_dict(), sys.argv[1] + ".pt")
    os.kill(os.getpid(), signal.SIGKILL)  # no close(), no flush at exit
""")


@pytest.mark.skipif(not hasattr(__import__("signal"), "SIGKILL"), reason="needs SIGKILL")
def test_resume_after_sigkill_keeps_valid_checksums(tmp_path):
    path = tmp_path / "killed"
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    r = subprocess.run([sys.executable, "-c", WORKER, str(path), "3"], env=env, capture_output=True, timeout=120)
    assert r.returncode == -9, r.stderr.decode()
    _all_rows_verified(path)
    net = _net()
    net.load_state_dict(torch.load(str(path) + ".pt"))
    _record(path, 2, net=net, start=3, resume=True)
    _all_rows_verified(path)
    _record(tmp_path / "full", 5)
    assert (path / "weights.crc").read_bytes() == (tmp_path / "full" / "weights.crc").read_bytes()


def test_pkfast_info_says_whether_a_trajectory_has_checksums(tmp_path, capsys):
    from pkfast.cli import main

    _record(tmp_path / "t", 2)
    assert main(["info", str(tmp_path / "t")]) == 0
    assert "checksums: present" in capsys.readouterr().out
    (tmp_path / "t" / "weights.crc").unlink()
    assert main(["info", str(tmp_path / "t")]) == 0
    assert "checksums: none" in capsys.readouterr().out
