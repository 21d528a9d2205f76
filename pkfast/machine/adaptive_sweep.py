"""adaptive_sweep: the kernel machine's backward pass for adaptive optimizers (docs/math.md §6.2) — for a chunk of
queries, the bias b(x), Σ_i c_i(x) and the contributions c_i(x), from materialised per-parameter gradient panels
(:mod:`pkfast.machine.panels`: layer factors where layers have rules), since a diagonal preconditioner breaks the
(a·a′)(δ·δ′) factorisation of the SGD sweep's pairs.

With the recursion of :mod:`pkfast.machine.adaptive` (m_t = β_t m_{t−1} + c_t A_t ⊙ g_t, Δ_t = −σ_t B_t ⊙ m_t −
δ_t w_t), the contribution of g_s to f(x; w_T) − f(x; w_0) = Σ_t J̄_t Δ_t is −⟨Ψ_s, g_s⟩ with

    S_s = σ_s B_s ⊙ J̄_s + β_{s+1} S_{s+1},      Ψ_s = c_s A_s ⊙ S_s,

swept backwards from s = T−1, one P-wide accumulator per query output.
"""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from pkfast.engine.functional import FunctionalModel
from pkfast.engine.quadrature import EvalPoint, gauss_legendre
from pkfast.machine.adaptive import AdaptivePlan, flat_by_name, preconditioner_flat
from pkfast.machine.panels import Panels

__all__ = ["AdaptiveSweep"]


class AdaptiveSweep:
    """The adaptive recording's plan, batches and per-row weights, and the gradient panels of the model's outputs
    and loss; :meth:`run` sweeps a chunk of queries, :meth:`update_residuals` replays the updates. Batch gradients
    are cached for later query chunks within a quarter of ``budget``."""

    def __init__(self, fm: FunctionalModel, fm_loss: FunctionalModel, X: torch.Tensor, y: torch.Tensor, *,
                 plan: AdaptivePlan, batches: list[torch.Tensor], weights: list[torch.Tensor], rule: str, nodes: int,
                 budget: int, progress: bool, fn: str) -> None:
        self.fm, self.fm_loss, self.X, self.y = fm, fm_loss, X, y
        self.plan, self.batches, self.fn = plan, batches, fn
        self.C, self.trajectory, self.dtype = fm.num_outputs, fm.trajectory, fm.dtype
        self.weights = [w.to(fm.device, fm.dtype) for w in weights]
        self.rule, self.nodes, self.progress = rule, nodes, progress
        self.cache_budget, self.cached_bytes = budget // 4, 0
        self.panels, self.loss_panels = Panels(fm, X), Panels(fm_loss, X)
        Panels.matched(self.panels, self.loss_panels)
        self._grads: dict[int, torch.Tensor] = {}
        self._pre: dict[int, torch.Tensor] = {}
        self._names = list(zip(fm.names, fm._slices))
        for decay in (plan.coupled, plan.decoupled):  # per-group weight decay: a vector in the panel's order
            for s, d in enumerate(decay):
                if isinstance(d, dict):
                    v = flat_by_name(fn, self.trajectory, self._names, d, "parameter group")
                    decay[s] = None if not bool(v.any()) else self.panels.to_panel(v.to(fm.device, fm.dtype))
                elif not d:
                    decay[s] = None

    def combo(self, s: int) -> tuple[tuple[EvalPoint, float], ...]:
        if self.rule == "left":
            return ((EvalPoint(s), 1.0),)
        return tuple((EvalPoint(s, tau), om) for tau, om in gauss_legendre(self.nodes))

    # ------------------------------------------------------------------ per-step vectors, panel column order
    def pre(self, s: int) -> torch.Tensor:
        """P_s ``[P]`` in the panel's column order, read from the trajectory's state rows (kept for later query
        chunks while within the cache budget shared with the batch gradients)."""
        got = self._pre.get(s)
        if got is None:
            flat = preconditioner_flat(self.fn, self.trajectory, self._names, s)
            got = self.panels.to_panel(flat.to(self.fm.device, self.dtype))
            nbytes = got.numel() * got.element_size()
            if self.cached_bytes + nbytes <= self.cache_budget:
                self._pre[s] = got
                self.cached_bytes += nbytes
        return got

    def weights_at(self, s: int) -> torch.Tensor:
        return self.panels.to_panel(self.fm.state(EvalPoint(s))[0])

    def batch_grads(self, s: int) -> torch.Tensor:
        """λ_{s,i} ∇_w ℓ(x_i; w_s) for the rows of B_s, ``[|B_s|, P]`` in the panel's column order."""
        got = self._grads.get(s)
        if got is not None:
            return got
        b, P = self.batches[s], self.fm.num_params
        if b.numel() == 0:
            return torch.zeros(0, P, dtype=self.dtype, device=self.fm.device)
        G = self.loss_panels.panel(((EvalPoint(s), 1.0),), self.X[b], self.y[b]).view(b.numel(), P)
        G.mul_(self.weights[s][:, None])
        nbytes = G.numel() * G.element_size()
        if self.cached_bytes + nbytes <= self.cache_budget:
            self._grads[s] = G
            self.cached_bytes += nbytes
        return G

    # ------------------------------------------------------------------ the sweep
    def run(self, Xq: torch.Tensor, *, samples: bool, per_step: bool = False):
        """One backward pass over the steps for the queries ``Xq``: (bias [M, C], Σ_i c_i [M, C],
        contributions [M, N, C] or per-step [T, M, N, C] or None).

        S is held as one contiguous ``[M, C, width]`` block per panel slot, each step's J̄_s formed into it (or a
        scratch block, to be scaled by P_s) from the layer factors of all quadrature nodes at once; the factor
        c_s A_s of Ψ_s goes to the training side (|B_s| rows, not M·C), so the P-wide work per step is one pass.
        Where P_s meets the momentum (Adam) S is held as S_s = k_s R_s with k_s = Π β, R_s = R_{s+1} + σ_s P_s ⊙
        J̄_s / k_s, so the decay costs no pass over S (R is rescaled when k falls below 1e-150)."""
        T, N, C, M = self.trajectory.num_steps, self.X.shape[0], self.C, Xq.shape[0]
        dev, dt, pl = self.fm.device, self.dtype, self.plan
        bias = self.fm.outputs(EvalPoint(0), Xq).to(dt)
        total = torch.zeros(M, C, dtype=dt, device=dev)
        contrib = torch.zeros((T, M, N, C) if per_step else (M, N, C), dtype=dt, device=dev) if samples else None
        slots = self.panels.slots()
        cols = [slice(a, a + w) for a, w in zip(_starts([w for _, _, w in slots]), [w for _, _, w in slots])]
        S = [torch.zeros(M, C, w, dtype=dt, device=dev) for _, _, w in slots]
        scratch = None if pl.at_gradient else [torch.empty(M, C, w, dtype=dt, device=dev) if L is not None else None
                                                 for L, _, w in slots]
        bar = tqdm(total=T, desc="pkfast.KernelMachine steps", unit="step", disable=not self.progress, leave=False)
        k = 1.0  # S = k R where P_s meets the momentum (S itself otherwise)
        for s in range(T - 1, -1, -1):
            jac, nodes = self.panels.evaluate(self.combo(s), Xq)
            P, beta = self.pre(s), pl.beta[s + 1] if s + 1 < T else 0.0
            if not pl.at_gradient and s + 1 < T:
                k *= beta
                if k < 1e-150:  # (β = 0 included: the sum restarts)
                    for Si in S:
                        Si.mul_(k)
                    k = 1.0
            w = self.weights_at(s) if (pl.coupled[s] is not None or pl.decoupled[s] is not None) else None
            dw = None if pl.decoupled[s] is None else pl.decoupled[s] * w  # δ_s w_s
            for i, slot in enumerate(slots):
                J = self._advance(slot, S[i], None if scratch is None else scratch[i], jac, nodes, P[cols[i]], s,
                                  beta, 1.0 / k)
                if dw is not None:
                    bias -= (J.view(M * C, -1) @ dw[cols[i]]).view(M, C)
            h = pl.c[s] * P if pl.at_gradient else torch.full_like(P, pl.c[s] * k)  # c_s A_s (× k), training side
            if pl.coupled[s] is not None:
                hw = h * (pl.coupled[s] * w)
                bias -= sum(Si.view(M * C, -1) @ hw[cl] for Si, cl in zip(S, cols)).view(M, C)
            G = self.batch_grads(s)
            if G.shape[0]:
                Gh = G * h
                cr = -sum(Si.view(M * C, -1) @ Gh[:, cl].T for Si, cl in zip(S, cols))
                cr = cr.view(M, C, -1).transpose(1, 2)  # [M, |B_s|, C]
                total += cr.sum(1)
                if contrib is not None:
                    (contrib[s] if per_step else contrib).index_add_(1, self.batches[s].to(dev), cr)
            bar.update(1)
        bar.close()
        return bias, total, contrib

    def _advance(self, slot, S: torch.Tensor, scratch: torch.Tensor | None, jac, nodes, P: torch.Tensor, s: int,
                 beta: float, inv_k: float) -> torch.Tensor:
        """One slot's S ← β S + σ_s J̄_s (RMSprop, Adagrad), or R ← R + σ_s P_s ⊙ J̄_s / k (Adam: S = k R); returns
        J̄_s of the slot (for decoupled weight decay; meaningful where P_s meets the momentum)."""
        sigma = self.plan.sigma[s]
        if self.plan.at_gradient:
            if slot[0] is None:
                S.mul_(beta).add_(jac, alpha=sigma)
            else:
                Panels.write(slot, [(sigma * om, f) for om, f in nodes], S, beta=beta)
            return S
        if slot[0] is None:
            J = jac
        else:
            Panels.write(slot, nodes, scratch, beta=0.0)
            J = scratch
        S.addcmul_(J, P.view(1, 1, -1), value=sigma * inv_k)
        return J

    def update_residuals(self) -> torch.Tensor:
        """``[T]`` ‖Δ_t − Δ̂_t‖/‖Δ_t‖, with Δ̂_t = −σ_t B_t ⊙ m_t − δ_t w_t replayed forward from the batch
        gradients, the recorded P_t and the plan — the coefficients :meth:`run` uses."""
        pl, m, out = self.plan, None, []
        for s in range(self.trajectory.num_steps):
            w = self.weights_at(s)
            g = self.batch_grads(s).sum(0)
            if pl.coupled[s] is not None:
                g = g + pl.coupled[s] * w
            P = self.pre(s)
            a = pl.c[s] * (P * g if pl.at_gradient else g)
            m = a if m is None else m.mul_(pl.beta[s]).add_(a)
            step = -pl.sigma[s] * (m if pl.at_gradient else P * m)
            if pl.decoupled[s] is not None:
                step = step - pl.decoupled[s] * w
            delta = self.weights_at(s + 1) - w
            out.append(float((delta - step).norm() / delta.norm().clamp_min(1e-300)))
        return torch.tensor(out, dtype=torch.float64)


def _starts(widths: list[int]) -> list[int]:
    out, a = [], 0
    for w in widths:
        out.append(a)
        a += w
    return out
