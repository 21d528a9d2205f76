"""Trajectory: construction from checkpoints (state_dicts, torch.save files, safetensors), lazy on-disk
loading, save/load round trip, NaN detection, and the error messages of every user mistake."""

from __future__ import annotations

import gc
import json
import math
import os
import time

import numpy as np
import pytest
import torch

from pkfast import Trajectory
from pkfast.trajectory.files import TrajectoryWriter


# ---------------------------------------------------------------------- helpers
def _mlp() -> torch.nn.Module:
    return torch.nn.Sequential(torch.nn.Linear(3, 5), torch.nn.Tanh(), torch.nn.Linear(5, 2))


def _checkpoints(n: int = 4, net: torch.nn.Module | None = None) -> list[dict[str, torch.Tensor]]:
    """n state_dicts of one model, each a perturbed copy of the previous one (independent tensors)."""
    net = _mlp() if net is None else net
    sd = {k: v.detach().clone() for k, v in net.state_dict().items()}
    out = [sd]
    for _ in range(n - 1):
        out.append({k: (v + 0.01 * torch.randn_like(v) if v.is_floating_point() else v.clone()) for k, v in out[-1].items()})
    return out


def _flatten(sd) -> torch.Tensor:
    return torch.cat([v.reshape(-1) for v in sd.values() if v.is_floating_point()])


def _all_rows(traj: Trajectory) -> torch.Tensor:
    return torch.stack([traj.flat(k) for k in range(traj.num_points)])


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


# ---------------------------------------------------------------------- from_checkpoints
def test_from_state_dicts_rows_equal_flattened_values_bitwise():
    cks = _checkpoints(4)
    traj = Trajectory.from_checkpoints(cks, lr=0.1)
    assert traj.num_steps == 3 and traj.num_points == 4
    assert traj.num_params == 3 * 5 + 5 + 5 * 2 + 2
    assert traj.names == tuple(cks[0])
    assert [tuple(s) for _, s in traj.spec] == [tuple(v.shape) for v in cks[0].values()]
    assert traj.dtype == torch.float32
    assert not traj.is_memory_mapped
    for k, sd in enumerate(cks):
        assert torch.equal(traj.flat(k), _flatten(sd))
        point = traj.point(k)
        assert list(point) == list(sd)
        for name, v in sd.items():
            assert torch.equal(point[name], v)
            assert torch.equal(traj.flat(k)[traj.slice_of(name)], v.reshape(-1))
    assert torch.equal(traj.flat(-1), traj.flat(3))
    assert traj.batch_indices(0) is None


def test_from_checkpoints_copies_inputs():
    cks = _checkpoints(2)
    traj = Trajectory.from_checkpoints(cks, lr=0.1)
    before = traj.flat(0).clone()
    with torch.no_grad():
        for v in cks[0].values():
            v.add_(1.0)
    assert torch.equal(traj.flat(0), before)


def test_from_modules():
    a, b = _mlp(), _mlp()
    traj = Trajectory.from_checkpoints([a, b], lr=0.5)
    assert torch.equal(traj.flat(0), _flatten(a.state_dict()))
    assert torch.equal(traj.flat(1), _flatten(b.state_dict()))


def test_from_torch_save_files(tmp_path):
    cks = _checkpoints(3)
    plain = tmp_path / "plain.pt"
    torch.save(cks[0], plain)
    wrapped = tmp_path / "wrapped.pt"
    torch.save({"state_dict": cks[1], "epoch": 3}, wrapped)
    model_key = tmp_path / "model_state.pth"
    torch.save({"model_state_dict": cks[2], "optimizer": {"lr": 0.1}, "epoch": 4}, model_key)
    traj = Trajectory.from_checkpoints([plain, str(wrapped), model_key], lr=0.1)
    for k, sd in enumerate(cks):
        assert torch.equal(traj.flat(k), _flatten(sd))
    # files and in-memory state_dicts mix
    mixed = Trajectory.from_checkpoints([cks[0], wrapped], lr=0.1)
    assert torch.equal(mixed.flat(1), _flatten(cks[1]))


def test_from_safetensors_files(tmp_path):
    safetensors_torch = pytest.importorskip("safetensors.torch")
    cks = _checkpoints(3)
    paths = []
    for k, sd in enumerate(cks):
        p = tmp_path / f"ck{k}.safetensors"
        safetensors_torch.save_file({n: v.contiguous() for n, v in sd.items()}, str(p))
        paths.append(p)
    traj = Trajectory.from_checkpoints(paths, lr=[0.1, 0.2])
    assert set(traj.names) == set(cks[0])
    for k, sd in enumerate(cks):
        point = traj.point(k)
        for name, v in sd.items():
            assert torch.equal(point[name], v)


def test_lr_as_float_and_as_list():
    cks = _checkpoints(4)
    t1 = Trajectory.from_checkpoints(cks, lr=0.1)
    assert t1.step_sizes.dtype == torch.float64
    assert t1.step_sizes.tolist() == [0.1, 0.1, 0.1]
    lrs = [0.1, 0.05, 0.0]
    t2 = Trajectory.from_checkpoints(cks, lr=lrs)
    assert t2.step_sizes.tolist() == lrs
    t3 = Trajectory.from_checkpoints(cks, lr=torch.tensor(lrs, dtype=torch.float64))
    assert t3.step_sizes.tolist() == lrs
    t4 = Trajectory.from_checkpoints(cks, lr=1)  # an int is a float here
    assert t4.step_sizes.tolist() == [1.0, 1.0, 1.0]
    # step_sizes is a copy
    s = t2.step_sizes
    s[0] = 99.0
    assert t2.step_sizes[0].item() == 0.1


@pytest.mark.parametrize("lr", [np.float32(0.25), np.float64(0.25), torch.tensor(0.25), np.array(0.25)])
def test_lr_numpy_and_0d_tensor_scalars(lr):
    traj = Trajectory.from_checkpoints(_checkpoints(3), lr=lr)
    assert traj.step_sizes.tolist() == [0.25, 0.25]


def test_integer_buffers_dropped_float_buffers_kept():
    net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4), torch.nn.Linear(4, 2))
    net.train()
    net(torch.randn(8, 3))  # moves running stats and num_batches_tracked
    sd0 = {k: v.clone() for k, v in net.state_dict().items()}
    net(torch.randn(8, 3))
    sd1 = {k: v.clone() for k, v in net.state_dict().items()}
    assert "1.num_batches_tracked" in sd0 and not sd0["1.num_batches_tracked"].is_floating_point()
    traj = Trajectory.from_checkpoints([sd0, sd1], lr=0.1)
    assert "1.num_batches_tracked" not in traj.names
    for name in ("1.running_mean", "1.running_var", "1.weight", "1.bias", "0.weight", "2.bias"):
        assert name in traj.names
    assert torch.equal(traj.point(1)["1.running_mean"], sd1["1.running_mean"])
    assert not torch.equal(traj.point(0)["1.running_mean"], traj.point(1)["1.running_mean"])
    assert traj.num_params == sum(v.numel() for v in sd0.values() if v.is_floating_point())


def test_mixed_dtypes_promote_and_bfloat16_widens():
    a = {"w": torch.randn(3, dtype=torch.float32), "b": torch.randn(2, dtype=torch.float64)}
    b = {k: v + 1 for k, v in a.items()}
    traj = Trajectory.from_checkpoints([a, b], lr=0.1)
    assert traj.dtype == torch.float64
    assert torch.equal(traj.point(0)["w"], a["w"].double())
    c = {"w": torch.randn(4).to(torch.bfloat16)}
    d = {"w": c["w"] * 2}
    t2 = Trajectory.from_checkpoints([c, d], lr=0.1)
    assert t2.dtype == torch.float32
    assert torch.equal(t2.point(1)["w"], d["w"].float())


def test_batch_indices_per_step():
    cks = _checkpoints(3)
    traj = Trajectory.from_checkpoints(cks, lr=0.1, batch_indices=[[3, 1, 2], None])
    assert traj.batch_indices(0).dtype == np.int64
    assert traj.batch_indices(0).tolist() == [3, 1, 2]
    assert traj.batch_indices(1) is None


def test_repr_mentions_shape():
    traj = Trajectory.from_checkpoints(_checkpoints(3), lr=0.5)
    r = repr(traj)
    assert "T=2" in r and f"P={traj.num_params}" in r and "sum_lr=1" in r


# ---------------------------------------------------------------------- save / load
def test_save_load_round_trip(tmp_path):
    net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4), torch.nn.Linear(4, 2))
    cks = _checkpoints(5, net)
    lrs = [0.1, 0.1, 0.05, 0.025]
    batches = [[0, 1, 2], [5, 4], [], [7]]
    traj = Trajectory.from_checkpoints(cks, lr=lrs, batch_indices=batches)
    traj.meta = {"note": "round trip", "nested": {"a": [1, 2]}}
    out = traj.save(tmp_path / "t")
    assert out == tmp_path / "t"
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json", "steps.jsonl", "weights.bin", "weights.crc"]
    assert (out / "weights.bin").stat().st_size == traj.num_points * traj.num_params * 4

    back = Trajectory.load(out)
    assert back.is_memory_mapped
    assert back.source == str(out)
    assert back.spec == traj.spec
    assert back.dtype == traj.dtype
    assert torch.equal(_all_rows(back), _all_rows(traj))
    assert torch.equal(back.step_sizes, traj.step_sizes)
    for s in range(traj.num_steps):
        assert back.batch_indices(s).tolist() == batches[s]
    assert back.meta == traj.meta

    # saving a loaded (memory-mapped) trajectory again gives the same bytes
    back.save(tmp_path / "t2")
    assert (tmp_path / "t2" / "weights.bin").read_bytes() == (out / "weights.bin").read_bytes()
    assert (tmp_path / "t2" / "steps.jsonl").read_bytes() == (out / "steps.jsonl").read_bytes()


def test_save_load_float64_without_batches(tmp_path):
    cks = [{k: v.double() for k, v in sd.items()} for sd in _checkpoints(3)]
    traj = Trajectory.from_checkpoints(cks, lr=[1e-3, 2e-3])
    traj.save(tmp_path / "t")
    back = Trajectory.load(tmp_path / "t")
    assert back.dtype == torch.float64
    assert json.loads((tmp_path / "t" / "manifest.json").read_text())["dtype"] == "float64"
    assert torch.equal(_all_rows(back), _all_rows(traj))
    assert back.step_sizes.tolist() == [1e-3, 2e-3]
    assert back.batch_indices(0) is None and back.batch_indices(1) is None


def test_save_refuses_existing_unless_overwrite(tmp_path):
    traj = Trajectory.from_checkpoints(_checkpoints(2), lr=0.1)
    traj.save(tmp_path / "t")
    with pytest.raises(FileExistsError, match="already exists and is not empty"):
        traj.save(tmp_path / "t")
    other = Trajectory.from_checkpoints(_checkpoints(3), lr=0.2)
    other.save(tmp_path / "t", overwrite=True)
    assert Trajectory.load(tmp_path / "t").num_steps == 2


def test_load_is_lazy_and_memory_mapped(tmp_path):
    """A ~320 MB weights file opens without reading it: resident memory grows by about one row, not the file."""
    P = 4_000_000  # 16 MB per float32 row
    rows = 20  # 20 rows = 320 MB on disk
    spec = [("w", (P,))]
    path = tmp_path / "big"
    writer = TrajectoryWriter(path, spec, torch.float32)
    row = torch.empty(P)
    try:
        for k in range(rows):
            row.fill_(float(k))
            if k == 0:
                writer.append_point(row)
            else:
                writer.append_step(row, 0.01, None)
    finally:
        writer.close()
    file_bytes = (path / "weights.bin").stat().st_size
    assert file_bytes == rows * P * 4
    del row
    gc.collect()

    t0 = time.perf_counter()
    rss0 = _rss_bytes()
    traj = Trajectory.load(path)
    rss1 = _rss_bytes()
    assert traj.is_memory_mapped
    assert traj.num_steps == rows - 1 and traj.num_params == P
    assert rss1 - rss0 < 0.05 * file_bytes, f"load made {(rss1 - rss0) / 2**20:.1f} MiB resident"
    assert time.perf_counter() - t0 < 2.0

    r = traj.flat(13)
    assert r.shape == (P,)
    assert r[0].item() == 13.0 and r[-1].item() == 13.0
    rss2 = _rss_bytes()
    # one row copied out (+ at most its mapped pages): far below the file size
    assert rss2 - rss0 < 4 * P * 4 + 32 * 2**20 < file_bytes / 2, f"one row made {(rss2 - rss0) / 2**20:.1f} MiB resident"


def test_load_many_steps_reads_steps(tmp_path):
    traj = Trajectory.from_checkpoints(_checkpoints(6), lr=[0.5, 0.4, 0.3, 0.2, 0.1])
    traj.save(tmp_path / "t")
    back = Trajectory.load(str(tmp_path / "t"))
    assert back.step_sizes.tolist() == [0.5, 0.4, 0.3, 0.2, 0.1]
    assert "memory-mapped" in repr(back)


# ---------------------------------------------------------------------- NaN / Inf
def test_nan_reported_with_point_and_name_on_access():
    cks = _checkpoints(4)
    cks[2]["2.weight"][0, 1] = float("nan")
    traj = Trajectory.from_checkpoints(cks, lr=0.1)  # construction does not scan
    traj.flat(0)
    traj.flat(1)
    with pytest.raises(ValueError, match=r"w_2 has non-finite values in '2\.weight' \(1 NaN, 0 Inf\)"):
        traj.flat(2)
    with pytest.raises(ValueError, match=r"w_2 .*'2\.weight'"):
        traj.point(2)
    with pytest.raises(ValueError, match=r"w_2 has non-finite values in '2\.weight'"):
        traj.check()


def test_inf_reported_by_check_on_loaded_trajectory(tmp_path):
    cks = _checkpoints(3)
    traj = Trajectory.from_checkpoints(cks, lr=0.1)
    traj.save(tmp_path / "t")
    # corrupt one value of w_1 in '0.bias' on disk
    back = Trajectory.load(tmp_path / "t")
    col = back.slice_of("0.bias").start + 2
    del back
    with open(tmp_path / "t" / "weights.bin", "r+b") as f:
        f.seek((1 * traj.num_params + col) * 4)
        f.write(np.array([np.inf], dtype=np.float32).tobytes())
    (tmp_path / "t" / "weights.crc").unlink()  # a diverged run, not a corrupted file: no checksum to disagree
    back = Trajectory.load(tmp_path / "t")
    back.flat(0)
    with pytest.raises(ValueError, match=r"w_1 has non-finite values in '0\.bias' \(0 NaN, 1 Inf\)"):
        back.check()


def test_check_passes_on_finite_trajectory():
    traj = Trajectory.from_checkpoints(_checkpoints(3), lr=0.1)
    traj.check()  # no raise


def test_flat_out_of_range():
    traj = Trajectory.from_checkpoints(_checkpoints(3), lr=0.1)
    with pytest.raises(IndexError, match=r"point 3 out of range \[0, 3\)"):
        traj.flat(3)
    with pytest.raises(IndexError, match="out of range"):
        traj.flat(-4)


# ---------------------------------------------------------------------- errors
def test_error_fewer_than_two_checkpoints():
    with pytest.raises(ValueError, match=r"need at least 2 checkpoints .*found 1"):
        Trajectory.from_checkpoints(_checkpoints(1), lr=0.1)
    with pytest.raises(ValueError, match=r"need at least 2 checkpoints .*found 0"):
        Trajectory.from_checkpoints([], lr=0.1)


def test_error_checkpoints_not_a_list():
    with pytest.raises(TypeError, match="must be a list of state_dicts or checkpoint paths; found dict"):
        Trajectory.from_checkpoints(_checkpoints(1)[0], lr=0.1)
    with pytest.raises(TypeError, match="found str"):
        Trajectory.from_checkpoints("ckpt.pt", lr=0.1)


def test_error_lr_list_wrong_length():
    with pytest.raises(ValueError, match=r"lr has 2 values; expected 3 \(one per interval between 4 checkpoints\)"):
        Trajectory.from_checkpoints(_checkpoints(4), lr=[0.1, 0.1])


def test_error_lr_not_a_number():
    with pytest.raises(TypeError, match="lr must be a float or a list of 2 floats; found object"):
        Trajectory.from_checkpoints(_checkpoints(3), lr=object())
    with pytest.raises(ValueError, match=r"lr not given and checkpoint #1 \(a state_dict\) has no trainer_state.json"):
        Trajectory.from_checkpoints(_checkpoints(3))


@pytest.mark.parametrize(
    "bad, shown",
    [(-0.1, r"-0\.1"), (float("nan"), "nan"), (float("inf"), "inf"), (float("-inf"), "-inf")],
)
def test_error_lr_negative_or_non_finite_names_step(bad, shown):
    lrs = [0.1, 0.1, bad, 0.1]
    with pytest.raises(ValueError, match=rf"step sizes must be finite and >= 0; step 2 has {shown}"):
        Trajectory.from_checkpoints(_checkpoints(5), lr=lrs)
    if math.isfinite(bad):
        with pytest.raises(ValueError, match=rf"step 0 has {shown}"):
            Trajectory.from_checkpoints(_checkpoints(5), lr=bad)


def test_error_checkpoint_missing_key():
    cks = _checkpoints(4)
    del cks[2]["0.bias"]
    with pytest.raises(ValueError, match=r"checkpoint #2 lacks '0\.bias', present in checkpoint #0"):
        Trajectory.from_checkpoints(cks, lr=0.1)


def test_error_checkpoint_extra_key():
    cks = _checkpoints(3)
    cks[1]["extra.weight"] = torch.zeros(2)
    with pytest.raises(ValueError, match=r"checkpoint #1 has 'extra\.weight', absent from checkpoint #0"):
        Trajectory.from_checkpoints(cks, lr=0.1)


def test_error_shape_mismatch():
    cks = _checkpoints(3)
    cks[2]["2.weight"] = torch.zeros(2, 6)
    with pytest.raises(ValueError, match=r"'2\.weight' has shape \(2, 6\) in checkpoint #2 but \(2, 5\) in checkpoint #0"):
        Trajectory.from_checkpoints(cks, lr=0.1)


def test_error_file_does_not_exist(tmp_path):
    cks = _checkpoints(2)
    torch.save(cks[0], tmp_path / "a.pt")
    missing = tmp_path / "missing.pt"
    with pytest.raises(FileNotFoundError, match=r"no checkpoint file at .*missing\.pt"):
        Trajectory.from_checkpoints([tmp_path / "a.pt", missing], lr=0.1)


def test_error_checkpoint_not_a_mapping():
    cks = _checkpoints(2)
    with pytest.raises(TypeError, match=r"checkpoint #1 is a list; expected a state_dict"):
        Trajectory.from_checkpoints([cks[0], [torch.zeros(3)]], lr=0.1)


def test_error_file_holding_no_state_dict(tmp_path):
    p = tmp_path / "opt.pt"
    torch.save({"epoch": 3, "optimizer": {"lr": 0.1}}, p)
    with pytest.raises(TypeError, match=r"is not a state_dict and holds none under 'state_dict'.*found keys \['epoch', 'optimizer'\]"):
        Trajectory.from_checkpoints([p, p], lr=0.1)


def test_error_file_holding_not_a_mapping(tmp_path):
    p = tmp_path / "list.pt"
    torch.save([torch.zeros(2)], p)
    with pytest.raises(TypeError, match=r"checkpoint .*list\.pt is a list"):
        Trajectory.from_checkpoints([p, p], lr=0.1)


def test_error_no_floating_tensors():
    a = {"n": torch.tensor(1)}
    with pytest.raises(ValueError, match="checkpoint #0 has no floating-point tensors"):
        Trajectory.from_checkpoints([a, a], lr=0.1)


def test_error_load_without_manifest(tmp_path):
    (tmp_path / "weights.bin").write_bytes(b"\0" * 16)
    with pytest.raises(FileNotFoundError, match=r"is not a recorded trajectory \(no manifest\.json inside\)"):
        Trajectory.load(tmp_path)
    with pytest.raises(FileNotFoundError, match="does-not-exist' does not exist; expected the directory"):
        Trajectory.load(tmp_path / "does-not-exist")


def test_error_load_wrong_format_or_newer_version(tmp_path):
    traj = Trajectory.from_checkpoints(_checkpoints(2), lr=0.1)
    traj.save(tmp_path / "t")
    man = tmp_path / "t" / "manifest.json"
    m = json.loads(man.read_text())
    man.write_text(json.dumps({**m, "version": 99}))
    with pytest.raises(ValueError, match="has format version 99; this pkfast reads up to version 1"):
        Trajectory.load(tmp_path / "t")
    man.write_text(json.dumps({**m, "format": "something-else"}))
    with pytest.raises(ValueError, match="is not a pkfast trajectory"):
        Trajectory.load(tmp_path / "t")
    man.write_text("{not json")
    with pytest.raises(ValueError, match="is corrupt"):
        Trajectory.load(tmp_path / "t")


def test_error_load_without_completed_step(tmp_path):
    writer = TrajectoryWriter(tmp_path / "t", [("w", (3,))], torch.float32)
    writer.append_point(torch.zeros(3))
    writer.close()
    with pytest.raises(ValueError, match="holds only w_0 and no completed step"):
        Trajectory.load(tmp_path / "t")
    (tmp_path / "t" / "weights.bin").write_bytes(b"\0" * 8)  # less than one row
    with pytest.raises(ValueError, match=r"holds no complete weight row \(w_0 is missing\)"):
        Trajectory.load(tmp_path / "t")


def test_error_constructor_arguments():
    spec = [("a", (2,)), ("b", (3,))]
    with pytest.raises(ValueError, match=r"weights must have shape \[T\+1, P\] = \[\*, 5\]"):
        Trajectory(torch.zeros(3, 4), [0.1, 0.1], spec)
    with pytest.raises(ValueError, match="needs at least 2 weight points"):
        Trajectory(torch.zeros(1, 5), [], spec)
    with pytest.raises(ValueError, match=r"expected 2 step sizes .*found 1"):
        Trajectory(torch.zeros(3, 5), [0.1], spec)
    with pytest.raises(ValueError, match="entry 'a' appears twice in spec"):
        Trajectory(torch.zeros(3, 4), [0.1, 0.1], [("a", (2,)), ("a", (2,))])
    with pytest.raises(TypeError, match="weights must be floating"):
        Trajectory(torch.zeros(3, 5, dtype=torch.int64), [0.1, 0.1], spec)
    with pytest.raises(TypeError, match="weights must be floating; found numpy dtype int32"):
        Trajectory(np.zeros((3, 5), dtype=np.int32), [0.1, 0.1], spec)
    with pytest.raises(TypeError, match="weights must be a torch.Tensor or numpy array; found list"):
        Trajectory([[0.0] * 5] * 3, [0.1, 0.1], spec)
    with pytest.raises(ValueError, match=r"expected 2 batch_indices entries .*found 1"):
        Trajectory(torch.zeros(3, 5), [0.1, 0.1], spec, batch_indices=[[0]])


def test_error_load_without_step_log_names_the_file_and_what_to_do(tmp_path):
    Trajectory.from_checkpoints(_checkpoints(3), lr=0.1).save(tmp_path / "t")
    (tmp_path / "t" / "steps.jsonl").unlink()  # a partial copy
    with pytest.raises(FileNotFoundError, match=r"has no step log steps\.jsonl \(the step sizes and batches of the "
                                                r"steps whose weights weights\.bin holds: 2\).*Copy the whole directory"):
        Trajectory.load(tmp_path / "t")
