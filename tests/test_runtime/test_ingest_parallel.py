"""Ingest across cores writes what the sequential ingest writes: the same rows, in the same
fragments, for any worker count; it resumes from its commits; the synthetic HF folder of the
benchmark is byte-for-byte the same whatever made it."""

from __future__ import annotations

import lance
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from vlmspec.compiler.model import SourceSpec
from vlmspec.runtime.sources import ingest as I
from vlmspec.runtime.sources.parallel import ingest_workers, synthetic_batches
from vlmspec.runtime.sources.synthetic import generate_table

pytestmark = pytest.mark.slow


def _source(table, ingest: dict, rows_per_fragment: int = 32) -> SourceSpec:
    return SourceSpec.model_validate({"table": str(table), "ingest": ingest, "rows_per_fragment": rows_per_fragment})


def _contents(uri) -> tuple[list[int], pa.Table]:
    ds = lance.dataset(str(uri))
    return [f.count_rows() for f in ds.get_fragments()], ds.to_table()


@pytest.fixture(scope="module")
def rows() -> pa.Table:
    return generate_table(300, image_px=64)


@pytest.fixture()
def small_commits(monkeypatch):
    # Several commits and several pool units at test sizes (production: 16k-row commits, 1k spans).
    monkeypatch.setattr(I, "COMMIT_ROWS", 64)
    monkeypatch.setattr(I, "SPAN_ROWS", 40)


def test_ingest_workers_default_to_the_cores_capped():
    assert ingest_workers(3) == 3
    assert 1 <= ingest_workers() <= 32
    assert ingest_workers(10_000) == 32


def test_synthetic_batches_are_cut_and_filled_alike_for_any_worker_count():
    one = list(synthetic_batches(300, 0, 64, start=10, workers=1))
    two = list(synthetic_batches(300, 0, 64, start=10, workers=2))
    assert [b.num_rows for b in one] == [b.num_rows for b in two] == [256, 44]
    assert all(a.equals(b) for a, b in zip(one, two))
    assert pa.Table.from_batches(one).equals(generate_table(310, image_px=64).slice(10))


def test_synthetic_ingest_parallel_equals_sequential_and_resumes(tmp_path, small_commits):
    spec = {"from": "synthetic", "rows": 300, "image_px": 64}
    I.ingest(_source(tmp_path / "w1.lance", spec), workers=1)
    run = I.ingest(_source(tmp_path / "w2.lance", spec), workers=2)
    assert run.rows == 300
    assert _contents(tmp_path / "w1.lance") == _contents(tmp_path / "w2.lance")
    # A resumed synthetic ingest starts after the rows already there, in parallel too.
    I.ingest(_source(tmp_path / "r.lance", {**spec, "rows": 100}), workers=1)
    again = I.ingest(_source(tmp_path / "r.lance", spec), workers=2)
    assert (again.rows, again.skipped) == (200, 0)
    assert _contents(tmp_path / "r.lance")[1].equals(_contents(tmp_path / "w1.lance")[1])


def _hf_folder(tmp_path, rows: pa.Table):
    datasets = pytest.importorskip("datasets")
    from vlmspec.runtime.tools.bench.apply_data import HF_FEATURES

    features = HF_FEATURES()
    d = rows.to_pydict()
    d["image"] = [{"bytes": b, "path": None} for b in d["image"]]
    hf = datasets.Dataset.from_dict(d, features=features)
    datasets.DatasetDict({"train": hf}).save_to_disk(str(tmp_path / "hf"))
    return str(tmp_path / "hf")


def test_hf_folder_ingest_parallel_equals_sequential(tmp_path, rows, small_commits):
    spec = {"from": "huggingface", "dataset": _hf_folder(tmp_path, rows), "limit": 290}
    I.ingest(_source(tmp_path / "w1.lance", spec), workers=1)
    I.ingest(_source(tmp_path / "w3.lance", spec), workers=3)
    sizes, table = _contents(tmp_path / "w3.lance")
    assert (sizes, table) == _contents(tmp_path / "w1.lance")
    assert table.equals(rows.slice(0, 290))  # image bytes untouched, row order kept
    cols = {**spec, "columns": ["question_id", "image"]}
    I.ingest(_source(tmp_path / "c1.lance", cols), workers=1)
    I.ingest(_source(tmp_path / "c2.lance", cols), workers=2)
    assert _contents(tmp_path / "c1.lance") == _contents(tmp_path / "c2.lance")
    assert _contents(tmp_path / "c2.lance")[1].column_names == ["question_id", "image"]


def test_parquet_ingest_parallel_equals_sequential(tmp_path, rows, small_commits):
    pqdir = tmp_path / "pq"
    pqdir.mkdir()
    pq.write_table(rows.slice(0, 130), pqdir / "a.parquet", row_group_size=25)
    pq.write_table(rows.slice(130), pqdir / "b.parquet", row_group_size=60)
    spec = {"from": "parquet", "path": str(pqdir)}
    I.ingest(_source(tmp_path / "w1.lance", spec), workers=1)
    I.ingest(_source(tmp_path / "w2.lance", spec), workers=2)
    assert _contents(tmp_path / "w1.lance") == _contents(tmp_path / "w2.lance")
    assert _contents(tmp_path / "w2.lance")[1].equals(rows)


def test_killed_parallel_ingest_keeps_its_commits_and_resumes(tmp_path, rows, small_commits, monkeypatch):
    spec = {"from": "huggingface", "dataset": _hf_folder(tmp_path, rows)}
    real, calls = lance.write_dataset, []

    def failing(*a, **kw):  # the third commit dies (a kill, a full disk)
        calls.append(1)
        if len(calls) == 3:
            raise OSError("disk full")
        return real(*a, **kw)

    monkeypatch.setattr(I.lance, "write_dataset", failing)
    with pytest.raises(OSError, match="disk full"):
        I.ingest(_source(tmp_path / "t.lance", spec), workers=2)
    kept = lance.dataset(str(tmp_path / "t.lance")).to_table()
    assert kept.num_rows and kept.equals(rows.slice(0, kept.num_rows))  # whole commits, in source order
    monkeypatch.setattr(I.lance, "write_dataset", real)
    again = I.ingest(_source(tmp_path / "t.lance", spec), workers=2)
    assert (again.rows, again.skipped) == (300 - kept.num_rows, kept.num_rows)
    assert lance.dataset(str(tmp_path / "t.lance")).to_table().equals(rows)


def test_synthetic_hf_folder_is_byte_identical_for_any_worker_count(tmp_path):
    datasets = pytest.importorskip("datasets")
    from vlmspec.runtime.tools.bench.apply_data import folder_digest, synthetic_hf_dataset

    a = synthetic_hf_dataset(tmp_path / "a", 300, image_px=64, seed=3, workers=1)
    b = synthetic_hf_dataset(tmp_path / "b", 300, image_px=64, seed=3, workers=2)
    assert folder_digest(a) == folder_digest(b)
    assert folder_digest(a) != folder_digest(synthetic_hf_dataset(tmp_path / "c", 300, image_px=64, seed=4))
    ds = datasets.load_from_disk(str(a))
    assert ds.num_rows == 300 and ds.features["image"] == datasets.Image()
    assert ds.with_format("arrow")[:5].column("image").to_pylist()[0]["bytes"] == \
        generate_table(1, seed=3, image_px=64).column("image")[0].as_py()


def test_parquet_files_with_columns_in_another_order_read_as_the_first_file(tmp_path, rows):
    pqdir = tmp_path / "pq"
    pqdir.mkdir()
    part = rows.slice(0, 40).select(["question_id", "question", "image"])
    pq.write_table(part.slice(0, 20), pqdir / "a.parquet")
    pq.write_table(part.slice(20).select(["image", "question_id"]), pqdir / "b.parquet")  # no `question`
    for w in (1, 2):
        I.ingest(_source(tmp_path / f"w{w}.lance", {"from": "parquet", "path": str(pqdir)}), workers=w)
    t = _contents(tmp_path / "w2.lance")[1]
    assert t.column_names == ["question_id", "question", "image"]
    assert t.column("question").to_pylist() == part.column("question").to_pylist()[:20] + [None] * 20
    assert t.equals(_contents(tmp_path / "w1.lance")[1])


def test_image_bytes_are_stored_uncompressed_and_appends_keep_it(tmp_path, rows, small_commits):
    """JPEG/PNG bytes are compressed already: Lance's default page compression of them cost 4-6x the
    write's CPU for ~10 % of disk. The image field carries Lance's `compression: none` from the
    table's creation, appends (another ingest's rows) keep it, and the bytes are the source's."""
    uri = tmp_path / "t.lance"
    I.ingest(_source(uri, {"from": "synthetic", "rows": 100, "image_px": 64}), workers=1)
    I.ingest(_source(uri, {"from": "synthetic", "rows": 300, "image_px": 64}), workers=2)
    ds = lance.dataset(str(uri))
    field = ds.schema.field("image")
    assert field.metadata == I.NO_COMPRESSION
    assert all(ds.schema.field(n).metadata is None for n in ds.schema.names if n != "image")
    assert ds.to_table(columns=["image"]).column("image").equals(rows.column("image"))
    # Stored as they came: the data files hold at least every image's bytes.
    data = sum(f.stat().st_size for f in (uri / "data").iterdir())
    assert data >= sum(len(b) for b in rows.column("image").to_pylist())
