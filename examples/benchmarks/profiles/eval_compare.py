"""Eval variants at the 3B shape (random weights) on one GPU, each in a fresh process as `vlmspec
apply` runs it: one 4-bit load with a LoRA adapter, `generate_compared` of base (adapter off) and
tuned, on `--questions` 560-px questions. Varies the batch size and whether LM attention may use
cuDNN's SDPA (which builds a plan per new shape: every decode step's KV length, every batch's
prompt length). Not a benchmark with targets: it picks the defaults that `vlmspec bench apply` then
measures. Run on the GPU machine after `source examples/benchmarks/gpu_device_setup.sh`:

    python3 examples/benchmarks/profiles/eval_compare.py --out $OUT/eval_compare.json
"""

from __future__ import annotations

import argparse
import hashlib
import json
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

CONFIGS = {"b128": (128, True), "b128-nocudnn": (128, False), "b256-nocudnn": (256, False), "b256": (256, True),
           "b256-ahead": (256, False), "b256-compiled": (256, False), "b256-inproc": (256, False),
           "b256-inproc-inline": (256, False), "b256-default": (256, False)}
"""`-ahead`: the tower loaded alone, the first batches' features started before the model loads
(`ImageFeatures`), the tower eager (a config `-ahead-thread` launched it from a background thread:
measured slower, the tower then ran beside the load on the GPU, and that option is gone: see
results/history/2026-12-07-h100-eval-thread); `-compiled`: the same, compiled and CUDA-graphed in
the column's sub-batches under the column's compile-cache key, warmed up before the load. Run
after `vlmspec bench apply`'s cold round, it shows whether a new process starts that compile warm
from the column's cache (`evaluate` compiles where the column's compile is in this process or
on disk: `compile_by_default`). Each run records a digest of each model's answers: a random-weight model's
near-ties can flip between runs, so equal digests are evidence of equal arithmetic, unequal ones
prove nothing alone. `-inproc`: as the cold apply runs it, the column's tower compiled and warmed first in
the same process (a separate tower copy, dropped after, as the column closes its UDF), then the
eval with the default `compile=None` and `start()` (its first batches from a background thread
under the load); `-inproc-inline` starts them from the calling thread, before the load. Both record
where the tower's start goes. `-default`: `evaluate`'s own choice in a new process (`compile=None`,
`start()`): compiled, first batches under the load, where the column's compile is cached on disk
(run it after the column's, sharing `VLMSPEC_CACHE_DIR`), else eager."""


def one(cfg: str, work: Path, questions: int) -> dict:
    import torch

    from vlmspec.runtime.eval import evaluate as E
    from vlmspec.runtime.eval import generate as G
    from vlmspec.runtime.vlm.models import load_full_model, load_model_processor

    batch, cudnn = CONFIGS[cfg]
    if not cudnn:
        from torch.nn.attention import SDPBackend, sdpa_kernel

        real = G._generate

        def no_cudnn(*a, **k):
            with sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]):
                return real(*a, **k)

        G._generate = no_cudnn
    folder = str(work / "model-3b")
    rows = question_rows(questions, 560)
    spec = SimpleNamespace(id=folder, revision=None, dtype="auto", trust_remote_code=False, image_px=560)
    gen = SimpleNamespace(max_new_tokens=16, do_sample=False, temperature=1.0)
    quant = {"bits": 4, "type": "nf4", "double_quant": True, "compute_dtype": "bfloat16"}
    processor = load_model_processor(spec)
    column = None
    inproc = cfg.endswith("-inproc") or cfg.endswith("-inproc-inline")
    if inproc:
        column = _column_warmup(spec, processor)
    t0 = time.perf_counter()
    features, parts = None, {}
    default = cfg.endswith("-default")
    if "-ahead" in cfg or cfg.endswith("-compiled") or default or inproc:
        # the eval's own start (`evaluate._start_tower`), with this config's compile and launcher
        features = E._start_tower(spec, processor, rows, batch, "cuda", parts,
                                  compile=True if cfg.endswith("-compiled") else None if inproc or default else False,
                                  background=None if cfg.endswith("-inproc") or default else False)
    t = time.perf_counter()
    model = load_full_model(spec, device="cuda", adapter_dir=str(work / "adapter"), quant=quant)
    load = time.perf_counter() - t
    seconds: dict = {}
    t = time.perf_counter()
    answers = G.generate_compared(model, {"base": model.disable_adapter, "tuned": G.nullcontext}, processor, rows,
                                  560, batch, gen, "cuda", seconds=seconds, features=features)
    wall = time.perf_counter() - t
    extra = {}
    if features is not None:
        E._tower_done(features, parts)  # the eval's own record: GPU seconds, start wait, host split
        extra = {"compiled": features.compiled, **parts, "column_warmup": column}
    return {"cfg": cfg, **extra, "load_s": round(load, 2), "wall_s": round(wall, 2),
            "load_to_answers_s": round(time.perf_counter() - t0, 2),
            "seconds": {k: round(v, 2) for k, v in seconds.items()},
            "qps": {k: round(len(rows) / v, 1) for k, v in seconds.items()},
            "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2),
            "answers_sha": {k: hashlib.sha256(json.dumps(v).encode()).hexdigest()[:12] for k, v in answers.items()}}


def question_rows(n: int, image_px: int) -> list[dict]:
    """`n` synthetic eval questions (image bytes and question), as `evaluate` passes them on."""
    from vlmspec.runtime.sources.synthetic import generate as synth

    rows = []
    for b in synth(n, seed=1, image_px=image_px, batch_rows=256):
        d = b.to_pydict()
        rows += [{"image": d["image"][i], "question": d["question"][i]} for i in range(b.num_rows)]
    return rows


def _column_warmup(spec, processor) -> dict:
    """The tier-3 column's tower warm-up (`udfs.vision.VisionTower._setup_fast_path`): its own tower
    copy, compiled and graphed in sub-batches under the column's key, dropped afterwards."""
    import torch

    from vlmspec.runtime.vlm import fast_tower
    from vlmspec.runtime.vlm.compile_cache import Warmup, tower_parts
    from vlmspec.runtime.vlm.models import load_vision_tower
    from vlmspec.runtime.vlm.patchify import Patchifier

    tower = load_vision_tower(spec, device="cuda")
    sizes = {fast_tower.CUDA_SUB_BATCH}
    fast = fast_tower.FastTower(tower, compile=True, compile_sizes=sizes, graph=True)
    patchify = Patchifier(processor.image_processor)
    with Warmup(tower_parts(tower, tower.dtype, 560, sizes, True, True)) as warm, torch.inference_mode():
        zeros = torch.zeros((fast_tower.CUDA_SUB_BATCH, 560, 560, 3), dtype=torch.uint8)
        for _ in range(2):
            pixels, grid = patchify(zeros.to("cuda", non_blocking=True))
            fast(pixels.to(tower.dtype), grid).pooler_output
        torch.cuda.synchronize()
    del fast, tower
    torch.cuda.empty_cache()
    return warm.stats


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="eval_compare.json")
    ap.add_argument("--work", default=".bench-apply")
    ap.add_argument("--questions", type=int, default=315)
    ap.add_argument("--configs", default=",".join(CONFIGS))
    ap.add_argument("--one", default=None)
    args = ap.parse_args()
    work = Path(args.work).resolve()
    if args.one:
        print("RESULT " + json.dumps(one(args.one, work, args.questions)), flush=True)
        return
    import torch
    from peft import LoraConfig, get_peft_model

    from vlmspec.runtime.tools.bench.apply_e2e import model_folder
    from vlmspec.runtime.vlm.models import load_full_model

    t = time.perf_counter()
    folder = model_folder("3b", work)
    out = {"gpu": torch.cuda.get_device_name(0), "model_s": round(time.perf_counter() - t, 1), "runs": []}
    if not (work / "adapter" / "adapter_config.json").exists():
        spec = SimpleNamespace(id=folder, revision=None, dtype="auto", trust_remote_code=False, image_px=560)
        m = get_peft_model(load_full_model(spec, device="cuda", quant={"bits": 4, "type": "nf4", "double_quant": True,
                                                                       "compute_dtype": "bfloat16"}),
                           LoraConfig(r=16, lora_alpha=32, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]))
        for n, p in m.named_parameters():
            if "lora_B" in n:
                torch.nn.init.normal_(p, std=1e-3)
        m.save_pretrained(str(work / "adapter"))
        del m
        torch.cuda.empty_cache()
    for cfg in args.configs.split(","):
        p = subprocess.run([sys.executable, __file__, "--one", cfg, "--work", str(work), "--questions",
                            str(args.questions)], capture_output=True, text=True, timeout=300)
        line = next((x for x in p.stdout.splitlines() if x.startswith("RESULT ")), None)
        r = json.loads(line[7:]) if line else {"cfg": cfg, "error": (p.stderr or p.stdout)[-1500:]}
        out["runs"].append(r)
        print(json.dumps(r), flush=True)
        Path(args.out).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[3]))
    main()
