"""sweep: the kernel machine's backward pass over the recorded steps — for a chunk of queries, the bias b(x), the
sum Σ_i c_i(x) and the contributions c_i(x) (docs/math.md §6), from per-sample gradients formed by the layer routes
(:mod:`pkfast.routes.panels`): plain SGD through the factorised cross kernel of queries and batches, momentum and
Nesterov through the recursion Ψ_r = Σ_{s≥r} ε_s κ_{s,r} J̄_s held as per-layer blocks."""

from __future__ import annotations

import numpy as np
import torch
from tqdm.auto import tqdm

from pkfast.jacobians import FunctionalModel
from pkfast.loss import LossSpec
from pkfast.routes.panels import Panels, cross
from pkfast.rules import EvalPoint, gauss_legendre

__all__ = ["Sweep"]


class Sweep:
    """The validated recording (steps' hyperparameters, batches, momentum setting) and the gradient panels of the
    model's outputs and loss; :meth:`run` sweeps a chunk of queries. Batch gradients are cached for later query
    chunks within a quarter of ``budget``."""

    def __init__(self, fm: FunctionalModel, fm_loss: FunctionalModel, X: torch.Tensor, y: torch.Tensor,
                 loss: LossSpec, *, steps: list[dict], batches: list[torch.Tensor], momentum: tuple[float, float, bool],
                 rule: str, nodes: int, budget: int, progress: bool) -> None:
        self.fm, self.fm_loss, self.X, self.y, self.loss = fm, fm_loss, X, y, loss
        self.C = fm.num_outputs
        self.trajectory = fm.trajectory
        self.steps, self.batches, self.momentum = steps, batches, momentum
        self.rule, self.nodes, self.dtype, self.progress = rule, nodes, fm.dtype, progress
        # per-sample gradients from layer factors in batched passes where layers have rules (docs/math.md §5)
        self.panels = Panels(fm, X)
        self.loss_panels = Panels(fm_loss, X)
        Panels.matched(self.panels, self.loss_panels)
        self.grad_cache: dict[int, torch.Tensor] = {}
        self.cached_bytes, self.cache_budget = 0, budget // 4

    def combo(self, s: int) -> tuple[tuple[EvalPoint, float], ...]:
        if self.rule == "left":
            return ((EvalPoint(s), 1.0),)
        return tuple((EvalPoint(s, tau), om) for tau, om in gauss_legendre(self.nodes))

    def batch_grads(self, s: int) -> torch.Tensor:
        """λ_{s,i} ∇_w ℓ(x_i; w_s) for i ∈ B_s, as [|B_s|, P] (cached: reused by every query chunk)."""
        g = self.grad_cache.get(s)
        if g is None:
            b = self.batches[s]
            if b.numel() == 0:
                g = torch.zeros(0, self.fm.num_params, dtype=self.dtype, device=self.fm.device)
            else:
                G = self.loss_panels.panel(((EvalPoint(s), 1.0),), self.X[b], self.y[b])[:, 0]
                lam = self.loss.batch_weights(self.y[b], self.C).to(G.device, G.dtype)
                g = G * lam[:, None]
            nbytes = g.numel() * g.element_size()
            if self.cached_bytes + nbytes <= self.cache_budget:  # reused by the next query chunk
                self.grad_cache[s] = g
                self.cached_bytes += nbytes
        return g

    def run(self, Xq: torch.Tensor, *, samples: bool, per_step: bool = False):
        """One backward pass over the steps for the queries ``Xq``: (bias [M, C], Σ_i c_i [M, C],
        contributions [M, N, C] or per-step [T, M, N, C] or None)."""
        T, N, C = self.trajectory.num_steps, self.X.shape[0], self.C
        M = Xq.shape[0]
        dev, dt = self.fm.device, self.dtype
        eps = self.trajectory.step_sizes.tolist()
        bias = self.fm.outputs(EvalPoint(0), Xq).to(dt)
        total = torch.zeros(M, C, dtype=dt, device=dev)
        contrib = None
        if samples:
            contrib = torch.zeros((T, M, N, C) if per_step else (M, N, C), dtype=dt, device=dev)
        mu, damp, nesterov = self.momentum
        # the query side is held as the panel's blocks (one per layer group, :meth:`Panels.widths`), each layer's
        # gradient formed from its factors straight into its block: S_r = Σ_{s≥r} ε_s μ^{s−r} J̄_s by the
        # momentum recursion (plain SGD: S_r = ε_r J̄_r), and Ψ_r = Σ coef · blocks as listed in ``terms``
        widths = self.panels.widths()
        offs = np.cumsum([0] + widths[:-1]).tolist()
        S = [torch.zeros(M, C, w, dtype=dt, device=dev) for w in widths]
        J = [torch.empty(M, C, w, dtype=dt, device=dev) for w in widths] if (mu and nesterov) else None
        bar = tqdm(range(T - 1, -1, -1), desc="pkfast.KernelMachine steps", unit="step", disable=not self.progress,
                   leave=False)
        for r in bar:
            h = self.steps[r]
            combo = self.combo(r)
            if mu == 0.0 and not h["weight_decay"]:
                # plain SGD: Ψ_r = ε_r J̄_r, so c_i = −ε_r λ ⟨J̄_r(x), ∇ℓ(x_i; w_r)⟩ — a cross kernel that layers
                # with a factorised rule give from both sides' factors, never forming either gradient
                b = self.batches[r]
                k = None if b.numel() == 0 else cross(self.panels, self.loss_panels, combo, Xq, EvalPoint(r),
                                                      self.X[b], self.y[b])
                if k is not None or b.numel() == 0:
                    if k is not None:
                        lam = self.loss.batch_weights(self.y[b], self.C).to(dev, dt)
                        c = (k * (-eps[r]) * lam).transpose(1, 2)  # [M, |B|, C]
                        total += c.sum(1)
                        if contrib is not None:
                            (contrib[r] if per_step else contrib).index_add_(1, b.to(dev), c)
                    continue
            if mu == 0.0:
                self.panels.accumulate(combo, Xq, S, alpha=eps[r], beta=0.0)
                terms = [(1.0, S)]
            else:
                # PyTorch creates the buffer undampened at the first step: κ_{s,0} = μ^s, κ_{s,r} = (1−d) μ^{s−r}
                c_r = 1.0 if r == 0 else 1.0 - damp
                if nesterov:
                    self.panels.accumulate(combo, Xq, J, alpha=1.0, beta=0.0)
                    for Sb, Jb in zip(S, J):
                        Sb.mul_(mu).add_(Jb, alpha=eps[r])
                    terms = [(eps[r], J), (c_r * mu, S)]
                else:
                    self.panels.accumulate(combo, Xq, S, alpha=eps[r], beta=mu)
                    terms = [(c_r, S)]
            if h["weight_decay"]:
                w_r = self.panels.to_panel(self.fm.state(EvalPoint(r))[0])
                for coef, blocks in terms:
                    for B_, o, w in zip(blocks, offs, widths):
                        bias -= (h["weight_decay"] * coef) * (B_.view(M * C, w) @ w_r[o:o + w]).view(M, C)
            g = self.batch_grads(r)  # [|B|, P] in the panel's column order
            if g.shape[0]:
                c = torch.zeros(M * C, g.shape[0], dtype=dt, device=dev)
                for coef, blocks in terms:
                    for B_, o, w in zip(blocks, offs, widths):
                        c.addmm_(B_.view(M * C, w), g[:, o:o + w].T, alpha=-coef)
                c = c.view(M, C, -1).transpose(1, 2)  # [M, |B|, C]
                total += c.sum(1)
                if contrib is not None:
                    (contrib[r] if per_step else contrib).index_add_(1, self.batches[r].to(dev), c)
        return bias, total, contrib
