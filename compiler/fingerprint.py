"""Fingerprints: content hashes that say when a column or step must be recomputed.

A column's fingerprint covers its UDF's identity and code (the AST of the function plus the
module-level names it uses, so comment and docstring edits do not count; a declared `version`
instead, which every builtin has), its params, output type, model identity for model UDFs, and its
parents' fingerprints. Descriptions and tuning knobs are not covered.
"""

from __future__ import annotations

import ast
import copy
import hashlib
import json
from typing import Any

# Bump when the runtime changes how columns are computed in a way old values don't reflect.
ENGINE_VERSION = "1"


def digest(obj: Any) -> str:
    """Short stable hash of a JSON-able value (keys sorted)."""
    blob = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def _strip_docstrings(node: ast.AST) -> ast.AST:
    for n in ast.walk(node):
        if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Module)):
            body = n.body
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant) \
                    and isinstance(body[0].value.value, str):
                n.body = body[1:] or [ast.Pass()]
    return node


def _top_level_names(module: ast.Module) -> dict[str, ast.stmt]:
    names: dict[str, ast.stmt] = {}
    for stmt in module.body:
        if isinstance(stmt, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names[stmt.name] = stmt
        elif isinstance(stmt, (ast.Assign, ast.AnnAssign)):
            targets = stmt.targets if isinstance(stmt, ast.Assign) else [stmt.target]
            for t in targets:
                for n in ast.walk(t):
                    if isinstance(n, ast.Name):
                        names[n.id] = stmt
        elif isinstance(stmt, (ast.Import, ast.ImportFrom)):
            for alias in stmt.names:
                names[(alias.asname or alias.name).split(".")[0]] = stmt
    return names


def code_hash(module: ast.Module, node: ast.stmt, *, with_decorators: bool = True) -> str:
    """Hash of `node` and every module-level definition it (transitively) refers to.

    Why the closure: a UDF that calls a helper or reads a regex table in its module must change
    fingerprint when they change, while unrelated edits elsewhere in the module must not.
    `with_decorators=False` hashes the body alone: a builtin's `@udf(...)` declaration (its version
    among it) is not part of the code its version stands for (`catalog.UdfSignature.code`).
    """
    defs = _top_level_names(module)
    root = node
    if not with_decorators and getattr(node, "decorator_list", None):
        root = copy.copy(node)  # shallow: only the decorator list differs, nothing is mutated
        root.decorator_list = []
    seen: set[int] = set()
    todo = [node]
    while todo:
        stmt = todo.pop()
        if id(stmt) in seen:
            continue
        seen.add(id(stmt))
        for n in ast.walk(root if stmt is node else stmt):
            if isinstance(n, ast.Name) and n.id in defs and id(defs[n.id]) not in seen:
                todo.append(defs[n.id])
    ordered = [root if s is node else s for s in module.body if id(s) in seen]
    dumps = []
    for stmt in ordered:
        clone = ast.parse(ast.unparse(stmt)).body[0]  # a copy we can strip without touching the tree
        dumps.append(ast.dump(_strip_docstrings(clone), annotate_fields=False, include_attributes=False))
    return hashlib.sha256("\n".join(dumps).encode()).hexdigest()[:16]
