"""What the GPU benchmark's phases share: the model shapes, the random-weight Qwen2.5-VL builders,
synthetic inputs, timing (`measure`, `GpuBusy`), results with the accelerator block, LoRA set-up.

Imports no torch or vlmspec runtime at module level: a phase pulls in only what it needs, so a device
call without pylance still runs the phases that need none.
"""

from __future__ import annotations

import importlib.metadata
import json
import math
import platform
import shutil
import statistics
import threading
import time
import traceback
from pathlib import Path
from typing import Any, Callable

from ..common import Results, load

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
        from ..common import machine_info

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
    from ..common import render_markdown

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
        # SDPA on the model and both sub-configs, as vlmspec's own loaders load it
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
    # the image block after five text tokens, the labelled answer at the end
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
    # peak memory counts the timed calls only, not warm-up or compilation
    reset_peak(device)
    t1 = time.perf_counter()
    fn()
    sync(device)
    one = max(time.perf_counter() - t1, 1e-6)
    # k calls per timed repeat, so a repeat lasts about `target_s`: short calls are timed in bulk
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


# --- LoRA (trainstep and qlora) -------------------------------------------------------------

def add_lora(model, r: int):
    from peft import LoraConfig, get_peft_model

    # = runtime.train.lora_target_regex(["q_proj", "k_proj", "v_proj", "o_proj"]) (train.py imports
    # pylance, which a device call may lack)
    cfg = LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=0.05, bias="none", task_type="CAUSAL_LM",
                     target_modules=r".*language_model\..*\.(q_proj|k_proj|v_proj|o_proj)")
    pm = get_peft_model(model, cfg)
    pm.train()
    return pm


def adapter_optimizer(pm, device: str, capturable: bool = False):
    """AdamW over the adapter, fused on CUDA as `runtime.train` builds it (capturable: for a
    step replayed as one CUDA graph)."""
    import torch

    params = [p for p in pm.parameters() if p.requires_grad]
    cuda = str(device).startswith("cuda")
    kw = dict(fused=True, capturable=capturable) if cuda else {}
    return torch.optim.AdamW(params, lr=1e-4, **kw)


def device_step_inputs(shape: str, ids, mask, labels, device: str, min_slots: int = 8):
    """`cached.step_inputs` (what the training loader's workers compute), moved to the device."""
    from vlmspec.runtime.vlm.cached import step_inputs

    s = SHAPES[shape]
    side = s["image_px"] // 28
    si = step_inputs(ids.cpu(), mask.cpu(), labels.cpu(), s["ids"]["image_token_id"], side * side, (side, side),
                     min_slots)
    return si.map(lambda t: t.to(device))


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


# --- tier 3's model directory ---------------------------------------------------------------

def model_dir(shape: str, root: Path) -> Path:
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
