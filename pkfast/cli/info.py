"""info: ``pkfast info`` — what a stored Gram (or stored attribution scores) holds, how far it got and whether
its tiles still match their checksums; or what a recorded trajectory directory holds."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any

from pkfast.cli.common import UserError

__all__ = ["add_parser", "run_info", "describe", "describe_trajectory"]


def add_parser(sub: Any) -> None:
    i = sub.add_parser("info", help="describe a stored Gram (shape, options, progress, validity) or a recorded "
                                    "trajectory directory (steps, optimizer, batches, loss)")
    i.add_argument("path", metavar="gram.npy|TRAJECTORY")
    i.add_argument("--verify", action="store_true", help="re-read every finished tile against its checksum")
    i.add_argument("--json", action="store_true", help="print the description as JSON")
    i.set_defaults(run=run_info)


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
        "preconditioner": man.get("state"), "clipped": sum(s.clip_coef not in (None, 1.0) for s in rec.steps),
        "not_scalar_clipped": sum(s.clip_scalar is False for s in rec.steps),
        "clip_measured": bool(opt is not None and opt.extra.get("clip_measured")),
        "accumulated": sum(s.micro_batches is not None and len(s.micro_batches) > 1 for s in rec.steps),
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
    st = d["preconditioner"]
    when = ("at checkpoints only (segment s: the optimizer state saved with w_{s+1}; for gram, not the exact machine)"
            if st and st.get("kind") == "preconditioner_at_checkpoints" else "per step")
    print(f"  preconditioner: P_s {when} ({st['dtype']}, {st['num_params']} per row, in {st['file']}, "
          "checksummed)" if st else "  preconditioner: none recorded")
    print(f"  clipping: {d['clipped']}/{d['steps']} steps clipped, {d['not_scalar_clipped']} not by one scalar; "
          f"gradient accumulation: {d['accumulated']} steps with several micro-batches" if d["clip_measured"] else
          f"  clipping: not measured; gradient accumulation: {d['accumulated']} steps with several micro-batches")
    return 0


def run_info(a: argparse.Namespace) -> int:
    from pkfast.trajectory.files import MANIFEST

    if Path(a.path).is_dir() and (Path(a.path) / MANIFEST).exists() and not str(a.path).endswith(".pkfast"):
        if a.verify:
            raise UserError("--verify applies to a stored Gram; a trajectory directory has no tiles to re-read")
        return _info_trajectory(a)
    d = describe(a.path, verify=a.verify)
    if a.json:
        print(json.dumps(d, indent=1))
    else:
        _print_store(d, a.verify)
    return 0 if d.get("valid", True) else 1


def _options_line(o: dict[str, Any], symmetric: bool) -> str:
    if o.get("kind") == "attribution-scores":  # pkfast.attribution.scores(out=…) / pkfast attribution scores
        how = (f"exact loss kernel, rule={o.get('rule')} method={o.get('method')}" if o.get("source") == "exact" else
               f"sketched (of={o.get('of')} k={o.get('k')} seed={o.get('seed')})")
        if o.get("preconditioner"):
            how += f", preconditioner={o['preconditioner']}"
        return f"  attribution scores (queries × training points): {how}"
    sk = " k=%s seed=%s projection=%s" % (o.get("k"), o.get("seed"), o.get("projection") or "dense")
    return (f"  options: outputs={o['outputs']} rule={o['rule']} diagonal={o['diagonal']} backend={o['backend']} "
            f"precision={o['precision']} device={o['device']} method={o.get('method', 'jacobian')}"
            f"{' of=loss' if o.get('of') == 'loss' else ''}{sk if o.get('method') == 'sketch' else ''}"
            f"{' preconditioner=' + str(o['preconditioner']) if o.get('preconditioner') else ''}"
            f"{' (symmetric: upper tiles mirrored)' if symmetric else ''}")


def _print_store(d: dict[str, Any], verify: bool) -> None:
    pct = 100.0 * d["tiles_done"] / max(1, d["tiles"])
    o = d["options"]
    print(f"{d['path']}: {'×'.join(map(str, d['shape']))} {d['dtype']} ({d['size_bytes'] / 2**20:.1f} MiB)")
    print(_options_line(o, d["symmetric"]))
    if o.get("kind") != "attribution-scores" or o.get("source") == "exact":
        # format version 2 records the routes used; version 1 the resolved method only
        print(f"  routes: {o.get('summary') or str(o.get('method', 'jacobian')) + ' (recorded by pkfast 0.1)'}")
    print(f"  progress: {d['tiles_done']}/{d['tiles']} tiles ({pct:.1f}%){' — complete' if d['complete'] else ''}")
    print(f"  plan: tiles of ≤{d['plan']['row_block']}×{d['plan']['col_block']}, vmap chunk {d['plan']['chunk']}")
    print("  fingerprints: " + ", ".join(f"{k} {v[:12]}" for k, v in d["fingerprints"].items()))
    if verify:
        print("  valid: every finished tile matches its checksum" if d["valid"] else
              f"  INVALID: {len(d['bad_tiles'])} finished tile(s) do not match their checksum: {d['bad_tiles'][:20]}")
    else:
        print("  checks: manifest and file size OK (--verify re-reads the tiles)")
