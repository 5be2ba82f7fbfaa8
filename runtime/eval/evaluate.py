"""Evaluation: base vs tuned on raw held-out images through the full model (vision tower included).

Images and prompts go through `vlm.prompt` exactly as in training (same square resize, same chat
prompt); accuracy is the official TextVQA metric (`metrics.vqa_accuracy`), both models answer the
same seeded sample of questions, and the lift gets a paired-bootstrap confidence interval.
"""

from __future__ import annotations

import json
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import numpy as np

from vlmspec.compiler.errors import ApplyError, Problem
from vlmspec.compiler.paths import shown

from .generate import generate_answers, generate_compared, resolve_batch_size
from .job import EvalJob
from .metrics import paired_bootstrap, vqa_accuracy

__all__ = ["BaseAnswers", "eval_rows", "evaluate", "evaluate_from_spec", "generate_answers", "vqa_accuracy"]


class BaseAnswers:
    """The base model's greedy answers, kept beside the table and keyed by everything they depend
    on: the model section (id, revision, image size, dtype, ...), the training quantisation it is
    loaded in, the kind of device (`auto` dtypes differ by it), decoding settings, each question's
    text and image bytes, and the code that prompts and generates. A
    LoRA-only change re-evaluates the tuned model alone; the base would answer the same again.
    Sampled answers are never kept (they are a draw, not a fact about the model)."""

    CODE = ("eval/generate.py", "vlm/prompt.py", "vlm/patchify.py", "vlm/fast_tower.py", "vlm/models.py")

    def __init__(self, job: EvalJob, rows: list[dict[str, Any]], device: str):
        import hashlib

        from vlmspec.compiler.fingerprint import digest

        from .. import lance_io

        h = hashlib.blake2b(digest_size=16)
        for r in rows:
            for part in (str(r["question"]).encode(), bytes(r["image"] or b"")):
                h.update(len(part).to_bytes(8, "little") + part)
        root = Path(__file__).resolve().parents[1]
        code = hashlib.blake2b(b"".join((root / f).read_bytes() for f in self.CODE), digest_size=16).hexdigest()
        self.key = digest({"model": job.model.model_dump(mode="json"), "device": str(device).split(":")[0],
                           "quant": job.quant.model_dump(mode="json") if job.quant else None,
                           "generation": job.eval.generation.model_dump(mode="json"), "rows": h.hexdigest(),
                           "code": code})
        self.path = lance_io.sidecar_dir(job.table) / "eval-base" / f"{self.key}.json"

    def load(self) -> dict[str, Any] | None:
        try:
            got = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return None
        return got if got.get("key") == self.key else None

    def save(self, answers: list[str]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"key": self.key, "answers": answers}))
        tmp.replace(self.path)  # whole or absent: a crash never leaves half a file to reuse


def eval_rows(job: EvalJob) -> tuple[list[dict[str, Any]], int, str]:
    """The held-out questions (a seeded sample of `eval.limit`), read at the slice's pinned version."""
    import lance

    from ..curate import read_slice

    sl, ev = job.slice, job.eval
    uri = sl.eval_uri or job.table
    version = int(sl.eval_version or sl.table_version)
    addrs = read_slice(sl.path, "eval")
    limit = None if ev.limit == "all" else ev.limit  # `all` and null: the whole held-out split
    if limit is not None and len(addrs) > limit:
        pick = np.sort(np.random.default_rng(ev.seed).choice(len(addrs), size=limit, replace=False))
        addrs = addrs[pick]
    ds = lance.dataset(uri, version=version)
    cols = [c for c in dict.fromkeys([job.key, "image", "question", "answers"]) if c in ds.schema.names]
    # `take` wants offsets; `_take_rows` takes row addresses (what slices store) and keeps their order.
    table = ds._take_rows(addrs.tolist(), columns=cols)
    rows = table.to_pylist()
    for r in rows:
        r.setdefault("question_id", r.get(job.key))
    return rows, version, uri


def evaluate_from_spec(prep, device: str | None = None, reporter=None) -> dict[str, Any]:
    """`evaluate` for a prepared spec (notebooks, tests): the job `apply` would build."""
    return evaluate(EvalJob.from_prepared(prep), device, reporter)


def evaluate(job: EvalJob, device: str | None = None, reporter=None) -> dict[str, Any]:
    """Run the eval section: answers per compared model, accuracy, lift with CI, JSON + report."""
    import torch

    from ..vlm.models import load_full_model, load_model_processor
    from .report import write_report

    ev, model_spec = job.eval, job.model
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(ev.seed)
    rows, version, uri = eval_rows(job)
    if not rows:
        raise ApplyError(Problem("the held-out split is empty", "split", fix="Raise `split.fraction`"))
    out_dir = job.out
    processor = load_model_processor(model_spec)
    timing: dict[str, float] = {}  # generation seconds per compared model (not the load)
    batch_size = resolve_batch_size(ev.batch_size, device)
    adapter = None
    if "tuned" in ev.compare:
        adapter = Path(job.adapter) if job.adapter else None
        if adapter is None or not (adapter / "adapter_config.json").exists():
            raise ApplyError(Problem(f"no trained adapter at `{adapter}`", "eval.compare",
                                     fix="Run the train step first (`vlmspec apply`)"))
    kept = BaseAnswers(job, rows, device) if "base" in ev.compare and not ev.generation.do_sample else None
    reused = kept.load() if kept is not None else None
    run = [name for name in ev.compare if not (name == "base" and reused is not None)]
    if reporter:
        for name in ev.compare:
            reporter.start(f"eval {name}", len(rows), unit="questions")
    preds: dict[str, list[str]] = {}
    load_s = 0.0
    timing_parts: dict[str, Any] = {}  # the tower's warm-up, its start before the load, its GPU seconds
    if run:
        # ONE load for every compared model: `tuned` is the base with the trained adapter on, `base`
        # the same weights with it off (peft's `disable_adapter`: the LoRA layers return their base
        # layer's output, so it is the base model's arithmetic). Both then share the tower's layout,
        # warm-up and each batch's image features (`generate_compared`).
        features = _start_tower(model_spec, processor, rows, batch_size, device, timing_parts)
        t0 = time.perf_counter()
        model = load_full_model(model_spec, device=device, adapter_dir=str(adapter) if adapter else None,
                                quant=job.quant)
        load_s = round(time.perf_counter() - t0, 2)
        variants = {name: (model.disable_adapter if name == "base" and adapter is not None else nullcontext)
                    for name in run}
        try:
            preds = generate_compared(model, variants, processor, rows, model_spec.image_px, batch_size,
                                      ev.generation, device, seconds=timing, features=features,
                                      progress=(lambda name, n: reporter.advance(f"eval {name}", n)) if reporter
                                      else None)
        finally:
            if features is not None:
                _tower_done(features, timing_parts)
                features = None
        if "tower_start_s" in timing_parts and run[0] in timing:
            # The host time the tower took before the load, and any wait after it for a start that
            # ran beside the load, is the eval's as much as a generation's: it is counted in the
            # first model's seconds, where the tower ran before this path existed.
            timing[run[0]] += timing_parts["tower_start_s"] + timing_parts["tower_start_wait_s"]
        del model
    if reused is not None:
        preds["base"] = reused["answers"]  # no time of this run: its q/s is not reported again
        if reporter:
            reporter.advance("eval base", len(rows))
    elif kept is not None:
        kept.save(preds["base"])
    preds = {name: preds[name] for name in ev.compare}
    if reporter:
        for name in ev.compare:
            reporter.finish(f"eval {name}")
    timing = {m: round(v, 2) for m, v in timing.items()}
    # questions/s of generation per model (not the load); the shared tower is in the first model's time
    speed = {m: round(len(rows) / max(v, 1e-9), 2) for m, v in timing.items()}
    scores = {m: [vqa_accuracy(p, r["answers"]) for p, r in zip(preds[m], rows)] for m in preds}
    results: dict[str, Any] = {
        "metric": ev.metric, "n": len(rows), "table": uri, "table_version": version,
        "model": {"id": model_spec.id, "revision": model_spec.revision, "image_px": model_spec.image_px},
        "accuracy": {m: float(np.mean(s)) for m, s in scores.items()}, "seconds": timing,
        "load_seconds": load_s, **timing_parts, "questions_per_s": speed, "batch_size": batch_size, "spec_hash": job.spec_hash,
        "run_id": job.run_id, "adapter": job.adapter if "tuned" in preds else None,
        "reused": ["base"] if reused is not None else [],
    }
    if "base" in scores and "tuned" in scores:
        boot = paired_bootstrap(scores["base"], scores["tuned"], resamples=ev.bootstrap, seed=ev.seed)
        results["bootstrap"] = boot
        results.update(base=boot["base"], tuned=boot["tuned"], lift=boot["lift"],
                       ci_low=boot["ci_low"], ci_high=boot["ci_high"])
    report_rows = [{"question_id": str(r.get("question_id")), "question": r["question"], "answers": r["answers"],
                    "image": r["image"], "base": preds.get("base", [None] * len(rows))[i],
                    "tuned": preds.get("tuned", [None] * len(rows))[i],
                    "base_score": scores["base"][i] if "base" in scores else None,
                    "tuned_score": scores["tuned"][i] if "tuned" in scores else None} for i, r in enumerate(rows)]
    paths = write_report(results, report_rows, out_dir)
    (out_dir / "predictions.jsonl").write_text("".join(
        json.dumps({k: v for k, v in r.items() if k != "image"}) + "\n" for r in report_rows))
    summary = "eval: " + ", ".join(f"{m} {a:.3f} ({'answers kept from an earlier run' if m in results['reused'] else f'{speed[m]:.1f} q/s'})"
                                   for m, a in results["accuracy"].items())
    if "lift" in results:
        summary += (f"; lift {100 * results['lift']:+.1f} pp (95% CI {100 * results['ci_low']:+.1f} to "
                    f"{100 * results['ci_high']:+.1f}) on {len(rows)} questions -> {shown(str(paths['markdown']))}")
    return {**results, "summary": summary, "report": str(paths["markdown"])}


def _start_tower(model_spec, processor, rows, batch_size: int, device: str, parts: dict[str, Any],
                 compile: bool | None = None, background: bool | None = None):
    """On CUDA, the eval's own tower started before the language model loads; None elsewhere.

    The tower alone loads in well under a second; its work for the first batches is then queued
    on a side stream (`ImageFeatures.start`). Compiled where the column's compile is at hand (this
    process compiled it, or its cache is on disk: `compile_by_default`), each batch is a few
    CUDA-graph launches, queued from a background thread under the load; eager, its ~1,000
    launches a batch fill CUDA's queue and are waited out here. Same weights, dtype and code as
    the model's own tower, so the same features. `parts` gets where the start's time went.
    `compile` and `background` (None: the defaults) are `ImageFeatures`' and its `start`'s, for
    `examples/benchmarks/profiles/eval_compare.py`."""
    if not str(device).startswith("cuda"):
        return None
    from ..vlm.models import load_vision_tower
    from .generate import ImageFeatures

    t0 = time.perf_counter()
    tower = load_vision_tower(model_spec, device=device)
    t1 = time.perf_counter()
    features = ImageFeatures(tower, processor, rows, model_spec.image_px, batch_size, device, compile=compile)
    t2 = time.perf_counter()
    features.start(background)
    t3 = time.perf_counter()
    parts["tower_warmup"] = features.warmup
    parts["tower_start_s"] = round(t3 - t0, 2)
    # the tower's load, the set-up (prompts, warm-up), the first batches queued here
    parts["tower_start_parts"] = {"load_s": round(t1 - t0, 2), "setup_s": round(t2 - t1, 2),
                                  "first_batches_s": round(t3 - t2, 2)}
    return features


def _tower_done(features, parts: dict[str, Any]) -> None:
    """Record the tower's GPU seconds, the wait for a background start and the host split of its
    batches' queueing, then close it."""
    parts["tower_gpu_s"] = features.tower_seconds()
    parts["tower_start_wait_s"] = round(features.start_wait_s, 2)
    parts["tower_start_parts"].update({k: round(v, 2) for k, v in features.compute_parts.items()},
                                      decode_wait_s=round(features.decode_wait_s, 2),
                                      background=features.started_in_background)
    features.close()
