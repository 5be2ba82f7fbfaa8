"""Does the eval's compiled tower start warm from the column's compile cache in a new process?

Five fresh processes share one `VLMSPEC_CACHE_DIR`, on the shipped tiny model (sub-batches of 2):
`column` warms the tower as the tier-3 column does (`FastTower` compiled and graphed inside
`Warmup(tower_parts(...))`, uint8 zeros copied from the host), `eval` as the eval does
(`_TowerRunner.warm`), then `column` and `eval` again, then `both` (the column's, then the eval's, in one
process: the cold apply). Each prints its `Warmup.stats` (inductor FX-graph cache
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
    from vlmspec.compiler.model import ModelSpec
    from vlmspec.runtime.eval import generate as G
    from vlmspec.runtime.vlm import fast_tower, models
    from vlmspec.runtime.vlm.patchify import Patchifier

    fast_tower.CUDA_SUB_BATCH = 2
    px = 112
    spec = ModelSpec(id="vlmspec:tiny-qwen2.5-vl", image_px=px, dtype="auto")
    tower = models.load_vision_tower(spec, device="cuda")
    patchify = Patchifier(models.load_model_processor(spec).image_processor)
    if role == "eval":
        return G._TowerRunner(tower, "cuda", compile=True).warm(patchify, px)
    if role == "both":  # the cold apply: the column's warm-up, then the eval's on a second tower copy
        first = _column(tower, patchify, px)
        second = G._TowerRunner(models.load_vision_tower(spec, device="cuda"), "cuda", compile=True).warm(patchify, px)
        return {"column": first, "eval": second}
    return _column(tower, patchify, px)


def _column(tower, patchify, px: int) -> dict:
    import torch

    from vlmspec.runtime.vlm import fast_tower
    from vlmspec.runtime.vlm.compile_cache import Warmup, tower_parts

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
    env["TORCH_LOGS"] = "recompiles"  # dynamo says why it compiled again
    fx = Path(env["VLMSPEC_CACHE_DIR"]) / "compile" / "inductor" / "fxgraph"
    for role in ("column", "eval", "column", "eval", "both"):
        before = set(fx.rglob("*")) if fx.exists() else set()
        p = subprocess.run([sys.executable, __file__, "--one", role], capture_output=True, text=True, env=env)
        line = next((x for x in p.stdout.splitlines() if x.startswith("RESULT ")), None)
        new = sorted(str(f.relative_to(fx)) for f in (set(fx.rglob("*")) if fx.exists() else set()) - before
                     if f.is_file())
        print(role, line[7:] if line else (p.stderr or p.stdout)[-800:], flush=True)
        print("  new fxgraph entries:", new[:12], flush=True)
        reasons = [x for x in p.stderr.splitlines() if "ecompil" in x or "triggered by" in x or "guard" in x]
        print("  recompiles:", reasons[:8], flush=True)


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[3]))
    main()
