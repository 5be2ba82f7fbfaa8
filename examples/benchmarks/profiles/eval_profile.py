"""Where the eval's generation time goes at the 3B shape (random weights), on one GPU.

Not a benchmark with targets (that is `vlmspec bench apply`'s eval stage): a profile that splits
`generate_answers` into its parts so the slow one can be fixed. Run on the GPU machine after
`source examples/benchmarks/gpu_device_setup.sh` (needs bitsandbytes and pydantic from small.tar.xz):

    python3 examples/benchmarks/profiles/eval_profile.py --out $OUT/eval_profile.json

Parts timed on a warm model, one batch of `--batch` 560 px questions, 16 new tokens: image decode
(CPU), patchify, the vision tower, `get_rope_index`, one prefill (`max_new_tokens=1`), the whole
`generate`, and the per-step decode cost; then `torch.profiler`'s top operators of one `generate`,
for the 4-bit model as the spec loads it, for it with a LoRA adapter (the tuned model), and for bf16.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))


def sync():
    import torch

    torch.cuda.synchronize()


def timed(fn, n: int = 1):
    sync()
    t = time.perf_counter()
    for _ in range(n):
        r = fn()
    sync()
    return (time.perf_counter() - t) / n, r


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="eval_profile.json")
    ap.add_argument("--work", default="/tmp/vlmspec-eval-profile")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--questions", type=int, default=512)
    ap.add_argument("--variants", default="nf4,lora,bf16")
    args = ap.parse_args()

    import numpy as np
    import torch

    from vlmspec.runtime.eval import generate as G
    from vlmspec.runtime.sources.synthetic import generate as synth
    from vlmspec.runtime.tools.bench.apply_e2e import model_folder
    from vlmspec.runtime.vlm.models import load_full_model, load_model_processor
    from vlmspec.runtime.vlm.patchify import Patchifier

    out: dict = {"gpu": torch.cuda.get_device_name(0), "torch": torch.__version__, "batch": args.batch}
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    t = time.perf_counter()
    folder = model_folder("3b", work)
    out["model_folder_s"] = round(time.perf_counter() - t, 1)
    rows = []
    for b in synth(args.questions, seed=0, image_px=560, batch_rows=256):
        d = b.to_pydict()
        rows += [{"image": d["image"][i], "question": d["question"][i]} for i in range(b.num_rows)]
    rows = rows[:args.questions]
    spec = SimpleNamespace(id=folder, revision=None, dtype="auto", trust_remote_code=False, image_px=560)
    gen = SimpleNamespace(max_new_tokens=16, do_sample=False, temperature=1.0)
    processor = load_model_processor(spec)
    tok = processor.tokenizer
    tok.padding_side = "left"
    quant = {"bits": 4, "type": "nf4", "double_quant": True, "compute_dtype": "bfloat16"}

    def report(prof, n=30):
        ka = prof.key_averages()
        cpu = sorted(ka, key=lambda e: -e.self_cpu_time_total)[:n]
        dev = sorted(ka, key=lambda e: -getattr(e, "self_device_time_total", 0))[:n]
        f = lambda e: {"op": e.key[:90], "calls": e.count, "self_cpu_ms": round(e.self_cpu_time_total / 1e3, 1),
                       "self_gpu_ms": round(getattr(e, "self_device_time_total", 0) / 1e3, 1)}
        return {"by_cpu": [f(e) for e in cpu], "by_gpu": [f(e) for e in dev]}

    for variant in args.variants.split(","):
        r: dict = {}
        out[variant] = r
        try:
            t = time.perf_counter()
            model = load_full_model(spec, device="cuda", quant=None if variant == "bf16" else quant)
            if variant == "lora":
                from peft import LoraConfig, get_peft_model

                model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05,
                                                         target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]))
                for n_, p in model.named_parameters():  # a trained adapter's B is not zero
                    if "lora_B" in n_:
                        torch.nn.init.normal_(p, std=1e-3)
                model.eval()
            r["load_s"] = round(time.perf_counter() - t, 2)
            one = rows[:args.batch]
            s, _ = timed(lambda: G.generate_answers(model, processor, one, 560, args.batch, gen, "cuda"))
            r["first_batch_s"] = round(s, 2)
            s, _ = timed(lambda: G.generate_answers(model, processor, one, 560, args.batch, gen, "cuda"))
            r["warm_batch_s"] = round(s, 2)
            r["warm_batch_qps"] = round(len(one) / s, 1)
            s, _ = timed(lambda: G.generate_answers(model, processor, rows, 560, args.batch, gen, "cuda"))
            r["warm_all_s"] = round(s, 2)
            r["warm_all_qps"] = round(len(rows) / s, 1)

            # the parts of one batch
            texts = G.prompt_texts(processor, [x["question"] for x in one], 560)
            s, u8 = timed(lambda: np.stack([G._decode(x, 560) for x in one]))
            r["decode_serial_s"] = round(s, 3)
            patch = Patchifier(processor.image_processor)
            s, (pix, grid) = timed(lambda: patch(torch.from_numpy(u8).to("cuda")))
            r["patchify_s"] = round(s, 4)
            s, inputs = timed(lambda: G.text_inputs(processor, texts))
            r["text_inputs_s"] = round(s, 4)
            r["prompt_tokens"] = list(inputs["input_ids"].shape)
            inputs.update(pixel_values=pix, image_grid_thw=grid)
            inputs = {k: v.to("cuda") for k, v in inputs.items()}
            tower = G._FastImageFeatures(model, "cuda", compile=False)
            try:
                inner = tower.inner
                with torch.inference_mode():
                    s, _ = timed(lambda: inner.get_image_features(pix, grid))
                r["tower_fast_eager_s"] = round(s, 3)
                rope = getattr(inner, "get_rope_index", None)
                if rope is not None:
                    try:
                        kw = {"mm_token_type_ids": inputs["mm_token_type_ids"]} if "mm_token_type_ids" in inputs else {}
                        s, _ = timed(lambda: rope(inputs["input_ids"], image_grid_thw=grid,
                                                  attention_mask=inputs["attention_mask"], **kw))
                        r["rope_index_s"] = round(s, 4)
                    except Exception as e:  # noqa: BLE001
                        r["rope_index_error"] = f"{type(e).__name__}: {e}"[:300]
                g1 = SimpleNamespace(max_new_tokens=1, do_sample=False, temperature=1.0)
                s1, _ = timed(lambda: G._generate(model, inputs, g1, tok.pad_token_id))
                s16, _ = timed(lambda: G._generate(model, inputs, gen, tok.pad_token_id))
                r["generate_1_s"] = round(s1, 3)
                r["generate_16_s"] = round(s16, 3)
                r["decode_step_ms"] = round((s16 - s1) / 15 * 1e3, 1)
                from torch.profiler import ProfilerActivity, profile

                with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                    G._generate(model, inputs, gen, tok.pad_token_id)
                    sync()
                r["profile"] = report(prof)
                # static cache, compiled decode (transformers compiles the forward for a static cache)
                try:
                    def static():
                        with torch.inference_mode():
                            return model.generate(**inputs, max_new_tokens=16, do_sample=False,
                                                  pad_token_id=tok.pad_token_id, cache_implementation="static")
                    s, _ = timed(static)
                    r["static_first_s"] = round(s, 2)
                    s, _ = timed(static)
                    r["static_warm_s"] = round(s, 3)
                except Exception as e:  # noqa: BLE001
                    r["static_error"] = f"{type(e).__name__}: {e}"[:400]
            finally:
                tower.remove()
            r["peak_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
        except Exception:  # noqa: BLE001
            import traceback

            r["error"] = traceback.format_exc()[-2000:]
        finally:
            model = None
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        Path(args.out).write_text(json.dumps(out, indent=1))
        print(variant, {k: v for k, v in r.items() if k != "profile"}, flush=True)


if __name__ == "__main__":
    main()
