"""`vlmspec bench ...` subcommands (registered in runtime/cli.py)."""

from __future__ import annotations

import typer

bench_app = typer.Typer(no_args_is_help=True, help="Measure vlmspec on this machine; results go to JSON + Markdown.")
