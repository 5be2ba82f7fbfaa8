"""Apply a plan: ingest, backfill columns in dependency order, curate and split, train, evaluate.

The plan is rebuilt from the table after ingest, so every step works from what is really there;
each step is resumable on its own, and a run record is written whatever happens.
"""

from __future__ import annotations

import fcntl
import os
import time
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping

from vlmspec.compiler.compile import Compiled, compile_spec
from vlmspec.compiler.errors import ApplyError, PlanBlocked, Problem, VlmspecError
from vlmspec.compiler.load import LoadedSpec
from vlmspec.compiler.paths import shown
from vlmspec.compiler.plan import Plan, build_plan
from vlmspec.compiler.state import TableState

from . import history, lance_io
from .backfill import shared_pool, backfill_column
from .progress import NullReporter, Reporter
from .executors import open_executor
from .guards import check_saved_plan, storage_errno, storage_error
from .sources.ingest import ingest, source_info

UNTIL = ("ingest", "features", "curate", "train", "eval")


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


def prepare(loaded: LoadedSpec, *, allow_destructive: bool = False) -> Prepared:
    """Read the table's state (metadata only), compile, diff: everything `plan` shows."""
    spec = loaded.spec
    rows, schema = source_info(spec.source)
    state = lance_io.read_state(spec.source.table, source_rows=rows, source_schema=schema)
    compiled = compile_spec(spec, state, file=loaded.file, spec_hash=loaded.source_hash,
                            facts=model_facts(spec), locate=loaded.locate, spec_dir=Path(loaded.file).parent,
                            written=loaded.written if loaded.base_dir else None)
    from .executors import executor_facts

    # Where the plan would run, as data (the compiler imports no Ray): totals of the Ray cluster, or
    # this machine's cores (and CUDA devices when a column asks for GPUs).
    executor = {"kind": spec.executor.kind, "address": spec.executor.address, "workers": spec.executor.workers,
                "cpus": os.cpu_count() or 1,
                **executor_facts(spec.executor, needs_gpus=any(c.gpus for c in compiled.columns))}
    plan = build_plan(compiled, state, allow_destructive=allow_destructive, executor=executor)
    return Prepared(loaded, compiled, state, plan)


@contextmanager
def table_lock(table: str) -> Iterator[None]:
    """One apply per table at a time: a second one refuses at once with the holder's pid."""
    d = lance_io.sidecar_dir(table)
    d.mkdir(parents=True, exist_ok=True)
    path = d / "apply.lock"
    f = open(path, "a+")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        # The holder writes its pid right after taking the lock: a refusal that lands in between
        # reads an empty file, so wait (briefly) for the pid to appear.
        holder = ""
        for _ in range(50):
            f.seek(0)
            holder = f.read().strip()
            if holder:
                break
            time.sleep(0.02)
        f.close()
        holder = holder or "?"
        raise ApplyError(Problem(f"another `vlmspec apply` (pid {holder}) is running on `{table}`",
                                 fix="Wait for it to finish; the table is safe")) from None
    f.truncate(0)
    f.write(str(os.getpid()))
    f.flush()
    try:
        yield
    finally:
        f.truncate(0)  # no stale pid for the next refusal to read before the next holder writes its own
        f.flush()
        fcntl.flock(f, fcntl.LOCK_UN)
        f.close()


def needed(compiled: Compiled, targets: list[str], until: str | None) -> tuple[set[str], set[str]]:
    """Columns and stages to run for --target / --until (their ancestors included)."""
    cols = {c.name: c for c in compiled.columns}
    stage_names = [s.name for s in compiled.stages]
    if until is not None:
        keep = UNTIL[: UNTIL.index(until) + 1]
        stages = {s for s in stage_names if s == "ingest" or
                  (s in ("curate", "split") and "curate" in keep) or (s == "train" and "train" in keep) or
                  (s == "eval" and "eval" in keep)}
        columns = set(cols) if "features" in keep else set()
    else:
        stages, columns = set(stage_names), set(cols)
    if not targets:
        return columns, stages
    unknown = [t for t in targets if t not in cols and t not in stage_names]
    if unknown:
        from vlmspec.compiler.errors import did_you_mean

        raise ApplyError([Problem(f"unknown target `{t}`", "--target",
                                  fix=did_you_mean(t, list(cols) + stage_names) or
                                  f"Targets: {', '.join(list(cols) + stage_names)}") for t in unknown])
    want_cols, want_stages = set(), {"ingest"} & set(stage_names)
    order = {"curate": [], "split": ["curate"], "train": ["curate", "split"], "eval": ["train", "split", "curate"]}

    def add_col(name: str) -> None:
        if name in cols and name not in want_cols:
            want_cols.add(name)
            for i in cols[name].inputs:
                add_col(i)

    for t in targets:
        if t in cols:
            add_col(t)
        else:
            for s in [t] + order.get(t, []):
                if s in stage_names:
                    want_stages.add(s)
                    for c in compiled.stage(s).reads:
                        add_col(c)
    return want_cols & columns if until else want_cols, want_stages & stages if until else want_stages


@dataclass
class ApplyResult:
    record: history.RunRecord
    plan_before: Plan
    plan_after: Plan | None = None
    summary: list[str] = field(default_factory=list)
    current: str = ""
    """The step running now (named in an I/O error)."""


def apply(loaded: LoadedSpec, *, allow_destructive: bool = False, targets: list[str] | None = None,
          until: str | None = None, reporter: Reporter | None = None, workers: int | None = None,
          device: str | None = None, saved_plan: Mapping[str, Any] | None = None) -> ApplyResult:
    """Run what the plan says; with `saved_plan` (a `vlmspec plan --out` JSON) only if it still holds."""
    reporter = reporter or NullReporter()
    spec = loaded.spec
    table = spec.source.table
    with table_lock(table):
        prep = prepare(loaded, allow_destructive=allow_destructive)
        if saved_plan is not None:  # checked under the lock: nothing else can move the table now
            check_saved_plan(saved_plan, prep.plan)
        if prep.plan.blocked:
            names = ", ".join(f"`{s.name}`" for s in prep.plan.blocked)
            raise PlanBlocked(Problem(f"the plan has destructive steps: {names}",
                                      fix="Review `vlmspec plan`, then rerun with --allow-destructive"))
        record = history.RunRecord(loaded.file, loaded.source_hash, loaded.text, table,
                                   version_before=prep.state.version,
                                   secrets=history.secret_values(spec.vars))  # `--var hf_token=...`
        result = ApplyResult(record, prep.plan)
        try:
            _run(prep, result, targets or [], until, reporter, workers, device)
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
            try:
                record.save()
            except OSError:  # the disk that just failed may refuse the record too; the error says why
                pass
        result.plan_after = prepare(loaded, allow_destructive=allow_destructive).plan
        return result


def _run(prep: Prepared, result: ApplyResult, targets: list[str], until: str | None,
         reporter: Reporter, workers: int | None, device: str | None) -> None:
    loaded, spec = prep.loaded, prep.loaded.spec
    table, record = spec.source.table, result.record
    want_cols, want_stages = needed(prep.compiled, targets, until)

    # 1. ingest
    if prep.plan.ingest is not None and prep.plan.ingest.kind != "up_to_date":
        result.current = "ingest"
        run = ingest(spec.source, reporter, total=prep.plan.expected_rows)
        node = prep.compiled.stage("ingest")
        ds = lance_io.open_dataset(table)
        history.record_step(table, "ingest", node.fingerprint, ds.version, ds.count_rows(), {"recipe": node.recipe})
        record.add_step("ingest", "ingest", run.rows, run.seconds, skipped=run.skipped)
        result.summary.append(f"ingest: {run.rows:,} rows in {run.seconds:.1f} s")
        prep = prepare(loaded, allow_destructive=True)  # re-diff against what is really there now

    # 2. drops (only reached when allowed)
    drops = [s.name for s in prep.plan.columns if s.kind == "drop"]
    if drops and not targets:
        ds = lance_io.open_dataset(table)
        ds.drop_columns(drops)
        record.add_step("drop", "drop", 0, 0.0, columns=drops)
        result.summary.append("dropped: " + ", ".join(f"`{d}`" for d in drops))

    # 3. columns, in dependency order
    steps = {s.name: s for s in prep.plan.columns}
    errors_log = lance_io.sidecar_dir(table) / "errors.jsonl"
    todo = [n for n in prep.compiled.columns if n.name in want_cols and steps[n.name].kind != "up_to_date"]
    with ExitStack() as stack:
        # The Ray executor (started or joined once per apply, and only when there is work) places the
        # chunks on a cluster; None is the local executor. Commits happen here either way.
        ex = stack.enter_context(open_executor(spec.executor, workers, device)) if todo else None
        if ex is None:
            stack.enter_context(shared_pool())  # one local worker pool for every column of this apply
        nworkers = workers or spec.executor.workers or (None if ex is not None else os.cpu_count() or 1)
        for node in todo:
            _backfill_one(prep, result, node, steps[node.name], ex, nworkers, device, reporter, errors_log)

    # 4. downstream steps, each only when stale
    prep = prepare(loaded, allow_destructive=True)
    stale = {s.name for s in prep.plan.stages if s.kind != "up_to_date"}
    for name in ("curate", "split", "train", "eval"):
        if name not in want_stages or name not in stale:
            continue
        if name == "curate" and "split" in want_stages:
            continue  # curate and split are built together (the slice holds both sides)
        result.current = name
        if name == "split" or (name == "curate" and spec.split is None):
            _run_slice(prep, result)
        elif name == "train":
            _run_train(prep, result, device)
        elif name == "eval":
            _run_eval(prep, result, device)


def _backfill_one(prep: Prepared, result: ApplyResult, node, step, ex, nworkers: int | None, device: str | None,
                  reporter: Reporter, errors_log: Path) -> None:
    spec, table, record = prep.loaded.spec, prep.loaded.spec.source.table, result.record
    result.current = node.name
    # Under Ray, an actor picks its own device (the driver may have no GPU) unless --device says.
    dev = device or (None if ex is not None else _default_device(node))
    run = backfill_column(table, node, model_spec=spec.model, device=dev, workers=nworkers,
                          reporter=reporter, errors_log=errors_log, key=spec.source.key, executor=ex)
    record.add_step(node.name, step.kind, run.rows, run.seconds, fingerprint=node.fingerprint,
                    udf=node.udf, errors=run.errors, fragments=run.fragments)
    if run.rows_per_s:
        history.record_throughput(table, node.udf, run.rows_per_s)
    text = f"{node.name}: {run.rows:,} rows in {run.seconds:.1f} s"
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
    from .curate import build_slice

    spec, table = prep.loaded.spec, prep.loaded.spec.source.table
    ds = lance_io.open_dataset(table)
    t0 = time.perf_counter()
    split = spec.split
    if split is None:
        from vlmspec.compiler.model import SplitSpec

        split = SplitSpec(fraction=None)
    res = build_slice(table, ds.version, spec.curation, split, lance_io.sidecar_dir(table) / "slices",
                      key=spec.source.key)
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
    if res.dedup_removed:
        text += f", {res.dedup_removed} near-duplicates dropped"
    if leak.get("checked"):
        text += f"; leakage: {leak.get('exact', 0)} identical and {leak.get('near', 0)} near-duplicate eval images"
    result.summary.append(text)


def _run_train(prep: Prepared, result: ApplyResult, device: str | None) -> None:
    from .train.loader import drop_pins
    from .train.loop import train_from_spec

    t0 = time.perf_counter()
    table = prep.loaded.spec.source.table
    try:
        out = train_from_spec(prep, device=device)
    finally:  # clones the loader pinned its version with: the next run pins its own
        drop_pins(table)
    node = prep.compiled.stage("train")
    history.record_step(table, "train", node.fingerprint, out["table_version"], out["rows"],
                        {"recipe": node.recipe, **out})
    result.record.add_step("train", "run", out["rows"], time.perf_counter() - t0,
                           **{k: v for k, v in out.items() if k not in ("rows", "seconds")})
    result.summary.append(f"train: {out['steps']} steps, final loss {out['final_loss']:.3f} -> {shown(out['adapter'])}")


def _run_eval(prep: Prepared, result: ApplyResult, device: str | None) -> None:
    from .eval.evaluate import evaluate_from_spec

    t0 = time.perf_counter()
    out = evaluate_from_spec(prep, device=device)
    node = prep.compiled.stage("eval")
    table = prep.loaded.spec.source.table
    history.record_step(table, "eval", node.fingerprint, out["table_version"], out["n"],
                        {"recipe": node.recipe, **{k: v for k, v in out.items() if k != "rows"}})
    result.record.add_step("eval", "run", out["n"], time.perf_counter() - t0, results=out)
    result.summary.append(out["summary"])
