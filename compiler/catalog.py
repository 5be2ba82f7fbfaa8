"""Signatures of the builtin UDFs: inputs, parameters and output types, known without importing them.

The implementations live in `vlmspec.runtime.udfs.*`; the compiler only reads their source (to
fingerprint it), never imports it, so planning needs no torch, PIL or pyarrow.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable


@dataclass(frozen=True)
class ModelFacts:
    """What the compiler must know about the model without loading it (filled by the runtime)."""

    id: str
    revision: str
    hidden_size: int
    """Width of merged vision tokens (the language model's hidden size for Qwen2.5-VL)."""
    processor_hash: str = ""
    """Hash of the processor/tokenizer/chat-template config that shapes cached columns."""
    patch_size: int = 14
    merge_size: int = 2


@dataclass(frozen=True)
class Slot:
    """One positional input of a UDF and the Arrow types it accepts (see `types.accepts`)."""

    name: str
    accepts: str
    default: str


@dataclass(frozen=True)
class UdfSignature:
    name: str
    impl: str
    """`module:function` of the implementation (hashed from source for the fingerprint)."""
    slots: tuple[Slot, ...]
    output: str | Callable[[dict[str, Any], Any], str]
    """Canonical output type, or a function of (params, spec.model + facts) giving it."""
    params: dict[str, Any] = field(default_factory=dict)
    """Allowed parameters and their defaults."""
    batch_size: int = 1024
    uses_model: bool = False
    gpu: bool = False
    parallel: bool = False
    """Worth spreading over worker processes (pixel work); vectorised Arrow UDFs are not."""
    doc: str = ""

    def output_type(self, params: dict[str, Any], model: Any) -> str:
        return self.output(params, model) if callable(self.output) else self.output


def _vision_output(params: dict[str, Any], model: Any) -> str:
    spec, facts = model
    return f"fixed_size_list<item: halffloat>[{spec.image_tokens * facts.hidden_size}]"


def _sft_output(params: dict[str, Any], model: Any) -> str:
    n = params.get("max_tokens", 512)
    if isinstance(n, str) and n.strip().isdigit():  # `max_tokens: "{{ n }}"` renders as text
        n = int(n)
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= 1_000_000:
        raise ValueError(f"`max_tokens` must be a whole number from 1 to 1,000,000, got {n!r}")
    return (f"struct<input_ids: fixed_size_list<item: int32>[{n}], "
            f"attention_mask: fixed_size_list<item: int8>[{n}], "
            f"labels: fixed_size_list<item: int32>[{n}]>")


# Columns of the embedded synthetic source (runtime/sources/synthetic.py asserts it matches):
# the real `lance-format/textvqa-lance` schema minus the CLIP embedding columns.
SYNTHETIC_SCHEMA: dict[str, str] = {
    "id": "int64",
    "image": "large_binary",
    "image_id": "string",
    "question_id": "string",
    "question": "string",
    "answers": "list<item: string>",
    "answer": "string",
    "ocr_tokens": "list<item: string>",
    "image_classes": "list<item: string>",
    "set_name": "string",
}

# Sources whose schema is known before ingest (so plans are fully checked offline).
KNOWN_SOURCES: dict[str, dict[str, str]] = {
    "lance-format/textvqa-lance": {
        **SYNTHETIC_SCHEMA,
        "image_emb": "fixed_size_list<item: float>[512]",
        "question_emb": "fixed_size_list<item: float>[512]",
    },
}

_R = "vlmspec.runtime.udfs"
BUILTINS: dict[str, UdfSignature] = {
    s.name: s
    for s in [
        UdfSignature("text.length", f"{_R}.text:length", (Slot("text", "string", "question"),), "int32",
                     batch_size=8192, doc="Characters in a string (0 for null/empty)."),
        UdfSignature("text.words", f"{_R}.text:words", (Slot("text", "string", "question"),), "int32",
                     batch_size=8192, doc="Whitespace-separated words in a string."),
        UdfSignature("text.question_type", f"{_R}.text:question_type", (Slot("text", "string", "question"),),
                     "string", batch_size=8192, doc="Rule-based question type (how_many, what_time, ...)."),
        UdfSignature("text.count", f"{_R}.text:count", (Slot("items", "list", "ocr_tokens"),), "int32",
                     batch_size=8192, doc="Number of items in a list (e.g. OCR tokens)."),
        UdfSignature("image.dhash", f"{_R}.image:dhash", (Slot("image", "binary", "image"),), "uint64",
                     params={"hash_size": 8}, batch_size=256, parallel=True, doc="64-bit difference hash (imagehash)."),
        UdfSignature("image.phash", f"{_R}.image:phash", (Slot("image", "binary", "image"),), "uint64",
                     params={"hash_size": 8}, batch_size=256, parallel=True,
                     doc="64-bit DCT perceptual hash (imagehash)."),
        UdfSignature("image.size", f"{_R}.image:size", (Slot("image", "binary", "image"),),
                     "struct<width: int32, height: int32>", batch_size=1024,
                     doc="Width and height in pixels, read from the header (no full decode)."),
        # 256 rows a call: the UDF runs them as sub-batches of 16 so decode overlaps the tower, and
        # fewer calls mean fewer pipeline drains (tier-3 bench: 94 rows/s at 64, 100 at 256).
        UdfSignature("vlm.vision_tower", f"{_R}.vlm:VisionTower", (Slot("image", "binary", "image"),),
                     _vision_output, batch_size=256, uses_model=True, gpu=True,
                     doc="Merged vision-tower hidden states, fp16 [tokens x hidden], image resized "
                         "to model.image_px square."),
        UdfSignature("vlm.sft_tokens", f"{_R}.vlm:SftTokens",
                     (Slot("question", "string", "question"), Slot("answer", "string", "answer")),
                     _sft_output, params={"max_tokens": 512}, batch_size=256, uses_model=True,
                     doc="Chat-template prompt with the image pads, answer+EOS labels, prompt masked."),
    ]
}
