"""Pydantic validation errors -> located `Problem`s in plain words, with did-you-mean for unknown keys.

Walks the `Spec` model's types along each error's `loc` to say what was expected there and which
keys are valid, and the composed YAML nodes to say where.
"""

from __future__ import annotations

import functools
import json
import re
import types
from typing import Annotated, Any, Literal, Sequence, Union, get_args, get_origin

from pydantic import BaseModel
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from ._yaml import _join, _node_location, _walk
from .errors import Problem, did_you_mean
from .model import Spec

# `model.Identifier`'s pattern: its errors are phrased as the naming rule, which --var names share.
_VAR_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def _unwrap(tp: Any) -> Any:
    """Strip Annotated and Optional layers down to the type that says what goes here."""
    while True:
        if get_origin(tp) is Annotated:
            tp = get_args(tp)[0]
        elif get_origin(tp) in (Union, types.UnionType) and len(_members(tp)) == 1:
            tp = _members(tp)[0]
        else:
            return tp


def _members(union: Any) -> list[Any]:
    return [a for a in get_args(union) if a is not type(None)]


def _is_model(tp: Any) -> bool:
    return isinstance(tp, type) and issubclass(tp, BaseModel)


def _tags(model: type[BaseModel]) -> tuple[str | None, list[Any]]:
    """The discriminator key (by alias) and its values, for one member of a tagged union."""
    for name, f in model.model_fields.items():
        if get_origin(_unwrap(f.annotation)) is Literal:
            return f.alias or name, list(get_args(_unwrap(f.annotation)))
    return None, []


def _resolve(loc: Sequence[Any]) -> tuple[list[Any], Any, Any, bool]:
    """pydantic loc -> (data path, type of the parent, type at the end, ends at a dict key)."""
    path: list[Any] = []
    tp: Any = Spec
    parent: Any = None
    at_key = False
    for elem in loc:
        if elem == "[key]":
            at_key = True
            continue
        cur = _unwrap(tp)
        if get_origin(cur) in (Union, types.UnionType):  # a tag or member name, not a data key
            models = [m for m in map(_unwrap, _members(cur)) if _is_model(m)]
            tp = next((m for m in models if elem == m.__name__ or elem in _tags(m)[1]), None)
            continue
        parent = cur
        if _is_model(cur):
            f = next((f for n, f in cur.model_fields.items() if elem in (n, f.alias)), None)
            tp = f.annotation if f else None
        elif get_origin(cur) in (dict, list, tuple, set, frozenset) and get_args(cur):
            tp = get_args(cur)[-1] if get_origin(cur) is dict else get_args(cur)[0]
        else:
            tp = None
        path.append(elem)
    return path, parent, _unwrap(tp), at_key


_EXPECTED = {  # by the first word of pydantic's `<type>_type` / `<type>_parsing` error kinds
    "int": "an integer", "float": "a number", "bool": "`true` or `false`", "string": "a string",
    "list": "a list", "dict": "a mapping", "model": "a mapping",
}
_BOUNDS = {
    "greater_than": "must be greater than {gt}", "greater_than_equal": "must be at least {ge}",
    "less_than": "must be less than {lt}", "less_than_equal": "must be at most {le}",
    "too_short": "needs at least {min_length} item(s)", "too_long": "takes at most {max_length} item(s)",
    "string_too_long": "must be at most {max_length} characters", "finite_number": "must be a finite number",
    "multiple_of": "must be a multiple of {multiple_of}",
}


def _problem(file: str, root: Node | None, err: Any) -> Problem:
    """One pydantic error -> a located Problem in plain words."""
    kind, ctx, value = err["type"], err.get("ctx") or {}, err.get("input")
    path, parent, tp, at_key = _resolve(err["loc"])
    if (at_key or kind == "invalid_key") and path:
        path[-1] = value  # loc spells keys as str/int (`on` -> 1); the input is the real key, True
    trail, found = _walk(root, path)
    node = trail[-1][1] if found and trail else None
    on_key = at_key or kind == "invalid_key"
    key_text = trail[-1][0].value if on_key and found and isinstance(trail[-1][0], ScalarNode) else None
    dotted = _dotted(path if key_text is None else [*path[:-1], key_text])  # `on` as written, not True
    where = _node_location(file, root, path, on_key or kind == "extra_forbidden")
    got = _describe(None if on_key else node, value)
    if kind == "extra_forbidden":
        fields = parent.model_fields.items() if _is_model(parent) else []
        shown = [f.alias or name for name, f in fields]  # `from`, the spelling users write
        fix = did_you_mean(str(path[-1]), [*shown, *(name for name, _ in fields)])
        fix = fix or (f"Valid keys here: {_listing(shown)}" if shown else "Remove it")
        return Problem(f"unknown key `{path[-1]}`", dotted, where, fix)
    if kind == "missing":
        under = f"under `{_dotted(path[:-1])}`" if path[:-1] else "at the top level"
        return Problem(f"missing required key `{path[-1]}`", dotted, where, f"Add `{path[-1]}:` {under}")
    if kind in ("union_tag_invalid", "union_tag_not_found"):
        tag = str(ctx.get("tag", "")) if kind == "union_tag_invalid" else None
        return _tag_problem(file, root, path, tp, node, tag)
    if kind == "invalid_key":
        return Problem(f"key `{key_text}` is not text (YAML reads it as {got})" if key_text else
                       f"keys must be text, got {got}", dotted, where, "Quote the key")
    if kind.split("_")[0] in _EXPECTED and kind.endswith(("_type", "_parsing", "_size", "_unicode", "float")):
        expected = "a whole number" if kind == "int_from_float" else _EXPECTED[kind.split("_")[0]]
        quote = kind == "string_type" and isinstance(value, (int, float))
        fix = "Quote it if you meant text" if quote else ""
        return Problem(f"expected {expected}, got {got}", dotted, where, fix)
    if kind == "literal_error" and get_origin(tp) is Literal:
        choices = list(get_args(tp))
        return Problem(f"must be one of {_listing(choices)}, got {got}", dotted, where,
                       did_you_mean(value, [str(c) for c in choices]) if isinstance(value, str) else "")
    if kind == "string_pattern_mismatch" and ctx.get("pattern") == _VAR_NAME.pattern:
        return Problem(f"must be an identifier, got {got}", dotted, where,
                       "Use letters, digits and `_`, not starting with a digit")
    if kind == "string_too_short" and ctx.get("min_length") == 1:
        return Problem("must not be empty", dotted, where)
    if kind in _BOUNDS:
        return Problem(f"{_BOUNDS[kind].format(**ctx)}, got {got}", dotted, where)
    msg = re.sub(r"^(Value error|Assertion failed), ", "", str(err.get("msg", kind)))
    return Problem(re.sub(r"^Input should be", "should be", msg), dotted, where)


def _problems(file: str, root: Node | None, errors: Sequence[Any]) -> list[Problem]:
    """All errors as Problems, one per field: a scalar union with a keyword (`limit: int | "all"`)
    fails once per member, and its members' messages are folded into one that names the keyword."""
    groups: dict[tuple, list[Any]] = {}
    for err in errors:
        groups.setdefault(tuple(map(str, _resolve(err["loc"])[0])), []).append(err)
    out: list[Problem] = []
    for errs in groups.values():
        words = [e for e in errs if e["type"] == "literal_error"]
        rest = [e for e in errs if e["type"] != "literal_error"]
        if not words or not rest or len(rest) > 1:
            out += [_problem(file, root, e) for e in errs]
            continue
        keywords = [str(c) for e in words for c in _literal_choices(e)]
        p = _problem(file, root, rest[0])
        what = p.what.replace(", got", f" (or {_listing(keywords)}), got", 1) if ", got" in p.what else p.what
        value = rest[0].get("input")
        fix = did_you_mean(value, keywords) if isinstance(value, str) else ""
        out.append(Problem(what, p.path, p.where, fix or p.fix))
    return out


def _literal_choices(err: Any) -> list[str]:
    """The keywords a `literal_error` accepts, from its `expected` text (`'all'` or `'a', 'b'`)."""
    return re.findall(r"'([^']*)'", str((err.get("ctx") or {}).get("expected", "")))


def _tag_problem(file: str, root: Node | None, path: list[Any], union: Any, node: Node | None,
                 tag: str | None) -> Problem:
    """A tagged union (`source.ingest`) whose `from:` is missing (tag None) or unknown."""
    models = [m for m in map(_unwrap, _members(union)) if _is_model(m)]
    key = (_tags(models[0])[0] if models else None) or "kind"
    choices = [t for m in models for t in _tags(m)[1]]
    if tag is not None:
        fix = " ".join(filter(None, [f"Choose one of {_listing(choices)}.", did_you_mean(tag, choices)]))
        return Problem(f"unknown `{key}` value `{tag}`", _dotted([*path, key]),
                       _node_location(file, root, [*path, key]), fix)
    pairs = node.value if isinstance(node, MappingNode) else []
    keys = [k.value for k, _ in pairs if isinstance(k, ScalarNode)]
    typo = next((k for k in keys if did_you_mean(k, [key])), None)
    if typo is not None:  # `frm: lance` reads better as a typo than as a missing `from`
        return Problem(f"unknown key `{typo}`", _dotted([*path, typo]),
                       _node_location(file, root, [*path, typo], True), f"Did you mean `{key}`?")
    return Problem(f"missing required key `{key}`", _dotted([*path, key]), _node_location(file, root, path),
                   f"Add `{key}:` with one of {_listing(choices)}")


def _dotted(path: Sequence[Any]) -> str:
    return functools.reduce(_join, path, "")


def _listing(values: Sequence[Any]) -> str:
    return ", ".join(f"`{v}`" for v in values)


def _describe(node: Node | None, value: Any) -> str:
    """How the offending value reads in the file: `abc`, an empty value, a list, a mapping."""
    if isinstance(node, MappingNode) or (node is None and isinstance(value, dict)):
        return "a mapping"
    if isinstance(node, SequenceNode) or (node is None and isinstance(value, (list, tuple))):
        return "a list"
    text = node.value if isinstance(node, ScalarNode) else value if isinstance(value, str) \
        else json.dumps(value, default=repr)
    if not text:
        return "an empty value"
    text = text.replace("\n", " ")
    return f"`{text[:40]}...`" if len(text) > 40 else f"`{text}`"
