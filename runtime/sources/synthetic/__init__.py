"""Deterministic, offline generator of TextVQA-shaped rows (the embedded default data source).

What it generates
-----------------
Rows shaped like the real ``lance-format/textvqa-lance`` table: a JPEG image of a rendered
text scene, a TextVQA-style question about the text in it, ten annotator answers with realistic
disagreement, the canonical (majority, lower-case) answer, noisy OCR tokens and scene tags.
Scenes are drawn with Pillow using the TTF fonts shipped inside matplotlib (DejaVu Sans / Serif /
Mono and STIX, regular / bold / italic); no system fonts, no network, no model weights.

Scene kinds: street / stop / warning / info signs, storefronts, bottles, boxes and packets,
screens (digital clock, phone lock / home screen), book covers, licence-plate-like plates,
price tags, posters and billboards with differently coloured words, sports jerseys. The text a
question asks about is drawn large and high-contrast (legible after downscaling to 112-224 px);
distractor text is smaller, and a scene's fine-print density varies from none to ~40 tokens, so
slicing on OCR-token count is meaningful. Like TextVQA (~1.3 questions per image), consecutive
rows may share an ``image_id`` and identical image bytes but ask different questions, and 1-2 %
of images are near-duplicates of an earlier image (re-encoded at another JPEG quality, cropped
by 1-3 px or slightly brightened) under a different ``image_id``; their dHash (9x8, "pixel >
left neighbour") Hamming distance to the original is guaranteed <= 4. Layout jitter and
background clutter keep accidental collisions between unrelated images rare but not absent
(seed 0, 2000 rows: 30 planted near-duplicate pairs, 11 accidental pairs among 1556 images).

Determinism contract
--------------------
Row ``i`` is a pure function of ``(seed, i, image_px)``: rows are planned in fixed blocks of
``BLOCK_ROWS`` rows, and every random choice comes from an RNG seeded by the seed and the row /
block / image index (``random.Random("<purpose>:<seed>:<index...>")`` and NumPy generators
seeded from it), never from generator state carried between rows. Hence ``generate(3000)``
starts with exactly the rows of ``generate(2000)`` (byte-identical JPEGs: fixed quality, fixed
chroma subsampling, no optimisation pass), and ``start`` / ``batch_rows`` change only how rows
are cut into batches. Scene layout (and so the text and the OCR tokens) does not depend on
``image_px``; only the pixels do. Byte-identity holds for a fixed Pillow / NumPy / font version.

Columns omitted
---------------
The real table also has ``image_emb`` and ``question_emb`` (``fixed_size_list<float32, 512>``,
CLIP embeddings shipped with the dataset). Computing them needs CLIP weights, which cannot be
downloaded here, and random vectors would masquerade as embeddings, so :data:`SCHEMA` omits
them; every other column keeps the real name, Arrow type and relative order. ``image_classes``
holds a few lower-case scene tags ("sign", "bottle", "clock", ...); TextVQA's own tags are Open
Images class names, usually capitalised. ``set_name`` is always ``"train"``.

Modules
-------
``_blocks`` plans blocks and produces each image (``_scenes`` picks a scene, laid out by
``_kinds_signage`` / ``_kinds_goods`` / ``_kinds_items`` on ``_layout``, ``_palette`` and
``_vocab``; ``_raster`` draws and encodes it); ``_ocr_noise`` and ``_annotators`` add the OCR
tokens and the answers; this module assembles rows into Arrow batches.
"""

from __future__ import annotations

from typing import Iterator

import pyarrow as pa

from ._annotators import _answers, _question_order
from ._blocks import BLOCK_ROWS, _image, _image_id, _plan, _scene, _source
from ._ocr_noise import _ocr
from ._palette import COLORS  # noqa: F401 -- a public name of the module this package replaced
from ._raster import JPEG_QUALITY, dhash
from ._scenes import SCENE_KINDS

__all__ = ["SCHEMA", "SCENE_KINDS", "generate", "generate_table", "BLOCK_ROWS", "JPEG_QUALITY",
           "dhash"]

SCHEMA: pa.Schema = pa.schema(
    [
        pa.field("id", pa.int64()),
        pa.field("image", pa.large_binary()),
        pa.field("image_id", pa.string()),
        pa.field("question_id", pa.string()),
        pa.field("question", pa.string()),
        pa.field("answers", pa.list_(pa.string())),
        pa.field("answer", pa.string()),
        pa.field("ocr_tokens", pa.list_(pa.string())),
        pa.field("image_classes", pa.list_(pa.string())),
        pa.field("set_name", pa.string()),
    ]
)


def _row(seed: int, i: int, px: int) -> tuple:
    b, off = divmod(i, BLOCK_ROWS)
    plan = _plan(seed, b)
    k, qi = plan.rows[off]
    sb, sk, _ = _source(seed, b, k)
    sc = _scene(seed, sb, sk)
    order = _question_order(seed, b, k)
    q = sc.questions[order[qi % len(order)]]
    ocr, clean = _ocr(seed, b, k)
    return (i, _image(seed, b, k, px), _image_id(seed, b, k), f"q{i:07d}", q.q, _answers(
        seed, i, q, clean), q.a, list(ocr), list(sc.classes), "train")


def generate(rows: int, seed: int = 0, image_px: int = 256, start: int = 0,
             batch_rows: int = 256) -> Iterator[pa.RecordBatch]:
    """Yield rows ``start .. start+rows-1`` as RecordBatches of ``SCHEMA`` (``batch_rows`` each,
    the last one possibly shorter). Row ``i`` depends only on ``(seed, i, image_px)``."""
    if rows < 0 or start < 0 or seed < 0:
        raise ValueError("rows, start and seed must be >= 0")
    if batch_rows < 1:
        raise ValueError("batch_rows must be >= 1")
    if image_px < 32:
        raise ValueError("image_px must be >= 32")
    names = SCHEMA.names
    buf: list[tuple] = []
    for i in range(start, start + rows):
        buf.append(_row(seed, i, image_px))
        if len(buf) == batch_rows:
            yield _to_batch(buf, names)
            buf = []
    if buf:
        yield _to_batch(buf, names)


def _to_batch(buf: list[tuple], names: list[str]) -> pa.RecordBatch:
    cols = list(zip(*buf))
    arrays = [pa.array(list(col), type=SCHEMA.field(n).type) for n, col in zip(names, cols)]
    return pa.RecordBatch.from_arrays(arrays, schema=SCHEMA)


def generate_table(rows: int, seed: int = 0, image_px: int = 256) -> pa.Table:
    """All ``rows`` rows (from 0) as one ``pa.Table`` with ``SCHEMA``."""
    return pa.Table.from_batches(list(generate(rows, seed=seed, image_px=image_px)), schema=SCHEMA)
