"""Does the eval's compiled tower start warm from the column's compile cache in a new process?

Fresh processes share one `VLMSPEC_CACHE_DIR`, each warming the vision tower one way and printing
its `Warmup.stats` (inductor FX-graph cache hits and misses):

- `column`: as the tier-3 column does (`FastTower` compiled and graphed inside
  `Warmup(tower_parts(...))`, uint8 zeros copied from the host);
- `eval`: as the eval's runner does (`_TowerRunner.warm`), tower and processor alone;
- `features`: as `evaluate` does (`ImageFeatures(compile=True)` over synthetic questions: prompts
  tokenised, the first batches decoding on its thread pool while the tower warms up);
- `both`: the column's, then the eval's, in one process (the cold apply).

`--shape tiny` (default) runs the shipped tiny model at 112 px in sub-batches of 2, `--shape 3b` the
3B shape (random weights, built once into `--work`) at 560 px in the column's sub-batches; `--roles`
picks the sequence. With `--trace DIR`, each process writes what inductor hashed into every key
(`VLMSPEC_COMPILE_TRACE`, one folder per role and run), and the first `column` run's trace is
diffed against each later process that missed (`compile_trace_diff.py`). On the GPU machine, after
`source examples/benchmarks/gpu_device_setup.sh`:

    python3 examples/benchmarks/profiles/eval_cache_probe.py --shape 3b --trace $OUT/trace
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

def one(role: str, shape: str, work: Path) -> dict:
    from vlmspec.compiler.model import ModelSpec
    from vlmspec.runtime.eval import generate as G
    from vlmspec.runtime.vlm import fast_tower, models
    from vlmspec.runtime.vlm.patchify import Patchifier

    if shape == "tiny":
        fast_tower.CUDA_SUB_BATCH = 2
        px, model_id = 112, "vlmspec:tiny-qwen2.5-vl"
    else:
        from vlmspec.runtime.tools.bench.apply_e2e import model_folder

        px, model_id = 560, model_folder(shape, work)
    sub = fast_tower.CUDA_SUB_BATCH
    spec = ModelSpec(id=model_id, image_px=px, dtype="auto")
    tower = models.load_vision_tower(spec, device="cuda")
    processor = models.load_model_processor(spec)
    patchify = Patchifier(processor.image_processor)
    if role == "eval":
        return G._TowerRunner(tower, "cuda", compile=True).warm(patchify, px)
    if role == "features":
        from eval_compare import question_rows  # this script's folder is on sys.path

        features = G.ImageFeatures(tower, processor, question_rows(4 * sub, px), px, 2 * sub, "cuda", compile=True)
        stats = features.warmup
        features.close()
        return stats
    if role == "both":  # the cold apply: the column's warm-up, then the eval's on a second tower copy
        first = _column(tower, patchify, px, sub)
        second = G._TowerRunner(models.load_vision_tower(spec, device="cuda"), "cuda", compile=True).warm(patchify, px)
        return {"column": first, "eval": second}
    return _column(tower, patchify, px, sub)


def _column(tower, patchify, px: int, sub: int) -> dict:
    import torch

    from vlmspec.runtime.vlm import fast_tower
    from vlmspec.runtime.vlm.compile_cache import Warmup, tower_parts

    fast = fast_tower.FastTower(tower, compile=True, compile_sizes={sub}, graph=True)
    with Warmup(tower_parts(tower, tower.dtype, px, {sub}, True, True)) as warm, torch.inference_mode():
        zeros = torch.zeros((sub, px, px, 3), dtype=torch.uint8)
        for _ in range(2):
            pixels, grid = patchify(zeros.to("cuda", non_blocking=True))
            fast(pixels.to(tower.dtype), grid)
        torch.cuda.synchronize()
    return warm.stats


def _misses(stats: dict) -> int:
    return sum(_misses(v) for v in stats.values() if isinstance(v, dict)) + int(stats.get("fxgraph_misses", 0))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="tiny", choices=["tiny", "3b"])
    ap.add_argument("--roles", default=None, help="comma-separated; default column,eval,column,eval,features,both")
    ap.add_argument("--work", default=".bench-apply")
    ap.add_argument("--trace", default=None, help="a folder for each process's cache-key trace")
    ap.add_argument("--one", default=None)
    a = ap.parse_args()
    work = Path(a.work).resolve()
    if a.one:
        print("RESULT " + json.dumps(one(a.one, a.shape, work)), flush=True)
        return
    env = {**os.environ, "VLMSPEC_CACHE_DIR": tempfile.mkdtemp(prefix="vlmspec-probe-")}
    for k in ("TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR"):
        env.pop(k, None)
    env["TORCH_LOGS"] = "recompiles"  # dynamo says why it compiled again
    fx = Path(env["VLMSPEC_CACHE_DIR"]) / "compile" / "inductor" / "fxgraph"
    roles = (a.roles or "column,eval,column,eval,features,both").split(",")
    first_trace = None
    for n, role in enumerate(roles):
        trace = Path(a.trace).resolve() / f"{n}-{role}" if a.trace else None
        if trace is not None:
            env["VLMSPEC_COMPILE_TRACE"] = str(trace)
        before = set(fx.rglob("*")) if fx.exists() else set()
        p = subprocess.run([sys.executable, __file__, "--one", role, "--shape", a.shape, "--work", str(work)],
                           capture_output=True, text=True, env=env)
        line = next((x for x in p.stdout.splitlines() if x.startswith("RESULT ")), None)
        new = sorted(str(f.relative_to(fx)) for f in (set(fx.rglob("*")) if fx.exists() else set()) - before
                     if f.is_file())
        print(role, line[7:] if line else (p.stderr or p.stdout)[-800:], flush=True)
        print("  new fxgraph entries:", len(new), flush=True)
        reasons = [x for x in p.stderr.splitlines() if "ecompil" in x or "triggered by" in x or "guard" in x]
        print("  recompiles:", reasons[:8], flush=True)
        logs = sorted(trace.glob("*.log")) if trace is not None and trace.exists() else []
        if role == "column" and first_trace is None and logs:
            first_trace = logs[0]
        elif first_trace is not None and line and _misses(json.loads(line[7:])) and logs:
            from compile_trace_diff import diff, graphs  # this script's folder is on sys.path

            for log in logs:
                print("  vs the first column:", "\n    ".join(diff(graphs(first_trace), graphs(log), 12)), flush=True)


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[3]))
    main()
