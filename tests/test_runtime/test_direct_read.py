"""Direct reads of fixed-size columns from Lance data files (`runtime.direct_read`) and the loader's
use of them: equal to Lance's own take on every layout they accept, refused (with the reason) on
every layout they do not, and never handed a buffer that a batch still uses."""

from __future__ import annotations

import gc

import lance
import numpy as np
import pyarrow as pa
import pytest

from vlmspec.runtime.train.direct_read import BufferPool, FixedColumnReader, page_extent
from vlmspec.runtime.train.loader import SliceDataset, make_loader


def _fsl(values, size):
    return pa.FixedSizeListArray.from_arrays(pa.array(values), size)


def _table(n: int, start: int = 0, hidden: int = 300, length: int = 512) -> pa.Table:
    rng = np.random.default_rng(start)
    ids = rng.integers(0, 1000, n * length, dtype=np.int32)
    tok = pa.StructArray.from_arrays(
        [_fsl(ids, length), _fsl(np.ones(n * length, np.int8), length), _fsl(ids * 2, length)],
        names=["input_ids", "attention_mask", "labels"])
    return pa.table({"id": pa.array(np.arange(start, start + n)),
                     "h": _fsl(rng.standard_normal(n * hidden).astype(np.float16), hidden), "tok": tok})


@pytest.fixture
def multi(tmp_path):
    """Three fragments (two written, one appended), rows deleted, one column added later."""
    uri = str(tmp_path / "t.lance")
    lance.write_dataset(_table(50), uri, max_rows_per_file=20)
    lance.write_dataset(_table(17, start=50), uri, mode="append")
    ds = lance.dataset(uri)
    ds.delete("id % 7 = 3")
    ds = lance.dataset(uri)
    ds.add_columns({"extra": "id * 2"})
    return lance.dataset(uri)


def _addrs(ds) -> np.ndarray:
    return ds.to_table(columns=[], with_row_address=True).column("_rowaddr").to_numpy()


@pytest.mark.slow
@pytest.mark.parametrize("column", ["h", "tok.input_ids", "tok.attention_mask", "tok.labels"])
def test_direct_read_equals_lance_take(multi, column):
    r = FixedColumnReader.open(multi, column)
    assert isinstance(r, FixedColumnReader), r
    addrs = _addrs(multi)
    rng = np.random.default_rng(0)
    for pick in [np.sort(rng.choice(addrs, 9, replace=False)), addrs[:25], addrs[-3:]]:
        out = np.empty(len(pick) * r.row_bytes, np.uint8)
        r.read_into(pick, out)
        want = multi._take_rows(pick.tolist(), columns=[column.split(".")[0]]).column(0).combine_chunks()
        for part in column.split(".")[1:]:
            want = want.field(part)
        assert (out.view(r.dtype) == want.values.to_numpy()).all()
    with pytest.raises(KeyError, match="fragment 99"):
        r.read_into(np.array([99 << 32], np.uint64), np.empty(r.row_bytes, np.uint8))


def test_run_of_rows_is_split_at_page_ends(tmp_path):
    # Two pages in one file: rows 0-2 at byte 0, rows 3-4 at byte 1000 (bytes between belong to
    # something else). A run of consecutive rows crossing the page end must read from both places.
    path = tmp_path / "f.bin"
    data = np.arange(2000, dtype=np.uint8)
    path.write_bytes(data.tobytes())
    from vlmspec.runtime.train.direct_read import _Page

    r = FixedColumnReader("c", pa.list_(pa.uint8(), 4), [str(path)], {0: [_Page(0, 3, 0, 0), _Page(3, 2, 0, 1000)]})
    out = np.empty(5 * 4, np.uint8)
    r.read_into(np.arange(5, dtype=np.uint64), out)
    want = np.concatenate([data[0:12], data[1000:1008]])
    assert (out == want).all()
    with pytest.raises(KeyError, match="past"):
        r.read_into(np.array([5], np.uint64), np.empty(4, np.uint8))


def test_page_encodings_other_than_plain_full_zip_are_refused():
    plain = ("PageLayout { layout: Some( FullZipLayout( FullZipLayout { bits_rep: 0, bits_def: 0, num_items: 4, "
             "num_visible_items: 4, value_compression: Some( CompressiveEncoding { compression: Some( FixedSizeList( "
             "FixedSizeList { items_per_value: 8, has_validity: false, values: Some( CompressiveEncoding { "
             "compression: Some( Flat( Flat { bits_per_value: 16, data: None, }, ), ), }, ), }, ), ), }, ), "
             "layers: [ RepdefAllValidItem, ], details: Some( BitsPerValue( 128, ), ), }, ), ), }")
    assert page_extent(plain, [(64, 64)], 8, 16) == (4, 64)
    with pytest.raises(ValueError, match="full-zip"):
        page_extent(plain.replace("bits_def: 0", "bits_def: 1"), [(64, 64)], 8, 16)
    with pytest.raises(ValueError, match="does not match"):
        page_extent(plain, [(64, 64)], 8, 32)
    with pytest.raises(ValueError, match="buffer size"):
        page_extent(plain, [(64, 60)], 8, 16)


@pytest.mark.slow
def test_nullable_and_mini_block_columns_fall_back_with_a_reason(tmp_path):
    n, size = 12, 300
    vals = np.arange(n * size, dtype=np.float16)
    with_null = pa.FixedSizeListArray.from_arrays(pa.array(vals), size, mask=pa.array([i == 3 for i in range(n)]))
    zstd = pa.field("z", pa.list_(pa.float16(), size), metadata={"lance-encoding:compression": "zstd"})
    t = pa.table({"nul": with_null, "z": _fsl(vals, size), "small": _fsl(np.arange(n * 4, dtype=np.int8), 4)},
                 schema=pa.schema([pa.field("nul", with_null.type), zstd,
                                   pa.field("small", pa.list_(pa.int8(), 4))]))
    ds = lance.write_dataset(t, str(tmp_path / "t.lance"))
    for col in ["nul", "small"]:
        why = FixedColumnReader.open(ds, col)
        assert isinstance(why, str) and "full-zip" in why, (col, why)
    # pylance 14 stores full-zip fixed-width values flat even when asked for zstd; the page says so
    # and is read directly (a compressed page would fail the encoding match, as unit-tested above).
    z = FixedColumnReader.open(ds, "z")
    out = np.empty(n * z.row_bytes, np.uint8)
    z.read_into(_addrs(ds), out)
    assert (out.view(np.float16) == vals).all()
    assert "not a fixed-size list" in FixedColumnReader.open(
        lance.write_dataset(pa.table({"s": ["a"]}), str(tmp_path / "s.lance")), "s")


def test_pool_never_hands_out_a_buffer_still_in_use():
    import torch

    pool = BufferPool()
    a = pool.get(1024)
    view = torch.from_numpy(a[16:32].view(np.float16))  # a tensor made from a slice of it
    arrow = pa.py_buffer(a)
    del a
    b = pool.get(1024)
    assert b.ctypes.data != view.data_ptr() - 16  # a second buffer, the first is still referenced
    del b, arrow
    c = pool.get(1024)
    assert c.ctypes.data != view.data_ptr() - 16
    del c, view
    gc.collect()
    first = pool.get(1024)
    assert len(pool._free[1024]) == 2  # both buffers free again: reused, not a third one
    del first


@pytest.mark.slow
def test_loader_batches_are_the_same_with_and_without_direct_reads(multi):
    addrs = _addrs(multi)
    kw = dict(hiddens="h", tokens="tok", image_tokens=3, batch_size=8, seed=3, epoch=1)
    direct = list(make_loader(multi.uri, multi.version, addrs, **kw))
    lancedb_only = list(make_loader(multi.uri, multi.version, addrs, direct=False, **kw))
    threaded = list(make_loader(multi.uri, multi.version, addrs, threads=3, **kw))
    assert len(direct) == len(lancedb_only) == len(threaded) == len(addrs) // 8
    for a, b, c in zip(direct, lancedb_only, threaded):
        for t in ("vision_hiddens", "input_ids", "attention_mask", "labels"):
            assert (getattr(a, t) == getattr(b, t)).all() and (getattr(a, t) == getattr(c, t)).all()
    sd = SliceDataset(multi.uri, multi.version, addrs, ["h", "tok"])
    sd._open()
    assert set(sd._direct) == {"h", "tok"} and sd._perm is None  # no lancedb needed at all


@pytest.mark.slow
def test_short_token_rows_come_through_lancedb_and_the_hiddens_stay_direct(tmp_path):
    # 96-token rows: Lance stores the 96-byte attention mask in mini-blocks, not full-zip.
    ds = lance.write_dataset(_table(24, length=96), str(tmp_path / "t.lance"))
    sd = SliceDataset(ds.uri, ds.version, _addrs(ds), ["h", "tok"])
    rb = sd.__getitems__(list(range(8)))
    assert set(sd._direct) == {"h"} and "tok" in sd.why_not_direct and sd._perm is not None
    want = ds._take_rows(np.sort(_addrs(ds)[:8]).tolist(), columns=["h", "tok"])
    assert rb.column("h").equals(want.column("h").combine_chunks())
    assert rb.column("tok").equals(want.column("tok").combine_chunks())


@pytest.mark.slow
def test_a_direct_read_that_disagrees_with_lance_is_not_used(multi, monkeypatch):
    real = FixedColumnReader.read_into

    def off_by_one_row(self, addrs, out):
        real(self, np.asarray(addrs, np.uint64) + np.uint64(1), out)

    monkeypatch.setattr(FixedColumnReader, "read_into", off_by_one_row)
    sd = SliceDataset(multi.uri, multi.version, _addrs(multi), ["h", "tok"])
    with pytest.warns(UserWarning, match="differ from Lance"):
        rb = sd.__getitems__([0, 1, 2])
    assert sd._direct == {} and "differed" in sd.why_not_direct["h"]
    want = multi._take_rows(np.sort(_addrs(multi)[:3]).tolist(), columns=["h"])
    assert rb.column("h").equals(want.column("h").combine_chunks())


@pytest.mark.slow
def test_a_table_written_again_at_the_same_path_is_not_read_with_the_old_page_map(tmp_path):
    import shutil
    import warnings

    uri = str(tmp_path / "t.lance")
    first = lance.write_dataset(_table(10, hidden=300), uri)
    a = SliceDataset(uri, first.version, _addrs(first), ["h"]).__getitems__([0, 1])
    shutil.rmtree(uri)  # same path and fragment ids, version numbers start again, other rows
    second = lance.write_dataset(_table(30, start=5, hidden=300), uri)
    assert second.version == first.version and [f.fragment_id for f in second.get_fragments()] == [0]
    sd = SliceDataset(uri, second.version, _addrs(second), ["h"])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the old page map would fail the check against Lance
        b = sd.__getitems__([0, 1])
    assert set(sd._direct) == {"h"}
    want = second._take_rows(np.sort(_addrs(second)[:2]).tolist(), columns=["h"])
    assert b.column("h").equals(want.column("h").combine_chunks()) and not b.column("h").equals(a.column("h"))
