r"""layers.head: a final linear head y = W h + b (W ``[V, d]``) collapsed, so that the trace kernel over its V
outputs costs d + 1 output gradients per position instead of V (docs/math.md §7.4).

With the outputs leaving the network through the head at positions l (and a selection of positions after it),

.. math:: \sum_c \nabla f_{l,c}(x)\cdot\nabla f_{l,c}(x') = V\,(h_l\cdot h'_l + 1)
          + \sum_{j,k} (W^\top W)_{jk}\, \nabla_\theta h_{l,j}(x)\cdot\nabla_\theta h_{l,k}(x'),

the first term from W and b, the second from the parameters θ below the head. :func:`collapse` replaces the head
in a shallow copy of the model (same ``weight`` and ``bias`` Parameters, so the same names) by a
:class:`CollapsedHead` whose d + 1 outputs per position have exactly that trace kernel: ``R h`` with R (d×d, from
the QR factorisation W = QR, so RᵀR = WᵀW) held constant — the θ part — and ``z = (1ᵀW) h̄ + 1ᵀb`` with h̄ = h
held constant — the head's own part (∇_W z = 1 h̄ᵀ, ∇_b z = 1). Its rule factorises z's gradient as a Linear
(d → 1) whose output gradient carries √V: the layer routes never form V values per position.

:func:`find_head` says whether a model has such a head: a ``nn.Linear`` (or Hugging Face ``Conv1D``) with more
outputs than inputs + 1, called once, untied or tied to one ``nn.Embedding`` lookup (:mod:`pkfast.layers.tied`
adds the cross term), whose output reaches the kernel's outputs through a map that acts on positions only — checked on two samples by replacing the head's output o by a random tensor and by o A (what
the model returns must then be F(o) A: a selection of positions, a reshape or a scale, not a softmax, a cap or a
bias added after the head).

The full blocks go through the head too (:class:`HeadBlocks`): with W = QR (Q ``[V, d]``, orthonormal columns),
∇y = Q ∇(R h) for the layers below and ∇_{W,b} y_c · ∇_{W,b} y′_{c′} = δ_{cc′} (h · h′ + 1) = δ_{cc′} K_z / V, so
the V × V block between two positions, at the weights w_a (rows) and w_b (columns), is
Q_a K_u Q_bᵀ + I · K_z / V from the collapsed outputs' (d + 1) × (d + 1) block (K_u: the R h part, K_z: z's; the
cross terms vanish: R h carries no gradient of W, z none of the layers below). Q changes along the trajectory, so
each kernel term is expanded at its own pair of points.

Example:
    >>> import torch
    >>> from torch import nn
    >>> net = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 50))
    >>> head = find_head(net, None, None, torch.randn(2, 4))
    >>> head.describe()
    "head '2' (Linear 8→50): the trace over its 50 outputs through its 8×8 metric WᵀW: 9 output gradients per position instead of 50"
    >>> collapse(net, head)(torch.randn(3, 4)).shape  # [R h, z]: 8 + 1 outputs
    torch.Size([3, 9])
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from pkfast.engine.inputs import adapt
from pkfast.layers.base import AffineRule, Factors, Layer

__all__ = ["Head", "CollapsedHead", "CollapsedHeadRule", "PointQ", "HeadBlocks", "find_head", "collapse", "resolve_head"]



@dataclass(frozen=True)
class Head:
    """A model's final linear head: its module ``name``, ``type``, widths d → V, and whether the weight is stored
    ``[d, V]`` (Hugging Face's Conv1D)."""

    name: str
    type: str
    d: int
    V: int
    transposed: bool = False
    #: the ``nn.Embedding`` whose weight the head's is (tied), or ""
    tied: str = ""

    def describe(self, outputs: str = "trace") -> str:
        what = (f"the full {self.V:,}×{self.V:,} blocks through W = QR at each point" if outputs == "full" else
                f"the trace over its {self.V:,} outputs through its {self.d}×{self.d} metric WᵀW")
        tie = (f"; tied to {self.tied!r}: its lookup's cross term h·G′ + G·h′ from {self.d} more backward passes "
               "per position" if self.tied else "")
        return (f"head {self.name!r} ({self.type} {self.d}→{self.V}): {what}: {self.d + 1} output gradients per "
                f"position instead of {self.V:,}{tie}")

    def record(self) -> dict[str, Any]:
        return {"name": self.name, "type": self.type, "d": self.d, "V": self.V, **({"tied": self.tied} if self.tied else {})}


class CollapsedHead(nn.Module):
    """The head's stand-in (see the module docstring): per position ``[R h, (1ᵀW) h̄ + 1ᵀb]``, d + 1 values whose
    trace kernel is the head's V outputs' one. It holds the head's own ``weight`` and ``bias`` Parameters."""

    def __init__(self, head: nn.Module, transposed: bool = False, reads: tuple[str, ...] = ()) -> None:
        super().__init__()
        # a tied head gets a copy of its own (its lookup's part and the cross term are apart, pkfast.layers.tied),
        # read from the trajectory under the tied tensor's names ``reads``
        self.weight = nn.Parameter(head.weight.detach().clone(), head.weight.requires_grad) if reads else head.weight
        self._pkfast_reads = tuple(reads)
        self.bias = head.bias
        self.transposed = transposed
        self._cache: tuple[torch.Tensor, torch.Tensor] | None = None

    def metric_factor(self, W: torch.Tensor) -> torch.Tensor:
        """R ``[min(V, d), d]`` with RᵀR = WᵀW (W ``[V, d]``, held constant), reused while W's values repeat."""
        W = W.detach()
        hit = self._cache
        try:
            if hit is not None and hit[0].shape == W.shape and hit[0].dtype == W.dtype and torch.equal(hit[0], W):
                return hit[1]
        except RuntimeError:  # (a transformed tensor that cannot be compared: compute afresh)
            hit = None
        R = torch.linalg.qr(W, mode="r").R
        try:
            self._cache = (W.clone(), R)
        except RuntimeError:
            self._cache = None
        return R

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        W = self.weight.T if self.transposed else self.weight
        lower = F.linear(h, self.metric_factor(W))
        z = F.linear(h.detach(), W.sum(0, keepdim=True), None if self.bias is None else self.bias.sum().reshape(1))
        return torch.cat([lower, z], dim=-1)


class CollapsedHeadRule(AffineRule):
    """The head's own parameters through its stand-in's last output z: a Linear d → 1 at every position whose
    output gradient is scaled by √V — the same kernel as W's and b's V × d gradient (1 h̄ᵀ per position: V equal
    rows), never formed. The engine's check against autograd compares with √V × the mean row."""

    name = "head"

    def unsupported(self, module: nn.Module) -> str:
        return "" if isinstance(module, CollapsedHead) else "not a collapsed head"

    def fans(self, module: nn.Module) -> tuple[int, int]:
        return int(module.weight.shape[0 if module.transposed else 1]), 1

    def groups(self, module: nn.Module) -> int:
        return 1

    def positions(self, module: nn.Module, shape_in: torch.Size, shape_out: torch.Size) -> int:
        return math.prod(shape_out[:-1])

    def capture(self, module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        return args[0].detach()

    def _scale(self, module: nn.Module) -> float:
        return math.sqrt(module.weight.shape[1 if module.transposed else 0])

    def unfold(self, layer: Layer, captured: torch.Tensor, grad: torch.Tensor, n: int, C: int,
               dtype: torch.dtype) -> Factors:
        D = grad[..., -1:].reshape(n, C, -1, 1).to(dtype) * self._scale(layer.module)
        return captured.reshape(n, -1, layer.fan_in).to(dtype), D

    def gradient_layout(self, layer: Layer, grads: dict[str, torch.Tensor | None]) -> torch.Tensor:
        m = layer.module
        W = grads.get("weight")
        W = torch.zeros_like(m.weight) if W is None else W
        W = W.T if m.transposed else W
        parts = [W]
        if layer.bias:
            b = grads.get("bias")
            parts.append((torch.zeros_like(m.bias) if b is None else b).reshape(-1, 1))
        G = torch.cat(parts, dim=1)  # [V, d(+1)]: the rows of a collapsed head's gradient are equal
        mean = G.mean(0)
        if float((G - mean).abs().max()) > 1e-5 * (float(mean.abs().max()) + 1e-30):
            raise ValueError("the head's weight gradient has unequal rows: its weight is used outside the head")
        return mean * self._scale(m)


class PointQ:
    """Q ``[V, d]`` of W = QR (reduced) for the head's weight at an evaluation point, the last few kept."""

    #: Points whose Q is kept (the terms of one tile visit them in order).
    CACHED = 4

    def __init__(self, fm: Any, head: Head) -> None:
        self.fm, self.head = fm, head
        self._q: dict[tuple[int, float], torch.Tensor] = {}

    def __call__(self, point: Any) -> torch.Tensor:
        key = (point.step, float(point.tau))
        if key not in self._q:
            flat, _ = self.fm.state(point)
            W = self.fm.params(flat)[self.head.name + ".weight"].detach()
            if len(self._q) >= self.CACHED:
                self._q.pop(next(iter(self._q)))
            self._q[key] = torch.linalg.qr(W.T if self.head.transposed else W, mode="reduced").Q
        return self._q[key]


class HeadBlocks:
    """Expands one single-point kernel term's products over a collapsed head's d + 1 outputs per position into
    the head's full V × V blocks (the module docstring's formula), given the functional model whose points
    hold the head's weight.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from pkfast.engine.quadrature import EvalPoint, Term
        >>> class Points:  # a stand-in for the functional model: one point, W = 2·I on the first 3 of 5 rows
        ...     def state(self, point): return torch.eye(5, 3, dtype=torch.float64).flatten() * 2, {}
        ...     def params(self, flat): return {"head.weight": flat.view(5, 3)}
        >>> blocks = HeadBlocks(Points(), Head("head", "Linear", 3, 5))
        >>> part = torch.eye(4, dtype=torch.float64)  # one sample, one position: K_u = I₃, K_z = 1
        >>> acc = torch.zeros(5, 5, dtype=torch.float64)
        >>> blocks.add(acc, part, Term(1.0, ((EvalPoint(0), 1.0),)), diagonal=False)
        >>> torch.allclose(acc, torch.diag(torch.tensor([1.2, 1.2, 1.2, 0.2, 0.2], dtype=torch.float64)))
        True
    """

    #: Working memory of the expansion's Q-times-block temporaries.
    WORKSPACE_BYTES = 64 * 2**20

    def __init__(self, fm: Any, head: Head) -> None:
        self.head = head
        self.q = PointQ(fm, head)

    def add(self, acc: torch.Tensor, part: torch.Tensor, term: Any, *, diagonal: bool) -> None:
        """``acc += term.weight ·`` the expansion of ``part``: a single-point term's products over the collapsed
        outputs (both triangles), ``[r·C′, c·C′]`` into ``[r·C, c·C]``, or ``diagonal`` ``[r, C′, C′]`` into
        ``[r, C, C]`` (C′ = P(d + 1), C = P·V for P positions, position-major)."""
        d, V = self.head.d, self.head.V
        e = d + 1
        if diagonal:
            R, cols = part.shape[0] * (part.shape[1] // e), part.shape[1] // e
        else:
            R, cols = part.shape[0] // e, part.shape[1] // e
        pv = part.view(R, e, cols, e)
        Qa = self.q(term.left[0][0]).to(acc.dtype)
        Qb = self.q(term.right_combo[0][0]).to(acc.dtype)
        out = acc.view(R, V, cols, V)
        slab = max(1, self.WORKSPACE_BYTES // max(1, V * cols * d * acc.element_size()))
        for i0 in range(0, R, slab):
            i1 = min(R, i0 + slab)
            U = pv[i0:i1, :d, :, :d].reshape(i1 - i0, d, cols * d)
            T = torch.matmul(Qa, U)  # [rows, V, cols·d]: Q_a K_u
            out[i0:i1].view(-1, V).addmm_(T.view(-1, d), Qb.T, alpha=term.weight)
        out.diagonal(dim1=1, dim2=3).add_(pv[:, d, :, d].unsqueeze(-1), alpha=term.weight / V)


def _head_modules(model: nn.Module) -> list[tuple[str, nn.Module, bool]]:
    """(name, module, transposed) of every Linear-like module (nn.Linear, Hugging Face Conv1D) keeping its type's
    forward, last defined first."""
    out = []
    for name, mod in model.named_modules():
        if type(mod).forward is nn.Linear.forward and isinstance(mod, nn.Linear):
            out.append((name, mod, False))
        elif type(mod).__name__ == "Conv1D" and getattr(mod, "weight", None) is not None and mod.weight.dim() == 2:
            out.append((name, mod, True))
    return out[::-1]


def _tie(model: nn.Module, mod: nn.Module, transposed: bool) -> tuple[str, str]:
    """(the ``nn.Embedding`` the head's weight is tied to, or "", why the tie cannot be collapsed, or "")."""
    mine = {id(p) for p in mod._parameters.values() if p is not None}
    others: dict[int, tuple[str, nn.Module]] = {}
    for n, sub in model.named_modules(remove_duplicate=False):
        if sub is not mod and any(id(p) in mine for p in sub._parameters.values() if p is not None):
            others.setdefault(id(sub), (n, sub))
    if not others:
        return "", ""
    n, sub = next(iter(others.values())) if len(others) == 1 else (None, None)
    if (sub is None or type(sub).forward is not nn.Embedding.forward or sub.weight is not mod.weight
            or transposed):
        return "", "its weight is tied to another module's (other than one nn.Embedding lookup)"
    if sub.max_norm is not None or sub.scale_grad_by_freq:
        return "", f"it is tied to {n!r}, an nn.Embedding with max_norm or scale_grad_by_freq"
    return n, ""


def _commutes(run: Callable[[], Any], mod: nn.Module, shape: torch.Size, dtype: torch.dtype) -> str:
    """"" if what the model returns is F(o) with F(o A) = F(o) A for the head's output o, else why not."""
    g = torch.Generator().manual_seed(20261204)
    o = torch.randn(shape, generator=g, dtype=torch.float64).to(dtype)
    A = torch.randn(shape[-1], 3, generator=g, dtype=torch.float64).to(dtype)
    outs = []
    for rep in (o, o @ A):
        h = mod.register_forward_hook(lambda m, a, out, rep=rep: rep)
        try:
            outs.append(run())
        except Exception as e:  # the model cannot carry 3 values per position after the head
            return f"the model does not pass other widths through after it ({type(e).__name__})"
        finally:
            h.remove()
    F1, F2 = outs
    if F1.shape[-1] != shape[-1] or F2.shape[:-1] != F1.shape[:-1] or F2.shape[-1] != 3:
        return "the outputs' last axis is not the head's"
    ref = F1.to(torch.float64) @ A.to(torch.float64)
    tol = 1e-10 if dtype == torch.float64 else 1e-4
    if float((F2.to(torch.float64) - ref).abs().max()) > tol * (float(ref.abs().max()) + 1e-30):
        return "what follows it is not a selection of positions (a softmax, a cap, a bias after it…)"
    return ""


def find_head(model: nn.Module, packing: Any, output_fn: Callable | None, X: torch.Tensor,
              name: str | None = None) -> Head | str:
    """The model's collapsible final head (or the one named ``name``), or why there is none, from a forward pass
    on the samples ``X`` (packed as ``packing``) with ``output_fn`` applied."""
    run_model = adapt(model, packing, output_fn, reduce=True)
    heads = _head_modules(model)
    found: dict[str, tuple[torch.Size, int]] = {}
    hooks = [m.register_forward_hook(lambda mod, a, out, n=n: found.__setitem__(
        n, (out.shape, found.get(n, (None, 0))[1] + 1))) for n, m, _ in heads]
    try:
        with torch.no_grad():
            y = run_model(X)
    finally:
        for h in hooks:
            h.remove()
    reasons = []
    for n, mod, transposed in heads:
        if name is not None and n != name or n not in found:
            continue
        d, V = (mod.weight.shape[0], mod.weight.shape[1]) if transposed else (mod.weight.shape[1], mod.weight.shape[0])
        tied, why_tie = _tie(model, mod, transposed)
        why = ("called more than once" if found[n][1] != 1 else why_tie or (
               f"{V} outputs are not more than its {d} inputs + 1" if V <= d + 1 else
               "its weight is frozen" if not mod.weight.requires_grad else
               "its outputs are not the model's last axis" if y.shape[-1] != V else ""))
        if not why:
            with torch.no_grad():
                why = _commutes(lambda: run_model(X), mod, found[n][0], y.dtype)
        if not why and tied:
            why = _called_once(run_model, model.get_submodule(tied), tied, X)
        if not why:
            return Head(n, type(mod).__name__, int(d), int(V), transposed, tied)
        reasons.append(f"{n!r}: {why}")
    if name is not None and not reasons:
        return f"no Linear or Conv1D module named {name!r} ran in the forward pass"
    return "; ".join(reasons) or "no Linear or Conv1D module with more outputs than inputs"


def _called_once(run: Callable[[], Any], emb: nn.Module, name: str, X: torch.Tensor) -> str:
    calls = []
    h = emb.register_forward_hook(lambda *a: calls.append(1))
    try:
        with torch.no_grad():
            run(X)
    finally:
        h.remove()
    return "" if len(calls) == 1 else f"it is tied to {name!r}, which is called {len(calls)} times"


def collapse(model: nn.Module, head: Head) -> nn.Module:
    """A shallow copy of ``model`` with ``head`` replaced by its :class:`CollapsedHead` (every parameter, buffer
    and other submodule shared: the names and the trajectory match); the model itself is untouched."""
    path = head.name.split(".")
    root = copy.copy(model)
    root._modules = dict(model._modules)
    cur = root
    for p in path[:-1]:
        child = copy.copy(cur._modules[p])
        child._modules = dict(child._modules)
        cur._modules[p] = child
        cur = child
    mod = cur._modules[path[-1]]
    reads = tuple(n for n, p in model.named_parameters(remove_duplicate=False) if p is mod.weight) if head.tied else ()
    cur._modules[path[-1]] = CollapsedHead(mod, head.transposed, reads)
    return root


def resolve_head(fn: str, model: nn.Module, opts: Any, X: torch.Tensor, packing: Any) -> Head | None:
    """The head a computation collapses: ``opts.head`` (``"auto"``, a module name or None) where the kernel is a
    trace, mean or full Gram of the model's outputs on a Euclidean, non-sketched route, else None; a named head that
    cannot be collapsed raises with the reason."""
    want = opts.head
    if want is None:
        return None
    why = ("of='loss' has one output per sample" if opts.of == "loss" else
           f"outputs={opts.outputs!r} (the collapse is for 'trace', 'mean' and 'full')"
           if opts.outputs not in ("trace", "mean", "full") else "an output sketch combines the outputs" if opts.output_sketch is not None else
           "method='sketch' projects the parameters' gradients" if opts.method == "sketch" else
           "a recorded preconditioner scales W's entries one by one" if opts.preconditioner == "recorded" else
           "rule='exact' pairs points with different heads W_a, W_b, and the trace through WᵀW needs one "
           "(outputs='full' goes through it)" if opts.rule == "exact" and opts.outputs != "full" else "")
    if why:
        if want != "auto":
            raise ValueError(f"{fn}: head={want!r} cannot be collapsed here: {why}; expected head='auto' or None")
        return None
    ref = next((p for p in model.parameters() if p.is_floating_point()), None)
    x = X[: min(2, X.shape[0])]
    if ref is not None:
        x = x.to(ref.device, ref.dtype if x.is_floating_point() else x.dtype)
    try:
        got = find_head(model, packing, opts.output_fn, x, None if want == "auto" else want)
    except Exception as e:  # the probe itself failed: no collapse (the computation reports the model's errors)
        got = f"{type(e).__name__}: {str(e).splitlines()[0][:80] if str(e) else ''}"
    if isinstance(got, Head) and got.tied and opts.outputs == "full":
        got = (f"{got.name!r} is tied to {got.tied!r}: the full blocks' cross terms between the lookup and the head "
               "need every output's gradient (the trace and mean kernels go through a tied head)")
    if isinstance(got, Head):
        return got
    if want != "auto":
        raise ValueError(f"{fn}: head={want!r} cannot be collapsed: {got}; expected a final nn.Linear or Conv1D "
                         "whose outputs leave the model through a selection of positions, or head=None")
    return None
