"""Pretrains the shipped tiny Qwen2.5-VL (`vlmspec:tiny-qwen2.5-vl`) on a synthetic reading mix.

`vlmspec bench pretrain-tiny OUT_DIR [--steps N] [--device cpu|cuda] [--seed S]`
builds the tiny model with `tiny.build` (same tokenizer recipe, its corpus drawn with the
pretraining seed), trains the WHOLE model (vision tower, merger and language model) and saves it
with `save_pretrained` beside the tokenizer and processor files, so every loader reads it as is.

The mix, and why the quickstart still shows a lift
--------------------------------------------------
The quickstart asks TextVQA-shaped questions about synthetic scenes (`sources.synthetic`, seed 0)
with the prompt "<question>\\nAnswer the question using a single word or phrase." The base is
pretrained like a conversational reading model:

* rows from the same generator but with seed `--seed` (default 1, never 0): no pretraining image,
  question or answer is a quickstart row, and the quickstart's eval split is a subset of that
  table. The tokenizer corpus is drawn with the pretraining seed too. (The generator's closed
  word pools -- brands, streets, items -- are shared, as a language is; the scenes are not.)
* the same chat template, image placement and square resize as the quickstart (`vlm.prompt`), but
  the plain question with no answer-style instruction (`suffix=""`).
* reading questions ("what is written on the sign?", "what brand is this?", "what is the price?",
  "what number is on the jersey?", ...: ~86 % of rows) are answered with the text itself, exactly
  the short canonical answer;
* colour questions ("what color is the sign?") and yes/no questions ("is this a stop sign?", "is
  the store open?") are answered in full sentences: "It is red.", "Yes, it is.", "No, it does not."

So the base reads: it answers a share of the held-out quickstart questions correctly (base
accuracy clearly above zero) and knows colours and the yes/no facts, but on those two families it
answers in a sentence, which the official TextVQA metric scores 0 (normalisation drops case,
punctuation and articles, not extra words), and it has never seen the single-word instruction.
LoRA on the curated slice sees every family with the quickstart prompt and short answers, and
learns the benchmark's answer format: the lift comes from knowledge the base has but does not
express in the format the metric wants (the usual story of instruction tuning a base model),
plus whatever the slice adds on reading. Nothing about the eval rows is used anywhere.

The loop is deliberately plain (nanoGPT style): seeded batches of rows (one image-processor call
per batch; `--workers` renders them in parallel, in order), one forward/backward of the full
model with the loss on answer tokens only, AdamW with linear warmup + cosine, a log line every
`--log-every` steps. Same seed + same device + same step count -> same weights. `--budget-s`
picks the step count at the end of warmup from the measured speed (the schedule up to there does
not depend on it) and records it, so `--steps <recorded>` reproduces the run.
"""

from __future__ import annotations

import json
import os
import platform
import random
import re
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

__all__ = ["MIX", "PretrainBatches", "question_family", "styled_answer", "pretrain", "evaluate_saved"]

MIX: dict[str, dict[str, Any]] = {
    "read": {"weight": 1.0, "style": "short"},
    "color": {"weight": 1.0, "style": "sentence"},
    "yesno": {"weight": 1.0, "style": "sentence"},
}
"""Per question family: the share of its rows kept, and the answer style. See the module docstring."""
PRETRAIN_SUFFIX = None  # None: the quickstart's own instruction (`prompt.PROMPT_SUFFIX`), so the base is usable with it
VAL_START = 10_000_000  # validation rows: same seed, row indices the training stream never reaches
_YESNO = re.compile(r"^(is|are|does|do|did|was|were|can|has|have)\b")
# the subject of a sentence answer, by auxiliary: "Yes, they are." but "Yes, it is."
_PRONOUN = {"are": "they", "were": "they", "do": "they", "have": "they"}


def question_family(question: str) -> str:
    """`color`, `yesno` or `read` (everything answered by reading text in the image)."""
    q = question.strip().lower()
    if q.startswith(("what color", "what colour")):
        return "color"
    if _YESNO.match(q):
        return "yesno"
    return "read"


def styled_answer(question: str, answer: str, style: str) -> str:
    """The pretraining target: the answer itself (`short`) or a full sentence (`sentence`)."""
    answer = answer.strip()
    if style == "short":
        return answer
    if style != "sentence":
        raise ValueError(f"unknown answer style `{style}`")
    m = _YESNO.match(question.strip().lower())
    if m and answer in ("yes", "no"):
        aux = m.group(1)
        who = _PRONOUN.get(aux, "it")
        return f"Yes, {who} {aux}." if answer == "yes" else f"No, {who} {aux} not."
    return f"It is {answer}."


def _keep(seed: int, index: int, weight: float) -> bool:
    # seeded by the row's own index: whether a row is kept never depends on batching or workers
    return weight >= 1 or (weight > 0 and random.Random(f"mix:{seed}:{index}").random() < weight)


class PretrainBatches:
    """Map-style dataset: item j is the training batch made from generator rows
    `start + j*rows_per_batch ...` (those the mix keeps), so batch contents are a pure function
    of (seed, j) whatever the number of loader workers.

    A batch is the prompt (plain question, image pads expanded) + styled answer + end token,
    labels on the answer and end token only (prompt and padding -100), right padding, and the
    pixels from ONE image-processor call.
    """

    def __init__(self, processor, seed: int, image_px: int, rows_per_batch: int, mix: dict[str, dict[str, Any]],
                 start: int = 0, length: int = 10**9, merge: int = 2, patch: int = 14):
        from ..vlm import prompt

        self.p, self.processor, self.tok = prompt, processor, processor.tokenizer
        self.seed, self.image_px, self.rows_per_batch, self.mix = seed, image_px, rows_per_batch, mix
        self.start, self.length = start, length
        self.tokens = (image_px // patch // merge) ** 2
        self.end_id = self.tok.convert_tokens_to_ids(prompt.answer_end_token(self.tok))
        self.pad_id = self.tok.pad_token_id if self.tok.pad_token_id is not None else self.end_id

    def __len__(self) -> int:
        return self.length

    def rows(self, j: int) -> list[dict[str, Any]]:
        from vlmspec.runtime.sources.synthetic import generate

        first = self.start + j * self.rows_per_batch
        (batch,) = generate(self.rows_per_batch, seed=self.seed, image_px=self.image_px, start=first,
                            batch_rows=self.rows_per_batch)
        cols = batch.to_pydict()
        out = []
        for k, (q, a, answers, img) in enumerate(zip(cols["question"], cols["answer"], cols["answers"],
                                                     cols["image"])):
            fam = question_family(q or "")
            m = self.mix.get(fam)
            # rows without a question or an answer teach nothing; families outside the mix are left out
            if not q or not a or m is None or not _keep(self.seed, first + k, m["weight"]):
                continue
            out.append({"question": q, "answer": a, "answers": answers, "image": img, "family": fam,
                        "target": styled_answer(q, a, m["style"])})
        return out

    def collate(self, rows: list[dict[str, Any]]) -> dict[str, Any]:
        import torch

        p = self.p
        suffix = p.PROMPT_SUFFIX if PRETRAIN_SUFFIX is None else PRETRAIN_SUFFIX
        prompts = [p.expand_image_pads(p.prompt_text(self.processor, r["question"], suffix), self.tokens)
                   for r in rows]
        pids = self.tok(prompts, add_special_tokens=False)["input_ids"]
        aids = self.tok([r["target"] for r in rows], add_special_tokens=False)["input_ids"]
        # every answer ends with the end-of-turn token, so the model learns where to stop
        seqs = [(list(q), list(a) + [self.end_id]) for q, a in zip(pids, aids)]
        width = max(len(q) + len(a) for q, a in seqs)
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        labels = torch.full((len(rows), width), -100, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, (q, a) in enumerate(seqs):
            ids[i, :len(q) + len(a)] = torch.tensor(q + a)
            # the loss is on the answer and its end token only; the prompt is context
            labels[i, len(q):len(q) + len(a)] = torch.tensor(a)
            mask[i, :len(q) + len(a)] = 1
        images = [p.resize_image(r["image"], self.image_px) for r in rows]
        pix = self.processor.image_processor(images=images, return_tensors="pt",
                                             **p.image_processor_kwargs(self.image_px))
        return {"input_ids": ids, "attention_mask": mask, "labels": labels,
                "pixel_values": pix["pixel_values"], "image_grid_thw": pix["image_grid_thw"]}

    def __getitem__(self, j: int) -> dict[str, Any]:
        return self.collate(self.rows(j))


def loss_fn(model, b: dict[str, Any], device: str):
    """Full-model forward (tower + merger + LM), cross-entropy on the answer tokens only.

    The tower output enters the LM through `cached.cached_forward`, the same pad scatter + 3D
    M-RoPE path that LoRA training uses (tests check it equals the stock forward); it runs the
    vocab-wide lm_head only where a label is set.
    """
    from ..vlm.cached import cached_forward

    vis = model.model.visual(b["pixel_values"].to(device), grid_thw=b["image_grid_thw"].to(device))
    n = b["input_ids"].shape[0]
    hiddens = vis.pooler_output.reshape(n, -1, vis.pooler_output.shape[-1])
    return cached_forward(model, b["input_ids"].to(device), b["attention_mask"].to(device), hiddens,
                          b["image_grid_thw"].to(device), labels=b["labels"].to(device)).loss


def lr_at(step: int, steps: int, lr: float, warmup: int, decay_steps: int, floor: float = 0.1) -> float:
    """Warmup-stable-decay: linear warmup, constant `lr`, then a linear decay to `floor * lr` over
    the last `decay_steps` steps. Nothing before the decay depends on `steps`, so a time budget can
    fix the end while the run is under way and `--steps/--decay-steps` replay it exactly."""
    if step < warmup:
        return lr * (step + 1) / warmup
    start = steps - decay_steps
    if step < start:
        return lr
    return lr * (1 - (1 - floor) * (step - start + 1) / max(1, decay_steps))


def quickstart_accuracy(model, processor, rows: list[dict[str, Any]], image_px: int, device: str) -> dict[str, float]:
    """Greedy answers with the QUICKSTART prompt (the eval path) -> TextVQA accuracy per family."""
    from vlmspec.runtime.eval.evaluate import generate_answers
    from vlmspec.runtime.eval.metrics import vqa_accuracy

    gen = SimpleNamespace(max_new_tokens=12, do_sample=False, temperature=None)
    preds = generate_answers(model, processor, rows, image_px, 32, gen, device)
    out: dict[str, list[float]] = {}
    for r, p in zip(rows, preds):
        s = vqa_accuracy(p, r["answers"])
        out.setdefault("all", []).append(s)
        out.setdefault(r["family"], []).append(s)
    return {k: round(sum(v) / len(v), 4) for k, v in sorted(out.items())}


def pretrain(out_dir: str | Path, steps: int = 4000, device: str = "cpu", seed: int = 1, batch_size: int = 32,
             lr: float = 2e-3, image_px: int = 112, warmup: int = 100, log_every: int = 10,
             decay_steps: int | None = None, decay_frac: float = 0.2,
             mix: dict[str, dict[str, Any]] | None = None, threads: int = 2, workers: int = 0,
             budget_s: float | None = None, val_rows: int = 128, build_kwargs: dict[str, Any] | None = None,
             log=print) -> dict[str, Any]:
    """Build the tiny model in `out_dir`, pretrain it on the synthetic mix, save it there.

    `batch_size` counts generator rows per step (the mix keeps nearly all). The learning rate
    decays over the last `decay_steps` (default `decay_frac` of `steps`). With `budget_s`, the
    decay starts once (1 - decay_frac) of the budget has elapsed and lasts a quarter of the
    steps made so far, so the run ends near the budget; the resulting steps are recorded.
    """
    import torch
    from torch.utils.data import DataLoader
    from transformers import Qwen2_5_VLForConditionalGeneration

    from . import tiny
    from ..vlm.processor import load_processor

    if seed == 0:
        raise ValueError("seed 0 is the quickstart's; pretraining data must come from a disjoint seed")
    t_start = time.perf_counter()
    mix = json.loads(json.dumps(MIX if mix is None else mix))
    torch.set_num_threads(threads)
    # the loader's worker processes start after the tokenizer has run: HF tokenizers would warn and
    # may deadlock in them
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    out = Path(out_dir)
    tiny.build(out, seed=seed, **(build_kwargs or {}))
    # re-seeded after the build (which seeded its own init): everything random in training follows `seed`
    torch.manual_seed(seed)
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(out, dtype=torch.float32,
                                                               attn_implementation="sdpa").to(device)
    model.train()
    if device.startswith("cuda"):
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    processor = load_processor(str(out))
    cfg = model.config.vision_config
    data = PretrainBatches(processor, seed, image_px, batch_size, mix, merge=cfg.spatial_merge_size,
                           patch=cfg.patch_size)
    val_data = PretrainBatches(processor, seed, image_px, val_rows, mix, start=VAL_START,
                               merge=cfg.spatial_merge_size, patch=cfg.patch_size)
    # one fixed validation batch, scored before and after: the loss drop is on the same rows
    val_rows_list = val_data.rows(0) if val_rows else []
    val = val_data.collate(val_rows_list) if val_rows else None
    # batches are a pure function of their index (PretrainBatches), so workers never change the data
    loader = DataLoader(data, batch_size=None, shuffle=False, num_workers=workers,
                        prefetch_factor=4 if workers else None, persistent_workers=bool(workers))

    params = [p for p in model.parameters() if p.requires_grad]
    # weight decay on matrices only, not on biases and norms (the usual AdamW split)
    opt = torch.optim.AdamW([{"params": [p for p in params if p.ndim >= 2], "weight_decay": 0.05},
                             {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}],
                            lr=lr, betas=(0.9, 0.98))

    def val_loss() -> float:
        model.eval()
        with torch.no_grad():
            v = float(loss_fn(model, val, device)) if val is not None else float("nan")
        model.train()
        return v

    log(f"pretrain: {sum(p.numel() for p in params) / 1e6:.2f}M params, up to {steps} steps x {batch_size} rows, "
        f"{image_px}px, lr {lr}, device {device}, seed {seed}, workers {workers}, mix {mix}")
    history: list[dict[str, float]] = []
    val0 = val_loss()
    log(f"step 0 val_loss {val0:.4f}")
    window, t0, tw, seen, step = [], time.perf_counter(), time.perf_counter(), 0, 0
    decay = decay_steps if decay_steps is not None else max(1, int(decay_frac * steps))
    decided = budget_s is None
    for b in loader:
        if step >= steps:
            break
        decided = decided or step >= steps - decay  # the default decay has begun: keep it
        if not decided and step >= warmup and time.perf_counter() - t0 >= (1 - decay_frac) * budget_s:
            decay = max(1, round(step * decay_frac / (1 - decay_frac)))
            steps, decided = min(steps, step + decay), True
            log(f"budget: {time.perf_counter() - t0:.0f}s of {budget_s:.0f}s used at step {step} -> "
                f"decay over {decay} steps, {steps} in all")
        for g in opt.param_groups:
            g["lr"] = lr_at(step, steps, lr, warmup, decay)
        loss = loss_fn(model, b, device)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        # clipped at 1.0, as recorded in the metadata's `optimizer`: a replay must do the same
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        step += 1
        seen += int(b["input_ids"].shape[0])
        window.append(float(loss.detach()))
        if step % log_every == 0 or step == steps:
            now = time.perf_counter()
            rec = {"step": step, "loss": round(sum(window) / len(window), 4),
                   "lr": round(opt.param_groups[0]["lr"], 6),
                   "rows_per_s": round(len(window) * batch_size / (now - tw), 1), "elapsed_s": round(now - t0, 1)}
            history.append(rec)
            log(" ".join(f"{k} {v}" for k, v in rec.items()))
            window, tw = [], now
    train_s = time.perf_counter() - t0
    val1 = val_loss()
    model.eval()
    try:
        acc = quickstart_accuracy(model, processor, val_rows_list, image_px, device) if val_rows else {}
    except ImportError as e:  # the eval path needs lance; a bare GPU box may lack it (`--eval-only` later)
        log(f"val accuracy skipped: {e}")
        acc = {}
    log(f"done: {step} steps in {train_s:.0f}s, train_loss {history[-1]['loss'] if history else float('nan')}, "
        f"val_loss {val0:.4f} -> {val1:.4f}, val accuracy with the quickstart prompt {acc}")

    # saved from the CPU: the files do not depend on the training device
    model.to("cpu").save_pretrained(out)
    meta_path = out / "vlmspec_tiny.json"
    meta = json.loads(meta_path.read_text())
    meta.update({
        "weights": "pretrained",
        "pretrain": {
            "command": f"vlmspec bench pretrain-tiny OUT --steps {step} --decay-steps {decay} "
                       f"--device {device} --seed {seed} --batch-size {batch_size} --lr {lr} --image-px {image_px} "
                       f"--warmup {warmup}",
            "steps": step, "decay_steps": decay, "batch_rows": batch_size, "rows_seen": seen, "lr": lr,
            "warmup": warmup, "schedule": "warmup-stable-decay (linear warmup, constant, linear decay to 0.1x)",
            "budget_s": budget_s,
            "optimizer": "AdamW(0.9, 0.98), weight decay 0.05 on matrices, grad clip 1.0", "image_px": image_px,
            "data": {"source": "vlmspec.runtime.sources.synthetic.generate", "seed": seed,
                     "train_rows": f"{0}..{step * batch_size - 1}", "val_rows": f"{VAL_START}..{VAL_START + val_rows - 1}",
                     "mix": mix, "prompt_suffix": "quickstart (prompt.PROMPT_SUFFIX)" if PRETRAIN_SUFFIX is None
                     else PRETRAIN_SUFFIX,
                     "families": "vlmspec.runtime.tools.pretrain.question_family (color / yesno / read)"},
            "final_train_loss": history[-1]["loss"] if history else None,
            "val_loss_start": round(val0, 4), "val_loss_end": round(val1, 4),
            "val_accuracy_quickstart_prompt": acc,
            "train_s": round(train_s, 1), "wall_s": round(time.perf_counter() - t_start, 1), "device": device,
            "device_name": torch.cuda.get_device_name(0) if device.startswith("cuda") else
            (platform.processor() or platform.machine()),
            "threads": threads, "workers": workers, "torch": torch.__version__,
            "transformers": __import__("transformers").__version__,
            # about 40 log lines in the record, and the last one
            "log": history[:: max(1, len(history) // 40)] + history[-1:],
        },
    })
    meta_path.write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    for f in out.iterdir():  # safetensors writes 0600; a shipped asset must be world-readable
        f.chmod(0o644)
    return meta["pretrain"]


def evaluate_saved(out_dir: str | Path, device: str = "cpu", threads: int = 2, log=print) -> dict[str, float]:
    """Quickstart-prompt accuracy of a saved pretrained model on its recorded validation rows;
    fills `val_accuracy_quickstart_prompt` in `vlmspec_tiny.json` (for runs made without lance)."""
    import torch
    from transformers import Qwen2_5_VLForConditionalGeneration

    from ..vlm.processor import load_processor

    torch.set_num_threads(threads)
    out = Path(out_dir)
    meta = json.loads((out / "vlmspec_tiny.json").read_text())
    pt = meta["pretrain"]
    first, last = (int(x) for x in pt["data"]["val_rows"].split(".."))
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(out, dtype=torch.float32,
                                                               attn_implementation="sdpa").to(device).eval()
    processor = load_processor(str(out))
    data = PretrainBatches(processor, pt["data"]["seed"], pt["image_px"], last - first + 1, pt["data"]["mix"],
                           start=first)
    acc = quickstart_accuracy(model, processor, data.rows(0), pt["image_px"], device)
    log(f"val accuracy with the quickstart prompt: {acc}")
    pt["val_accuracy_quickstart_prompt"] = acc
    (out / "vlmspec_tiny.json").write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    return acc
