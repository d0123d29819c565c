"""The package's imports run one way: no circle among modules, and each layer imports only those below it.

Every `import` in a module counts, at module level or inside a function (the whole AST is walked),
since a function-level import is a dependency all the same, only hidden until called.
"""
from __future__ import annotations

import ast
import os
from collections import defaultdict

import pyllama_jax

ROOT = os.path.dirname(pyllama_jax.__file__)
PACKAGE = "pyllama_jax"
FACADE = "facade"  # `pyllama_jax/__init__.py`, the lazy package facade

# layer -> the layers it must not import (each a subpackage or a top-level module of ours)
FORBIDDEN = {
    "sharding": "*",  # nothing of ours besides itself
    "kernels": ("model", "convert", "quant", "api", FACADE),
    "data": ("model", "convert", "quant", "api", FACADE),
    "tokenizer": ("model", "convert", "quant", "api", FACADE),
    "tokenizer_tiktoken": ("model", "convert", "quant", "api", FACADE),
    "chat_templates": ("model", "convert", "quant", "api", FACADE),
    "model": ("convert", "quant", "serve", "api", "train", "eval", "jobs", "generate", "config", FACADE),
    "convert": ("quant", "api", "serve", "train", "eval", "jobs", "generate", "config", FACADE),
    "quant": ("api", "serve", "train", "eval", "jobs", "generate", "config", FACADE),
}


def modules() -> dict[str, str]:
    """Dotted module name -> file path, for every module of the package."""
    out = {}
    for folder, _, files in os.walk(ROOT):
        for f in files:
            if f.endswith(".py"):
                rel = os.path.relpath(os.path.join(folder, f), os.path.dirname(ROOT))[:-3].split(os.sep)
                out[".".join(rel[:-1] if rel[-1] == "__init__" else rel)] = os.path.join(folder, f)
    return out


def _targets(node: ast.AST, module: str, is_package: bool, known: set[str]) -> list[str]:
    """Our modules that one import statement loads (`from a import b`: `a.b` if it is a module)."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names]
    if not isinstance(node, ast.ImportFrom):
        return []
    base = node.module or ""
    if node.level:
        parts = module.split(".")
        anchor = parts if is_package else parts[:-1]
        anchor = anchor[:len(anchor) - node.level + 1]
        base = ".".join(anchor + ([base] if base else []))
    subs = [f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" in known]
    return subs if len(subs) == len(node.names) else [base, *subs]


def import_graph() -> dict[str, set[str]]:
    """Module -> the modules of ours it imports anywhere in its source."""
    found = modules()
    known = set(found)
    graph: dict[str, set[str]] = {}
    for module, path in found.items():
        with open(path) as f:
            tree = ast.parse(f.read(), path)
        is_package = path.endswith("__init__.py")
        graph[module] = {t for node in ast.walk(tree) for t in _targets(node, module, is_package, known)
                         if (t == PACKAGE or t.startswith(PACKAGE + ".")) and t != module}
    return graph


def layer(module: str) -> str:
    """The layer a module belongs to: its subpackage or top-level module (`facade` for the package)."""
    parts = module.split(".")
    return FACADE if len(parts) == 1 else parts[1]


def layer_graph() -> dict[str, set[str]]:
    """Layer -> the other layers it imports."""
    out: dict[str, set[str]] = defaultdict(set)
    for module, targets in import_graph().items():
        out[layer(module)].update(layer(t) for t in targets if layer(t) != layer(module))
    return dict(out)


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one member (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_cycle_finder_finds_a_planted_cycle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert cycles(graph) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_graph_sees_function_level_and_relative_imports():
    tree = ast.parse("def f():\n    from pyllama_jax.api import Model\n    from . import rules\n")
    known = {"pyllama_jax.api", "pyllama_jax.sharding.rules", "pyllama_jax.sharding.mesh"}
    targets = [t for node in ast.walk(tree) for t in _targets(node, "pyllama_jax.sharding.mesh", False, known)]
    assert sorted(targets) == ["pyllama_jax.api", "pyllama_jax.sharding.rules"]


def test_no_import_cycle():
    found = cycles(import_graph())
    assert not found, "import cycles: " + "; ".join(" <-> ".join(c) for c in found)


def test_layers_import_only_downwards():
    wrong = []
    for module, targets in sorted(import_graph().items()):
        banned = FORBIDDEN.get(layer(module), ())
        for t in sorted(targets):
            if layer(t) != layer(module) and (banned == "*" or layer(t) in banned):
                wrong.append(f"{module} -> {t}")
    assert not wrong, "imports against the layering:\n" + "\n".join(wrong)


def test_no_cycle_between_layers():
    found = cycles(layer_graph())
    assert not found, "layers importing each other: " + "; ".join(" <-> ".join(c) for c in found)
