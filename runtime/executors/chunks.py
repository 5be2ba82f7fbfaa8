"""Chunks: the unit of work every executor places. What a chunk is, which are pending for a
column, and how one is computed from its input columns (in this process, in a spawned worker, or on
a Ray worker: the same code everywhere, so every executor writes the same bytes).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Mapping

import lance
import pyarrow as pa

from vlmspec.compiler.errors import ApplyError, Problem

from .. import lance_io
from ..arrow_types import to_pyarrow
from ..invoke import RowError, RowFailure, compute, describe, load_udf

if TYPE_CHECKING:  # not at run time: worker processes must not pay for importing the compiler
    from vlmspec.compiler.compile import ColumnNode

__all__ = ["Batches", "Chunk", "EMITTED", "MIN_CHUNK_ROWS", "WorkerNode", "compute_chunk", "first_batch",
           "node_path", "pending_chunks", "read_chunk", "run_chunk", "spread_chunks"]


@dataclass
class Chunk:
    """A unit of work: rows [offset, offset+limit) of one fragment."""

    frag_id: int
    offset: int
    limit: int


def pending_chunks(ds: lance.LanceDataset, name: str, chunk_rows: int, even: bool = False) -> list[Chunk]:
    """Row ranges of at most `chunk_rows` covering the fragments `name` still lacks; `even` cuts each
    fragment into equal parts instead (1,024 rows at most 192: six of 170-171, not five of 192 and 64)."""
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
        n = rows[fid]
        if even:  # p parts whose sizes differ by one row at most
            p = -(-n // chunk_rows)
            edges = [n * i // p for i in range(p + 1)]
            chunks += [Chunk(fid, a, b - a) for a, b in zip(edges, edges[1:])]
        else:
            chunks += [Chunk(fid, off, min(chunk_rows, n - off)) for off in range(0, n, chunk_rows)]
    return chunks


MIN_CHUNK_ROWS = 32
"""The smallest chunk `spread_chunks` cuts: below it a chunk's read and hand-off cost more than its rows."""


CHUNKS_PER_WORKER = 4
"""How many chunks a worker should get: with ~2, the last wave's leftovers idle most workers (12
fragments on 16 workers cut into 36 chunks ran 3 waves, a third longer than the rows need)."""


def spread_chunks(ds: lance.LanceDataset, name: str, workers: int, largest: int) -> list[Chunk]:
    """Pending chunks of at most `largest` rows, cut smaller and even (down to MIN_CHUNK_ROWS) until
    there are about `CHUNKS_PER_WORKER` a worker: a table of few fragments (3,072 rows in 3) still
    keeps 16 workers busy, and the last wave is short.
    Chunks are row ranges inside fragments; `FragmentSink` buffers a fragment's chunks and commits
    the fragment once whole, so commits, checkpoints and resume stay per fragment. A UDF sees
    smaller batches then (cut at chunk ends, as at fragment ends already): values of a row-wise UDF
    are the same bytes."""
    chunks = pending_chunks(ds, name, largest)
    want = CHUNKS_PER_WORKER * workers
    if workers > 1 and len(chunks) < want:
        rows = max(MIN_CHUNK_ROWS, -(-sum(c.limit for c in chunks) // want))
        if rows < largest:
            chunks = pending_chunks(ds, name, rows, even=True)
    return chunks


def node_path(name: str) -> str:
    return f"column `{name}`"


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


def warm_worker(node: WorkerNode) -> None:
    """Pay this worker's one-time costs ahead of its first chunk; `LocalExecutor.prewarm` runs it
    while ingest is still going: a builtin UDF's module is imported (PIL, imagehash, ...) and its
    `warm()`, where it has one, run (image.py decodes a tiny JPEG and PNG: Pillow imports its format
    plugins on the first open). lance, pyarrow (and pandas, which lance imports) were imported when
    the worker started."""
    if node.udf != node.impl and node.impl not in _WORKER_CACHE:
        fn = _WORKER_CACHE[node.impl] = load_udf(node)
        warm = getattr(sys.modules.get(getattr(fn, "__module__", "")), "warm", None)
        if callable(warm):
            warm()


def run_chunk(uri: str, version: int, node: WorkerNode, chunk: Chunk, batch_size: int):
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
    return compute_chunk(ds, fn, node, chunk, batch_size)


# `compute_chunk`'s values when each part went to `emit` as it was computed (a streamed write).
EMITTED = object()


Batches = list[tuple[int, list[pa.Array]]]  # (row offset in the chunk, one array per input)


def read_chunk(ds, node: ColumnNode, chunk: Chunk, batch_size: int) -> Batches:
    """The chunk's input columns, cut into the UDF's batches."""
    table = ds.get_fragment(chunk.frag_id).to_table(columns=list(node.inputs), offset=chunk.offset,
                                                    limit=chunk.limit)
    return [(start, [table.column(c).slice(start, batch_size).combine_chunks() for c in node.inputs])
            for start in range(0, table.num_rows, batch_size)]


def compute_chunk(ds, fn, node: ColumnNode, chunk: Chunk, batch_size: int, emit: Callable | None = None,
                   batches: Batches | None = None, then: Callable[[], list[pa.Array] | None] | None = None):
    """(chunk, values, failures): values None when a row failed under `fail`; EMITTED when each
    part was handed to `emit` as soon as it was computed instead of being collected. `batches`
    are the chunk's inputs when they were read ahead (else they are read here); `then()` gives
    the next chunk's first batch, for the UDF to prefetch during this chunk's last call."""
    out_type = to_pyarrow(node.output)
    if batches is None:
        batches = read_chunk(ds, node, chunk, batch_size)
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
        except RowError as e:
            return chunk, None, [RowFailure(chunk.offset + start + e.offset, str(e))]
        except Exception as e:  # a whole-batch failure under `fail` with one row
            return chunk, None, [RowFailure(chunk.offset + start, describe(e))]
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


def first_batch(ahead) -> Callable[[], list[pa.Array] | None] | None:
    """The next chunk's first batch once read (None if there is none, or its read failed: the
    engine raises that error when it gets to the chunk). The same array objects go to the next
    `compute_chunk`, so a UDF recognises the batch it prefetched."""
    if ahead is None:
        return None

    def first() -> list[pa.Array] | None:
        try:
            batches = ahead.result()
        except Exception:  # noqa: BLE001 - reported where the chunk is computed
            return None
        return batches[0][1] if batches else None
    return first
