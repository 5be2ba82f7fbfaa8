"""The one error tree. Every user mistake surfaces as a `VlmspecError`, never a traceback.

    VlmspecError                 root; carries one or more located `Problem`s
    ├── SpecError                bad shape: YAML syntax, unknown key, wrong type, undefined var
    ├── CompileError             bad meaning: unknown column, cycle, missing UDF, type mismatch
    ├── PlanBlocked              a destructive step without --allow-destructive
    └── ApplyError               a step failed while running; says how to resume

Messages read ``<where> <field path>: <what>. <how to fix>``, e.g.
``specs/x.yaml:14:7 features.tier2.dhash.inputs[0]: unknown column `img`. Did you mean `image`?``
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from typing import Iterable


@dataclass(frozen=True, order=True)
class Location:
    """A place in a spec file (1-based line and column; 0 when unknown)."""

    file: str = ""
    line: int = 0
    col: int = 0

    def __str__(self) -> str:
        if not self.file:
            return ""
        if not self.line:
            return self.file
        return f"{self.file}:{self.line}:{self.col}" if self.col else f"{self.file}:{self.line}"


@dataclass(frozen=True)
class Problem:
    """One thing wrong, where it is, and how to fix it."""

    what: str
    path: str = ""
    where: Location = Location()
    fix: str = ""

    def __str__(self) -> str:
        head = " ".join(p for p in (str(self.where), self.path) if p)
        text = self.what.rstrip(".") + "."
        if self.fix:
            fix = self.fix.rstrip(".")
            text += " " + fix + ("" if fix.endswith(("?", "!")) else ".")
        return f"{head}: {text}" if head else text

    def sort_key(self) -> tuple:
        return (self.where.file, self.where.line or 10**9, self.where.col, self.path, self.what)


class VlmspecError(Exception):
    """Root of every error vlmspec raises on purpose. Holds all problems found at once."""

    def __init__(self, problems: Problem | str | Iterable[Problem]):
        if isinstance(problems, str):
            problems = [Problem(problems)]
        elif isinstance(problems, Problem):
            problems = [problems]
        self.problems: tuple[Problem, ...] = tuple(sorted(problems, key=Problem.sort_key))
        super().__init__("\n".join(str(p) for p in self.problems))


class SpecError(VlmspecError):
    """The spec file is malformed: YAML, template, key, type or value."""


class CompileError(VlmspecError):
    """The spec is well formed but means something impossible."""


class PlanBlocked(VlmspecError):
    """The plan contains destructive steps and --allow-destructive was not given."""


class ApplyError(VlmspecError):
    """A step failed while applying; the message says how to resume."""


def did_you_mean(word: str, choices: Iterable[str]) -> str:
    """`Did you mean `x`?` for the nearest choice, or '' when nothing is close."""
    match = difflib.get_close_matches(word, sorted(set(choices)), n=1, cutoff=0.6)
    return f"Did you mean `{match[0]}`?" if match else ""
