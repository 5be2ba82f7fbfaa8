"""Lance I/O: read a `TableState` from metadata only, and the column-level writes backfill needs.

`read_state` never scans data: the schema, field metadata and fragment manifests say which
fragments hold each column (a fragment without a data file for a field reads as null), so its
cost follows the number of fragments, not rows. Fingerprints live in *field* metadata (schema
metadata breaks lancedb's permutation builder; see shared/reference/stack-notes.md).
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Any, Iterable, Mapping

import lance
import pyarrow as pa

from vlmspec.compiler.state import ColumnState, StepRecord, TableState

SIDECAR_SUFFIX = ".vlmspec"


def sidecar_dir(uri: str) -> Path:
    """`data/x.lance` -> `data/x.vlmspec/`: run history, slices, row errors, locks."""
    p = Path(uri)
    name = p.name[: -len(".lance")] if p.name.endswith(".lance") else p.name
    return p.parent / f"{name}{SIDECAR_SUFFIX}"


def open_dataset(uri: str, version: int | None = None) -> lance.LanceDataset | None:
    """The dataset, or None when nothing has been written at `uri` yet."""
    if not (Path(uri) / "_versions").exists():
        return None
    return lance.dataset(uri, version=version)


def _field_ids(field) -> set[int]:
    ids = {field.id()}
    for child in field.children():
        ids |= _field_ids(child)
    return ids


def fragment_fill(ds: lance.LanceDataset) -> dict[str, list[int]]:
    """Column name -> ids of the fragments holding a data file for it (metadata only)."""
    ids = {f.name(): _field_ids(f) for f in ds.lance_schema.fields()}
    out: dict[str, list[int]] = {name: [] for name in ids}
    for frag in ds.get_fragments():
        present: set[int] = set()
        for df in _files(frag.metadata):
            present.update(df.fields)
        for name, fids in ids.items():
            if fids & present:
                out[name].append(frag.fragment_id)
    return out


def _files(md) -> list:
    # pylance 14 renamed FragmentMetadata.data_files() to the `files` attribute.
    return md.files if hasattr(md, "files") else md.data_files()


def fragment_rows(ds: lance.LanceDataset) -> dict[int, int]:
    """Fragment id -> live rows (physical rows minus deletions), from the manifest."""
    out = {}
    for frag in ds.get_fragments():
        md = frag.metadata
        deleted = md.deletion_file.num_deleted_rows if md.deletion_file is not None else 0
        out[frag.fragment_id] = md.physical_rows - (deleted or 0)
    return out


def decode_metadata(md: Mapping[bytes, bytes] | None) -> dict[str, str]:
    return {k.decode(): v.decode() for k, v in (md or {}).items()}


def read_sidecar(uri: str) -> dict[str, Any]:
    path = sidecar_dir(uri) / "state.json"
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return {}


def write_sidecar(uri: str, data: Mapping[str, Any]) -> None:
    """Atomic replace, so a crash never leaves half a state file."""
    d = sidecar_dir(uri)
    d.mkdir(parents=True, exist_ok=True)
    tmp = d / f".state.json.{os.getpid()}"
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True))
    os.replace(tmp, d / "state.json")


def read_state(uri: str, *, source_rows: int | None = None,
               source_schema: Mapping[str, str] | None = None) -> TableState:
    """Everything `plan` needs, from metadata and the sidecar; never reads column data."""
    side = read_sidecar(uri)
    steps = {k: StepRecord(v["fingerprint"], v.get("table_version", 0), v.get("rows", 0), v.get("detail", {}))
             for k, v in side.get("steps", {}).items()}
    throughput = side.get("throughput", {})
    ds = open_dataset(uri)
    if ds is None:
        return TableState(uri=uri, exists=False, steps=steps, throughput=throughput,
                          source_rows=source_rows, source_schema=source_schema)
    frag_rows = fragment_rows(ds)
    fill = fragment_fill(ds)
    cols = []
    for f in ds.schema:
        filled = sum(frag_rows.get(i, 0) for i in fill.get(f.name, []))
        cols.append(ColumnState(f.name, str(f.type), decode_metadata(f.metadata), filled))
    return TableState(uri=uri, exists=True, version=ds.version, rows=sum(frag_rows.values()),
                      columns=tuple(cols), steps=steps, throughput=throughput,
                      source_rows=source_rows, source_schema=source_schema)


def add_null_column(ds: lance.LanceDataset, name: str, type_: pa.DataType,
                    metadata: Mapping[str, str]) -> lance.LanceDataset:
    """Add an all-null column without writing data files (a metadata-only commit)."""
    ds.add_columns(pa.field(name, type_, nullable=True, metadata=dict(metadata)))
    return lance.dataset(ds.uri)


def swap_in(ds: lance.LanceDataset, name: str, shadow: str, retired: str) -> None:
    """One metadata commit: `name` becomes `retired` and `shadow` becomes `name` (no data moves)."""
    ds.alter_columns({"path": name, "name": retired}, {"path": shadow, "name": name})


def update_field_metadata(ds: lance.LanceDataset, name: str, changes: Mapping[str, str | None]) -> None:
    """Merge keys into a field's metadata; a None value deletes the key."""
    ds.update_field_metadata({name: dict(changes)})


def write_column_data(uri: str, name: str, values: pa.Array | pa.ChunkedArray | pa.RecordBatchReader,
                      data_storage_version: str):
    """Write one column's values for one fragment as a standalone data file (not yet committed);
    a `RecordBatchReader` of that one column is written as its batches arrive."""
    data = values if isinstance(values, pa.RecordBatchReader) else pa.table({name: values})
    frags = lance.fragment.write_fragments(data, uri,
                                           data_storage_version=data_storage_version)
    files = _files(frags[0])
    if len(frags) != 1 or len(files) != 1:
        raise RuntimeError(f"expected one data file for `{name}`, got {len(frags)} fragments")
    return files[0]


def commit_column_data(uri: str, read_version: int, groups: Iterable[tuple[int, Any]]) -> lance.LanceDataset:
    """Attach written data files to their fragments in one commit (one checkpoint)."""
    op = lance.LanceOperation.DataReplacement(
        [lance.LanceOperation.DataReplacementGroup(frag_id, datafile) for frag_id, datafile in groups])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return lance.LanceDataset.commit(uri, op, read_version=read_version)
