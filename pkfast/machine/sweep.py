"""sweep: the kernel machine's backward pass over the recorded steps — for a chunk of queries, the bias b(x), the
sum Σ_i c_i(x) and the contributions c_i(x) (docs/math.md §6.4), from per-sample factors and gradients formed by
the layer routes (:mod:`pkfast.machine.panels`), the steps taken in blocks.

c_i(x) = −Σ_r λ_i ⟨Ψ_r(x), ∇ℓ(x_i; w_r)⟩ with Ψ_r = Σ_{s≥r} κ_{s,r} J̄_s(x) (momentum's coefficients κ).
Columns of layers whose rule factorises cheaply ("blocked") hold the tail S_{r1} = Σ_{s≥r1} ε_s μ^{s−r1} J̄_s at
block boundaries only: the pairs (s, r) inside a block come from the two sides' factors, Σ (a·a′)(δ·δ′), and the
tail meets the whole block's batch gradients in one GEMM. The other columns ("stepped") keep the recursion step by
step (S_r = μ S_{r+1} + ε_r J̄_r) and meet each batch as it comes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from pkfast.engine.costs import pair_cheaper
from pkfast.engine.functional import FunctionalModel
from pkfast.engine.products import factor_pair_product
from pkfast.loss import LossSpec
from pkfast.machine.panels import Panels
from pkfast.engine.quadrature import EvalPoint, gauss_legendre

__all__ = ["Sweep", "one_momentum"]

#: batch-gradient rows a block aims for: the tail GEMM runs near the BLAS peak from a few hundred columns on
BLOCK_ROWS = 512
#: most steps in a block (the pairs inside a block grow as its square)
MAX_BLOCK = 8


class Sweep:
    """The validated recording (steps' hyperparameters, batches, momentum setting) and the gradient panels of the
    model's outputs and loss; :meth:`run` sweeps a chunk of queries. Batch gradients are cached block by block for
    later query chunks within a quarter of ``budget``."""

    def __init__(self, fm: FunctionalModel, fm_loss: FunctionalModel, X: torch.Tensor, y: torch.Tensor,
                 loss: LossSpec, *, steps: list[dict], batches: list[torch.Tensor], momentum: tuple[float, float, bool],
                 rule: str, nodes: int, budget: int, progress: bool, weights: list[torch.Tensor] | None = None
                 ) -> None:
        self.fm, self.fm_loss, self.X, self.y, self.loss = fm, fm_loss, X, y, loss
        self.weights = weights  # λ per batch row (clipping, micro-batches: adaptive.row_weights), else the loss's
        self.C = fm.num_outputs
        self.trajectory = fm.trajectory
        self.steps, self.batches, self.momentum = steps, batches, momentum
        self.rule, self.nodes, self.dtype, self.progress = rule, nodes, fm.dtype, progress
        # per-sample gradients from layer factors in batched passes where layers have rules (docs/math.md §5)
        self.budget, self.cache_budget = budget, budget // 4
        self._eps = self.trajectory.step_sizes.tolist()  # ε_s, read by the coefficients κ̃
        self.set_panels(Panels(fm, X), Panels(fm_loss, X))

    def set_panels(self, panels: Panels, loss_panels: Panels) -> None:
        """Use these panels of the outputs and the loss (given one layout here) and plan the blocks from them."""
        Panels.matched(panels, loss_panels)
        self.panels, self.loss_panels = panels, loss_panels
        self.grad_cache: dict[int, dict] = {}
        self.cached_bytes = 0
        self._spare: list[torch.Tensor] | None = None
        self.slots = panels.slots()
        # a layer is blocked when a factorised pair costs less than its gradients' inner product
        self.blocked = [L is not None and pair_cheaper(L, self.C) for L, _, _ in self.slots]
        T = self.trajectory.num_steps
        mean_batch = max(1.0, sum(b.numel() for b in self.batches) / max(1, T))
        # a block's batch gradients ([rows, P]) within a quarter of the budget, at least one step
        fit = int(self.budget // 4 // max(1, mean_batch * self.fm.num_params * self.fm.itemsize))
        L = min(MAX_BLOCK, T, math.ceil(BLOCK_ROWS / mean_batch), fit) if any(self.blocked) else 1
        self.block = max(1, L)

    def combo(self, s: int) -> tuple[tuple[EvalPoint, float], ...]:
        if self.rule == "left":
            return ((EvalPoint(s), 1.0),)
        return tuple((EvalPoint(s, tau), om) for tau, om in gauss_legendre(self.nodes))

    # ------------------------------------------------------------------ the coefficients κ_{s,r}
    def kappa(self, s: int, r: int) -> float:
        """The coefficient of ε-free J̄_s in Ψ_r (s ≥ r): PyTorch's SGD with momentum μ, dampening d, Nesterov."""
        eps = self._eps
        mu, damp, nesterov = self.momentum
        if mu == 0.0:
            return eps[r] if s == r else 0.0
        c = 1.0 if r == 0 else 1.0 - damp  # the buffer starts undampened at the first step
        if nesterov:
            return eps[r] * (1.0 + c * mu) if s == r else c * mu * eps[s] * mu ** (s - r)
        return c * eps[s] * mu ** (s - r)

    def tail(self, r: int, r1: int) -> float:
        """The coefficient of S_{r1} = Σ_{s≥r1} ε_s μ^{s−r1} J̄_s in Ψ_r (r < r1)."""
        mu, damp, nesterov = self.momentum
        if mu == 0.0:
            return 0.0
        c = 1.0 if r == 0 else 1.0 - damp
        return c * mu ** (r1 - r + (1 if nesterov else 0))

    # ------------------------------------------------------------------ the training side
    def batch_block(self, r0: int, r1: int, full: bool = False) -> dict:
        """The batches of steps r0 … r1−1: their loss gradients as contiguous per-slot blocks ``[rows, width]``
        (each step's rows, then one row of w_r per step with weight decay), the blocked layers' factors per
        step, and λ per step (cached: reused by every query chunk). Without momentum the blocked slots' gradients
        are only needed when ``full`` (the sweep then meets batches through the pairs alone)."""
        key = (r0, r1, full)
        got = self.grad_cache.get(key)
        if got is not None:
            return got
        fm, dev, dt = self.fm, self.fm.device, self.dtype
        sizes = [self.batches[r].numel() for r in range(r0, r1)]
        wd = [self.steps[r]["weight_decay"] for r in range(r0, r1)]
        rows = sum(sizes) + sum(1 for w in wd if w)
        nbytes = rows * self.fm.num_params * self.fm.itemsize
        keep = self.cached_bytes + nbytes <= self.cache_budget
        G = self._spare if not keep and self._spare and self._spare[0].shape[0] == rows else None
        if G is None:  # (an uncached block reuses the last one's memory: fresh pages cost a first touch)
            G = [torch.empty(rows, w, dtype=dt, device=dev) for _, _, w in self.slots]
        where, feats, lam = {}, {}, {}
        skip = [b and not full and not self.momentum[0] for b in self.blocked]
        at = 0
        for r, n in zip(range(r0, r1), sizes):
            where[r] = (at, at + n)
            if n:
                b = self.batches[r]
                jac, nodes = self.loss_panels.evaluate(((EvalPoint(r), 1.0),), self.X[b], self.y[b])
                for slot, blk, sk in zip(self.slots, G, skip):
                    dst = blk[at:at + n].view(n, 1, -1)
                    if sk:
                        continue
                    if slot[0] is None:
                        dst.copy_(jac)
                    else:
                        Panels.write(slot, nodes, dst, beta=0.0)
                feats[r] = nodes[0][1] if nodes else {}
                lam[r] = (self.loss.batch_weights(self.y[b], self.C) if self.weights is None
                          else self.weights[r]).to(dev, dt)
            at += n
        for r, w in zip(range(r0, r1), wd):
            if w:
                flat = self.panels.to_panel(fm.state(EvalPoint(r))[0])
                o = 0
                for (_, _, wi), blk in zip(self.slots, G):
                    blk[at].copy_(flat[o:o + wi])
                    o += wi
                where[("w", r)] = at
                at += 1
        got = {"G": G, "where": where, "feats": feats, "lam": lam}
        if keep:
            self.grad_cache[key] = got
            self.cached_bytes += nbytes
        else:
            self._spare = G
        return got

    def batch_grads(self, s: int) -> torch.Tensor:
        """λ_{s,i} ∇_w ℓ(x_i; w_s) for i ∈ B_s, as ``[|B_s|, P]`` in the panel's column order."""
        got = self.batch_block(s, s + 1, full=True)
        a, b = got["where"][s]
        if a == b:
            return torch.zeros(0, self.fm.num_params, dtype=self.dtype, device=self.fm.device)
        return torch.cat([g[a:b] for g in got["G"]], dim=1) * got["lam"][s][:, None]

    def update_residuals(self) -> torch.Tensor:
        """``[T]`` ‖Δ_s − Δ̂_s‖/‖Δ_s‖, with Δ̂_s = −Σ_{r≤s} κ_{s,r} d_r recomputed from the batch gradients d_r
        (and weight decay) through the coefficients κ — the one statement of the optimizer's rule, the one the
        decomposition uses. The sum runs as Δ̂_s = −(κ_{s,s} d_s + ε_s U_s), with U_s = Σ_{r<s} κ_{s,r}/ε_s d_r
        = μ U_{s−1} + tail(s−1, s) d_{s−1} (:meth:`tail`: κ_{s,r} = ε_s tail(r, s) for r < s)."""
        eps, mu, fm = self._eps, self.momentum[0], self.fm
        U = None
        out = []
        for s, h in enumerate(self.steps):
            w = self.panels.to_panel(fm.state(EvalPoint(s))[0])
            d = self.batch_grads(s).sum(0)
            if h["weight_decay"]:
                d = d + h["weight_decay"] * w
            step = -self.kappa(s, s) * d if U is None else -(self.kappa(s, s) * d + eps[s] * U)
            if mu:
                U = self.tail(s, s + 1) * d if U is None else U.mul_(mu).add_(d, alpha=self.tail(s, s + 1))
            delta = self.panels.to_panel(fm.state(EvalPoint(s + 1))[0]) - w
            out.append(float((delta - step).norm() / delta.norm().clamp_min(1e-300)))
        return torch.tensor(out, dtype=torch.float64)

    # ------------------------------------------------------------------ the sweep
    def run(self, Xq: torch.Tensor, *, samples: bool, per_step: bool = False):
        """One backward pass over the steps for the queries ``Xq``: (bias [M, C], Σ_i c_i [M, C],
        contributions [M, N, C] or per-step [T, M, N, C] or None)."""
        st = self._start(Xq, samples, per_step)
        T = self.trajectory.num_steps
        bar = tqdm(total=T, desc="pkfast.KernelMachine steps", unit="step", disable=not self.progress, leave=False)
        for r1 in range(T, 0, -self.block):
            r0 = max(0, r1 - self.block)
            got = self.batch_block(r0, r1)
            c, qf = self._block_steps(st, got, r0, r1, bar)
            self._block_weight_decay(st, got, qf, r0, r1)
            if st.tail_live:
                self._meet_tail(st, got, c, r0, r1)
            if self.momentum[0]:
                self._advance_tail(st, qf, r0, r1)
            del qf
            self._collect(st, got, c, r0, r1)
        bar.close()
        return st.bias, st.total, st.contrib

    def _start(self, Xq: torch.Tensor, samples: bool, per_step: bool) -> "_Pass":
        """A pass's accumulators (the bias starts at f(Xq; w_0)) and the recursion's state, all zero."""
        T, N, C, M = self.trajectory.num_steps, self.X.shape[0], self.C, Xq.shape[0]
        dev, dt = self.fm.device, self.dtype
        bias = self.fm.outputs(EvalPoint(0), Xq).to(dt)
        total = torch.zeros(M, C, dtype=dt, device=dev)
        contrib = None
        if samples:
            contrib = torch.zeros((T, M, N, C) if per_step else (M, N, C), dtype=dt, device=dev)
        mu, _, nesterov = self.momentum
        slots, blocked = self.slots, self.blocked
        stepped = [i for i, b in enumerate(blocked) if not b]
        # stepped columns: S_r (and J̄_r for Nesterov) per step; blocked columns: the tail S at block boundaries
        S = {i: torch.zeros(M, C, slots[i][2], dtype=dt, device=dev) for i in range(len(slots))
             if not blocked[i] or mu}
        J = {i: torch.empty(M, C, slots[i][2], dtype=dt, device=dev) for i in stepped} if (mu and nesterov) else None
        return _Pass(Xq, M, C, bias, total, contrib, per_step, stepped, S, J)

    def _block_steps(self, st: "_Pass", got: dict, r0: int, r1: int, bar) -> tuple[torch.Tensor, dict]:
        """The steps r1−1 … r0 of a block, backwards: ``c`` (−⟨Ψ_r, ·⟩ for every row of the block) from the
        stepped columns and the blocked columns' pairs inside the block, and each step's query factors."""
        G, where = got["G"], got["where"]
        c = torch.zeros(st.M * st.C, G[0].shape[0], dtype=self.dtype, device=self.fm.device)
        qf: dict[int, list] = {}
        for r in range(r1 - 1, r0 - 1, -1):
            jac, nodes = self.panels.evaluate(self.combo(r), st.Xq)
            qf[r] = nodes
            terms = self._stepped(r, jac, nodes, st.S, st.J, st.stepped)
            self._meet_batch(c, terms, G, where, r)
            a, b = where[r]
            # blocked columns, pairs inside the block: κ_{s,r} ⟨J̄_s, ·⟩ from the two sides' factors
            for s in range(r, r1) if (any(self.blocked) and b > a) else ():
                k = self.kappa(s, r)
                if k != 0.0:
                    c[:, a:b] += _pairs(self.slots, self.blocked, qf[s], got["feats"][r], st.M, st.C, alpha=-k)
            bar.update(1)
        return c, qf

    @staticmethod
    def _meet_batch(c: torch.Tensor, terms: list, G: list[torch.Tensor], where: dict, r: int) -> None:
        """The stepped columns' terms of Ψ_r meet step r's batch gradients (and its weight row): c −= coef ⟨B, ·⟩."""
        a, b = where[r]
        wrow = where.get(("w", r))
        for coef, blocks in terms:
            for i, B_ in blocks.items():
                Bv = B_.view(c.shape[0], -1)
                if b > a:
                    c[:, a:b].addmm_(Bv, G[i][a:b].T, alpha=-coef)
                if wrow is not None:
                    c[:, wrow].add_(Bv @ G[i][wrow], alpha=-coef)

    def _block_weight_decay(self, st: "_Pass", got: dict, qf: dict, r0: int, r1: int) -> None:
        """Weight decay, blocked columns inside the block: Σ_r wd_r Σ_{s≥r} κ_{s,r} ⟨J̄_s, w_r⟩ = Σ_s ⟨J̄_s, u_s⟩,
        taken from the bias."""
        where = got["where"]
        for s in range(r0, r1) if any(self.blocked) else ():
            u = [(self.steps[r]["weight_decay"] * self.kappa(s, r), where[("w", r)])
                 for r in range(r0, s + 1) if ("w", r) in where]
            u = [(k, row) for k, row in u if k != 0.0]
            if u:
                st.bias -= _contract(self.slots, self.blocked, qf[s], got["G"], u, st.M, st.C).view(st.M, st.C)

    def _meet_tail(self, st: "_Pass", got: dict, c: torch.Tensor, r0: int, r1: int) -> None:
        """The blocked columns' tail S_{r1} meets the whole block in one GEMM per slot, weighted per step."""
        G, where = got["G"], got["where"]
        t = torch.zeros_like(c)
        for i in range(len(self.slots)):
            if self.blocked[i]:
                t.addmm_(st.S[i].view(st.M * st.C, -1), G[i].T)
        for r in range(r0, r1):
            k = self.tail(r, r1)
            a, b = where[r]
            c[:, a:b].add_(t[:, a:b], alpha=-k)
            wrow = where.get(("w", r))
            if wrow is not None:
                c[:, wrow].add_(t[:, wrow], alpha=-k)

    def _advance_tail(self, st: "_Pass", qf: dict, r0: int, r1: int) -> None:
        """S_{r0} = μ^L S_{r1} + Σ_s ε_s μ^{s−r0} J̄_s: one rank-(L·nodes) update per blocked slot."""
        mu, eps = self.momentum[0], self._eps
        beta = mu ** (r1 - r0) if st.tail_live else 0.0
        nodes = [(eps[s] * mu ** (s - r0) * om, f) for s in range(r0, r1) for om, f in qf[s]]
        for i in range(len(self.slots)):
            if self.blocked[i]:
                Panels.write(self.slots[i], nodes, st.S[i], beta=beta)
        st.tail_live = any(self.blocked)

    def _collect(self, st: "_Pass", got: dict, c: torch.Tensor, r0: int, r1: int) -> None:
        """The block's rows of ``c`` into the bias (weight rows), the total and the contributions (batch rows, × λ)."""
        M, C, where, dev = st.M, st.C, got["where"], self.fm.device
        for r in range(r0, r1):
            a, b = where[r]
            wrow = where.get(("w", r))
            if wrow is not None:
                st.bias += self.steps[r]["weight_decay"] * c[:, wrow].view(M, C)
            if b > a:
                cr = (c[:, a:b] * got["lam"][r]).view(M, C, b - a).transpose(1, 2)  # [M, |B|, C]
                st.total += cr.sum(1)
                if st.contrib is not None:
                    (st.contrib[r] if st.per_step else st.contrib).index_add_(1, self.batches[r].to(dev), cr)

    def _stepped(self, r: int, jac, nodes, S: dict, J: dict | None, stepped: list[int]) -> list:
        """Advance the stepped columns' recursion to step r; the terms (coefficient, {slot: block}) of Ψ_r."""
        if not stepped:
            return []
        mu, damp, nesterov = self.momentum
        eps = self._eps[r]

        def put(dst: dict, alpha: float, beta: float) -> None:
            sc = [(alpha * om, f) for om, f in nodes]
            for i in stepped:
                if self.slots[i][0] is None:
                    if beta == 0.0:
                        torch.mul(jac, alpha, out=dst[i])
                    else:
                        dst[i].mul_(beta).add_(jac, alpha=alpha)
                else:
                    Panels.write(self.slots[i], sc, dst[i], beta=beta)

        Ss = {i: S[i] for i in stepped}
        if mu == 0.0:
            put(Ss, eps, 0.0)
            return [(1.0, Ss)]
        c_r = 1.0 if r == 0 else 1.0 - damp
        if nesterov:
            put(J, 1.0, 0.0)
            for i in stepped:
                S[i].mul_(mu).add_(J[i], alpha=eps)
            return [(eps, J), (c_r * mu, Ss)]
        put(Ss, eps, mu)
        return [(c_r, Ss)]


@dataclass
class _Pass:
    """One :meth:`Sweep.run` over a chunk of queries: the queries, the accumulators it returns, and the state of
    the recursion (the stepped columns' S and J̄, the blocked columns' tail S and whether it is nonzero yet)."""

    Xq: torch.Tensor
    M: int
    C: int
    bias: torch.Tensor
    total: torch.Tensor
    contrib: torch.Tensor | None
    per_step: bool
    stepped: list[int]
    S: dict
    J: dict | None
    tail_live: bool = False


def _pairs(slots, blocked, qnodes, tfeats: dict, M: int, C: int, alpha: float) -> torch.Tensor:
    """``[M·C, B]``: α Σ_q ω_q ⟨J̄ of the blocked slots at node q, training loss gradient⟩ from factors."""
    out = None
    mm = lambda a, b, upper=False: a @ b.T  # noqa: E731
    for (L, g, _), bl in zip(slots, blocked):
        if not bl:
            continue
        At, Dt = tfeats[L.name][g]
        for om, f in qnodes:
            Aq, Dq = f[L.name][g]
            if out is None:
                out = torch.zeros(M * C, Dt.shape[0], dtype=Dq.dtype, device=Dq.device)
            factor_pair_product(out, L, Aq, Dq, At, Dt, alpha * om, full=True, mm=mm)
    return out


def _contract(slots, blocked, qnodes, G: list[torch.Tensor], rows: list[tuple[float, int]], M: int, C: int
              ) -> torch.Tensor:
    """``[M·C]``: Σ_q ω_q ⟨J̄ of the blocked slots at node q, u⟩ with u = Σ k × the block's row (parameter
    vectors w_r)."""
    out = torch.zeros(M * C, dtype=G[0].dtype, device=G[0].device)
    for i, ((L, g, w), bl) in enumerate(zip(slots, blocked)):
        if not bl:
            continue
        u = sum(k * G[i][row] for k, row in rows)
        tmp = torch.empty(M, C, w, dtype=G[i].dtype, device=G[i].device)
        Panels.write((L, g, w), qnodes, tmp, beta=0.0)
        out.addmv_(tmp.view(M * C, w), u)
    return out


def one_momentum(steps: list, fn: str) -> tuple[float, float, bool]:
    """The (momentum, dampening, nesterov) shared by every recorded step (``GroupHyper``), which the sweep's
    recursion needs; else a refusal saying what varied — for a momentum that follows the lr schedule
    (OneCycleLR's and CyclicLR's default ``cycle_momentum=True``), how to train without it."""
    kinds = {(h.momentum or 0.0, h.dampening or 0.0, bool(h.nesterov)) for h in steps}
    if len(kinds) <= 1:
        return kinds.pop() if kinds else (0.0, 0.0, False)
    moms = sorted({k[0] for k in kinds})
    found = f"momentum from {moms[0]:.6g} to {moms[-1]:.6g}" if len(moms) > 1 else f"{sorted(kinds)[:3]}"
    hint = (". OneCycleLR and CyclicLR cycle the momentum with the lr by default (cycle_momentum=True): pass "
            "cycle_momentum=False to the scheduler, which keeps the optimizer's momentum fixed, and record again"
            if len(moms) > 1 else "")
    raise ValueError(f"{fn}: momentum, dampening or nesterov changed during training (found {found}); the "
                     f"decomposition supports one setting for the whole recording (lr and weight decay may vary){hint}")
