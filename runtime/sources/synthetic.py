"""Deterministic, offline generator of TextVQA-shaped rows (the embedded default data source).

What it generates
-----------------
Rows shaped like the real ``lance-format/textvqa-lance`` table: a JPEG image of a rendered
text scene, a TextVQA-style question about the text in it, ten annotator answers with realistic
disagreement, the canonical (majority, lower-case) answer, noisy OCR tokens and scene tags.
Scenes are drawn with Pillow using the TTF fonts shipped inside matplotlib (DejaVu Sans / Serif /
Mono and STIX, regular / bold / italic); no system fonts, no network, no model weights.

Scene kinds: street / stop / warning / info signs, storefronts, bottles, boxes and packets,
screens (digital clock, phone lock / home screen), book covers, licence-plate-like plates,
price tags, posters and billboards with differently coloured words, sports jerseys. The text a
question asks about is drawn large and high-contrast (legible after downscaling to 112-224 px);
distractor text is smaller, and a scene's fine-print density varies from none to ~40 tokens, so
slicing on OCR-token count is meaningful. Like TextVQA (~1.3 questions per image), consecutive
rows may share an ``image_id`` and identical image bytes but ask different questions, and 1-2 %
of images are near-duplicates of an earlier image (re-encoded at another JPEG quality, cropped
by 1-3 px or slightly brightened) under a different ``image_id``; their dHash (9x8, "pixel >
left neighbour") Hamming distance to the original is guaranteed <= 4. Layout jitter and
background clutter keep accidental collisions between unrelated images rare but not absent
(seed 0, 2000 rows: 30 planted near-duplicate pairs, 11 accidental pairs among 1556 images).

Determinism contract
--------------------
Row ``i`` is a pure function of ``(seed, i, image_px)``: rows are planned in fixed blocks of
``BLOCK_ROWS`` rows, and every random choice comes from an RNG seeded by the seed and the row /
block / image index (``random.Random("<purpose>:<seed>:<index...>")`` and NumPy generators
seeded from it), never from generator state carried between rows. Hence ``generate(3000)``
starts with exactly the rows of ``generate(2000)`` (byte-identical JPEGs: fixed quality, fixed
chroma subsampling, no optimisation pass), and ``start`` / ``batch_rows`` change only how rows
are cut into batches. Scene layout (and so the text and the OCR tokens) does not depend on
``image_px``; only the pixels do. Byte-identity holds for a fixed Pillow / NumPy / font version.

Columns omitted
---------------
The real table also has ``image_emb`` and ``question_emb`` (``fixed_size_list<float32, 512>``,
CLIP embeddings shipped with the dataset). Computing them needs CLIP weights, which cannot be
downloaded here, and random vectors would masquerade as embeddings, so :data:`SCHEMA` omits
them; every other column keeps the real name, Arrow type and relative order. ``image_classes``
holds a few lower-case scene tags ("sign", "bottle", "clock", ...); TextVQA's own tags are Open
Images class names, usually capitalised. ``set_name`` is always ``"train"``.
"""

from __future__ import annotations

import functools
import hashlib
import io
import math
import random
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np
import pyarrow as pa
from PIL import Image, ImageDraw, ImageEnhance, ImageFont

__all__ = ["SCHEMA", "SCENE_KINDS", "generate", "generate_table", "BLOCK_ROWS", "JPEG_QUALITY",
           "dhash"]

SCHEMA: pa.Schema = pa.schema(
    [
        pa.field("id", pa.int64()),
        pa.field("image", pa.large_binary()),
        pa.field("image_id", pa.string()),
        pa.field("question_id", pa.string()),
        pa.field("question", pa.string()),
        pa.field("answers", pa.list_(pa.string())),
        pa.field("answer", pa.string()),
        pa.field("ocr_tokens", pa.list_(pa.string())),
        pa.field("image_classes", pa.list_(pa.string())),
        pa.field("set_name", pa.string()),
    ]
)

BLOCK_ROWS = 16          # rows are planned in fixed blocks: the unit of image sharing
JPEG_QUALITY = 90        # fixed encoder settings => byte-identical JPEGs
_DUP_QUALITY = 70
_DUP_P = 0.015           # per image (slot > 0, block > 0): near-duplicate of an earlier image
_R = 256.0               # layout reference canvas; everything is scaled to image_px at render time

# ----------------------------------------------------------------------------- fonts / colours

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


# ----------------------------------------------------------------------------- word pools


def _words(s: str) -> tuple[str, ...]:
    return tuple(s.split())


_COMMON = _words(
    "open sale fresh new free best hot cold daily special organic natural classic original "
    "premium deluxe super extra value family market city park street center north south east "
    "west river lake hill garden house home kitchen coffee tea bread pizza burger taxi hotel bank "
    "school library museum station airport exit entrance parking welcome thanks please stop go "
    "slow notice private office room floor door push pull only way left right up down time day "
    "night week today morning evening love life world music art food drink water juice milk "
    "cafe shop store club bar grill books toys games sport gold silver star sun moon sky "
    "happy lucky royal grand great little big old good fine fast easy quick smart clean clear "
    "light power pure fun play kids baby pet dog cat tree flower apple lemon berry honey sugar "
    "salt pepper spice cream cheese butter chicken rice soup salad cookie cake snack candy "
    "chocolate mint cherry mango peach grape coconut lime service call now info more details "
    "visit online order pickup delivery since made with real quality guaranteed net weight "
    "contains ingredients serving store keep dry cool place use before see bottom side"
)
_FIRST = _words(
    "James Mary Robert Linda Michael Sarah David Karen Daniel Laura Paul Emma Mark Anna Peter "
    "Grace Steven Helen Kevin Julia Brian Nora Thomas Alice Henry Clara Jacob Ruth Samuel Irene "
    "Oliver Vera Lucas Elena Simon Diana Victor Rosa Martin Eva"
)
_LAST = _words(
    "Smith Johnson Brown Miller Davis Wilson Moore Taylor Clark Lewis Walker Hall Young King "
    "Wright Scott Green Baker Adams Nelson Carter Mitchell Turner Parker Collins Morgan Cooper "
    "Reed Bailey Bell Murphy Rivera Cook Rogers Ward Foster Gray Hughes Price Bennett Wood Ross "
    "Hayes Fisher Ellis Stone Hunt Porter Mason Grant"
)
_STREETS = _words(
    "Maple Oak Pine Elm Cedar Main Park Lake Hill Church Market Broad Spring Mill River Walnut "
    "Willow Sunset Highland Union Franklin Lincoln Madison Jackson Center Bay Harbor Forest "
    "Lincoln Grove Meadow Valley Ridge Birch Aspen"
)
_STREET_SUFFIX = _words("St Ave Rd Blvd Ln Dr Way")
_STATES = _words(
    "OREGON TEXAS OHIO IOWA MAINE UTAH IDAHO NEVADA GEORGIA FLORIDA ALASKA KANSAS VERMONT "
    "ARIZONA MONTANA INDIANA NEBRASKA COLORADO VIRGINIA MICHIGAN ILLINOIS KENTUCKY WYOMING "
    "HAWAII DELAWARE MISSOURI ALABAMA"
)
_SLOGANS = (
    "Pacific Wonderland", "Land of Lincoln", "Sunshine State", "Garden State", "Great Lakes",
    "Live Free or Die", "Empire State", "Lone Star State", "Natural State", "Big Sky Country",
    "Famous Potatoes", "Wild Wonderful", "Green Mountains", "Heart of It All", "Silver State",
)
_ITEMS = _words(
    "Bananas Apples Tomatoes Avocados Grapes Carrots Potatoes Onions Lemons Peppers Mangoes "
    "Cherries Broccoli Lettuce Cucumbers Pears Peaches Limes Oranges Bread Milk Eggs Coffee "
    "Cheese Yogurt Butter Rice Pasta Cereal Melons"
)
_PRODUCTS = _words(
    "Crackers Cereal Cookies Tea Pasta Soap Blocks Crayons Puzzle Tissues Oats Chips Candy "
    "Pretzels Rice Noodles Biscuits Granola"
)
_FLAVORS = _words(
    "Lemon Cherry Mango Mint Original Cola Orange Lime Berry Vanilla Peach Grape Ginger Apple "
    "Coconut"
)
_STORE_TYPES = _words(
    "BAKERY CAFE BOOKS PHARMACY MARKET DELI SALON PIZZA HARDWARE FLORIST DINER TAILOR GROCERY "
    "BARBER OPTICAL JEWELRY LAUNDRY TOYS"
)
_INFO_SIGNS = (
    "EXIT", "PARKING", "ONE WAY", "NO PARKING", "RESTROOMS", "ENTRANCE", "PUSH", "PULL",
    "PRIVATE", "KEEP OUT", "NO SMOKING", "BUS STOP", "TAXI", "HOTEL", "OPEN", "TICKETS", "YIELD",
    "DETOUR", "LOADING ZONE", "FIRE LANE", "STAFF ONLY", "INFORMATION",
)
_WARN_HEAD = ("WARNING", "DANGER", "CAUTION", "NOTICE")
_WARN_SUB = (
    "WET FLOOR", "HARD HAT AREA", "HIGH VOLTAGE", "CONTROLLED AREA", "KEEP OUT", "NO ENTRY",
    "CONSTRUCTION", "THIN ICE", "GUARD DOG", "FALLING ROCKS", "SLIPPERY", "DEEP WATER",
)
_POSTER_PHRASES = (
    ("BIG", "SALE"), ("FRESH", "COFFEE"), ("LIVE", "MUSIC"), ("GRAND", "OPENING"),
    ("SUMMER", "FESTIVAL"), ("HAPPY", "HOUR"), ("FREE", "WIFI"), ("BOOK", "FAIR"),
    ("FARMERS", "MARKET"), ("JAZZ", "NIGHT"), ("HOT", "DEALS"), ("NEW", "ARRIVALS"),
    ("CITY", "MARATHON"), ("FOOD", "TRUCKS"), ("ART", "SHOW"), ("DANCE", "PARTY"),
    ("YARD", "SALE"), ("FILM", "NIGHT"), ("SPRING", "CLEARANCE"), ("VOTE", "TODAY"),
)
_ADJ = _words(
    "Silent Hidden Last Lost Broken Golden Secret Dark Wild Quiet Burning Frozen Distant Endless "
    "Crimson Little Long Empty Bright Hollow Paper Iron Glass Velvet"
)
_NOUN = _words(
    "River Garden Kingdom Road House Mountain City Ocean Star Forest Winter Summer Island Bridge "
    "Letter Door Dream Shadow Fire Storm Valley Harbor Light Sky Machine Orchard Song Tide"
)
_APPS = _words(
    "Mail Maps Camera Music Photos Weather Clock Notes Phone Messages Settings Calendar News "
    "Wallet Books Store Health Files Video Radio"
)
_DAYS = ("MON", "TUE", "WED", "THU", "FRI", "SAT", "SUN")
_DAY_FULL = dict(zip(_DAYS, ("monday", "tuesday", "wednesday", "thursday", "friday",
                             "saturday", "sunday")))
_JUNK = ("I", "l", "a", "1", "7h", "1E", "..", "|", "-", "o", "ii", "A", "'", "r", "TM", "&")


@functools.lru_cache(maxsize=1)
def _brands() -> tuple[str, ...]:
    """A fixed pool of ~400 invented brand-like names (independent of the user seed)."""
    r = random.Random("vlmspec-brand-pool-v1")
    on = ("b br c cr d dr f fl g gr h j k kl l m n p pl pr qu r s sh sk sl sp st t tr v w z "
          "x ch").split()
    vo = "a e i o u a o e ai ea oo y".split()
    co = ["", "", "", "n", "r", "x", "k", "l", "m", "s", "t", "ck", "nd", "st", "ll", "z", "v"]
    suf = ["", "", "", "o", "a", "ex", "ix", "ly", "on", "io", "us", "ia", "er"]
    out: list[str] = []
    seen: set[str] = set()
    while len(out) < 400:
        n = r.choice((1, 2, 2, 2, 3))
        w = "".join(r.choice(on) + r.choice(vo) + r.choice(co) for _ in range(n)) + r.choice(suf)
        if not 4 <= len(w) <= 9 or w in seen:
            continue
        seen.add(w)
        x = r.random()
        if x < 0.12 and len(w) <= 7:  # hyphenated two-part brand, e.g. "Kel-Vora"
            w2 = r.choice(on) + r.choice(vo) + r.choice(co) + r.choice(("a", "o", "i", ""))
            w = f"{w.title()}-{w2.title()}"
        elif x < 0.20 and len(w) <= 7:  # two-word brand, e.g. "Mira Pop"
            w = f"{w.title()} {r.choice(('Pop', 'Co', 'Max', 'Go', 'One', 'Fresh', 'Joy'))}"
        else:
            w = w.title()
        out.append(w)
    return tuple(out)


def _brand(r: random.Random, max_len: int = 12) -> str:
    pool = _brands()
    while True:
        b = r.choice(pool)
        if len(b) <= max_len:
            return b


def _style(r: random.Random, s: str, p_upper: float = 0.5) -> str:
    x = r.random()
    return s.upper() if x < p_upper else (s.lower() if x > 0.92 else s)


# ----------------------------------------------------------------------------- scene spec


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


# ----------------------------------------------------------------------------- scene kinds

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


def _scene_sign(r: random.Random) -> _Scene:
    sub = r.choices(("stop", "warning", "street", "info"), (2, 3, 3, 4))[0]
    sc = _Scene("sign", "sign", _outdoor_bg(r))
    n_fine = _density(r)
    bgc = _bg_color(sc.bg)
    pole = (120, 120, 125)
    if sub == "stop":
        sc.classes = ("sign", "stop sign", "street")
        sc.rect((122, 150, 134, 256), pole)
        cx, cy, rad = 128, 108, r.uniform(84, 96)

        def octo(rr):
            return [(cx + rr * math.cos(math.radians(22.5 + 45 * k)),
                     cy + rr * math.sin(math.radians(22.5 + 45 * k))) for k in range(8)]

        sc.poly(octo(rad), "white")
        sc.poly(octo(rad - 6), "red")
        f = r.choice(("sans_b", "sans_b", "serif_b", "stix_b"))
        word = "STOP" if r.random() < 0.85 else r.choice(("STOP", "ALTO", "HALT"))
        sz = _fit(f, word, rad * 1.45, 64, 30)
        sc.text(cx, cy, word, f, sz, "white", target=True)
        sub_txt = None
        if r.random() < 0.4:
            sub_txt = r.choice(("ALL WAY", "4-WAY", "AHEAD", "HERE"))
            sc.rect((72, 208, 184, 240), "white", "black", 2, 3)
            sc.text(128, 224, sub_txt, "sans_b", _fit("sans_b", sub_txt, 100, 22, 12), "black")
        if n_fine:
            cc = _on(r, bgc, ("black", "white"), 3.0)
            _fineprint(sc, r, (4, 4, 60, 60), n_fine // 2, cc)
            _fineprint(sc, r, (190, 190, 252, 252), n_fine - n_fine // 2, cc)
        w = word.lower()
        sc.q(3, r.choice(("what does the sign say?", "what is written on the sign?",
                          "what word is on the sign?")), w, shown=word, suffix="sign")
        sc.q(1.2, "is this a stop sign?", "yes" if word == "STOP" else "no", "yesno")
        sc.q(1.2, r.choice(("what color is the sign?", "what color is the stop sign?")),
             "red", "color")
        if sub_txt:
            sc.q(1.0, "what is written below the stop sign?", sub_txt.lower(), shown=sub_txt,
                 wrong=("stop",))
        return sc

    if sub == "warning":
        sc.classes = ("sign", "poster")
        panel = r.choice(("yellow", "white", "white", "orange"))
        sc.rect((16, 16, 240, 240), panel, "black", r.choice((0, 3, 5)), r.choice((0, 8)))
        head = r.choice(_WARN_HEAD)
        band = r.random() < 0.4
        f = r.choice(_BOLD[:4])
        if band:
            bandc = r.choice(("red", "black", "blue", "orange"))
            if bandc == panel:
                bandc = "black"
            sc.rect((24, 24, 232, 80), bandc)
            hc = _on(r, bandc, ("white", "yellow"), 3.0)
        else:
            hc = _on(r, panel, ("red", "black", "blue"), 3.0)
        sc.text(128, 52, head, f, _fit(f, head, 190, 46, 28), hc, target=True)
        subw = r.choice(_WARN_SUB)
        sc_col = "black" if _contrast("black", panel) > 4.5 else "white"
        f2 = r.choice(("sans_b", "sans_b", "serif_b", "mono_b"))
        parts = subw.split()
        lines = [subw] if len(parts) < 3 else [" ".join(parts[:2]), " ".join(parts[2:])]
        s2 = min(_fit(f2, ln, 190, 34, 20) for ln in lines)
        y = 108 if len(lines) == 1 else 100
        for ln in lines:
            sc.text(128, y, ln, f2, s2, sc_col, target=True)
            y += s2 * 1.15
        sentence_words = _words("it is unlawful to enter this area without permission authorized "
                                "personnel only violators will be prosecuted")
        fine_y = y + 6
        if n_fine:
            k = min(len(sentence_words), max(3, n_fine // 2))
            fn = r.choice(("sans", "serif"))
            fs = r.choice((9.0, 10.0, 11.0))
            lines2, cur = [], []
            for w in sentence_words[:k]:
                w = w.capitalize() if not cur and not lines2 else w
                if _tlen(fn, " ".join(cur + [w]), fs) > 180:
                    lines2.append(" ".join(cur))
                    cur = []
                cur.append(w)
            lines2.append(" ".join(cur))
            for ln in lines2:
                if fine_y + fs > 232:
                    break
                sc.text(128, fine_y + fs / 2, ln, fn, fs, sc_col)
                fine_y += fs * 1.3
            _fineprint(sc, r, (30, fine_y + 2, 226, 232), n_fine - k, sc_col)
        sc.q(2, r.choice(("what is the first word on the sign?", "what does the top of the "
                          "sign say?", "what is written at the top of the sign?")),
             head.lower(), shown=head)
        sc.q(2, r.choice(("what does the sign warn about?", "what is written under "
                          f"{head.lower()}?", "what does the sign say below the heading?")),
             subw.lower(), shown=subw, wrong=(head.lower(),))
        sc.q(0.7, "is this a stop sign?", "no", "yesno")
        sc.q(0.8, "what color is the sign?", panel, "color")
        return sc

    if sub == "street":
        sc.classes = ("sign", "street sign", "street")
        sc.rect((123, 60, 133, 256), pole)
        col = r.choice(("green", "green", "blue", "brown", "black"))
        name = f"{r.choice(_STREETS)} {r.choice(_STREET_SUFFIX)}"
        shown = name.upper() if r.random() < 0.55 else name
        sc.rect((10, 66, 246, 146), col, "white", 3, 6)
        f = r.choice(("sans_b", "sans_b", "sans", "serif_b"))
        sc.text(128, 106, shown, f, _fit(f, shown, 206, 48, 24), "white", target=True)
        other = None
        if r.random() < 0.35:
            other = r.choice(("ONE WAY", "NO PARKING", "DEAD END", "SLOW", "SCHOOL ZONE"))
            sc.rect((50, 14, 206, 54), "white", "black", 2, 3)
            sc.text(128, 34, other, "sans_b", _fit("sans_b", other, 140, 24, 12), "black")
        if n_fine >= 3:
            sc.rect((146, 160, 246, 248), (240, 238, 228), (60, 60, 60), 1)
            _fineprint(sc, r, (150, 164, 242, 246), n_fine, "black", size=r.choice((7.5, 8.0)))
        sc.q(3, r.choice(("what street is this?", "what is the name of the street?",
                          "what street is shown on the sign?", "what is written on the "
                          "street sign?")), name.lower(), shown=shown,
             wrong=(other.lower(),) if other else (), suffix=None)
        sc.q(1, "what color is the street sign?", col, "color")
        sc.q(0.6, "is this a stop sign?", "no", "yesno")
        sc.q(0.8, "what is the first word on the sign?", name.split()[0].lower(),
             shown=shown.split()[0])
        return sc

    sc.classes = ("sign",)
    bgcol, fg = r.choice((("green", "white"), ("blue", "white"), ("red", "white"),
                          ("white", "black"), ("black", "yellow"), ("yellow", "black"),
                          ("white", "red"), ("brown", "white"), ("white", "blue")))
    word = r.choice(_INFO_SIGNS)
    sc.rect((18, 56, 238, 176), bgcol, r.choice((None, "white", "black")), 3,
            r.choice((0, 6, 12)))
    f = r.choice(_BOLD)
    sc.text(128, 116, word, f, _fit(f, word, 196, 66, 26), fg, target=True)
    if r.random() < 0.4:
        arrow = [(30, 160), (60, 150), (60, 170)] if r.random() < 0.5 else \
            [(226, 160), (196, 150), (196, 170)]
        sc.poly(arrow, fg)
    if n_fine >= 3:
        sc.rect((30, 188, 226, 250), (244, 242, 236), (50, 50, 50), 1)
        _fineprint(sc, r, (34, 192, 222, 248), n_fine, "black")
    sc.q(3, r.choice(("what does the sign say?", "what is written on the sign?",
                      "what word is on the sign?" if " " not in word else
                      "what words are on the sign?")),
         word.lower(), shown=word, suffix="sign")
    sc.q(1, "what color is the sign?", bgcol, "color", wrong=(fg,))
    sc.q(0.7, "is this a stop sign?", "no", "yesno")
    sc.q(0.8, f"does the sign say {word.lower()}?", "yes", "yesno")
    return sc


def _scene_storefront(r: random.Random) -> _Scene:
    sc = _Scene("storefront", "sign", _indoor_bg(r) if r.random() < 0.5 else
                ("bricks", r.choice(((150, 70, 50), (170, 90, 60))), (205, 195, 180)))
    sc.classes = ("building", "storefront", "sign")
    n_fine = _density(r)
    board = r.choice(("white", "black", "green", "blue", "red", "brown", "yellow"))
    sc.rect((6, 12, 250, 100), board, r.choice((None, "white", "black")), 3)
    brand = _brand(r, 10)
    shown = _style(r, brand, 0.55)
    typ = r.choice(_STORE_TYPES)
    fc = _on(r, board, ("white", "black", "yellow", "red", "white"), 4.5)
    f = r.choice(_BOLD)
    sc.text(128, 44, shown, f, _fit(f, shown, 220, 46, 26), fc, target=True)
    f2 = r.choice(("sans_b", "serif_b", "sans"))
    tc = _on(r, board, ("white", "black", "yellow", "gray", "orange"), 3.5, exclude=(fc,))
    sc.text(128, 82, typ, f2, _fit(f2, typ, 200, 22, 14), tc)
    glass = r.choice(((60, 80, 100), (150, 190, 210), (40, 50, 60)))
    sc.rect((14, 108, 152, 250), glass, (230, 230, 230), 3)
    sc.rect((162, 108, 242, 256), r.choice(((110, 70, 40), (60, 60, 65), (150, 40, 40))),
            (230, 230, 230), 3)
    sc.ellipse((226, 178, 234, 186), (220, 200, 90))
    is_open = r.random() < 0.6
    sign_txt = "OPEN" if is_open else "CLOSED"
    sc.rect((26, 118, 114, 150), "white", "red", 2, 4)
    sc.text(70, 134, sign_txt, "sans_b", _fit("sans_b", sign_txt, 78, 22, 14), "red")
    oh, ch = r.randint(6, 11), r.randint(4, 10)
    hours = f"{oh}AM-{ch}PM"
    hc = _on(r, glass, ("white", "yellow", "black"), 4.0)
    sc.text(20, 162, "HOURS", "sans_b", 11, hc, anchor="la")
    sc.text(20, 176, hours, "sans_b", _fit("sans_b", hours, 124, 20, 14), hc, anchor="la")
    phone = f"{r.randint(200, 989)}-{r.randint(200, 989)}-{r.randint(1000, 9999)}"
    if r.random() < 0.6:
        sc.text(20, 200, phone, "sans", 10, hc, anchor="la")
    if n_fine:
        _fineprint(sc, r, (20, 214, 148, 248), n_fine // 2 + 1, hc)
        _fineprint(sc, r, (166, 120, 238, 176), n_fine - n_fine // 2,
                   _on(r, (110, 70, 40), ("white", "yellow"), 3.0), size=7.5)
    b = brand.lower()
    sc.q(3, r.choice(("what is the name of the store?", "what is the name of this business?",
                      "what is the name of the shop?", "what store is this?")), b, shown=shown,
         suffix=typ.lower(), wrong=(typ.lower(),), article=True)
    sc.q(1.2, r.choice(("what kind of store is this?", "what type of business is this?")),
         typ.lower(), shown=typ, wrong=(b,))
    sc.q(1.0, "is the store open?", "yes" if is_open else "no", "yesno")
    sc.q(0.9, r.choice(("when does the store open?", "what time does the store open?")),
         f"{oh}am", "time", shown=f"{oh}AM", wrong=(f"{ch}pm",))
    sc.q(0.6, "what time does the store close?", f"{ch}pm", "time", shown=f"{ch}PM",
         wrong=(f"{oh}am",))
    return sc


def _scene_bottle(r: random.Random) -> _Scene:
    sc = _Scene("bottle", "label", _indoor_bg(r))
    sc.classes = r.choice((("bottle", "drink"), ("bottle", "beverage"), ("tin can", "drink")))
    n_fine = _density(r)
    glass = r.choice(((40, 110, 60), (110, 60, 30), (190, 205, 210), (30, 60, 120),
                      (200, 40, 40), (235, 235, 235)))
    sc.rect((108, 8, 148, 22), r.choice(("red", "yellow", "white", "black", "blue")), None, 0, 2)
    sc.rect((112, 20, 144, 60), glass)
    sc.poly([(112, 58), (144, 58), (200, 92), (56, 92)], glass)
    sc.rect((40, 88, 216, 252), glass, None, 0, 18)
    sc.rect((52, 96, 60, 240), _mix(glass, "white", 0.35))  # highlight
    label = r.choice(("white", "yellow", "red", "black", "blue", "orange", "green"))
    sc.rect((36, 110, 220, 226), label, _shade(label, 0.7), 2)
    brand = _brand(r, 9)
    shown = _style(r, brand, 0.6)
    f = r.choice(_BOLD)
    bc = _on(r, label, ("white", "black", "red", "blue", "yellow", "white"), 4.5)
    sc.text(128, 140, shown, f, _fit(f, shown, 170, 44, 26), bc, target=True)
    flav = r.choice(_FLAVORS)
    fshown = _style(r, flav, 0.4)
    fc = _on(r, label, ("white", "black", "red", "blue", "green", "purple", "orange"), 4.0,
             exclude=(bc,))
    f2 = r.choice(("sans_b", "serif_bi", "sans_bi", "stix_b"))
    sc.text(128, 176, fshown, f2, _fit(f2, fshown, 160, 24, 18), fc)
    ml = r.choice((250, 330, 355, 500, 600, 750, 1000))
    vol = f"{ml} ml" if r.random() < 0.7 else f"{ml}ML"
    vc = "black" if _contrast("black", label) > _contrast("white", label) else "white"
    sc.text(128, 206, vol, "sans_b", 16, vc)
    if n_fine:
        _fineprint(sc, r, (56, 230, 208, 252), min(n_fine, 6), _on(r, glass, ("white", "black"),
                                                                  2.0), size=7.5)
        if n_fine > 6:
            _fineprint(sc, r, (2, 2, 104, 86), (n_fine - 6) // 2,
                       _on(r, _bg_color(sc.bg), ("black", "white"), 2.5))
            _fineprint(sc, r, (152, 2, 254, 86), n_fine - 6 - (n_fine - 6) // 2,
                       _on(r, _bg_color(sc.bg), ("black", "white"), 2.5))
    b = brand.lower()
    sc.q(3, r.choice(("what brand is this?", "what brand of drink is this?",
                      "what is the name of this drink?", "what brand is the bottle?",
                      "what company makes this drink?")), b, shown=shown,
         wrong=(flav.lower(),), suffix=r.choice(("soda", "water", "juice", None)), article=True)
    sc.q(1.3, r.choice(("what flavor is this?", "what flavor is the drink?")), flav.lower(),
         shown=fshown, wrong=(b,))
    sc.q(0.9, r.choice(("how many ml are in the bottle?", "how many milliliters is this?")),
         str(ml), "number", suffix="ml")
    return sc


def _scene_box(r: random.Random) -> _Scene:
    sc = _Scene("box", "box", _indoor_bg(r))
    product = r.choice(_PRODUCTS)
    toy = product in ("Blocks", "Crayons", "Puzzle")
    sc.classes = ("toy", "box") if toy else r.choice((("box", "food"), ("packaging", "box"),
                                                       ("snack", "box")))
    n_fine = _density(r)
    col = r.choice(("red", "blue", "yellow", "green", "white", "orange", "purple", "black"))
    sc.poly([(222, 20), (244, 8), (244, 236), (222, 250)], _shade(col, 0.62))
    sc.poly([(12, 20), (34, 8), (244, 8), (222, 20)], _shade(col, 0.8))
    sc.rect((12, 20, 222, 250), col)
    band = r.choice((None, "white", "black", "yellow", "red"))
    if band == col:
        band = None
    head_bg = band or col
    if band:
        sc.rect((12, 28, 222, 88), band)
    brand = _brand(r, 10)
    shown = _style(r, brand, 0.6)
    f = r.choice(_BOLD)
    bc = _on(r, head_bg, ("white", "black", "red", "blue", "yellow", "white"), 4.5)
    sc.text(117, 58, shown, f, _fit(f, shown, 190, 50, 28), bc, stroke=r.choice((0, 0, 1.5)),
            stroke_color=_shade(bc, 0.4) if bc != "black" else (255, 255, 255), target=True)
    pshown = product.upper() if r.random() < 0.6 else product
    pc = _on(r, col, ("white", "black", "yellow", "red", "blue"), 4.5, exclude=(bc,))
    f2 = r.choice(("sans_b", "serif_b", "sans_bi", "stix_b"))
    sc.text(117, 110, pshown, f2, _fit(f2, pshown, 180, 30, 18), pc)
    tc = "black" if _contrast("black", col) > _contrast("white", col) else "white"
    pcs = r.choice((12, 24, 48, 60, 100, 112, 150, 250, 500)) if toy or r.random() < 0.5 else None
    lo, hi = r.choice(((3, 8), (5, 12), (4, 99), (6, 14), (8, 99), (2, 5)))
    ages = f"{lo}-{hi}" if hi < 99 else f"{lo}+"
    wt = f"{r.choice((100, 150, 200, 250, 300, 400, 500, 750))}g"
    if pcs:
        sc.ellipse((142, 130, 214, 202), "white" if col != "white" else "yellow", "black", 2)
        sc.text(178, 158, str(pcs), "sans_b", _fit("sans_b", str(pcs), 56, 26, 14), "black")
        sc.text(178, 182, "pcs", "sans_b", 13, "black")
    if toy:
        sc.rect((22, 132, 102, 170), "white", "black", 1, 3)
        sc.text(62, 146, "Ages", "sans", 11, "black")
        sc.text(62, 161, ages, "sans_b", 14, "black")
    sc.text(22, 232, f"NET WT {wt}", "sans_b", 12, tc, anchor="ls")
    if n_fine:
        _fineprint(sc, r, (22, 180 if toy else 132, 136 if pcs else 212, 218), n_fine, tc)
    b = brand.lower()
    sc.q(3, r.choice(("what brand is this?", f"what brand of {product.lower()} is this?",
                      "what is the brand name on the box?", "what company makes this product?",
                      "what is the brand?")), b, shown=shown, wrong=(product.lower(),),
         article=True)
    sc.q(1.0, r.choice(("what kind of product is this?", "what is in the box?")),
         product.lower(), shown=pshown, wrong=(b,))
    if pcs:
        sc.q(1.2, r.choice(("how many pieces are in the box?", "how many pieces are included?")),
             str(pcs), "number", suffix="pcs")
    if toy:
        sc.q(0.8, "what ages is this for?", ages, "text", wrong=(str(lo),))
    sc.q(0.6, "what is the net weight?", wt, "number", shown=wt.upper())
    return sc


def _scene_screen(r: random.Random) -> _Scene:
    phone = r.random() < 0.4
    sc = _Scene("screen", "screen", _indoor_bg(r))
    n_fine = _density(r)
    h, m = r.randint(1, 12), r.randint(0, 59)
    h24 = r.random() < 0.2
    if h24:
        h = r.randint(0, 23)
    t = f"{h}:{m:02d}" if not h24 else f"{h:02d}:{m:02d}"
    ampm = None if h24 else r.choice(("AM", "PM"))
    day = r.choice(_DAYS)
    date = f"{r.randint(1, 12):02d}/{r.randint(1, 28):02d}"
    if not phone:
        sc.classes = ("clock", "digital clock")
        body = r.choice(((30, 30, 32), (70, 70, 75), (120, 85, 50), (200, 200, 205),
                         (150, 30, 30), (235, 235, 228)))
        left, right = r.uniform(4, 26), _R - r.uniform(4, 26)
        top = r.uniform(22, 72)
        bot = min(250.0, top + r.uniform(150, 182))
        sc.rect((left, top, right, bot), body, (0, 0, 0), 2, r.choice((4, 10, 18)))
        sx0, sy0, sx1, sy1 = left + r.uniform(10, 16), top + 18, right - r.uniform(10, 16), bot - 28
        sc.rect((sx0, sy0, sx1, sy1), r.choice(((8, 10, 12), (14, 20, 16), (10, 12, 30))))
        dc = r.choice(("red", "green", "white", (80, 230, 255), "orange"))
        f = r.choice(("mono_b", "sans_b", "mono_b", "mono"))
        big_ampm = ampm is not None and r.random() < 0.5
        cw = sx1 - sx0
        s = _fit(f, t, cw - (58 if big_ampm else 14), 78, 40)
        cx = (sx0 + sx1) / 2 - (14 if big_ampm else 0)
        cy = (sy0 + sy1) / 2 + 8
        sc.text(cx, cy, t, f, s, dc, target=True)
        if ampm:
            if big_ampm:
                sc.text(cx + _tlen(f, t, s) / 2 + 4, cy - 16, ampm, "sans_b", 20, dc, anchor="lm")
            else:
                sc.text(sx1 - 20, sy1 - 10, ampm, "sans_b", 11, dc)
        sc.text(sx0 + 10, sy0 + 18, day, "sans_b", 18, dc, anchor="lm")
        sc.text(sx1 - 10, sy0 + 18, date, "sans", 12, dc, anchor="rm")
        bt = "white" if _lum(body) < 0.3 else "black"
        sc.text((left + right) / 2, bot - 14, _brand(r, 9).upper(), "sans_b", 10, bt)
        if n_fine:
            fc = _on(r, _bg_color(sc.bg), ("black", "white"), 2.5)
            _fineprint(sc, r, (6, 2, 250, top - 4), n_fine // 2, fc)
            _fineprint(sc, r, (6, bot + 4, 250, 254), n_fine - n_fine // 2, fc)
        ans = f"{t} {ampm.lower()}" if big_ampm else t
        shown = f"{t} {ampm}" if big_ampm else t
    else:
        sc.classes = ("mobile phone", "screen", "gadget")
        sc.rect((36, 2, 220, 254), r.choice(((20, 20, 22), (200, 200, 205), (60, 40, 90))),
                (90, 90, 95), 2, 18)
        scr = r.choice(((20, 40, 90), (70, 20, 80), (10, 70, 70), (230, 230, 235), (30, 30, 34)))
        sc.rect((46, 16, 210, 242), scr)
        fg = "white" if _lum(scr) < 0.4 else "black"
        f = r.choice(("sans", "sans_b", "sans"))
        s = _fit(f, t, 150, 60, 34)
        sc.text(128, 60, t, f, s, fg, target=True)
        sc.text(128, 96, f"{_DAY_FULL[day].title()}, {date}", "sans", 12, fg)
        n_apps = 0 if n_fine < 3 else min(16, max(4, n_fine // 2))
        for k in range(n_apps):
            row, colm = divmod(k, 4)
            x = 62 + colm * 38
            y = 118 + row * 30
            sc.rect((x, y, x + 22, y + 18), r.choice(list(COLORS.values())), None, 0, 5)
            name = r.choice(_APPS) if r.random() < 0.7 else _brand(r, 7).split()[0]
            sc.text(x + 11, y + 23, name, "sans", 6.5, fg)
        if n_fine > 2 * n_apps:
            _fineprint(sc, r, (52, 120 + 30 * math.ceil(n_apps / 4), 204, 236),
                       n_fine - 2 * n_apps, fg, size=7.5)
        ans, shown = t, t
        ampm = None
    sc.q(3, r.choice(("what time is displayed?", "what time is it?", "what time does the "
                      "clock say?" if not phone else "what time does the phone say?",
                      "what time is shown on the screen?")), ans, "time", shown=shown,
         suffix=ampm.lower() if ampm else None)
    if not phone:
        sc.q(1.0, r.choice(("what day is displayed?", "what day of the week is it?")),
             day.lower(), shown=day, wrong=(_DAY_FULL[day],), suffix=None)
    else:
        sc.q(0.8, "what day of the week is it?", _DAY_FULL[day], wrong=(day.lower(),))
    sc.q(0.5, "is this a digital clock?" if not phone else "is this a phone?", "yes", "yesno")
    return sc


def _scene_book(r: random.Random) -> _Scene:
    sc = _Scene("book", "cover", _indoor_bg(r))
    sc.classes = ("book", "poster") if r.random() < 0.3 else ("book",)
    n_fine = _density(r)
    cov = r.choice(("white", "black", "blue", "red", "green", "yellow", "purple", "brown",
                    (230, 220, 200), (40, 50, 70)))
    sc.rect((30, 6, 226, 250), cov, _shade(cov, 0.6), 2)
    sc.rect((30, 6, 40, 250), _shade(cov, 0.7))
    pat = r.random()
    if pat < 0.3:
        sc.ellipse((80, 120, 176, 196), _mix(cov, "white", 0.25))
    elif pat < 0.5:
        sc.rect((40, 112, 226, 118), _mix(cov, "black", 0.3))
    x = r.random()
    if x < 0.35:
        title = f"The {r.choice(_ADJ)} {r.choice(_NOUN)}"
    elif x < 0.6:
        title = f"{r.choice(_ADJ)} {r.choice(_NOUN)}"
    elif x < 0.75:
        title = f"{r.choice(_NOUN)} of {r.choice(_NOUN)}s"
    elif x < 0.88:
        title = f"The {r.choice(_NOUN)}"
    else:
        title = _brand(r, 9).split()[0]
    tshown = title.upper() if r.random() < 0.55 else title
    tw = tshown.split()
    f = r.choice(("serif_b", "sans_b", "stix_b", "serif_bi", "sans_b", "serif"))
    tc = _on(r, cov, ("white", "black", "yellow", "red", "orange", "white"), 4.5)
    # the line split (1-3 lines) that lets the title be drawn largest
    splits = [[tshown]] + [[" ".join(tw[:j]), " ".join(tw[j:])] for j in range(1, len(tw))]
    if len(tw) == 3:
        splits.append(tw)
    lines, s = max(((ln, min(min(_fit(f, x, 172, 46, 20) for x in ln), 120 / len(ln)))
                    for ln in splits), key=lambda t: t[1])
    y = 40 + s / 2
    for ln in lines:
        sc.text(128, y, ln, f, s, tc, target=True)
        y += s * 1.12
    author = f"{r.choice(_FIRST)} {r.choice(_LAST)}"
    ashown = author.upper() if r.random() < 0.5 else author
    ac = _on(r, cov, ("white", "black", "yellow", "gray", "orange"), 4.0, exclude=(tc,))
    fa = r.choice(("sans", "serif", "sans_b", "stix"))
    sa = _fit(fa, ashown, 170, 24, 16)
    sc.text(128, 236 - sa / 2, ashown, fa, sa, ac)
    tag = r.choice((None, "A NOVEL", "BESTSELLER", "#1 NATIONAL BESTSELLER", "A MEMOIR",
                    "SECOND EDITION"))
    if tag:
        sc.text(128, 18, tag, "sans", 8.5, ac)
    if n_fine:
        _fineprint(sc, r, (48, y + 4, 212, 232 - sa - 4), n_fine, ac,
                   font=r.choice(("serif", "sans", "serif_i")))
    t = title.lower()
    sc.q(3, r.choice(("what is the title of this book?", "what is the title of the book?",
                      "what book is this?", "what is the name of this book?")), t, shown=tshown,
         wrong=(author.lower(),), suffix="book" if r.random() < 0.3 else None, article=True)
    sc.q(1.4, r.choice(("who wrote this book?", "who is the author of this book?",
                        "who is the author?", "what is the name of the author?")),
         author.lower(), shown=ashown, wrong=(t,))
    if len(tw) > 1:
        sc.q(0.8, "what is the first word of the title?", tw[0].lower(), shown=tw[0])
    return sc


def _plate_text(r: random.Random) -> str:
    L = "ABCDEFGHJKLMNPRSTUVWXYZ"
    x = r.random()
    if x < 0.4:
        return "".join(r.choice(L) for _ in range(3)) + " " + f"{r.randint(0, 9999):04d}"
    if x < 0.65:
        return f"{r.randint(1, 9)}" + "".join(r.choice(L) for _ in range(3)) + \
            f"{r.randint(0, 999):03d}"
    if x < 0.85:
        return f"{r.randint(100, 999)}-" + "".join(r.choice(L) for _ in range(3))
    return "".join(r.choice(L) for _ in range(2)) + f" {r.randint(10, 99)} " + \
        "".join(r.choice(L) for _ in range(3))


def _scene_plate(r: random.Random) -> _Scene:
    car = r.choice(((160, 30, 30), (30, 40, 90), (200, 200, 205), (20, 20, 22), (90, 90, 95),
                    (230, 230, 230), (40, 90, 60)))
    sc = _Scene("plate", "plate", ("noise", car, r.randint(8, 24)))
    sc.classes = ("car", "vehicle registration plate", "vehicle")
    n_fine = _density(r)
    pc = r.choice(("white", "white", "yellow", (215, 230, 245), (245, 240, 220)))
    sc.rect((18, 62, 238, 194), (25, 25, 25), None, 0, 12)  # frame
    sc.rect((24, 68, 232, 188), pc, r.choice(("black", "blue", "red")), 2, 8)
    for xx in (48, 208):
        sc.ellipse((xx - 4, 74, xx + 4, 82), (150, 150, 150))
    state = r.choice(_STATES)
    scol = _on(r, pc, ("red", "blue", "green", "black", "purple"), 4.0)
    fs = r.choice(("sans_b", "serif_b", "stix_b", "serif_bi"))
    ss = _fit(fs, state, 140, 22, 14)
    sc.text(128, 86, state, fs, ss, scol)
    plate = _plate_text(r)
    f = r.choice(("mono_b", "sans_b", "sans_b", "mono_b", "serif_b"))
    pcol = _on(r, pc, ("black", "blue", "red", "green", "black"), 5.5, exclude=(scol,))
    sc.text(128, 136, plate, f, _fit(f, plate, 196, 62, 28), pcol, target=True)
    slogan = r.choice(_SLOGANS)
    sc.text(128, 176, slogan, r.choice(("serif_i", "sans", "stix_i")), 10, scol)
    if r.random() < 0.5:
        sc.rect((30, 72, 44, 84), r.choice(("red", "green", "orange")))
        sc.text(37, 78, str(r.randint(19, 29)), "sans_b", 6.5, "white")
    frame_txt = r.random() < 0.5
    if frame_txt:
        dealer = f"{_brand(r, 8).split()[0].upper()} MOTORS"
        sc.text(128, 191, dealer, "sans_b", 6.5, "white")
    if n_fine:
        sc.rect((40, 208, 216, 250), r.choice(("white", "yellow", (240, 240, 235))), None, 0, 4)
        _fineprint(sc, r, (46, 212, 212, 248), n_fine // 2 + 1, "black")
        if n_fine > 6:
            sc.rect((40, 6, 216, 52), r.choice(("white", (240, 240, 235))), None, 0, 4)
            _fineprint(sc, r, (46, 10, 212, 50), n_fine - n_fine // 2, "black")
    p = plate.lower()
    sc.q(3, r.choice(("what is the license plate number?", "what number is on the plate?",
                      "what is written on the license plate?", "what is the plate number?",
                      "what does the license plate say?")), p, "plate", shown=plate)
    sc.q(1.4, r.choice(("what state is this plate from?", "where is this car registered?",
                        "what state is on the license plate?")), state.lower(), shown=state,
         wrong=(slogan.lower(),))
    sc.q(0.6, "what are the first three characters on the plate?",
         plate.replace(" ", "").replace("-", "")[:3].lower(), "plate",
         shown=plate.replace(" ", "")[:3])
    sc.q(0.5, "what is the slogan on the plate?", slogan.lower(), shown=slogan,
         wrong=(state.lower(),))
    return sc


def _scene_price(r: random.Random) -> _Scene:
    shelf = r.choice(((180, 150, 110), (90, 140, 60), (200, 80, 60), (220, 200, 80),
                      (120, 120, 130)))
    sc = _Scene("price_tag", "tag", ("noise", shelf, r.randint(20, 40)))
    sc.classes = ("price tag", "label", "food")
    n_fine = _density(r)
    tagc = r.choice(("white", "white", "yellow", "orange", (250, 245, 225)))
    sc.rect((26, 30, 230, 226), tagc, (60, 60, 60), 2, 6)
    sc.ellipse((36, 40, 48, 52), shelf)
    sale = r.random() < 0.45
    top = 44
    if sale:
        sc.rect((54, 34, 226, 70), "red")
        sc.text(140, 52, "SALE", "sans_b", 26, "white")
        top = 78
    item = r.choice(_ITEMS)
    ishown = item.upper() if r.random() < 0.5 else item
    ic = "black" if _contrast("black", tagc) > 4.5 else "white"
    fi = r.choice(("sans_b", "serif_b", "sans"))
    si = _fit(fi, ishown, 170, 28, 18)
    sc.text(128, top + 14, ishown, fi, si, ic)
    dollars = r.choice((0, 1, 1, 2, 2, 3, 4, 5, 6, 7, 9, 12, 14, 19, 24))
    cents = r.choice((99, 49, 29, 79, 89, 0, 50, 25))
    price = f"${dollars}.{cents:02d}"
    pcol = _on(r, tagc, ("red", "black", "blue", "red"), 4.5)
    fp = r.choice(("sans_b", "serif_b", "stix_b", "mono_b", "sans_b"))
    sc.text(128, top + 66, price, fp, _fit(fp, price, 172, 72, 36), pcol, target=True)
    unit = r.choice(("per lb", "each", "/kg", "per pack", "ea"))
    sc.text(210, top + 104, unit, "sans", 11, ic, anchor="rm")
    was = None
    if sale:
        was = f"${dollars + r.randint(1, 3)}.{r.choice((49, 99, 29)):02d}"
        wt = sc.text(44, top + 104, f"was {was}", "sans", 11, ic, anchor="lm")
        x0, y0, x1, y1 = wt.box()
        sc.line([(x0 + 18, (y0 + y1) / 2), (x1, (y0 + y1) / 2)], _rgb(ic), 1.2)
    bar_y = min(top + 118, 196)
    for k in range(34):
        xx = 40 + k * 2.4
        if (k * 7 + len(item)) % 3:
            sc.line([(xx, bar_y), (xx, bar_y + 14)], (10, 10, 10), 1.2)
    code = f"0 {r.randint(10000, 99999)} {r.randint(10000, 99999)}"
    sc.text(40, bar_y + 22, code, "mono", 7.5, "black", anchor="lm")
    if n_fine:
        fc = _on(r, shelf, ("black", "white"), 2.0)
        _fineprint(sc, r, (128, bar_y, 224, 222), n_fine // 3, ic, size=7.5)
        _fineprint(sc, r, (4, 2, 252, 28), (n_fine - n_fine // 3) // 2, fc)
        _fineprint(sc, r, (4, 230, 252, 254), n_fine - n_fine // 3 - (n_fine - n_fine // 3) // 2,
                   fc)
    p = price.lower()
    sc.q(3, r.choice(("how much does it cost?", "what is the price?", f"how much are the "
                      f"{item.lower()}?" if item.endswith("s") else f"how much is the "
                      f"{item.lower()}?", "what is the price on the tag?")), p, "price",
         wrong=(was,) if was else ())
    sc.q(1.2, r.choice(("what item is this price tag for?", "what is for sale?",
                        "what product is on the tag?")), item.lower(), shown=ishown)
    sc.q(0.8, "is this item on sale?", "yes" if sale else "no", "yesno")
    if was:
        sc.q(0.6, "what was the old price?", was, "price", wrong=(p,))
    return sc


def _scene_poster(r: random.Random) -> _Scene:
    billboard = r.random() < 0.5
    if billboard:
        sc = _Scene("poster", "billboard", _outdoor_bg(r))
        sc.classes = ("billboard", "advertising")
        sc.rect((60, 180, 72, 256), (90, 90, 95))
        sc.rect((184, 180, 196, 256), (90, 90, 95))
        box = (8, 18, 248, 190)
    else:
        sc = _Scene("poster", "poster", _indoor_bg(r))
        sc.classes = ("poster", "wall")
        box = (26, 6, 230, 250)
    n_fine = _density(r)
    paper = r.choice(("white", "white", "black", "yellow", (245, 238, 220), (25, 40, 80)))
    sc.rect(box, paper, r.choice((None, "black", "white")), 3)
    x0, y0, x1, y1 = box
    words = list(r.choice(_POSTER_PHRASES))
    if r.random() < 0.45:
        words.append(r.choice(("TODAY", "NOW", "FRIDAY", "TONIGHT", "HERE", "DOWNTOWN",
                               _brand(r, 8).split()[0].upper())))
    if r.random() < 0.3:
        words.insert(0, r.choice(("THE", "MEGA", "ANNUAL", "FREE", "OPEN")))
    cols = [c for c in ("red", "blue", "green", "black", "white", "orange", "purple", "yellow",
                        "pink", "brown") if _contrast(c, paper) >= 3.6]
    r.shuffle(cols)
    assigned = [cols[k % len(cols)] for k in range(len(words))]
    if len(set(assigned)) > 2 and r.random() < 0.3:  # two words share a colour sometimes
        assigned[-1] = assigned[0]
    avail_h = (y1 - y0) * (0.72 if n_fine < 10 else 0.58)
    f = r.choice(_BOLD)
    s = min(min(_fit(f, w, (x1 - x0) * 0.86, 58, 20) for w in words), avail_h / len(words) / 1.12)
    s = max(s, 20.0)
    y = y0 + 10 + s / 2
    for w, c in zip(words, assigned):
        sc.text(128, y, w, f, s, c, stroke=r.choice((0, 0, 0, 1.0)),
                stroke_color=(0, 0, 0) if _lum(paper) > 0.4 else (255, 255, 255), target=True)
        y += s * 1.12
    sub = None
    sc_col = "black" if _contrast("black", paper) > 4.5 else "white"
    if r.random() < 0.6 and y + 16 < y1:
        sub = r.choice((f"JUNE {r.randint(1, 30)}", f"MAY {r.randint(1, 30)}",
                        f"{r.randint(1, 12)}PM - {r.randint(1, 12)}PM",
                        f"www.{_brand(r, 8).split()[0].lower()}.com"))
        sc.text(128, y + 6, sub, "sans_b", 14, sc_col)
        y += 22
    if n_fine:
        _fineprint(sc, r, (x0 + 10, y, x1 - 10, y1 - 6), n_fine, sc_col)
    counts = Counter(assigned)
    uniq = [(w, c) for w, c in zip(words, assigned) if counts[c] == 1]
    if uniq:
        w, c = r.choice(uniq)
        sc.q(1.4, f"what color is the word {w.lower()}?", c, "color",
             wrong=tuple(x for x in assigned if x != c)[:2])
        w2, c2 = r.choice(uniq)
        sc.q(1.0, f"which word is written in {c2}?", w2.lower(), shown=w2,
             wrong=tuple(x.lower() for x in words if x != w2)[:2])
    sc.q(1.2, r.choice((f"what is written on the {sc.noun}?", f"what does the {sc.noun} say?",
                        f"what event is the {sc.noun} advertising?")),
         " ".join(words).lower(), shown=" ".join(words), wrong=(words[0].lower(),))
    sc.q(0.7, f"what is the first word on the {sc.noun}?", words[0].lower(), shown=words[0])
    if sub:
        sc.q(0.5, f"what is written at the bottom of the {sc.noun}?", sub.lower(), shown=sub)
    return sc


def _scene_jersey(r: random.Random) -> _Scene:
    sc = _Scene("jersey", "jersey", ("split", (60, 70, 90), (40, 120, 50), r.uniform(0.4, 0.6))
                if r.random() < 0.5 else _indoor_bg(r))
    sc.classes = ("jersey", "person", "sports uniform")
    n_fine = _density(r)
    shirt = r.choice(("red", "blue", "white", "black", "green", "yellow", "orange", "purple"))
    pts = [(70, 20), (100, 10), (156, 10), (186, 20), (246, 70), (216, 110), (192, 94),
           (192, 256), (64, 256), (64, 94), (40, 110), (10, 70)]
    sc.poly(pts, shirt, _shade(shirt, 0.6), 2)
    sc.ellipse((104, 2, 152, 22), _bg_color(sc.bg))
    tc = _on(r, shirt, ("white", "black", "yellow", "red", "blue"), 4.5)
    num = str(r.randint(0, 99))
    back = r.random() < 0.6
    name = r.choice(_LAST).upper()
    f = r.choice(("sans_b", "serif_b", "mono_b", "stix_b"))
    if back:
        sc.text(128, 52, name, f, _fit(f, name, 118, 28, 18), tc)
        top_word = name
    else:
        team = _brand(r, 8).split()[0]
        top_word = team.upper() if r.random() < 0.6 else team
        sc.text(128, 52, top_word, r.choice(("serif_bi", "sans_bi", "stix_bi")),
                _fit("serif_bi", top_word, 118, 30, 18), tc)
    sc.text(128, 150, num, f, _fit(f, num, 118, 104, 60), tc, stroke=r.choice((0, 2)),
            stroke_color=_shade(tc, 0.5) if tc != "black" else (255, 255, 255), target=True)
    sc.text(162, 30, _brand(r, 7).split()[0].lower(), "sans_b", 7, tc)
    if n_fine:
        _fineprint(sc, r, (200, 120, 254, 254), n_fine // 2,
                   _on(r, _bg_color(sc.bg), ("black", "white"), 2.0), size=7.5)
        _fineprint(sc, r, (2, 120, 62, 254), n_fine - n_fine // 2,
                   _on(r, _bg_color(sc.bg), ("black", "white"), 2.0), size=7.5)
    sc.q(3, r.choice(("what number is on the jersey?", "what is the player's number?",
                      "what number is this player?", "what number is on the shirt?")), num,
         "number", wrong=(num[::-1],) if len(num) == 2 and num[0] != num[1] else ())
    if back:
        sc.q(1.4, r.choice(("what name is on the jersey?", "who is wearing this jersey?",
                            "what is the player's name?", "whose jersey is this?")),
             name.lower(), shown=name)
    else:
        sc.q(1.4, r.choice(("what team is this jersey for?", "what is written on the shirt?")),
             top_word.lower(), shown=top_word)
    sc.q(0.7, "what color is the jersey?", shirt, "color")
    return sc


_KINDS = (
    (_scene_sign, 15), (_scene_storefront, 9), (_scene_bottle, 9), (_scene_box, 11),
    (_scene_screen, 10), (_scene_book, 10), (_scene_plate, 9), (_scene_price, 9),
    (_scene_poster, 11), (_scene_jersey, 7),
)
SCENE_KINDS = ("sign", "storefront", "bottle", "box", "screen", "book", "plate", "price_tag",
               "poster", "jersey")


def _add_generic_questions(sc: _Scene, r: random.Random) -> None:
    # colour-tied questions: a big text whose colour no other text shares
    by_col = defaultdict(list)
    for t in sc.texts:
        by_col[t.color if isinstance(t.color, str) else None].append(t)
    for c, ts in by_col.items():
        if c is None or len(ts) != 1 or ts[0].size < 18 or sc.kind == "poster":
            continue
        t = ts[0]
        n = len(t.text.split())
        if n > 3:
            continue
        q = f"what word is printed in {c}?" if n == 1 else f"what is written in {c}?"
        sc.q(0.9 if len(by_col) > 2 else 0.5, q, t.text.lower(), shown=t.text)
    order = sc.reading_order()
    if order and order[0].size >= 18 and len(order[0].text.split()) > 1:
        w = order[0].text.split()[0]
        if not any(q.q.startswith("what is the first word") for q in sc.questions):
            sc.q(0.5, f"what is the first word on the {sc.noun}?", w.lower(), shown=w)


def _build_scene(seed: int, b: int, k: int) -> _Scene:
    r = random.Random(f"scene:{seed}:{b}:{k}")
    fn = r.choices([f for f, _ in _KINDS], [w for _, w in _KINDS])[0]
    sc = fn(r)
    _add_generic_questions(sc, r)
    sc.angle = r.uniform(-6.0, 6.0) if r.random() < 0.3 else 0.0
    sc.zoom = r.uniform(0.86, 1.0)
    sc.off = (r.uniform(0, (1 - sc.zoom) * _R), r.uniform(0, (1 - sc.zoom) * _R))
    base = _bg_color(sc.bg)
    for _ in range(r.randint(1, 5)):  # background objects: break template-level hash collisions
        x0, y0 = r.uniform(-40, 230), r.uniform(-40, 230)
        w, h = r.uniform(30, 140), r.uniform(30, 140)
        c = _shade(base, r.choice((0.55, 0.7, 0.8, 1.2, 1.35))) if r.random() < 0.7 else \
            r.choice(list(COLORS.values()))
        sc.clutter.append(("ellipse" if r.random() < 0.4 else "rect", (x0, y0, x0 + w, y0 + h), c))
    sc.np_seed = r.getrandbits(63)
    return sc


# ----------------------------------------------------------------------------- rendering


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


# ----------------------------------------------------------------------------- planning / rows


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


_SUBS = (("O", "0"), ("0", "O"), ("l", "1"), ("I", "l"), ("rn", "m"), ("m", "rn"), ("S", "5"),
         ("B", "8"), ("e", "c"), ("i", "l"), ("E", "F"), ("a", "o"), ("1", "l"), ("o", "0"))


@functools.lru_cache(maxsize=512)
def _ocr(seed: int, b: int, k: int) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(noisy OCR tokens, clean rendered tokens) of image slot k in block b."""
    sb, sk, _ = _source(seed, b, k)
    sc = _scene(seed, sb, sk)
    r = random.Random(f"ocr:{seed}:{b}:{k}")
    clean, out = [], []
    noise = r.choice((0.3, 0.6, 1.0, 1.0, 1.5, 2.0))  # per-image OCR quality
    for t in sc.reading_order():
        for tok in t.text.split():
            clean.append(tok)
            x = r.random()
            if x < (0.015 if t.target else 0.05) * noise:
                continue  # dropped
            if len(tok) >= 5 and x > 1 - 0.035 * noise:
                cut = r.randint(2, len(tok) - 2)
                out.extend((tok[:cut], tok[cut:]))  # split token
                continue
            if r.random() < 0.07 * noise:
                subs = [s for s in _SUBS if s[0] in tok]
                if subs:
                    a, c = r.choice(subs)
                    pos = [j for j in range(len(tok)) if tok.startswith(a, j)]
                    j = r.choice(pos)
                    tok = tok[:j] + c + tok[j + len(a):]
            if len(tok) >= 6 and r.random() < 0.02 * noise:
                tok = tok[: r.randint(3, len(tok) - 2)]  # truncated
            out.append(tok)
    for _ in range(r.choice((0, 0, 0, 1, 1, 2))):
        out.insert(r.randint(0, len(out)), r.choice(_JUNK))
    return tuple(out), tuple(clean)


@functools.lru_cache(maxsize=512)
def _question_order(seed: int, b: int, k: int) -> tuple[int, ...]:
    sb, sk, _ = _source(seed, b, k)
    qs = _scene(seed, sb, sk).questions
    r = random.Random(f"qorder:{seed}:{b}:{k}")
    keys = [(r.random() ** (1.0 / q.w), j) for j, q in enumerate(qs)]
    return tuple(j for _, j in sorted(keys, reverse=True))


def _typo(r: random.Random, s: str) -> str:
    j = r.randint(1, len(s) - 2)
    return s[:j] + s[j + 1:] if r.random() < 0.6 else s[:j] + s[j + 1] + s[j] + s[j + 2:]


def _variants(r: random.Random, q: _Q) -> list[tuple[str, float]]:
    c, out = q.a, []
    shown = q.shown
    if q.kind == "yesno":
        return [("yes." if c == "yes" else "no.", 0.3), (f"{c} it is" if c == "yes" else "nope",
                                                         0.2)]
    if q.kind == "color":
        return [(f"dark {c}", 0.3), (f"{c} and white" if c != "white" else "white and black",
                                     0.5), (c.title(), 0.3), (f"light {c}", 0.2)]
    if shown and shown != c:
        out.append((shown, 1.0))
    if c.title() != c and c.title() != shown:
        out.append((c.title(), 0.5))
    if q.kind == "time":
        if " " in c:
            out.append((c.split()[0], 1.4))
        elif q.suffix:
            out.append((f"{c} {q.suffix}", 1.0))
        out += [(c.replace(":", "."), 0.3), (c.replace(":", ""), 0.3)]
        if ":" in c:
            hh, mm = c.split()[0].split(":")
            out.append((f"{hh}:{int(mm) // 10 * 10 + (5 if int(mm) % 10 < 5 else 0):02d}", 0.2))
        return out
    if q.kind == "price":
        out += [(c.lstrip("$"), 1.2), (f"{c.lstrip('$')} dollars", 0.3), (f"{c} each", 0.2)]
        return out
    if q.kind == "number":
        if q.suffix:
            out += [(f"{c} {q.suffix}", 1.0), (f"{c}{q.suffix}", 0.4)]
        out += [(f"#{c}", 0.2), (f"number {c}", 0.2)]
        return out
    if q.kind == "plate":
        out += [(c.replace(" ", "").replace("-", ""), 1.0), (c.replace(" ", "-"), 0.3)]
        if " " in c:
            out.append((c.split()[-1], 0.3))
        return out
    if "-" in c:
        out += [(c.replace("-", " "), 1.2), (c.replace("-", ""), 0.6)]
    if "'" in c:
        out.append((c.replace("'", ""), 0.8))
    if " " in c:
        part = c[4:] if c.startswith("the ") else c.split()[0]  # partial answer
        out += [(part, 0.6), (c.replace(" ", ""), 0.3)]
    if q.article and not c.startswith("the "):
        out.append((f"the {c}", 0.35))
    if q.suffix:
        out.append((f"{c} {q.suffix}", 0.7))
    if len(c) >= 5:
        out.append((_typo(r, c), 0.4))
    return out


def _answers(seed: int, i: int, q: _Q, ocr_clean: tuple[str, ...]) -> list[str]:
    r = random.Random(f"ans:{seed}:{i}")
    k = r.choices((10, 9, 8, 7, 6, 5, 4, 3), (24, 18, 15, 12, 10, 9, 7, 5))[0]
    pool = [(v, w) for v, w in _variants(r, q) if v != q.a and v]
    wrong = [w.lower() for w in q.wrong if w and w.lower() != q.a]
    if not wrong and ocr_clean:
        wrong = [t.lower() for t in r.sample(ocr_clean, min(2, len(ocr_clean)))
                 if t.lower() != q.a]
    if q.kind == "yesno":
        wrong = ["no" if q.a == "yes" else "yes"]
    capped = set(wrong) | {"unanswerable"}
    pool += [(w, 0.5 / max(1, len(wrong))) for w in wrong]
    pool.append(("unanswerable", 0.15))
    dedup: dict[str, float] = {}
    for v, w in pool:
        dedup[v] = dedup.get(v, 0.0) + w
    answers = [q.a] * k
    counts: Counter = Counter()
    while len(answers) < 10:
        cands = [(v, w) for v, w in dedup.items()
                 if counts[v] < (min(2, k - 1) if v in capped else k - 1)]
        if not cands:
            answers.append(q.a)
            continue
        v = r.choices([v for v, _ in cands], [w for _, w in cands])[0]
        counts[v] += 1
        answers.append(v)
    r.shuffle(answers)
    return answers


def _row(seed: int, i: int, px: int) -> tuple:
    b, off = divmod(i, BLOCK_ROWS)
    plan = _plan(seed, b)
    k, qi = plan.rows[off]
    sb, sk, _ = _source(seed, b, k)
    sc = _scene(seed, sb, sk)
    order = _question_order(seed, b, k)
    q = sc.questions[order[qi % len(order)]]
    ocr, clean = _ocr(seed, b, k)
    return (i, _image(seed, b, k, px), _image_id(seed, b, k), f"q{i:07d}", q.q, _answers(
        seed, i, q, clean), q.a, list(ocr), list(sc.classes), "train")


def generate(rows: int, seed: int = 0, image_px: int = 256, start: int = 0,
             batch_rows: int = 256) -> Iterator[pa.RecordBatch]:
    """Yield rows ``start .. start+rows-1`` as RecordBatches of ``SCHEMA`` (``batch_rows`` each,
    the last one possibly shorter). Row ``i`` depends only on ``(seed, i, image_px)``."""
    if rows < 0 or start < 0 or seed < 0:
        raise ValueError("rows, start and seed must be >= 0")
    if batch_rows < 1:
        raise ValueError("batch_rows must be >= 1")
    if image_px < 32:
        raise ValueError("image_px must be >= 32")
    names = SCHEMA.names
    buf: list[tuple] = []
    for i in range(start, start + rows):
        buf.append(_row(seed, i, image_px))
        if len(buf) == batch_rows:
            yield _to_batch(buf, names)
            buf = []
    if buf:
        yield _to_batch(buf, names)


def _to_batch(buf: list[tuple], names: list[str]) -> pa.RecordBatch:
    cols = list(zip(*buf))
    arrays = [pa.array(list(col), type=SCHEMA.field(n).type) for n, col in zip(names, cols)]
    return pa.RecordBatch.from_arrays(arrays, schema=SCHEMA)


def generate_table(rows: int, seed: int = 0, image_px: int = 256) -> pa.Table:
    """All ``rows`` rows (from 0) as one ``pa.Table`` with ``SCHEMA``."""
    return pa.Table.from_batches(list(generate(rows, seed=seed, image_px=image_px)), schema=SCHEMA)
