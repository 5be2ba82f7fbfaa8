"""The executor in the plan: header line, per-step placement, the plan-time GPU refusal under Ray and
the CPU warning under the local executor. Runtime facts (cluster totals) are passed in as data, so
none of this needs Ray; the last test checks the clear error when Ray is asked for but missing."""

from __future__ import annotations

import sys

import pytest
import yaml

from vlmspec.compiler.compile import compile_spec
from vlmspec.compiler.errors import ApplyError, CompileError
from vlmspec.compiler.load import load_spec_text
from vlmspec.compiler.plan import build_plan
from vlmspec.compiler.render import render_json, render_plan
from vlmspec.compiler.state import TableState
from vlmspec.runtime.apply import model_facts

from helpers import ROOT

BASE = yaml.safe_load((ROOT / "tests" / "cases" / "model" / "base.yaml").read_text())


def _plan(executor: dict, facts: dict | None = None, gpus: float = 1):
    data = {**BASE, "executor": executor}
    data["features"] = {**BASE["features"], "tier2": {"dhash": {"udf": "image.dhash", "inputs": ["image"]}}}
    data["features"]["tier3"] = {**BASE["features"]["tier3"]}
    data["features"]["tier3"]["vision_tower_hiddens"] = {**data["features"]["tier3"]["vision_tower_hiddens"],
                                                         "resources": {"gpus": gpus}}
    loaded = load_spec_text(yaml.safe_dump(data, sort_keys=False), file="tests/cases/model/spec.yaml")
    state = TableState(uri="data/model.lance", source_rows=400)
    compiled = compile_spec(loaded.spec, state, file=loaded.file, facts=model_facts(loaded.spec), locate=loaded.locate)
    return build_plan(compiled, state, executor=facts)


def _placements(plan) -> dict[str, str]:
    return {s.name: s.placement for s in plan.columns}


def test_local_executor_without_facts_says_only_what_the_spec_says():
    plan = _plan({"kind": "local"}, gpus=0)
    text = render_plan(plan)
    assert text.splitlines()[1] == "Executor  local"
    assert _placements(plan) == {"ocr_token_count": "in-process", "dhash": "processes",
                                 "vision_tower_hiddens": "in-process", "sft_tokens": "in-process"}
    assert not plan.warnings


def test_local_executor_with_facts_shows_parallelism_and_warns_for_gpu_on_cpu():
    plan = _plan({"kind": "local", "workers": 4}, {"cpus": 16, "gpus": 0})
    assert render_plan(plan).splitlines()[1] == "Executor  local (4 worker processes)"
    assert _placements(plan)["dhash"] == "processes x4"
    assert plan.warnings == ("`vision_tower_hiddens` asks for 1 GPU but no CUDA device is visible: "
                             "it runs on the CPU (slow)",)
    assert "  ! `vision_tower_hiddens` asks for 1 GPU" in render_plan(plan)
    # With a GPU there is nothing to warn about.
    assert not _plan({"kind": "local"}, {"cpus": 16, "gpus": 1}).warnings


def test_ray_executor_places_cpu_tasks_and_gpu_actors():
    plan = _plan({"kind": "ray", "address": "ray://head:10001"}, {"cpus": 64, "gpus": 4}, gpus=0.5)
    lines = render_plan(plan).splitlines()
    assert lines[1] == "Executor  ray (ray://head:10001, 64 CPUs, 4 GPUs)"
    assert _placements(plan) == {"ocr_token_count": "cpu tasks x64", "dhash": "cpu tasks x64",
                                 "vision_tower_hiddens": "gpu actors x8 (0.5 GPU each)",
                                 "sft_tokens": "cpu actor x1"}
    dhash = next(line for line in lines if "dhash" in line)
    assert "cpu tasks x64" in dhash and dhash.endswith("400 rows")
    # workers caps the parallelism; the JSON carries the executor and each placement.
    plan = _plan({"kind": "ray", "address": "auto", "workers": 2}, {"cpus": 64, "gpus": 4})
    assert _placements(plan)["dhash"] == "cpu tasks x2"
    assert _placements(plan)["vision_tower_hiddens"] == "gpu actors x2 (1 GPU each)"
    assert render_plan(plan).splitlines()[1] == "Executor  ray (auto, 64 CPUs, 4 GPUs, at most 2 workers)"
    assert '"placement": "gpu actors x2 (1 GPU each)"' in render_json(plan)
    assert '"kind": "ray"' in render_json(plan)


def test_ray_plan_refuses_a_gpu_column_on_a_cluster_without_gpus():
    with pytest.raises(CompileError) as e:
        _plan({"kind": "ray", "address": "ray://head:10001"}, {"cpus": 8, "gpus": 0})
    assert str(e.value) == (
        "features.tier3.vision_tower_hiddens.resources.gpus: `vision_tower_hiddens` needs 1 GPU per worker but "
        "the Ray cluster at `ray://head:10001` has none. Point `executor.address` at a cluster with GPU workers "
        "or use `executor: {kind: local}`.")
    with pytest.raises(CompileError, match="needs 2 GPUs per worker but the local Ray cluster .this machine. "
                                           "has only 1"):
        _plan({"kind": "ray", "address": "local"}, {"cpus": 8, "gpus": 1}, gpus=2)
    # Unknown GPU count (no facts): no refusal at plan time.
    assert _placements(_plan({"kind": "ray"}))["vision_tower_hiddens"] == "gpu actors (1 GPU each)"


def test_ray_missing_is_a_clear_error(monkeypatch):
    from vlmspec.runtime.executors import executor_facts
    from vlmspec.compiler.model import ExecutorSpec

    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError
    with pytest.raises(ApplyError, match=r"pip install 'vlmspec\[ray\]'"):
        executor_facts(ExecutorSpec(kind="ray", address="auto"), needs_gpus=False)
    # The local executor never imports Ray.
    assert executor_facts(ExecutorSpec(kind="local"), needs_gpus=False) == {}


def test_geneva_placement_and_header_from_cluster_facts():
    plan = _plan({"kind": "geneva", "workers": 6}, {"cpus": 16, "gpus": 2})
    assert render_plan(plan).splitlines()[1] == "Executor  geneva (local Ray context, 16 CPUs, 2 GPUs, at most 6 workers)"
    # CPU columns: one applier per CPU, capped by workers; a GPU column: one per GPU slot; a model
    # column without GPUs: one applier (the model loaded once).
    assert _placements(plan) == {"ocr_token_count": "geneva x6", "dhash": "geneva x6",
                                 "vision_tower_hiddens": "geneva x2 (1 GPU each)", "sft_tokens": "geneva x1"}
    # Geneva's own actors (driver, tracker, writers) hold about half a CPU: on 2 CPUs one 1-CPU
    # applier fits, and the plan says so rather than a second that would wait for the whole job.
    assert _placements(_plan({"kind": "geneva"}, {"cpus": 2, "gpus": 2}))["dhash"] == "geneva x1"
    assert _placements(_plan({"kind": "geneva"}, {"cpus": 2, "gpus": 2}))["vision_tower_hiddens"] == \
        "geneva x1 (1 GPU each)"
    with pytest.raises(CompileError, match="needs 1 GPU per worker but the local Ray cluster .this machine. has none"):
        _plan({"kind": "geneva"}, {"cpus": 2, "gpus": 0})


def test_a_local_plan_never_imports_geneva():
    """Geneva is proprietary: only a spec that asks for it may import it."""
    import subprocess

    code = ("import sys; from vlmspec.compiler.load import load_spec; from vlmspec.runtime.apply import prepare; "
            "prepare(load_spec('specs/quickstart.yaml')); "
            "print(sorted(m for m in sys.modules if m.split('.')[0] == 'geneva'))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
