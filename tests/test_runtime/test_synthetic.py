"""Tests for the embedded synthetic TextVQA-shaped source (vlmspec.runtime.sources.synthetic)."""

from __future__ import annotations

import io
import re
from collections import Counter, defaultdict

import imagehash
import numpy as np
import pyarrow as pa
import pytest
from PIL import Image

from vlmspec.runtime.sources import synthetic as S

N = 300  # keep small: the machine is shared


@pytest.fixture(scope="module")
def table() -> pa.Table:
    return S.generate_table(N, seed=0)


@pytest.fixture(scope="module")
def rows(table) -> dict:
    return table.to_pydict()


def _decode(b: bytes) -> Image.Image:
    im = Image.open(io.BytesIO(b))
    im.load()
    return im


# ----------------------------------------------------------------------------- schema


def test_schema_matches_real_table_minus_embeddings(table):
    expected = pa.schema(
        [
            ("id", pa.int64()),
            ("image", pa.large_binary()),
            ("image_id", pa.string()),
            ("question_id", pa.string()),
            ("question", pa.string()),
            ("answers", pa.list_(pa.string())),
            ("answer", pa.string()),
            ("ocr_tokens", pa.list_(pa.string())),
            ("image_classes", pa.list_(pa.string())),
            ("set_name", pa.string()),
        ]
    )
    assert S.SCHEMA.equals(expected)
    assert table.schema.equals(S.SCHEMA)
    assert "image_emb" not in S.SCHEMA.names and "question_emb" not in S.SCHEMA.names
    for batch in S.generate(10, batch_rows=4):
        assert batch.schema.equals(S.SCHEMA)
    assert table.num_rows == N
    assert table.column("id").to_pylist() == list(range(N))
    assert table.column("question_id").to_pylist()[:2] == ["q0000000", "q0000001"]
    assert set(table.column("set_name").to_pylist()) == {"train"}


def test_zero_rows_and_validation():
    assert list(S.generate(0)) == []
    t = S.generate_table(0)
    assert t.num_rows == 0 and t.schema.equals(S.SCHEMA)
    with pytest.raises(ValueError):
        list(S.generate(5, batch_rows=0))
    with pytest.raises(ValueError):
        list(S.generate(5, seed=-1))


# ----------------------------------------------------------------------------- determinism


def test_prefix_property():
    a = S.generate_table(50, seed=0)
    b = S.generate_table(80, seed=0)
    assert a.equals(b.slice(0, 50))  # byte-identical JPEGs included


def test_batching_and_start_independence(table):
    batches = list(S.generate(40, seed=0, start=30, batch_rows=7))
    assert [bt.num_rows for bt in batches] == [7, 7, 7, 7, 7, 5]
    got = pa.Table.from_batches(batches, schema=S.SCHEMA)
    assert got.equals(table.slice(30, 40))
    one = pa.Table.from_batches(list(S.generate(N, seed=0, batch_rows=N)), schema=S.SCHEMA)
    assert one.equals(table)


def test_seed_changes_content():
    a = S.generate_table(20, seed=0).column("image").to_pylist()
    b = S.generate_table(20, seed=1).column("image").to_pylist()
    assert sum(x != y for x, y in zip(a, b)) >= 15


def test_image_px_changes_pixels_not_text():
    a = S.generate_table(12, seed=3, image_px=256)
    b = S.generate_table(12, seed=3, image_px=128)
    for col in ("image_id", "question", "answer", "answers", "ocr_tokens", "image_classes"):
        assert a.column(col).equals(b.column(col)), col
    assert _decode(b.column("image")[0].as_py()).size == (128, 128)


# ----------------------------------------------------------------------------- content


def test_answers_ten_and_canonical_is_majority(rows):
    for ans, a in zip(rows["answers"], rows["answer"]):
        assert len(ans) == 10
        assert a and a == a.lower() and a == a.strip()
        c = Counter(ans)
        assert a in c
        assert c[a] == max(c.values())
        assert all(v < c[a] for k, v in c.items() if k != a)  # strict plurality
    agreement = Counter(Counter(ans)[a] for ans, a in zip(rows["answers"], rows["answer"]))
    assert agreement[10] > 0 and sum(v for k, v in agreement.items() if k <= 6) > 0
    # some disagreement is only case / punctuation
    assert any(x != a and x.lower().replace("-", " ") == a.replace("-", " ")
               for ans, a in zip(rows["answers"], rows["answer"]) for x in ans)


def test_jpeg_decodes_to_square(rows):
    for b in rows["image"][:60]:
        im = _decode(b)
        assert im.format == "JPEG" and im.mode == "RGB" and im.size == (256, 256)
    t = S.generate_table(4, seed=5, image_px=160)
    for b in t.column("image").to_pylist():
        assert _decode(b).size == (160, 160)


def test_question_types_vary(rows):
    pats = [("how_many", r"^how many"), ("what_color", r"^what (is the )?colou?r"),
            ("what_time", r"^what time"), ("what_number", r"^what number"),
            ("what_brand", r"^what (brand|company|make)"), ("what_letter", r"^what (letter|word)s?"),
            ("what", r"^what"), ("which", r"^which"), ("who", r"^who"), ("where", r"^where"),
            ("when", r"^when"), ("is_does", r"^(is|are|does|do|can)\b")]
    seen = Counter()
    for q in rows["question"]:
        assert q.endswith("?") and q == q.lower()
        seen[next((n for n, p in pats if re.match(p, q)), "other")] += 1
    assert len(seen) >= 9, seen
    assert seen["what"] < 0.8 * N
    yesno = [a for q, a in zip(rows["question"], rows["answer"]) if re.match(pats[-1][1], q)]
    assert yesno and set(yesno) <= {"yes", "no"}


def test_ocr_counts_vary(rows):
    counts = np.array([len(t) for t in rows["ocr_tokens"]])
    q1, q2, q3 = np.percentile(counts, [25, 50, 75])
    assert q1 < q2 < q3, (q1, q2, q3)
    assert counts.min() <= 3 and counts.max() >= 20
    assert all(isinstance(t, str) and t for toks in rows["ocr_tokens"] for t in toks)


def test_answer_text_usually_in_ocr(rows):
    """The canonical answer is text in the image: usually its words are among the OCR tokens."""
    hits = total = 0
    for q, a, toks in zip(rows["question"], rows["answer"], rows["ocr_tokens"]):
        if a in ("yes", "no") or "color" in q:
            continue
        total += 1
        low = {t.lower() for t in toks}
        hits += all(w in low for w in a.split())
    assert hits / total > 0.6


def test_image_classes(rows):
    assert all(1 <= len(c) <= 4 for c in rows["image_classes"])
    tags = {t for c in rows["image_classes"] for t in c}
    assert {"sign", "book", "bottle", "clock"} & tags


# ----------------------------------------------------------------------------- images: sharing / near-dups


def test_some_images_shared_across_consecutive_rows(rows):
    by_id = defaultdict(list)
    for i, iid in enumerate(rows["image_id"]):
        by_id[iid].append(i)
    shared = {k: v for k, v in by_id.items() if len(v) > 1}
    assert shared, "expected multi-question images"
    assert 1.1 <= N / len(by_id) <= 1.6  # TextVQA has ~1.3 questions per image
    for iid, idx in shared.items():
        assert idx == list(range(idx[0], idx[0] + len(idx)))  # consecutive
        assert len({rows["image"][i] for i in idx}) == 1      # identical bytes
        assert len({tuple(rows["ocr_tokens"][i]) for i in idx}) == 1
        assert len({rows["question"][i] for i in idx}) == len(idx)  # different questions
    # distinct image_ids never share bytes
    first = {iid: rows["image"][idx[0]] for iid, idx in by_id.items()}
    assert len(set(first.values())) == len(first)


def test_dhash_matches_imagehash(rows):
    for b in rows["image"][:20]:
        im = _decode(b)
        assert S.dhash(im) == int(str(imagehash.dhash(im)), 16)
        assert S.dhash(b) == S.dhash(im)


def test_near_duplicates_exist(rows):
    first = {}
    for i, iid in enumerate(rows["image_id"]):
        first.setdefault(iid, i)
    hashes = {iid: imagehash.dhash(_decode(rows["image"][i])) for iid, i in first.items()}
    ids = list(hashes)
    pairs = [(a, b, hashes[a] - hashes[b]) for j, a in enumerate(ids) for b in ids[j + 1:]
             if hashes[a] - hashes[b] <= 4]
    assert pairs, "expected near-duplicate images"
    for a, b, _ in pairs:
        assert a != b and rows["image"][first[a]] != rows["image"][first[b]]
    # every planted near-duplicate is within dhash distance 4 of its source, under a new id
    planted = 0
    for blk in range(N // S.BLOCK_ROWS):
        for k, (_, src, _) in enumerate(S._plan(0, blk).images):
            if src < 0:
                continue
            dup, orig = S._image_id(0, blk, k), S._image_id(0, src, 0)
            if dup in hashes and orig in hashes:
                planted += 1
                assert dup != orig
                assert hashes[dup] - hashes[orig] <= 4
    assert planted >= 1
    # near-duplicates are rare (~1-2% of images)
    assert planted / len(ids) < 0.05
