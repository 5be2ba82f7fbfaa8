"""Tier-2 builtins: image features that decode pixels. The engine spreads batches over all cores.

Hashes equal `imagehash`'s exactly (no reduced-size JPEG draft decoding), stored as uint64
(`int(str(hash), 16)`: the hex string's bits, most significant first); `hash_size` 2..8 gives
hash_size² bits, which fit the uint64. Every image is opened inside
`open_image`: a corrupt, truncated or bomb-sized image raises, and the engine applies `on_error`.
"""

from __future__ import annotations

import imagehash
import pyarrow as pa
from PIL import Image

from vlmspec.compiler.udf import udf

from .base import open_image


def _decode(blob: bytes) -> Image.Image:
    return open_image(blob)


def warm() -> None:
    """A worker's one-time costs before its first chunk (`executors.chunks.warm_worker`): Pillow
    imports its format plugins on the first open, numpy and imagehash their first-call paths."""
    import io

    for fmt in ("JPEG", "PNG"):
        buf = io.BytesIO()
        Image.new("RGB", (16, 16), (90, 120, 150)).save(buf, fmt)
        imagehash.dhash(_decode(buf.getvalue()))


def _hash_column(images: pa.Array, fn, hash_size: int) -> pa.Array:
    hash_size = int(hash_size)  # a templated value arrives as text ("6"); the compiler checked it is whole
    if not 2 <= hash_size <= 8:  # hash_size² bits must fit the uint64; imagehash needs at least 2
        raise ValueError(f"hash_size must be from 2 to 8 (hash_size² bits in a uint64), got {hash_size}")
    out = []
    for blob in images.to_pylist():
        if blob is None:
            out.append(None)
            continue
        out.append(int(str(fn(_decode(blob), hash_size=hash_size)), 16))
    return pa.array(out, pa.uint64())


# The compiler checks hash_size against this range at plan time. Declarations are literals (read
# from source, never imported), so phash repeats it.
@udf(name="image.dhash", inputs=["image"], accepts=["binary"], output="uint64", batch_size=256, parallel=True,
     params={"hash_size": {"type": "int", "default": 8, "min": 2, "max": 8,
                           "doc": "the hash has hash_size² bits and is stored as a uint64"}},
     version="906da742a2f631c1")
def dhash(images: pa.Array, hash_size: int = 8) -> pa.Array:
    """Difference hash of each image (imagehash.dhash)."""
    return _hash_column(images, imagehash.dhash, hash_size)


@udf(name="image.phash", inputs=["image"], accepts=["binary"], output="uint64", batch_size=256, parallel=True,
     params={"hash_size": {"type": "int", "default": 8, "min": 2, "max": 8,
                           "doc": "the hash has hash_size² bits and is stored as a uint64"}},
     version="f29d8abf9d7c4624")
def phash(images: pa.Array, hash_size: int = 8) -> pa.Array:
    """DCT perceptual hash of each image (imagehash.phash)."""
    return _hash_column(images, imagehash.phash, hash_size)


@udf(name="image.size", inputs=["image"], accepts=["binary"], output="struct<width: int32, height: int32>",
     batch_size=1024, version="3908ede50e2aa05b")
def size(images: pa.Array) -> pa.Array:
    """Width and height from the image header; Pillow opens lazily, so pixels are not decoded."""
    widths, heights = [], []
    for blob in images.to_pylist():
        if blob is None:
            widths.append(None)
            heights.append(None)
            continue
        with open_image(blob, decode=False) as img:
            w, h = img.size
        widths.append(w)
        heights.append(h)
    # A null image is a null size, not a size of nulls.
    return pa.StructArray.from_arrays([pa.array(widths, pa.int32()), pa.array(heights, pa.int32())],
                                      names=["width", "height"], mask=images.is_null())
