"""The local engine streams a whole fragment's parts to its writer thread (`executors.local._PartStream`):
each part is written while later parts compute, the result equals a buffered write, and a failure
mid-fragment (the UDF, a `fail` row, or an earlier fragment's commit) commits nothing of it.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import lance
import pyarrow as pa
import pytest
import yaml

from vlmspec.compiler.errors import ApplyError
from vlmspec.compiler.load import load_spec
from vlmspec.runtime import backfill, lance_io
from vlmspec.runtime.executors import local
from vlmspec.runtime.apply import prepare

UDFS = '''\
import pyarrow as pa

from vlmspec.compiler.udf import udf


@udf(output="int64", inputs=["id"], batch_size=8)
def triple(id):
    return pa.array([3 * v for v in id.to_pylist()], pa.int64())


@udf(output="int64", inputs=["id"], batch_size=8)
def picky(id):
    if 45 in id.to_pylist():
        raise ValueError("row 45 is bad")
    return pa.array(id.to_pylist(), pa.int64())


@udf(output="int64", inputs=["id"], batch_size=8)
class Interrupted:
    """Interrupted (Ctrl-C) on its 7th call: the 3rd of 4 parts of the second fragment."""

    def __init__(self, ctx):
        self.calls = 0

    def __call__(self, id):
        self.calls += 1
        if self.calls == 7:
            raise KeyboardInterrupt
        return pa.array(id.to_pylist(), pa.int64())


@udf(output="int64", inputs=["id"], batch_size=8)
class Prefetching:
    """Logs, per call, whether the engine had handed it this very batch to prefetch."""

    def __init__(self, ctx):
        self.ahead = []

    def prefetch(self, id):
        self.ahead.append(id)

    def __call__(self, id):
        with open(__file__.replace("udfs.py", "calls.log"), "a") as f:
            f.write("hit\\n" if any(id is a for a in self.ahead) else "miss\\n")
        return pa.array(id.to_pylist(), pa.int64())
'''

ROWS, FRAG = 96, 32  # 3 fragments of 4 parts (batch_size 8)


def _node(tmp_path: Path, name: str, udf: str, **extra):
    uri = str(tmp_path / "t.lance")
    if not Path(uri).exists():
        lance.write_dataset(pa.table({"id": pa.array(range(ROWS), pa.int64())}), uri, max_rows_per_file=FRAG)
    (tmp_path / "udfs.py").write_text(UDFS)
    spec = {"name": "t", "source": {"table": uri, "rows_per_fragment": FRAG},
            "features": {"tier1": {name: {"udf": f"udfs:{udf}", "inputs": ["id"], **extra}}},
}
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    nodes = {c.name: c for c in prepare(load_spec(tmp_path / "spec.yaml")).compiled.columns}
    return uri, nodes[name]


def _values(uri: str, name: str) -> list:
    return lance.dataset(uri).to_table(columns=["id", name]).sort_by("id").column(name).to_pylist()


def test_each_part_is_written_while_the_fragment_still_computes(tmp_path, monkeypatch):
    uri, node = _node(tmp_path, "tripled", "triple")
    real = local.compute_chunk
    streamed = []

    def gated(ds, fn, node, chunk, batch_size, emit=None, **kw):
        assert emit is not None, "a whole-fragment chunk was not streamed"
        stream = emit.__self__

        def emit_then_wait(values):
            emit(values)
            # Computing the next part waits until the writer has taken this one: only a write
            # that runs during the fragment's computation lets this finish.
            deadline = time.monotonic() + 20
            while stream.waiting():
                assert time.monotonic() < deadline, "the writer never took a part before the fragment ended"
                time.sleep(0.005)
            streamed.append(chunk.frag_id)
        return real(ds, fn, node, chunk, batch_size, emit=emit_then_wait, **kw)

    monkeypatch.setattr(local, "compute_chunk", gated)
    run = backfill.backfill_column(uri, node)
    assert streamed == [0] * 4 + [1] * 4 + [2] * 4
    assert run.rows == ROWS and run.fragments == 3
    assert _values(uri, "tripled") == [3 * i for i in range(ROWS)]
    ds = lance.dataset(uri)
    assert sorted(lance_io.fragment_fill(ds)["tripled"]) == [0, 1, 2]
    for frag in ds.get_fragments():  # the `id` file and one file for the column, as a buffered write
        assert len(lance_io._files(frag.metadata)) == 2


def test_a_fail_row_mid_fragment_keeps_the_fragments_before_and_writes_none_of_its_own(tmp_path):
    uri, node = _node(tmp_path, "checked", "picky", on_error="fail")
    with pytest.raises(ApplyError, match="row 45"):
        backfill.backfill_column(uri, node)
    assert sorted(lance_io.fragment_fill(lance.dataset(uri))["checked"]) == [0]
    assert _values(uri, "checked")[:FRAG] == list(range(FRAG))


def test_an_interrupted_udf_commits_nothing_of_its_fragment_and_the_writer_stops(tmp_path):
    uri, node = _node(tmp_path, "plain", "Interrupted")
    outcome = []

    def run():
        try:
            backfill.backfill_column(uri, node)
        except BaseException as e:  # noqa: BLE001 - KeyboardInterrupt is the point
            outcome.append(e)
    t = threading.Thread(target=run)
    t.start()
    t.join(60)
    assert not t.is_alive(), "the engine hung waiting for an abandoned streamed write"
    assert len(outcome) == 1 and isinstance(outcome[0], KeyboardInterrupt)
    assert sorted(lance_io.fragment_fill(lance.dataset(uri))["plain"]) == [0]


def test_a_failed_commit_stops_the_next_fragments_streamed_write(tmp_path, monkeypatch):
    uri, node = _node(tmp_path, "tripled", "triple")
    real = lance_io.commit_column_data
    committed = []

    def commit(uri_, version, groups):
        groups = list(groups)
        committed.append([g[0] for g in groups])
        if len(committed) == 2:
            raise OSError("disk full")
        return real(uri_, version, groups)
    monkeypatch.setattr(lance_io, "commit_column_data", commit)
    with pytest.raises(OSError, match="disk full"):
        backfill.backfill_column(uri, node)
    assert committed == [[0], [1]]  # fragment 2 was computed, but its write was stopped uncommitted
    assert sorted(lance_io.fragment_fill(lance.dataset(uri))["tripled"]) == [0]


def test_the_next_fragments_first_batch_is_prefetched_during_this_ones_last_call(tmp_path):
    uri, node = _node(tmp_path, "same", "Prefetching")
    backfill.backfill_column(uri, node)
    # Only the column's very first call had no batch handed ahead; every fragment's first call
    # (not only the calls within a fragment) gets the very arrays it was told to prefetch.
    assert (tmp_path / "calls.log").read_text().split() == ["miss"] + ["hit"] * (ROWS // 8 - 1)
    assert _values(uri, "same") == list(range(ROWS))
