"""factorized: layer-wise kernels from each layer's inputs and back-propagated output gradients, so that the
P-dimensional Jacobian of the layers that dominate real models is never formed.

For a layer ``y_s = W a_s + b`` applied at positions ``s = 1..S`` (an ``nn.Linear`` over extra leading
dimensions, a convolution over its unfolded patches, an ``nn.Embedding`` lookup), with ``δ_s^{(c)} = ∂f_c/∂y_s``,
the layer's share of the tangent kernel is (path-kernel-math.md §5(c))

    K_l(x, x′)_{cc′} = Σ_{s,t} (a_s·a′_t + 1) (δ_s^{(c)}·δ′_t^{(c′)}) = ⟨A A′ᵀ + 11ᵀ, Δ^{(c)} Δ′^{(c′)ᵀ}⟩

(``+1`` only with a trainable bias; groups split the layer block-diagonally; for an embedding a·a′ = 1[same
token]). Each supported layer takes one of three routes, chosen from the cost model of §6(ii):

- ``"factorized"``: the pairwise form above — GEMMs of the S×S position blocks (``A Aᵀ`` and the Δ-Gram) and
  an elementwise product; per pair ``S²(I + C·O)`` multiply-adds for the trace, ``S²(I + C²·O)`` for the block;
- ``"materialized"``: the layer's per-sample gradient ``G = Δᵀ A`` (``C × O × I`` per sample) formed from the
  same factors — no per-parameter backward pass — and multiplied like any Jacobian panel. When the factors
  are smaller than the gradient (``S·(I + C·O) ≤ C·O·I``, every dense layer) it is *streamed*: only the
  factors are kept for a tile, and the gradient is formed and multiplied a slice of output units at a time
  in a small reused workspace (:data:`STREAM_BYTES`), so the tile's Jacobian panel is never held whole
  (no page faults on a fresh multi-GB buffer, no recomputation when N·C·P exceeds the memory budget);
- ``"jacobian"``: parameters of other modules (norm affines, custom parameters, tied weights, unsupported
  layer options) go through ``torch.func.jacrev`` and are added; ``"unused"`` layers (never called) add 0.

:class:`Engine` computes, in one ``vmap(jacrev)`` pass per chunk of samples, the Jacobian of the
``"jacobian"`` parameters and the output gradients Δ at every supported layer (through zero "probes" added
to the layers' outputs by forward hooks), with the layers' inputs A returned alongside.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, jacrev, vmap

from pkfast.accumulate import accumulate
from pkfast.jacobians import EvalPoint, FunctionalModel

__all__ = ["METHODS", "Layer", "Engine", "find_layers", "choose"]

#: ``method=`` values of :func:`pkfast.gram`.
METHODS = ("auto", "jacobian", "factorized", "materialized", "sketch")

#: Bytes of S×S temporaries one factorised product may hold at a time (row/column sub-blocks are cut to fit).
WORKSPACE_BYTES = 64 * 2**20

#: Bytes of the reused workspace in which streamed layers' per-sample gradients are formed, a slice of output
#: units at a time (rows' and columns' slices together). The Gram product's speed does not depend on the slice
#: width down to a few thousand columns (csrc/README.md), and a small workspace stays warm in memory.
STREAM_BYTES = 32 * 2**20


@dataclass
class Layer:
    """One parameterised module and how its share of the kernel is computed."""

    name: str                      # module path ("" for the root module)
    kind: str                      # "linear" | "conv" | "embedding" | "other"
    type: str                      # the module's class name
    params: tuple[str, ...]        # its trainable parameters (FunctionalModel names)
    size: int                      # number of trainable parameters
    module: nn.Module | None = None
    bias: bool = False             # a trainable bias (the +1 column of A)
    groups: int = 1
    calls: int = 0
    positions: int = 0             # S, summed over calls
    fan_in: int = 0                # I per group (without the bias column); vocabulary size for an embedding
    fan_out: int = 0               # O per group
    method: str = "jacobian"
    stream: bool = False           # "materialized" and streamed in slices (its factors are the smaller)
    reason: str = ""
    flops: float = 0.0             # estimated multiply-add FLOPs of its share of the Gram (all terms)
    bytes_per_sample: int = 0      # working memory per sample of its share
    options: dict[str, float] = field(default_factory=dict)  # FLOPs of each feasible route (for the plan)

    @property
    def factor_in(self) -> int:
        """Columns of A per group (the bias adds one)."""
        return self.fan_in + (1 if self.bias else 0)


_KINDS = {nn.Linear: "linear", nn.Conv1d: "conv", nn.Conv2d: "conv", nn.Embedding: "embedding"}


def _kind_of(m: nn.Module) -> tuple[str | None, str]:
    """(kind, reason it is not supported) of a module by its own forward."""
    for cls, kind in _KINDS.items():
        if isinstance(m, cls):
            if type(m).forward is not cls.forward:
                return None, f"{type(m).__name__} overrides {cls.__name__}.forward"
            if kind == "embedding" and (m.max_norm is not None or m.scale_grad_by_freq):
                return None, "max_norm / scale_grad_by_freq change the lookup's gradient"
            return kind, ""
    return None, ""


def find_layers(model: nn.Module, fm: FunctionalModel) -> list[Layer]:
    """Every module owning trainable parameters, as a :class:`Layer`: supported kinds (Linear, Conv1d/2d,
    Embedding with their own forward, untied, unparametrized) are candidates for the factorised routes; the
    rest are ``kind="other"`` with the reason, for the Jacobian route. Parameters belong to their owning module."""
    trainable = set(fm.names)
    owners: dict[int, set[int]] = {}
    for _, mod in model.named_modules(remove_duplicate=False):
        for p in mod._parameters.values():
            if p is not None:
                owners.setdefault(id(p), set()).add(id(mod))
    name_of = {}
    for n, p in model.named_parameters():
        name_of[id(p)] = n
    layers = []
    for mname, mod in model.named_modules():
        own = [(pn, p) for pn, p in mod._parameters.items() if p is not None and name_of.get(id(p)) in trainable]
        if not own:
            continue
        names = tuple(name_of[id(p)] for _, p in own)
        size = sum(p.numel() for _, p in own)
        kind, reason = _kind_of(mod)
        if kind is not None:
            if any(len(owners[id(p)]) > 1 for _, p in own):
                kind, reason = None, "a parameter shared with another module (tied weights)"
            elif torch.nn.utils.parametrize.is_parametrized(mod):
                kind, reason = None, "parametrized weight"
            elif "weight" not in dict(own):
                kind, reason = None, "frozen weight (only the bias trains)"
            elif set(pn for pn, _ in own) - {"weight", "bias"}:
                kind, reason = None, "extra parameters"
        layer = Layer(mname, kind or "other", type(mod).__name__, names, size, module=mod if kind else None,
                      reason=reason)
        if kind is not None:
            layer.bias = "bias" in dict(own)
            layer.groups = int(getattr(mod, "groups", 1))
        layers.append(layer)
    return layers


# ---------------------------------------------------------------------------------------------- cost model
def _route_costs(layer: Layer, C: int, full: bool) -> tuple[float, float, float]:
    """(factorised FLOPs per pair, materialised FLOPs per pair, materialised FLOPs per sample) for one kernel
    term, summed over groups. Both routes share the pass that yields A and Δ, so it is not counted."""
    S, g, Ip, O = layer.positions, layer.groups, layer.factor_in, layer.fan_out
    if layer.kind == "embedding":
        aa = S * S  # token comparisons
        mat_sample = 2.0 * C * S * O  # scatter-add of Δ into the touched rows
        width = layer.fan_in * O
    else:
        aa = 2.0 * S * S * Ip * g
        mat_sample = 2.0 * C * S * O * Ip * g
        width = O * Ip * g
    cc = C * C if full else C
    fact_pair = aa + 2.0 * S * S * cc * O * g + S * S * cc * g
    mat_pair = 2.0 * cc * width
    return fact_pair, mat_pair, mat_sample


def choose(layers: list[Layer], *, method: str, C: int, full: bool, pairs: float, samples: float, terms: int,
           itemsize: int) -> None:
    """Set each layer's route and cost estimate: ``method="auto"`` takes the cheaper route per supported layer
    (ties go to ``"factorized"``), ``"factorized"`` factorises every supported layer, ``"materialized"``
    materialises every supported layer's per-sample gradient from its factors, ``"jacobian"`` none.

    ``pairs``/``samples``: kernel entries and Jacobian rows (rows + columns, summed over tiles) per term."""
    for L in layers:
        if L.kind == "other" or L.calls == 0 or method == "jacobian":
            if method == "jacobian":
                L.method = "jacobian"
                if L.kind != "other":
                    L.reason = "method='jacobian'"
            elif L.kind != "other":
                L.method, L.reason = "unused", "never called in the forward pass"
            else:
                L.method = "jacobian"
            L.flops = terms * (2.0 * (C * C if full else C) * L.size * pairs + 6.0 * C * L.size * samples)
            L.bytes_per_sample = C * L.size * itemsize
            L.options = {"jacobian": L.flops}
            continue
        fp, mp, ms = _route_costs(L, C, full)
        fact = terms * fp * pairs
        mat = terms * (mp * pairs + ms * samples)
        L.options = {"factorized": fact, "materialized": mat}
        a_cols = 1 if L.kind == "embedding" else L.factor_in * L.groups
        factor_bytes = L.positions * (a_cols + C * L.fan_out * L.groups) * itemsize
        L.stream = False
        if method == "factorized" or (method == "auto" and fact <= mat):
            L.method, L.flops = "factorized", fact
            L.bytes_per_sample = factor_bytes
        else:
            L.method, L.flops = "materialized", mat
            L.stream = factor_bytes <= C * L.size * itemsize
            L.bytes_per_sample = factor_bytes if L.stream else C * L.size * itemsize


# ---------------------------------------------------------------------------------------------- engine
class _Capture:
    """State of one traced forward pass: probes to add, and the inputs/output shapes seen, per layer call."""

    def __init__(self, probes: dict[str, torch.Tensor] | None) -> None:
        self.probes = probes
        self.count: dict[str, int] = {}
        self.inputs: dict[str, torch.Tensor] = {}
        self.shapes: dict[str, tuple[torch.Size, torch.Size]] = {}
        self.unusable: dict[str, str] = {}


class Engine:
    """Jacobian panels and factorised products of a model whose supported layers are routed per :class:`Layer`.

    :meth:`evaluate` fills a ``[n, C, P_panel]`` panel — the ``"jacobian"`` parameters' Jacobian followed by
    the per-sample gradients of the ``"materialized"`` layers that are not streamed — and returns the factors
    (A, Δ) of the ``"factorized"`` layers, which :meth:`accumulate` multiplies pairwise into a tile
    accumulator, and of the streamed layers, whose gradients :meth:`accumulate_streamed` forms slice by slice.
    """

    def __init__(self, fm: FunctionalModel, layers: list[Layer], *, backend: str = "torch", precision: str = "ieee",
                 workspace_bytes: int | None = None) -> None:
        self.fm = fm
        self.layers = layers
        self.backend = backend
        self.precision = precision
        self.workspace_bytes = WORKSPACE_BYTES if workspace_bytes is None else workspace_bytes
        self.stream_bytes: int | None = None  # the planner's share of the budget (None: STREAM_BYTES)
        self._capture: _Capture | None = None
        self._shapes: dict[str, tuple[torch.Size, torch.Size]] = {}
        self.route()

    def route(self) -> None:
        """Group the layers by their (chosen) method; call again after :func:`choose`."""
        layers, fm = self.layers, self.fm
        self.hooked = [L for L in layers if L.method in ("factorized", "materialized")]
        self.factorized = [L for L in layers if L.method == "factorized"]
        self.materialized = [L for L in layers if L.method == "materialized"]
        self.streamed = [L for L in self.materialized if L.stream]
        self.paneled = [L for L in self.materialized if not L.stream]
        self.with_factors = self.factorized + self.streamed
        routed = {p for L in self.hooked for p in L.params}
        self.jac_names = [n for n in fm.names if n not in routed]  # parameters of unused layers give zeros
        unused = {p for L in layers if L.method == "unused" for p in L.params}
        self.jac_names = [n for n in self.jac_names if n not in unused]
        sizes = dict(zip(fm.names, fm.sizes))
        self.jac_width = sum(sizes[n] for n in self.jac_names)
        self.panel_width = self.jac_width + sum(L.size for L in self.paneled)

    # ------------------------------------------------------------------ hooks
    def _hook(self, layer: Layer):
        def hook(mod, args, output):
            cap = self._capture
            if cap is None:
                return None
            if cap.probes is None and (not args or not isinstance(args[0], torch.Tensor)
                                       or not isinstance(output, torch.Tensor)):
                cap.unusable[layer.name] = "called without a positional tensor input (cannot capture it)"
                return None
            k = cap.count.get(layer.name, 0)
            cap.count[layer.name] = k + 1
            key = f"{layer.name}#{k}"
            cap.inputs[key] = args[0]
            if cap.probes is None:
                cap.shapes[key] = (args[0].shape, output.shape)
                return None
            return output + cap.probes[key]
        return hook

    def _run(self, layers: list[Layer], capture: _Capture, fn):
        handles = [L.module.register_forward_hook(self._hook(L)) for L in layers]
        self._capture = capture
        try:
            return fn()
        finally:
            self._capture = None
            for h in handles:
                h.remove()

    def discover(self, X: torch.Tensor) -> None:
        """One forward pass on one sample: calls, positions S, fan-in I and fan-out O of each supported layer."""
        candidates = [L for L in self.layers if L.kind != "other"]
        fm = self.fm
        flat, statics = fm.state(EvalPoint(0))
        cap = _Capture(None)
        with torch.no_grad():
            self._run(candidates, cap, lambda: functional_call(fm.model, (fm.params(flat), statics), (fm.prepare(X[:1]),)))
        for L in candidates:
            if L.name in cap.unusable:  # the Jacobian route takes it
                L.kind, L.module, L.reason = "other", None, cap.unusable[L.name]
                continue
            keys = [k for k in cap.shapes if k.rsplit("#", 1)[0] == L.name]
            L.calls = len(keys)
            L.positions = 0
            for k in keys:
                shp_in, shp_out = cap.shapes[k]
                L.positions += _positions(L, shp_in, shp_out)
            if L.calls:
                L.fan_in, L.fan_out = _fans(L)
        self._shapes = {k: v for k, v in cap.shapes.items()}
        self._verify(X, [L for L in candidates if L.kind != "other"])

    def _verify(self, X: torch.Tensor, candidates: list[Layer]) -> None:
        """Check on a few samples that each candidate's parameter gradient is exactly what its calls explain
        (Σ over calls and positions of δ aᵀ). A parameter also used outside the module's forward (e.g. a weight
        tied in through ``F.linear``) fails the check and its layer takes the Jacobian route; a layer whose
        parameters the forward pass never reaches is ``unused``."""
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
                inputs[key] = args[0].detach()
                made[key] = torch.zeros_like(output, requires_grad=True)
                return output + made[key]
            return hook

        handles = [L.module.register_forward_hook(hook_for(L)) for L in candidates]
        try:
            with torch.enable_grad():
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
                L.kind, L.module, L.calls = "other", None, 0
                L.reason = f"the gradient check failed ({type(e).__name__}: {str(e).splitlines()[0][:80]})"
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
                    L.kind, L.module, L.calls = "other", None, 0
                    L.reason = "its parameters are used without calling the module"
                continue
            rebuilt = _materialize(L, self._factors(L, jz, aux, 1, C=1), 1).reshape(-1)
            expect = _gradient_layout(L, {p.rsplit(".", 1)[-1]: true[p] for p in L.params})
            scale = float(expect.abs().max()) + float(rebuilt.abs().max()) + 1e-30
            tol = 1e-9 if fm.dtype == torch.float64 else 1e-4
            if float((rebuilt - expect).abs().max()) > tol * scale:
                L.kind, L.module, L.calls = "other", None, 0
                L.reason = "its parameters are also used outside its forward (e.g. tied through F.linear)"

    # ------------------------------------------------------------------ one pass: Jacobian part and factors
    def evaluate(self, point: EvalPoint, X: torch.Tensor, Y: torch.Tensor | None, chunk: int,
                 panel: torch.Tensor | None, weight: float = 1.0, add: bool = False) -> dict[str, list]:
        """Fill ``panel[:, :, :]`` (overwrite, or add when ``add``) with ``weight ×`` the panel at ``point`` and
        return the factors ``{layer name: [(A_g, Δ_g) per group]}`` of the factorised and streamed layers
        (unweighted)."""
        fm = self.fm
        flat, statics = fm.state(point)
        params = fm.params(flat)
        pj = {n: params[n] for n in self.jac_names}
        pk = {n: v for n, v in params.items() if n not in pj}
        keys = [k for k in self._shapes if any(k.rsplit("#", 1)[0] == L.name for L in self.hooked)]
        probes = {k: torch.zeros(self._shapes[k][1], dtype=fm.dtype, device=fm.device) for k in keys}
        loss = fm.loss

        def per_sample(pj_, zs, x, *y):
            cap = _Capture(zs)

            def call():
                return functional_call(fm.model, ({**pj_, **pk}, statics), (x.unsqueeze(0),))

            out = self._run(self.hooked, cap, call)
            f = out.reshape(-1)
            if loss is not None:
                f = loss.per_sample(f, y[0]).reshape(1)
            return f, cap.inputs

        argnums = (0, 1) if pj else 1
        jf = vmap(jacrev(per_sample, argnums=argnums, has_aux=True), in_dims=(None, None, 0) + ((0,) if Y is not None else ()),
                  randomness="error")
        n = X.shape[0]
        feats: dict[str, list] = {L.name: [] for L in self.with_factors}
        parts: dict[str, list] = {L.name: [] for L in self.with_factors}
        Yd = None if Y is None else Y.to(fm.device)
        for a in range(0, n, chunk):
            b = min(n, a + chunk)
            try:
                jac, aux = jf(pj, probes, fm.prepare(X[a:b]), *(() if Yd is None else (Yd[a:b],)))
            except RuntimeError as e:
                if "randomness" in str(e):
                    raise ValueError(
                        "pkfast: the model draws random numbers in its forward pass (e.g. F.dropout with "
                        "training=True), so the kernel is undefined; make the forward pass deterministic (model.eval())"
                    ) from e
                raise
            jp, jz = (jac if pj else ({}, jac))
            if panel is not None:
                dst = panel[a:b]
                off = 0
                if pj:
                    blk = torch.cat([jp[nm].flatten(2) for nm in self.jac_names], dim=2)
                    _put(dst[:, :, : self.jac_width], blk, weight, add)
                    off = self.jac_width
                for L in self.paneled:
                    groups = self._factors(L, jz, aux, b - a)
                    G = _materialize(L, groups, b - a)
                    _put(dst[:, :, off: off + L.size], G, weight, add)
                    off += L.size
            for L in self.with_factors:
                parts[L.name].append(self._factors(L, jz, aux, b - a))
        for L in self.with_factors:
            chunks = parts[L.name]
            feats[L.name] = [tuple(torch.cat([c[g][i] for c in chunks]) for i in range(2)) for g in range(len(chunks[0]))]
        return feats

    def _factors(self, L: Layer, jz: dict, aux: dict, n: int, C: int | None = None) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """[(A_g [n, S, I_g(+1)] or token ids [n, S], Δ_g [n, C, S, O_g]) per group] of layer L."""
        C = self.fm.num_outputs if C is None else C
        As, Ds = [], []
        for k in range(L.calls):
            key = f"{L.name}#{k}"
            A, D = _unfold(L, aux[key], jz[key], n, C, self.fm.dtype)
            As.append(A)
            Ds.append(D)
        A = torch.cat(As, dim=1) if len(As) > 1 else As[0]
        D = torch.cat(Ds, dim=2) if len(Ds) > 1 else Ds[0]
        if L.kind == "embedding":
            pad = L.module.padding_idx
            if pad is not None:
                D = D.masked_fill((A == pad)[:, None, :, None], 0.0)
            return [(A, D)]
        out = []
        Ig, Og = L.fan_in, L.fan_out
        for g in range(L.groups):
            Ag = A[:, :, g * Ig:(g + 1) * Ig] if L.groups > 1 else A
            if L.bias:
                Ag = torch.cat([Ag, Ag.new_ones(Ag.shape[0], Ag.shape[1], 1)], dim=2)
            Dg = D[..., g * Og:(g + 1) * Og] if L.groups > 1 else D
            out.append((Ag.contiguous(), Dg.contiguous()))
        return out

    # ------------------------------------------------------------------ products
    def accumulate(self, acc: torch.Tensor, fr: dict[str, list], fc: dict[str, list], weight: float, *,
                   full: bool, diagonal: bool, upper_only: bool = False) -> None:
        """``acc += weight · Σ_layers K_l(rows, cols)`` from the factors of the rows (``fr``) and columns (``fc``).
        ``upper_only`` (rows are the columns, a symmetric term): only the upper triangle of ``acc`` is valid
        afterwards (blocks below the diagonal are skipped, as :func:`pkfast.accumulate.accumulate` does)."""
        for L in self.factorized:
            for (Ar, Dr), (Ac, Dc) in zip(fr[L.name], fc[L.name]):
                if diagonal:
                    _diag_product(acc, L, Ar, Dr, Ac, Dc, weight, full)
                else:
                    self._pair_product(acc, L, Ar, Dr, Ac, Dc, weight, full, upper_only)

    def accumulate_streamed(self, acc: torch.Tensor, left: list, right: list, weight: float, *, same: bool,
                            product) -> None:
        """``acc += weight · G_rows G_colsᵀ`` for the streamed layers, where ``G = Σ_q ω_q Δ_qᵀ A_q`` is a layer's
        per-sample gradient summed over the evaluation points of a side (``left``/``right``: ``[(ω_q, factors
        of the point)]``). Each gradient is formed a slice of output units at a time (vocabulary rows for an
        embedding) into a reused workspace of :data:`STREAM_BYTES` and handed to ``product(acc, A, B, weight,
        same)`` as ``[n, C, K]`` panel slices; ``same``: the columns are the rows (a symmetric diagonal tile)."""
        if not self.streamed:
            return
        fm = self.fm
        C = fm.num_outputs
        name0 = self.streamed[0].name
        r = left[0][1][name0][0][1].shape[0]
        c = 0 if same else right[0][1][name0][0][1].shape[0]
        item = torch.empty((), dtype=fm.dtype).element_size()
        budget = min(STREAM_BYTES, self.stream_bytes or STREAM_BYTES)
        for L in self.streamed:
            units, width = _units(L)
            per_unit = (r + c) * C * width * item
            step = max(1, min(units, budget // max(1, per_unit)))  # at least one unit, whatever the budget
            need = (r + c) * C * step * width
            ws = getattr(self, "_ws", None)
            if ws is None or ws.numel() < need or ws.device != fm.device:
                ws = self._ws = torch.empty(max(need, budget // item), dtype=fm.dtype, device=fm.device)
            for g in range(len(left[0][1][L.name])):
                for u0 in range(0, units, step):
                    u1 = min(units, u0 + step)
                    k = (u1 - u0) * width
                    A = _gradient_slice(L, left, g, u0, u1, ws[: r * C * k].view(r, C, u1 - u0, width))
                    B = A if same else _gradient_slice(L, right, g, u0, u1,
                                                       ws[r * C * k: (r + c) * C * k].view(c, C, u1 - u0, width))
                    product(acc, A.view(r, C, k), B.view(B.shape[0], C, k), weight, same)

    def release(self) -> None:
        """Drop the streaming workspace (kept across tiles while a Gram runs)."""
        self._ws = None

    def _mm(self, A: torch.Tensor, B: torch.Tensor, upper: bool = False) -> torch.Tensor:
        out = torch.zeros(A.shape[0], B.shape[0], dtype=A.dtype, device=A.device)
        accumulate(out, A, B, 1.0, backend=self.backend, upper_only=upper, precision=self.precision)
        return out

    def _pair_product(self, acc, L, Ar, Dr, Ac, Dc, weight, full, upper=False):
        r, C, S, O = Dr.shape
        c = Dc.shape[0]
        emb = L.kind == "embedding"
        if S == 1:
            AA = (Ar[:, :1] == Ac[:, 0][None, :]).to(acc.dtype) if emb else self._mm(Ar[:, 0], Ac[:, 0], upper)
            if full:  # (the upper triangle of the (r·C)² block needs only the upper triangle of AA's r×r)
                DD = self._mm(Dr.reshape(r * C, O), Dc.reshape(c * C, O), upper).view(r, C, c, C)
                acc.view(r, C, c, C).add_(DD.mul_(AA[:, None, :, None]), alpha=weight)
            else:
                DD = self._mm(Dr.reshape(r, C * O), Dc.reshape(c, C * O), upper)
                acc.add_(DD.mul_(AA), alpha=weight)
            return
        per_pair = S * S * acc.element_size() * (2 + (2 * C * C if full else 1))
        side = max(1, int(math.sqrt(self.workspace_bytes / per_pair)))
        accv = acc.view(r, C, c, C) if full else acc
        for i0 in range(0, r, side):
            i1 = min(r, i0 + side)
            for j0 in range(i0 if upper else 0, c, side):
                j1 = min(c, j0 + side)
                rb, cb = i1 - i0, j1 - j0
                if emb:
                    AA = (Ar[i0:i1, :, None, None] == Ac[None, None, j0:j1, :]).to(acc.dtype)
                else:
                    AA = self._mm(Ar[i0:i1].reshape(rb * S, -1), Ac[j0:j1].reshape(cb * S, -1)).view(rb, S, cb, S)
                if full:
                    DD = self._mm(Dr[i0:i1].reshape(rb * C * S, O), Dc[j0:j1].reshape(cb * C * S, O)).view(rb, C, S, cb, C, S)
                    accv[i0:i1, :, j0:j1, :].add_(torch.einsum("isjt,icsjdt->icjd", AA, DD), alpha=weight)
                else:
                    DD = self._mm(Dr[i0:i1].transpose(1, 2).reshape(rb * S, C * O),
                                  Dc[j0:j1].transpose(1, 2).reshape(cb * S, C * O)).view(rb, S, cb, S)
                    accv[i0:i1, j0:j1].add_(DD.mul_(AA).sum(dim=(1, 3)), alpha=weight)


def _put(dst: torch.Tensor, src: torch.Tensor, weight: float, add: bool) -> None:
    if add:
        dst.add_(src, alpha=weight)
    elif weight != 1.0:
        torch.mul(src, weight, out=dst)
    else:
        dst.copy_(src)


def _materialize(L: Layer, groups: list, n: int) -> torch.Tensor:
    """The layer's per-sample gradient ``[n, C, size]``, every group's :func:`_gradient_slice` over all its units
    — a layout (per group: output units × (inputs, bias)) of no particular convention: panels only need rows and
    columns to agree."""
    units, width = _units(L)
    nodes = [(1.0, {L.name: groups})]
    parts = [_gradient_slice(L, nodes, g, 0, units, D.new_empty(n, D.shape[1], units, width)).reshape(n, D.shape[1], -1)
             for g, (_, D) in enumerate(groups)]
    return torch.cat(parts, dim=2) if len(parts) > 1 else parts[0]


def _units(L: Layer) -> tuple[int, int]:
    """(units, width) of a layer's per-sample gradient: output units × input columns (bias last) for Linear/Conv
    (per group), vocabulary rows × embedding dimension for an embedding."""
    return (L.fan_in, L.fan_out) if L.kind == "embedding" else (L.fan_out, L.factor_in)


def _gradient_slice(L: Layer, nodes: list, g: int, u0: int, u1: int, out: torch.Tensor) -> torch.Tensor:
    """``out[n, C, u1-u0, width] = Σ_q ω_q`` (group ``g``'s per-sample gradient at point q, output units
    ``u0:u1``): ``Δ[..., u]ᵀ A`` for Linear/Conv (width: the input columns, bias last); for an embedding the
    vocabulary rows ``u0:u1`` (width: the embedding dimension), scattered from the tokens that fall in them."""
    for qi, (om, feats) in enumerate(nodes):
        A, D = feats[L.name][g]
        n, C, S, _ = D.shape
        if L.kind == "embedding":
            if qi == 0:
                out.zero_()
            inside = (A >= u0) & (A < u1)
            idx = torch.where(inside, A - u0, torch.zeros_like(A))
            src = D * (inside.to(D.dtype) * om)[:, None, :, None]
            out.scatter_add_(2, idx[:, None, :, None].expand(n, C, S, D.shape[3]), src)
            continue
        Du = D[..., u0:u1]
        if S == 1:  # an outer product per sample, written in place
            d, a = Du[:, :, 0, :, None], A[:, None, 0:1, :]
            if qi == 0:
                torch.mul(d, a, out=out)
                if om != 1.0:
                    out.mul_(om)
            else:
                out.addcmul_(d, a, value=om)
        else:
            Dt = Du.transpose(2, 3).reshape(n, C * (u1 - u0), S)
            out.view(n, C * (u1 - u0), -1).baddbmm_(Dt, A, beta=0.0 if qi == 0 else 1.0, alpha=om)
    return out


def _gradient_layout(L: Layer, grads: dict[str, torch.Tensor | None]) -> torch.Tensor:
    """A layer's parameter gradient (``{"weight": …, "bias": …}``, None for unreached) flattened in the layout of
    :func:`_materialize`: per group, the [O_g, I_g] weight block with the bias as a last column."""
    m = L.module
    W = grads.get("weight")
    if W is None:
        W = torch.zeros_like(m.weight)
    if L.kind == "embedding":
        return W.reshape(-1)
    b = grads.get("bias") if L.bias else None
    if L.bias and b is None:
        b = torch.zeros_like(m.bias)
    W = W.reshape(W.shape[0], -1)
    parts = []
    Og = L.fan_out
    for gi in range(L.groups):
        blk = W[gi * Og:(gi + 1) * Og]
        if L.bias:
            blk = torch.cat([blk, b[gi * Og:(gi + 1) * Og, None]], dim=1)
        parts.append(blk.reshape(-1))
    return torch.cat(parts)


def _diag_product(acc, L, Ar, Dr, Ac, Dc, weight, full):
    """``acc[i] += weight · K_l(x_i, x_i)`` ([n] for the trace, [n, C, C] for the block)."""
    if L.kind == "embedding":
        AA = (Ar[:, :, None] == Ac[:, None, :]).to(acc.dtype)
    else:
        AA = torch.bmm(Ar, Ac.transpose(1, 2))  # [n, S, S]
    if full:
        acc.add_(torch.einsum("nst,ncso,ndto->ncd", AA, Dr, Dc), alpha=weight)
    else:
        acc.add_(torch.einsum("nst,ncso,ncto->n", AA, Dr, Dc), alpha=weight)


def _positions(L: Layer, shp_in: torch.Size, shp_out: torch.Size) -> int:
    m = L.module
    if L.kind == "linear":
        return math.prod(shp_out[:-1])  # the batch-of-one axis and any leading dims
    if L.kind == "embedding":
        return math.prod(shp_in)
    return math.prod(shp_out) // m.out_channels  # B′·L: every position of every image in the call


def _fans(L: Layer) -> tuple[int, int]:
    m = L.module
    if L.kind == "linear":
        return m.in_features, m.out_features
    if L.kind == "embedding":
        return m.num_embeddings, m.embedding_dim
    return m.in_channels // m.groups * math.prod(m.kernel_size), m.out_channels // m.groups


def _unfold(L: Layer, inp: torch.Tensor, grad: torch.Tensor, n: int, C: int, dtype: torch.dtype):
    """One call's (A [n, S, I·g] or ids [n, S], Δ [n, C, S, O·g]) from its per-sample input and output gradient."""
    m = L.module
    if L.kind == "linear":
        return inp.reshape(n, -1, m.in_features).to(dtype), grad.reshape(n, C, -1, m.out_features)
    if L.kind == "embedding":
        return inp.reshape(n, -1), grad.reshape(n, C, -1, m.embedding_dim)
    nd = len(m.kernel_size)
    sp_in = inp.shape[-nd:]
    x = inp.reshape(-1, m.in_channels, *sp_in).to(dtype)  # [n·B′, Cin, *spatial]
    nb = x.shape[0]
    pad = m.padding
    if isinstance(pad, str) or m.padding_mode != "zeros":
        mode = "constant" if m.padding_mode == "zeros" else m.padding_mode
        x = F.pad(x, m._reversed_padding_repeated_twice, mode=mode)
        pad = (0,) * nd
    if nd == 1:
        x = x.unsqueeze(2)
        ks, dil, st, pad = (1, m.kernel_size[0]), (1, m.dilation[0]), (1, m.stride[0]), (0, pad[0])
    else:
        ks, dil, st = m.kernel_size, m.dilation, m.stride
    cols = F.unfold(x, ks, dilation=dil, padding=pad, stride=st)  # [n·B′, Cin·k, Lpos]
    Lpos = cols.shape[-1]
    A = cols.view(n, nb // n, cols.shape[1], Lpos).transpose(2, 3).reshape(n, -1, cols.shape[1])
    D = grad.reshape(n, C, nb // n, m.out_channels, Lpos).transpose(3, 4).reshape(n, C, -1, m.out_channels)
    return A, D
