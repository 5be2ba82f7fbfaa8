"""Tier-1 builtins: cheap text features, vectorised over Arrow (no per-row Python)."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.compute as pc

from vlmspec.compiler.udf import udf

# Question types, tried in order; first match wins (anchored, case-insensitive). Compatible with
# the reference implementation's rule set so slices carry over:
QUESTION_TYPES: tuple[tuple[str, str], ...] = (
    ("how_many", r"^\s*how\s+many\b"),
    ("what_color", r"^\s*what\s+(is\s+the\s+)?colou?r\b"),
    ("what_time", r"^\s*what\s+time\b"),
    ("what_number", r"^\s*what\s+(is\s+the\s+)?number\b"),
    ("what_brand", r"^\s*what\s+(is\s+the\s+)?(brand|company|make)\b"),
    ("what_letter", r"^\s*what\s+(is\s+the\s+)?(letters?|words?)\b"),
    ("what", r"^\s*what\b"),
    ("which", r"^\s*which\b"),
    ("who", r"^\s*who\b"),
    ("where", r"^\s*where\b"),
    ("when", r"^\s*when\b"),
    ("is_does", r"^\s*(is|are|does|do|can)\b"),
)


@udf(name="text.length", inputs=["question"], accepts=["string"], output="int32", batch_size=8192,
     version="38759cabb53ff48d")
def length(text: pa.Array) -> pa.Array:
    """Characters in each string; 0 for null."""
    return pc.fill_null(pc.utf8_length(text), 0).cast(pa.int32())


@udf(name="text.words", inputs=["question"], accepts=["string"], output="int32", batch_size=8192,
     version="11cd213f132f3cae")
def words(text: pa.Array) -> pa.Array:
    """Whitespace-separated words in each string; 0 for null."""
    trimmed = pc.utf8_trim_whitespace(text)
    n = pc.list_value_length(pc.utf8_split_whitespace(trimmed))
    # "" splits into [""]: one empty word, which is no word.
    n = pc.if_else(pc.equal(trimmed, ""), 0, n)
    return pc.fill_null(n, 0).cast(pa.int32())


@udf(name="text.question_type", inputs=["question"], accepts=["string"], output="string", batch_size=8192,
     version="ebf83b6f2d1c9aee")
def question_type(text: pa.Array) -> pa.Array:
    """The first matching rule of QUESTION_TYPES, else `other` (also for null/empty)."""
    text = pc.fill_null(text.cast(pa.string()), "")
    out = pa.array(["other"] * len(text), pa.string())
    # Walk rules last-to-first so earlier rules overwrite later ones: first match wins.
    for name, pattern in reversed(QUESTION_TYPES):
        hit = pc.match_substring_regex(text, pattern, ignore_case=True)
        out = pc.if_else(hit, pa.scalar(name), out)
    return out


@udf(name="text.count", inputs=["ocr_tokens"], accepts=["list"], output="int32", batch_size=8192,
     version="ec1f9c8809dbcaa7")
def count(items: pa.Array) -> pa.Array:
    """Items in each list (e.g. OCR tokens); 0 for null."""
    return pc.fill_null(pc.list_value_length(items), 0).cast(pa.int32())
