"""What the table already holds, as plain values: the compiler's only view of the world.

The runtime builds a `TableState` from Lance metadata (schema, field metadata, fragment
manifests) and the run-history sidecar; the compiler never opens a table itself.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

# Field-metadata keys vlmspec writes on derived columns.
FINGERPRINT = "vlmspec.fingerprint"  # written when, and only when, the column is complete
TARGET = "vlmspec.target"  # fingerprint a backfill in progress is filling towards
RECIPE = "vlmspec.recipe"  # JSON of what the fingerprint covers, so diffs can say why

# A recompute fills `<name>__vlmspec_next` while `<name>` keeps its old, complete values; one
# metadata commit swaps them when the new ones are complete (the old field is renamed
# `<name>__vlmspec_old`, then dropped). A failed or killed recompute so never loses the old column.
SHADOW_SUFFIX = "__vlmspec_next"
RETIRED_SUFFIX = "__vlmspec_old"
RESERVED = "__vlmspec_"
"""No declared column may contain it: names with it belong to the recompute protocol."""


def shadow_name(name: str) -> str:
    return name + SHADOW_SUFFIX


def retired_name(name: str) -> str:
    return name + RETIRED_SUFFIX


def is_internal(name: str) -> bool:
    """A field of the recompute protocol (a shadow being filled, or a retired column)."""
    return RESERVED in name


@dataclass(frozen=True)
class ColumnState:
    """One column as stored: canonical Arrow type, field metadata, rows that hold data."""

    name: str
    type: str
    metadata: Mapping[str, str] = field(default_factory=dict)
    filled_rows: int = 0

    @property
    def fingerprint(self) -> str | None:
        return self.metadata.get(FINGERPRINT)

    @property
    def target(self) -> str | None:
        return self.metadata.get(TARGET)

    @property
    def is_derived(self) -> bool:
        return FINGERPRINT in self.metadata or TARGET in self.metadata


@dataclass(frozen=True)
class StepRecord:
    """The last completed curate/split/train/eval (or ingest) step, as recorded by apply."""

    fingerprint: str
    table_version: int = 0
    rows: int = 0
    detail: Mapping[str, Any] = field(default_factory=dict)
    missing: tuple[str, ...] = ()
    """Outputs the record names that are gone or no longer match it (an adapter, a report): the
    runtime checks them, the plan reruns the step."""


@dataclass(frozen=True)
class TableState:
    """A snapshot of the table and its sidecar; `exists=False` for a table not yet created."""

    uri: str
    exists: bool = False
    version: int | None = None
    rows: int = 0
    columns: tuple[ColumnState, ...] = ()
    steps: Mapping[str, StepRecord] = field(default_factory=dict)
    throughput: Mapping[str, float] = field(default_factory=dict)
    """Rows/s an earlier run measured, keyed by UDF name (for estimates)."""
    source_rows: int | None = None
    """Rows the ingest source holds, where that is known cheaply (None: unknown)."""
    source_schema: Mapping[str, str] | None = None
    """Column name -> canonical type of the ingest source, where known before ingest."""
    error_rows: Mapping[str, frozenset[int]] = field(default_factory=dict)
    """Column -> row addresses a UDF failed on under `on_error: null` (current values only)."""

    def column(self, name: str) -> ColumnState | None:
        return next((c for c in self.columns if c.name == name), None)

    @property
    def names(self) -> list[str]:
        return [c.name for c in self.columns]
