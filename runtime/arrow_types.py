"""Canonical type strings (compiler) -> pyarrow types (runtime)."""

from __future__ import annotations

import functools

import pyarrow as pa

from vlmspec.compiler.types import ArrowType, parse_type

_SCALARS = {
    "bool": pa.bool_(), "int8": pa.int8(), "int16": pa.int16(), "int32": pa.int32(), "int64": pa.int64(),
    "uint8": pa.uint8(), "uint16": pa.uint16(), "uint32": pa.uint32(), "uint64": pa.uint64(),
    "halffloat": pa.float16(), "float": pa.float32(), "double": pa.float64(),
    "string": pa.string(), "large_string": pa.large_string(),
    "binary": pa.binary(), "large_binary": pa.large_binary(),
    "date32[day]": pa.date32(), "timestamp[us]": pa.timestamp("us"),
}


def _convert(t: ArrowType) -> pa.DataType:
    if t.kind == "list":
        return pa.list_(_convert(t.item))
    if t.kind == "large_list":
        return pa.large_list(_convert(t.item))
    if t.kind == "fixed_size_list":
        return pa.list_(_convert(t.item), t.size)
    if t.kind == "struct":
        return pa.struct([(n, _convert(ft)) for n, ft in t.fields])
    return _SCALARS[t.kind]


@functools.lru_cache(maxsize=256)
def to_pyarrow(type_str: str) -> pa.DataType:
    t = _convert(parse_type(type_str))
    assert str(t) == str(parse_type(type_str)), (t, type_str)  # the two spellings must agree
    return t
