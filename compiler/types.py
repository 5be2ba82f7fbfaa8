"""Arrow types as plain strings, so the compiler can check and size columns without pyarrow.

The canonical spelling is exactly pyarrow's `str(type)` (`fixed_size_list<item: halffloat>[400]`),
so a type read from a Lance schema compares equal to one the compiler derived. Specs may use
friendlier spellings (`float16`, `list<string>`, `fixed_size_list<float16, 400>`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_SCALARS = {
    "bool": ("bool", 1), "boolean": ("bool", 1),
    "int8": ("int8", 1), "int16": ("int16", 2), "int32": ("int32", 4), "int64": ("int64", 8),
    "uint8": ("uint8", 1), "uint16": ("uint16", 2), "uint32": ("uint32", 4), "uint64": ("uint64", 8),
    "float16": ("halffloat", 2), "halffloat": ("halffloat", 2),
    "float32": ("float", 4), "float": ("float", 4),
    "float64": ("double", 8), "double": ("double", 8),
    "string": ("string", 32), "utf8": ("string", 32), "large_string": ("large_string", 32),
    "binary": ("binary", 64_000), "large_binary": ("large_binary", 64_000),
    "date32": ("date32[day]", 4), "timestamp": ("timestamp[us]", 8),
}
_TOKEN = re.compile(r"\s*([A-Za-z_][A-Za-z0-9_\[\]]*|<|>|,|:|\[|\]|\d+)")


class TypeSyntaxError(ValueError):
    """An Arrow type string that does not parse."""


@dataclass(frozen=True)
class ArrowType:
    """A parsed Arrow type: `kind` is a scalar name, `list`, `large_list`, `fixed_size_list` or `struct`."""

    kind: str
    item: "ArrowType | None" = None
    size: int = 0
    fields: tuple[tuple[str, "ArrowType"], ...] = ()

    def __str__(self) -> str:
        if self.kind in ("list", "large_list"):
            return f"{self.kind}<item: {self.item}>"
        if self.kind == "fixed_size_list":
            return f"fixed_size_list<item: {self.item}>[{self.size}]"
        if self.kind == "struct":
            return "struct<" + ", ".join(f"{n}: {t}" for n, t in self.fields) + ">"
        return self.kind

    def row_bytes(self) -> int:
        """Typical bytes one row occupies (exact for fixed-width types; a guess for variable ones)."""
        if self.kind == "fixed_size_list":
            return self.size * self.item.row_bytes()
        if self.kind in ("list", "large_list"):
            return 4 + 10 * self.item.row_bytes()
        if self.kind == "struct":
            return sum(t.row_bytes() for _, t in self.fields)
        return next((b for name, b in _SCALARS.values() if name == self.kind), 8)

    @property
    def is_fixed_width(self) -> bool:
        if self.kind == "fixed_size_list":
            return self.item.is_fixed_width
        if self.kind == "struct":
            return all(t.is_fixed_width for _, t in self.fields)
        return self.kind not in ("string", "large_string", "binary", "large_binary", "list", "large_list")

    def short(self) -> str:
        """Compact human form for plan output: `fp16[400x2048]`, `uint64`, `struct{3}`."""
        if self.kind == "fixed_size_list":
            inner = {"halffloat": "fp16", "float": "fp32", "double": "fp64"}.get(str(self.item), str(self.item))
            return f"{inner}[{self.size}]"
        if self.kind == "struct":
            return "struct{" + ",".join(n for n, _ in self.fields) + "}"
        return str(self)


def parse_type(text: str) -> ArrowType:
    """Parse a friendly or canonical Arrow type string. Raises TypeSyntaxError."""
    tokens = _tokenize(text)
    pos, result = _parse(tokens, 0)
    if pos != len(tokens):
        raise TypeSyntaxError(f"unexpected `{tokens[pos]}` in type `{text}`")
    return result


def canonical(text: str) -> str:
    """The pyarrow spelling of a type string."""
    return str(parse_type(text))


def _tokenize(text: str) -> list[str]:
    tokens, pos = [], 0
    text = text.strip()
    while pos < len(text):
        m = _TOKEN.match(text, pos)
        if not m:
            raise TypeSyntaxError(f"cannot read type `{text}` at character {pos + 1}")
        tokens.append(m.group(1))
        pos = m.end()
        while pos < len(text) and text[pos].isspace():
            pos += 1
    if not tokens:
        raise TypeSyntaxError("empty type")
    return tokens


def _expect(tokens: list[str], pos: int, tok: str) -> int:
    if pos >= len(tokens) or tokens[pos] != tok:
        got = tokens[pos] if pos < len(tokens) else "end of type"
        raise TypeSyntaxError(f"expected `{tok}`, got `{got}`")
    return pos + 1


def _parse(tokens: list[str], pos: int) -> tuple[int, ArrowType]:
    if pos >= len(tokens):
        raise TypeSyntaxError("type ends too early")
    name = tokens[pos].lower()
    pos += 1
    if name in ("list", "large_list", "fixed_size_list"):
        pos = _expect(tokens, pos, "<")
        pos, item = _parse_item(tokens, pos)
        size = 0
        if name == "fixed_size_list":
            if tokens[pos:pos + 1] == [","]:
                pos, size = _parse_int(tokens, pos + 1)
                pos = _expect(tokens, pos, ">")
            else:
                pos = _expect(tokens, pos, ">")
                pos = _expect(tokens, pos, "[")
                pos, size = _parse_int(tokens, pos)
                pos = _expect(tokens, pos, "]")
            if size <= 0:
                raise TypeSyntaxError("fixed_size_list needs a positive size")
        else:
            pos = _expect(tokens, pos, ">")
        return pos, ArrowType(name, item=item, size=size)
    if name == "struct":
        pos = _expect(tokens, pos, "<")
        fields = []
        while True:
            fname = tokens[pos] if pos < len(tokens) else ""
            if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", fname):
                raise TypeSyntaxError(f"expected a struct field name, got `{fname or 'end of type'}`")
            pos = _expect(tokens, pos + 1, ":")
            pos, ftype = _parse(tokens, pos)
            fields.append((fname, ftype))
            if tokens[pos:pos + 1] == [","]:
                pos += 1
                continue
            pos = _expect(tokens, pos, ">")
            return pos, ArrowType("struct", fields=tuple(fields))
    if name in _SCALARS:
        return pos, ArrowType(_SCALARS[name][0])
    if name.startswith(("date32", "timestamp")):
        return pos, ArrowType(_SCALARS[name.split("[")[0]][0])
    raise TypeSyntaxError(f"unknown type `{tokens[pos - 1]}`")


def _parse_item(tokens: list[str], pos: int) -> tuple[int, ArrowType]:
    # `list<item: string>` and `list<string>` are both accepted; the field name is dropped.
    if pos + 1 < len(tokens) and tokens[pos + 1] == ":":
        pos += 2
    return _parse(tokens, pos)


def _parse_int(tokens: list[str], pos: int) -> tuple[int, int]:
    if pos >= len(tokens) or not tokens[pos].isdigit():
        raise TypeSyntaxError("expected a size")
    return pos + 1, int(tokens[pos])


STRINGS = ("string", "large_string")
BINARIES = ("binary", "large_binary")
INTEGERS = ("int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64")
NUMBERS = INTEGERS + ("halffloat", "float", "double")


def accepts(pattern: str, actual: ArrowType) -> bool:
    """Does a slot pattern admit this type? Patterns: `string`, `binary`, `integer`, `number`,
    `list<string>`, `any`, or an exact canonical type."""
    if pattern == "any":
        return True
    if pattern == "string":
        return actual.kind in STRINGS
    if pattern == "binary":
        return actual.kind in BINARIES
    if pattern == "integer":
        return actual.kind in INTEGERS
    if pattern == "number":
        return actual.kind in NUMBERS
    if pattern == "list<string>":
        return actual.kind in ("list", "large_list") and actual.item.kind in STRINGS
    if pattern == "list":
        return actual.kind in ("list", "large_list", "fixed_size_list")
    return canonical(pattern) == str(actual)
