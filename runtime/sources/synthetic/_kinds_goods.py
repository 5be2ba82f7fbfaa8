"""Scene kinds that sell something: bottles, boxes and packets, shelf price tags.

Each ``_scene_*`` lays out one scene from its RNG and attaches the questions it can answer.
"""

from __future__ import annotations

import random

from ._layout import _Scene, _bg_color, _density, _fineprint, _indoor_bg
from ._palette import _BOLD, _contrast, _fit, _mix, _on, _rgb, _shade
from ._vocab import _FLAVORS, _ITEMS, _PRODUCTS, _brand, _style


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
