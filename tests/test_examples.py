"""Every shipped spec (examples/*/spec.yaml, specs/*.yaml) loads, compiles and plans (golden)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from vlmspec.compiler.compile import compile_spec
from vlmspec.compiler.load import load_spec
from vlmspec.compiler.plan import build_plan
from vlmspec.compiler.render import render_plan
from vlmspec.compiler.state import TableState
from vlmspec.runtime.apply import model_facts
from vlmspec.runtime.sources.ingest import source_info

from helpers import ROOT

SPECS = sorted(p.relative_to(ROOT).as_posix() for p in [*ROOT.glob("examples/*/spec.yaml"), *ROOT.glob("specs/*.yaml")])


@pytest.mark.parametrize("spec", SPECS)
def test_spec_plans_against_a_fresh_table(spec, golden, monkeypatch):
    monkeypatch.chdir(ROOT)
    loaded = load_spec(spec)
    rows, schema = source_info(loaded.spec.source)
    # A fresh table, whatever an earlier local run left under data/: plans must not depend on it.
    state = TableState(uri=loaded.spec.source.table, source_rows=rows, source_schema=schema)
    compiled = compile_spec(loaded.spec, state, file=spec, spec_hash=loaded.source_hash,
                            facts=model_facts(loaded.spec), locate=loaded.locate, spec_dir=Path(spec).parent)
    plan = build_plan(compiled, state)
    assert not plan.is_empty and not plan.blocked
    name = spec.replace("/", "__").removesuffix(".yaml")
    golden(f"examples/{name}.txt", render_plan(plan))
