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

import dataclasses
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import lance
import pyarrow as pa

from vlmspec.compiler.errors import ApplyError, Problem
from vlmspec.compiler.state import FINGERPRINT, RECIPE, TARGET, retired_name

from . import lance_io
from .arrow_types import to_pyarrow
from .executors.chunks import Chunk
from .invoke import RowFailure
from .progress import NullReporter, Reporter

if TYPE_CHECKING:  # not at run time: worker processes must not pay for importing the compiler
    from vlmspec.compiler.compile import ColumnNode
    from vlmspec.compiler.plan import Placement

__all__ = ["ColumnRun", "FragmentSink", "backfill_column", "column_step", "prepare_column"]


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


def prepare_column(uri: str, node: ColumnNode, action: str, field: str | None = None) -> lance.LanceDataset:
    """Bring `field` (the column, or its shadow for the recompute of a complete column) to "being
    filled towards node.fingerprint", as the plan's `action` says (`new`, `recompute`, `resume`;
    `up_to_date` only re-marks a complete column)."""
    field = field or node.name
    ds = lance.dataset(uri)
    out_type = to_pyarrow(node.output)
    meta = {TARGET: node.fingerprint, RECIPE: json.dumps(node.recipe, sort_keys=True)}
    names = ds.schema.names
    if action == "new" or (action == "recompute" and field not in names):
        return lance_io.add_null_column(ds, field, out_type, meta)
    current = lance_io.decode_metadata(ds.schema.field(field).metadata)
    if action == "recompute" and node.fingerprint not in (current.get(TARGET), current.get(FINGERPRINT)):
        # Refilled from scratch: the column in place when its old values were never complete, or a
        # shadow left by a recompute towards another fingerprint. Metadata-only.
        ds.drop_columns([field])
        return lance_io.add_null_column(lance.dataset(uri), field, out_type, meta)
    if current.get(FINGERPRINT) and field == node.name and action != "up_to_date":
        # Complete before, now missing rows (appended source rows): not complete any more.
        lance_io.update_field_metadata(ds, field, {FINGERPRINT: None, TARGET: node.fingerprint})
        ds = lance.dataset(uri)
    return ds


def column_step(uri: str, node: ColumnNode):
    """The plan's step for one column, for callers that backfill without a plan (benchmarks,
    notebooks): the compiler's own diff on the table's current state, not a second rule."""
    from vlmspec.compiler.plan import diff_column

    state = lance_io.read_state(uri)
    return diff_column(node, state.column(node.name), state.rows, state)


class FragmentSink:
    """The commit side of the protocol, shared by every executor (executors only decide where chunks
    run). Takes chunk results in any order: buffers a fragment's values until it is whole, writes its
    data file (or takes the one a worker wrote) and attaches it with a `DataReplacement` commit, one
    per completed fragment (or per group of fragments completed together) = one checkpoint. Row
    failures are logged (`null`) or end the column with an ApplyError after committing what is done
    (`fail`)."""

    def __init__(self, uri: str, node: ColumnNode, ds: lance.LanceDataset, run: ColumnRun, reporter: Reporter,
                 errors_log: Path | None = None, key: str | None = None, field: str | None = None):
        self.uri, self.node, self.run, self.reporter = uri, node, run, reporter
        self.errors_log, self.key = errors_log, key
        self.column = node.name
        """The column as the user knows it (bars, errors, messages)."""
        self.field = field or node.name
        """The field the values are written to (the column, or its shadow during a recompute)."""
        self.version = ds.version
        self.storage = ds.data_storage_version
        self.frag_rows = lance_io.fragment_rows(ds)
        self.buffers: dict[int, _FragmentBuffer] = {}
        self.pending: list[tuple[int, Any]] = []
        self._pending_rows = 0

    def start(self, total: int) -> None:
        """The executor knows how many rows are pending: the column's bar starts."""
        self.reporter.start(self.column, total)

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
            key = _keys(self.uri, self.key, chunk.frag_id, [f.offset])[0]
            named = f", {self.key}={key!r}" if key is not None else ""
            raise ApplyError(Problem(
                f"UDF `{node.udf}` failed on row {addr} (fragment {chunk.frag_id}, offset {f.offset}{named}): "
                f"{f.error}", node.path,
                fix=f"Fix the UDF or the row, or set `on_error: null` on `{self.column}`; "
                    "`vlmspec apply` resumes from the last checkpoint"))
        if failures:
            self.run.errors += len(failures)
            _log_errors(self.errors_log, self.column, node.fingerprint, chunk.frag_id, failures, self.uri, self.key)
        self.run.rows += chunk.limit
        if datafile is None:
            buf = self.buffers.setdefault(chunk.frag_id, _FragmentBuffer(self.frag_rows[chunk.frag_id]))
            if not buf.add(chunk.offset, values):
                return
            datafile = lance_io.write_column_data(self.uri, self.field, buf.values(), self.storage)
            del self.buffers[chunk.frag_id]
        self.pending.append((chunk.frag_id, datafile))
        self._pending_rows += self.frag_rows[chunk.frag_id]
        self.run.fragments += 1
        if commit:
            self.flush()

    def flush(self) -> None:
        """Commit the fragments written so far (one checkpoint); the bar counts only committed rows,
        so it never shows work a kill would lose."""
        if self.pending:
            self.version = lance_io.commit_column_data(self.uri, self.version, self.pending).version
            self.pending.clear()
            self.reporter.advance(self.column, self._pending_rows)
            self._pending_rows = 0


def backfill_column(uri: str, node: ColumnNode, *, action: str | None = None, field: str | None = None,
                    place: Placement | None = None,
                    model_spec: Any = None, device: str | None = "cpu", workers: int | None = None,
                    reporter: Reporter | None = None, errors_log: Path | None = None,
                    key: str | None = None, executor: Any = None) -> ColumnRun:
    """Fill `node` to completion (or raise ApplyError); resumable at fragment granularity.

    `action`, `field` and `place` are the plan step's (computed from the table when not given). `executor`
    places the chunks: a `LocalExecutor` or `RayExecutor` the caller keeps for the whole apply, or
    None for a local executor used for this column only. Either way the column is prepared,
    committed and completed here, by the same protocol."""
    from .executors.local import LocalExecutor

    reporter = reporter or NullReporter()
    if action is None:
        step = column_step(uri, node)
        action, field = step.kind, step.fills or node.name
    field = field or node.name
    ds = prepare_column(uri, node, action, field)
    run = ColumnRun(node.name, node.udf, node.fingerprint, action=action)
    sink = FragmentSink(uri, node, ds, run, reporter, errors_log, key, field=field)
    # The executors compute and write `field`; the sink still names the column as the user knows it.
    fill = node if field == node.name else dataclasses.replace(node, name=field)
    own = executor is None
    executor = LocalExecutor(workers, device, one_shot=True) if own else executor
    started = time.perf_counter()
    ok = False
    try:
        field_meta = executor.backfill(uri, ds, fill, sink, model_spec=model_spec, device=device,
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
    _complete(uri, node, field, field_meta)
    return run


def _complete(uri: str, node: ColumnNode, field: str, field_meta: dict[str, str]) -> None:
    """Mark the filled field complete; a shadow is then swapped in for the old column in one
    metadata commit (renames), and the old values are dropped (metadata-only)."""
    ds = lance.dataset(uri)
    done = set(lance_io.fragment_fill(ds).get(field, []))
    rows = lance_io.fragment_rows(ds)
    missing = [f for f, n in rows.items() if n and f not in done]
    if missing:  # rows were appended while we ran; the next apply fills them
        return
    lance_io.update_field_metadata(ds, field, {**field_meta, FINGERPRINT: node.fingerprint, TARGET: None})
    if field != node.name:
        # Until this commit readers (and a loader pinned to an earlier version) see the whole old
        # column; from it on, the whole new one. A kill before it leaves a complete shadow, which
        # the next plan resumes as a swap with nothing to compute.
        lance_io.swap_in(lance.dataset(uri), node.name, field, retired_name(node.name))
        lance.dataset(uri).drop_columns([retired_name(node.name)])


def _keys(uri: str, key: str | None, frag_id: int, offsets: list[int]) -> list[Any]:
    """The `source.key` values of rows of one fragment (None where unknown): row errors name the row
    a user can find in the source, not a batch-local index."""
    if not key:
        return [None] * len(offsets)
    try:
        ds = lance.dataset(uri)
        if key not in ds.schema.names:
            return [None] * len(offsets)
        col = ds.get_fragment(frag_id).to_table(columns=[key]).column(key)
        return [col[o].as_py() for o in offsets]
    except Exception:  # the name is a courtesy; never let it hide the real error
        return [None] * len(offsets)


def _log_errors(path: Path | None, column: str, fingerprint: str, frag_id: int, failures: list[RowFailure],
                uri: str, key: str | None) -> None:
    if path is None:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    keys = _keys(uri, key, frag_id, [fl.offset for fl in failures])
    with path.open("a") as f:
        for fl, value in zip(failures, keys):
            f.write(json.dumps({"column": column, "fingerprint": fingerprint,
                                "row_addr": (frag_id << 32) + fl.offset, "fragment": frag_id,
                                "offset": fl.offset, "key": key if value is not None else None,
                                "key_value": value, "error": fl.error[:2000], "time": time.time()},
                               default=str) + "\n")
