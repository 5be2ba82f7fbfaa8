"""User UDFs: the `@udf` decorator, and reading its declaration from source without importing.

    from vlmspec.compiler.udf import udf

    @udf(output="int32", inputs=["question"])
    def question_words(question, *, min_len=1): ...

The compiler never imports a user module: it parses the file, finds the decorated function and
reads the decorator's literal arguments. Only `apply` imports it, and only because the spec names it.
"""

from __future__ import annotations

import ast
import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable


def udf(*, output: str | None = None, inputs: list[str] | None = None, batch: bool = True,
        batch_size: int | None = None, parallel: bool | None = None) -> Callable:
    """Declare a function as a vlmspec UDF.

    Args:
        output: Arrow type of the result (e.g. `int32`, `list<string>`).
        inputs: default input columns, in the function's positional order.
        batch: True if it takes `pa.Array`s and returns an array; False to be called per row with
            Python values (the engine maps it).
        batch_size: preferred rows per call.
        parallel: spread batches over worker processes (default: True for per-row UDFs).
    """

    def mark(fn: Callable) -> Callable:
        fn.__vlmspec_udf__ = {"output": output, "inputs": inputs, "batch": batch, "batch_size": batch_size,
                              "parallel": parallel}
        return fn

    return mark


@dataclass(frozen=True)
class UdfSource:
    """A UDF located in source: file, parsed module and the function/class node."""

    file: Path
    module: ast.Module
    node: ast.FunctionDef | ast.ClassDef
    declared: dict[str, Any]


class UdfLookupError(LookupError):
    """The module or function cannot be found, or its declaration is not literal."""


def find_module_file(module: str, search_dir: Path | None) -> Path:
    """`module` as a file next to the spec (preferred) or an importable module, without importing it."""
    if search_dir is not None:
        rel = Path(*module.split("."))
        for cand in (search_dir / rel.with_suffix(".py"), search_dir / rel / "__init__.py"):
            if cand.is_file():
                return cand
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.origin or not spec.origin.endswith(".py"):
        where = f" next to the spec ({search_dir})" if search_dir else ""
        raise UdfLookupError(f"no module `{module}`{where} or on the Python path")
    return Path(spec.origin)


def read_udf(module: str, function: str, search_dir: Path | None) -> UdfSource:
    """Locate `module:function` and read its `@udf(...)` declaration from the AST."""
    path = find_module_file(module, search_dir)
    try:
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    except (SyntaxError, UnicodeDecodeError, OSError) as e:
        raise UdfLookupError(f"cannot parse `{path}`: {e}") from None
    node = next((n for n in tree.body if isinstance(n, (ast.FunctionDef, ast.ClassDef)) and n.name == function), None)
    if node is None:
        names = [n.name for n in tree.body if isinstance(n, (ast.FunctionDef, ast.ClassDef))]
        raise UdfLookupError(f"module `{module}` ({path}) has no function `{function}`; it has: {', '.join(names) or 'none'}")
    declared: dict[str, Any] = {}
    for deco in node.decorator_list:
        if isinstance(deco, ast.Call) and _name(deco.func).rsplit(".", 1)[-1] == "udf":
            for kw in deco.keywords:
                try:
                    declared[kw.arg] = ast.literal_eval(kw.value)
                except ValueError:
                    raise UdfLookupError(f"`@udf({kw.arg}=...)` on `{function}` must be a literal") from None
            break
    else:
        raise UdfLookupError(f"`{module}:{function}` is not decorated with `@udf(...)` from vlmspec.compiler.udf")
    return UdfSource(path, tree, node, declared)


def _name(node: ast.AST) -> str:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return f"{_name(node.value)}.{node.attr}"
    return ""
