"""per_sample: how per-sample Jacobians are taken, and the check that each sample's output is its own.

:class:`Passes` takes ``jacrev`` of a per-sample function over a batch of samples in the fastest way that runs
the model: ``vmap`` over the samples; where vmap cannot run it (``nn.RNN``/``nn.GRU``/``nn.LSTM`` have no
batching rule), a loop over the samples; where ``torch.func`` cannot run it at all (packed sequences), a loop
over samples and outputs with ``torch.autograd.grad``. The numbers are the same; the plan names the slower
passes and why.

:func:`check_independent` refuses a model whose output for a sample depends on the rest of its batch (batch
statistics, a batch-wide centring): the per-sample kernel is undefined for it.
"""

from __future__ import annotations

import contextlib
import logging
import re
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch.func import functional_call, jacrev, vmap
from torch.utils._pytree import tree_map

from pkfast.engine.quadrature import EvalPoint

__all__ = ["Passes", "check_independent", "random_forward_refused", "mha_fastpath_off"]

log = logging.getLogger("pkfast")

#: how the passes run, fastest first, and what the plan says of the slower ones
MODES = {"vmap": "", "loop": "a loop over the samples (jacrev per sample)",
         "autograd": "a loop over the samples and outputs (torch.autograd.grad)"}


@contextlib.contextmanager
def mha_fastpath_off() -> Iterator[None]:
    """PyTorch's fused fast path of attention and transformer layers off (restored on exit): it bypasses the
    modules' forwards (hence hooks) and has no forward-mode derivative."""
    mha = getattr(torch.backends, "mha", None)
    if mha is None or not hasattr(mha, "set_fastpath_enabled"):
        yield
        return
    was = mha.get_fastpath_enabled()
    mha.set_fastpath_enabled(False)
    try:
        yield
    finally:
        mha.set_fastpath_enabled(was)


@contextlib.contextmanager
def random_forward_refused() -> Iterator[None]:
    """Turn ``vmap``'s refusal of random operations into the user's error: the kernel is undefined."""
    try:
        yield
    except RuntimeError as e:
        if "randomness" in str(e):
            raise ValueError(
                "pkfast: the model draws random numbers in its forward pass (e.g. F.dropout with "
                "training=True), so the kernel is undefined; make the forward pass deterministic (model.eval())"
            ) from e
        raise


#: torch's warning for an operator vmap runs through its slow fallback (repeated on every call and backward).
_SLOW_OP = re.compile(r"There is a performance drop because we have not yet implemented the batching rule for (\S+?)\.")


@contextlib.contextmanager
def slow_ops_noted(seen: set[str]) -> Iterator[None]:
    """Collect torch's repeated "no batching rule for aten::…" warnings into one pkfast warning per operator
    (``seen``: the operators already reported for this model); every other warning passes through unchanged."""
    caught: list = []
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            yield
    finally:  # (outside the recording: re-issued warnings must not land in the list being read)
        new = []
        for w in caught:
            m = _SLOW_OP.search(str(w.message))
            if m is None:
                warnings.warn_explicit(w.message, w.category, w.filename, w.lineno, source=w.source)
            elif m.group(1) not in seen:
                seen.add(m.group(1))
                new.append(m.group(1))
    if new:
        warnings.warn(f"pkfast: torch.vmap has no batching rule for {', '.join(new)}: torch runs it sample by sample "
                      "inside the vectorised pass (exact, slower); shown once per model and operator",
                      UserWarning, stacklevel=3)


def _why(what: str, e: BaseException) -> str:
    return f"{what} cannot run this model ({type(e).__name__}: {str(e).strip().splitlines()[0][:100]})"


class Passes:
    """The way per-sample Jacobians are taken for one model: :attr:`mode` is ``"vmap"``, ``"loop"`` or
    ``"autograd"`` (see the module docstring), :attr:`reason` why it is not vmap."""

    def __init__(self) -> None:
        self.mode = "vmap"
        self.reason: str | None = None
        self._probed = False
        self.slow_ops: set[str] = set()  # operators vmap runs by its slow fallback (reported once each)

    def describe(self) -> str:
        """One line for the plan ("" when vmap runs the model)."""
        return "" if self.mode == "vmap" else f"{MODES[self.mode]}, slower than vmap — {self.reason}"

    def _fall(self, mode: str, reason: str) -> None:
        self.mode, self.reason = mode, reason
        log.info("pkfast: per-sample Jacobians by %s: %s", MODES[mode], reason)

    def choose(self, fm: Any, X: torch.Tensor) -> None:
        """Learn up front how the model's passes run: vmap on its forward pass over two samples, else jacrev on
        one sample (so that the plan is right before anything is computed)."""
        if self._probed or self.mode != "vmap" or X.shape[0] < 2:
            return
        self._probed = True  # (X2 is probed by the same model: once is enough)
        flat, statics = fm.state(EvalPoint(0))
        params = fm.params(flat)
        x = fm.prepare(X[:2])

        def f(p, xi):
            return functional_call(fm.model, (p, statics), (xi.unsqueeze(0),)).reshape(-1)

        try:
            with torch.no_grad(), random_forward_refused(), slow_ops_noted(self.slow_ops):
                vmap(f, in_dims=(None, 0), randomness="error")(params, x)
            return
        except RuntimeError as e:
            self._fall("loop", _why("vmap", e))
        try:
            jacrev(f)(params, x[0])
        except RuntimeError as e:
            self._fall("autograd", _why("torch.func", e))

    def jacobian(self, f: Callable, argnums: int | tuple[int, ...], in_dims: tuple, *args: Any,
                 has_aux: bool = False) -> Any:
        """``jacrev(f, argnums, has_aux)`` of each sample of the batched arguments (``in_dims``: 0 batched,
        None shared), stacked along a first axis; falls back to the slower modes when a faster one fails."""
        if self.mode == "vmap":
            try:
                with random_forward_refused(), slow_ops_noted(self.slow_ops):
                    return vmap(jacrev(f, argnums=argnums, has_aux=has_aux), in_dims=in_dims, randomness="error")(*args)
            except RuntimeError as e:
                self._fall("loop", _why("vmap", e))
        n = next(a.shape[0] for a, d in zip(args, in_dims) if d == 0)
        samples = [tuple(a[i] if d == 0 else a for a, d in zip(args, in_dims)) for i in range(n)]
        if self.mode == "loop":
            try:
                outs = [jacrev(f, argnums=argnums, has_aux=has_aux)(*a) for a in samples]
                return tree_map(lambda *xs: torch.stack(xs), outs[0], *outs[1:])
            except RuntimeError as e:
                self._fall("autograd", _why("torch.func", e))
        outs = [_autograd_jacobian(f, argnums, has_aux, a) for a in samples]
        return tree_map(lambda *xs: torch.stack(xs), outs[0], *outs[1:])


def _autograd_jacobian(f: Callable, argnums: int | tuple[int, ...], has_aux: bool, args: tuple) -> Any:
    """What ``jacrev(f, argnums, has_aux)(*args)`` returns, by one ``torch.autograd.grad`` per output, for
    arguments that are dicts of tensors (parameters, probes) at ``argnums``."""
    nums = (argnums,) if isinstance(argnums, int) else tuple(argnums)
    args = list(args)
    for i in nums:
        args[i] = {k: v.detach().requires_grad_(True) for k, v in args[i].items()}
    with torch.enable_grad():
        res = f(*args)
        out, aux = res if has_aux else (res, None)
        leaves = [(i, k, v) for i in nums for k, v in args[i].items()]
        rows: list[list[torch.Tensor]] = [[] for _ in leaves]
        for c in range(out.numel()):
            grads = torch.autograd.grad(out.reshape(-1)[c], [v for _, _, v in leaves], retain_graph=True,
                                        allow_unused=True)
            for r, g, (_, _, v) in zip(rows, grads, leaves):
                r.append(torch.zeros_like(v) if g is None else g)
    jac = {i: {} for i in nums}
    for r, (i, k, _) in zip(rows, leaves):
        jac[i][k] = torch.stack(r).reshape(*out.shape, *r[0].shape)
    result = jac[nums[0]] if isinstance(argnums, int) else tuple(jac[i] for i in nums)
    if has_aux:
        return result, tree_map(lambda t: t.detach() if isinstance(t, torch.Tensor) else t, aux)
    return result


# ---------------------------------------------------------------------------------------------- independence
def check_independent(fm: Any, X: torch.Tensor, fn: str, name: str = "X", k: int = 4, *,
                      random_checked: bool = False) -> None:
    """Refuse a model whose output for a sample depends on the rest of its batch: the first ``k`` samples are
    evaluated together and each alone; on a difference the runs are repeated with hooks to name the first module
    whose output differs. Unless ``random_checked`` (``vmap`` already refused random operations), a forward pass
    that differs between two identical calls is refused as random."""
    k = min(k, X.shape[0])
    if k < 2:
        return
    flat, statics = fm.state(EvalPoint(0))
    params = fm.params(flat)
    x = fm.prepare(X[:k])

    def plain(batch: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return functional_call(fm.model, (params, statics), (batch,))

    out = plain(x)
    tol = 1e-9 if fm.dtype == torch.float64 else 1e-4
    if not random_checked and not _close(out, plain(x), tol):
        raise ValueError(f"{fn}: the model draws random numbers in its forward pass (e.g. F.dropout with "
                         "training=True): two identical calls gave different outputs, so the kernel is undefined; "
                         "make the forward pass deterministic (model.eval())")
    singles = []
    for i in range(k):
        try:
            singles.append(plain(x[i:i + 1]))
        except Exception as e:  # noqa: BLE001 - fails alone but runs in a batch: batch dependence
            where = _failing_module(fm, params, statics, x[i:i + 1])
            raise ValueError(
                f"{fn}: the output of a sample depends on the rest of its batch: the model runs on a batch of {k} "
                f"samples of {name} but fails on one sample alone{where} ({type(e).__name__}: "
                f"{str(e).strip().splitlines()[0][:120]}). The per-sample kernel is undefined for such a model: "
                f"{_hint(where)}") from None
    worst = _first_difference(out, singles, tol)
    if worst is None:
        return
    i, diff, scale = worst
    order, inner = _module_outputs(fm, params, statics, x)
    alone = [_module_outputs(fm, params, statics, x[j:j + 1])[1] for j in range(k)]
    where = ""
    for n in order:  # hooks fire as modules finish: the first to differ is the innermost culprit
        if _first_difference(inner[n], [s.get(n) for s in alone], tol) is not None:
            where = f"; the first module whose output differs is {n!r} ({type(fm.model.get_submodule(n)).__name__})"
            break
    raise ValueError(f"{fn}: the output of a sample depends on the rest of its batch: evaluated alone and in a "
                     f"batch of {k} samples of {name}, sample {i}'s outputs differ by {diff:.3g} (their scale is "
                     f"{scale:.3g}){where}. The per-sample kernel is undefined for such a model: {_hint(where)}")


def _module_outputs(fm: Any, params: dict, statics: dict, batch: torch.Tensor) -> tuple[list[str], dict]:
    """(module names in the order they finished, {name: first tensor output}) of one forward pass."""
    order: list[str] = []
    seen: dict[str, torch.Tensor] = {}

    def hook_for(name):
        def hook(mod, args, output):
            if isinstance(output, torch.Tensor) and name not in seen:
                seen[name] = output.detach()
                order.append(name)
        return hook

    handles = [m.register_forward_hook(hook_for(n)) for n, m in fm.model.named_modules() if n]
    try:
        with torch.no_grad():
            functional_call(fm.model, (params, statics), (batch,))
    finally:
        for h in handles:
            h.remove()
    return order, seen


def _failing_module(fm: Any, params: dict, statics: dict, batch: torch.Tensor) -> str:
    """" in module 'name' (Type)" for the innermost module running when the forward pass on ``batch`` fails."""
    entered: list[str] = []
    handles = []
    for n, m in fm.model.named_modules():
        if n:
            handles.append(m.register_forward_pre_hook(lambda mod, args, n=n: entered.append(n)))
            handles.append(m.register_forward_hook(lambda mod, args, out, n=n: entered.pop()))
    try:
        with torch.no_grad():
            functional_call(fm.model, (params, statics), (batch,))
    except Exception:  # noqa: BLE001 - the failure is what is being located
        pass
    finally:
        for h in handles:
            h.remove()
    return f" in module {entered[-1]!r} ({type(fm.model.get_submodule(entered[-1])).__name__})" if entered else ""


def _hint(where: str) -> str:
    if "Norm" in where:
        return ("BatchNorm normalises with the batch's statistics here (train mode or track_running_stats=False): "
                "give it running statistics and call model.eval(), or use GroupNorm/LayerNorm")
    return "make the forward pass treat each sample alone (no statistics or centring over the batch)"


def _close(a: torch.Tensor, b: torch.Tensor, tol: float) -> bool:
    return a.shape == b.shape and float((a - b).abs().max()) <= tol * (float(a.abs().max()) + 1e-30)


def _batch_axis(batched: torch.Tensor, single: torch.Tensor, k: int) -> int | None:
    """The axis along which ``batched`` stacks ``k`` samples that ``single`` holds one of (None: no such axis)."""
    if batched.ndim != single.ndim:
        return None
    for a in range(batched.ndim):
        if batched.shape[a] == k and single.shape[a] == 1 and all(
                batched.shape[b] == single.shape[b] for b in range(batched.ndim) if b != a):
            return a
    return None


def _first_difference(batched: torch.Tensor, singles: list, tol: float) -> tuple[int, float, float] | None:
    """(sample, max |difference|, scale) of the first sample whose output alone differs from its row of the
    batched output beyond ``tol`` relative to the output's scale; None if all agree (or cannot be aligned)."""
    if any(s is None for s in singles):
        return None
    axis = _batch_axis(batched, singles[0], len(singles))
    if axis is None:
        return None
    scale = float(batched.abs().max()) + 1e-30
    for i, s in enumerate(singles):
        if s.shape != singles[0].shape:
            return None
        diff = float((batched.narrow(axis, i, 1) - s).abs().max())
        if diff > tol * scale:
            return i, diff, scale
    return None
