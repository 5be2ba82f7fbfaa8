"""The model's imports on a thread while a tier-2 column runs in worker processes (`prefetch`)."""

from __future__ import annotations

import subprocess
import sys
from types import SimpleNamespace

import pytest

from vlmspec.compiler.load import load_spec_text
from vlmspec.compiler.plan import Backfill, Evaluate, Placement, Train
from vlmspec.runtime.apply import apply, prepare
from vlmspec.runtime.prefetch import Prefetch

MODEL = SimpleNamespace(id="vlmspec:tiny-qwen2.5-vl", revision="main", trust_remote_code=False)


def _col(name: str, where: str, model: bool = False) -> Backfill:
    return Backfill(name=name, kind="new", reason="new", place=Placement(where, 2),
                    node=SimpleNamespace(uses_model=model))


def test_it_runs_only_through_a_workers_step_that_a_model_step_here_follows():
    dhash, tower = _col("dhash", "processes"), _col("vision_tower_hiddens", "in-process", model=True)
    train, ev = Train(name="train", kind="run", reason="new"), Evaluate(name="eval", kind="run", reason="new")
    assert Prefetch.before(MODEL, [dhash, tower], 0).during == "dhash"
    assert Prefetch.before(MODEL, [dhash, train], 0) is not None
    assert Prefetch.before(MODEL, [dhash, ev], 0) is not None
    assert Prefetch.before(MODEL, [dhash, tower], 1) is None  # the model step itself runs here
    assert Prefetch.before(MODEL, [dhash, _col("other", "processes")], 0) is None  # nothing needs the model
    assert Prefetch.before(MODEL, [dhash, _col("t", "gpu actors", model=True)], 0) is None  # loaded by Ray's actor
    assert Prefetch.before(MODEL, [_col("dhash", "cpu tasks"), tower], 0) is None  # Ray's driver runs Python
    assert Prefetch.before(MODEL, [_col("q", "in-process"), tower], 0) is None
    assert Prefetch.before(None, [dhash, tower], 0) is None


def test_a_failing_prefetch_is_recorded_not_raised():
    bad = SimpleNamespace(id="/nonexistent/model", revision="main", trust_remote_code=False)
    done = Prefetch(bad, "dhash").start().join()
    assert done["during"] == "dhash" and done["error"] and done["seconds"] is not None
    assert "waited" in Prefetch.summary({**done, "waited_s": 1.0})


@pytest.mark.slow
def test_it_imports_the_processors_code_in_a_fresh_process():
    script = ("import sys; from types import SimpleNamespace as S; from vlmspec.runtime.prefetch import Prefetch\n"
              "assert 'transformers' not in sys.modules\n"
              "d = Prefetch(S(id='vlmspec:tiny-qwen2.5-vl', revision='main', trust_remote_code=False), 'x').start().join()\n"
              "assert 'error' not in d, d\n"
              "print('qwen2_5_vl' in ' '.join(sys.modules))\n")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "True"


SPEC = """
name: prefetch-test
source:
  table: data/t.lance
  ingest: {from: synthetic, rows: 600, image_px: 64}
  rows_per_fragment: 100
model: {id: "vlmspec:tiny-qwen2.5-vl", image_px: 56}
executor: {workers: 2}
features:
  tier2:
    dhash: {udf: image.dhash, inputs: [image]}
  tier3:
    vision_tower_hiddens: {udf: vlm.vision_tower, inputs: [image], batch_size: 64}
"""


@pytest.mark.slow
def test_an_apply_records_the_prefetch_during_dhash_and_says_so(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    loaded = load_spec_text(SPEC, file=str(tmp_path / "spec.yaml"))
    dhash = next(s for s in prepare(loaded).plan.steps if s.name == "dhash")
    assert dhash.place.where == "processes", dhash.place
    res = apply(loaded)
    assert res.record.status == "ok"
    assert res.record.prefetch["during"] == "dhash" and "error" not in res.record.prefetch, res.record.prefetch
    assert any(line.startswith("model imports: ") for line in res.summary), res.summary
    tower = next(s for s in res.record.steps if s["name"] == "vision_tower_hiddens")
    assert tower["rows"] == 600


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="per-thread nice is Linux's")
def test_only_the_prefetch_thread_runs_at_the_lowest_priority():
    """The workers fill every core: the import takes only what they leave idle, and the rest of
    the process (the thread handing their chunks to Lance) keeps its priority."""
    import os
    import threading

    from vlmspec.runtime.prefetch import _lowest_priority

    seen = {}

    def body():
        _lowest_priority()
        seen["thread"] = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())

    before = os.getpriority(os.PRIO_PROCESS, 0)
    t = threading.Thread(target=body)
    t.start()
    t.join()
    assert seen["thread"] == 19
    assert os.getpriority(os.PRIO_PROCESS, 0) == before
