"""The GPU benchmark's driver: builds the model once, runs the asked-for phases in order, and keeps
what each phase measured when a later one fails (every phase writes its own results file).
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path
from typing import Any

from ._common import NLAB, PHASES, SHAPES, Phase, build_model, build_tower
from .equivalence import phase_equivalence
from .qlora import phase_qlora
from .tier3 import phase_tier3
from .tower import phase_tower
from .trainstep import phase_trainstep

TITLES = {
    "equivalence": "GPU: bf16 equivalence at the Qwen2.5-VL-3B shape (FastTower, cached path)",
    "tower": "GPU: vision tower images/s (HF vs FastTower vs FastTower + torch.compile)",
    "trainstep": "GPU: LoRA train step, cached vs raw (samples/s, peak memory)",
    "qlora": "GPU: 4-bit QLoRA r16 batch 2 with gradient checkpointing",
    "tier3": "GPU: tier-3 backfill rows/s end to end vs the bare tower",
}
PHASE_FNS = {"equivalence": phase_equivalence, "tower": phase_tower, "trainstep": phase_trainstep,
             "qlora": phase_qlora, "tier3": phase_tier3}


def run(phases: list[str], out: Path, *, shape: str = "3b", device: str | None = None, compile: bool = True,
        deadline_s: float = 540.0, rows: int = 1024, unique: int = 256, tier3_batch: int = 256, sub_batch: int = 16,
        repeats: int = 3, procs: int | None = None, tower_batches: list[int] | None = None,
        train_batches: list[int] | None = None, ranks: list[int] | None = None, workdir: str | None = None,
        paths: list[str] | None = None, variants: list[str] | None = None, suffix: str = "",
        tower_threads: list[int] | None = None, qlora_grid: bool = False) -> dict:
    """Run `phases` in order; returns each phase's `Results` by name (also written to `out`).

    `deadline_s` bounds one device call: work that would start after it is skipped and noted.
    `suffix` is appended to every result name, so variant runs do not overwrite the main files.
    """
    import torch

    for p in phases:
        if p not in PHASES:
            raise ValueError(f"unknown phase `{p}`; known: {', '.join(PHASES)}")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    # bf16 is what the figures are about; a tiny run on a CPU stays fp32 (CPU bf16 kernels are slow)
    dtype = torch.bfloat16 if device.startswith("cuda") or shape == "3b" else torch.float32
    deadline = time.time() + deadline_s
    # a given --workdir survives the call: the next call reuses qlora's saved checkpoint
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
    # one model serves the first three phases (the 3B build is slow); tier3 alone needs only the tower
    if any(p in phases for p in ("equivalence", "tower", "trainstep")):
        t = time.perf_counter()
        ctx["model"] = build_model(shape, device, dtype)
        print(f"built {shape} model in {time.perf_counter() - t:.1f}s", flush=True)
    elif "tier3" in phases:
        ctx["tower"] = build_tower(shape, device, dtype)
    done = {}
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
        # tier3 reuses the tower of the model built for earlier phases instead of building another
        if p == "tier3" and ctx.get("model") is not None:
            ctx["tower"] = ctx["model"].model.visual
        try:
            PHASE_FNS[p](ph, ctx)
        except Exception as e:  # noqa: BLE001 - keep what the other phases measure
            ph.error(p, e)
        ph.save()
        done[p] = ph.res
    return done

