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
             "pkfast.engine.distributed", "pkfast.engine.costs", "pkfast.engine.resources", "pkfast.engine.resources.*",
             "pkfast.engine.output_sketch"],
    "store": ["pkfast.store.formats", "pkfast.store.reader", "pkfast.store.writer", "pkfast.store.ranks",
              "pkfast.store.features", "pkfast.store.sinks", "pkfast.store"],
    "trajectory": ["pkfast.trajectory.checks", "pkfast.trajectory.files", "pkfast.trajectory.recording",
                   "pkfast.trajectory.optimizers", "pkfast.trajectory.state", "pkfast.trajectory.checkpoints",
                   "pkfast.trajectory.checkpoint_state",
                   "pkfast.trajectory.points", "pkfast.trajectory.fingerprints",
                   "pkfast.trajectory.recorder", "pkfast.trajectory"],
    "model": ["pkfast.engine.inputs", "pkfast.engine.per_sample", "pkfast.engine.functional"],
    "layers": ["pkfast.layers", "pkfast.layers.*"],
    "routes": ["pkfast.engine.capture", "pkfast.engine.capture.*", "pkfast.engine.routes", "pkfast.engine.routes.*"],
    "driver": ["pkfast.engine.driver", "pkfast.engine"],
    "doors": ["pkfast.gram", "pkfast.sketch", "pkfast.attribution", "pkfast.attribution.*", "pkfast.reference"],
    "machine": ["pkfast.machine.panels", "pkfast.machine.sweep", "pkfast.machine.adaptive",
                "pkfast.machine.adaptive_sweep", "pkfast.machine.data_check",
                "pkfast.machine.directional", "pkfast.machine.checks", "pkfast.machine.nodes",
                "pkfast.machine.kernel_machine", "pkfast.machine"],
    "entry": ["pkfast", "pkfast.cli", "pkfast.cli.*", "pkfast.__main__", "pkfast.integrations", "pkfast.integrations.*"],
}

#: The most lines a function may take: from its ``def`` line to the last line of its body, the docstring not
#: counted (documentation is not length; a long body wants pieces with one responsibility each).
MAX_FUNCTION_LINES = 80
#: Files whose functions may be longer: the Triton kernel (a ``@triton.jit`` body is one compiled unit).
LONG_FUNCTIONS_ALLOWED = {"pkfast/engine/accumulate/triton_kernel.py"}


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


#: The most modules a package may hold directly (``__init__``, ``__main__`` and ``_version`` not counted): past it,
#: a package no longer tells its data flow at a glance and wants a subpackage.
MAX_MODULES = {"pkfast": 10}
MAX_MODULES_PER_SUBPACKAGE = 12
_NOT_COUNTED = {"__init__.py", "__main__.py", "_version.py"}


def _package_sizes(root: Path = ROOT) -> dict[str, int]:
    """Modules directly in each package (directories holding an ``__init__.py``), by dotted name."""
    sizes = {}
    for init in [root / "__init__.py", *root.rglob("*/__init__.py")]:
        pkg = init.parent
        name = ".".join(("pkfast",) + pkg.relative_to(root).parts)
        sizes[name] = sum(1 for f in pkg.glob("*.py") if f.name not in _NOT_COUNTED)
    return sizes


def _oversized(sizes: dict[str, int]) -> dict[str, int]:
    return {n: k for n, k in sizes.items() if k > MAX_MODULES.get(n, MAX_MODULES_PER_SUBPACKAGE)}


def test_packages_stay_small():
    sizes = _package_sizes()
    assert sizes["pkfast"] >= 5 and len(sizes) >= 6, sizes  # (the walk found the tree)
    assert not _oversized(sizes), f"packages over their module count (top level {MAX_MODULES['pkfast']}, a " \
        f"subpackage {MAX_MODULES_PER_SUBPACKAGE}): {_oversized(sizes)}; group related modules into a subpackage"


def test_the_package_size_check_would_fail(tmp_path):
    (tmp_path / "__init__.py").write_text("")
    for i in range(11):
        (tmp_path / f"m{i}.py").write_text("")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "__init__.py").write_text("")
    assert _oversized(_package_sizes(tmp_path)) == {"pkfast": 11}


def test_no_module_over_500_lines():
    long = {m: n for m, p in _modules().items() if (n := len(p.read_text().splitlines())) > 500}
    assert not long, long


def _function_lines(node: ast.FunctionDef | ast.AsyncFunctionDef) -> int:
    """Lines from the ``def`` to the end of the body, less the docstring's."""
    n = node.end_lineno - node.lineno + 1
    doc = node.body[0]
    if isinstance(doc, ast.Expr) and isinstance(doc.value, ast.Constant) and isinstance(doc.value.value, str):
        n -= doc.end_lineno - doc.lineno + 1
    return n


def _long_functions(tree: ast.AST, prefix: str = "") -> list[str]:
    """``qualified name (line): n lines`` of every function or method in ``tree`` over the limit (nested ones
    too)."""
    out = []
    for node in ast.iter_child_nodes(tree):
        name = prefix
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            name = f"{prefix}{node.name}."
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and _function_lines(node) > MAX_FUNCTION_LINES:
            out.append(f"{name[:-1]} (line {node.lineno}): {_function_lines(node)} lines")
        out += _long_functions(node, name)
    return out


def test_no_function_over_80_lines():
    long = {}
    for p in sorted(ROOT.rglob("*.py")):
        rel = p.relative_to(ROOT.parent).as_posix()
        if rel not in LONG_FUNCTIONS_ALLOWED and (found := _long_functions(ast.parse(p.read_text()))):
            long[rel] = found
    assert not long, (f"functions over {MAX_FUNCTION_LINES} lines (def line to the end of the body, docstring not "
                      f"counted); split them: {long}")


def test_the_length_check_would_fail_on_a_long_function(tmp_path, monkeypatch):
    """The length check itself: a method of 81 lines is caught (its docstring aside), one of 80 is not, and the
    Triton kernel's file is exempt."""
    body = "\n".join(f"        x{i} = {i}" for i in range(78))
    ok = f'class A:\n    def f(self):\n        """One\n        docstring."""\n{body}\n        return x0\n'
    assert _long_functions(ast.parse(ok)) == []
    long = ok.replace("return x0", "x = 1\n        return x0")
    assert _long_functions(ast.parse(long)) == ["A.f (line 2): 81 lines"]
    root = tmp_path / "pkfast"
    (root / "engine" / "accumulate").mkdir(parents=True)
    (root / "engine" / "accumulate" / "triton_kernel.py").write_text(long)
    monkeypatch.setitem(globals(), "ROOT", root)
    test_no_function_over_80_lines()  # the exempt file alone passes
    (root / "engine" / "tiles.py").write_text(long)
    with pytest.raises(AssertionError, match=r"over 80 lines.*pkfast/engine/tiles\.py.*A\.f \(line 2\): 81 lines"):
        test_no_function_over_80_lines()


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
