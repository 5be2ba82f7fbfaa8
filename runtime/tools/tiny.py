"""Reproducible builder of the shipped tiny Qwen2.5-VL (`vlmspec:tiny-qwen2.5-vl`) for CPU tests.

`vlmspec bench tiny-model OUT_DIR` trains a small byte-level BPE tokenizer on
synthetic TextVQA-style text, writes a Qwen-style chat template and image processor, and saves a
randomly initialised CPU-sized Qwen2.5-VL. Same code + same seed -> same files. Never downloads.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Iterator

__all__ = ["CHAT_TEMPLATE", "SPECIAL_TOKENS", "build", "build_config", "build_tokenizer", "corpus"]

BUILDER_VERSION = 1
SPECIAL_TOKENS = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
    "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>",
]
# Qwen2-VL's chat template (system default, image/video placeholders, generation prompt).
CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
MIN_PIXELS = 56 * 56
MAX_PIXELS = 560 * 560

_SUBJECTS = ["sign", "bottle", "book", "shirt", "jersey", "bus", "clock", "phone", "poster", "can",
             "box", "label", "screen", "car", "plane", "store", "banner", "menu", "cup", "coin"]
_WORDS = ["coca", "cola", "pepsi", "stop", "exit", "open", "sale", "nike", "adidas", "london",
          "paris", "coffee", "beer", "ale", "red", "blue", "green", "black", "white", "yellow",
          "samsung", "apple", "sony", "canon", "nokia", "yes", "no", "one", "two", "three",
          "street", "road", "park", "city", "hotel", "bank", "police", "taxi", "pizza", "cafe"]
_TEMPLATES = [
    "what is written on the {s}?", "what brand is the {s}?", "what number is on the {s}?",
    "what color is the {s}?", "what does the {s} say?", "how many letters are on the {s}?",
    "what time is shown on the {s}?", "which word is on the {s}?", "who made the {s}?",
    "where was the {s} made?", "is the {s} open?", "what is the name on the {s}?",
]


_SYLLABLES = ["ka", "lo", "mi", "ter", "son", "ber", "ex", "pro", "max", "vi", "sta", "ra", "don", "el",
              "tri", "cor", "ma", "ne", "zu", "qui", "bel", "gar", "ton", "ric", "ul", "fa", "sen", "mo"]


def _brand(rng: random.Random) -> str:
    word = "".join(rng.choice(_SYLLABLES) for _ in range(rng.randint(1, 3)))
    return word.upper() if rng.random() < 0.2 else word


def _builtin_rows(rows: int, seed: int) -> Iterator[tuple[str, str, list[str]]]:
    """TextVQA-flavoured questions, answers and OCR tokens from fixed word lists (no dependencies)."""
    rng = random.Random(seed)
    for _ in range(rows):
        question = rng.choice(_TEMPLATES).format(s=rng.choice(_SUBJECTS))
        if "number" in question or "how many" in question or "time" in question:
            answer = str(rng.randint(0, 2030)) if "time" not in question else f"{rng.randint(1, 12)}:{rng.randint(0, 59):02d}"
        else:
            pick = [rng.choice(_WORDS) if rng.random() < 0.5 else _brand(rng) for _ in range(rng.randint(1, 2))]
            answer = " ".join(pick)
        ocr = [rng.choice(_WORDS) if rng.random() < 0.3 else _brand(rng) for _ in range(rng.randint(0, 12))]
        ocr += answer.split()
        yield question, answer, ocr


def _synthetic_rows(rows: int, seed: int) -> Iterator[tuple[str, str, list[str]]] | None:
    try:
        from vlmspec.runtime.sources.synthetic import generate
    except ImportError:
        return None

    def it():
        for batch in generate(rows=rows, seed=seed, image_px=56):
            cols = batch.to_pydict()
            for q, a, o, aa in zip(cols["question"], cols["answer"], cols["ocr_tokens"], cols["answers"]):
                yield q or "", a or "", list(o or []) + [x for x in (aa or []) if x]
    return it()


def corpus(rows: int = 4000, seed: int = 0, source: str = "auto") -> tuple[list[str], str]:
    """Training text for the tokenizer and which generator made it (`synthetic` or `builtin`)."""
    from ..vlm.prompt import PROMPT_SUFFIX

    it, used = None, "builtin"
    if source in ("auto", "synthetic"):
        it = _synthetic_rows(rows, seed)
        if it is None and source == "synthetic":
            raise ImportError("vlmspec.runtime.sources.synthetic is not available")
        used = "synthetic" if it is not None else "builtin"
    it = it if it is not None else _builtin_rows(rows, seed)
    # The template's fixed text, repeated so it gets whole-word merges like a real vocabulary.
    lines = ["system\nYou are a helpful assistant.", "user\n", "assistant\n", "Picture 1: ", "Video 1: "]
    lines *= max(1, rows // 20)
    for q, a, ocr in it:
        lines += [f"{q}{PROMPT_SUFFIX}", a, " ".join(ocr)]
    return lines, used


def build_tokenizer(lines: list[str], vocab_size: int = 1536):
    """Byte-level BPE (Qwen-style pre-tokenizer) with the Qwen special tokens as ids 0..7."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import Qwen2Tokenizer

    tk = Tokenizer(models.BPE(byte_fallback=False))
    # Qwen2's split pattern, then byte-level mapping without its own regex.
    pattern = Regex(r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                    r"|\s*[\r\n]+|\s+(?!\S)|\s+")
    tk.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(pattern, behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tk.decoder = decoders.ByteLevel()
    # every byte in the alphabet: no text is ever out of vocabulary
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tk.train_from_iterator(lines, trainer=trainer)
    tok = Qwen2Tokenizer(tokenizer_object=tk, unk_token=None, bos_token=None,
                         eos_token="<|im_end|>", pad_token="<|endoftext|>")
    # set on the tokenizer too: `apply_chat_template` and the saved files both carry it
    tok.chat_template = CHAT_TEMPLATE
    return tok


def build_config(tok, text_hidden: int = 128, layers: int = 4, vision_depth: int = 4, vision_hidden: int = 128):
    """A CPU-sized `Qwen2_5_VLConfig` wired to the tokenizer's special-token ids."""
    from transformers import Qwen2_5_VLConfig

    heads = 4
    head_dim = text_hidden // heads
    half = head_dim // 2  # sum(mrope_section) must equal head_dim / 2
    # M-RoPE sections (time, height, width): a quarter and two equal halves of the rest, as
    # Qwen2.5-VL's 16/24/24 of 64
    t = half // 4
    mrope = [t, (half - t) // 2, half - t - (half - t) // 2]
    ids = {t_: tok.convert_tokens_to_ids(t_) for t_ in SPECIAL_TOKENS}
    # embedding rows rounded up to a multiple of 64, as real checkpoints pad their vocabulary
    vocab = (len(tok) + 63) // 64 * 64
    return Qwen2_5_VLConfig(
        text_config=dict(
            vocab_size=vocab, hidden_size=text_hidden, intermediate_size=2 * text_hidden,
            num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=2,
            max_position_embeddings=2048, rms_norm_eps=1e-6, tie_word_embeddings=True,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": mrope},
            bos_token_id=None, eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"],
        ),
        vision_config=dict(
            depth=vision_depth, hidden_size=vision_hidden, intermediate_size=2 * vision_hidden, num_heads=4,
            out_hidden_size=text_hidden, patch_size=14, spatial_merge_size=2, temporal_patch_size=2,
            window_size=112, fullatt_block_indexes=sorted({vision_depth // 2 - 1, vision_depth - 1}), in_channels=3,
        ),
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=True,
    )


def build(out_dir: str | Path, seed: int = 0, vocab_size: int = 1536, corpus_source: str = "auto",
          corpus_rows: int = 4000) -> Path:
    """Write the tiny model directory (config, weights, tokenizer, processor) to `out_dir`."""
    import torch
    from transformers import GenerationConfig, Qwen2_5_VLForConditionalGeneration
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    from ..vlm.processor import QwenVLImageOnlyProcessor

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    lines, used = corpus(rows=corpus_rows, seed=seed, source=corpus_source)
    tok = build_tokenizer(lines, vocab_size)
    config = build_config(tok)
    # the same seed gives the same weights: the builder is reproducible byte for byte
    torch.manual_seed(seed)
    model = Qwen2_5_VLForConditionalGeneration(config).eval()
    model.generation_config = GenerationConfig(
        # stop on either end token: answers end with <|im_end|>, padding is <|endoftext|>
        eos_token_id=[config.text_config.eos_token_id, config.text_config.pad_token_id],
        pad_token_id=config.text_config.pad_token_id, do_sample=False)
    model.save_pretrained(out)
    image_processor = Qwen2VLImageProcessorPil(min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS, patch_size=14,
                                               merge_size=2, temporal_patch_size=2)
    proc = QwenVLImageOnlyProcessor(image_processor=image_processor, tokenizer=tok, chat_template=CHAT_TEMPLATE)
    proc.save_pretrained(out)
    _portable_processor_files(out)
    (out / "vlmspec_tiny.json").write_text(json.dumps(
        {"builder_version": BUILDER_VERSION, "seed": seed, "vocab_size": vocab_size, "corpus": used,
         "corpus_rows": corpus_rows,
         "weights": "random-init"}, indent=2, sort_keys=True) + "\n")
    return out


def _portable_processor_files(out: Path) -> None:
    """Name the stock classes (plus a video half), so GPU machines with torchvision load the stock
    `Qwen2_5_VLProcessor` through `AutoProcessor`; without torchvision `load_processor` falls back."""
    path = out / "processor_config.json"
    data = json.loads(path.read_text())
    data["processor_class"] = "Qwen2_5_VLProcessor"
    image = data["image_processor"]
    image["image_processor_type"] = "Qwen2VLImageProcessor"
    data["video_processor"] = {
        "video_processor_type": "Qwen2VLVideoProcessor",
        **{k: image[k] for k in ("do_convert_rgb", "do_normalize", "do_rescale", "do_resize", "image_mean",
                                 "image_std", "merge_size", "patch_size", "resample", "rescale_factor",
                                 "size", "temporal_patch_size")},
    }
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    tok_path = out / "tokenizer_config.json"
    tok = json.loads(tok_path.read_text())
    tok["processor_class"] = "Qwen2_5_VLProcessor"
    tok_path.write_text(json.dumps(tok, indent=2, sort_keys=True) + "\n")
    for f in out.iterdir():  # safetensors writes 0600; a shipped asset must be world-readable
        f.chmod(0o644)
