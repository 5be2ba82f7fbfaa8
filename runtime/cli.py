"""The `vlmspec` command line: the composition root, and the only module that prints or exits.

A `VlmspecError` prints `error: ...` on stderr and exits 1 (`--debug` or VLMSPEC_DEBUG=1 re-raises);
any other exception is a bug and keeps its traceback.
"""

from __future__ import annotations

import json
import os
import sys
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.progress import (BarColumn, MofNCompleteColumn, Progress, ProgressColumn, TextColumn,
                           TimeElapsedColumn, TimeRemainingColumn)
from rich.text import Text

from vlmspec.compiler.errors import VlmspecError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Plan and apply VLM fine-tuning experiments on one Lance table.")
out = Console(highlight=False, soft_wrap=True)
err = Console(stderr=True, highlight=False, soft_wrap=True)
STATE = {"debug": os.environ.get("VLMSPEC_DEBUG", "") not in ("", "0")}

VarOpt = typer.Option(None, "--var", help="Override a template variable: --var key=value (repeatable).")
ReplaceOpt = typer.Option(None, "--replace", help="Rerun this column or step even if it is up to date "
                          "(repeatable; a column is recomputed into a shadow and swapped in when complete).")


def _version(value: bool) -> None:
    if value:
        from importlib.metadata import PackageNotFoundError, version

        try:
            out.print(f"vlmspec {version('vlmspec')}")
        except PackageNotFoundError:  # run from a source tree that was never installed
            out.print("vlmspec (not installed)")
        raise typer.Exit()


@app.callback()
def _main(debug: bool = typer.Option(False, "--debug", help="Show tracebacks for vlmspec errors."),
          _: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                 help="Print the installed version and exit.")) -> None:
    if debug:
        STATE["debug"] = True
    STATE["loaded"] = None  # the spec an error is located in: the one this command loads


def _load(spec: Path, var: list[str] | None):
    from vlmspec.compiler.load import load_spec

    STATE["loaded"] = loaded = load_spec(spec, var or [])
    return loaded


def _fail(e: VlmspecError) -> None:
    if STATE["debug"]:
        raise e
    if STATE.get("loaded") is not None:  # an apply-time error names a field: point into the spec
        e = STATE["loaded"].located(e)
    err.print(Text("error: " + str(e).replace("\n", "\nerror: ")))
    raise typer.Exit(1)


@app.command()
def validate(spec: Path = typer.Argument(..., help="The spec file."), var: Optional[list[str]] = VarOpt) -> None:
    """Check a spec: YAML, templates, fields, column references, types and UDFs."""
    from .apply import prepare

    try:
        prep = prepare(_load(spec, var), allow_destructive=True)
    except VlmspecError as e:
        _fail(e)
    c = prep.compiled
    out.print(f"{spec}: ok ({len(c.columns)} derived columns, steps: "
              f"{', '.join(s.name for s in c.stages) or 'none'})")
    for w in c.warnings:
        out.print(f"warning: {w}")


@app.command()
def plan(spec: Path = typer.Argument(..., help="The spec file."),
         var: Optional[list[str]] = VarOpt,
         as_json: bool = typer.Option(False, "--json", help="Print the plan as JSON."),
         out_file: Optional[Path] = typer.Option(None, "--out", help="Also write the JSON plan to this file."),
         detailed_exitcode: bool = typer.Option(False, "--detailed-exitcode",
                                                help="Exit 0 when nothing would change, 2 when it would."),
         allow_destructive: bool = typer.Option(False, "--allow-destructive",
                                                help="Show destructive steps as allowed."),
         target: Optional[list[str]] = typer.Option(None, "--target",
                                                    help="Only what this column or step needs (repeatable), as apply --target."),
         until: Optional[str] = typer.Option(None, "--until", help="Stop after a stage, as apply --until: "
                                             "ingest|features|curate|train|eval."),
         replace: Optional[list[str]] = ReplaceOpt,
         workers: Optional[int] = typer.Option(None, "--workers", help="As apply --workers (placement).")) -> None:
    """Dry run: what `apply` would do, read from table metadata only."""
    from vlmspec.compiler.plan import select
    from vlmspec.compiler.render import render_json, render_plan

    from .apply import prepare
    from .history import redact, secret_values

    try:
        loaded = _load(spec, var)
        p = select(prepare(loaded, allow_destructive=allow_destructive, workers=workers,
                           replace_steps=replace or []).plan, target or [], until)
    except VlmspecError as e:
        _fail(e)
    secrets = secret_values(loaded.spec.vars, os.environ)  # a token in a --var never reaches a plan
    if out_file is not None:
        out_file.parent.mkdir(parents=True, exist_ok=True)
        out_file.write_text(redact(render_json(p), secrets))
    out.print(redact(render_json(p) if as_json else render_plan(p), secrets), end="")
    if detailed_exitcode and not p.is_empty:
        raise typer.Exit(2)


class RateColumn(ProgressColumn):
    def render(self, task) -> Text:
        speed = task.finished_speed or task.speed
        unit = task.fields.get("unit", "rows")
        if not speed:
            return Text("")
        # Compact, so a bar line fits an 80-column terminal: 187 rows/s, 20.7k rows/s, 6.3 steps/s.
        text = f"{speed / 1000:.1f}k" if speed >= 10_000 else f"{speed:.0f}" if speed >= 100 else f"{speed:.1f}"
        return Text(f"{text} {unit}/s", style="cyan")


class RichReporter:
    """Progress bars on stderr: done/total, rate in the task's unit, elapsed, ETA, and a live status
    (training's smoothed loss). A bar shows what was done (committed, for a column): on Ctrl-C or a
    failure it stays where the work stopped."""

    def __init__(self, console: Console):
        self.progress = Progress(TextColumn("{task.description:<22}"), BarColumn(bar_width=24),
                                 MofNCompleteColumn(), RateColumn(), TimeElapsedColumn(),
                                 TimeRemainingColumn(compact=True), TextColumn("{task.fields[info]}", style="dim"),
                                 console=console, transient=False)
        self.tasks: dict[str, int] = {}

    def __enter__(self):
        self.progress.start()
        return self

    def __exit__(self, *exc):
        self.progress.stop()

    def start(self, task: str, total: int, unit: str = "rows") -> None:
        self.tasks[task] = self.progress.add_task(task, total=total or None, unit=unit, info="")

    def advance(self, task: str, n: int) -> None:
        if task in self.tasks:
            self.progress.advance(self.tasks[task], n)

    def info(self, task: str, text: str) -> None:
        if task in self.tasks:
            self.progress.update(self.tasks[task], info=text)

    def finish(self, task: str) -> None:
        if task in self.tasks:
            self.progress.stop_task(self.tasks[task])

    def note(self, text: str) -> None:
        self.progress.console.print(text)


@app.command()
def apply(spec: Optional[Path] = typer.Argument(None, help="The spec file (default: the one --plan was made from)."),
          var: Optional[list[str]] = VarOpt,
          plan_file: Optional[Path] = typer.Option(None, "--plan", help="Apply this saved plan (`vlmspec plan SPEC "
                                                   "--out FILE`) only if the table and spec have not moved since."),
          target: Optional[list[str]] = typer.Option(None, "--target",
                                                     help="Run only what this column or step needs (repeatable)."),
          until: Optional[str] = typer.Option(None, "--until", help="Stop after a stage: ingest|features|curate|train|eval."),
          replace: Optional[list[str]] = ReplaceOpt,
          allow_destructive: bool = typer.Option(False, "--allow-destructive",
                                                 help="Allow dropping columns the spec no longer declares."),
          workers: Optional[int] = typer.Option(None, "--workers", help="CPU worker processes (default: all cores)."),
          device: Optional[str] = typer.Option(None, "--device", help="Device for model steps (default: cuda if present).")) -> None:
    """Do what the plan says: only what is missing or stale, resumably. The plan is printed first."""
    from vlmspec.compiler.plan import UNTIL
    from vlmspec.compiler.render import render_plan

    from .apply import apply as run_apply
    from .progress import NullReporter
    from .train.launch import from_environment

    if until is not None and until not in UNTIL:
        _fail(VlmspecError(f"--until must be one of {', '.join(UNTIL)}, got `{until}`"))
    _quiet_libraries()
    t0 = time.time()
    # Under torchrun every rank runs this command; only rank 0 draws and prints.
    ranks = from_environment()
    follower = ranks is not None and ranks.rank != 0

    def show_plan(p) -> None:
        if follower:
            return
        if p.is_empty:
            out.print("Nothing to do; the table is up to date.")
        else:
            out.print(render_plan(p), end="")
    try:
        saved = _read_saved_plan(plan_file) if plan_file is not None else None
        if spec is None and saved is None:
            raise VlmspecError("give a spec file, or a saved plan with --plan FILE")
        loaded = _load(spec if spec is not None else Path(saved["spec_file"]), var)
        with (nullcontext(NullReporter()) if follower else RichReporter(err)) as reporter:
            result = run_apply(loaded, allow_destructive=allow_destructive, targets=target or [], until=until,
                               reporter=reporter, workers=workers, device=device, saved_plan=saved,
                               replace=replace or [], on_plan=show_plan)
    except KeyboardInterrupt:
        err.print("interrupted: committed work is kept; run `vlmspec apply` again to resume.")
        raise typer.Exit(130)
    except VlmspecError as e:
        _fail(e)
    if result is None:  # a rank other than 0: it trained its shards; rank 0 reports
        return
    if not result.plan_before.is_empty:
        out.print(f"Applied in {time.time() - t0:.1f} s (run {result.record.run_id}):")
        for line in result.summary:
            out.print(f"  {line}")
    if result.plan_after is not None and not result.plan_after.is_empty and not target and not until:
        out.print("Still to do:")
        out.print(render_plan(result.plan_after), end="")


def _quiet_libraries() -> None:
    """Third-party progress bars and warnings (transformers' "Loading weights", datasets' bars, a
    FutureWarning per model load) would tear through ours; `--debug` shows them."""
    if STATE["debug"]:
        return
    import logging
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning, module=r"(transformers|torch|peft|lance)(\.|$)")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    for name in ("transformers", "datasets", "peft", "accelerate", "torch", "bitsandbytes"):
        logging.getLogger(name).setLevel(logging.ERROR)
    # Already imported by an earlier step in this process: switch their bars off directly.
    import sys as _sys

    if "transformers" in _sys.modules:
        _sys.modules["transformers"].utils.logging.disable_progress_bar()


def _read_saved_plan(path: Path) -> dict:
    from vlmspec.compiler.errors import Location, Problem

    try:
        saved = json.loads(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise VlmspecError(Problem(f"cannot read the plan: {e.strerror or e}", where=Location(str(path)),
                                   fix="Write one with `vlmspec plan SPEC --out FILE`")) from None
    except ValueError:
        saved = None
    if not isinstance(saved, dict) or not {"spec_file", "spec_hash", "table", "version"} <= saved.keys():
        raise VlmspecError(Problem("not a plan written by `vlmspec plan --out`", where=Location(str(path)),
                                   fix="Write one with `vlmspec plan SPEC --out FILE`"))
    return saved


@app.command()
def schema() -> None:
    """Print the spec's JSON schema (for editor completion and validation)."""
    from vlmspec.compiler.model import Spec

    out.print(json.dumps(Spec.model_json_schema(by_alias=True), indent=2, sort_keys=True))


TableOpt = typer.Option(None, "--table", help="A table path (relative to the current directory), instead of a spec.")


def _spec_or_table(spec: Path | None, table: Path | None, var: list[str] | None):
    """(loaded spec or None, table path) for commands that take a SPEC or `--table PATH`."""
    if (spec is None) == (table is None):
        _fail(VlmspecError("give a spec file or `--table PATH`" + (", not both" if spec else "")))
    if table is not None:
        if var:
            _fail(VlmspecError("--var needs a spec file: a table alone has no template variables"))
        return None, str(table)
    try:
        loaded = _load(spec, var)
    except VlmspecError as e:
        _fail(e)
    return loaded, loaded.spec.source.table


@app.command()
def log(spec: Optional[Path] = typer.Argument(None, help="The spec file (or give --table)."),
        var: Optional[list[str]] = VarOpt, table: Optional[Path] = TableOpt,
        limit: int = typer.Option(20, help="Show at most this many runs.")) -> None:
    """List applies recorded for the spec's table (or for `--table PATH`)."""
    from . import history

    _, uri = _spec_or_table(spec, table, var)
    runs = history.list_runs(uri)[-limit:]
    if not runs:
        out.print("No runs recorded.")
        return
    out.print(f"{'run':<26} {'status':<11} {'versions':<10} {'spec':<14} steps")
    for r in runs:
        versions = f"{r.get('version_before') or '-'}->{r.get('version_after') or '-'}"
        steps = ", ".join(f"{s['name']}({s['rows']:,})" for s in r.get("steps", []) if s.get("rows")) or "-"
        out.print(f"{r['run_id']:<26} {r['status']:<11} {versions:<10} {r['spec_hash'][:12]:<14} {steps}")


@app.command()
def status(spec: Optional[Path] = typer.Argument(None, help="The spec file (or give --table)."),
           var: Optional[list[str]] = VarOpt, table: Optional[Path] = TableOpt) -> None:
    """Each declared column's fill and freshness, and each step's state (with `--table`: what the
    table alone says: fill and fingerprints, not freshness)."""
    from vlmspec.compiler.paths import shown

    from .apply import prepare

    loaded, uri = _spec_or_table(spec, table, var)
    if loaded is None:
        from . import lance_io

        out.print(format_table_status(lance_io.read_state(uri)), end="")
        return
    try:
        prep = prepare(loaded, allow_destructive=True)
    except VlmspecError as e:
        _fail(e)
    st, p = prep.state, prep.plan
    if not st.exists:
        out.print(f"{shown(st.uri)}: not created yet (run `vlmspec apply {spec}`)")
        return
    out.print(f"{shown(st.uri)}: version {st.version}, {st.rows:,} rows")
    width = max([len(s.name) for s in p.columns] + [6])
    for s in p.columns:
        col = st.column(s.name)
        filled = col.filled_rows if col else 0
        pct = 100.0 * filled / st.rows if st.rows else 0.0
        fresh = "fresh" if s.kind == "up_to_date" else s.reason
        out.print(f"  {s.name:<{width}}  {s.tier:<5}  {filled:>10,}/{st.rows:,} filled ({pct:5.1f}%)  {fresh}")
    for s in p.stages:
        rec = st.steps.get(s.name)
        when = f"at version {rec.table_version}" if rec else "never run"
        out.print(f"  {s.name:<{width}}  {'':<5}  {('fresh' if s.kind == 'up_to_date' else 'stale: ' + s.reason)} ({when})")


def format_table_status(st) -> str:
    """`status --table`: what the table and its sidecar say without a spec. Fill and fingerprints
    are stored in the table; whether they are *fresh* needs the spec's fingerprints, so it is not said."""
    from vlmspec.compiler.paths import shown

    if not st.exists:
        return f"{shown(st.uri)}: no Lance table here\n"
    lines = [f"{shown(st.uri)}: version {st.version}, {st.rows:,} rows, {len(st.columns)} columns"]
    width = max([len(c.name) for c in st.columns] + [len(n) for n in st.steps] + [6])
    twidth = min(max([len(c.type) for c in st.columns] + [4]), 36)
    for c in st.columns:
        pct = 100.0 * c.filled_rows / st.rows if st.rows else 0.0
        fill = f"{c.filled_rows:>10,}/{st.rows:,} filled ({pct:5.1f}%)"
        if c.fingerprint:
            state = f"derived, complete, fingerprint {c.fingerprint[:12]}"
        elif c.target:
            state = f"derived, filling towards {c.target[:12]} (an interrupted or running apply)"
        else:
            state = "raw (no vlmspec metadata)"
        ctype = c.type if len(c.type) <= twidth else c.type[: twidth - 3] + "..."
        lines.append(f"  {c.name:<{width}}  {ctype:<{twidth}}  {fill}  {state}")
    for name, rec in sorted(st.steps.items()):
        lines.append(f"  {name:<{width}}  {'step':<{twidth}}  recorded at version {rec.table_version}, "
                     f"{rec.rows:,} rows, fingerprint {rec.fingerprint[:12]}")
    lines.append("Without a spec, status cannot tell whether a column or step is fresh (that compares its "
                 "fingerprint with the spec's): run `vlmspec status SPEC` for that.")
    return "\n".join(lines) + "\n"


@app.command()
def errors(spec: Path = typer.Argument(..., help="The spec file."), var: Optional[list[str]] = VarOpt,
           column: Optional[str] = typer.Option(None, help="Only this column."),
           limit: int = typer.Option(50, help="Show at most this many rows.")) -> None:
    """Rows a UDF failed on (recorded under `on_error: null`)."""
    from .row_errors import current_errors

    try:
        loaded = _load(spec, var)
    except VlmspecError as e:
        _fail(e)
    rows = current_errors(loaded.spec.source.table, {column} if column else None)
    if not rows:
        out.print("No row errors recorded.")
        return
    for r in rows[-limit:]:
        # Named as `apply` names a failing row: address, then where it is, then its `source.key`.
        named = f", {r['key']}={r['key_value']!r}" if r.get("key") else ""
        out.print(f"{r['column']}  row {r['row_addr']}  (fragment {r['fragment']}, offset {r['offset']}{named})  "
                  f"{r['error']}")
    out.print(f"{len(rows)} row error(s).")


from .tools.bench.commands import bench_app  # noqa: E402  (cheap: imports no torch)

app.add_typer(bench_app, name="bench")


def main() -> None:
    """Console-script entry point."""
    # Lance logs a WARN per DataReplacement commit ("not stable yet"): one line per fragment is
    # noise on a terminal. An explicit LANCE_LOG still wins.
    os.environ.setdefault("LANCE_LOG", "error")
    app()


if __name__ == "__main__":
    sys.exit(main())
