"""`vlmspec bench chaos|fuzz|badrows|reliability-report`: the reliability benchmarks' commands.

Registered on `bench_app` by runtime/tools/bench/commands.py; each imports its module only when it runs.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

import typer

from .common import DEFAULT_OUT

OutOpt = typer.Option(DEFAULT_OUT, "--out", help="Directory for <name>.json and <name>.md.")


def _done(res, out: Path, extra) -> None:
    from . import reliability

    js, md = reliability.write(res, out, extra)
    typer.echo(f"wrote {js} and {md}")
    for d in res.derived.values():
        met = "" if d["met"] is None else ("  [target met]" if d["met"] else "  [TARGET MISSED]")
        target = f"  (target {d['target']})" if d["target"] else ""
        typer.echo(f"  {d['label']}: {d['value']}{target}{met}")


def chaos(trials: int = typer.Option(24, "--trials", min=1, help="Kills to land (each followed by a rerun)."),
          seed: int = typer.Option(0, "--seed", help="Seed of the kill points."),
          rows: int = typer.Option(128, "--rows", min=32, help="Rows of the synthetic table."),
          steps: int = typer.Option(9, "--steps", min=2, help="Training steps."),
          keep: Optional[Path] = typer.Option(None, "--keep", help="Keep every trial's directory under here."),
          out: Path = OutOpt) -> None:
    """SIGKILL `vlmspec apply` at seeded points of ingest, tier-1/2, tier-3 and training; rerun; compare."""
    os.environ.setdefault("LANCE_LOG", "error")
    from . import chaos as bench
    from .reliability import chaos_markdown

    res = bench.run(trials, seed, out, rows=rows, steps=steps, keep=keep, progress=typer.echo)
    _done(res, out, chaos_markdown)


def fuzz(cases: int = typer.Option(5000, "--cases", min=1, help="Cases to run through load + compile."),
         seed: int = typer.Option(0, "--seed", help="Seed of the case generator."),
         out: Path = OutOpt) -> None:
    """Hostile spec text, YAML and meaning through load + compile: only VlmspecErrors may come out."""
    from . import fuzz as bench
    from .reliability import fuzz_markdown

    res = bench.run(cases, seed, out, progress=lambda n: typer.echo(f"  {n:,} cases"))
    _done(res, out, fuzz_markdown)


def badrows(good_rows: int = typer.Option(4, "--good-rows", min=1, help="Good rows next to the bad ones."),
            out: Path = OutOpt) -> None:
    """Corrupt, truncated, empty, non-image and bomb images; bad text; bad sources: per-row or up-front errors."""
    os.environ.setdefault("LANCE_LOG", "error")
    from . import badrows as bench
    from .reliability import badrows_markdown

    res = bench.run(out, good_rows)
    _done(res, out, badrows_markdown)


def reliability_report(results: Path = typer.Option(DEFAULT_OUT, "--results", help="Where the results JSON are."),
                       readme: Path = typer.Option(Path("README.md"), "--readme", help="The README to update.")) -> None:
    """Rewrite the README's reliability section (between its markers) from the results JSON."""
    from .reliability import update_readme

    update_readme(readme, results)
    typer.echo(f"updated the reliability section of {readme} from {results}")


# called by commands.py on its `bench_app`: one `vlmspec bench` group holds every benchmark
def add_commands(app: typer.Typer) -> None:
    app.command("chaos")(chaos)
    app.command("fuzz")(fuzz)
    app.command("badrows")(badrows)
    app.command("reliability-report")(reliability_report)
