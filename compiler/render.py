"""Render a `Plan` as a stable aligned table (golden-tested byte for byte) or as JSON.

Deterministic by construction: plan order, no timestamps, no absolute paths, no colour.
"""

from __future__ import annotations

import dataclasses
import json

from .paths import shown
from .plan import SYMBOL, Backfill, Drop, Plan, Step

STAGE_TITLES = {"curate": "curate", "split": "split", "train": "train", "eval": "eval"}


def human_bytes(n: int) -> str:
    for unit, size in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n} B"


def human_seconds(s: float) -> str:
    if s < 60:
        return f"~{max(s, 1):.0f} s"
    if s < 3600:
        return f"~{s / 60:.0f} min"
    return f"~{s / 3600:.1f} h"


def _column_detail(s: Backfill | Drop) -> str:
    if s.kind == "drop":
        return f"dropped: {s.reason}" + ("  BLOCKED: needs --allow-destructive" if s.blocked else "")
    parts = [s.reason]
    if s.kind in ("new", "recompute") and s.shape:
        parts.append(s.shape)
    elif s.kind in ("new", "recompute") and s.type:
        from .types import TypeSyntaxError, parse_type

        try:
            parts.append(parse_type(s.type).short())
        except TypeSyntaxError:
            parts.append(s.type)
    if s.rows and s.bytes >= 1e6:
        parts.append(human_bytes(s.bytes))
    if s.est_seconds is not None:
        parts.append(human_seconds(s.est_seconds) + (" GPU" if s.gpus else ""))
    text = ", ".join(parts)
    if s.blocked:
        text += "  BLOCKED: needs --allow-destructive"
    return text


def _rows(n: int) -> str:
    return f"{n:,} rows" if n else ""


def render_plan(plan: Plan) -> str:
    """The human plan: one line per step, aligned, then a summary line."""
    head = f"Plan  {plan.spec_file} -> {shown(plan.table)}"
    if plan.table_exists:
        head += f" (version {plan.version}, {plan.rows:,} rows)"
    else:
        head += " (new table)"
    if plan.selection:  # cut by `select`: say so, or the missing steps would read as up to date
        head += "  [" + " ".join(plan.selection) + "]"
    lines = [head, executor_line(plan)]
    rows: list[tuple[str, str, str, str, str, str]] = []
    if plan.ingest is not None:
        i = plan.ingest
        rows.append((SYMBOL[i.kind], "ingest", i.label, i.reason, "", _rows(i.rows)))
    for s in plan.columns:
        rows.append((SYMBOL[s.kind], s.name, s.tier, _column_detail(s), s.placement, _rows(s.rows)))
    for st in plan.stages:
        name = f"{st.name} {st.label}".strip() if st.name == "curate" else st.name
        rows.append((SYMBOL[st.kind], name, "", st.reason, "", _rows(st.rows) if st.kind != "up_to_date" else ""))
    if rows:
        wn = max(len(r[1]) for r in rows)
        wt = max(len(r[2]) for r in rows)
        wd = max(len(r[3]) for r in rows)
        wp = max(len(r[4]) for r in rows)
        for sym, name, tier, detail, place, n in rows:
            # The placement (where the chunks run) gets a column of its own when any step has one.
            detail = f"{detail:<{wd}}  {place:<{wp}}" if wp else detail
            line = f"  {sym} {name:<{wn}}  {tier:<{wt}}  {detail:<{wd}}  {n:>12}" if n else \
                f"  {sym} {name:<{wn}}  {tier:<{wt}}  {detail}"
            lines.append(line.rstrip())
    for w in plan.warnings:
        lines.append(f"  ! {w}")
    lines.append(summary(plan))
    return "\n".join(lines) + "\n"


def executor_line(plan: Plan) -> str:
    """`Executor  local (8 worker processes)` / `Executor  ray (local cluster, 2 CPUs)`: only what the
    spec says and what the runtime passed in (nothing for goldens to drift on)."""
    ex = plan.executor or {}
    workers = ex.get("workers")
    if ex.get("kind") == "ray":
        addr = ex.get("address") or "local"
        parts = ["local cluster" if addr == "local" else addr]
        if ex.get("cpus") is not None:
            parts.append(f"{ex['cpus']:g} CPUs")
        if ex.get("gpus"):
            parts.append(f"{ex['gpus']:g} GPUs")
        if workers:
            parts.append(f"at most {workers} workers")
        return f"Executor  ray ({', '.join(parts)})"
    if ex.get("kind") == "geneva":
        addr = ex.get("address") or "local"
        parts = ["local Ray context" if addr == "local" else addr]
        if ex.get("cpus") is not None:
            parts.append(f"{ex['cpus']:g} CPUs")
        if ex.get("gpus"):
            parts.append(f"{ex['gpus']:g} GPUs")
        if workers:
            parts.append(f"at most {workers} workers")
        line = f"Executor  geneva ({', '.join(parts)})"
        checked = ex.get("geneva_plan")
        if checked:  # Geneva's own plan_backfill of the columns it would resume, cross-checked
            line += "\n          " + "; ".join(checked)
        return line
    n = workers or ex.get("cpus")
    return "Executor  local" + (f" ({n} worker process{'es' if n != 1 else ''})" if n else "")


def summary(plan: Plan) -> str:
    if plan.is_empty:
        return "Plan: nothing to do; the table is up to date."
    c = plan.counts()
    parts = []
    if plan.ingest is not None and plan.ingest.kind != "up_to_date":
        parts.append("ingest")
    for kind, word in (("new", "new"), ("recompute", "recompute"), ("resume", "resume"),
                       ("up_to_date", "up to date"), ("drop", "drop")):
        if c.get(kind):
            parts.append(f"{c[kind]} {word}")
    if c.get("downstream"):
        parts.append(f"{c['downstream']} downstream step{'s' if c['downstream'] != 1 else ''}")
    text = "Plan: " + ", ".join(parts) + "."
    if plan.blocked:
        text += f" {len(plan.blocked)} blocked: rerun with --allow-destructive."
    return text


def _step_dict(s: Step) -> dict:
    """A step's fields as plain values: its compiled node stays out (the plan's JSON says what runs
    and why, not the whole recipe), its placement is written as the plan prints it."""
    d = {f.name: getattr(s, f.name) for f in dataclasses.fields(s) if f.name not in ("node", "place")}
    d = json.loads(json.dumps(d, default=lambda o: dataclasses.asdict(o)))
    if isinstance(s, (Backfill, Drop)):
        d["placement"] = s.placement
    return {"step": type(s).__name__, **d}


def plan_to_dict(plan: Plan) -> dict:
    d = {f.name: getattr(plan, f.name) for f in dataclasses.fields(plan) if f.name != "steps"}
    d["executor"] = dict(plan.executor)
    d["ingest"] = _step_dict(plan.ingest) if plan.ingest is not None else None
    d["columns"] = [_step_dict(s) for s in plan.columns]
    d["stages"] = [dataclasses.asdict(s) for s in plan.stages]
    d["steps"] = [_step_dict(s) for s in plan.steps]
    d["empty"] = plan.is_empty
    d["summary"] = summary(plan)
    d["blocked"] = [s.name for s in plan.blocked]
    return d


def render_json(plan: Plan) -> str:
    return json.dumps(plan_to_dict(plan), indent=2, sort_keys=True) + "\n"
