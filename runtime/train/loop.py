"""LoRA/QLoRA training from cached Lance columns: the vision tower is never loaded.

One readable loop in named phases: setup -> load -> fit -> save. The language model reads cached
vision hiddens scattered into the `<|image_pad|>` slots with 3D M-RoPE positions (so the forward
equals the full model's), logits are computed only where labels are set, and every
`checkpoint_every` steps the adapter, optimizer, scheduler, RNG and loader position are saved
atomically, so a killed run resumes where it stopped.
"""

from __future__ import annotations

import json
import math
import os
import random
import re
import shutil
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vlmspec.compiler.errors import ApplyError, Problem

from .. import history, lance_io
from .loader import iterate_epochs, make_loader

LM_PREFIX = r".*language_model\..*"  # LoRA never touches the vision tower or merger


def lora_target_regex(targets: list[str]) -> str:
    """Anchor module names to the language model, so eval (full model) adapts the same modules."""
    names = "|".join(t if not t.isidentifier() else re.escape(t) for t in targets)
    return rf"{LM_PREFIX}\.({names})"


def lr_lambda(schedule: str, warmup: int, total: int):
    def f(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        if schedule == "constant":
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return 0.5 * (1 + math.cos(math.pi * progress)) if schedule == "cosine" else 1.0 - progress
    return f


@dataclass
class Slice:
    uri: str
    version: int
    path: str
    train: np.ndarray


def pinned_slice(spec) -> Slice:
    """The train side of the slice recorded by the last curate/split, at its pinned version."""
    from ..curate import read_slice

    side = lance_io.read_sidecar(spec.source.table).get("steps", {})
    rec = side.get("split") or side.get("curate")
    if rec is None:
        raise ApplyError(Problem("no training slice recorded", "train",
                                 fix="Run `vlmspec apply` without --until/--target so curate and split run first"))
    sl = rec["detail"]["slice"]
    # The slice's row addresses were chosen at its version; cached columns may have been added
    # since (adding columns never moves rows), so training pins the table version it starts on.
    version = lance_io.open_dataset(spec.source.table).version
    if version < int(sl["table_version"]):
        raise ApplyError(Problem("the table is older than the recorded slice", "train",
                                 fix="Run `vlmspec apply` to rebuild the slice"))
    return Slice(spec.source.table, version, sl["path"], read_slice(sl["path"], "train"))


def _seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _rng_state() -> dict[str, Any]:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def _set_rng_state(s: dict[str, Any]) -> None:
    random.setstate(s["python"])
    np.random.set_state(s["numpy"])
    torch.set_rng_state(s["torch"])
    if s.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])


def build_model(spec, device: str):
    """Language model only (4-bit NF4 for QLoRA), wrapped with LoRA per the spec."""
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    from ..vlm.models import load_language_model

    tr = spec.train
    quant = tr.quant if tr.quant.bits in (4, 8) else None
    dtype = {16: "bfloat16" if device.startswith("cuda") else "float32", 32: "float32"}.get(tr.quant.bits, "auto")
    model = load_language_model(spec.model, quant=quant, device=device, dtype=dtype)
    gc_kwargs = {"use_reentrant": False}
    if quant is not None:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=tr.gradient_checkpointing,
                                                gradient_checkpointing_kwargs=gc_kwargs)
    elif tr.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=gc_kwargs)
    config = LoraConfig(r=tr.lora.r, lora_alpha=tr.lora.alpha, lora_dropout=tr.lora.dropout, bias="none",
                        target_modules=lora_target_regex(tr.lora.targets),
                        modules_to_save=list(tr.lora.modules_to_save) or None, task_type="CAUSAL_LM")
    model = get_peft_model(model, config)
    model.train()
    return model


def compile_layers(model) -> None:
    """`torch.compile` each decoder layer of the language model ("regional" compilation): the
    layers share one compiled graph (weights are graph inputs), so compiling costs one layer, and
    the step loses most of its per-kernel launch overhead (measured in `vlmspec bench gpu`)."""
    from ..vlm.cached import unwrap

    for layer in unwrap(model).model.language_model.layers:
        layer.compile(dynamic=False)


def _save_checkpoint(ckpt: Path, model, opt, sched, state: dict[str, Any]) -> None:
    from peft import get_peft_model_state_dict

    tmp = ckpt.with_name(ckpt.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    torch.save({"adapter": get_peft_model_state_dict(model), "optimizer": opt.state_dict(),
                "scheduler": sched.state_dict(), "rng": _rng_state(), **state}, tmp / "state.pt")
    old = ckpt.with_name(ckpt.name + ".old")
    if ckpt.exists():
        os.replace(ckpt, old)
    os.replace(tmp, ckpt)  # the checkpoint appears whole or not at all
    shutil.rmtree(old, ignore_errors=True)


def _load_checkpoint(ckpt: Path, fingerprint: str) -> dict[str, Any] | None:
    f = ckpt / "state.pt"
    if not f.exists():
        return None
    state = torch.load(f, map_location="cpu", weights_only=False)
    return state if state.get("fingerprint") == fingerprint else None


def train_from_spec(prep, device: str | None = None, stop_after: int | None = None) -> dict[str, Any]:
    """Train per `spec.train`; resumes from `<output_dir>/checkpoint` when its fingerprint matches.

    With `train.devices > 1` it spawns that many data-parallel processes (runtime/distributed.py).
    """
    spec = prep.loaded.spec
    done = _finished_run(Path(spec.train.output_dir or f"runs/{spec.name}"), prep.compiled.stage("train").fingerprint)
    if done is not None:
        # The adapter for this exact fingerprint is already saved (e.g. killed after saving, before
        # apply recorded the step): record it instead of training again.
        return done
    devices = spec.train.devices
    if devices > 1:
        from .distributed import launch

        return launch(prep, devices, device, stop_after)
    return run_training(prep, device, stop_after)


def _finished_run(out: Path, fingerprint: str) -> dict[str, Any] | None:
    try:
        m = json.loads((out / "manifest.json").read_text())
    except (FileNotFoundError, ValueError):
        return None
    if m.get("train_fingerprint") != fingerprint or not (out / "adapter" / "adapter_config.json").exists():
        return None
    return {"table_version": m["table_version"], "rows": m["rows"], "steps": m["steps"],
            "final_loss": m["final_loss"], "adapter": str(out / "adapter"), "seconds": m["seconds"],
            "devices": m.get("devices", 1)}


def run_training(prep, device: str | None = None, stop_after: int | None = None) -> dict[str, Any]:
    """The loop itself, in this process (one rank when distributed)."""
    from peft import set_peft_model_state_dict

    from .distributed import all_sum, barrier, sum_gradients, world

    from ..vlm.cached import unwrap
    from ..vlm.graph_step import CaptureError, eager_step

    # -- setup ------------------------------------------------------------------------------
    spec = prep.loaded.spec
    tr, opt_spec = spec.train, spec.train.optim
    node = prep.compiled.stage("train")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    out = Path(tr.output_dir or f"runs/{spec.name}")
    out.mkdir(parents=True, exist_ok=True)
    ckpt = out / "checkpoint"
    sl = pinned_slice(spec)
    rank, nranks = world()
    main = rank == 0  # only rank 0 writes logs, checkpoints and the adapter
    if opt_spec.batch_size % nranks:
        raise ApplyError(Problem(f"batch_size {opt_spec.batch_size} does not split over {nranks} devices",
                                 "train.optim.batch_size", fix="Use a multiple of `train.devices`"))
    grid = (1, spec.model.image_px // 14, spec.model.image_px // 14)  # patches; merged tokens are 2x2 of them
    per_step = opt_spec.batch_size * opt_spec.grad_accum
    total = opt_spec.steps or max(1, math.ceil(opt_spec.epochs * len(sl.train) / per_step))
    if len(sl.train) < opt_spec.batch_size:
        raise ApplyError(Problem(f"the training slice has {len(sl.train)} rows, fewer than one batch",
                                 "train.optim.batch_size", fix="Lower batch_size or loosen the curation"))
    _seed_all(opt_spec.seed)

    # -- load -------------------------------------------------------------------------------
    model = build_model(spec, device)
    params = [p for p in model.parameters() if p.requires_grad]
    cuda = device.startswith("cuda")
    # fused: one kernel for all adapter tensors instead of a few per tensor (same update rule).
    opt = torch.optim.AdamW(params, lr=opt_spec.lr, weight_decay=opt_spec.weight_decay,
                            fused=cuda and all(p.is_cuda and p.is_floating_point() for p in params))
    if tr.compile == "layers" and cuda:
        compile_layers(model)
    graphed = None
    if tr.compile == "graph" and cuda:
        from ..vlm.graph_step import GRAPH_LABEL_SLOTS, GraphedStep

        graphed = GraphedStep(model, label_slots=GRAPH_LABEL_SLOTS)
    run_step = graphed if graphed is not None else partial(eager_step, model)
    image_token_id = int(unwrap(model).config.image_token_id)
    warmup = int(opt_spec.warmup * total) if opt_spec.warmup < 1 else int(opt_spec.warmup)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(opt_spec.schedule, warmup, total))
    step, epoch, batch_idx, elapsed = 0, 0, 0, 0.0
    state = _load_checkpoint(ckpt, node.fingerprint)
    if state is not None:
        set_peft_model_state_dict(model, state["adapter"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        _set_rng_state(state["rng"])
        step, epoch, batch_idx, elapsed = state["step"], state["epoch"], state["batch"], state["elapsed"]
    log_path = out / "train_log.jsonl"
    if main and state is None and log_path.exists():
        log_path.unlink()  # a fresh run (new fingerprint) starts a fresh log
    elif main and state is not None and log_path.exists():
        # Steps after the checkpoint are redone: drop their records so no step is logged twice.
        kept = [ln for ln in log_path.read_text().splitlines() if json.loads(ln)["step"] <= step]
        log_path.write_text("".join(ln + "\n" for ln in kept))

    def make(ep: int):
        return make_loader(sl.uri, sl.version, sl.train, hiddens=tr.hiddens, tokens=tr.tokens,
                           image_tokens=spec.model.image_tokens, batch_size=opt_spec.batch_size // nranks,
                           seed=opt_spec.seed, epoch=ep, num_workers=tr.num_workers, rank=rank, world=nranks,
                           image_token_id=image_token_id, llm_grid=(grid[1] // 2, grid[2] // 2),
                           label_slots=graphed.label_slots if graphed is not None else 8,
                           threads=tr.loader_threads)

    batches = iterate_epochs(make, epoch, batch_idx)
    per_epoch = len(sl.train) // opt_spec.batch_size

    # -- fit --------------------------------------------------------------------------------
    t0 = time.perf_counter() - elapsed
    window_loss, window_tokens, window_samples, tw = 0.0, 0, 0, time.perf_counter()
    last_loss = float("nan")
    while step < total:
        micro = [next(batches) for _ in range(opt_spec.grad_accum)]
        epoch, batch_idx = micro[-1][0], micro[-1][1] + 1
        # Label tokens of the whole global step (all micro-batches, all ranks): every rank scales its
        # loss by it, so summed gradients equal one process's token-weighted mean.
        n_tokens = int(all_sum(sum(b.step.n_labels for _, _, b in micro)))
        if n_tokens == 0:
            raise ApplyError(Problem("a training step has no label tokens", "train",
                                     fix="Check `sft_tokens` (max_tokens too small for the answers?)"))
        step_loss = torch.zeros((), device=device)
        for _, _, b in micro:
            b = b.to(device)
            # No host sync in here: the loader checked the rows and precomputed positions and label
            # slots, so the CPU queues the next micro-batch while the GPU still runs this one.
            k = b.step.n_labels
            # Loss scaled by k / n_tokens: token-weighted over the whole accumulated step.
            try:  # with `compile: graph`, forward + backward replayed as one CUDA graph
                loss = run_step(b.input_ids, b.attention_mask, b.vision_hiddens, b.step, k / n_tokens)
            except CaptureError as e:
                raise ApplyError(Problem(f"the training step could not be captured as a CUDA graph: {e}",
                                         "train.compile", fix="Use `compile: layers` or `compile: none`")) from e
            step_loss += loss.detach() * k
        sum_gradients(params)
        step_loss = all_sum(float(step_loss)) if nranks > 1 else step_loss
        if opt_spec.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(params, opt_spec.max_grad_norm)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=graphed is None)  # a captured backward writes into these grads
        step += 1
        last_loss = step_loss / n_tokens  # a device tensor on one device: read at the end, not per step
        window_loss += step_loss
        window_tokens += n_tokens
        window_samples += per_step
        if main and (step % tr.log_every == 0 or step == total):
            now = time.perf_counter()
            rec = {"step": step, "epoch": round(epoch + batch_idx / max(per_epoch, 1), 4),
                   "loss": round(float(window_loss) / window_tokens, 5), "lr": sched.get_last_lr()[0],
                   "samples_per_s": round(window_samples / max(now - tw, 1e-9), 3),
                   "elapsed_s": round(now - t0, 2)}
            with log_path.open("a") as f:
                f.write(json.dumps(rec) + "\n")
            window_loss, window_tokens, window_samples, tw = 0.0, 0, 0, now
        if main and step % tr.checkpoint_every == 0 and step < total:
            _save_checkpoint(ckpt, model, opt, sched, {"fingerprint": node.fingerprint, "step": step,
                                                        "epoch": epoch, "batch": batch_idx,
                                                        "elapsed": time.perf_counter() - t0})
        if stop_after is not None and step >= stop_after:  # tests: simulate an interrupted run
            barrier()
            return {"stopped_at": step}

    # -- save -------------------------------------------------------------------------------
    adapter = out / "adapter"
    last_loss = float(last_loss)
    result = {"table_version": sl.version, "rows": int(len(sl.train)), "steps": step, "final_loss": last_loss,
              "adapter": str(adapter), "seconds": round(time.perf_counter() - t0, 2), "devices": nranks}
    if graphed is not None:
        result["cuda_graph"] = {"replays": graphed.replays, "eager_micro_batches": graphed.eager_steps}
    if not main:
        barrier()
        return result
    model.save_pretrained(str(adapter))
    plot_loss(log_path, out / "loss.png")
    manifest = {
        "spec_file": prep.loaded.file, "spec_hash": prep.loaded.source_hash, "train_fingerprint": node.fingerprint,
        "table": sl.uri, "table_version": sl.version, "slice": sl.path, "rows": int(len(sl.train)),
        "columns": {c: prep.compiled.column(c).fingerprint for c in (tr.hiddens, tr.tokens)},
        "model": {"id": spec.model.id, "revision": spec.model.revision, "image_px": spec.model.image_px},
        "lora": tr.lora.model_dump(), "quant": tr.quant.model_dump(), "optim": opt_spec.model_dump(),
        "steps": step, "final_loss": last_loss, "seconds": round(time.perf_counter() - t0, 2),
        "device": device, "devices": nranks, "libraries": history.library_versions(),
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True))
    shutil.rmtree(ckpt, ignore_errors=True)
    barrier()
    return result


def plot_loss(log_path: Path, png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    recs = [json.loads(line) for line in log_path.read_text().splitlines()] if log_path.exists() else []
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    ax.plot([r["step"] for r in recs], [r["loss"] for r in recs], marker="o", markersize=2)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("train loss (answer tokens)")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(png)
    plt.close(fig)
