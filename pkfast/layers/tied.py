r"""layers.tied: the cross term of a collapsed head whose weight is an ``nn.Embedding``'s (tied, GPT-2's
``lm_head`` = ``wte``) — the part of the trace kernel that pairs the head's use of W with the lookup's.

The collapsed model holds an untied copy of the head's weight (:func:`pkfast.layers.head.collapse`), so its
trace kernel has the head's part V (h·h′ + 1) and the layers' below, the lookup included, but not the pairs of
the two uses of the one tensor. Those are, per output position p (docs/math.md §7.4),

.. math:: \sum_c \big(e_c \otimes \tilde h_p(x)\big)\cdot\nabla_{W_e} y_{p,c}(x')
          = \tilde h_p(x)\cdot G_p(x'), \qquad
          G_p(x) = \sum_m \sum_s Q_{t_s m}\, \frac{\partial (R\tilde h)_{p,m}}{\partial e_s}(x),

plus the same with x and x′ swapped, where W = QR, h̃ = F(h) is the head's input carried through what follows the
head (a selection of positions), e_s the lookup's output at input position s and t_s its token. Both are
linear in the Jacobians, so a term ``A Bᵀ`` with A = Σ ω_a J_a adds H̄_A · Ḡ_Bᵀ + Ḡ_A · H̄_Bᵀ with
H̄ = Σ ω_a h̃_a, Ḡ = Σ ω_a G_a. G costs d backward passes per output position (batched over the samples).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.func import functional_call

from pkfast.layers.head import CollapsedHead, Head, PointQ

__all__ = ["TiedCross"]


class TiedCross:
    """Adds a tied head's cross term to a trace (or mean) kernel's tiles, from the functional model ``fm`` of the
    collapsed model, its ``head`` and the tied ``embedding`` module.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> import pkfast
        >>> class LM(nn.Module):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.emb, self.mid, self.head = nn.Embedding(20, 4), nn.Linear(4, 4), nn.Linear(4, 20)
        ...         self.head.weight = self.emb.weight
        ...     def forward(self, x): return self.head(torch.tanh(self.mid(self.emb(x))))
        >>> net = LM().double()
        >>> w0 = {k: v.clone() for k, v in net.state_dict().items()}  # (both names of the tied tensor)
        >>> traj = pkfast.Trajectory.from_checkpoints([w0, {k: v * 0.9 for k, v in w0.items()}], lr=0.1)
        >>> X = torch.randint(0, 20, (3, 2))
        >>> K = pkfast.gram(net, traj, X, dtype=torch.float64, progress=False)  # through the tied head
        >>> bool(torch.allclose(K, pkfast.gram(net, traj, X, head=None, dtype=torch.float64, progress=False)))
        True
    """

    #: Working memory of one chunk of batched backward passes.
    WORKSPACE_BYTES = 64 * 2**20

    #: Sides whose features are kept (a tile's rows and columns, reused by the next tile of the same ones).
    CACHED = 2

    def __init__(self, fm: Any, head: Head, embedding: nn.Module) -> None:
        self.fm, self.head, self.emb = fm, head, embedding
        self.collapsed = next(m for m in fm.model.modules() if isinstance(m, CollapsedHead))
        self.q = PointQ(fm, head)
        self._kept: dict[Any, tuple[torch.Tensor, torch.Tensor]] = {}

    def features(self, combo: Any, X: torch.Tensor, key: Any = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(H̄, Ḡ), each ``[n, P·d]``: Σ ω h̃ and Σ ω G over the combination's ``(point, ω)``; ``key`` (which
        samples ``X`` are) keeps them for the next call with the same key and combination."""
        if key is not None and (key, combo) in self._kept:
            return self._kept[(key, combo)]
        H = G = None
        for point, w in combo:
            h, g = self._at(point, X)
            H = h.mul_(w) if H is None else H.add_(h, alpha=w)
            G = g.mul_(w) if G is None else G.add_(g, alpha=w)
        if key is not None:
            if len(self._kept) >= self.CACHED:
                self._kept.pop(next(iter(self._kept)))
            self._kept[(key, combo)] = (H, G)
        return H, G

    def add(self, acc: torch.Tensor, rows: tuple[torch.Tensor, torch.Tensor], cols: tuple[torch.Tensor, torch.Tensor],
            weight: float, *, diagonal: bool) -> None:
        """``acc += weight · (H̄_r Ḡ_cᵀ + Ḡ_r H̄_cᵀ)`` (``[r, c]``), or its diagonal (``[r]``, rows = columns)."""
        (Hr, Gr), (Hc, Gc) = rows, cols
        if diagonal:
            acc.add_((Hr * Gc).sum(1) + (Gr * Hc).sum(1), alpha=weight)
        else:
            acc.addmm_(Hr.to(acc.dtype), Gc.to(acc.dtype).T, alpha=weight)
            acc.addmm_(Gr.to(acc.dtype), Hc.to(acc.dtype).T, alpha=weight)

    def _run(self, params: dict, statics: dict, X: torch.Tensor, head_out, emb_out=None) -> torch.Tensor:
        hooks = [self.collapsed.register_forward_hook(head_out)]
        if emb_out is not None:
            hooks.append(self.emb.register_forward_hook(emb_out))
        try:
            out = functional_call(self.fm.model, (params, statics), (X,))
        finally:
            for h in hooks:
                h.remove()
        return out.reshape(X.shape[0], -1, self.head.d)

    def _at(self, point: Any, X: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(h̃, G) at one point, each flattened to ``[n, P·d]``."""
        fm, d = self.fm, self.head.d
        flat, statics = fm.state(point)
        params = {k: v.detach() for k, v in fm.params(flat).items()}
        Q = self.q(point)  # [V, d]
        X = fm.prepare(X)
        with torch.no_grad():
            h = self._run(params, statics, X, lambda m, a, out: a[0])  # F(h): the head's input, carried on
        seen: dict[str, torch.Tensor] = {}

        def perturb(m, args, out):
            seen["tok"], seen["eps"] = args[0], torch.zeros_like(out, requires_grad=True)
            return out + seen["eps"]

        with torch.enable_grad():
            u = self._run(params, statics, X, lambda m, a, out: out[..., :d], perturb)  # F(R h)
            q = Q[seen["tok"]]  # [n, S, d]: Q's row at each input token
            if self.emb.padding_idx is not None:  # (the padding row gets no gradient)
                q = q * (seen["tok"] != self.emb.padding_idx).unsqueeze(-1).to(q.dtype)
            G = self._contract(u, seen["eps"], q)
        return h.reshape(X.shape[0], -1), G.reshape(X.shape[0], -1)

    def _contract(self, u: torch.Tensor, eps: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
        """G[n, p, :] = Σ_m Σ_s q[n, s, m] ∂u[n, p, m]/∂eps[n, s, :], by batched backward passes over (p, m)."""
        n, P, d = u.shape
        k = P * d
        G = torch.zeros(n, P, eps.shape[-1], dtype=u.dtype, device=u.device)
        chunk = max(1, self.WORKSPACE_BYTES // max(1, eps.numel() * eps.element_size() * 2))
        eye = torch.eye(k, dtype=u.dtype, device=u.device).view(k, 1, P, d)
        for c0 in range(0, k, chunk):
            c1 = min(k, c0 + chunk)
            cot = eye[c0:c1].expand(c1 - c0, n, P, d)
            try:
                g, = torch.autograd.grad(u, eps, cot, retain_graph=True, is_grads_batched=True)
            except RuntimeError:  # an op without a batching rule: one backward pass at a time
                g = torch.stack([torch.autograd.grad(u, eps, c, retain_graph=True)[0] for c in cot])
            idx = torch.arange(c0, c1, device=u.device)
            p, m = idx // d, idx % d
            part = torch.einsum("bns,bnsj->nbj", q[:, :, m].permute(2, 0, 1), g)  # [n, b, d]
            G.index_add_(1, p, part)
        return G
