"""Trajectory.from_checkpoints on the checkpoint layouts of the training stacks (issue 18): Hugging Face folders
(single and sharded safetensors, ``.bin``, PEFT adapters), the learning rates of ``trainer_state.json``, and a
Lightning-style ``.ckpt`` dict. The folders are written here with safetensors and JSON exactly as
``save_pretrained``/``Trainer`` lay them out, so no optional library is needed."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from safetensors.torch import save_file

import pkfast
from tests.models import mlp


def _states(n: int) -> list[dict[str, torch.Tensor]]:
    torch.manual_seed(0)
    net = mlp()
    out = []
    for _ in range(n):
        out.append({k: v.detach().clone() for k, v in net.state_dict().items()})
        with torch.no_grad():
            for p in net.parameters():
                p.add_(0.01 * torch.randn_like(p))
    return out


def _same(point: dict, sd: dict) -> None:
    """The trajectory's weights at a point are the state_dict's floating-point entries, bit for bit."""
    assert set(point) == {k for k, v in sd.items() if v.is_floating_point()}
    for k, v in point.items():
        assert torch.equal(v, sd[k]), k


def _trainer_folder(root, step: int, sd, log_history, sharded: bool = False):
    d = root / f"checkpoint-{step}"
    d.mkdir()
    if sharded:  # two shards and their index, as save_pretrained(max_shard_size=…) writes them
        names = sorted(sd)
        half = len(names) // 2
        shards = {"model-00001-of-00002.safetensors": names[:half], "model-00002-of-00002.safetensors": names[half:]}
        for f, keys in shards.items():
            save_file({k: sd[k].contiguous() for k in keys}, str(d / f))
        index = {"metadata": {"total_size": 0}, "weight_map": {k: f for f, keys in shards.items() for k in keys}}
        (d / "model.safetensors.index.json").write_text(json.dumps(index))
    else:
        save_file({k: v.contiguous() for k, v in sd.items()}, str(d / "model.safetensors"))
    (d / "trainer_state.json").write_text(json.dumps({"global_step": step, "log_history": log_history}))
    return d


def test_hf_folders_single_and_sharded_with_lrs_from_trainer_state(tmp_path):
    sds = _states(3)
    init = tmp_path / "init"
    init.mkdir()
    save_file({k: v.contiguous() for k, v in sds[0].items()}, str(init / "model.safetensors"))  # save_pretrained
    lrs = {s: 0.1 / s for s in range(1, 7)}  # one logged lr per step (logging_steps=1)
    log = [{"step": s, "learning_rate": lr, "loss": 1.0} for s, lr in lrs.items()] + [{"step": 6, "eval_loss": 2.0}]
    a = _trainer_folder(tmp_path, 2, sds[1], log[:2])
    b = _trainer_folder(tmp_path, 6, sds[2], log, sharded=True)
    traj = pkfast.Trajectory.from_checkpoints([init, a, b])
    assert traj.num_steps == 2
    torch.testing.assert_close(traj.step_sizes, torch.tensor([lrs[1] + lrs[2], lrs[3] + lrs[4] + lrs[5] + lrs[6]],
                                                             dtype=traj.step_sizes.dtype), rtol=1e-12, atol=0)
    for s in range(3):
        _same(traj.point(s), sds[s])
    # a file inside a folder finds the folder's trainer state too; the index file itself reads the shards
    t2 = pkfast.Trajectory.from_checkpoints([init / "model.safetensors", a / "model.safetensors",
                                             b / "model.safetensors.index.json"])
    assert torch.equal(t2.step_sizes, traj.step_sizes)
    _same(t2.point(2), sds[2])


def test_sparse_logs_are_interpolated_with_a_warning(tmp_path):
    sds = _states(2)
    log = [{"step": 2, "learning_rate": 0.2}, {"step": 4, "learning_rate": 0.4}]
    a = _trainer_folder(tmp_path, 4, sds[1], log)
    with pytest.warns(UserWarning, match=r"logs the learning rate at 2 of 4 steps; the other 2 are interpolated"):
        traj = pkfast.Trajectory.from_checkpoints([sds[0], a])
    assert traj.step_sizes.tolist() == pytest.approx([0.2 + 0.2 + 0.3 + 0.4])  # step 1 held at the first log
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert pkfast.Trajectory.from_checkpoints([sds[0], a], lr=0.5).step_sizes.tolist() == [0.5]  # lr given


def test_peft_adapter_bin_and_lightning_checkpoints(tmp_path):
    sds = _states(2)
    for i, sd in enumerate(sds):
        d = tmp_path / f"adapter{i}"
        d.mkdir()
        save_file({k: v.contiguous() for k, v in sd.items()}, str(d / "adapter_model.safetensors"))
        e = tmp_path / f"bin{i}"
        e.mkdir()
        torch.save(sd, e / "pytorch_model.bin")
        torch.save({"epoch": 0, "global_step": i, "state_dict": sd, "optimizer_states": [{"state": {}}],
                    "hyper_parameters": {"lr": 0.1}}, tmp_path / f"l{i}.ckpt")  # Lightning's checkpoint dict
    for paths in ([tmp_path / "adapter0", tmp_path / "adapter1"], [tmp_path / "bin0", tmp_path / "bin1"],
                  [tmp_path / "l0.ckpt", tmp_path / "l1.ckpt"]):
        t = pkfast.Trajectory.from_checkpoints(paths, lr=0.1)
        _same(t.point(1), sds[1])


def test_checkpoint_folder_errors_say_what_is_missing(tmp_path):
    sds = _states(3)
    a = _trainer_folder(tmp_path, 3, sds[1], [{"step": 3, "learning_rate": 0.1}])
    plain = tmp_path / "plain.pt"
    torch.save(sds[2], plain)
    with pytest.raises(ValueError, match=r"checkpoint #2 .* has no trainer_state.json beside it .* pass lr="):
        pkfast.Trajectory.from_checkpoints([sds[0], a, plain])
    b = _trainer_folder(tmp_path, 1, sds[2], [])
    with pytest.raises(ValueError, match=r"global steps \[0, 3, 1\] do not increase"):
        pkfast.Trajectory.from_checkpoints([sds[0], a, b])
    c = tmp_path / "checkpoint-9"
    c.mkdir()
    save_file({k: v.contiguous() for k, v in sds[2].items()}, str(c / "model.safetensors"))
    (c / "trainer_state.json").write_text(json.dumps({"global_step": 9, "log_history": [{"step": 9, "loss": 1}]}))
    with pytest.raises(ValueError, match=r"logs no learning rate; pass lr="):
        pkfast.Trajectory.from_checkpoints([sds[0], a, c])
    (c / "model.safetensors.index.json").write_text("{}")
    (c / "model.safetensors").unlink()
    with pytest.raises(ValueError, match=r"is not a shard index .*'weight_map'"):
        pkfast.Trajectory.from_checkpoints([sds[0], a, c], lr=0.1)
