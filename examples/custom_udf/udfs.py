"""User UDFs for the custom_udf example: a module next to the spec, named as `udfs:<function>`.

Each function declares its output type and default inputs with `@udf`; vlmspec reads that
declaration from this file's source without importing it (planning runs no user code), and
fingerprints the function's code, so editing it recomputes exactly its column and dependents.
UDF modules never import `vlmspec.runtime`, and import heavy libraries inside the function.
"""

import pyarrow as pa
import pyarrow.compute as pc

from vlmspec.compiler.udf import udf

_STRIP = ".,:;!?\"'()"


def _norm(word: str) -> str:
    return word.strip(_STRIP).lower()


@udf(output="bool", inputs=["answer", "ocr_tokens"])
def answer_in_ocr(answer: pa.Array, ocr_tokens: pa.Array) -> pa.Array:
    """True when every word of the answer is among the image's OCR tokens (a readable answer)."""
    out = []
    for ans, toks in zip(answer.to_pylist(), ocr_tokens.to_pylist()):
        if not ans or not toks:
            out.append(False)
            continue
        seen = {_norm(t) for t in toks}
        out.append(all(_norm(w) in seen for w in ans.split()))
    return pa.array(out, pa.bool_())


@udf(output="float", inputs=["answers"])
def annotator_agreement(answers: pa.Array) -> pa.Array:
    """Share of the ten annotators who gave the most common answer (1.0 = unanimous)."""
    out = []
    for row in answers.to_pylist():
        row = [_norm(a) for a in row or [] if a]
        out.append(max(row.count(a) for a in set(row)) / len(row) if row else None)
    return pa.array(out, pa.float32())


@udf(output="int32", inputs=["question"], batch=False)
def question_words(question: str, *, min_len: int = 1) -> int:
    """A per-row UDF (batch=False): vlmspec maps it over rows and spreads it over cores."""
    return sum(1 for w in (question or "").split() if len(w) >= min_len)


def _unused_helper():  # edits here never change a fingerprint: no UDF above refers to it
    return pc
