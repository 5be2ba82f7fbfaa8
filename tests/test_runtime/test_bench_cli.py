"""`vlmspec bench` as the tools' one entry point: every command is listed, the CLI stays cheap to
import and runs as `python -m vlmspec.runtime.cli` (how a bare GPU machine calls it), the README's
performance block is what `perf-report` writes, and the tiny-model builders run from the CLI."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from vlmspec.runtime.cli import app

ROOT = Path(__file__).resolve().parents[2]
COMMANDS = ["plan", "backfill", "ray", "reads", "gpu", "bf16-noise", "perf-report", "tiny-model", "pretrain-tiny",
            "chaos", "fuzz", "badrows", "reliability-report"]


def _invoke(*args: str):
    return CliRunner().invoke(app, ["bench", *args])


def test_bench_help_lists_every_command():
    res = _invoke("--help")
    assert res.exit_code == 0, res.output
    listed = [line.split()[1] for line in res.output.splitlines() if line.startswith("│ ") and line.split()[1:2]]
    assert [c for c in listed if c in COMMANDS] == COMMANDS


def test_cli_runs_as_a_module_and_imports_nothing_heavy():
    code = ("import sys, runpy; sys.argv = ['vlmspec', 'bench', '--help']\n"
            "try:\n    runpy.run_module('vlmspec.runtime.cli', run_name='__main__')\n"
            "except SystemExit as e:\n    assert not e.code, e.code\n"
            "heavy = [m for m in ('torch', 'lance', 'pyarrow', 'transformers') if m in sys.modules]\n"
            "print('HEAVY', heavy)\n")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert "pretrain-tiny" in res.stdout
    assert res.stdout.strip().splitlines()[-1] == "HEAVY []"


def test_perf_report_reproduces_the_readme(tmp_path):
    readme = tmp_path / "README.md"
    shutil.copy(ROOT / "README.md", readme)
    res = _invoke("perf-report", str(readme), str(ROOT / "examples" / "benchmarks" / "results"))
    assert res.exit_code == 0, res.output
    assert res.output == "updated\n"
    assert readme.read_text() == (ROOT / "README.md").read_text()  # the README says what the tool writes


def test_perf_report_without_markers_leaves_the_file(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text("# no tables here\n")
    res = _invoke("perf-report", str(readme), str(tmp_path))
    assert res.exit_code == 0, res.output
    assert res.output == f"no <!-- performance:start --> block in {readme}\n"
    assert readme.read_text() == "# no tables here\n"


def test_tiny_model_refuses_an_unknown_corpus(tmp_path):
    res = _invoke("tiny-model", str(tmp_path / "m"), "--corpus", "web")
    assert res.exit_code == 2 and "--corpus" in res.output
    assert not (tmp_path / "m").exists()


def test_pretrain_tiny_refuses_the_quickstart_seed(tmp_path):
    res = _invoke("pretrain-tiny", str(tmp_path / "m"), "--seed", "0")
    assert res.exit_code == 2 and "--seed" in res.output
    assert not (tmp_path / "m").exists()


@pytest.mark.slow
def test_tiny_model_builds_from_the_cli(tmp_path):
    res = _invoke("tiny-model", str(tmp_path / "m"), "--corpus", "builtin", "--vocab-size", "1024")
    assert res.exit_code == 0, res.output + repr(res.exception)
    assert res.stdout == f"{tmp_path / 'm'}\n"  # transformers' save progress bar goes to stderr
    meta = json.loads((tmp_path / "m" / "vlmspec_tiny.json").read_text())
    assert meta["corpus"] == "builtin" and meta["vocab_size"] == 1024 and meta["weights"] == "random-init"


@pytest.mark.slow
def test_pretrain_tiny_records_the_command_that_reproduces_it(tmp_path):
    res = _invoke("pretrain-tiny", str(tmp_path / "m"), "--steps", "2", "--seed", "3", "--batch-size", "4",
                  "--image-px", "56", "--warmup", "1", "--log-every", "1", "--val-rows", "0")
    assert res.exit_code == 0, res.output + repr(res.exception)
    pt = json.loads((tmp_path / "m" / "vlmspec_tiny.json").read_text())["pretrain"]
    assert pt["steps"] == 2
    assert pt["command"] == ("vlmspec bench pretrain-tiny OUT --steps 2 --decay-steps 1 --device cpu --seed 3 "
                             "--batch-size 4 --lr 0.002 --image-px 56 --warmup 1")
