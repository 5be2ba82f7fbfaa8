"""Model-side plan rules: what image_px, revision and LoRA changes recompute, and what is refused."""

from __future__ import annotations

import dataclasses

import pytest
import yaml

from vlmspec.compiler.compile import compile_spec
from vlmspec.compiler.errors import CompileError
from vlmspec.compiler.load import load_spec_text
from vlmspec.compiler.plan import build_plan
from vlmspec.compiler.render import render_plan
from vlmspec.compiler.state import TableState
from vlmspec.runtime.apply import model_facts

from helpers import ROOT, state_after_apply

BASE = (ROOT / "tests" / "cases" / "model" / "base.yaml").read_text()


def _with(**changes) -> str:
    data = yaml.safe_load(BASE)
    for dotted, value in changes.items():
        node = data
        *path, last = dotted.split("__")
        for k in path:
            node = node[k]
        node[last] = value
    return yaml.safe_dump(data, sort_keys=False)


def _compile(text: str, state: TableState):
    loaded = load_spec_text(text, file="tests/cases/model/spec.yaml")
    return compile_spec(loaded.spec, state, file=loaded.file, facts=model_facts(loaded.spec), locate=loaded.locate)


def _plan(after: str):
    fresh = TableState(uri="data/model.lance", source_rows=400)
    state = state_after_apply(_compile(BASE, fresh), rows=400)
    return build_plan(_compile(after, state), state)


def _kinds(plan):
    return {s.name: s.kind for s in plan.columns}, {s.name: s.kind for s in plan.stages}


def test_image_px_change_recomputes_hiddens_tokens_and_retrains(golden):
    plan = _plan(_with(model__image_px=168))
    cols, stages = _kinds(plan)
    assert cols == {"ocr_token_count": "up_to_date", "vision_tower_hiddens": "recompute", "sft_tokens": "recompute"}
    assert stages["train"] == "run" and stages["eval"] == "run"
    assert stages["curate"] == "up_to_date" and stages["split"] == "up_to_date"
    golden("plan/model_image_px.txt", render_plan(plan))


def test_revision_change_recomputes_model_columns():
    cols, stages = _kinds(_plan(_with(model__revision="v2")))
    assert cols["vision_tower_hiddens"] == "recompute" and cols["sft_tokens"] == "recompute"
    assert stages["train"] == "run"


def test_lora_r_change_retrains_without_touching_columns(golden):
    plan = _plan(_with(train__lora={"r": 8, "alpha": 16}))
    cols, stages = _kinds(plan)
    assert set(cols.values()) == {"up_to_date"}
    assert stages == {"curate": "up_to_date", "split": "up_to_date", "train": "run", "eval": "run"}
    golden("plan/model_lora_r.txt", render_plan(plan))


def test_eval_only_change_reruns_eval_only():
    _, stages = _kinds(_plan(_with(eval={"limit": 60})))
    assert stages == {"curate": "up_to_date", "split": "up_to_date", "train": "up_to_date", "eval": "run"}


def test_eval_limit_all_is_the_whole_split_and_batch_size_is_not_fingerprinted():
    fresh = TableState(uri="data/model.lance", source_rows=400)

    def eval_fp(**ev):
        return _compile(_with(eval=ev), fresh).stage("eval").fingerprint

    assert _compile(_with(eval={"limit": "all"}), fresh).spec.eval.limit == "all"
    assert eval_fp(limit="all") == eval_fp(limit=None) != eval_fp(limit=50)
    assert eval_fp(limit=50, batch_size=64) == eval_fp(limit=50, batch_size="auto") == eval_fp(limit=50)


@pytest.mark.parametrize("field,value,where", [
    ("train__lora", {"targets": ["q_proj", "visual.blocks.0.attn.qkv"]}, "train.lora.targets[1]"),
    ("train__lora", {"targets": ["qkv"]}, "train.lora.targets[0]"),
    ("train__lora", {"modules_to_save": ["merger"]}, "train.lora.modules_to_save[0]"),
])
def test_training_the_vision_side_on_cached_hiddens_is_refused(field, value, where):
    with pytest.raises(CompileError) as e:
        _compile(_with(**{field: value}), TableState(uri="data/model.lance", source_rows=400))
    text = str(e.value)
    assert where in text and "stale by construction" in text


def test_train_needs_the_right_producers():
    text = _with(train__hiddens="ocr_token_count")
    with pytest.raises(CompileError, match="training needs a `vlm.vision_tower` column"):
        _compile(text, TableState(uri="data/model.lance", source_rows=400))
