"""load.py: templating, YAML, validation, and the located messages that come out of them."""

from __future__ import annotations

import hashlib
import os
import textwrap
from pathlib import Path

import pytest

from vlmspec.compiler.errors import Location, Problem, SpecError, VlmspecError
from vlmspec.compiler.load import LoadedSpec, load_spec, load_spec_text, parse_overrides

GOLDEN = Path(__file__).resolve().parents[1] / "golden"
# What `Problem.__str__` puts after a fix that ends in "?": "." today (see errors.py), "" once fixed.
DOT = str(Problem("x", fix="y?"))[len("x. y?"):]

MINIMAL = """\
name: demo
source:
  table: data/demo.lance
features:
  tier1:
    question_length: {udf: text.length, inputs: [question]}
"""


def spec_text(body: str) -> str:
    return textwrap.dedent(body).lstrip("\n")


def problems(text: str, file: str = "s.yaml", overrides=()) -> list[str]:
    with pytest.raises(SpecError) as info:
        load_spec_text(text, file, overrides)
    return [str(p) for p in info.value.problems]


def check_golden(name: str, actual: str) -> None:
    """Compare with tests/golden/<name> byte for byte; UPDATE_GOLDENS=1 rewrites it."""
    path = GOLDEN / name
    if os.environ.get("UPDATE_GOLDENS") == "1":
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(actual.encode("utf-8"))
    assert path.exists(), f"missing golden {path}; run with UPDATE_GOLDENS=1"
    assert actual.encode("utf-8") == path.read_bytes()


# --- valid specs --------------------------------------------------------------------------


def test_minimal_spec_loads():
    loaded = load_spec_text(MINIMAL, "m.yaml")
    assert isinstance(loaded, LoadedSpec)
    assert loaded.spec.name == "demo"
    assert loaded.spec.features.tier1["question_length"].inputs == ["question"]
    assert loaded.text == MINIMAL
    assert loaded.source_hash == hashlib.sha256(MINIMAL.encode()).hexdigest()


def test_load_spec_reads_file_and_keeps_path_as_given(tmp_path, monkeypatch):
    (tmp_path / "spec.yaml").write_text(MINIMAL)
    monkeypatch.chdir(tmp_path)
    loaded = load_spec("spec.yaml")
    assert loaded.file == "spec.yaml"
    assert str(loaded.locate("source.table")) == "spec.yaml:3:10"


def test_vars_render_and_var_override_is_parsed_as_int():
    text = spec_text("""
        name: demo
        vars:
          rows: 100
        source:
          table: data/{{ name }}.lance
          ingest: {from: synthetic, rows: {{ rows }}}
    """)
    assert load_spec_text(text).spec.source.ingest.rows == 100
    loaded = load_spec_text(text, overrides=["rows=300"])
    assert loaded.spec.source.ingest.rows == 300
    assert loaded.spec.source.table == "data/demo.lance"
    assert loaded.spec.vars == {"rows": 300}
    assert loaded.source_hash != load_spec_text(text).source_hash


def test_var_override_may_define_a_new_variable():
    text = MINIMAL.replace("data/demo.lance", "data/{{ tag }}.lance")
    assert load_spec_text(text, overrides=["tag=v2"]).spec.source.table == "data/v2.lance"


def test_template_blocks_render_when_raw_text_is_not_yaml():
    text = spec_text("""
        name: demo
        vars:
          big: true
        source:
        {% if big %}
          table: data/big.lance
        {% else %}
          table: data/small.lance
        {% endif %}
    """)
    assert load_spec_text(text).spec.source.table == "data/big.lance"
    assert load_spec_text(text, overrides=["big=false"]).spec.source.table == "data/small.lance"


def test_parse_overrides():
    assert parse_overrides(["rows=300", "lr=1e-4", "flag=true", "s=a: b", "e=", "x=y=z"]) == {
        "rows": 300, "lr": "1e-4", "flag": True, "s": "a: b", "e": "", "x": "y=z"}
    assert parse_overrides(["lr=0.001"]) == {"lr": 0.001}
    with pytest.raises(SpecError, match=r"--var `rows` is not KEY=VALUE.*--var rows=300") as info:
        parse_overrides(["rows", "=3", "1x=2"])
    assert len(info.value.problems) == 3


# --- template errors ----------------------------------------------------------------------


def test_undefined_variable_is_located_with_suggestion():
    text = spec_text("""
        name: demo
        vars:
          rows: 10
        source:
          table: t
          ingest: {from: synthetic, rows: {{ rowz }}}
    """)
    [msg] = problems(text)
    assert msg.startswith("s.yaml:6:38: undefined variable `rowz`")
    assert "Define it under `vars:` or pass --var rowz=VALUE" in msg
    assert "Did you mean `rows`?" in msg


@pytest.mark.parametrize("payload", [
    "{{ ''.__class__.__mro__[1].__subclasses__() }}",
    "{{ cycler.__init__.__globals__ }}",
    "{{ self.__init__.__globals__ }}",
    "{{ self._TemplateReference__context }}",
    "{{ joiner.__init__.__globals__['os'] }}",
    "{{ ''.format.__globals__ }}",
    "{{ ().__class__.__base__.__subclasses__() }}",
    "{% set f = namespace.__init__ %}{{ f }}",
])
def test_sandbox_escape_is_refused(payload):
    text = MINIMAL.replace("data/demo.lance", f'"{payload}"')
    [msg] = problems(text)
    assert msg.startswith("s.yaml:3: template error: refused by the template sandbox")


@pytest.mark.parametrize("name", ["lipsum", "config", "request", "os", "__builtins__"])
def test_no_globals_to_walk_from(name):
    """`lipsum` is removed and flask-style `config`/`request` never exist: they are undefined names."""
    [msg] = problems(MINIMAL.replace("data/demo.lance", f'"{{{{ {name}.__globals__ }}}}"'))
    assert msg.startswith("s.yaml:3:") and f"undefined variable `{name}`" in msg


@pytest.mark.parametrize("stmt, word", [("{% import 'os' as os %}", "import"), ("{% from 'os' import path %}", "from"),
                                        ("{% include '/etc/passwd' %}", "include"),
                                        ("{% extends '/etc/passwd' %}", "extends")])
def test_templates_cannot_read_other_files(stmt, word):
    [msg] = problems(MINIMAL.replace("data/demo.lance", f'"{stmt}"'))
    assert msg == (f"s.yaml:3: `{{% {word} %}}` is not allowed: templates in a spec cannot read other files. "
                   "Put the values under `vars:`.")


def test_import_without_a_name_is_a_located_syntax_error():
    [msg] = problems(MINIMAL.replace("data/demo.lance", '"{% import os %}"'))
    assert msg.startswith("s.yaml:3: template syntax error")


@pytest.mark.parametrize("expr", ["{{ 1/0 }}", "{{ 9 ** (9 ** 9) }}", "{{ 'a' * 10**9 }}", "{{ {}.x }}",
                                  "{{ range(10**9)|list }}", "{{ 'x'|nosuchfilter }}"])
def test_template_runtime_failures_are_spec_errors(expr):
    [msg] = problems(MINIMAL.replace("data/demo.lance", f'"{expr}"'))
    assert msg.startswith("s.yaml:3") and "template" in msg


def test_template_syntax_error_is_located():
    [msg] = problems(MINIMAL + "{% if %}\n")
    assert msg.startswith("s.yaml:7: template syntax error")


# --- render budget and --var overrides ------------------------------------------------------

LOOPS = MINIMAL + "description: \"{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}\"\n"


def test_nested_loops_stop_at_the_iteration_budget_with_the_line():
    """Each `range` is under jinja's cap; together they are 10^10 iterations (a hang before)."""
    [msg] = problems(LOOPS)
    assert msg == ("s.yaml:7: the templates run more than 1,000,000 loop iterations (`range` items count too); "
                   "nested loops multiply. Loop over fewer items: templates in a spec repeat small blocks, "
                   "they do not compute.")


@pytest.mark.parametrize("expr, what", [
    ("{% for i in range(99999) %}xxxxxxxxxxxxxxx{% endfor %}", "write more than 1,000,000 characters"),
    ("{% set b %}{% for i in range(99999) %}{{ 'y' * 100 }}{% endfor %}{% endset %}", "write more than 1,000,000"),
    ("{% set ns = namespace(s='x') %}{% for i in range(40) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}",
     "builds a value of 1,048,576"),
    ("{% set ns = namespace(s=[1]) %}{% for i in range(40) %}{% set ns.s = ns.s + ns.s %}{% endfor %}",
     "the result of `+` would be too large"),
    ("{{ 'x'|center(1000000000) }}", "passes 1,000,000,000 to a filter"),
    ("{{ [1]|slice(1000000000)|list }}", "passes 1,000,000,000 to a filter"),
    ("{{ 'x'.ljust(1000000000) }}", "passes 1,000,000,000 to a filter or string method"),
    ("{{ '%0*d' % (1000000000, 1) }}", "the result of `%` would be too large"),
    ("{% for i in range(100000) %}{{ range(100000)|sum }}{% endfor %}", "more than 1,000,000 loop iterations"),
])
def test_text_and_work_bombs_are_refused_at_their_line(expr, what):
    [msg] = problems(MINIMAL + f'description: "{expr}"\n')
    assert msg.startswith("s.yaml:7: ") and what in msg, msg


def test_render_time_is_bounded(monkeypatch):
    from vlmspec.compiler import _render

    monkeypatch.setattr(_render, "MAX_SECONDS", 0.01)  # the loop below is within the other limits
    [msg] = problems(MINIMAL + 'description: "{% for i in range(90000) %}{% for j in range(3) %}{% set x = i * j %}{% endfor %}{% endfor %}"\n')
    assert msg.startswith("s.yaml:7: rendering the templates took more than 0.01 s")


def test_ordinary_loops_and_blocks_still_render():
    text = MINIMAL + ('description: "{% for i in range(3) %}{{ i }}{% if loop.last %}!{% else %},{% endif %}'
                      '{% endfor %} {% filter upper %}ab{% endfilter %} {{ [1, 2]|join(\'-\') }}"\n')
    assert load_spec_text(text).spec.description == "0,1,2! AB 1-2"


def test_var_override_must_name_a_template_variable():
    text = spec_text("""
        name: demo
        vars: {rows: 10, unused: 1}
        source:
          table: t
          ingest: {from: synthetic, rows: {{ rows }}}
    """)
    assert problems(text, overrides=["row=4000"]) == ["--var row: no template variable `row`. Did you mean `rows`?"]
    [msg] = problems(text, overrides=["zzz=1"])
    assert msg == ("--var zzz: no template variable `zzz`. The spec's template variables are `rows`, `unused`; "
                   "declare a new one under `vars:` and use it as `{{ zzz }}`.")
    # Every valid use keeps working: a used var, a declared one that no template reads, and
    # (test_var_override_may_define_a_new_variable) a name only the templates use.
    loaded = load_spec_text(text, overrides=["rows=20", "unused=2"])
    assert loaded.spec.source.ingest.rows == 20 and loaded.spec.vars == {"rows": 20, "unused": 2}


def test_unknown_override_and_undefined_variable_are_reported_together():
    text = MINIMAL.replace("data/demo.lance", "data/{{ tag }}.lance")
    assert problems(text, overrides=["tga=x"]) == [
        "--var tga: no template variable `tga`. Did you mean `tag`?",
        "s.yaml:3:18: undefined variable `tag`. Define it under `vars:` or pass --var tag=VALUE. Did you mean `tga`?",
    ]


# --- YAML errors --------------------------------------------------------------------------


def test_yaml_syntax_error_is_located():
    [msg] = problems("name: demo\nsource:\n  table: t\n bad: [\n")
    assert msg.startswith("s.yaml:4:2: invalid YAML")


def test_duplicate_key_reports_both_lines():
    [msg] = problems(MINIMAL + "name: again\n")
    assert msg == "s.yaml:7:1 name: duplicate key `name` (lines 1 and 7). Keep only one of them."


def test_unsafe_yaml_tags_are_rejected():
    [msg] = problems(MINIMAL + "description: !!python/object/apply:os.system ['true']\n")
    assert msg.startswith("s.yaml:7:14: invalid YAML value")


@pytest.mark.parametrize("text, start", [
    ("", "s.yaml: the spec is empty"),
    ("- a\n- b\n", "s.yaml:1:1: the top level is a list"),
    ("42\n", "s.yaml:1:1: the top level is a single value"),
    ("name: &x [*x]\n", "s.yaml:1:7 name[0]: an alias refers to the value that contains it"),
    ("a: 1\n---\nb: 2\n", "s.yaml:2:1: invalid YAML"),
    ("vars: " + "[" * 3000 + "]" * 3000, "s.yaml: the spec (or a template expression in it) is nested too deeply"),
])
def test_malformed_documents(text, start):
    assert problems(text)[0].startswith(start)


def test_alias_bomb_is_refused():
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    lines += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]" for i in range(1, 9)]
    [msg] = problems("\n".join(lines) + "\n")
    assert "more than 1,000,000 values" in msg


def test_missing_directory_and_non_utf8_files(tmp_path):
    with pytest.raises(SpecError, match="nope.yaml: no such spec file"):
        load_spec(tmp_path / "nope.yaml")
    with pytest.raises(SpecError, match="a directory, not a spec file"):
        load_spec(tmp_path)
    bad = tmp_path / "bad.yaml"
    bad.write_bytes(b"name: demo\nsource: {table: \xff}\n")
    with pytest.raises(SpecError, match=r"bad.yaml:2:17: not UTF-8 text \(byte 0xff\)"):
        load_spec(bad)


# --- validation errors --------------------------------------------------------------------


def test_unknown_key_typos_suggest_the_right_key():
    text = MINIMAL + spec_text("""
        featurs: {}
        model: {id: m}
        split: {}
        train:
          lroa: {r: 8}
          optim: {steps: 10}
    """)
    assert problems(text) == [
        "s.yaml:7:1 featurs: unknown key `featurs`. Did you mean `features`?" + DOT,
        "s.yaml:11:3 train.lroa: unknown key `lroa`. Did you mean `lora`?" + DOT,
    ]


def test_unknown_key_without_close_match_lists_valid_keys():
    [msg] = problems(MINIMAL.replace("table:", "zzz: 1\n  table:"))
    assert msg.startswith("s.yaml:3:3 source.zzz: unknown key `zzz`. Valid keys here: `table`, `ingest`")


def test_wrong_type_shows_the_value():
    msgs = problems(MINIMAL.replace("table: data/demo.lance",
                                    "table: t\n  ingest: {from: synthetic, rows: abc, seed: [1]}"))
    assert msgs == ["s.yaml:4:35 source.ingest.rows: expected an integer, got `abc`.",
                    "s.yaml:4:40 source.ingest.seed: expected an integer, got a list."]


def test_wrong_types_and_values_in_plain_words():
    text = MINIMAL + spec_text("""
        model: {id: m, trust_remote_code: maybe, dtype: bf16}
        executor: {kind: [ray], workers: 0}
        curation: {limit: 1.5}
    """)
    assert problems(text) == [
        "s.yaml:7:35 model.trust_remote_code: expected `true` or `false`, got `maybe`.",
        "s.yaml:7:49 model.dtype: must be one of `auto`, `bfloat16`, `float16`, `float32`, got `bf16`. "
        "Did you mean `bfloat16`?" + DOT,
        "s.yaml:8:12 executor.kind: must be one of `local`, `ray`, `geneva`, got a list.",
        "s.yaml:8:34 executor.workers: must be at least 1, got `0`.",
        "s.yaml:9:19 curation.limit: expected a whole number, got `1.5`.",
    ]


def test_yaml_11_boolean_keys_are_explained():
    [msg] = problems(MINIMAL + "on: 1\n")
    assert msg == "s.yaml:7:1 on: key `on` is not text (YAML reads it as `true`). Quote the key."


def test_image_px_must_be_a_multiple_of_28():
    [msg] = problems(MINIMAL + "model:\n  id: m\n  image_px: 500\n")
    assert msg == ("s.yaml:9:13 model.image_px: must be a multiple of 28 (14 px patches merged 2x2); "
                   "try 476 or 504.")


def test_missing_required_key():
    [msg] = problems(MINIMAL + "model: {id: m}\nsplit: {}\ntrain: {lora: {r: 8}}\n")
    assert msg == "s.yaml:9:1 train.optim: missing required key `optim`. Add `optim:` under `train`."
    assert problems("name: x\n") == ["s.yaml:1:1 source: missing required key `source`. "
                                     "Add `source:` at the top level."]


def test_discriminator_typo_lists_choices():
    [msg] = problems(MINIMAL.replace("table: data/demo.lance", "table: t\n  ingest:\n    from: hugginface"))
    assert msg.startswith("s.yaml:5:11 source.ingest.from: unknown `from` value `hugginface`. "
                          "Choose one of `synthetic`, `huggingface`, `parquet`, `lance`. "
                          "Did you mean `huggingface`?")
    [msg] = problems(MINIMAL.replace("table: data/demo.lance", "table: t\n  ingest:\n    frm: lance"))
    assert msg.startswith("s.yaml:5:5 source.ingest.frm: unknown key `frm`. Did you mean `from`?")


def test_all_problems_are_reported_at_once_and_sorted():
    text = MULTI_ERROR_SPEC
    with pytest.raises(SpecError) as info:
        load_spec_text(text, "specs/multi.yaml")
    found = info.value.problems
    assert len(found) == 6
    assert [p.where.line for p in found] == sorted(p.where.line for p in found)
    assert {p.path for p in found} == {"featurs", "source.ingest.rows", "model.image_px", "train.lroa",
                                       "train.optim", "features.tier2.dhash.inputs[0]"}


MULTI_ERROR_SPEC = spec_text("""
    name: demo
    featurs: {}
    source:
      table: t
      ingest:
        from: synthetic
        rows: abc
    model:
      id: m
      image_px: 100
    train:
      lroa: {r: 8}
      optim: {lr: 0.1}
    features:
      tier2:
        dhash: {udf: image.dhash, inputs: [bad-col]}
""")


def test_golden_multi_error_message():
    with pytest.raises(SpecError) as info:
        load_spec_text(MULTI_ERROR_SPEC, "specs/multi.yaml")
    check_golden("errors/multi.txt", str(info.value) + "\n")


# --- locate -------------------------------------------------------------------------------


def test_locate_nested_paths():
    text = MINIMAL + "model:\n  id: m\ntrain:\n  optim: {steps: 5}\n  lora:\n    targets:\n      - q_proj\n"
    text += "split: {}\n"
    loaded = load_spec_text(text, "s.yaml")
    assert loaded.locate("features.tier1.question_length.inputs[0]") == Location("s.yaml", 6, 50)
    assert loaded.locate("features.tier1.question_length") == Location("s.yaml", 6, 5)
    assert loaded.locate("train.lora.targets[0]") == Location("s.yaml", 13, 9)
    assert loaded.locate("train.lora") == Location("s.yaml", 11, 3)
    # absent nodes: the nearest existing ancestor
    assert loaded.locate("train.lora.alpha") == Location("s.yaml", 11, 3)
    assert loaded.locate("train.lora.targets[7]") == Location("s.yaml", 12, 5)
    assert loaded.locate("nothing.here") == Location("s.yaml", 1, 1)
    assert loaded.locate("a..b[") == Location("s.yaml")


def test_only_vlmspec_errors_escape_for_odd_inputs():
    for text in ["\x00", "{{", "{% raw %}", "\ufeff", "name: .nan\n", "source: {table: 1e999999}\n",
                 "? [a]\n: 1\n", "a: 2020-13-45\n", "a: !!int abc\n", "\t", "{#", ":\n:"]:
        try:
            load_spec_text(text)
        except VlmspecError:
            pass


@pytest.mark.parametrize("field,value,message", [
    ("limit", "abc", "s.yaml:3:15 eval.limit: expected an integer (or `all`), got `abc`."),
    ("limit", "All", "s.yaml:3:15 eval.limit: expected an integer (or `all`), got `All`. Did you mean `all`?"),
    ("limit", "0", "s.yaml:3:15 eval.limit: must be at least 1 (or `all`), got `0`."),
    ("batch_size", "fast", "s.yaml:3:20 eval.batch_size: expected an integer (or `auto`), got `fast`."),
])
def test_a_keyword_or_number_field_reports_one_located_problem(field, value, message):
    text = f"name: x\nsource: {{table: data/t.lance}}\neval: {{{field}: {value}}}\n"
    assert problems(text) == [message]


def test_eval_limit_and_batch_size_keywords_load():
    base = "name: x\nsource: {table: data/t.lance}\n"
    assert load_spec_text(base + "eval: {limit: all, batch_size: auto, compare: [base]}\n").spec.eval.limit == "all"
    ev = load_spec_text(base + "eval: {limit: null, batch_size: 64, compare: [base]}\n").spec.eval
    assert ev.limit is None and ev.batch_size == 64
    assert load_spec_text(base + "eval: {compare: [base]}\n").spec.eval.batch_size == "auto"
