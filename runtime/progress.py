"""How long work reports progress. Only `cli.py` draws anything (rich bars); every other module
reports through a `Reporter` it is handed, and tests record the calls.

A task is a named unit with a total (rows, steps, questions); `advance` counts what is done, and
for a column that means committed, so a bar never shows work a kill would lose.
"""

from __future__ import annotations

from typing import Protocol

__all__ = ["NullReporter", "Reporter"]


class Reporter(Protocol):
    """The progress sink long steps write to."""

    def start(self, task: str, total: int, unit: str = "rows") -> None: ...
    def advance(self, task: str, n: int) -> None: ...
    def info(self, task: str, text: str) -> None:
        """A short live status beside the task's bar (training: the smoothed loss)."""
    def finish(self, task: str) -> None: ...
    def note(self, text: str) -> None: ...


class NullReporter:
    """Reports nowhere (library use and tests that do not look)."""

    def start(self, task: str, total: int, unit: str = "rows") -> None: ...
    def advance(self, task: str, n: int) -> None: ...
    def info(self, task: str, text: str) -> None: ...
    def finish(self, task: str) -> None: ...
    def note(self, text: str) -> None: ...
