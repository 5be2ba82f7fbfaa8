"""Training from cached columns: loader determinism, checkpoint/resume, logs, adapter and manifest."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from vlmspec.compiler.load import load_spec_text
from vlmspec.runtime import lance_io
from vlmspec.runtime.apply import apply, prepare
from vlmspec.runtime.train.loader import epoch_order, make_loader
from vlmspec.runtime.row_errors import current_errors
from vlmspec.runtime.train.loop import lora_target_regex, pinned_slice
from vlmspec.runtime.train.start import train_from_spec

pytestmark = pytest.mark.slow

SPEC = """
name: train-test
source:
  table: data/t.lance
  ingest: {from: synthetic, rows: 160, image_px: 64}
  rows_per_fragment: 64
model: {id: "vlmspec:tiny-qwen2.5-vl", image_px: 56}
features:
  tier1:
    ocr_token_count: {udf: text.count, inputs: [ocr_tokens]}
  tier3:
    vision_tower_hiddens: {udf: vlm.vision_tower, inputs: [image], batch_size: 32}
    sft_tokens: {udf: vlm.sft_tokens, inputs: [question, answer], params: {max_tokens: 96}, on_error: "null"}
split: {by: image_id, fraction: 0.2, seed: 0}
train:
  quant: {bits: QUANT}
  lora: {r: 4, alpha: 8, dropout: 0.0}
  optim: {lr: 5.0e-3, steps: 6, batch_size: 4, grad_accum: 2, seed: 0, schedule: cosine, warmup: 1}
  checkpoint_every: 3
  log_every: 1
  output_dir: runs/t
"""


@pytest.fixture(scope="module")
def table(tmp_path_factory):
    root = tmp_path_factory.mktemp("train")
    import os

    cwd = os.getcwd()
    os.chdir(root)
    try:
        loaded = load_spec_text(SPEC.replace("QUANT", "32"), file=str(root / "spec.yaml"))
        apply(loaded, until="curate")
        yield root
    finally:
        os.chdir(cwd)


def _prep(root: Path, quant: int = 32, out: str = "runs/t"):
    text = SPEC.replace("QUANT", str(quant)).replace("runs/t", out)
    return prepare(load_spec_text(text, file=str(root / "spec.yaml")))


def test_epoch_order_is_deterministic_and_sharded():
    addrs = np.arange(100, dtype=np.uint64)
    a, b = epoch_order(addrs, 0, 0), epoch_order(addrs, 0, 0)
    assert (a == b).all() and not (a == epoch_order(addrs, 0, 1)).all()
    shards = [epoch_order(addrs, 0, 0, rank=r, world=3) for r in range(3)]
    assert sum(len(s) for s in shards) == 99 and len(set(np.concatenate(shards).tolist())) == 99


def test_loader_projects_and_collates_zero_copy(table, monkeypatch):
    monkeypatch.chdir(table)
    prep = _prep(table)
    sl = pinned_slice(prep.loaded.spec)
    loader = make_loader(sl.uri, sl.version, sl.train, hiddens="vision_tower_hiddens", tokens="sft_tokens",
                         image_tokens=4, batch_size=4, seed=0, epoch=0)
    batch = next(iter(loader))
    assert tuple(batch.vision_hiddens.shape) == (4, 4, 128) and str(batch.vision_hiddens.dtype) == "torch.float16"
    assert tuple(batch.input_ids.shape) == (4, 96)
    # The epoch's first four rows (a direct Lance read), in row-address order within the batch.
    import lance

    order = np.sort(epoch_order(sl.train, 0, 0)[:4])
    ref = lance.dataset(sl.uri, version=sl.version)._take_rows(order.tolist(), columns=["sft_tokens"])
    ids = np.stack([np.array(r["input_ids"]) for r in ref.column("sft_tokens").to_pylist()])
    assert (batch.input_ids.numpy() == ids).all()


def test_spawned_workers_read_the_same_batches(table, monkeypatch):
    monkeypatch.chdir(table)
    sl = pinned_slice(_prep(table).loaded.spec)
    kw = dict(hiddens="vision_tower_hiddens", tokens="sft_tokens", image_tokens=4, batch_size=8, seed=1, epoch=2)
    serial = [b.input_ids for b in make_loader(sl.uri, sl.version, sl.train, **kw)]
    spawned = [b.input_ids for b in make_loader(sl.uri, sl.version, sl.train, num_workers=2, **kw)]
    assert len(serial) == len(spawned) and all((a == b).all() for a, b in zip(serial, spawned))
    threaded = make_loader(sl.uri, sl.version, sl.train, threads=3, **kw)
    assert type(threaded).__name__ == "PrefetchLoader"
    got = [b.input_ids for b in threaded]
    assert len(got) == len(serial) and all((a == b).all() for a, b in zip(serial, got))
    # resuming mid-epoch skips batches without reading them, threads or not
    from vlmspec.runtime.train.loader import iterate_epochs

    resumed = iterate_epochs(lambda ep: make_loader(sl.uri, sl.version, sl.train, threads=3, **kw), 2, 2)
    ep, i, b = next(resumed)
    assert (ep, i) == (2, 2) and (b.input_ids == serial[2]).all()


def test_train_writes_adapter_log_plot_manifest(table, monkeypatch):
    monkeypatch.chdir(table)
    out = train_from_spec(_prep(table, out="runs/full"), device="cpu")
    run = Path("runs/full")
    assert out["steps"] == 6 and np.isfinite(out["final_loss"])
    log = [json.loads(x) for x in (run / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3, 4, 5, 6] and all(r["loss"] > 0 for r in log)
    assert (run / "loss.png").stat().st_size > 1000
    assert (run / "adapter" / "adapter_config.json").exists() and not (run / "checkpoint").exists()
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["table_version"] == out["table_version"] and manifest["rows"] == out["rows"]
    assert set(manifest["columns"]) == {"vision_tower_hiddens", "sft_tokens"}
    cfg = json.loads((run / "adapter" / "adapter_config.json").read_text())
    assert cfg["target_modules"] == lora_target_regex(["q_proj", "k_proj", "v_proj", "o_proj"])


def test_resume_after_interruption_matches_an_uninterrupted_run(table, monkeypatch):
    monkeypatch.chdir(table)
    from safetensors.torch import load_file

    full = train_from_spec(_prep(table, out="runs/a"), device="cpu")
    stopped = train_from_spec(_prep(table, out="runs/b"), device="cpu", stop_after=4)
    assert stopped == {"stopped_at": 4} and (Path("runs/b/checkpoint/state.pt")).exists()
    resumed = train_from_spec(_prep(table, out="runs/b"), device="cpu")
    assert resumed["steps"] == full["steps"]
    a = load_file("runs/a/adapter/adapter_model.safetensors")
    b = load_file("runs/b/adapter/adapter_model.safetensors")
    assert a.keys() == b.keys()
    assert max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-6
    log = [json.loads(x)["step"] for x in Path("runs/b/train_log.jsonl").read_text().splitlines()]
    assert log == [1, 2, 3, 4, 5, 6]  # the log restarts from the checkpoint, never doubles a step


def test_qlora_4bit_trains_on_cpu(table, monkeypatch):
    monkeypatch.chdir(table)
    out = train_from_spec(_prep(table, quant=4, out="runs/q4"), device="cpu")
    assert out["steps"] == 6 and np.isfinite(out["final_loss"])


def test_apply_runs_train_and_records_it(table, monkeypatch):
    monkeypatch.chdir(table)
    prep = _prep(table)
    assert {s.name: s.kind for s in prep.plan.stages}["train"] == "run"
    apply(prep.loaded)
    after = _prep(table)
    assert {s.name: s.kind for s in after.plan.stages}["train"] == "up_to_date"
    rec = lance_io.read_sidecar("data/t.lance")["steps"]["train"]
    assert rec["detail"]["steps"] == 6


def test_two_process_gloo_run_equals_one_process(table, monkeypatch):
    """`train.devices: 2` on CPU (gloo) gives the single-process adapter for the same global batch."""
    monkeypatch.chdir(table)
    from safetensors.torch import load_file

    def spec(out: str, devices: int) -> str:
        text = SPEC.replace("QUANT", "32").replace("runs/t", out)
        return text.replace("  checkpoint_every: 3", f"  checkpoint_every: 3\n  devices: {devices}")

    one = train_from_spec(prepare(load_spec_text(spec("runs/d1", 1), file=str(table / "spec.yaml"))), device="cpu")
    two = train_from_spec(prepare(load_spec_text(spec("runs/d2", 2), file=str(table / "spec.yaml"))), device="cpu")
    assert one["steps"] == two["steps"] == 6 and two["devices"] == 2
    a = load_file("runs/d1/adapter/adapter_model.safetensors")
    b = load_file("runs/d2/adapter/adapter_model.safetensors")
    assert max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-5
    assert abs(one["final_loss"] - two["final_loss"]) < 1e-5


def test_fused_micro_batches_train_the_same_adapter_as_separate_ones(table, monkeypatch):
    """`fuse_accum: true` runs batch 4 x accumulation 2 as one pass of 8 rows: the loss is
    token-weighted over the step either way, so the adapter and losses are the same (dropout 0)."""
    monkeypatch.chdir(table)
    from safetensors.torch import load_file

    def spec(out: str, fuse: str) -> str:
        text = SPEC.replace("QUANT", "32").replace("runs/t", out)
        return text.replace("  checkpoint_every: 3", f"  checkpoint_every: 3\n  fuse_accum: {fuse}")

    apart = train_from_spec(prepare(load_spec_text(spec("runs/f0", "false"), file=str(table / "spec.yaml"))),
                            device="cpu")
    fused = train_from_spec(prepare(load_spec_text(spec("runs/f1", "true"), file=str(table / "spec.yaml"))),
                            device="cpu")
    assert (apart["micro_batches_per_pass"], fused["micro_batches_per_pass"]) == (1, 2)
    a = load_file("runs/f0/adapter/adapter_model.safetensors")
    b = load_file("runs/f1/adapter/adapter_model.safetensors")
    assert max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-5
    assert max(float(a[k].abs().max()) for k in a) > 1e-3  # the adapters did move
    la = [json.loads(x)["loss"] for x in Path("runs/f0/train_log.jsonl").read_text().splitlines()]
    lb = [json.loads(x)["loss"] for x in Path("runs/f1/train_log.jsonl").read_text().splitlines()]
    assert np.allclose(la, lb, atol=1e-5)


@pytest.mark.slow
def test_apply_under_torchrun_trains_on_every_rank_and_equals_one_process(tmp_path):
    """`torchrun --nproc-per-node 2 -m vlmspec.runtime.cli apply SPEC` (gloo on CPU): rank 0 does the
    data steps, both ranks train their shards, rank 0 writes one adapter, equal to one process's
    for the same global batch; the run record says 2 devices."""
    import json
    import subprocess
    import sys

    from safetensors.torch import load_file

    from vlmspec.runtime import history

    def run(d: Path, launcher: list[str]) -> subprocess.CompletedProcess:
        d.mkdir()
        (d / "spec.yaml").write_text(SPEC.replace("QUANT", "32"))
        return subprocess.run([*launcher, "-m", "vlmspec.runtime.cli", "apply", "spec.yaml"], cwd=d,
                              capture_output=True, text=True, timeout=600)

    ranked = run(tmp_path / "two", [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                    "--nproc-per-node", "2"])
    assert ranked.returncode == 0, ranked.stdout + ranked.stderr
    assert ranked.stdout.count("Applied in") == 1  # one report, from rank 0
    one = run(tmp_path / "one", [sys.executable])
    assert one.returncode == 0, one.stdout + one.stderr
    a = load_file(tmp_path / "one/runs/t/adapter/adapter_model.safetensors")
    b = load_file(tmp_path / "two/runs/t/adapter/adapter_model.safetensors")
    assert max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-5
    rec = history.list_runs(str(tmp_path / "two/data/t.lance"))[-1]
    train = next(s for s in rec["steps"] if s["name"] == "train")
    assert rec["status"] == "ok" and train["devices"] == 2
    manifest = json.loads((tmp_path / "two/runs/t/manifest.json").read_text())
    assert manifest["devices"] == 2


class _Recorder:
    def __init__(self):
        self.calls = []

    def start(self, task, total, unit="rows"):
        self.calls.append(("start", task, total, unit))

    def advance(self, task, n):
        self.calls.append(("advance", task, n))

    def info(self, task, text):
        self.calls.append(("info", task, text))

    def finish(self, task):
        self.calls.append(("finish", task))

    def note(self, text):
        pass


def test_training_reports_progress_the_plotted_loss_tensorboard_and_a_portable_base(table, monkeypatch):
    monkeypatch.chdir(table)
    text = SPEC.replace("QUANT", "32").replace("runs/t", "runs/tb").replace(
        "  log_every: 1", "  log_every: 2\n  report_to: tensorboard")
    rec = _Recorder()
    out = train_from_spec(prepare(load_spec_text(text, file=str(table / "spec.yaml"))), device="cpu", reporter=rec)
    assert rec.calls[0] == ("start", "train", 6, "steps") and rec.calls[-1] == ("finish", "train")
    assert sum(c[2] for c in rec.calls if c[0] == "advance") == 6
    infos = [c[2] for c in rec.calls if c[0] == "info"]
    assert len(infos) == 3 and infos[-1].startswith("loss ") and "samples/s" in infos[-1]
    log = [json.loads(x) for x in Path("runs/tb/train_log.jsonl").read_text().splitlines()]
    assert out["final_loss"] == log[-1]["loss"]  # the summary's loss is the plotted one
    assert list(Path("runs/tb/tensorboard").glob("events.out.tfevents.*"))
    cfg = json.loads(Path("runs/tb/adapter/adapter_config.json").read_text())
    assert cfg["base_model_name_or_path"] == "vlmspec:tiny-qwen2.5-vl"


def test_a_non_finite_loss_stops_training_keeps_the_last_good_checkpoint_and_publishes_nothing(table, monkeypatch):
    monkeypatch.chdir(table)
    import torch

    from vlmspec.compiler.errors import ApplyError
    from vlmspec.runtime.vlm import graph_step

    real, calls = graph_step.eager_step, []

    def diverging(*a, **k):
        calls.append(1)
        loss = real(*a, **k)
        return loss * torch.tensor(float("nan")) if len(calls) > 8 else loss  # from step 5 (2 micro-batches a step)
    monkeypatch.setattr(graph_step, "eager_step", diverging)
    with pytest.raises(ApplyError, match=r"non-finite loss or gradient norm at step 5 \(quant 32-bit"):
        train_from_spec(_prep(table, out="runs/nan"), device="cpu")
    run = Path("runs/nan")
    assert not (run / "adapter").exists() and not (run / "manifest.json").exists()
    state = torch.load(run / "checkpoint" / "state.pt", weights_only=False)
    assert state["step"] == 3  # checkpoint_every 3: the last one before the divergence
    assert all(torch.isfinite(v).all() for v in state["adapter"].values())


def test_qlora_with_checkpointing_and_compiled_layers_is_refused_at_plan_time(table, monkeypatch):
    monkeypatch.chdir(table)
    from vlmspec.compiler.errors import CompileError

    text = SPEC.replace("QUANT", "4").replace("  log_every: 1", "  log_every: 1\n  gradient_checkpointing: true\n"
                                                                 "  compile: layers")
    with pytest.raises(CompileError, match="diverges"):
        prepare(load_spec_text(text, file=str(table / "spec.yaml")))


@pytest.mark.slow
def test_rows_nulled_by_recorded_errors_are_left_out_of_the_slice_and_training_runs(tmp_path, monkeypatch):
    """`on_error: null` rows of a column training reads never reach the loader: the plan and the
    summary count them, and training (which refuses nulls) runs on the rest."""
    monkeypatch.chdir(tmp_path)
    text = SPEC.replace("QUANT", "32").replace("max_tokens: 96", "max_tokens: 48")  # ~20 % of answers overflow
    (tmp_path / "spec.yaml").write_text(text)
    loaded = load_spec_text(text, file=str(tmp_path / "spec.yaml"))
    apply(loaded, until="features")
    failed = {e["row_addr"] for e in current_errors("data/t.lance")}
    assert 0 < len(failed) < 160
    plan = prepare(loaded).plan
    curate = next(s for s in plan.stages if s.name == "curate")
    assert f"{len(failed):,} rows with recorded row errors left out" in curate.reason
    res = apply(loaded)
    assert res.record.status == "ok"
    assert any(f"{len(failed)} left out: recorded row errors" in line for line in res.summary), res.summary
    from vlmspec.runtime.curate import read_slice
    from vlmspec.runtime.train.job import SliceRecord

    sl = SliceRecord.recorded("data/t.lance")
    kept = set(read_slice(sl.path, "train").tolist()) | set(read_slice(sl.path, "eval").tolist())
    assert not kept & failed and sl.train_rows + sl.eval_rows == 160 - len(failed)


def test_lost_outputs_are_rebuilt_and_replace_forces_a_rerun(table, monkeypatch):
    monkeypatch.chdir(table)
    import shutil

    from vlmspec.compiler.render import render_plan

    prep = _prep(table, out="runs/lost")
    apply(prep.loaded)
    assert _prep(table, out="runs/lost").plan.is_empty
    shutil.rmtree("runs/lost")
    plan = _prep(table, out="runs/lost").plan
    train = next(s for s in plan.stages if s.name == "train")
    assert train.kind == "run" and train.reason.startswith("output missing: `runs/lost/adapter`")
    assert "~ train" in render_plan(plan) and "output missing" in render_plan(plan)
    apply(prep.loaded, targets=["train"])
    assert Path("runs/lost/adapter/adapter_config.json").exists() and _prep(table, out="runs/lost").plan.is_empty

    forced = prepare(prep.loaded, replace_steps=["train", "vision_tower_hiddens"]).plan
    kinds = {s.name: s.kind for s in forced.columns} | {s.name: s.kind for s in forced.stages}
    assert kinds["vision_tower_hiddens"] == "recompute" and kinds["train"] == "run"
    assert kinds["sft_tokens"] == "up_to_date" and kinds["curate"] == "up_to_date"
    before = Path("runs/lost/adapter/adapter_model.safetensors").stat().st_mtime_ns
    res = apply(prep.loaded, replace=["train"])
    assert [s["name"] for s in res.record.steps] == ["train"]
    assert Path("runs/lost/adapter/adapter_model.safetensors").stat().st_mtime_ns != before  # really retrained
    from vlmspec.compiler.errors import CompileError

    with pytest.raises(CompileError, match="unknown step or column `trian`. Did you mean `train`"):
        prepare(prep.loaded, replace_steps=["trian"])
