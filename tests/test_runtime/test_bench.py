"""`vlmspec bench plan|backfill` at tiny sizes: the commands run and write the documented results.

These are benchmarks, not timed tests: only the shape of the JSON (and that the Markdown is
generated) is checked, never the figures.
"""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from vlmspec.runtime.cli import app

pytestmark = pytest.mark.slow

TOP_KEYS = {"benchmark", "title", "started", "seconds", "machine", "libraries", "settings", "figures", "derived",
            "details", "notes"}
MACHINE_KEYS = {"platform", "python", "cpu_model", "cores", "cores_usable", "ram_gib", "loadavg"}
FIGURE_KEYS = {"label", "unit", "median", "min", "max", "n", "samples", "load_before", "load_after"}
DERIVED_KEYS = {"label", "value", "unit", "target", "met", "how"}


@pytest.fixture(autouse=True)
def _quiet_lance(monkeypatch):
    # The bench commands default LANCE_LOG to `error`; keep that from leaking into later tests.
    monkeypatch.setenv("LANCE_LOG", "error")


def run_bench(args: list[str], out) -> dict:
    res = CliRunner().invoke(app, ["bench", *args, "--out", str(out)])
    assert res.exit_code == 0, res.output + repr(res.exception)
    name = args[0]
    data = json.loads((out / f"{name}.json").read_text())
    md = (out / f"{name}.md").read_text()
    assert TOP_KEYS <= data.keys()
    assert data["benchmark"] == name
    assert MACHINE_KEYS <= data["machine"].keys()
    assert {"python", "pylance", "pyarrow"} <= data["libraries"].keys()
    for key, fig in data["figures"].items():
        assert FIGURE_KEYS <= fig.keys(), key
        assert len(fig["samples"]) == fig["n"] == len(fig["load_before"]) == len(fig["load_after"])
        assert fig["label"] in md
    for key, d in data["derived"].items():
        assert DERIVED_KEYS <= d.keys(), key
        assert d["label"] in md
    return data


def test_bench_plan(tmp_path):
    data = run_bench(["plan", "--rows", "2000,1000", "--repeats", "2", "--rows-per-fragment", "256"], tmp_path)
    assert data["settings"]["rows"] == [2000, 1000]
    figs = data["figures"]
    assert {"prepare_2000", "prepare_1000", "prepare_control_2000", "cli_help", "cli_imports", "cli_plan_2000",
            "cli_plan_1000"} <= figs.keys()
    assert all(f["n"] == 2 for f in figs.values())
    assert {"plan_big", "cli_big", "ratio", "cli_ratio", "control_ratio", "io_bytes"} <= data["derived"].keys()
    assert {"2000", "1000"} <= data["details"]["tables"].keys()
    assert {"fragments", "tier1_apply_s", "data_bytes"} <= data["details"]["tables"]["2000"].keys()
    assert {"read_bytes", "read_iops", "data_bytes", "manifest_bytes"} <= data["details"]["io_stats"]["2000"].keys()


def test_bench_backfill(tmp_path):
    data = run_bench(["backfill", "--rows", "64", "--image-px", "64", "--workers", "1,2", "--repeats", "2",
                      "--rows-per-fragment", "16", "--noop-rows", "2000,1000"], tmp_path)
    figs = data["figures"]
    for udf in ("text.length", "text.question_type", "text.count"):
        assert {f"tier1_{udf}_synthetic", f"kernel_{udf}_synthetic", f"tier1_{udf}_raw2000"} <= figs.keys()
    assert {"dhash_vlmspec_w1", "dhash_vlmspec_w2", "dhash_vlmspec_w2_warm", "dhash_bare_p1", "dhash_bare_p2",
            "dhash_bare_p2_warm", "noop_apply_2000", "noop_apply_1000"} <= figs.keys()
    assert {"dhash_efficiency", "dhash_efficiency_cpu", "dhash_scaling_w2", "dhash_scaling_w2_warm",
            "dhash_vs_bare_w2", "noop_apply", "noop_ratio", "tier1_text.length"} <= data["derived"].keys()
    assert data["details"]["dhash_values_equal"] is True  # vlmspec and the bare loop hash the same images
    assert data["details"]["noop_tables"]["2000"]["did_work"] is False


def test_bench_apply_data(tmp_path):
    data = run_bench(["apply-data", "--rows", "40", "--image-px", "64", "--workers", "1,2", "--repeats", "1",
                      "--rows-per-fragment", "16", "--workdir", str(tmp_path / "work")], tmp_path)
    assert {"generate", "ingest_w1", "dhash_w1", "apply_w1", "ingest_w2", "dhash_w2", "apply_w2"} <= \
        data["figures"].keys()
    assert {"ingest_rows_per_s", "dhash_rows_per_s"} <= data["derived"].keys()
    assert data["derived"]["ingest_rows_per_s"]["target"] == ">= 1,000 on 16 cores"
    assert data["details"]["folder_bytes"] > 0


def test_bench_apply_profiler_prefix_falls_back_when_py_spy_cannot_sample(tmp_path):
    """`vlmspec bench apply --py-spy PATH` wraps each apply in `py-spy record`; where it cannot
    sample (missing, or ptrace forbidden) the applies run unprofiled instead of failing."""
    import shutil

    from vlmspec.runtime.tools.bench.apply_e2e import profiler_prefix

    assert profiler_prefix(None, tmp_path / "p.json") == []
    fake = tmp_path / "py-spy"
    fake.write_text("#!/bin/sh\nexit 3\n")
    fake.chmod(0o755)
    assert profiler_prefix(str(fake), tmp_path / "p.json") == []
    real = shutil.which("py-spy")
    if real:  # where py-spy is installed and may sample, the prefix runs the apply under it
        got = profiler_prefix(real, tmp_path / "out" / "p.json")
        assert got == [] or (got[0] == real and got[-2:] == [str(tmp_path / "out" / "p.json"), "--"])


def test_bench_apply_scales_only_what_grows_with_rows():
    """The scaled whole apply grows each row-proportional stage's time after its set-up (a column's
    model load and compile are paid once, whatever the rows); train, eval and start-up stay."""
    from vlmspec.runtime.tools.bench.apply_e2e import SEED_ROWS, _derive
    from vlmspec.runtime.tools.bench.common import Results

    steps = [{"name": "ingest", "seconds": 5.0, "rows": 100, "ended": 5.0},
             {"name": "vision_tower_hiddens", "seconds": 30.0, "setup_s": 10.0, "rows": 100, "ended": 35.0},
             {"name": "train", "seconds": 50.0, "rows": 10, "ended": 85.0},
             {"name": "eval", "seconds": 10.0, "rows": 10, "ended": 95.0}]
    cold = {"seconds": 100.0, "rc": 0, "record": {"steps": steps}, "samples": [], "started": 0.0, "ended": 100.0}
    res = Results("apply_e2e", "t", {})
    _derive(res, {"cold": cold}, [], rows=SEED_ROWS // 2)
    grow = 5.0 + (30.0 - 10.0)  # ingest, and the tower after its set-up; train and eval as measured
    assert res.derived["scaled_s"]["value"] == round(100.0 + grow * (SEED_ROWS / (SEED_ROWS // 2) - 1), 1)
