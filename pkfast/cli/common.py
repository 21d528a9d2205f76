"""common: what the ``pkfast`` commands share — the user-error type, loading the model factory, arrays, targets
and an output function from their flags, the device, the model/trajectory/data flags, and ``torchrun``."""

from __future__ import annotations

import argparse
import contextlib
import importlib
import importlib.util
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

__all__ = ["UserError", "load_callable", "load_array", "load_targets", "load_output_fn", "model_of", "device_of",
           "add_model_flags", "add_loss_flags", "add_compute_flags", "inputs", "distributed", "OUTPUT_FNS"]


class UserError(Exception):
    """A mistake in the command line: printed as one line, exit status 2."""


def load_callable(flag: str, spec: str, what: str = "FACTORY") -> Any:
    """The attribute ``ATTR`` of ``MODULE:ATTR`` (``MODULE`` importable, or a ``.py`` file path)."""
    mod_name, sep, attr = spec.rpartition(":")
    if not sep or not mod_name or not attr:
        raise UserError(f"{flag} must be MODULE:{what} (e.g. mypkg.models:{'make_net' if what == 'FACTORY' else 'fn'}); "
                        f"found {spec!r}")
    if mod_name.endswith(".py") or os.sep in mod_name:
        path = Path(mod_name)
        if not path.is_file():
            raise UserError(f"{flag}: no such file {mod_name!r}")
        s = importlib.util.spec_from_file_location(path.stem, path)
        module = importlib.util.module_from_spec(s)  # type: ignore[arg-type]
        sys.modules[path.stem] = module
        s.loader.exec_module(module)  # type: ignore[union-attr]
    else:
        sys.path.insert(0, os.getcwd())
        try:
            module = importlib.import_module(mod_name)
        except ModuleNotFoundError as e:
            raise UserError(f"{flag}: cannot import module {mod_name!r} ({e})") from e
    if not hasattr(module, attr):
        raise UserError(f"{flag}: module {mod_name!r} has no attribute {attr!r}")
    return getattr(module, attr)


def _unreadable(flag: str, path: str, e: Exception) -> UserError:
    """numpy's refusal of a data file, in the user's terms (never numpy's ``allow_pickle`` advice)."""
    if "allow_pickle" in str(e) or "Python objects" in str(e):
        return UserError(f"{flag}: {path!r} holds Python objects (an object array), which pkfast does not load; "
                         "expected numeric arrays: save them with np.save(path, np.asarray(X, dtype=np.float32))")
    return UserError(f"{flag}: {path!r} is not a readable .npy array ({e})")


def load_array(flag: str, path: str) -> Any:
    """The tensor in a ``.npy``, or the tensors of a ``.npz`` by name (the model's keyword arguments)."""
    import numpy as np
    import torch

    if not Path(path).is_file():
        raise UserError(f"{flag}: no such file {path!r}")
    try:
        a = np.load(path, mmap_mode="r", allow_pickle=False)
    except ValueError as e:
        raise _unreadable(flag, path, e) from e
    if isinstance(a, np.lib.npyio.NpzFile):  # several arrays: the model's keyword arguments, split per sample
        with a:
            if not a.files:
                raise UserError(f"{flag}: {path!r} is an empty .npz; expected one array per model argument")
            try:
                return {k: torch.from_numpy(np.array(a[k])) for k in a.files}
            except ValueError as e:
                raise _unreadable(flag, path, e) from e
    if not isinstance(a, np.ndarray):
        raise UserError(f"{flag}: {path!r} holds {type(a).__name__}; expected an array (.npy) or arrays (.npz)")
    return torch.from_numpy(np.array(a))


def load_targets(flag: str, path: str | None, n: int | None = None, of: str = "--data") -> Any:
    """The targets in a ``.npy`` (``[n]`` classes, ``[n, L]`` tokens, ``[n, C]`` regression targets)."""
    if path is None:
        return None
    y = load_array(flag, path)
    if isinstance(y, dict):
        raise UserError(f"{flag}: {path!r} is an .npz of several arrays; expected one array of targets (.npy)")
    if n is not None and (y.ndim == 0 or y.shape[0] != n):
        raise UserError(f"{flag}: {path!r} holds {tuple(y.shape)} targets; expected one per sample of {of} ({n})")
    return y


def _last_token(o: Any) -> Any:
    from pkfast.engine.inputs import reduce_output

    return reduce_output(o)[:, -1]


def _first(o: Any) -> Any:
    return o[0]


def _logits(o: Any) -> Any:
    return o["logits"] if isinstance(o, dict) or hasattr(o, "keys") else o.logits


#: ``--output-fn`` by name: what each reduces the model's return value to.
OUTPUT_FNS = {"logits": (_logits, "the 'logits' entry (a mapping, a Hugging Face ModelOutput)"),
              "first": (_first, "the first element (a tuple or list)"),
              "last-token": (_last_token, "the outputs at the last sequence position: [n, L, V] -> [n, V]")}


def load_output_fn(spec: str | None) -> Any:
    """``--output-fn``: a name of :data:`OUTPUT_FNS`, ``MODULE:FUNCTION``, or None (pkfast's default)."""
    if spec is None:
        return None
    if spec in OUTPUT_FNS:
        return OUTPUT_FNS[spec][0]
    if ":" not in spec:
        raise UserError(f"--output-fn must be one of {', '.join(OUTPUT_FNS)} or MODULE:FUNCTION (a function of the "
                        f"model's return value, e.g. nets.py:logits_of); found {spec!r}")
    f = load_callable("--output-fn", spec, "FUNCTION")
    if not callable(f):
        raise UserError(f"--output-fn: {spec} is {type(f).__name__}, not a function")
    return f


def model_of(a: argparse.Namespace) -> Any:
    """The model of ``--model`` (on ``--device``, in eval mode)."""
    import torch

    model = load_callable("--model", a.model)()
    if not isinstance(model, torch.nn.Module):
        raise UserError(f"--model: {a.model} returned {type(model).__name__}; expected a torch.nn.Module")
    if getattr(a, "device", None) is not None:
        model = model.to(device_of(a.device))
    return model.eval()


def device_of(spec: str) -> Any:
    """--device as a torch.device that exists on this machine."""
    import torch

    try:
        dev = torch.device(spec)
    except (RuntimeError, ValueError) as e:
        raise UserError(f"--device: {spec!r} is not a device (expected e.g. cpu, cuda, cuda:1): {e}") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            why = "this torch has no CUDA support" if torch.version.cuda is None else "no CUDA device is visible"
            raise UserError(f"--device {spec}: CUDA is not available on this machine ({why}); use --device cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise UserError(f"--device {spec}: this machine has {torch.cuda.device_count()} CUDA device(s) "
                            f"(cuda:0 … cuda:{torch.cuda.device_count() - 1})")
    elif dev.type != "cpu" and not getattr(torch, dev.type, None):
        raise UserError(f"--device {spec}: device type {dev.type!r} is not available in this torch")
    return dev


def add_model_flags(q: argparse.ArgumentParser, *, required: bool = True) -> None:
    """--model, --trajectory, --device, --output-fn."""
    q.add_argument("--model", required=required, metavar="MODULE:FACTORY",
                   help="zero-argument callable returning the model, e.g. mypkg.models:make_net or nets.py:make_net")
    q.add_argument("--trajectory", required=required, metavar="PATH", help="trajectory directory (Trajectory.save)")
    q.add_argument("--device", default=None, help="move the model to this device (default: where the factory put "
                   "it; under torchrun with CUDA: cuda:LOCAL_RANK)")
    q.add_argument("--output-fn", default=None, metavar="SPEC",
                   help="reduce what the model returns to its outputs: " + "; ".join(f"{k}: {v[1]}" for k, v in
                                                                                     OUTPUT_FNS.items())
                   + "; or MODULE:FUNCTION (default: a tensor as it is, a mapping's 'logits', a tuple's first)")


def add_loss_flags(q: argparse.ArgumentParser, *, targets: str = "--targets", samples: str = "--data") -> None:
    """--loss (and the targets flag) of the loss kernel."""
    q.add_argument("--loss", default=None, choices=("cross_entropy", "mse"),
                   help="the per-sample loss (default: the one recorded with the trajectory)")
    q.add_argument(targets, default=None, metavar="Y.npy", help=f"targets of {samples} (.npy: [N] classes, [N, L] "
                   "tokens, or [N, C])")


def add_compute_flags(q: argparse.ArgumentParser) -> None:
    """--memory, --dtype, --threads, --preconditioner."""
    q.add_argument("--memory", default=None, metavar="BYTES", help="working-memory budget, e.g. 4GiB (default: "
                   "half of the free memory)")
    q.add_argument("--dtype", default="float32", choices=("float32", "float64"))
    q.add_argument("--threads", default=None, type=_threads, metavar="auto|all|N",
                   help="CPU threads: auto (default: fewer while other processes hold the cores), all (torch's "
                   "count) or a number")


    q.add_argument("--preconditioner", default="auto", choices=("auto", "recorded", "none"),
                   help="the kernel of an adaptive optimizer's trajectory: recorded (Σ ε_s J_s diag(P_s) J_sᵀ with "
                   "each step's recorded preconditioner), none (the Euclidean kernel) or auto (default: recorded "
                   "where the trajectory records it)")


def _threads(v: str) -> str | int:
    return int(v) if v.isdigit() else v


def inputs(a: argparse.Namespace) -> tuple[Any, Any, Any, Any]:
    """The model, the trajectory, X (``--data``) and X2 (``--data2``, or None) of a command."""
    import pkfast

    model = model_of(a)
    traj = pkfast.Trajectory.load(a.trajectory)
    X = load_array("--data", a.data)
    X2 = load_array("--data2", a.data2) if getattr(a, "data2", None) else None
    return model, traj, X, X2


@contextlib.contextmanager
def distributed(a: argparse.Namespace) -> Iterator[int]:
    """Under ``torchrun`` (``RANK``/``WORLD_SIZE`` > 1) a process group for the command's duration (NCCL with one
    GPU per rank, else gloo); yields this process's rank (0 without torchrun)."""
    import torch

    if not ("RANK" in os.environ and "WORLD_SIZE" in os.environ and int(os.environ["WORLD_SIZE"]) > 1):
        yield 0
        return
    cuda = torch.cuda.is_available()
    if cuda:  # NCCL's collectives run on the current device: one GPU per rank
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        if getattr(a, "device", None) is None:
            a.device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
    torch.distributed.init_process_group("nccl" if cuda else "gloo")
    try:
        yield torch.distributed.get_rank()
    finally:
        torch.distributed.destroy_process_group()
