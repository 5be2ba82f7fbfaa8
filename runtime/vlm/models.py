"""Resolving and loading Qwen2.5-VL pieces: only the tower, only the language model, or the whole model.

The tower-only load reads nothing but `visual.` tensors (only the shards that hold them); the
language-model load never materialises the tower. Nothing here downloads unless given a hub id,
and `model_facts` never touches the network (the compiler calls it while planning).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from vlmspec.compiler.catalog import ModelFacts
from vlmspec.compiler.errors import ApplyError, Problem
from vlmspec.compiler.memory import TextShape

__all__ = [
    "KNOWN_HIDDEN_SIZES",
    "SHIPPED_MODELS",
    "Qwen2_5_VLLanguageOnly",
    "load_full_model",
    "load_language_model",
    "load_model_processor",
    "load_vision_tower",
    "model_facts",
    "resolve_dtype",
    "resolve_model_path",
]

SHIPPED_MODELS = {"vlmspec:tiny-qwen2.5-vl": "tiny-qwen2.5-vl"}
KNOWN_HIDDEN_SIZES = {"3B": 2048, "7B": 3584, "32B": 5120, "72B": 8192}
"""Merged vision-token width (= LLM hidden size) of the public Qwen2.5-VL sizes, for offline planning."""
KNOWN_TEXT_SHAPES = {"3B": TextShape(2048, 36, 11008, 151936, 16, 2, True),
                     "7B": TextShape(3584, 28, 18944, 152064, 28, 4, False)}
"""The public configs' language models, so a hub id plans its training memory offline."""
_VISUAL_KEY = re.compile(r"^(?:model\.)?visual\.")
_PROCESSOR_FILES = (
    "processor_config.json", "preprocessor_config.json", "tokenizer.json", "tokenizer_config.json",
    "special_tokens_map.json", "added_tokens.json", "vocab.json", "merges.txt",
    "chat_template.jinja", "chat_template.json",
)


# --- resolution -----------------------------------------------------------------------------


def resolve_model_path(model_id: str, revision: str = "main") -> str:
    """A local directory as is, a shipped `vlmspec:` model's directory, otherwise the hub id.

    The revision only matters for hub ids; callers pass it to `from_pretrained(revision=...)`.
    """
    if model_id.startswith("vlmspec:"):
        if model_id not in SHIPPED_MODELS:
            raise ValueError(f"unknown shipped model `{model_id}`; known: {', '.join(sorted(SHIPPED_MODELS))}")
        path = Path(__file__).resolve().parent.parent / "assets" / SHIPPED_MODELS[model_id]
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"shipped model `{model_id}` is missing at {path}; rebuild it with "
                                    f"`vlmspec bench pretrain-tiny {path}` (see its vlmspec_tiny.json "
                                    "for the recorded command)")
        return str(path)
    expanded = os.path.expanduser(model_id)
    if os.path.isdir(expanded):
        return expanded
    if model_id.startswith(("/", "./", "../", "~")):
        raise FileNotFoundError(f"model directory `{model_id}` does not exist")
    return model_id


def _is_local(path_or_id: str) -> bool:
    return os.path.isdir(path_or_id)


def _hub_kwargs(spec: Any, path: str) -> dict[str, Any]:
    kw: dict[str, Any] = {"trust_remote_code": bool(getattr(spec, "trust_remote_code", False))}
    if not _is_local(path):
        kw["revision"] = getattr(spec, "revision", "main")
        kw["local_files_only"] = _hub_offline(spec, path)
    return kw


def _hub_offline(spec: Any, path: str) -> bool:
    """For a hub id: False when the hub answers; True when it does not but the Hugging Face cache
    holds the model (load from there at once); otherwise an ApplyError that says what to do,
    instead of transformers retrying for tens of seconds and raising a bare OSError."""
    from ..hub import hub_unreachable

    reason = hub_unreachable()
    if reason is None:
        return False
    revision = getattr(spec, "revision", "main")
    if _local_config(path, revision) is not None:
        return True
    raise ApplyError(Problem(
        f"cannot fetch the model `{path}` (revision `{revision}`): the Hugging Face hub cannot be reached: "
        f"{reason}, and the model is not in the Hugging Face cache", "model.id",
        fix=f"Download it where the hub is reachable (`hf download {path} --revision {revision} --local-dir DIR`), "
            "copy DIR here and set `model.id: DIR`"))


def resolve_dtype(dtype: Any, device: str = "cpu"):
    """A torch dtype from a name, a torch dtype or `auto` (bf16 on CUDA, fp32 elsewhere)."""
    import torch

    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "auto"):
        return torch.bfloat16 if str(device).startswith("cuda") else torch.float32
    return {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}[dtype]


def load_model_processor(model_spec: Any):
    """The processor of a model spec (stock, or the image-only fallback without torchvision)."""
    from .processor import load_processor

    path = resolve_model_path(model_spec.id, model_spec.revision)
    revision = None if _is_local(path) else model_spec.revision
    return load_processor(path, revision, bool(getattr(model_spec, "trust_remote_code", False)),
                          local_files_only=revision is not None and _hub_offline(model_spec, path))


# --- facts ----------------------------------------------------------------------------------


def _local_config(path: str, revision: str) -> dict[str, Any] | None:
    """config.json from a local directory, or from the hub cache only (never the network)."""
    if _is_local(path):
        f = Path(path) / "config.json"
        return json.loads(f.read_text()) if f.is_file() else None
    try:
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(path, "config.json", revision=revision)
    except Exception:  # noqa: BLE001 - a malformed id or cache layout only means "not cached"
        cached = None
    if isinstance(cached, str) and os.path.isfile(cached):
        return json.loads(Path(cached).read_text())
    return None


def _hidden_from_config(cfg: dict[str, Any]) -> int | None:
    vision = cfg.get("vision_config") or {}
    text = cfg.get("text_config") or {}
    return vision.get("out_hidden_size") or text.get("hidden_size") or cfg.get("hidden_size")


def _hidden_from_table(model_id: str) -> int | None:
    if "qwen2.5-vl" not in model_id.lower():
        return None
    m = re.search(r"(\d+)B", model_id, flags=re.IGNORECASE)
    return KNOWN_HIDDEN_SIZES.get(f"{m.group(1)}B") if m else None


def _text_shape(cfg: dict[str, Any], model_id: str) -> TextShape | None:
    text = cfg.get("text_config") or (cfg if "num_hidden_layers" in cfg else {})
    try:
        return TextShape(int(text["hidden_size"]), int(text["num_hidden_layers"]), int(text["intermediate_size"]),
                         int(text.get("vocab_size") or cfg["vocab_size"]), int(text["num_attention_heads"]),
                         int(text.get("num_key_value_heads") or text["num_attention_heads"]),
                         bool(cfg.get("tie_word_embeddings", text.get("tie_word_embeddings", True))))
    except (KeyError, TypeError, ValueError):
        m = re.search(r"(\d+)B", model_id, flags=re.IGNORECASE) if "qwen2.5-vl" in model_id.lower() else None
        return KNOWN_TEXT_SHAPES.get(f"{m.group(1)}B") if m else None


def _processor_hash(path: str, spec: Any) -> str:
    """sha256 over what shapes the cached columns: processor/tokenizer/template files, image_px and
    the shared prompt constants. Hub ids hash `id@revision` instead of file contents so that the
    hash never depends on what happens to be in the local cache (pin a commit for exactness)."""
    from . import prompt

    h = hashlib.sha256()
    h.update(f"image_px={spec.image_px}\nsuffix={prompt.PROMPT_SUFFIX!r}\n"
             f"resample={prompt.RESAMPLE.name}\n".encode())
    if _is_local(path):
        for name in _PROCESSOR_FILES:
            f = Path(path) / name
            if f.is_file():
                h.update(f"\n--{name}--\n".encode())
                h.update(f.read_bytes())
    else:
        h.update(f"hub:{path}@{getattr(spec, 'revision', 'main')}".encode())
    return h.hexdigest()


def model_facts(model_spec: Any) -> ModelFacts:
    """What the compiler needs about the model, from local files only (no network, no weights)."""
    path = resolve_model_path(model_spec.id, model_spec.revision)
    cfg = _local_config(path, model_spec.revision) or {}
    hidden = getattr(model_spec, "hidden_size", None) or _hidden_from_config(cfg) or _hidden_from_table(path)
    if hidden is None:
        raise ValueError("its config.json is neither in a local folder nor in the Hugging Face cache, and "
                         "planning never downloads (offline, only the public Qwen2.5-VL sizes are known; "
                         "`model.hidden_size` gives any other)")
    vision = cfg.get("vision_config") or {}
    return ModelFacts(id=model_spec.id, revision=model_spec.revision, hidden_size=int(hidden),
                      processor_hash=_processor_hash(path, model_spec),
                      patch_size=int(vision.get("patch_size", 14)),
                      merge_size=int(vision.get("spatial_merge_size", 2)), text=_text_shape(cfg, path))


# --- vision tower ---------------------------------------------------------------------------


def _model_file(path: str, filename: str, revision: str, local_only: bool = False) -> str | None:
    """A file of the model: local, or downloaded from the hub (None when the repo lacks it)."""
    if _is_local(path):
        f = Path(path) / filename
        return str(f) if f.is_file() else None
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError

    try:
        return hf_hub_download(path, filename, revision=revision, local_files_only=local_only)
    except EntryNotFoundError:
        return None


def _visual_shards(path: str, revision: str, local_only: bool = False) -> list[str]:
    """The safetensors files holding `visual.` / `model.visual.` tensors (only those shards)."""
    index = _model_file(path, "model.safetensors.index.json", revision, local_only)
    if index is None:
        single = _model_file(path, "model.safetensors", revision, local_only)
        if single is None:
            raise FileNotFoundError(f"`{path}` has neither model.safetensors nor model.safetensors.index.json")
        return [single]
    weight_map = json.loads(Path(index).read_text())["weight_map"]
    shards = sorted({shard for key, shard in weight_map.items() if _VISUAL_KEY.match(key)})
    if not shards:
        raise ValueError(f"`{path}` has no `visual.` weights in its index")
    files = [_model_file(path, s, revision, local_only) for s in shards]
    return [f for f in files if f is not None]


def load_vision_tower(model_spec: Any, device: str = "cpu", dtype: Any = "auto"):
    """Only the vision tower, with only its weights read from the checkpoint (never the LM).

    Builds `Qwen2_5_VisionTransformerPretrainedModel` from the vision config and feeds
    `from_pretrained(None, state_dict=...)` lazy safetensors slices of the `visual.` keys with the
    prefix stripped, so transformers does the meta-device init, dtype cast and buffer setup.
    """
    from safetensors import safe_open
    from transformers import AutoConfig
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VisionTransformerPretrainedModel

    path = resolve_model_path(model_spec.id, model_spec.revision)
    kw = _hub_kwargs(model_spec, path)
    config = AutoConfig.from_pretrained(path, **kw)
    torch_dtype = resolve_dtype(dtype if dtype is not None else getattr(model_spec, "dtype", "auto"), device)
    with ExitStack() as stack:
        state_dict = {}
        for shard in _visual_shards(path, model_spec.revision, kw.get("local_files_only", False)):
            f = stack.enter_context(safe_open(shard, framework="pt", device="cpu"))
            for key in f.keys():
                if _VISUAL_KEY.match(key):
                    state_dict[_VISUAL_KEY.sub("", key)] = f.get_slice(key)
        tower, info = Qwen2_5_VisionTransformerPretrainedModel.from_pretrained(
            None, config=config.vision_config, state_dict=state_dict, dtype=torch_dtype,
            device_map={"": device}, attn_implementation="sdpa", output_loading_info=True)
    problems = {k: sorted(v) for k, v in info.items() if k in ("missing_keys", "unexpected_keys", "mismatched_keys")
                and v}
    if problems:
        raise ValueError(f"vision tower weights of `{model_spec.id}` do not match its config: {problems}")
    return tower.eval().requires_grad_(False)


# --- language model -------------------------------------------------------------------------


def _language_only_class():
    from transformers.conversion_mapping import (
        get_checkpoint_conversion_mapping,
        register_checkpoint_conversion_mapping,
    )
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VLForConditionalGeneration

    class Qwen2_5_VLLanguageOnly(Qwen2_5_VLForConditionalGeneration):
        """Qwen2.5-VL without its vision tower: `model.visual` is dropped in `__init__` (which
        `from_pretrained` runs on the meta device), so checkpoint `visual.` tensors have no target,
        are recorded as unexpected (silenced below) and never read."""

        _keys_to_ignore_on_load_unexpected = [r"(^|\.)visual\."]

        def __init__(self, config):
            super().__init__(config)
            del self.model.visual
            self.model.visual = None

    # Hub checkpoints use the legacy layout (`visual.*`, `model.layers.*`); transformers renames
    # them by class name, so the subclass needs the same mapping as its parent.
    name = Qwen2_5_VLLanguageOnly.__name__
    try:
        register_checkpoint_conversion_mapping(
            name, get_checkpoint_conversion_mapping(Qwen2_5_VLForConditionalGeneration.__name__) or [])
    except ValueError:  # already registered (module reloaded)
        pass
    return Qwen2_5_VLLanguageOnly


_LANGUAGE_ONLY = None


def __getattr__(name: str):
    # Lazy so `import vlmspec.runtime.vlm.models` stays cheap (no torch/transformers model import).
    global _LANGUAGE_ONLY
    if name == "Qwen2_5_VLLanguageOnly":
        if _LANGUAGE_ONLY is None:
            _LANGUAGE_ONLY = _language_only_class()
        return _LANGUAGE_ONLY
    raise AttributeError(name)


def _quant_dict(quant: Any) -> dict[str, Any] | None:
    if quant is None:
        return None
    return quant.model_dump() if hasattr(quant, "model_dump") else dict(quant)


def _bnb_config(quant: dict[str, Any] | None, skip: list[str] | None = None):
    """`BitsAndBytesConfig` for 4/8-bit specs; None for 16/32 (plain weights)."""
    from transformers import BitsAndBytesConfig

    bits = int((quant or {}).get("bits", 16))
    if bits == 4:
        return BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type=quant.get("type", "nf4"),
            bnb_4bit_use_double_quant=bool(quant.get("double_quant", True)),
            bnb_4bit_compute_dtype=resolve_dtype(quant.get("compute_dtype", "bfloat16")),
            llm_int8_skip_modules=skip)
    if bits == 8:
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=skip)
    return None


def load_language_model(model_spec: Any, quant: Any = None, device: str = "cpu", dtype: Any = "auto"):
    """The full Qwen2.5-VL minus its vision tower, optionally 4-bit NF4 (QLoRA) or 8-bit.

    Returns a `Qwen2_5_VLForConditionalGeneration` subclass whose `model.visual` is None; feed it
    cached hiddens through `vlmspec.runtime.vlm.cached`.
    """
    cls = __getattr__("Qwen2_5_VLLanguageOnly")
    path = resolve_model_path(model_spec.id, model_spec.revision)
    torch_dtype = resolve_dtype(dtype if dtype is not None else getattr(model_spec, "dtype", "auto"), device)
    kw = _hub_kwargs(model_spec, path)
    bnb = _bnb_config(_quant_dict(quant), skip=["lm_head"])
    if bnb is not None:
        kw["quantization_config"] = bnb
    model = cls.from_pretrained(path, dtype=torch_dtype, device_map={"": device},
                                attn_implementation="sdpa", **kw)
    visual = [n for n, _ in list(model.named_parameters()) + list(model.named_buffers()) if "visual" in n]
    if visual or getattr(model.model, "visual", None) is not None:
        raise RuntimeError(f"language-model load still holds vision weights: {visual[:3]}")
    return model.eval()


def load_full_model(model_spec: Any, device: str = "cpu", dtype: Any = "auto", adapter_dir: str | None = None,
                    quant: Any = None):
    """The whole model (vision tower included) for evaluation, with an optional LoRA adapter.

    With `quant` the language side is quantised like in training while the tower stays in `dtype`
    (it produced the cached hiddens unquantised).
    """
    from transformers import Qwen2_5_VLForConditionalGeneration

    path = resolve_model_path(model_spec.id, model_spec.revision)
    torch_dtype = resolve_dtype(dtype if dtype is not None else getattr(model_spec, "dtype", "auto"), device)
    kw = _hub_kwargs(model_spec, path)
    bnb = _bnb_config(_quant_dict(quant), skip=["lm_head", "visual"])
    if bnb is not None:
        kw["quantization_config"] = bnb
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(
        path, dtype=torch_dtype, device_map={"": device}, attn_implementation="sdpa", **kw)
    if adapter_dir is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter_dir, is_trainable=False)
    return model.eval()
