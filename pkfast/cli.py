"""cli: the ``pkfast`` command — ``pkfast gram …`` computes a stored Gram, ``pkfast plan …`` shows how it would
be computed, ``pkfast info …`` describes a stored one.

    pkfast gram --model MODULE:FACTORY --trajectory PATH --data X.npy [--data2 X2.npy] --out gram.npy
                [--outputs trace|mean|full] [--rule left|trapezoid|exact] [--nodes 2] [--diagonal] [--memory 4GiB]
                [--dtype float32|float64] [--backend auto|torch|triton] [--method auto|jacobian|factorized|materialized|sketch]
                [--k 1024] [--seed 0] [--overwrite] [--no-progress]
    pkfast plan --model MODULE:FACTORY --trajectory PATH --data X.npy [--data2 X2.npy] [the options of gram]
    pkfast info gram.npy [--verify] [--json]      (or: pkfast info TRAJECTORY_DIR [--json])
    pkfast --version

``MODULE:FACTORY`` names a zero-argument callable returning the ``torch.nn.Module`` (``MODULE`` is an importable
module such as ``mypkg.models`` or a ``.py`` file path); the trajectory is a directory written by
``Trajectory.save`` / ``TrajectoryRecorder``. Under ``torchrun`` the tiles are shared across the ranks. A user
mistake prints one line (``pkfast: error: …``) and exits with status 2; an interrupted run exits with 130 and
resumes when the same command is run again.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import os
import sys
import re
from pathlib import Path
from typing import Any

from pkfast._version import __version__

__all__ = ["main"]

_USER_ERRORS = (ValueError, TypeError, FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError,
                KeyError)


class _UserError(Exception):
    pass


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="pkfast", description="Path-kernel Gram matrices of neural networks.")
    p.add_argument("--version", action="version", version=f"pkfast {__version__}")
    sub = p.add_subparsers(dest="command", required=True)
    g = sub.add_parser("gram", help="compute a path-kernel Gram into a .npy file (resumable)")
    pl = sub.add_parser("plan", help="print how pkfast.gram would compute it: each layer's route, FLOPs, tiles")
    for q in (g, pl):
        q.add_argument("--model", required=True, metavar="MODULE:FACTORY",
                       help="zero-argument callable returning the model, e.g. mypkg.models:make_net or nets.py:make_net")
        q.add_argument("--trajectory", required=True, metavar="PATH", help="trajectory directory (Trajectory.save)")
        q.add_argument("--data", required=True, metavar="X.npy",
                       help="samples X [N, *features] (.npy), or an .npz of several arrays passed to the model as "
                            "keyword arguments (e.g. input_ids, attention_mask), split per sample")
        q.add_argument("--data2", default=None, metavar="X2.npy", help="samples X2 for a cross-Gram (.npy or .npz)")
        q.add_argument("--outputs", default="trace", choices=("trace", "mean", "full"))
        q.add_argument("--rule", default="left", choices=("left", "trapezoid", "exact"),
                       help="left (Riemann sum, default), trapezoid, or exact (Bell et al.'s exact path kernel: "
                       "asymmetric, Gauss–Legendre quadrature of each step)")
        q.add_argument("--nodes", type=int, default=None, help="Gauss–Legendre nodes per step for --rule exact "
                       "(default 2)")
        q.add_argument("--diagonal", action="store_true", help="only K(x, x): [N] (or [N, C, C])")
        q.add_argument("--memory", default=None, metavar="BYTES", help="working-memory budget, e.g. 4GiB (default: "
                       "half of the free memory)")
        q.add_argument("--dtype", default="float32", choices=("float32", "float64"))
        q.add_argument("--backend", default="auto", choices=("auto", "torch", "triton"))
        q.add_argument("--method", default="auto", choices=("auto", "jacobian", "factorized", "materialized", "sketch"),
                       help="auto (default): each supported layer factorised or materialised by the cost model; "
                       "jacobian: every Jacobian materialised by vmap(jacrev); factorized: every supported layer "
                       "factorised; materialized: every supported layer's per-sample gradient formed from its "
                       "factors; sketch: random JL features (approximate, unbiased)")
        q.add_argument("--device", default=None, help="move the model to this device (default: where the factory put "
                       "it; under torchrun with CUDA: cuda:LOCAL_RANK)")
    g.add_argument("--k", type=int, default=None, help="sketch dimension for --method sketch (default 1024)")
    g.add_argument("--seed", type=int, default=None, help="sketch seed for --method sketch (default 0)")
    g.add_argument("--projection", default="auto", choices=("auto", "dense", "kronecker"),
                   help="--method sketch: each layer Kronecker-factored where cheaper (auto, default), every "
                   "parameter dense, or every factorisable layer Kronecker-factored")
    g.add_argument("--out", required=True, metavar="gram.npy", help="output .npy (manifest in <out>.pkfast/)")
    g.add_argument("--overwrite", action="store_true", help="discard an existing output and start afresh")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")
    i = sub.add_parser("info", help="describe a stored Gram (shape, options, progress, validity) or a recorded "
                                    "trajectory directory (steps, optimizer, batches, loss)")
    i.add_argument("path", metavar="gram.npy|TRAJECTORY")
    i.add_argument("--verify", action="store_true", help="re-read every finished tile against its checksum")
    i.add_argument("--json", action="store_true", help="print the description as JSON")
    return p


def _load_factory(spec: str) -> Any:
    mod_name, sep, attr = spec.rpartition(":")
    if not sep or not mod_name or not attr:
        raise _UserError(f"--model must be MODULE:FACTORY (e.g. mypkg.models:make_net); found {spec!r}")
    if mod_name.endswith(".py") or os.sep in mod_name:
        path = Path(mod_name)
        if not path.is_file():
            raise _UserError(f"--model: no such file {mod_name!r}")
        s = importlib.util.spec_from_file_location(path.stem, path)
        module = importlib.util.module_from_spec(s)  # type: ignore[arg-type]
        sys.modules[path.stem] = module
        s.loader.exec_module(module)  # type: ignore[union-attr]
    else:
        sys.path.insert(0, os.getcwd())
        try:
            module = importlib.import_module(mod_name)
        except ModuleNotFoundError as e:
            raise _UserError(f"--model: cannot import module {mod_name!r} ({e})") from e
    if not hasattr(module, attr):
        raise _UserError(f"--model: module {mod_name!r} has no attribute {attr!r}")
    return getattr(module, attr)


def _load_array(flag: str, path: str):
    import numpy as np
    import torch

    if not Path(path).is_file():
        raise _UserError(f"{flag}: no such file {path!r}")
    try:
        a = np.load(path, mmap_mode="r", allow_pickle=False)
    except ValueError as e:
        raise _unreadable(flag, path, e) from e
    if isinstance(a, np.lib.npyio.NpzFile):  # several arrays: the model's keyword arguments, split per sample
        with a:
            if not a.files:
                raise _UserError(f"{flag}: {path!r} is an empty .npz; expected one array per model argument")
            try:
                return {k: torch.from_numpy(np.array(a[k])) for k in a.files}
            except ValueError as e:
                raise _unreadable(flag, path, e) from e
    if not isinstance(a, np.ndarray):
        raise _UserError(f"{flag}: {path!r} holds {type(a).__name__}; expected an array (.npy) or arrays (.npz)")
    return torch.from_numpy(np.array(a))


def _model(a: argparse.Namespace):
    import torch

    model = _load_factory(a.model)()
    if not isinstance(model, torch.nn.Module):
        raise _UserError(f"--model: {a.model} returned {type(model).__name__}; expected a torch.nn.Module")
    return model


def _device(spec: str):
    """--device as a torch.device that exists on this machine."""
    import torch

    try:
        dev = torch.device(spec)
    except (RuntimeError, ValueError) as e:
        raise _UserError(f"--device: {spec!r} is not a device (expected e.g. cpu, cuda, cuda:1): {e}") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            why = "this torch has no CUDA support" if torch.version.cuda is None else "no CUDA device is visible"
            raise _UserError(f"--device {spec}: CUDA is not available on this machine ({why}); use --device cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise _UserError(f"--device {spec}: this machine has {torch.cuda.device_count()} CUDA device(s) "
                             f"(cuda:0 … cuda:{torch.cuda.device_count() - 1})")
    elif dev.type != "cpu" and not getattr(torch, dev.type, None):
        raise _UserError(f"--device {spec}: device type {dev.type!r} is not available in this torch")
    return dev


def _options(a: argparse.Namespace) -> dict[str, Any]:
    """The options of gram/plan from the flags (``--nodes`` only when given: it applies to --rule exact)."""
    import torch

    o = dict(outputs=a.outputs, rule=a.rule, diagonal=a.diagonal, backend=a.backend, dtype=getattr(torch, a.dtype),
             memory_budget=a.memory, method=a.method)
    if a.nodes is not None:
        o["nodes"] = a.nodes
    return o


def _inputs(a: argparse.Namespace, model):
    """The model (on --device, in eval mode), the trajectory, X and X2 of a gram/plan command."""
    import pkfast

    if a.device is not None:
        model = model.to(_device(a.device))
    model.eval()
    traj = pkfast.Trajectory.load(a.trajectory)
    X = _load_array("--data", a.data)
    X2 = _load_array("--data2", a.data2) if a.data2 else None
    return model, traj, X, X2


def _gram(a: argparse.Namespace) -> int:
    import torch

    import pkfast

    model = _model(a)
    dist = False
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ and int(os.environ["WORLD_SIZE"]) > 1:
        cuda = torch.cuda.is_available()
        if cuda:  # NCCL's collectives run on the current device: one GPU per rank
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
            if a.device is None:
                a.device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
        torch.distributed.init_process_group("nccl" if cuda else "gloo")
        dist = True
    try:
        model, traj, X, X2 = _inputs(a, model)
        K = pkfast.gram(model, traj, X, X2, out=a.out, overwrite=a.overwrite, progress=not a.no_progress, k=a.k,
                        seed=a.seed, projection=a.projection, **_options(a))
        rank = torch.distributed.get_rank() if dist else 0
        if rank == 0:
            print(f"pkfast: wrote {a.out}: shape {tuple(K.shape)} {K.dtype}")
    finally:
        if dist:
            torch.distributed.destroy_process_group()
    return 0


def _plan(a: argparse.Namespace) -> int:
    import pkfast

    model, traj, X, X2 = _inputs(a, _model(a))
    print(pkfast.plan(model, traj, X, X2, **_options(a)))
    return 0


def describe(path: str | os.PathLike, *, verify: bool = False) -> dict[str, Any]:
    """What ``pkfast info`` prints, as a dict."""
    import pkfast

    g = pkfast.open_gram(path)
    d: dict[str, Any] = {
        "path": str(g.path), "shape": list(g.shape), "dtype": str(g.dtype),
        "size_bytes": int(Path(g.path).stat().st_size), "options": g.options,
        "symmetric": g.manifest["symmetric"], "tiles_done": len(g.done), "tiles": g.num_tiles,
        "complete": g.complete, "created": g.manifest.get("created"), "fingerprints": g.manifest["fingerprints"],
        "plan": {k: v for k, v in g.manifest["plan"].items() if k != "tiles"},
    }
    if verify:
        bad = g.verify()
        d["verified"] = True
        d["bad_tiles"] = bad
        d["valid"] = not bad
    return d


def describe_trajectory(path: str | os.PathLike) -> dict[str, Any]:
    """What ``pkfast info`` prints for a recorded trajectory directory, read through its typed recording."""
    from pkfast.trajectory.files import read_checksums, read_manifest
    from pkfast.trajectory.fingerprints import KEY
    from pkfast.trajectory.recording import Recording

    rec = Recording.from_files(path)
    man = read_manifest(Path(path))
    opt = rec.optimizer
    lrs = [s.lr for s in rec.steps]
    hyper = rec.steps[0].groups[0].to_json() if rec.steps and rec.steps[0].groups else {}
    return {
        "path": str(path), "kind": "trajectory", "steps": rec.num_steps, "num_params": int(man["num_params"]),
        "dtype": man["dtype"], "optimizer": None if opt is None else {"kind": opt.kind.value, "class": opt.class_name,
                                                                       "hyper": hyper},
        "lr": [min(lrs), max(lrs)] if lrs else None, "lr_total": float(sum(lrs)),
        "batches_recorded": sum(s.batch_indices is not None for s in rec.steps),
        "every_step": all(s.covers == 1 for s in rec.steps), "loss": None if rec.loss is None else dict(rec.loss),
        "targets": rec.has_targets, "source": rec.extra.get("source"),
        "checksums": read_checksums(Path(path)) is not None,
        "input_fingerprints": sum(KEY in s.extra for s in rec.steps),
    }


def _info_trajectory(a: argparse.Namespace) -> int:
    d = describe_trajectory(a.path)
    if a.json:
        print(json.dumps(d, indent=1))
        return 0
    print(f"{d['path']}: recorded trajectory, {d['steps']} steps, {d['num_params']} parameters ({d['dtype']})"
          + (f", by {d['source']}" if d["source"] else ""))
    o = d["optimizer"]
    hyper = " ".join(f"{k}={v}" for k, v in (o or {}).get("hyper", {}).items())
    print(f"  optimizer: {o['class'] + (' ' + hyper if hyper else '') if o else 'not recorded'}")
    if d["lr"]:
        print(f"  step sizes: {d['lr'][0]:.6g} … {d['lr'][1]:.6g} (sum {d['lr_total']:.6g})"
              + ("" if d["every_step"] else "; some points cover several optimizer steps"))
    print(f"  batches: recorded for {d['batches_recorded']}/{d['steps']} steps; targets: "
          f"{'saved' if d['targets'] else 'not saved'}")
    loss = d["loss"]
    print(f"  loss: {loss['kind'] + ' (' + str(loss.get('reduction')) + ')' if loss else 'not recorded'}")
    print("  checksums: " + ("present (a CRC-32 per weight row, in weights.crc)" if d["checksums"] else
                             "none (recorded before pkfast wrote weight checksums; rows are read unverified)"))
    print(f"  input fingerprints: {d['input_fingerprints']}/{d['steps']} steps (a CRC-32 per batch row of the model's "
          "inputs, against which KernelMachine checks X_train)" if d["input_fingerprints"] else
          "  input fingerprints: none (X_train cannot be checked against the data the model saw)")
    return 0


def _info(a: argparse.Namespace) -> int:
    from pkfast.trajectory.files import MANIFEST

    if Path(a.path).is_dir() and (Path(a.path) / MANIFEST).exists() and not str(a.path).endswith(".pkfast"):
        if a.verify:
            raise _UserError("--verify applies to a stored Gram; a trajectory directory has no tiles to re-read")
        return _info_trajectory(a)
    d = describe(a.path, verify=a.verify)
    if a.json:
        print(json.dumps(d, indent=1))
    else:
        pct = 100.0 * d["tiles_done"] / max(1, d["tiles"])
        o = d["options"]
        print(f"{d['path']}: {'×'.join(map(str, d['shape']))} {d['dtype']} ({d['size_bytes'] / 2**20:.1f} MiB)")
        sk = " k=%s seed=%s projection=%s" % (o.get("k"), o.get("seed"), o.get("projection") or "dense")
        print(f"  options: outputs={o['outputs']} rule={o['rule']} diagonal={o['diagonal']} backend={o['backend']} "
              f"precision={o['precision']} device={o['device']} method={o.get('method', 'jacobian')}"
              f"{sk if o.get('method') == 'sketch' else ''}"
              f"{' (symmetric: upper tiles mirrored)' if d['symmetric'] else ''}")
        # format version 2 records the routes used; version 1 the resolved method only
        print(f"  routes: {o.get('summary') or str(o.get('method', 'jacobian')) + ' (recorded by pkfast 0.1)'}")
        print(f"  progress: {d['tiles_done']}/{d['tiles']} tiles ({pct:.1f}%){' — complete' if d['complete'] else ''}")
        print(f"  plan: tiles of ≤{d['plan']['row_block']}×{d['plan']['col_block']}, vmap chunk {d['plan']['chunk']}")
        print("  fingerprints: " + ", ".join(f"{k} {v[:12]}" for k, v in d["fingerprints"].items()))
        if a.verify:
            print("  valid: every finished tile matches its checksum" if d["valid"] else
                  f"  INVALID: {len(d['bad_tiles'])} finished tile(s) do not match their checksum: {d['bad_tiles'][:20]}")
        else:
            print("  checks: manifest and file size OK (--verify re-reads the tiles)")
    return 0 if d.get("valid", True) else 1


def _unreadable(flag: str, path: str, e: Exception) -> "_UserError":
    """numpy's refusal of a data file, in the user's terms (never numpy's ``allow_pickle`` advice)."""
    if "allow_pickle" in str(e) or "Python objects" in str(e):
        return _UserError(f"{flag}: {path!r} holds Python objects (an object array), which pkfast does not load; "
                          "expected numeric arrays: save them with np.save(path, np.asarray(X, dtype=np.float32))")
    return _UserError(f"{flag}: {path!r} is not a readable .npy array ({e})")


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    from pkfast.store.writer import StoreError

    from pkfast.engine.accumulate import BackendUnavailable

    try:
        return {"gram": _gram, "plan": _plan, "info": _info}[args.command](args)
    except KeyboardInterrupt:
        print("pkfast: interrupted; finished tiles are kept — run the same command again to resume", file=sys.stderr)
        return 130
    except (_UserError, StoreError, BackendUnavailable, *_USER_ERRORS) as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        if args.command == "info":  # (info only reads: the remedy is a fresh 'pkfast gram … --overwrite')
            msg = re.sub(r"pass overwrite=True to (?:start afresh|recompute it|replace it)",
                         "recompute it with 'pkfast gram … --overwrite'", msg)
        print(f"pkfast: error: {_in_cli_words(msg)}", file=sys.stderr)
        return 2


#: The library's words for an option → the command line's (its messages name Python arguments).
_FLAGS = {"memory_budget": "--memory", "X2": "--data2", "X": "--data", "out": "--out"}
_VALUED = ("outputs", "rule", "method", "backend", "dtype", "nodes", "k", "seed", "precision")


def _in_cli_words(msg: str) -> str:
    """A library message in the command line's words: ``overwrite=True`` → ``--overwrite``, ``rule='exact'`` →
    ``--rule exact``, ``memory_budget`` → ``--memory``, ``X2`` → ``--data2``; the calling function's name
    (``pkfast.gram:``) is dropped, since the command is the caller."""
    msg = re.sub(r"^pkfast\.[\w.]+: ", "", msg)
    msg = re.sub(r"\boverwrite=True\b", "--overwrite", msg)
    msg = re.sub(r"\bthe data (X2?)\b", lambda m: f"the {_FLAGS[m.group(1)]} samples", msg)
    msg = re.sub(r"\b(" + "|".join(_VALUED) + r")=(['\"]?)([\w.\-]+)\2", r"--\1 \3", msg)
    msg = re.sub(r"\b(" + "|".join(_VALUED) + r")=None\b", r"no --\1", msg)
    return re.sub(r"(?<![\w.\-'])(" + "|".join(_FLAGS) + r")(?![\w'=])", lambda m: _FLAGS[m.group(1)], msg)


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
