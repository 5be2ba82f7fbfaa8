"""Which question a row asks and the ten annotator answers to it, with TextVQA-like disagreement.

The canonical answer always keeps a strict plurality; the rest are variants, misreadings, typos.
"""

from __future__ import annotations

import functools
import random
from collections import Counter

from ._blocks import _scene, _source
from ._layout import _Q


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
