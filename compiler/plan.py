"""Diff a compiled spec against the table's state and produce a frozen `Plan`.

The plan is a list of inert steps that the renderer prints and the runtime executes: ingest,
one step per declared column (new / recompute / resume / up to date), drops of columns the spec
no longer declares (destructive: blocked unless allowed), then curate, split, train and eval.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal, Mapping

from .compile import Compiled, ColumnNode, StageNode
from .errors import CompileError, Problem
from .state import RECIPE, ColumnState, TableState
from .types import TypeSyntaxError, parse_type

Kind = Literal["new", "recompute", "resume", "up_to_date", "drop", "run", "append"]
SYMBOL = {"new": "+", "recompute": "~", "resume": ">", "up_to_date": "=", "drop": "-", "run": "~", "append": ">"}


@dataclass(frozen=True)
class ColumnStep:
    name: str
    tier: str
    kind: Kind
    reason: str
    rows: int = 0
    """Rows this step computes."""
    type: str = ""
    bytes: int = 0
    """Bytes the computed rows will occupy (from the type; variable types are estimated)."""
    est_seconds: float | None = None
    """From a throughput an earlier run measured; None when unknown."""
    fingerprint: str = ""
    udf: str = ""
    gpus: float = 0
    shape: str = ""
    destructive: bool = False
    blocked: bool = False
    placement: str = ""
    """Where the step's chunks run: `in-process`, `processes x4`, `cpu tasks x8`, `gpu actors x2 (1 GPU each)`."""


@dataclass(frozen=True)
class StageStep:
    name: str
    kind: Kind
    reason: str
    rows: int = 0
    fingerprint: str = ""
    label: str = ""


@dataclass(frozen=True)
class Plan:
    spec_file: str
    spec_hash: str
    table: str
    table_exists: bool
    version: int | None
    rows: int
    expected_rows: int
    ingest: StageStep | None
    columns: tuple[ColumnStep, ...]
    stages: tuple[StageStep, ...]
    warnings: tuple[str, ...] = ()
    executor: Mapping[str, Any] = field(default_factory=dict)

    @property
    def is_empty(self) -> bool:
        """True when applying would do nothing."""
        todo = [s for s in self.columns if s.kind != "up_to_date"]
        todo += [s for s in self.stages if s.kind != "up_to_date"]
        if self.ingest is not None and self.ingest.kind != "up_to_date":
            todo.append(self.ingest)
        return not todo

    @property
    def blocked(self) -> tuple[ColumnStep, ...]:
        return tuple(s for s in self.columns if s.blocked)

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for s in self.columns:
            out[s.kind] = out.get(s.kind, 0) + 1
        out["downstream"] = sum(1 for s in self.stages if s.kind != "up_to_date")
        return out


def _recipe_reason(old: Mapping[str, Any] | None, new: Mapping[str, Any], upstream: Mapping[str, str]) -> str:
    """Why a fingerprint moved, from the stored and the compiled recipe."""
    if not old:
        return "fingerprint changed"
    if old.get("udf") != new.get("udf"):
        return f"udf changed `{old.get('udf')}` -> `{new.get('udf')}`"
    if old.get("code") != new.get("code"):
        return "udf source changed"
    if old.get("params") != new.get("params"):
        op, np_ = old.get("params") or {}, new.get("params") or {}
        diffs = [f"{k} {op.get(k)!r}->{np_.get(k)!r}" for k in sorted(set(op) | set(np_)) if op.get(k) != np_.get(k)]
        return "params changed: " + ", ".join(diffs)
    if old.get("model") != new.get("model"):
        om, nm = old.get("model") or {}, new.get("model") or {}
        keys = [k for k in sorted(set(om) | set(nm)) if om.get(k) != nm.get(k)]
        return "model changed: " + ", ".join(keys)
    oi = [i.get("column") for i in old.get("inputs", [])]
    ni = [i.get("column") for i in new.get("inputs", [])]
    if oi != ni:
        return "inputs changed: " + ", ".join(f"`{c}`" for c in ni)
    for o, n in zip(old.get("inputs", []), new.get("inputs", [])):
        if o.get("fp") != n.get("fp"):
            return f"upstream `{n['column']}` changed"
    if old.get("output") != new.get("output"):
        return "output type changed"
    if old.get("engine") != new.get("engine"):
        return "vlmspec engine version changed"
    return "fingerprint changed"


def _stored_recipe(col: ColumnState) -> Mapping[str, Any] | None:
    import json

    raw = col.metadata.get(RECIPE)
    try:
        return json.loads(raw) if raw else None
    except ValueError:
        return None


def _row_bytes(type_str: str) -> int:
    try:
        return parse_type(type_str).row_bytes()
    except TypeSyntaxError:
        return 8


def _column_step(node: ColumnNode, col: ColumnState | None, expected: int, state: TableState,
                 changed: Mapping[str, str]) -> ColumnStep:
    def step(kind: Kind, reason: str, rows: int) -> ColumnStep:
        tput = state.throughput.get(node.udf)
        est = rows / tput if tput and rows else None
        return ColumnStep(node.name, node.tier, kind, reason, rows, node.output, rows * _row_bytes(node.output),
                          est, node.fingerprint, node.udf, node.gpus, node.shape)

    if col is None:
        return step("new", "new", expected)
    if not col.is_derived:
        s = step("recompute", "column exists but was not made by vlmspec", expected)
        return ColumnStep(**{**s.__dict__, "destructive": True})
    current = col.fingerprint or col.target
    if current != node.fingerprint:
        # A derived column is reproducible from its recipe, so a new type (e.g. image_px changed the
        # hidden-state size) is an ordinary recompute, not a destructive change.
        return step("recompute", _recipe_reason(_stored_recipe(col), node.recipe, changed), expected)
    missing = max(expected - col.filled_rows, 0)
    if col.fingerprint is None or missing:
        why = "interrupted run" if col.fingerprint is None else "rows appended"
        return step("resume", f"resume: {missing:,} rows missing ({why})", missing)
    return step("up_to_date", "up to date", 0)


def _stage_step(node: StageNode, state: TableState, expected: int) -> StageStep:
    rec = state.steps.get(node.name)
    if rec is None:
        return StageStep(node.name, "run", "never run", expected, node.fingerprint)
    if rec.fingerprint == node.fingerprint:
        return StageStep(node.name, "up_to_date", "up to date", 0, node.fingerprint)
    old = (rec.detail or {}).get("recipe") or {}
    new = node.recipe
    moved = [k for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]
    names = {"inputs": "inputs changed", "rows": "table rows changed", "curate": "slice changed",
             "split": "split changed", "train": "adapter changed", "model": "model changed"}
    reasons = [names.get(k, f"`{k}` changed") for k in moved] or ["fingerprint changed"]
    return StageStep(node.name, "run", ", ".join(dict.fromkeys(reasons)), expected, node.fingerprint)


def _ingest_step(compiled: Compiled, state: TableState) -> tuple[StageStep | None, int]:
    spec = compiled.spec
    node = compiled.stage("ingest")
    src = state.source_rows
    if not state.exists:
        if node is None:
            return None, 0
        rows = src or 0
        return StageStep("ingest", "new", "new table", rows, node.fingerprint, spec.source.ingest.kind), rows
    if node is None:
        return None, state.rows
    if src is not None and src > state.rows:
        return (StageStep("ingest", "append", f"append {src - state.rows:,} new source rows", src - state.rows,
                          node.fingerprint, spec.source.ingest.kind), src)
    rec = state.steps.get("ingest")
    if rec is not None and rec.fingerprint != node.fingerprint:
        return (StageStep("ingest", "run", f"source changed; rows with a new `{spec.source.key}` are appended",
                          0, node.fingerprint, spec.source.ingest.kind), state.rows)
    return StageStep("ingest", "up_to_date", "up to date", 0, node.fingerprint, spec.source.ingest.kind), state.rows


def _executor(compiled: Compiled, facts: Mapping[str, Any] | None) -> dict[str, Any]:
    """The spec's executor plus what the runtime found out (`cpus`, `gpus`: cluster or machine totals),
    passed in as data. Without facts (goldens, unit tests) the plan says only what the spec says."""
    spec = compiled.spec.executor
    ex = {"kind": spec.kind, "address": spec.address, "workers": spec.workers, **(facts or {})}
    if ex["kind"] == "ray":
        ex["address"] = ex.get("address") or "local"
    return ex


def _placement(node: ColumnNode, ex: Mapping[str, Any]) -> str:
    """Where a column's chunks run under the executor (the runtime's rules, ray_exec.RayExecutor and
    backfill.backfill_column)."""
    workers, cpus, gpus = ex.get("workers"), ex.get("cpus"), ex.get("gpus")
    if ex["kind"] == "ray":
        if node.gpus:
            n = max(int(gpus // node.gpus), 1) if gpus else None
            n = min(n, workers) if n and workers else n
            return f"gpu actors{f' x{n}' if n else ''} ({node.gpus:g} GPU each)"
        if node.uses_model:
            return "cpu actor x1"
        n = max(int(cpus // node.cpus), 1) if cpus else None
        n = min(n, workers) if n and workers else (n or workers)
        return f"cpu tasks{f' x{n}' if n else ''}"
    n = workers or cpus
    if node.parallel and not node.uses_model and n != 1:
        return f"processes{f' x{n}' if n else ''}"
    return "in-process"


def _gpu_check(node: ColumnNode, ex: Mapping[str, Any], problems: list[Problem], warnings: list[str]) -> None:
    """A GPU column against the GPUs the executor has (when the runtime said how many)."""
    have = ex.get("gpus")
    if not node.gpus or have is None:
        return
    need = f"{node.gpus:g} GPU{'' if node.gpus == 1 else 's'}"
    if ex["kind"] == "ray" and have < node.gpus:
        addr = ex.get("address")
        where = "the local Ray cluster (this machine)" if addr == "local" else f"the Ray cluster at `{addr}`"
        problems.append(Problem(
            f"`{node.name}` needs {need} per worker but {where} has {'none' if not have else f'only {have:g}'}",
            f"{node.path}.resources.gpus",
            fix="Point `executor.address` at a cluster with GPU workers or use `executor: {kind: local}`"))
    elif ex["kind"] == "local" and not have:
        warnings.append(f"`{node.name}` asks for {need} but no CUDA device is visible: it runs on the CPU (slow)")


def build_plan(compiled: Compiled, state: TableState, *, allow_destructive: bool = False,
               executor: Mapping[str, Any] | None = None) -> Plan:
    """Diff compiled vs stored; every declared column, drop and step appears, in run order.

    `executor` holds runtime facts about where it would run (see `_executor`); a GPU column the Ray
    cluster cannot place is refused here, before anything runs."""
    ingest, expected = _ingest_step(compiled, state)
    ex = _executor(compiled, executor)
    steps: list[ColumnStep] = []
    changed: dict[str, str] = {}
    problems: list[Problem] = []
    warnings = list(compiled.warnings)
    for node in compiled.columns:
        s = _column_step(node, state.column(node.name) if state.exists else None, expected, state, changed)
        if s.destructive and not allow_destructive:
            s = ColumnStep(**{**s.__dict__, "blocked": True})
        if s.kind in ("new", "recompute"):
            changed[node.name] = s.kind
        if s.kind != "up_to_date":
            s = ColumnStep(**{**s.__dict__, "placement": _placement(node, ex)})
            _gpu_check(node, ex, problems, warnings)
        steps.append(s)
    if problems:
        raise CompileError(problems)
    declared = {c.name for c in compiled.columns}
    for col in state.columns if state.exists else ():
        if col.is_derived and col.name not in declared:
            steps.append(ColumnStep(col.name, "", "drop", "no longer declared", 0, col.type,
                                    destructive=True, blocked=not allow_destructive))
    stages = []
    labels = {"curate": compiled.spec.curation.name if compiled.spec.curation else "all rows"}
    for node in compiled.stages:
        if node.name == "ingest":
            continue
        s = _stage_step(node, state, expected)
        stages.append(StageStep(**{**s.__dict__, "label": labels.get(node.name, "")}))
    return Plan(compiled.file, compiled.spec_hash, compiled.spec.source.table, state.exists, state.version,
                state.rows, expected, ingest, tuple(steps), tuple(stages), tuple(warnings), ex)
