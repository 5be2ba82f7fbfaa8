"""Safe YAML for spec files: compose with marks, construct, and map field paths to `file:line:col`.

Rejects duplicate keys, aliases into their own value and alias bombs before constructing anything;
never executes YAML tags.
"""

from __future__ import annotations

import json
import re
from typing import Any, Sequence

import yaml
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from .errors import Location, Problem, SpecError

_MAX_VALUES = 1_000_000  # nodes after expanding aliases; real specs hold a few hundred
_MERGE_TAG = "tag:yaml.org,2002:merge"


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
