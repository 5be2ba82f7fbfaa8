"""Builtins declare themselves with `@udf`: BUILTINS is read from their source, their params are
checked at plan time, and their fingerprints hash a declared `version` locked to the body's hash."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from vlmspec.compiler.catalog import BUILTINS, ModelFacts
from vlmspec.compiler.compile import compile_spec
from vlmspec.compiler.errors import CompileError
from vlmspec.compiler.load import load_spec, load_spec_text
from vlmspec.compiler.params import render_template
from vlmspec.compiler.state import TableState

from helpers import GOLDEN, ROOT, check_golden

FACTS = ModelFacts("vlmspec:tiny-qwen2.5-vl", "main", 128)
SPEC = """\
name: demo
source:
  table: data/demo.lance
  ingest: {from: synthetic, rows: 10}
model: {id: "vlmspec:tiny-qwen2.5-vl", image_px: 56}
features:
  tier2:
    dhash: {udf: image.dhash, inputs: [image], params: {hash_size: HASH}}
  tier3:
    sft_tokens: {udf: vlm.sft_tokens, params: {max_tokens: TOKENS}}
"""


def compiled(text: str, spec_dir: Path | None = None):
    loaded = load_spec_text(text, "s.yaml")
    return compile_spec(loaded.spec, TableState(uri="data/demo.lance", source_rows=10), file="s.yaml",
                        locate=loaded.locate, facts=FACTS, spec_dir=spec_dir)


def errors(text: str, spec_dir: Path | None = None) -> list[str]:
    with pytest.raises(CompileError) as info:
        compiled(text, spec_dir)
    return [str(p) for p in info.value.problems]


def spec(hash_size="8", max_tokens="96") -> str:
    return SPEC.replace("HASH", hash_size).replace("TOKENS", max_tokens)


# --- BUILTINS, derived from the declarations ---------------------------------------------------

def test_builtins_are_read_from_their_declarations():
    assert sorted(BUILTINS) == ["image.dhash", "image.phash", "image.size", "text.count", "text.length",
                                "text.question_type", "text.words", "vlm.sft_tokens", "vlm.vision_tower"]
    tower = BUILTINS["vlm.vision_tower"]
    assert tower.impl == "vlmspec.runtime.udfs.vision:VisionTower" and tower.uses_model and tower.gpu
    assert BUILTINS["vlm.sft_tokens"].impl == "vlmspec.runtime.udfs.tokens:SftTokens"
    # slots are named after the positional parameters they fill
    assert [(s.name, s.accepts, s.default) for s in BUILTINS["vlm.sft_tokens"].slots] == \
        [("questions", "string", "question"), ("answers", "string", "answer")]
    assert BUILTINS["image.dhash"].parallel and not BUILTINS["image.size"].parallel
    assert BUILTINS["image.dhash"].defaults == {"hash_size": 8}


def test_reading_builtins_imports_none_of_them():
    code = ("import sys\nfrom vlmspec.compiler.catalog import BUILTINS\nassert len(BUILTINS) == 9\n"
            "bad = [m for m in sys.modules if m.startswith('vlmspec.runtime.udfs') or m in ('pyarrow', 'torch')]\n"
            "assert not bad, bad\n")
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True)


# --- declared params: types and ranges, checked at plan time -----------------------------------

def test_small_hash_sizes_compile_and_compute():
    import imagehash
    from PIL import Image

    from vlmspec.runtime.udfs.image import dhash, phash
    import pyarrow as pa

    node = compiled(spec(hash_size="6")).column("dhash")
    assert node.params == {"hash_size": 6} and node.output == "uint64"
    buf = io.BytesIO()
    Image.radial_gradient("L").convert("RGB").save(buf, format="PNG")
    images = pa.array([buf.getvalue(), None], pa.binary())
    for size in (2, 6, 8):
        got = dhash(images, hash_size=size).to_pylist()
        assert got[0] == int(str(imagehash.dhash(Image.open(io.BytesIO(buf.getvalue())), hash_size=size)), 16)
        assert got[0] < 2 ** (size * size) and got[1] is None
        assert phash(images, hash_size=size).to_pylist()[0] < 2 ** (size * size)


@pytest.mark.parametrize("value,shown", [("9", "9"), ("1", "1"), ('"abc"', '"abc"'), ("true", "true"),
                                         ("8.0", "8.0")])
def test_bad_hash_size_is_refused_at_compile_time_located(value, shown):
    (msg,) = errors(spec(hash_size=value))
    assert msg == (f"s.yaml:8:68 features.tier2.dhash.params.hash_size: `hash_size` must be a whole number from "
                   f"2 to 8, got `{shown}`. Use a whole number from 2 to 8 (the hash has hash_size² bits and is "
                   "stored as a uint64).")


def test_a_list_for_a_whole_number_is_refused():
    (msg,) = errors(spec(hash_size="[8]"))
    assert "features.tier2.dhash.params.hash_size: `hash_size` must be a whole number from 2 to 8, got `[8]`" in msg


def test_max_tokens_is_checked_like_any_declared_param():
    (msg,) = errors(spec(max_tokens="0"))
    assert msg.startswith("s.yaml:10:60 features.tier3.sft_tokens.params.max_tokens: `max_tokens` must be a whole "
                          "number from 1 to 1,000,000, got `0`.")
    assert "got `\"lots\"`" in errors(spec(max_tokens="lots"))[0]
    assert "got `1000001`" in errors(spec(max_tokens="1000001"))[0]


def test_unknown_param_gets_did_you_mean():
    (msg,) = errors(spec().replace("{hash_size: 8}", "{hash_sise: 8}"))
    assert msg == ("s.yaml:8:68 features.tier2.dhash.params.hash_sise: `image.dhash` has no parameter "
                   "`hash_sise`. Did you mean `hash_size`?")


def test_templated_whole_numbers_are_accepted_and_fingerprinted_as_written():
    text = "vars: {n: 96, h: 6}\n" + spec(hash_size='"{{ h }}"', max_tokens='"{{ n }}"')
    cols = {c.name: c for c in compiled(text).columns}
    # the rendered text is what the recipe always held: fingerprints of such specs do not move
    assert cols["sft_tokens"].params == {"max_tokens": "96"} and "[96]" in cols["sft_tokens"].output
    assert cols["dhash"].params == {"hash_size": "6"}
    plain = {c.name: c for c in compiled(spec(hash_size="6", max_tokens="96")).columns}
    assert plain["sft_tokens"].output == cols["sft_tokens"].output


def test_output_and_shape_templates():
    tower = next(c for c in compiled(spec() + "    h: {udf: vlm.vision_tower}\n").columns if c.name == "h")
    assert tower.output == "fixed_size_list<item: halffloat>[512]" and tower.shape == "fp16[4x128]"
    assert render_template("[{a}x{b}] {a*b*c}", {"a": 2, "b": 3, "c": 4}) == "[2x3] 24"
    for bad in ("{a+b}", "{__import__('os')}", "{a.b}", "{nope}", "{a", "{flag*a}"):
        with pytest.raises(ValueError):
            render_template(bad, {"a": 2, "b": 3, "flag": True})


# --- user UDFs: optional param declarations and versions ----------------------------------------

USER = '''\
from vlmspec.compiler.udf import udf

@udf(output="int32", inputs=["question"], params={"min_len": {"type": "int", "default": 1, "min": 1}}VERSION)
def typed(question, *, min_len=1):
    return BODY

@udf(output="int32", inputs=["question"])
def untyped(question, *, anything=None):
    return 0
'''
USER_SPEC = """\
name: demo
source: {table: data/demo.lance, ingest: {from: synthetic, rows: 10}}
features:
  tier1:
    a: {udf: "udfs:typed", params: PARAMS}
    b: {udf: "udfs:untyped", params: {anything: [1, "x"], zzz: true}}
"""


def _user(tmp_path: Path, params: str = "{}", version: str = "", body: str = "0"):
    (tmp_path / "udfs.py").write_text(USER.replace("VERSION", version).replace("BODY", body))
    return USER_SPEC.replace("PARAMS", params)


def test_user_udf_params_are_checked_only_when_declared(tmp_path):
    cols = {c.name: c for c in compiled(_user(tmp_path, "{min_len: 3}"), tmp_path).columns}
    assert cols["a"].params == {"min_len": 3}
    assert cols["b"].params == {"anything": [1, "x"], "zzz": True}  # undeclared: passed as written
    assert compiled(_user(tmp_path), tmp_path).column("a").params == {"min_len": 1}  # the declared default
    (msg,) = errors(_user(tmp_path, "{min_len: 0}"), tmp_path)
    assert msg.startswith("s.yaml:5:46 features.tier1.a.params.min_len: `min_len` must be a whole number of at "
                          "least 1, got `0`")
    assert "Did you mean `min_len`?" in errors(_user(tmp_path, "{min_lne: 2}"), tmp_path)[0]


def test_user_udf_version_replaces_its_code_hash(tmp_path):
    fp = lambda **kw: compiled(_user(tmp_path, **kw), tmp_path).column("a").fingerprint  # noqa: E731
    hashed, edited = fp(), fp(body="1")
    assert hashed != edited  # no version: the source is hashed, as always
    v1 = fp(version=', version="1"')
    assert v1 == fp(version=', version="1"', body="1")  # a declared version stands for the code
    assert v1 != fp(version=', version="2"')
    assert compiled(_user(tmp_path, version=', version="1"'), tmp_path).column("a").recipe["code"] == "1"


def test_builtin_only_arguments_on_a_user_udf_are_warned_about(tmp_path):
    (tmp_path / "udfs.py").write_text('from vlmspec.compiler.udf import udf\n\n'
                                      '@udf(output="int32", inputs=["question"], name="text.mine", gpu=True)\n'
                                      'def typed(question):\n    return 0\n')
    only_a = "".join(USER_SPEC.splitlines(True)[:5]).replace("PARAMS", "{}")  # without column `b`
    c = compiled(only_a, tmp_path)
    assert any("`@udf(name=, gpu=)` on `udfs:typed` only applies to builtins" in w for w in c.warnings), c.warnings


# --- the version lock and the fingerprints of the shipped specs ---------------------------------

def _builtins_text() -> str:
    return "".join(f"{n} {s.version} {s.code}\n" for n, s in sorted(BUILTINS.items()))


def test_builtin_versions_are_locked_to_their_code():
    """A body edit must either bump `version` (values change: caches recompute) or be recorded as
    speed-only by refreshing the golden (caches stay valid). Never silently."""
    path = GOLDEN / "builtins.txt"
    if os.environ.get("UPDATE_GOLDENS") != "1" and path.exists():
        locked = {n: (v, c) for n, v, c in (line.split() for line in path.read_text().splitlines())}
        stale = [f"`{n}` ({s.impl}): its code hash is now {s.code} (golden: {locked[n][1]}) but its version is still "
                 f"`{s.version}`" for n, s in BUILTINS.items()
                 if n in locked and s.code != locked[n][1] and s.version == locked[n][0]]
        if stale:
            pytest.fail("\n".join(stale) + "\nIf the change alters what the UDF computes, bump `version=` in its "
                        "`@udf(...)`: every cached column of it recomputes. If it only changes speed, record the "
                        "new hash with `pytest --update-goldens` (tests/golden/builtins.txt): caches stay valid.")
    check_golden("builtins.txt", _builtins_text())


def test_fingerprints_of_the_shipped_specs():
    """What every user's cache is keyed on: a change here recomputes their columns."""
    from vlmspec.runtime.apply import model_facts, source_info

    lines = []
    for f in ("specs/quickstart.yaml", "examples/custom_udf/spec.yaml"):
        loaded = load_spec(ROOT / f)
        rows, schema = source_info(loaded.spec.source)
        c = compile_spec(loaded.spec, TableState(uri="none", source_rows=rows, source_schema=schema),
                         facts=model_facts(loaded.spec), spec_dir=(ROOT / f).parent)
        lines += [f"{f} {n.name} {n.fingerprint}\n" for n in (*c.columns, *c.stages)]
    check_golden("fingerprints.txt", "".join(lines))


def test_tuning_is_checked_and_not_fingerprinted():
    base = spec() + "    h: {udf: vlm.vision_tower}\n"
    plain = compiled(base).column("h")
    assert plain.tuning == {"compile": True, "graph": True, "fast": True}  # None defaults: the UDF decides
    tuned = compiled(base.replace("{udf: vlm.vision_tower}", "{udf: vlm.vision_tower, tuning: {sub_batch: \"8\", "
                                  "compile: false, decode_threads: 2}}")).column("h")
    assert tuned.tuning == {"sub_batch": 8, "compile": False, "graph": True, "fast": True, "decode_threads": 2}
    assert tuned.fingerprint == plain.fingerprint and "tuning" not in json.dumps(tuned.recipe)
    bad = base.replace("{udf: vlm.vision_tower}", "{udf: vlm.vision_tower, tuning: {sub_bach: 8, graph: 2}}")
    assert errors(bad) == [
        "s.yaml:11:51 features.tier3.h.tuning.sub_bach: `vlm.vision_tower` has no tuning knob `sub_bach`. "
        "Did you mean `sub_batch`?",
        "s.yaml:11:61 features.tier3.h.tuning.graph: `graph` must be true or false, got `2`. Use true or false "
        "(replay the compiled tower as one CUDA graph per sub-batch: one launch instead of ~600).",
    ]
    (msg,) = errors(spec().replace("params: {hash_size: 8}", "tuning: {threads: 2}"))
    assert msg.endswith("`image.dhash` has no tuning knob `threads`. Tuning knobs: none.")


def test_spec_docs_list_every_builtin():
    readme = (ROOT / "README.md").read_text()
    for name in BUILTINS:
        assert f"| `{name}` |" in readme, name
