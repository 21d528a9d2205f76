"""Baselines for the pkfast speed runs: other ways to compute the same path-kernel Gram.

Every baseline computes the trace Gram of ``pkfast.gram(model, traj, X, X2, outputs="trace", rule="left")``::

    K = Σ_s ε_s Σ_c J_c(X; w_s) J_c(X2; w_s)ᵀ        (s = 0 … T-1, J = ∂f/∂w over the trainable parameters)

for the same weights, in float32, and returns it as a CPU tensor ``[N, M]``:

``torch_func_tutorial``
    The PyTorch torch.func NTK tutorial's method 1 (pytorch/tutorials, intermediate_source/neural_tangent_kernels.py,
    ``empirical_ntk_jacobian_contraction`` with ``compute='trace'``): per step, ``vmap(jacrev(fnet_single),
    (None, 0))`` over all of X and of X2 (the tutorial computes both Jacobians even when X2 is X), then per
    parameter ``einsum('Naf,Maf->NM')``, summed over parameters; times ε_s, summed over steps. No chunking.
``naive_autograd``
    A per-sample, per-output loop of ``torch.autograd.grad`` fills J ``[N, C·P]``; then ``K += ε_s J J2ᵀ``.
    Slow by design; refused above ``max_n`` samples ("skipped (N too large …)"), never extrapolated.
``neural_tangents``
    ``nt.empirical_ntk_fn(f, trace_axes=(-1,), vmap_axes=0, implementation=…)`` on a hand-written JAX function
    equal to the torch model (Linear, Conv2d, Tanh, ReLU, Flatten in an ``nn.Sequential``), with the same
    weights, jitted; neural-tangents' traced NTK is a mean over the C outputs, so it is multiplied by C.
    Skipped with a message when ``neural_tangents`` (or JAX) is not installed.

Each ``prepare_*`` function does the untimed set-up (checks, memory estimate, weight conversion for JAX) and
returns a zero-argument callable that computes the Gram: the part the speed runs time. Raises
:class:`Skipped` when the baseline cannot run here.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.func import functional_call, jacrev, vmap

import pkfast

from _common import TinyTransformer, available_bytes

__all__ = ["Skipped", "BASELINES", "prepare", "torch_func_tutorial", "naive_autograd", "neural_tangents",
           "NAIVE_MAX_N"]

#: Default largest N (and M) the naive per-sample loop is run for.
NAIVE_MAX_N = 512

NT_SKIP_MESSAGE = "neural-tangents not installed (pip install neural-tangents); skipped"


class Skipped(Exception):
    """The baseline cannot run here; ``str(e)`` says why (printed in the table as "skipped (…)")."""


def _steps(traj: pkfast.Trajectory) -> list[tuple[int, float]]:
    return [(s, e) for s, e in enumerate(traj.step_sizes.tolist()) if e != 0.0]


def _shapes(model: nn.Module, X: torch.Tensor, X2: torch.Tensor | None) -> tuple[int, int, int, int]:
    dev = next(model.parameters()).device
    with torch.no_grad():
        C = int(model(X[:1].to(dev)).numel())
    P = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return X.shape[0], (X.shape[0] if X2 is None else X2.shape[0]), C, P


#: Share of the available memory a baseline's estimated need may take before it is skipped (the estimates are
#: upper bounds: the tutorial on the ResNet-18 of ``architectures.py`` at N = 256 is estimated at 20.1 GiB and
#: runs in 22 GiB).
MEMORY_FRACTION = 0.9


def _check_memory(need: float, what: str, device: torch.device) -> None:
    free = available_bytes(device)
    if need > MEMORY_FRACTION * free:
        raise Skipped(f"skipped ({what} needs ~{need / 2**30:.1f} GiB; {free / 2**30:.1f} GiB available on {device})")


# ---------------------------------------------------------------------------------------------- torch.func tutorial
def prepare_torch_func_tutorial(model: nn.Module, traj: pkfast.Trajectory, X: torch.Tensor,
                                X2: torch.Tensor | None = None) -> Callable[[], torch.Tensor]:
    """The torch.func tutorial's Jacobian contraction (trace), summed over the trajectory (see module doc)."""
    dev = next(model.parameters()).device
    N, M, C, P = _shapes(model, X, X2)
    # jac1 and jac2 are alive together, plus one vmap(jacrev) working copy of the larger
    _check_memory(4.0 * C * P * (N + M + max(N, M)), "torch_func_tutorial (Jacobians of X and X2)", dev)
    x1 = X.to(dev)
    x2 = x1 if X2 is None else X2.to(dev)
    names = [n for n, p in model.named_parameters() if p.requires_grad]

    # as in the tutorial
    def fnet_single(params, x):
        return functional_call(model, params, (x.unsqueeze(0),)).squeeze(0)

    def empirical_ntk_jacobian_contraction(fnet_single, params, x1, x2):
        jac1 = vmap(jacrev(fnet_single), (None, 0))(params, x1)
        jac1 = [j.flatten(2) for j in jac1.values()]
        jac2 = vmap(jacrev(fnet_single), (None, 0))(params, x2)
        jac2 = [j.flatten(2) for j in jac2.values()]
        result = torch.stack([torch.einsum("Naf,Maf->NM", j1, j2) for j1, j2 in zip(jac1, jac2)])
        return result.sum(0)

    def run() -> torch.Tensor:
        K = None
        for s, eps in _steps(traj):
            point = traj.point(s)
            params = {n: point[n].to(dev) for n in names}
            Ks = empirical_ntk_jacobian_contraction(fnet_single, params, x1, x2) * eps
            K = Ks if K is None else K + Ks
        return (torch.zeros(N, M) if K is None else K).cpu()

    return run


def torch_func_tutorial(model, traj, X, X2=None) -> torch.Tensor:
    return prepare_torch_func_tutorial(model, traj, X, X2)()


# ---------------------------------------------------------------------------------------------- naive autograd loop
def prepare_naive_autograd(model: nn.Module, traj: pkfast.Trajectory, X: torch.Tensor,
                           X2: torch.Tensor | None = None, *, max_n: int = NAIVE_MAX_N) -> Callable[[], torch.Tensor]:
    """Per-sample, per-output ``torch.autograd.grad`` loops build J; then ``K += ε_s J J2ᵀ`` (see module doc)."""
    N, M, C, P = _shapes(model, X, X2)
    if max(N, M) > max_n:
        raise Skipped(f"skipped (N too large: {max(N, M)} > naive max N {max_n}; raise --naive-max-n to run it)")
    net = copy.deepcopy(model).float()
    dev = next(net.parameters()).device
    _check_memory(4.0 * C * P * (N + (0 if X2 is None else M)), "naive_autograd (J)", dev)
    named = dict(net.named_parameters())
    params = [p for p in net.parameters() if p.requires_grad]
    names = [n for n, p in net.named_parameters() if p.requires_grad]
    x1 = X.to(dev)
    x2 = None if X2 is None else X2.to(dev)

    def jac(x: torch.Tensor) -> torch.Tensor:
        J = torch.empty(x.shape[0], C, P, device=dev)
        for a in range(x.shape[0]):
            out = net(x[a : a + 1]).reshape(-1)
            for c in range(C):
                grads = torch.autograd.grad(out[c], params, retain_graph=c < C - 1)
                torch.cat([g.reshape(-1) for g in grads], out=J[a, c])
        return J.view(x.shape[0], C * P)

    def run() -> torch.Tensor:
        K = torch.zeros(N, M, device=dev)
        for s, eps in _steps(traj):
            point = traj.point(s)
            with torch.no_grad():
                for n in names:
                    named[n].copy_(point[n])
            J = jac(x1)
            J2 = J if x2 is None else jac(x2)
            K.addmm_(J, J2.T, alpha=eps)
            del J, J2
        return K.cpu()

    return run


def naive_autograd(model, traj, X, X2=None, *, max_n: int = NAIVE_MAX_N) -> torch.Tensor:
    return prepare_naive_autograd(model, traj, X, X2, max_n=max_n)()


# ---------------------------------------------------------------------------------------------- neural-tangents
def _jax_function(model: nn.Module) -> Callable[[dict, Any], Any]:
    """``f(params, x)`` in JAX computing ``model(x)``; ``params`` maps the torch parameter names to arrays."""
    import jax.numpy as jnp
    from jax import lax

    if isinstance(model, TinyTransformer):
        return _jax_tiny_transformer(model)
    if not isinstance(model, nn.Sequential):
        raise Skipped(f"skipped (no JAX translation for {type(model).__name__}; expected an nn.Sequential)")
    ops: list[Callable[[dict, Any], Any]] = []
    for name, layer in model.named_children():
        if isinstance(layer, nn.Linear):
            def op(p, x, n=name, bias=layer.bias is not None):
                y = x @ p[f"{n}.weight"].T
                return y + p[f"{n}.bias"] if bias else y
        elif isinstance(layer, nn.Conv2d):
            if layer.groups != 1 or layer.padding_mode != "zeros" or isinstance(layer.padding, str):
                raise Skipped(f"skipped (no JAX translation for {layer})")
            pad = [(int(q), int(q)) for q in layer.padding]

            def op(p, x, n=name, layer=layer, pad=pad):
                y = lax.conv_general_dilated(x, p[f"{n}.weight"], window_strides=tuple(layer.stride), padding=pad,
                                             rhs_dilation=tuple(layer.dilation),
                                             dimension_numbers=("NCHW", "OIHW", "NCHW"))
                return y + p[f"{n}.bias"][None, :, None, None] if layer.bias is not None else y
        elif isinstance(layer, nn.Tanh):
            def op(p, x):
                return jnp.tanh(x)
        elif isinstance(layer, nn.ReLU):
            def op(p, x):
                return jnp.maximum(x, 0)
        elif isinstance(layer, nn.Flatten):
            if layer.start_dim != 1 or layer.end_dim != -1:
                raise Skipped(f"skipped (no JAX translation for {layer})")

            def op(p, x):
                return x.reshape(x.shape[0], -1)
        else:
            raise Skipped(f"skipped (no JAX translation for layer {name!r}: {type(layer).__name__})")
        ops.append(op)

    def f(params, x):
        for op in ops:
            x = op(params, x)
        return x

    return f


def _jax_tiny_transformer(model: TinyTransformer) -> Callable[[dict, Any], Any]:
    """:class:`TinyTransformer`'s forward in JAX (same parameter names; LayerNorm with the module's eps)."""
    import jax
    import jax.numpy as jnp

    T, W, d = model.tokens, model.width, model.d
    eps1, eps2 = model.ln1.eps, model.ln2.eps

    def lin(p, n, x):
        return x @ p[f"{n}.weight"].T + p[f"{n}.bias"]

    def ln(p, n, x, eps):
        mu = x.mean(-1, keepdims=True)
        var = ((x - mu) ** 2).mean(-1, keepdims=True)
        return (x - mu) / jnp.sqrt(var + eps) * p[f"{n}.weight"] + p[f"{n}.bias"]

    def f(p, x):
        h = lin(p, "embed", x.reshape(x.shape[0], T, W)) + p["pos"]
        a = ln(p, "ln1", h, eps1)
        att = jax.nn.softmax(lin(p, "q", a) @ jnp.swapaxes(lin(p, "k", a), -1, -2) / d ** 0.5, axis=-1)
        h = h + lin(p, "o", att @ lin(p, "v", a))
        h = h + lin(p, "fc2", jnp.tanh(lin(p, "fc1", ln(p, "ln2", h, eps2))))
        return lin(p, "head", h.mean(axis=1))

    return f


def prepare_neural_tangents(model: nn.Module, traj: pkfast.Trajectory, X: torch.Tensor,
                            X2: torch.Tensor | None = None, *, implementation: int = 1) -> Callable[[], torch.Tensor]:
    """neural-tangents' empirical NTK (trace over outputs, ×C) summed over the trajectory (see module doc).

    Untimed set-up: the JAX function, ``jax.jit(nt.empirical_ntk_fn(...))`` and the weights and inputs as JAX
    arrays. Matmuls and convolutions run under ``jax.default_matmul_precision("float32")`` (full fp32, no TF32
    on GPUs), as pkfast's torch path does.
    """
    try:
        import jax
        import jax.numpy as jnp
        import neural_tangents as nt
    except ImportError as e:
        raise Skipped(NT_SKIP_MESSAGE) from e
    import numpy as np

    N, M, C, _ = _shapes(model, X, X2)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    if len(names) != len(list(model.parameters())):
        raise Skipped("skipped (the JAX translation needs every parameter trainable)")
    f = _jax_function(model)
    ntk = nt.empirical_ntk_fn(f, trace_axes=(-1,), vmap_axes=0, implementation=implementation)
    ntk = jax.jit(ntk)
    x1 = jnp.asarray(X.detach().cpu().numpy())
    x2 = None if X2 is None else jnp.asarray(X2.detach().cpu().numpy())
    points = []
    for s, eps in _steps(traj):
        point = traj.point(s)
        points.append((eps, {n: jnp.asarray(point[n].detach().cpu().numpy()) for n in names}))

    def run() -> torch.Tensor:
        with jax.default_matmul_precision("float32"):
            K = None
            for eps, params in points:
                Ks = ntk(x1, x2, params) * (eps * C)  # NT's trace is a mean over the C outputs
                K = Ks if K is None else K + Ks
            if K is None:
                return torch.zeros(N, M)
            K.block_until_ready()
        return torch.from_numpy(np.asarray(K, dtype=np.float32).copy())

    def warm() -> None:
        """One step: compiles the jitted function (reused by every step of ``run``)."""
        if points:
            with jax.default_matmul_precision("float32"):
                ntk(x1, x2, points[0][1]).block_until_ready()

    run.warm = warm  # type: ignore[attr-defined]
    return run


def neural_tangents(model, traj, X, X2=None, *, implementation: int = 1) -> torch.Tensor:
    return prepare_neural_tangents(model, traj, X, X2, implementation=implementation)()


#: name → prepare function (``prepare(model, traj, X, X2=None, **options) -> Callable[[], Tensor]``).
BASELINES: dict[str, Callable[..., Callable[[], torch.Tensor]]] = {
    "torch_func_tutorial": prepare_torch_func_tutorial,
    "naive_autograd": prepare_naive_autograd,
    "neural_tangents": prepare_neural_tangents,
}


def prepare(name: str, model, traj, X, X2=None, **options) -> Callable[[], torch.Tensor]:
    if name not in BASELINES:
        raise ValueError(f"benchmarks.baselines: unknown baseline {name!r}; expected one of {', '.join(BASELINES)}")
    return BASELINES[name](model, traj, X, X2, **options)
