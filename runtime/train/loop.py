"""LoRA/QLoRA training from cached Lance columns: the vision tower is never loaded.

One readable loop in named phases, each a function: setup -> load -> fit -> save. The language
model reads cached vision hiddens scattered into the `<|image_pad|>` slots with 3D M-RoPE positions
(so the forward equals the full model's), logits are computed only where labels are set, and every
`checkpoint_every` steps the adapter, optimizer, scheduler, RNG and loader position are saved
atomically, so a killed run resumes where it stopped. Everything the run reads is its `TrainJob`.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from vlmspec.compiler.errors import ApplyError, Problem

from .. import history, lance_io
from ..progress import NullReporter, Reporter
from .checkpoint import load_checkpoint, save_checkpoint, seed_all, set_rng_state
from .job import SliceRecord, TrainJob
from .loader import CachedBatch, iterate_epochs, make_loader
from .model import build_model, compile_layers, lora_target_regex

__all__ = ["Slice", "lora_target_regex", "pinned_slice", "plot_loss", "run_training"]


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


def pinned_slice(spec_or_job: Any) -> Slice:
    """The train side of the recorded slice, at the table version training pins (the latest)."""
    from ..curate import read_slice

    table = spec_or_job.table if isinstance(spec_or_job, TrainJob) else spec_or_job.source.table
    sl = spec_or_job.slice if isinstance(spec_or_job, TrainJob) else SliceRecord.recorded(table)
    # The slice's row addresses were chosen at its version; cached columns may have been added
    # since (adding columns never moves rows), so training pins the table version it starts on.
    version = lance_io.open_dataset(table).version
    if version < sl.table_version:
        raise ApplyError(Problem("the table is older than the recorded slice", "train",
                                 fix="Run `vlmspec apply` to rebuild the slice"))
    return Slice(table, version, sl.path, read_slice(sl.path, "train"))


def run_training(job: TrainJob, device: str | None = None, stop_after: int | None = None,
                 reporter: Reporter | None = None) -> dict[str, Any]:
    """The loop itself, in this process (one rank when distributed)."""
    t0 = time.perf_counter()
    run = _setup(job, device)
    model = _load(run)
    model.extra["setup"]["load_s"] = round(time.perf_counter() - t0, 2)
    try:
        if not _fit(run, model, stop_after, reporter or NullReporter()):
            return {"stopped_at": model.step}
        return _save(run, model)
    finally:
        # The eval runs next in this process: hand back the model, the optimizer state and the CUDA
        # graph's private pool (a fused pass's activations: tens of GiB at the 3B shape) now.
        del model
        if str(run.device).startswith("cuda"):
            import gc

            gc.collect()
            torch.cuda.empty_cache()


# -- setup ----------------------------------------------------------------------------------

@dataclass
class _Run:
    """What setup decided: where the run writes, what it reads, and its step geometry."""

    job: TrainJob
    device: str
    out: Path
    sl: Slice
    rank: int
    nranks: int
    total: int
    """Optimizer steps to run."""
    per_step: int
    """Samples per optimizer step (all micro-batches, all ranks)."""
    grid: tuple[int, int, int]

    @property
    def main(self) -> bool:
        return self.rank == 0  # only rank 0 writes logs, checkpoints and the adapter

    @property
    def log_path(self) -> Path:
        return self.out / "train_log.jsonl"


def _setup(job: TrainJob, device: str | None) -> _Run:
    from .distributed import world

    opt = job.train.optim
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    out = job.out
    out.mkdir(parents=True, exist_ok=True)
    sl = pinned_slice(job)
    rank, nranks = world()
    if opt.batch_size % nranks:
        raise ApplyError(Problem(f"batch_size {opt.batch_size} does not split over {nranks} devices",
                                 "train.optim.batch_size", fix="Use a multiple of `train.devices`"))
    grid = (1, job.model.image_px // 14, job.model.image_px // 14)  # patches; merged tokens are 2x2 of them
    per_step = opt.batch_size * opt.grad_accum
    if opt.grad_accum % job.micro_per_pass:
        raise ApplyError(Problem(f"{job.micro_per_pass} micro-batches a pass do not divide grad_accum {opt.grad_accum}",
                                 "train.fuse_accum", fix="Use `fuse_accum: auto`"))
    total = opt.steps or max(1, math.ceil(opt.epochs * len(sl.train) / per_step))
    if len(sl.train) < opt.batch_size:
        raise ApplyError(Problem(f"the training slice has {len(sl.train)} rows, fewer than one batch",
                                 "train.optim.batch_size", fix="Lower batch_size or loosen the curation"))
    seed_all(opt.seed)
    return _Run(job, device, out, sl, rank, nranks, total, per_step, grid)


# -- load -----------------------------------------------------------------------------------

@dataclass
class _Model:
    """The model, its optimizer and schedule, how a micro-batch runs, and where the loop stands."""

    model: Any
    params: list
    opt: Any
    sched: Any
    run_step: Callable
    graphed: Any
    image_token_id: int
    step: int = 0
    epoch: int = 0
    batch: int = 0
    elapsed: float = 0.0
    extra: dict = field(default_factory=dict)


def _load(run: _Run) -> _Model:
    from peft import set_peft_model_state_dict

    from ..vlm.cached import unwrap
    from ..vlm.graph_step import eager_step

    tr, opt_spec = run.job.train, run.job.train.optim
    t0 = time.perf_counter()
    model = build_model(run.job.model, tr, run.device)
    model_s = round(time.perf_counter() - t0, 2)  # imports, weights read (and quantised), LoRA wrapped
    params = [p for p in model.parameters() if p.requires_grad]
    cuda = run.device.startswith("cuda")
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
    warmup = int(opt_spec.warmup * run.total) if opt_spec.warmup < 1 else int(opt_spec.warmup)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(opt_spec.schedule, warmup, run.total))
    m = _Model(model, params, opt, sched, run_step, graphed, int(unwrap(model).config.image_token_id))
    m.extra["setup"] = {"model_s": model_s}
    state = None if run.job.fresh else load_checkpoint(run.out / "checkpoint", run.job.fingerprint)
    if state is not None:
        set_peft_model_state_dict(model, state["adapter"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        set_rng_state(state["rng"])
        m.step, m.epoch, m.batch, m.elapsed = state["step"], state["epoch"], state["batch"], state["elapsed"]
    if run.main and state is None and run.log_path.exists():
        run.log_path.unlink()  # a fresh run (new fingerprint) starts a fresh log
    elif run.main and state is not None and run.log_path.exists():
        # Steps after the checkpoint are redone: drop their records so no step is logged twice.
        kept = [ln for ln in run.log_path.read_text().splitlines() if json.loads(ln)["step"] <= m.step]
        run.log_path.write_text("".join(ln + "\n" for ln in kept))
    return m


def _batches(run: _Run, m: _Model):
    """(epoch, batch index, batch) from where the loop stands, epoch after epoch."""
    job, tr, opt = run.job, run.job.train, run.job.train.optim

    def make(ep: int):
        return make_loader(run.sl.uri, run.sl.version, run.sl.train, hiddens=tr.hiddens, tokens=tr.tokens,
                           image_tokens=job.model.image_tokens, batch_size=opt.batch_size // run.nranks,
                           seed=opt.seed, epoch=ep, num_workers=tr.num_workers, rank=run.rank, world=run.nranks,
                           image_token_id=m.image_token_id, llm_grid=(run.grid[1] // 2, run.grid[2] // 2),
                           label_slots=m.graphed.label_slots if m.graphed is not None else 8,
                           threads=tr.loader_threads)

    return iterate_epochs(make, m.epoch, m.batch)


# -- fit ------------------------------------------------------------------------------------

def _fit(run: _Run, m: _Model, stop_after: int | None, reporter: Reporter) -> bool:
    """Optimizer steps until `run.total`; False when `stop_after` stopped it early (tests)."""
    from ..vlm.graph_step import CaptureError
    from .distributed import all_sum, barrier, sum_gradients

    tr, opt_spec, device = run.job.train, run.job.train.optim, run.device
    batches = _batches(run, m)
    per_epoch = len(run.sl.train) // opt_spec.batch_size
    t0 = time.perf_counter() - m.elapsed
    window_loss, window_tokens, window_samples, tw = 0.0, 0, 0, time.perf_counter()
    guard = _FiniteGuard(device)
    board = _board(run) if run.main else None
    reporter.start("train", run.total, unit="steps")
    reporter.advance("train", m.step)  # a resumed run starts where its checkpoint was
    while m.step < run.total:
        micro = [next(batches) for _ in range(opt_spec.grad_accum)]
        m.epoch, m.batch = micro[-1][0], micro[-1][1] + 1
        # Label tokens of the whole global step (all micro-batches, all ranks): every rank scales its
        # loss by it, so summed gradients equal one process's token-weighted mean.
        n_tokens = int(all_sum(sum(b.step.n_labels for _, _, b in micro)))
        if n_tokens == 0:
            raise ApplyError(Problem("a training step has no label tokens", "train",
                                     fix="Check `sft_tokens` (max_tokens too small for the answers?)"))
        step_loss = torch.zeros((), device=device)
        # `fuse` micro-batches a pass (`train.fuse_accum`): concatenated on the device, the same rows
        # in the same order; the loss below is token-weighted over the step either way.
        fuse = run.job.micro_per_pass
        on_device = [b.to(device) for _, _, b in micro]
        for i in range(0, len(on_device), fuse):
            b = CachedBatch.cat(on_device[i:i + fuse])
            # No host sync in here: the loader checked the rows and precomputed positions and label
            # slots, so the CPU queues the next micro-batch while the GPU still runs this one.
            k = b.step.n_labels
            # Loss scaled by k / n_tokens: token-weighted over the whole accumulated step.
            try:  # with `compile: graph`, forward + backward replayed as one CUDA graph
                loss = m.run_step(b.input_ids, b.attention_mask, b.vision_hiddens, b.step, k / n_tokens)
            except CaptureError as e:
                raise ApplyError(Problem(f"the training step could not be captured as a CUDA graph: {e}",
                                         "train.compile", fix="Use `compile: layers` or `compile: none`")) from e
            step_loss += loss.detach() * k
        sum_gradients(m.params)
        step_loss = all_sum(float(step_loss)) if run.nranks > 1 else step_loss
        norm = torch.nn.utils.clip_grad_norm_(m.params, opt_spec.max_grad_norm) if opt_spec.max_grad_norm else None
        guard.watch(m.step + 1, step_loss, norm)
        m.opt.step()
        m.sched.step()
        m.opt.zero_grad(set_to_none=m.graphed is None)  # a captured backward writes into these grads
        m.step += 1
        if "first_step_s" not in m.extra["setup"]:  # warm-up and graph capture: one sync, once
            if str(device).startswith("cuda"):
                torch.cuda.synchronize(device)
            m.extra["setup"]["first_step_s"] = round(time.perf_counter() - t0 - m.elapsed, 2)
        reporter.advance("train", 1)
        window_loss += step_loss
        window_tokens += n_tokens
        window_samples += run.per_step
        if m.step % tr.log_every == 0 or m.step == run.total:
            guard.check(run)  # the loss is read here anyway (a host sync): no step in between goes unseen
            if run.main:
                now = time.perf_counter()
                rec = {"step": m.step, "epoch": round(m.epoch + m.batch / max(per_epoch, 1), 4),
                       "loss": round(float(window_loss) / window_tokens, 5), "lr": m.sched.get_last_lr()[0],
                       "samples_per_s": round(window_samples / max(now - tw, 1e-9), 3),
                       "elapsed_s": round(now - t0, 2)}
                with run.log_path.open("a") as f:
                    f.write(json.dumps(rec) + "\n")
                if board is not None:
                    for k in ("loss", "lr", "samples_per_s"):
                        board.add_scalar(f"train/{k}", rec[k], m.step)
                # The plotted, logged loss (a window's token-weighted mean) is the one reported.
                m.extra["final_loss"] = rec["loss"]
                reporter.info("train", f"loss {rec['loss']:.3f}, {rec['samples_per_s']:.1f} samples/s")
            window_loss, window_tokens, window_samples, tw = 0.0, 0, 0, time.perf_counter()
        if m.step % tr.checkpoint_every == 0 and m.step < run.total:
            guard.check(run)  # never checkpoint weights a non-finite step has already spoiled
        if run.main and m.step % tr.checkpoint_every == 0 and m.step < run.total:
            save_checkpoint(run.out / "checkpoint", m.model, m.opt, m.sched,
                            {"fingerprint": run.job.fingerprint, "step": m.step, "epoch": m.epoch,
                             "batch": m.batch, "elapsed": time.perf_counter() - t0})
        if stop_after is not None and m.step >= stop_after:  # tests: simulate an interrupted run
            barrier()
            return False
    guard.check(run)
    m.elapsed = time.perf_counter() - t0
    m.extra.setdefault("final_loss", float("nan"))  # ranks other than 0 log nothing
    if board is not None:
        board.close()
    reporter.finish("train")
    return True


class _FiniteGuard:
    """Notices the first optimizer step whose loss or gradient norm is not finite, without a host
    sync per step (the check is a device-side minimum, read where the loop syncs anyway: at each log
    and before each checkpoint). A NaN run stops with an error; it is never recorded as trained."""

    def __init__(self, device: str):
        self.first = torch.full((), math.inf, device=device)

    def watch(self, step: int, loss, norm) -> None:
        for v in (loss, norm):
            if v is None:
                continue
            if isinstance(v, float):  # summed over ranks: already on the host
                if not math.isfinite(v):
                    self.first = torch.minimum(self.first, torch.tensor(float(step), device=self.first.device))
                continue
            self.first = torch.minimum(self.first, torch.where(torch.isfinite(v), math.inf, float(step)))

    def check(self, run: _Run) -> None:
        first = float(self.first)
        if math.isfinite(first):
            tr = run.job.train
            raise ApplyError(Problem(
                f"training diverged: non-finite loss or gradient norm at step {int(first)} "
                f"(quant {tr.quant.bits}-bit, compile `{tr.compile}`, gradient_checkpointing "
                f"{tr.gradient_checkpointing}, lr {tr.optim.lr:g}, batch {tr.optim.batch_size} x {tr.optim.grad_accum})",
                "train", fix="Lower `train.optim.lr` or change `train.compile` / `train.quant`; the last good "
                             "checkpoint is kept and no adapter was published"))


def _board(run: _Run):
    """A TensorBoard writer in `<output_dir>/tensorboard` when `train.report_to: tensorboard`."""
    if run.job.train.report_to != "tensorboard":
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as e:
        raise ApplyError(Problem(f"`train.report_to: tensorboard` needs the tensorboard package ({e})",
                                 "train.report_to", fix="pip install 'vlmspec[tensorboard]'")) from None
    return SummaryWriter(str(run.out / "tensorboard"))


# -- save -----------------------------------------------------------------------------------

def _save(run: _Run, m: _Model) -> dict[str, Any]:
    from .distributed import barrier

    job, tr = run.job, run.job.train
    adapter = run.out / "adapter"
    result = {"table_version": run.sl.version, "rows": int(len(run.sl.train)), "steps": m.step,
              "final_loss": m.extra["final_loss"], "adapter": str(adapter), "seconds": round(m.elapsed, 2),
              "devices": run.nranks, "micro_batches_per_pass": job.micro_per_pass}
    if m.elapsed > 0:  # the whole fit, loader included: what the user's training ran at
        result["samples_per_s"] = round(m.step * run.per_step / m.elapsed, 2)
    if str(run.device).startswith("cuda"):  # checked against the plan's estimate by `vlmspec bench apply`
        result["peak_gib"] = round(torch.cuda.max_memory_allocated(run.device) / 2**30, 2)
    if m.extra.get("setup"):  # where the time before steady steps went (`vlmspec bench apply` reads it)
        result["setup_parts"] = dict(m.extra["setup"])
    if m.graphed is not None:
        result["cuda_graph"] = {"replays": m.graphed.replays, "eager_micro_batches": m.graphed.eager_steps}
    if not run.main:
        barrier()
        return result
    # The adapter names the base model by its portable id (a hub id, `vlmspec:tiny-qwen2.5-vl`), not
    # the local path this machine loaded it from.
    for cfg in getattr(m.model, "peft_config", {}).values():
        cfg.base_model_name_or_path = job.model.id
    m.model.save_pretrained(str(adapter))
    plot_loss(run.log_path, run.out / "loss.png")
    manifest = {
        "spec_file": job.spec_file, "spec_hash": job.spec_hash, "train_fingerprint": job.fingerprint,
        "table": run.sl.uri, "table_version": run.sl.version, "slice": run.sl.path, "rows": int(len(run.sl.train)),
        "columns": dict(job.columns),
        "model": {"id": job.model.id, "revision": job.model.revision, "image_px": job.model.image_px},
        "lora": tr.lora.model_dump(), "quant": tr.quant.model_dump(), "optim": tr.optim.model_dump(),
        "steps": m.step, "final_loss": m.extra["final_loss"], "seconds": round(m.elapsed, 2),
        "device": run.device, "devices": run.nranks, "libraries": history.library_versions(),
    }
    (run.out / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True))
    shutil.rmtree(run.out / "checkpoint", ignore_errors=True)
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
