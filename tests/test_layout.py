"""The package's layout is its architecture: layers that import downwards only, no import circles,
modules of one concept (no hand-written module over 500 lines).

Read from the source files of the installed package with ``ast``: the imports that run (at the top of
a module or inside a function), not those under ``if TYPE_CHECKING:`` (annotations only).
"""

from __future__ import annotations

import ast
from pathlib import Path

import mullama

PACKAGE = Path(mullama.__file__).resolve().parent
# Lowest first: a module may import its own layer and the layers before it, never one after it.
# The top-level modules (errors, cache paths, text helpers, the public __init__) sit outside the order.
LAYERS = ["native", "gguf", "structured", "hub", "chat", "generate", "server", "cli"]
MAX_LINES = 500


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _sources() -> dict[str, Path]:
    return {_module_name(path): path for path in PACKAGE.rglob("*.py") if "_bindings" not in path.parts}


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _runtime_imports(tree: ast.AST):
    """Import nodes that run, skipping ``if TYPE_CHECKING:`` bodies."""
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _is_type_checking(child):
                stack.extend(child.orelse)
            else:
                stack.append(child)


def _imports(name: str, path: Path, modules: set[str]) -> set[str]:
    """The mullama modules ``name`` imports when it runs."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in _runtime_imports(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        else:
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                stem = ".".join(base + ([node.module] if node.module else []))
            else:
                stem = node.module or ""
            targets = [stem] + [f"{stem}.{alias.name}" for alias in node.names]
        for target in targets:
            if target in modules and target != name:
                found.add(target)
    return found


def _graph() -> dict[str, set[str]]:
    sources = _sources()
    modules = set(sources)
    graph = {name: _imports(name, path, modules) for name, path in sources.items()}
    # Importing a package runs its __init__: ``from ..native import _library`` names the package too.
    return {name: {target for target in targets if not (target in sources and sources[target].name == "__init__.py"
                                                          and target.rpartition(".")[0] == "mullama"
                                                          and name.startswith(target + "."))}
            for name, targets in graph.items()}


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle, as the list of modules around it, or None."""
    state: dict[str, int] = {}
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for target in sorted(graph[node]):
            if state.get(target) == 1:
                return [*path[path.index(target):], target]
            if target not in state:
                found = visit(target)
                if found:
                    return found
        state[node] = 2
        path.pop()
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def _layer(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 2 or (len(parts) == 2 and parts[1] in LAYERS) else None


def test_the_graph_reader_sees_real_imports():
    graph = _graph()
    assert "mullama.native._library" in graph["mullama.generate._model"]
    assert "mullama.generate._model" not in graph["mullama.generate._embed"]  # an annotation only
    assert len(graph) > 50


def test_no_import_circles():
    cycle = _cycle(_graph())
    assert cycle is None, "import circle: " + " -> ".join(cycle or [])


def test_layers_import_downwards_only():
    upward = []
    for module, targets in _graph().items():
        layer = _layer(module)
        if layer is None:
            continue
        for target in targets:
            other = _layer(target)
            if other is not None and LAYERS.index(other) > LAYERS.index(layer):
                upward.append(f"{module} imports {target}")
    assert upward == []


def test_every_module_belongs_to_a_layer_or_is_a_known_foundation():
    top_level = {name for name in _sources() if name.count(".") == 1 and _layer(name) is None}
    assert top_level == {"mullama.__main__", "mullama._exceptions", "mullama._paths", "mullama._text"}


def test_no_hand_written_module_over_500_lines():
    long = {name: n for name, path in _sources().items()
            if (n := len(path.read_text(encoding="utf-8").splitlines())) > MAX_LINES}
    tests = Path(__file__).resolve().parent
    long |= {path.name: n for path in tests.glob("*.py")
             if (n := len(path.read_text(encoding="utf-8").splitlines())) > MAX_LINES}
    assert long == {}
