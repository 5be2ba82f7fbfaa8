"""Ingest: stream source rows into the Lance table in bounded memory, append-only and idempotent.

Rows are identified by the spec's `source.key` (e.g. `question_id`): a re-run skips keys already
in the table, so it never duplicates or drops rows, and new source rows become a planned append.
Rows are committed every `COMMIT_ROWS` rows, so a killed ingest keeps what it committed.
Image bytes are stored exactly as they come (no re-encode). Batches are made or read on a pool and
committed by one writer thread, in source order (`parallel.py`).
"""

from __future__ import annotations

import glob
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import lance
import pyarrow as pa
import pyarrow.compute as pc

from vlmspec.compiler.catalog import KNOWN_SOURCES, SYNTHETIC_SCHEMA
from vlmspec.compiler.errors import ApplyError, Problem
from vlmspec.compiler.model import SourceSpec

from .. import lance_io
from .parallel import ingest_workers, synthetic_batches, threaded_parts

COMMIT_ROWS = 16_384
SPAN_ROWS = 1024
"""Rows of one read of a `save_to_disk` folder (a pool's unit of work; the batch the old iterator cut)."""


@dataclass
class IngestRun:
    rows: int = 0
    skipped: int = 0
    seconds: float = 0.0


def source_info(source: SourceSpec) -> tuple[int | None, dict[str, str] | None]:
    """(rows, schema) of the ingest source where known without reading data."""
    ing = source.ingest
    if ing is None:
        return None, None
    if ing.kind == "synthetic":
        return ing.rows, dict(SYNTHETIC_SCHEMA)
    if ing.kind == "parquet":
        import pyarrow.parquet as pq

        files = _parquet_files(ing.path)
        if not files:
            return None, None
        rows = sum(pq.ParquetFile(f).metadata.num_rows for f in files)
        schema = pq.read_schema(files[0])
        cols = {f.name: str(_storable(f.type)) for f in schema if not ing.columns or f.name in ing.columns}
        return (min(rows, ing.limit) if ing.limit else rows), cols
    if ing.kind == "lance":
        ds = lance_io.open_dataset(ing.uri, ing.version)
        if ds is None:
            return None, None
        rows = ds.count_rows()
        cols = {f.name: str(f.type) for f in ds.schema if not ing.columns or f.name in ing.columns}
        return (min(rows, ing.limit) if ing.limit else rows), cols
    if _hf_local(ing.dataset):  # a saved folder is memory-mapped Arrow: rows and schema are cheap
        ds = _hf_from_disk(ing)
        cols = {f.name: str(_storable(f.type)) for f in ds.data.schema if not ing.columns or f.name in ing.columns}
        return (min(ds.num_rows, ing.limit) if ing.limit else ds.num_rows), cols
    # huggingface: row count known only once streaming starts; `limit` bounds it, and a few
    # well-known datasets have a known schema. Planning never contacts the hub.
    schema = KNOWN_SOURCES.get(ing.dataset)
    if schema is not None and ing.columns:
        schema = {k: v for k, v in schema.items() if k in ing.columns}
    return ing.limit, (dict(schema) if schema is not None else None)


def _parquet_files(path: str) -> list[str]:
    p = Path(path)
    if p.is_dir():
        return sorted(str(f) for f in p.rglob("*.parquet"))
    return sorted(glob.glob(path)) if any(ch in path for ch in "*?[") else ([path] if p.exists() else [])


def _storable(t: pa.DataType) -> pa.DataType:
    # HF `Image` features arrive as struct<bytes, path>: we keep the bytes, untouched.
    if pa.types.is_struct(t) and t.get_field_index("bytes") >= 0:
        return pa.large_binary()
    if pa.types.is_binary(t):
        return pa.large_binary()
    return t


NO_COMPRESSION = {b"lance-encoding:compression": b"none"}


def uncompressed_media(table: pa.Table) -> pa.Table:
    """`table` with its binary columns (image bytes: JPEG/PNG, already compressed) marked for Lance to
    store as they are. Lance 2.2 compresses binary pages by default: on 560-px JPEGs that saved 10 %
    of the disk and made the write 4-6x slower (CPU-bound, one thread: ingest's bottleneck) and
    every later read of the column (dhash, the vision tower, the eval) 2-3x slower. Field metadata
    is part of the table's schema, so later appends keep it."""
    fields = [f.with_metadata({**(f.metadata or {}), **NO_COMPRESSION})
              if pa.types.is_large_binary(f.type) or pa.types.is_binary(f.type) else f for f in table.schema]
    return table.cast(pa.schema(fields, metadata=table.schema.metadata))


def _normalise(batch: pa.RecordBatch) -> pa.RecordBatch:
    cols, names = [], []
    for name, col in zip(batch.schema.names, batch.columns):
        if pa.types.is_struct(col.type) and col.type.get_field_index("bytes") >= 0:
            col = pc.struct_field(col, "bytes")
        if pa.types.is_binary(col.type):
            col = col.cast(pa.large_binary())
        cols.append(col)
        names.append(name)
    return pa.RecordBatch.from_arrays(cols, names=names)


def iter_source(source: SourceSpec, start: int = 0, workers: int = 1) -> Iterator[pa.RecordBatch]:
    """Source rows as Arrow batches (bounded memory). `start` skips rows known to be present.
    `workers` > 1 makes or reads batches on a pool (`parallel.py`); the batches, and their order,
    are the same for any `workers`."""
    ing = source.ingest
    if ing.kind == "synthetic":
        yield from synthetic_batches(ing.rows - start, ing.seed, ing.image_px, start=start, workers=workers)
        return
    if ing.kind == "parquet":
        files = _parquet_files(ing.path)
        if not files:
            raise ApplyError(Problem(f"no Parquet files at `{ing.path}`", "source.ingest.path",
                                     fix="Point `path` at a file, a directory or a glob"))
        batches = _parquet_batches(files, ing.columns, workers)
    elif ing.kind == "lance":
        ds = lance.dataset(ing.uri, version=ing.version)
        batches = ds.to_batches(columns=ing.columns, batch_size=1024)
    elif ing.kind == "huggingface":
        batches = _hf_batches(ing, workers)
    else:  # pragma: no cover - the spec model admits no other kind
        raise AssertionError(ing.kind)
    yield from _limit(batches, ing.limit)


def _parquet_batches(files: list[str], columns: list[str] | None, workers: int) -> Iterator[pa.RecordBatch]:
    """Row group by row group, file by file (decoding one is a GIL-free Arrow read: threads), each
    cast to the first file's schema, as one Arrow dataset over the files would give them."""
    import pyarrow.dataset as pads
    import pyarrow.parquet as pq

    schema = pads.dataset(files, format="parquet").schema
    if columns:
        schema = pa.schema([schema.field(c) for c in columns])
    groups = [(f, i, schema) for f in files for i in range(pq.ParquetFile(f).metadata.num_row_groups)]
    return threaded_parts(_row_group, groups, workers)


def _row_group(path: str, i: int, schema: pa.Schema) -> list[pa.RecordBatch]:
    import pyarrow.parquet as pq

    f = pq.ParquetFile(path)
    have = set(f.schema_arrow.names)
    t = f.read_row_group(i, columns=[n for n in schema.names if n in have])
    cols = [t.column(fl.name).cast(fl.type) if fl.name in have else pa.nulls(t.num_rows, fl.type) for fl in schema]
    t = pa.Table.from_arrays(cols, schema=schema)
    return [_normalise(b) for b in t.to_batches(max_chunksize=1024)]


def _hf_batches(ing, workers: int = 1) -> Iterator[pa.RecordBatch]:
    """A dataset id through `datasets` streaming, or a `save_to_disk` directory (same layout)."""
    import datasets

    if _hf_local(ing.dataset):
        ds = _hf_from_disk(ing)
        if ds._indices is None:  # memory-mapped Arrow, no index mapping: slice it directly
            table = ds.data.table
            spans = [(table, a, SPAN_ROWS, ing.columns) for a in range(0, table.num_rows, SPAN_ROWS)]
            yield from threaded_parts(_hf_span, spans, workers)
            return
        for tbl in ds.with_format("arrow").iter(batch_size=1024):
            yield from tbl.select(ing.columns).to_batches() if ing.columns else tbl.to_batches()
        return
    from ..hub import hub_unreachable

    reason = hub_unreachable()  # datasets would retry for ~30 s, then raise a bare ConnectionError
    if reason is not None:
        raise _hub_problem(ing, f"the Hugging Face hub cannot be reached: {reason}")
    try:
        stream = datasets.load_dataset(ing.dataset, split=ing.split, revision=ing.revision, streaming=True)
        stream = stream.with_format("arrow")
        for tbl in stream.iter(batch_size=1024):
            yield from tbl.select(ing.columns).to_batches() if ing.columns else tbl.to_batches()
    except (ConnectionError, OSError, ValueError, datasets.exceptions.DatasetNotFoundError) as e:
        # Rows committed before a broken stream are kept; the next apply appends the rest.
        raise _hub_problem(ing, f"streaming it failed: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from e


def _hf_span(table: pa.Table, start: int, rows: int, columns: list[str] | None) -> list[pa.RecordBatch]:
    """Rows [start, start+rows) of a saved dataset, normalised (a zero-copy slice of mapped files)."""
    tbl = table.slice(start, rows)
    return [_normalise(b) for b in (tbl.select(columns) if columns else tbl).to_batches()]


_LOCAL_PREFIXES = ("/", "./", "../", "~")


def _hf_local(dataset: str) -> bool:
    """A `save_to_disk` folder rather than a hub id (a written path must exist: never a hub id then)."""
    if Path(dataset).expanduser().is_dir():
        return True
    if dataset.startswith(_LOCAL_PREFIXES):
        raise ApplyError(Problem(f"`{dataset}` is not a folder", "source.ingest.dataset",
                                 fix="Point `dataset` at a folder written by `Dataset.save_to_disk`, or at a hub id "
                                     "such as `lance-format/textvqa-lance`"))
    return False


def _hf_from_disk(ing):
    import datasets

    dd = datasets.load_from_disk(str(Path(ing.dataset).expanduser()))
    if isinstance(dd, datasets.DatasetDict):
        if ing.split not in dd:
            raise ApplyError(Problem(f"the saved dataset `{ing.dataset}` has no split `{ing.split}`",
                                     "source.ingest.split", fix=f"Splits: {', '.join(f'`{k}`' for k in dd)}"))
        return dd[ing.split]
    return dd


def _hub_problem(ing, why: str) -> ApplyError:
    return ApplyError(Problem(
        f"cannot stream the dataset `{ing.dataset}` from the hub: {why}", "source.ingest.dataset",
        fix=f"Ingest a local copy: where the hub is reachable, save it with `datasets.load_dataset("
            f"'{ing.dataset}', split='{ing.split}').save_to_disk('DIR')` (or `.to_parquet('DIR/train.parquet')`), "
            "copy DIR here and set `ingest: {from: huggingface, dataset: DIR}` (or `{from: parquet, path: DIR}`)"))


def _limit(batches, limit: int | None) -> Iterator[pa.RecordBatch]:
    seen = 0
    for b in batches:
        if limit is not None and seen + b.num_rows > limit:
            b = b.slice(0, limit - seen)
        if b.num_rows:
            yield b
        seen += b.num_rows
        if limit is not None and seen >= limit:
            return


def existing_keys(uri: str, key: str) -> pa.Array | None:
    ds = lance_io.open_dataset(uri)
    if ds is None:
        return None
    if key not in ds.schema.names:
        raise ApplyError(Problem(f"the table has no key column `{key}`", "source.key",
                                 fix="Set `source.key` to a column that identifies a source row"))
    return ds.to_table(columns=[key]).column(key).combine_chunks()


def ingest(source: SourceSpec, reporter=None, total: int | None = None, workers: int | None = None) -> IngestRun:
    """Append source rows whose key is not in the table yet, committing every COMMIT_ROWS rows.

    `workers` (default: every core, capped) make or read source batches on a pool; one writer
    thread commits behind them, one commit in flight and in order, so a kill keeps every commit
    before the one in flight, and the rows and fragments are the same for any `workers`."""
    t0 = time.perf_counter()
    run = IngestRun()
    uri, key = source.table, source.key
    workers = ingest_workers(workers)
    have = existing_keys(uri, key)
    start = 0
    if source.ingest.kind == "synthetic" and have is not None:
        start = len(have)  # synthetic rows are a pure function of their index: skip the known prefix
    if reporter:
        reporter.start("ingest", max((total or 0) - (len(have) if have is not None else 0), 0))
    pending: list[pa.RecordBatch] = []
    pending_rows = 0
    target = [lance_io.open_dataset(uri).schema if have is not None else None]

    def write(batches: list[pa.RecordBatch]) -> None:
        table = pa.Table.from_batches(batches)
        if target[0] is not None:
            # Append only the raw columns; derived columns read as null in new fragments.
            table = table.select([n for n in table.schema.names if n in target[0].names])
        mode = "append" if lance_io.open_dataset(uri) is not None else "create"
        if mode == "create":
            table = uncompressed_media(table)  # appends follow the table's own field encodings
        target[0] = lance.write_dataset(table, uri, mode=mode, max_rows_per_file=source.rows_per_fragment).schema

    # The writer encodes and commits one group while the next is read or made (Lance releases the
    # GIL); waiting on the previous write before queueing the next keeps commits in source order.
    writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="vlmspec-ingest-writer")
    in_flight = None
    try:
        for batch in iter_source(source, start, workers):
            batch = _normalise(batch)
            if key not in batch.schema.names:
                raise ApplyError(Problem(f"the source has no key column `{key}`", "source.key",
                                         fix=f"Set `source.key` to one of: {', '.join(batch.schema.names)}"))
            if have is not None and len(have):
                keep = pc.invert(pc.is_in(batch.column(key), value_set=have))
                n_before = batch.num_rows
                batch = batch.filter(keep)
                run.skipped += n_before - batch.num_rows
            if not batch.num_rows:
                continue
            pending.append(batch)
            pending_rows += batch.num_rows
            run.rows += batch.num_rows
            if reporter:
                reporter.advance("ingest", batch.num_rows)
            if pending_rows >= max(COMMIT_ROWS, source.rows_per_fragment):
                if in_flight is not None:
                    in_flight.result()
                in_flight = writer.submit(write, pending)
                pending, pending_rows = [], 0
        if in_flight is not None:
            in_flight.result()
            in_flight = None
        if pending:
            write(pending)
    finally:
        writer.shutdown(wait=True)  # a failure never leaves a write running behind the caller
    if reporter:
        reporter.finish("ingest")
    run.seconds = time.perf_counter() - t0
    return run
