"""Benchmark tables: cheap raw TextVQA-shaped columns (no images), written fast with pyarrow.

Columns: id int64, question_id string, question string, ocr_tokens list<string>, image_id string.
Values come from small pools indexed by a seeded NumPy generator, so a million rows take about a
second; only the shape matters (plans and no-op applies must not depend on the values).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Iterator

import numpy as np
import pyarrow as pa

RAW_SCHEMA = pa.schema([
    pa.field("id", pa.int64()),
    pa.field("question_id", pa.string()),
    pa.field("question", pa.string()),
    pa.field("ocr_tokens", pa.list_(pa.string())),
    pa.field("image_id", pa.string()),
])

_STARTS = ("what is the", "how many", "what color is the", "what time is", "which", "who made the",
           "where is the", "is this a", "what number is on the", "what brand is the", "what does the")
_NOUNS = ("sign", "bottle", "clock", "jersey", "book", "plate", "poster", "store", "screen", "box", "tag")
_TOKENS = tuple("open sale fresh new free best hot cold stop exit 24 7 cafe bank taxi hotel 12:30 $4.99 "
                "north south main st ave coffee tea park welcome push pull gold star".split())

# Tier-1 features applied before timing plans / no-op applies (all builtins, all cheap).
TIER1 = {
    "question_length": ("text.length", "question"),
    "question_type": ("text.question_type", "question"),
    "ocr_token_count": ("text.count", "ocr_tokens"),
}


def _batches(rows: int, seed: int, batch_rows: int) -> Iterator[pa.RecordBatch]:
    rng = np.random.default_rng(seed)
    questions = pa.array([f"{s} {n}?" for s in _STARTS for n in _NOUNS], pa.string())
    tokens = pa.array(list(_TOKENS), pa.string())
    for start in range(0, rows, batch_rows):
        n = min(batch_rows, rows - start)
        ids = np.arange(start, start + n, dtype=np.int64)
        # 0 to 23 OCR tokens a row, empty lists included
        lens = rng.integers(0, 24, n, dtype=np.int32)
        offsets = np.zeros(n + 1, dtype=np.int32)
        np.cumsum(lens, out=offsets[1:])
        values = tokens.take(pa.array(rng.integers(0, len(tokens), int(offsets[-1]))))
        yield pa.RecordBatch.from_arrays([
            pa.array(ids),
            pa.array(np.char.add("q", ids.astype("U9")).tolist(), pa.string()),
            questions.take(pa.array(rng.integers(0, len(questions), n))),
            pa.ListArray.from_arrays(pa.array(offsets), values),
            # two questions per image, as in TextVQA: splits and dedup by image see groups
            pa.array(np.char.add("img", (ids // 2).astype("U9")).tolist(), pa.string()),
        ], schema=RAW_SCHEMA)


def write_raw_table(uri: str | Path, rows: int, *, rows_per_fragment: int = 8192, seed: int = 0) -> int:
    """(Re)create a Lance table of `rows` cheap raw rows; returns its fragment count."""
    import lance

    uri = str(uri)
    if os.path.exists(uri):
        shutil.rmtree(uri)
    # generated a fragment at a time (at most 64k rows): memory stays flat at a million rows
    batch_rows = min(rows_per_fragment, 65536)
    reader = pa.RecordBatchReader.from_batches(RAW_SCHEMA, _batches(rows, seed, batch_rows))
    ds = lance.write_dataset(reader, uri, max_rows_per_file=rows_per_fragment,
                             max_rows_per_group=min(rows_per_fragment, 8192))
    return len(ds.get_fragments())


def tier1_spec(table: str | Path, name: str = "bench", rows_per_fragment: int = 8192) -> str:
    """Spec text: the existing raw table (no ingest) plus the tier-1 features in TIER1."""
    feats = "\n".join(f"    {col}: {{udf: {udf}, inputs: [{inp}]}}" for col, (udf, inp) in TIER1.items())
    return (f"name: {name}\n"
            f"source:\n  table: \"{table}\"\n  rows_per_fragment: {rows_per_fragment}\n"
            f"features:\n  tier1:\n{feats}\n")


def dir_bytes(path: str | Path, sub: str = "") -> int:
    root = Path(path) / sub
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file()) if root.exists() else 0
