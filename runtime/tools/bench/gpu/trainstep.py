"""Phase `trainstep`: LoRA train step (forward, backward, AdamW) samples/s and peak memory, sequence
512 with 400 image tokens, labels on the last 16 tokens (logits only there), for our cached path and
the raw path (tower run every step, no grad), r in {16, 64}, batch in {2, 8, 16}; eager, and with
torch.compile (regional: each decoder layer / tower block compiled once, shared). Writes
`gpu_trainstep.json`.
"""

from __future__ import annotations

from typing import Any, Callable

from ._common import (SHAPES, Phase, adapter_optimizer, add_lora, device_step_inputs, grid_of, measure, pixels,
                      pooled, sync, text_batch)

# Variants of the cached train step, slowest first:
#   eager / compiled: cached_forward (HF get_rope_index, label selection by mask: host syncs)
#   nosync[-compiled]: runtime.train's step: cached_loss on loader-precomputed positions and label
#                      slots (no host sync, no attention mask for right-padded rows), fused AdamW
#   graph[-compiled]:  `train.compile: graph`: the nosync forward + backward replayed as one CUDA
#                      graph (runtime.vlm.graph_step), fused optimizer step outside it
TRAIN_VARIANTS = ("eager", "compiled", "nosync", "nosync-compiled", "graph", "graph-compiled")
VARIANTS_DOC = ("eager/compiled: cached_forward (HF get_rope_index and mask-selected labels: host syncs); nosync: "
                "runtime.train's step (cached_loss on precomputed positions/label slots, fused AdamW); graph: "
                "train.compile=graph, its forward + backward replayed as one CUDA graph; -compiled: decoder layers "
                "torch.compile'd")


def _set_compiled(layers, on: bool) -> None:
    for layer in layers:
        if on:
            layer.compile(dynamic=False)
        else:
            # drops the compiled call, so the next variant runs the layers eagerly again
            layer._compiled_call_impl = None


def _make_step(pm, opt, shape: str, device: str, dtype, b: int, path: str, tower_fn,
               variant: str) -> Callable[[], None]:
    """One train step of `variant` on batch `b`: cached hiddens, or the tower run first (`raw`)."""
    import torch

    from vlmspec.runtime.vlm.cached import cached_forward, cached_loss

    s = SHAPES[shape]
    grid1 = grid_of(shape)
    ntok = (s["image_px"] // 28) ** 2
    hidden = s["text"]["hidden_size"]
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
        si = device_step_inputs(shape, ids, mask, labels, device)

        def step():
            cached_loss(pm, ids, mask, hiddens(), si).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        return step
    # runtime.train with `compile: graph`: forward + backward replayed as one CUDA graph
    # (GraphedStep), the fused optimizer step outside it.
    from vlmspec.runtime.vlm.graph_step import GRAPH_LABEL_SLOTS, GraphedStep

    si = device_step_inputs(shape, ids, mask, labels, device, GRAPH_LABEL_SLOTS)
    graphed = GraphedStep(pm)

    def step():
        graphed(ids, mask, hiddens(), si, 1.0)
        opt.step()
        # the graph captured the gradient buffers: they must stay allocated between replays
        opt.zero_grad(set_to_none=False)
    return step


def _profile(ph: Phase, step, key: str, device: str) -> None:
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


def _run_variant(ph: Phase, ctx: dict[str, Any], pm, r: int, variant: str, batches: list[int],
                 table: dict[str, Any], hf_tower, fast_comp) -> None:
    """Every path x batch of one variant at rank `r`; figures land in `table` and `ph`."""
    import torch

    shape, device, dtype = ctx["shape"], ctx["device"], ctx["dtype"]
    compiled = variant.endswith("compiled")
    for path in ctx.get("paths") or ("cached", "raw"):  # cached first: it is what the targets are about
        for b in batches:
            key = f"train_{path}_r{r}_b{b}_{variant}"
            # a compiled variant spends its first minute compiling: don't start one near the deadline
            if ph.time_left() < (90 if compiled else 20):
                ph.res.notes.append(f"{key}: skipped (device-call deadline)")
                continue
            tower_fn = (lambda px, g: fast_comp(px, g).pooler_output) if compiled else hf_tower
            opt = adapter_optimizer(pm, device) if variant not in ("eager", "compiled") else \
                torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=1e-4)
            try:
                step = _make_step(pm, opt, shape, device, dtype, b, path, tower_fn, variant)
                label = (f"{'cached' if path == 'cached' else 'raw (tower every step)'} bf16 LoRA r{r}, "
                         f"batch {b}, {variant}")
                med = measure(ph, key, label, b, step, device, unit="samples/s",
                              warmup=3 if compiled else 2, target_s=2.0, max_calls=30, batch=b, r=r,
                              path=path, variant=variant)
                table[key] = {"samples_per_s": med, "peak_gib": ph.res.figures[key].extra["peak_gib"]}
                if b == min(batches) and path == "cached" and ctx.get("profile", True):
                    try:
                        _profile(ph, step, key, device)
                    except Exception as e:  # noqa: BLE001
                        ph.error(key + "_profile", e)
                ph.save()
            except Exception as e:  # noqa: BLE001
                ph.error(key, e)
                if "out of memory" in str(e).lower():
                    torch.cuda.empty_cache()
            finally:
                # free this configuration's optimizer state and step closures before the next one
                del opt
                step = None
                torch.cuda.synchronize() if str(device).startswith("cuda") else None


def _derive(ph: Phase, table: dict[str, Any], shape: str) -> None:
    best = {}
    for key, v in table.items():
        if key.startswith("train_cached") and v["samples_per_s"] is not None:
            b = int(key.split("_b")[1].split("_")[0])
            best[b] = max(best.get(b, 0.0), v["samples_per_s"])
    top = max(best.values() or [0.0])
    b2 = best.get(2)
    # the targets are about the 3B shape; at the tiny shape they are recorded unjudged
    is3b = shape == "3b"
    ph.res.derive("train_cached_best", "cached bf16 LoRA train step, best over r/batch/variant", top,
                  unit="samples/s", target=">= 60", met=top >= 60 if is3b else None)
    ph.res.derive("train_cached_b2", "cached bf16 LoRA train step at batch 2, best variant", b2, unit="samples/s",
                  target=">= 30", met=(b2 or 0) >= 30 if is3b else None)
    raw = {k: v["samples_per_s"] for k, v in table.items() if k.startswith("train_raw")}
    if raw:
        ph.res.derive("train_raw_best", "raw path (tower every step), best over r/batch/variant", max(raw.values()),
                      unit="samples/s")


def phase_trainstep(ph: Phase, ctx: dict[str, Any]) -> None:
    import torch

    from vlmspec.runtime.vlm.fast_tower import FastTower

    shape, device = ctx["shape"], ctx["device"]
    model = ctx["model"]
    s = SHAPES[shape]
    batches = ctx["train_batches"] or s["train_batches"]
    ranks = ctx["ranks"] or s["ranks"]
    tower = model.model.visual
    hf_tower = lambda px, grid: pooled(tower(px, grid_thw=grid.to(device)))  # noqa: E731
    fast_comp = FastTower(tower, compile=ctx["compile"], allow_cpu_compile=ctx["compile"])
    import torch._dynamo.config as dcfg

    # every (rank, batch, path) is a new input shape for the compiled layers: the default limit
    # would fall back to eager part-way through the grid
    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(dcfg, name):
            setattr(dcfg, name, max(int(getattr(dcfg, name)), 64))
    table: dict[str, Any] = {}
    ph.res.details["train"] = table
    ph.res.details["variants_doc"] = VARIANTS_DOC

    lm_layers = model.model.language_model.layers
    for r in ranks:
        pm = add_lora(model, r)
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
                    _run_variant(ph, ctx, pm, r, variant, batches, table, hf_tower, fast_comp)
                finally:
                    _set_compiled(lm_layers, False)
        finally:
            # unload the adapter so the next rank (and later phases) start from the plain model
            pm.unload()
            model.requires_grad_(False)
            if str(device).startswith("cuda"):
                torch.cuda.empty_cache()
    _derive(ph, table, shape)
    ph.save()
