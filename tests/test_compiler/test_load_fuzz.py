"""Property tests: whatever text goes into load.py, only a `VlmspecError` (or a spec) comes out."""

from __future__ import annotations

import copy
import os
import tempfile
from pathlib import Path

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vlmspec.compiler.errors import VlmspecError
from vlmspec.compiler.load import LoadedSpec, load_spec, load_spec_text

FUZZ = settings(max_examples=int(os.environ.get("VLMSPEC_FUZZ_EXAMPLES", "200")), deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])

VALID = {
    "name": "demo",
    "description": "fuzz base",
    "vars": {"rows": 64, "px": 448, "tag": "v1"},
    "source": {"table": "data/{{ name }}-{{ tag }}.lance",
               "ingest": {"from": "synthetic", "rows": 64, "seed": 1, "image_px": 256},
               "rows_per_fragment": 32},
    "model": {"id": "vlmspec:tiny-qwen2.5-vl", "image_px": 448, "dtype": "float32"},
    "features": {
        "tier1": {"question_length": {"udf": "text.length", "inputs": ["question"]}},
        "tier2": {"dhash": {"udf": "image.dhash", "inputs": ["image"], "output": "uint64",
                            "resources": {"cpus": 1}}},
    },
    "curation": {"where": "question_length > 3", "dedup": {"column": "dhash", "max_distance": 4}},
    "split": {"by": "image_id", "fraction": 0.2},
    "train": {"quant": {"bits": 4}, "lora": {"r": 8, "alpha": 16, "targets": ["q_proj"]},
              "optim": {"steps": 10, "lr": 0.0001}},
    "eval": {"limit": 16, "generation": {"max_new_tokens": 8}},
    "executor": {"kind": "local"},
}

SPEC_KEYS = ["name", "vars", "source", "table", "ingest", "from", "synthetic", "huggingface", "rows",
             "model", "id", "image_px", "features", "tier1", "tier2", "udf", "inputs", "params",
             "train", "lora", "r", "optim", "steps", "epochs", "split", "fraction", "eval", "compare"]
TEMPLATE_BITS = ["{{ name }}", "{{ rows }}", "{{ nope }}", "{% if rows %}", "{% endif %}", "{{", "}}",
                 "{#", "{% for x in range(3) %}{{ x }}{% endfor %}", "{{ ''.__class__ }}", "{{ 1/0 }}",
                 "{{ rows * 'a' }}", "{% raw %}", "{{ vars.rows }}", "{{ name|upper }}"]

scalars = st.one_of(
    st.none(), st.booleans(), st.integers(), st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=20), st.sampled_from(SPEC_KEYS + TEMPLATE_BITS),
    st.integers(min_value=10**18, max_value=10**40),
)
keys = st.one_of(st.sampled_from(SPEC_KEYS), st.text(max_size=8))
trees = st.recursive(
    scalars,
    lambda kids: st.one_of(st.lists(kids, max_size=4), st.dictionaries(keys, kids, max_size=5)),
    max_leaves=25,
)


def only_vlmspec_errors(text: str, overrides=()) -> None:
    try:
        result = load_spec_text(text, "fuzz.yaml", overrides)
    except VlmspecError as e:
        assert e.problems, "a VlmspecError must carry at least one problem"
        for p in e.problems:
            assert str(p) and p.where.file in ("fuzz.yaml", "")  # "" for --var items
        return
    assert isinstance(result, LoadedSpec)


def dump(data) -> str:
    return yaml.safe_dump(data, sort_keys=False, allow_unicode=True)


# (a) arbitrary text and bytes -------------------------------------------------------------

@FUZZ
@given(st.text(max_size=300))
def test_arbitrary_text(text):
    only_vlmspec_errors(text)


@FUZZ
@given(st.lists(st.sampled_from(list("{}%#[]:-,&*!|>'\"\n\t ab1.=") + TEMPLATE_BITS), max_size=40).map("".join))
def test_syntax_heavy_text(text):
    only_vlmspec_errors(text)


_TMP = Path(tempfile.mkdtemp(prefix="vlmspec-fuzz-"))


@FUZZ
@given(st.binary(max_size=300))
def test_arbitrary_bytes_from_a_file(data):
    path = _TMP / "spec.yaml"
    path.write_bytes(data)
    try:
        load_spec(path)
    except VlmspecError:
        pass


@FUZZ
@given(st.lists(st.text(max_size=12), max_size=4))
def test_arbitrary_overrides(items):
    only_vlmspec_errors(dump(VALID), items)


# (b) structured random YAML mixed with spec keys ------------------------------------------

@FUZZ
@given(st.dictionaries(st.sampled_from(SPEC_KEYS), trees, max_size=6))
def test_random_yaml_documents(data):
    only_vlmspec_errors(dump(data))


@FUZZ
@given(trees)
def test_random_yaml_under_valid_sections(tree):
    for section in ("source", "features", "train", "vars"):
        data = copy.deepcopy(VALID)
        data[section] = tree
        only_vlmspec_errors(dump(data))


# (c) mutations of a valid spec ------------------------------------------------------------

def _paths(node, prefix=()):
    yield prefix
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _paths(v, (*prefix, k))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _paths(v, (*prefix, i))


ALL_PATHS = [p for p in _paths(VALID) if p]


def _set(data, path, value=None, drop=False):
    parent = data
    for step in path[:-1]:
        parent = parent[step]
    if drop:
        del parent[path[-1]]
    else:
        parent[path[-1]] = value


@FUZZ
@given(st.lists(st.tuples(st.sampled_from(ALL_PATHS), st.sampled_from(["drop", "set"]), trees), max_size=4))
def test_mutated_valid_spec(mutations):
    data = copy.deepcopy(VALID)
    for path, op, value in mutations:
        try:
            _set(data, path, value, drop=op == "drop")
        except (KeyError, IndexError, TypeError):
            continue  # an earlier mutation removed or replaced this path
    only_vlmspec_errors(dump(data))


@FUZZ
@given(st.integers(min_value=0), st.sampled_from(TEMPLATE_BITS + ["\n", "  ", ": ", "- ", "&a ", "*a", "\x00"]))
def test_text_insertions_into_valid_spec(where, snippet):
    text = dump(VALID)
    pos = where % (len(text) + 1)
    only_vlmspec_errors(text[:pos] + snippet + text[pos:])


def test_valid_base_spec_loads():
    loaded = load_spec_text(dump(VALID), "fuzz.yaml")
    assert loaded.spec.source.table == "data/demo-v1.lance"


# (d) load + compile: specs of a valid shape whose meaning is random --------------------------
# The generators are the ones `vlmspec bench fuzz` runs thousands of times (runtime/bench/fuzz.py);
# here hypothesis drives them. Compile runs against an empty table, with the model's facts known.

from vlmspec.compiler.catalog import ModelFacts  # noqa: E402
from vlmspec.compiler.compile import compile_spec  # noqa: E402
from vlmspec.compiler.errors import CompileError  # noqa: E402
from vlmspec.compiler.state import TableState  # noqa: E402
from vlmspec.runtime.tools.bench import fuzz as _fuzz  # noqa: E402

_JUDGE = _fuzz.Judge(Path(tempfile.mkdtemp(prefix="vlmspec-fuzz-compile-")))


def only_vlmspec_errors_through_compile(family: str, case: str) -> None:
    before = len(_JUDGE.failures)
    _JUDGE.run(family, case)
    assert len(_JUDGE.failures) == before, _JUDGE.failures[-1]["traceback"]


@FUZZ
@given(st.randoms(use_true_random=False))
def test_valid_shape_specs_compile_or_raise_only_vlmspec_errors(r):
    only_vlmspec_errors_through_compile("valid_shape", _fuzz.dump(_fuzz.random_valid_shape(r)))


@FUZZ
@given(st.randoms(use_true_random=False))
def test_mutated_specs_compile_or_raise_only_vlmspec_errors(r):
    only_vlmspec_errors_through_compile("mutated", _fuzz.dump(_fuzz.random_mutation(r)))


def test_the_bugs_fuzzing_found_are_located_errors():
    base = {"name": "x", "source": {"table": "t.lance", "ingest": {"from": "synthetic"}},
            "model": {"id": "vlmspec:tiny-qwen2.5-vl", "image_px": 56}}
    for col, want in [({"udf": "vlm.sft_tokens", "params": {"max_tokens": float("inf")}}, "params must be plain values"),
                      ({"udf": "vlm.sft_tokens", "params": {"max_tokens": 0}}, "`max_tokens` must be a whole number"),
                      ({"udf": "text.length", "params": {"x": {1: "a", "b": "c"}}}, "params must be plain values")]:
        text = dump({**base, "features": {"tier3": {"c": col}}})
        before = dict(_JUDGE.counts["valid_shape"])
        only_vlmspec_errors_through_compile("valid_shape", text)
        assert _JUDGE.counts["valid_shape"]["vlmspec_errors"] == before["vlmspec_errors"] + 1
        loaded = load_spec_text(text, "fuzz.yaml")
        try:
            compile_spec(loaded.spec, TableState(uri="t.lance"), file="fuzz.yaml", locate=loaded.locate,
                         facts=ModelFacts("vlmspec:tiny-qwen2.5-vl", "main", 128))
        except CompileError as e:
            assert want in str(e) and str(e).startswith("fuzz.yaml:"), str(e)
        else:
            raise AssertionError(f"no error for {col}")
