"""Phase `qlora`: 4-bit NF4 QLoRA r=16 with gradient checkpointing at batch 2 (needs bitsandbytes),
with `--qlora-grid` also r16/r64 x batch 2/8/16 on the cached and raw paths. Writes `gpu_qlora.json`.
"""

from __future__ import annotations

import gc
import time
from pathlib import Path
from typing import Any

from ._common import (SHAPES, Phase, adapter_optimizer, add_lora, build_model, build_tower, device_step_inputs,
                      grid_of, measure, pixels, pooled, text_batch)


def _save_checkpoint(ph: Phase, ctx: dict[str, Any], ckpt: Path) -> None:
    """The bf16 model on disk, for the 4-bit loader to quantize as `train` would."""
    import torch

    shape, device = ctx["shape"], ctx["device"]
    t = time.perf_counter()
    model = ctx.get("model") or build_model(shape, device, torch.bfloat16)
    model.save_pretrained(ckpt)  # with the tower: the language-only loader never reads it
    if ctx.get("model") is None:
        del model
    if str(device).startswith("cuda"):
        torch.cuda.empty_cache()
    ph.res.details["checkpoint_save_s"] = round(time.perf_counter() - t, 1)


def _configs(ctx: dict[str, Any]) -> list[tuple[str, int, int, bool]]:
    # (path, rank, batch, gradient checkpointing). Path: cached (hiddens as the column holds them)
    # or raw (the frozen vision tower run every step beside the 4-bit language model). By default
    # cached r16 b2 with and without checkpointing; `--qlora-grid` adds the whole grid,
    # both paths x r16/r64 x batch 2/8/16, checkpointing on.
    configs = [("cached", 16, 2, True), ("cached", 16, 2, False)]
    if ctx.get("qlora_grid"):
        configs += [(path, r, b, True) for path in ("cached", "raw") for r in (16, 64) for b in (2, 8, 16)
                    if (path, r, b) != ("cached", 16, 2)]
    return configs


def _load_4bit(ph: Phase, ckpt: Path, shape: str, device: str):
    """The language model in 4-bit NF4, through vlmspec's loader where it works on this machine."""
    import torch

    try:  # vlmspec's loader (what `train` uses): language model only, tower never built
        from vlmspec.compiler.model import ModelSpec
        from vlmspec.runtime.vlm.models import load_language_model

        q = load_language_model(ModelSpec(id=str(ckpt), image_px=SHAPES[shape]["image_px"]),
                                quant={"bits": 4, "type": "nf4", "double_quant": True,
                                       "compute_dtype": "bfloat16"}, device=device, dtype="bfloat16")
        ph.res.details["loader"] = "vlmspec.runtime.vlm.models.load_language_model"
    except Exception as e:  # noqa: BLE001 - e.g. another transformers version's internals
        from transformers import BitsAndBytesConfig, Qwen2_5_VLForConditionalGeneration

        why = f"{type(e).__name__}: {e}"
        ph.res.details["loader"] = f"plain from_pretrained (vlmspec loader failed: {why})"[:400]
        bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                 bnb_4bit_compute_dtype=torch.bfloat16,
                                 llm_int8_skip_modules=["lm_head", "visual"])
        q = Qwen2_5_VLForConditionalGeneration.from_pretrained(
            ckpt, dtype=torch.bfloat16, device_map={"": device}, attn_implementation="sdpa",
            quantization_config=bnb)
    # the 4-bit model never runs its own tower (the raw path runs the separate bf16 one): drop it
    if getattr(q.model, "visual", None) is not None:
        q.model.visual = None
    return q


def _run_config(ph: Phase, ctx: dict[str, Any], ckpt: Path, tower, key: str, path: str, r: int, b: int,
                grad_ckpt: bool) -> tuple[float | None, float | None]:
    """Load, adapt and time one configuration; returns (samples/s, own peak GiB)."""
    import torch
    from peft import prepare_model_for_kbit_training

    from vlmspec.runtime.vlm.cached import cached_loss

    shape, device = ctx["shape"], ctx["device"]
    s = SHAPES[shape]
    # The previous configuration's model, optimizer and step closures sit in reference
    # cycles until a collection: free them now, or `before` counts memory that is then
    # released mid-measurement (own peaks below the 4-bit weights, negative weights).
    gc.collect()
    if str(device).startswith("cuda"):
        torch.cuda.empty_cache()
    before = torch.cuda.memory_allocated() if str(device).startswith("cuda") else 0
    q = _load_4bit(ph, ckpt, shape, device)
    if str(device).startswith("cuda"):
        torch.cuda.empty_cache()
    weights = ((torch.cuda.memory_allocated() - before) / 2**30) if str(device).startswith("cuda") else None
    # exactly what runtime/train.build_model does for a 4-bit spec
    q = prepare_model_for_kbit_training(q, use_gradient_checkpointing=grad_ckpt,
                                        gradient_checkpointing_kwargs={"use_reentrant": False})
    pm = add_lora(q, r)
    opt = adapter_optimizer(pm, device)  # as runtime.train: fused AdamW on CUDA
    ids, mask, labels = text_batch(shape, b, device, seed=7)
    ntok = (s["image_px"] // 28) ** 2
    h = torch.randn(b, ntok, s["text"]["hidden_size"], device=device, dtype=torch.float16) * 0.5
    si = device_step_inputs(shape, ids, mask, labels, device)
    px = pixels(shape, b, device, ctx["dtype"], seed=b) if path == "raw" else None
    grid = torch.tensor([grid_of(shape)] * b)

    def hiddens():
        if path == "raw":
            with torch.no_grad():
                return pooled(tower(px, grid_thw=grid.to(device))).reshape(b, ntok, -1)
        return h

    def step():  # the training step of runtime.train (cached_loss on precomputed step inputs)
        cached_loss(pm, ids, mask, hiddens(), si).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    what = "cached" if path == "cached" else \
        f"raw ({str(ctx['dtype']).replace('torch.', '')} tower every step)"
    med = measure(ph, key, f"4-bit NF4 QLoRA {what}, r{r}, batch {b}, gradient checkpointing "
                  f"{'on' if grad_ckpt else 'off'}", b, step, device, unit="samples/s", warmup=2, target_s=2.0,
                  max_calls=20, weights_gib=round(weights, 3) if weights is not None else None, r=r, batch=b,
                  gc=grad_ckpt, path=path)
    fig = ph.res.figures[key]
    # Whatever else this process holds on the GPU (the bf16 model other phases of the same
    # call use) is in max_memory_allocated too: report the QLoRA's own peak beside it.
    fig.extra["resident_before_gib"] = round(before / 2**30, 3)
    own = None if fig.extra["peak_gib"] is None else round(fig.extra["peak_gib"] - before / 2**30, 3)
    fig.extra["own_peak_gib"] = own
    pm = opt = q = None  # the step closures see None: the model and optimizer are freed
    if str(device).startswith("cuda"):
        torch.cuda.empty_cache()
    return med, own


def phase_qlora(ph: Phase, ctx: dict[str, Any]) -> None:
    shape, device = ctx["shape"], ctx["device"]
    ckpt = Path(ctx["workdir"]) / f"lm-{shape}"
    # a --workdir reused across device calls keeps the checkpoint: saving 3B weights takes a while
    if not (ckpt / "config.json").exists():
        _save_checkpoint(ph, ctx, ckpt)
    results = {}
    configs = _configs(ctx)
    ph.res.details["configs"] = [list(c) for c in configs]
    tower = None
    if any(c[0] == "raw" for c in configs):
        model = ctx.get("model")
        tower = model.model.visual if model is not None else (ctx.get("tower") or build_tower(shape, device,
                                                                                             ctx["dtype"]))
    for path, r, b, grad_ckpt in configs:
        key = f"qlora_r{r}_b{b}_gc{int(grad_ckpt)}" + ("_raw" if path == "raw" else "")
        if ph.time_left() < 40:
            ph.res.notes.append(f"{key}: skipped (device-call deadline)")
            continue
        try:
            med, own = _run_config(ph, ctx, ckpt, tower, key, path, r, b, grad_ckpt)
            # the derived figures are about the configuration, r16 batch 2 on the cached path
            if (path, r, b) == ("cached", 16, 2):
                results[grad_ckpt] = (med, own)
        except Exception as e:  # noqa: BLE001
            ph.error(key, e)
    if True in results:
        med, peak = results[True]
        ph.res.derive("qlora_peak", "QLoRA r16 batch 2, gradient checkpointing: peak GPU memory", peak, unit="GiB",
                      target="<= 5 GB (4.66 GiB)", met=(peak is not None and peak * 2**30 <= 5e9) if shape == "3b"
                      else None, how="torch.cuda.max_memory_allocated over the timed steps, minus what the "
                                     "process held before loading the 4-bit model")
        ph.res.derive("qlora_rate", "QLoRA r16 batch 2, gradient checkpointing: samples/s", med, unit="samples/s")
    ph.save()
