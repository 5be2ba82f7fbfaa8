"""Eval generation's fast path (`runtime/eval/generate.py`) computes what the plain path computes:
the same model inputs (text half and Patchifier pixels, bitwise), the same image features (FastTower,
within fp32 tolerance) and the same greedy answers, in row order, on the shipped tiny model on CPU."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from vlmspec.compiler.model import GenerationSpec, ModelSpec
from vlmspec.runtime.eval import generate as G
from vlmspec.runtime.sources import synthetic
from vlmspec.runtime.vlm import fast_tower, models
from vlmspec.runtime.vlm.patchify import Patchifier
from vlmspec.runtime.vlm.prompt import image_processor_kwargs, prompt_text, resize_image

TINY = "vlmspec:tiny-qwen2.5-vl"
PX = 112


@pytest.fixture(scope="module")
def tiny():
    spec = ModelSpec(id=TINY, image_px=PX, dtype="float32")
    return models.load_full_model(spec, device="cpu"), models.load_model_processor(spec)


@pytest.fixture(scope="module")
def rows():
    """Synthetic TextVQA rows (JPEG bytes at other sizes than PX, so the resize matters), with
    questions of very different token lengths."""
    table = synthetic.generate_table(7, seed=3, image_px=160).to_pylist()
    extra = ["", " Please look closely at every part of the picture before you answer this one.",
             " Read it.", " What does the largest piece of text in the middle of the image say exactly?"]
    for i, r in enumerate(table):
        r["question"] = r["question"] + extra[i % len(extra)]
    return table


def test_batch_size_auto_picks_by_device_and_a_number_wins(monkeypatch):
    import types

    import torch

    gib = {"n": 80}
    monkeypatch.setattr(torch.cuda, "get_device_properties",
                        lambda d: types.SimpleNamespace(total_memory=gib["n"] * 2**30))
    assert G.resolve_batch_size("auto", "cuda") == G.resolve_batch_size("auto", "cuda:1") == 256
    gib["n"] = 24  # a smaller card keeps the KV cache of the narrower batch
    assert G.resolve_batch_size("auto", "cuda") == 128
    assert G.resolve_batch_size("auto", "cpu") == 8
    assert G.resolve_batch_size(5, "cuda") == 5


def test_the_eval_tower_compiles_where_the_columns_compile_is_at_hand_or_the_eval_is_large(tiny, rows, monkeypatch,
                                                                                              tmp_path):
    """A cold compile costs ~12 s a model and a warm one from disk ~5 s: a few hundred questions
    compile where this process compiled the column's tower of the same configuration, or from its
    cache on disk from `COMPILE_FROM_CACHE_MIN_QUESTIONS` on, and never on the CPU."""
    model, processor = tiny
    visual = model.model.visual
    monkeypatch.setenv("VLMSPEC_CACHE_DIR", str(tmp_path))
    assert not G.compile_by_default(visual, PX, 10**6, "cpu")
    assert G.compile_by_default(visual, PX, G.COMPILE_MIN_QUESTIONS, "cuda")
    assert not G.compile_by_default(visual, PX, 400, "cuda")
    from vlmspec.runtime.vlm.compile_cache import Warmup, tower_parts

    # the column's key for this tower at its CUDA defaults (sub-batch 16, compiled, graphed)
    column = tower_parts(visual, visual.dtype, PX, {fast_tower.CUDA_SUB_BATCH}, True, True)
    Warmup(column).path.parent.mkdir(parents=True)
    Warmup(column).path.write_bytes(b"artefacts")
    many, few = G.COMPILE_FROM_CACHE_MIN_QUESTIONS, G.COMPILE_FROM_CACHE_MIN_QUESTIONS - 1
    assert G.compile_by_default(visual, PX, many, "cuda")  # on disk: a new process starts warm from it
    assert not G.compile_by_default(visual, PX, few, "cuda")  # too few questions to pay its warm-up
    assert not G.compile_by_default(visual, PX + 28, many, "cuda")  # another image size: another compile
    Warmup(column).path.unlink()
    assert not G.compile_by_default(visual, PX, many, "cuda")
    with Warmup(column):  # the column's warm-up in this process (nothing compiled: no file saved)
        pass
    assert not Warmup(column).path.exists()
    assert G.compile_by_default(visual, PX, few, "cuda")  # compiled here: even a few questions
    features = G.ImageFeatures(visual, processor, rows[:2], PX, 2, "cpu", compile=True)
    try:
        assert features.compiled is False and features.warmup is None  # never on the CPU, whatever asked
    finally:
        features.close()


def test_sub_batched_tower_features_equal_one_call(tiny, rows, monkeypatch):
    """The compiled runner's sub-batches (each graph's output copied out before the next replay,
    a short tail padded with blank images) give the batch's features in image order: here on CPU,
    eager, in sub-batches of 2."""
    model, processor = tiny
    monkeypatch.setattr(fast_tower, "CUDA_SUB_BATCH", 2)
    u8 = torch.from_numpy(np.stack([G._decode(r, PX) for r in rows[:5]]))
    px, grid = Patchifier(processor.image_processor)(u8)
    with torch.inference_mode():
        want = G._TowerRunner(model.model.visual, "cpu")(px, grid).pooler_output
        runner = G._TowerRunner(model.model.visual, "cpu")
        runner.compiled = True  # the sub-batching path (CUDA's), run eager here
        calls = []
        real = fast_tower.FastTower.__call__
        monkeypatch.setattr(fast_tower.FastTower, "__call__",
                            lambda self, p, g: calls.append(len(g)) or real(self, p, g))
        got = runner(px, grid).pooler_output
    assert calls == [2, 2, 2] and len(got) == len(want) == 5  # the tail padded to a full sub-batch
    assert all(g.shape == w.shape and torch.allclose(g, w, atol=1e-5) for g, w in zip(got, want))


def test_features_started_ahead_on_a_separately_loaded_tower_answer_the_same(tiny, rows, monkeypatch):
    """What `evaluate` does on CUDA: the tower loaded alone, the first batches started before the
    model exists, the rest one batch ahead of generation; the answers are the model's own."""
    model, processor = tiny
    gen = GenerationSpec(max_new_tokens=6)
    want = G.generate_answers(model, processor, rows, PX, 3, gen, "cpu")
    tower = models.load_vision_tower(ModelSpec(id=TINY, image_px=PX, dtype="float32"), device="cpu")
    features = G.ImageFeatures(tower, processor, rows, PX, 3, "cpu")
    order = []
    real_queue = G.ImageFeatures.queue
    monkeypatch.setattr(G.ImageFeatures, "queue", lambda self, k: order.append(k) or real_queue(self, k))
    features.queue(0)
    features.queue(1)
    calls = []
    real = fast_tower.FastTower.__call__
    monkeypatch.setattr(fast_tower.FastTower, "__call__", lambda self, *a: calls.append(self.tower) or real(self, *a))
    got = G.generate_compared(model, {"model": G.nullcontext}, processor, rows, PX, 3, gen, "cpu",
                              features=features)["model"]
    features.close()
    assert got == want
    assert len(features.batches) == 3 and order[:2] == [0, 1] and max(order) <= 3
    # batches 0 and 1 ran before the patch; the last one on the separate tower, never the model's own
    assert len(calls) == 1 and all(c is tower for c in calls)
    assert features.tower_seconds() is None  # CUDA events only


def test_features_started_in_the_background_answer_the_same_and_count_the_wait(tiny, rows, monkeypatch):
    """`start(background=True)` (what a compiled tower on CUDA does under the model's load): the
    first batches are queued on another thread, `queue`/`take` wait for that start before touching
    a batch, the wait is counted, and the answers are those of an inline start."""
    import threading

    model, processor = tiny
    gen = GenerationSpec(max_new_tokens=6)
    tower = models.load_vision_tower(ModelSpec(id=TINY, image_px=PX, dtype="float32"), device="cpu")
    inline = G.ImageFeatures(tower, processor, rows, PX, 3, "cpu")
    inline.start()
    assert not inline.started_in_background  # CPU, eager: the default starts inline
    want = G.generate_compared(model, {"m": G.nullcontext}, processor, rows, PX, 3, gen, "cpu", features=inline)["m"]
    inline.close()
    threads = []
    real = G.ImageFeatures._compute
    gate = threading.Event()

    def compute(self, decoding):
        threads.append(threading.current_thread().name)
        gate.wait(5)  # held until this thread has gone on: the start must not run in the caller
        return real(self, decoding)

    monkeypatch.setattr(G.ImageFeatures, "_compute", compute)
    features = G.ImageFeatures(tower, processor, rows, PX, 3, "cpu")
    features.start(background=True)
    assert features.started_in_background
    threading.Timer(0.2, gate.set).start()
    got = G.generate_compared(model, {"m": G.nullcontext}, processor, rows, PX, 3, gen, "cpu", features=features)["m"]
    features.close()
    assert got == want
    assert threads[:2] == ["vlmspec-eval-tower_0"] * 2 and threads[2] != threads[0]  # batch 2: generation's thread
    assert features.start_wait_s >= 0.1  # take(0) waited for the held start
    assert set(features.compute_parts) == {"stack_s", "pin_s", "launch_s"}


def test_a_failed_background_start_raises_where_the_batch_is_taken(tiny, rows, monkeypatch):
    model, processor = tiny
    tower = models.load_vision_tower(ModelSpec(id=TINY, image_px=PX, dtype="float32"), device="cpu")
    features = G.ImageFeatures(tower, processor, rows, PX, 3, "cpu")
    monkeypatch.setattr(G.ImageFeatures, "_compute", lambda self, d: 1 / 0)
    features.start(background=True)
    with pytest.raises(ZeroDivisionError):
        features.take(0)
    features.close()


def test_features_of_another_dtype_are_not_used(tiny, rows, monkeypatch):
    model, processor = tiny
    gen = GenerationSpec(max_new_tokens=4)
    want = G.generate_answers(model, processor, rows[:3], PX, 3, gen, "cpu")
    tower = models.load_vision_tower(ModelSpec(id=TINY, image_px=PX, dtype="float32"), device="cpu")
    features = G.ImageFeatures(tower.to(torch.bfloat16), processor, rows[:3], PX, 3, "cpu")
    calls = []
    real = fast_tower.FastTower.__call__
    monkeypatch.setattr(fast_tower.FastTower, "__call__", lambda self, *a: calls.append(self.tower) or real(self, *a))
    got = G.generate_compared(model, {"model": G.nullcontext}, processor, rows[:3], PX, 3, gen, "cpu",
                              features=features)["model"]
    assert got == want and calls == [model.model.visual]  # the model's own tower, not the bf16 copy


def test_batches_are_longest_first_stable_and_cover_every_row():
    batches = G.length_sorted_batches([3, 9, 3, 1, 9, 5], 4)
    assert batches == [[1, 4, 5, 0], [2, 3]]
    assert G.length_sorted_batches([], 4) == []


def test_fast_inputs_equal_the_processor_bitwise(tiny, rows):
    _, processor = tiny
    processor.tokenizer.padding_side = "left"
    chunk = rows[:4]
    images = [resize_image(r["image"], PX) for r in chunk]
    want = processor(text=[prompt_text(processor, r["question"]) for r in chunk], images=images,
                     return_tensors="pt", padding=True, **image_processor_kwargs(PX))
    got = G.text_inputs(processor, G.prompt_texts(processor, [r["question"] for r in chunk], PX))
    u8 = torch.from_numpy(np.stack([G._decode(r, PX) for r in chunk]))
    got["pixel_values"], got["image_grid_thw"] = Patchifier(processor.image_processor)(u8)
    assert set(got) == set(want)
    for k in want:
        assert got[k].dtype == want[k].dtype and torch.equal(got[k], want[k]), k
    assert int(got["attention_mask"].sum(1).min()) < got["attention_mask"].shape[1]  # really padded


def test_fast_image_features_equal_hf(tiny, rows):
    model, processor = tiny
    u8 = torch.from_numpy(np.stack([G._decode(r, PX) for r in rows[:3]]))
    px, grid = Patchifier(processor.image_processor)(u8)
    inner = model.model
    features = G._FastImageFeatures(model, "cpu")
    try:
        assert inner.get_image_features == features._features  # this instance only
        with torch.inference_mode():
            want = type(inner).get_image_features(inner, px, grid, return_dict=True).pooler_output
            for _ in range(2):  # one image's recording, tiled, then the batched replay (twice)
                got = inner.get_image_features(px, grid).pooler_output
                assert len(got) == len(want) == 3
                for g, w in zip(got, want):
                    assert g.shape == w.shape and (g - w).abs().max().item() <= 1e-5
    finally:
        features.remove()
    assert "get_image_features" not in inner.__dict__
    assert features.fast.stats["hf_calls"] == 0 and features.fast.stats["fast_calls"] == 2


def test_greedy_answers_equal_the_reference_path_in_row_order(tiny, rows, monkeypatch):
    model, processor = tiny
    gen = GenerationSpec(max_new_tokens=6)
    calls = []
    real = fast_tower.FastTower.__call__
    monkeypatch.setattr(fast_tower.FastTower, "__call__", lambda self, *a: calls.append(1) or real(self, *a))
    seen = []
    # batch 3 over 7 rows of mixed lengths: three batches (the last short), each sorted and padded
    fast = G.generate_answers(model, processor, rows, PX, 3, gen, "cpu", progress=seen.append)
    assert len(calls) == 3 and sorted(seen) == [1, 3, 3]
    ref = G.generate_answers(model, processor, rows, PX, 3, gen, "cpu", fast=False)
    one_by_one = G.generate_answers_reference(model, processor, rows, PX, 1, gen, "cpu")
    assert len(calls) == 3  # the reference never goes through FastTower
    assert fast == ref == one_by_one
    assert len(fast) == 7 and any(fast) and len(set(fast)) > 1  # real, varied answers
    assert "get_image_features" not in model.model.__dict__
    assert G.generate_answers(model, processor, [], PX, 3, gen, "cpu") == []


@pytest.mark.slow
@pytest.mark.parametrize("limit,n", [("all", 9), (None, 9), (4, 4)])
def test_evaluate_limit_all_and_questions_per_s(tmp_path, limit, n):
    import json

    import lance
    import pyarrow as pa

    from vlmspec.compiler.model import EvalSpec
    from vlmspec.runtime.eval.evaluate import evaluate
    from vlmspec.runtime.eval.job import EvalJob
    from vlmspec.runtime.train.job import SliceRecord

    table = synthetic.generate_table(12, seed=5, image_px=PX)
    ds = lance.write_dataset(table, str(tmp_path / "t.lance"))
    addrs = ds.to_table(columns=[], with_row_address=True).column("_rowaddr").to_numpy()
    sides = ["train"] * 3 + ["eval"] * 9
    lance.write_dataset(pa.table({"row_addr": pa.array(addrs.astype(np.uint64)), "split": sides}),
                        str(tmp_path / "slice.lance"))
    job = EvalJob("h", str(tmp_path / "t.lance"), "id", SliceRecord(str(tmp_path / "slice.lance"), ds.version),
                  ModelSpec(id=TINY, image_px=PX, dtype="float32"),
                  EvalSpec(compare=["base"], limit=limit, batch_size=5, generation={"max_new_tokens": 4}),
                  None, None, tmp_path / "eval", run_id="run-1")
    out = evaluate(job, device="cpu")
    assert out["n"] == n and out["batch_size"] == 5
    assert out["questions_per_s"]["base"] > 0
    assert f"base {out['accuracy']['base']:.3f} ({out['questions_per_s']['base']:.1f} q/s)" in out["summary"]
    saved = json.loads((tmp_path / "eval" / "results.json").read_text())
    assert saved["questions_per_s"] == out["questions_per_s"]
    assert len((tmp_path / "eval" / "predictions.jsonl").read_text().splitlines()) == n
    report = (tmp_path / "eval" / "report.md").read_text()
    assert f"- **Table version:** `{ds.version}`" in report and "- **Run:** `run-1`" in report
    assert "- **Spec hash:** `h`" in report and "Adapter" not in report  # base only: no adapter evaluated


@pytest.mark.slow
def test_base_answers_are_kept_and_reused_until_what_they_depend_on_changes(tmp_path, monkeypatch):
    """A second eval of the same questions with the same model and decoding (a LoRA-only change)
    reuses the base model's answers instead of generating them again; other decoding does not."""
    import lance
    import pyarrow as pa

    from vlmspec.compiler.model import EvalSpec
    from vlmspec.runtime.eval import evaluate as E
    from vlmspec.runtime.eval.job import EvalJob
    from vlmspec.runtime.train.job import SliceRecord

    table = synthetic.generate_table(8, seed=6, image_px=PX)
    ds = lance.write_dataset(table, str(tmp_path / "t.lance"))
    addrs = ds.to_table(columns=[], with_row_address=True).column("_rowaddr").to_numpy()
    lance.write_dataset(pa.table({"row_addr": pa.array(addrs.astype(np.uint64)), "split": ["eval"] * 8}),
                        str(tmp_path / "slice.lance"))

    def job(tokens: int) -> EvalJob:
        return EvalJob("h", str(tmp_path / "t.lance"), "id", SliceRecord(str(tmp_path / "slice.lance"), ds.version),
                       ModelSpec(id=TINY, image_px=PX, dtype="float32"),
                       EvalSpec(compare=["base"], batch_size=4, generation={"max_new_tokens": tokens}),
                       None, None, tmp_path / "eval")

    first = E.evaluate(job(4), device="cpu")
    assert first["reused"] == [] and first["questions_per_s"]["base"] > 0
    import vlmspec.runtime.vlm.models as models_mod

    monkeypatch.setattr(models_mod, "load_full_model", lambda *a, **k: pytest.fail("the base model was loaded again"))
    again = E.evaluate(job(4), device="cpu")
    assert again["reused"] == ["base"] and again["accuracy"] == first["accuracy"]
    assert "base" not in again["questions_per_s"] and "answers kept from an earlier run" in again["summary"]
    monkeypatch.undo()
    other = E.evaluate(job(5), device="cpu")  # other decoding: generated afresh
    assert other["reused"] == [] and other["questions_per_s"]["base"] > 0
    rows = E.eval_rows(job(4))[0]
    key = E.BaseAnswers(job(4), rows, "cpu").key
    assert E.BaseAnswers(job(4), rows, "cuda:0").key != key  # `auto` dtypes differ by device
    bf16 = dataclasses.replace(job(4), model=ModelSpec(id=TINY, image_px=PX, dtype="bfloat16"))
    assert E.BaseAnswers(bf16, rows, "cpu").key != key


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (CI has none; run on the GPU machine)")
def test_fast_path_on_cuda_equals_the_reference_path(rows):
    """The same checks on the GPU, where FastTower's batched attention and the decode prefetch run
    on CUDA streams. FastTower runs the tower in bf16 on CUDA (HF's call too, through the same
    module), so features agree to a few bf16 ulps rather than fp32 tolerance, and greedy answers of
    the plain path over the same batches may flip on a near-tie: most must agree."""
    spec = ModelSpec(id=TINY, image_px=PX, dtype="float32")
    model, processor = models.load_full_model(spec, device="cuda"), models.load_model_processor(spec)
    u8 = torch.from_numpy(np.stack([G._decode(r, PX) for r in rows[:3]]))
    px, grid = Patchifier(processor.image_processor)(u8)
    px, grid = px.cuda(), grid.cuda()
    inner = model.model
    features = G._FastImageFeatures(model, "cuda")
    try:
        with torch.inference_mode():
            want = type(inner).get_image_features(inner, px, grid, return_dict=True).pooler_output
            for _ in range(2):
                got = inner.get_image_features(px, grid).pooler_output
                for g, w in zip(got, want):
                    scale = w.float().abs().max().item()
                    assert g.shape == w.shape and (g - w).float().abs().max().item() <= 0.04 * scale
    finally:
        features.remove()
    gen = GenerationSpec(max_new_tokens=6)
    fast = G.generate_answers(model, processor, rows, PX, 3, gen, "cuda")
    ref = G.generate_answers(model, processor, rows, PX, 3, gen, "cuda", fast=False)
    assert len(fast) == len(ref) == 7 and any(fast)
    same = sum(a == b for a, b in zip(fast, ref))
    assert same >= 5, (fast, ref)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (CI has none; run on the GPU machine)")
def test_compiled_graphed_features_on_cuda_equal_the_eager_tower_batch_by_batch(rows, monkeypatch, tmp_path):
    """What `evaluate` runs on CUDA where the column's compile is cached: the tower loaded alone,
    compiled and replayed as CUDA graphs in sub-batches (2 images here, so 3-image batches are a
    graph replay plus an eager tail), every batch queued before any is taken: a later replay must
    not overwrite an earlier batch's features. They equal the eager tower's to bf16 rounding, and,
    started from a thread during the model's load (transformers changes the default dtype
    meanwhile), the answers the model's own tower gives."""
    monkeypatch.setenv("VLMSPEC_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(fast_tower, "CUDA_SUB_BATCH", 2)
    spec = ModelSpec(id=TINY, image_px=PX, dtype="bfloat16")
    processor = models.load_model_processor(spec)
    gen = GenerationSpec(max_new_tokens=6)

    def features(compile):
        f = G.ImageFeatures(models.load_vision_tower(spec, device="cuda"), processor, rows, PX, 3, "cuda",
                            compile=compile)
        for k in range(len(f.batches)):
            f.queue(k)
        got = [[t.float().cpu() for t in f.take(k)[2].pooler_output] for k in range(len(f.batches))]
        stats = f.tower.fast.stats
        f.close()
        return got, stats, f.warmup

    eager, _, none = features(False)
    graphed, stats, warmup = features(True)
    assert none is None and warmup["seconds"] > 0 and stats["graph_calls"] >= 3
    for batch_e, batch_g in zip(eager, graphed):
        for e, g in zip(batch_e, batch_g):
            assert g.shape == e.shape and (g - e).abs().max().item() <= 0.04 * e.abs().max().item()
    first = eager[0][0]  # the check can fail: some image's features differ from the first's by more
    assert any((t - first).abs().max().item() > 0.04 * first.abs().max().item() for b in eager for t in b)
    f = G.ImageFeatures(models.load_vision_tower(spec, device="cuda"), processor, rows, PX, 3, "cuda")
    assert f.compiled  # this process compiled this configuration above: the default compiles
    f.start()  # as `evaluate`: the first batches queued from a thread while this one loads the model
    assert f.started_in_background
    model = models.load_full_model(spec, device="cuda")
    got = G.generate_compared(model, {"m": G.nullcontext}, processor, rows, PX, 3, gen, "cuda", features=f)["m"]
    f.close()
    want = G.generate_answers(model, processor, rows, PX, 3, gen, "cuda", fast=False)
    assert len(got) == 7 and any(got) and sum(a == b for a, b in zip(got, want)) >= 5, (got, want)


@pytest.fixture(scope="module")
def adapter(tiny, tmp_path_factory):
    """A LoRA adapter for the tiny model whose B is not zero (a trained one's is not), so the
    tuned model answers differently from the base."""
    from peft import LoraConfig, get_peft_model

    spec = ModelSpec(id=TINY, image_px=PX, dtype="float32")
    peft_model = get_peft_model(models.load_full_model(spec, device="cpu"),
                                LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "o_proj"]))
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.5, generator=gen)
    out = tmp_path_factory.mktemp("adapter")
    peft_model.save_pretrained(str(out))
    return str(out)


def test_compared_variants_of_one_model_answer_as_separately_loaded_models(tiny, rows, adapter, monkeypatch):
    """`base` (adapter disabled) and `tuned` (on) from ONE load, sharing each batch's tower
    output, answer exactly as the base model and the adapter model loaded and run on their own."""
    base_model, processor = tiny
    spec = ModelSpec(id=TINY, image_px=PX, dtype="float32")
    gen = GenerationSpec(max_new_tokens=6)
    want_base = G.generate_answers(base_model, processor, rows, PX, 3, gen, "cpu")
    want_tuned = G.generate_answers(models.load_full_model(spec, device="cpu", adapter_dir=adapter),
                                    processor, rows, PX, 3, gen, "cpu")
    assert want_base != want_tuned  # the adapter changes answers: the comparison below can fail
    calls = []
    real = fast_tower.FastTower.__call__
    monkeypatch.setattr(fast_tower.FastTower, "__call__", lambda self, *a: calls.append(1) or real(self, *a))
    model = models.load_full_model(spec, device="cpu", adapter_dir=adapter)
    seconds, seen = {}, []
    got = G.generate_compared(model, {"base": model.disable_adapter, "tuned": G.nullcontext}, processor, rows,
                              PX, 3, gen, "cpu", progress=lambda name, n: seen.append((name, n)), seconds=seconds)
    assert got == {"base": want_base, "tuned": want_tuned}
    assert len(calls) == 3  # three batches: the tower ran once per batch, not once per variant
    assert sorted(seen) == [("base", 1), ("base", 3), ("base", 3), ("tuned", 1), ("tuned", 3), ("tuned", 3)]
    assert set(seconds) == {"base", "tuned"} and all(v > 0 for v in seconds.values())
    assert "get_image_features" not in model.base_model.model.model.__dict__
