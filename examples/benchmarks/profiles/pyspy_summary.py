"""Summarise a py-spy speedscope file (`vlmspec bench apply --py-spy PATH` writes one per round):
per sampled thread, its seconds, then the functions holding the most of them (inclusive: a function
counts once per sample wherever it is on the stack), each with when it was first and last seen.

    python3 examples/benchmarks/profiles/pyspy_summary.py results/pyspy-lora.json [--top 40] [--match load]

Samples are py-spy's (`--rate 50`: 20 ms each); idle time counts as sampled only with `--idle`, so a
thread's seconds are its time on the CPU or in a call py-spy shows as running.
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict


def summarise(path: str, top: int, match: str | None, min_s: float) -> None:
    doc = json.load(open(path))
    frames = doc["shared"]["frames"]
    names = [f"{f['name']} ({(f.get('file') or '').split('/site-packages/')[-1].split('/vlmspec/')[-1]}:{f.get('line', '')})"
             for f in frames]
    for prof in doc["profiles"]:
        weights = prof.get("weights") or [1] * len(prof["samples"])
        unit = {"seconds": 1.0, "milliseconds": 1e-3, "microseconds": 1e-6}.get(prof.get("unit"), 1.0)
        total = sum(weights) * unit
        if total < min_s:
            continue
        print(f"\n== {prof.get('name')}: {total:.1f} s sampled")
        incl: dict[int, float] = defaultdict(float)
        first: dict[int, float] = {}
        last: dict[int, float] = {}
        t = 0.0
        for stack, w in zip(prof["samples"], weights):
            for fi in set(stack):
                incl[fi] += w * unit
                first.setdefault(fi, t)
                last[fi] = t
            t += w * unit
        rows = sorted(incl.items(), key=lambda kv: -kv[1])
        if match:
            rows = [kv for kv in rows if match.lower() in names[kv[0]].lower()]
        for fi, s in rows[:top]:
            print(f"  {s:7.2f} s  [{first[fi]:6.1f} .. {last[fi]:6.1f}]  {names[fi][:150]}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("path")
    ap.add_argument("--top", type=int, default=40)
    ap.add_argument("--match", default=None)
    ap.add_argument("--min-s", type=float, default=0.5, help="Skip threads sampled for less than this.")
    a = ap.parse_args()
    summarise(a.path, a.top, a.match, a.min_s)


if __name__ == "__main__":
    main()
