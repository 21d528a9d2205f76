"""engine.capture.hooks: the factors (A, Δ) of every layer with a rule, captured by forward hooks — from one batched
forward and C batched backward passes per chunk (the parameters no rule covers by probes where they meet the
samples, :mod:`~pkfast.engine.capture.entry`), else from one ``vmap(jacrev)`` pass per chunk that also gives the
Jacobian of the parameters no rule covers.

How: a forward hook on each routed module (or on the site its rule names) keeps what its rule captures of the
call (its input, or the normalised input of a norm layer) and adds a zero *probe* to its output; the gradient
of the model's output with respect to the probes is Δ, the output gradient at that layer, per sample and per
output. Before any of this is used, :meth:`Capture.discover` checks that rules which swap a module's forward
reproduce the model's output, learns each layer's calls, positions and fans from one sample, and
:meth:`Capture.verify` checks on a few samples that each rule rebuilds the layer's true parameter gradient (a
weight also used outside its module, e.g. tied through ``F.linear``, fails and takes the Jacobian route). The
first batched chunk is checked against the vmap pass on two samples, and the parameters without a rule with it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch.func import functional_call

from pkfast.engine.costs import RouteKind
from pkfast.engine.capture.dispatch import CallsChanged, check_call, check_calls, find_dispatch
from pkfast.engine.capture.backward import OutputGradients
from pkfast.engine.capture.entry import EntryProbes, param_jacobians
from pkfast.engine.functional import FunctionalModel
from pkfast.engine.per_sample import mha_fastpath_off
from pkfast.engine.quadrature import EvalPoint
from pkfast.layers.base import Layer, LayerRule, materialize

__all__ = ["Capture", "Groups"]


class _Call:
    """State of one traced forward pass: probes to add, and what was captured and seen, per layer call."""

    def __init__(self, probes: dict[str, torch.Tensor] | None, strict: bool = False) -> None:
        self.probes, self.strict = probes, strict  # strict: a per-sample pass, each probe the call's shape
        self.count: dict[str, int] = {}
        self.inputs: dict[str, torch.Tensor] = {}
        self.shapes: dict[str, tuple[torch.Size, torch.Size]] = {}
        self.out_shapes: dict[str, torch.Size] = {}
        self.unusable: dict[str, str] = {}


@dataclass(frozen=True)
class Groups:
    """The layers of one computation sorted by their chosen route (:class:`~pkfast.engine.costs.LayerChoice`):
    what the capture hooks, which layers' factors it hands back, which gradients it writes into the panel, and
    the parameters left to ``jacrev``. Made once per plan (:meth:`of`); a pass is told which groups it serves."""

    hooked: tuple[Layer, ...] = ()
    factorized: tuple[Layer, ...] = ()   # factors kept per sample: factorised Gram layers, Kronecker projections
    streamed: tuple[Layer, ...] = ()     # materialised from factors a slice at a time, outside the panel
    paneled: tuple[Layer, ...] = ()      # materialised into the panel beside the Jacobian part
    jac_names: tuple[str, ...] = ()      # parameters by jacrev (those of unused layers give zeros and are skipped)
    jac_width: int = 0
    panel_width: int = 0

    @property
    def with_factors(self) -> tuple[Layer, ...]:
        """The layers whose factors a pass returns."""
        return self.factorized + self.streamed

    @classmethod
    def of(cls, fm: FunctionalModel, choices) -> "Groups":
        """The groups of ``choices`` (one :class:`~pkfast.engine.costs.LayerChoice` per layer)."""
        hooked = tuple(c.layer for c in choices if c.route.hooked)
        factorized = tuple(c.layer for c in choices if c.route.pairs_from_factors)
        streamed = tuple(c.layer for c in choices if c.route is RouteKind.MATERIALIZED and c.stream)
        paneled = tuple(c.layer for c in choices if c.route is RouteKind.DENSE
                        or (c.route is RouteKind.MATERIALIZED and not c.stream))
        skip = {p for L in hooked for p in L.params} | {p for c in choices if c.route is RouteKind.UNUSED
                                                        for p in c.layer.params}
        jac_names = tuple(n for n in fm.names if n not in skip)
        sizes = dict(zip(fm.names, fm.sizes))
        jac_width = sum(sizes[n] for n in jac_names)
        return cls(hooked, factorized, streamed, paneled, jac_names, jac_width,
                   jac_width + sum(L.size for L in paneled))

    def describe(self, fm: FunctionalModel, batched: bool, refused: str = "") -> str:
        """How the factors are obtained, for the plan (``refused``: why the batched pass cannot probe the
        parameters without a rule, once a pass has found it)."""
        if not self.hooked:
            return ""
        C = "one backward pass" if fm.num_outputs == 1 else f"{fm.num_outputs} backward passes"
        names = ", ".join(self.jac_names[:3]) + (", …" if len(self.jac_names) > 3 else "")
        if batched and not self.jac_names:
            return f"factors from one batched forward and {C} per chunk (every trained parameter has a layer rule)"
        if batched:
            return (f"factors from one batched forward and {C} per chunk; parameters without a layer rule ({names}) "
                    "by probes where they meet the samples (checked against vmap(jacrev) on the first chunk)")
        if self.jac_names:
            why = f" ({refused})" if refused else ""
            return f"factors from vmap(jacrev) per sample: parameters without a layer route ({names}) need it{why}"
        return "factors from vmap(jacrev) per sample: a hooked call's batch axis is not the first"


class Capture:
    """Hooks on the layers with a rule: :meth:`discover` learns their facts (once), :meth:`evaluate` forms a
    panel (Jacobian part and in-panel materialised layers) and the factors of a :class:`Groups` at a trajectory
    point. What it learns while running (whether batched passes work for this model) only selects between two
    passes that give the same numbers."""

    def __init__(self, fm: FunctionalModel, layers: list[Layer]) -> None:
        self.fm = fm
        self.layers: tuple[Layer, ...] = tuple(layers)
        self._call: _Call | None = None
        self._shapes: dict[str, tuple[torch.Size, torch.Size]] = {}
        self._patches: list[tuple[LayerRule, torch.nn.Module]] = []  # forward patches that passed the check
        #: take factors from batched passes when every parameter has a route (else, or when a call is not
        #: batch-first, the vmap pass)
        self.batched = True
        self._batched_checked = False
        self._output_gradients = OutputGradients()
        #: why the parameters without a rule could not be probed in the batched pass ("" if they could)
        self.refused = ""

    def describe(self, groups: Groups) -> str:
        """How the factors of ``groups`` are obtained, for the plan."""
        return groups.describe(self.fm, self.batched, self.refused)

    def _replace(self, name: str, layer: Layer) -> None:
        self.layers = tuple(layer if L.name == name else L for L in self.layers)

    def layer(self, name: str) -> Layer:
        return next(L for L in self.layers if L.name == name)

    # ------------------------------------------------------------------ hooks
    def _hook(self, layer: Layer):
        def hook(mod, args, output):
            call = self._call
            if call is None:
                return None
            if call.probes is None and (not args or not isinstance(args[0], torch.Tensor)
                                        or not isinstance(output, torch.Tensor)):
                call.unusable[layer.name] = "called without a positional tensor input (cannot capture it)"
                return None
            k = call.count.get(layer.name, 0)
            call.count[layer.name] = k + 1
            key = f"{layer.name}#{k}"
            call.inputs[key] = layer.rule.capture(mod, args, output)
            call.out_shapes[key] = output.shape
            if call.probes is None:
                call.shapes[key] = (args[0].shape, output.shape)
                return None
            check_call(layer.name, key, call.probes, output, call.strict)
            return output + call.probes[key]
        return hook

    def _run(self, layers: list[Layer], call: _Call, fn):
        handles = [L.rule.site(L.module).register_forward_hook(self._hook(L)) for L in layers]
        self._call = call
        try:
            with self._patched():
                return fn()
        finally:
            self._call = None
            for h in handles:
                h.remove()

    @contextlib.contextmanager
    def _patched(self):
        """The rules' forward patches (:meth:`~pkfast.layers.base.LayerRule.patch`) that passed
        :meth:`_check_patches`, with PyTorch's fused fast path of attention and transformer layers off: it
        would bypass the modules' forwards, hence their hooks."""
        with contextlib.ExitStack() as stack:
            stack.enter_context(mha_fastpath_off())
            for rule, module in self._patches:
                stack.enter_context(rule.patch(module))
            yield

    def _check_patches(self, X: torch.Tensor, candidates: list[Layer]) -> None:
        """Keep the forward patches of the candidates' rules only if the patched model gives the original output
        on a few samples (else those layers take the Jacobian route, with the reason)."""
        patching = [L for L in candidates if type(L.rule).patch is not LayerRule.patch]
        self._patches = []
        if not patching:
            return
        fm = self.fm
        flat, statics = fm.state(EvalPoint(0))
        x = fm.prepare(X[: min(2, X.shape[0])])
        run = lambda: functional_call(fm.model, (fm.params(flat), statics), (x,))  # noqa: E731
        with torch.no_grad():
            ref = run()
            self._patches = [(L.rule, L.module) for L in patching]
            try:
                with self._patched():
                    got = run()
                why = "" if got.shape == ref.shape else f"output shape {tuple(got.shape)}, not {tuple(ref.shape)}"
                if not why:
                    tol = _tolerance(fm.dtype)
                    err = float((got - ref).abs().max()) if ref.numel() else 0.0
                    if err > tol * (float(ref.abs().max()) + 1e-30):
                        why = f"output differs by {err:.2e}"
            except Exception as e:  # the replacement forward does not cover this call (a mask it lacks, …)
                why = f"{type(e).__name__}: {str(e).splitlines()[0][:80] if str(e) else ''}"
        if why:
            self._patches = []
            for L in patching:
                self._drop(L, f"its rule's replacement forward does not reproduce the model ({why})")

    def discover(self, X: torch.Tensor) -> tuple[Layer, ...]:
        """One forward pass on one sample: calls, positions S, fan-in I and fan-out O of each layer with a rule,
        then the checks; returns (and keeps) the discovered layers, those that failed a check without their rule."""
        self._check_patches(X, [L for L in self.layers if L.kind != "other"])
        for name, why in find_dispatch(self.fm, [L for L in self.layers if L.kind != "other"], X,
                                       self._patched).items():
            self._drop(self.layer(name), why)
        candidates = [L for L in self.layers if L.kind != "other"]
        fm = self.fm
        flat, statics = fm.state(EvalPoint(0))
        call = _Call(None)
        with torch.no_grad():
            self._run(candidates, call, lambda: functional_call(fm.model, (fm.params(flat), statics), (fm.prepare(X[:1]),)))
        for L in candidates:
            if L.name in call.unusable:  # the Jacobian route takes it
                self._drop(L, call.unusable[L.name])
                continue
            keys = [k for k in call.shapes if k.rsplit("#", 1)[0] == L.name]
            try:
                positions = sum(L.rule.positions(L.module, *call.shapes[k]) for k in keys)
                fans = L.rule.fans(L.module) if keys else (L.fan_in, L.fan_out)
                self._replace(L.name, replace(L, calls=len(keys), positions=positions, fan_in=fans[0], fan_out=fans[1]))
            except (RuntimeError, ValueError, TypeError, AttributeError, IndexError) as e:
                self._drop(L, f"its rule does not fit the module ({type(e).__name__}: {str(e).splitlines()[0][:80]})")
        self._shapes = dict(call.shapes)
        self.verify(X, [L for L in self.layers if L.kind != "other"])
        return self.layers

    def _drop(self, L: Layer, reason: str) -> None:
        self._replace(L.name, L.without_rule(reason))

    def verify(self, X: torch.Tensor, candidates: list[Layer]) -> None:
        """Check on a few samples that each candidate's parameter gradient is exactly what its rule rebuilds
        from its calls. A parameter also used outside the module's forward fails the check and its layer takes
        the Jacobian route; a layer whose parameters the forward pass never reaches is ``unused``."""
        if not candidates:
            return
        fm = self.fm
        flat, statics = fm.state(EvalPoint(0))
        names = {p for L in candidates for p in L.params}
        params = {n: (t.detach().clone().requires_grad_(True) if n in names else t) for n, t in fm.params(flat).items()}
        x = fm.prepare(X[: min(3, X.shape[0])])
        made: dict[str, torch.Tensor] = {}
        inputs: dict[str, torch.Tensor] = {}
        count: dict[str, int] = {}

        def hook_for(L):
            def hook(mod, args, output):
                k = count.get(L.name, 0)
                count[L.name] = k + 1
                key = f"{L.name}#{k}"
                inputs[key] = L.rule.capture(mod, args, output).detach()
                made[key] = torch.zeros_like(output, requires_grad=True)
                return output + made[key]
            return hook

        handles = [L.rule.site(L.module).register_forward_hook(hook_for(L)) for L in candidates]
        try:
            with torch.enable_grad(), self._patched():
                out = functional_call(fm.model, (params, statics), (x,))
                f = out.reshape(x.shape[0], -1)
                g = torch.Generator(device="cpu").manual_seed(12345)
                v = torch.randn(f.shape, generator=g, dtype=torch.float64).to(f.device, f.dtype)
                keys = list(made)
                pn = sorted(names)
                grads = torch.autograd.grad((f * v).sum(), [params[n] for n in pn] + [made[k] for k in keys],
                                            allow_unused=True)
        except RuntimeError as e:  # e.g. an in-place change of a layer's input: no factorisation is safe then
            for L in candidates:
                self._drop(L, f"the gradient check failed ({type(e).__name__}: {str(e).splitlines()[0][:80]})")
            return
        finally:
            for h in handles:
                h.remove()
        true = dict(zip(pn, grads[: len(pn)]))
        jz = {k: (torch.zeros_like(made[k]) if gk is None else gk)[None, None] for k, gk in zip(keys, grads[len(pn):])}
        aux = {k: t[None] for k, t in inputs.items()}
        for L in candidates:
            reached = any(true[p] is not None for p in L.params)
            if L.calls == 0:
                if reached:
                    self._drop(L, "its parameters are used without calling the module (e.g. through F.linear)")
                continue
            try:
                rebuilt = self.gradient(L, jz, aux, 1, C=1).reshape(-1)
                own = {p.rsplit(".", 1)[-1]: true[p] for p in L.params}
                expect = L.rule.gradient_layout(L, dict(zip(("weight", "bias"), map(own.get, L.rule.param_names))))
                if rebuilt.shape != expect.shape:
                    raise ValueError(f"{rebuilt.numel()} gradient values rebuilt, {expect.numel()} parameters")
            except (RuntimeError, ValueError, TypeError, AttributeError, IndexError) as e:
                self._drop(L, f"its rule does not fit the module ({type(e).__name__}: {str(e).splitlines()[0][:80]})")
                continue
            scale = float(expect.abs().max()) + float(rebuilt.abs().max()) + 1e-30
            tol = _tolerance(fm.dtype)
            if float((rebuilt - expect).abs().max()) > tol * scale:
                self._drop(L, "its gradient is not what its rule rebuilds from its calls: a parameter also used outside "
                           "its forward (e.g. tied through F.linear), or a rule that does not fit the module")

    # ------------------------------------------------------------------ one pass: Jacobian part and factors
    def evaluate(self, groups: Groups, point: EvalPoint, X: torch.Tensor, Y: torch.Tensor | None, chunk: int,
                 panel: torch.Tensor | None, weight: float = 1.0, add: bool = False,
                 tick: Callable[[int], None] | None = None) -> dict[str, list]:
        """Fill ``panel`` (overwrite, or add when ``add``) with ``weight ×`` the panel of ``groups`` at ``point`` —
        the Jacobian of the parameters without a route, then the in-panel materialised layers' gradients — and
        return the factors ``{layer name: [(A_g, Δ_g) per group]}`` of its factorised and streamed layers
        (unweighted)."""
        fm, G = self.fm, groups
        flat, statics = fm.state(point)
        params = fm.params(flat)
        pj = {n: params[n] for n in G.jac_names}
        pk = {n: v for n, v in params.items() if n not in pj}
        hooked = {L.name for L in G.hooked}
        keys = [k for k in self._shapes if k.rsplit("#", 1)[0] in hooked]
        probes = {k: torch.zeros(self._shapes[k][1], dtype=fm.dtype, device=fm.device) for k in keys}
        per_sample = self._per_sample(G.hooked, pk, statics)
        argnums = (0, 1) if pj else 1
        in_dims = (None, None, 0) + ((0,) if Y is not None else ())
        n = X.shape[0]
        feats: dict[str, list] = {}
        Yd = None if Y is None else Y.to(fm.device)
        for a in range(0, n, chunk):
            b = min(n, a + chunk)
            x, y = fm.prepare(X[a:b]), None if Yd is None else Yd[a:b]
            got = self._batched(G.hooked, keys, pk, statics, x, y, pj) if self.batched else None
            if got is None:
                jac, aux = fm.passes.jacobian(per_sample, argnums, in_dims, pj, probes, x, *(() if y is None else (y,)),
                                              has_aux=True)
            else:
                jac, aux = got
            jp, jz = (jac if pj else ({}, jac))
            if panel is not None:
                dst = panel[a:b]
                off = 0
                if pj:
                    # reshape, not flatten(2): a scalar parameter's Jacobian is [n, C]
                    blk = torch.cat([jp[nm].reshape(b - a, dst.shape[1], -1) for nm in G.jac_names], dim=2)
                    _put(dst[:, :, : G.jac_width], blk, weight, add)
                    off = G.jac_width
                for L in G.paneled:
                    grad = self.gradient(L, jz, aux, b - a)
                    _put(dst[:, :, off: off + L.size], grad, weight, add)
                    off += L.size
            for L in G.with_factors:
                _gather(feats, L.name, self.factors(L, jz, aux, b - a), a, b, n)
            if tick is not None:
                tick(b - a)
        return feats

    def _per_sample(self, hooked: tuple[Layer, ...], fixed: dict, statics: dict) -> Callable:
        """``f(jacobian params, probes, x, *y)`` of one sample (with the ``fixed`` parameters): the model's outputs
        (or its loss) with the probes added at the hooked calls, and the calls' captures as auxiliary output."""
        fm, loss = self.fm, self.fm.loss

        def per_sample(pj_, zs, x, *y):
            call = _Call(zs, strict=True)
            out = self._run(hooked, call,
                            lambda: functional_call(fm.model, ({**pj_, **fixed}, statics), (x.unsqueeze(0),)))
            check_calls(zs, call.inputs)
            f = out.reshape(-1)
            if loss is not None:
                f = loss.per_sample(f, y[0], fm.output_shape).reshape(1)
            return f, call.inputs
        return per_sample

    def _batched(self, hooked: tuple[Layer, ...], keys: list[str], params: dict, statics: dict, x: torch.Tensor,
                 y: torch.Tensor | None, pj: dict):
        """The output gradients and captures of every hooked call from one batched forward and C batched backward
        passes (samples are independent: :func:`pkfast.engine.per_sample.check_independent`), with the Jacobian
        of the parameters ``pj`` that no rule covers from probes where they meet the samples
        (:class:`~pkfast.engine.capture.entry.EntryProbes`), in the layout the vmap pass gives — or None when a call is
        neither batch-first nor shared by all samples, or a parameter's entry cannot be probed, to use vmap.

        A *shared* call (a positional embedding of ``arange(L)``: the same input for every sample) gets a probe
        with a batch axis, so that each sample's output gradient is its own. The first use is checked against
        the vmap pass on two samples (a model that mixes a shared call's output across the batch axis fails it
        and keeps the vmap pass). ``keys``: the hooked calls."""
        fm, n, single = self.fm, x.shape[0], self._shapes
        shared = {k for k in keys if not (single[k][0][:1] == (1,) and single[k][1][:1] == (1,))}
        probes = {k: torch.zeros((n, *(single[k][1] if k in shared else single[k][1][1:])), dtype=fm.dtype,
                                 device=fm.device, requires_grad=True) for k in keys}

        def expect(k: str) -> tuple[tuple, tuple]:
            i, o = tuple(single[k][0]), tuple(single[k][1])
            return (i, o) if k in shared else ((n, *i[1:]), (n, *o[1:]))

        call = _Call(probes)
        with torch.enable_grad():
            leaves = {k: v.detach().requires_grad_(True) for k, v in pj.items()}
            entry = EntryProbes(leaves, x, n, check=not self._batched_checked, tol=_tolerance(fm.dtype))
            try:
                with entry if pj else contextlib.nullcontext():
                    out = self._run(hooked, call, lambda: functional_call(fm.model, ({**params, **leaves}, statics),
                                                                          (x,)))
            except (RuntimeError, CallsChanged):  # a probe of the wrong shape: a call's batch axis is not the first
                self.batched = False
                return None
            if set(call.inputs) != set(keys) or any(
                    (tuple(call.inputs[k].shape), tuple(call.out_shapes[k])) != expect(k) for k in keys) or (
                    out.shape[:1] != (n,)) or (pj and (entry.refused or not entry.probes)):
                self.batched = False  # a call whose batch axis is not the first: the vmap pass is right for it
                self.refused = entry.refused or ("" if not pj or entry.probes else "no parameter met the samples")
                return None
            f = out.reshape(n, -1)
            if fm.loss is not None:
                shape = fm.output_shape
                f = torch.func.vmap(lambda fi, yi: fm.loss.per_sample(fi, yi, shape))(f, y).reshape(n, 1)
            grads = self._output_gradients(f, [probes[k] for k in keys] + entry.probes)
            jp = param_jacobians(leaves, entry.anchors, grads[len(keys):]) if pj else {}
        # the vmap layout: per sample, a batch of one — [n, C, 1, *out] for Δ, [n, 1, *in] for the captures (a
        # shared call: [n, C, *out] and its input repeated, [n, *in])
        jz = {k: g if k in shared else g.unsqueeze(2) for k, g in zip(keys, grads)}
        aux = {k: (v.detach().expand(n, *v.shape) if k in shared else v.detach().unsqueeze(1))
               for k, v in call.inputs.items()}
        if not self._batched_checked:
            self._batched_checked = True
            if not self._agrees_with_vmap(hooked, keys, params, statics, x, y, jz, aux, pj, jp):
                self.batched = False
                return None
        return ((jp, jz) if pj else jz), aux

    def _agrees_with_vmap(self, hooked, keys, params, statics, x, y, jz, aux, pj, jp) -> bool:
        """Whether the batched pass's output gradients, captures and Jacobian of ``pj`` for the first two samples
        are the vmap pass's."""
        fm, m = self.fm, min(2, x.shape[0])
        probes = {k: torch.zeros(self._shapes[k][1], dtype=fm.dtype, device=fm.device) for k in keys}
        extra = () if y is None else (y[:m],)
        jac, aux_v = fm.passes.jacobian(self._per_sample(hooked, params, statics), (0, 1) if pj else 1,
                                        (None, None, 0) + ((0,) if y is not None else ()), pj, probes, x[:m],
                                        *extra, has_aux=True)
        jp_v, jz_v = jac if pj else ({}, jac)
        tol = _tolerance(fm.dtype)
        pairs = [(jz[k][:m], jz_v[k]) for k in keys] + [(aux[k][:m], aux_v[k]) for k in keys]
        pairs += [(jp[k][:m].reshape(m, -1), jp_v[k].reshape(m, -1)) for k in pj]  # (a scalar's vmap Jacobian: [m, C])
        for got, want in pairs:
            if got.shape != want.shape:
                return False
            scale = float(want.abs().max()) + 1e-30 if want.is_floating_point() else 1.0
            # a sample at a time: a C-wide difference would double the check's memory
            if max(float((g - w).abs().max()) for g, w in zip(got, want)) > tol * scale:
                return False
        return True

    def gradient(self, L: Layer, jz: dict, aux: dict, n: int, C: int | None = None) -> torch.Tensor:
        """Layer L's per-sample gradient ``[n, C, size]``: by its rule's own way if it has one, else from its factors."""
        C = self.fm.num_outputs if C is None else C
        keys = [f"{L.name}#{k}" for k in range(L.calls)]
        got = L.rule.per_sample_gradient(L, [aux[k] for k in keys], [jz[k] for k in keys], n, C, self.fm.dtype)
        return materialize(L, self.factors(L, jz, aux, n, C=C), n) if got is None else got

    def factors(self, L: Layer, jz: dict, aux: dict, n: int, C: int | None = None) -> list[tuple[torch.Tensor, Any]]:
        """[(A_g, Δ_g [n, C, S, O_g]) per group] of layer L from one pass's output gradients and captures."""
        C = self.fm.num_outputs if C is None else C
        As, Ds = [], []
        for k in range(L.calls):
            key = f"{L.name}#{k}"
            A, D = L.rule.unfold(L, aux[key], jz[key], n, C, self.fm.dtype)
            As.append(A)
            Ds.append(D)
        A = torch.cat(As, dim=1) if len(As) > 1 else As[0]
        D = torch.cat(Ds, dim=2) if len(Ds) > 1 else Ds[0]
        return L.rule.split(L, A, D)


def _tolerance(dtype: torch.dtype) -> float:
    """Relative agreement asked of two computations of the same quantity (rule vs autograd, patched vs original
    forward, batched vs vmap pass)."""
    return 1e-9 if dtype == torch.float64 else 1e-4


def _put(dst: torch.Tensor, src: torch.Tensor, weight: float, add: bool) -> None:
    if add:
        dst.add_(src, alpha=weight)
    elif weight != 1.0:
        torch.mul(src, weight, out=dst)
    else:
        dst.copy_(src)


def _gather(feats: dict[str, list], name: str, parts: list[tuple[torch.Tensor, torch.Tensor]], a: int, b: int,
            n: int) -> None:
    """Write one chunk's factors (rows a:b of n) into buffers allocated at their final size on the first chunk
    (kept per chunk and concatenated, every factor was held twice); contiguous, as the products expect."""
    if a == 0 and b == n:
        feats[name] = [tuple(t.contiguous() for t in pair) for pair in parts]
        return
    if a == 0:
        feats[name] = [tuple(t.new_empty((n, *t.shape[1:])) for t in pair) for pair in parts]
    for dst, pair in zip(feats[name], parts):
        for d, t in zip(dst, pair):
            d[a:b].copy_(t)
