"""cli: the ``pkfast`` command, one module per command group — ``pkfast gram`` computes a stored Gram and
``pkfast plan`` shows how it would be computed (:mod:`pkfast.cli.gram`), ``pkfast sketch`` stores path features
(:mod:`pkfast.cli.sketch`), ``pkfast attribution`` scores training points (:mod:`pkfast.cli.attribution`),
``pkfast info`` describes a stored result or a trajectory (:mod:`pkfast.cli.info`); what they share is in
:mod:`pkfast.cli.common`.

    pkfast gram --model MODULE:FACTORY --trajectory PATH --data X.npy [--data2 X2.npy] --out gram.npy
                [--of output|loss --loss cross_entropy|mse --targets Y.npy [--targets2 Y2.npy]] [--output-fn SPEC]
                [--outputs trace|mean|full] [--rule left|trapezoid|exact] [--nodes 2] [--diagonal] [--memory 4GiB]
                [--dtype float32|float64] [--backend auto|torch|triton] [--method auto|jacobian|factorized|materialized|sketch]
                [--k 1024] [--seed 0] [--projection auto|dense|kronecker] [--overwrite] [--no-progress]
    pkfast plan   (the flags of gram, without --out/--overwrite/--no-progress)
    pkfast sketch --model … --trajectory … --data X.npy --out F.npy [--k 1024] [--seed 0] [--of loss --targets Y.npy]
    pkfast attribution scores|top-k|self-influence  (exact: --model --trajectory --train X.npy --train-targets Y.npy
                [--query XQ.npy --query-targets YQ.npy]; sketched: --train-features F.npy [--query-features FQ.npy])
    pkfast info gram.npy [--verify] [--json]      (or: pkfast info TRAJECTORY_DIR [--json])
    pkfast --version

``MODULE:FACTORY`` names a zero-argument callable returning the ``torch.nn.Module`` (``MODULE`` is an importable
module such as ``mypkg.models`` or a ``.py`` file path); the trajectory is a directory written by
``Trajectory.save`` / ``TrajectoryRecorder``. ``--output-fn`` is ``logits``, ``first``, ``last-token`` or
``MODULE:FUNCTION`` (:data:`pkfast.cli.common.OUTPUT_FNS`). Under ``torchrun`` the tiles (chunks) are shared across
the ranks. A user mistake prints one line (``pkfast: error: …``) and exits with status 2; an interrupted run
exits with 130 and resumes when the same command is run again.
"""

from __future__ import annotations

import argparse
import re
import sys

from pkfast._version import __version__
from pkfast.cli import attribution, gram, info, sketch
from pkfast.cli.common import UserError
from pkfast.cli.info import describe, describe_trajectory

__all__ = ["main", "describe", "describe_trajectory"]

_USER_ERRORS = (ValueError, TypeError, FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError,
                KeyError)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="pkfast", description="Path-kernel Gram matrices of neural networks.")
    p.add_argument("--version", action="version", version=f"pkfast {__version__}")
    sub = p.add_subparsers(dest="command", required=True)
    gram.add_parsers(sub)
    sketch.add_parser(sub)
    attribution.add_parser(sub)
    info.add_parser(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    from pkfast.store.writer import StoreError

    from pkfast.engine.accumulate import BackendUnavailable

    try:
        return args.run(args)
    except KeyboardInterrupt:
        print("pkfast: interrupted; finished tiles are kept — run the same command again to resume", file=sys.stderr)
        return 130
    except (UserError, StoreError, BackendUnavailable, *_USER_ERRORS) as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        if args.command == "info":  # (info only reads: the remedy is a fresh 'pkfast gram … --overwrite')
            msg = re.sub(r"pass overwrite=True to (?:start afresh|recompute it|replace it)",
                         "recompute it with 'pkfast gram … --overwrite'", msg)
        print(f"pkfast: error: {_in_cli_words(msg, getattr(args, 'words', None))}", file=sys.stderr)
        return 2


#: The library's words for an option → the command line's (its messages name Python arguments).
_FLAGS = {"memory_budget": "--memory", "X2": "--data2", "X": "--data", "out": "--out"}
_VALUED = ("outputs", "rule", "method", "backend", "dtype", "nodes", "k", "seed", "precision")


def _in_cli_words(msg: str, words: dict[str, str] | None = None) -> str:
    """A library message in the command line's words: ``overwrite=True`` → ``--overwrite``, ``rule='exact'`` →
    ``--rule exact``, ``memory_budget`` → ``--memory``, ``X2`` → ``--data2``; the calling function's name
    (``pkfast.gram:``) is dropped, since the command is the caller. ``words``: a command's own flags for the
    library's sample names (``pkfast attribution``: ``X`` is ``--query``, ``X2`` is ``--train``)."""
    flags = dict(_FLAGS, **(words or {}))
    msg = re.sub(r"^pkfast\.[\w.]+: ", "", msg)
    msg = re.sub(r"\boverwrite=True\b", "--overwrite", msg)
    msg = re.sub(r"\bthe data (X2?)\b", lambda m: f"the {flags[m.group(1)]} samples", msg)
    msg = re.sub(r"\b(" + "|".join(_VALUED) + r")=(['\"]?)([\w.\-]+)\2", r"--\1 \3", msg)
    msg = re.sub(r"\b(" + "|".join(_VALUED) + r")=None\b", r"no --\1", msg)
    return re.sub(r"(?<![\w.\-'])(" + "|".join(flags) + r")(?![\w'=])", lambda m: flags[m.group(1)], msg)


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
