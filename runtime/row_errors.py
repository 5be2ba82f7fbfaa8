"""Row errors recorded under `on_error: null`: the sidecar's `errors.jsonl`, read back as the errors
of the values the table holds now.

The log is append-only: it keeps errors of values since recomputed (a fixed UDF, new params) and
logs a fragment's rows again when a killed run recomputed it. Only errors recorded under a column's
current fingerprint (or the one a shadow is being filled towards) count, each row once.
"""

from __future__ import annotations

import json
from typing import Any

from vlmspec.compiler.state import FINGERPRINT, SHADOW_SUFFIX, TARGET

from . import lance_io

__all__ = ["current_errors", "errors_path"]


def errors_path(table: str):
    return lance_io.sidecar_dir(table) / "errors.jsonl"


def _fingerprints(table: str) -> dict[str, set[str]]:
    """Column -> the fingerprints its values (or its shadow's) were computed under."""
    ds = lance_io.open_dataset(table)
    out: dict[str, set[str]] = {}
    for f in ds.schema if ds is not None else []:
        md = lance_io.decode_metadata(f.metadata)
        name = f.name.removesuffix(SHADOW_SUFFIX)
        out.setdefault(name, set()).update({md.get(FINGERPRINT), md.get(TARGET)} - {None})
    return out


def current_errors(table: str, columns: set[str] | None = None) -> list[dict[str, Any]]:
    """The recorded row errors of the values `table` holds now (optionally of some columns only)."""
    path = errors_path(table)
    if not path.exists():
        return []
    current = _fingerprints(table)
    rows, seen = [], set()
    for line in path.read_text().splitlines():
        try:
            r = json.loads(line)
        except ValueError:
            continue
        ident = (r["column"], r.get("fingerprint"), r["row_addr"])
        if (columns is None or r["column"] in columns) and r.get("fingerprint") in current.get(r["column"], ()) \
                and ident not in seen:
            seen.add(ident)
            rows.append(r)
    return rows
