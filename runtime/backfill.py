"""Backfill one derived column: resumable, fragment by fragment, never rewriting existing files.

Protocol (what makes a killed apply resumable):
1. The column is added as an all-null field (metadata-only) carrying `vlmspec.target` = the
   fingerprint being filled. A stale column is dropped first (metadata-only too).
2. Each fragment's values are computed, written as a standalone data file and attached with a
   `DataReplacement` commit: one commit per checkpoint. A kill loses at most the fragments in
   flight (locally two: the one being written and committed, and the next, computed meanwhile);
   a fragment holding a data file for the field is done and is never recomputed.
3. When every fragment holds data, `vlmspec.fingerprint` is written and `vlmspec.target` removed:
   the fingerprint appears when, and only when, the column is complete.
Raw columns are only ever read.

An executor only decides where chunks run (this process and a spawn pool, or Ray tasks and actors:
runtime/executors/); `FragmentSink` is the commit side every executor shares.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import json
import multiprocessing
import queue
import sys
import time
from concurrent.futures import ThreadPoolExecutor, FIRST_COMPLETED, ProcessPoolExecutor, wait
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, Mapping

import lance
import pyarrow as pa

from vlmspec.compiler.errors import ApplyError, Problem
from vlmspec.compiler.state import FINGERPRINT, RECIPE, TARGET

from . import lance_io
from .arrow_types import to_pyarrow
from .progress import NullReporter, Reporter
from .udfs.base import UdfContext

if TYPE_CHECKING:  # not at run time: worker processes must not pay for importing the compiler
    from vlmspec.compiler.compile import ColumnNode


@dataclass
class ColumnRun:
    """What one column's backfill did (recorded in run history)."""

    name: str
    udf: str
    fingerprint: str
    rows: int = 0
    seconds: float = 0.0
    fragments: int = 0
    errors: int = 0
    action: str = ""
    # Where `seconds` went, in the local engine: until the UDF was ready (a model loaded and
    # compiled), computing chunks (reading inputs + UDF calls), and waiting on the writer thread.
    setup_s: float = 0.0
    compute_s: float = 0.0
    write_wait_s: float = 0.0
    # The UDF instance's own `stats` dict, if it keeps one (VisionTower's call timings and tower
    # call counts), as it stood when the column ended; for benchmarks.
    udf_stats: dict | None = None

    @property
    def rows_per_s(self) -> float | None:
        return self.rows / self.seconds if self.rows and self.seconds > 0 else None


@dataclass(frozen=True)
class RowFailure:
    offset: int
    error: str


@dataclass
class Chunk:
    """A unit of work: rows [offset, offset+limit) of one fragment."""

    frag_id: int
    offset: int
    limit: int


# --- loading UDFs -------------------------------------------------------------------------

def load_udf(node: ColumnNode) -> Any:
    """Import the implementation: builtins by module path, user UDFs from the file the spec named."""
    module, _, attr = node.impl.partition(":")
    if node.udf == node.impl:  # user UDF: import from the resolved file, under a private name
        # The name covers the file's content, not just its path: a long-lived process (a notebook,
        # tests, a second apply) that edits the UDF must run the new code, which is what the new
        # fingerprint was compiled from, not the module cached from the old file.
        content = hashlib.sha256(Path(node.impl_file).read_bytes()).hexdigest()[:16]
        name = f"vlmspec_user_udf_{abs(hash(node.impl_file))}_{content}"
        mod = sys.modules.get(name)
        if mod is None:
            spec = importlib.util.spec_from_file_location(name, node.impl_file)
            mod = importlib.util.module_from_spec(spec)
            sys.modules[name] = mod
            spec.loader.exec_module(mod)
    else:
        mod = importlib.import_module(module)
    return getattr(mod, attr)


def _call(fn: Callable, arrays: list[pa.Array], params: dict, out_type: pa.DataType, batch: bool) -> pa.Array:
    if batch:
        result = fn(*arrays, **params)
    else:
        cols = [a.to_pylist() for a in arrays]
        result = [fn(*row, **params) for row in zip(*cols)]
    if isinstance(result, pa.ChunkedArray):
        result = result.combine_chunks()
    if not isinstance(result, pa.Array):
        result = pa.array(result, type=out_type)
    elif result.type != out_type:
        result = result.cast(out_type)
    if len(result) != len(arrays[0]):
        raise ValueError(f"UDF returned {len(result)} values for {len(arrays[0])} rows")
    return result


def compute(fn: Callable, arrays: list[pa.Array], params: dict, out_type: pa.DataType, batch: bool,
            on_error: str) -> tuple[pa.Array, list[RowFailure]]:
    """Run the UDF on a batch; on failure isolate the bad rows (`null`) or report the first (`fail`)."""
    try:
        return _call(fn, arrays, params, out_type, batch), []
    except Exception as e:
        if len(arrays[0]) > 1 and _is_cuda_oom(e):  # too big a batch, not a bad row: halve it
            return _halve(fn, arrays, params, out_type, batch, on_error)
        if len(arrays[0]) == 1 and on_error == "fail":
            raise
    values, failures = [], []
    for i in range(len(arrays[0])):
        try:
            values.append(_call(fn, [a.slice(i, 1) for a in arrays], params, out_type, batch))
        except Exception as e:
            if on_error == "fail":
                raise _RowError(i, e) from e
            failures.append(RowFailure(i, f"{type(e).__name__}: {e}"))
            values.append(pa.nulls(1, out_type))
    return pa.concat_arrays(values), failures


class _RowError(Exception):
    def __init__(self, offset: int, error: Exception):
        super().__init__(f"{type(error).__name__}: {error}")
        self.offset, self.error = offset, error


# CUDA out-of-memory retry (a small local addition to `compute`): a GPU UDF given more rows than fit
# is retried on each half of the batch, down to single rows, before the column's policy applies.
def _is_cuda_oom(e: Exception) -> bool:
    torch = sys.modules.get("torch")  # only a UDF that imported torch can run out of GPU memory
    oom = getattr(getattr(torch, "cuda", None), "OutOfMemoryError", None)
    return oom is not None and isinstance(e, oom)


def _halve(fn: Callable, arrays: list[pa.Array], params: dict, out_type: pa.DataType, batch: bool,
           on_error: str) -> tuple[pa.Array, list[RowFailure]]:
    torch = sys.modules["torch"]
    if torch.cuda.is_available():
        torch.cuda.empty_cache()  # release what the failed call cached before the smaller retries
    n = len(arrays[0])
    values, failures = [], []
    for start, length in ((0, n // 2), (n // 2, n - n // 2)):
        try:
            v, f = compute(fn, [a.slice(start, length) for a in arrays], params, out_type, batch, on_error)
        except _RowError as e:  # offsets are relative to the half: make them relative to the batch
            raise _RowError(start + e.offset, e.error) from e.error
        except Exception as e:  # a single row failed under `fail`
            raise _RowError(start, e) from e
        values.append(v)
        failures += [RowFailure(start + x.offset, x.error) for x in f]
    return pa.concat_arrays(values), failures


# --- worker side (separate processes for CPU UDFs) ------------------------------------------

@dataclass(frozen=True)
class WorkerNode:
    """The part of a `ColumnNode` a worker needs, as plain values: unpickling it imports no compiler
    (pydantic, sqlglot), which takes a third off each spawned worker's start-up."""

    name: str
    udf: str
    impl: str
    impl_file: str
    inputs: tuple[str, ...]
    params: Mapping[str, Any]
    output: str
    batch: bool
    on_error: str

    @classmethod
    def of(cls, node: ColumnNode) -> "WorkerNode":
        return cls(node.name, node.udf, node.impl, node.impl_file, tuple(node.inputs), dict(node.params),
                   node.output, node.batch, node.on_error)


_WORKER_CACHE: dict[Any, Any] = {}


def _run_chunk(uri: str, version: int, node: WorkerNode, chunk: Chunk, batch_size: int):
    """Compute one chunk in a worker process; returns (chunk, values, failures) or the row error."""
    if node.udf == node.impl:
        fn = load_udf(node)  # user UDF: load_udf keys its module on the file's content (pools outlive edits)
    else:
        fn = _WORKER_CACHE.get(node.impl)
        if fn is None:
            fn = _WORKER_CACHE[node.impl] = load_udf(node)
    # A table version never changes: keep the last one open instead of re-reading its manifest per chunk.
    ds = _WORKER_CACHE.get(("dataset", uri, version))
    if ds is None:
        for k in [k for k in _WORKER_CACHE if isinstance(k, tuple) and k[0] == "dataset"]:
            del _WORKER_CACHE[k]
        ds = _WORKER_CACHE[("dataset", uri, version)] = lance.dataset(uri, version=version)
    return _compute_chunk(ds, fn, node, chunk, batch_size)


# `_compute_chunk`'s values when each part went to `emit` as it was computed (a streamed write).
EMITTED = object()


Batches = list[tuple[int, list[pa.Array]]]  # (row offset in the chunk, one array per input)


def _read_chunk(ds, node: ColumnNode, chunk: Chunk, batch_size: int) -> Batches:
    """The chunk's input columns, cut into the UDF's batches."""
    table = ds.get_fragment(chunk.frag_id).to_table(columns=list(node.inputs), offset=chunk.offset,
                                                    limit=chunk.limit)
    return [(start, [table.column(c).slice(start, batch_size).combine_chunks() for c in node.inputs])
            for start in range(0, table.num_rows, batch_size)]


def _compute_chunk(ds, fn, node: ColumnNode, chunk: Chunk, batch_size: int, emit: Callable | None = None,
                   batches: Batches | None = None, then: Callable[[], list[pa.Array] | None] | None = None):
    """(chunk, values, failures): values None when a row failed under `fail`; EMITTED when each
    part was handed to `emit` as soon as it was computed instead of being collected. `batches`
    are the chunk's inputs when they were read ahead (else they are read here); `then()` gives
    the next chunk's first batch, for the UDF to prefetch during this chunk's last call."""
    out_type = to_pyarrow(node.output)
    if batches is None:
        batches = _read_chunk(ds, node, chunk, batch_size)
    parts, failures = [], []
    # A UDF with `prefetch` (the vision tower) starts preparing the next batch's inputs (decoding
    # images) while this batch runs, so the GPU does not wait on the CPU between calls.
    prefetch = getattr(fn, "prefetch", None)
    for k, (start, arrays) in enumerate(batches):
        if prefetch is not None:
            following = batches[k + 1][1] if k + 1 < len(batches) else then() if then is not None else None
            if following is not None:
                prefetch(*following)
        try:
            values, fails = compute(fn, arrays, dict(node.params), out_type, node.batch, node.on_error)
        except _RowError as e:
            return chunk, None, [RowFailure(chunk.offset + start + e.offset, str(e))]
        except Exception as e:  # a whole-batch failure under `fail` with one row
            return chunk, None, [RowFailure(chunk.offset + start, f"{type(e).__name__}: {e}")]
        failures += [RowFailure(chunk.offset + start + f.offset, f.error) for f in fails]
        if emit is not None:
            emit(values)
        else:
            parts.append(values)
    if emit is not None:
        return chunk, EMITTED, failures
    # Parts stay separate chunks: concatenating 1.6 GB of hiddens per 1,024 rows would be a copy
    # with the GPU idle; the Lance writer takes chunked columns as they are.
    values = (parts[0] if len(parts) == 1 else pa.chunked_array(parts, out_type)) if parts else pa.array([], out_type)
    return chunk, values, failures


# --- the engine ---------------------------------------------------------------------------

class _PartStream:
    """A whole fragment's values, handed part by part from the computing thread to the writer thread
    as a `RecordBatchReader`: Lance encodes and writes each part while later parts compute, so a
    column ends with one part's write (420 MB of hiddens for a 256-row call) instead of a whole
    fragment's (1.6 GB per 1,024 rows) with the GPU idle. Parts wait in an unbounded queue, as
    they waited in the chunk before: memory is what it was."""

    def __init__(self, name: str, out_type: pa.DataType):
        self.schema = pa.schema([pa.field(name, out_type)])
        self._q: queue.Queue = queue.Queue()
        self.outcome: tuple | None = None  # (values, failures) from `_compute_chunk`, once done
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


def _first_batch(ahead) -> Callable[[], list[pa.Array] | None] | None:
    """The next chunk's first batch once read (None if there is none, or its read failed: the
    engine raises that error when it gets to the chunk). The same array objects go to the next
    `_compute_chunk`, so a UDF recognises the batch it prefetched."""
    if ahead is None:
        return None

    def first() -> list[pa.Array] | None:
        try:
            batches = ahead.result()
        except Exception:  # noqa: BLE001 - reported where the chunk is computed
            return None
        return batches[0][1] if batches else None
    return first


class _StreamAbandoned(Exception):
    pass


def _write_streamed(sink: "FragmentSink", chunk: Chunk, stream: _PartStream) -> None:
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


@dataclass
class _FragmentBuffer:
    rows: int
    parts: dict[int, pa.Array | pa.ChunkedArray] = field(default_factory=dict)

    def add(self, offset: int, values: pa.Array | pa.ChunkedArray) -> bool:
        self.parts[offset] = values
        return sum(len(v) for v in self.parts.values()) == self.rows

    def values(self) -> pa.ChunkedArray:
        """The fragment's values in row order, as chunks (no copy)."""
        chunks = []
        for k in sorted(self.parts):
            v = self.parts[k]
            chunks += v.chunks if isinstance(v, pa.ChunkedArray) else [v]
        return pa.chunked_array(chunks, chunks[0].type)


def prepare_column(uri: str, node: ColumnNode) -> tuple[lance.LanceDataset, str]:
    """Bring the column to 'being filled towards node.fingerprint'; returns (dataset, action)."""
    ds = lance.dataset(uri)
    out_type = to_pyarrow(node.output)
    meta = {TARGET: node.fingerprint, RECIPE: json.dumps(node.recipe, sort_keys=True)}
    if node.name not in ds.schema.names:
        return lance_io.add_null_column(ds, node.name, out_type, meta), "new"
    current = lance_io.decode_metadata(ds.schema.field(node.name).metadata)
    have = current.get(FINGERPRINT) or current.get(TARGET)
    if have != node.fingerprint or ds.schema.field(node.name).type != out_type:
        ds.drop_columns([node.name])  # metadata-only; the stale values are no longer wanted
        ds = lance.dataset(uri)
        return lance_io.add_null_column(ds, node.name, out_type, meta), "recompute"
    if current.get(FINGERPRINT):
        # Complete before, now missing rows (appended source rows): not complete any more.
        lance_io.update_field_metadata(ds, node.name, {FINGERPRINT: None, TARGET: node.fingerprint})
        ds = lance.dataset(uri)
    return ds, "resume"


def pending_chunks(ds: lance.LanceDataset, name: str, chunk_rows: int) -> list[Chunk]:
    done = set(lance_io.fragment_fill(ds).get(name, []))
    rows = lance_io.fragment_rows(ds)
    chunks = []
    for frag in ds.get_fragments():
        fid = frag.fragment_id
        if fid in done or rows[fid] == 0:
            continue
        if frag.metadata.deletion_file is not None:
            raise ApplyError(Problem(f"fragment {fid} has deleted rows", node_path(name),
                                     fix="Compact the table (lance `optimize.compact_files`) and apply again"))
        for off in range(0, rows[fid], chunk_rows):
            chunks.append(Chunk(fid, off, min(chunk_rows, rows[fid] - off)))
    return chunks


def node_path(name: str) -> str:
    return f"column `{name}`"


class FragmentSink:
    """The commit side of the protocol, shared by every executor (executors only decide where chunks
    run). Takes chunk results in any order: buffers a fragment's values until it is whole, writes its
    data file (or takes the one a worker wrote) and attaches it with a `DataReplacement` commit, one
    per completed fragment (or per group of fragments completed together) = one checkpoint. Row
    failures are logged (`null`) or end the column with an ApplyError after committing what is done
    (`fail`)."""

    def __init__(self, uri: str, node: ColumnNode, ds: lance.LanceDataset, run: ColumnRun, reporter: Reporter,
                 errors_log: Path | None = None, key: str | None = None):
        self.uri, self.node, self.run, self.reporter = uri, node, run, reporter
        self.errors_log, self.key = errors_log, key
        self.version = ds.version
        self.storage = ds.data_storage_version
        self.frag_rows = lance_io.fragment_rows(ds)
        self.buffers: dict[int, _FragmentBuffer] = {}
        self.pending: list[tuple[int, Any]] = []

    def whole(self, chunk: Chunk) -> bool:
        """True when `chunk` is its whole fragment (a worker may then write the data file itself)."""
        return chunk.offset == 0 and chunk.limit == self.frag_rows[chunk.frag_id]

    def add(self, chunk: Chunk, values: pa.Array | pa.ChunkedArray | None, failures: list[RowFailure],
            datafile: Any = None, *, commit: bool = True) -> None:
        """One chunk's result: `values`, or a `datafile` already written for the whole fragment, or
        neither (a row failed under `fail`: commit what is done, then raise)."""
        node = self.node
        if values is None and datafile is None:  # `fail` policy: stop at the first bad row
            self.flush()
            f = failures[0]
            addr = (chunk.frag_id << 32) + f.offset
            raise ApplyError(Problem(
                f"UDF `{node.udf}` failed on row {addr} (fragment {chunk.frag_id}, offset {f.offset}"
                f"{_key_text(self.uri, self.key, chunk.frag_id, f.offset)}): {f.error}", node.path,
                fix=f"Fix the UDF or the row, or set `on_error: null` on `{node.name}`; "
                    "`vlmspec apply` resumes from the last checkpoint"))
        if failures:
            self.run.errors += len(failures)
            _log_errors(self.errors_log, node, chunk.frag_id, failures, self.uri, self.key)
        self.reporter.advance(node.name, chunk.limit)
        self.run.rows += chunk.limit
        if datafile is None:
            buf = self.buffers.setdefault(chunk.frag_id, _FragmentBuffer(self.frag_rows[chunk.frag_id]))
            if not buf.add(chunk.offset, values):
                return
            datafile = lance_io.write_column_data(self.uri, node.name, buf.values(), self.storage)
            del self.buffers[chunk.frag_id]
        self.pending.append((chunk.frag_id, datafile))
        self.run.fragments += 1
        if commit:
            self.flush()

    def flush(self) -> None:
        if self.pending:
            self.version = lance_io.commit_column_data(self.uri, self.version, self.pending).version
            self.pending.clear()


def backfill_column(uri: str, node: ColumnNode, *, model_spec: Any = None, device: str | None = "cpu",
                    workers: int = 1, reporter: Reporter | None = None, errors_log: Path | None = None,
                    key: str | None = None, executor: Any = None) -> ColumnRun:
    """Fill `node` to completion (or raise ApplyError); resumable at fragment granularity.

    `executor` decides where chunks run: None is this process (and a spawn pool for parallel CPU
    UDFs); a `RayExecutor` (runtime/executors/ray_exec.py) runs them on a Ray cluster. Either way
    the column is prepared, committed and completed here, by the same protocol."""
    reporter = reporter or NullReporter()
    ds, action = prepare_column(uri, node)
    run = ColumnRun(node.name, node.udf, node.fingerprint, action=action)
    sink = FragmentSink(uri, node, ds, run, reporter, errors_log, key)
    started = time.perf_counter()
    field_meta: dict[str, str] = {}
    try:
        if executor is not None:
            field_meta = executor.backfill(uri, ds, node, sink, model_spec=model_spec, device=device,
                                           workers=workers)
        else:
            parallel = workers > 1 and node.parallel and not node.uses_model
            chunks = pending_chunks(ds, node.name, node.batch_size * (4 if parallel else 64))
            reporter.start(node.name, sum(c.limit for c in chunks))
            if parallel and len(chunks) > 1:
                _run_parallel(uri, ds.version, node, chunks, workers, sink.add)
            else:
                instance, field_meta = _instantiate(node, model_spec, device or "cpu")
                run.setup_s = time.perf_counter() - started
                # Writing a fragment's data file and committing it runs on one background thread
                # while the next chunk computes (the GPU would otherwise idle through a 1.6 GB write
                # per 1,024 rows of hiddens). One write in flight keeps memory bounded and commits in
                # order; a writer error (or a `fail` row) surfaces before the next chunk is queued.
                # A kill loses at most two fragments: the one being written and the one computed
                # meanwhile. (Two writers at once were tried on the H200: no faster, and a kill would
                # lose three.)
                # A chunk that is a whole fragment streams: its write is queued first and takes each
                # part as it is computed (`_PartStream`), so only the last part's write is left when
                # the last chunk is computed.
                # The next chunk's inputs are read on another thread while this one computes (50 MB
                # of JPEGs per 1,024 rows: the GPU would idle through each read).
                writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="vlmspec-writer")
                reader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="vlmspec-reader")
                pending = None
                out_type = to_pyarrow(node.output)
                source = lance.dataset(uri, version=ds.version)
                read = lambda c: reader.submit(_read_chunk, source, node, c, node.batch_size)  # noqa: E731
                ahead = read(chunks[0]) if chunks else None
                try:
                    for i, chunk in enumerate(chunks):
                        t = time.perf_counter()
                        inputs = ahead.result()
                        ahead = read(chunks[i + 1]) if i + 1 < len(chunks) else None
                        stream = _PartStream(node.name, out_type) if sink.whole(chunk) else None
                        task = writer.submit(_write_streamed, sink, chunk, stream) if stream else None
                        try:
                            result = _compute_chunk(source, instance, node, chunk, node.batch_size,
                                                    emit=stream.put if stream else None, batches=inputs,
                                                    then=_first_batch(ahead))
                            inputs = None
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
                                pending.result()
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
        sink.flush()
    finally:
        run.seconds = time.perf_counter() - started
        reporter.finish(node.name)
    _complete(uri, node, field_meta)
    return run


def _instantiate(node: ColumnNode, model_spec: Any, device: str) -> tuple[Callable, dict[str, str]]:
    """A callable for the UDF, plus field metadata a class UDF wants stored (e.g. the vision grid)."""
    obj = load_udf(node)
    if isinstance(obj, type):
        ctx = UdfContext(node.name, to_pyarrow(node.output), dict(node.params), model_spec, device, node.batch_size, dict(node.tuning))
        inst = obj(ctx)
        meta = dict(inst.field_metadata()) if hasattr(inst, "field_metadata") else {}
        # Params went to the constructor; the call takes arrays only.
        return _BoundInstance(inst), meta
    return obj, {}


class _BoundInstance:
    def __init__(self, inst):
        self.inst = inst
        self.prefetch = getattr(inst, "prefetch", None)  # the optional hook `_compute_chunk` calls
        self.stats = getattr(inst, "stats", None)  # optional, kept in `ColumnRun.udf_stats`

    def __call__(self, *arrays, **_params):
        return self.inst(*arrays)

    def close(self):
        if hasattr(self.inst, "close"):
            self.inst.close()


def _complete(uri: str, node: ColumnNode, field_meta: dict[str, str]) -> None:
    ds = lance.dataset(uri)
    done = set(lance_io.fragment_fill(ds).get(node.name, []))
    rows = lance_io.fragment_rows(ds)
    missing = [f for f, n in rows.items() if n and f not in done]
    if missing:  # rows were appended while we ran; the next apply fills them
        return
    lance_io.update_field_metadata(ds, node.name, {**field_meta, FINGERPRINT: node.fingerprint, TARGET: None})


_SHARED: dict[str, Any] = {"depth": 0, "pool": None, "workers": 0}


@contextmanager
def shared_pool() -> Iterator[None]:
    """Reuse one worker pool for every parallel column backfilled inside (e.g. all columns of one
    apply): the spawn start-up (an interpreter plus lance/pyarrow imports, about a second per worker)
    is paid once, not per column. Outside it, each column gets its own pool, closed when it is done."""
    _SHARED["depth"] += 1
    try:
        yield
    finally:
        _SHARED["depth"] -= 1
        if _SHARED["depth"] == 0:
            _close_shared()


def _close_shared() -> None:
    pool, _SHARED["pool"], _SHARED["workers"] = _SHARED["pool"], None, 0
    if pool is not None:
        pool.shutdown(wait=True, cancel_futures=True)


def _new_pool(workers: int) -> ProcessPoolExecutor:
    # spawn, not fork: lance/lancedb are not fork-safe (workers segfault; stack-notes §3).
    return ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn"))


def _run_parallel(uri: str, version: int, node: ColumnNode, chunks: list[Chunk], workers: int,
                  finish: Callable) -> None:
    shared = _SHARED["depth"] > 0
    if shared:
        if _SHARED["pool"] is None or _SHARED["workers"] != workers:
            _close_shared()
            _SHARED["pool"], _SHARED["workers"] = _new_pool(workers), workers
        pool = _SHARED["pool"]
    else:
        pool = _new_pool(min(workers, len(chunks)))
    wnode = WorkerNode.of(node)
    todo = list(reversed(chunks))
    running = set()
    ok = False
    try:
        while todo or running:
            while todo and len(running) < workers * 2:
                running.add(pool.submit(_run_chunk, uri, version, wnode, todo.pop(), node.batch_size))
            done, running = wait(running, return_when=FIRST_COMPLETED)
            for fut in sorted(done, key=lambda f: (f.result()[0].frag_id, f.result()[0].offset)):
                finish(*fut.result())
        ok = True
    except BaseException:
        for fut in running:
            fut.cancel()
        raise
    finally:
        if not shared:
            # Every result is in and committed: let the workers exit in the background (their
            # teardown takes ~0.3 s that nothing needs to wait for). After a failure, wait for them.
            pool.shutdown(wait=not ok)
        elif not ok:  # a failed or broken pool is not reused
            _close_shared()


def _key_text(uri: str, key: str | None, frag_id: int, offset: int) -> str:
    if not key:
        return ""
    try:
        ds = lance.dataset(uri)
        if key not in ds.schema.names:
            return ""
        val = ds.get_fragment(frag_id).to_table(columns=[key], offset=offset, limit=1).column(key)[0].as_py()
        return f", {key}={val!r}"
    except Exception:  # the message is a courtesy; never let it hide the real error
        return ""


def _log_errors(path: Path | None, node: ColumnNode, frag_id: int, failures: list[RowFailure], uri: str,
                key: str | None) -> None:
    if path is None:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as f:
        for fl in failures:
            f.write(json.dumps({"column": node.name, "fingerprint": node.fingerprint,
                                "row_addr": (frag_id << 32) + fl.offset, "fragment": frag_id,
                                "offset": fl.offset, "error": fl.error[:2000],
                                "time": time.time()}) + "\n")
