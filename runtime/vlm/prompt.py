"""The one definition of image preprocessing and prompt text, shared by SFT tokens, training and eval.

Train/eval mismatch in resolution or wording silently costs accuracy (the reference pipeline cached
560 px squares but evaluated native resolution with a different hint). Every path that turns an
image or a question into model input must go through this module; nothing else builds prompts.
"""

from __future__ import annotations

import io
from typing import Any

from PIL import Image

__all__ = [
    "IMAGE_PAD",
    "PROMPT_SUFFIX",
    "RESAMPLE",
    "answer_end_token",
    "build_messages",
    "expand_image_pads",
    "image_processor_kwargs",
    "prompt_text",
    "resize_image",
]

IMAGE_PAD = "<|image_pad|>"
PROMPT_SUFFIX = "\nAnswer the question using a single word or phrase."
RESAMPLE = Image.Resampling.BICUBIC
"""Fixed resample filter (the Qwen2-VL image processor's own default), so pixels never depend on
which code path resized the image."""


def resize_image(image: bytes | bytearray | memoryview | Image.Image, image_px: int) -> Image.Image:
    """Decode, convert to RGB and resize to a `image_px` x `image_px` square.

    Square on purpose: a fixed size gives a fixed grid (`image_px / 14` patches a side) and hence a
    fixed token count `(image_px / 28) ** 2`, so the cached hiddens are a fixed-size list column
    and every SFT row carries the same number of image pads. The aspect ratio is distorted; eval
    calls this same function so the model sees the same distortion it was tuned on.
    """
    if image_px <= 0 or image_px % 28:
        raise ValueError(f"image_px must be a positive multiple of 28, got {image_px}")
    if isinstance(image, Image.Image):
        img = image
    else:
        if image is None or len(image) == 0:
            raise ValueError("empty image bytes")
        img = Image.open(io.BytesIO(bytes(image)))
        img.load()
    if img.mode != "RGB":
        img = img.convert("RGB")
    if img.size != (image_px, image_px):
        img = img.resize((image_px, image_px), resample=RESAMPLE)
    return img


def image_processor_kwargs(image_px: int) -> dict[str, Any]:
    """Image-processor call kwargs that pin the resize target to exactly `image_px` squared.

    `resize_image` already delivers that size; pinning min = max pixels makes the processor's
    `smart_resize` an identity whatever the model's min/max pixel bounds are.
    """
    area = image_px * image_px
    return {"size": {"shortest_edge": area, "longest_edge": area}}


def build_messages(question: str, suffix: str = PROMPT_SUFFIX) -> list[dict[str, Any]]:
    """One user turn: the image, then the question with the fixed answer-style suffix.

    `suffix` exists for the tiny model's pretraining (`vlm.pretrain`), which asks plain questions;
    SFT tokens, training and eval always use the default.
    """
    return [{"role": "user", "content": [
        {"type": "image"},
        {"type": "text", "text": f"{question.strip()}{suffix}"},
    ]}]


def prompt_text(processor_or_tokenizer: Any, question: str, suffix: str = PROMPT_SUFFIX) -> str:
    """The chat-template prompt (with the assistant header) containing exactly ONE image pad."""
    text = processor_or_tokenizer.apply_chat_template(
        build_messages(question, suffix), tokenize=False, add_generation_prompt=True)
    if isinstance(text, list):  # some processor versions return a batch
        (text,) = text
    n = text.count(IMAGE_PAD)
    if n != 1:
        raise ValueError(f"chat template produced {n} `{IMAGE_PAD}` placeholders, expected exactly 1")
    return text


def expand_image_pads(text: str, n_tokens: int) -> str:
    """Replace the single image placeholder with `n_tokens` copies (what the processor does)."""
    if text.count(IMAGE_PAD) != 1:
        raise ValueError(f"expected exactly one `{IMAGE_PAD}` in the prompt, found {text.count(IMAGE_PAD)}")
    return text.replace(IMAGE_PAD, IMAGE_PAD * n_tokens)


def answer_end_token(tokenizer: Any) -> str:
    """The token that ends an assistant turn: `<|im_end|>` in Qwen chat models, else the EOS."""
    tok = getattr(tokenizer, "tokenizer", tokenizer)
    if "<|im_end|>" in tok.get_vocab():
        return "<|im_end|>"
    if tok.eos_token is None:
        raise ValueError("tokenizer has neither `<|im_end|>` nor an EOS token")
    return tok.eos_token
