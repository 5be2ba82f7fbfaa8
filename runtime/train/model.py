"""The model a training run updates: the language model alone (4-bit NF4 for QLoRA), wrapped with
LoRA anchored to its modules, optionally with each decoder layer compiled. The vision tower is
never loaded: training reads its cached output.
"""

from __future__ import annotations

import re

__all__ = ["LM_PREFIX", "build_model", "compile_layers", "lora_target_regex"]

LM_PREFIX = r".*language_model\..*"  # LoRA never touches the vision tower or merger


def lora_target_regex(targets: list[str]) -> str:
    """Anchor module names to the language model, so eval (full model) adapts the same modules."""
    names = "|".join(t if not t.isidentifier() else re.escape(t) for t in targets)
    return rf"{LM_PREFIX}\.({names})"


def build_model(model_spec, tr, device: str):
    """Language model only (4-bit NF4 for QLoRA), wrapped with LoRA per `tr` (the train section)."""
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    from ..vlm.models import load_language_model

    quant = tr.quant if tr.quant.bits in (4, 8) else None
    dtype = {16: "bfloat16" if device.startswith("cuda") else "float32", 32: "float32"}.get(tr.quant.bits, "auto")
    model = load_language_model(model_spec, quant=quant, device=device, dtype=dtype)
    gc_kwargs = {"use_reentrant": False}
    if quant is not None:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=tr.gradient_checkpointing,
                                                gradient_checkpointing_kwargs=gc_kwargs)
    elif tr.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=gc_kwargs)
    config = LoraConfig(r=tr.lora.r, lora_alpha=tr.lora.alpha, lora_dropout=tr.lora.dropout, bias="none",
                        target_modules=lora_target_regex(tr.lora.targets),
                        modules_to_save=list(tr.lora.modules_to_save) or None, task_type="CAUSAL_LM")
    model = get_peft_model(model, config)
    model.train()
    return model


def compile_layers(model) -> None:
    """`torch.compile` each decoder layer of the language model ("regional" compilation): the
    layers share one compiled graph (weights are graph inputs), so compiling costs one layer, and
    the step loses most of its per-kernel launch overhead (measured in `vlmspec bench gpu`)."""
    from ..vlm.cached import unwrap

    for layer in unwrap(model).model.language_model.layers:
        layer.compile(dynamic=False)
