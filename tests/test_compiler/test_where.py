"""`curation.where` at plan time: one boolean expression, typed against the table's columns.

Every refusal here is one Lance would make at apply (tests/test_runtime/test_curate.py checks that
against the installed Lance), except `;` and a dangling alias, which Lance silently cuts off."""

from __future__ import annotations

import textwrap

import pytest

from vlmspec.compiler.compile import compile_spec
from vlmspec.compiler.errors import CompileError
from vlmspec.compiler.load import load_spec_text
from vlmspec.compiler.state import TableState
from vlmspec.compiler.where import WhereError, check_where, parse_where

SPEC = textwrap.dedent("""\
    name: w
    source:
      table: data/w.lance
      ingest: {from: synthetic, rows: 10}
    features:
      tier1:
        ocr_token_count: {udf: text.count, inputs: [ocr_tokens]}
      tier2:
        dhash: {udf: image.dhash, inputs: [image]}
        image_size: {udf: image.size, inputs: [image]}
    curation:
      where: WHERE
""")


def compile_where(where: str):
    loaded = load_spec_text(SPEC.replace("WHERE", f'"{where}"'), "s.yaml")
    state = TableState(uri="data/w.lance", source_rows=10)
    return compile_spec(loaded.spec, state, file="s.yaml", locate=loaded.locate)


def refusal(where: str) -> str:
    with pytest.raises(CompileError) as e:
        compile_where(where)
    [p] = e.value.problems
    return str(p)


@pytest.mark.parametrize("where", [
    "ocr_token_count >= quantile(ocr_token_count, 0.75)",
    "ocr_token_count < quantile(ocr_token_count, 0.5) + 1 AND image_id <> 'x'",
    "question LIKE 'what%' OR length(question) > 20",
    "image_size.width >= 100 AND dhash IS NOT NULL",
    "array_has(ocr_tokens, 'stop') AND NOT question_type IS NULL" .replace("question_type", "question"),
    "answer IN ('yes', 'no') AND ocr_token_count BETWEEN 2 AND 8",
    "CAST(ocr_token_count AS DOUBLE) > 1.5 AND `question` <> ''",
])
def test_valid_predicates_compile(where):
    stage = compile_where(where).stage("curate")
    assert "ocr_token_count" in stage.reads or "question" in stage.reads or "image_size" in stage.reads


def test_a_second_statement_is_refused_not_cut_off():
    """`1=1; drop table x` used to reach Lance, which kept `1=1`: the slice became the whole table."""
    assert refusal("1=1; drop table x") == (
        "s.yaml:12:10 curation.where: `;` ends the expression and `drop table x` follows it: `where` is one "
        "boolean expression, not SQL statements. Remove the `;` and what follows it.")
    assert "is a SQL statement" in refusal("select 1")
    assert "`b` follows the expression `ocr_token_count > 1`" in refusal("ocr_token_count > 1 b")
    with pytest.raises(WhereError):
        parse_where("x = 1;")


@pytest.mark.parametrize("where, what", [
    ("question > 3", "`question > 3` compares `question`, a string column (`string`), with an integer literal. "
                     "Quote the value"),
    ("ocr_token_count > '3'", "compares `ocr_token_count`, an integer column (`int32`), with a string literal"),
    ("ocr_token_count > 2.5", "compares the integer column `ocr_token_count` with the decimal 2.5: Lance does not "
                              "convert it. Compare with an integer, or write `CAST(ocr_token_count AS DOUBLE)`"),
    ("dhash > -1", "-1 does not fit `dhash`, which is `uint64`"),
    ("question = ocr_token_count", "compares a string value with an integer one"),
    ("ocr_tokens = 'a'", "a list column (`list<item: string>`), with a string literal. Test the list with a function"),
    ("image_size > 3", "a struct column"),
    ("ocr_token_count", "`ocr_token_count` is an integer value, not a boolean"),
    ("question = 'a' AND ocr_token_count", "`ocr_token_count` in `question = 'a' AND ocr_token_count` is an integer"),
    ("question LIKE 3 OR ocr_token_count LIKE 'a'", "matches a pattern against an integer value"),
    ("quantile(question, 0.5) < 3", "`quantile(question, ...)` needs a numeric column"),
])
def test_type_mismatches_are_refused_at_plan_time(where, what):
    msg = refusal(where)
    assert msg.startswith("s.yaml:12:10 curation.where: ") and what in msg, msg


@pytest.mark.parametrize("where, what", [
    ("strlen(question) > 3", "unknown function `strlen` in `STRLEN(question)`: Lance's filter has no such function. "
                             "Lance runs DataFusion's scalar functions"),
    ("lenght(question) > 3", "unknown function `lenght` in `LENGHT(question)`: Lance's filter has no such function. "
                             "Did you mean `length`?"),
    ("question ~ 'a'", "unknown function `regexp_matches`"),
    ("unnest(ocr_tokens) = 'a'", "is a table function"),
    ("max(ocr_token_count) > 3", "`max` is an aggregate function: `where` tests one row at a time. For a threshold "
                                 "over the whole table use `quantile(col, q)`"),
    ("ocr_token_count > (SELECT 1)", "is a subquery"),
    ("CASE WHEN ocr_token_count > 1 THEN true ELSE false END", "does not support `CASE`"),
])
def test_functions_lance_cannot_run_are_refused(where, what):
    msg = refusal(where)
    assert msg.startswith("s.yaml:12:10 curation.where: ") and what in msg, msg


def test_unknown_types_are_let_through_and_struct_fields_read_their_column():
    # An HF source before ingest: raw columns are unknown, so only the shape is checked.
    assert check_where("question > 3 AND lower(x) = 'a'", {}).problems == []
    check = check_where("image_size.width > 3", {"image_size": "struct<width: int32, height: int32>"})
    assert check.reads == ["image_size"] and check.problems == []


def test_unknown_column_is_still_named_with_a_suggestion():
    assert "unknown column `ocr_token_cont`. Did you mean `ocr_token_count`?" in refusal("ocr_token_cont > 3")
