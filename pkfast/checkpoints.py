"""checkpoints: reading state_dicts from checkpoint files and objects for :meth:`pkfast.Trajectory.from_checkpoints`
— safely (weights only, never unpickling code), with errors that name the file and say what was found."""

from __future__ import annotations

import pickle
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

__all__ = ["load_checkpoint_file", "as_state_dict", "compare_spec"]

_FN = "pkfast.Trajectory.from_checkpoints"


def load_checkpoint_file(path: Path) -> Mapping[str, Any]:
    """The state_dict in a checkpoint file, read safely: ``torch.load(weights_only=True)`` (never unpickling code)
    or safetensors. Every failure names the file, says what was found and what is expected."""
    where = f"{_FN}: checkpoint {str(path)!r}"
    if not path.exists():
        raise FileNotFoundError(f"{_FN}: no checkpoint file at {str(path)!r}")
    if path.is_dir():
        raise IsADirectoryError(f"{where} is a directory; expected a file written by torch.save(state_dict) or a "
                                ".safetensors file")
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
