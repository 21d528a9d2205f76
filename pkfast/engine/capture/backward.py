"""engine.capture.backward: the output gradients of a batched forward at its probes, ∂f_c/∂probe for every output c — by one
backward pass for one output, else by one batched backward (``is_grads_batched``) where the model's backward ops
support it, else by C passes stacked."""

from __future__ import annotations

import torch

__all__ = ["OutputGradients"]


class OutputGradients:
    """``grads(f, probes)``; learns on its first call with several outputs whether the batched backward runs."""

    def __init__(self) -> None:
        self.batched: bool | None = None  # one batched backward for C outputs works (None: not tried)

    def __call__(self, f: torch.Tensor, probes: list[torch.Tensor]) -> list[torch.Tensor]:
        """∂f[:, c]/∂probe for every output c, as ``[n, C, *probe shape[1:]]`` per probe: C = 1 by one backward
        pass; more by one batched backward (``is_grads_batched``) where the model's backward ops support it
        (learnt on the first call), else by C passes stacked."""
        n, C = f.shape
        if C == 1:
            gs = torch.autograd.grad(f[:, 0].sum(), probes, allow_unused=True)
            return [torch.zeros_like(p).unsqueeze(1) if g is None else g.unsqueeze(1) for p, g in zip(probes, gs)]
        if self.batched is not False:
            eye = torch.eye(C, dtype=f.dtype, device=f.device)[:, None, :].expand(C, n, C)
            try:
                gs = torch.autograd.grad(f, probes, grad_outputs=eye, is_grads_batched=True, retain_graph=True,
                                         allow_unused=True)
                self.batched = True
                return [torch.zeros((n, C, *p.shape[1:]), dtype=p.dtype, device=p.device) if g is None
                        else g.transpose(0, 1) for p, g in zip(probes, gs)]
            except RuntimeError:  # an op without a batching rule for its backward
                if self.batched:
                    raise
                self.batched = False
        rows: list[list[torch.Tensor]] = [[] for _ in probes]
        for c in range(C):
            gs = torch.autograd.grad(f[:, c].sum(), probes, retain_graph=c < C - 1, allow_unused=True)
            for r, p, g in zip(rows, probes, gs):
                r.append(torch.zeros_like(p) if g is None else g)
        return [torch.stack(r, dim=1) for r in rows]
