"""Tier-2 chunks are cut inside fragments when fragments are fewer than the workers: every worker
gets work, commits stay per fragment, and the values are the same bytes as one chunk a fragment."""

from __future__ import annotations

import lance
import pyarrow as pa
import pytest

from vlmspec.compiler.load import load_spec
from vlmspec.runtime import lance_io
from vlmspec.runtime.apply import prepare
from vlmspec.runtime.backfill import backfill_column
from vlmspec.runtime.executors.chunks import MIN_CHUNK_ROWS, pending_chunks, spread_chunks
from vlmspec.runtime.sources.ingest import ingest

pytestmark = pytest.mark.slow


def _covers(chunks, frag_rows: dict[int, int]) -> bool:
    seen: dict[int, list[tuple[int, int]]] = {}
    for c in chunks:
        seen.setdefault(c.frag_id, []).append((c.offset, c.limit))
    for fid, spans in seen.items():
        pos = 0
        for off, lim in sorted(spans):
            if off != pos:
                return False
            pos += lim
        if pos != frag_rows[fid]:
            return False
    return set(seen) == {f for f, n in frag_rows.items() if n}


def test_fragments_fewer_than_chunks_wanted_are_cut_into_even_parts(tmp_path):
    """12 fragments for 16 workers (the 12,288-row bench): ~4 equal chunks a worker, so the last
    wave is short; cut at most `largest` rows as before, a fragment's chunks differ by a row at most."""
    uri = str(tmp_path / "t.lance")
    ds = lance.write_dataset(pa.table({"id": pa.array(range(12 * 1024), pa.int64())}), uri, max_rows_per_file=1024)
    rows = lance_io.fragment_rows(ds)
    chunks = spread_chunks(ds, "x", 16, 1024)
    assert len(chunks) >= 64 and _covers(chunks, rows)
    assert max(c.limit for c in chunks) - min(c.limit for c in chunks) <= 1
    per_worker = -(-len(chunks) // 16) * max(c.limit for c in chunks)  # rows of the busiest worker
    assert per_worker <= 1.15 * sum(rows.values()) / 16


def test_few_fragments_are_cut_into_two_chunks_a_worker(tmp_path):
    uri = str(tmp_path / "t.lance")
    ds = lance.write_dataset(pa.table({"id": pa.array(range(3072), pa.int64())}), uri, max_rows_per_file=1024)
    assert len(ds.get_fragments()) == 3
    rows = lance_io.fragment_rows(ds)
    assert len(pending_chunks(ds, "x", 1024)) == 3  # before: 3 chunks for 16 workers
    chunks = spread_chunks(ds, "x", 16, 1024)
    assert len(chunks) >= 32 and max(c.limit for c in chunks) <= 96 and _covers(chunks, rows)
    assert len(spread_chunks(ds, "x", 1, 1024)) == 3  # one worker: nothing to spread
    assert len(spread_chunks(ds, "x", 2, 256)) == 12  # enough chunks already: left as they are
    tiny = spread_chunks(ds, "x", 1000, 1024)
    assert min(c.limit for c in tiny) == MIN_CHUNK_ROWS and _covers(tiny, rows)


def test_dhash_in_many_sub_fragment_chunks_equals_one_chunk_a_fragment(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    spec = tmp_path / "spec.yaml"
    spec.write_text("name: spread\nsource:\n  table: t.lance\n  rows_per_fragment: 64\n"
                    "  ingest: {from: synthetic, rows: 192, image_px: 64}\n"
                    "features:\n  tier2:\n    dhash: {udf: image.dhash, inputs: [image]}\n")
    loaded = load_spec(spec)
    ingest(loaded.spec.source, workers=1)
    node = {c.name: c for c in prepare(loaded, allow_destructive=True).compiled.columns}["dhash"]
    uri = str(tmp_path / "t.lance")
    ds = lance.dataset(uri)
    assert len(ds.get_fragments()) == 3 and len(spread_chunks(ds, "dhash", 4, 1024)) == 6

    one = backfill_column(uri, node, workers=1)
    ref = lance.dataset(uri).to_table(columns=["id", "dhash"])
    lance.dataset(uri).drop_columns(["dhash"])
    many = backfill_column(uri, node, workers=4)
    ds = lance.dataset(uri)
    assert ds.to_table(columns=["id", "dhash"]).equals(ref)
    assert (one.rows, one.fragments) == (many.rows, many.fragments) == (192, 3)  # one commit a fragment
    assert sorted(lance_io.fragment_fill(ds)["dhash"]) == [f.fragment_id for f in ds.get_fragments()]


def test_apply_starts_the_tier2_workers_while_ingest_runs(tmp_path, monkeypatch):
    """The spawn pool's start-up (~1 s a worker) used to be paid inside the first tier-2 column;
    apply now opens the executor before ingest and warms every worker with the column's UDF module."""
    from vlmspec.runtime import apply as A
    from vlmspec.runtime.executors import local

    monkeypatch.chdir(tmp_path)
    spec = tmp_path / "spec.yaml"
    spec.write_text("name: warm\nsource:\n  table: t.lance\n  rows_per_fragment: 64\n"
                    "  ingest: {from: synthetic, rows: 128, image_px: 64}\n"
                    "features:\n  tier2:\n    dhash: {udf: image.dhash, inputs: [image]}\n")
    events, futures = [], []
    prewarm, run_ingest = local.LocalExecutor.prewarm, A._run_ingest

    def spy_prewarm(self, nodes, workers=None):
        events.append(("prewarm", [n.name for n in nodes], workers))
        futures.extend(prewarm(self, nodes, workers))
        events.append(("processes", len(self._pool._processes)))  # spawned at submit, not at first chunk
        return futures

    monkeypatch.setattr(local.LocalExecutor, "prewarm", spy_prewarm)
    monkeypatch.setattr(A, "_run_ingest", lambda *a, **k: (events.append(("ingest",)), run_ingest(*a, **k))[1])
    A.apply(load_spec(spec), workers=2)
    assert events == [("prewarm", ["dhash"], 2), ("processes", 2), ("ingest",)]
    assert len(futures) == 2 and all(f.done() and f.exception() is None for f in futures)
    hashes = lance.dataset(str(tmp_path / "t.lance")).to_table(columns=["dhash"]).column("dhash")
    assert hashes.null_count == 0 and len(hashes) == 128


def test_a_warmed_worker_has_paid_its_first_call_costs():
    """`warm_worker` (what every spawned worker runs while ingest goes on) imports the builtin's
    module and runs its `warm()`: Pillow's format plugins are not imported inside the worker's first
    chunk. Checked in a fresh process."""
    import json
    import subprocess
    import sys
    import textwrap

    code = textwrap.dedent("""
        import json, sys
        from vlmspec.runtime.executors.chunks import WorkerNode, warm_worker
        names = ("PIL.JpegImagePlugin", "PIL.PngImagePlugin")
        node = WorkerNode("dhash", "image.dhash", "vlmspec.runtime.udfs.image:dhash", "", ("image",), {},
                          "uint64", True, "fail")
        before = [m for m in names if m in sys.modules]
        warm_worker(node)
        print(json.dumps([before, [m for m in names if m in sys.modules]]))
    """)
    before, after = json.loads(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                                              check=True).stdout)
    assert before == []
    assert after == ["PIL.JpegImagePlugin", "PIL.PngImagePlugin"]
