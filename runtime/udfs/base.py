"""The calling convention every UDF (builtin or user) follows, so the backfill engine can run any.

- A *function* UDF is called as `fn(*input_arrays, **params)` with one `pa.Array` per input
  column (a chunk of rows) and returns a `pa.Array` (or anything `pa.array(..., type=out)` takes)
  of the same length.
- A *class* UDF (models: load once, call many times) is built as `cls(ctx)` (a `UdfContext`: its
  params, model, device and declared tuning knobs) and called as `obj(*input_arrays)`; it may define `field_metadata() -> dict[str, str]` (stored on the column,
  e.g. the vision grid) and `close()`.
A UDF may raise on a bad row; the engine then retries row by row to isolate it (on_error policy).
UDFs that decode images use `open_image`: unreadable bytes and decompression bombs are row errors.
"""

from __future__ import annotations

import io
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Iterator

import pyarrow as pa

MAX_IMAGE_PIXELS = 64_000_000
"""Largest image (width x height) a builtin UDF decodes; a bigger one fails its row instead of
exhausting memory (an 8-bit RGB image this size already takes 192 MB decoded)."""


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
    tuning: dict[str, Any] = field(default_factory=dict)
    """The column's speed knobs (`tuning:` in the spec, checked against the UDF's declaration);
    never fingerprinted, so they must not change the values computed."""


def tuning_of(ctx: UdfContext, cls: type) -> dict[str, Any]:
    """`ctx.tuning` over the defaults `cls` declares in its `@udf(tuning=...)`, so a UDF built
    directly (tests, benchmarks) sees the same defaults as one the compiler resolved."""
    declared = (getattr(cls, "__vlmspec_udf__", None) or {}).get("tuning") or {}
    return {**{k: d.get("default") for k, d in declared.items()}, **ctx.tuning}


def as_array(values: pa.Array | pa.ChunkedArray) -> pa.Array:
    """One contiguous array (the engine may hand a chunked one)."""
    return values.combine_chunks() if isinstance(values, pa.ChunkedArray) else values


@contextmanager
def image_guard() -> Iterator[None]:
    """Inside: Pillow refuses images over MAX_IMAGE_PIXELS with an exception, not a warning."""
    from PIL import Image

    # Set on every entry, not once: another library in the process may have lifted the limit.
    Image.MAX_IMAGE_PIXELS = MAX_IMAGE_PIXELS
    with warnings.catch_warnings():
        # Pillow only warns between the limit and twice it (and raises above): make both errors.
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        yield


def open_image(blob: bytes, decode: bool = True) -> Any:
    """A PIL image from encoded bytes, refusing bombs; unreadable bytes raise a ValueError that says
    what they were (Pillow's own message names only an in-memory buffer's address)."""
    from PIL import Image, UnidentifiedImageError

    data = bytes(blob)
    with image_guard():
        try:
            img = Image.open(io.BytesIO(data))
        except UnidentifiedImageError:
            start = f", starting `{data[:8].hex(' ')}`" if data else ""
            raise ValueError(f"not an image Pillow can read ({len(data):,} bytes{start})") from None
        # Checked here too, before any pixel is decoded: `catch_warnings` in `image_guard` is not
        # thread-safe (the vision tower decodes in a thread pool), this check is.
        if img.width * img.height > MAX_IMAGE_PIXELS:
            raise ValueError(f"image is {img.width} x {img.height} = {img.width * img.height:,} pixels, over the "
                             f"{MAX_IMAGE_PIXELS:,}-pixel limit (a decompression bomb?)")
        if decode:
            img.load()
    return img
