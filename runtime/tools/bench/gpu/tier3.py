"""Phase `tier3`: rows/s of the `vision_tower_hiddens` + `sft_tokens` backfill through vlmspec's engine
(decode, preprocess, tower, write to Lance) and of the VisionTower UDF alone, against the bare tower
forward rate on pre-made pixels, with GPU busy % sampled (needs pylance). Writes `gpu_tier3.json`.

The tower has random weights: it is built here and handed to the UDF in place of the checkpoint
loader (`models.load_vision_tower`), which is restored when the phase ends.
"""

from __future__ import annotations

import datetime
import json
import math
import os
import shutil
import statistics
import time
from pathlib import Path
from typing import Any

from ..common import load
from ._common import SHAPES, GpuBusy, Phase, build_tower, grid_of, measure, model_dir, pixels, rel_l2, sync


def _gen_rows(args):
    # module level: the spawn pool pickles it by name
    start, n, px = args
    import pyarrow as pa

    from vlmspec.runtime.sources.synthetic import generate

    return pa.Table.from_batches(list(generate(n, seed=0, image_px=px, start=start, batch_rows=n)))


def synthetic_rows(rows: int, unique: int, image_px: int, procs: int):
    """`rows` TextVQA-shaped rows at `image_px` (JPEG), the first `unique` generated in parallel
    and then repeated (decode cost is per row, not per unique image)."""
    import multiprocessing

    import pyarrow as pa

    unique = min(unique, rows)
    per = max(1, math.ceil(unique / procs))
    jobs = [(s, min(per, unique - s), image_px) for s in range(0, unique, per)]
    with multiprocessing.get_context("spawn").Pool(min(procs, len(jobs))) as pool:
        parts = pool.map(_gen_rows, jobs)
    base = pa.concat_tables(parts)
    reps = [base] * (rows // unique) + ([base.slice(0, rows % unique)] if rows % unique else [])
    t = pa.concat_tables(reps).combine_chunks()
    import numpy as np

    return t.set_column(0, "id", pa.array(np.arange(rows, dtype=np.int64)))


def _write_table(ph: Phase, ctx: dict[str, Any], work: Path):
    """The synthetic table, written to `work/tier3.lance`; returns (table, uri, rows per fragment)."""
    import pyarrow as pa

    import lance

    rows, px_size = ctx["rows"], SHAPES[ctx["shape"]]["image_px"]
    d = ph.res.details
    t = time.perf_counter()
    table = synthetic_rows(rows, min(rows, ctx["unique"]), px_size, ctx["procs"])
    d["generate_s"] = round(time.perf_counter() - t, 1)
    d["jpeg_bytes_mean"] = int(pa.compute.mean(pa.compute.binary_length(table.column("image"))).as_py())
    uri = str(work / "tier3.lance")
    shutil.rmtree(uri, ignore_errors=True)
    frag_rows = max(min(1024, rows // 4), 64)  # the product default (1,024) at real sizes
    d["rows_per_fragment"] = frag_rows
    lance.write_dataset(table, uri, max_rows_per_file=frag_rows)
    ph.log("table", f"{rows} rows, {d['jpeg_bytes_mean']} B/JPEG, generated in {d['generate_s']} s")
    return table, uri, frag_rows


def _bare_tower(ph: Phase, ctx: dict[str, Any], tower) -> float | None:
    """(1) bare tower on pre-made pixels, same sub-batch and compile setting as the UDF: the ceiling."""
    import torch

    from vlmspec.runtime.vlm.fast_tower import FastTower

    shape, device, dtype, sub = ctx["shape"], ctx["device"], ctx["dtype"], ctx["sub_batch"]
    d = ph.res.details
    fast = FastTower(tower, compile=ctx["compile"], allow_cpu_compile=ctx["compile"])
    pxs = pixels(shape, sub, device, dtype, seed=5)
    grid = torch.tensor([grid_of(shape)] * sub)

    def bare():
        with torch.inference_mode():
            return fast(pxs, grid).pooler_output
    bare()
    bare_rate = measure(ph, "tier3_bare_tower", f"bare tower forward on pre-made pixels, batch {sub}", sub, bare,
                        device, unit="rows/s", warmup=3, target_s=2.0)
    with GpuBusy() as busy:  # what NVML reads when the GPU only ever runs the tower
        t = time.perf_counter()
        while time.perf_counter() - t < 3.0:
            bare()
        sync(device)
    ph.res.figures["tier3_bare_tower"].extra["gpu_busy_pct"] = [busy.mean()]
    if ctx["compile"] and str(device).startswith("cuda"):  # the same, replayed as a CUDA graph (the UDF's way)
        graphed = FastTower(tower, compile=True, graph=True)

        def bare_graph():
            with torch.inference_mode():
                return graphed(pxs, grid).pooler_output
        bare_graph()  # records the layout (HF's own forward); the next call captures and replays
        want = bare().clone()
        got = bare_graph().clone()
        d["graph_vs_compiled_max_abs"] = float((got.float() - want.float()).abs().max())
        d["graph_captured"] = graphed.stats["graph_calls"] > 0
        measure(ph, "tier3_bare_tower_graph", f"bare tower forward on pre-made pixels, batch {sub}, "
                "one CUDA graph", sub, bare_graph, device, unit="rows/s", warmup=3, target_s=2.0)
    return bare_rate


def _engine_calls(udf, parts):
    """The UDF called as the engine calls it: the next batch starts decoding before each call."""
    def go():
        for k, part in enumerate(parts):
            if k + 1 < len(parts):
                udf.prefetch(parts[k + 1])
            udf(part)
    return go


def _udf_alone(ph: Phase, ctx: dict[str, Any], images, spec, out_type):
    """(2) the VisionTower UDF alone on in-memory JPEG rows (decode, preprocess, tower, fp16 Arrow),
    for each decode thread count asked for; leaves the fastest set for the end-to-end run and
    returns its figure."""
    from vlmspec.runtime.udfs.base import UdfContext
    from vlmspec.runtime.udfs.vision import VisionTower

    device, batch, sub = ctx["device"], ctx["tier3_batch"], ctx["sub_batch"]
    d = ph.res.details
    # The UDF alone runs on at most 6,144 rows (its rate is steady well before); the end-to-end
    # run below takes the whole table.
    udf_rows = min(ctx["rows"], 6144)
    d["udf_rows"] = udf_rows
    slices = [images.slice(start, batch) for start in range(0, udf_rows, batch)]
    threads = ctx.get("tower_threads") or [0]  # 0: the UDF's default
    d["tower_threads"] = threads
    udf_figs = {}
    def use_threads(th: int) -> None:  # read by VisionTower when it is built
        ctx["tuning"]["decode_threads"] = th or None  # None: the UDF's default

    for th in threads:
        use_threads(th)
        udf = VisionTower(UdfContext("vision_tower_hiddens", out_type, {}, spec, device, batch, dict(ctx["tuning"])))
        udf(slices[0])  # warm: pinned buffers
        udf_all = _engine_calls(udf, slices)
        key = "tier3_udf" if th == threads[0] else f"tier3_udf_t{th}"
        how = f"{udf._pool._max_workers if udf._pool else 1} decode threads"
        fig = udf_figs[th] = ph.res.figure(
            key, f"VisionTower UDF on in-memory JPEGs (engine batch {batch}, sub-batch {sub}, {how})",
            "rows/s", higher_is_better=True, gpu_busy_pct=[])
        for _ in range(ctx["repeats"]):
            lb = load()
            with GpuBusy() as busy:
                t = time.perf_counter()
                udf_all()
                sync(device)
                sec = time.perf_counter() - t
            fig.add(udf_rows / sec, lb, load())
            fig.extra["gpu_busy_pct"].append(busy.mean())
        ph.log(key, f"{fig.median:.1f} rows/s, GPU busy {fig.extra['gpu_busy_pct']} ({how})")
        if th == threads[0] and str(device).startswith("cuda"):
            # Why the UDF's GPU is not always busy: its host syncs per call, and the gaps between
            # its kernels over three calls with what the launching thread did meanwhile.
            from ..gpu_trace import kernel_gaps, sync_sites

            try:
                d["udf_sync_sites_per_3_calls"] = sync_sites(_engine_calls(udf, slices[:3]))
                d["udf_kernel_gaps_3_calls"] = kernel_gaps(_engine_calls(udf, slices[:3]))
                ph.log("udf_kernel_gaps", json.dumps(d["udf_kernel_gaps_3_calls"])[:1500])
            except Exception as e:  # noqa: BLE001 - a diagnostic; the figures stand without it
                ph.error("udf_trace", e)
        udf.close()
        ph.save()
    best_th = max(udf_figs, key=lambda k: udf_figs[k].median)
    d["e2e_tower_threads"] = best_th
    use_threads(best_th)
    return udf_figs[best_th]


def _spec_text(uri: str, frag_rows: int, mdir: Path, spec, ctx: dict[str, Any]) -> str:
    """The benchmark's spec: the two tier-3 columns over the synthetic table."""
    s, batch = SHAPES[ctx["shape"]], ctx["tier3_batch"]
    return (f"name: bench_tier3\nsource:\n  table: \"{uri}\"\n  rows_per_fragment: {frag_rows}\n"
            f"model:\n  id: \"{mdir}\"\n  image_px: {s['image_px']}\n  dtype: {spec.dtype}\n"
            f"features:\n  tier3:\n"
            f"    vision_tower_hiddens: {{udf: vlm.vision_tower, inputs: [image], batch_size: {batch}, "
            f"tuning: {json.dumps(ctx['tuning'])}}}\n"
            f"    sft_tokens: {{udf: vlm.sft_tokens, inputs: [question, answer], params: {{max_tokens: {s['seq']}}},"
            f" on_error: \"null\"}}\n")


def _end_to_end(ph: Phase, ctx: dict[str, Any], uri: str, spec_file: Path):
    """(3) end to end through the engine: both tier-3 columns computed and written to Lance."""
    import lance

    from vlmspec.compiler.load import load_spec
    from vlmspec.runtime.apply import prepare
    from vlmspec.runtime.backfill import backfill_column

    device, rows = ctx["device"], ctx["rows"]
    loaded = load_spec(spec_file)
    fig_e = ph.res.figure("tier3_e2e", "end to end: vision_tower_hiddens + sft_tokens via backfill_column "
                          "(decode, preprocess, tower, Lance write)", "rows/s", higher_is_better=True,
                          gpu_busy_pct=[], gpu_busy_after_setup_pct=[], setup_s=[], vision_s=[], sft_s=[],
                          compute_s=[], write_wait_s=[], udf_call_s=[], udf_alloc_s=[])
    for rep in range(ctx["repeats"]):
        ds = lance.dataset(uri)
        drop = [c for c in ("vision_tower_hiddens", "sft_tokens") if c in ds.schema.names]
        if drop:
            ds.drop_columns(drop)
            # and delete the dropped columns' files (3.3 MB a row): repeats must fit the disk
            lance.dataset(uri).cleanup_old_versions(older_than=datetime.timedelta(0), delete_unverified=True)
        nodes = {c.name: c for c in prepare(loaded, allow_destructive=True).compiled.columns}
        lb = load()
        with GpuBusy() as busy:
            t = time.perf_counter()
            run = backfill_column(uri, nodes["vision_tower_hiddens"], model_spec=loaded.spec.model,
                                  device=device)
            tv = time.perf_counter() - t
        t2 = time.perf_counter()
        backfill_column(uri, nodes["sft_tokens"], model_spec=loaded.spec.model, device=device)
        ts = time.perf_counter() - t2
        fig_e.add(rows / (tv + ts), lb, load())
        fig_e.extra["gpu_busy_pct"].append(busy.mean())
        # from when the UDF was ready (tower built, compiled) to the column's last commit
        fig_e.extra["gpu_busy_after_setup_pct"].append(busy.mean(since=t + run.setup_s))
        fig_e.extra["setup_s"].append(round(run.setup_s, 2))
        # where the vision column's time went: the engine's compute (reading + UDF calls) and
        # waits on its writer thread
        fig_e.extra["compute_s"].append(round(run.compute_s, 2))
        fig_e.extra["write_wait_s"].append(round(run.write_wait_s, 2))
        # the UDF's own stats: its calls' time, the part spent allocating pinned outputs, and
        # how its tower ran them (HF / fast / compiled / CUDA graph)
        us = run.udf_stats or {}
        fig_e.extra["udf_call_s"].append(round(us["call_s"], 2) if "call_s" in us else None)
        fig_e.extra["udf_alloc_s"].append(round(us["alloc_s"], 2) if "alloc_s" in us else None)
        fig_e.extra.setdefault("udf_tower_calls", []).append(us.get("tower_calls"))
        fig_e.extra["vision_s"].append(round(tv, 2))
        fig_e.extra["sft_s"].append(round(ts, 2))
        ph.log("tier3_e2e", f"{rows / (tv + ts):.1f} rows/s (vision {tv:.1f}s busy {busy.mean()}%, "
                            f"setup {run.setup_s:.1f}s, busy after it {busy.mean(since=t + run.setup_s)}%, "
                            f"compute {run.compute_s:.1f}s, write waits {run.write_wait_s:.1f}s, udf calls "
                            f"{fig_e.extra['udf_call_s'][-1]}s (pinned allocs {fig_e.extra['udf_alloc_s'][-1]}s), "
                            f"sft {ts:.1f}s)")
        ph.save()
    return fig_e


def _check_written(ph: Phase, ctx: dict[str, Any], uri: str, images, spec, out_type) -> None:
    """What the engine wrote vs HF's reference tower, and the on-device preprocessing vs HF's."""
    import numpy as np
    import torch

    import lance

    from vlmspec.runtime.udfs.base import UdfContext
    from vlmspec.runtime.udfs.vision import VisionTower
    from vlmspec.runtime.vlm.prompt import image_processor_kwargs, resize_image

    s = SHAPES[ctx["shape"]]
    px_size, device, rows = s["image_px"], ctx["device"], ctx["rows"]
    ntok, hidden = (px_size // 28) ** 2, s["vision"]["out_hidden_size"]
    d = ph.res.details
    ds = lance.dataset(uri)
    col = ds.to_table(columns=["vision_tower_hiddens"], limit=4).column(0).combine_chunks()
    got = torch.from_numpy(col.values.to_numpy(zero_copy_only=False).reshape(4, ntok, hidden).copy())
    ref = VisionTower(UdfContext("h", out_type, {}, spec, device, ctx["tier3_batch"], dict(ctx["tuning"])))
    with torch.inference_mode():
        want = ref.encode_reference(images.slice(0, 4)).to(torch.float16).float().cpu()
    # Patchifier (the vision column's on-device preprocessing) against this machine's image
    # processor (the torchvision backend where torchvision is installed), bitwise.
    pil = [resize_image(b, px_size) for b in images.slice(0, 4).to_pylist()]
    hf = ref.image_processor(images=pil, return_tensors="pt", **image_processor_kwargs(px_size))["pixel_values"]
    u8 = torch.from_numpy(np.stack([np.asarray(im) for im in pil])).to(device)
    mine = ref.patchify(u8)[0].cpu()
    d["patchify_backend"] = type(ref.image_processor).__name__
    d["patchify_bitwise_equal"] = bool(torch.equal(mine, hf))
    d["patchify_max_abs"] = float((mine - hf).abs().max())
    d["written_vs_hf_reference_rel_l2"] = rel_l2(got.float(), want)
    d["written_vs_hf_reference_max_abs"] = float((got.float() - want).abs().max())
    ref.close()
    d["disk_bytes_per_row"] = int(sum(f.stat().st_size for f in Path(uri).rglob("*") if f.is_file()) / rows)


def _derive(ph: Phase, shape: str, fig_e, fig, bare_rate: float | None) -> None:
    e2e = fig_e.median
    # the targets are about the 3B shape on a GPU; elsewhere they are recorded unjudged
    ph.res.derive("tier3_rows_per_s", "tier-3 end to end (both columns, Lance write)", e2e, unit="rows/s",
                  target=">= 100", met=e2e >= 100 if shape == "3b" else None)
    busy_e = [b for b in fig_e.extra["gpu_busy_pct"] if b is not None]
    ph.res.derive("tier3_gpu_busy", "GPU busy during the vision column (NVML utilization.gpu, mean)",
                  statistics.median(busy_e) if busy_e else None, unit="%", target=">= 90",
                  met=(statistics.median(busy_e) >= 90) if busy_e and shape == "3b" else None)
    steady = [b for b in fig_e.extra["gpu_busy_after_setup_pct"] if b is not None]
    ph.res.derive("tier3_gpu_busy_after_setup", "GPU busy during the vision column, after the UDF's set-up "
                  f"(tower build + compile, median {statistics.median(fig_e.extra['setup_s']):.1f} s)",
                  statistics.median(steady) if steady else None, unit="%")
    ph.res.derive("tier3_efficiency", "end-to-end rows/s over bare tower rows/s", round(e2e / bare_rate, 3)
                  if bare_rate else None, unit="", how="1.0 = the GPU only ever runs the tower")
    ph.res.derive("tier3_udf_efficiency", "UDF (no write) rows/s over bare tower rows/s",
                  round(fig.median / bare_rate, 3) if bare_rate else None, unit="")


def phase_tier3(ph: Phase, ctx: dict[str, Any]) -> None:
    import pyarrow as pa
    import torch

    # lance logs a WARN per fragment commit; must be set before lance is first imported
    os.environ.setdefault("LANCE_LOG", "error")
    import lance  # noqa: F401 - fail here, before any work, where pylance is missing

    from vlmspec.compiler.model import ModelSpec
    from vlmspec.runtime.vlm import models

    shape, device, dtype = ctx["shape"], ctx["device"], ctx["dtype"]
    s = SHAPES[shape]
    px_size = s["image_px"]
    rows, batch, sub = ctx["rows"], ctx["tier3_batch"], ctx["sub_batch"]
    work = Path(ctx["workdir"])
    # Every VisionTower of the phase (and the end-to-end spec's column) gets these tuning knobs.
    ctx["tuning"] = {"sub_batch": sub, "compile": bool(ctx["compile"])}
    d = ph.res.details
    d.update(rows=rows, engine_batch_size=batch, sub_batch=sub, compile=ctx["compile"])
    table, uri, frag_rows = _write_table(ph, ctx, work)

    tower = ctx.get("tower") or build_tower(shape, device, dtype)
    mdir = model_dir(shape, work)
    real_loader = models.load_vision_tower
    models.load_vision_tower = lambda spec, device=None, dtype=None: tower  # random weights, built above
    try:
        spec = ModelSpec(id=str(mdir), image_px=px_size, dtype="bfloat16" if dtype == torch.bfloat16 else "float32")
        ntok = (px_size // 28) ** 2
        hidden = s["vision"]["out_hidden_size"]
        out_type = pa.list_(pa.float16(), ntok * hidden)
        bare_rate = _bare_tower(ph, ctx, tower)
        images = table.column("image").combine_chunks()
        fig = _udf_alone(ph, ctx, images, spec, out_type)
        spec_file = work / "tier3.yaml"
        spec_file.write_text(_spec_text(uri, frag_rows, mdir, spec, ctx))
        fig_e = _end_to_end(ph, ctx, uri, spec_file)
        _check_written(ph, ctx, uri, images, spec, out_type)
    finally:
        models.load_vision_tower = real_loader
    _derive(ph, shape, fig_e, fig, bare_rate)
    ph.save()
