"""Spec file -> validated `Spec`: jinja templating (sandboxed), safe YAML, pydantic validation.

Owns turning every user mistake in a spec file into one `SpecError` whose problems read
``file:line:col field.path: what. how to fix``. Must never let another exception escape for any
input text, never execute YAML tags or unsandboxed template code, and never touch the network.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import os
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import jinja2
import yaml
from jinja2 import meta, nodes
from pydantic import ValidationError
from yaml.nodes import MappingNode, Node, ScalarNode

from ._pydantic_errors import _VAR_NAME, _problems
from ._render import LimitExceeded, bounded_render, bounded_template, environment
from ._yaml import (_check_tree, _compose, _construct, _node_location, _offset_location,
                    _parse_path)
from .errors import Location, Problem, SpecError, VlmspecError, did_you_mean
from .model import Spec
from .paths import resolve_paths

__all__ = ["LoadedSpec", "load_spec", "load_spec_text", "parse_overrides"]

_VARS_UNREADABLE = ("cannot read `vars:` before rendering templates",
                    "`vars:` values are not templated; quote any `{{ }}` in them")


@dataclass(frozen=True)
class LoadedSpec:
    """A validated spec plus what is needed to point back into its file."""

    spec: Spec
    file: str
    text: str
    source_hash: str
    _root: Node | None = field(default=None, repr=False, compare=False)
    base_dir: str | None = None
    """The folder relative paths in the spec were resolved against (the spec file's own)."""
    written: Mapping[str, str] = field(default_factory=dict)
    """Path fields as written, where resolving changed them (`source.table` -> `data/x.lance`)."""

    def locate(self, path: str) -> Location:
        """`file:line:col` of the YAML node at a dotted path (or its nearest existing ancestor)."""
        segments = _parse_path(path)
        return Location(self.file) if segments is None else _node_location(self.file, self._root, segments)

    def located(self, error: VlmspecError) -> VlmspecError:
        """`error` with each problem that names a spec field but no place pointed into this file
        (errors raised while applying know the field, e.g. `source.ingest.dataset`, not the file)."""
        def place(p: Problem) -> Problem:
            head = re.split(r"[.\[]", p.path, maxsplit=1)[0]
            return p if p.where.file or head not in Spec.model_fields else dataclasses.replace(p, where=self.locate(p.path))

        problems = [place(p) for p in error.problems]
        return error if list(error.problems) == problems else type(error)(problems)


def load_spec(path: str | Path, overrides: Sequence[str] = ()) -> LoadedSpec:
    """Read, render, parse and validate a spec file; `overrides` are `--var key=value` items."""
    file = str(path)
    try:
        raw = Path(path).read_bytes()
    except FileNotFoundError:
        raise SpecError(Problem("no such spec file", where=Location(file),
                                fix="Check the path (it is relative to the current directory; paths inside the spec are "
                                    "relative to the spec's folder)")) from None
    except (OSError, ValueError) as e:  # a directory, no permission, a NUL in the path
        what = "a directory, not a spec file" if isinstance(e, IsADirectoryError) else \
            f"cannot read the spec file: {getattr(e, 'strerror', None) or e}"
        raise SpecError(Problem(what, where=Location(file), fix="Pass the path of a YAML spec")) from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise SpecError(Problem(f"not UTF-8 text (byte 0x{raw[e.start]:02x})", fix="Save the spec as UTF-8",
                                where=_offset_location(file, raw, e.start))) from None
    return load_spec_text(text, file, overrides, base_dir=os.path.dirname(os.path.abspath(file)))


def load_spec_text(text: str, file: str = "<string>", overrides: Sequence[str] = (),
                   base_dir: str | Path | None = None) -> LoadedSpec:
    """`load_spec` for text already in memory; `file` is only used in messages. With `base_dir`,
    relative paths in the spec are resolved against it (`paths.py`); without, they stay as written."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise SpecError(Problem("the text holds characters that are not valid Unicode",
                                where=_offset_location(file, text, e.start))) from None
    extra = parse_overrides(overrides)
    try:
        context, declared = _template_vars(text, file, extra)
        rendered = _render(text, file, context, extra, declared)
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
        raise SpecError(_problems(file, root, e.errors())) from None
    digest = hashlib.sha256(rendered.encode("utf-8")).hexdigest()
    written: dict[str, str] = {}
    if base_dir is not None:
        spec, written = resolve_paths(spec, base_dir)
    return LoadedSpec(spec=spec, file=file, text=rendered, source_hash=digest, _root=root,
                      base_dir=None if base_dir is None else os.path.abspath(base_dir), written=written)


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


def _template_vars(text: str, file: str, overrides: dict[str, Any]) -> tuple[dict[str, Any], set[str]]:
    """Template context: `name`, then top-level `vars:`, then --var overrides (later wins); and
    the names `vars:` declares.

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
            env = environment()
            name = bounded_render(env, env.parse(name), values | overrides)
        except Exception:  # noqa: BLE001 -- reported by the main render
            name = None
    return ({} if name is None else {"name": name}) | values | overrides, set(values)


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


def _render(text: str, file: str, context: dict[str, Any], overrides: dict[str, Any], declared: set[str]) -> str:
    """Render the spec text; refuses undefined names, --var overrides no template reads, and
    templates that go over the render budget (`_render.py`)."""
    env = environment()
    try:
        with warnings.catch_warnings():  # jinja's lexer warns about odd escapes in string literals
            warnings.simplefilter("ignore")
            ast = env.parse(text)
            template = bounded_template(env, ast)
    except jinja2.TemplateSyntaxError as e:
        raise SpecError(Problem(f"template syntax error: {e.message}", where=Location(file, e.lineno or 0),
                                fix="Check the `{{ }}` / `{% %}` around here")) from None
    except RecursionError:
        raise
    except Exception as e:  # noqa: BLE001 -- jinja's lexer can fail in other ways on odd text
        raise SpecError(Problem(f"template syntax error: {e}", where=Location(file))) from None
    reads = [n for n in ast.find_all((nodes.Import, nodes.FromImport, nodes.Include, nodes.Extends))]
    if reads:  # refused before rendering: a spec is one file, and its templates read no others
        raise SpecError([Problem(f"`{{% {type(n).__name__.lower().replace('fromimport', 'from')} %}}` is not "
                                 "allowed: templates in a spec cannot read other files",
                                 where=Location(file, n.lineno), fix="Put the values under `vars:`")
                         for n in reads])
    used = meta.find_undeclared_variables(ast)
    undefined = sorted(used - set(context) - set(env.globals))
    unused = [k for k in overrides if k not in used and k not in declared]
    if undefined or unused:
        raise SpecError([_undefined(file, text, ast, n, list(context)) for n in undefined]
                        + [_unused_override(k, (used - set(env.globals)) | declared) for k in unused])
    try:
        return "".join(template.generate(context))
    except RecursionError:
        raise
    except LimitExceeded as e:
        raise SpecError(Problem(e.what, where=Location(file, _template_line(e)), fix=e.fix)) from None
    except Exception as e:  # noqa: BLE001 -- template expressions are user code: any failure is theirs
        what = str(e) if isinstance(e, jinja2.TemplateError) else f"{type(e).__name__}: {e}"
        if isinstance(e, jinja2.exceptions.SecurityError):
            what = f"refused by the template sandbox: {e}"
        what = f"template error: {what}".replace("\n", " ")
        raise SpecError(Problem(what, where=Location(file, _template_line(e)))) from None


def _template_line(e: BaseException) -> int:
    """The spec line a template failed on (0 when unknown)."""
    line, tb = 0, e.__traceback__
    while tb is not None:  # jinja rewrites tracebacks so template frames carry template lines
        if tb.tb_frame.f_code.co_filename == "<template>":
            line = tb.tb_lineno
        tb = tb.tb_next
    return line


def _unused_override(name: str, known: set[str]) -> Problem:
    """`--var row=4000` for a spec without `row`: refused, since it would change nothing."""
    hint = did_you_mean(name, known)
    if not hint:
        names = ", ".join(f"`{n}`" for n in sorted(known))
        hint = (f"The spec's template variables are {names}" if names else "The spec uses no template variables")
        hint += "; declare a new one under `vars:` and use it as `{{ " + name + " }}`"
    return Problem(f"no template variable `{name}`", path=f"--var {name}", fix=hint)


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
