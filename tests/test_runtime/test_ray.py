"""The Ray executor against the local one, on a local Ray cluster (2 CPUs, started once per module).

- Deterministic UDFs give byte-identical columns under both executors (per fragment, the Arrow IPC
  bytes of the values), with the same fingerprints and the same recorded row errors; the plan shows
  the executor and the placement; a second apply is a no-op.
- A Ray worker SIGKILLed mid-task: Ray retries the task and the column still matches the local one.
- The driver (`vlmspec apply`, joined to the cluster by its address) SIGKILLed mid-run: committed
  fragments survive, the column is not marked complete, and the next apply computes exactly the
  fragments that were not committed.
- `on_error: fail` stops with the row and keeps what is committed; model UDFs run on actors (the
  model loaded once per actor) and match the local executor; a GPU column is refused at plan time.
"""

from __future__ import annotations

import importlib.util

import collections
import hashlib
import logging
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import lance
import pyarrow as pa
import pytest
import yaml

from vlmspec.compiler.errors import ApplyError, CompileError
from vlmspec.compiler.load import load_spec
from vlmspec.compiler.render import render_plan
from vlmspec.compiler.state import FINGERPRINT, TARGET
from vlmspec.runtime import lance_io
from vlmspec.runtime.apply import apply, prepare

from helpers import kill_once_committed, table_of

ray = pytest.importorskip("ray", reason="Ray is an optional extra: pip install 'vlmspec[ray]'")

pytestmark = pytest.mark.slow

UDFS = '''\
"""User UDFs for the Ray tests. `slow_key` sleeps for the seconds in sleep.txt (next to this file) per
batch and leaves its process id in pids/, so a test can kill the worker running it."""
import os
import time
from pathlib import Path

import pyarrow as pa

from vlmspec.compiler.udf import udf

HERE = Path(__file__).parent


def _count(name, n):
    with open(HERE / "calls.log", "a") as f:
        f.write(f"{name} {n}\\n")


@udf(output="int32", inputs=["answer"])
def answer_words(answer, *, min_len=1):
    return pa.array([sum(1 for w in (a or "").split() if len(w) >= min_len) for a in answer.to_pylist()],
                    pa.int32())


@udf(output="string", inputs=["question"], batch=False)
def shout(question):
    return (question or "").upper() + "!"


@udf(output="int32", inputs=["question_id"])
def picky(question_id):
    for q in question_id.to_pylist():
        if q in ("q0000150", "q0000003"):
            raise ValueError(f"cannot handle {q}")
    return pa.array([int(q[1:]) for q in question_id.to_pylist()], pa.int32())


@udf(output="int64", inputs=["question_id"], batch_size=16)
def slow_key(question_id):
    _count("slow_key", len(question_id))
    (HERE / "pids").mkdir(exist_ok=True)
    (HERE / "pids" / str(os.getpid())).touch()
    sleep = HERE / "sleep.txt"
    time.sleep(float(sleep.read_text()) if sleep.exists() else 0.0)
    return pa.array([int(q[1:]) * 7 for q in question_id.to_pylist()], pa.int64())
'''

FEATURES = {
    "tier1": {
        "question_length": {"udf": "text.length", "inputs": ["question"]},
        "question_type": {"udf": "text.question_type", "inputs": ["question"]},
        "answer_words": {"udf": "udfs:answer_words", "inputs": ["answer"], "params": {"min_len": 2}},
        "picky": {"udf": "udfs:picky", "inputs": ["question_id"], "on_error": "null"},
        "shout": {"udf": "udfs:shout", "inputs": ["question"]},
    },
    "tier2": {
        "dhash": {"udf": "image.dhash", "inputs": ["image"], "batch_size": 16},
        "image_size": {"udf": "image.size", "inputs": ["image"]},
    },
}
SLOW = {"tier1": {"slow_key": {"udf": "udfs:slow_key", "inputs": ["question_id"]}}}
MODEL = {"tier3": {"vision_tower_hiddens": {"udf": "vlm.vision_tower", "inputs": ["image"], "batch_size": 4},
                   "sft_tokens": {"udf": "vlm.sft_tokens", "inputs": ["question", "answer"],
                                  "params": {"max_tokens": 96}, "on_error": "null"}}}
LOCAL = {"kind": "local", "workers": 2}
RAY = {"kind": "ray", "address": "local", "workers": 2}


@pytest.fixture(scope="module")
def cluster():
    """One local Ray cluster for the module (the executor joins it instead of starting its own)."""
    ray.init(num_cpus=2, include_dashboard=False, logging_level=logging.WARNING)
    try:
        yield ray.get_runtime_context().gcs_address
    finally:
        ray.shutdown()


def write_spec(d: Path, executor: dict, features: dict, *, rows: int = 200, rows_per_fragment: int = 128,
               model: dict | None = None) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    spec = {"name": "ray-test",
            "source": {"table": str(d / "data" / "t.lance"),
                       "ingest": {"from": "synthetic", "rows": rows, "image_px": 64},
                       "rows_per_fragment": rows_per_fragment},
            "features": features, "executor": executor}
    if model:
        spec["model"] = model
    (d / "spec.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    if not (d / "udfs.py").exists():
        (d / "udfs.py").write_text(UDFS)
    return d / "spec.yaml"


def meta(ds, name: str) -> dict[str, str]:
    return lance_io.decode_metadata(ds.schema.field(name).metadata)


def assert_complete(ds, name: str) -> None:
    m = meta(ds, name)
    assert m.get(FINGERPRINT) and TARGET not in m, m
    rows = lance_io.fragment_rows(ds)
    assert sorted(lance_io.fragment_fill(ds)[name]) == sorted(f for f, n in rows.items() if n)


def column_bytes(uri: str, names) -> dict[tuple[str, int], str]:
    """(column, fragment) -> sha256 of the Arrow IPC bytes of that fragment's values. (The Lance data
    files themselves also embed the schema's field metadata, whose key order is not stable, so the
    values, not the files, are compared byte for byte.)"""
    ds = lance.dataset(uri)
    out = {}
    for name in names:
        for frag in ds.get_fragments():
            col = frag.to_table(columns=[name]).column(name).combine_chunks()
            sink = pa.BufferOutputStream()
            table = pa.table({name: col})
            with pa.ipc.new_stream(sink, table.schema) as w:
                w.write_table(table)
            out[(name, frag.fragment_id)] = hashlib.sha256(sink.getvalue().to_pybytes()).hexdigest()
    return out


def row_errors(uri: str) -> set[tuple[str, int, str]]:
    import json

    path = lance_io.sidecar_dir(uri) / "errors.jsonl"
    return {(r["column"], r["row_addr"], r["error"]) for r in map(json.loads, path.read_text().splitlines())}


def calls(d: Path) -> dict[str, int]:
    out: collections.Counter = collections.Counter()
    log = d / "calls.log"
    for line in log.read_text().splitlines() if log.exists() else []:
        name, n = line.split()
        out[name] += int(n)
    return dict(out)


def local_reference(d: Path, features: dict, **kw) -> str:
    spec = write_spec(d, LOCAL, features, **kw)
    assert apply(load_spec(spec)).record.status == "ok"
    return table_of(d)


# --- 1. same plan, same bytes -----------------------------------------------------------------

def test_ray_columns_are_byte_identical_to_local(cluster, tmp_path):
    ref = local_reference(tmp_path / "local", FEATURES)
    spec = write_spec(tmp_path / "ray", RAY, FEATURES)
    apply(load_spec(spec), until="ingest")

    plan = prepare(load_spec(spec)).plan
    text = render_plan(plan)
    assert text.splitlines()[1] == "Executor  ray (local cluster, 2 CPUs, at most 2 workers)"
    assert {s.name: s.placement for s in plan.columns} == {n: "cpu tasks x2" for n in
                                                           [*FEATURES["tier1"], *FEATURES["tier2"]]}
    result = apply(load_spec(spec))
    assert result.record.status == "ok"
    uri = table_of(tmp_path / "ray")
    names = [*FEATURES["tier1"], *FEATURES["tier2"]]
    got, want = column_bytes(uri, names), column_bytes(ref, names)
    assert len(got) == 2 * len(names)  # 200 rows in 2 fragments (128 + 72)
    assert got == want
    ds, ref_ds = lance.dataset(uri), lance.dataset(ref)
    for name in names:
        assert_complete(ds, name)
        assert meta(ds, name)[FINGERPRINT] == meta(ref_ds, name)[FINGERPRINT]
    assert ds.to_table(columns=["picky"]).column("picky").null_count == 2
    assert row_errors(uri) == row_errors(ref) and len(row_errors(uri)) == 2
    steps = {s["name"]: s for s in result.record.steps}
    assert steps["dhash"]["fragments"] == 2 and steps["picky"]["errors"] == 2
    # Nothing left to do, under either executor.
    assert prepare(load_spec(spec)).plan.is_empty
    assert apply(load_spec(spec)).record.version_after == ds.version


# --- 2. a worker killed mid-task -----------------------------------------------------------------

def test_killed_worker_is_retried_and_column_matches_local(cluster, tmp_path):
    ref = local_reference(tmp_path / "local", SLOW, rows=128, rows_per_fragment=32)
    d = tmp_path / "ray"
    spec = write_spec(d, RAY, SLOW, rows=128, rows_per_fragment=32)
    apply(load_spec(spec), until="ingest")
    (d / "sleep.txt").write_text("0.3")
    killed: list[int] = []

    def killer() -> None:
        deadline = time.monotonic() + 60
        while not killed and time.monotonic() < deadline:
            pids = sorted((d / "pids").iterdir()) if (d / "pids").exists() else []
            if pids:
                pid = int(pids[0].name)
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
            time.sleep(0.01)

    t = threading.Thread(target=killer)
    t.start()
    try:
        result = apply(load_spec(spec))
    finally:
        t.join()
    assert killed and killed[0] != os.getpid()
    assert result.record.status == "ok"
    uri = table_of(d)
    assert_complete(lance.dataset(uri), "slow_key")
    assert column_bytes(uri, ["slow_key"]) == column_bytes(ref, ["slow_key"])
    assert lance.dataset(uri).to_table(columns=["slow_key"]).column(0).to_pylist() == [7 * i for i in range(128)]
    # The killed task ran again elsewhere: more rows computed than the column holds.
    assert calls(d)["slow_key"] > 128


# --- 3. the driver killed mid-run, then resumed -------------------------------------------------

def test_killed_driver_resumes_from_the_last_checkpoint(cluster, tmp_path):
    ref = local_reference(tmp_path / "local", SLOW, rows=256, rows_per_fragment=32)
    d = tmp_path / "ray"
    # The driver joins the module's cluster by its address, as a spec pointing at a cluster would.
    spec = write_spec(d, {"kind": "ray", "address": cluster, "workers": 2}, SLOW, rows=256, rows_per_fragment=32)
    apply(load_spec(spec), until="ingest")
    (d / "sleep.txt").write_text("0.25")
    uri = table_of(d)
    with open(d / "out.txt", "wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "vlmspec.runtime.cli", "apply", str(spec)], cwd=d,
                                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    kill_once_committed(proc, uri, "slow_key", d / "out.txt", timeout=90)
    assert proc.returncode == -signal.SIGKILL

    ds = lance.dataset(uri)
    committed = set(lance_io.fragment_fill(ds)["slow_key"])
    rows = lance_io.fragment_rows(ds)
    assert len(rows) == 8 and 0 < len(committed) < 8, committed
    m = meta(ds, "slow_key")
    assert FINGERPRINT not in m and m.get(TARGET)  # being filled, not complete
    missing = sum(n for f, n in rows.items() if f not in committed)

    (d / "calls.log").unlink()
    (d / "sleep.txt").write_text("0")
    result = apply(load_spec(spec))
    assert result.record.status == "ok"
    assert calls(d) == {"slow_key": missing}  # committed fragments are never recomputed
    step = next(s for s in result.record.steps if s["name"] == "slow_key")
    assert step["rows"] == missing and step["fragments"] == 8 - len(committed)
    assert_complete(lance.dataset(uri), "slow_key")
    assert column_bytes(uri, ["slow_key"]) == column_bytes(ref, ["slow_key"])


# --- 4. on_error: fail ---------------------------------------------------------------------------

def test_on_error_fail_stops_at_the_row_and_keeps_committed_fragments(cluster, tmp_path):
    features = {"tier1": {"picky": {"udf": "udfs:picky", "inputs": ["question_id"]}}}
    d = tmp_path / "ray"
    spec = write_spec(d, {**RAY, "workers": 1}, features, rows=256, rows_per_fragment=64)
    with pytest.raises(ApplyError) as e:
        apply(load_spec(spec))
    assert "UDF `udfs:picky` failed on row" in str(e.value) and "cannot handle" in str(e.value)
    assert "`vlmspec apply` resumes from the last checkpoint" in str(e.value)
    ds = lance.dataset(table_of(d))
    filled = set(lance_io.fragment_fill(ds)["picky"])
    assert 0 not in filled and 2 not in filled  # q0000003 and q0000150 live in fragments 0 and 2
    assert FINGERPRINT not in meta(ds, "picky") and meta(ds, "picky").get(TARGET)


# --- 5. model UDFs on actors, and the GPU refusal ---------------------------------------------------

def test_model_udfs_run_on_actors_and_match_local(cluster, tmp_path):
    model = {"id": "vlmspec:tiny-qwen2.5-vl", "image_px": 56}
    ref = local_reference(tmp_path / "local", MODEL, rows=32, rows_per_fragment=16, model=model)
    spec = write_spec(tmp_path / "ray", RAY, MODEL, rows=32, rows_per_fragment=16, model=model)
    apply(load_spec(spec), until="ingest")
    plan = prepare(load_spec(spec)).plan
    assert {s.name: s.placement for s in plan.columns} == {"vision_tower_hiddens": "cpu actor x1",
                                                           "sft_tokens": "cpu actor x1"}
    assert apply(load_spec(spec)).record.status == "ok"
    uri = table_of(tmp_path / "ray")
    names = list(MODEL["tier3"])
    assert column_bytes(uri, names) == column_bytes(ref, names)
    ds, ref_ds = lance.dataset(uri), lance.dataset(ref)
    for name in names:
        assert_complete(ds, name)
        assert meta(ds, name) == meta(ref_ds, name)  # incl. what the UDF itself stores (the vision grid)

    # A GPU column on this CPU-only cluster is refused before anything runs.
    gpu = {"tier3": {"vision_tower_hiddens": {**MODEL["tier3"]["vision_tower_hiddens"], "resources": {"gpus": 1}}}}
    spec = write_spec(tmp_path / "gpu", RAY, gpu, rows=32, rows_per_fragment=16, model=model)
    with pytest.raises(CompileError, match="`vision_tower_hiddens` needs 1 GPU per worker but the local Ray "
                                           "cluster .this machine. has none"):
        prepare(load_spec(spec))
    shutil.rmtree(tmp_path / "gpu", ignore_errors=True)


# --- 6. the benchmark, tiny ------------------------------------------------------------------------

def test_bench_ray_writes_json_and_markdown(cluster, tmp_path):
    import json

    from vlmspec.runtime.tools.bench import ray_executor

    res = ray_executor.run(64, 64, [1, 2], 1, tmp_path / "out", rows_per_fragment=16, workdir=tmp_path,
                           tier3_rows=32, tier3_rows_per_fragment=16)
    data = json.loads((tmp_path / "out" / "ray.json").read_text())
    assert (tmp_path / "out" / "ray.md").read_text().startswith("# Ray executor vs local")
    assert data["details"]["values_equal"] is True and res.derived["values_equal"]["met"]
    assert {"dhash_local_w1", "dhash_local_w2", "dhash_ray_w1", "dhash_ray_w2", "apply_local",
            "apply_ray", "tower_local_w1", "tower_local_w2"} <= set(data["figures"])
    assert "ray_init" not in data["figures"]  # the module's cluster was reused, not started
    if importlib.util.find_spec("geneva") is not None:  # the Geneva rows beside them, on the same cluster
        assert {"dhash_geneva_w1", "dhash_geneva_w2", "apply_geneva"} <= set(data["figures"])
        assert {"geneva_vs_local_w2", "apply_overhead_geneva"} <= set(data["derived"])
    assert {"local_scaling_w2", "ray_scaling_w2", "tower_local_scaling_w2", "apply_overhead"} <= set(data["derived"])
    # The module's cluster has no GPU slots: the tier-3 column asking for one is refused by the plan
    # and its Ray figures are skipped; without `resources` it would get a single CPU actor.
    placement = data["details"]["tier3_placement_ray"]
    assert placement["resources default (no GPU)"] == "cpu actor x1"
    assert placement["resources {gpus: 1, cpus: 1}"].startswith("refused")
    assert "tower_ray_w1" not in data["figures"] and any("skipped" in n for n in data["notes"])
    assert len(set(data["details"]["tier3_values_sha256"].values())) == 1
