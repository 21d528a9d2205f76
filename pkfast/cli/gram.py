"""gram: ``pkfast gram`` (a stored Gram, resumable) and ``pkfast plan`` (how it would be computed) — the
options of :func:`pkfast.gram` as flags, the loss kernel (``--of loss --targets``) and the sketch (``--k``)
included."""

from __future__ import annotations

import argparse
from typing import Any

from pkfast.cli.common import (UserError, add_compute_flags, add_loss_flags, add_model_flags, distributed, inputs,
                               load_output_fn, load_targets)

__all__ = ["add_parsers", "run_gram", "run_plan", "options"]


def add_parsers(sub: Any) -> None:
    g = sub.add_parser("gram", help="compute a path-kernel Gram into a .npy file (resumable)")
    pl = sub.add_parser("plan", help="print how pkfast.gram would compute it: each layer's route, FLOPs, tiles")
    for q in (g, pl):
        add_model_flags(q)
        q.add_argument("--data", required=True, metavar="X.npy",
                       help="samples X [N, *features] (.npy), or an .npz of several arrays passed to the model as "
                            "keyword arguments (e.g. input_ids, attention_mask), split per sample")
        q.add_argument("--data2", default=None, metavar="X2.npy", help="samples X2 for a cross-Gram (.npy or .npz)")
        q.add_argument("--of", default="output", choices=("output", "loss"),
                       help="output (default: Jacobians of the outputs) or loss: the loss-gradient kernel "
                       "Σ_s ε_s ∇ℓ(x)·∇ℓ(x′) (TracIn's quantity), which needs --targets (and --targets2 with --data2)")
        add_loss_flags(q)
        q.add_argument("--targets2", default=None, metavar="Y2.npy", help="targets of --data2 for --of loss")
        q.add_argument("--outputs", default="trace", choices=("trace", "mean", "full", "sketch", "pntk"),
                       help="trace (default), mean, full (the C×C blocks); sketch: the trace kernel estimated "
                       "without bias from --directions random output combinations (r backward passes instead of C); "
                       "pntk: the pseudo-NTK, the kernel of Σ_c f_c/√C")
        q.add_argument("--directions", type=int, default=None, metavar="R",
                       help="--outputs sketch: the number of random (Rademacher, seed 0) output directions (default 64)")
        q.add_argument("--target-error", type=float, default=None, metavar="E",
                       help="--outputs sketch: choose the directions by a pilot for this relative standard error "
                       "of the diagonal (instead of --directions)")
        q.add_argument("--head", default="auto", metavar="auto|none|MODULE",
                       help="collapse a final linear head for the trace/mean kernel (exact; d + 1 output gradients "
                       "per position instead of V): auto (default: detected), none, or a module name (e.g. lm_head)")
        q.add_argument("--rule", default="left", choices=("left", "trapezoid", "exact"),
                       help="left (Riemann sum, default), trapezoid, or exact (Bell et al.'s exact path kernel: "
                       "asymmetric, Gauss–Legendre quadrature of each step)")
        q.add_argument("--nodes", type=int, default=None, help="Gauss–Legendre nodes per step for --rule exact "
                       "(default 2)")
        q.add_argument("--diagonal", action="store_true", help="only K(x, x): [N] (or [N, C, C])")
        add_compute_flags(q)
        q.add_argument("--backend", default="auto", choices=("auto", "torch", "triton"))
        q.add_argument("--method", default="auto", choices=("auto", "jacobian", "factorized", "materialized", "sketch"),
                       help="auto (default): each supported layer factorised or materialised by the cost model; "
                       "jacobian: every Jacobian materialised by vmap(jacrev); factorized: every supported layer "
                       "factorised; materialized: every supported layer's per-sample gradient formed from its "
                       "factors; sketch: random JL features (approximate, unbiased)")
        q.add_argument("--k", type=int, default=None, help="sketch dimension for --method sketch (default 1024)")
        q.add_argument("--seed", type=int, default=None, help="sketch seed for --method sketch (default 0)")
        q.add_argument("--projection", default="auto", choices=("auto", "dense", "kronecker"),
                       help="--method sketch: each layer Kronecker-factored where cheaper (auto, default), every "
                       "parameter dense, or every factorisable layer Kronecker-factored")
    g.add_argument("--out", required=True, metavar="gram.npy", help="output .npy (manifest in <out>.pkfast/)")
    g.add_argument("--overwrite", action="store_true", help="discard an existing output and start afresh")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")
    g.set_defaults(run=run_gram)
    pl.set_defaults(run=run_plan)


def options(a: argparse.Namespace, X: Any, X2: Any) -> dict[str, Any]:
    """The options of gram/plan from the flags (``--nodes``, ``--k``, ``--seed``, ``--projection`` and the loss
    flags only when given, so that the library says where they do not apply)."""
    import torch

    from pkfast.engine.inputs import num_samples

    o: dict[str, Any] = dict(outputs=_outputs(a), rule=a.rule, diagonal=a.diagonal, backend=a.backend,
                             dtype=getattr(torch, a.dtype), memory_budget=a.memory, method=a.method,
                             output_fn=load_output_fn(a.output_fn), threads=a.threads,
                             preconditioner=a.preconditioner, head=None if a.head == "none" else a.head)
    for k in ("nodes", "k", "seed"):
        if getattr(a, k) is not None:
            o[k] = getattr(a, k)
    if a.projection != "auto":
        o["projection"] = a.projection
    if a.of == "loss":
        if a.targets is None:
            raise UserError("--of loss needs --targets Y.npy (the targets of --data: the loss of each sample is "
                            "differentiated); none was given")
        if X2 is not None and a.targets2 is None:
            raise UserError("--of loss with --data2 needs --targets2 Y2.npy (the targets of --data2); none was given")
        o.update(of="loss", loss=a.loss, y=load_targets("--targets", a.targets, num_samples(X)),
                 y2=load_targets("--targets2", a.targets2, None if X2 is None else num_samples(X2), "--data2"))
    elif a.loss or a.targets or a.targets2:
        given = [f for f, v in (("--loss", a.loss), ("--targets", a.targets), ("--targets2", a.targets2)) if v]
        raise UserError(f"{', '.join(given)} apply to the loss kernel; expected --of loss with them, found --of output")
    return o


def _outputs(a: argparse.Namespace) -> Any:
    """``outputs=`` from --outputs, --directions, --target-error."""
    if a.outputs != "sketch":
        if a.directions is not None or a.target_error is not None:
            raise UserError("--directions and --target-error set the output sketch; expected --outputs sketch with "
                            f"them, found --outputs {a.outputs}")
        return a.outputs
    from pkfast.engine.output_sketch import OutputSketch

    try:
        return OutputSketch(r=a.directions, target=a.target_error)  # (seed 0: pkfast.gram takes others)
    except (ValueError, TypeError) as e:
        raise UserError(str(e)) from None


def run_gram(a: argparse.Namespace) -> int:
    import pkfast

    with distributed(a) as rank:
        model, traj, X, X2 = inputs(a)
        K = pkfast.gram(model, traj, X, X2, out=a.out, overwrite=a.overwrite, progress=not a.no_progress,
                        **options(a, X, X2))
        if rank == 0:
            print(f"pkfast: wrote {a.out}: shape {tuple(K.shape)} {K.dtype}")
    return 0


def run_plan(a: argparse.Namespace) -> int:
    import pkfast

    model, traj, X, X2 = inputs(a)
    print(pkfast.plan(model, traj, X, X2, **options(a, X, X2)))
    return 0
