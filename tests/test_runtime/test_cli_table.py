"""`vlmspec --version`, and `status` / `log` on a table alone (`--table PATH`, no spec)."""

from __future__ import annotations

from importlib.metadata import version

import pytest
import yaml
from typer.testing import CliRunner

from vlmspec.runtime.cli import app


def test_version_prints_the_installed_version():
    r = CliRunner().invoke(app, ["--version"])
    assert r.exit_code == 0 and r.stdout == f"vlmspec {version('vlmspec')}\n"


def test_spec_or_table_but_not_both_nor_neither(tmp_path):
    for args in (["status"], ["log"]):
        r = CliRunner().invoke(app, args)
        assert r.exit_code == 1 and r.stderr == "error: give a spec file or `--table PATH`.\n"
    (tmp_path / "s.yaml").write_text("name: s\nsource: {table: t.lance}\n")
    r = CliRunner().invoke(app, ["status", str(tmp_path / "s.yaml"), "--table", "t.lance"])
    assert r.exit_code == 1 and "not both" in r.stderr
    r = CliRunner().invoke(app, ["status", "--table", str(tmp_path / "none.lance")])
    assert r.exit_code == 0 and r.stdout == f"{tmp_path}/none.lance: no Lance table here\n"


@pytest.mark.slow
def test_status_and_log_from_the_table_alone(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    spec = {"name": "t", "source": {"table": "data/t.lance", "ingest": {"from": "synthetic", "rows": 40, "image_px": 64},
                                    "rows_per_fragment": 16},
            "features": {"tier1": {"question_length": {"udf": "text.length", "inputs": ["question"]}}}}
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(spec))
    assert CliRunner().invoke(app, ["apply", "spec.yaml"]).exit_code == 0
    r = CliRunner().invoke(app, ["status", "--table", "data/t.lance"])
    assert r.exit_code == 0, r.output
    lines = r.stdout.splitlines()
    assert lines[0].startswith("data/t.lance: version ") and lines[0].endswith(", 40 rows, 11 columns")
    assert [ln.split()[0] for ln in lines[1:-1]][-2:] == ["question_length", "ingest"]
    ql = next(ln for ln in lines if ln.lstrip().startswith("question_length"))
    assert "40/40 filled (100.0%)  derived, complete, fingerprint " in ql
    assert "raw (no vlmspec metadata)" in lines[1]
    assert lines[-1].startswith("Without a spec, status cannot tell whether a column or step is fresh")
    r = CliRunner().invoke(app, ["log", "--table", "data/t.lance"])
    assert r.exit_code == 0 and r.stdout.splitlines()[0].startswith("run ") and " ok " in r.stdout
    assert r.stdout == CliRunner().invoke(app, ["log", "spec.yaml"]).stdout
