"""Which image each row shows: block plans, shared and near-duplicate images, the cached JPEGs.

Everything is keyed by ``(seed, block, slot)``, so any row can be made without the rows before it.
"""

from __future__ import annotations

import functools
import hashlib
import io
import random
from dataclasses import dataclass

from PIL import Image, ImageEnhance

from ._layout import _Scene
from ._raster import JPEG_QUALITY, _encode, _hamming, _render, dhash
from ._scenes import _build_scene

BLOCK_ROWS = 16          # rows are planned in fixed blocks: the unit of image sharing
_DUP_QUALITY = 70
_DUP_P = 0.015           # per image (slot > 0, block > 0): near-duplicate of an earlier image


@dataclass(frozen=True)
class _Plan:
    images: tuple   # per slot: (n_questions, dup_src_block or -1, dup_mode)
    rows: tuple     # per row offset: (slot, question index within the image)


@functools.lru_cache(maxsize=512)
def _plan(seed: int, b: int) -> _Plan:
    r = random.Random(f"plan:{seed}:{b}")
    images, rows, total = [], [], 0
    while total < BLOCK_ROWS:
        n = min(r.choices((1, 2, 3), (74, 22, 4))[0], BLOCK_ROWS - total)
        slot = len(images)
        x, y, mode = r.random(), r.random(), r.choice(("quality", "crop", "bright"))
        # source: slot 0 of one of the previous (up to 64) blocks, uniformly
        src = b - 1 - int(y * min(b, 64)) if (slot > 0 and b > 0 and x < _DUP_P) else -1
        images.append((n, src, mode))
        rows.extend((slot, q) for q in range(n))
        total += n
    return _Plan(tuple(images), tuple(rows))


@functools.lru_cache(maxsize=512)
def _scene(seed: int, b: int, k: int) -> _Scene:
    return _build_scene(seed, b, k)


def _source(seed: int, b: int, k: int) -> tuple[int, int, bool]:
    src = _plan(seed, b).images[k][1]
    return (src, 0, True) if src >= 0 else (b, k, False)


@functools.lru_cache(maxsize=64)
def _image(seed: int, b: int, k: int, px: int) -> bytes:
    sb, sk, dup = _source(seed, b, k)
    base = _render(_scene(seed, sb, sk), px)
    if not dup:
        return _encode(base)
    mode = _plan(seed, b).images[k][2]
    r = random.Random(f"dup:{seed}:{b}:{k}")
    if mode == "crop":
        d = r.randint(1, 3)
        dx, dy = r.randint(0, d), r.randint(0, d)
        var = base.crop((dx, dy, px - (d - dx), px - (d - dy))).resize(
            (px, px), Image.Resampling.BILINEAR)
        q = JPEG_QUALITY
    elif mode == "bright":
        var = ImageEnhance.Brightness(base).enhance(r.choice((0.94, 0.96, 1.04, 1.06)))
        q = JPEG_QUALITY
    else:
        var, q = base, _DUP_QUALITY
    out = _encode(var, q)
    ref = dhash(Image.open(io.BytesIO(_image(seed, sb, sk, px))))
    if _hamming(dhash(Image.open(io.BytesIO(out))), ref) > 4:  # guarantee "near"
        out = _encode(base, _DUP_QUALITY)
        if _hamming(dhash(Image.open(io.BytesIO(out))), ref) > 4:
            out = _encode(base, JPEG_QUALITY - 1)
    return out


def _image_id(seed: int, b: int, k: int) -> str:
    tag = "dup" if _plan(seed, b).images[k][1] >= 0 else "img"
    return hashlib.blake2b(f"{tag}:{seed}:{b}:{k}".encode(), digest_size=8).hexdigest()
