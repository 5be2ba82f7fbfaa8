"""`vlmspec bench badrows`: each kind of bad row through the image, vision-tower and SFT-token UDFs.

A Parquet source holds good synthetic rows plus one row per bad kind (corrupt, truncated, zero-byte
and non-image bytes, decompression bombs, a null image; empty, null, special-token and too-long
text). It is applied twice: with `on_error: null` every column must complete with exactly the bad
rows null and listed in `vlmspec errors`, and the raw columns unchanged; with `on_error: fail` each
column must stop with an `ApplyError` naming the first bad row. Sources that are wrong as a whole
(binary bytes declared as text, a missing column) must be refused at plan time with a located error.
"""

from __future__ import annotations

import json
import struct
import tempfile
import time
import zlib
from pathlib import Path
from typing import Any

import yaml

from .common import Results, load

IMAGE_COLUMNS = ("dhash", "phash", "image_size", "vision_tower_hiddens")
TEXT_COLUMNS = ("sft_tokens",)
FEATURES = {
    "tier2": {"dhash": {"udf": "image.dhash"}, "phash": {"udf": "image.phash"}, "image_size": {"udf": "image.size"}},
    "tier3": {"vision_tower_hiddens": {"udf": "vlm.vision_tower", "batch_size": 8},
              "sft_tokens": {"udf": "vlm.sft_tokens", "params": {"max_tokens": 96}}},
}


def _png(width: int, height: int, bit_depth: int = 1) -> bytes:
    """An all-black grayscale PNG, built by hand so a huge one costs kilobytes, not gigabytes."""
    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

    row = b"\x00" * (1 + (width * bit_depth + 7) // 8)  # filter byte + packed pixels
    idat = zlib.compressobj(9)
    body = b"".join(idat.compress(row) for _ in range(height)) + idat.flush()
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, bit_depth, 0, 0, 0, 0))
            + chunk(b"IDAT", body) + chunk(b"IEND", b""))


def _bomb_header(width: int, height: int) -> bytes:
    """A PNG header claiming `width` x `height` with almost no pixel data behind it."""
    # a real 16 x 16 image behind a header that lies: the decoder must refuse it by size
    png = _png(16, 16)
    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    start = 8 + 8  # signature, then the IHDR chunk's length and tag
    crc = struct.pack(">I", zlib.crc32(b"IHDR" + ihdr) & 0xFFFFFFFF)
    return png[:start] + ihdr + crc + png[start + 13 + 4:]


def image_kinds(good_jpeg: bytes) -> dict[str, bytes | None]:
    """Bad image bytes by kind (a good JPEG is the starting point for corrupt and truncated)."""
    return {
        # the JPEG's first bytes kept, so it is still taken for a JPEG and fails in the decoder
        "corrupt_image": good_jpeg[:20] + bytes((b * 7 + 3) % 256 for b in good_jpeg[20:400]),
        "truncated_image": good_jpeg[: len(good_jpeg) // 2],
        "zero_byte_image": b"",
        "non_image_bytes": b"question,answer\nwhat is it?,a csv file\n",
        "bomb_100mp": _png(10_000, 10_000),  # over the 64 MP limit: only a warning in stock Pillow
        "bomb_header_400mp": _bomb_header(20_000, 20_000),
        "null_image": None,
    }


TEXT_KINDS = {  # column -> value; answers are `answer`, the rest is the question
    "empty_question": ("question", ""),
    "whitespace_question": ("question", "   \n\t"),
    "special_token_question": ("question", "what is <|image_pad|> written here?"),
    "null_answer": ("answer", None),
    "answer_too_long": ("answer", " ".join(["supercalifragilistic"] * 120)),
}


def build_source(out: Path, good_rows: int = 4, image_px: int = 64) -> tuple[Path, dict[str, str]]:
    """A Parquet file of good rows then one row per bad kind; returns it and kind -> question_id."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from ...sources.synthetic import generate_table

    kinds = list(image_kinds(b"")) + list(TEXT_KINDS)
    table = generate_table(good_rows + len(kinds), image_px=image_px)
    cols = {name: table.column(name).to_pylist() for name in table.column_names}
    jpeg = cols["image"][0]
    bad_images = image_kinds(jpeg)
    by_kind = {}
    for i, kind in enumerate(kinds):
        row = good_rows + i
        by_kind[kind] = cols["question_id"][row]
        if kind in bad_images:
            cols["image"][row] = bad_images[kind]
        else:
            column, value = TEXT_KINDS[kind]
            cols[column][row] = value
    out.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({n: pa.array(v, table.schema.field(n).type) for n, v in cols.items()}), out)
    return out, by_kind


def write_spec(d: Path, source: Path, on_error: str, columns: tuple[str, ...] = IMAGE_COLUMNS + TEXT_COLUMNS,
               table: str = "t") -> Path:
    features: dict[str, dict[str, Any]] = {}
    for tier, cols in FEATURES.items():
        for name, col in cols.items():
            if name in columns:
                features.setdefault(tier, {})[name] = {**col, "on_error": on_error}
    spec = {"name": f"badrows-{on_error}", "source": {"table": str(d / f"{table}.lance"),
                                                      "ingest": {"from": "parquet", "path": str(source)}},
            "model": {"id": "vlmspec:tiny-qwen2.5-vl", "image_px": 56}, "features": features,
            # one worker: rows fail in table order, so `fail` can be checked to name the first bad row
            "executor": {"workers": 1}}
    path = d / f"{table}.yaml"
    d.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def row_errors(uri: str) -> dict[tuple[str, str], str]:
    """(column, question_id) -> error, for the errors `vlmspec errors` would list."""
    import lance

    from ... import lance_io

    ds = lance.dataset(uri)
    addr = ds.to_table(columns=["question_id"], with_row_address=True)
    qid = dict(zip(addr.column("_rowaddr").to_pylist(), addr.column("question_id").to_pylist()))
    out = {}
    path = lance_io.sidecar_dir(uri) / "errors.jsonl"
    for line in path.read_text().splitlines() if path.exists() else []:
        r = json.loads(line)
        out[(r["column"], qid[r["row_addr"]])] = r["error"]
    return out


def _short(error: str) -> str:
    return error.split("\n")[0][:160]


def run_null(workdir: Path, source: Path, by_kind: dict[str, str]) -> dict[str, Any]:
    """on_error: null: per kind and column, `value`, `null` or `row error: ...`."""
    import lance
    import pyarrow.parquet as pq

    from vlmspec.compiler.load import load_spec

    from ...apply import apply

    spec = write_spec(workdir, source, "null")
    t0 = time.perf_counter()
    res = apply(load_spec(spec))
    seconds = time.perf_counter() - t0
    uri = str(workdir / "t.lance")
    # sorted like `src` below, so `raw_unchanged` compares row for row
    table = lance.dataset(uri).to_table().sort_by("question_id")
    errors = row_errors(uri)
    rows = {q: i for i, q in enumerate(table.column("question_id").to_pylist())}
    outcome: dict[str, dict[str, str]] = {}
    for kind, q in by_kind.items():
        outcome[kind] = {}
        for col in IMAGE_COLUMNS + TEXT_COLUMNS:
            value = table.column(col)[rows[q]].as_py()
            err = errors.get((col, q))
            outcome[kind][col] = f"row error: {_short(err)}" if err else ("null" if value is None else "value")
    good = [q for q in rows if q not in by_kind.values()]
    src = pq.read_table(source).sort_by("question_id")
    return {"status": res.record.status, "seconds": round(seconds, 2), "outcome": outcome,
            "errors_listed": len(errors),
            "good_rows_complete": all(table.column(c)[rows[q]].as_py() is not None
                                      for q in good for c in IMAGE_COLUMNS + TEXT_COLUMNS),
            "raw_unchanged": table.select(src.column_names).equals(src),
            "steps": {s["name"]: {"rows": s["rows"], "errors": s.get("errors")} for s in res.record.steps}}


def run_fail(workdir: Path, source: Path, by_kind: dict[str, str]) -> dict[str, Any]:
    """on_error: fail, one column at a time: the ApplyError, and whether it names the first bad row."""
    from vlmspec.compiler.errors import ApplyError
    from vlmspec.compiler.load import load_spec

    from ...apply import apply

    out = {}
    for col in IMAGE_COLUMNS + TEXT_COLUMNS:
        spec = write_spec(workdir, source, "fail", (col,), table=f"fail_{col}")
        try:
            apply(load_spec(spec))
            out[col] = {"raised": False}
        except ApplyError as e:
            msg = str(e)
            named = [k for k, q in by_kind.items() if f"question_id='{q}'" in msg]
            out[col] = {"raised": True, "names_row": named[0] if named else None, "message": msg[:400]}
    return out


def run_upfront(workdir: Path, good: Path) -> dict[str, Any]:
    """Whole-source problems caught by `plan`, before any row is read."""
    import lance
    import pyarrow as pa
    import pyarrow.parquet as pq

    from vlmspec.compiler.errors import VlmspecError
    from vlmspec.compiler.load import load_spec

    from ...apply import prepare

    t = pq.read_table(good)
    workdir.mkdir(parents=True, exist_ok=True)
    cases = {}
    binary = t.set_column(t.column_names.index("question"), "question",
                          pa.array([b"\xff\xfe not utf-8 \xc3\x28"] * t.num_rows, pa.binary()))
    pq.write_table(binary, workdir / "binary.parquet")
    cases["binary_text_parquet"] = ("parquet", str(workdir / "binary.parquet"))
    pq.write_table(t.drop_columns(["answer"]), workdir / "no_answer.parquet")
    cases["missing_column_parquet"] = ("parquet", str(workdir / "no_answer.parquet"))
    lance.write_dataset(t.drop_columns(["answer"]), str(workdir / "no_answer.lance"))
    cases["missing_column_lance"] = ("lance", str(workdir / "no_answer.lance"))
    out = {}
    for kind, (src, path) in cases.items():
        spec = write_spec(workdir, Path(path), "null", ("sft_tokens",), table=f"up_{kind}")
        data = yaml.safe_load(spec.read_text())
        data["source"]["ingest"] = {"from": src, ("path" if src == "parquet" else "uri"): path}
        spec.write_text(yaml.safe_dump(data, sort_keys=False))
        try:
            prepare(load_spec(spec))
            out[kind] = {"refused_at_plan": False}
        except VlmspecError as e:
            out[kind] = {"refused_at_plan": True, "error": type(e).__name__, "message": str(e)[:300],
                         "located": str(e).startswith(str(spec) + ":")}
    return out


def expected(kind: str, column: str) -> str:
    """What each kind must give under `on_error: null` (`row error`, `null` or `value`)."""
    if kind in TEXT_KINDS:
        return "row error" if column in TEXT_COLUMNS else "value"
    if column in TEXT_COLUMNS:
        return "value"
    if kind == "null_image":
        # image.* UDFs pass a null image through as null; the tower has nothing to embed and reports the row
        return "row error" if column == "vision_tower_hiddens" else "null"
    if kind == "truncated_image" and column == "image_size":
        return "value"  # the header is intact: the size is right, and nothing is decoded
    return "row error"


def run(out: Path, good_rows: int = 4) -> Results:
    import pyarrow.parquet as pq

    res = Results("badrows", "Bad rows: per-row errors under `on_error`, or a clear up-front error",
                  {"good_rows": good_rows, "columns": list(IMAGE_COLUMNS + TEXT_COLUMNS)})
    with tempfile.TemporaryDirectory(prefix="vlmspec-badrows-") as tmp:
        d = Path(tmp)
        source, by_kind = build_source(d / "src" / "rows.parquet", good_rows)
        lb = load()
        null = run_null(d / "null", source, by_kind)
        res.figure("apply_null", "apply with on_error: null (all columns)", "s").add(null["seconds"], lb, load())
        fail = run_fail(d / "fail", source, by_kind)
        good = d / "src" / "good.parquet"
        # good rows only: the up-front cases must be refused for the whole-source problem alone
        pq.write_table(pq.read_table(source).slice(0, good_rows), good)
        upfront = run_upfront(d / "upfront", good)
    first_bad = {col: next((k for k in by_kind if expected(k, col) == "row error"), None)
                 for col in IMAGE_COLUMNS + TEXT_COLUMNS}
    kinds = {}
    for kind, cols in null["outcome"].items():
        ok = all(got.split(":")[0] == expected(kind, col) for col, got in cols.items())
        kinds[kind] = {"null": cols, "as_expected": ok}
    wrong = [k for k, v in kinds.items() if not v["as_expected"]]
    fail_ok = all(f["raised"] and f["names_row"] == first_bad[c] for c, f in fail.items())
    up_ok = all(u["refused_at_plan"] and u["located"] for u in upfront.values())
    res.derive("kinds", "bad-row kinds tried", len(kinds) + len(upfront))
    res.derive("null_ok", "kinds with the expected outcome under `on_error: null`", len(kinds) - len(wrong),
               target=f"{len(kinds)}", met=not wrong)
    res.derive("lost", "good rows lost or raw bytes changed", 0 if null["good_rows_complete"] and null["raw_unchanged"]
               else 1, target="0", met=null["good_rows_complete"] and null["raw_unchanged"])
    res.derive("fail_ok", "columns whose `fail` names the first bad row", sum(
        1 for c, f in fail.items() if f["raised"] and f["names_row"] == first_bad[c]), target=f"{len(fail)}", met=fail_ok)
    res.derive("upfront", "whole-source problems refused at plan time, located", sum(
        1 for u in upfront.values() if u["refused_at_plan"] and u["located"]), target=f"{len(upfront)}", met=up_ok)
    res.details = {"kinds": kinds, "null_run": {k: v for k, v in null.items() if k != "outcome"}, "fail": fail,
                   "first_bad_row": first_bad, "upfront": upfront}
    return res
