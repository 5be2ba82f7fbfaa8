"""Without the Hugging Face hub: a hub dataset or model fails at once with a located error that
says how to use a local copy (no ~30 s of retries, no ConnectionError traceback)."""

from __future__ import annotations

import time

import pytest
import yaml
from typer.testing import CliRunner

from vlmspec.compiler.errors import ApplyError
from vlmspec.runtime import hub
from vlmspec.runtime.cli import app

DOWN = "https://huggingface.co does not answer (no network here)"


@pytest.fixture
def hub_down(monkeypatch):
    monkeypatch.setattr(hub, "hub_unreachable", lambda: DOWN)


@pytest.fixture
def fresh_probe():
    hub.hub_unreachable.cache_clear()
    yield
    hub.hub_unreachable.cache_clear()


def test_probe_answers_at_once_for_a_closed_port_and_for_offline_mode(monkeypatch, fresh_probe):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")  # the discard port: refused
    t0 = time.monotonic()
    assert hub.hub_unreachable().startswith("http://127.0.0.1:9 does not answer (")
    assert time.monotonic() - t0 < hub.PROBE_SECONDS + 1
    hub.hub_unreachable.cache_clear()
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    assert hub.hub_unreachable() == "`HF_HUB_OFFLINE` is set"


def write_spec(d, ingest: dict, **top) -> str:
    spec = {"name": "off", "source": {"table": str(d / "data" / "off.lance"), "ingest": ingest},
            "features": {"tier1": {"question_length": {"udf": "text.length", "inputs": ["question"]}}}, **top}
    (d / "spec.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    return str(d / "spec.yaml")


@pytest.mark.slow
def test_apply_of_a_hub_dataset_fails_fast_located_with_how_to_ingest_locally(tmp_path, monkeypatch, hub_down):
    monkeypatch.chdir(tmp_path)
    spec = write_spec(tmp_path, {"from": "huggingface", "dataset": "lance-format/textvqa-lance", "split": "train"})
    t0 = time.monotonic()
    r = CliRunner().invoke(app, ["apply", spec])
    assert time.monotonic() - t0 < 20
    assert r.exit_code == 1, r.output
    assert "Traceback" not in r.output
    err = r.stderr.strip().splitlines()[-1]
    assert err.startswith(f"error: {spec}:6:14 source.ingest.dataset: cannot stream the dataset "
                          "`lance-format/textvqa-lance` from the hub: the Hugging Face hub cannot be reached: " + DOWN)
    assert ("`datasets.load_dataset('lance-format/textvqa-lance', split='train').save_to_disk('DIR')`" in err
            and "`ingest: {from: huggingface, dataset: DIR}` (or `{from: parquet, path: DIR}`)" in err)


def test_a_written_local_path_that_does_not_exist_is_not_taken_for_a_hub_id(tmp_path):
    from vlmspec.compiler.model import SourceSpec
    from vlmspec.runtime.sources.ingest import source_info

    src = SourceSpec(table="t.lance", ingest={"from": "huggingface", "dataset": "./saved"})
    with pytest.raises(ApplyError, match=r"source.ingest.dataset: `./saved` is not a folder"):
        source_info(src)


def test_a_hub_model_that_cannot_be_fetched_fails_fast(monkeypatch, hub_down):
    from vlmspec.compiler.model import ModelSpec
    from vlmspec.runtime.vlm import models

    spec = ModelSpec(id="Qwen/Qwen2.5-VL-3B-Instruct")
    monkeypatch.setattr(models, "_local_config", lambda path, revision: None)
    with pytest.raises(ApplyError) as e:
        models.load_vision_tower(spec)
    assert str(e.value) == (
        "model.id: cannot fetch the model `Qwen/Qwen2.5-VL-3B-Instruct` (revision `main`): the Hugging Face hub "
        f"cannot be reached: {DOWN}, and the model is not in the Hugging Face cache. Download it where the hub is "
        "reachable (`hf download Qwen/Qwen2.5-VL-3B-Instruct --revision main --local-dir DIR`), copy DIR here and "
        "set `model.id: DIR`.")
    # In the cache: loaded from it at once, without asking the hub.
    monkeypatch.setattr(models, "_local_config", lambda path, revision: {"model_type": "qwen2_5_vl"})
    assert models._hub_kwargs(spec, spec.id)["local_files_only"] is True


@pytest.mark.slow
def test_plan_needs_no_hub_and_an_unknown_hub_model_is_located(tmp_path, monkeypatch):
    """`specs/textvqa.yaml` plans offline because the 3B's width is in KNOWN_HIDDEN_SIZES; a model
    the plan cannot size is a located error, and `model.hidden_size` is the way out."""
    monkeypatch.chdir(tmp_path)
    features = {"tier3": {"vision_tower_hiddens": {"udf": "vlm.vision_tower", "inputs": ["image"]}}}
    spec = write_spec(tmp_path, {"from": "synthetic", "rows": 8}, model={"id": "someone/custom-vl", "image_px": 56})
    text = (tmp_path / "spec.yaml").read_text()
    data = yaml.safe_load(text)
    data["features"] = features
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(data, sort_keys=False))
    r = CliRunner().invoke(app, ["plan", spec])
    assert r.exit_code == 1 and r.stderr.startswith(f"error: {spec}:") and " model.id: cannot read model " in r.stderr
    data["model"]["hidden_size"] = 64
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(data, sort_keys=False))
    r = CliRunner().invoke(app, ["plan", spec])
    assert r.exit_code == 0 and "fp16[4x64]" in r.stdout
