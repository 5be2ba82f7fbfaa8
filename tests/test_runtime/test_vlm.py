"""Tests for vlmspec.runtime.vlm (prompt, processor, loaders, cached forward) and the tier-3 UDFs.

The equivalence tests run the full Qwen2.5-VL on raw images and compare it with the cached path
(`VisionTower` hiddens + `SftTokens` ids + `cached_forward`). They use a "sharp" copy of the
shipped tiny model (weights re-drawn with unit-variance fan-in scaling, saved in shards) so that
logits and greedy tokens actually depend on the image; a random-init model at std 0.02 answers
every prompt with the same token.
"""

from __future__ import annotations

import io
import json
import math
import shutil

import numpy as np
import pyarrow as pa
import pytest
import torch
from PIL import Image

from vlmspec.compiler.model import ModelSpec
from vlmspec.runtime.udfs.base import UdfContext
from vlmspec.runtime.udfs.tokens import SftTokens
from vlmspec.runtime.udfs.vision import VisionTower
from vlmspec.runtime.vlm import cached, models, prompt
from vlmspec.runtime.vlm.processor import is_vl_processor, load_processor

TINY = "vlmspec:tiny-qwen2.5-vl"
PX = 112  # 8x8 patches, 16 merged tokens
TOKENS = (PX // 28) ** 2
END = "<|im_end|>"


# --- fixtures -------------------------------------------------------------------------------


def _png(seed: int, w: int, h: int) -> bytes:
    rng = np.random.RandomState(seed)
    img = Image.fromarray((rng.rand(h, w, 3) * 255).astype("uint8"))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def sharp_dir(tmp_path_factory):
    """The shipped tiny model with image-sensitive weights, saved sharded (index + >1 shard)."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    src = models.resolve_model_path(TINY)
    out = tmp_path_factory.mktemp("sharp")
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(src, dtype=torch.float32)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim >= 2:
                p.normal_(0.0, 1.0 / math.sqrt(p[0].numel()), generator=gen)
    model.save_pretrained(out, max_shard_size="2MB")
    for f in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "processor_config.json"):
        shutil.copy(f"{src}/{f}", out / f)
    return str(out)


@pytest.fixture(scope="module")
def spec(sharp_dir):
    return ModelSpec(id=sharp_dir, image_px=PX, dtype="float32")


def _vision_ctx(spec, hidden=128):
    return UdfContext(column="vision_tower_hiddens", output_type=pa.list_(pa.float16(), TOKENS * hidden),
                      model=spec, device="cpu")


def _sft_type(n):
    return pa.struct([("input_ids", pa.list_(pa.int32(), n)), ("attention_mask", pa.list_(pa.int8(), n)),
                      ("labels", pa.list_(pa.int32(), n))])


def _sft_ctx(spec, n=128):
    return UdfContext(column="sft_tokens", output_type=_sft_type(n), params={"max_tokens": n}, model=spec)


@pytest.fixture(scope="module")
def tower_udf(spec):
    return VisionTower(_vision_ctx(spec))


@pytest.fixture(scope="module")
def sft_udf(spec):
    return SftTokens(_sft_ctx(spec))


@pytest.fixture(scope="module")
def full(spec):
    return models.load_full_model(spec, "cpu", torch.float32)


@pytest.fixture(scope="module")
def lm(spec):
    return models.load_language_model(spec, None, "cpu", torch.float32)


@pytest.fixture(scope="module")
def batch():
    images = [_png(0, 150, 90), _png(1, 64, 200), _png(2, 112, 112)]
    questions = ["what is written on the sign?", "what number is on the jersey of the player?",
                 "what brand is the bottle?"]
    answers = ["stop", "23", "coca cola"]
    return images, questions, answers


def _full_inputs(processor, images, questions, answers=None, padding_side="right"):
    texts = [prompt.prompt_text(processor, q) + ("" if answers is None else a + END)
             for q, a in zip(questions, answers or questions)]
    processor.tokenizer.padding_side = padding_side
    pil = [prompt.resize_image(b, PX) for b in images]
    return processor(text=texts, images=pil, return_tensors="pt", padding=True, **prompt.image_processor_kwargs(PX))


def _sft_tensors(sft_udf, questions, answers):
    out = sft_udf(pa.array(questions), pa.array(answers))
    n = len(questions)
    get = lambda name: torch.from_numpy(  # noqa: E731
        out.field(name).values.to_numpy(zero_copy_only=False).reshape(n, -1).astype(np.int64))
    return get("input_ids"), get("attention_mask"), get("labels")


# --- prompt / processor / resolution (fast) -------------------------------------------------


def test_resize_image_is_fixed_square_rgb():
    img = prompt.resize_image(_png(0, 150, 90), PX)
    assert img.size == (PX, PX) and img.mode == "RGB"
    gray = Image.new("L", (30, 40))
    assert prompt.resize_image(gray, 56).mode == "RGB"
    assert np.array_equal(np.asarray(prompt.resize_image(_png(0, 150, 90), PX)), np.asarray(img))
    with pytest.raises(ValueError, match="multiple of 28"):
        prompt.resize_image(gray, 100)
    with pytest.raises(ValueError, match="empty"):
        prompt.resize_image(b"", PX)


def test_prompt_text_has_one_placeholder_and_suffix():
    proc = load_processor(models.resolve_model_path(TINY))
    assert is_vl_processor(proc)
    text = prompt.prompt_text(proc, "  what is this?  ")
    assert text.count(prompt.IMAGE_PAD) == 1
    assert "what is this?" + prompt.PROMPT_SUFFIX in text
    assert text.endswith("<|im_start|>assistant\n")
    assert prompt.expand_image_pads(text, 5).count(prompt.IMAGE_PAD) == 5
    with pytest.raises(ValueError):
        prompt.expand_image_pads("no pads", 3)
    assert prompt.answer_end_token(proc.tokenizer) == END


def test_resolve_model_path():
    shipped = models.resolve_model_path(TINY)
    assert shipped.endswith("assets/tiny-qwen2.5-vl")
    assert models.resolve_model_path(shipped) == shipped
    assert models.resolve_model_path("Qwen/Qwen2.5-VL-3B-Instruct", "abc") == "Qwen/Qwen2.5-VL-3B-Instruct"
    with pytest.raises(ValueError, match="unknown shipped model"):
        models.resolve_model_path("vlmspec:nope")
    with pytest.raises(FileNotFoundError):
        models.resolve_model_path("/definitely/not/here")


def test_model_facts_local_and_offline_table(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))  # an empty cache: nothing is cached
    facts = models.model_facts(ModelSpec(id=TINY, image_px=PX))
    assert facts.hidden_size == 128 and facts.patch_size == 14 and facts.merge_size == 2
    again = models.model_facts(ModelSpec(id=TINY, image_px=PX))
    other_px = models.model_facts(ModelSpec(id=TINY, image_px=224))
    assert facts.processor_hash == again.processor_hash != other_px.processor_hash
    for size, hidden in [("3B", 2048), ("7B", 3584), ("32B", 5120), ("72B", 8192)]:
        f = models.model_facts(ModelSpec(id=f"Qwen/Qwen2.5-VL-{size}-Instruct", revision="r1"))
        assert f.hidden_size == hidden and len(f.processor_hash) == 64
    with pytest.raises(ValueError, match="hidden_size"):
        models.model_facts(ModelSpec(id="someone/unknown-model"))
    assert models.model_facts(ModelSpec(id="someone/unknown-model", hidden_size=64)).hidden_size == 64


# --- SftTokens ------------------------------------------------------------------------------


def test_sft_tokens_layout(sft_udf, batch):
    _, questions, answers = batch
    ids, mask, labels = _sft_tensors(sft_udf, questions, answers)
    tok = sft_udf.tokenizer
    image_pad = tok.convert_tokens_to_ids(prompt.IMAGE_PAD)
    end = tok.convert_tokens_to_ids(END)
    for i, a in enumerate(answers):
        assert int((ids[i] == image_pad).sum()) == TOKENS
        n = int(mask[i].sum())
        assert bool(mask[i, :n].all()) and not bool(mask[i, n:].any())  # right padding
        assert bool((ids[i, n:] == tok.pad_token_id).all())
        lab = labels[i][labels[i] != -100]
        assert lab[-1] == end and tok.decode(lab[:-1]) == a
        first = int((labels[i] != -100).nonzero()[0])
        assert bool((labels[i, :first] == -100).all())  # the prompt is masked
        assert torch.equal(labels[i, first:n], ids[i, first:n]) and bool((labels[i, n:] == -100).all())
    meta = sft_udf.field_metadata()
    assert meta["vlmspec.image_tokens"] == str(TOKENS)


def test_sft_tokens_matches_processor(sft_udf, batch):
    images, questions, answers = batch
    ids, mask, _ = _sft_tensors(sft_udf, questions, answers)
    ref = _full_inputs(sft_udf.processor, images, questions, answers)
    for i in range(len(questions)):
        got = ids[i][mask[i].bool()]
        want = ref["input_ids"][i][ref["attention_mask"][i].bool()]
        assert torch.equal(got, want)


def test_sft_tokens_too_long_row_raises(spec):
    udf = SftTokens(_sft_ctx(spec, 56))
    ok = udf(pa.array(["what?"]), pa.array(["yes"]))
    assert len(ok) == 1
    with pytest.raises(ValueError, match=r"row 1: .*max_tokens 56"):
        udf(pa.array(["what?", "what is written on the very long sign over there?"]),
            pa.array(["yes", "a long answer that will not fit"]))


def test_sft_tokens_bad_rows_raise(sft_udf):
    with pytest.raises(ValueError, match="row 0: answer is null"):
        sft_udf(pa.array(["what?"]), pa.array([None], pa.string()))
    with pytest.raises(ValueError, match="row 1: question"):
        sft_udf(pa.array(["what?", " "]), pa.array(["a", "b"]))
    with pytest.raises(ValueError, match=r"row 1: chat template produced 2 `<\|image_pad\|>`"):
        sft_udf(pa.array(["what?", "what is <|image_pad|> here?"]), pa.array(["x", "y"]))


def test_sft_tokens_output_type_mismatch_rejected(spec):
    ctx = UdfContext(column="sft", output_type=_sft_type(64), params={"max_tokens": 128}, model=spec)
    with pytest.raises(ValueError, match="max_tokens"):
        SftTokens(ctx)


# --- VisionTower and loaders ----------------------------------------------------------------


def test_vision_tower_udf_output(tower_udf, full, batch):
    images, _, _ = batch
    out = tower_udf(pa.array(images, pa.binary()))
    assert out.type == pa.list_(pa.float16(), TOKENS * 128) and len(out) == 3
    assert tower_udf.field_metadata()["vlmspec.grid_thw"] == "1,8,8"
    assert tower_udf.field_metadata()["vlmspec.hidden_size"] == "128"
    assert tower_udf.field_metadata()["vlmspec.image_px"] == str(PX)
    feats = out.values.to_numpy(zero_copy_only=False).reshape(3, TOKENS, 128)
    ref = _full_inputs(load_processor(tower_udf.spec.id), images, ["q"] * 3)
    with torch.no_grad():
        want = torch.cat(full.model.get_image_features(ref["pixel_values"], ref["image_grid_thw"]).pooler_output)
    want = want.reshape(3, TOKENS, 128).to(torch.float16).numpy()
    assert np.array_equal(feats, want)
    assert len(tower_udf(pa.array([], pa.binary()))) == 0
    with pytest.raises(ValueError, match="row 1: cannot decode"):
        tower_udf(pa.array([images[0], b"not an image"], pa.binary()))


def test_vision_tower_prefetch_decodes_the_next_batch_with_the_same_results(tower_udf, batch):
    images, _, _ = batch
    a, b = pa.array(images, pa.binary()), pa.array(images[::-1], pa.binary())
    plain = [tower_udf(a), tower_udf(b)]
    tower_udf.prefetch(b)  # what the engine does: the next batch starts decoding before this one runs
    got_a = tower_udf(a)  # not prefetched: decoded now, into the other staging slot
    assert [d.images is b for d in tower_udf._ahead] == [True]
    got_b = tower_udf(b)  # prefetched: the same results
    assert tower_udf._ahead == []
    assert got_a.equals(plain[0]) and got_b.equals(plain[1])
    bad = pa.array([images[0], b"junk"], pa.binary())
    tower_udf.prefetch(bad)
    tower_udf.prefetch(a)  # two batches ahead: the first is still waiting to be called
    with pytest.raises(ValueError, match="row 1: cannot decode"):
        tower_udf(bad)  # a bad row in a prefetched batch fails its own call, naming the row
    assert tower_udf(a).equals(plain[0])


def test_engine_prefetches_each_next_batch(tmp_path):
    from vlmspec.runtime.executors.chunks import Chunk, compute_chunk

    uri = str(tmp_path / "t.lance")
    import lance

    ds = lance.write_dataset(pa.table({"x": pa.array(range(10))}), uri)
    seen = []

    class Udf:
        def prefetch(self, x):
            seen.append(("prefetch", x.to_pylist()))

        def __call__(self, x):
            seen.append(("call", x.to_pylist()))
            return x

    class Node:
        inputs, params, output, batch, on_error = ["x"], {}, "int64", True, "fail"

    _, values, _ = compute_chunk(ds, Udf(), Node(), Chunk(0, 0, 10), 4)
    assert values.to_pylist() == list(range(10))
    assert seen == [("prefetch", [4, 5, 6, 7]), ("call", [0, 1, 2, 3]), ("prefetch", [8, 9]),
                    ("call", [4, 5, 6, 7]), ("call", [8, 9])]


def test_vision_tower_udf_rejects_wrong_output_type(spec):
    with pytest.raises(ValueError, match="does not match the model"):
        VisionTower(_vision_ctx(spec, hidden=64))


def test_tower_only_load_reads_only_visual_shards(spec, full, monkeypatch):
    import safetensors

    opened = []
    real = safetensors.safe_open

    def spy(path, *a, **k):
        opened.append(str(path).rsplit("/", 1)[-1])
        return real(path, *a, **k)

    monkeypatch.setattr(safetensors, "safe_open", spy)
    tower = models.load_vision_tower(spec, "cpu", torch.float32)
    index = json.load(open(f"{spec.id}/model.safetensors.index.json"))["weight_map"]
    visual_shards = {s for k, s in index.items() if "visual." in k}
    assert set(opened) == visual_shards and visual_shards < set(index.values())
    names = [n for n, _ in tower.named_parameters()]
    assert not any(k in n for n in names for k in ("language_model", "lm_head", "embed_tokens"))
    want = full.model.visual.state_dict()
    assert set(tower.state_dict()) == set(want)
    assert all(torch.equal(v, want[k]) for k, v in tower.state_dict().items())


def test_language_model_load_has_no_visual_params(lm, full):
    assert lm.model.visual is None
    assert not any("visual" in n for n, _ in list(lm.named_parameters()) + list(lm.named_buffers()))
    want = {k: v for k, v in full.state_dict().items() if "visual" not in k}
    assert set(lm.state_dict()) == set(want)
    assert all(torch.equal(v, want[k]) for k, v in lm.state_dict().items())


def test_legacy_hub_key_layout_loads(spec, tmp_path, full):
    """Hub checkpoints spell keys `visual.*` / `model.layers.*`; both loaders must accept them."""
    from safetensors.torch import save_file

    legacy = {}
    for k, v in full.state_dict().items():
        if k == "lm_head.weight":
            continue  # tied
        k = k.replace("model.visual.", "visual.").replace("model.language_model.", "model.")
        legacy[k] = v.contiguous()
    save_file(legacy, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    for f in ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
              "chat_template.jinja", "processor_config.json"):
        shutil.copy(f"{spec.id}/{f}", tmp_path / f)
    legacy_spec = ModelSpec(id=str(tmp_path), image_px=PX, dtype="float32")
    tower = models.load_vision_tower(legacy_spec, "cpu", torch.float32)
    assert all(torch.equal(v, full.model.visual.state_dict()[k]) for k, v in tower.state_dict().items())
    lm = models.load_language_model(legacy_spec, None, "cpu", torch.float32)
    fsd = full.state_dict()
    assert all(torch.equal(v, fsd[k]) for k, v in lm.state_dict().items())


def test_4bit_language_model_on_cpu(spec, tower_udf, sft_udf, batch):
    import bitsandbytes as bnb

    quant = {"bits": 4, "type": "nf4", "double_quant": True, "compute_dtype": "float32"}
    q = models.load_language_model(spec, quant, "cpu", torch.float32)
    assert q.model.visual is None and getattr(q, "is_loaded_in_4bit", False)
    assert isinstance(q.model.language_model.layers[0].self_attn.q_proj, bnb.nn.Linear4bit)
    images, questions, answers = batch
    ids, mask, labels = _sft_tensors(sft_udf, questions[:1], answers[:1])
    feats = tower_udf.encode(pa.array(images[:1], pa.binary()))
    out = cached.cached_forward(q, ids, mask, feats, (1, 8, 8), labels=labels)
    assert torch.isfinite(out.loss)


# --- equivalence: cached path vs the full model on raw images -------------------------------


def _label_logits(full_model, ref, positions):
    full_model.model.rope_deltas = None
    with torch.no_grad():
        logits = full_model(**ref).logits
    return logits[:, :-1][positions[:, 0], positions[:, 1]]


@pytest.mark.slow
def test_cached_logits_equal_full_model(full, lm, tower_udf, sft_udf, batch):
    images, questions, answers = batch
    ids, mask, labels = _sft_tensors(sft_udf, questions, answers)
    ref = _full_inputs(sft_udf.processor, images, questions, answers)
    fp32 = tower_udf.encode(pa.array(images, pa.binary()))
    col = tower_udf(pa.array(images, pa.binary()))
    fp16 = torch.from_numpy(col.values.to_numpy(zero_copy_only=False).reshape(len(images), -1).copy())
    width = ref["input_ids"].shape[1]
    assert torch.equal(ids[:, :width], ref["input_ids"]) and not bool(mask[:, width:].any())
    with torch.no_grad():
        out32 = cached.cached_forward(lm, ids, mask, fp32, (1, 8, 8), labels=labels)
        out16 = cached.cached_forward(lm, ids, mask, fp16, (1, 8, 8), labels=labels)
        # Same padded width as the processor batch: identical kernels, so (near-)bitwise equal.
        same = cached.cached_forward(lm, ids[:, :width], mask[:, :width], fp32, (1, 8, 8),
                                     labels=labels[:, :width])
    want = _label_logits(full, ref, out32.label_positions)
    assert out32.logits.shape == want.shape and out32.targets.numel() == want.shape[0]
    diff32 = (out32.logits - want).abs().max().item()  # measured 3.9e-6 (SFT width 128 vs 67)
    diff16 = (out16.logits - want).abs().max().item()  # measured 9.7e-4 (fp16 storage)
    assert diff32 <= 1e-5, diff32
    assert diff16 <= 1e-2, diff16
    assert (same.logits - want).abs().max().item() <= 1e-6  # measured 0.0
    ref_loss = torch.nn.functional.cross_entropy(want, out32.targets)
    assert abs(out32.loss.item() - ref_loss.item()) <= 1e-5


@pytest.mark.slow
def test_without_mrope_positions_the_diff_is_large(full, lm, tower_udf, sft_udf, batch):
    """What the reference pipeline did (1D positions): the same check must then fail."""
    images, questions, answers = batch
    ids, mask, labels = _sft_tensors(sft_udf, questions, answers)
    ref = _full_inputs(sft_udf.processor, images, questions, answers)
    feats = tower_udf.encode(pa.array(images, pa.binary()))
    grid = cached.image_grid((1, 8, 8), len(images), ids.device)
    with torch.no_grad():
        embeds = cached._embed(lm, ids, feats, grid)
        hidden = lm.model.language_model(inputs_embeds=embeds, attention_mask=mask).last_hidden_state
        sel = labels[:, 1:] != -100
        logits = lm.lm_head(hidden[:, :-1][sel])
    width = ref["input_ids"].shape[1]
    want = _label_logits(full, ref, sel[:, :width - 1].nonzero())
    assert (logits - want).abs().max().item() > 1e-2


@pytest.mark.slow
def test_cached_generate_equals_full_generate(full, lm, tower_udf, sft_udf, batch):
    images, questions, _ = batch
    ref = _full_inputs(sft_udf.processor, images, questions, padding_side="left")
    full.model.rope_deltas = None
    with torch.no_grad():
        want = full.generate(**ref, max_new_tokens=6, do_sample=False)[:, ref["input_ids"].shape[1]:]
    # SFT-style right-padded prompts from the same shared prompt code; cached_generate re-packs them.
    p = [prompt.expand_image_pads(prompt.prompt_text(sft_udf.processor, q), TOKENS) for q in questions]
    sft_udf.processor.tokenizer.padding_side = "right"
    enc = sft_udf.processor.tokenizer(p, add_special_tokens=False, padding=True, return_tensors="pt")
    feats = tower_udf.encode(pa.array(images, pa.binary()))
    got = cached.cached_generate(lm, enc["input_ids"], enc["attention_mask"], feats, (1, 8, 8), max_new_tokens=6)
    assert torch.equal(got, want), (got, want)
    assert len({tuple(r) for r in want.tolist()}) > 1  # the tokens depend on the image/question


def test_cached_forward_rejects_wrong_pad_count(lm, sft_udf, batch):
    _, questions, answers = batch
    ids, mask, labels = _sft_tensors(sft_udf, questions[:2], answers[:2])
    feats = torch.zeros(2, TOKENS, 128)
    bad = ids.clone()
    bad[1, (bad[1] == sft_udf.image_pad_id).nonzero()[0]] = sft_udf.pad_id
    with pytest.raises(ValueError, match=r"row 1 has 15 `<\|image_pad\|>` tokens"):
        cached.cached_forward(lm, bad, mask, feats, (1, 8, 8), labels=labels)
    with pytest.raises(ValueError, match="no label tokens"):
        cached.cached_forward(lm, ids, mask, feats, (1, 8, 8), labels=torch.full_like(labels, -100))
    with pytest.raises(ValueError, match="tokens per row"):
        cached.cached_forward(lm, ids, mask, torch.zeros(2, 4, 128), (1, 8, 8), labels=labels)


def test_cached_forward_without_labels_keeps_last_logits(lm, sft_udf, batch):
    _, questions, answers = batch
    ids, mask, _ = _sft_tensors(sft_udf, questions[:1], answers[:1])
    out = cached.cached_forward(lm, ids, mask, torch.zeros(1, TOKENS, 128), (1, 8, 8), logits_to_keep=1)
    assert out.loss is None and out.logits.shape == (1, 1, lm.config.text_config.vocab_size)


def test_cached_forward_trains_lora_through_peft(spec, tower_udf, sft_udf, batch):
    from peft import LoraConfig, get_peft_model

    base = models.load_language_model(spec, None, "cpu", torch.float32)
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                            init_lora_weights=False))
    images, questions, answers = batch
    ids, mask, labels = _sft_tensors(sft_udf, questions[:2], answers[:2])
    feats = tower_udf.encode(pa.array(images[:2], pa.binary()))
    out = cached.cached_forward(model, ids, mask, feats, (1, 8, 8), labels=labels)
    out.loss.backward()
    grads = [p.grad for n, p in model.named_parameters() if p.requires_grad]
    assert grads and all(g is not None for g in grads) and any(float(g.abs().sum()) > 0 for g in grads)


# --- builder --------------------------------------------------------------------------------


@pytest.mark.slow
def test_tiny_builder_output_loads_offline(tmp_path):
    from vlmspec.runtime.tools import tiny

    out = tiny.build(tmp_path / "tiny", corpus_source="builtin", corpus_rows=1000)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["vision_config"]["out_hidden_size"] == cfg["text_config"]["hidden_size"]
    proc = load_processor(str(out))
    tok = proc.tokenizer
    assert 1000 <= len(tok) <= 2000
    for t in tiny.SPECIAL_TOKENS:
        assert len(tok(t, add_special_tokens=False).input_ids) == 1
    assert cfg["image_token_id"] == tok.convert_tokens_to_ids("<|image_pad|>")
    s = ModelSpec(id=str(out), image_px=56)
    assert models.load_vision_tower(s, "cpu", torch.float32) is not None
    assert models.load_language_model(s, None, "cpu", torch.float32).model.visual is None
    size = sum(f.stat().st_size for f in out.iterdir())
    assert size < 25 * 2**20


# --- the sync-free training step (positions and label slots precomputed on the host) --------


def test_mrope_positions_equal_get_rope_index(lm, sft_udf, batch):
    _, questions, answers = batch
    ids, mask, _ = _sft_tensors(sft_udf, questions, answers)  # right-padded, as sft_tokens writes
    grid = torch.tensor([[1, 8, 8]] * 3)
    # also left-padded and unpadded rows, and a row with no image at all
    left = torch.stack([torch.roll(r, int((m == 0).sum())) for r, m in zip(ids, mask)])
    lmask = torch.stack([torch.roll(m, int((m == 0).sum())) for m in mask])
    text_only = ids.clone()
    text_only[text_only == sft_udf.image_pad_id] = 100
    for i, m in ((ids, mask), (left, lmask), (ids[:, :40], torch.ones_like(ids[:, :40])), (text_only, mask)):
        g = grid if bool((i == sft_udf.image_pad_id).any()) else None
        want = cached.rope_position_ids(lm, i, m, g) if g is not None else None
        got = cached.mrope_positions(i, m, sft_udf.image_pad_id, (4, 4))
        if want is None:  # HF needs a grid only when there is an image; text rows count 0, 1, ...
            want = ((m.long().cumsum(1) - 1) * m).unsqueeze(0).expand(3, -1, -1)
        assert torch.equal(got, want)


def test_cached_loss_equals_cached_forward_loss(lm, tower_udf, sft_udf, batch):
    images, questions, answers = batch
    ids, mask, labels = _sft_tensors(sft_udf, questions, answers)
    feats = tower_udf.encode(pa.array(images, pa.binary()))
    inputs = cached.step_inputs(ids, mask, labels, sft_udf.image_pad_id, TOKENS, (4, 4))
    assert inputs.right_padded and inputs.label_index.shape[1] % 8 == 0
    assert inputs.n_labels == int((labels[:, 1:] != -100).sum())
    with torch.no_grad():
        want = cached.cached_forward(lm, ids, mask, feats, (1, 8, 8), labels=labels).loss
        got = cached.cached_loss(lm, ids, mask, feats, inputs)  # no attention mask (right padding)
        left = torch.stack([torch.roll(r, int((m == 0).sum())) for r, m in zip(ids, mask)])
        lmask = torch.stack([torch.roll(m, int((m == 0).sum())) for m in mask])
        llab = torch.stack([torch.roll(r, int((m == 0).sum())) for r, m in zip(labels, mask)])
        linputs = cached.step_inputs(left, lmask, llab, sft_udf.image_pad_id, TOKENS, (4, 4))
        got_left = cached.cached_loss(lm, left, lmask, feats, linputs)  # masked path
    assert not linputs.right_padded
    assert abs(got.item() - want.item()) <= 1e-5, (got.item(), want.item())
    assert abs(got_left.item() - want.item()) <= 1e-5, (got_left.item(), want.item())


def test_step_inputs_rejects_bad_rows(sft_udf, batch):
    _, questions, answers = batch
    ids, mask, labels = _sft_tensors(sft_udf, questions[:2], answers[:2])
    bad = ids.clone()
    bad[1, (bad[1] == sft_udf.image_pad_id).nonzero()[0]] = sft_udf.pad_id
    with pytest.raises(ValueError, match=r"row 1 has 15 `<\|image_pad\|>` tokens"):
        cached.step_inputs(bad, mask, labels, sft_udf.image_pad_id, TOKENS, (4, 4))
    split = ids.clone()  # right count, but not one run
    pads = (split[0] == sft_udf.image_pad_id).nonzero().flatten()
    a, b = int(pads[3]), int(pads[-1]) + 1
    split[0, a], split[0, b] = int(ids[0, b]), int(ids[0, a])
    with pytest.raises(ValueError, match="row 0 has 16 .* in one run"):
        cached.step_inputs(split, mask, labels, sft_udf.image_pad_id, TOKENS, (4, 4))
    with pytest.raises(ValueError, match="no label tokens"):
        cached.step_inputs(ids, mask, torch.full_like(labels, -100), sft_udf.image_pad_id, TOKENS, (4, 4))
