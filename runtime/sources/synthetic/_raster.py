"""Scene -> pixels -> JPEG bytes at a given ``image_px``, and the dHash that bounds near-duplicates.

Encoder settings are fixed (quality, subsampling, no optimise pass) so the bytes are reproducible.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image, ImageDraw

from ._layout import _R, _T, _Scene
from ._palette import _font, _rgb

JPEG_QUALITY = 90        # fixed encoder settings => byte-identical JPEGs


def _background(bg: tuple, px: int, rng: np.random.Generator) -> Image.Image:
    kind = bg[0]
    if kind == "solid":
        return Image.new("RGB", (px, px), _rgb(bg[1]))
    if kind in ("grad", "split"):
        a = np.array(_rgb(bg[1]), np.float32)
        c = np.array(_rgb(bg[2]), np.float32)
        t = np.linspace(0.0, 1.0, px, dtype=np.float32)
        if kind == "split":
            hz = int(px * bg[3])
            col = np.empty((px, 3), np.float32)
            col[:hz] = a * (1 - t[:hz, None] * 0.6) + np.array((255, 255, 255), np.float32) * (
                t[:hz, None] * 0.6)
            col[hz:] = c
            arr = np.broadcast_to(col[:, None, :], (px, px, 3))
        elif bg[3] == "v":
            arr = np.broadcast_to((a * (1 - t[:, None]) + c * t[:, None])[:, None, :], (px, px, 3))
        elif bg[3] == "h":
            arr = np.broadcast_to((a * (1 - t[:, None]) + c * t[:, None])[None, :, :], (px, px, 3))
        else:
            tt = (t[:, None] + t[None, :]) / 2
            arr = a * (1 - tt[..., None]) + c * tt[..., None]
        return Image.fromarray(np.ascontiguousarray(arr).astype(np.uint8), "RGB")
    if kind == "noise":
        base = np.array(_rgb(bg[1]), np.float32)
        amp = float(bg[2])
        low = base + rng.normal(0, amp, (6, 6, 1)) + rng.normal(0, amp * 0.15, (6, 6, 3))
        low = np.clip(low, 0, 255).astype(np.uint8)
        img = Image.fromarray(low, "RGB").resize((px, px), Image.Resampling.BICUBIC)
        hi = rng.integers(-10, 11, (px, px, 1), dtype=np.int16)
        arr = np.clip(np.asarray(img, np.int16) + hi, 0, 255).astype(np.uint8)
        return Image.fromarray(arr, "RGB")
    if kind == "bricks":
        img = Image.new("RGB", (px, px), _rgb(bg[2]))
        d = ImageDraw.Draw(img)
        s = px / _R
        bh, bw = 16 * s, 40 * s
        rows = int(px / bh) + 1
        brick = _rgb(bg[1])
        for j in range(rows):
            off = (bw / 2) * (j % 2)
            x = -off
            while x < px:
                v = ((j * 31 + int(x)) % 7 - 3) * 5
                c = tuple(max(0, min(255, ch + v)) for ch in brick)
                d.rectangle((x + s, j * bh + s, x + bw - s, (j + 1) * bh - s), fill=c)
                x += bw
        return img
    raise ValueError(kind)


def _draw_ops(d: ImageDraw.ImageDraw, sc: _Scene, px: int) -> None:
    s = px / _R * sc.zoom
    ox, oy = sc.off[0] * px / _R, sc.off[1] * px / _R
    _ox = (ox, oy)

    def sx(v, axis=0):
        return _ox[axis] + v * s

    for op in sc.ops:
        kind = op[0]
        if kind == "rect":
            _, box, fill, outline, width, radius = op
            if box[2] <= box[0] or box[3] <= box[1]:
                continue
            bb = (sx(box[0]), sx(box[1], 1), sx(box[2]), sx(box[3], 1))
            kw = dict(fill=_rgb(fill), outline=_rgb(outline) if outline is not None else None,
                      width=max(1, round(width * s)) if outline is not None and width else 0)
            if radius:
                d.rounded_rectangle(bb, radius=radius * s, **kw)
            else:
                d.rectangle(bb, **kw)
        elif kind == "poly":
            _, pts, fill, outline, width = op
            d.polygon([(sx(x), sx(y, 1)) for x, y in pts], fill=_rgb(fill),
                      outline=_rgb(outline) if outline is not None else None,
                      width=max(1, round(width * s)) if width else 1)
        elif kind == "ellipse":
            _, box, fill, outline, width = op
            d.ellipse((sx(box[0]), sx(box[1], 1), sx(box[2]), sx(box[3], 1)), fill=_rgb(fill),
                      outline=_rgb(outline) if outline is not None else None,
                      width=max(1, round(width * s)) if width else 1)
        elif kind == "line":
            _, pts, fill, width = op
            d.line([(sx(x), sx(y, 1)) for x, y in pts], fill=_rgb(fill),
                   width=max(1, round(width * s)))
        else:
            t: _T = op[1]
            size = max(5, round(t.size * s))
            sw = round(t.stroke * s) if t.stroke else 0
            d.text((sx(t.x), sx(t.y, 1)), t.text, fill=_rgb(t.color), font=_font(t.font, size),
                   anchor=t.anchor, stroke_width=sw,
                   stroke_fill=_rgb(t.stroke_color) if sw and t.stroke_color is not None else None)


def _render(sc: _Scene, px: int) -> Image.Image:
    rng = np.random.default_rng(sc.np_seed)
    img = _background(sc.bg, px, rng)
    s = px / _R
    if sc.clutter:
        d = ImageDraw.Draw(img)
        for kind, box, c in sc.clutter:
            bb = tuple(v * s for v in box)
            (d.ellipse if kind == "ellipse" else d.rectangle)(bb, fill=c)
    if sc.angle:
        layer = Image.new("RGBA", (px, px), (0, 0, 0, 0))
        _draw_ops(ImageDraw.Draw(layer), sc, px)
        layer = layer.rotate(sc.angle, resample=Image.Resampling.BILINEAR)
        img = img.convert("RGBA")
        img.alpha_composite(layer)
        img = img.convert("RGB")
    else:
        _draw_ops(ImageDraw.Draw(img), sc, px)
    return img


def _encode(img: Image.Image, quality: int = JPEG_QUALITY) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=quality, subsampling=2, optimize=False, progressive=False)
    return buf.getvalue()


def dhash(img: Image.Image | bytes, hash_size: int = 8) -> int:
    """64-bit difference hash ("pixel > left neighbour" on a 9x8 LANCZOS grey thumbnail).

    Bit-compatible with ``imagehash.dhash`` and the Tier-2 ``dhash`` UDF (MSB first)."""
    if isinstance(img, (bytes, bytearray)):
        img = Image.open(io.BytesIO(img))
    g = np.asarray(img.convert("L").resize((hash_size + 1, hash_size),
                                           Image.Resampling.LANCZOS), np.int16)
    bits = (g[:, 1:] > g[:, :-1]).flatten()
    v = 0
    for bit in bits:
        v = (v << 1) | int(bit)
    return v


def _hamming(a: int, b: int) -> int:
    return bin(a ^ b).count("1")
