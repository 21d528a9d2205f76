"""options: every option of a kernel computation, validated once, and the one rule for the memory budget.

:class:`Options` is built by :meth:`Options.check` from the keyword arguments of :func:`pkfast.gram`,
:func:`pkfast.plan`, :func:`pkfast.sketch` and :class:`pkfast.KernelMachine` (each passes the subset it takes,
with its own defaults and its own name for the messages). Nothing downstream re-validates an option.

The memory budget (:func:`resolve_budget`): an explicit ``memory_budget`` in bytes (or a string such as
``"2GiB"``), else half of the memory free on the compute device when the computation starts. Everything a
computation holds besides its result comes out of it: Jacobian panels, layer factors, tile accumulators, the
streaming workspace of materialised layers (:func:`stream_bytes`), the sketch's blocks of R, the kernel
machine's query-side accumulators.
"""

from __future__ import annotations

import dataclasses
import numbers
import os
from dataclasses import dataclass
from typing import Any

import torch

from pkfast import _checks
from pkfast.engine.accumulate import BACKENDS, PRECISIONS
from pkfast.loss import LossSpec
from pkfast.engine.output_sketch import OutputProjection, OutputSketch
from pkfast.engine.quadrature import DEFAULT_NODES, RULES
from pkfast.engine.resources.threads import check_threads

__all__ = ["Options", "PRECONDITIONERS", "OUTPUTS", "OF", "METHODS", "PROJECTIONS", "BACKENDS", "PRECISIONS", "resolve_budget", "default_memory_budget",
           "stream_bytes", "model_device"]

#: ``"trace"``: Σ_c ∇f_c(x)·∇f_c(x′), shape [N, M] (the torch.func tutorial's convention);
#: ``"mean"``: the trace divided by C (neural-tangents' ``trace_axes`` convention);
#: ``"full"``: the C×C block per pair, shape [N, M, C, C].
OUTPUTS = ("trace", "mean", "full")
#: ``outputs=`` values of a kernel over combinations of the outputs (:mod:`pkfast.engine.output_sketch`): the
#: unbiased output sketch of the trace kernel and the pseudo-NTK (or an :class:`OutputSketch`)
OUTPUT_SKETCHES = ("sketch", "pntk")
#: ``"output"``: kernels of the model's outputs; ``"loss"``: of the per-sample loss (TracIn's quantity).
OF = ("output", "loss")
#: ``method=`` values of :func:`pkfast.gram`.
METHODS = ("auto", "jacobian", "factorized", "materialized", "sketch")
#: ``projection=`` values of a sketch: per layer by cost (Kronecker-factored where cheaper), every parameter by
#: the dense Gaussian, every factorisable layer Kronecker-factored (docs/math.md §7).
PROJECTIONS = ("auto", "dense", "kronecker")
#: Rules a sketch can use: a feature map's Gram is symmetric, the exact rule is not.
SKETCH_RULES = ("left", "trapezoid")
#: ``preconditioner=`` values: ``"auto"`` (the recorded one where the trajectory has it, else the Euclidean kernel),
#: ``"recorded"`` (each step's recorded diagonal P_s: the preconditioned path kernel), ``"none"`` (or None: Euclidean).
PRECONDITIONERS = ("auto", "recorded", "none")
#: The streaming workspace of materialised layers: at most this, and at most a quarter of the budget. A slice
#: of a few thousand columns already multiplies at full speed (csrc/README.md), and a small one stays warm.
STREAM_BYTES = 32 * 2**20


@dataclass(frozen=True)
class Options:
    """The validated options of one computation (see :func:`pkfast.gram` for their meaning).

    ``loss`` is resolved to a :class:`~pkfast.LossSpec` (from the argument, else the trajectory's record) when
    ``of="loss"``; ``memory_budget`` is bytes or None (resolved per device by :func:`resolve_budget`)."""

    fn: str = "pkfast.gram"
    outputs: str = "trace"
    rule: str = "left"
    nodes: int = DEFAULT_NODES
    diagonal: bool = False
    backend: str = "auto"
    precision: str = "ieee"
    dtype: torch.dtype = torch.float32
    memory_budget: int | None = None
    of: str = "output"
    loss: LossSpec | None = None
    method: str = "auto"
    k: int | None = None
    seed: int | None = None
    projection: str = "auto"
    output_fn: Any = None
    #: CPU threads: "auto" (fewer while other processes hold the cores), "all" or an int
    #: (:mod:`pkfast.engine.resources.threads`); never changes the numbers beyond rounding, so not in :meth:`record`
    threads: str | int = "auto"
    #: ``"recorded"`` (K = Σ ε_s J_s P_s J_sᵀ with the trajectory's diagonal P_s), ``"none"`` (the Euclidean kernel,
    #: where the trajectory's optimizer is adaptive: the choice is recorded) or None (no choice to make: SGD or an
    #: unknown optimizer, or a caller that does not take the option)
    preconditioner: str | None = None
    #: the output combinations the kernel is over (``outputs="sketch"``/``"pntk"``/an OutputSketch, then
    #: ``outputs="trace"`` of the projected model, whose ``output_fn`` applies them), or None
    output_sketch: OutputSketch | None = None
    #: a final linear head to collapse for the trace kernel (:mod:`pkfast.layers.head`): ``"auto"`` (detect it),
    #: a module name (that one, or an error saying why not) or None (never)
    head: str | None = "auto"

    @classmethod
    def check(cls, fn: str, *, trajectory: Any = None, rules: tuple[str, ...] = RULES, strict_nodes: bool = True,
              **given: Any) -> "Options":
        """Validate the options in ``given`` (any subset of the fields) for the caller ``fn``; the rest keep their
        defaults. ``trajectory`` supplies the recorded loss for ``of="loss"`` without ``loss=``; ``rules``
        restricts the accepted rules (the sketch and the kernel machine take fewer); ``strict_nodes`` refuses
        ``nodes`` with a rule other than ``"exact"`` (the kernel machine ignores them there)."""
        known = {f.name for f in dataclasses.fields(cls)} - {"fn"}
        unknown = set(given) - known
        if unknown:  # e.g. a misspelt keyword passed through pkfast.plan(**options)
            raise TypeError(f"{fn}: unknown option(s) {', '.join(map(repr, sorted(unknown)))}; expected some of "
                            f"{', '.join(sorted(known))}")
        o = dict(given)
        sk = OutputSketch.of(o.get("outputs"))
        if sk is not None:
            o["outputs"] = "trace"
        _check_computation(fn, o, rules, strict_nodes)
        _check_sketch(fn, o)
        if o.get("precision", "ieee") != "ieee" and o.get("dtype") == torch.float64:
            raise ValueError(f"{fn}: precision={o['precision']!r} applies to float32; dtype=torch.float64 computes in "
                             "ieee fp64")
        _check_of(fn, o, trajectory)
        if sk is not None:
            if o.get("of") == "loss":
                raise ValueError(f"{fn}: outputs={given['outputs']!r} combines a model's outputs; the loss kernel has "
                                 "one output (of='loss'): expected of='output' with it, or outputs='trace'")
            o["output_sketch"], o["output_fn"] = sk, OutputProjection(sk, o.get("output_fn"))
        if "preconditioner" in o:
            o["preconditioner"] = resolve_preconditioner(fn, o["preconditioner"], trajectory)
            if o["preconditioner"] == "recorded" and o.get("projection") == "kronecker":
                raise ValueError(f"{fn}: projection='kronecker' cannot sketch the preconditioned kernel: a diagonal "
                                 "P_s breaks the Kronecker factorisation of a layer's gradient; expected "
                                 "projection='dense' or 'auto' (dense with a preconditioner), or preconditioner=None")
        o["threads"] = check_threads(fn, o.get("threads"))
        if "head" in o:
            o["head"] = None if o["head"] in (None, "none") else o["head"]
            if o["head"] is not None and not (isinstance(o["head"], str) and o["head"]):
                raise TypeError(f"{fn}: head must be 'auto', a module name (e.g. 'lm_head') or None; found {o['head']!r}")
        return cls(fn=fn, **o)

    @property
    def full(self) -> bool:
        return self.outputs == "full"

    @property
    def itemsize(self) -> int:
        return torch.empty((), dtype=self.dtype).element_size()

    def budget(self, device: torch.device) -> int:
        """The working-memory budget in bytes on ``device`` (:func:`resolve_budget`)."""
        return resolve_budget(self.memory_budget, device)

    def record(self) -> dict[str, Any]:
        """The options that change the numbers of a result, JSON-serialisable (``memory_budget`` does not)."""
        return {"outputs": self.outputs, "rule": self.rule, "diagonal": self.diagonal, "dtype": str(self.dtype),
                "backend": self.backend, "precision": self.precision, "of": self.of,
                "nodes": self.nodes if self.rule == "exact" else None,
                "loss": None if self.loss is None else self.loss.to_meta(), "method": self.method,
                "k": self.k, "seed": self.seed, "projection": self.projection if self.method == "sketch" else None,
                **({} if self.preconditioner is None else {"preconditioner": self.preconditioner}),
                **({} if self.output_sketch is None else {"output_sketch": self.output_sketch.record()}),
                **({} if self.output_fn is None else {"output_fn": getattr(self.output_fn, "__qualname__",
                                                                            repr(self.output_fn))})}


def _check_computation(fn: str, o: dict[str, Any], rules: tuple[str, ...], strict_nodes: bool) -> None:
    """The options of every computation (outputs, rule and nodes, output_fn, diagonal, backend, precision,
    dtype, memory budget, method), checked in place; ``dtype`` and ``memory_budget`` are normalised."""
    if "outputs" in o and o["outputs"] not in OUTPUTS:
        _checks.check_choice(fn, "outputs", o["outputs"], OUTPUTS + OUTPUT_SKETCHES)
    if "rule" in o:
        _checks.check_choice(fn, "rule", o["rule"], RULES)
        if o["rule"] not in rules:
            raise ValueError(_rule_refusal(fn, o["rule"], rules))
    if "nodes" in o:
        _checks.check_nodes(fn, o["nodes"])
        if strict_nodes and o["nodes"] != DEFAULT_NODES and o.get("rule", "left") != "exact":
            raise ValueError(f"{fn}: nodes={o['nodes']} applies to rule='exact'; found rule={o.get('rule', 'left')!r}")
    if o.get("output_fn") is not None and not callable(o["output_fn"]):
        raise TypeError(f"{fn}: output_fn must be a function from the model's output to a tensor (e.g. lambda o: "
                        f"o.logits); found {type(o['output_fn']).__name__}")
    if "diagonal" in o and not isinstance(o["diagonal"], bool):
        raise TypeError(f"{fn}: diagonal must be True or False; found {o['diagonal']!r}")
    if "backend" in o:
        _checks.check_choice(fn, "backend", o["backend"], BACKENDS)
    if "precision" in o:
        _checks.check_choice(fn, "precision", o["precision"], PRECISIONS)
    if "dtype" in o:
        o["dtype"] = _checks.check_dtype(fn, o["dtype"])
    if "memory_budget" in o:
        o["memory_budget"] = _checks.check_memory_budget(fn, o["memory_budget"])
    if "method" in o:
        _checks.check_choice(fn, "method", o["method"], METHODS)


def _check_sketch(fn: str, o: dict[str, Any]) -> None:
    """The sketch's options (k, seed, projection: only with ``method="sketch"``, and a symmetric rule), checked
    in place; ``k`` and ``seed`` become ints."""
    if "k" in o and o["k"] is not None:
        k = o["k"]
        if isinstance(k, bool) or not isinstance(k, numbers.Integral) or k < 1:
            raise ValueError(f"{fn}: k (the sketch size, columns of each projection) must be an integer ≥ 1; "
                             f"found {k!r}")
        o["k"] = int(k)
    if "seed" in o and o["seed"] is not None:
        if isinstance(o["seed"], bool) or not isinstance(o["seed"], numbers.Integral):
            raise TypeError(f"{fn}: seed must be an integer; found {o['seed']!r}")
        o["seed"] = int(o["seed"])
    if "projection" in o:
        _checks.check_choice(fn, "projection", o["projection"], PROJECTIONS)
    if (o.get("k") is not None or o.get("seed") is not None or o.get("projection", "auto") != "auto") \
            and o.get("method", "sketch") != "sketch":
        raise ValueError(f"{fn}: k, seed and projection set the random projection of method='sketch'; found "
                         f"method={o['method']!r}")
    if o.get("method") == "sketch" and o.get("rule", "left") not in SKETCH_RULES:
        raise ValueError(_rule_refusal(fn, o["rule"], SKETCH_RULES))


def _check_of(fn: str, o: dict[str, Any], trajectory: Any) -> None:
    """``of`` and ``loss``: the loss resolved for ``of="loss"`` (one output, so ``outputs="full"`` is the trace),
    refused otherwise."""
    if "of" in o:
        _checks.check_choice(fn, "of", o["of"], OF)
        if o["of"] == "loss":
            o["loss"] = _loss_spec(o.get("loss"), trajectory, fn)
            if o.get("outputs") == "full":
                o["outputs"] = "trace"  # one output: the three modes coincide
        elif o.get("loss") is not None:
            raise ValueError(f"{fn}: loss applies to of='loss'; found of={o['of']!r}")


def _rule_refusal(fn: str, rule: str, rules: tuple[str, ...]) -> str:
    if rule == "exact" and "exact" not in rules:
        return (f"{fn}: rule={rule!r} cannot be sketched: the exact path kernel is asymmetric (K(x, x′) ≠ K(x′, x)), "
                "while Φ(x)·Φ(x′) is the Gram of one feature map and hence symmetric; expected rule='left' or "
                "'trapezoid' (use pkfast.gram(..., rule='exact') for the exact kernel)")
    return f"{fn}: rule={rule!r} is not available here; expected one of {', '.join(map(repr, rules))}"


def _loss_spec(loss: Any, trajectory: Any, fn: str) -> LossSpec:
    """The loss of ``of="loss"``: ``loss`` as a :class:`LossSpec`, else the one recorded with the trajectory."""
    if loss is None:
        rec = None if trajectory is None else trajectory.meta.get("loss")
        if rec is None:
            raise ValueError(f"{fn}: of='loss' needs a loss (nn.CrossEntropyLoss(), nn.MSELoss(), a pkfast.LossSpec "
                             "or 'cross_entropy'/'mse'); none was passed and the trajectory recorded none")
        return LossSpec.from_module(rec, fn=fn)
    return LossSpec.from_module(loss, fn=fn)


def _adaptive_optimizer(trajectory: Any) -> str | None:
    """The class name of the trajectory's recorded optimizer when it is adaptive (Adam, AdamW, RMSprop, Adagrad)."""
    try:
        opt = trajectory.optimizer
    except Exception:  # noqa: BLE001 — a malformed record: no optimizer known here (loading refuses it elsewhere)
        return None
    return opt.class_name if opt is not None and opt.kind.adaptive else None


def _outside_pkfast() -> int:
    """The ``stacklevel`` of the first frame outside pkfast (a warning then points at the user's call)."""
    import sys

    level, f = 1, sys._getframe(1)
    while f is not None and f.f_globals.get("__name__", "").startswith("pkfast"):
        level, f = level + 1, f.f_back
    return level


def resolve_preconditioner(fn: str, value: Any, trajectory: Any) -> str | None:
    """The kernel's preconditioner for ``preconditioner=value`` (:data:`PRECONDITIONERS` or None) on ``trajectory``:
    ``"recorded"`` where it is used, ``"none"`` for the Euclidean kernel of an adaptive optimizer's trajectory
    (``"auto"`` warns then: its kernel machine is not the trained network), None where there is no choice (a
    trajectory without an adaptive optimizer). ``"recorded"`` on a trajectory without a recorded one is refused."""
    value = "none" if value is None else value
    _checks.check_choice(fn, "preconditioner", value, PRECONDITIONERS)
    has = trajectory is not None and bool(getattr(trajectory, "has_preconditioner", False))
    adaptive = None if trajectory is None else _adaptive_optimizer(trajectory)
    if value == "recorded" and not has:
        raise ValueError(f"{fn}: preconditioner='recorded' needs a trajectory that records each step's "
                         f"preconditioner; this one records none (optimizer: {adaptive or 'not adaptive or unknown'}). "
                         "Record the run with pkfast.TrajectoryRecorder (Adam, AdamW, RMSprop or Adagrad), or pass "
                         "preconditioner=None for the Euclidean path kernel")
    if value == "auto" and has:
        return "recorded"
    if value == "auto" and adaptive:
        import warnings

        warnings.warn(f"{fn}: the trajectory's optimizer is {adaptive} but its per-step preconditioner was not "
                      "recorded: computing the Euclidean path kernel Σ ε_s ∇f·∇f′ (preconditioner=None), whose kernel "
                      f"machine is not the {adaptive}-trained network. Record the run with pkfast.TrajectoryRecorder "
                      "for the preconditioned kernel, or pass preconditioner=None to choose the Euclidean one "
                      "without this warning", stacklevel=_outside_pkfast())
    return "recorded" if value == "recorded" else ("none" if has or adaptive else None)


# ---------------------------------------------------------------------------------------------- the budget
def default_memory_budget(device: torch.device) -> int:
    """Half of the memory currently free on ``device`` (host RAM for CPU)."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free * 0.5)
    try:
        avail = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):  # pragma: no cover - non-POSIX
        avail = 8 * 2**30
    return int(avail * 0.5)


def resolve_budget(memory_budget: int | None, device: torch.device) -> int:
    """The one budget rule: the validated ``memory_budget``, else :func:`default_memory_budget` of ``device``."""
    return int(memory_budget) if memory_budget is not None else default_memory_budget(device)


def stream_bytes(budget: int) -> int:
    """The streaming workspace held out of ``budget``: :data:`STREAM_BYTES`, at most a quarter of the budget."""
    return max(1, min(STREAM_BYTES, budget // 4))


def model_device(model: torch.nn.Module) -> torch.device:
    """Where a model's parameters live (CPU for a model without any): the compute device."""
    return next(iter(model.parameters()), torch.empty(0)).device
