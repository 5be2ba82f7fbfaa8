"""Which scene an image slot gets: the weighted kind draw, generic questions, jitter and clutter.

A scene depends only on ``(seed, block, slot)``, never on ``image_px`` or on other scenes.
"""

from __future__ import annotations

import random
from collections import defaultdict

from ._kinds_goods import _scene_bottle, _scene_box, _scene_price
from ._kinds_items import _scene_book, _scene_jersey, _scene_plate, _scene_screen
from ._kinds_signage import _scene_poster, _scene_sign, _scene_storefront
from ._layout import _R, _Scene, _bg_color
from ._palette import COLORS, _shade


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
