"""Apply a plan: ingest, backfill columns in dependency order, curate and split, train, evaluate.

The plan is rebuilt from the table after ingest, so every step works from what is really there;
each step is resumable on its own, and a run record is written whatever happens.
"""

from __future__ import annotations

import dataclasses
import os
import time
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

from typing_extensions import assert_never

from vlmspec.compiler.compile import Compiled, compile_spec
from vlmspec.compiler.errors import ApplyError, PlanBlocked, Problem, VlmspecError
from vlmspec.compiler.load import LoadedSpec
from vlmspec.compiler.paths import shown
from vlmspec.compiler.plan import Backfill, BuildSlice, Drop, Evaluate, Ingest, Plan, Train, build_plan, select
from vlmspec.compiler.state import TableState

from . import history, lance_io
from .backfill import backfill_column
from .progress import NullReporter, Reporter
from .executors import open_executor
from .guards import check_saved_plan, storage_errno, storage_error
from .interrupt import kept_ctrl_c
from .lock import table_lock
from .prefetch import Prefetch
from .sources.ingest import ingest, source_info



@dataclass
class Prepared:
    loaded: LoadedSpec
    compiled: Compiled
    state: TableState
    plan: Plan


def model_facts(spec):
    """Facts about the model the compiler needs (hidden size, processor hash), without loading it."""
    if spec.model is None:
        return None
    from vlmspec.compiler.catalog import ModelFacts

    try:
        from .vlm.models import model_facts as read_facts
    except ImportError:  # the model runtime is optional for data-only specs
        read_facts = None
    if read_facts is not None:
        try:
            return read_facts(spec.model)
        except VlmspecError:
            raise
        except Exception as e:  # unreadable config: fall back to the spec's own numbers, below
            if spec.model.hidden_size is None:
                raise ApplyError(Problem(f"cannot read model `{spec.model.id}`: {e}", "model.id",
                                         fix="Set `model.hidden_size` or make the model available locally")) from e
    if spec.model.hidden_size is None:
        return None
    return ModelFacts(spec.model.id, spec.model.revision, spec.model.hidden_size)


def prepare(loaded: LoadedSpec, *, allow_destructive: bool = False, workers: int | None = None,
            replace_steps: tuple[str, ...] | list[str] = (), device: str | None = None) -> Prepared:
    """Read the table's state (metadata only), compile, diff: everything `plan` shows."""
    from dataclasses import replace

    spec = loaded.spec
    rows, schema = source_info(spec.source)
    state = lance_io.read_state(spec.source.table, source_rows=rows, source_schema=schema)
    # A step's record is only as good as the outputs it names: a deleted adapter reruns training.
    state = replace(state, steps=history.check_outputs(state.steps, _expected_outputs(spec)),
                    error_rows=_error_rows(spec.source.table))
    compiled = compile_spec(spec, state, file=loaded.file, spec_hash=loaded.source_hash,
                            facts=model_facts(spec), locate=loaded.locate, spec_dir=Path(loaded.file).parent,
                            written=loaded.written if loaded.base_dir else None)
    from .executors import executor_facts

    # Where the plan would run, as data (the compiler imports no Ray): totals of the Ray cluster, or
    # this machine's cores (and CUDA devices when a column asks for GPUs).
    executor = {"kind": spec.executor.kind, "address": spec.executor.address,
                "workers": workers or spec.executor.workers,
                "cpus": os.cpu_count() or 1,
                **executor_facts(spec.executor, needs_gpus=any(c.gpus for c in compiled.columns)),
                **(_device_facts(device) if spec.train is not None else {})}
    plan = build_plan(compiled, state, allow_destructive=allow_destructive, executor=executor,
                      replace_steps=tuple(replace_steps))
    if spec.executor.kind == "geneva" and state.exists:
        from .executors.geneva_exec import cross_check

        checked = cross_check(spec.source.table, plan.columns)
        if checked:
            plan = replace(plan, executor={**plan.executor, "geneva_plan": checked})
    return Prepared(loaded, compiled, state, plan)


@dataclass
class ApplyResult:
    record: history.RunRecord
    plan_before: Plan
    plan_after: Plan | None = None
    summary: list[str] = field(default_factory=list)
    current: str = ""
    """The step running now (named in an I/O error)."""


def _expected_outputs(spec) -> dict[str, Path]:
    """Where this spec's train and eval steps put what they make (the plan checks they are there)."""
    from .eval.job import eval_dir
    from .train.job import output_dir

    out: dict[str, Path] = {}
    if spec.train is not None:
        out["train"] = output_dir(spec.name, spec.train) / "adapter"
    if spec.eval is not None:
        out["eval"] = eval_dir(spec) / "report.md"
    return out


def _device_facts(device: str | None) -> dict[str, Any]:
    """The training device as the plan needs it: is it CUDA, and how much memory is free there (the
    `auto` checkpointing decision). Only asked for specs that train (it imports torch)."""
    try:
        import torch
    except ImportError:
        return {"cuda": False}
    cuda = torch.cuda.is_available() and (device is None or device.startswith("cuda"))
    if not cuda:
        return {"cuda": False}
    index = torch.device(device or "cuda").index or 0
    free, total = torch.cuda.mem_get_info(index)
    return {"cuda": True, "gpu_free": int(free), "gpu_total": int(total)}


def _error_rows(table: str) -> dict[str, frozenset[int]]:
    from .row_errors import current_errors

    out: dict[str, set[int]] = {}
    for e in current_errors(table):
        out.setdefault(e["column"], set()).add(int(e["row_addr"]))
    return {k: frozenset(v) for k, v in out.items()}


@dataclass(frozen=True)
class Options:
    """How one apply was asked to run (the CLI's flags)."""

    allow_destructive: bool = False
    targets: tuple[str, ...] = ()
    until: str | None = None
    replace: tuple[str, ...] = ()
    """`--replace NAME`: rerun these columns or steps even when they are up to date."""
    workers: int | None = None
    device: str | None = None


def apply(loaded: LoadedSpec, *, allow_destructive: bool = False, targets: list[str] | None = None,
          until: str | None = None, reporter: Reporter | None = None, workers: int | None = None,
          device: str | None = None, saved_plan: Mapping[str, Any] | None = None,
          replace: list[str] | tuple[str, ...] = (), on_plan: Callable[[Plan], None] | None = None
          ) -> ApplyResult | None:
    """Run what the plan says; with `saved_plan` (a `vlmspec plan --out` JSON) only if it still holds.
    `on_plan` sees the plan before any work starts (the CLI prints it, as terraform does).

    Under an external launcher (torchrun) every rank calls this: rank 0 applies, the others only
    train their shards when rank 0 reaches the train step, and return None."""
    from .train.launch import follow, from_environment, ranks_session, share_job

    opts = Options(allow_destructive, tuple(targets or ()), until, tuple(replace), workers, device)
    reporter = reporter or NullReporter()
    ranks = from_environment()
    if ranks is None:
        return _apply(loaded, opts, reporter, saved_plan, on_plan)
    with ranks_session(ranks, device) as control:
        if ranks.rank != 0:
            follow(ranks, control, device)
            return None
        try:
            return _apply(loaded, opts, reporter, saved_plan, on_plan,
                          ranked=(lambda job: share_job(job, control), ranks.device(device)))
        finally:
            share_job(None, control)  # the waiting ranks leave, whether or not there was training


def _apply(loaded: LoadedSpec, opts: Options, reporter: Reporter, saved_plan: Mapping[str, Any] | None,
           on_plan: Callable[[Plan], None] | None, ranked: tuple | None = None) -> ApplyResult:
    spec = loaded.spec
    table = spec.source.table
    with table_lock(table):
        prep = prepare(loaded, allow_destructive=opts.allow_destructive, workers=opts.workers,
                       replace_steps=opts.replace, device=opts.device)
        if saved_plan is not None:  # checked under the lock: nothing else can move the table now
            check_saved_plan(saved_plan, prep.plan)
        if prep.plan.blocked:
            names = ", ".join(f"`{s.name}`" for s in prep.plan.blocked)
            raise PlanBlocked(Problem(f"the plan has destructive steps: {names}",
                                      fix="Review `vlmspec plan`, then rerun with --allow-destructive"))
        result = ApplyResult(_new_record(loaded, prep), select(prep.plan, opts.targets, opts.until))
        record = result.record
        if on_plan is not None:
            on_plan(result.plan_before)
        _save(record)  # from now on a kill leaves a record that `vlmspec log` reads as killed
        try:
            _run(prep, result, opts, reporter, ranked)
            record.status = "ok"
        except KeyboardInterrupt:
            record.status = "interrupted"
            raise
        except VlmspecError as e:
            record.status, record.error = "failed", str(e)
            raise
        except Exception as e:
            if storage_errno(e) is not None:  # a full disk or a read-only table: a clear error, no traceback
                err = storage_error(e, table, result.current)
                record.status, record.error = "failed", str(err)
                raise err from e
            record.status, record.error = "crashed", f"{type(e).__name__}: {e}"
            raise
        finally:
            ds = lance_io.open_dataset(table)
            record.version_after = ds.version if ds is not None else None
            record.finished = time.time()
            _save(record)
        result.plan_after = prepare(loaded, allow_destructive=opts.allow_destructive, workers=opts.workers).plan
        return result


def _new_record(loaded: LoadedSpec, prep: Prepared) -> history.RunRecord:
    return history.RunRecord(loaded.file, loaded.source_hash, loaded.text, loaded.spec.source.table,
                             version_before=prep.state.version,
                             secrets=history.secret_values(loaded.spec.vars))  # `--var hf_token=...`


def _save(record: history.RunRecord) -> None:
    try:
        record.save()
    except OSError:  # a disk that just failed may refuse the record too; the step's error says why
        pass


def _run(prep: Prepared, result: ApplyResult, opts: Options, reporter: Reporter, ranked: tuple | None = None) -> None:
    """Walk the selected plan's steps in order. The table changes under the plan only at ingest
    (rows appear): the plan is rebuilt from the table then, and the walk goes on with it. The run
    record is saved after every step, so a killed apply still says what it committed."""
    workers, device = opts.workers, opts.device
    plan = result.plan_before
    ingest_step = plan.ingest
    errors_log = lance_io.sidecar_dir(prep.loaded.spec.source.table) / "errors.jsonl"
    with ExitStack() as stack:
        # One executor (a local spawn pool, or a Ray cluster joined once) for every column of this
        # apply, and only when a column has work: ingest, train and eval never need one. When the
        # plan already has columns to compute, it opens before ingest and its CPU workers start
        # while ingest runs (`prewarm`), so the first tier-2 column does not pay their start-up.
        ex = None

        def executor():
            nonlocal ex
            if ex is None:
                ex = stack.enter_context(open_executor(prep.loaded.spec.executor, workers, device))
            return ex

        if ingest_step is not None and ingest_step.todo:
            _prewarm(executor, plan, workers)
            with kept_ctrl_c():  # lance's write drops a Ctrl-C it saw while blocking
                _run_ingest(prep, result, reporter, workers)
            _save(result.record)
            prep = prepare(prep.loaded, allow_destructive=True, workers=workers, replace_steps=opts.replace,
                           device=device)
            plan = select(prep.plan, opts.targets, opts.until)
        steps = [s for s in plan.steps if s.todo and not isinstance(s, Ingest)]
        if any(isinstance(s, Backfill) for s in steps):
            executor()
        # The model's imports, on a thread while a step's work runs in worker processes; joined
        # before the next step, which needs them (`Prefetch.before`: the last step never starts
        # one). A daemon thread: a failing or interrupted apply does not wait for it.
        prefetch = None
        for i, step in enumerate(steps):
            if prefetch is not None:
                result.record.prefetch, prefetch = prefetch.join(), None
                result.summary.append(Prefetch.summary(result.record.prefetch))
            result.current = step.name
            prefetch = Prefetch.before(prep.loaded.spec.model, steps, i)
            if prefetch is not None:
                prefetch.start()
            with kept_ctrl_c():
                _run_step(prep, result, step, ex, workers, device, reporter, errors_log, ranked)
            _save(result.record)


def _run_step(prep: Prepared, result: ApplyResult, step: Any, ex: Any, workers: int | None, device: str | None,
              reporter: Reporter, errors_log: Path, ranked: tuple | None) -> None:
    match step:
        case Drop():
            _run_drop(prep, result, step)
        case Backfill():
            _backfill_one(prep, result, step, ex, workers, device, reporter, errors_log)
        case BuildSlice():
            _run_slice(prep, result)
        case Train():
            _run_train(prep, result, step, device, reporter, ranked)
        case Evaluate():
            _run_eval(prep, result, step, device, reporter)
        case Ingest():  # ran above, before the re-plan
            raise AssertionError("ingest after the re-plan")
        case _:
            assert_never(step)


def _prewarm(executor, plan, workers: int | None) -> None:
    """Open the executor and start its CPU workers for the columns the plan places on processes."""
    steps = [s for s in plan.steps if isinstance(s, Backfill) and s.todo and s.place is not None
             and s.place.where == "processes"]
    if not steps:
        return
    ex = executor()
    if hasattr(ex, "prewarm"):
        ex.prewarm([s.node for s in steps], steps[0].place.workers or workers)


def _run_ingest(prep: Prepared, result: ApplyResult, reporter: Reporter, workers: int | None) -> None:
    spec, table = prep.loaded.spec, prep.loaded.spec.source.table
    result.current = "ingest"
    # Ingest runs here whatever the executor: `--workers`, else `executor.workers`, else every core.
    run = ingest(spec.source, reporter, total=prep.plan.expected_rows, workers=workers or spec.executor.workers)
    node = prep.compiled.stage("ingest")
    ds = lance_io.open_dataset(table)
    history.record_step(table, "ingest", node.fingerprint, ds.version, ds.count_rows(), {"recipe": node.recipe})
    result.record.add_step("ingest", "ingest", run.rows, run.seconds, skipped=run.skipped)
    result.summary.append(f"ingest: {run.rows:,} rows in {run.seconds:.1f} s")


def _run_drop(prep: Prepared, result: ApplyResult, step: Drop) -> None:
    # Reached only when allowed: `apply` refuses a plan with blocked steps before walking it.
    lance_io.open_dataset(prep.loaded.spec.source.table).drop_columns([step.name])
    result.record.add_step(step.name, "drop", 0, 0.0)
    result.summary.append(f"dropped: `{step.name}`")


def _backfill_one(prep: Prepared, result: ApplyResult, step: Backfill, ex, workers: int | None,
                  device: str | None, reporter: Reporter, errors_log: Path) -> None:
    spec, table, record = prep.loaded.spec, prep.loaded.spec.source.table, result.record
    node = step.node
    # Under Ray, an actor picks its own device (the driver may have no GPU) unless --device says.
    dev = device or (None if getattr(ex, "remote", False) else _default_device(node))
    run = backfill_column(table, node, action=step.kind, field=step.fills, place=step.place, model_spec=spec.model,
                          device=dev,
                          workers=workers, reporter=reporter, errors_log=errors_log, key=spec.source.key,
                          executor=ex)
    # setup_s (model load + compile) and the compile cache's warm/cold start are what a second
    # apply of the column should no longer pay; `vlmspec bench apply` reads them from here.
    stats = run.udf_stats or {}
    warmup = stats.get("warmup")
    record.add_step(node.name, step.kind, run.rows, run.seconds, fingerprint=node.fingerprint,
                    udf=node.udf, errors=run.errors, fragments=run.fragments, setup_s=round(run.setup_s, 2),
                    **({"warmup": warmup} if warmup else {}),
                    **({"setup_parts": stats["setup"]} if stats.get("setup") else {}))
    if run.rows_per_s:
        history.record_throughput(table, node.udf, run.rows_per_s)
    text = f"{node.name}: {run.rows:,} rows in {run.seconds:.1f} s"
    if warmup:
        text += f" (compile {warmup['seconds']:.1f} s, {warmup['start']} start)"
    if run.errors:
        text += f", {run.errors} row errors (see `vlmspec errors`)"
    result.summary.append(text)


def _default_device(node) -> str:
    if not node.uses_model:
        return "cpu"
    try:
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"
    except ImportError:
        return "cpu"


def _run_slice(prep: Prepared, result: ApplyResult) -> None:
    import numpy as np

    from .curate import build_slice
    from .row_errors import current_errors

    spec, table = prep.loaded.spec, prep.loaded.spec.source.table
    ds = lance_io.open_dataset(table)
    t0 = time.perf_counter()
    split = spec.split
    if split is None:
        from vlmspec.compiler.model import SplitSpec

        split = SplitSpec(fraction=None)
    # Rows a UDF failed on under `on_error: null` hold null in the columns training reads: they are
    # left out of both sides by construction, not found by the loader mid-training.
    reads = {spec.train.hiddens, spec.train.tokens} if spec.train is not None else set()
    failed = np.array(sorted({e["row_addr"] for e in current_errors(table, reads)}), dtype=np.uint64)
    res = build_slice(table, ds.version, spec.curation, split, lance_io.sidecar_dir(table) / "slices",
                      key=spec.source.key, exclude=failed)
    seconds = time.perf_counter() - t0
    detail = res.to_dict()
    for name in ("curate", "split"):
        node = prep.compiled.stage(name)
        if node is not None:
            history.record_step(table, name, node.fingerprint, res.table_version,
                                res.train_rows if name == "curate" else res.eval_rows,
                                {"recipe": node.recipe, "slice": detail})
    result.record.add_step("curate", "run", res.train_rows + res.eval_rows, seconds, slice=detail)
    leak = res.leakage
    text = f"slice: {res.train_rows:,} train / {res.eval_rows:,} eval rows"
    if res.left_out:
        text += f", {res.left_out:,} left out: recorded row errors"
    if res.dedup_removed:
        text += f", {res.dedup_removed} near-duplicates dropped"
    if leak.get("checked"):
        text += f"; leakage: {leak.get('exact', 0)} identical and {leak.get('near', 0)} near-duplicate eval images"
    result.summary.append(text)


def _run_train(prep: Prepared, result: ApplyResult, step: Train, device: str | None, reporter: Reporter,
               ranked: tuple | None = None) -> None:
    """`ranked`: (share, device) under an external launcher: the job goes to every rank first."""
    from .train.job import TrainJob
    from .train.loader import drop_pins
    from .train.start import train

    t0 = time.perf_counter()
    table = prep.loaded.spec.source.table
    job = TrainJob.from_prepared(prep)  # read now: the slice it trains on was recorded by this walk
    if step.forced:
        job = dataclasses.replace(job, fresh=True)
    try:
        if ranked is None:
            out = train(job, device=device, reporter=reporter)
        else:
            share, rank_device = ranked
            out = train(job, device=rank_device, reporter=reporter, share=share)
    finally:  # clones the loader pinned its version with: the next run pins its own
        drop_pins(table)
    history.record_step(table, "train", step.fingerprint, out["table_version"], out["rows"],
                        {"recipe": step.node.recipe, **out})
    result.record.add_step("train", "run", out["rows"], time.perf_counter() - t0,
                           **{k: v for k, v in out.items() if k not in ("rows", "seconds")})
    result.summary.append(f"train: {out['steps']} steps, final loss {out['final_loss']:.3f} -> {shown(out['adapter'])}")


def _run_eval(prep: Prepared, result: ApplyResult, step: Evaluate, device: str | None, reporter: Reporter) -> None:
    from .eval.evaluate import evaluate
    from .eval.job import EvalJob

    t0 = time.perf_counter()
    out = evaluate(EvalJob.from_prepared(prep, result.record.run_id), device=device, reporter=reporter)
    table = prep.loaded.spec.source.table
    history.record_step(table, "eval", step.fingerprint, out["table_version"], out["n"],
                        {"recipe": step.node.recipe, **{k: v for k, v in out.items() if k != "rows"}})
    result.record.add_step("eval", "run", out["n"], time.perf_counter() - t0, results=out)
    result.summary.append(out["summary"])
