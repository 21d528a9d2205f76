"""Attribution peers side by side (issue 16 §4) on the LM of ``attribution_lm.py``: query × train scores from
pkfast (exact and sketched), TRAK (``traker``, CPU projector), Captum (``TracInCP``, ``TracInCPFastRandProj``)
and Kronfluence (identity, EK-FAC) — wall time, peak RSS of each method's own process, and agreement with
pkfast's exact scores.

    .venv-attr/bin/python benchmarks/attribution_peers.py [--n 1000] [--m 100] [--steps 5] [--d 64] \\
        [--methods pkfast-exact,pkfast-sketch,trak,captum-tracincp,captum-fast,kronfluence-identity,kronfluence-ekfac] \\
        [--csv PATH]

One problem is built once (the GPT of ``attribution_lm.py``, ``--n`` training and ``--m`` query sequences from
its bigram chain, ``--steps`` checkpoint segments of SGD) and saved; each method then runs in a child process
(so its peak RSS is its own) and writes its ``[M, N]`` scores. What each computes:

- ``pkfast-exact``: the loss kernel Σ_s ε_s ∇ℓ(q; w_s)·∇ℓ(z; w_s) over the checkpoints (``attribution.scores``
  of ``Exact``): the reference;
- ``pkfast-sketch``: the same from ``attribution.features`` (k = 16,384, Kronecker-factored layers);
- ``trak``: TRAK with its CPU ``BasicProjector`` (k = ``--trak-k``, default 2,048), one model per checkpoint, the
  model output −ℓ (the per-sequence loss; out-to-loss weight 1);
- ``captum-tracincp``: ``TracInCP`` over the same checkpoints with their step sizes (every parameter);
- ``captum-fast``: ``TracInCPFastRandProj`` on the head (Captum's fast variant uses only the last layer);
- ``kronfluence-identity`` / ``-ekfac``: pairwise scores at the final checkpoint's weights (one checkpoint:
  Kronfluence has no trajectory), through the modules it supports (``nn.Linear`` exactly: the MLP layers and the
  head; not attention's projections).

Agreement: Spearman correlation of each query's scores with pkfast-exact's, and the overlap of their top 10
(median over queries). TRAK and Kronfluence estimate other quantities (a regression-based and an inverse-Hessian
influence), so their agreement measures how close those are to the path kernel, not their own error.
"""

from __future__ import annotations

import argparse
import copy
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))

import pkfast  # noqa: E402

from _common import append_csv, environment, format_environment  # noqa: E402
from attribution_lm import spearman  # noqa: E402

METHODS = ["pkfast-exact", "pkfast-sketch", "trak", "captum-tracincp", "captum-fast", "kronfluence-identity",
           "kronfluence-ekfac"]


def token_ce(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-sequence mean token cross-entropy ([n, L, V], [n, L]) → [n] (pkfast's CrossEntropyLoss convention)."""
    return F.cross_entropy(out.transpose(1, 2), y, reduction="none").mean(1)


def build(a: argparse.Namespace, path: Path) -> None:
    import attribution_lm as lm

    torch.manual_seed(0)
    seq = lm.bigram_sequences(a.n + a.m)
    X, Y = seq[:, :lm.L], seq[:, 1:]
    net = lm.GPT(lm.V, a.d, 4)
    traj = lm.train(net, X[: a.n], Y[: a.n], a.steps)
    points = [traj.point(s) for s in range(a.steps + 1)]
    torch.save(dict(X=X, Y=Y, n=a.n, d=a.d, points=points, steps=[float(e) for e in traj.step_sizes]), path)


def load(path: Path):
    import attribution_lm as lm

    p = torch.load(path, weights_only=False)
    net = lm.GPT(lm.V, p["d"], 4)
    net.load_state_dict(p["points"][-1])
    net.eval()
    traj = pkfast.Trajectory.from_checkpoints(p["points"], lr=p["steps"])
    n = p["n"]
    return net, traj, p["X"][:n], p["Y"][:n], p["X"][n:], p["Y"][n:], p


def run_method(name: str, prob: Path, out: Path, a: argparse.Namespace) -> None:
    net, traj, Xt, Yt, Xq, Yq, p = load(prob)
    ce = nn.CrossEntropyLoss()
    t0 = time.perf_counter()
    if name == "pkfast-exact":
        from pkfast.attribution import Exact, scores
        S = scores(Exact(net, traj, Xq, Yq, loss=ce), Exact(net, traj, Xt, Yt, loss=ce), progress=False)
    elif name == "pkfast-sketch":
        from pkfast.attribution import features, scores
        S = scores(features(net, traj, Xq, Yq, loss=ce, progress=False),
                   features(net, traj, Xt, Yt, loss=ce, progress=False), progress=False)
    elif name == "trak":
        S = trak_scores(net, p, Xt, Yt, Xq, Yq, a.trak_k)
    elif name == "captum-tracincp":
        S = captum_scores(net, p, Xt, Yt, Xq, Yq, fast=False)
    elif name == "captum-fast":
        S = captum_scores(net, p, Xt, Yt, Xq, Yq, fast=True)
    elif name.startswith("kronfluence-"):
        S = kronfluence_scores(net, Xt, Yt, Xq, Yq, name.split("-", 1)[1])
    else:
        raise SystemExit(f"unknown method {name}")
    sec = time.perf_counter() - t0
    np.save(out, np.asarray(S, dtype=np.float64))
    print(json.dumps({"seconds": sec, "rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}))


def trak_scores(net, p, Xt, Yt, Xq, Yq, k):
    from trak import TRAKer
    from trak.modelout_functions import AbstractModelOutput
    from trak.projectors import BasicProjector, ProjectionType

    class LMOutput(AbstractModelOutput):
        def __init__(self):
            super().__init__()

        @staticmethod
        def get_output(model, weights, buffers, x, y):
            out = torch.func.functional_call(model, (weights, buffers), x.unsqueeze(0))
            return -F.cross_entropy(out[0], y, reduction="mean")  # −ℓ: TRAK's model output

        def get_out_to_loss_grad(self, model, weights, buffers, batch):
            return torch.ones(batch[0].shape[0], 1)

    P = sum(q.numel() for q in net.parameters())
    with tempfile.TemporaryDirectory() as d:
        # one block: the P × k matrix generated once per checkpoint (smaller blocks regenerate it every batch)
        proj = BasicProjector(grad_dim=P, proj_dim=k, seed=0, proj_type=ProjectionType.normal, device="cpu",
                              block_size=k)
        tr = TRAKer(net, task=LMOutput(), train_set_size=Xt.shape[0], save_dir=d, device="cpu", proj_dim=k,
                    projector=proj, use_half_precision=False, logging_level=40)
        ids = range(len(p["steps"]))
        for mid in ids:
            tr.load_checkpoint(p["points"][mid], model_id=mid)
            for i in range(0, Xt.shape[0], 32):
                tr.featurize(batch=(Xt[i:i + 32], Yt[i:i + 32]), num_samples=min(32, Xt.shape[0] - i))
        tr.finalize_features()
        for mid in ids:
            tr.start_scoring_checkpoint(exp_name="q", checkpoint=p["points"][mid], model_id=mid,
                                        num_targets=Xq.shape[0])
            for i in range(0, Xq.shape[0], 32):
                tr.score(batch=(Xq[i:i + 32], Yq[i:i + 32]), num_samples=min(32, Xq.shape[0] - i))
        S = tr.finalize_scores(exp_name="q")  # [N, M]
    return torch.as_tensor(np.asarray(S)).T


def captum_scores(net, p, Xt, Yt, Xq, Yq, fast):
    from captum.influence import TracInCP, TracInCPFastRandProj
    from torch.utils.data import DataLoader, TensorDataset

    with tempfile.TemporaryDirectory() as d:
        paths, lrs = [], {}
        for s, lr in enumerate(p["steps"]):
            path = str(Path(d) / f"w{s}.pt")
            torch.save(p["points"][s], path)
            paths.append(path)
            lrs[path] = lr

        def load_ckpt(m, path):
            m.load_state_dict(torch.load(path, weights_only=True))
            return lrs[path]

        loader = DataLoader(TensorDataset(Xt, Yt), batch_size=32, shuffle=False)
        model = copy.deepcopy(net)
        if fast:  # the head alone, its loss summed over the batch as the fast variant requires
            tr = TracInCPFastRandProj(model, model.head, loader, paths, checkpoints_load_func=load_ckpt,
                                      loss_fn=lambda o, y: token_ce(o, y).sum(), batch_size=32,
                                      projection_dim=None)
        else:
            tr = TracInCP(model, loader, checkpoints=paths, checkpoints_load_func=load_ckpt, loss_fn=token_ce,
                          batch_size=32, sample_wise_grads_per_batch=False)
        return torch.cat([tr.influence((Xq[i:i + 32], Yq[i:i + 32]), show_progress=False)
                          for i in range(0, Xq.shape[0], 32)])


def kronfluence_scores(net, Xt, Yt, Xq, Yq, strategy):
    from kronfluence.analyzer import Analyzer, prepare_model
    from kronfluence.arguments import FactorArguments
    from kronfluence.task import Task

    # Kronfluence tracks modules of exactly nn.Linear / nn.Conv2d type: attention's out_proj
    # (NonDynamicallyQuantizableLinear) and its packed in_proj parameter are not supported, so it scores through
    # the MLP blocks' Linear layers and the head only
    tracked = [n for n, m in net.named_modules() if type(m) is nn.Linear]

    class LM(Task):
        def get_influence_tracked_modules(self):
            return tracked

        def compute_train_loss(self, batch, model, sample=False):
            x, y = batch
            logits = model(x)
            if sample:
                with torch.no_grad():
                    p = F.softmax(logits.detach().reshape(-1, logits.shape[-1]), -1)
                    y = torch.multinomial(p, 1).view(y.shape)
            return F.cross_entropy(logits.transpose(1, 2), y, reduction="sum")

        def compute_measurement(self, batch, model):
            x, y = batch
            return F.cross_entropy(model(x).transpose(1, 2), y, reduction="sum")

    task = LM()
    model = prepare_model(copy.deepcopy(net), task)
    train = torch.utils.data.TensorDataset(Xt, Yt)
    query = torch.utils.data.TensorDataset(Xq, Yq)
    with tempfile.TemporaryDirectory() as d:
        an = Analyzer(analysis_name="peers", model=model, task=task, cpu=True, output_dir=d, disable_tqdm=True)
        an.fit_all_factors(factors_name=strategy, dataset=train, per_device_batch_size=32,
                           factor_args=FactorArguments(strategy=strategy), overwrite_output_dir=True)
        an.compute_pairwise_scores(scores_name="s", factors_name=strategy, query_dataset=query, train_dataset=train,
                                   per_device_query_batch_size=32, per_device_train_batch_size=32,
                                   overwrite_output_dir=True)
        return an.load_pairwise_scores("s")["all_modules"].detach().clone()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--m", type=int, default=100)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--d", type=int, default=64)
    ap.add_argument("--trak-k", type=int, default=2048)
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--csv", default=None)
    ap.add_argument("--run", nargs=3, metavar=("METHOD", "PROBLEM", "OUT"), help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.run:
        run_method(a.run[0], Path(a.run[1]), Path(a.run[2]), a)
        return 0
    print(format_environment(environment()))
    d = Path(tempfile.mkdtemp(prefix="pkfast-peers-"))
    prob = d / "problem.pt"
    build(a, prob)
    methods = a.methods.split(",")
    if methods[0] != "pkfast-exact":
        methods = ["pkfast-exact"] + [m for m in methods if m != "pkfast-exact"]
    ref = None
    rows = []
    print(f"LM d={a.d}, 4 layers; N = {a.n} training and M = {a.m} query sequences of 128 tokens; T = {a.steps}")
    print(f"{'method':22s} {'seconds':>8s} {'RSS GiB':>8s} {'Spearman':>9s} {'top-10':>7s}  status")
    for name in methods:
        out = d / f"{name}.npy"
        r = subprocess.run([sys.executable, __file__, "--run", name, str(prob), str(out), "--trak-k", str(a.trak_k)],
                           capture_output=True, text=True)
        row = dict(method=name, n=a.n, m=a.m, steps=a.steps, d=a.d)
        if r.returncode != 0:
            err = (r.stderr.strip().splitlines() or ["?"])[-1][:160]
            row["status"] = f"failed: {err}"
            print(f"{name:22s} {'-':>8s} {'-':>8s} {'-':>9s} {'-':>7s}  {row['status']}")
            rows.append(row)
            continue
        info = json.loads(r.stdout.strip().splitlines()[-1])
        S = torch.from_numpy(np.load(out))
        if ref is None:
            ref = S
        rho = spearman(ref, S)
        te, ts = ref.topk(10, 1).indices, S.topk(10, 1).indices
        ov = torch.tensor([len(set(x.tolist()) & set(y.tolist())) / 10 for x, y in zip(te, ts)])
        row.update(seconds=round(info["seconds"], 2), rss_gib=round(info["rss_gib"], 2),
                   spearman_median=round(float(rho.median()), 4), top10_median=round(float(ov.median()), 3),
                   status="ok")
        print(f"{name:22s} {row['seconds']:8.1f} {row['rss_gib']:8.2f} {row['spearman_median']:9.3f} "
              f"{row['top10_median']:7.2f}  ok")
        rows.append(row)
    if a.csv:
        append_csv(a.csv, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
