"""The Geneva executor against the local one, on one local Ray cluster (2 CPUs) for the module.

- The quickstart's tier-1, tier-2 and tier-3 columns computed through Geneva are byte-identical,
  fragment by fragment, to the local executor's, with the same fingerprints, the same UDF field
  metadata and the same recorded row errors under `on_error: null`; the plan shows where they run;
  a second apply is a no-op.
- A SIGKILLed apply under Geneva resumes and computes only the rows that were not committed.
- `on_error: fail` stops with the row named and keeps the committed fragments.
- Without the extra, `executor: {kind: geneva}` fails at plan time with the install hint.
"""

from __future__ import annotations

import builtins
import logging
import signal
import subprocess
import sys
from pathlib import Path

import lance
import pytest

from vlmspec.compiler.errors import ApplyError
from vlmspec.compiler.load import load_spec
from vlmspec.compiler.render import render_plan
from vlmspec.compiler.state import FINGERPRINT, TARGET
from vlmspec.runtime import lance_io
from vlmspec.runtime.apply import apply, prepare

from helpers import kill_once_committed, table_of

pytest.importorskip("geneva", reason="Geneva is an optional extra: pip install 'vlmspec[geneva]'")
ray = pytest.importorskip("ray")

sys.path.insert(0, str(Path(__file__).parent))  # the Ray tests' spec writer and byte comparisons
from test_ray import (FEATURES, MODEL, SLOW, assert_complete, calls, column_bytes, local_reference,  # noqa: E402
                      meta, row_errors, write_spec)

pytestmark = pytest.mark.slow

GENEVA = {"kind": "geneva", "workers": 2}
TINY = {"id": "vlmspec:tiny-qwen2.5-vl", "image_px": 56}


@pytest.fixture(scope="module")
def cluster():
    ray.init(num_cpus=2, include_dashboard=False, logging_level=logging.WARNING)
    try:
        yield ray.get_runtime_context().gcs_address
    finally:
        ray.shutdown()


def test_geneva_columns_are_byte_identical_to_local(cluster, tmp_path):
    features = {**FEATURES, **MODEL}
    kw = dict(rows=96, rows_per_fragment=64, model=TINY)
    ref = local_reference(tmp_path / "local", features, **kw)
    spec = write_spec(tmp_path / "geneva", GENEVA, features, **kw)
    apply(load_spec(spec), until="ingest")

    plan = prepare(load_spec(spec)).plan
    assert render_plan(plan).splitlines()[1].startswith("Executor  geneva (local Ray context")
    places = {s.name: s.placement for s in plan.columns}
    # 2 CPUs: one 1-CPU applier beside Geneva's own actors (`plan.geneva_appliers`).
    assert places["dhash"] == "geneva x1" and places["vision_tower_hiddens"] == "geneva x1"
    result = apply(load_spec(spec))
    assert result.record.status == "ok"
    # Geneva's per-job trackers (0.1 CPU each, owned by this process) are stopped with their jobs:
    # nine left running would starve the next columns' workers on this 2-CPU cluster.
    assert not [n for n in ray.util.list_named_actors() if n.startswith("jobtracker-")]
    uri = table_of(tmp_path / "geneva")
    names = [*FEATURES["tier1"], *FEATURES["tier2"], *MODEL["tier3"]]
    got, want = column_bytes(uri, names), column_bytes(ref, names)
    assert len(got) == 2 * len(names)
    assert got == want
    ds, ref_ds = lance.dataset(uri), lance.dataset(ref)
    for name in names:
        assert_complete(ds, name)
        assert meta(ds, name) == meta(ref_ds, name)  # fingerprint, recipe, and the UDF's own (vision grid)
    assert ds.to_table(columns=["picky"]).column("picky").null_count == 1
    assert row_errors(uri) == row_errors(ref) and len(row_errors(uri)) >= 1
    steps = {s["name"]: s for s in result.record.steps}
    assert steps["picky"]["errors"] == 1 and steps["dhash"]["rows"] == 96
    assert prepare(load_spec(spec)).plan.is_empty
    assert apply(load_spec(spec)).record.version_after == ds.version


def test_killed_apply_resumes_and_computes_only_what_was_not_committed(cluster, tmp_path):
    ref = local_reference(tmp_path / "local", SLOW, rows=256, rows_per_fragment=32)
    d = tmp_path / "geneva"
    spec = write_spec(d, {**GENEVA, "address": cluster}, SLOW, rows=256, rows_per_fragment=32)
    apply(load_spec(spec), until="ingest")
    (d / "sleep.txt").write_text("0.4")
    uri = table_of(d)
    with open(d / "out.txt", "wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "vlmspec.runtime.cli", "apply", str(spec)], cwd=d,
                                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    kill_once_committed(proc, uri, "slow_key", d / "out.txt", timeout=120)
    assert proc.returncode == -signal.SIGKILL
    ds = lance.dataset(uri)
    committed = set(lance_io.fragment_fill(ds)["slow_key"])
    rows = lance_io.fragment_rows(ds)
    assert len(rows) == 8 and 0 < len(committed) < 8, committed
    m = meta(ds, "slow_key")
    assert FINGERPRINT not in m and m.get(TARGET)
    missing = sum(n for f, n in rows.items() if f not in committed)

    (d / "calls.log").unlink()
    (d / "sleep.txt").write_text("0")
    plan = prepare(load_spec(spec)).plan
    assert plan.columns[0].kind == "resume"
    # Geneva's own plan_backfill of the resumed column, cross-checked against ours in the plan.
    text = render_plan(plan)
    print(text)
    assert f"Geneva plan_backfill `slow_key`: {missing:,} rows in " in text and "(agrees)" in text
    result = apply(load_spec(spec))
    assert result.record.status == "ok"
    # Committed fragments are never recomputed (Geneva may also reuse batches it had checkpointed).
    assert calls(d).get("slow_key", 0) <= missing
    assert_complete(lance.dataset(uri), "slow_key")
    assert column_bytes(uri, ["slow_key"]) == column_bytes(ref, ["slow_key"])


def test_on_error_fail_names_the_row_and_keeps_committed_fragments(cluster, tmp_path):
    features = {"tier1": {"picky": {"udf": "udfs:picky", "inputs": ["question_id"]}}}
    d = tmp_path / "geneva"
    spec = write_spec(d, {**GENEVA, "workers": 1}, features, rows=256, rows_per_fragment=64)
    with pytest.raises(ApplyError) as e:
        apply(load_spec(spec))
    assert "UDF `udfs:picky` failed on row 3 (fragment 0, offset 3, question_id='q0000003')" in str(e.value)
    assert "`vlmspec apply` resumes from the last checkpoint" in str(e.value)
    ds = lance.dataset(table_of(d))
    assert 0 not in set(lance_io.fragment_fill(ds)["picky"])
    assert FINGERPRINT not in meta(ds, "picky") and meta(ds, "picky").get(TARGET)


def test_without_the_extra_the_plan_says_how_to_install_it(tmp_path, monkeypatch):
    spec = write_spec(tmp_path, GENEVA, {"tier1": FEATURES["tier1"]}, rows=16)
    real = builtins.__import__

    def no_geneva(name, *a, **k):
        if name == "geneva" or name.startswith("geneva."):
            raise ImportError("No module named 'geneva'")
        return real(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", no_geneva)
    with pytest.raises(ApplyError, match=r"needs Geneva, which is not installed.*pip install 'vlmspec\[geneva\]'"):
        prepare(load_spec(spec))
    assert not Path(table_of(tmp_path)).exists()  # nothing ran
