"""`vlmspec bench chaos`: SIGKILL `vlmspec apply` at seeded points, rerun it, compare with a clean run.

The spec is small but has every phase: a synthetic ingest committed in several parts, tier-1/2
columns, tier-3 columns with the shipped tiny model, and a short LoRA training that checkpoints
every few steps. Each trial runs `vlmspec apply` in a child process that logs its progress (one
line per ingest batch, computed fragment chunk and training forward) to a file; the harness
watches that file and kills the whole process group once a target drawn from a seeded RNG is
reached (a phase, an event inside it, and a delay after it), then reruns `vlmspec apply` to the
end. A trial survives when the final table equals the clean run's (raw columns byte-identical,
derived columns equal, every row once), the plan is empty, training resumed from its last
checkpoint and ended with the clean run's adapter bit for bit, and no step recomputed more than one
checkpoint's worth of work (ingest: one commit, a column: one fragment, training: `checkpoint_every`
steps).

The child is `vlmspec apply` itself, with ingest's commit size and the synthetic batch size lowered
(so ingest commits several times) and the progress log added around three functions.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from .common import Results, load

PHASES = ("ingest", "tier12", "tier3", "train")
STEPS = {"ingest": "ingest", "question_length": "tier12", "ocr_token_count": "tier12", "dhash": "tier12",
         "vision_tower_hiddens": "tier3", "sft_tokens": "tier3", "train": "train"}
COLUMNS = [s for s in STEPS if s not in ("ingest", "train")]
RAW = ["id", "image", "image_id", "question_id", "question", "answers", "answer", "ocr_tokens", "image_classes",
       "set_name"]

SPEC = """\
name: chaos
source:
  table: {root}/data/t.lance
  ingest: {{from: synthetic, rows: {rows}, image_px: 64}}
  rows_per_fragment: {unit}
model: {{id: "vlmspec:tiny-qwen2.5-vl", image_px: 56}}
features:
  tier1:
    question_length: {{udf: text.length}}
    ocr_token_count: {{udf: text.count}}
  tier2:
    dhash: {{udf: image.dhash}}
  tier3:
    vision_tower_hiddens: {{udf: vlm.vision_tower, batch_size: 8, tuning: {{decode_threads: 1}}}}
    sft_tokens: {{udf: vlm.sft_tokens, params: {{max_tokens: 96}}, on_error: "null"}}
split: {{by: image_id, fraction: 0.2, seed: 0}}
train:
  quant: {{bits: 32}}
  lora: {{r: 4, alpha: 8, dropout: 0.0}}
  optim: {{lr: 5.0e-3, steps: {steps}, batch_size: 4, grad_accum: 1, seed: 0}}
  checkpoint_every: {every}
  log_every: 1
  output_dir: {root}/runs/chaos
executor: {{workers: 1}}
"""

CHILD = "from vlmspec.runtime.tools.bench.chaos import child_main; child_main()"


# --- the child: `vlmspec apply`, instrumented ------------------------------------------------------

def child_main() -> None:
    """`vlmspec apply ...` with a progress log and a small ingest commit size (env-configured)."""
    log = os.environ["VLMSPEC_CHAOS_LOG"]
    unit = int(os.environ["VLMSPEC_CHAOS_UNIT"])

    def note(step: str, n: int) -> None:
        with open(log, "a") as f:  # one write per event: what is logged survives a SIGKILL
            f.write(json.dumps({"step": step, "n": n, "t": round(time.time(), 3)}) + "\n")

    from vlmspec.runtime import backfill
    from vlmspec.runtime.sources import ingest, synthetic
    from vlmspec.runtime.vlm import graph_step

    # small commits, so a kill during ingest can land between commits and not only before the first
    ingest.COMMIT_ROWS = unit
    generate = synthetic.generate

    def small_batches(*args: Any, **kwargs: Any):
        for batch in generate(*args, **{**kwargs, "batch_rows": unit}):
            note("ingest", batch.num_rows)  # generated; committed once ingest has a unit's worth
            yield batch

    from vlmspec.runtime.executors import local as local_executor

    compute_chunk = local_executor.compute_chunk

    def logged_chunk(ds, fn, node, chunk, *args: Any, **kwargs: Any):
        out = compute_chunk(ds, fn, node, chunk, *args, **kwargs)
        note(node.name, chunk.limit)
        return out

    forward = graph_step.eager_step  # one training micro-batch (forward + backward)

    def logged_forward(*args: Any, **kwargs: Any):
        note("train", 1)
        return forward(*args, **kwargs)

    # patched in this child only: apart from the progress log it is the real `vlmspec apply`
    synthetic.generate = small_batches
    local_executor.compute_chunk = logged_chunk
    graph_step.eager_step = logged_forward
    from vlmspec.runtime.cli import main

    sys.argv = ["vlmspec", *sys.argv[1:]]
    main()


# --- the harness ------------------------------------------------------------------------------------

def _events(log: Path) -> list[dict[str, Any]]:
    try:
        lines = log.read_text().splitlines()
    except FileNotFoundError:
        return []
    out = []
    for ln in lines:
        try:
            out.append(json.loads(ln))
        except ValueError:  # a line cut by the kill
            pass
    return out


def _work(events: list[dict[str, Any]]) -> dict[str, int]:
    out: dict[str, int] = {}
    for e in events:
        out[e["step"]] = out.get(e["step"], 0) + e["n"]
    return out


class Trial:
    """One directory, one spec, one progress log per run."""

    def __init__(self, root: Path, rows: int, unit: int, steps: int, every: int):
        self.root, self.unit = root, unit
        root.mkdir(parents=True, exist_ok=True)
        self.spec = root / "spec.yaml"
        self.spec.write_text(SPEC.format(root=root, rows=rows, unit=unit, steps=steps, every=every))
        self.table = str(root / "data" / "t.lance")
        self.runs = 0

    def start(self) -> tuple[subprocess.Popen, Path]:
        self.runs += 1
        log = self.root / f"progress-{self.runs}.jsonl"
        # offline, and one thread each: trials must not download, and must pace like the clean run their
        # kill points are timed from
        env = {**os.environ, "VLMSPEC_CHAOS_LOG": str(log), "VLMSPEC_CHAOS_UNIT": str(self.unit),
               "LANCE_LOG": "error", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "1",
               "TOKENIZERS_PARALLELISM": "false"}
        env.pop("VLMSPEC_DEBUG", None)
        out = open(self.root / f"out-{self.runs}.txt", "wb")
        # a session of its own: killpg then reaches the apply's worker processes too
        proc = subprocess.Popen([sys.executable, "-c", CHILD, "apply", str(self.spec)], cwd=self.root, env=env,
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        out.close()
        return proc, log

    def run(self, timeout: float = 600) -> tuple[int, list[dict[str, Any]], float]:
        t0 = time.perf_counter()
        proc, log = self.start()
        rc = proc.wait(timeout=timeout)
        return rc, _events(log), time.perf_counter() - t0

    def output(self) -> str:
        return (self.root / f"out-{self.runs}.txt").read_text(errors="replace")[-3000:]


def _kill_at(trial: Trial, target: int, delay: float, timeout: float = 600) -> dict[str, Any]:
    """Run until the progress log holds `target` events, wait `delay`, SIGKILL the process group."""
    t0 = time.perf_counter()
    proc, log = trial.start()
    events: list[dict[str, Any]] = []
    try:
        while proc.poll() is None and time.perf_counter() - t0 < timeout:
            events = _events(log)
            if len(events) >= target:
                time.sleep(delay)
                break
            time.sleep(0.002)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        rc = proc.wait()
    return {"rc": rc, "killed": rc == -signal.SIGKILL, "events": _events(log), "seconds": time.perf_counter() - t0}


def _state_at_kill(trial: Trial) -> dict[str, Any]:
    """What survived the kill: committed rows, filled fragments per column, the last checkpoint."""
    from ... import lance_io

    ds = lance_io.open_dataset(trial.table)
    state: dict[str, Any] = {"rows": ds.count_rows() if ds is not None else 0, "fragments": {}, "complete": []}
    if ds is not None:
        fill = lance_io.fragment_fill(ds)
        for c in COLUMNS:
            if c in ds.schema.names:
                state["fragments"][c] = len(fill.get(c, []))
                if lance_io.decode_metadata(ds.schema.field(c).metadata).get("vlmspec.fingerprint"):
                    state["complete"].append(c)
    state["steps"] = sorted(lance_io.read_sidecar(trial.table).get("steps", {}))
    ckpt = trial.root / "runs" / "chaos" / "checkpoint" / "state.pt"
    state["checkpoint_step"] = None
    if ckpt.exists():
        import torch

        state["checkpoint_step"] = int(torch.load(ckpt, map_location="cpu", weights_only=False)["step"])
    return state


def _killed_in(state: dict[str, Any], rows: int) -> str:
    """The first step the kill left unfinished."""
    if state["rows"] < rows or "ingest" not in state["steps"]:
        return "ingest"
    for c in COLUMNS:
        if c not in state["complete"]:
            return c
    return "train" if "train" not in state["steps"] else "done"


def _compare(trial: Trial, ref: Trial) -> dict[str, Any]:
    import lance
    import pyarrow.compute as pc

    from vlmspec.compiler.load import load_spec

    from ... import lance_io
    from ...apply import prepare

    a = lance.dataset(trial.table).to_table().sort_by("id")
    b = lance.dataset(ref.table).to_table().sort_by("id")
    qids = a.column("question_id")
    out = {"rows": a.num_rows, "unique_keys": len(pc.unique(qids)),
           "raw_identical": a.select(RAW).equals(b.select(RAW)),
           "derived_equal": {c: a.column(c).equals(b.column(c)) for c in COLUMNS}}
    fa = {f.name: lance_io.decode_metadata(f.metadata).get("vlmspec.fingerprint") for f in lance.dataset(trial.table).schema}
    fb = {f.name: lance_io.decode_metadata(f.metadata).get("vlmspec.fingerprint") for f in lance.dataset(ref.table).schema}
    out["fingerprints_equal"] = fa == fb
    cwd = os.getcwd()
    # plan from the trial's directory, where its applies ran
    os.chdir(trial.root)
    try:
        out["plan_empty"] = prepare(load_spec(trial.spec)).plan.is_empty
    finally:
        os.chdir(cwd)
    out["adapter_max_abs_diff"] = _adapter_diff(trial.root, ref.root)
    out["checkpoint_removed"] = not (trial.root / "runs" / "chaos" / "checkpoint").exists()
    return out


def _adapter_diff(a: Path, b: Path) -> float | None:
    from safetensors.numpy import load_file

    fa, fb = (p / "runs" / "chaos" / "adapter" / "adapter_model.safetensors" for p in (a, b))
    if not fa.exists() or not fb.exists():
        return None
    ta, tb = load_file(str(fa)), load_file(str(fb))
    if ta.keys() != tb.keys():
        return float("inf")
    return max(float(abs(ta[k].astype("float64") - tb[k].astype("float64")).max()) for k in ta)


def run(trials: int, seed: int, out: Path, *, rows: int = 128, unit: int = 32, steps: int = 9, every: int = 3,
        max_delay: float = 3.0, keep: Path | None = None, progress=None) -> Results:
    res = Results("chaos", "Chaos: SIGKILL `vlmspec apply` at random points, rerun, compare with a clean run",
                  {"trials": trials, "seed": seed, "rows": rows, "commit_rows": unit, "rows_per_fragment": unit,
                   "train_steps": steps, "checkpoint_every": every, "max_delay_s": max_delay})
    say = progress or (lambda text: None)
    tmp = Path(tempfile.mkdtemp(prefix="vlmspec-chaos-", dir=keep))
    try:
        ref = Trial(tmp / "reference", rows, unit, steps, every)
        lb = load()
        rc, ref_events, ref_s = ref.run()
        if rc != 0:
            raise RuntimeError(f"the clean reference run failed (exit {rc}):\n{ref.output()}")
        res.figure("clean", "clean apply (reference)", "s").add(ref_s, lb, load())
        ref_work = _work(ref_events)
        want = {"ingest": rows, **{c: rows for c in COLUMNS}, "train": steps}
        if ref_work != want:  # the progress log is the measuring instrument: check it first
            raise RuntimeError(f"the progress log does not count the work: {ref_work} != {want}")
        say(f"reference: {ref_s:.1f} s, {len(ref_events)} progress events")
        by_phase = {p: [i for i, e in enumerate(ref_events, 1) if STEPS[e["step"]] == p] for p in PHASES}
        # The kill lands a random fraction of the way from the target event to the next one (as the
        # clean run timed them), so fast phases (tier 1 takes milliseconds) get kills inside them too.
        times = [e["t"] for e in ref_events] + [ref_events[-1]["t"] + 1.0]
        gaps = [max(times[i + 1] - times[i], 0.001) for i in range(len(ref_events))]
        # What a kill may cost: ingest and training one checkpoint; a column two fragments, because
        # the engine computes the next fragment while the writer thread writes and commits this one
        # (a kill in that overlap loses both; `backfill.backfill_column`).
        bound = {"ingest": unit, **{c: 2 * unit for c in COLUMNS}, "train": every}
        rng = random.Random(seed)
        records: list[dict[str, Any]] = []
        order: list[str] = []
        attempts = 0
        while len([r for r in records if r["killed"]]) < trials and attempts < 2 * trials + 4:
            if not order:
                order = list(PHASES)
                rng.shuffle(order)
            phase = order.pop()
            target = rng.choice(by_phase[phase])
            delay = round(rng.uniform(0, min(gaps[target - 1], max_delay)), 3)
            attempts += 1
            rec = _trial(tmp / f"trial-{attempts:02d}", ref, rows, unit, steps, every, phase, target, delay,
                         ref_work, bound, res)
            records.append(rec)
            say(f"trial {attempts}: {phase} event {target} +{delay:.2f}s -> killed in {rec['killed_in']}, "
                f"{'survived' if rec['survived'] else 'FAILED'} ({rec['rerun_s']:.1f} s)")
            if rec["survived"] and keep is None:
                shutil.rmtree(tmp / f"trial-{attempts:02d}", ignore_errors=True)
    finally:
        if keep is None:
            shutil.rmtree(tmp, ignore_errors=True)
    killed = [r for r in records if r["killed"]]
    survived = [r for r in killed if r["survived"]]
    # rows missing, plus rows present twice (a repeated question_id)
    lost = sum(abs(r["compare"]["rows"] - rows) + (r["compare"]["rows"] - r["compare"]["unique_keys"]) for r in killed)
    res.derive("kills", "kills (SIGKILL) survived", len(survived), target=f"{len(killed)} of {len(killed)}",
               met=len(survived) == len(killed) >= trials)
    res.derive("lost", "rows lost or doubled", lost, target="0", met=lost == 0)
    res.derive("bound", "kills that recomputed at most what was in flight (ingest and training: one checkpoint; "
               "a column: the fragment being written and the one computed meanwhile)",
               sum(1 for r in killed if r["bound_ok"]), target=f"{len(killed)}",
               met=all(r["bound_ok"] for r in killed))
    res.derive("resumed", "training kills that resumed from the last checkpoint",
               sum(1 for r in killed if r["killed_in"] == "train" and r["resumed_from_checkpoint"]),
               target=str(sum(1 for r in killed if r["killed_in"] == "train")),
               met=all(r["resumed_from_checkpoint"] for r in killed if r["killed_in"] == "train"))
    phases = {p: sum(1 for r in killed if STEPS.get(r["killed_in"], "finish") == p) for p in (*PHASES, "finish")}
    res.derive("phases", "kills by where they landed (ingest / tier-1,2 / tier-3 / train / after the last step)",
               " / ".join(str(n) for n in phases.values()), met=all(phases[p] for p in PHASES),
               how="the first step the kill left unfinished, read from the table, sidecar and checkpoint")
    res.details = {"trials": records, "reference_work": ref_work, "bound": bound, "attempts": attempts,
                   "phases": phases}
    if attempts > len(killed):
        res.notes.append(f"{attempts - len(killed)} draw(s) ended before the kill landed (the apply finished "
                         "first); they are listed but not counted as kills.")
    return res


def _trial(root: Path, ref: Trial, rows: int, unit: int, steps: int, every: int, phase: str, target: int,
           delay: float, ref_work: dict[str, int], bound: dict[str, int], res: Results) -> dict[str, Any]:
    trial = Trial(root, rows, unit, steps, every)
    kill = _kill_at(trial, target, delay)
    state = _state_at_kill(trial)
    rec: dict[str, Any] = {"phase": phase, "target_event": target, "delay_s": delay, "killed": kill["killed"],
                           "kill_rc": kill["rc"], "seconds_to_kill": round(kill["seconds"], 2),
                           "events_before_kill": len(kill["events"]), "killed_in": _killed_in(state, rows),
                           "state_at_kill": state}
    lb = load()
    rc, events, seconds = trial.run()
    res.figure("rerun", "rerun after a kill, to the end", "s").add(seconds, lb, load())
    rec["rerun_rc"], rec["rerun_s"] = rc, round(seconds, 2)
    if rc != 0:
        rec.update(survived=False, bound_ok=False, resumed_from_checkpoint=False, output=trial.output(),
                   compare={"rows": -1, "unique_keys": -1})
        return rec
    before, after = _work(kill["events"]), _work(events)
    # work done twice = what the killed run did + what the rerun did - what one clean run does
    recomputed = {s: before.get(s, 0) + after.get(s, 0) - ref_work[s] for s in ref_work}
    rec["recomputed"] = {s: n for s, n in recomputed.items() if n}
    rec["bound_ok"] = all(0 <= recomputed[s] <= bound[s] for s in recomputed)
    ckpt = state["checkpoint_step"]
    # resumed iff the rerun trained only the steps after the last checkpoint (none at all when
    # training had finished before the kill)
    rec["resumed_from_checkpoint"] = after.get("train", 0) == steps - (ckpt or 0) if "train" not in state["steps"] \
        else after.get("train", 0) == 0
    cmp = _compare(trial, ref)
    rec["compare"] = cmp
    rec["survived"] = (kill["killed"] and cmp["rows"] == rows and cmp["unique_keys"] == rows and cmp["raw_identical"]
                       and all(cmp["derived_equal"].values()) and cmp["fingerprints_equal"] and cmp["plan_empty"]
                       and cmp["checkpoint_removed"] and cmp["adapter_max_abs_diff"] == 0.0 and rec["bound_ok"]
                       and rec["resumed_from_checkpoint"])
    return rec
