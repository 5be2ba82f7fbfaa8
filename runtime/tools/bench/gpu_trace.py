"""Where a GPU idles while a piece of host code drives it: the host syncs it triggers, and the gaps
between its kernels with what the launching thread was doing meanwhile.

Used by `vlmspec bench gpu --phases tier3` to explain the vision column's GPU-busy figure, and
usable on any callable: `sync_sites(fn)` and `kernel_gaps(fn)`. CUDA only.
"""

from __future__ import annotations

import collections
import json
import tempfile
import warnings
from pathlib import Path
from typing import Any, Callable

__all__ = ["kernel_gaps", "summarise", "sync_sites"]


def sync_sites(fn: Callable[[], Any]) -> dict[str, int]:
    """Host-device synchronisations `fn` causes on this thread, counted by the Python line that
    caused each (torch's CUDA sync debug mode, which warns at every synchronising call)."""
    import torch

    prev = torch.cuda.get_sync_debug_mode()
    with warnings.catch_warnings(record=True) as got:
        # every warning, not only the first per line: each one is one sync
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode(prev)
    return dict(collections.Counter(f"{Path(w.filename).name}:{w.lineno}" for w in got
                                    if "synchroniz" in str(w.message).lower()))


def _intervals(events: list[dict], cats: tuple[str, ...]) -> list[tuple[float, float, dict]]:
    return sorted((e["ts"], e["ts"] + e.get("dur", 0), e) for e in events
                  if e.get("ph") == "X" and e.get("cat") in cats)


def kernel_gaps(fn: Callable[[], Any], top: int = 8, min_gap_us: float = 20.0) -> dict[str, Any]:
    """Profile one run of `fn` (CUDA kernels and host-side ops) and summarise the GPU's idle time:
    kernel-busy share of the window from the first kernel to the last, the gaps by size, and for
    the largest gaps the host ops on the launching thread that overlapped them most."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "trace.json"
        prof.export_chrome_trace(str(path))
        events = json.loads(path.read_text()).get("traceEvents", [])
    return summarise(events, top, min_gap_us)


def summarise(events: list[dict], top: int = 8, min_gap_us: float = 20.0) -> dict[str, Any]:
    """`kernel_gaps`'s summary of a Chrome trace's events (times in microseconds)."""
    kernels = _intervals(events, ("kernel",))
    if not kernels:
        return {"kernels": 0}
    host = _intervals(events, ("cpu_op", "cuda_runtime", "user_annotation", "cuda_driver"))
    # a launch call and the kernel it launched share a correlation id
    launches = {e.get("args", {}).get("correlation"): e for _, _, e in host if e.get("cat") == "cuda_runtime"}
    # kernels that overlap (several streams) merge into one busy interval
    merged: list[list[float]] = []
    for s, t, _ in kernels:
        if merged and s <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], t)
        else:
            merged.append([s, t])
    start, end = merged[0][0], merged[-1][1]
    busy = sum(t - s for s, t in merged)
    gaps = [(merged[i][1], merged[i + 1][0]) for i in range(len(merged) - 1)
            if merged[i + 1][0] - merged[i][1] >= min_gap_us]
    buckets = collections.OrderedDict((k, [0, 0.0]) for k in ("20us-100us", "100us-1ms", "1ms-10ms", ">=10ms"))
    for s, t in gaps:
        d = t - s
        k = "20us-100us" if d < 100 else "100us-1ms" if d < 1000 else "1ms-10ms" if d < 10000 else ">=10ms"
        buckets[k][0] += 1
        buckets[k][1] += d
    # Which kernel ended each gap, when the host launched it, and what that thread was doing.
    first_after = {s: e for s, _, e in kernels}
    largest = []
    # largest gaps first
    for s, t in sorted(gaps, key=lambda g: g[0] - g[1])[:top]:
        k = first_after.get(t, {})
        launch = launches.get(k.get("args", {}).get("correlation"))
        tid = launch.get("tid") if launch else None
        overlap: dict[str, float] = collections.Counter()
        for hs, ht, e in host:
            if hs >= t:
                break
            if ht > s and (tid is None or e.get("tid") == tid):
                overlap[e["name"][:60]] += min(ht, t) - max(hs, s)
        largest.append({"gap_ms": round((t - s) / 1000, 3), "at_ms": round((s - start) / 1000, 1),
                        "next_kernel": k.get("name", "?")[:60],
                        "launched_ms_after_gap_start": round((launch["ts"] - s) / 1000, 3) if launch else None,
                        "host_ops_ms": {n: round(v / 1000, 3) for n, v in overlap.most_common(4)}})
    return {"window_ms": round((end - start) / 1000, 1), "kernel_busy_pct": round(100 * busy / (end - start), 1),
            "kernels": len(kernels), "gaps_by_size": {k: {"count": c, "ms": round(v / 1000, 1)}
                                                      for k, (c, v) in buckets.items()},
            "largest_gaps": largest}
