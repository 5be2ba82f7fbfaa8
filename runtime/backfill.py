"""Backfill one derived column: resumable, fragment by fragment, never rewriting existing files.

Protocol (what makes a killed apply resumable):
1. The column is brought to "being filled": a new column is added as an all-null field
   (metadata-only) carrying `vlmspec.target` = the fingerprint being filled; a recompute drops the
   stale field first (metadata-only too); a resume clears a stale `vlmspec.fingerprint`. Which of
   the three it is comes from the plan (`compiler.plan.Backfill.kind`): this module obeys it.
2. Each fragment's values are computed, written as a standalone data file and attached with a
   `DataReplacement` commit: one commit per checkpoint. A kill loses at most the fragments in
   flight (locally two: the one being written and committed, and the next, computed meanwhile);
   a fragment holding a data file for the field is done and is never recomputed.
3. When every fragment holds data, `vlmspec.fingerprint` is written and `vlmspec.target` removed:
   the fingerprint appears when, and only when, the column is complete.
Raw columns are only ever read.

An executor only decides where chunks run (`executors/local.py`: this process and a spawn pool;
`executors/ray_exec.py`: Ray tasks and actors); `FragmentSink` is the commit side they all share.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import lance
import pyarrow as pa

from vlmspec.compiler.errors import ApplyError, Problem
from vlmspec.compiler.state import FINGERPRINT, RECIPE, TARGET

from . import lance_io
from .arrow_types import to_pyarrow
from .executors.chunks import Chunk
from .invoke import RowFailure
from .progress import NullReporter, Reporter

if TYPE_CHECKING:  # not at run time: worker processes must not pay for importing the compiler
    from vlmspec.compiler.compile import ColumnNode
    from vlmspec.compiler.plan import Placement

__all__ = ["ColumnRun", "FragmentSink", "backfill_column", "column_action", "prepare_column"]


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


def prepare_column(uri: str, node: ColumnNode, action: str) -> lance.LanceDataset:
    """Bring the column to "being filled towards node.fingerprint", as the plan's `action` says
    (`new`, `recompute`, `resume`; `up_to_date` only re-marks a complete column)."""
    ds = lance.dataset(uri)
    out_type = to_pyarrow(node.output)
    meta = {TARGET: node.fingerprint, RECIPE: json.dumps(node.recipe, sort_keys=True)}
    if action == "new":
        return lance_io.add_null_column(ds, node.name, out_type, meta)
    if action == "recompute":
        ds.drop_columns([node.name])  # metadata-only; the stale values are no longer wanted
        return lance_io.add_null_column(lance.dataset(uri), node.name, out_type, meta)
    current = lance_io.decode_metadata(ds.schema.field(node.name).metadata)
    if action == "resume" and current.get(FINGERPRINT):
        # Complete before, now missing rows (appended source rows): not complete any more.
        lance_io.update_field_metadata(ds, node.name, {FINGERPRINT: None, TARGET: node.fingerprint})
        ds = lance.dataset(uri)
    return ds


def column_action(uri: str, node: ColumnNode) -> str:
    """The plan's action for one column, for callers that backfill without a plan (benchmarks,
    notebooks): the compiler's own diff on the table's current state, not a second rule."""
    from vlmspec.compiler.plan import diff_column

    state = lance_io.read_state(uri)
    return diff_column(node, state.column(node.name), state.rows, state).kind


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


def backfill_column(uri: str, node: ColumnNode, *, action: str | None = None, place: Placement | None = None,
                    model_spec: Any = None, device: str | None = "cpu", workers: int | None = None,
                    reporter: Reporter | None = None, errors_log: Path | None = None,
                    key: str | None = None, executor: Any = None) -> ColumnRun:
    """Fill `node` to completion (or raise ApplyError); resumable at fragment granularity.

    `action` and `place` are the plan step's (computed from the table when not given). `executor`
    places the chunks: a `LocalExecutor` or `RayExecutor` the caller keeps for the whole apply, or
    None for a local executor used for this column only. Either way the column is prepared,
    committed and completed here, by the same protocol."""
    from .executors.local import LocalExecutor

    reporter = reporter or NullReporter()
    action = action or column_action(uri, node)
    ds = prepare_column(uri, node, action)
    run = ColumnRun(node.name, node.udf, node.fingerprint, action=action)
    sink = FragmentSink(uri, node, ds, run, reporter, errors_log, key)
    own = executor is None
    executor = LocalExecutor(workers, device, one_shot=True) if own else executor
    started = time.perf_counter()
    ok = False
    try:
        field_meta = executor.backfill(uri, ds, node, sink, model_spec=model_spec, device=device,
                                       workers=workers, place=place)
        sink.flush()
        ok = True
    finally:
        run.seconds = time.perf_counter() - started
        reporter.finish(node.name)
        if own:
            # Every result is in and committed: let the workers exit in the background (their
            # teardown takes ~0.3 s that nothing needs to wait for). After a failure, wait for them.
            executor.close(wait=not ok)
    _complete(uri, node, field_meta)
    return run


def _complete(uri: str, node: ColumnNode, field_meta: dict[str, str]) -> None:
    ds = lance.dataset(uri)
    done = set(lance_io.fragment_fill(ds).get(node.name, []))
    rows = lance_io.fragment_rows(ds)
    missing = [f for f, n in rows.items() if n and f not in done]
    if missing:  # rows were appended while we ran; the next apply fills them
        return
    lance_io.update_field_metadata(ds, node.name, {**field_meta, FINGERPRINT: node.fingerprint, TARGET: None})


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
