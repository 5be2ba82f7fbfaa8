"""Ingest across cores: source rows made or read by a pool, handed back in source order.

Order is the whole contract: `ingest` sees exactly the batches the sequential path yields (same
rows, same cuts), so the rows, the fragments and the commits are the same for any worker count.
Synthetic rows are CPU work in Python (Pillow rendering, JPEG encoding): a spawn pool of processes.
Arrow sources (a `save_to_disk` folder, Parquet) are reads and buffer slicing that release the GIL:
threads. Never forked processes: lance is not fork-safe (stack-notes §3).
"""

from __future__ import annotations

import multiprocessing
import os
from collections import deque
from concurrent.futures import Executor, ProcessPoolExecutor, ThreadPoolExecutor
from typing import Any, Callable, Iterable, Iterator

import pyarrow as pa

__all__ = ["MAX_WORKERS", "SYNTHETIC_BATCH", "ingest_workers", "ordered_map", "synthetic_batches", "threaded_parts"]

MAX_WORKERS = 32
"""Beyond this, one writer (Lance append commits are sequential) is the bottleneck anyway."""
SYNTHETIC_BATCH = 256
"""Rows of one synthetic batch (the unit a worker makes); also the sequential generator's batch."""


def ingest_workers(requested: int | None = None) -> int:
    """Workers for ingest: `requested` (`executor.workers` or `--workers`), else every core, capped."""
    return max(1, min(requested or os.cpu_count() or 1, MAX_WORKERS))


def ordered_map(fn: Callable[..., Any], items: Iterable[tuple], pool: Executor, ahead: int) -> Iterator[Any]:
    """`fn(*item)` for each item on `pool`, yielded in item order, at most `ahead` in flight (memory
    stays bounded however fast the pool is; a consumer that stops early cancels the rest)."""
    running: deque = deque()
    items = iter(items)
    try:
        for item in items:
            running.append(pool.submit(fn, *item))
            if len(running) >= ahead:
                yield running.popleft().result()
        while running:
            yield running.popleft().result()
    finally:
        for fut in running:
            fut.cancel()


def process_pool(workers: int) -> ProcessPoolExecutor:
    """A spawn pool whose workers ignore Ctrl-C and die with their parent (as the backfill pool's)."""
    from ..executors.local import _worker_init

    return ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn"),
                               initializer=_worker_init, initargs=(os.getpid(),))


def thread_pool(workers: int) -> ThreadPoolExecutor:
    return ThreadPoolExecutor(max_workers=workers, thread_name_prefix="vlmspec-ingest")


def threaded_parts(fn: Callable[..., list[Any]], items: list[tuple], workers: int) -> Iterator[Any]:
    """Every element of `fn(*item)` for each item in order: on a thread pool when there are
    several workers and items, else inline (the same elements either way)."""
    if workers <= 1 or len(items) <= 1:
        for item in items:
            yield from fn(*item)
        return
    with thread_pool(min(workers, len(items))) as pool:
        for part in ordered_map(fn, items, pool, ahead=2 * workers):
            yield from part


def _synthetic_batch(rows: int, seed: int, image_px: int, start: int) -> pa.RecordBatch:
    from .synthetic import generate

    return next(generate(rows, seed=seed, image_px=image_px, start=start, batch_rows=rows))


def synthetic_batches(rows: int, seed: int, image_px: int, start: int = 0,
                      workers: int = 1) -> Iterator[pa.RecordBatch]:
    """Synthetic rows `start .. start+rows-1` in batches of SYNTHETIC_BATCH rows cut at the same
    places for any `workers` (row i is a pure function of (seed, i, image_px)), made by a spawn
    pool when there is more than one batch to make."""
    from .synthetic import generate

    cuts = [(min(SYNTHETIC_BATCH, start + rows - s), seed, image_px, s)
            for s in range(start, start + rows, SYNTHETIC_BATCH)]
    if workers <= 1 or len(cuts) <= 1:
        yield from generate(rows, seed=seed, image_px=image_px, start=start, batch_rows=SYNTHETIC_BATCH)
        return
    with process_pool(min(workers, len(cuts))) as pool:
        try:
            yield from ordered_map(_synthetic_batch, cuts, pool, ahead=2 * workers)
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
