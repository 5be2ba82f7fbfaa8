"""`vlmspec bench bf16-noise`: how far HF's own Qwen2.5-VL vision tower in bf16 is from the same
tower in fp32, on the same weights and pixels.

That distance is the tolerance two bf16 implementations of the tower can be held to: the compiled
FastTower (the vision column's default on CUDA) differs from HF's bf16 tower by rounding, and
`vlmspec bench gpu --phases tier3` reports that difference (`written_vs_hf_reference_rel_l2`).
Random weights (HF's init) at the real shape; runs on any machine (about a minute on 2 cores).
"""

from __future__ import annotations

import time
from pathlib import Path

from .common import Results, load


def run(out: Path, *, shape: str = "3b", images: int = 1, seeds: int = 2, device: str = "cpu") -> Results:
    import torch

    from .gpu import build_tower, grid_of, pixels, rel_l2

    res = Results("bf16_noise", "HF vision tower: bf16 vs fp32 on the same weights and pixels",
                  {"shape": shape, "images": images, "seeds": seeds, "device": device})
    fig = res.figure("hf_bf16_vs_fp32", "HF tower bf16 output vs fp32 output, relative L2", "")
    mx = res.figure("hf_bf16_vs_fp32_max_abs", "HF tower bf16 output vs fp32 output, max abs", "")
    t = time.perf_counter()
    # one set of weights for both dtypes: the difference is rounding alone
    tower = build_tower(shape, device, torch.float32)
    grid = torch.tensor([grid_of(shape)] * images)
    for seed in range(seeds):
        px = pixels(shape, images, device, torch.float32, seed=seed)
        lb = load()
        with torch.inference_mode():
            ref = tower.float()(px, grid_thw=grid).pooler_output
            # converted in place: from the second seed on, the fp32 pass above runs on the bf16-rounded
            # weights (exact in fp32), so those samples measure the activations' rounding alone
            out16 = tower.to(torch.bfloat16)(px.to(torch.bfloat16), grid_thw=grid).pooler_output
        fig.add(rel_l2(out16, ref), lb, load())
        mx.add(float((out16.float() - ref.float()).abs().max()), lb, load())
    res.details["seconds"] = round(time.perf_counter() - t, 1)
    res.derive("bf16_tolerance", "bf16 tolerance for the vision tower (HF bf16 vs fp32, relative L2, median)",
               round(fig.median, 4))
    res.write(out)
    return res
