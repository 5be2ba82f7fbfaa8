"""Data-side apply benchmark: a synthetic local Hugging Face folder, then ingest and dhash rows/s
through the real CLI (`vlmspec apply`), as a user runs them.

`synthetic_hf_dataset` writes TextVQA-shaped rows (the project's synthetic generator) the way
`datasets.load_dataset('...textvqa...').save_to_disk(DIR)` leaves them: `image` an HF `Image`
feature (struct of encoded JPEG bytes and a null path), the other columns under their TextVQA names.
The folder is byte-for-byte a function of (rows, seed, image_px), whatever `workers` made it.
"""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa

__all__ = ["HF_FEATURES", "folder_digest", "measure_ingest", "synthetic_hf_dataset"]


def _features():
    import datasets

    s = datasets.Value("string")
    return datasets.Features({
        "id": datasets.Value("int64"), "image": datasets.Image(), "image_id": s, "question_id": s,
        "question": s, "answers": datasets.List(s), "answer": s, "ocr_tokens": datasets.List(s),
        "image_classes": datasets.List(s), "set_name": s,
    })


HF_FEATURES = _features
"""The folder's `datasets.Features` (a function: importing this module imports no `datasets`)."""


def synthetic_hf_dataset(out_dir: str | Path, rows: int, image_px: int = 560, seed: int = 0,
                         workers: int | None = None) -> Path:
    """Write `rows` synthetic TextVQA rows as a `save_to_disk` folder at `out_dir` (replaced if
    present); the rows are rendered by `workers` spawned processes (default: every core)."""
    import datasets

    from vlmspec.runtime.sources.parallel import ingest_workers, synthetic_batches

    out = Path(out_dir)
    if out.exists():
        shutil.rmtree(out)
    batches = list(synthetic_batches(rows, seed, image_px, workers=ingest_workers(workers)))
    # One chunk per column: the Arrow files `save_to_disk` writes then never depend on how the rows
    # were cut into batches (the cuts are fixed anyway; this makes it independent of that, too).
    table = pa.Table.from_batches(batches).combine_chunks()
    features = _features()
    img = table.column("image").chunk(0)
    image = pa.StructArray.from_arrays([img.cast(pa.binary()), pa.nulls(len(img), pa.string())],
                                       names=["bytes", "path"])
    table = table.set_column(table.schema.get_field_index("image"), "image", image)
    table = table.cast(features.arrow_schema)
    # A fixed fingerprint: the default one is random for an in-memory table, and lands in state.json.
    fp = hashlib.blake2b(f"vlmspec-synthetic:{rows}:{seed}:{image_px}".encode(), digest_size=8).hexdigest()
    ds = datasets.Dataset(datasets.table.InMemoryTable(table), info=datasets.DatasetInfo(features=features),
                          split=datasets.NamedSplit("train"), fingerprint=fp)
    quiet = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()  # a bar per shard would bury the benchmark's own output
    try:
        ds.save_to_disk(str(out))
    finally:
        if quiet:
            datasets.enable_progress_bars()
    return out


def folder_digest(path: str | Path) -> str:
    """One hash over every file's relative path and bytes (determinism checks)."""
    h = hashlib.sha256()
    root = Path(path)
    for f in sorted(p for p in root.rglob("*") if p.is_file()):
        h.update(str(f.relative_to(root)).encode() + b"\0" + f.read_bytes())
    return h.hexdigest()
