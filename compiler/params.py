"""Declared UDF parameters and tuning knobs: their types and ranges, and checking spec values against them.

A declaration is a literal dict in `@udf(params=..., tuning=...)`, e.g.
`{"hash_size": {"type": "int", "default": 8, "min": 2, "max": 8, "doc": "..."}}`, so the compiler
reads it from source. Also the tiny template language of declared output types and plan shapes
(`{name}` and `{a*b}`), which never evaluates code. Pure: no I/O.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any, Mapping

__all__ = ["Param", "check_values", "defaults", "parse_decls", "render_template"]

TYPES = ("int", "float", "bool", "str")
_KEYS = {"type", "default", "min", "max", "choices", "doc"}
_WHOLE = re.compile(r"[+-]?[0-9]+")
_FIELD = re.compile(r"\{([^{}]*)\}")
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


@dataclass(frozen=True)
class Param:
    """One declared parameter or knob: its type, optional range or choices, and default."""

    name: str
    type: str
    has_default: bool = False
    default: Any = None
    """None with `has_default`: not set, the UDF decides (e.g. a device-dependent default)."""
    min: float | None = None
    max: float | None = None
    choices: tuple[Any, ...] = ()
    doc: str = ""

    def describe(self) -> str:
        """`a whole number from 2 to 8`, `true or false`, ... (for messages)."""
        if self.choices:
            return "one of " + ", ".join(f"`{_show(c)}`" for c in self.choices)
        what = {"int": "a whole number", "float": "a number", "bool": "true or false", "str": "text"}[self.type]
        if self.min is not None and self.max is not None:
            return f"{what} from {self.min:,} to {self.max:,}"
        if self.min is not None:
            return f"{what} of at least {self.min:,}"
        if self.max is not None:
            return f"{what} of at most {self.max:,}"
        return what


def parse_decls(decl: Any, what: str = "params") -> dict[str, Param]:
    """`@udf(params=...)` (or `tuning=`) as `Param`s; raises ValueError naming what is wrong."""
    if not isinstance(decl, Mapping):
        raise ValueError(f"`{what}=` must be a dict of name -> {{type, default, min, max, doc}}")
    out = {}
    for name, d in decl.items():
        if not isinstance(name, str) or not name.isidentifier():
            raise ValueError(f"`{what}=` has a key {name!r} that is not an identifier")
        if not isinstance(d, Mapping) or d.get("type") not in TYPES:
            raise ValueError(f"`{what}[{name!r}]` needs `type` (one of {', '.join(TYPES)})")
        unknown = sorted(set(d) - _KEYS)
        if unknown:
            raise ValueError(f"`{what}[{name!r}]` has unknown keys {unknown}; allowed: {sorted(_KEYS)}")
        p = Param(name, d["type"], "default" in d, d.get("default"), d.get("min"), d.get("max"),
                  tuple(d.get("choices") or ()), str(d.get("doc", "")))
        if p.has_default and p.default is not None and _coerce(p, p.default)[1]:
            raise ValueError(f"`{what}[{name!r}]`: the default {p.default!r} is not {p.describe()}")
        out[name] = p
    return out


def defaults(decls: Mapping[str, Param]) -> dict[str, Any]:
    """The declared defaults that are values (a None default means the UDF decides, so it is left out)."""
    return {n: p.default for n, p in decls.items() if p.has_default and p.default is not None}


def check_values(decls: Mapping[str, Param], given: Mapping[str, Any], owner: str, kind: str = "parameter"
                 ) -> tuple[dict[str, Any], list[tuple[str, str, str]]]:
    """Check a column's values against `owner`'s declarations (`kind`: what they are called).

    Returns the values coerced to their declared types (whole-number text such as a rendered
    `"{{ n }}"` becomes an int) and the problems, each `(key, what, fix)`.
    """
    from .errors import did_you_mean

    out, problems = {}, []
    for key, value in given.items():
        p = decls.get(key)
        if p is None:
            listed = f"{kind[:1].upper()}{kind[1:]}s: {', '.join(decls) or 'none'}"
            problems.append((key, f"`{owner}` has no {kind} `{key}`", did_you_mean(key, decls) or listed))
            continue
        if value is None and p.has_default and p.default is None:  # null: leave it to the UDF
            continue
        coerced, bad = _coerce(p, value)
        if bad:
            fix = f"Use {p.describe()}" + (f" ({p.doc})" if p.doc else "")
            problems.append((key, f"`{key}` must be {p.describe()}, got `{_show(value)}`", fix))
            continue
        out[key] = coerced
    return out, problems


def _coerce(p: Param, value: Any) -> tuple[Any, bool]:
    """(value as p's type, is_bad)."""
    v = value
    if p.type == "int":
        if isinstance(v, str) and _WHOLE.fullmatch(v.strip()):  # `"{{ n }}"` renders as text
            v = int(v.strip())
        # bool is an int subclass in Python, but `true` is no size; 8.0 is not whole either.
        if isinstance(v, bool) or not isinstance(v, int):
            return value, True
    elif p.type == "float":
        if isinstance(v, str):
            try:
                v = float(v.strip())
            except ValueError:
                return value, True
        if isinstance(v, bool) or not isinstance(v, (int, float)) or v != v or v in (float("inf"), float("-inf")):
            return value, True
    elif p.type == "bool":
        if isinstance(v, str) and v.strip().lower() in ("true", "false"):  # a rendered template
            v = v.strip().lower() == "true"
        if not isinstance(v, bool):
            return value, True
    elif not isinstance(v, str):
        return value, True
    if p.choices and v not in p.choices:
        return value, True
    if p.min is not None and v < p.min or p.max is not None and v > p.max:
        return value, True
    return v, False


def render_template(template: str, names: Mapping[str, Any]) -> str:
    """`{name}` and `{a*b*c}` fields of a declared output type or shape, filled from `names`.

    Only names and products of whole numbers: a declaration is data, never code. Raises ValueError
    for an unknown name or any other expression.
    """
    def field(m: re.Match) -> str:
        parts = [s.strip() for s in m.group(1).split("*")]
        if not all(_NAME.fullmatch(s) for s in parts):
            raise ValueError(f"template field `{{{m.group(1)}}}` must be a name or a product of names")
        missing = [s for s in parts if s not in names]
        if missing:
            raise ValueError(f"template field `{{{m.group(1)}}}` names unknown `{missing[0]}`; "
                             f"known: {', '.join(sorted(names)) or 'none'}")
        if len(parts) == 1:
            return str(names[parts[0]])
        product = 1
        for s in parts:
            if isinstance(names[s], bool) or not isinstance(names[s], int):
                raise ValueError(f"template field `{{{m.group(1)}}}` multiplies `{s}`, which is not a whole number")
            product *= names[s]
        return str(product)

    out = _FIELD.sub(field, template)
    if "{" in out or "}" in out:
        raise ValueError(f"unbalanced braces in template `{template}`")
    return out


def _show(v: Any) -> str:
    try:
        return json.dumps(v)
    except (TypeError, ValueError):
        return repr(v)
