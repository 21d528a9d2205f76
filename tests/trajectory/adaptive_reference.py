"""An independent float64 re-implementation of the adaptive optimizers' updates (no torch.optim), from what a
trajectory records: the tests' reference that the recording is complete (docs/recording.md)."""

from __future__ import annotations

from collections.abc import Callable

import torch

import pkfast


def reference_update(kind, hyper, lr, P, g, w, buf, t, skipped):
    """w_{t+1} per parameter from the recorded P_t, by each optimizer's rule (docs/recording.md)."""
    out = {}
    for n in w:
        if n in skipped:
            out[n] = w[n]
            continue
        h = hyper[n]
        wd = h.weight_decay or 0.0
        if kind == "AdamW" or (kind == "Adam" and h.decoupled_weight_decay):
            b1 = h.betas[0]
            buf[n] = b1 * buf.get(n, 0) + (1 - b1) * g[n]
            out[n] = w[n] * (1 - lr * wd) - lr / (1 - b1 ** t[n]) * P[n] * buf[n]
        elif kind == "Adam":
            b1 = h.betas[0]
            buf[n] = b1 * buf.get(n, 0) + (1 - b1) * (g[n] + wd * w[n])
            out[n] = w[n] - lr / (1 - b1 ** t[n]) * P[n] * buf[n]
        elif kind == "RMSprop":
            d = P[n] * (g[n] + wd * w[n])
            if h.momentum:
                buf[n] = h.momentum * buf.get(n, 0) + d
                d = buf[n]
            out[n] = w[n] - lr * d
        elif kind == "Adagrad":
            clr = lr / (1 + (t[n] - 1) * h.lr_decay)
            out[n] = w[n] - clr * P[n] * (g[n] + wd * w[n])
    return out


def check_updates(traj: pkfast.Trajectory, batch_grad: Callable, tol: float = 1e-10) -> float:
    """The largest relative difference, over steps and parameters, between the recorded update w_{t+1} − w_t and
    the one recomputed from w_t, the recorded P_t, hyper-parameters, clipping coefficient c_t and
    ``batch_grad(s, w_s, step_record)`` (the unclipped batch gradient by name); asserts it is at most ``tol``."""
    rec = traj.recording
    kind = rec.optimizer.kind.value
    buf, worst = {}, 0.0
    c = traj.clip_coefs()
    for s, st in enumerate(rec.steps):
        w = {n: v for n, v in traj.point(s).items() if n in dict(traj.preconditioner(s, as_dict=True))}
        P = traj.preconditioner(s, as_dict=True)
        g = {n: c[s] * v for n, v in batch_grad(s, traj.point(s), st).items() if n in P}
        ref = st.optimizer_state
        counts = dict(zip(P, ref.step_counts)) if ref.step_counts else {n: ref.step_count for n in w}
        members = rec.optimizer.extra["group_params"]  # which group holds each parameter
        hyper = {n: st.groups[0 if len(st.groups) == 1 else j] for j, names in enumerate(members) for n in names}
        lr = {n: st.lr if st.group_lrs is None else st.group_lrs[j] for j, names in enumerate(members) for n in names}
        assert st.group_lrs is None and len(set(lr.values())) == 1
        new = reference_update(kind, hyper, st.lr, P, g, w, buf, counts, set(ref.skipped))
        w1 = traj.point(s + 1)
        for n in w:
            step = w1[n].to(torch.float64) - w[n].to(torch.float64)
            d = float((new[n].to(torch.float64) - w[n].to(torch.float64) - step).norm())
            worst = max(worst, d / float(step.norm()) if float(step.norm()) else d)
    assert worst <= tol, f"recomputed update differs from the recorded one by {worst:.3g} (relative)"
    return worst
