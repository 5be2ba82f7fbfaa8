"""Tests for vlmspec.runtime.tools.pretrain: the mix helpers, and a few real pretraining steps whose
output must load through the project's own loaders (tower only, language model only, full model)."""

from __future__ import annotations

import json

import pytest
import torch

from vlmspec.compiler.model import ModelSpec
from vlmspec.runtime.eval.metrics import vqa_accuracy
from vlmspec.runtime.tools import pretrain
from vlmspec.runtime.vlm import models


def test_question_family():
    assert pretrain.question_family("what color is the sign?") == "color"
    assert pretrain.question_family("Is this a stop sign?") == "yesno"
    assert pretrain.question_family("does the sign say exit?") == "yesno"
    assert pretrain.question_family("what is written on the sign?") == "read"
    assert pretrain.question_family("which word is written in red?") == "read"


def test_styled_answer_sentences_score_zero_but_short_answers_score():
    answers = ["red"] * 10
    assert pretrain.styled_answer("what color is the sign?", "red", "short") == "red"
    sentence = pretrain.styled_answer("what color is the sign?", "red", "sentence")
    assert sentence == "It is red."
    assert vqa_accuracy(sentence, answers) == 0.0  # the metric gives a sentence no credit
    assert pretrain.styled_answer("is this a stop sign?", "no", "sentence") == "No, it is not."
    assert pretrain.styled_answer("does the sign say exit?", "yes", "sentence") == "Yes, it does."
    assert pretrain.styled_answer("are they open?", "yes", "sentence") == "Yes, they are."


def test_batches_are_a_function_of_the_index(tmp_path):
    from vlmspec.runtime.tools import tiny
    from vlmspec.runtime.vlm.processor import load_processor

    tiny.build(tmp_path, seed=1, corpus_rows=200)
    proc = load_processor(str(tmp_path))
    a = pretrain.PretrainBatches(proc, 1, 56, 6, pretrain.MIX)
    b = pretrain.PretrainBatches(proc, 1, 56, 6, pretrain.MIX)
    x, y = a[3], b[3]
    assert torch.equal(x["input_ids"], y["input_ids"]) and torch.equal(x["pixel_values"], y["pixel_values"])
    assert not torch.equal(a[2]["pixel_values"], x["pixel_values"])
    labels, ids = x["labels"], x["input_ids"]
    end = proc.tokenizer.convert_tokens_to_ids("<|im_end|>")
    pad = proc.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    for row_ids, row_labels in zip(ids, labels):
        taken = row_labels != -100
        assert taken.any() and torch.equal(row_ids[taken], row_labels[taken])
        assert int(row_labels[taken][-1]) == end  # every answer ends its turn
        assert int((row_ids == pad).sum()) == 4  # (56/28)^2 image pads
    with pytest.raises(ValueError):
        pretrain.pretrain(tmp_path / "x", steps=1, seed=0)  # the quickstart's seed is refused


@pytest.mark.slow
def test_pretrain_few_steps_loss_drops_and_output_loads(tmp_path):
    out = tmp_path / "tiny"
    info = pretrain.pretrain(out, steps=14, seed=3, batch_size=8, lr=3e-3, image_px=56, warmup=3, log_every=2,
                             val_rows=12, build_kwargs={"corpus_rows": 300}, log=lambda s: None)
    assert info["steps"] == 14 and info["rows_seen"] > 0
    assert info["val_loss_end"] < info["val_loss_start"] - 0.5
    assert info["log"][-1]["loss"] < info["log"][0]["loss"]
    assert set(info["val_accuracy_quickstart_prompt"]) >= {"all"}
    meta = json.loads((out / "vlmspec_tiny.json").read_text())
    assert meta["weights"] == "pretrained" and meta["pretrain"]["data"]["seed"] == 3

    spec = ModelSpec(id=str(out), image_px=56, dtype="float32")
    tower = models.load_vision_tower(spec)
    lm = models.load_language_model(spec)
    full = models.load_full_model(spec)
    proc = models.load_model_processor(spec)
    assert proc.tokenizer.chat_template and proc.image_processor is not None
    # The tower-only load reads the trained tower, and training moved the tower off its init
    # (the whole model is pretrained, not only the language side).
    for name, p in tower.state_dict().items():
        assert torch.equal(p, full.model.visual.state_dict()[name])
    from transformers import Qwen2_5_VLForConditionalGeneration

    from vlmspec.runtime.tools import tiny

    init = Qwen2_5_VLForConditionalGeneration.from_pretrained(tiny.build(tmp_path / "init", seed=3, corpus_rows=300))
    assert not torch.equal(init.model.visual.patch_embed.proj.weight, full.model.visual.patch_embed.proj.weight)
    assert lm.model.visual is None
    assert models.model_facts(spec).hidden_size == full.config.text_config.hidden_size
