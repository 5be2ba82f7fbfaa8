"""Fonts and colours scenes draw with: matplotlib's bundled TTFs, text measurement, named colours.

Widths are measured once at a fixed size and scaled, so a layout does not depend on ``image_px``.
"""

from __future__ import annotations

import functools
import math
import random
from pathlib import Path

from PIL import ImageFont


_FONT_FILES = {
    "sans": "DejaVuSans.ttf", "sans_b": "DejaVuSans-Bold.ttf",
    "sans_i": "DejaVuSans-Oblique.ttf", "sans_bi": "DejaVuSans-BoldOblique.ttf",
    "serif": "DejaVuSerif.ttf", "serif_b": "DejaVuSerif-Bold.ttf",
    "serif_i": "DejaVuSerif-Italic.ttf", "serif_bi": "DejaVuSerif-BoldItalic.ttf",
    "mono": "DejaVuSansMono.ttf", "mono_b": "DejaVuSansMono-Bold.ttf",
    "stix": "STIXGeneral.ttf", "stix_b": "STIXGeneralBol.ttf",
    "stix_i": "STIXGeneralItalic.ttf", "stix_bi": "STIXGeneralBolIta.ttf",
}
_BOLD = ("sans_b", "sans_b", "sans_b", "serif_b", "mono_b", "stix_b", "sans_bi", "serif_bi")


@functools.lru_cache(maxsize=1)
def _font_dir() -> Path:
    import matplotlib  # only for the path of its bundled fonts

    return Path(matplotlib.get_data_path()) / "fonts" / "ttf"


@functools.lru_cache(maxsize=2048)
def _font(name: str, size: int) -> ImageFont.FreeTypeFont:
    return ImageFont.truetype(str(_font_dir() / _FONT_FILES[name]), size)


@functools.lru_cache(maxsize=65536)
def _w100(font: str, text: str) -> float:
    return _font(font, 100).getlength(text)


def _tlen(font: str, text: str, size: float) -> float:
    """Advance width of ``text`` at ``size`` (reference units), measured at a fixed size."""
    return _w100(font, text) * size / 100.0


def _fit(font: str, text: str, max_w: float, max_size: float, min_size: float = 6.0) -> float:
    w = _tlen(font, text, 100.0)
    return float(max(min_size, min(max_size, math.floor(100.0 * max_w / max(w, 1.0)))))


COLORS: dict[str, tuple[int, int, int]] = {
    "red": (204, 30, 38), "blue": (24, 70, 178), "green": (18, 124, 58),
    "yellow": (250, 206, 22), "orange": (240, 118, 18), "white": (248, 248, 246),
    "black": (22, 22, 24), "purple": (108, 40, 150), "brown": (118, 72, 38),
    "pink": (232, 104, 158), "gray": (128, 128, 130),
}


def _rgb(c) -> tuple[int, int, int]:
    return COLORS[c] if isinstance(c, str) else c


def _lum(c) -> float:
    def ch(v: int) -> float:
        v = v / 255.0
        return v / 12.92 if v <= 0.03928 else ((v + 0.055) / 1.055) ** 2.4

    r, g, b = _rgb(c)
    return 0.2126 * ch(r) + 0.7152 * ch(g) + 0.0722 * ch(b)


def _contrast(a, b) -> float:
    la, lb = _lum(a), _lum(b)
    return (max(la, lb) + 0.05) / (min(la, lb) + 0.05)


def _on(r: random.Random, bg, choices=tuple(COLORS), min_ratio: float = 4.5, exclude=()) -> str:
    ok = [c for c in choices if c not in exclude and _contrast(c, bg) >= min_ratio]
    if not ok:
        return "black" if _contrast("black", bg) >= _contrast("white", bg) else "white"
    return r.choice(ok)


def _shade(c, f: float) -> tuple[int, int, int]:
    return tuple(int(max(0, min(255, v * f))) for v in _rgb(c))


def _mix(a, b, t: float) -> tuple[int, int, int]:
    a, b = _rgb(a), _rgb(b)
    return tuple(int(a[k] * (1 - t) + b[k] * t) for k in range(3))
