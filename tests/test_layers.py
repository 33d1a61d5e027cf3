"""Imports run one way (docs/architecture.md, "Layers"): every ``semiseg`` import of every
module, at module level or inside a function, goes to the same layer or a lower one, and no
two modules import each other, directly or around a longer loop.

Imports are read with ``ast`` (nothing is imported), so a lazy import inside a function cannot
hide an arrow; only imports under ``if TYPE_CHECKING:`` (annotations, never run) are exempt.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"

# Lowest first; a module belongs to the layer of its longest matching prefix. Within a layer
# any arrow is allowed as long as it makes no cycle.
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("foundation", ("semiseg", "semiseg.errors", "semiseg.utils", "semiseg.config")),
    ("data, losses", ("semiseg.data", "semiseg.losses")),
    ("knowledge", ("semiseg.knowledge",)),  # knowledge/cli.py: the `semiseg knowledge` commands
    ("models", ("semiseg.models",)),
    ("methods", ("semiseg.methods",)),
    ("plugins", ("semiseg.plugins",)),
    ("composition root", ("semiseg.catalog",)),  # registers every built-in method and plug-in
    ("engine", ("semiseg.engine",)),  # engine/proxy_plot_cli.py: `semiseg plot-proxies`
    ("cli", ("semiseg.cli", "semiseg.__main__")),
]


def module_files(src: Path = SRC) -> dict[str, Path]:
    """Dotted module name -> file, for every module of the ``semiseg`` package."""
    modules = {}
    for path in sorted((src / "semiseg").rglob("*.py")):
        parts = list(path.relative_to(src).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        modules[".".join(parts)] = path
    return modules


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imported_names(tree: ast.AST, package: str) -> list[tuple[str, list[str], int]]:
    """(module, imported names, line) of every import outside ``if TYPE_CHECKING:`` blocks."""
    found: list[tuple[str, list[str], int]] = []

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            found.extend((alias.name, [], node.lineno) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolve against the importing package
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, *([base] if base else [])])
            found.append((base, [alias.name for alias in node.names], node.lineno))
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return found


def import_graph(src: Path = SRC) -> dict[str, dict[str, int]]:
    """Module -> {imported semiseg module: line of the first such import}."""
    modules = module_files(src)
    graph: dict[str, dict[str, int]] = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        edges: dict[str, int] = {}
        for module, names, line in _imported_names(ast.parse(path.read_text("utf-8")), package):
            if module != "semiseg" and not module.startswith("semiseg."):
                continue
            # ``from semiseg.data import layouts`` imports the module semiseg.data.layouts.
            targets = [f"{module}.{n}" for n in names if f"{module}.{n}" in modules] or [module]
            for target in targets:
                if target in modules and target != name:
                    edges.setdefault(target, line)
        graph[name] = edges
    return graph


def layer_of(module: str) -> int:
    best, rank = -1, -1
    for index, (_, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > best:
                best, rank = len(prefix), index
    if rank < 0:
        raise AssertionError(f"module {module} is in no layer; add it to LAYERS")
    return rank


def upward_imports(graph: dict[str, dict[str, int]]) -> list[str]:
    return [
        f"{module} (layer {LAYERS[layer_of(module)][0]}) imports {target} "
        f"(layer {LAYERS[layer_of(target)][0]}) at line {line}"
        for module, edges in sorted(graph.items())
        for target, line in sorted(edges.items())
        if layer_of(target) > layer_of(module)
    ]


def import_cycles(graph: dict[str, dict[str, int]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

    def connect(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in graph.get(node, {}):
            if target not in index:
                connect(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            connect(node)
    return cycles


GRAPH = import_graph()


def test_every_module_has_a_layer() -> None:
    for module in GRAPH:
        layer_of(module)


def test_no_import_goes_up_a_layer() -> None:
    upward = upward_imports(GRAPH)
    assert not upward, "imports against the layer order:\n" + "\n".join(upward)


def test_no_import_cycle() -> None:
    cycles = import_cycles(GRAPH)
    assert not cycles, "modules importing each other:\n" + "\n".join(map(str, cycles))


@pytest.mark.parametrize(("source", "expect_upward", "expect_cycle"), [
    ("def f():\n    from semiseg.engine.trainer import Trainer\n", True, False),
    ("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n"
     "    from semiseg.engine.trainer import Trainer\n", False, False),
    ("from semiseg.losses import segmentation\n", False, True),
])
def test_the_checks_see_lazy_imports_and_cycles(tmp_path: Path, source: str,
                                                 expect_upward: bool, expect_cycle: bool) -> None:
    """The checks themselves: a function-level upward import is caught, a TYPE_CHECKING one is
    not, and two modules importing each other are a cycle."""
    package = tmp_path / "semiseg"
    for folder in ("losses", "engine"):
        (package / folder).mkdir(parents=True)
        (package / folder / "__init__.py").write_text("")
    (package / "__init__.py").write_text("")
    (package / "engine" / "trainer.py").write_text("Trainer = 1\n")
    (package / "losses" / "segmentation.py").write_text("from semiseg.losses import ga\n")
    (package / "losses" / "ga.py").write_text(source)
    graph = import_graph(tmp_path)
    assert bool(upward_imports(graph)) == expect_upward
    assert bool(import_cycles(graph)) == expect_cycle
