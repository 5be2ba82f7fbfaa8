"""Tier-3 builtin `vlm.sft_tokens`: the chat prompt with image pads, answer + end token as labels.

The prompt is built through `vlmspec.runtime.vlm.prompt`, the single definition shared with
training and evaluation; transformers is imported inside the class. A bad row raises `ValueError`
naming the row; the engine applies the column's `on_error` policy.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from vlmspec.compiler.udf import udf

from .base import UdfContext, as_array

__all__ = ["SftTokens"]


@udf(name="vlm.sft_tokens", inputs=["question", "answer"], accepts=["string", "string"],
     output="struct<input_ids: fixed_size_list<item: int32>[{max_tokens}], "
            "attention_mask: fixed_size_list<item: int8>[{max_tokens}], "
            "labels: fixed_size_list<item: int32>[{max_tokens}]>",
     params={"max_tokens": {"type": "int", "default": 512, "min": 1, "max": 1_000_000,
                            "doc": "rows are padded to it; a longer prompt + answer is a row error"}},
     batch_size=256, model=True, version="4ea8c1c7dc216da4")
class SftTokens:
    """Chat-template prompt with the image pads, answer + end-of-turn as labels, prompt masked.

    Rows are right-padded to `max_tokens` (pad id, mask 0, label -100). A row whose prompt plus
    answer plus end token does not fit raises instead of being truncated: a cut answer would teach
    the model to stop mid-answer (or never emit the end token), and a cut prompt would lose image
    pads or leave every label masked.
    """

    def __init__(self, ctx: UdfContext):
        from vlmspec.runtime.vlm import models, prompt

        if ctx.model is None:
            raise ValueError(f"`{ctx.column}`: vlm.sft_tokens needs a `model` section")
        self.ctx = ctx
        self.max_tokens = int(ctx.params.get("max_tokens", 512))
        out = ctx.output_type
        for name in ("input_ids", "attention_mask", "labels"):
            t = out.field(name).type
            if t.list_size != self.max_tokens:
                raise ValueError(f"`{ctx.column}`: output field `{name}` has {t.list_size} slots, "
                                 f"max_tokens is {self.max_tokens}")
        self.processor = models.load_model_processor(ctx.model)
        self.tokenizer = self.processor.tokenizer
        self.image_tokens = int(ctx.model.image_tokens)
        self.pad_id = self.tokenizer.pad_token_id
        if self.pad_id is None:
            self.pad_id = self.tokenizer.eos_token_id
        self.image_pad_id = self.tokenizer.convert_tokens_to_ids(prompt.IMAGE_PAD)
        self.end_id = self.tokenizer.convert_tokens_to_ids(prompt.answer_end_token(self.tokenizer))
        self._prompt = prompt

    def _prompt_ids(self, questions: list[str]) -> list[list[int]]:
        p, texts = self._prompt, []
        for i, q in enumerate(questions):
            try:
                texts.append(p.expand_image_pads(p.prompt_text(self.processor, q), self.image_tokens))
            except ValueError as e:  # e.g. the question itself contains `<|image_pad|>`
                raise ValueError(f"row {i}: {e}") from e
        return self.tokenizer(texts, add_special_tokens=False)["input_ids"]

    def __call__(self, questions: pa.Array, answers: pa.Array) -> pa.StructArray:
        qs, ans = as_array(questions).to_pylist(), as_array(answers).to_pylist()
        n, L = len(qs), self.max_tokens
        for i, (q, a) in enumerate(zip(qs, ans)):
            if q is None or not q.strip():
                raise ValueError(f"row {i}: question is null or empty")
            if a is None or not a.strip():
                raise ValueError(f"row {i}: answer is null or empty (nothing to learn but the end token)")
        ids = np.full((n, L), self.pad_id, dtype=np.int32)
        mask = np.zeros((n, L), dtype=np.int8)
        labels = np.full((n, L), -100, dtype=np.int32)
        if n:
            prompts = self._prompt_ids(qs)
            answer_ids = self.tokenizer([a.strip() for a in ans], add_special_tokens=False)["input_ids"]
        for i in range(n):
            p, a = prompts[i], list(answer_ids[i]) + [self.end_id]
            pads = sum(1 for t in p if t == self.image_pad_id)
            if pads != self.image_tokens:
                raise ValueError(f"row {i}: prompt has {pads} `<|image_pad|>` tokens, expected "
                                 f"{self.image_tokens} (does the question contain special tokens?)")
            if len(p) + len(a) > L:
                raise ValueError(f"row {i}: prompt ({len(p)} tokens, {self.image_tokens} of them image pads) "
                                 f"+ answer and end token ({len(a)}) = {len(p) + len(a)} > max_tokens {L}; "
                                 "raise `max_tokens` or lower `model.image_px`")
            ids[i, :len(p)] = p
            ids[i, len(p):len(p) + len(a)] = a
            labels[i, len(p):len(p) + len(a)] = a
            mask[i, :len(p) + len(a)] = 1
        data = {"input_ids": ids, "attention_mask": mask, "labels": labels}
        fields = list(self.ctx.output_type)
        arrays = [pa.FixedSizeListArray.from_arrays(pa.array(data[f.name].reshape(-1), type=f.type.value_type),
                                                    type=f.type) for f in fields]
        return pa.StructArray.from_arrays(arrays, fields=fields)

    def field_metadata(self) -> dict[str, str]:
        return {
            "vlmspec.max_tokens": str(self.max_tokens),
            "vlmspec.image_tokens": str(self.image_tokens),
            "vlmspec.pad_id": str(self.pad_id),
            "vlmspec.image_pad_id": str(self.image_pad_id),
            "vlmspec.end_id": str(self.end_id),
            "vlmspec.padding": "right",
        }
