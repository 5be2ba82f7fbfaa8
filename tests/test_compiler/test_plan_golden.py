"""Golden plans: each scenario plans `after/spec.yaml` against the state `before/spec.yaml` left."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from vlmspec.compiler.compile import compile_spec
from vlmspec.compiler.errors import CompileError
from vlmspec.compiler.load import load_spec
from vlmspec.compiler.plan import build_plan
from vlmspec.compiler.render import render_json, render_plan
from vlmspec.compiler.state import TableState

from helpers import ROOT, state_after_apply

CASES = ROOT / "tests" / "cases" / "evolve"
PLAN_SCENARIOS = ["fresh", "noop", "new_column", "udf_source_change", "udf_docstring_edit", "param_change",
                  "description_edit", "appended_rows", "removed_column", "curation_change"]
ERROR_SCENARIOS = ["cycle", "typo"]


def _compile(path: Path, state: TableState):
    rel = path.relative_to(ROOT).as_posix()
    loaded = load_spec(rel if Path(rel).exists() else path)
    loaded = dataclasses.replace(loaded, file=rel)
    return compile_spec(loaded.spec, state, file=rel, spec_hash=loaded.source_hash, locate=loaded.locate,
                        spec_dir=path.parent)


def _source_rows(path: Path) -> int:
    return load_spec(path).spec.source.ingest.rows


def plan_for(scenario: str, allow_destructive: bool = False):
    after = CASES / scenario / "after" / "spec.yaml"
    before = CASES / scenario / "before" / "spec.yaml"
    if before.exists():
        prev = _compile(before, TableState(uri="data/evolve.lance", source_rows=_source_rows(before)))
        state = state_after_apply(prev, rows=_source_rows(before))
        state = dataclasses.replace(state, source_rows=_source_rows(after))
    else:
        state = TableState(uri="data/evolve.lance", source_rows=_source_rows(after))
    return build_plan(_compile(after, state), state, allow_destructive=allow_destructive)


@pytest.fixture(autouse=True)
def _cwd(monkeypatch):
    monkeypatch.chdir(ROOT)


@pytest.mark.parametrize("scenario", PLAN_SCENARIOS)
def test_plan_golden(scenario, golden):
    golden(f"plan/{scenario}.txt", render_plan(plan_for(scenario)))


@pytest.mark.parametrize("scenario", ERROR_SCENARIOS)
def test_error_golden(scenario, golden):
    with pytest.raises(CompileError) as e:
        plan_for(scenario)
    golden(f"plan/{scenario}.txt", str(e.value) + "\n")


def test_noop_is_empty_and_fresh_is_not():
    assert plan_for("noop").is_empty
    assert not plan_for("fresh").is_empty


def test_docstring_and_description_edits_change_nothing():
    assert plan_for("udf_docstring_edit").is_empty
    assert plan_for("description_edit").is_empty


def test_udf_source_change_recomputes_column_and_dependents_only():
    kinds = {s.name: s.kind for s in plan_for("udf_source_change").columns}
    assert kinds == {"question_length": "up_to_date", "question_type": "up_to_date", "ocr_token_count": "up_to_date",
                     "answer_words": "up_to_date", "long_answer": "recompute", "dhash": "up_to_date"}


def test_param_change_recomputes_column_and_its_dependent():
    p = plan_for("param_change")
    changed = {s.name: s.reason for s in p.columns if s.kind != "up_to_date"}
    assert set(changed) == {"answer_words", "long_answer"}
    assert "min_len 1->2" in changed["answer_words"] and "upstream `answer_words`" in changed["long_answer"]
    # Curation reads neither column, but the table is unchanged: nothing downstream reruns.
    assert all(s.kind == "up_to_date" for s in p.stages)


def test_appended_rows_resume_every_column_and_rerun_steps():
    p = plan_for("appended_rows")
    assert p.ingest.kind == "append" and p.ingest.rows == 300
    assert {s.kind for s in p.columns} == {"resume"} and {s.rows for s in p.columns} == {300}
    assert {s.kind for s in p.stages} == {"run"}


def test_removed_column_is_blocked_unless_allowed():
    assert [s.name for s in plan_for("removed_column").blocked] == ["question_type"]
    assert plan_for("removed_column", allow_destructive=True).blocked == ()


def test_curation_change_reruns_only_downstream():
    p = plan_for("curation_change")
    assert all(s.kind == "up_to_date" for s in p.columns)
    assert {s.name for s in p.stages if s.kind == "run"} == {"curate", "split"}


def test_json_carries_the_same_facts():
    p = plan_for("new_column")
    d = json.loads(render_json(p))
    assert d["empty"] is False
    assert [c["name"] for c in d["columns"] if c["kind"] == "new"] == ["answer_length"]
    assert d["summary"] == render_plan(p).splitlines()[-1]
