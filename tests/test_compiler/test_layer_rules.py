"""The layer rules of `tests/layers.py` hold on the real import graph, and the check catches each
kind of violation when one is planted (so a green run means something)."""

import shutil

import pytest

from helpers import ROOT
from layers import import_graph, violations


def test_the_product_keeps_its_layers():
    assert violations(ROOT) == []


def test_imports_inside_functions_count():
    graph = import_graph(ROOT)
    # apply imports the training entry point only inside a function (torch is heavy).
    assert "vlmspec.runtime.train.start" in graph["vlmspec.runtime.apply"]


@pytest.fixture
def copy(tmp_path):
    for folder in ("compiler", "runtime"):
        shutil.copytree(ROOT / folder, tmp_path / folder, ignore=shutil.ignore_patterns("__pycache__", "assets"))
    return tmp_path


def _plant(path, line):
    path.write_text(path.read_text() + f"\n\ndef _planted():\n    {line}\n")


@pytest.mark.parametrize("where, line, expected", [
    ("compiler/plan.py", "from vlmspec.runtime import lance_io", "compiler imports runtime"),
    ("runtime/lance_io.py", "from .apply import apply", "ground module imports orchestration"),
    ("runtime/udfs/text.py", "from ..train.loop import run_training", "ground module imports orchestration"),
    ("runtime/backfill.py", "from .tools.bench import common", "product imports tools"),
    ("runtime/lance_io.py", "from . import backfill", "import cycle"),
])
def test_a_planted_violation_is_caught(copy, where, line, expected):
    _plant(copy / where, line)
    found = violations(copy)
    assert any(v.startswith(expected) for v in found), found


def test_modules_and_functions_stay_readable():
    from layers import oversized

    assert oversized(ROOT) == []
