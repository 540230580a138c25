"""Print the import graph's cycles among the project's own modules (lm/, kernels/).

    python benchmarks/import_cycles.py [--verbose]

Edges come from the source (ast), not from running it, in three kinds:
  module    an import at a module's top level (what runs when the module is imported)
  typing    under `if TYPE_CHECKING:` (seen by type checkers only)
  function  inside a function or method (runs when called)
`from A import b` is an edge to A.b when that is a module, else to A. Implicit imports
of parent packages are not edges. For each graph (module; module + typing; all) it prints
the strongly connected components of more than one module (the cycles), then the
module-level imports placed after other code ("mid-file") and module `__getattr__`s,
the usual ways a cycle is made to work.
"""

from __future__ import annotations

import ast
import sys
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("lm", "kernels")


def modules() -> dict[str, Path]:
    out = {}
    for pkg in PACKAGES:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join(parts)] = path
    return out


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def edges(name: str, path: Path, known: set[str]) -> tuple[list, list, bool]:
    """([(target, kind)], [mid-file import lines], has a module __getattr__)."""
    tree = ast.parse(path.read_text())
    is_pkg = path.name == "__init__.py"
    out, mid = [], []

    def resolve(node) -> list[str]:
        if isinstance(node, ast.Import):
            return [a.name for a in node.names]
        base = node.module or ""
        if node.level:
            parts = name.split(".")
            parts = parts if is_pkg else parts[:-1]
            parts = parts[:len(parts) - node.level + 1]
            base = ".".join(parts + ([node.module] if node.module else []))
        return [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]

    def visit(node, kind):
        for child in ast.iter_child_nodes(node):
            k = kind
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
                k = "function"
            elif isinstance(child, ast.If) and _is_type_checking(child.test) and kind == "module":
                for sub in child.body:
                    visit_stmt(sub, "typing")
                for sub in child.orelse:
                    visit_stmt(sub, "module")
                continue
            visit_stmt(child, k)

    def visit_stmt(node, kind):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            for target in resolve(node):
                top = target.split(".")[0]
                if top in PACKAGES:
                    while target not in known and "." in target:
                        target = target.rsplit(".", 1)[0]
                    if target in known and target != name:
                        out.append((target, kind))
        visit(node, kind)

    visit(tree, "module")
    seen_code = False
    for stmt in tree.body:  # mid-file: a top-level import after other top-level code
        if isinstance(stmt, (ast.Import, ast.ImportFrom)):
            if seen_code and any(t.split(".")[0] in PACKAGES for t in resolve(stmt)):
                mid.append(f"{path.relative_to(ROOT)}:{stmt.lineno}")
        elif not (isinstance(stmt, ast.Expr) and isinstance(stmt.value, ast.Constant)) and not (
                isinstance(stmt, ast.If) and _is_type_checking(stmt.test)) and not (
                isinstance(stmt, ast.Try)):
            seen_code = True
    getattr_ = any(isinstance(s, ast.FunctionDef) and s.name == "__getattr__" for s in tree.body)
    return out, mid, getattr_


def sccs(graph: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's strongly connected components of more than one node."""
    index, low, stack, on, out = {}, {}, [], set(), []
    counter = [0]
    sys.setrecursionlimit(10000)

    def strong(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                strong(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            strong(v)
    return sorted(out, key=lambda c: (-len(c), c))


def graph() -> tuple[dict[str, dict[str, set[str]]], list[str], list[str], int]:
    """(edges by kind, mid-file imports, modules with a __getattr__, module count)."""
    mods = modules()
    known = set(mods)
    by_kind: dict[str, dict[str, set[str]]] = {k: defaultdict(set) for k in
                                               ("module", "typing", "function")}
    mids, getattrs = [], []
    for name, path in mods.items():
        es, mid, ga = edges(name, path, known)
        for target, kind in es:
            by_kind[kind][name].add(target)
        mids += mid
        if ga:
            getattrs.append(name)
    return by_kind, mids, getattrs, len(mods)


LAYERS = [("module-level", ("module",)), ("module-level + TYPE_CHECKING", ("module", "typing")),
          ("all (+ function-level)", ("module", "typing", "function"))]


def cycles(by_kind: dict[str, dict[str, set[str]]], kinds: tuple[str, ...]) -> list[list[str]]:
    merged: dict[str, set[str]] = defaultdict(set)
    for k in kinds:
        for a, bs in by_kind[k].items():
            merged[a] |= bs
    return sccs(merged)


def main(argv: list[str]) -> int:
    verbose = "--verbose" in argv
    by_kind, mids, getattrs, n_modules = graph()
    counts = {k: sum(len(v) for v in g.values()) for k, g in by_kind.items()}
    print(f"{n_modules} modules; import edges: {counts['module']} module-level, "
          f"{counts['typing']} TYPE_CHECKING, {counts['function']} function-level")
    for title, kinds in LAYERS:
        comps = cycles(by_kind, kinds)
        print(f"cycles, {title}: {len(comps)} component(s), "
              f"{sum(len(c) for c in comps)} modules")
        for comp in comps:
            shown = comp if verbose or len(comp) <= 8 else comp[:8] + [f"... ({len(comp)} in all)"]
            print("  " + ", ".join(shown))
    print(f"mid-file imports: {len(mids)}" + ("".join(f"\n  {m}" for m in mids)))
    print(f"module __getattr__: {len(getattrs)}" + ("".join(f"\n  {m}" for m in getattrs)))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
