"""The product's layer rules, checked over its real import graph (imports inside functions count).

Rules (README, "Layout and development"):
1. the compiler imports nothing from the runtime;
2. no import cycles among product modules (everything but `runtime/tools/`);
3. ground modules (Lance I/O, UDFs, sources, curation, the loader, metrics, report, history) import
   none of the orchestration: apply, train, evaluate, cli;
4. the product imports nothing from the tools, except the CLI mounting `vlmspec bench`.
`violations(root)` returns every broken rule as text; tests run it on the checkout and on a copy with
a planted violation, to show it can fail.
"""

from __future__ import annotations

import ast
import graphlib
from pathlib import Path

PACKAGES = {"compiler": "vlmspec.compiler", "runtime": "vlmspec.runtime"}
GROUND = ("vlmspec.runtime.lance_io", "vlmspec.runtime.udfs", "vlmspec.runtime.sources", "vlmspec.runtime.curate",
          "vlmspec.runtime.train.loader", "vlmspec.runtime.train.direct_read", "vlmspec.runtime.eval.metrics",
          "vlmspec.runtime.eval.report", "vlmspec.runtime.history")
ORCHESTRATION = ("vlmspec.runtime.apply", "vlmspec.runtime.train.loop", "vlmspec.runtime.train.start", "vlmspec.runtime.eval.evaluate",
                 "vlmspec.runtime.cli")
TOOLS = "vlmspec.runtime.tools"
ALLOWED_TOOL_IMPORTS = {("vlmspec.runtime.cli", "vlmspec.runtime.tools.bench.commands")}


def _under(mod: str, prefixes) -> bool:
    prefixes = (prefixes,) if isinstance(prefixes, str) else prefixes
    return any(mod == p or mod.startswith(p + ".") for p in prefixes)


def modules(root: Path) -> dict[str, Path]:
    out = {}
    for folder, pkg in PACKAGES.items():
        for f in sorted((root / folder).rglob("*.py")):
            parts = list(f.relative_to(root / folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join([pkg, *parts])] = f
    return out


def import_graph(root: Path) -> dict[str, set[str]]:
    """Module -> the product modules it imports, anywhere in its body."""
    mods = modules(root)
    graph: dict[str, set[str]] = {}
    for mod, f in mods.items():
        package = mod if f.name == "__init__.py" else mod.rsplit(".", 1)[0]
        deps: set[str] = set()
        for node in ast.walk(ast.parse(f.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")
                    base = base[: len(base) - (node.level - 1)]
                    name = ".".join(base + ([node.module] if node.module else []))
                else:
                    name = node.module or ""
                for alias in node.names:  # `from pkg import module` imports the module
                    full = f"{name}.{alias.name}"
                    deps.add(full if full in mods else name)
            elif isinstance(node, ast.Import):
                deps.update(a.name for a in node.names)
        graph[mod] = {d for d in deps if d in mods and d != mod}
    return graph


def violations(root: Path) -> list[str]:
    graph = import_graph(root)
    found = []
    for mod, deps in sorted(graph.items()):
        for dep in sorted(deps):
            if _under(mod, "vlmspec.compiler") and _under(dep, "vlmspec.runtime"):
                found.append(f"compiler imports runtime: {mod} -> {dep}")
            if _under(mod, GROUND) and _under(dep, ORCHESTRATION):
                found.append(f"ground module imports orchestration: {mod} -> {dep}")
            if not _under(mod, TOOLS) and _under(dep, TOOLS) and (mod, dep) not in ALLOWED_TOOL_IMPORTS:
                found.append(f"product imports tools: {mod} -> {dep}")
    product = {m: {d for d in deps if not _under(d, TOOLS)} for m, deps in graph.items() if not _under(m, TOOLS)}
    # A package's __init__ imported by its own submodules is not a cycle worth naming; importing a
    # submodule runs its package's __init__ anyway.
    product = {m: {d for d in deps if not _under(m, d)} for m, deps in product.items()}
    try:
        graphlib.TopologicalSorter(product).prepare()
    except graphlib.CycleError as e:
        found.append("import cycle: " + " -> ".join(e.args[1]))
    return found


MAX_MODULE_LINES, MAX_FUNCTION_LINES = 600, 120


def oversized(root: Path) -> list[str]:
    """Product modules over 600 lines and functions over 120 (the tools are exempt: benchmarks)."""
    found = []
    for mod, f in modules(root).items():
        if _under(mod, TOOLS):
            continue
        src = f.read_text(encoding="utf-8")
        if len(src.splitlines()) > MAX_MODULE_LINES:
            found.append(f"{mod}: {len(src.splitlines())} lines")
        for node in ast.walk(ast.parse(src)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and \
                    node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES:
                found.append(f"{mod}.{node.name}: {node.end_lineno - node.lineno + 1} lines")
    return found
