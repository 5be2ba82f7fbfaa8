"""Scene kinds that carry their own text: clocks and phones, book covers, licence plates, jerseys.

Each ``_scene_*`` lays out one scene from its RNG and attaches the questions it can answer.
"""

from __future__ import annotations

import math
import random

from ._layout import _R, _Scene, _bg_color, _density, _fineprint, _indoor_bg
from ._palette import COLORS, _fit, _lum, _mix, _on, _shade, _tlen
from ._vocab import _ADJ, _APPS, _DAY_FULL, _DAYS, _FIRST, _LAST, _NOUN, _SLOGANS, _STATES, _brand


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
