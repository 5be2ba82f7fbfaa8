"""User UDFs for the golden-plan scenarios."""

import pyarrow as pa
import pyarrow.compute as pc

from vlmspec.compiler.udf import udf


@udf(output="int32", inputs=["answer"])
def answer_words(answer, *, min_len=1):
    """Words of at least `min_len` characters in the answer."""
    words = pc.utf8_split_whitespace(pc.fill_null(answer, ""))
    flat = pc.list_flatten(words)
    keep = pc.greater_equal(pc.utf8_length(flat), min_len)
    counts = pc.list_value_length(words)
    out, i = [], 0
    for n in counts.to_pylist():
        out.append(int(pc.sum(keep.slice(i, n)).as_py() or 0))
        i += n
    return pa.array(out, pa.int32())


@udf(output="bool", inputs=["answer_words"])
def is_long(answer_words):
    return pc.greater(answer_words, 2)
