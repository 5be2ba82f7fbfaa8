"""Scene kinds that stand in the street: stop / warning / street / info signs, storefronts, posters.

Each ``_scene_*`` lays out one scene from its RNG and attaches the questions it can answer.
"""

from __future__ import annotations

import math
import random
from collections import Counter

from ._layout import _Scene, _bg_color, _density, _fineprint, _indoor_bg, _outdoor_bg
from ._palette import _BOLD, _contrast, _fit, _lum, _on, _tlen
from ._vocab import (_INFO_SIGNS, _POSTER_PHRASES, _STORE_TYPES, _STREET_SUFFIX, _STREETS,
                     _WARN_HEAD, _WARN_SUB, _brand, _style, _words)


def _scene_sign(r: random.Random) -> _Scene:
    sub = r.choices(("stop", "warning", "street", "info"), (2, 3, 3, 4))[0]
    sc = _Scene("sign", "sign", _outdoor_bg(r))
    n_fine = _density(r)
    bgc = _bg_color(sc.bg)
    pole = (120, 120, 125)
    # One function per kind of sign, called in the same order of random draws as before.
    kind = {"stop": _sign_stop, "warning": _sign_warning, "street": _sign_street}.get(sub, _sign_info)
    return kind(sc, r, n_fine, bgc, pole)


def _sign_stop(sc: _Scene, r: random.Random, n_fine: int, bgc, pole) -> _Scene:
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


def _sign_warning(sc: _Scene, r: random.Random, n_fine: int, bgc, pole) -> _Scene:
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


def _sign_street(sc: _Scene, r: random.Random, n_fine: int, bgc, pole) -> _Scene:
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


def _sign_info(sc: _Scene, r: random.Random, n_fine: int, bgc, pole) -> _Scene:
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
