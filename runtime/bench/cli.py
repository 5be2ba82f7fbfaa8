"""`vlmspec bench ...` subcommands (registered in runtime/cli.py).

One module per benchmark (`plan.py`, `backfill.py`), imported only when its command runs, so
`vlmspec --help` stays cheap.
"""

from __future__ import annotations

import os
from pathlib import Path

import typer

from .common import DEFAULT_OUT, parse_ints

bench_app = typer.Typer(no_args_is_help=True, help="Measure vlmspec on this machine; results go to JSON + Markdown.")

OutOpt = typer.Option(DEFAULT_OUT, "--out", help="Directory for <name>.json and <name>.md.")


def _ints(text: str, flag: str) -> list[int]:
    try:
        return parse_ints(text)
    except ValueError as e:
        raise typer.BadParameter(str(e), param_hint=flag) from None


def _quiet_lance() -> None:
    # Every fragment commit of a backfill logs a Lance WARN line (DataReplacement is "not stable yet");
    # hundreds of them would bury the benchmark's output. Must be set before lance is imported.
    os.environ.setdefault("LANCE_LOG", "error")


def _report(res, out: Path) -> None:
    typer.echo(f"wrote {out / (res.name + '.json')} and {out / (res.name + '.md')}")
    for d in res.derived.values():
        val = d["value"]
        val = f"{val:,.4g}" if isinstance(val, float) else (f"{val:,}" if isinstance(val, int) else str(val))
        met = "" if d["met"] is None else ("  [target met]" if d["met"] else "  [TARGET MISSED]")
        typer.echo(f"  {d['label']}: {val} {d['unit']}{('  (target ' + d['target'] + ')') if d['target'] else ''}{met}")


@bench_app.command("plan")
def plan_cmd(rows: str = typer.Option("1000000,100000,10000", "--rows", help="Table sizes, comma-separated."),
             repeats: int = typer.Option(7, "--repeats", min=1, help="Timed repeats per figure."),
             rows_per_fragment: int = typer.Option(8192, "--rows-per-fragment", min=16),
             control: bool = typer.Option(True, "--control/--no-control",
                                          help="Also time the largest row count in as few fragments as the smallest."),
             out: Path = OutOpt) -> None:
    """Time `vlmspec plan` on tables of growing size (it must read metadata only)."""
    _quiet_lance()
    from . import plan

    res = plan.run(_ints(rows, "--rows"), repeats, out, rows_per_fragment=rows_per_fragment, control=control)
    _report(res, out)


@bench_app.command("backfill")
def backfill_cmd(rows: int = typer.Option(2000, "--rows", min=1, help="Rows of the synthetic table."),
                 image_px: int = typer.Option(256, "--image-px", min=64, help="Size of the synthetic images."),
                 workers: str = typer.Option("1,2", "--workers", help="Worker counts for image.dhash."),
                 repeats: int = typer.Option(3, "--repeats", min=1, help="Timed repeats per figure."),
                 rows_per_fragment: int = typer.Option(512, "--rows-per-fragment", min=16),
                 noop_rows: str = typer.Option("100000,10000", "--noop-rows",
                                               help="Sizes of the cheap tables for the no-op apply (largest also "
                                                    "times tier-1 rows/s)."),
                 out: Path = OutOpt) -> None:
    """Tier-1 rows/s, dhash through vlmspec vs. a bare loop (efficiency, scaling), no-op apply time."""
    _quiet_lance()
    from . import backfill

    res = backfill.run(rows, image_px, _ints(workers, "--workers"), repeats, out,
                       rows_per_fragment=rows_per_fragment, noop_rows=_ints(noop_rows, "--noop-rows"))
    _report(res, out)
