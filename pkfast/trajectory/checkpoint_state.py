"""checkpoint_state: the diagonal preconditioner at each checkpoint of a trajectory built from checkpoints, read
from the optimizer state saved beside it (a ``Trainer`` folder's ``optimizer.pt``, or any torch optimizer
``state_dict``) — the preconditioner at the checkpoints only, an approximation between them: usable for
:func:`pkfast.gram` (the plan says so), refused by the exact kernel machine.

**Which state a segment takes.** Segment s (w_s → w_{s+1}, its weight ε_s the summed learning rates of its optimizer
steps) takes P from the optimizer state saved *with w_{s+1}*: the state built by the segment's own steps (Adam's v is
an average of the squared gradients over ≈ 1/(1−β2) steps), available for every Trainer checkpoint folder even when
w_0 is the initial model, which has no optimizer state. This is LESS's pairing (Xia et al., 2024: the state saved at
a checkpoint with the learning rate of the steps before it). P is what :func:`~pkfast.trajectory.optimizers.
preconditioner` computes from the saved state (Adam/AdamW: 1/(√(v/(1−β2^t)) + ε); RMSprop; Adagrad); a parameter
without saved state (never updated) gets P = 0.

**Which parameter an entry is.** A torch optimizer's ``state_dict`` indexes its parameters by their position in its
groups, not by name: the names come from ``optimizer_params`` — the trained model (its trainable parameters in the
optimizer's order: the ``Trainer``'s two groups, decayed then not decayed, when the state holds two groups; else
``named_parameters`` order) or the list of names — and every saved tensor's shape is checked against the
parameter it is taken for.

Example (a plain torch optimizer's state_dict beside each checkpoint):
    >>> import copy, torch, pkfast
    >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
    <torch._C.Generator object at ...>
    >>> net = torch.nn.Linear(3, 2).double()
    >>> opt = torch.optim.AdamW(net.parameters(), lr=0.01)
    >>> X, y = torch.randn(8, 3, dtype=torch.float64), torch.randn(8, 2, dtype=torch.float64)
    >>> points, states = [dict(net.state_dict())], [None]
    >>> for _ in range(4):
    ...     opt.zero_grad(); torch.nn.functional.mse_loss(net(X), y).backward(); opt.step()
    ...     points.append({k: v.clone() for k, v in net.state_dict().items()})
    ...     states.append(copy.deepcopy(opt.state_dict()))
    >>> traj = pkfast.Trajectory.from_checkpoints(points[::2], lr=0.02, optimizer_states=states[::2],
    ...                                           optimizer_params=net)
    >>> traj.preconditioner_source, tuple(traj.preconditioner(0).shape)
    ('checkpoints', (8,))
"""

from __future__ import annotations

import os
import re
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pkfast.trajectory.optimizers import preconditioner
from pkfast.trajectory.recording import OptimizerKind
from pkfast.trajectory.state import CHECKPOINT_KIND as KIND
from pkfast.trajectory.state import StateRows

__all__ = ["CheckpointStates", "KIND", "OPTIMIZER_FILE", "trainer_param_order", "checkpoint_states"]

#: the optimizer state file of a Hugging Face ``Trainer`` checkpoint folder
OPTIMIZER_FILE = "optimizer.pt"
_FN = "pkfast.Trajectory.from_checkpoints"
#: the Trainer's rule for the parameters it does not decay (transformers ``Trainer.get_decay_parameter_names``)
_NO_DECAY = [r"bias", r"layernorm", r"rmsnorm", r"(?:^|\.)norm(?:$|\.)", r"_norm(?:$|\.)"]


class CheckpointStates(StateRows):
    """The preconditioner rows of a trajectory from checkpoints, held in memory: row s that of segment s (from the
    optimizer state saved with w_{s+1}), over ``entries`` (the trajectory's names, in its order); ``kind`` is
    :data:`KIND`. Reads as :class:`~pkfast.trajectory.state.StateRows` does; :meth:`pkfast.Trajectory.save` writes
    the rows to ``state.bin`` with checksums, and :meth:`pkfast.Trajectory.load` reads them back with this kind."""

    def __init__(self, rows: torch.Tensor, entries: list[tuple[str, tuple[int, ...]]]) -> None:  # noqa: D107
        self._rows = rows
        self.entries = entries
        self.width = int(rows.shape[1])
        self.kind = KIND
        self.np_dtype = np.dtype(str(rows.dtype).removeprefix("torch."))
        self.info = {"file": "state.bin", "checksums": "state.crc", "dtype": self.np_dtype.name,
                     "num_params": self.width, "entries": [[n, list(s)] for n, s in entries], "kind": KIND}

    def __len__(self) -> int:
        return int(self._rows.shape[0])

    def row(self, s: int) -> torch.Tensor:
        if not 0 <= s < len(self):
            raise IndexError(f"pkfast.Trajectory: step {s} out of range [0, {len(self)}) for its optimizer state")
        return self._rows[s]

    def verify(self) -> None:
        """Nothing to check: the rows were computed in memory from the checkpoints' optimizer states."""


def trainer_param_order(model: torch.nn.Module, groups: int) -> list[str]:
    """The names of ``model``'s trainable parameters in the order an optimizer with ``groups`` groups holds them:
    the ``Trainer``'s (parameters it decays, then the others; transformers' own rule where it is installed) for two,
    ``named_parameters`` order for one.

    Example:
        >>> net = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.LayerNorm(2))
        >>> trainer_param_order(net, 2)
        ['0.weight', '0.bias', '1.weight', '1.bias']
        >>> trainer_param_order(torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 1)), 2)
        ['0.weight', '1.weight', '0.bias', '1.bias']
    """
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    if groups == 1:
        return names
    decay = _decay_names(model)
    return [n for n in names if n in decay] + [n for n in names if n not in decay]


def _decay_names(model: torch.nn.Module) -> set[str]:
    try:
        from transformers import Trainer

        return set(Trainer.get_decay_parameter_names(None, model))  # (it does not use self)
    except Exception:  # noqa: BLE001 - transformers absent, or a version whose rule needs more: pkfast's copy
        pats = [re.compile(p) for p in _NO_DECAY]
        out = set()
        for mname, mod in model.named_modules():
            if isinstance(mod, torch.nn.LayerNorm):
                continue
            for pname, _ in mod.named_parameters(recurse=False):
                full = f"{mname}.{pname}" if mname else pname
                if not any(p.search(full.lower()) for p in pats) and not _under_layernorm(model, mname):
                    out.add(full)
        return out


def _under_layernorm(model: torch.nn.Module, mname: str) -> bool:
    parts = mname.split(".") if mname else []
    mod = model
    for p in parts:
        mod = getattr(mod, p)
        if isinstance(mod, torch.nn.LayerNorm):
            return True
    return False


def load_optimizer_state(path: Path) -> Mapping[str, Any]:
    """A saved optimizer ``state_dict`` (tensors, numbers and lists only: ``torch.load(weights_only=True)``)."""
    try:
        sd = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - torch raises many kinds for a file that is not one
        raise ValueError(f"{_FN}: {str(path)!r} is not a readable optimizer state ({type(e).__name__}: "
                         f"{str(e).splitlines()[0] if str(e) else ''}); expected torch.save(optimizer.state_dict())"
                         ) from None
    return _checked(sd, str(path))


def _checked(sd: Any, where: str) -> Mapping[str, Any]:
    if not isinstance(sd, Mapping) or "state" not in sd or "param_groups" not in sd:
        raise ValueError(f"{_FN}: optimizer state {where} is not an optimizer state_dict (expected a dict with "
                         f"'state' and 'param_groups', as optimizer.state_dict() returns); found "
                         f"{type(sd).__name__}{' with keys ' + str(list(sd)[:4]) if isinstance(sd, Mapping) else ''}")
    return sd


def _kind(sd: Mapping[str, Any], where: str) -> OptimizerKind:
    keys = set().union(*(set(s) for s in sd["state"].values())) if sd["state"] else set()
    for key, kind in (("exp_avg_sq", OptimizerKind.ADAM), ("square_avg", OptimizerKind.RMSPROP),
                      ("sum", OptimizerKind.ADAGRAD)):
        if key in keys:
            return kind
    raise ValueError(f"{_FN}: optimizer state {where} is not an adaptive optimizer's (its state holds "
                     f"{sorted(keys) or 'nothing'}; expected Adam/AdamW's exp_avg_sq, RMSprop's square_avg or "
                     "Adagrad's sum): it defines no preconditioner. Pass optimizer_states=None for the Euclidean "
                     "path kernel")


def _order(sd: Mapping[str, Any], optimizer_params: Any, where: str) -> list[str]:
    """The parameter name of each of the state_dict's parameter indices, in index order."""
    groups = sd["param_groups"]
    saved = [n for g in groups for n in (g.get("param_names") or [])]
    if isinstance(optimizer_params, torch.nn.Module):
        names = trainer_param_order(optimizer_params, len(groups))
    elif optimizer_params is not None:
        names = [str(n) for n in optimizer_params]
    elif saved:
        names = saved
    else:
        raise ValueError(f"{_FN}: optimizer state {where} indexes its parameters by position; pass "
                         "optimizer_params= (the trained model, or the parameters' names in the optimizer's order) "
                         "so that pkfast knows which parameter each entry is")
    count = sum(len(g["params"]) for g in groups)
    if len(names) != count:
        raise ValueError(f"{_FN}: optimizer state {where} holds {count} parameters in {len(groups)} group(s), but "
                         f"optimizer_params gives {len(names)} trainable parameters; pass the model the optimizer "
                         "was built on (with the same parameters trainable), or the names in the optimizer's order")
    return names


def _spec_name(name: str, spec: Mapping[str, tuple[int, ...]]) -> str:
    """The trajectory's entry of a model parameter: its name, or its name without a PEFT adapter segment (a PEFT
    adapter file drops ``.default``) or torch.compile's prefix."""
    for cand in (name, name.replace(".default.", "."), name.replace("_orig_mod.", "")):
        if cand in spec:
            return cand
    raise ValueError(f"{_FN}: the optimizer's parameter {name!r} has no entry in the checkpoints (their entries: "
                     f"{list(spec)[:4]}…); pass optimizer_params= naming the parameters as the checkpoints do")


def _row(sd: Mapping[str, Any], names: list[str], spec: dict[str, tuple[int, ...]], where: str
         ) -> dict[str, torch.Tensor]:
    """P over the optimizer's parameters in the trajectory's order (zero for entries it does not update)."""
    kind = _kind(sd, where)
    index = [i for g in sd["param_groups"] for i in g["params"]]
    group_of = {i: g for g in sd["param_groups"] for i in g["params"]}
    parts: dict[str, torch.Tensor] = {}
    for i, n in zip(index, names):
        key = _spec_name(n, spec)
        shape = spec[key]
        st = sd["state"].get(i) if i in sd["state"] else sd["state"].get(str(i))
        P = None if not st else preconditioner(kind, group_of[i], st)
        if P is not None and tuple(P.shape) != tuple(shape):
            raise ValueError(f"{_FN}: optimizer state {where}: entry {i} has shape {tuple(P.shape)}, but the "
                             f"parameter it is taken for, {n!r}, has shape {tuple(shape)} in the checkpoints: the "
                             "optimizer's parameter order is not the one assumed; pass optimizer_params= with the "
                             "names in the optimizer's order")
        parts[key] = torch.zeros(shape, dtype=torch.float64) if P is None else P
    return parts


def checkpoint_states(states: Sequence[Any], spec: list[tuple[str, torch.Size]], optimizer_params: Any,
                      dtype: torch.dtype) -> CheckpointStates:
    """The :class:`CheckpointStates` of a trajectory of ``len(states)`` checkpoints (``spec``: its entries) from the
    optimizer state saved with each (paths to ``torch.save`` files or state_dicts; the first may be None — segment
    s takes checkpoint s+1's)."""
    shapes = {n: tuple(int(d) for d in s) for n, s in spec}
    rows, entries = [], None
    for k, st in enumerate(states[1:], start=1):
        where = f"#{k}" if not isinstance(st, (str, os.PathLike)) else repr(str(st))
        if st is None:
            raise ValueError(f"{_FN}: checkpoint #{k} has no optimizer state; segment {k - 1} (w_{k - 1} → w_{k}) "
                             "takes the state saved with its end point, so every checkpoint after the first needs "
                             "one — or pass optimizer_states=None for the Euclidean path kernel")
        sd = load_optimizer_state(Path(st)) if isinstance(st, (str, os.PathLike)) else _checked(st, where)
        parts = _row(sd, _order(sd, optimizer_params, where), shapes, where)
        keys = [n for n, _ in spec if n in parts]
        if entries is None:
            entries = [(n, shapes[n]) for n in keys]
        elif [n for n, _ in entries] != keys:
            raise ValueError(f"{_FN}: optimizer state {where} covers other parameters than checkpoint #1's")
        rows.append(torch.cat([parts[n].reshape(-1) for n in keys]).to(dtype))
    return CheckpointStates(torch.stack(rows), entries or [])


def folder_states(checkpoints: Sequence[Any], optimizer_params: Any) -> list[Path | None] | None:
    """``optimizer_states="auto"``: each Trainer folder's ``optimizer.pt`` where every checkpoint after the first
    has one, else None; a warning where they have it but ``optimizer_params`` does not say whose it is."""
    found = [Path(c) / OPTIMIZER_FILE if isinstance(c, (str, os.PathLike)) and Path(c).is_dir()
             and (Path(c) / OPTIMIZER_FILE).exists() else None for c in checkpoints]
    if any(f is None for f in found[1:]):
        return None
    if optimizer_params is None:
        warnings.warn(f"{_FN}: the checkpoint folders hold the optimizer's state ({OPTIMIZER_FILE}), but without "
                      "optimizer_params= (the trained model) pkfast cannot tell which parameter each entry is: the "
                      "trajectory records no preconditioner, and pkfast.gram computes the Euclidean path kernel. Pass "
                      "optimizer_params=model for the preconditioned one, or optimizer_states=None to silence this",
                      RuntimeWarning, stacklevel=3)
        return None
    return found
