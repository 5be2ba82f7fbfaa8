"""Does the eval's compiled tower start warm from the column's compile cache in a new process?

Three fresh processes share one `VLMSPEC_CACHE_DIR`, on the shipped tiny model (sub-batches of 2):
`column` warms the tower as the tier-3 column does (`FastTower` compiled and graphed inside
`Warmup(tower_parts(...))`, uint8 zeros copied from the host), `eval` as the eval does
(`_TowerRunner.warm`), then `column` again. Each prints its `Warmup.stats` (inductor FX-graph cache
hits and misses). On the GPU machine, after `source examples/benchmarks/gpu_device_setup.sh`:

    python3 examples/benchmarks/profiles/eval_cache_probe.py
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path


def one(role: str) -> dict:
    import torch

    from vlmspec.compiler.model import ModelSpec
    from vlmspec.runtime.eval import generate as G
    from vlmspec.runtime.vlm import fast_tower, models
    from vlmspec.runtime.vlm.compile_cache import Warmup, tower_parts
    from vlmspec.runtime.vlm.patchify import Patchifier

    fast_tower.CUDA_SUB_BATCH = 2
    px = 112
    spec = ModelSpec(id="vlmspec:tiny-qwen2.5-vl", image_px=px, dtype="auto")
    tower = models.load_vision_tower(spec, device="cuda")
    patchify = Patchifier(models.load_model_processor(spec).image_processor)
    if role == "eval":
        return G._TowerRunner(tower, "cuda", compile=True).warm(patchify, px)
    fast = fast_tower.FastTower(tower, compile=True, compile_sizes={2}, graph=True)
    with Warmup(tower_parts(tower, tower.dtype, px, {2}, True, True)) as warm, torch.inference_mode():
        zeros = torch.zeros((2, px, px, 3), dtype=torch.uint8)
        for _ in range(2):
            pixels, grid = patchify(zeros.to("cuda", non_blocking=True))
            fast(pixels.to(tower.dtype), grid)
        torch.cuda.synchronize()
    return warm.stats


def main() -> None:
    if len(sys.argv) > 2 and sys.argv[1] == "--one":
        print("RESULT " + json.dumps(one(sys.argv[2])), flush=True)
        return
    env = {**os.environ, "VLMSPEC_CACHE_DIR": tempfile.mkdtemp(prefix="vlmspec-probe-")}
    for k in ("TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR"):
        env.pop(k, None)
    for role in ("column", "eval", "column", "eval"):
        p = subprocess.run([sys.executable, __file__, "--one", role], capture_output=True, text=True, env=env)
        line = next((x for x in p.stdout.splitlines() if x.startswith("RESULT ")), None)
        print(role, line[7:] if line else (p.stderr or p.stdout)[-800:], flush=True)


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[3]))
    main()
