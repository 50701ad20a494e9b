"""The package's shape, as ../shared/ARCHITECTURE.md draws it: no import cycles, each layer
importing only the layers below it, no private name imported from another module, and no
function over 60 lines or more complex than radon's grade C."""

from __future__ import annotations

import ast
from functools import cache
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "vlprompt"

#: Top to bottom; a module may import its own layer and the layers below it. Modules at the top
#: of the package (``vlprompt.resources`` ...) are utilities every layer may use.
LAYERS = [("cli",), ("apps",), ("methods",), ("tta", "seg", "meta"), ("prompts",), ("data",), ("eval",),
          ("backbones",), ("zoo",)]


def _name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


@cache
def _modules() -> dict[str, ast.Module]:
    return {_name(p): ast.parse(p.read_text(), str(p)) for p in sorted(PACKAGE.rglob("*.py"))}


def _imports(module: str) -> list[tuple[str, str]]:
    """``(imported module, imported name)`` of every import in ``module`` (in functions too)."""
    modules, found = _modules(), []
    package = module if (PACKAGE.parent / module.replace(".", "/") / "__init__.py").exists() else module.rpartition(".")[0]
    for node in ast.walk(modules[module]):
        if isinstance(node, ast.Import):
            found += [(a.name, "") for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            for alias in node.names:
                full = f"{base}.{alias.name}"
                found.append((full, "") if full in modules else (base, alias.name))
    return [(m, n) for m, n in found if m == "vlprompt" or m.startswith("vlprompt.")]


def _owner(module: str) -> str:
    """The module an import lands in: the longest known prefix."""
    while module not in _modules():
        module = module.rpartition(".")[0]
    return module


def _layer(module: str) -> int | None:
    part = module.split(".")[1] if "." in module else ""
    return next((i for i, names in enumerate(LAYERS) if part in names), None)


def test_no_import_cycles():
    graph = {m: {_owner(i) for i, _ in _imports(m)} - {m} for m in _modules()}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[list[str]] = []

    def visit(node: str) -> None:  # Tarjan's strongly connected components
        index[node] = low[node] = len(index)
        stack.append(node)
        for nxt in graph[node]:
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for module in graph:
        if module not in index:
            visit(module)
    assert cycles == []


def test_each_layer_imports_only_the_layers_below_it():
    wrong = []
    for module in _modules():
        mine = _layer(module)
        for imported, _ in _imports(module):
            theirs = _layer(_owner(imported))
            if mine is not None and theirs is not None and theirs < mine:
                wrong.append(f"{module} -> {imported}")
    assert wrong == []


def test_no_private_name_is_imported_from_another_module():
    private = [f"{m} <- {i}.{n}" for m in _modules() for i, n in _imports(m)
               if n.startswith("_") and not n.startswith("__") and _owner(i) != m]
    assert private == []


def _functions() -> list[tuple[str, ast.FunctionDef | ast.AsyncFunctionDef]]:
    return [(m, node) for m, tree in _modules().items() for node in ast.walk(tree)
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))]


def test_no_function_is_longer_than_60_lines():
    long = [f"{m}:{f.name} ({f.end_lineno - f.lineno + 1} lines)" for m, f in _functions() if f.end_lineno - f.lineno + 1 > 60]
    assert long == []


def test_no_function_is_rated_worse_than_c():
    from radon.complexity import cc_rank, cc_visit

    worse = []
    for path in sorted(PACKAGE.rglob("*.py")):
        for block in cc_visit(path.read_text()):
            if cc_rank(block.complexity) > "C":
                worse.append(f"{_name(path)}:{block.name} ({cc_rank(block.complexity)}, {block.complexity})")
    assert worse == []
