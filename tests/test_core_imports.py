"""The floors hold: no import cycle among visionpeft's modules (function-level imports included), and
``import visionpeft`` stays light (no timm, open_clip, diffusers or transformers)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "visionpeft"
HEAVY = ("timm", "open_clip", "diffusers", "transformers")


def _modules() -> dict[str, Path]:
    """Dotted module name -> file; a package is named by its ``__init__.py``."""
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


class _Imports(ast.NodeVisitor):
    """Collects the modules a file imports, at any depth, except under ``if TYPE_CHECKING:``."""

    def __init__(self, name: str, is_package: bool, modules: dict[str, Path]) -> None:
        self.package = name if is_package else name.rpartition(".")[0]
        self.modules = modules
        self.targets: set[str] = set()

    def _nearest(self, dotted: str) -> str | None:
        while dotted and dotted not in self.modules:
            dotted = dotted.rpartition(".")[0]
        return dotted or None

    def visit_If(self, node: ast.If) -> None:
        if _is_type_checking(node):
            for child in node.orelse:
                self.visit(child)
        else:
            self.generic_visit(node)

    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            if alias.name.split(".")[0] == "visionpeft":
                self.targets.add(self._nearest(alias.name))

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        if node.level:
            base = self.package
            for _ in range(node.level - 1):
                base = base.rpartition(".")[0]
            base = f"{base}.{node.module}" if node.module else base
        else:
            base = node.module or ""
        if base.split(".")[0] != "visionpeft":
            return
        for alias in node.names:
            submodule = f"{base}.{alias.name}"
            self.targets.add(submodule if submodule in self.modules else self._nearest(base))


def import_graph() -> dict[str, set[str]]:
    """Module -> the visionpeft modules it imports. A package whose ``__init__`` discovers its modules with
    ``pkgutil`` imports each of them; one that imports lazily with ``importlib`` imports the submodules it names."""
    modules = _modules()
    graph = {}
    for name, path in modules.items():
        source = path.read_text()
        visitor = _Imports(name, path.name == "__init__.py", modules)
        visitor.visit(ast.parse(source, str(path)))
        edges = {t for t in visitor.targets if t is not None}
        if path.name == "__init__.py" and "pkgutil.iter_modules" in source:
            edges |= {m for m in modules if m.rpartition(".")[0] == name}
        if path.name == "__init__.py" and "importlib.import_module" in source:
            # lazy exports / subcommands: any string in the file that names a submodule is an import of it
            strings = {n.value for n in ast.walk(ast.parse(source)) if isinstance(n, ast.Constant)}
            edges |= {f"{name}.{s}" for s in strings if isinstance(s, str) and f"{name}.{s}" in modules}
        graph[name] = edges
    return graph


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle (as a path ``a -> b -> ... -> a``) per strongly connected component with a cycle."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[set[str]] = []

    def connect(v: str) -> None:  # Tarjan's algorithm
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.add(w)
                if w == v:
                    break
            if len(component) > 1 or v in graph[v]:
                components.append(component)

    for v in sorted(graph):
        if v not in index:
            connect(v)
    cycles = []
    for component in components:
        start = min(component)
        path, seen = [start], {start}
        while True:  # walk inside the component until a module repeats
            nxt = min(w for w in graph[path[-1]] if w in component)
            if nxt in seen:
                cycles.append(path[path.index(nxt) :] + [nxt])
                break
            path.append(nxt)
            seen.add(nxt)
    return cycles


def test_the_graph_sees_function_level_and_discovered_imports():
    graph = import_graph()
    assert "visionpeft.adapter" in graph["visionpeft"]  # a lazy export (importlib)
    assert "visionpeft.cli.train" in graph["visionpeft.cli"]
    assert "visionpeft.backbones.factory" in graph["visionpeft.data.transforms"]  # inside a function
    assert "visionpeft.backbones.detect" in graph["visionpeft.backbones"]  # a lazy export (importlib)
    assert "visionpeft.methods.coop" in graph["visionpeft.methods"]  # found by pkgutil
    assert "visionpeft" in graph["visionpeft.trainers.classification"]  # import visionpeft as vp


def test_cycles_are_found():
    assert find_cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c", "a"]]
    assert find_cycles({"a": {"a"}}) == [["a", "a"]]
    assert find_cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycles():
    cycles = find_cycles(import_graph())
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


#: What the backbones floor may import: itself, the layers and the ground floor's leaf modules.
BACKBONES_MAY_IMPORT = (
    "visionpeft.backbones",
    "visionpeft.layers",
    "visionpeft.errors",
    "visionpeft.io",
    "visionpeft.version",
)


def test_backbones_import_nothing_above_them():
    """No upward edge: the task models, trainers and commands build on the backbones, never the other way."""
    graph = import_graph()
    upward = {
        (module, target)
        for module, targets in graph.items()
        if module == "visionpeft.backbones" or module.startswith("visionpeft.backbones.")
        for target in targets
        if not any(target == floor or target.startswith(floor + ".") for floor in BACKBONES_MAY_IMPORT)
    }
    assert not upward, "backbones import upward: " + ", ".join(f"{m} -> {t}" for m, t in sorted(upward))


def _reads_library(node: ast.AST) -> bool:
    """``cfg.library``, ``config.model.library``, ``x["library"]``: a config's model library. (A bare name
    ``library`` is left alone: model cards call the library that loads an adapter folder so.)"""
    if isinstance(node, ast.Attribute):
        return node.attr == "library"
    return isinstance(node, ast.Subscript) and isinstance(node.slice, ast.Constant) and node.slice.value == "library"


def _is_string_literal(node: ast.AST) -> bool:
    if isinstance(node, (ast.Tuple, ast.List, ast.Set)):
        return any(_is_string_literal(element) for element in node.elts)
    return isinstance(node, ast.Constant) and isinstance(node.value, str)


def library_comparisons(source: str) -> list[int]:
    """Lines where a model library is compared with a string (``==``, ``!=``, ``in``, ``not in``)."""
    lines = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Compare):
            operands = [node.left, *node.comparators]
            if any(map(_reads_library, operands)) and any(map(_is_string_literal, operands)):
                lines.append(node.lineno)
    return lines


def test_the_library_comparison_scan_finds_the_forms_it_forbids():
    source = (
        'a = cfg.library == "timm"\nb = "open_clip" != config.model.library\nc = x.library in ("timm", "x")\n'
        'd = library(cfg.library)\ne = m["library"] not in {"timm"}\nf = cfg.library == other\n'
    )
    assert library_comparisons(source) == [1, 2, 3, 5]


def test_only_the_backbones_compare_model_libraries():
    """What differs between model libraries lives in their entries of ``backbones/libraries.py``: nothing else asks
    which library a model comes from."""
    found = [
        f"{path.relative_to(PACKAGE.parent)}:{line}"
        for name, path in _modules().items()
        if not (name == "visionpeft.backbones" or name.startswith("visionpeft.backbones."))
        for line in library_comparisons(path.read_text())
    ]
    assert not found, "library compared outside visionpeft/backbones: " + ", ".join(found)


def test_the_library_table_loads_no_torch():
    """The config layer reads ``model.library``'s choices from the table without importing torch."""
    code = "import sys, visionpeft.backbones.libraries; print('torch' in sys.modules)"
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=PACKAGE.parent, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "False"


@pytest.mark.slow
@pytest.mark.parametrize("module", ["visionpeft", "visionpeft.tasks", "visionpeft.checkpoint.folder"])
def test_importing_the_library_leaves_the_model_libraries_out(module):
    code = f"import sys, {module}; print(','.join(m for m in {HEAVY!r} if m in sys.modules))"
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=PACKAGE.parent, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == ""


class _ImportsWithTypeChecking(_Imports):
    """:class:`_Imports` that also counts the imports under ``if TYPE_CHECKING:``."""

    def visit_If(self, node: ast.If) -> None:
        self.generic_visit(node)


def test_the_sweep_modules_form_no_cycle_even_through_type_checking_imports():
    """``sweep/plan.py`` plans runs from a spec; ``spec.py`` reads the protocol names from ``protocol.py``, which
    knows no spec: no circle, not even one hidden under ``TYPE_CHECKING``."""
    modules = _modules()
    graph = {}
    for name, path in modules.items():
        if name.startswith("visionpeft.sweep"):
            visitor = _ImportsWithTypeChecking(name, path.name == "__init__.py", modules)
            visitor.visit(ast.parse(path.read_text(), str(path)))
            graph[name] = {t for t in visitor.targets if t is not None and t.startswith("visionpeft.sweep")}
    assert "visionpeft.sweep.spec" in graph["visionpeft.sweep.plan"]
    assert find_cycles(graph) == []
