"""Diff a compiled spec against the table's state and produce a frozen `Plan` of typed steps.

The plan is a list of inert steps, one class per action, in the order `apply` runs them:
`Ingest`, `Drop` (a column the spec no longer declares: destructive, blocked unless allowed),
`Backfill` (one per declared column: new / recompute / resume / up to date), `BuildSlice`
(curation, and the held-out `Split` computed in the same pass), `Train`, `Evaluate`. Each step
names the steps it comes after, so `select` can cut the plan to what `--target` / `--until` need,
and carries everything the runtime must obey (the column's node, its action, its placement): the
runtime executes steps, it never re-decides them. The renderer walks the same steps.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field, replace
from typing import Any, ClassVar, Literal, Mapping, Union

from .compile import ColumnNode, Compiled, StageNode
from .errors import CompileError, Problem, did_you_mean
from .memory import StepChoice, choose
from .state import RECIPE, ColumnState, TableState, is_internal, shadow_name
from .types import TypeSyntaxError, parse_type

Kind = Literal["new", "recompute", "resume", "up_to_date", "drop", "run", "append"]
SYMBOL = {"new": "+", "recompute": "~", "resume": ">", "up_to_date": "=", "drop": "-", "run": "~", "append": ">"}
UNTIL = ("ingest", "features", "curate", "train", "eval")
"""The stages `--until` can stop after, in run order; every step belongs to one."""


@dataclass(frozen=True)
class Placement:
    """Where a column's chunks run: data the executor obeys and the plan prints."""

    where: Literal["in-process", "processes", "cpu tasks", "cpu actor", "gpu actors", "geneva"]
    workers: int | None = None
    """How many run at once (None: as many as the executor finds)."""
    gpus_each: float = 0

    def __str__(self) -> str:
        n = f" x{self.workers}" if self.workers else ""
        if self.where == "gpu actors":
            return f"gpu actors{n} ({self.gpus_each:g} GPU each)"
        if self.where == "cpu actor":
            return "cpu actor x1"
        if self.where == "geneva":  # Geneva appliers (Ray actors) of one backfill job
            return f"geneva{n}" + (f" ({self.gpus_each:g} GPU each)" if self.gpus_each else "")
        return "in-process" if self.where == "in-process" else f"{self.where}{n}"


@dataclass(frozen=True)
class Step:
    """What every step has. `kind` is what the plan shows and the runtime does (`up_to_date`: skip)."""

    name: str
    kind: Kind
    reason: str
    rows: int = 0
    """Rows this step computes (or reads, for curate/split/train/eval)."""
    fingerprint: str = ""
    after: tuple[str, ...] = ()
    """Names of the steps whose outputs this one reads: `select` keeps them with it."""
    stage: ClassVar[str] = ""

    @property
    def todo(self) -> bool:
        return self.kind != "up_to_date"


@dataclass(frozen=True)
class Ingest(Step):
    """Create the table from the source, or append the source rows with a new `source.key`."""

    label: str = ""
    """The source kind (`synthetic`, `huggingface`, ...)."""
    stage: ClassVar[str] = "ingest"


@dataclass(frozen=True)
class Backfill(Step):
    """Fill one derived column: `kind` new (add it), recompute (its fingerprint moved), resume (rows
    missing) or up_to_date."""

    tier: str = ""
    type: str = ""
    bytes: int = 0
    """Bytes the computed rows will occupy (from the type; variable types are estimated)."""
    est_seconds: float | None = None
    """From a throughput an earlier run measured; None when unknown."""
    udf: str = ""
    gpus: float = 0
    shape: str = ""
    destructive: bool = False
    blocked: bool = False
    place: Placement | None = None
    """Set for steps that run; None for up-to-date ones."""
    fills: str = ""
    """The field the step fills: the column itself, or for the recompute of a complete column its
    shadow (`<name>__vlmspec_next`), swapped in when complete (empty for up-to-date steps)."""
    node: ColumnNode | None = field(default=None, repr=False, compare=False)
    """The compiled column: what the runtime computes (not rendered)."""
    stage: ClassVar[str] = "features"

    @property
    def placement(self) -> str:
        return str(self.place) if self.place is not None else ""


@dataclass(frozen=True)
class Drop(Step):
    """Drop a derived column the spec no longer declares (metadata-only, but destructive), or a
    leftover of the recompute protocol (a stale shadow, a retired column: not destructive)."""

    tier: str = ""
    type: str = ""
    destructive: bool = True
    blocked: bool = False
    placement: str = ""
    stage: ClassVar[str] = "features"


@dataclass(frozen=True)
class Split(Step):
    """The held-out side of the slice. It is not an action of its own: `BuildSlice` computes both
    sides in one pass over the table; this records the split's own state for the plan."""

    label: str = ""
    stage: ClassVar[str] = "curate"


@dataclass(frozen=True)
class BuildSlice(Step):
    """Curate the training slice (predicate, dedup, limit) and, when the spec has a split, hold out
    the eval groups in the same pass. Runs when either side is stale."""

    label: str = ""
    """The curation's name (`all rows` without a curation section)."""
    curate_kind: Kind = "run"
    """The curation's own state, shown on its line (the step runs if the split's is stale too)."""
    curate_reason: str = ""
    split: Split | None = None
    node: StageNode | None = field(default=None, repr=False, compare=False)
    stage: ClassVar[str] = "curate"


@dataclass(frozen=True)
class Train(Step):
    """LoRA/QLoRA training from the cached columns on the slice."""

    forced: bool = False
    """`--replace train`: train from scratch, even over a saved adapter or checkpoint of the same
    fingerprint."""
    choice: StepChoice | None = None
    """How the step runs: `auto` checkpointing and compile resolved, with the peak-memory estimate."""
    node: StageNode | None = field(default=None, repr=False, compare=False)
    stage: ClassVar[str] = "train"


@dataclass(frozen=True)
class Evaluate(Step):
    """Base vs tuned on raw held-out images."""

    node: StageNode | None = field(default=None, repr=False, compare=False)
    stage: ClassVar[str] = "eval"


AnyStep = Union[Ingest, Drop, Backfill, BuildSlice, Train, Evaluate]
"""Every executable step; `apply` matches on them exhaustively."""


@dataclass(frozen=True)
class StageLine:
    """One downstream line of the plan (curate, split, train, eval), as tests and the renderer read it."""

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
    steps: tuple[AnyStep, ...]
    """In run order: ingest, drops, columns in dependency order, slice, train, eval."""
    warnings: tuple[str, ...] = ()
    executor: Mapping[str, Any] = field(default_factory=dict)
    selection: tuple[str, ...] = ()
    """How `select` cut it (`--target x`, `--until train`); empty for the whole plan."""

    @property
    def ingest(self) -> Ingest | None:
        return next((s for s in self.steps if isinstance(s, Ingest)), None)

    @property
    def columns(self) -> tuple[Backfill | Drop, ...]:
        """Declared columns in dependency order, then drops (the plan's display order)."""
        return tuple(s for s in self.steps if isinstance(s, Backfill)) + \
            tuple(s for s in self.steps if isinstance(s, Drop))

    @property
    def stages(self) -> tuple[StageLine, ...]:
        out: list[StageLine] = []
        for s in self.steps:
            if isinstance(s, BuildSlice):
                out.append(StageLine("curate", s.curate_kind, s.curate_reason, s.rows, s.fingerprint, s.label))
                if s.split is not None:
                    sp = s.split
                    out.append(StageLine(sp.name, sp.kind, sp.reason, sp.rows, sp.fingerprint, sp.label))
            elif isinstance(s, (Train, Evaluate)):
                out.append(StageLine(s.name, s.kind, s.reason, s.rows, s.fingerprint))
        return tuple(out)

    @property
    def is_empty(self) -> bool:
        """True when applying would do nothing."""
        return not any(s.todo for s in self.steps)

    @property
    def blocked(self) -> tuple[Backfill | Drop, ...]:
        return tuple(s for s in self.columns if s.blocked)

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for s in self.columns:
            out[s.kind] = out.get(s.kind, 0) + 1
        out["downstream"] = sum(1 for s in self.stages if s.kind != "up_to_date")
        return out

    def step(self, name: str) -> AnyStep | None:
        """The step called `name`; `split` is the slice step that computes it."""
        for s in self.steps:
            if s.name == name or (isinstance(s, BuildSlice) and s.split is not None and s.split.name == name):
                return s
        return None


# --- diff ----------------------------------------------------------------------------------

def _recipe_reason(old: Mapping[str, Any] | None, new: Mapping[str, Any]) -> str:
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


def diff_column(node: ColumnNode, col: ColumnState | None, expected: int, state: TableState,
                after: tuple[str, ...] = ()) -> Backfill:
    """One declared column against what the table holds: the one place that decides new, recompute,
    resume or up to date, and which field the work fills."""
    def step(kind: Kind, reason: str, rows: int, destructive: bool = False, into: str = node.name) -> Backfill:
        tput = state.throughput.get(node.udf)
        est = rows / tput if tput and rows else None
        return Backfill(node.name, kind, reason, rows, node.fingerprint, after, node.tier, node.output,
                        rows * _row_bytes(node.output), est, node.udf, node.gpus, node.shape,
                        destructive=destructive, fills=into if kind != "up_to_date" else "", node=node)

    if col is None:
        return step("new", "new", expected)
    if not col.is_derived:
        return step("recompute", "column exists but was not made by vlmspec", expected, destructive=True,
                    into=shadow_name(node.name))
    current = col.fingerprint or col.target
    if current != node.fingerprint:
        # A derived column is reproducible from its recipe, so a new type (e.g. image_px changed the
        # hidden-state size) is an ordinary recompute, not a destructive change.
        reason = _recipe_reason(_stored_recipe(col), node.recipe)
        if col.fingerprint is None:  # the old values were never complete: nothing to keep, refill in place
            return step("recompute", reason, expected)
        shadow = state.column(shadow_name(node.name))
        if shadow is not None and node.fingerprint in (shadow.target, shadow.fingerprint):
            missing = max(expected - shadow.filled_rows, 0)
            return step("recompute", f"{reason}; resume: {missing:,} rows missing (interrupted recompute)",
                        missing, into=shadow.name)
        return step("recompute", reason, expected, into=shadow_name(node.name))
    missing = max(expected - col.filled_rows, 0)
    if col.fingerprint is None or missing:
        why = "interrupted run" if col.fingerprint is None else "rows appended"
        return step("resume", f"resume: {missing:,} rows missing ({why})", missing)
    return step("up_to_date", "up to date", 0)


def _leftovers(compiled: Compiled, state: TableState, backfills: list[Backfill], after: tuple[str, ...]) -> list[Drop]:
    """Fields of the recompute protocol no step needs: a retired column left by a kill between the
    swap and its drop, or a shadow whose recompute was abandoned (the spec was reverted)."""
    filling = {b.fills for b in backfills if b.fills}
    return [Drop(col.name, "drop", "leftover of a recompute", 0, after=after, type=col.type, destructive=False)
            for col in (state.columns if state.exists else ()) if is_internal(col.name) and col.name not in filling]


_STAGE_REASONS = {"leaves_out": "columns with row errors changed", "inputs": "inputs changed", "rows": "table rows changed", "curate": "slice changed",
                  "split": "split changed", "train": "adapter changed", "model": "model changed"}


def _stage_state(node: StageNode, state: TableState) -> tuple[Kind, str]:
    """(kind, reason) of a downstream stage against its last recorded run."""
    rec = state.steps.get(node.name)
    if rec is None:
        return "run", "never run"
    if rec.fingerprint == node.fingerprint:
        if rec.missing:
            return "run", "output missing: " + ", ".join(f"`{m}`" for m in rec.missing)
        return "up_to_date", "up to date"
    old = (rec.detail or {}).get("recipe") or {}
    new = node.recipe
    moved = [k for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]
    reasons = [_STAGE_REASONS.get(k, f"`{k}` changed") for k in moved] or ["fingerprint changed"]
    return "run", ", ".join(dict.fromkeys(reasons))


def _ingest_step(compiled: Compiled, state: TableState) -> tuple[Ingest | None, int]:
    """The ingest step (None without `source.ingest`) and the rows the table will hold after it."""
    spec = compiled.spec
    node = compiled.stage("ingest")
    src = state.source_rows
    if node is None:
        return None, state.rows if state.exists else 0
    label = spec.source.ingest.kind
    if not state.exists:
        rows = src or 0
        return Ingest("ingest", "new", "new table", rows, node.fingerprint, label=label), rows
    if src is not None and src > state.rows:
        return (Ingest("ingest", "append", f"append {src - state.rows:,} new source rows", src - state.rows,
                       node.fingerprint, label=label), src)
    rec = state.steps.get("ingest")
    if rec is not None and rec.fingerprint != node.fingerprint:
        return (Ingest("ingest", "run", f"source changed; rows with a new `{spec.source.key}` are appended",
                       0, node.fingerprint, label=label), state.rows)
    return Ingest("ingest", "up_to_date", "up to date", 0, node.fingerprint, label=label), state.rows


def _executor(compiled: Compiled, facts: Mapping[str, Any] | None) -> dict[str, Any]:
    """The spec's executor plus what the runtime found out (`cpus`, `gpus`: cluster or machine totals;
    `workers` from `--workers`), passed in as data. Without facts (goldens, unit tests) the plan says
    only what the spec says."""
    spec = compiled.spec.executor
    ex = {"kind": spec.kind, "address": spec.address, "workers": spec.workers, **(facts or {})}
    if ex["kind"] in ("ray", "geneva"):
        ex["address"] = ex.get("address") or "local"
    return ex


def geneva_appliers(cpus: float, cpus_each: float, own: float = 0.5) -> int:
    """How many appliers of `cpus_each` fit beside Geneva's own actors on `cpus` (at least one).
    Those hold ~0.5 CPU in a job (driver and tracker 0.1 each, 0.1 per fragment writer, up to three
    seen): on 2 CPUs a second 1-CPU applier would wait for the whole job."""
    return max(int((cpus - own) // cpus_each), 1)


def placement(node: ColumnNode, ex: Mapping[str, Any]) -> Placement:
    """Where a column's chunks run under the executor: the one statement of the rule (the runtime
    obeys the result)."""
    workers, cpus, gpus = ex.get("workers"), ex.get("cpus"), ex.get("gpus")
    if ex["kind"] == "ray":
        if node.gpus:
            n = max(int(gpus // node.gpus), 1) if gpus else None
            n = min(n, workers) if n and workers else n
            return Placement("gpu actors", n, node.gpus)
        if node.uses_model:
            return Placement("cpu actor", 1)
        n = max(int(cpus // node.cpus), 1) if cpus else None
        n = min(n, workers) if n and workers else (n or workers)
        return Placement("cpu tasks", n)
    if ex["kind"] == "geneva":  # one Geneva job per column; its appliers hold the UDF (a model once each)
        room = geneva_appliers(cpus, node.cpus) if cpus else None
        if node.gpus:
            n = max(int(gpus // node.gpus), 1) if gpus else None
            n = min(n, room) if n and room else n
            n = min(n, workers) if n and workers else n
            return Placement("geneva", n, node.gpus)
        if node.uses_model:
            return Placement("geneva", 1)
        return Placement("geneva", min(room, workers) if room and workers else (room or workers))
    n = workers or cpus
    if node.parallel and not node.uses_model and n != 1:
        return Placement("processes", n)
    return Placement("in-process")


def _gpu_check(node: ColumnNode, ex: Mapping[str, Any], problems: list[Problem], warnings: list[str]) -> None:
    """A GPU column against the GPUs the executor has (when the runtime said how many)."""
    have = ex.get("gpus")
    if not node.gpus or have is None:
        return
    need = f"{node.gpus:g} GPU{'' if node.gpus == 1 else 's'}"
    if ex["kind"] in ("ray", "geneva") and have < node.gpus:
        addr = ex.get("address")
        where = "the local Ray cluster (this machine)" if addr == "local" else f"the Ray cluster at `{addr}`"
        problems.append(Problem(
            f"`{node.name}` needs {need} per worker but {where} has {'none' if not have else f'only {have:g}'}",
            f"{node.path}.resources.gpus",
            fix="Point `executor.address` at a cluster with GPU workers or use `executor: {kind: local}`"))
    elif ex["kind"] == "local" and not have:
        warnings.append(f"`{node.name}` asks for {need} but no CUDA device is visible: it runs on the CPU (slow)")


def _derived(names: tuple[str, ...], compiled: Compiled) -> tuple[str, ...]:
    """The columns among `names` that are steps of this plan (raw columns are not)."""
    return tuple(n for n in names if compiled.column(n) is not None)


def _train_choice(compiled: Compiled, ex: Mapping[str, Any]) -> StepChoice:
    """`train`'s `auto` settings resolved against the device the runtime found (`cuda`, `gpu_free`)."""
    spec = compiled.spec
    tr = spec.train
    tokens = compiled.column(tr.tokens)
    seq = int(m.group(1)) if tokens is not None and (m := re.search(r"\[(\d+)\]", tokens.output)) else 512
    per_device = max(1, tr.optim.batch_size // max(1, tr.devices))
    shape = compiled.facts.text if compiled.facts is not None else None
    return choose(tr, shape, seq, per_device, cuda=ex.get("cuda"), free=ex.get("gpu_free"))


def _downstream(compiled: Compiled, state: TableState, expected: int, ingest: tuple[str, ...],
                ex: Mapping[str, Any]) -> list[AnyStep]:
    """BuildSlice (with its Split), Train and Evaluate, each after what it reads."""
    out: list[AnyStep] = []
    cur, sp = compiled.stage("curate"), compiled.stage("split")
    if cur is not None or sp is not None:
        label = compiled.spec.curation.name if compiled.spec.curation else "all rows"
        ckind, creason = _stage_state(cur, state) if cur is not None else ("up_to_date", "")
        split = None
        reads = (cur.reads if cur else ()) + (sp.reads if sp else ())
        if sp is not None:
            skind, sreason = _stage_state(sp, state)
            split = Split("split", skind, sreason, expected if skind != "up_to_date" else 0, sp.fingerprint)
        kind: Kind = "run" if ckind != "up_to_date" or (split is not None and split.todo) else "up_to_date"
        tr = compiled.spec.train
        failed = set().union(*(state.error_rows.get(c, frozenset()) for c in (tr.hiddens, tr.tokens))) if tr else set()
        if failed and ckind != "up_to_date":
            creason += f"; {len(failed):,} rows with recorded row errors left out"
        after = ingest + _derived(tuple(dict.fromkeys(reads)), compiled)
        out.append(BuildSlice("curate", kind, creason, expected if ckind != "up_to_date" else 0,
                              cur.fingerprint if cur else "", after, label=label, curate_kind=ckind,
                              curate_reason=creason, split=split, node=cur))
    slice_step = ("curate",) if out else ()
    tr = compiled.stage("train")
    if tr is not None:
        kind, reason = _stage_state(tr, state)
        step_choice = _train_choice(compiled, ex)
        if kind != "up_to_date" and "cuda" in ex:  # only where the runtime said what the device is
            o = compiled.spec.train.optim
            reason += "; " + step_choice.describe(compiled.spec.train.quant.bits, compiled.spec.train.lora.r,
                                                  o.batch_size, o.grad_accum)
        out.append(Train("train", kind, reason, expected if kind != "up_to_date" else 0, tr.fingerprint,
                         ingest + slice_step + _derived(tr.reads, compiled), node=tr, choice=step_choice))
    ev = compiled.stage("eval")
    if ev is not None:
        kind, reason = _stage_state(ev, state)
        out.append(Evaluate("eval", kind, reason, expected if kind != "up_to_date" else 0, ev.fingerprint,
                            ingest + slice_step + (("train",) if tr is not None else ()), node=ev))
    return out


def build_plan(compiled: Compiled, state: TableState, *, allow_destructive: bool = False,
               executor: Mapping[str, Any] | None = None, replace_steps: tuple[str, ...] = ()) -> Plan:
    """Diff compiled vs stored; every declared column, drop and step appears, in run order.

    `executor` holds runtime facts about where it would run (see `_executor`); a GPU column the Ray
    cluster cannot place is refused here, before anything runs. `replace_steps` (`--replace NAME`)
    reruns the named columns or steps even when they are up to date."""
    ingest, expected = _ingest_step(compiled, state)
    first = ("ingest",) if ingest is not None else ()
    ex = _executor(compiled, executor)
    backfills: list[Backfill] = []
    problems: list[Problem] = []
    warnings = list(compiled.warnings)
    forced = _check_replace(compiled, replace_steps)
    for node in compiled.columns:
        col = state.column(node.name) if state.exists else None
        s = diff_column(node, col, expected, state, first + _derived(node.inputs, compiled))
        if node.name in forced and s.kind in ("up_to_date", "resume"):
            # A full recompute of a complete column fills a shadow, like any recompute: the old
            # values stay readable until the new ones are complete.
            s = replace(s, kind="recompute", reason="replaced (--replace)", rows=expected,
                        bytes=expected * _row_bytes(node.output), fills=shadow_name(node.name))
        if s.destructive and not allow_destructive:
            s = replace(s, blocked=True)
        if s.todo:
            s = replace(s, place=placement(node, ex))
            _gpu_check(node, ex, problems, warnings)
        backfills.append(s)
    if problems:
        raise CompileError(problems)
    declared = {c.name for c in compiled.columns}
    drops = [Drop(col.name, "drop", "no longer declared", 0, after=first, type=col.type,
                  blocked=not allow_destructive)
             for col in (state.columns if state.exists else ())
             if col.is_derived and col.name not in declared and not is_internal(col.name)]
    drops += _leftovers(compiled, state, backfills, first)
    downstream = [_force(s, forced, expected) for s in _downstream(compiled, state, expected, first, ex)]
    steps = ([ingest] if ingest is not None else []) + drops + backfills + downstream
    return Plan(compiled.file, compiled.spec_hash, compiled.spec.source.table, state.exists, state.version,
                state.rows, expected, tuple(steps), tuple(warnings), ex)


def _check_replace(compiled: Compiled, names: tuple[str, ...]) -> set[str]:
    """The columns and steps `--replace` names (`split` means the slice step that computes it)."""
    known = [c.name for c in compiled.columns] + [s.name for s in compiled.stages if s.name != "ingest"]
    problems = []
    for n in names:
        if n == "ingest":
            problems.append(Problem("`ingest` cannot be replaced: it appends source rows with a new `source.key`",
                                    "--replace", fix="Point `source.table` at a new table to ingest from scratch"))
        elif n not in known:
            problems.append(Problem(f"unknown step or column `{n}`", "--replace",
                                    fix=did_you_mean(n, known) or f"Replaceable: {', '.join(known)}"))
    if problems:
        raise CompileError(problems)
    return {"curate" if n == "split" else n for n in names}


def _force(s: AnyStep, forced: set[str], rows: int) -> AnyStep:
    """A downstream step `--replace` names, made to run."""
    if s.name not in forced or s.todo:
        return s
    why = "replaced (--replace)"
    if isinstance(s, BuildSlice):
        split = replace(s.split, kind="run", reason=why) if s.split is not None else None
        return replace(s, kind="run", reason=why, rows=rows, curate_kind="run", curate_reason=why, split=split)
    if isinstance(s, Train):
        return replace(s, kind="run", reason=why, rows=rows, forced=True)
    return replace(s, kind="run", reason=why, rows=rows)


# --- selection -----------------------------------------------------------------------------

def select(plan: Plan, targets: list[str] | tuple[str, ...] = (), until: str | None = None) -> Plan:
    """The part of `plan` that `apply --target ... --until ...` runs: each target with every step it
    comes after (ingest always, drops never: they are not anyone's input), cut after the `until`
    stage. `vlmspec plan` shows the same cut, so a plan previews exactly what apply will do."""
    if until is not None and until not in UNTIL:
        raise CompileError(Problem(f"`--until` must be one of {', '.join(UNTIL)}, got `{until}`", "--until"))
    steps = list(plan.steps)
    if targets:
        names = [s.name for s in steps] + [s.split.name for s in steps if isinstance(s, BuildSlice) and s.split]
        unknown = [t for t in targets if plan.step(t) is None]
        if unknown:
            raise CompileError([Problem(f"unknown target `{t}`", "--target",
                                        fix=did_you_mean(t, names) or f"Targets: {', '.join(names)}")
                                for t in unknown])
        keep: set[str] = {"ingest"}
        todo = [plan.step(t).name for t in targets]
        while todo:
            name = todo.pop()
            if name not in keep:
                keep.add(name)
                todo += list(plan.step(name).after) if plan.step(name) is not None else []
        steps = [s for s in steps if s.name in keep and not isinstance(s, Drop)]
    if until is not None:
        last = UNTIL.index(until)
        steps = [s for s in steps if UNTIL.index(s.stage) <= last]
    selection = tuple(f"--target {t}" for t in targets) + ((f"--until {until}",) if until else ())
    return replace(plan, steps=tuple(steps), selection=selection)
