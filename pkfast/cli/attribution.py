"""attribution: ``pkfast attribution scores|top-k|self-influence`` — :mod:`pkfast.attribution` from the command
line, exact (``--model --trajectory --train --train-targets``: the loss kernel of :func:`pkfast.gram`) or
sketched (``--train-features``/``--query-features``: stores written by ``pkfast sketch --of loss``)."""

from __future__ import annotations

import argparse
import json
from typing import Any

from pkfast.cli.common import (UserError, add_compute_flags, add_model_flags, distributed, load_array,
                               load_output_fn, load_targets)

__all__ = ["add_parser", "run_attribution"]

#: The library's sample names in this command's words (``X``: the queries, ``X2``: the training points).
WORDS = {"X": "--query", "X2": "--train"}


def add_parser(sub: Any) -> None:
    p = sub.add_parser("attribution", help="training-data attribution with the loss kernel: scores, top-k "
                                           "proponents/opponents, self-influence (exact or sketched)")
    modes = p.add_subparsers(dest="mode", required=True)
    sc = modes.add_parser("scores", help="the [M, N] scores of every query against every training point, to --out "
                                         "(resumable, like pkfast gram)")
    tk = modes.add_parser("top-k", help="print each query's k proponents (highest scores) and opponents (lowest)")
    si = modes.add_parser("self-influence", help="s(z, z) of every training point (mislabelled points rank high)")
    for q in (sc, tk, si):
        _source_flags(q, query=q is not si)
    sc.add_argument("--out", required=True, metavar="scores.npy", help="output .npy (manifest in <out>.pkfast/)")
    sc.add_argument("--overwrite", action="store_true", help="discard an existing output and start afresh")
    tk.add_argument("--k", type=int, default=10, help="proponents and opponents per query (default 10)")
    tk.add_argument("--json", action="store_true", help="print them as JSON")
    si.add_argument("--out", default=None, metavar="SI.npy", help="also save all N values (np.save)")
    si.add_argument("--top", type=int, default=10, help="print the training points with the N highest values "
                    "(default 10)")
    si.add_argument("--json", action="store_true", help="print them as JSON")
    p.set_defaults(run=run_attribution, words=WORDS)


def _source_flags(q: argparse.ArgumentParser, *, query: bool) -> None:
    x = q.add_argument_group("exact scores (the loss kernel of pkfast.gram)")
    add_model_flags(x, required=False)
    x.add_argument("--train", metavar="X.npy", help="training samples (.npy, or .npz of model arguments)")
    x.add_argument("--train-targets", metavar="Y.npy", help="their targets (.npy)")
    if query:
        x.add_argument("--query", metavar="XQ.npy", help="query samples")
        x.add_argument("--query-targets", metavar="YQ.npy", help="their targets")
    x.add_argument("--loss", default=None, choices=("cross_entropy", "mse"),
                   help="the per-sample loss (default: the one recorded with the trajectory)")
    x.add_argument("--rule", default="left", choices=("left", "trapezoid", "exact"))
    x.add_argument("--method", default="auto", choices=("auto", "jacobian", "factorized", "materialized"))
    add_compute_flags(x)
    s = q.add_argument_group("sketched scores (feature stores of pkfast sketch --of loss, same --k and --seed)")
    s.add_argument("--train-features", metavar="F.npy", help="the training points' features")
    if query:
        s.add_argument("--query-features", metavar="FQ.npy", help="the queries' features")
    q.add_argument("--block", type=int, default=None, help="training points per step (default: 16 Mi scores)")
    q.add_argument("--no-progress", action="store_true", help="no progress bar")


_EXACT = ("model", "trajectory", "train", "train_targets", "query", "query_targets", "loss")


def _sources(a: argparse.Namespace) -> tuple[Any, Any]:
    """(query or None, train): :class:`pkfast.attribution.Exact` or :class:`pkfast.PathFeatures`."""
    query = a.mode != "self-influence"
    if a.train_features is not None or getattr(a, "query_features", None) is not None:
        given = [f"--{k.replace('_', '-')}" for k in _EXACT if getattr(a, k, None) is not None]
        if given:
            raise UserError(f"{', '.join(given)} belong to exact scores; expected either the feature stores "
                            "(--train-features, --query-features) or the model and samples, not both")
        return (_features("--query-features", a.query_features) if query else None,
                _features("--train-features", a.train_features))
    need = ["model", "trajectory", "train", "train_targets"] + (["query", "query_targets"] if query else [])
    missing = [f"--{k.replace('_', '-')}" for k in need if getattr(a, k, None) is None]
    if missing:
        raise UserError(f"{a.mode} needs {', '.join(missing)} (exact scores: the model, its trajectory, samples and "
                        "targets), or --train-features" + (" and --query-features" if query else "") +
                        " (sketched scores: stores written by pkfast sketch --of loss)")
    return _exact(a, query)


def _features(flag: str, path: str | None) -> Any:
    import pkfast

    if path is None:
        raise UserError(f"{flag} is missing: sketched scores need both feature stores (pkfast sketch --of loss)")
    phi = pkfast.PathFeatures.open(path)
    if phi.of != "loss":
        raise UserError(f"{flag}: {path!r} holds features of the model's outputs (of=output); attribution scores "
                        "are the loss kernel's: sketch them with pkfast sketch --of loss --targets Y.npy")
    return phi


def _exact(a: argparse.Namespace, query: bool) -> tuple[Any, Any]:
    import torch

    import pkfast
    from pkfast.attribution import Exact
    from pkfast.cli.common import model_of
    from pkfast.engine.inputs import num_samples

    model, traj = model_of(a), pkfast.Trajectory.load(a.trajectory)
    kw = dict(loss=a.loss, rule=a.rule, method=a.method, dtype=getattr(torch, a.dtype), memory_budget=a.memory,
              output_fn=load_output_fn(a.output_fn), threads=a.threads, preconditioner=a.preconditioner)
    X = load_array("--train", a.train)
    train = Exact(model, traj, X, load_targets("--train-targets", a.train_targets, num_samples(X), "--train"), **kw)
    if not query:
        return None, train
    Xq = load_array("--query", a.query)
    return Exact(model, traj, Xq, load_targets("--query-targets", a.query_targets, num_samples(Xq), "--query"),
                 **kw), train


def run_attribution(a: argparse.Namespace) -> int:
    from pkfast import attribution

    progress = not a.no_progress
    if a.mode == "scores":
        with distributed(a) as rank:
            query, train = _sources(a)
            S = attribution.scores(query, train, out=a.out, overwrite=a.overwrite, block=a.block, progress=progress)
            if rank == 0:
                print(f"pkfast: wrote {a.out}: {S.shape[0]}×{S.shape[1]} scores (queries × training points) {S.dtype}")
        return 0
    query, train = _sources(a)
    if a.mode == "top-k":
        _print_top_k(attribution.top_k(query, train, a.k, block=a.block, progress=progress), a.json)
        return 0
    si = attribution.self_influence(train, block=a.block, progress=progress)
    if a.out is not None:
        import numpy as np

        np.save(a.out, si.numpy())
    _print_self_influence(si, a.top, a.json, a.out)
    return 0


def _print_top_k(best: Any, as_json: bool) -> None:
    if as_json:
        print(json.dumps({k: getattr(best, k).tolist() for k in ("proponents", "proponent_scores", "opponents",
                                                                  "opponent_scores")}))
        return
    for q in range(best.proponents.shape[0]):
        pro = ", ".join(f"{int(i)} ({float(v):.4g})" for i, v in zip(best.proponents[q], best.proponent_scores[q]))
        opp = ", ".join(f"{int(i)} ({float(v):.4g})" for i, v in zip(best.opponents[q], best.opponent_scores[q]))
        print(f"query {q}: proponents {pro}; opponents {opp}")


def _print_self_influence(si: Any, top: int, as_json: bool, out: str | None) -> None:
    import torch

    if isinstance(top, bool) or top < 0:
        raise UserError(f"--top must be a non-negative number of training points; found {top}")
    v, i = torch.sort(si, descending=True, stable=True)
    v, i = v[:top], i[:top]
    if as_json:
        print(json.dumps({"indices": i.tolist(), "self_influence": v.tolist(), "out": out}))
        return
    if out is not None:
        print(f"pkfast: wrote {out}: self-influence of {si.shape[0]} training points")
    for j, x in zip(i.tolist(), v.tolist()):
        print(f"training point {j}: {x:.6g}")
