"""checkpoints: reading state_dicts from checkpoint files, Hugging Face checkpoint folders and objects, and the
learning rates of a Hugging Face ``Trainer`` run, for :meth:`pkfast.Trajectory.from_checkpoints` — safely (weights
only, never unpickling code), with errors that name the file and say what was found."""

from __future__ import annotations

import json
import numbers
import pickle
import re
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

__all__ = ["load_checkpoint_file", "as_state_dict", "compare_spec", "trainer_step_sizes", "step_sizes_of", "HF_WEIGHTS"]

#: the weight files of a Hugging Face checkpoint folder (``save_pretrained``, ``Trainer``'s ``checkpoint-N``,
#: a PEFT adapter), in the order they are looked for; an ``.index.json`` names the shards of a sharded one
HF_WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "adapter_model.safetensors",
              "pytorch_model.bin", "pytorch_model.bin.index.json", "adapter_model.bin")
TRAINER_STATE = "trainer_state.json"

_FN = "pkfast.Trajectory.from_checkpoints"


def load_checkpoint_file(path: Path) -> Mapping[str, Any]:
    """The state_dict in a checkpoint file, read safely: ``torch.load(weights_only=True)`` (never unpickling code)
    or safetensors. Every failure names the file, says what was found and what is expected."""
    where = f"{_FN}: checkpoint {str(path)!r}"
    if not path.exists():
        raise FileNotFoundError(f"{_FN}: no checkpoint file at {str(path)!r}")
    if path.is_dir():
        return _load_folder(path)
    if path.suffix == ".json" and path.name.endswith(".index.json"):
        return _load_sharded(path)
    if path.suffix == ".safetensors":
        try:
            from safetensors import SafetensorError
            from safetensors.torch import load_file
        except ImportError as e:  # pragma: no cover - depends on the environment
            raise ImportError(f"{_FN}: reading {path.name} needs the 'safetensors' package (pip install safetensors, "
                              "or pip install 'pkfast[safetensors]')") from e
        try:
            return load_file(str(path), device="cpu")
        except (SafetensorError, OSError, ValueError) as e:
            raise ValueError(f"{where} is not a readable safetensors file ({_first_line(e)}); expected a file written "
                             "by safetensors.torch.save_file") from None
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        # torch's own text advises weights_only=False, i.e. running code from the file: never repeat that advice
        found = _unsafe_globals(str(e))
        if not found:
            m = re.search(r"WeightsUnpickler error:\s*([^\n]*)", str(e))
            raise ValueError(f"{where} is not a PyTorch checkpoint (its contents are not a pickled state_dict"
                             f"{': ' + m.group(1).strip() if m and m.group(1).strip() else ''}); expected a file "
                             "written by torch.save(state_dict) or a .safetensors file") from None
        raise ValueError(
            f"{where} holds pickled Python objects{found}, not only tensors — e.g. a whole model saved with "
            "torch.save(model). pkfast reads checkpoints with weights_only=True and never runs code from a file: "
            "save the weights instead, torch.save(model.state_dict(), path)") from None
    except Exception as e:  # noqa: BLE001 - torch raises many kinds for a file that is not a checkpoint
        raise ValueError(f"{where} is not a PyTorch checkpoint (torch.load failed: {type(e).__name__}: "
                         f"{_first_line(e)}); expected a file written by torch.save(state_dict) or a .safetensors "
                         "file") from None
    return as_state_dict(obj, where=str(path))


def _load_folder(path: Path) -> Mapping[str, Any]:
    """The weights of a Hugging Face checkpoint folder (single or sharded safetensors, ``.bin``, PEFT adapter)."""
    for name in HF_WEIGHTS:
        f = path / name
        if f.exists():
            return load_checkpoint_file(f)
    found = sorted(p.name for p in path.iterdir())[:10]
    raise FileNotFoundError(f"{_FN}: checkpoint {str(path)!r} is a folder without model weights; expected a Hugging "
                            f"Face checkpoint folder holding one of {', '.join(HF_WEIGHTS)}; found {found}")


def _load_sharded(index: Path) -> Mapping[str, Any]:
    """A sharded checkpoint: every shard its ``weight_map`` names, merged (each shard read once)."""
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
        shards = sorted(set(weight_map.values()))
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise ValueError(f"{_FN}: {str(index)!r} is not a shard index ({_first_line(e)}); expected JSON with a "
                         "'weight_map' from parameter names to shard files") from None
    out: dict[str, Any] = {}
    for shard in shards:
        part = load_checkpoint_file(index.parent / shard)
        out.update({k: v for k, v in part.items() if weight_map.get(k) == shard})
    missing = sorted(set(weight_map) - set(out))
    if missing:
        raise ValueError(f"{_FN}: {str(index)!r} maps {len(missing)} entries to shards that lack them "
                         f"(first: {missing[:3]})")
    return out


def trainer_step_sizes(checkpoints: list) -> list[float]:
    """The weight of each interval between Hugging Face ``Trainer`` checkpoint folders: Σ of the learning rates of
    the optimizer steps in it, from ``trainer_state.json`` (``global_step`` of each folder; ``log_history`` of the
    last one). A first checkpoint without a trainer state is the initial model (step 0). The learning rate logged
    at step k is the one applied by optimizer step k (as ``transformers`` 5 logs it; older versions logged the rate
    after the scheduler's step, one step later); where steps were not logged (``logging_steps`` > 1) it is interpolated linearly between the logged ones, with a warning."""
    steps, states = [], []
    for i, ck in enumerate(checkpoints):
        p = Path(ck) if isinstance(ck, (str, Path)) or hasattr(ck, "__fspath__") else None
        f = None if p is None else (p / TRAINER_STATE if p.is_dir() else p.parent / TRAINER_STATE)
        if f is None or not f.exists():
            if i == 0:
                steps.append(0)
                continue
            what = "a state_dict" if p is None else repr(str(p))
            raise ValueError(f"{_FN}: lr not given and checkpoint #{i} ({what}) has no {TRAINER_STATE} beside it to "
                             "read the learning rates from; pass lr= (one float, or one per interval)")
        try:
            state = json.loads(f.read_text())
            steps.append(int(state["global_step"]))
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise ValueError(f"{_FN}: {str(f)!r} is not a Trainer state ({_first_line(e)}); expected JSON with "
                             "'global_step' and 'log_history'") from None
        states.append(state)
    if any(b <= a for a, b in zip(steps, steps[1:])):
        raise ValueError(f"{_FN}: the checkpoints' global steps {steps} do not increase; pass them in training order")
    logged = {}
    for e in states[-1].get("log_history", []):
        if isinstance(e, dict) and "learning_rate" in e and "step" in e:
            logged[int(e["step"])] = float(e["learning_rate"])
    if not logged:
        raise ValueError(f"{_FN}: lr not given and the last checkpoint's {TRAINER_STATE} logs no learning rate; "
                         "pass lr= (one float, or one per interval)")
    want = np.arange(1, steps[-1] + 1)
    xs = np.array(sorted(logged))
    lrs = np.interp(want, xs, np.array([logged[x] for x in xs]))
    unlogged = int(np.sum(~np.isin(want, xs)))
    if unlogged:
        warnings.warn(f"{_FN}: {TRAINER_STATE} logs the learning rate at {len(xs)} of {steps[-1]} steps; the other "
                      f"{unlogged} are interpolated between logs, so the interval weights are approximate (exact with "
                      "TrainingArguments(logging_steps=1))", stacklevel=3)
    csum = np.concatenate([[0.0], np.cumsum(lrs)])
    return [float(csum[b] - csum[a]) for a, b in zip(steps, steps[1:])]


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return (text[0][:160] if text else type(e).__name__)


def _unsafe_globals(text: str) -> str:
    """The class torch refused to unpickle, if its message names one (" (found: torch.nn.Linear)")."""
    m = re.search(r"Unsupported global: GLOBAL ([\w.]+)", text)
    return f" (found: {m.group(1)})" if m else ""


def as_state_dict(obj: Any, where: str) -> Mapping[str, Any]:
    """Accept a state_dict, or a training checkpoint dict holding one under a usual key."""
    if isinstance(obj, torch.nn.Module):
        return obj.state_dict()
    if not isinstance(obj, Mapping):
        raise TypeError(
            f"pkfast.Trajectory.from_checkpoints: checkpoint {where} is a {type(obj).__name__}; "
            "expected a state_dict (a mapping of parameter names to tensors) or a file holding one"
        )
    if obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        return obj
    for key in ("state_dict", "model_state_dict", "model"):
        inner = obj.get(key)
        if isinstance(inner, Mapping) and inner and all(isinstance(v, torch.Tensor) for v in inner.values()):
            return inner
    raise TypeError(
        f"pkfast.Trajectory.from_checkpoints: checkpoint {where} is not a state_dict and holds none under "
        f"'state_dict', 'model_state_dict' or 'model'; found keys {sorted(map(str, obj))[:8]}"
    )


def compare_spec(ref: list[tuple[str, torch.Size]], got: list[tuple[str, torch.Size]], i: int) -> None:
    ref_names = [n for n, _ in ref]
    got_names = [n for n, _ in got]
    for n in ref_names:
        if n not in got_names:
            raise ValueError(f"pkfast.Trajectory.from_checkpoints: checkpoint #{i} lacks {n!r}, present in checkpoint #0")
    for n in got_names:
        if n not in ref_names:
            raise ValueError(f"pkfast.Trajectory.from_checkpoints: checkpoint #{i} has {n!r}, absent from checkpoint #0")
    shapes = dict(ref)
    for n, s in got:
        if shapes[n] != s:
            raise ValueError(
                f"pkfast.Trajectory.from_checkpoints: {n!r} has shape {tuple(s)} in checkpoint #{i} but "
                f"{tuple(shapes[n])} in checkpoint #0"
            )


def step_sizes_of(lr: Any, checkpoints: list) -> list[float]:
    """The ``T`` interval weights ε_s of :meth:`pkfast.Trajectory.from_checkpoints`'s ``lr`` for ``T+1``
    checkpoints: one number for all, ``T`` numbers, or None (read from a ``Trainer`` run's folders)."""
    T = len(checkpoints) - 1
    if lr is None:
        lr = trainer_step_sizes(list(checkpoints))
    if (isinstance(lr, numbers.Real) and not isinstance(lr, bool)) or (
        isinstance(lr, (torch.Tensor, np.ndarray)) and lr.ndim == 0
    ):  # a Python, numpy or 0-d tensor scalar
        return [float(lr)] * T
    try:
        step_sizes = [float(v) for v in lr]
    except TypeError:
        raise TypeError(f"{_FN}: lr must be a float or a list of {T} floats; found {type(lr).__name__}") from None
    if len(step_sizes) != T:
        raise ValueError(f"{_FN}: lr has {len(step_sizes)} values; expected {T} (one per interval between {T + 1} "
                         "checkpoints)")
    return step_sizes
