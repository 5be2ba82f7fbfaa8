"""The local executor: this process, plus a spawn pool for CPU UDFs the plan placed on processes.

In process, one column is a pipeline of three threads: the next chunk's inputs are read ahead
(reader), the current chunk is computed here (the GPU's launching thread for model UDFs), and the
previous fragment is written and committed behind it (writer), so the GPU neither waits for a 50 MB
read nor a 1.6 GB write. A chunk that is a whole fragment streams: its write is queued first and
takes each UDF call's output as it is computed (`_PartStream`), so only the last call's write is
left when the column's last chunk is computed. One write in flight keeps memory bounded and
commits in order; a kill loses at most two fragments (the one being written, the one computed).
Spawned workers (not forked: lance is not fork-safe) compute CPU UDFs chunk by chunk; the pool
lives as long as the executor, so one apply pays its start-up once.
"""

from __future__ import annotations

import multiprocessing
import os
import queue
import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, ThreadPoolExecutor, wait
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, Callable, Iterator

import lance
import pyarrow as pa

from .. import lance_io
from ..arrow_types import to_pyarrow
from ..invoke import RowFailure, instantiate
from .chunks import (Chunk, WorkerNode, compute_chunk, first_batch, pending_chunks, read_chunk, run_chunk,
                     spread_chunks, warm_worker)

if TYPE_CHECKING:
    from vlmspec.compiler.compile import ColumnNode
    from vlmspec.compiler.plan import Placement

__all__ = ["LocalExecutor", "local_session"]


class LocalExecutor:
    """Places one column's chunks in this process or on its spawn pool, as the plan's placement says;
    `backfill.backfill_column` prepares, commits and completes the column around it."""

    def __init__(self, workers: int | None = None, device: str | None = None, *, one_shot: bool = False):
        self.workers = workers or os.cpu_count() or 1
        self.device = device
        self.one_shot = one_shot
        """Used for one column only: its pool is sized to the column and not waited for at the end."""
        self._pool: ProcessPoolExecutor | None = None
        self._pool_size = 0

    def backfill(self, uri: str, ds: lance.LanceDataset, node: ColumnNode, sink: Any, *, model_spec: Any = None,
                 device: str | None = None, workers: int | None = None,
                 place: Placement | None = None) -> dict[str, str]:
        """Compute every pending chunk of `node` and hand each result to `sink`; returns the field
        metadata a class UDF wants stored (e.g. the vision grid)."""
        n = (place.workers if place is not None and place.workers else None) or workers or self.workers
        parallel = place.where == "processes" if place is not None else \
            n > 1 and node.parallel and not node.uses_model
        # Small chunks for the pool (at least two a worker, however few fragments), large ones in
        # process (fewer, longer UDF calls; a whole fragment per chunk at the usual sizes).
        chunks = spread_chunks(ds, node.name, n, node.batch_size * 4) if parallel else \
            pending_chunks(ds, node.name, node.batch_size * 64)
        sink.start(sum(c.limit for c in chunks))
        if parallel and len(chunks) > 1:
            self._run_parallel(uri, ds.version, node, chunks, n, sink.add)
            return {}
        return self._run_in_process(uri, ds, node, chunks, sink, model_spec, device or self.device or "cpu")

    def close(self, wait: bool = True) -> None:
        pool, self._pool, self._pool_size = self._pool, None, 0
        if pool is not None:
            pool.shutdown(wait=wait, cancel_futures=True)

    # -- in process -------------------------------------------------------------------------
    def _run_in_process(self, uri: str, ds: lance.LanceDataset, node: ColumnNode, chunks: list[Chunk], sink: Any,
                        model_spec: Any, device: str) -> dict[str, str]:
        run = sink.run
        started = time.perf_counter()
        instance, field_meta = instantiate(node, model_spec, device)
        run.setup_s = time.perf_counter() - started
        writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="vlmspec-writer")
        reader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="vlmspec-reader")
        pending = None
        out_type = to_pyarrow(node.output)
        source = lance.dataset(uri, version=ds.version)
        read = lambda c: reader.submit(read_chunk, source, node, c, node.batch_size)  # noqa: E731
        ahead = read(chunks[0]) if chunks else None
        try:
            for i, chunk in enumerate(chunks):
                t = time.perf_counter()
                inputs = ahead.result()
                ahead = read(chunks[i + 1]) if i + 1 < len(chunks) else None
                stream = _PartStream(node.name, out_type) if sink.whole(chunk) else None
                task = writer.submit(_write_streamed, sink, chunk, stream) if stream else None
                try:
                    result = compute_chunk(source, instance, node, chunk, node.batch_size,
                                           emit=stream.put if stream else None, batches=inputs,
                                           then=first_batch(ahead))
                    inputs = None  # the chunk's input arrays are not kept alive through the next read
                except BaseException:
                    if stream is not None:
                        stream.abort()
                    raise
                if stream is not None:
                    stream.finish(result[1], result[2])
                t2 = time.perf_counter()
                run.compute_s += t2 - t
                if pending is not None:
                    try:
                        pending.result()  # a writer error (or a `fail` row) surfaces before the next chunk
                    except BaseException:  # commit nothing after the fragment that failed
                        if stream is not None:
                            stream.abort()
                        raise
                run.write_wait_s += time.perf_counter() - t2
                pending = task or writer.submit(sink.add, *result)
            t = time.perf_counter()
            if pending is not None:
                pending.result()
            run.write_wait_s += time.perf_counter() - t
        finally:
            reader.shutdown(wait=True, cancel_futures=True)
            writer.shutdown(wait=True)
            if hasattr(instance, "close"):
                instance.close()
            run.udf_stats = getattr(instance, "stats", None)
        return field_meta

    # -- spawn pool -------------------------------------------------------------------------
    def prewarm(self, nodes: list[ColumnNode], workers: int | None = None) -> list:
        """Start the spawn pool now, in the background, with these columns' UDF modules imported in
        every worker, so a column that follows ingest finds its workers ready. Each worker's start
        (an interpreter, lance, pyarrow, the UDF's imports: ~1 s) was paid inside the first tier-2
        column: on a 4,096-row table, dhash took 4.4 s for 0.6 s of hashing on 16 cores
        (`apply_e2e.json`). A failed warm-up is ignored: the column's own chunks report errors."""
        if self.one_shot or not nodes:
            return []
        n = workers or self.workers
        pool = self._pool_for(n, n)
        # n submits before any finishes spawn all n workers; the futures are not waited for.
        return [_submit(pool, warm_worker, wnode) for wnode in {node.impl: WorkerNode.of(node) for node in nodes}.values()
                for _ in range(n)]

    def _pool_for(self, workers: int, chunks: int) -> ProcessPoolExecutor:
        size = min(workers, chunks) if self.one_shot else workers
        if self._pool is None or self._pool_size != size:
            self.close()
            # spawn, not fork: lance/lancedb are not fork-safe (workers segfault; stack-notes §3).
            self._pool = ProcessPoolExecutor(max_workers=size, mp_context=multiprocessing.get_context("spawn"),
                                             initializer=_worker_init, initargs=(os.getpid(),))
            self._pool_size = size
        return self._pool

    def _run_parallel(self, uri: str, version: int, node: ColumnNode, chunks: list[Chunk], workers: int,
                      finish: Callable) -> None:
        pool = self._pool_for(workers, len(chunks))
        wnode = WorkerNode.of(node)
        todo = list(reversed(chunks))
        running = set()
        try:
            while todo or running:
                # Two chunks a worker in flight: the next one is queued while a worker finishes.
                while todo and len(running) < workers * 2:
                    running.add(_submit(pool, run_chunk, uri, version, wnode, todo.pop(), node.batch_size))
                done, running = wait(running, return_when=FIRST_COMPLETED)
                for fut in sorted(done, key=lambda f: (f.result()[0].frag_id, f.result()[0].offset)):
                    finish(*fut.result())
        except BaseException:
            for fut in running:
                fut.cancel()
            self.close()  # a failed or broken pool is not reused
            raise


def _submit(pool: ProcessPoolExecutor, fn: Callable, *args: Any):
    """`pool.submit`, with Ctrl-C held back while it may spawn a worker: the new process inherits the
    blocked signal, so a Ctrl-C during its start-up (imports, before `_worker_init` runs) cannot
    print a traceback there; here it is delivered as soon as the submit returns."""
    import signal

    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        return pool.submit(fn, *args)
    finally:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})


def _worker_init(parent: int) -> None:
    """In each spawned worker. Ctrl-C reaches the whole process group: the parent stops the pool and
    prints one line, so a worker ignores it (no traceback per worker). And a worker never outlives
    its parent: SIGKILL gives the parent no chance to shut the pool down, so a thread watches the
    parent's pid and exits the worker within a second of its death (the resource tracker then
    sees its last user go, and exits too)."""
    import signal
    import threading

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})  # blocked by `_submit`; ignored from now on

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(0.5)
        os._exit(1)
    threading.Thread(target=watch, name="vlmspec-parent-watch", daemon=True).start()


@contextmanager
def local_session(workers: int | None = None, device: str | None = None) -> Iterator[LocalExecutor]:
    """One local executor for every column of an apply: the spawn start-up (an interpreter plus
    lance/pyarrow imports, about a second per worker) is paid once, not per column."""
    ex = LocalExecutor(workers, device)
    try:
        yield ex
    finally:
        ex.close()


class _PartStream:
    """A whole fragment's values, handed part by part from the computing thread to the writer thread
    as a `RecordBatchReader`: Lance encodes and writes each part while later parts compute, so a
    column ends with one part's write (420 MB of hiddens for a 256-row call) instead of a whole
    fragment's (1.6 GB per 1,024 rows) with the GPU idle. Parts wait in an unbounded queue, as
    they waited in the chunk before: memory is what it was."""

    def __init__(self, name: str, out_type: pa.DataType):
        self.schema = pa.schema([pa.field(name, out_type)])
        self._q: queue.Queue = queue.Queue()
        self.outcome: tuple | None = None  # (values, failures) from `compute_chunk`, once done
        self.aborted = False

    def put(self, values: pa.Array | pa.ChunkedArray) -> None:
        self._q.put(values)

    def waiting(self) -> int:
        """Parts (and the end mark) not yet taken by the writer."""
        return self._q.qsize()

    def finish(self, values: Any, failures: list[RowFailure]) -> None:
        """No more parts; `values` None means a row failed under `fail`: the write is abandoned."""
        self.outcome = (values, failures)
        self._q.put(None)

    def abort(self) -> None:
        """The engine stopped (the UDF or an earlier fragment's write failed): end the write
        without a data file, and never commit it."""
        self.aborted = True
        self._q.put(None)

    def reader(self) -> pa.RecordBatchReader:
        def batches():
            while (item := self._q.get()) is not None and not self.aborted:
                for part in item.chunks if isinstance(item, pa.ChunkedArray) else [item]:
                    yield pa.record_batch([part], schema=self.schema)
            if self.aborted or self.outcome[0] is None:
                raise _StreamAbandoned()
        return pa.RecordBatchReader.from_batches(self.schema, batches())


class _StreamAbandoned(Exception):
    """Ends a streamed write that must leave no data file behind (Lance then writes none)."""


def _write_streamed(sink: Any, chunk: Chunk, stream: _PartStream) -> None:
    """Writer-thread side of a streamed fragment: write its parts as they come, then hand the data
    file (or the `fail` row) to the sink exactly as a buffered chunk would be."""
    try:
        datafile = lance_io.write_column_data(sink.uri, sink.node.name, stream.reader(), sink.storage)
    except Exception:
        if stream.aborted:  # the computing thread raised; it reports its own error
            return
        if stream.outcome is not None and stream.outcome[0] is None:  # a row failed under `fail`
            return sink.add(chunk, None, stream.outcome[1])
        raise
    if stream.aborted:  # stopped after the last part was written: an unreferenced file, no commit
        return
    sink.add(chunk, None, stream.outcome[1], datafile=datafile)
