"""A scene as data: draw ops, placed texts and weighted questions, on the 256-unit reference canvas.

Also the shared layout helpers every scene kind uses: fine print and background choices.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from ._palette import _mix, _rgb, _shade, _tlen
from ._vocab import _COMMON, _brands

_R = 256.0               # layout reference canvas; everything is scaled to image_px at render time


@dataclass
class _T:
    x: float
    y: float
    text: str
    font: str
    size: float
    color: str
    anchor: str = "mm"
    stroke: float = 0.0
    stroke_color: object = None
    target: bool = False

    def box(self) -> tuple[float, float, float, float]:
        w = _tlen(self.font, self.text, self.size)
        h = self.size * 0.95
        x0 = {"l": self.x, "m": self.x - w / 2, "r": self.x - w}[self.anchor[0]]
        y0 = {"a": self.y, "t": self.y, "m": self.y - h / 2, "s": self.y - 0.76 * self.size,
              "d": self.y - h}[self.anchor[1]]
        return x0, y0, x0 + w, y0 + h


@dataclass
class _Q:
    w: float
    q: str
    a: str
    kind: str = "text"           # text | number | time | price | yesno | color | plate
    shown: str | None = None     # as printed (case / punctuation variants)
    wrong: tuple = ()            # plausible wrong answers (other visible text ...)
    suffix: str | None = None    # "zorvex" -> "zorvex bakery" style superset answers
    article: bool = False        # "the zorvex" is a plausible annotator answer


@dataclass
class _Scene:
    kind: str
    noun: str
    bg: tuple = ("solid", "white")
    ops: list = field(default_factory=list)
    texts: list = field(default_factory=list)
    questions: list = field(default_factory=list)
    classes: tuple = ()
    angle: float = 0.0
    zoom: float = 1.0                # object layer scale / offset (layout jitter)
    off: tuple = (0.0, 0.0)
    clutter: list = field(default_factory=list)  # background shapes, not text
    np_seed: int = 0

    def rect(self, box, fill, outline=None, width=0.0, radius=0.0):
        self.ops.append(("rect", box, fill, outline, width, radius))

    def poly(self, pts, fill, outline=None, width=0.0):
        self.ops.append(("poly", pts, fill, outline, width))

    def ellipse(self, box, fill, outline=None, width=0.0):
        self.ops.append(("ellipse", box, fill, outline, width))

    def line(self, pts, fill, width=1.0):
        self.ops.append(("line", pts, fill, width))

    def text(self, x, y, s, font, size, color, anchor="mm", stroke=0.0, stroke_color=None,
             target=False) -> _T:
        t = _T(x, y, s, font, float(size), color, anchor, stroke, stroke_color, target)
        self.ops.append(("text", t))
        self.texts.append(t)
        return t

    def q(self, w, q, a, kind="text", shown=None, wrong=(), suffix=None, article=False):
        self.questions.append(_Q(w, q, a, kind, shown, tuple(wrong), suffix, article))

    def reading_order(self) -> list[_T]:
        def key(t: _T):
            x0, y0, x1, y1 = t.box()
            return (round((y0 + y1) / 2 / 14.0), x0)

        return sorted(self.texts, key=key)


def _density(r: random.Random) -> int:
    """Number of fine-print words to try to place: none / a few / many."""
    x = r.random()
    if x < 0.34:
        return r.choice((0, 0, 0, 1, 2))
    if x < 0.68:
        return r.randint(3, 10)
    return r.randint(15, 42)


def _fp_words(r: random.Random, n: int) -> list[str]:
    out = []
    for _ in range(n):
        x = r.random()
        if x < 0.62:
            w = r.choice(_COMMON)
        elif x < 0.78:
            w = r.choice(_brands()).split()[0]
        elif x < 0.9:
            w = str(r.randint(1, 999))
        else:
            w = r.choice(("www.", "tel.", "No.", "#", "oz", "kg", "mg", "%", "&", "/", "g", "ml"))
            w = {"www.": f"www.{r.choice(_brands()).split()[0].lower()}.com",
                 "tel.": f"{r.randint(200, 989)}-{r.randint(1000, 9999)}",
                 "No.": f"No.{r.randint(1, 99)}", "#": f"#{r.randint(1, 999)}",
                 "%": f"{r.randint(1, 99)}%", "&": "&", "/": "/"}.get(w, f"{r.randint(1, 500)}{w}")
        cap = r.random()
        if cap < 0.25:
            w = w.upper()
        elif cap < 0.5:
            w = w[:1].upper() + w[1:]
        out.append(w)
    return out


def _fineprint(sc: _Scene, r: random.Random, box, n: int, color, size: float | None = None,
               font: str | None = None) -> int:
    """Fill ``box`` with up to ``n`` small words, line by line; returns how many were placed."""
    if n <= 0:
        return 0
    x0, y0, x1, y1 = box
    size = size or r.choice((7.5, 8.0, 8.5, 9.0, 10.0, 11.0))
    font = font or r.choice(("sans", "sans", "serif", "mono", "stix", "sans_b"))
    lh = size * 1.28
    words = _fp_words(r, n)
    placed, y, k = 0, y0, 0
    maxw = (x1 - x0) * 0.9  # slack so lines fit at every image_px despite hinting
    while k < len(words) and y + size <= y1:
        line = [words[k]]
        k += 1
        while k < len(words) and _tlen(font, " ".join(line + [words[k]]), size) <= maxw:
            line.append(words[k])
            k += 1
        if _tlen(font, " ".join(line), size) > maxw:
            break
        sc.text(x0, y, " ".join(line), font, size, color, anchor="la")
        placed += len(line)
        y += lh
    return placed


# ----------------------------------------------------------------------------- backgrounds

_OUTDOOR_SKY = ((135, 186, 235), (200, 225, 245), (96, 150, 210), (225, 232, 240), (170, 200, 220))


def _outdoor_bg(r: random.Random) -> tuple:
    x = r.random()
    sky = r.choice(_OUTDOOR_SKY)
    if x < 0.4:
        return ("grad", sky, _mix(sky, "white", 0.6), "v")
    if x < 0.7:
        ground = r.choice(((90, 110, 70), (120, 120, 120), (150, 130, 100), (70, 90, 60)))
        return ("split", sky, ground, r.uniform(0.6, 0.8))
    return ("noise", r.choice(((120, 130, 110), (150, 150, 140), (90, 100, 120))), 30)


def _indoor_bg(r: random.Random) -> tuple:
    x = r.random()
    base = r.choice(((210, 200, 185), (180, 170, 160), (90, 80, 70), (230, 230, 225),
                     (60, 70, 90), (150, 120, 90), (200, 210, 220)))
    if x < 0.3:
        return ("solid", base)
    if x < 0.6:
        return ("grad", base, _shade(base, r.uniform(0.55, 0.8)), r.choice("vhd"))
    if x < 0.85:
        return ("noise", base, r.randint(12, 34))
    return ("bricks", r.choice(((150, 70, 50), (170, 90, 60), (120, 60, 45))), (200, 190, 175))


def _bg_color(bg: tuple) -> tuple[int, int, int]:
    if bg[0] in ("grad", "split"):
        return _mix(bg[1], bg[2], 0.5)
    if bg[0] == "bricks":
        return bg[1]
    return _rgb(bg[1])
