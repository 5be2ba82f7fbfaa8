"""Tier-3 builtin `vlm.vision_tower`: cached vision-tower hiddens, fp16 [tokens x hidden] per row.

Images are decoded and resized through `vlmspec.runtime.vlm.prompt`, the single definition shared
with training and evaluation. torch and transformers are imported inside the class, so importing
this module stays cheap. A bad row raises `ValueError` naming the row; the engine applies the
column's `on_error` policy. The model itself lives in `runtime/vlm/` (`models`, `fast_tower`).
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import pyarrow as pa

from vlmspec.compiler.udf import udf

from .base import UdfContext, as_array, open_image, tuning_of

__all__ = ["VisionTower"]


# 256 rows a call: the UDF runs them as sub-batches of 16 so decode overlaps the tower, and fewer
# calls mean fewer pipeline drains (tier-3 bench: 94 rows/s at 64, 100 at 256). A `None` knob
# default means the class picks by device (`_setup_fast_path`).
@udf(name="vlm.vision_tower", inputs=["image"], accepts=["binary"],
     output="fixed_size_list<item: halffloat>[{image_tokens*hidden_size}]", shape="fp16[{image_tokens}x{hidden_size}]",
     batch_size=256, model=True, gpu=True, version="c7499cacfd8da77d",
     tuning={"sub_batch": {"type": "int", "default": None, "min": 0, "max": 65536,
                           "doc": "rows per tower forward inside a call, 0 for the whole call; default 16 on CUDA "
                                  "(decode overlaps the tower), 0 on CPU"},
             "decode_threads": {"type": "int", "default": None, "min": 1, "max": 256,
                                "doc": "threads decoding and resizing images; default min(4, cores)"},
             "compile": {"type": "bool", "default": True,
                         "doc": "torch.compile the tower on CUDA: 2.3x, equal to HF's up to bf16 rounding; "
                                "false gives HF's bits"},
             "graph": {"type": "bool", "default": True,
                       "doc": "replay the compiled tower as one CUDA graph per sub-batch: one launch instead of ~600"},
             "fast": {"type": "bool", "default": True,
                      "doc": "FastTower's batched window attention; false runs HF's tower as it is"}})
class VisionTower:
    """Merged vision-tower hidden states of `model.image_px`-square images, fp16 [tokens x hidden].

    Loads only the tower (never the language model) once; each call decodes and resizes the batch
    with `prompt.resize_image`, runs the image processor and ONE tower forward for the batch, and
    returns a fixed-size list per row, row-major [tokens, hidden].
    """

    def __init__(self, ctx: UdfContext):
        import time

        import torch

        from vlmspec.runtime.vlm import models

        t0 = time.perf_counter()
        if ctx.model is None:
            raise ValueError(f"`{ctx.column}`: vlm.vision_tower needs a `model` section")
        self.ctx = ctx
        self.spec = ctx.model
        self.image_px = int(self.spec.image_px)
        self.device = ctx.device
        self.dtype = models.resolve_dtype(getattr(self.spec, "dtype", "auto"), self.device)
        self.image_processor = models.load_model_processor(self.spec).image_processor
        t1 = time.perf_counter()
        self.tower = models.load_vision_tower(self.spec, self.device, self.dtype)
        t2 = time.perf_counter()
        cfg = self.tower.config
        self.hidden_size = int(cfg.out_hidden_size)
        self.patches = self.image_px // cfg.patch_size
        self.merge = int(cfg.spatial_merge_size)
        self.tokens = (self.patches // self.merge) ** 2
        size = self.tokens * self.hidden_size
        out = ctx.output_type
        if not pa.types.is_fixed_size_list(out) or out.list_size != size or out.value_type != pa.float16():
            raise ValueError(f"`{ctx.column}`: output type {out} does not match the model "
                             f"({self.tokens} tokens x {self.hidden_size} hidden, float16)")
        self._torch = torch
        self._setup_fast_path()
        # Where the column's set-up time goes (the run record keeps it: `vlmspec bench apply`
        # reports it beside the compile cache's warm/cold start).
        self.stats["setup"] = {"processor_s": round(t1 - t0, 2), "tower_load_s": round(t2 - t1, 2),
                               "fast_path_s": round(time.perf_counter() - t2, 2)}

    # -- speed: batched window attention, optional compile, CPU/GPU overlap ---------------------
    # None of this changes what is computed: FastTower replays HF's own tower arithmetic (one
    # SDPA call over equal-length chunks instead of one call per chunk; tested equal), decode and
    # resize are the same calls as evaluation's, only run in a thread pool, and `Patchifier` is the
    # image processor's own arithmetic as tensor ops (tested bitwise equal to it).

    def _setup_fast_path(self) -> None:
        import os

        from vlmspec.runtime.vlm.fast_tower import CUDA_SUB_BATCH, FastTower
        from vlmspec.runtime.vlm.patchify import Patchifier

        knobs = tuning_of(self.ctx, VisionTower)  # the column's `tuning:` over the declared defaults
        cuda = str(self.device).startswith("cuda")
        default_sub = CUDA_SUB_BATCH if cuda else 0  # 0: the whole batch at once (CPU gains nothing from overlap)
        self.sub_batch = int(default_sub if knobs["sub_batch"] is None else knobs["sub_batch"])
        # Compiled by default on CUDA: 2.3x the eager FastTower at the 3B shape (`vlmspec bench gpu
        # --phases tower`) for ~5 s of compiling once per process.
        compile_ = cuda and bool(knobs["compile"])
        # The compiled tower is also replayed as one CUDA graph per sub-batch: its ~600 kernel
        # launches each needed the GIL, which the decode threads hold in short stretches, and
        # the GPU waited on those launches (a profile of the UDF: 88 % kernel-busy, the gaps inside
        # the compiled blocks). `tuning: {graph: false}` keeps it uncaptured.
        graph = compile_ and bool(knobs["graph"])
        self.fast = None
        if knobs["fast"]:
            sizes = {self.sub_batch or int(getattr(self.ctx, "batch_size", 16))}
            self.fast = FastTower(self.tower, compile=compile_, compile_sizes=sizes, graph=graph)
        # 4 decode threads keep up with the tower (~190 rows/s at 560 px on an H200); more only
        # contend for the GIL with the thread launching the tower's kernels (UDF alone, 16 threads:
        # 161.5 rows/s, GPU 84 % busy; 4 threads: 171.3 rows/s, 88 %; `gpu_tier3.json`).
        threads = int(knobs["decode_threads"] or min(4, os.cpu_count() or 1))
        self._pool = None
        if threads > 1:
            from concurrent.futures import ThreadPoolExecutor

            self._pool = ThreadPoolExecutor(threads, thread_name_prefix="vlmspec-decode")
        self._pin = cuda
        self.patchify = Patchifier(self.image_processor)
        # Two uint8 staging batches: one feeds the tower while the next call's rows decode into the
        # other (`prefetch`); each has an event marking its last host-to-device copy.
        self._stages: list = [None, None]
        self._stage_done: list = [None, None]
        self._ahead: list[_Decoding] = []  # batches whose decoding has started, oldest first
        self.stats = {"calls": 0, "call_s": 0.0, "alloc_s": 0.0}  # for `vlmspec bench gpu --phases tier3`
        if cuda and self.fast is not None:
            from vlmspec.runtime.vlm.compile_cache import Warmup, tower_parts

            # Keyed by what changes the compiled code (the cache adds torch, Triton and the GPU), so a
            # second apply of this column, in a new process, loads the artefacts instead of compiling
            # (the eval's tower uses the same key: `eval.generate.compile_by_default`).
            parts = tower_parts(self.tower, self.dtype, self.image_px, sizes, compile_, graph)
            with Warmup(parts) as warm:
                self._warm(compile_, sizes)
            self.stats["warmup"] = warm.stats

    def _warm(self, compiled: bool, sizes: set[int]) -> None:
        """Record the tower's layout and compile it now (set-up, not the first batch's time); a tower
        that fails to compile runs the eager fast path instead."""
        import warnings

        from vlmspec.runtime.vlm.fast_tower import FastTower

        zeros = self._torch.zeros((next(iter(sizes)), self.image_px, self.image_px, 3), dtype=self._torch.uint8)
        try:
            for _ in range(2):  # records the layout, compiles and captures; the second call is a plain replay
                self._tower(zeros)
        except Exception as e:  # noqa: BLE001 - inductor/triton missing or broken: eager is still correct
            if not compiled:
                raise
            warnings.warn(f"vision tower: torch.compile failed ({type(e).__name__}: {e}); running it "
                          "uncompiled (set the column's `tuning: {compile: false}` to skip trying)")
            self.fast = FastTower(self.tower, compile=False)
            self._tower(zeros)
        self._torch.cuda.synchronize()

    def _decode(self, values: list, start: int, stop: int) -> list:
        """Rows [start, stop) decoded and resized exactly as evaluation does; a bad row raises naming it."""
        from vlmspec.runtime.vlm.prompt import resize_image

        pil = []
        for i in range(start, stop):
            v = values[i]
            if v is None:
                raise ValueError(f"row {i}: image is null")
            try:
                # Decoded by open_image, so a bomb-sized image is this row's error, not an OOM.
                pil.append(resize_image(open_image(v), self.image_px))
            except Exception as e:  # noqa: BLE001 - any decode failure is this row's error
                raise ValueError(f"row {i}: cannot decode image: {e}") from e
        return pil

    def _stage(self, slot: int, n: int):
        """Staging batch `slot` as uint8 [n, px, px, 3] (pinned when the tower is on CUDA), reused across calls."""
        torch = self._torch
        if self._stage_done[slot] is not None:  # an earlier call's host-to-device copies read this buffer
            self._stage_done[slot].synchronize()
            self._stage_done[slot] = None
        if self._stages[slot] is None or self._stages[slot].shape[0] < n:
            self._stages[slot] = torch.empty((n, self.image_px, self.image_px, 3), dtype=torch.uint8,
                                             pin_memory=self._pin)
        return self._stages[slot][:n]

    def _start(self, images) -> "_Decoding":
        """Start decoding `images` into a free staging slot (on the thread pool when there is one)."""
        values = as_array(images).to_pylist() if isinstance(images, (pa.Array, pa.ChunkedArray)) else list(images)
        busy = {d.slot for d in self._ahead}
        slot = 0 if 0 not in busy else 1
        stage = self._stage(slot, len(values))
        futures = None
        if self._pool is not None and len(values) > 1:
            futures = [self._pool.submit(self._decode_into, values, i, stage[i]) for i in range(len(values))]
        return _Decoding(images, slot, values, stage, futures)

    def prefetch(self, images: pa.Array) -> None:
        """Start decoding the batch the next call will get, while this one runs (the engine calls it)."""
        if self._pool is None:
            return
        self._keep_latest()  # the batch about to run; older ones were never called
        self._ahead.append(self._start(images))

    def _keep_latest(self) -> None:
        """Drop all but the newest batch decoding ahead (so one staging slot is free)."""
        while len(self._ahead) > 1:
            self._ahead.pop(0).drop()

    def _decode_into(self, values: list, i: int, slot) -> None:
        """Row i decoded and resized (as evaluation does) into its uint8 [px, px, 3] staging slot."""
        img = self._decode(values, i, i + 1)[0]
        slot.numpy()[...] = np.asarray(img, dtype=np.uint8)  # into the (pinned) slot, no temporary tensor

    def _tower(self, u8):
        """Tower outputs for a uint8 [b, px, px, 3] batch: to the device, patchify there, forward."""
        torch = self._torch
        with torch.inference_mode():
            u8 = u8.to(self.device, non_blocking=True)
            pixels, grid = self.patchify(u8)
            px = pixels.to(self.dtype)
            if self.fast is not None:
                return self.fast(px, grid).pooler_output
            return self.tower(px, grid_thw=grid.to(self.device)).pooler_output

    def encode(self, images: pa.Array | list) -> Any:
        """Tower outputs [B, tokens, hidden] in the tower's dtype (before the fp16 cast)."""
        outs = []
        # clone: a CUDA-graph tower returns its static output, which the next sub-batch overwrites
        n = self._run(images, lambda start, out: outs.append(out.clone()))
        out = self._torch.cat(outs) if len(outs) > 1 else outs[0]
        return out.reshape(n, self.tokens, self.hidden_size)

    def _run(self, images: pa.Array | list, emit) -> int:
        """Run the batch through the tower, calling `emit(start_row, outputs)` per sub-batch as soon
        as its kernels are queued; returns the row count.

        Each row is decoded and resized by a thread-pool task into a pinned uint8 batch (Pillow
        releases the GIL for both), started by `prefetch` during the previous call when the engine
        gave it this batch; each sub-batch then goes to the device as uint8 (a quarter of
        float32's bytes), is rescaled, normalized and patchified there (`Patchifier`, the image
        processor's arithmetic) and runs the tower while later rows still decode (kernel
        launches are asynchronous). A bad row raises the same `row i: ...` error as a
        sequential loop (the first bad row in order).
        """
        torch = self._torch
        job = next((d for d in self._ahead if d.images is images), None)
        if job is not None:  # decoding since the last call; batches prefetched before it were never called
            i = self._ahead.index(job)
            for d in self._ahead[:i]:
                d.drop()
            self._ahead = self._ahead[i + 1:]
        else:  # not prefetched (first batch of a chunk, a retried slice): keep what was prefetched next
            self._keep_latest()
            job = self._start(images)
        n, stage = len(job.values), job.stage
        try:
            if job.futures is None:
                for i in range(n):
                    self._decode_into(job.values, i, stage[i])
                emit(0, self._tower(stage))
            else:
                sub = self.sub_batch or n
                for s in range(0, n, sub):
                    with torch.profiler.record_function("vlmspec.decode_wait"):  # named in GPU traces
                        for f in job.futures[s:s + sub]:
                            f.result()
                    emit(s, self._tower(stage[s:s + sub]))
        finally:
            job.drop()  # no task may still write into the staging buffer a later call reuses
        if self._pin:
            self._stage_done[job.slot] = torch.cuda.Event()
            self._stage_done[job.slot].record()
        return n

    def encode_reference(self, images: pa.Array | list) -> Any:
        """`encode` the plain way (HF's tower, one thread, one processor call): what the fast
        path is tested against."""
        from vlmspec.runtime.vlm.prompt import image_processor_kwargs

        torch = self._torch
        values = as_array(images).to_pylist() if isinstance(images, (pa.Array, pa.ChunkedArray)) else list(images)
        pil = self._decode(values, 0, len(values))
        batch = self.image_processor(images=pil, return_tensors="pt", **image_processor_kwargs(self.image_px))
        grid = batch["image_grid_thw"]
        expected = torch.tensor([1, self.patches, self.patches])
        if not bool((grid == expected).all()):
            raise ValueError(f"image processor produced grids {grid.tolist()}, expected {expected.tolist()}")
        with torch.inference_mode():
            out = self.tower(batch["pixel_values"].to(self.device, self.dtype), grid_thw=grid.to(self.device))
        return out.pooler_output.reshape(len(pil), self.tokens, self.hidden_size)

    def __call__(self, images: pa.Array) -> pa.Array:
        torch = self._torch
        n = len(images)
        if n == 0:
            return pa.array([], type=self.ctx.output_type)
        t0 = time.perf_counter()
        # Each sub-batch's fp16 result is copied to pinned host memory as soon as it is computed
        # (asynchronously, overlapping the next sub-batch's tower), so the call ends with one
        # short copy instead of a whole-batch device-to-host transfer while the GPU idles. The
        # buffer is fresh (torch's pinned-memory cache hands back freed ones) and becomes the Arrow
        # column's memory as it is: no host copy.
        host = torch.empty((n, self.tokens, self.hidden_size), dtype=torch.float16, pin_memory=self._pin)
        self.stats["alloc_s"] += time.perf_counter() - t0
        finite = torch.empty(n, dtype=torch.bool, device=self.device)

        def emit(start: int, out) -> None:
            f16 = out.reshape(-1, self.tokens, self.hidden_size).to(torch.float16)
            finite[start:start + len(f16)] = torch.isfinite(f16).flatten(1).all(dim=1)
            host[start:start + len(f16)].copy_(f16, non_blocking=self._pin)

        self._run(images, emit)
        if self._pin:
            with torch.profiler.record_function("vlmspec.output_sync"):
                torch.cuda.current_stream().synchronize()
        ok = finite.cpu().numpy()
        if not ok.all():
            i = int(np.flatnonzero(~ok)[0])
            raise ValueError(f"row {i}: vision hiddens overflow float16 (non-finite after the cast)")
        # Wrapped without conversion (pa.array() on float16 numpy converts value by value, ~0.5 GB/s);
        # the Arrow buffer keeps the tensor, and so its pinned block, alive until the column is written.
        flat = host.numpy().reshape(-1)
        values = pa.Array.from_buffers(pa.float16(), flat.size, [None, pa.py_buffer(flat)])
        self.stats["calls"] += 1
        self.stats["call_s"] += time.perf_counter() - t0
        return pa.FixedSizeListArray.from_arrays(values, type=self.ctx.output_type)

    def field_metadata(self) -> dict[str, str]:
        return {
            "vlmspec.grid_thw": f"1,{self.patches},{self.patches}",
            "vlmspec.hidden_size": str(self.hidden_size),
            "vlmspec.image_px": str(self.image_px),
            "vlmspec.image_tokens": str(self.tokens),
            "vlmspec.layout": "row-major [tokens, hidden]",
        }

    def close(self) -> None:
        for d in self._ahead:
            d.drop()
        self._ahead = []
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None
        if self.fast is not None:  # how its calls ran (HF / fast / compiled / graph replays), kept for benchmarks
            self.stats["tower_calls"] = dict(self.fast.stats)
        self.tower = None
        self.fast = None
        if self.device.startswith("cuda"):
            self._torch.cuda.empty_cache()


class _Decoding:
    """One batch's rows being decoded into staging slot `slot` (futures None: decoded inline)."""

    def __init__(self, images, slot: int, values: list, stage, futures):
        self.images, self.slot, self.values, self.stage, self.futures = images, slot, values, stage, futures

    def drop(self) -> None:
        """Cancel what has not started and wait for what has: nothing writes into the slot after this."""
        for f in self.futures or ():
            f.cancel()
        for f in self.futures or ():
            if not f.cancelled():
                f.exception()
        self.futures = None
