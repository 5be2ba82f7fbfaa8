"""End-to-end tests of `apply` on small on-disk Lance tables: fresh runs, evolution, appends, row
errors, a real SIGKILL mid-backfill, ingest sources, --target/--until, the table lock and the CLI.

Every spec lives in its own tmp dir next to a `udfs.py` whose UDFs append `<name> <rows>` to
`calls.log` beside it, so the tests can count exactly which rows each user UDF computed.
"""

from __future__ import annotations

import collections
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import lance
import pyarrow as pa
import pyarrow.compute as pc
import pytest
import yaml

from vlmspec.compiler.errors import ApplyError
from vlmspec.compiler.load import load_spec
from vlmspec.compiler.state import FINGERPRINT, TARGET
from vlmspec.runtime import history, lance_io
from vlmspec.runtime.apply import apply, prepare, table_lock
from vlmspec.runtime.sources.synthetic import generate_table

from helpers import kill_once_committed, table_of

RAW = ["id", "image", "image_id", "question_id", "question", "answers", "answer", "ocr_tokens",
       "image_classes", "set_name"]

UDFS = '''\
"""User UDFs for the apply tests; every call appends `<name> <rows>` to calls.log next to this file."""
import os
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc

from vlmspec.compiler.udf import udf

LOG = Path(__file__).with_name("calls.log")


def _count(name, n):
    with open(LOG, "a") as f:
        f.write(f"{name} {n}\\n")


@udf(output="int32", inputs=["answer"])
def answer_words(answer, *, min_len=1):
    _count("answer_words", len(answer))
    return pa.array([sum(1 for w in (a or "").split() if len(w) >= min_len) for a in answer.to_pylist()],
                    pa.int32())


@udf(output="bool", inputs=["answer_words"])
def is_long(answer_words):
    _count("is_long", len(answer_words))
    return pc.greater(answer_words, 1)


@udf(output="int32", inputs=["question"])
def question_words(question):
    _count("question_words", len(question))
    return pa.array([len((q or "").split()) for q in question.to_pylist()], pa.int32())


@udf(output="int32", inputs=["question_id"], batch_size=8)
def slow_id(question_id):
    _count("slow_id", len(question_id))
    time.sleep(float(os.environ.get("VLMSPEC_TEST_SLEEP", "0")))
    return pa.array([int(q[1:]) * 3 for q in question_id.to_pylist()], pa.int32())


@udf(output="int32", inputs=["question_id"])
def picky(question_id):
    _count("picky", len(question_id))
    for q in question_id.to_pylist():
        if q == "q0000150":
            raise ValueError(f"cannot handle {q}")
    return pa.array([int(q[1:]) for q in question_id.to_pylist()], pa.int32())
'''

BASE_FEATURES = {
    "tier1": {
        "question_length": {"udf": "text.length", "inputs": ["question"]},
        "ocr_token_count": {"udf": "text.count", "inputs": ["ocr_tokens"]},
        "answer_words": {"udf": "udfs:answer_words", "inputs": ["answer"], "params": {"min_len": 1}},
        "long_answer": {"udf": "udfs:is_long", "inputs": ["answer_words"]},
        "question_words": {"udf": "udfs:question_words", "inputs": ["question"]},
    },
    "tier2": {"dhash": {"udf": "image.dhash", "inputs": ["image"]}},
}
CURATION = {"name": "text_dense", "where": "ocr_token_count >= quantile(ocr_token_count, 0.5)",
            "dedup": {"column": "dhash", "max_distance": 4}}
SPLIT = {"by": "image_id", "fraction": 0.2, "seed": 0}


# --- helpers ------------------------------------------------------------------------------

def write_spec(d: Path, *, rows: int = 200, rows_per_fragment: int = 64, features=None, ingest=None,
               curate: bool = True, udfs: str = UDFS) -> Path:
    """spec.yaml (+ udfs.py unless one is there) in `d`; the table is `d/data/t.lance`."""
    d.mkdir(parents=True, exist_ok=True)
    spec = {
        "name": "t",
        "source": {"table": str(d / "data" / "t.lance"),
                   "ingest": ingest or {"from": "synthetic", "rows": rows, "image_px": 64},
                   "rows_per_fragment": rows_per_fragment},
        "features": BASE_FEATURES if features is None else features,
        "executor": {"workers": 1},
    }
    if curate:
        spec["curation"], spec["split"] = CURATION, SPLIT
    (d / "spec.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    if not (d / "udfs.py").exists():
        (d / "udfs.py").write_text(udfs)
    return d / "spec.yaml"


def calls(d: Path) -> dict[str, int]:
    """Rows each user UDF computed since the last reset."""
    out: collections.Counter = collections.Counter()
    log = d / "calls.log"
    if log.exists():
        for line in log.read_text().splitlines():
            name, n = line.split()
            out[name] += int(n)
    return dict(out)


def reset_calls(d: Path) -> None:
    (d / "calls.log").unlink(missing_ok=True)


def meta(ds, name: str) -> dict[str, str]:
    return lance_io.decode_metadata(ds.schema.field(name).metadata)


def data_files(ds) -> dict[str, dict[int, str]]:
    """Column name -> {fragment id: data file path} (the files holding that column)."""
    ids = {f.name(): lance_io._field_ids(f) for f in ds.lance_schema.fields()}
    out: dict[str, dict[int, str]] = {n: {} for n in ids}
    for frag in ds.get_fragments():
        for df in frag.metadata.files:
            for name, fids in ids.items():
                if fids & set(df.fields):
                    out[name][frag.fragment_id] = df.path
    return out


def by_id(ds, columns=None) -> pa.Table:
    return ds.to_table(columns=columns).sort_by("id")


def assert_complete(ds, name: str) -> None:
    m = meta(ds, name)
    assert m.get(FINGERPRINT), f"{name} has no fingerprint: {m}"
    assert TARGET not in m, f"{name} still has a target: {m}"
    rows = lance_io.fragment_rows(ds)
    assert sorted(lance_io.fragment_fill(ds)[name]) == sorted(f for f, n in rows.items() if n)


def col_steps(result) -> dict[str, int]:
    return {s["name"]: s["rows"] for s in result.record.steps}


# --- 1. fresh apply -----------------------------------------------------------------------

@pytest.mark.slow
def test_fresh_apply_completes_then_is_a_noop(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    spec = write_spec(tmp_path, rows=200)
    res = apply(load_spec(spec))
    assert res.plan_after is not None and res.plan_after.is_empty

    ds = lance.dataset(table_of(tmp_path))
    assert ds.count_rows() == 200 and len(ds.get_fragments()) == 4
    for name in ("question_length", "ocr_token_count", "answer_words", "long_answer", "question_words", "dhash"):
        assert_complete(ds, name)
    t = by_id(ds)
    assert t.column("id").to_pylist() == list(range(200))
    want_len = pc.fill_null(pc.utf8_length(t.column("question")), 0).cast(pa.int32())
    assert t.column("question_length").combine_chunks().equals(want_len.combine_chunks())
    want_cnt = pc.fill_null(pc.list_value_length(t.column("ocr_tokens")), 0).cast(pa.int32())
    assert t.column("ocr_token_count").combine_chunks().equals(want_cnt.combine_chunks())
    assert t.column("question_words").to_pylist() == [len(q.split()) for q in t.column("question").to_pylist()]
    assert t.column("dhash").null_count == 0
    assert calls(tmp_path) == {"answer_words": 200, "is_long": 200, "question_words": 200}
    steps = json.loads((lance_io.sidecar_dir(table_of(tmp_path)) / "state.json").read_text())["steps"]
    assert {"ingest", "curate", "split"} <= set(steps)

    loaded = load_spec(spec)
    assert prepare(loaded).plan.is_empty
    reset_calls(tmp_path)
    version = ds.version
    again = apply(loaded)
    assert again.record.steps == [] and again.record.status == "ok"
    assert lance.dataset(table_of(tmp_path)).version == version
    assert again.record.version_before == again.record.version_after == version
    assert calls(tmp_path) == {}


# --- 2. a param change recomputes exactly that column and its dependents --------------------

@pytest.mark.slow
def test_param_change_recomputes_only_column_and_dependents(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    spec = write_spec(tmp_path, rows=200)
    apply(load_spec(spec))
    before = lance.dataset(table_of(tmp_path))
    files_before = data_files(before)
    long_before = by_id(before, ["id", "long_answer"]).column("long_answer").to_pylist()
    reset_calls(tmp_path)

    features = json.loads(json.dumps(BASE_FEATURES))
    features["tier1"]["answer_words"]["params"] = {"min_len": 3}
    write_spec(tmp_path, rows=200, features=features)
    loaded = load_spec(spec)
    plan = prepare(loaded).plan
    kinds = {s.name: s.kind for s in plan.columns}
    assert kinds == {"question_length": "up_to_date", "ocr_token_count": "up_to_date", "answer_words": "recompute",
                     "long_answer": "recompute", "question_words": "up_to_date", "dhash": "up_to_date"}
    assert "min_len 1->3" in next(s.reason for s in plan.columns if s.name == "answer_words")

    res = apply(loaded)
    assert calls(tmp_path) == {"answer_words": 200, "is_long": 200}
    steps = col_steps(res)
    assert steps["answer_words"] == steps["long_answer"] == 200
    assert not {"question_length", "ocr_token_count", "question_words", "dhash", "ingest"} & set(steps)

    after = lance.dataset(table_of(tmp_path))
    files_after = data_files(after)
    for name in RAW + ["question_length", "ocr_token_count", "question_words", "dhash"]:
        assert files_after[name] == files_before[name], f"{name}'s data files were rewritten"
    for name in ("answer_words", "long_answer"):
        assert not set(files_after[name].values()) & set(files_before[name].values())
        assert_complete(after, name)
    t = by_id(after)
    want = [sum(1 for w in a.split() if len(w) >= 3) for a in t.column("answer").to_pylist()]
    assert t.column("answer_words").to_pylist() == want
    assert t.column("long_answer").to_pylist() == [w > 1 for w in want]
    assert t.column("long_answer").to_pylist() != long_before  # the new param really changed values
    assert prepare(load_spec(spec)).plan.is_empty


@pytest.mark.slow
def test_a_recompute_that_fails_keeps_the_old_column_whole_and_fresh(tmp_path, monkeypatch):
    """A recompute fills a shadow field: a failure (or a kill) leaves the old column readable and
    fresh under its old fingerprint, the plan still shows the recompute, and reverting the spec
    recomputes nothing. A recompute that completes swaps the new values in, in one commit."""
    monkeypatch.chdir(tmp_path)
    features = {"tier1": {"answer_words": {"udf": "udfs:answer_words", "inputs": ["answer"],
                                           "params": {"min_len": 1}}}}
    spec = write_spec(tmp_path, rows=200, features=features, curate=False)
    apply(load_spec(spec))
    uri = table_of(tmp_path)
    old = by_id(lance.dataset(uri), ["id", "answer_words"]).column("answer_words").to_pylist()
    old_fp = meta(lance.dataset(uri), "answer_words")[FINGERPRINT]

    broken = json.loads(json.dumps(features))
    broken["tier1"]["answer_words"]["params"] = {"min_len": "x"}  # the UDF raises TypeError on every row
    write_spec(tmp_path, rows=200, features=broken, curate=False)
    with pytest.raises(ApplyError, match="answer_words"):
        apply(load_spec(spec))
    ds = lance.dataset(uri)
    assert meta(ds, "answer_words")[FINGERPRINT] == old_fp
    assert by_id(ds, ["id", "answer_words"]).column("answer_words").to_pylist() == old
    assert next(s for s in prepare(load_spec(spec)).plan.columns if s.name == "answer_words").kind == "recompute"

    write_spec(tmp_path, rows=200, features=features, curate=False)  # revert: nothing to recompute
    reset_calls(tmp_path)
    plan = prepare(load_spec(spec)).plan
    assert {s.name: s.kind for s in plan.columns} == {"answer_words": "up_to_date",
                                                      "answer_words__vlmspec_next": "drop"}
    res = apply(load_spec(spec))
    assert calls(tmp_path) == {} and res.plan_after.is_empty
    assert lance.dataset(uri).schema.names == RAW + ["answer_words"]

    changed = json.loads(json.dumps(features))
    changed["tier1"]["answer_words"]["params"] = {"min_len": 3}
    write_spec(tmp_path, rows=200, features=changed, curate=False)
    before = lance.dataset(uri).version
    apply(load_spec(spec))
    ds = lance.dataset(uri)
    assert ds.schema.names == RAW + ["answer_words"]  # shadow swapped in, old column dropped
    assert_complete(ds, "answer_words")
    t = by_id(ds)
    assert t.column("answer_words").to_pylist() == [sum(1 for w in a.split() if len(w) >= 3)
                                                    for a in t.column("answer").to_pylist()]
    # A reader pinned to the version before sees the whole old column under the same name.
    assert by_id(lance.dataset(uri, version=before), ["id", "answer_words"]).column("answer_words").to_pylist() == old


@pytest.mark.slow
def test_a_kill_between_fill_and_swap_resumes_as_a_swap(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    features = {"tier1": {"answer_words": {"udf": "udfs:answer_words", "inputs": ["answer"],
                                           "params": {"min_len": 1}}}}
    spec = write_spec(tmp_path, rows=100, features=features, curate=False)
    apply(load_spec(spec))
    features["tier1"]["answer_words"]["params"] = {"min_len": 2}
    write_spec(tmp_path, rows=100, features=features, curate=False)

    def killed(*a, **k):
        raise KeyboardInterrupt
    monkeypatch.setattr(lance_io, "swap_in", killed)
    with pytest.raises(KeyboardInterrupt):
        apply(load_spec(spec))
    monkeypatch.undo()
    monkeypatch.chdir(tmp_path)
    step = next(s for s in prepare(load_spec(spec)).plan.columns if s.name == "answer_words")
    assert step.kind == "recompute" and step.rows == 0 and "interrupted recompute" in step.reason
    reset_calls(tmp_path)
    apply(load_spec(spec))
    assert calls(tmp_path) == {}  # the complete shadow is swapped in, nothing recomputed
    ds = lance.dataset(table_of(tmp_path))
    assert ds.schema.names == RAW + ["answer_words"]
    assert_complete(ds, "answer_words")


# --- 3. appended source rows ----------------------------------------------------------------

@pytest.mark.slow
def test_appended_rows_compute_only_the_new_rows(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    spec = write_spec(tmp_path, rows=300)
    apply(load_spec(spec))
    before = lance.dataset(table_of(tmp_path))
    old = by_id(before)
    files_before = data_files(before)
    reset_calls(tmp_path)

    write_spec(tmp_path, rows=420)
    loaded = load_spec(spec)
    plan = prepare(loaded).plan
    assert plan.ingest.kind == "append" and plan.ingest.rows == 120
    res = apply(loaded)
    steps = col_steps(res)
    assert steps["ingest"] == 120
    for name in ("question_length", "ocr_token_count", "answer_words", "long_answer", "question_words", "dhash"):
        assert steps[name] == 120, (name, steps)
    assert calls(tmp_path) == {"answer_words": 120, "is_long": 120, "question_words": 120}

    ds = lance.dataset(table_of(tmp_path))
    assert ds.count_rows() == 420
    t = by_id(ds)
    qids = t.column("question_id").to_pylist()
    assert len(set(qids)) == 420 and qids == [f"q{i:07d}" for i in range(420)]
    assert t.slice(0, 300).equals(old)  # every column of the earlier rows, unchanged
    files_after = data_files(ds)
    for name, frags in files_before.items():
        for fid, path in frags.items():
            assert files_after[name][fid] == path, f"{name} of fragment {fid} was rewritten"
    for name in ("question_length", "ocr_token_count", "answer_words", "long_answer", "question_words", "dhash"):
        assert_complete(ds, name)
        assert t.column(name).null_count == 0
    assert prepare(load_spec(spec)).plan.is_empty


# --- 4. a UDF that fails on one row -----------------------------------------------------------

PICKY = {"tier1": {"picky": {"udf": "udfs:picky", "inputs": ["question_id"], "on_error": "null"}}}
BAD_ADDR = (2 << 32) + 22  # q0000150 with 64 rows per fragment: fragment 2, offset 22


@pytest.mark.slow
def test_row_error_under_on_error_null(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from vlmspec.runtime.cli import app

    monkeypatch.chdir(tmp_path)
    spec = write_spec(tmp_path, rows=200, features=PICKY, curate=False)
    res = apply(load_spec(spec))
    assert res.record.steps[-1]["errors"] == 1
    assert any("1 row errors" in s for s in res.summary)
    ds = lance.dataset(table_of(tmp_path))
    assert_complete(ds, "picky")
    t = by_id(ds, ["id", "question_id", "picky"])
    vals = t.column("picky").to_pylist()
    assert vals[150] is None and t.column("question_id")[150].as_py() == "q0000150"
    assert vals[:150] + vals[151:] == [i for i in range(200) if i != 150]

    lines = (lance_io.sidecar_dir(table_of(tmp_path)) / "errors.jsonl").read_text().splitlines()
    assert len(lines) == 1
    err = json.loads(lines[0])
    assert err["column"] == "picky" and err["row_addr"] == BAD_ADDR
    assert (err["fragment"], err["offset"]) == (2, 22)
    assert "ValueError: cannot handle q0000150" in err["error"]
    # the row address really is that row
    got = ds.to_table(columns=["question_id"], with_row_address=True, filter="question_id = 'q0000150'")
    assert got.column("_rowaddr")[0].as_py() == BAD_ADDR

    out = CliRunner().invoke(app, ["errors", str(spec)])
    assert out.exit_code == 0, out.output
    assert f"picky  row {BAD_ADDR}" in out.stdout and "cannot handle q0000150" in out.stdout
    assert "1 row error(s)." in out.stdout
    assert prepare(load_spec(spec)).plan.is_empty

    # A fragment recomputed after a kill logs its rows again: still one error for that row.
    log = lance_io.sidecar_dir(table_of(tmp_path)) / "errors.jsonl"
    log.write_text(log.read_text() * 2)
    assert "1 row error(s)." in CliRunner().invoke(app, ["errors", str(spec)]).stdout
    # Once the UDF is fixed and the column recomputed, the old error is not the table's any more.
    udfs = tmp_path / "udfs.py"
    udfs.write_text(udfs.read_text().replace('if q == "q0000150":', 'if q == "never":'))
    res = apply(load_spec(spec))
    assert res.record.steps[-1]["errors"] == 0
    assert by_id(lance.dataset(table_of(tmp_path)), ["id", "picky"]).column("picky").null_count == 0
    out = CliRunner().invoke(app, ["errors", str(spec)])
    assert out.exit_code == 0 and "No row errors recorded." in out.stdout, out.stdout


@pytest.mark.slow
def test_row_error_under_on_error_fail_then_fix_and_resume(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    features = {"tier1": {"picky": {"udf": "udfs:picky", "inputs": ["question_id"], "on_error": "fail"}}}
    spec = write_spec(tmp_path, rows=200, features=features, curate=False)
    with pytest.raises(ApplyError) as exc:
        apply(load_spec(spec))
    msg = str(exc.value)
    assert "q0000150" in msg and str(BAD_ADDR) in msg and "resume" in msg, msg

    ds = lance.dataset(table_of(tmp_path))
    m = meta(ds, "picky")
    assert FINGERPRINT not in m and m.get(TARGET)
    assert sorted(lance_io.fragment_fill(ds)["picky"]) == [0, 1]  # fragments before the bad one are kept
    t = by_id(ds, ["id", "picky"])
    assert t.column("picky").to_pylist()[:128] == list(range(128))
    runs = history.list_runs(table_of(tmp_path))
    assert runs[-1]["status"] == "failed" and "q0000150" in runs[-1]["error"]

    # Unchanged, a rerun resumes (fragments 0-1 are not recomputed) and fails on the same row again.
    plan = prepare(load_spec(spec)).plan
    step = next(s for s in plan.columns if s.name == "picky")
    assert step.kind == "resume" and step.rows == 72
    reset_calls(tmp_path)
    with pytest.raises(ApplyError):
        apply(load_spec(spec))
    assert sorted(lance_io.fragment_fill(lance.dataset(table_of(tmp_path)))["picky"]) == [0, 1]
    # Fragment 2's batch and its per-row retries up to the bad row; fragments 0-1 (128 rows) never.
    assert 64 <= calls(tmp_path)["picky"] <= 2 * 64

    # Fixing the UDF changes its code, hence its fingerprint: the column is recomputed, and completes.
    udfs = tmp_path / "udfs.py"
    udfs.write_text(udfs.read_text().replace('if q == "q0000150":', 'if q == "never":'))
    old_fp = m[TARGET]
    plan = prepare(load_spec(spec)).plan
    step = next(s for s in plan.columns if s.name == "picky")
    assert step.kind == "recompute" and "source changed" in step.reason and step.fingerprint != old_fp
    reset_calls(tmp_path)
    res = apply(load_spec(spec))
    assert res.record.status == "ok" and calls(tmp_path) == {"picky": 200}
    ds = lance.dataset(table_of(tmp_path))
    assert_complete(ds, "picky")
    assert meta(ds, "picky")[FINGERPRINT] == step.fingerprint
    assert by_id(ds, ["id", "picky"]).column("picky").to_pylist() == list(range(200))


# --- 5. a real SIGKILL mid-backfill -------------------------------------------------------------

SLOW = {"tier1": {"question_length": {"udf": "text.length", "inputs": ["question"]},
                  "slow_id": {"udf": "udfs:slow_id", "inputs": ["question_id"]}}}


@pytest.mark.slow
def test_sigkill_mid_backfill_resumes_without_loss_or_recompute(tmp_path, monkeypatch):
    killed, clean = tmp_path / "killed", tmp_path / "clean"
    spec = write_spec(killed, rows=256, features=SLOW, curate=False)
    monkeypatch.chdir(killed)
    env = {**os.environ, "VLMSPEC_TEST_SLEEP": "0.06"}
    with open(killed / "out.txt", "wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "vlmspec.runtime.cli", "apply", str(spec)], cwd=killed,
                                env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    uri = table_of(killed)
    kill_once_committed(proc, uri, "slow_id", killed / "out.txt", timeout=60)
    assert proc.returncode == -signal.SIGKILL

    ds = lance.dataset(uri)
    committed = set(lance_io.fragment_fill(ds)["slow_id"])
    rows = lance_io.fragment_rows(ds)
    assert len(rows) == 4 and 0 < len(committed) < 4, committed
    assert FINGERPRINT not in meta(ds, "slow_id")
    raw_snapshot = by_id(ds, RAW)
    assert raw_snapshot.num_rows == 256
    lock = lance_io.sidecar_dir(uri) / "apply.lock"
    assert lock.read_text().strip() == str(proc.pid)  # the dead holder's pid is still in the file
    missing = sum(n for f, n in rows.items() if f not in committed)

    reset_calls(killed)
    res = apply(load_spec(spec))  # the stale lock file does not block: flock died with the process
    assert res.record.status == "ok"
    assert calls(killed) == {"slow_id": missing}  # committed fragments are not recomputed
    ds = lance.dataset(uri)
    assert_complete(ds, "slow_id")
    after = by_id(ds)
    assert after.num_rows == 256 and after.column("question_id").to_pylist() == [f"q{i:07d}" for i in range(256)]
    assert after.select(RAW).equals(raw_snapshot)

    # A clean, uninterrupted run elsewhere gives the same table.
    write_spec(clean, rows=256, features=SLOW, curate=False)
    monkeypatch.chdir(clean)
    apply(load_spec(clean / "spec.yaml"))
    ref = by_id(lance.dataset(table_of(clean)))
    assert after.select(RAW).equals(ref.select(RAW))
    assert after.column("slow_id").equals(ref.column("slow_id"))
    assert after.column("question_length").equals(ref.column("question_length"))
    assert after.column("slow_id").to_pylist() == [3 * i for i in range(256)]


# --- 6. ingest sources ------------------------------------------------------------------------------

@pytest.mark.slow
def test_a_killed_apply_is_in_the_log_as_killed_with_what_it_committed(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from vlmspec.runtime.cli import app

    spec = write_spec(tmp_path, rows=256, features=SLOW, curate=False)
    monkeypatch.chdir(tmp_path)
    env = {**os.environ, "VLMSPEC_TEST_SLEEP": "0.06"}
    with open(tmp_path / "out.txt", "wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "vlmspec.runtime.cli", "apply", str(spec)], cwd=tmp_path,
                                env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    kill_once_committed(proc, table_of(tmp_path), "slow_id", tmp_path / "out.txt", timeout=60)
    runs = history.list_runs(table_of(tmp_path))
    assert len(runs) == 1 and runs[0]["status"] == "killed"
    assert [s["name"] for s in runs[0]["steps"]] == ["ingest", "question_length"]  # committed before the kill
    r = CliRunner().invoke(app, ["log", str(spec)])
    assert r.exit_code == 0 and " killed " in r.stdout and "ingest(256)" in r.stdout


TEXT_ONLY = {"tier1": {"question_length": {"udf": "text.length", "inputs": ["question"]}}}


@pytest.fixture(scope="module")
def source_rows() -> pa.Table:
    return generate_table(150, image_px=64)


@pytest.mark.slow
def test_ingest_parquet_dir_and_glob_idempotent_and_appends(tmp_path, monkeypatch, source_rows):
    import pyarrow.parquet as pq

    from vlmspec.runtime.sources.ingest import ingest

    monkeypatch.chdir(tmp_path)
    pqdir = tmp_path / "pq"
    pqdir.mkdir()
    pq.write_table(source_rows.slice(0, 60), pqdir / "a.parquet")
    pq.write_table(source_rows.slice(60, 60), pqdir / "b.parquet")

    d1 = tmp_path / "dir"
    spec = write_spec(d1, features=TEXT_ONLY, curate=False, rows_per_fragment=32,
                      ingest={"from": "parquet", "path": str(pqdir)})
    res = apply(load_spec(spec))
    assert col_steps(res)["ingest"] == 120
    ds = lance.dataset(table_of(d1))
    assert by_id(ds, RAW).equals(source_rows.slice(0, 120))
    assert ds.schema.field("image").type == pa.large_binary()

    loaded = load_spec(spec)
    assert prepare(loaded).plan.is_empty
    again = ingest(loaded.spec.source)  # re-running ingest itself adds nothing
    assert (again.rows, again.skipped) == (0, 120)
    assert lance.dataset(table_of(d1)).count_rows() == 120

    pq.write_table(source_rows.slice(120, 30), pqdir / "c.parquet")
    loaded = load_spec(spec)
    plan = prepare(loaded).plan
    assert plan.ingest.kind == "append" and plan.ingest.rows == 30
    res = apply(loaded)
    assert col_steps(res) == {"ingest": 30, "question_length": 30}
    ds = lance.dataset(table_of(d1))
    t = by_id(ds)
    assert t.select(RAW).equals(source_rows)
    assert len(set(t.column("question_id").to_pylist())) == 150
    assert_complete(ds, "question_length")

    d2 = tmp_path / "glob"
    spec2 = write_spec(d2, features=TEXT_ONLY, curate=False, rows_per_fragment=32,
                       ingest={"from": "parquet", "path": str(pqdir / "*.parquet")})
    res = apply(load_spec(spec2))
    assert col_steps(res)["ingest"] == 150
    assert by_id(lance.dataset(table_of(d2)), RAW).equals(source_rows)
    assert prepare(load_spec(spec2)).plan.is_empty


@pytest.mark.slow
def test_ingest_from_lance_dataset(tmp_path, monkeypatch, source_rows):
    monkeypatch.chdir(tmp_path)
    src = tmp_path / "src.lance"
    lance.write_dataset(source_rows, str(src), max_rows_per_file=50)
    spec = write_spec(tmp_path / "t", features=TEXT_ONLY, curate=False, rows_per_fragment=64,
                      ingest={"from": "lance", "uri": str(src)})
    loaded = load_spec(spec)
    assert prepare(loaded).plan.ingest.rows == 150
    apply(loaded)
    ds = lance.dataset(table_of(tmp_path / "t"))
    assert by_id(ds, RAW).equals(source_rows)
    assert_complete(ds, "question_length")
    assert prepare(load_spec(spec)).plan.is_empty
    assert lance.dataset(str(src)).version == 1  # the source is only read


@pytest.mark.slow
def test_ingest_from_huggingface_save_to_disk_keeps_image_bytes(tmp_path, monkeypatch, source_rows):
    datasets = pytest.importorskip("datasets")
    monkeypatch.chdir(tmp_path)
    src = source_rows.slice(0, 40)
    jpegs = src.column("image").to_pylist()
    assert jpegs[0][:2] == b"\xff\xd8"
    features = datasets.Features({"question_id": datasets.Value("string"), "image": datasets.Image(),
                                  "image_id": datasets.Value("string"), "question": datasets.Value("string"),
                                  "answer": datasets.Value("string")})
    hf = datasets.Dataset.from_dict(
        {"question_id": src.column("question_id").to_pylist(),
         "image": [{"bytes": b, "path": None} for b in jpegs],
         "image_id": src.column("image_id").to_pylist(), "question": src.column("question").to_pylist(),
         "answer": src.column("answer").to_pylist()}, features=features)
    datasets.DatasetDict({"train": hf}).save_to_disk(str(tmp_path / "hf"))

    spec = write_spec(tmp_path / "t", features=TEXT_ONLY, curate=False, rows_per_fragment=16,
                      ingest={"from": "huggingface", "dataset": str(tmp_path / "hf"), "split": "train"})
    plan = prepare(load_spec(spec)).plan  # the saved folder is read at plan time: rows and columns are known
    assert plan.ingest.rows == 40 and not plan.warnings
    res = apply(load_spec(spec))
    assert col_steps(res)["ingest"] == 40
    ds = lance.dataset(table_of(tmp_path / "t"))
    assert ds.schema.field("image").type == pa.large_binary()
    t = ds.to_table().sort_by("question_id")
    assert t.column("question_id").to_pylist() == src.column("question_id").to_pylist()
    assert t.column("image").to_pylist() == jpegs  # byte-identical: no re-encode
    assert t.column("question_length").to_pylist() == [len(q) for q in src.column("question").to_pylist()]
    assert_complete(ds, "question_length")
    res = apply(load_spec(spec))  # the source rows are all there: nothing is appended twice
    assert lance.dataset(table_of(tmp_path / "t")).count_rows() == 40


# --- 7. --target and --until ------------------------------------------------------------------------

@pytest.mark.slow
def test_target_and_until(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    spec = write_spec(tmp_path, rows=150)
    uri = table_of(tmp_path)
    res = apply(load_spec(spec), targets=["dhash"])
    assert set(col_steps(res)) == {"ingest", "dhash"}
    ds = lance.dataset(uri)
    assert_complete(ds, "dhash")
    assert set(ds.schema.names) == set(RAW) | {"dhash"}
    assert calls(tmp_path) == {}

    res = apply(load_spec(spec), targets=["long_answer"])  # a dependent pulls in its ancestor
    assert set(col_steps(res)) == {"answer_words", "long_answer"}
    assert "question_words" not in lance.dataset(uri).schema.names

    res = apply(load_spec(spec), until="features")
    assert set(col_steps(res)) == {"question_length", "ocr_token_count", "question_words"}
    ds = lance.dataset(uri)
    for name in ("question_length", "ocr_token_count", "answer_words", "long_answer", "question_words", "dhash"):
        assert_complete(ds, name)
    assert not {"curate", "split"} & set(lance_io.read_sidecar(uri).get("steps", {}))
    plan = prepare(load_spec(spec)).plan
    assert all(s.kind == "up_to_date" for s in plan.columns)
    assert {s.name for s in plan.stages if s.kind != "up_to_date"} == {"curate", "split"}

    reset_calls(tmp_path)
    res = apply(load_spec(spec))
    assert [s["name"] for s in res.record.steps] == ["curate"]
    assert {"curate", "split"} <= set(lance_io.read_sidecar(uri)["steps"])
    assert calls(tmp_path) == {} and res.plan_after.is_empty


@pytest.mark.slow
@pytest.mark.parametrize("args", [["--target", "long_answer"], ["--until", "features"], ["--target", "curate"],
                                  ["--target", "dhash", "--until", "ingest"]])
def test_plan_with_target_previews_exactly_what_apply_does(tmp_path, monkeypatch, args):
    from typer.testing import CliRunner

    from vlmspec.runtime.cli import app

    monkeypatch.chdir(tmp_path)
    spec = str(write_spec(tmp_path, rows=100))
    r = CliRunner().invoke(app, ["plan", spec, "--json", *args])
    assert r.exit_code == 0, r.output
    planned = [s["name"] for s in json.loads(r.stdout)["steps"] if s["kind"] != "up_to_date"]
    r = CliRunner().invoke(app, ["apply", spec, *args])
    assert r.exit_code == 0, r.output
    record = history.list_runs(table_of(tmp_path))[-1]
    assert [s["name"] for s in record["steps"]] == planned
    assert planned[0] == "ingest" and len(planned) >= 1


# --- 8. one apply per table -------------------------------------------------------------------------

@pytest.mark.slow
def test_second_apply_refused_while_lock_held(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    spec = write_spec(tmp_path, rows=100, features=TEXT_ONLY, curate=False)
    uri = table_of(tmp_path)
    with table_lock(uri):
        with pytest.raises(ApplyError) as exc:
            apply(load_spec(spec))
        assert "another `vlmspec apply`" in str(exc.value) and f"pid {os.getpid()}" in str(exc.value)
        assert lance_io.open_dataset(uri) is None  # refused before doing anything

    # Held by another process too (flock is per open file, and dies with its holder).
    code = ("import sys, time; from vlmspec.runtime.apply import table_lock\n"
            f"with table_lock({uri!r}):\n    print('locked', flush=True); sys.stdin.read()\n")
    holder = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(ApplyError, match=f"another `vlmspec apply` \\(pid {holder.pid}\\)"):
            apply(load_spec(spec))
    finally:
        holder.kill()
        holder.wait()
    res = apply(load_spec(spec))
    assert res.record.status == "ok" and lance.dataset(uri).count_rows() == 100


# --- 9. the CLI -----------------------------------------------------------------------------------------

@pytest.mark.slow
def test_cli_commands(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from vlmspec.runtime.cli import app

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("VLMSPEC_DEBUG", raising=False)
    spec = str(write_spec(tmp_path, rows=100, rows_per_fragment=32))
    run = CliRunner().invoke

    r = run(app, ["validate", spec])
    assert r.exit_code == 0 and "ok (6 derived columns" in r.stdout, r.output
    r = run(app, ["status", spec])
    assert r.exit_code == 0 and "not created yet" in r.stdout
    r = run(app, ["plan", spec, "--detailed-exitcode"])
    assert r.exit_code == 2, r.output
    assert "question_length" in r.stdout
    r = run(app, ["plan", spec, "--json", "--out", str(tmp_path / "plan.json")])
    assert r.exit_code == 0
    doc = json.loads(r.stdout)
    assert doc["empty"] is False and {c["name"] for c in doc["columns"]} >= {"dhash", "long_answer"}
    assert json.loads((tmp_path / "plan.json").read_text()) == doc

    r = run(app, ["apply", spec])
    assert r.exit_code == 0, r.output
    assert "Applied in" in r.stdout and "ingest: 100 rows" in r.stdout

    r = run(app, ["plan", spec, "--detailed-exitcode"])
    assert r.exit_code == 0, r.output
    assert json.loads(run(app, ["plan", spec, "--json"]).stdout)["empty"] is True
    r = run(app, ["apply", spec])
    assert r.exit_code == 0 and "Nothing to do" in r.stdout
    r = run(app, ["status", spec])
    assert r.exit_code == 0 and "100 rows" in r.stdout
    assert r.stdout.count("100/100 filled (100.0%)  fresh") == 6, r.stdout
    r = run(app, ["log", spec])
    assert r.exit_code == 0
    lines = r.stdout.splitlines()
    assert lines[0].split()[:2] == ["run", "status"] and len(lines) == 3
    assert " ok " in lines[1] and "ingest(100)" in lines[1] and " ok " in lines[2]
    r = run(app, ["errors", spec])
    assert r.exit_code == 0 and "No row errors recorded." in r.stdout

    bad = tmp_path / "bad.yaml"
    bad.write_text(Path(spec).read_text().replace("features:", "featurs:"))
    for cmd in ("validate", "plan", "apply"):
        r = run(app, [cmd, str(bad)])
        assert r.exit_code == 1, (cmd, r.output)
        assert "error:" in r.stderr and "featurs" in r.stderr
        assert "Traceback" not in r.output and isinstance(r.exception, SystemExit)
    r = run(app, ["apply", spec, "--target", "dhsh"])
    assert r.exit_code == 1 and "unknown target `dhsh`" in r.stderr and "dhash" in r.stderr

    r = run(app, ["schema"])
    assert r.exit_code == 0
    schema = json.loads(r.stdout)
    assert schema["title"] == "Spec" and "source" in schema["properties"]
    assert "description" in schema["properties"]["source"]
    assert "How many rows to generate." in r.stdout


# --- paths: relative to the spec's folder ------------------------------------------------------

@pytest.mark.slow
def test_apply_from_another_folder_uses_the_table_next_to_the_spec(tmp_path, monkeypatch):
    """Before, `source.table` resolved against the current directory: run from elsewhere, apply
    silently planned (and built) a brand-new table there."""
    from typer.testing import CliRunner

    from vlmspec.runtime.cli import app

    proj, elsewhere = tmp_path / "proj", tmp_path / "elsewhere"
    spec = write_spec(proj, features=TEXT_ONLY, curate=False, rows=64)
    data = yaml.safe_load(spec.read_text())
    data["source"]["table"] = "data/t.lance"
    spec.write_text(yaml.safe_dump(data, sort_keys=False))
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    r = CliRunner().invoke(app, ["apply", "../proj/spec.yaml"])
    assert r.exit_code == 0, r.output
    assert r.stdout.startswith(f"Plan  ../proj/spec.yaml -> {proj}/data/t.lance (new table)\n")
    assert lance.dataset(str(proj / "data" / "t.lance")).count_rows() == 64
    assert not (elsewhere / "data").exists()
    monkeypatch.chdir(proj)
    r = CliRunner().invoke(app, ["plan", "spec.yaml"])
    assert r.exit_code == 0 and r.stdout.startswith("Plan  spec.yaml -> data/t.lance (version ")
    assert r.stdout.endswith("Plan: nothing to do; the table is up to date.\n"), r.stdout
