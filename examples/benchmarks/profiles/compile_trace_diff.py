"""Why did a process miss another's compile cache? Diff two `VLMSPEC_COMPILE_TRACE` files.

Each file is one warm-up's `torch._inductor.codecache` debug log (`compile_cache._Trace`): for every
FX graph that missed the cache, the key and the lines inductor hashed into it (inputs' metadata,
the graph's code, config, global settings such as matmul precision or the default dtype). A cache
hit logs no details, so trace the process that compiled first (a cold one) and the one that missed:

    VLMSPEC_COMPILE_TRACE=$OUT/trace vlmspec apply ...   # then, in the second process, the same
    python3 examples/benchmarks/profiles/compile_trace_diff.py FIRST.log SECOND.log

For each graph of SECOND whose key FIRST lacks, it prints the hashed lines that differ from FIRST's
nearest graph (the one sharing most lines): a line in every graph names a global difference, a line
in some a graph-specific one.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

_HEAD = re.compile(r"FX graph cache hash details for key (\S+?):?\n")
_LINE = re.compile(r"^\[([^\]]*)\]\s*(.*)$")


def graphs(path: str | Path) -> dict[str, dict[str, str]]:
    """Key -> {"[hash] name": "name: value"} of each logged graph's hashed lines. Compared by hash
    and name: a value's text can differ where its hash does not (a function's repr names its
    address, its hash its qualified name)."""
    parts = _HEAD.split(Path(path).read_text(errors="replace"))
    out = {}
    for i in range(1, len(parts), 2):
        lines = (_LINE.match(ln.strip()) for ln in parts[i + 1].splitlines())
        out[parts[i]] = {f"[{m[1]}] {m[2].split(':', 1)[0]}": m[2] for m in lines if m}
    return out


def diff(first: dict[str, dict[str, str]], second: dict[str, dict[str, str]], limit: int = 20) -> list[str]:
    out = [f"first: {len(first)} graphs, second: {len(second)} graphs, keys in both: {len(set(first) & set(second))}"]
    for key, lines in second.items():
        if key in first:
            continue
        mine = set(lines)
        if not first:
            out.append(f"second {key[:16]}: nothing in the first file to compare with")
            continue
        near, theirs = max(first.items(), key=lambda kv: len(mine & set(kv[1])))
        theirs_set = set(theirs)
        out.append(f"\nsecond {key[:16]} vs first {near[:16]}: {len(mine - theirs_set)} lines only in second, "
                   f"{len(theirs_set - mine)} only in first")
        out += [f"  second+ {lines[k][:400]}" for k in sorted(mine - theirs_set, key=lines.get)[:limit]]
        out += [f"  first+  {theirs[k][:400]}" for k in sorted(theirs_set - mine, key=theirs.get)[:limit]]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("first")
    ap.add_argument("second")
    ap.add_argument("--limit", type=int, default=20, help="differing lines shown per graph and side")
    a = ap.parse_args()
    print("\n".join(diff(graphs(a.first), graphs(a.second), a.limit)))


if __name__ == "__main__":
    main()
