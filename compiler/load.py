"""Spec file -> validated `Spec`: jinja templating (sandboxed), safe YAML, pydantic validation.

Owns turning every user mistake in a spec file into one `SpecError` whose problems read
``file:line:col field.path: what. how to fix``. Must never let another exception escape for any
input text, never execute YAML tags or unsandboxed template code, and never touch the network.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import re
import types
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal, Sequence, Union, get_args, get_origin

import jinja2
import yaml
from jinja2 import meta, nodes
from jinja2.sandbox import SandboxedEnvironment
from pydantic import BaseModel, ValidationError
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from .errors import Location, Problem, SpecError, did_you_mean
from .model import Spec

__all__ = ["LoadedSpec", "load_spec", "load_spec_text", "parse_overrides"]

_MAX_VALUES = 1_000_000  # nodes after expanding aliases; real specs hold a few hundred
_VARS_UNREADABLE = ("cannot read `vars:` before rendering templates",
                    "`vars:` values are not templated; quote any `{{ }}` in them")
_VAR_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_MERGE_TAG = "tag:yaml.org,2002:merge"


@dataclass(frozen=True)
class LoadedSpec:
    """A validated spec plus what is needed to point back into its file."""

    spec: Spec
    file: str
    text: str
    source_hash: str
    _root: Node | None = field(default=None, repr=False, compare=False)

    def locate(self, path: str) -> Location:
        """`file:line:col` of the YAML node at a dotted path (or its nearest existing ancestor)."""
        segments = _parse_path(path)
        return Location(self.file) if segments is None else _node_location(self.file, self._root, segments)


def load_spec(path: str | Path, overrides: Sequence[str] = ()) -> LoadedSpec:
    """Read, render, parse and validate a spec file; `overrides` are `--var key=value` items."""
    file = str(path)
    try:
        raw = Path(path).read_bytes()
    except FileNotFoundError:
        raise SpecError(Problem("no such spec file", where=Location(file),
                                fix="Check the path (it is relative to the current directory)")) from None
    except (OSError, ValueError) as e:  # a directory, no permission, a NUL in the path
        what = "a directory, not a spec file" if isinstance(e, IsADirectoryError) else \
            f"cannot read the spec file: {getattr(e, 'strerror', None) or e}"
        raise SpecError(Problem(what, where=Location(file), fix="Pass the path of a YAML spec")) from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise SpecError(Problem(f"not UTF-8 text (byte 0x{raw[e.start]:02x})", fix="Save the spec as UTF-8",
                                where=_offset_location(file, raw, e.start))) from None
    return load_spec_text(text, file, overrides)


def load_spec_text(text: str, file: str = "<string>", overrides: Sequence[str] = ()) -> LoadedSpec:
    """`load_spec` for text already in memory; `file` is only used in messages."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise SpecError(Problem("the text holds characters that are not valid Unicode",
                                where=_offset_location(file, text, e.start))) from None
    extra = parse_overrides(overrides)
    try:
        rendered = _render(text, file, _template_vars(text, file, extra))
        root = _compose(rendered, file)
        data = _construct(root, file)
    except RecursionError:
        raise SpecError(Problem("the spec (or a template expression in it) is nested too deeply",
                                where=Location(file), fix="Flatten it")) from None
    if data is None:
        raise SpecError(Problem("the spec is empty", where=Location(file),
                                fix="Start with `name:` and `source: {table: ...}`"))
    if not isinstance(data, dict):
        kind = "a list" if isinstance(data, list) else "a single value"
        raise SpecError(Problem(f"the top level is {kind}, not a mapping of keys",
                                where=_node_location(file, root, []),
                                fix="Start the file with keys such as `name:` and `source:`"))
    if extra and isinstance(data.get("vars", {}), dict):
        # Record the values the text was actually rendered with, so `spec.vars` tells the truth.
        data["vars"] = {**data.get("vars", {}), **extra}
    try:
        spec = Spec.model_validate(data)
    except ValidationError as e:  # pydantic-core guards its own recursion, so only this comes out
        raise SpecError([_problem(file, root, err) for err in e.errors()]) from None
    digest = hashlib.sha256(rendered.encode("utf-8")).hexdigest()
    return LoadedSpec(spec=spec, file=file, text=rendered, source_hash=digest, _root=root)


def parse_overrides(items: Sequence[str]) -> dict[str, Any]:
    """`["rows=300", "tag=v2"]` -> `{"rows": 300, "tag": "v2"}`; values read as YAML scalars."""
    out: dict[str, Any] = {}
    problems = []
    for item in items:
        key, eq, value = str(item).partition("=")
        key = key.strip()
        if not eq or not key:
            problems.append(Problem(f"--var `{item}` is not KEY=VALUE", fix="Write it like `--var rows=300`"))
        elif not _VAR_NAME.match(key):
            problems.append(Problem(f"--var `{key}` is not a valid variable name",
                                    fix="Use letters, digits and `_`, not starting with a digit"))
        else:
            # `--var x=` is an empty string, and what YAML reads as a list, mapping or date stays
            # the text typed: `--var where=a: b` must not become a mapping.
            try:
                parsed = yaml.safe_load(value) if value else ""
            except (yaml.YAMLError, ValueError, RecursionError):
                parsed = value
            out[key] = parsed if parsed is None or isinstance(parsed, (str, int, float, bool)) else value
    if problems:
        raise SpecError(problems)
    return out


# --- templating ---------------------------------------------------------------------------


class _Sandbox(SandboxedEnvironment):
    """The jinja sandbox, also refusing arithmetic that would hang or exhaust memory."""

    intercepted_binops = frozenset({"*", "**"})

    def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
        if operator == "**":
            too_big = isinstance(left, int) and isinstance(right, int) and left.bit_length() * right > 10**6
        else:  # "x" * 10**9 or [0] * 10**9
            too_big = any(isinstance(seq, (str, list, tuple)) and isinstance(n, int)
                          and len(seq) * n > _MAX_VALUES for seq, n in ((left, right), (right, left)))
        if too_big:
            raise jinja2.exceptions.SecurityError(f"the result of `{operator}` would be too large")
        return super().call_binop(context, operator, left, right)


def _environment() -> SandboxedEnvironment:
    env = _Sandbox(undefined=jinja2.StrictUndefined, autoescape=False, keep_trailing_newline=True)
    env.globals.pop("lipsum", None)  # lipsum(n) can generate unbounded text
    return env


def _template_vars(text: str, file: str, overrides: dict[str, Any]) -> dict[str, Any]:
    """Template context: `name`, then top-level `vars:`, then --var overrides (later wins).

    The file can't be parsed as YAML before it is rendered in general, so `vars:` and `name:` are
    read first from the raw text: compose it as YAML when it parses (only those two nodes are
    constructed, so `x: {{ n }}` elsewhere is harmless); otherwise cut the top-level `vars:` block
    and `name:` line out textually and parse just those. `vars` values are not templated.
    """
    found = _raw_top_level(text, file)
    name, values = found.get("name"), found.get("vars")
    values = {k: v for k, v in values.items() if isinstance(k, str)} if isinstance(values, dict) else {}
    if isinstance(name, str) and ("{{" in name or "{%" in name):
        try:  # `name: exp-{{ size }}` resolves against vars; if it can't, the main render says why
            name = _environment().from_string(name).render(values | overrides)
        except Exception:  # noqa: BLE001 -- reported by the main render
            name = None
    return ({} if name is None else {"name": name}) | values | overrides


def _raw_top_level(text: str, file: str) -> dict[str, Any]:
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except (yaml.YAMLError, RecursionError):
        return _raw_top_level_textual(text, file)
    out: dict[str, Any] = {}
    for key, value in root.value if isinstance(root, MappingNode) else ():
        if isinstance(key, ScalarNode) and key.value == "vars":
            problems = _check_tree(file, value, "vars")  # vars get rendered: stop alias bombs first
            if problems:
                raise SpecError(problems)
            out["vars"] = _construct(value, file, *_VARS_UNREADABLE)
        elif isinstance(key, ScalarNode) and key.value == "name":
            with contextlib.suppress(SpecError):  # the main parse reports it
                out["name"] = _construct(value, file)
    return out


def _raw_top_level_textual(text: str, file: str) -> dict[str, Any]:
    lines = text.splitlines()
    out: dict[str, Any] = {}
    for i, line in enumerate(lines):
        if re.match(r"name\s*:", line):
            with contextlib.suppress(yaml.YAMLError, ValueError, AttributeError, RecursionError):
                out["name"] = yaml.safe_load(line).get("name")
        if not re.match(r"vars\s*:", line):
            continue
        end = i + 1  # the block runs on through indented, blank and comment lines
        while end < len(lines) and (not lines[end].strip() or lines[end][:1] in (" ", "\t", "#")):
            end += 1
        block = "\n" * i + "\n".join(lines[i:end])  # padded so marks keep file line numbers
        node = _compose(block, file, *_VARS_UNREADABLE)
        out["vars"] = _construct(node, file, *_VARS_UNREADABLE).get("vars")
    return out


def _render(text: str, file: str, context: dict[str, Any]) -> str:
    env = _environment()
    try:
        with warnings.catch_warnings():  # jinja's lexer warns about odd escapes in string literals
            warnings.simplefilter("ignore")
            ast = env.parse(text)
            template = env.from_string(ast)
    except jinja2.TemplateSyntaxError as e:
        raise SpecError(Problem(f"template syntax error: {e.message}", where=Location(file, e.lineno or 0),
                                fix="Check the `{{ }}` / `{% %}` around here")) from None
    except RecursionError:
        raise
    except Exception as e:  # noqa: BLE001 -- jinja's lexer can fail in other ways on odd text
        raise SpecError(Problem(f"template syntax error: {e}", where=Location(file))) from None
    undefined = sorted(meta.find_undeclared_variables(ast) - set(context) - set(env.globals))
    if undefined:
        raise SpecError([_undefined(file, text, ast, n, list(context)) for n in undefined])
    try:
        return template.render(context)
    except RecursionError:
        raise
    except Exception as e:  # noqa: BLE001 -- template expressions are user code: any failure is theirs
        what = str(e) if isinstance(e, jinja2.TemplateError) else f"{type(e).__name__}: {e}"
        if isinstance(e, jinja2.exceptions.SecurityError):
            what = f"refused by the template sandbox: {e}"
        line, tb = 0, e.__traceback__
        while tb is not None:  # jinja rewrites tracebacks so template frames carry template lines
            if tb.tb_frame.f_code.co_filename == "<template>":
                line = tb.tb_lineno
            tb = tb.tb_next
        what = f"template error: {what}".replace("\n", " ")
        raise SpecError(Problem(what, where=Location(file, line))) from None


def _undefined(file: str, text: str, ast: nodes.Template, name: str, known: list[str]) -> Problem:
    lines = text.splitlines()
    line = min((n.lineno for n in ast.find_all(nodes.Name) if n.name == name), default=0)
    col = 0
    if 0 < line <= len(lines):
        src = lines[line - 1]
        for tag in re.finditer(r"\{[{%].*?(?:[}%]\}|$)", src):
            hit = re.search(rf"(?<![\w.]){re.escape(name)}\b", tag.group())
            if hit:
                col = tag.start() + hit.start() + 1
                break
    fix = f"Define it under `vars:` or pass --var {name}=VALUE"
    hint = did_you_mean(name, known)
    return Problem(f"undefined variable `{name}`", where=Location(file, line, col),
                   fix=f"{fix}. {hint}" if hint else fix)


# --- YAML ---------------------------------------------------------------------------------


class _Loader(yaml.SafeLoader):
    """SafeLoader whose value errors (`!!int abc`, `2020-13-45`) carry the node's mark."""

    def construct_object(self, node: Node, deep: bool = False) -> Any:
        try:
            return super().construct_object(node, deep)
        except (ValueError, TypeError, OverflowError) as e:
            raise yaml.constructor.ConstructorError(None, None, f"cannot read this value ({e})",
                                                    node.start_mark) from None


def _compose(text: str, file: str, what: str = "invalid YAML",
             fix: str = "Check the indentation and quoting here") -> Node | None:
    try:
        loader = _Loader(text)  # the reader rejects control characters right here
        try:
            root = loader.get_single_node()
        finally:
            loader.dispose()
    except yaml.YAMLError as e:
        raise SpecError(_yaml_problem(file, e, what, fix, text)) from None
    if root is not None:
        problems = _check_tree(file, root)
        if problems:
            raise SpecError(problems)
    return root


def _construct(node: Node | None, file: str, what: str = "invalid YAML value", fix: str = "") -> Any:
    if node is None:
        return None
    loader = _Loader("")
    try:
        return loader.construct_document(node)
    except yaml.YAMLError as e:
        raise SpecError(_yaml_problem(file, e, what, fix)) from None
    finally:
        loader.dispose()


def _yaml_problem(file: str, e: yaml.YAMLError, what: str, fix: str, text: str | None = None) -> Problem:
    if isinstance(e, yaml.reader.ReaderError):  # a control character; no mark, only an offset
        where = Location(file) if text is None else _offset_location(file, text, e.position)
        return Problem(f"{what}: control character U+{e.character:04X} is not allowed", where=where,
                       fix="Remove it")
    mark = getattr(e, "problem_mark", None) or getattr(e, "context_mark", None)
    where = _at(file, mark) if mark else Location(file)
    detail = " ".join(str(p) for p in (getattr(e, "context", None), getattr(e, "problem", None)) if p)
    return Problem(f"{what}: {detail or e}".replace("\n", " "), where=where, fix=fix)


def _check_tree(file: str, root: Node, path: str = "") -> list[Problem]:
    """Duplicate keys, self-referencing aliases and alias bombs, in one pass over the nodes."""
    problems: list[Problem] = []
    sizes: dict[int, int] = {}
    open_ids: set[int] = set()  # the chain of ancestors: an alias back into it is a cycle
    stack: list[tuple[Node, str, bool]] = [(root, path, False)]
    while stack:
        node, path, done = stack.pop()
        if done:
            open_ids.discard(id(node))
            sizes[id(node)] = 1 + sum(sizes.get(id(k), 0) for _, k in _labelled(node))
            if sizes[id(node)] > _MAX_VALUES:
                return [Problem(f"the spec holds more than {_MAX_VALUES:,} values once aliases are expanded",
                                path, _at(file, node.start_mark), "Use fewer `*alias` references")]
            continue
        if id(node) in sizes:
            continue
        open_ids.add(id(node))
        stack.append((node, path, True))
        if isinstance(node, MappingNode):
            problems += _duplicates(file, node, path)
        for key, kid in _labelled(node):
            if id(kid) in open_ids:
                return [Problem("an alias refers to the value that contains it", _join(path, key),
                                _at(file, kid.start_mark), "Remove the `*alias` or point it elsewhere")]
            if id(kid) not in sizes:
                stack.append((kid, _join(path, key), False))
    return problems


def _labelled(node: Node) -> list[tuple[Any, Node]]:
    """Children with their path labels (a complex key's parts are labelled `?`)."""
    if isinstance(node, SequenceNode):
        return list(enumerate(node.value))
    pairs = node.value if isinstance(node, MappingNode) else []
    return [kid for k, v in pairs for kid in (("?", k), (k.value if isinstance(k, ScalarNode) else "?", v))]


def _duplicates(file: str, node: MappingNode, path: str) -> list[Problem]:
    first: dict[tuple[str, str], ScalarNode] = {}
    problems = []
    for key in (k for k, _ in node.value if isinstance(k, ScalarNode) and k.tag != _MERGE_TAG):
        seen = first.setdefault((key.tag, key.value), key)
        if seen is not key:
            a, b = seen.start_mark.line + 1, key.start_mark.line + 1
            lines = f"lines {a} and {b}" if a != b else f"twice on line {b}"
            problems.append(Problem(f"duplicate key `{key.value}` ({lines})", _join(path, key.value),
                                    _at(file, key.start_mark), "Keep only one of them"))
    return problems


# --- paths and locations ------------------------------------------------------------------


def _join(path: str, key: Any) -> str:
    if isinstance(key, int) and not isinstance(key, bool):
        return f"{path}[{key}]"
    key = str(key)
    if re.fullmatch(r"[^.\[\]\"\s]+", key):
        return f"{path}.{key}" if path else key
    return f"{path}[{json.dumps(key)}]"


def _parse_path(path: str) -> list[Any] | None:
    out: list[Any] = []
    for m in re.finditer(r'\.?([^.\[\]"\s]+)|\[(\d+)\]|\[("(?:[^"\\]|\\.)*")\]|(.)', path):
        plain, index, quoted, junk = m.groups()
        if junk is not None:
            return None
        out.append(plain if plain is not None else int(index) if index is not None else json.loads(quoted))
    return out


def _walk(root: Node | None, segments: Sequence[Any]) -> tuple[list[tuple[Node | None, Node]], bool]:
    """(key node, value node) pairs along the path, and whether the whole path exists."""
    trail: list[tuple[Node | None, Node]] = [] if root is None else [(None, root)]
    for seg in segments:
        if not trail:
            return trail, False
        node, hit = trail[-1][1], None
        if isinstance(node, MappingNode):  # the last occurrence wins, as in the constructed dict
            hit = next(((k, v) for k, v in reversed(node.value) if _key_is(k, seg)), None)
        elif isinstance(node, SequenceNode) and isinstance(seg, int) and 0 <= seg < len(node.value):
            hit = (None, node.value[seg])
        if hit is None:
            return trail, False
        trail.append(hit)
    return trail, True


def _key_is(key: Node, seg: Any) -> bool:
    if not isinstance(key, ScalarNode):
        return False
    if isinstance(seg, str) or key.tag.endswith(":str"):
        return key.value == str(seg)
    try:  # pydantic reports a key such as `on` or `1` by its YAML value: True, 1
        value = _Loader("").construct_object(key)
    except yaml.YAMLError:
        return False
    return value == seg and type(value) is type(seg)


def _node_location(file: str, root: Node | None, segments: Sequence[Any], at_key: bool = False) -> Location:
    trail, found = _walk(root, segments)
    if not trail:
        return Location(file)
    key, value = trail[-1]
    # A scalar's own position is the most precise; a block mapping or list starts on the line
    # after its key, so point at the key, which is where the reader sees the field.
    use_key = key is not None and (at_key or not found or not isinstance(value, ScalarNode))
    return _at(file, key.start_mark if use_key else value.start_mark)


def _at(file: str, mark: yaml.Mark) -> Location:
    return Location(file, mark.line + 1, mark.column + 1)


def _offset_location(file: str, text: str | bytes, offset: int) -> Location:
    nl = b"\n" if isinstance(text, bytes) else "\n"
    return Location(file, text.count(nl, 0, offset) + 1, offset - text.rfind(nl, 0, offset))


# --- pydantic errors -> problems ----------------------------------------------------------


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
