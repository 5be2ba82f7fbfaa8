"""Test helpers importable from any test module (tests/ is on pythonpath)."""

from __future__ import annotations

import difflib
import json
import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
GOLDEN = ROOT / "tests" / "golden"


def check_golden(name: str, text: str) -> None:
    """Compare `text` with tests/golden/<name>; rewrite it under --update-goldens."""
    path = GOLDEN / name
    if os.environ.get("UPDATE_GOLDENS") == "1" or not path.exists() and os.environ.get("CI") != "true":
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        return
    want = path.read_text()
    if want != text:
        diff = "".join(difflib.unified_diff(want.splitlines(True), text.splitlines(True),
                                            f"golden/{name}", "actual"))
        pytest.fail(f"output differs from golden {name} (rerun with --update-goldens if intended):\n{diff}")


def state_after_apply(compiled, rows: int, version: int = 3, extra_columns=()):
    """The TableState a successful apply of `compiled` leaves behind (no table needed)."""
    from vlmspec.compiler.state import FINGERPRINT, RECIPE, ColumnState, StepRecord, TableState

    cols = [ColumnState(n, t, {}, rows) for n, t in compiled.raw.items()]
    for c in compiled.columns:
        cols.append(ColumnState(c.name, c.output,
                                {FINGERPRINT: c.fingerprint, RECIPE: json.dumps(c.recipe, sort_keys=True)}, rows))
    cols += list(extra_columns)
    steps = {s.name: StepRecord(s.fingerprint, version, rows, {"recipe": dict(s.recipe)}) for s in compiled.stages}
    return TableState(uri=compiled.spec.source.table, exists=True, version=version, rows=rows,
                      columns=tuple(cols), steps=steps, source_rows=rows)


def table_of(d: Path) -> str:
    """The table of a spec written by the tests' `write_spec` helpers into folder `d`."""
    return str(d / "data" / "t.lance")


def kill_once_committed(proc, uri: str, column: str, log: Path, timeout: float) -> None:
    """SIGKILL `proc`'s process group as soon as one fragment of `column` is committed in `uri`
    (fails if `proc` ends first or nothing is committed within `timeout` seconds)."""
    import signal
    import time

    from vlmspec.runtime import lance_io

    try:
        deadline = time.monotonic() + timeout
        while True:
            assert proc.poll() is None, "apply ended before it could be killed:\n" + log.read_text()
            assert time.monotonic() < deadline, f"no fragment of `{column}` was committed in time"
            ds = lance_io.open_dataset(uri)
            if ds is not None and lance_io.fragment_fill(ds).get(column):
                break
            time.sleep(0.02)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
