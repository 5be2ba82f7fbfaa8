"""What a reviewer of an untrusted spec is shown: `plan` flags `trust_remote_code` and paths that
climb out with `..`; nothing is flagged for an ordinary spec."""

from __future__ import annotations

import textwrap

from vlmspec.compiler.catalog import ModelFacts
from vlmspec.compiler.compile import compile_spec
from vlmspec.compiler.load import load_spec_text
from vlmspec.compiler.model import ModelSpec
from vlmspec.compiler.plan import build_plan
from vlmspec.compiler.render import render_plan
from vlmspec.compiler.state import TableState

SPEC = textwrap.dedent("""\
    name: trust
    source:
      table: TABLE
      ingest: {from: synthetic, rows: 10}
    model: {id: "vlmspec:tiny-qwen2.5-vl", image_px: 56TRUST}
    features:
      tier1:
        question_length: {udf: text.length, inputs: [question]}
      tier3:
        vision_tower_hiddens: {udf: vlm.vision_tower}
        sft_tokens: {udf: vlm.sft_tokens, params: {max_tokens: 64}}
    split: {by: image_id, fraction: 0.2}
    train:
      optim: {steps: 1}
      output_dir: OUT
""")


def plan_text(trust: bool = False, table: str = "data/t.lance", out: str = "runs/t") -> tuple[str, tuple[str, ...]]:
    text = SPEC.replace("TRUST", ", trust_remote_code: true" if trust else "")
    loaded = load_spec_text(text.replace("TABLE", table).replace("OUT", out), "s.yaml")
    facts = ModelFacts("vlmspec:tiny-qwen2.5-vl", "main", 128)
    compiled = compile_spec(loaded.spec, TableState(uri=table), file="s.yaml", locate=loaded.locate, facts=facts)
    return render_plan(build_plan(compiled, TableState(uri=table))), compiled.warnings


def test_trust_remote_code_is_off_by_default_and_flagged_when_on():
    assert ModelSpec(id="x").trust_remote_code is False
    text, warnings = plan_text()
    assert warnings == () and "!" not in text
    text, warnings = plan_text(trust=True)
    assert warnings == ("`model.trust_remote_code` is on: loading `vlmspec:tiny-qwen2.5-vl` runs Python code "
                        "shipped with the model; keep it off unless you trust that repository",)
    assert "\n  ! `model.trust_remote_code` is on: loading" in text


def test_output_paths_that_climb_out_are_flagged():
    text, warnings = plan_text(table="../../elsewhere/t.lance", out="runs/../../../etc")
    assert [w.split(" has")[0] for w in warnings] == ["`source.table` `../../elsewhere/t.lance`",
                                                      "`train.output_dir` `runs/../../../etc`"]
    assert text.count("\n  ! ") == 2
    _, warnings = plan_text(table="/abs/data/t.lance", out="runs/my..run")  # absolute, or `..` inside a name
    assert warnings == ()
