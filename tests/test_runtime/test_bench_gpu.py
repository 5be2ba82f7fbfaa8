"""`vlmspec bench reads` and `vlmspec bench gpu` at toy sizes (CPU): the commands run and write the
documented results. Figures are never checked, only the JSON's shape and the equivalence verdicts
(which hold on any machine)."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from vlmspec.runtime.cli import app

pytestmark = pytest.mark.slow

TOP_KEYS = {"benchmark", "title", "started", "seconds", "machine", "libraries", "settings", "figures", "derived",
            "details", "notes"}


def _load(out, name):
    data = json.loads((out / f"{name}.json").read_text())
    md = (out / f"{name}.md").read_text()
    assert TOP_KEYS <= data.keys() and data["benchmark"] == name
    for fig in data["figures"].values():
        assert len(fig["samples"]) == fig["n"] and fig["label"] in md
    for d in data["derived"].values():
        assert d["label"] in md
    return data


def _bench(out, *args):
    """`vlmspec bench ARGS --out OUT`, which must succeed."""
    res = CliRunner().invoke(app, ["bench", *args, "--out", str(out)])
    assert res.exit_code == 0, res.output + repr(res.exception)


@pytest.fixture(autouse=True)
def _quiet_lance(monkeypatch):
    monkeypatch.setenv("LANCE_LOG", "error")


def test_bench_reads_tiny(tmp_path):
    _bench(tmp_path, "reads", "--rows", "48", "--tokens", "4", "--hidden", "8", "--image-kb", "1", "--repeats", "1",
           "--workers", "0", "--threads", "2")
    data = _load(tmp_path, "reads")
    figs = data["figures"]
    for key in ("plain_read", "lance_raw_seq", "lance_raw_shuf", "lance_h_seq", "lance_h_shuf", "pq_default_h_shuf",
                "pq_rg64_h_shuf", "pq_rg64_raw_shuf", "loader_w0", "loader_w0_steady", "loader_w0_t2_steady",
                "loader_w0_t2_perm_steady"):
        assert key in figs, key
    assert {"loader_vs_plain", "loader_perm_vs_plain", "loader_vs_parquet",
            "lance_vs_parquet_h_shuf"} <= data["derived"].keys()
    assert data["details"]["parquet_rg64_row_groups"] == 1 and data["details"]["parquet_default_row_groups"] == 1


def test_bench_gpu_tiny_equivalence(tmp_path):
    _bench(tmp_path, "gpu", "--shape", "tiny", "--phases", "equivalence", "--no-compile")
    data = _load(tmp_path, "gpu_equivalence")
    assert data["details"]["errors"] == {}
    assert data["derived"]["fast_tower_equal"]["met"] is True
    assert data["derived"]["cached_equal"]["met"] is True
    assert data["details"]["fast_tower_vs_hf"]["batched_layers"] == 4


def test_bench_bf16_noise_tiny(tmp_path):
    _bench(tmp_path, "bf16-noise", "--shape", "tiny", "--seeds", "1")
    tol = _load(tmp_path, "bf16_noise")["derived"]["bf16_tolerance"]["value"]
    assert 0 < tol < 0.1  # bf16 rounds (not zero) but keeps the tower's output close


def test_bench_gpu_tiny_qlora_grid(tmp_path):
    _bench(tmp_path, "gpu", "--shape", "tiny", "--phases", "qlora", "--qlora-grid")
    data = _load(tmp_path, "gpu_qlora")
    assert data["details"]["errors"] == {}
    want = {f"qlora_r{r}_b{b}_gc1{raw}" for r in (16, 64) for b in (2, 8, 16) for raw in ("", "_raw")}
    want |= {"qlora_r16_b2_gc0"}
    assert set(data["figures"]) == want
    assert all(f["median"] > 0 for f in data["figures"].values())
    assert data["derived"]["qlora_rate"]["value"] == data["figures"]["qlora_r16_b2_gc1"]["median"]


def test_bench_gpu_tiny_tier3(tmp_path):
    _bench(tmp_path, "gpu", "--shape", "tiny", "--phases", "tier3", "--rows", "64", "--unique", "8", "--repeats", "2",
           "--tier3-batch", "16", "--sub-batch", "4", "--workdir", str(tmp_path / "work"))
    data = _load(tmp_path, "gpu_tier3")
    assert data["details"]["errors"] == {}
    assert {"tier3_bare_tower", "tier3_udf", "tier3_e2e"} <= data["figures"].keys()
    e2e = data["figures"]["tier3_e2e"]
    assert e2e["n"] == 2 and all(c["fast_calls"] > 0 for c in e2e["udf_tower_calls"])
    assert data["details"]["written_vs_hf_reference_rel_l2"] < 0.05
    # the first repeat's column files were deleted before the second wrote its own: per fragment,
    # the source's file plus one for each of the two columns
    frags = -(-64 // data["details"]["rows_per_fragment"])
    assert len(list((tmp_path / "work" / "tier3.lance" / "data").glob("*.lance"))) == 3 * frags


def test_kernel_gap_summary_names_what_the_launching_thread_did():
    from vlmspec.runtime.tools.bench.gpu_trace import summarise

    def x(cat, name, ts, dur, tid=1, corr=None):
        return {"ph": "X", "cat": cat, "name": name, "ts": ts, "dur": dur, "tid": tid,
                "args": {"correlation": corr} if corr is not None else {}}
    events = [
        x("kernel", "gemm", 0, 100, tid=7, corr=1), x("kernel", "gemm", 90, 110, tid=7, corr=2),  # overlap: merged
        x("kernel", "sdpa", 5200, 800, tid=7, corr=3),  # after a 5 ms gap
        x("kernel", "copy", 6030, 10, tid=7, corr=4),  # a 30 us gap
        x("cuda_runtime", "cudaLaunchKernel", 5150, 5, corr=3),
        x("cuda_runtime", "cudaStreamSynchronize", 150, 4000),
        x("user_annotation", "vlmspec.decode_wait", 4200, 900),
        x("cpu_op", "aten::copy_", 5000, 100, tid=2),  # another thread: not counted
    ]
    got = summarise(events)
    assert got["kernels"] == 4 and got["window_ms"] == 6.0
    assert got["gaps_by_size"]["1ms-10ms"]["count"] == 1 and got["gaps_by_size"]["20us-100us"]["count"] == 1
    assert got["kernel_busy_pct"] == round(100 * (200 + 800 + 10) / 6040, 1)
    big = got["largest_gaps"][0]
    assert big["gap_ms"] == 5.0 and big["next_kernel"] == "sdpa" and big["launched_ms_after_gap_start"] == 4.95
    assert big["host_ops_ms"] == {"cudaStreamSynchronize": 3.95, "vlmspec.decode_wait": 0.9,
                                  "cudaLaunchKernel": 0.005}


@pytest.mark.slow
def test_bench_apply_model_folder_keeps_the_shipped_tokenizers_token_ids(tmp_path, monkeypatch):
    """The 3B-shape folder ships the tiny tokenizer, so its config must carry that tokenizer's
    image/vision token ids: `save_pretrained` rewrote them with the 3B ids once, and every SFT
    prompt then had "0 <|image_pad|> tokens" for the model (the bench's GPU apply failed at train).
    Checked on the tiny sizes under the `3b` name, with the 3B ids, which is the same code path."""
    from pathlib import Path

    from vlmspec.runtime.tools.bench import apply_e2e
    from vlmspec.runtime.tools.bench.gpu import _common
    from vlmspec.runtime.vlm.models import resolve_model_path

    monkeypatch.setitem(_common.SHAPES, "3b", {**_common.SHAPES["tiny"], "ids": _common.SHAPES["3b"]["ids"]})
    folder = Path(apply_e2e.model_folder("3b", tmp_path))
    tiny = json.loads((Path(resolve_model_path("vlmspec:tiny-qwen2.5-vl")) / "config.json").read_text())
    saved = json.loads((folder / "config.json").read_text())
    for k in ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id"):
        assert saved[k] == tiny[k] != _common.SHAPES["3b"]["ids"][k], k
    assert any(folder.glob("model*.safetensors"))


@pytest.mark.slow
def test_bench_apply_runs_the_users_command_round_by_round_on_the_tiny_shape(tmp_path):
    """`vlmspec bench apply` end to end on the CPU: each round is a real `vlmspec apply` process, the
    LoRA-only change reruns only train and eval, `--replace` recomputes only the vision column, and
    the results carry the derived targets (the GPU ones say they were not measured). A second run
    without `cold` goes on from the first one's table (the GPU machine's 10-minute calls)."""
    args = ["bench", "apply", "--shape", "tiny", "--rows", "64", "--image-px", "112", "--steps", "4", "--eval", "4",
            "--work", str(tmp_path / "work")]
    res = CliRunner().invoke(app, [*args, "--rounds", "cold,lora", "--out", str(tmp_path / "first")])
    assert res.exit_code == 0, res.output
    assert "tower_rc" not in json.loads((tmp_path / "first" / "apply_e2e.json").read_text())["details"]
    res = CliRunner().invoke(app, [*args, "--rounds", "tower", "--out", str(tmp_path / "out")])
    assert res.exit_code == 0, res.output
    d = json.loads((tmp_path / "out" / "apply_e2e.json").read_text())
    assert any("ran in an earlier call" in n for n in d["notes"])
    det = d["details"]
    assert det["cold_rc"] == det["lora_rc"] == det["tower_rc"] == 0
    assert [s["stage"] for s in det["cold_stages"]][-3:] == ["curate", "train", "eval"]
    assert [s["stage"] for s in det["lora_stages"]] == ["train", "eval"]
    assert [s["stage"] for s in det["tower_stages"]] == ["vision_tower_hiddens"]
    assert d["derived"]["apply_s"]["met"] is True and d["derived"]["busy_pct"]["value"] is None
    assert (tmp_path / "out" / "apply_e2e.md").is_file()
