"""engine.capture.entry: per-sample gradients of the parameters no layer rule covers, from the batched pass — a probe where
each such parameter's values first meet the samples.

A parameter without a rule (a learned positional embedding added to the tokens, a ViT ``cls_token`` concatenated
to them, a layer-scale ``gamma``, a custom norm's gain, a learned temperature) is shared by the whole batch, so
one batched backward pass gives only its batch gradient. But the forward pass computes from it, *before* it
meets any sample, a tensor q = h(w) of the parameters alone (a slice ``pos[:L]``, ``gamma.view(1, -1, 1, 1)``,
``cls.expand(n, -1, -1)``, ``t.exp()``), and then an *entry* op combines q with the samples (``x + q``, ``x * q``,
``cat([q, x])``). :class:`EntryProbes`, a ``TorchFunctionMode`` around the batched forward, follows which tensors
depend on the parameters alone and which on the samples; at an entry it replaces q by a per-sample copy
q + z (z = 0, one slice per sample: q broadcast over a new batch axis, or q's own stride-0 batch axis), checks
on the first chunk that the entry op's result is unchanged, and keeps (anchor, z) with anchor one sample's q.
Then ∂f_c(x_i)/∂w = (∂anchor/∂w)ᵀ ∂f_c(x_i)/∂z_i: the probes' output gradients from the batched backward
passes, mapped to the parameters by one batched vector-Jacobian product through h (:func:`param_jacobians`).

Where this does not apply — an entry op whose result changes with the copy (``F.linear(x, W)`` with a bare
``W``), an in-place entry, an anchor that is not one function for every sample — :attr:`EntryProbes.refused`
says why, and the capture takes the ``vmap(jacrev)`` pass as before. The first chunk is also checked against
that pass on two samples, the Jacobian of these parameters included.
"""

from __future__ import annotations

import weakref
from typing import Any

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten, tree_unflatten

__all__ = ["EntryProbes", "param_jacobians"]


_INPLACE_DUNDERS = {f"__i{op}__" for op in ("add", "sub", "mul", "truediv", "floordiv", "mod", "pow", "matmul", "and",
                                             "or", "xor", "lshift", "rshift")}


class _Tags:
    """Tensors by identity (weakly held): which ones a forward pass has marked."""

    def __init__(self) -> None:
        self._refs: dict[int, weakref.ref] = {}

    def add(self, obj: Any) -> None:
        for t in tree_flatten(obj)[0]:
            if isinstance(t, torch.Tensor):
                self._refs[id(t)] = weakref.ref(t)

    def __contains__(self, t: Any) -> bool:
        r = self._refs.get(id(t))
        return r is not None and r() is t


class EntryProbes(TorchFunctionMode):
    """Within a batched forward of ``n`` samples: per-sample probes where the tensors computed from ``params``
    alone (leaves with ``requires_grad``) meet tensors computed from ``batch`` (the model's input).

    After the forward, :attr:`probes` are the zero probes to differentiate (each ``[n, *anchor shape]``),
    :attr:`anchors` the matching one-sample tensors of the parameters, and :attr:`refused` is empty, or says why
    this forward cannot give the parameters' per-sample gradients. ``check``: compare each entry op's result
    with the copy against its result without (on the first chunk)."""

    def __init__(self, params: dict[str, torch.Tensor], batch: Any, n: int, *, check: bool = True,
                 tol: float = 1e-9) -> None:
        super().__init__()
        self.n, self.check, self.tol = n, check, tol
        self._params, self._batch = _Tags(), _Tags()
        self._params.add(list(params.values()))
        self._batch.add(batch)
        self.probes: list[torch.Tensor] = []
        self.anchors: list[torch.Tensor] = []
        self.refused = ""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        flat, spec = tree_flatten((args, kwargs))
        own = [i for i, t in enumerate(flat) if isinstance(t, torch.Tensor) and t in self._params]
        sampled = any(isinstance(t, torch.Tensor) and t in self._batch for t in flat)
        if not own or not sampled or self.refused:
            out = func(*args, **kwargs)
            if sampled or own:
                (self._batch if sampled else self._params).add(out)
            return out
        name = getattr(func, "__name__", str(func))
        if (name.endswith("_") and not name.endswith("__")) or name in _INPLACE_DUNDERS:
            self.refused = f"a parameter enters the samples in place ({name})"
            out = func(*args, **kwargs)
            self._batch.add(out)
            return out
        return self._enter(func, flat, spec, own, name)

    def _enter(self, func, flat: list, spec, own: list[int], name: str):
        """The entry op ``func`` with each parameter-only float input replaced by its per-sample copy, for a
        result with as many axes as its largest input (broadcasting, joining). On the checked chunk the op also
        runs without the copies, and the two results must agree; later chunks run it once."""
        nd = max(t.ndim for t in flat if isinstance(t, torch.Tensor))
        ref = None
        if self.check:
            a, k = tree_unflatten(flat, spec)
            ref = func(*a, **k)
            if not isinstance(ref, torch.Tensor) or ref.ndim != nd:
                return self._refuse(ref, f"{name} gives a result whose axes are not its inputs' (a product or a "
                                         "reduction of a parameter with the samples)")
        new, made = list(flat), []
        for i in own:
            q = flat[i]
            if not (q.is_floating_point() and q.requires_grad):
                continue  # (a comparison of the parameters: no gradient flows through it)
            copy = self._copy(q, nd)
            if copy is None:
                return self._refuse(ref, f"{name} combines a parameter of shape {tuple(q.shape)} with the samples "
                                         "other than by broadcasting or repeating it over them", func, flat, spec)
            new[i], anchor, z = copy
            made.append((anchor, z))
        a, k = tree_unflatten(new, spec)
        try:
            out = func(*a, **k)
        except (RuntimeError, ValueError, TypeError, IndexError) as e:
            return self._refuse(ref, f"{name} does not take a per-sample copy of a parameter ({type(e).__name__})",
                                func, flat, spec)
        if self.check and not _same(out, ref, self.tol):
            return self._refuse(ref, f"{name} computes something else with a per-sample copy of a parameter")
        for anchor, z in made:
            self.anchors.append(anchor)
            self.probes.append(z)
        self._batch.add(out)
        return out

    def _copy(self, q: torch.Tensor, nd: int):
        """(q's per-sample copy, one sample's q as a function of the parameters, the zero probe), or None when q
        is not one tensor repeated over the samples of an ``nd``-dimensional result."""
        if q.ndim > nd:
            return None
        if q.ndim == nd:  # q has the samples' axis: size 1, or a stride-0 repeat over them
            if not (q.shape[0] == 1 or (q.shape[0] == self.n and q.stride(0) == 0)):
                return None
            anchor = q[0]
        else:  # q broadcasts over a new first axis
            anchor = q.reshape((1,) * (nd - 1 - q.ndim) + tuple(q.shape))
        z = torch.zeros((self.n, *anchor.shape), dtype=q.dtype, device=q.device, requires_grad=True)
        return anchor.unsqueeze(0) + z, anchor, z

    def _refuse(self, ref, why: str, func=None, flat=None, spec=None):
        """Give up the probes for this forward (``why``); the op's result without copies (``ref``, or computed
        from ``func`` on the original inputs)."""
        self.refused = why
        if ref is None:
            a, k = tree_unflatten(flat, spec)
            ref = func(*a, **k)
        self._batch.add(ref)
        return ref


def _same(a: Any, b: Any, tol: float) -> bool:
    fa, fb = tree_flatten(a)[0], tree_flatten(b)[0]
    if len(fa) != len(fb):
        return False
    for x, y in zip(fa, fb):
        if isinstance(x, torch.Tensor) != isinstance(y, torch.Tensor):
            return False
        if isinstance(x, torch.Tensor):
            if x.shape != y.shape or x.dtype != y.dtype:
                return False
            if x.is_floating_point() and x.numel():
                scale = float(y.detach().abs().max()) + 1e-30
                if float((x - y).detach().abs().max()) > tol * scale:
                    return False
            elif not torch.equal(x, y):
                return False
    return True


def param_jacobians(params: dict[str, torch.Tensor], anchors: list[torch.Tensor], grads: list[torch.Tensor]
                    ) -> dict[str, torch.Tensor]:
    """``{name: [n, C, *shape]}``: the per-sample, per-output gradients of ``params`` from the probes' output
    gradients ``grads`` (one ``[n, C, *anchor shape]`` per anchor), by one batched vector-Jacobian product."""
    names = list(params)
    if not anchors:
        raise ValueError("no entry of the parameters into the samples was seen")
    n, C = grads[0].shape[:2]
    outs = torch.autograd.grad(anchors, [params[k] for k in names], [g.reshape(n * C, *g.shape[2:]) for g in grads],
                               is_grads_batched=True, allow_unused=True)
    return {k: (torch.zeros((n, C, *params[k].shape), dtype=params[k].dtype, device=params[k].device) if g is None
                else g.reshape(n, C, *params[k].shape)) for k, g in zip(names, outs)}
