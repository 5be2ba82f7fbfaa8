"""Answer generation for evaluation: the fast path, and the plain reference it is tested against.

The fast path computes what the reference computes, faster:

* images are decoded and resized with `prompt.resize_image` on a thread pool two batches ahead
  (Pillow releases the GIL);
* `Patchifier` turns the uint8 batch into `pixel_values` on the device (the image processor's
  arithmetic as tensor ops, tested bitwise equal), and the vision tower runs as `FastTower` (the
  tier-3 column's batched-attention replay; on CUDA compiled and CUDA-graphed in the column's
  sub-batches where the column's compile is at hand, see `compile_by_default`);
* on CUDA a batch's copy, patchify and tower are queued on a side stream ahead of its generation
  (`ImageFeatures`): the first batches' before the language model's load (`evaluate` loads the
  tower alone first), each later one's under the previous batch's generation;
* prompts are tokenized with the image pads already expanded (what the processor does), and
  questions are sorted by prompt length so a batch pads little; answers come back in row order;
* `generate_compared` answers with several variants of one loaded model (base = LoRA adapter
  disabled, tuned = enabled): one model load, one tower layout and warm-up, and each batch's
  image features computed once for all variants (the tower is frozen, so they are the same).

The tower is swapped in through an instance attribute on this model's `Qwen2_5_VLModel`
(`get_image_features`), removed afterwards: `model.generate` still builds the M-RoPE positions,
the image-token scatter and the cache itself, and no transformers global is touched.
"""

from __future__ import annotations

import os
import time
import warnings
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import nullcontext
from typing import Any, Callable

import numpy as np

__all__ = ["generate_answers", "generate_answers_reference", "generate_compared", "resolve_batch_size"]

CUDA_BATCH = 128
"""`eval.batch_size: auto` on CUDA: a decode step of the 4-bit 3B model is bound by reading its
weights, so it costs about the same at 64 or 128 rows: the wider batch halves the cost per question
(the KV cache of 128 x ~470 tokens is ~2 GiB)."""
CUDA_BATCH_LARGE = 256
"""... and on a GPU of at least `LARGE_GPU_GIB`: 256 rows ran base + tuned over 315 questions in
14.3 s against 15.6 s at 128 (H100, 3B shape, `profiles/eval_compare.py`), peaking at 30 GiB
against 16 GiB."""
LARGE_GPU_GIB = 64

COMPILE_MIN_QUESTIONS = 2000
"""Without the column's compile of the tower at hand (`compile_by_default`), compile the
eval's tower only for evaluations at least this large: a cold compile costs ~12 s in a fresh
process and saves ~6 ms a question (~170 images/s compiled against ~85 eager at the 3B shape,
`gpu_tower.json`), so it pays from about 2,000 questions (TextVQA's 5,000-question val split)."""
COMPILE_FROM_CACHE_MIN_QUESTIONS = 400
"""With the column's compile cached on disk but not loaded in this process, compile the eval's
tower from that cache for evaluations at least this large. Its warm-up (mega-cache load, dynamo's
trace, graph capture) is ~5 s at the 3B shape against ~12 ms a question of the eager tower's GPU
time, which also slows the model's load beside it: at 400 questions the compiled tower was no
slower from the tower's start to the last answer even with its first batches queued before the
load (H100, `results/history/2026-12-08-h100-eval-cache/`); below that it was not measured, and
the fixed warm-up outweighs the eager tower's cost somewhere around 300."""
CPU_BATCH = 8
"""`eval.batch_size: auto` elsewhere: CPU generation gains little from width and pays in memory."""


def resolve_batch_size(batch_size: int | str, device: str) -> int:
    """`eval.batch_size` as a number: an explicit one wins, `auto` picks by device."""
    if batch_size != "auto":
        return int(batch_size)
    if not str(device).startswith("cuda"):
        return CPU_BATCH
    import torch

    total = torch.cuda.get_device_properties(torch.device(device)).total_memory
    return CUDA_BATCH_LARGE if total >= LARGE_GPU_GIB * 2**30 else CUDA_BATCH


def _generate(model, inputs: dict[str, Any], generation, pad_token_id: int):
    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel

    # Not cuDNN's attention: it builds a plan for every new shape, and generation makes one per
    # decode step (the KV length grows) and per batch (the prompt length). Without it the first
    # variant of an eval ran 9.3 s instead of 15.5 s for 315 questions (H100, 3B shape,
    # `profiles/eval_compare.py`); flash / memory-efficient attention take its place.
    with torch.inference_mode(), sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION,
                                                 SDPBackend.MATH]):
        return model.generate(**inputs, max_new_tokens=generation.max_new_tokens, do_sample=generation.do_sample,
                              temperature=generation.temperature if generation.do_sample else None,
                              pad_token_id=pad_token_id)


def generate_answers_reference(model, processor, rows: list[dict[str, Any]], image_px: int, batch_size: int,
                               generation, device: str, progress=None) -> list[str]:
    """Greedy (or sampled) short answers the plain way: rows in order, the HF processor on PIL
    images, HF's vision tower. What the fast path is tested against."""
    from ..vlm.prompt import image_processor_kwargs, prompt_text, resize_image

    tok = processor.tokenizer
    tok.padding_side = "left"  # generation appends on the right; prompts must end aligned
    answers: list[str] = []
    for start in range(0, len(rows), batch_size):
        chunk = rows[start:start + batch_size]
        texts = [prompt_text(processor, r["question"]) for r in chunk]
        images = [resize_image(r["image"], image_px) for r in chunk]
        inputs = processor(text=texts, images=images, return_tensors="pt", padding=True,
                           **image_processor_kwargs(image_px)).to(device)
        out = _generate(model, inputs, generation, tok.pad_token_id)
        new = out[:, inputs["input_ids"].shape[1]:]
        answers += [t.strip() for t in tok.batch_decode(new, skip_special_tokens=True)]
        if progress:
            progress(len(chunk))
    return answers


def generate_answers(model, processor, rows: list[dict[str, Any]], image_px: int, batch_size: int,
                     generation, device: str, progress=None, fast: bool = True) -> list[str]:
    """Short answers to `rows` (dicts with `image` bytes and `question`), in row order.

    `fast=False` runs `generate_answers_reference`. Greedy answers are the same either way (tested
    on the tiny model); sampled ones draw in another order, since questions are sorted.
    """
    if not fast:
        return generate_answers_reference(model, processor, rows, image_px, batch_size, generation, device, progress)
    return generate_compared(model, {"model": nullcontext}, processor, rows, image_px, batch_size, generation,
                             device, progress=(lambda name, n: progress(n)) if progress else None)["model"]


def generate_compared(model, variants: dict[str, Callable[[], Any]], processor, rows: list[dict[str, Any]],
                      image_px: int, batch_size: int, generation, device: str, progress=None,
                      seconds: dict[str, float] | None = None,
                      features: "ImageFeatures | None" = None) -> dict[str, list[str]]:
    """Answers of several variants of ONE loaded model (e.g. `base` with the LoRA adapter disabled
    and `tuned` with it on), batch by batch: each batch's images are decoded, patchified and run
    through the vision tower once, and every variant generates from those image features. The
    tower is frozen (LoRA trains the language side only), so its output is the same for every
    variant, and computing it once is computing the same thing.

    `variants` maps a name to a context-manager factory entered around that variant's generation
    (`model.disable_adapter` for the base, `nullcontext` for the model as loaded). `progress(name,
    n)` is told of each batch; `seconds[name]` gets each variant's generation time (a wait for a
    batch's tower, where it has not finished in the background, is in the first variant's).
    `features`: an `ImageFeatures` already started for these rows (see `evaluate`, which starts
    it before the model loads); None starts one on this model's tower.
    """
    answers = {name: [None] * len(rows) for name in variants}
    if not rows:
        return answers  # type: ignore[return-value]
    import torch

    tok = processor.tokenizer
    tok.padding_side = "left"
    hook = _FastImageFeatures(model, device, compile=False)  # computes only what was not prefetched
    if features is not None and features.dtype != hook.visual.dtype:
        features.close()  # features of a tower in another dtype are not this model's: compute them here
        features = None
    own = features is None
    if own:
        features = ImageFeatures(hook.visual, processor, rows, image_px, batch_size, device)
    cuda = str(device).startswith("cuda")
    try:
        for k, idx in enumerate(features.batches):
            features.queue(k + 1)  # the next batch's tower runs (side stream) while this one generates
            pixels, grid, out = features.take(k)
            inputs = text_inputs(processor, [features.texts[i] for i in idx])
            inputs.update(pixel_values=pixels, image_grid_thw=grid)
            inputs = {name: v.to(device) for name, v in inputs.items()}
            hook.provide(inputs["pixel_values"], out)  # the tensor generate passes to the tower
            for name, enter in variants.items():
                t = time.perf_counter()
                with enter():
                    gen_out = _generate(model, inputs, generation, tok.pad_token_id)
                new = gen_out[:, inputs["input_ids"].shape[1]:]
                for i, text in zip(idx, tok.batch_decode(new, skip_special_tokens=True)):  # syncs
                    answers[name][i] = text.strip()
                if cuda:
                    torch.cuda.synchronize()
                if seconds is not None:
                    seconds[name] = seconds.get(name, 0.0) + time.perf_counter() - t
                if progress:
                    progress(name, len(idx))
            del pixels, out, inputs
    finally:
        hook.remove()
        if own:
            features.close()
    return answers  # type: ignore[return-value]


def compile_by_default(visual, image_px: int, questions: int, device: str) -> bool:
    """Whether the eval's tower compiles when `ImageFeatures(compile=None)`, on CUDA:

    * where this process compiled the tier-3 column's tower of the same configuration (the apply
      that just computed the column: its code is loaded, so the eval's warm-up is a layout
      recording and a graph capture);
    * where that compile is cached on disk and the eval has `COMPILE_FROM_CACHE_MIN_QUESTIONS`
      or more (a later apply, e.g. after a LoRA-only change: the new process loads the column's
      artefacts and inductor hits all 8 of its graphs, 4.4-5.2 s of warm-up at the 3B shape on an
      H100). At 400 questions, base and tuned, the compiled tower was then no slower from the
      tower's start to the last answer (22.0-23.0 s against 22.4-23.9 s eager), with a third of
      the GPU time (2.3 against 6.3-6.8 GPU-s), a faster load beside it and 13 GiB less peak
      memory, before its first batches went under the load (`ImageFeatures.start`);
    * or where the eval is large enough to pay a cold compile (`COMPILE_MIN_QUESTIONS`).

    Results: `examples/benchmarks/results/history/2026-12-08-h100-eval-cache/`. (Before 55175cf
    the cache folders could differ between processes, and a new process missed 6 of the 8 graphs;
    the eval then compiled only where the column had, in this process.)"""
    if not str(device).startswith("cuda"):
        return False
    if questions >= COMPILE_MIN_QUESTIONS:
        return True
    from ..vlm.compile_cache import cached, warmed_here

    parts = _TowerRunner.parts(visual, image_px)
    return warmed_here(parts) or (questions >= COMPILE_FROM_CACHE_MIN_QUESTIONS and cached(parts))


class ImageFeatures:
    """The vision tower's output for each batch of eval questions, computed ahead of generation.

    The questions are cut into prompt-length-sorted batches (`length_sorted_batches`). `queue(k)`
    starts batch k: its images are decoded and resized on a thread pool (two batches ahead), then
    copied to the device, patchified (`Patchifier`) and run through the tower (`_TowerRunner`); on
    CUDA all of that is queued on a side stream from pinned memory, so the GPU runs a batch's tower
    while the host goes on: the next batch's under the previous batch's generation, and the first
    batches' under the language model's load (`evaluate` calls `start` before loading it). `take(k)`
    returns `(pixel_values, grid_thw, output)` with the current stream ordered after that work.

    The tower may be a copy loaded on its own (`load_vision_tower`: the same checkpoint weights, in
    the model's dtype); the same code runs on the same batches either way, so the features are the
    ones the model's own tower would compute.

    Compiled (`compile`; None: `compile_by_default`), the tower is warmed up here, in the calling
    thread, and each batch's tower is then a few CUDA-graph launches (a short last sub-batch is
    padded to a full one's graph, since eager it would be ~1,000); the first batches' host work is
    started from a background thread under the load (`start`). The eager tower is ~1,000 kernel
    launches a batch: CUDA's launch queue fills and the launching thread waits for the GPU (py-spy,
    H100, 3B shape: 4.5 s of the LoRA-change eval's load). A background launcher did not help the
    eager tower: it then ran beside the load on the GPU and both slowed, 22.1 s from the tower's
    start to the last answer against 21.3 s (`eval_compare.json`), so an eager tower's first
    batches are queued from the calling thread.
    """

    AHEAD = 2
    """Batches decoded (and, before the first generation, run through the tower) ahead."""

    BACKGROUND_START = True
    """`start()` of a compiled tower on CUDA queues the first batches from a background thread."""

    def __init__(self, visual, processor, rows: list[dict[str, Any]], image_px: int, batch_size: int, device: str,
                 compile: bool | None = None):
        import torch

        from ..vlm.patchify import Patchifier

        self.rows, self.image_px, self.device = rows, image_px, str(device)
        self.visual = visual
        self.dtype = visual.dtype
        self.texts = prompt_texts(processor, [r["question"] for r in rows], image_px)
        self.batches = length_sorted_batches([len(ids) for ids in processor.tokenizer(self.texts)["input_ids"]],
                                             batch_size)
        self.cuda = self.device.startswith("cuda")
        if compile is None:
            compile = compile_by_default(visual, image_px, len(rows), self.device)
        self.tower = _TowerRunner(visual, self.device, compile=compile)
        self.patchify = Patchifier(processor.image_processor)
        self.stream = torch.cuda.Stream(torch.device(self.device)) if self.cuda else None
        self.pool = ThreadPoolExecutor(min(4, os.cpu_count() or 1), thread_name_prefix="vlmspec-eval-decode")
        self._decoding: dict[int, list[Future]] = {}
        self._ready: dict[int, tuple] = {}
        self._events: list[tuple] = []  # (start, end) CUDA events of each batch's tower
        self.decode_wait_s = 0.0  # host seconds `queue` waited for the decode threads
        self.start_wait_s = 0.0  # host seconds this thread waited for a background `start()`
        self.compute_parts = {"stack_s": 0.0, "pin_s": 0.0, "launch_s": 0.0}  # host seconds of `_compute`
        self._launcher: ThreadPoolExecutor | None = None
        self.started_in_background = False
        self._starting: Future | None = None
        for k in range(min(self.AHEAD, len(self.batches))):
            self._decode(k)
        self.warmup = self.tower.warm(self.patchify, image_px) if self.tower.compiled and rows else None

    def _decode(self, k: int) -> None:
        if k < len(self.batches) and k not in self._decoding and k not in self._ready:
            self._decoding[k] = _decode_batch(self.pool, self.rows, self.batches[k], self.image_px)

    def start(self, background: bool | None = None) -> None:
        """Queue the first `AHEAD` batches, before the language model's load (`evaluate`).

        Compiled on CUDA (`background` None: `BACKGROUND_START`), from one background thread: a
        batch's host work (stacking 256 decoded images, pinning and copying 240 MB, patchify and
        ~20 graph launches: 1.7 s for 317 questions, H100, `eval_compare.json`) then runs under the
        load instead of before it. Its GPU work is the compiled tower's (~1.9 GPU-s for 317
        images), so the load is not slowed as it was by the eager tower's (~5.5 GPU-s), which a
        background launcher made slower overall and which therefore queues here. The tower was
        warmed up (compiled, captured) in this thread already: a capture must not run beside the
        load's allocations. Nothing here makes a tensor from the default dtype, which transformers
        changes mid-load. `queue` and `take` wait for this start first; the wait is
        `start_wait_s`."""
        ks = range(min(self.AHEAD, len(self.batches)))
        if background is None:
            background = self.BACKGROUND_START and self.cuda and self.tower.compiled
        if not background:
            for k in ks:
                self._queue(k)
            return
        self.started_in_background = True
        self._launcher = ThreadPoolExecutor(1, thread_name_prefix="vlmspec-eval-tower")
        self._starting = self._launcher.submit(lambda: [self._queue(k) for k in ks])

    def _join_start(self) -> None:
        if self._starting is None:
            return
        starting, self._starting = self._starting, None
        t = time.perf_counter()
        try:
            starting.result()
        finally:
            self.start_wait_s += time.perf_counter() - t
            self._launcher.shutdown(wait=True)
            self._launcher = None

    def queue(self, k: int) -> None:
        """Start batch `k` (no-op past the end or when already started)."""
        self._join_start()
        self._queue(k)

    def _queue(self, k: int) -> None:
        if k >= len(self.batches) or k in self._ready:
            return
        self._decode(k)
        decoding = self._decoding.pop(k)
        self._decode(k + self.AHEAD - 1)
        self._ready[k] = self._compute(decoding)

    def _compute(self, decoding: list[Future]) -> tuple:
        import torch

        parts = self.compute_parts
        t0 = time.perf_counter()
        decoded = [f.result() for f in decoding]
        t1 = time.perf_counter()
        u8 = torch.from_numpy(np.stack(decoded))
        t2 = time.perf_counter()
        with torch.inference_mode(), (torch.cuda.stream(self.stream) if self.cuda else nullcontext()):
            if self.cuda:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                u8 = u8.pin_memory().to(self.device, non_blocking=True)
            t3 = time.perf_counter()
            pixels, grid = self.patchify(u8)
            out = self.tower(pixels, grid)  # grid is on the host: splitting the output needs no sync
            out.last_hidden_state = None  # the model reads the merged tokens only; drop the per-patch states
            if self.cuda:
                end.record()
                self._events.append((start, end))
        self.decode_wait_s += t1 - t0
        parts["stack_s"] += t2 - t1
        parts["pin_s"] += t3 - t2  # pinning and queueing the copy
        parts["launch_s"] += time.perf_counter() - t3  # patchify and the tower, queued
        return pixels, grid, out, end if self.cuda else None

    @property
    def compiled(self) -> bool:
        return self.tower.compiled

    def take(self, k: int) -> tuple[Any, Any, Any]:
        """Batch `k`'s `(pixel_values, grid_thw, output)`, queued first if it was not."""
        import torch

        self.queue(k)
        pixels, grid, out, done = self._ready.pop(k)
        if done is not None:
            current = torch.cuda.current_stream(torch.device(self.device))
            current.wait_event(done)
            for t in (pixels, *out.pooler_output):
                t.record_stream(current)  # made on the side stream, used and freed on this one
        return pixels, grid, out

    def tower_seconds(self) -> float | None:
        """GPU seconds the batches' copy, patchify and tower took (CUDA events; None on CPU)."""
        if not self.cuda or not self._events:
            return None
        self._events[-1][1].synchronize()
        return round(sum(a.elapsed_time(b) for a, b in self._events) / 1e3, 2)

    def close(self) -> None:
        try:
            self._join_start()
        except Exception:  # noqa: BLE001 - closing after a failure: the failure was raised where it mattered
            pass
        self.pool.shutdown(wait=True, cancel_futures=True)
        self._ready.clear()
        self._decoding.clear()


def prompt_texts(processor, questions: list[str], image_px: int) -> list[str]:
    """The chat prompts with the image pad expanded to the image's token count, as the processor
    expands it for a `image_px` square."""
    from ..vlm.prompt import expand_image_pads, prompt_text

    ip = processor.image_processor
    tokens = (image_px // (int(ip.patch_size) * int(ip.merge_size))) ** 2
    return [expand_image_pads(prompt_text(processor, q), tokens) for q in questions]


def text_inputs(processor, texts: list[str]) -> dict[str, Any]:
    """`input_ids`, `attention_mask` and `mm_token_type_ids` for expanded prompts, left-padded:
    the processor's text half (tested equal to a full processor call)."""
    import torch

    enc = dict(processor.tokenizer(texts, return_tensors="pt", padding=True))
    enc["mm_token_type_ids"] = torch.tensor(processor.create_mm_token_type_ids(enc["input_ids"].tolist()),
                                            dtype=enc["input_ids"].dtype)
    return enc


def length_sorted_batches(lengths: list[int], batch_size: int) -> list[list[int]]:
    """Row indices in batches of `batch_size`, longest prompts first (a stable sort, so equal
    lengths keep row order): a batch pads to lengths near its own, and the widest batch runs first,
    so running out of memory shows at once."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    return [order[s:s + batch_size] for s in range(0, len(order), batch_size)]


def _decode_batch(pool: ThreadPoolExecutor, rows: list[dict[str, Any]], idx: list[int], image_px: int) -> list[Future]:
    return [pool.submit(_decode, rows[i], image_px) for i in idx]


def _decode(row: dict[str, Any], image_px: int) -> np.ndarray:
    from ..vlm.prompt import resize_image

    return np.asarray(resize_image(row["image"], image_px), dtype=np.uint8)


class _TowerRunner:
    """`FastTower` on `visual`, called like `get_image_features`'s tower: pixel values cast to the
    tower's dtype, and `pooler_output` split per image.

    With `compile` (CUDA only) it runs as the tier-3 column runs by default: compiled, in
    sub-batches of `CUDA_SUB_BATCH` images each replayed as one CUDA graph, under the column's
    compile-cache key (`parts`), so the column's compile in this process is this one's too. A
    graph's outputs are overwritten by its next replay, so each sub-batch's merged tokens are copied
    out into the batch's own tensor. A failing compile warns once and runs it eager, which computes
    the same."""

    def __init__(self, visual, device: str, compile: bool = False):
        self.visual = visual
        self.merge_unit = int(visual.spatial_merge_size) ** 2
        self.compiled = bool(compile) and str(device).startswith("cuda")
        self._fast = None  # made on first use

    @staticmethod
    def parts(visual, image_px: int) -> dict[str, Any]:
        """The compile-cache key of the compiled runner: the column's default for this tower."""
        from ..vlm.compile_cache import tower_parts
        from ..vlm.fast_tower import CUDA_SUB_BATCH

        return tower_parts(visual, visual.dtype, image_px, {CUDA_SUB_BATCH}, True, True)

    @property
    def fast(self):
        if self._fast is None:
            from ..vlm.fast_tower import CUDA_SUB_BATCH, FastTower

            self._fast = FastTower(self.visual, compile=self.compiled, compile_sizes={CUDA_SUB_BATCH},
                                   graph=self.compiled)
        return self._fast

    def warm(self, patchify, image_px: int) -> dict[str, Any]:
        """Compile (or load the cached compile) and capture now, on one sub-batch of blank images;
        returns the compile cache's stats (`Warmup.stats`)."""
        import torch

        from ..vlm.compile_cache import Warmup
        from ..vlm.fast_tower import CUDA_SUB_BATCH

        device = next(self.visual.parameters()).device
        with Warmup(self.parts(self.visual, image_px)) as warm, torch.inference_mode():
            zeros = torch.zeros((CUDA_SUB_BATCH, image_px, image_px, 3), dtype=torch.uint8, device=device)
            for _ in range(2):  # records the layout, compiles and captures; the second call replays
                self(*patchify(zeros))
            torch.cuda.synchronize(device)
        return warm.stats

    def __call__(self, pixel_values, grid_thw):
        import torch
        from transformers.modeling_outputs import BaseModelOutputWithPooling

        from ..vlm.fast_tower import CUDA_SUB_BATCH

        px = pixel_values.type(self.visual.dtype)
        grid = torch.as_tensor(grid_thw)
        per_image = grid.prod(-1)
        sizes = (per_image // self.merge_unit).tolist()
        if not self.compiled:
            out = self._forward(px, grid)
        else:
            patches = per_image.tolist()
            merged, p0, m0 = None, 0, 0
            for i in range(0, len(sizes), CUDA_SUB_BATCH):
                n_px, n_m = sum(patches[i:i + CUDA_SUB_BATCH]), sum(sizes[i:i + CUDA_SUB_BATCH])
                x, g = px[p0:p0 + n_px], grid[i:i + CUDA_SUB_BATCH]
                pad = CUDA_SUB_BATCH - len(g)
                if pad and bool((g == g[-1]).all()):
                    # A short tail runs as a full sub-batch (blank images, their tokens dropped: every
                    # image attends only within itself): one graph launch instead of ~1,000 eager
                    # ones, which would fill CUDA's launch queue and hold this thread.
                    x = torch.cat([x, x.new_zeros((pad * patches[i + len(g) - 1], x.shape[1]))])
                    g = torch.cat([g, g[-1:].expand(pad, -1)])
                part = self._forward(x, g).pooler_output[:n_m]
                if merged is None:
                    merged = part.new_empty((sum(sizes), part.shape[-1]))
                merged[m0:m0 + n_m].copy_(part)  # queued before the next replay overwrites `part`
                p0, m0 = p0 + n_px, m0 + n_m
            out = BaseModelOutputWithPooling(last_hidden_state=None, pooler_output=merged)
        out.pooler_output = torch.split(out.pooler_output, sizes)
        return out

    def _forward(self, px, grid):
        try:
            return self.fast(px, grid)
        except Exception as e:  # noqa: BLE001 - inductor/triton missing or broken: eager is still correct
            if not self.compiled:
                raise
            warnings.warn(f"eval vision tower: torch.compile failed ({type(e).__name__}: {e}); running it uncompiled")
            from ..vlm.fast_tower import FastTower

            self.compiled = False
            self._fast = FastTower(self.visual, compile=False)
            return self._fast(px, grid)


class _FastImageFeatures:
    """Installs `FastTower` as this model's image encoder (an instance attribute on its
    `Qwen2_5_VLModel`, shadowing the class method) until `remove()`. Pixel values named by
    `provide` get the features computed for them ahead (`ImageFeatures`); others are computed here."""

    def __init__(self, model, device: str, compile: bool = True):
        from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VLModel

        inner = next((m for m in model.modules() if isinstance(m, Qwen2_5_VLModel)), None)
        if inner is None:
            raise TypeError(f"expected a Qwen2.5-VL model, got {type(model).__name__}")
        self.inner = inner
        self.visual = inner.visual
        self.tower = _TowerRunner(self.visual, device, compile=compile)
        self._provided: tuple | None = None  # (pixel_values, output) of the batch `provide` named
        inner.get_image_features = self._features

    @property
    def compiled(self) -> bool:
        return self.tower.compiled

    @property
    def fast(self):
        return self.tower.fast

    def provide(self, pixel_values, output) -> None:
        """Calls with this very `pixel_values` tensor get `output` (computed for it ahead)."""
        self._provided = (pixel_values, output)

    def _features(self, pixel_values, image_grid_thw=None, **kwargs):
        """`Qwen2_5_VLModel.get_image_features` through FastTower: same output object."""
        provided = self._provided
        if provided is not None and provided[0] is pixel_values:
            return provided[1]
        return self.tower(pixel_values, image_grid_thw)

    def remove(self) -> None:
        self._provided = None
        self.inner.__dict__.pop("get_image_features", None)
