"""The calling convention every UDF (builtin or user) follows, so the backfill engine can run any.

- A *function* UDF is called as `fn(*input_arrays, **params)` with one `pa.Array` per input
  column (a chunk of rows) and returns a `pa.Array` (or anything `pa.array(..., type=out)` takes)
  of the same length.
- A *class* UDF (models: load once, call many times) is built as `cls(ctx)` and called as
  `obj(*input_arrays)`; it may define `field_metadata() -> dict[str, str]` (stored on the column,
  e.g. the vision grid) and `close()`.
A UDF may raise on a bad row; the engine then retries row by row to isolate it (on_error policy).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa


@dataclass(frozen=True)
class UdfContext:
    """What a class UDF is told when it is built."""

    column: str
    output_type: pa.DataType
    params: dict[str, Any] = field(default_factory=dict)
    model: Any = None
    """The spec's `ModelSpec` (id, revision, image_px, dtype, trust_remote_code) or None."""
    device: str = "cpu"
    batch_size: int = 16
