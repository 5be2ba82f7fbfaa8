"""Tier-2 builtins: image features that decode pixels. The engine spreads batches over all cores.

Hashes equal `imagehash`'s exactly (no reduced-size JPEG draft decoding), stored as uint64
(`int(str(hash), 16)`: the hex string's bits, most significant first). Every image is opened inside
`open_image`: a corrupt, truncated or bomb-sized image raises, and the engine applies `on_error`.
"""

from __future__ import annotations

import imagehash
import pyarrow as pa
from PIL import Image

from .base import open_image


def _decode(blob: bytes) -> Image.Image:
    return open_image(blob)


def _hash_column(images: pa.Array, fn, hash_size: int) -> pa.Array:
    if hash_size != 8:
        raise ValueError("hash_size must be 8 to fit a uint64")
    out = []
    for blob in images.to_pylist():
        if blob is None:
            out.append(None)
            continue
        out.append(int(str(fn(_decode(blob), hash_size=hash_size)), 16))
    return pa.array(out, pa.uint64())


def dhash(images: pa.Array, hash_size: int = 8) -> pa.Array:
    """Difference hash of each image (imagehash.dhash)."""
    return _hash_column(images, imagehash.dhash, hash_size)


def phash(images: pa.Array, hash_size: int = 8) -> pa.Array:
    """DCT perceptual hash of each image (imagehash.phash)."""
    return _hash_column(images, imagehash.phash, hash_size)


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
