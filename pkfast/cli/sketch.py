"""sketch: ``pkfast sketch`` — :func:`pkfast.sketch`'s random path features of ``--data`` into a feature store
(``--out``, resumable, shared by ``torchrun`` ranks), the loss kernel's (``--of loss --targets``) for
``pkfast attribution``'s sketched scores."""

from __future__ import annotations

import argparse
from typing import Any

from pkfast.cli.common import (UserError, add_compute_flags, add_loss_flags, add_model_flags, distributed, inputs,
                               load_output_fn, load_targets)

__all__ = ["add_parser", "run_sketch"]


def add_parser(sub: Any) -> None:
    s = sub.add_parser("sketch", help="sketched path features of --data into a feature store (resumable); "
                                      "pkfast attribution scores them")
    add_model_flags(s)
    s.add_argument("--data", required=True, metavar="X.npy", help="samples X (.npy, or .npz of model arguments)")
    s.add_argument("--out", required=True, metavar="features.npy", help="the feature store (.npy; manifest in "
                   "<out>.pkfast/); open it with pkfast.PathFeatures.open")
    s.add_argument("--k", type=int, default=1024, help="features per output (default 1024): an entry's error is "
                   "about √((K(x,x)K(x′,x′) + K(x,x′)²)/k)")
    s.add_argument("--seed", type=int, default=0, help="the projection's seed (default 0): features multiply "
                   "together only when sketched with the same k and seed")
    s.add_argument("--projection", default="auto", choices=("auto", "dense", "kronecker"))
    s.add_argument("--rule", default="left", choices=("left", "trapezoid"))
    s.add_argument("--of", default="output", choices=("output", "loss"),
                   help="output (default) or loss: features of the loss-gradient kernel (attribution), with --targets")
    add_loss_flags(s)
    add_compute_flags(s)
    s.add_argument("--storage-dtype", default=None, choices=("float16", "bfloat16", "float32", "float64"),
                   help="dtype of the stored features (default: --dtype; half precision halves the file)")
    s.add_argument("--overwrite", action="store_true", help="discard an existing store and start afresh")
    s.add_argument("--no-progress", action="store_true", help="no progress bar")
    s.set_defaults(run=run_sketch, data2=None)


def run_sketch(a: argparse.Namespace) -> int:
    import torch

    import pkfast
    from pkfast.engine.inputs import num_samples

    with distributed(a) as rank:
        model, traj, X, _ = inputs(a)
        loss: dict[str, Any] = {}
        if a.of == "loss":
            if a.targets is None:
                raise UserError("--of loss needs --targets Y.npy (the targets of --data); none was given")
            loss = dict(of="loss", loss=a.loss, y=load_targets("--targets", a.targets, num_samples(X)))
        elif a.loss or a.targets:
            raise UserError("--loss and --targets apply to the loss kernel; expected --of loss with them, found "
                            "--of output")
        phi = pkfast.sketch(model, traj, X, k=a.k, seed=a.seed, projection=a.projection, rule=a.rule,
                            dtype=getattr(torch, a.dtype), memory_budget=a.memory, output_fn=load_output_fn(a.output_fn),
                            out=a.out, overwrite=a.overwrite, progress=not a.no_progress, storage_dtype=a.storage_dtype,
                            threads=a.threads, preconditioner=a.preconditioner, **loss)
        if rank == 0:
            N, C, k = phi.features.shape
            print(f"pkfast: wrote {a.out}: features of {N} samples × {C} output(s) × k={k} "
                  f"({str(phi.features.dtype).replace('torch.', '')}, of={phi.of}, seed={phi.seed})")
    return 0
