"""OCR tokens for an image: its rendered words in reading order with realistic OCR mistakes.

Drops, splits, look-alike substitutions and junk tokens; the asked-about text is dropped less often.
"""

from __future__ import annotations

import functools
import random

from ._blocks import _scene, _source
from ._vocab import _JUNK


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
