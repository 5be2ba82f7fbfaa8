"""The `@udf` decorator, and reading its declaration from source without importing.

    from vlmspec.compiler.udf import udf

    @udf(output="int32", inputs=["question"])
    def question_words(question, *, min_len=1): ...

The compiler never imports a user module: it parses the file, finds the decorated function and
reads the decorator's literal arguments. Only `apply` imports it, and only because the spec names it.
The builtins in `vlmspec.runtime.udfs` declare themselves the same way (`catalog.BUILTINS`).
"""

from __future__ import annotations

import ast
import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable


def udf(*, output: str | None = None, inputs: list[str] | None = None, batch: bool = True,
        batch_size: int | None = None, parallel: bool | None = None, accepts: list[str] | None = None,
        params: dict[str, dict[str, Any]] | None = None, tuning: dict[str, dict[str, Any]] | None = None,
        version: str | None = None, name: str | None = None, shape: str | None = None, model: bool = False,
        gpu: bool = False) -> Callable:
    """Declare a function (or a class, built once with a `UdfContext`) as a vlmspec UDF.

    Every argument must be a literal: the compiler reads them from source without importing.

    Args:
        output: Arrow type of the result (e.g. `int32`, `list<string>`); a builtin's may be a
            template over its params and the model's facts (`fixed_size_list<...>[{max_tokens}]`).
        inputs: default input columns, in the function's positional order.
        batch: True if it takes `pa.Array`s and returns an array; False to be called per row with
            Python values (the engine maps it).
        batch_size: preferred rows per call.
        parallel: spread batches over worker processes (default: True for per-row UDFs).
        accepts: the Arrow type pattern each input accepts (`string`, `binary`, `list`; see
            `types.accepts`), checked against the input columns; default: any.
        params: declared keyword parameters, name -> `{"type": "int"|"float"|"bool"|"str",
            "default": ..., "min": ..., "max": ..., "choices": [...], "doc": "..."}`; values in a spec
            are checked against them and defaults fill in (fingerprinted). Undeclared: unchecked.
        tuning: declared speed knobs in the same form; a column sets them under `tuning:`, a class
            UDF reads them from `UdfContext.tuning`. Never fingerprinted: they must not change values.
        version: stands for the code in the fingerprint; bump it when outputs change. Without it
            the function's source is hashed.
        name: builtins only: the `family.name` a spec uses (`image.dhash`).
        shape: builtins only: the plan's shape template (`fp16[{image_tokens}x{hidden_size}]`).
        model: builtins only: built with the spec's model (fingerprinted with the model's identity).
        gpu: builtins only: runs on a GPU when there is one.
    """

    def mark(fn: Callable) -> Callable:
        fn.__vlmspec_udf__ = {"output": output, "inputs": inputs, "batch": batch, "batch_size": batch_size,
                              "parallel": parallel, "accepts": accepts, "params": params, "tuning": tuning,
                              "version": version, "name": name, "shape": shape, "model": model, "gpu": gpu}
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
    tree = _parse(path)
    node = next((n for n in tree.body if isinstance(n, (ast.FunctionDef, ast.ClassDef)) and n.name == function), None)
    if node is None:
        names = [n.name for n in tree.body if isinstance(n, (ast.FunctionDef, ast.ClassDef))]
        raise UdfLookupError(f"module `{module}` ({path}) has no function `{function}`; it has: {', '.join(names) or 'none'}")
    declared = _declaration(node)
    if declared is None:
        raise UdfLookupError(f"`{module}:{function}` is not decorated with `@udf(...)` from vlmspec.compiler.udf")
    return UdfSource(path, tree, node, declared)


def read_declarations(path: Path) -> list[UdfSource]:
    """Every top-level function or class of the file `path` decorated with `@udf(...)`, in order."""
    tree = _parse(path)
    out = []
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            declared = _declaration(node)
            if declared is not None:
                out.append(UdfSource(path, tree, node, declared))
    return out


def positional_names(node: ast.FunctionDef | ast.ClassDef) -> list[str]:
    """Names of the positional parameters of a function, or of a class's `__call__` after `self`."""
    if isinstance(node, ast.ClassDef):
        call = next((n for n in node.body if isinstance(n, ast.FunctionDef) and n.name == "__call__"), None)
        return positional_names(call)[1:] if call is not None else []
    args = node.args
    return [a.arg for a in args.posonlyargs + args.args]


def _parse(path: Path) -> ast.Module:
    try:
        return ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    except (SyntaxError, UnicodeDecodeError, OSError) as e:
        raise UdfLookupError(f"cannot parse `{path}`: {e}") from None


def _declaration(node: ast.FunctionDef | ast.ClassDef) -> dict[str, Any] | None:
    """The literal keyword arguments of the node's `@udf(...)`, or None when it has none."""
    for deco in node.decorator_list:
        if isinstance(deco, ast.Call) and _name(deco.func).rsplit(".", 1)[-1] == "udf":
            declared: dict[str, Any] = {}
            for kw in deco.keywords:
                try:
                    declared[kw.arg] = ast.literal_eval(kw.value)
                except ValueError:
                    raise UdfLookupError(f"`@udf({kw.arg}=...)` on `{node.name}` must be a literal") from None
            return declared
    return None


def _name(node: ast.AST) -> str:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return f"{_name(node.value)}.{node.attr}"
    return ""
