"""The package's shape: no import cycle, and every import points down the layers of the data flow.

    base  ←  store  ←  trajectory  ←  model  ←  layers  ←  routes  ←  driver  ←  doors  ←  machine  ←  entry

A module may import modules of its own layer or of a lower one, never of a higher one (imports inside
functions count too). A new module must be placed in a layer here, deliberately.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "pkfast"

#: The layers, lowest first: module names (a trailing ".*" covers a subpackage's modules).
LAYERS = {
    "base": ["pkfast._version", "pkfast._checks", "pkfast.loss", "pkfast.engine.quadrature", "pkfast.engine.tiles",
             "pkfast.engine.accumulate", "pkfast.engine.accumulate.*", "pkfast.options", "pkfast.engine.products",
             "pkfast.engine.distributed", "pkfast.engine.alloc"],
    "store": ["pkfast.store.formats", "pkfast.store.reader", "pkfast.store.writer", "pkfast.store.features",
              "pkfast.store.sinks", "pkfast.store"],
    "trajectory": ["pkfast.trajectory.files", "pkfast.trajectory.checkpoints", "pkfast.trajectory.points",
                   "pkfast.trajectory.recorder", "pkfast.trajectory"],
    "model": ["pkfast.engine.inputs", "pkfast.engine.per_sample", "pkfast.engine.functional"],
    "layers": ["pkfast.layers", "pkfast.layers.*"],
    "routes": ["pkfast.engine.capture", "pkfast.engine.routes", "pkfast.engine.routes.*"],
    "driver": ["pkfast.engine.driver", "pkfast.engine"],
    "doors": ["pkfast.gram", "pkfast.sketch", "pkfast.attribution", "pkfast.reference"],
    "machine": ["pkfast.machine.panels", "pkfast.machine.sweep", "pkfast.machine.kernel_machine", "pkfast.machine"],
    "entry": ["pkfast", "pkfast.cli", "pkfast.__main__", "pkfast.integrations", "pkfast.integrations.*"],
}


def _modules() -> dict[str, Path]:
    out = {}
    for p in ROOT.rglob("*.py"):
        name = ".".join(("pkfast",) + p.relative_to(ROOT).with_suffix("").parts)
        out[name[: -len(".__init__")] if name.endswith(".__init__") else name] = p
    return out


def _rank(module: str) -> int:
    for i, (_, names) in enumerate(LAYERS.items()):
        for n in names:
            if module == n or (n.endswith(".*") and module.startswith(n[:-1])):
                return i
    raise AssertionError(f"{module} is in no layer of tests/test_architecture.py: place it deliberately")


def _imports(module: str, path: Path, known: set[str]) -> set[str]:
    """The pkfast modules ``module`` imports (``from pkfast.a import b`` is pkfast.a.b if that is a module, else
    pkfast.a; ``from pkfast import x`` is pkfast.x)."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([node.module] if node.module else []))
            subs = {f"{base}.{a.name}" for a in node.names} & known
            out |= subs if subs else {base}
    return {m for m in out if m in known and m != module and m != "pkfast"}


GRAPH = {m: _imports(m, p, set(_modules())) for m, p in _modules().items()}


def test_every_module_is_in_a_layer():
    for m in GRAPH:
        _rank(m)


@pytest.mark.parametrize("module", sorted(GRAPH))
def test_imports_point_down(module):
    up = sorted(m for m in GRAPH[module] if _rank(m) > _rank(module))
    names = list(LAYERS)
    assert not up, (f"{module} ({names[_rank(module)]}) imports a higher layer: "
                     + ", ".join(f"{m} ({names[_rank(m)]})" for m in up))


def test_no_import_cycle():
    state: dict[str, int] = {}

    def visit(m: str, path: list[str]) -> None:
        state[m] = 1
        for n in sorted(GRAPH[m]):
            if state.get(n) == 1:
                cycle = path[path.index(n):] + [n] if n in path else [m, n]
                raise AssertionError("import cycle: " + " → ".join(cycle))
            if n not in state:
                visit(n, path + [n])
        state[m] = 2

    for m in sorted(GRAPH):
        if m not in state:
            visit(m, [m])


def test_no_module_over_500_lines():
    long = {m: n for m, p in _modules().items() if (n := len(p.read_text().splitlines())) > 500}
    assert not long, long


def test_the_checks_would_fail_on_a_violation():
    """The checks themselves: an upward import and a cycle in a made-up graph are caught."""
    assert _rank("pkfast.layers.linear") > _rank("pkfast.options")
    global GRAPH
    saved = GRAPH
    try:
        GRAPH = {"pkfast.engine.quadrature": {"pkfast.engine.driver"}, "pkfast.engine.driver": {"pkfast.engine.quadrature"}}
        with pytest.raises(AssertionError, match="imports a higher layer"):
            test_imports_point_down("pkfast.engine.quadrature")
        with pytest.raises(AssertionError, match="import cycle"):
            test_no_import_cycle()
    finally:
        GRAPH = saved
