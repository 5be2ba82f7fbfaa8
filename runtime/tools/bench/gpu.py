"""`vlmspec bench gpu`: the vision tower, the LoRA/QLoRA train step and tier-3 backfill on a GPU,
at the real Qwen2.5-VL-3B-Instruct shape (built from its config with random weights: exact for
speed and memory, meaningless for accuracy).

Phases (each writes `gpu_<phase>.json` + `.md`; one device call can run several):

* `equivalence`: bf16 checks at the 3B shape. `FastTower` vs HF's tower; our cached path
  (`cached_forward` on tower hiddens, also fp16-stored ones) vs the full model's logits at the
  label positions.
* `tower`: images/s of HF's tower, `FastTower` and `FastTower` + torch.compile at several batch
  sizes, on pre-made pixel tensors (560 px = 1,600 patches an image).
* `trainstep`: LoRA train step (forward, backward, AdamW) samples/s and peak memory, sequence 512
  with 400 image tokens, labels on the last 16 tokens (logits only there), for our cached path
  and the raw path (tower run every step, no grad), r in {16, 64}, batch in {2, 8, 16}; eager,
  and with torch.compile (regional: each decoder layer / tower block compiled once, shared).
* `qlora`: 4-bit NF4 QLoRA r=16 with gradient checkpointing at batch 2 (needs bitsandbytes).
* `tier3`: rows/s of the `vision_tower_hiddens` + `sft_tokens` backfill through vlmspec's engine
  (decode, preprocess, tower, write to Lance) and of the VisionTower UDF alone, against the bare
  tower forward rate on pre-made pixels, with GPU busy % sampled (needs pylance).

`--shape tiny` runs every phase at a toy shape (on the CPU too): it is how this file is tested.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import importlib.metadata
import json
import math
import os
import platform
import shutil
import statistics
import tempfile
import threading
import time
import traceback
from pathlib import Path
from typing import Any, Callable

from .common import DEFAULT_OUT, Results, load

PHASES = ("equivalence", "tower", "trainstep", "qlora", "tier3")

SHAPES: dict[str, dict[str, Any]] = {
    # Qwen2.5-VL-3B-Instruct's config.json (text and vision), as used by gpu_probe2.py.
    "3b": dict(
        text=dict(hidden_size=2048, intermediate_size=11008, num_hidden_layers=36, num_attention_heads=16,
                  num_key_value_heads=2, vocab_size=151936, max_position_embeddings=128000, rope_theta=1e6,
                  rms_norm_eps=1e-6, mrope_section=[16, 24, 24]),
        vision=dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, out_hidden_size=2048,
                    window_size=112, fullatt_block_indexes=[7, 15, 23, 31]),
        ids=dict(image_token_id=151655, video_token_id=151656, vision_start_token_id=151652,
                 vision_end_token_id=151653),
        text_vocab=150000, image_px=560, seq=512, tower_batches=[16, 32, 64], train_batches=[2, 8, 16],
        ranks=[16, 64]),
    # Toy shape for tests (and CPU runs): same code paths, seconds not minutes.
    "tiny": dict(
        text=dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=1536, max_position_embeddings=2048, rope_theta=1e4,
                  rms_norm_eps=1e-6, mrope_section=[4, 6, 6], bos_token_id=None, eos_token_id=2),
        vision=dict(depth=4, hidden_size=128, intermediate_size=256, num_heads=4, out_hidden_size=128,
                    window_size=112, fullatt_block_indexes=[1, 3]),
        ids=dict(image_token_id=6, video_token_id=7, vision_start_token_id=3, vision_end_token_id=4),
        text_vocab=1500, image_px=224, seq=96, tower_batches=[2, 4], train_batches=[2], ranks=[4]),
}
NLAB = 16  # label tokens per row (answer + end token)
GPU_LIBS = ("torch", "transformers", "peft", "bitsandbytes", "pylance", "lancedb", "pyarrow", "triton", "pillow",
            "numpy", "nvidia-ml-py")


# --- results --------------------------------------------------------------------------------

class GpuResults(Results):
    """Results plus the accelerator block; library versions without importing vlmspec's runtime
    (so a phase that needs no pylance runs where pylance is missing)."""

    def to_dict(self) -> dict[str, Any]:
        from .common import machine_info

        libs = {"python": platform.python_version()}
        for name in GPU_LIBS:
            try:
                libs[name] = importlib.metadata.version(name)
            except importlib.metadata.PackageNotFoundError:
                pass
        return {
            "benchmark": self.name, "title": self.title,
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(self.started)),
            "seconds": round(time.time() - self.started, 2),
            "machine": {**machine_info(), **accelerator_info()}, "libraries": libs, "settings": self.settings,
            "figures": {k: f.to_dict() for k, f in self.figures.items()}, "derived": self.derived,
            "details": self.details, "notes": self.notes,
        }


def accelerator_info() -> dict[str, Any]:
    import torch

    if not torch.cuda.is_available():
        return {"gpu": None}
    p = torch.cuda.get_device_properties(0)
    return {"gpu": torch.cuda.get_device_name(0), "gpu_memory_gib": round(p.total_memory / 2**30, 1),
            "gpu_count": torch.cuda.device_count(), "cuda": torch.version.cuda,
            "capability": f"{p.major}.{p.minor}"}


def markdown(data: dict[str, Any]) -> str:
    """The common Markdown rendering of a results JSON, plus the accelerator line."""
    from .common import render_markdown

    text = render_markdown(data)
    m = data.get("machine", {})
    if m.get("gpu"):
        text = text.replace("\n- Load average", f"\n- GPU: {m['gpu']} ({m.get('gpu_memory_gib')} GiB, CUDA "
                            f"{m.get('cuda')}, capability {m.get('capability')})\n- Load average", 1)
    return text


class Phase:
    """One phase's Results, written after every figure (a killed run keeps what it measured)."""

    def __init__(self, name: str, title: str, settings: dict[str, Any], out: Path, deadline: float, suffix: str = ""):
        self.res = GpuResults(f"gpu_{name}{suffix}", title, settings)
        self.res.details["errors"] = {}
        self.out, self.deadline = out, deadline

    def save(self) -> None:
        js, md = self.res.write(self.out)
        md.write_text(markdown(json.loads(js.read_text())))  # with the accelerator line

    def time_left(self) -> float:
        return self.deadline - time.time()

    def error(self, key: str, e: BaseException) -> None:
        self.res.details["errors"][key] = f"{type(e).__name__}: {e}"[:600]
        print(f"[{self.res.name}] {key} FAILED: {type(e).__name__}: {str(e)[:300]}", flush=True)
        traceback.print_exc()
        self.save()

    def log(self, key: str, value: Any) -> None:
        print(f"[{self.res.name}] {key} = {value}", flush=True)


# --- model and inputs -----------------------------------------------------------------------

def qwen_config(shape: str):
    from transformers import Qwen2_5_VLConfig

    s = SHAPES[shape]
    t = dict(s["text"])
    section = t.pop("mrope_section")
    theta = t.pop("rope_theta")
    text = dict(t, rope_scaling={"type": "mrope", "mrope_section": section, "rope_theta": theta},
                rope_theta=theta)
    vision = dict(s["vision"], in_channels=3, patch_size=14, spatial_merge_size=2, temporal_patch_size=2,
                  hidden_act="silu", tokens_per_second=2)
    cfg = Qwen2_5_VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=True, **s["ids"])
    for c in (cfg, cfg.text_config, cfg.vision_config):
        c._attn_implementation = "sdpa"
    return cfg


def build_model(shape: str, device: str, dtype):
    import torch
    from transformers import Qwen2_5_VLForConditionalGeneration

    cfg = qwen_config(shape)
    with torch.device(device):
        model = Qwen2_5_VLForConditionalGeneration._from_config(cfg, dtype=dtype)
    return model.eval().requires_grad_(False)


def build_tower(shape: str, device: str, dtype):
    import torch
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VisionTransformerPretrainedModel

    cfg = qwen_config(shape).vision_config
    with torch.device(device):
        tower = Qwen2_5_VisionTransformerPretrainedModel._from_config(cfg, dtype=dtype)
    return tower.eval().requires_grad_(False)


def grid_of(shape: str) -> tuple[int, int, int]:
    p = SHAPES[shape]["image_px"] // 14
    return (1, p, p)


def pixels(shape: str, b: int, device: str, dtype, seed: int = 0):
    import torch

    _, h, w = grid_of(shape)
    g = torch.Generator(device=device).manual_seed(seed)
    return torch.randn(b * h * w, 3 * 2 * 14 * 14, device=device, dtype=dtype, generator=g)


def text_batch(shape: str, b: int, device: str, seed: int = 0):
    """ids [B, L] with one image (start, tokens-per-image pads, end) near the front; labels on the
    last NLAB tokens; all-ones mask. Same layout as `sft_tokens` rows (right side is the answer)."""
    import torch

    s = SHAPES[shape]
    L, ids_ = s["seq"], s["ids"]
    ntok = (s["image_px"] // 28) ** 2
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(10, s["text_vocab"], (b, L), generator=g)
    ids[:, 5] = ids_["vision_start_token_id"]
    ids[:, 6:6 + ntok] = ids_["image_token_id"]
    ids[:, 6 + ntok] = ids_["vision_end_token_id"]
    labels = torch.full_like(ids, -100)
    labels[:, L - NLAB:] = ids[:, L - NLAB:]
    return ids.to(device), torch.ones_like(ids).to(device), labels.to(device)


def sync(device: str) -> None:
    import torch

    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def peak_gib(device: str) -> float | None:
    import torch

    return round(torch.cuda.max_memory_allocated() / 2**30, 3) if str(device).startswith("cuda") else None


def reset_peak(device: str) -> None:
    import torch

    if str(device).startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()


def measure(ph: Phase, key: str, label: str, unit_per_call: int, fn: Callable[[], Any], device: str, *,
            unit: str, repeats: int = 3, warmup: int = 2, target_s: float = 1.0, max_calls: int = 50,
            **extra) -> float | None:
    """Figure `key`: `unit_per_call / seconds per call`, over `repeats` timed runs of k calls each
    (k sized so a run takes ~target_s). Also records peak GPU memory over the timed runs."""
    t0 = time.perf_counter()
    for _ in range(warmup):
        fn()
    sync(device)
    first = time.perf_counter() - t0
    reset_peak(device)
    t1 = time.perf_counter()
    fn()
    sync(device)
    one = max(time.perf_counter() - t1, 1e-6)
    k = max(1, min(max_calls, int(math.ceil(target_s / one))))
    fig = ph.res.figure(key, label, unit, higher_is_better=True, calls_per_repeat=k, warmup_s=round(first, 2),
                        **extra)
    for _ in range(repeats):
        lb = load()
        t = time.perf_counter()
        for _ in range(k):
            fn()
        sync(device)
        fig.add(unit_per_call * k / (time.perf_counter() - t), lb, load())
    fig.extra["peak_gib"] = peak_gib(device)
    ph.log(key, f"{fig.median:.2f} {unit} (min {min(fig.samples):.2f}, max {max(fig.samples):.2f}), "
                f"peak {fig.extra['peak_gib']} GiB, warmup {first:.1f}s")
    ph.save()
    return fig.median


def pooled(out):
    """Merged tower tokens from any transformers version's tower output."""
    return out if hasattr(out, "shape") else out.pooler_output


def rel_l2(a, b) -> float:
    a, b = a.float(), b.float()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


# --- phases ---------------------------------------------------------------------------------

def phase_equivalence(ph: Phase, ctx: dict[str, Any]) -> None:
    import torch

    from vlmspec.runtime.vlm.cached import cached_forward
    from vlmspec.runtime.vlm.fast_tower import FastTower

    shape, device, dtype = ctx["shape"], ctx["device"], ctx["dtype"]
    model = ctx["model"]
    tower = model.model.visual
    b = 2
    px = pixels(shape, b, device, dtype, seed=1)
    grid = torch.tensor([grid_of(shape)] * b)
    d = ph.res.details
    with torch.inference_mode():
        hf = pooled(tower(px, grid_thw=grid.to(device)))
        fast = FastTower(tower)
        fast(px, grid)  # first call: HF's own forward, records the layout
        fh = fast(px, grid).pooler_output
        px2 = pixels(shape, b, device, dtype, seed=2)  # fresh inputs through the recorded layout
        hf2 = pooled(tower(px2, grid_thw=grid.to(device)))
        fh2 = fast(px2, grid).pooler_output
    layout = next(iter(fast.layouts.values()))
    d["fast_tower_vs_hf"] = {"max_abs": float((fh - hf).abs().max()), "rel_l2": rel_l2(fh, hf),
                             "fresh_inputs_max_abs": float((fh2 - hf2).abs().max()),
                             "fresh_inputs_rel_l2": rel_l2(fh2, hf2), "ref_abs_mean": float(hf.abs().mean()),
                             "batched_layers": layout.batched_layers, "layers": len(layout.chunks),
                             "chunks": sorted({c for c in layout.chunks if c})}
    ph.log("fast_tower_vs_hf", d["fast_tower_vs_hf"])
    ok_tower = d["fast_tower_vs_hf"]["rel_l2"] <= 1e-2 and d["fast_tower_vs_hf"]["fresh_inputs_rel_l2"] <= 1e-2

    ids, mask, labels = text_batch(shape, b, device, seed=3)
    with torch.inference_mode():
        kw = {}
        import inspect

        if "mm_token_type_ids" in inspect.signature(model.forward).parameters:
            kw["mm_token_type_ids"] = (ids == model.config.image_token_id).to(torch.int)
        model.model.rope_deltas = None
        full = model(input_ids=ids, attention_mask=mask, pixel_values=px, image_grid_thw=grid.to(device),
                     use_cache=False, **kw).logits
        model.model.rope_deltas = None
        cmp = {}
        for name, h in (("hf_tower_hiddens", hf), ("fast_tower_hiddens", fh),
                        ("fp16_stored_hiddens", fh.to(torch.float16))):
            out = cached_forward(model, ids, mask, h.reshape(b, -1, h.shape[-1]), grid_of(shape), labels=labels)
            pos = out.label_positions
            want = full[pos[:, 0], pos[:, 1]]
            cmp[name] = {"max_abs": float((out.logits - want).abs().max()), "rel_l2": rel_l2(out.logits, want),
                         "argmax_agree": float((out.logits.argmax(-1) == want.argmax(-1)).float().mean()),
                         "positions": int(pos.shape[0])}
            ph.log(f"cached_vs_full[{name}]", cmp[name])
    d["cached_vs_full_logits"] = cmp
    d["logits_abs_mean"] = float(full.abs().mean())
    ok_cached = all(v["rel_l2"] <= 2e-2 for v in cmp.values())
    ph.res.derive("fast_tower_equal", "FastTower output vs HF's tower (bf16, relative L2)",
                  d["fast_tower_vs_hf"]["fresh_inputs_rel_l2"], target="<= 1e-2 (bf16 tolerance)", met=ok_tower,
                  how="fresh random pixels through the recorded layout")
    ph.res.derive("cached_equal", "cached path vs full-model logits at label positions (relative L2, worst)",
                  max(v["rel_l2"] for v in cmp.values()), target="<= 2e-2 (bf16)", met=ok_cached,
                  how="cached_forward on tower hiddens (HF, fast, fp16-stored) vs model(pixel_values=...)")
    ph.res.notes.append("Random weights (std 0.02 init): logits are small and nearly flat, so argmax agreement "
                        "is not meaningful; relative L2 is.")
    ph.save()


def phase_tower(ph: Phase, ctx: dict[str, Any]) -> None:
    import torch

    from vlmspec.runtime.vlm.fast_tower import FastTower

    shape, device, dtype = ctx["shape"], ctx["device"], ctx["dtype"]
    tower = ctx["model"].model.visual if ctx.get("model") is not None else ctx["tower"]
    batches = ctx["tower_batches"] or SHAPES[shape]["tower_batches"]
    grid1 = grid_of(shape)
    results: dict[str, dict[int, float]] = {"hf": {}, "fast": {}, "fast_compile": {}}

    def runner(kind: str, fast: FastTower | None, b: int):
        px = pixels(shape, b, device, dtype, seed=b)
        grid = torch.tensor([grid1] * b)
        gdev = grid.to(device)

        def fn():
            with torch.inference_mode():
                if fast is None:
                    return pooled(tower(px, grid_thw=gdev))
                return fast(px, grid).pooler_output
        return fn

    eager = FastTower(tower)
    compiled = FastTower(tower, compile=ctx["compile"], allow_cpu_compile=ctx["compile"])
    for b in batches:
        for kind, fast in (("hf", None), ("fast", eager), ("fast_compile", compiled)):
            if kind == "fast_compile" and not ctx["compile"]:
                continue
            if kind == "hf" and b != max(batches) and b != min(batches):
                continue  # HF's tower is slow and flat in batch size: two sizes are enough
            if ph.time_left() < 20:
                ph.res.notes.append(f"tower {kind} b{b}: skipped (device-call deadline)")
                continue
            try:
                fn = runner(kind, fast, b)
                fn()  # layout capture (HF forward) for fast paths
                label = {"hf": "HF tower (SDPA, per-chunk attention)", "fast": "FastTower (batched chunks)",
                         "fast_compile": "FastTower + torch.compile (regional)"}[kind]
                results[kind][b] = measure(ph, f"tower_{kind}_b{b}", f"{label}, batch {b}", b, fn, device,
                                           unit="images/s", warmup=2 if kind != "fast_compile" else 3,
                                           target_s=1.5, batch=b)
            except Exception as e:  # noqa: BLE001
                ph.error(f"tower_{kind}_b{b}", e)
    best_fast = max(results["fast_compile"].values() or results["fast"].values() or [0.0])
    hf_best = max(results["hf"].values() or [0.0])
    ph.res.derive("tower_best", "best tower images/s (FastTower, compiled where run)", best_fast, unit="images/s",
                  target=">= 100 (to allow 100 rows/s tier-3)", met=best_fast >= 100 if shape == "3b" else None)
    ph.res.derive("tower_speedup", "best FastTower / best HF tower", round(best_fast / hf_best, 2) if hf_best else None,
                  unit="x")
    ph.save()


def _lora(model, r: int):
    from peft import LoraConfig, get_peft_model

    # = runtime.train.lora_target_regex(["q_proj", "k_proj", "v_proj", "o_proj"]) (train.py imports
    # pylance, which a device call may lack)
    cfg = LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=0.05, bias="none", task_type="CAUSAL_LM",
                     target_modules=r".*language_model\..*\.(q_proj|k_proj|v_proj|o_proj)")
    pm = get_peft_model(model, cfg)
    pm.train()
    return pm


def _set_compiled(layers, on: bool) -> None:
    for layer in layers:
        if on:
            layer.compile(dynamic=False)
        else:
            layer._compiled_call_impl = None


def _optimizer(pm, device: str, capturable: bool = False):
    """AdamW over the adapter, fused on CUDA as `runtime.train` builds it (capturable: for a
    step replayed as one CUDA graph)."""
    import torch

    params = [p for p in pm.parameters() if p.requires_grad]
    cuda = str(device).startswith("cuda")
    kw = dict(fused=True, capturable=capturable) if cuda else {}
    return torch.optim.AdamW(params, lr=1e-4, **kw)


def _step_inputs(shape: str, ids, mask, labels, device: str, min_slots: int = 8):
    """`cached.step_inputs` (what the training loader's workers compute), moved to the device."""
    from vlmspec.runtime.vlm.cached import step_inputs

    s = SHAPES[shape]
    side = s["image_px"] // 28
    si = step_inputs(ids.cpu(), mask.cpu(), labels.cpu(), s["ids"]["image_token_id"], side * side, (side, side),
                     min_slots)
    return si.map(lambda t: t.to(device))


# Variants of the cached train step, slowest first:
#   eager / compiled: cached_forward (HF get_rope_index, label selection by mask: host syncs)
#   nosync[-compiled]: runtime.train's step: cached_loss on loader-precomputed positions and label
#                      slots (no host sync, no attention mask for right-padded rows), fused AdamW
#   graph[-compiled]:  `train.compile: graph`: the nosync forward + backward replayed as one CUDA
#                      graph (runtime.vlm.graph_step), fused optimizer step outside it
TRAIN_VARIANTS = ("eager", "compiled", "nosync", "nosync-compiled", "graph", "graph-compiled")


def phase_trainstep(ph: Phase, ctx: dict[str, Any]) -> None:
    import torch

    from vlmspec.runtime.vlm.cached import cached_forward, cached_loss
    from vlmspec.runtime.vlm.fast_tower import FastTower

    shape, device, dtype = ctx["shape"], ctx["device"], ctx["dtype"]
    model = ctx["model"]
    s = SHAPES[shape]
    batches = ctx["train_batches"] or s["train_batches"]
    ranks = ctx["ranks"] or s["ranks"]
    tower = model.model.visual
    grid1 = grid_of(shape)
    ntok = (s["image_px"] // 28) ** 2
    hidden = s["text"]["hidden_size"]
    hf_tower = lambda px, grid: pooled(tower(px, grid_thw=grid.to(device)))  # noqa: E731
    fast_comp = FastTower(tower, compile=ctx["compile"], allow_cpu_compile=ctx["compile"])
    import torch._dynamo.config as dcfg

    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(dcfg, name):
            setattr(dcfg, name, max(int(getattr(dcfg, name)), 64))
    table: dict[str, Any] = {}
    ph.res.details["train"] = table
    ph.res.details["variants_doc"] = ("eager/compiled: cached_forward (HF get_rope_index and mask-selected labels: "
                                      "host syncs); nosync: runtime.train's step (cached_loss on precomputed "
                                      "positions/label slots, fused AdamW); graph: train.compile=graph, its forward + "
                                      "backward replayed as one CUDA graph; -compiled: decoder layers "
                                      "torch.compile'd")

    def make_step(pm, opt, b: int, path: str, tower_fn, variant: str):
        ids, mask, labels = text_batch(shape, b, device, seed=b)
        cached_h = torch.randn(b, ntok, hidden, device=device, dtype=torch.float16) * 0.5
        px = pixels(shape, b, device, dtype, seed=b) if path == "raw" else None
        grid = torch.tensor([grid1] * b)

        def hiddens():
            if path == "raw":
                with torch.no_grad():
                    return tower_fn(px, grid).reshape(b, ntok, -1)
            return cached_h

        if variant in ("eager", "compiled"):
            def step():
                out = cached_forward(pm, ids, mask, hiddens(), grid1, labels=labels)
                out.loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
            return step
        if not variant.startswith("graph"):
            si = _step_inputs(shape, ids, mask, labels, device)

            def step():
                cached_loss(pm, ids, mask, hiddens(), si).backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
            return step
        # runtime.train with `compile: graph`: forward + backward replayed as one CUDA graph
        # (GraphedStep), the fused optimizer step outside it.
        from vlmspec.runtime.vlm.graph_step import GRAPH_LABEL_SLOTS, GraphedStep

        si = _step_inputs(shape, ids, mask, labels, device, GRAPH_LABEL_SLOTS)
        graphed = GraphedStep(pm)

        def step():
            graphed(ids, mask, hiddens(), si, 1.0)
            opt.step()
            opt.zero_grad(set_to_none=False)
        return step

    def profile(step, key: str) -> None:
        """CPU vs GPU time of a few steps: is the step launch-bound?"""
        from torch.profiler import ProfilerActivity
        from torch.profiler import profile as tprofile

        step()
        sync(device)
        with tprofile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(3):
                step()
            sync(device)
        ev = prof.key_averages()
        cuda_us = sum(getattr(e, "self_device_time_total", 0) or 0 for e in ev) / 3
        launches = sum(e.count for e in ev if "launch" in e.key.lower()) / 3
        top = sorted(ev, key=lambda e: -e.self_cpu_time_total)[:12]
        ph.res.details.setdefault("profile", {})[key] = {
            "gpu_ms_per_step": round(cuda_us / 1000, 2), "kernel_launches_per_step": round(launches),
            "top_self_cpu_ms_per_step": {e.key[:60]: round(e.self_cpu_time_total / 3000, 2) for e in top}}

    def run(pm, r: int, variant: str):
        compiled = variant.endswith("compiled")
        for path in ctx.get("paths") or ("cached", "raw"):  # cached first: it is what the targets are about
            for b in batches:
                key = f"train_{path}_r{r}_b{b}_{variant}"
                if ph.time_left() < (90 if compiled else 20):
                    ph.res.notes.append(f"{key}: skipped (device-call deadline)")
                    continue
                tower_fn = (lambda px, g: fast_comp(px, g).pooler_output) if compiled else hf_tower
                opt = _optimizer(pm, device) if variant not in ("eager", "compiled") else \
                    torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=1e-4)
                try:
                    step = make_step(pm, opt, b, path, tower_fn, variant)
                    label = (f"{'cached' if path == 'cached' else 'raw (tower every step)'} bf16 LoRA r{r}, "
                             f"batch {b}, {variant}")
                    med = measure(ph, key, label, b, step, device, unit="samples/s",
                                  warmup=3 if compiled else 2, target_s=2.0, max_calls=30, batch=b, r=r,
                                  path=path, variant=variant)
                    table[key] = {"samples_per_s": med, "peak_gib": ph.res.figures[key].extra["peak_gib"]}
                    if b == min(batches) and path == "cached" and ctx.get("profile", True):
                        try:
                            profile(step, key)
                        except Exception as e:  # noqa: BLE001
                            ph.error(key + "_profile", e)
                    ph.save()
                except Exception as e:  # noqa: BLE001
                    ph.error(key, e)
                    if "out of memory" in str(e).lower():
                        torch.cuda.empty_cache()
                finally:
                    del opt
                    step = None
                    torch.cuda.synchronize() if str(device).startswith("cuda") else None

    lm_layers = model.model.language_model.layers
    for r in ranks:
        pm = _lora(model, r)
        try:
            for variant in ctx.get("variants") or ("eager",):
                if variant not in TRAIN_VARIANTS:
                    raise ValueError(f"unknown trainstep variant `{variant}`; known: {', '.join(TRAIN_VARIANTS)}")
                compiled = variant.endswith("compiled")
                if compiled and not ctx["compile"]:
                    continue
                if variant.startswith("graph") and not str(device).startswith("cuda"):
                    ph.res.notes.append(f"{variant}: CUDA graphs need a CUDA device (skipped)")
                    continue
                if compiled and r != ranks[0] and ph.time_left() < 150:
                    continue
                _set_compiled(lm_layers, compiled)
                try:
                    run(pm, r, variant)
                finally:
                    _set_compiled(lm_layers, False)
        finally:
            pm.unload()
            model.requires_grad_(False)
            if str(device).startswith("cuda"):
                torch.cuda.empty_cache()
    best = {}
    for key, v in table.items():
        if key.startswith("train_cached") and v["samples_per_s"] is not None:
            b = int(key.split("_b")[1].split("_")[0])
            best[b] = max(best.get(b, 0.0), v["samples_per_s"])
    top = max(best.values() or [0.0])
    b2 = best.get(2)
    is3b = shape == "3b"
    ph.res.derive("train_cached_best", "cached bf16 LoRA train step, best over r/batch/variant", top,
                  unit="samples/s", target=">= 60", met=top >= 60 if is3b else None)
    ph.res.derive("train_cached_b2", "cached bf16 LoRA train step at batch 2, best variant", b2, unit="samples/s",
                  target=">= 30", met=(b2 or 0) >= 30 if is3b else None)
    raw = {k: v["samples_per_s"] for k, v in table.items() if k.startswith("train_raw")}
    if raw:
        ph.res.derive("train_raw_best", "raw path (tower every step), best over r/batch/variant", max(raw.values()),
                      unit="samples/s")
    ph.save()


def phase_qlora(ph: Phase, ctx: dict[str, Any]) -> None:
    import torch
    from peft import prepare_model_for_kbit_training

    from vlmspec.runtime.vlm.cached import cached_loss

    shape, device = ctx["shape"], ctx["device"]
    s = SHAPES[shape]
    ckpt = Path(ctx["workdir"]) / f"lm-{shape}"
    if not (ckpt / "config.json").exists():
        t = time.perf_counter()
        model = ctx.get("model") or build_model(shape, device, torch.bfloat16)
        model.save_pretrained(ckpt)  # with the tower: the language-only loader never reads it
        if ctx.get("model") is None:
            del model
        if str(device).startswith("cuda"):
            torch.cuda.empty_cache()
        ph.res.details["checkpoint_save_s"] = round(time.perf_counter() - t, 1)
    from transformers import BitsAndBytesConfig, Qwen2_5_VLForConditionalGeneration

    results = {}
    # (path, rank, batch, gradient checkpointing). Path: cached (hiddens as the column holds them)
    # or raw (the frozen vision tower run every step beside the 4-bit language model). By default
    # cached r16 b2 with and without checkpointing; `--qlora-grid` adds the issue's whole grid,
    # both paths x r16/r64 x batch 2/8/16, checkpointing on.
    configs = [("cached", 16, 2, True), ("cached", 16, 2, False)]
    if ctx.get("qlora_grid"):
        configs += [(path, r, b, True) for path in ("cached", "raw") for r in (16, 64) for b in (2, 8, 16)
                    if (path, r, b) != ("cached", 16, 2)]
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
            # The previous configuration's model, optimizer and step closures sit in reference
            # cycles until a collection: free them now, or `before` counts memory that is then
            # released mid-measurement (own peaks below the 4-bit weights, negative weights).
            gc.collect()
            if str(device).startswith("cuda"):
                torch.cuda.empty_cache()
            before = torch.cuda.memory_allocated() if str(device).startswith("cuda") else 0
            try:  # vlmspec's loader (what `train` uses): language model only, tower never built
                from vlmspec.compiler.model import ModelSpec
                from vlmspec.runtime.vlm.models import load_language_model

                q = load_language_model(ModelSpec(id=str(ckpt), image_px=SHAPES[shape]["image_px"]),
                                        quant={"bits": 4, "type": "nf4", "double_quant": True,
                                               "compute_dtype": "bfloat16"}, device=device, dtype="bfloat16")
                ph.res.details["loader"] = "vlmspec.runtime.vlm.models.load_language_model"
            except Exception as e:  # noqa: BLE001 - e.g. another transformers version's internals
                why = f"{type(e).__name__}: {e}"
                ph.res.details["loader"] = f"plain from_pretrained (vlmspec loader failed: {why})"[:400]
                bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                         bnb_4bit_compute_dtype=torch.bfloat16,
                                         llm_int8_skip_modules=["lm_head", "visual"])
                q = Qwen2_5_VLForConditionalGeneration.from_pretrained(
                    ckpt, dtype=torch.bfloat16, device_map={"": device}, attn_implementation="sdpa",
                    quantization_config=bnb)
            if getattr(q.model, "visual", None) is not None:
                q.model.visual = None
            if str(device).startswith("cuda"):
                torch.cuda.empty_cache()
            weights = ((torch.cuda.memory_allocated() - before) / 2**30) if str(device).startswith("cuda") else None
            # exactly what runtime/train.build_model does for a 4-bit spec
            q = prepare_model_for_kbit_training(q, use_gradient_checkpointing=grad_ckpt,
                                                gradient_checkpointing_kwargs={"use_reentrant": False})
            pm = _lora(q, r)
            opt = _optimizer(pm, device)  # as runtime.train: fused AdamW on CUDA
            ids, mask, labels = text_batch(shape, b, device, seed=7)
            ntok = (s["image_px"] // 28) ** 2
            h = torch.randn(b, ntok, s["text"]["hidden_size"], device=device, dtype=torch.float16) * 0.5
            si = _step_inputs(shape, ids, mask, labels, device)
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
            if (path, r, b) == ("cached", 16, 2):
                results[grad_ckpt] = (med, own)
            pm = opt = q = None  # the step closures see None: the model and optimizer are freed
            if str(device).startswith("cuda"):
                torch.cuda.empty_cache()
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


# --- GPU busy sampling ----------------------------------------------------------------------

class GpuBusy:
    """Samples `utilization.gpu` (percent of time a kernel ran, per driver sample period) every
    `period` s in a thread; `mean()` over the samples taken between start and stop (or from a
    `time.perf_counter()` instant on)."""

    def __init__(self, period: float = 0.05):
        self.period, self.samples, self._stop = period, [], threading.Event()
        self._read = None
        try:
            import pynvml

            pynvml.nvmlInit()
            h = pynvml.nvmlDeviceGetHandleByIndex(0)
            self._read = lambda: float(pynvml.nvmlDeviceGetUtilizationRates(h).gpu)
            self.source = "nvml"
        except Exception:  # noqa: BLE001 - no NVML: nothing to sample
            self.source = None

    def __enter__(self):
        if self._read is not None:
            self._t = threading.Thread(target=self._loop, daemon=True)
            self._t.start()
        return self

    def _loop(self):
        while not self._stop.is_set():
            try:
                self.samples.append((time.perf_counter(), self._read()))
            except Exception:  # noqa: BLE001
                pass
            time.sleep(self.period)

    def __exit__(self, *exc):
        self._stop.set()
        if self._read is not None:
            self._t.join()

    def mean(self, since: float | None = None) -> float | None:
        vals = [v for t, v in self.samples if since is None or t >= since]
        return round(statistics.fmean(vals), 1) if vals else None


# --- tier 3 ---------------------------------------------------------------------------------

def _gen_rows(args):
    start, n, px = args
    import pyarrow as pa

    from vlmspec.runtime.sources.synthetic import generate

    return pa.Table.from_batches(list(generate(n, seed=0, image_px=px, start=start, batch_rows=n)))


def synthetic_rows(rows: int, unique: int, image_px: int, procs: int):
    """`rows` TextVQA-shaped rows at `image_px` (JPEG), the first `unique` generated in parallel
    and then repeated (decode cost is per row, not per unique image)."""
    import multiprocessing

    import pyarrow as pa

    unique = min(unique, rows)
    per = max(1, math.ceil(unique / procs))
    jobs = [(s, min(per, unique - s), image_px) for s in range(0, unique, per)]
    with multiprocessing.get_context("spawn").Pool(min(procs, len(jobs))) as pool:
        parts = pool.map(_gen_rows, jobs)
    base = pa.concat_tables(parts)
    reps = [base] * (rows // unique) + ([base.slice(0, rows % unique)] if rows % unique else [])
    t = pa.concat_tables(reps).combine_chunks()
    import numpy as np

    return t.set_column(0, "id", pa.array(np.arange(rows, dtype=np.int64)))


def _model_dir(shape: str, root: Path) -> Path:
    """config.json of the shape plus the shipped tiny model's tokenizer/processor files (the
    tokenizer only matters for `sft_tokens`; the tower is injected, see phase_tier3)."""
    from vlmspec.runtime.vlm.models import resolve_model_path

    src = Path(resolve_model_path("vlmspec:tiny-qwen2.5-vl"))
    d = root / f"model-{shape}"
    d.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        if f.name not in ("config.json", "model.safetensors"):
            shutil.copy(f, d / f.name)
    cfg = qwen_config(shape).to_dict()
    if shape == "3b":  # tokenizer ids of the shipped tiny tokenizer (the 3B ids are out of its vocab)
        tiny = json.loads((src / "config.json").read_text())
        for k in ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id"):
            cfg[k] = tiny[k]
    (d / "config.json").write_text(json.dumps(cfg, default=str))
    return d


def phase_tier3(ph: Phase, ctx: dict[str, Any]) -> None:
    import numpy as np
    import pyarrow as pa
    import torch

    os.environ.setdefault("LANCE_LOG", "error")
    import lance

    from vlmspec.runtime.udfs.base import UdfContext
    from vlmspec.runtime.udfs.vision import VisionTower
    from vlmspec.runtime.vlm import models
    from vlmspec.runtime.vlm.fast_tower import FastTower

    shape, device, dtype = ctx["shape"], ctx["device"], ctx["dtype"]
    s = SHAPES[shape]
    px_size = s["image_px"]
    rows, batch, sub = ctx["rows"], ctx["tier3_batch"], ctx["sub_batch"]
    work = Path(ctx["workdir"])
    tuning = {"sub_batch": sub, "compile": bool(ctx["compile"])}  # every VisionTower below gets these knobs
    d = ph.res.details
    d.update(rows=rows, engine_batch_size=batch, sub_batch=sub, compile=ctx["compile"])

    t = time.perf_counter()
    table = synthetic_rows(rows, min(rows, ctx["unique"]), px_size, ctx["procs"])
    d["generate_s"] = round(time.perf_counter() - t, 1)
    d["jpeg_bytes_mean"] = int(pa.compute.mean(pa.compute.binary_length(table.column("image"))).as_py())
    uri = str(work / "tier3.lance")
    shutil.rmtree(uri, ignore_errors=True)
    frag_rows = max(min(1024, rows // 4), 64)  # the product default (1,024) at real sizes
    d["rows_per_fragment"] = frag_rows
    lance.write_dataset(table, uri, max_rows_per_file=frag_rows)
    ph.log("table", f"{rows} rows, {d['jpeg_bytes_mean']} B/JPEG, generated in {d['generate_s']} s")

    tower = ctx.get("tower") or build_tower(shape, device, dtype)
    mdir = _model_dir(shape, work)
    real_loader = models.load_vision_tower
    models.load_vision_tower = lambda spec, device=None, dtype=None: tower  # random weights, built above
    try:
        from vlmspec.compiler.model import ModelSpec

        spec = ModelSpec(id=str(mdir), image_px=px_size, dtype="bfloat16" if dtype == torch.bfloat16 else "float32")
        ntok = (px_size // 28) ** 2
        hidden = s["vision"]["out_hidden_size"]
        out_type = pa.list_(pa.float16(), ntok * hidden)

        # (1) bare tower on pre-made pixels, same sub-batch and compile setting as the UDF
        fast = FastTower(tower, compile=ctx["compile"], allow_cpu_compile=ctx["compile"])
        pxs = pixels(shape, sub, device, dtype, seed=5)
        grid = torch.tensor([grid_of(shape)] * sub)

        def bare():
            with torch.inference_mode():
                return fast(pxs, grid).pooler_output
        bare()
        bare_rate = measure(ph, "tier3_bare_tower", f"bare tower forward on pre-made pixels, batch {sub}", sub, bare,
                            device, unit="rows/s", warmup=3, target_s=2.0)
        with GpuBusy() as busy:  # what NVML reads when the GPU only ever runs the tower
            t = time.perf_counter()
            while time.perf_counter() - t < 3.0:
                bare()
            sync(device)
        ph.res.figures["tier3_bare_tower"].extra["gpu_busy_pct"] = [busy.mean()]
        if ctx["compile"] and str(device).startswith("cuda"):  # the same, replayed as a CUDA graph (the UDF's way)
            graphed = FastTower(tower, compile=True, graph=True)

            def bare_graph():
                with torch.inference_mode():
                    return graphed(pxs, grid).pooler_output
            bare_graph()  # records the layout (HF's own forward); the next call captures and replays
            want = bare().clone()
            got = bare_graph().clone()
            d["graph_vs_compiled_max_abs"] = float((got.float() - want.float()).abs().max())
            d["graph_captured"] = graphed.stats["graph_calls"] > 0
            measure(ph, "tier3_bare_tower_graph", f"bare tower forward on pre-made pixels, batch {sub}, "
                    "one CUDA graph", sub, bare_graph, device, unit="rows/s", warmup=3, target_s=2.0)

        # (2) the VisionTower UDF alone on in-memory JPEG rows (decode, preprocess, tower, fp16 Arrow),
        # for each decode thread count asked for; the end-to-end run below uses the fastest.
        images = table.column("image").combine_chunks()
        # The UDF alone runs on at most 6,144 rows (its rate is steady well before); the end-to-end
        # run below takes the whole table.
        udf_rows = min(rows, 6144)
        d["udf_rows"] = udf_rows
        slices = [images.slice(start, batch) for start in range(0, udf_rows, batch)]
        threads = ctx.get("tower_threads") or [0]  # 0: the UDF's default
        d["tower_threads"] = threads
        udf_figs = {}
        def use_threads(th: int) -> None:  # read by VisionTower when it is built
            tuning["decode_threads"] = th or None  # None: the UDF's default

        def engine_calls(udf, parts):  # as the engine calls it: the next batch starts decoding before each call
            def go():
                for k, part in enumerate(parts):
                    if k + 1 < len(parts):
                        udf.prefetch(parts[k + 1])
                    udf(part)
            return go

        for th in threads:
            use_threads(th)
            udf = VisionTower(UdfContext("vision_tower_hiddens", out_type, {}, spec, device, batch, dict(tuning)))
            udf(slices[0])  # warm: pinned buffers
            udf_all = engine_calls(udf, slices)
            key = "tier3_udf" if th == threads[0] else f"tier3_udf_t{th}"
            how = f"{udf._pool._max_workers if udf._pool else 1} decode threads"
            fig = udf_figs[th] = ph.res.figure(
                key, f"VisionTower UDF on in-memory JPEGs (engine batch {batch}, sub-batch {sub}, {how})",
                "rows/s", higher_is_better=True, gpu_busy_pct=[])
            for _ in range(ctx["repeats"]):
                lb = load()
                with GpuBusy() as busy:
                    t = time.perf_counter()
                    udf_all()
                    sync(device)
                    sec = time.perf_counter() - t
                fig.add(udf_rows / sec, lb, load())
                fig.extra["gpu_busy_pct"].append(busy.mean())
            ph.log(key, f"{fig.median:.1f} rows/s, GPU busy {fig.extra['gpu_busy_pct']} ({how})")
            if th == threads[0] and str(device).startswith("cuda"):
                # Why the UDF's GPU is not always busy: its host syncs per call, and the gaps between
                # its kernels over three calls with what the launching thread did meanwhile.
                from .gpu_trace import kernel_gaps, sync_sites

                try:
                    d["udf_sync_sites_per_3_calls"] = sync_sites(engine_calls(udf, slices[:3]))
                    d["udf_kernel_gaps_3_calls"] = kernel_gaps(engine_calls(udf, slices[:3]))
                    ph.log("udf_kernel_gaps", json.dumps(d["udf_kernel_gaps_3_calls"])[:1500])
                except Exception as e:  # noqa: BLE001 - a diagnostic; the figures stand without it
                    ph.error("udf_trace", e)
            udf.close()
            ph.save()
        best_th = max(udf_figs, key=lambda k: udf_figs[k].median)
        fig = udf_figs[best_th]
        d["e2e_tower_threads"] = best_th
        use_threads(best_th)

        # (3) end to end through the engine: both tier-3 columns computed and written to Lance
        from vlmspec.compiler.load import load_spec

        from ...apply import prepare
        from ...backfill import backfill_column

        spec_file = work / "tier3.yaml"
        spec_file.write_text(
            f"name: bench_tier3\nsource:\n  table: \"{uri}\"\n  rows_per_fragment: {frag_rows}\n"
            f"model:\n  id: \"{mdir}\"\n  image_px: {px_size}\n  dtype: {spec.dtype}\n"
            f"features:\n  tier3:\n"
            f"    vision_tower_hiddens: {{udf: vlm.vision_tower, inputs: [image], batch_size: {batch}, tuning: {json.dumps(tuning)}}}\n"
            f"    sft_tokens: {{udf: vlm.sft_tokens, inputs: [question, answer], params: {{max_tokens: {s['seq']}}},"
            f" on_error: \"null\"}}\n")
        loaded = load_spec(spec_file)
        fig_e = ph.res.figure("tier3_e2e", "end to end: vision_tower_hiddens + sft_tokens via backfill_column "
                              "(decode, preprocess, tower, Lance write)", "rows/s", higher_is_better=True,
                              gpu_busy_pct=[], gpu_busy_after_setup_pct=[], setup_s=[], vision_s=[], sft_s=[],
                              compute_s=[], write_wait_s=[], udf_call_s=[], udf_alloc_s=[])
        for rep in range(ctx["repeats"]):
            ds = lance.dataset(uri)
            drop = [c for c in ("vision_tower_hiddens", "sft_tokens") if c in ds.schema.names]
            if drop:
                ds.drop_columns(drop)
                # and delete the dropped columns' files (3.3 MB a row): repeats must fit the disk
                lance.dataset(uri).cleanup_old_versions(older_than=datetime.timedelta(0), delete_unverified=True)
            nodes = {c.name: c for c in prepare(loaded, allow_destructive=True).compiled.columns}
            lb = load()
            with GpuBusy() as busy:
                t = time.perf_counter()
                run = backfill_column(uri, nodes["vision_tower_hiddens"], model_spec=loaded.spec.model,
                                      device=device)
                tv = time.perf_counter() - t
            t2 = time.perf_counter()
            backfill_column(uri, nodes["sft_tokens"], model_spec=loaded.spec.model, device=device)
            ts = time.perf_counter() - t2
            fig_e.add(rows / (tv + ts), lb, load())
            fig_e.extra["gpu_busy_pct"].append(busy.mean())
            # from when the UDF was ready (tower built, compiled) to the column's last commit
            fig_e.extra["gpu_busy_after_setup_pct"].append(busy.mean(since=t + run.setup_s))
            fig_e.extra["setup_s"].append(round(run.setup_s, 2))
            # where the vision column's time went: the engine's compute (reading + UDF calls) and
            # waits on its writer thread
            fig_e.extra["compute_s"].append(round(run.compute_s, 2))
            fig_e.extra["write_wait_s"].append(round(run.write_wait_s, 2))
            # the UDF's own stats: its calls' time, the part spent allocating pinned outputs, and
            # how its tower ran them (HF / fast / compiled / CUDA graph)
            us = run.udf_stats or {}
            fig_e.extra["udf_call_s"].append(round(us["call_s"], 2) if "call_s" in us else None)
            fig_e.extra["udf_alloc_s"].append(round(us["alloc_s"], 2) if "alloc_s" in us else None)
            fig_e.extra.setdefault("udf_tower_calls", []).append(us.get("tower_calls"))
            fig_e.extra["vision_s"].append(round(tv, 2))
            fig_e.extra["sft_s"].append(round(ts, 2))
            ph.log("tier3_e2e", f"{rows / (tv + ts):.1f} rows/s (vision {tv:.1f}s busy {busy.mean()}%, "
                                f"setup {run.setup_s:.1f}s, busy after it {busy.mean(since=t + run.setup_s)}%, "
                                f"compute {run.compute_s:.1f}s, write waits {run.write_wait_s:.1f}s, udf calls "
                                f"{fig_e.extra['udf_call_s'][-1]}s (pinned allocs {fig_e.extra['udf_alloc_s'][-1]}s), "
                                f"sft {ts:.1f}s)")
            ph.save()
        ds = lance.dataset(uri)
        col = ds.to_table(columns=["vision_tower_hiddens"], limit=4).column(0).combine_chunks()
        got = torch.from_numpy(col.values.to_numpy(zero_copy_only=False).reshape(4, ntok, hidden).copy())
        ref = VisionTower(UdfContext("h", out_type, {}, spec, device, batch, dict(tuning)))
        with torch.inference_mode():
            want = ref.encode_reference(images.slice(0, 4)).to(torch.float16).float().cpu()
        # Patchifier (the vision column's on-device preprocessing) against this machine's image
        # processor (the torchvision backend where torchvision is installed), bitwise.
        from vlmspec.runtime.vlm.prompt import image_processor_kwargs, resize_image

        pil = [resize_image(b, px_size) for b in images.slice(0, 4).to_pylist()]
        hf = ref.image_processor(images=pil, return_tensors="pt", **image_processor_kwargs(px_size))["pixel_values"]
        u8 = torch.from_numpy(np.stack([np.asarray(im) for im in pil])).to(device)
        mine = ref.patchify(u8)[0].cpu()
        d["patchify_backend"] = type(ref.image_processor).__name__
        d["patchify_bitwise_equal"] = bool(torch.equal(mine, hf))
        d["patchify_max_abs"] = float((mine - hf).abs().max())
        d["written_vs_hf_reference_rel_l2"] = rel_l2(got.float(), want)
        d["written_vs_hf_reference_max_abs"] = float((got.float() - want).abs().max())
        ref.close()
        d["disk_bytes_per_row"] = int(sum(f.stat().st_size for f in Path(uri).rglob("*") if f.is_file()) / rows)
    finally:
        models.load_vision_tower = real_loader
    e2e = fig_e.median
    ph.res.derive("tier3_rows_per_s", "tier-3 end to end (both columns, Lance write)", e2e, unit="rows/s",
                  target=">= 100", met=e2e >= 100 if shape == "3b" else None)
    busy_e = [b for b in fig_e.extra["gpu_busy_pct"] if b is not None]
    ph.res.derive("tier3_gpu_busy", "GPU busy during the vision column (NVML utilization.gpu, mean)",
                  statistics.median(busy_e) if busy_e else None, unit="%", target=">= 90",
                  met=(statistics.median(busy_e) >= 90) if busy_e and shape == "3b" else None)
    steady = [b for b in fig_e.extra["gpu_busy_after_setup_pct"] if b is not None]
    ph.res.derive("tier3_gpu_busy_after_setup", "GPU busy during the vision column, after the UDF's set-up "
                  f"(tower build + compile, median {statistics.median(fig_e.extra['setup_s']):.1f} s)",
                  statistics.median(steady) if steady else None, unit="%")
    ph.res.derive("tier3_efficiency", "end-to-end rows/s over bare tower rows/s", round(e2e / bare_rate, 3)
                  if bare_rate else None, unit="", how="1.0 = the GPU only ever runs the tower")
    ph.res.derive("tier3_udf_efficiency", "UDF (no write) rows/s over bare tower rows/s",
                  round(fig.median / bare_rate, 3) if bare_rate else None, unit="")
    ph.save()


# --- driver ---------------------------------------------------------------------------------

TITLES = {
    "equivalence": "GPU: bf16 equivalence at the Qwen2.5-VL-3B shape (FastTower, cached path)",
    "tower": "GPU: vision tower images/s (HF vs FastTower vs FastTower + torch.compile)",
    "trainstep": "GPU: LoRA train step, cached vs raw (samples/s, peak memory)",
    "qlora": "GPU: 4-bit QLoRA r16 batch 2 with gradient checkpointing",
    "tier3": "GPU: tier-3 backfill rows/s end to end vs the bare tower",
}


def run(phases: list[str], out: Path, *, shape: str = "3b", device: str | None = None, compile: bool = True,
        deadline_s: float = 540.0, rows: int = 1024, unique: int = 256, tier3_batch: int = 256, sub_batch: int = 16,
        repeats: int = 3, procs: int | None = None, tower_batches: list[int] | None = None,
        train_batches: list[int] | None = None, ranks: list[int] | None = None, workdir: str | None = None,
        paths: list[str] | None = None, variants: list[str] | None = None, suffix: str = "",
        tower_threads: list[int] | None = None, qlora_grid: bool = False) -> dict:
    import torch

    for p in phases:
        if p not in PHASES:
            raise ValueError(f"unknown phase `{p}`; known: {', '.join(PHASES)}")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.startswith("cuda") or shape == "3b" else torch.float32
    deadline = time.time() + deadline_s
    work = Path(workdir or tempfile.mkdtemp(prefix="vlmspec-bench-gpu-"))
    work.mkdir(parents=True, exist_ok=True)
    ctx: dict[str, Any] = dict(shape=shape, device=device, dtype=dtype, compile=compile, rows=rows, unique=unique,
                               tier3_batch=tier3_batch, sub_batch=sub_batch, repeats=repeats,
                               procs=procs or min(16, os.cpu_count() or 1), tower_batches=tower_batches,
                               train_batches=train_batches, ranks=ranks, workdir=str(work), paths=paths,
                               variants=variants or ["eager", "compiled"], tower_threads=tower_threads or [0],
                               qlora_grid=qlora_grid)
    settings = {"shape": shape, "device": device, "dtype": str(dtype).replace("torch.", ""), "compile": compile,
                "seq": SHAPES[shape]["seq"], "image_px": SHAPES[shape]["image_px"],
                "image_tokens": (SHAPES[shape]["image_px"] // 28) ** 2, "label_tokens": NLAB}
    if any(p in phases for p in ("equivalence", "tower", "trainstep")):
        t = time.perf_counter()
        ctx["model"] = build_model(shape, device, dtype)
        print(f"built {shape} model in {time.perf_counter() - t:.1f}s", flush=True)
    elif "tier3" in phases:
        ctx["tower"] = build_tower(shape, device, dtype)
    done = {}
    fns = {"equivalence": phase_equivalence, "tower": phase_tower, "trainstep": phase_trainstep,
           "qlora": phase_qlora, "tier3": phase_tier3}
    for p in phases:
        extra = {k: ctx[k] for k in ("rows", "tier3_batch", "sub_batch", "repeats", "tower_threads")} \
            if p == "tier3" else {}
        if p == "trainstep":
            extra = {"ranks": ranks or SHAPES[shape]["ranks"],
                     "batches": train_batches or SHAPES[shape]["train_batches"],
                     "variants": ctx["variants"], "lora_targets": "q,k,v,o of the LM", "lora_dropout": 0.05}
        if p == "qlora":
            extra = {"qlora_grid": qlora_grid}
        ph = Phase(p, TITLES[p], {**settings, **extra}, out, deadline, suffix)
        if p == "tier3" and ctx.get("model") is not None:
            ctx["tower"] = ctx["model"].model.visual
        try:
            fns[p](ph, ctx)
        except Exception as e:  # noqa: BLE001 - keep what the other phases measure
            ph.error(p, e)
        ph.save()
        done[p] = ph.res
    return done


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m vlmspec.runtime.tools.bench.gpu", description=__doc__.split("\n")[0])
    ap.add_argument("--phases", default="equivalence,tower,trainstep")
    ap.add_argument("--shape", default="3b", choices=sorted(SHAPES))
    ap.add_argument("--device", default=None)
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--deadline-s", type=float, default=540.0)
    ap.add_argument("--rows", type=int, default=1024)
    ap.add_argument("--unique", type=int, default=256)
    ap.add_argument("--tier3-batch", type=int, default=256)  # vlm.vision_tower's default batch_size
    ap.add_argument("--sub-batch", type=int, default=16)
    ap.add_argument("--tower-threads", default="0", help="tier3: decode thread counts to try (0 = the default)")
    ap.add_argument("--qlora-grid", action="store_true", help="qlora: also r16/r64 x batch 2/8/16")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--tower-batches", default=None)
    ap.add_argument("--train-batches", default=None)
    ap.add_argument("--ranks", default=None)
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--paths", default=None, help="trainstep: cached,raw")
    ap.add_argument("--suffix", default="", help="appended to each phase's result name")
    ap.add_argument("--variants", default=None, help="trainstep: eager,compiled")
    ap.add_argument("--out", default=str(DEFAULT_OUT))
    a = ap.parse_args(argv)
    ints = lambda t: [int(x) for x in t.split(",")] if t else None  # noqa: E731
    res = run([p.strip() for p in a.phases.split(",") if p.strip()], Path(a.out), shape=a.shape, device=a.device,
              compile=not a.no_compile, deadline_s=a.deadline_s, rows=a.rows, unique=a.unique,
              tier3_batch=a.tier3_batch, sub_batch=a.sub_batch, repeats=a.repeats,
              tower_batches=ints(a.tower_batches), train_batches=ints(a.train_batches), ranks=ints(a.ranks),
              workdir=a.workdir, paths=a.paths.split(",") if a.paths else None,
              variants=a.variants.split(",") if a.variants else None, suffix=a.suffix,
              tower_threads=ints(a.tower_threads), qlora_grid=a.qlora_grid)
    for r in res.values():
        print(f"== {r.name}")
        for d in r.derived.values():
            print(f"  {d['label']}: {d['value']} {d['unit']}  target {d['target']}  met {d['met']}")
        if r.details.get("errors"):
            print("  errors:", json.dumps(r.details["errors"])[:1500])


if __name__ == "__main__":
    main()
