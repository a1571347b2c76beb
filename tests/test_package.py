"""The package's shape: no import cycles, layers that import one way."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _import_graph(function_level: bool) -> dict[str, set[str]]:
    """longctx module -> the longctx modules it imports (ast; at module level, or anywhere in
    the file; imports under ``if TYPE_CHECKING`` never count)."""
    import ast

    files = {}
    for path in (ROOT / "longctx").rglob("*.py"):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        files[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    graph: dict[str, set[str]] = {}
    for name, path in files.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        statements = []
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
                continue
            inner = function_level or isinstance(node, (ast.If, ast.Try, ast.With))
            statements.extend(ast.walk(node) if inner else [node])
        targets = set()
        for node in statements:
            if isinstance(node, ast.Import):
                targets.update(a.name for a in node.names if a.name in files)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    up = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(up + ([node.module] if node.module else []))
                for a in node.names:  # "from pkg import submodule" imports the submodule
                    sub = f"{base}.{a.name}"
                    targets.add(sub if sub in files else base)
        graph[name] = {t for t in targets if t in files and t != name}
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    found: list[list[str]] = []

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                found.append([*path[path.index(nxt):], nxt])
            elif nxt not in state:
                visit(nxt, path)
        path.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [])
    return found


def test_no_import_cycles():
    """No import cycle anywhere in longctx, counting imports inside functions too: the layers
    import one way (kernels <- parallel <- models <- data/train), and so do the modules inside a
    layer (the linear kernels' base <- reference/triton/exchange; cli -> launcher -> entry)."""
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == [["a", "b", "c", "a"]]
    graph = _import_graph(function_level=True)
    assert "longctx.train.entry" in graph["longctx.train.launcher"]  # relative imports are read
    assert "longctx.kernels.linear.base" in graph["longctx.kernels.linear.triton"]
    assert not _cycles(graph), _cycles(graph)


LAYERS = ["kernels", "parallel", "models", "data", "train"]


def test_layers_import_downwards_only():
    """A layer never imports a layer below it; kernels never import torch.distributed."""
    graph = _import_graph(function_level=True)
    rank = {f"longctx.{name}": i for i, name in enumerate(LAYERS)}

    def layer(module: str) -> int | None:
        for prefix, i in rank.items():
            if module == prefix or module.startswith(prefix + "."):
                return i
        return None

    upward = [
        (m, t) for m, targets in graph.items() for t in targets
        if layer(m) is not None and layer(t) is not None and layer(t) > layer(m)
    ]
    assert not upward, upward
    for path in (ROOT / "longctx" / "kernels").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            assert not any(n.startswith("torch.distributed") for n in names), path
