"""The Geneva executor: vlmspec decides what to run, Geneva (LanceDB's UDF-and-backfill engine on
Ray) runs it. For teams whose feature backfills already run on Geneva.

What runs where:
- The driver (the `vlmspec apply` process) plans, prepares the column exactly as under the other
  executors (an all-null field carrying `vlmspec.target`, `runtime/backfill.py`), and then asks
  Geneva to backfill it: `Table.backfill(field, udf=...)`, which reads the column's inputs, calls
  the UDF on Ray actors, checkpoints each batch in the table's `_ckp` store and commits completed
  fragments with `DataReplacement`s. When Geneva is done the driver writes `vlmspec.fingerprint`
  (the column is complete), as everywhere.
- The UDF Geneva calls (`_GenevaColumn`) is our own: the very `invoke.compute` the local executor
  runs on each batch, so values are the same bytes, and `on_error` isolates bad rows the same way.
  It is stateful: a model UDF is built (the model loaded) once per Geneva actor, on the GPU when the
  column's `resources.gpus` asks for one (Geneva's `num_gpus`). Geneva's UDF `version` is our
  fingerprint, so Geneva's checkpoints of an old recipe are never reused for a new one.
- Row errors: Geneva's workers append them to a spool under `<table>.vlmspec/geneva/`; the driver
  moves them into `errors.jsonl` (same records as the local executor's) when the column ends, or,
  under `on_error: fail`, names the first bad row in the error.
- Resume: a killed apply leaves the column "being filled" with the fragments Geneva committed;
  the next apply's plan says `resume` and Geneva backfills the rows still null (its default
  `where`), reusing the checkpointed batches of the killed run.

The address: none / `local` starts Geneva's local Ray context on this machine (shut down after the
apply); `auto` or `ray://head:10001` joins a Ray cluster; `kuberay:<name>` opens the Geneva
cluster of that name (`db.context(cluster=...)`, defined with Geneva's own cluster API).

Geneva is proprietary (LicenseRef-Proprietary): an optional extra (`pip install 'vlmspec[geneva]'`)
imported only when a spec asks for `executor: {kind: geneva}`.
"""

from __future__ import annotations

import json
import logging
import os
import time
import warnings
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any, Iterator

import lance
import pyarrow as pa

from vlmspec.compiler.errors import ApplyError, Problem

from .. import lance_io
from ..arrow_types import to_pyarrow
from ..invoke import RowError, RowFailure, compute, describe, instantiate, load_udf
from .chunks import WorkerNode

INSTALL = "pip install 'vlmspec[geneva]'"
POLL_S = 1.0
"""How often the driver counts committed rows for the column's progress bar."""


def import_geneva():
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # its version-skew notice against lancedb: see README
            logging.getLogger("geneva").setLevel(logging.ERROR)
            import geneva
    except ImportError as e:
        raise ApplyError(Problem(f"`executor.kind: geneva` needs Geneva, which is not installed ({e})",
                                 "executor.kind",
                                 fix=f"Install the extra: {INSTALL}; or use `executor: {{kind: local}}` "
                                     "or `{kind: ray}`")) from None
    return geneva


def _split(uri: str) -> tuple[str, str]:
    """(database folder, table name) of a Lance table's uri: Geneva opens tables by name."""
    base, _, leaf = uri.rstrip("/").rpartition("/")
    name = leaf[:-len(".lance")] if leaf.endswith(".lance") else leaf
    return base or ".", name


def _abs(path: str) -> str:
    return path if "://" in path else os.path.abspath(path)


def cluster_facts(address: str | None, *, needs_gpus: bool = False) -> dict[str, Any]:
    """Where the plan would run. Geneva is imported here so a missing extra fails at plan time; its
    Ray cluster is not started for a plan (a local one would have this machine's totals)."""
    import_geneva()
    from . import local_gpus

    addr = address or "local"
    import ray

    if ray.is_initialized():  # a cluster this process joined already: the executor will use it
        res = ray.cluster_resources()
        return {"address": addr, "cpus": res.get("CPU", 0.0), "gpus": res.get("GPU", 0.0)}
    if addr == "local":
        return {"address": addr, "cpus": os.cpu_count() or 1, "gpus": local_gpus() if needs_gpus else None}
    return {"address": addr}


def cross_check(uri: str, steps: list[Any]) -> list[str]:
    """Geneva's own `plan_backfill` of each column the plan resumes, against the plan's rows (a new
    column has no field yet for Geneva to plan on; its rows are the table's). A line per column."""
    geneva = import_geneva()
    resumed = [s for s in steps if s.kind == "resume" and s.node is not None and s.fills]
    if not resumed:
        return []
    base, name = _split(_abs(uri))
    table = geneva.connect(base).open_table(name)
    if not hasattr(table, "plan_backfill"):  # Geneva before 0.17
        return ["Geneva here has no plan_backfill: not cross-checked"]
    out = []
    for s in resumed:
        node = s.node if s.fills == s.node.name else _renamed(s.node, s.fills)
        udf = _geneva_udf(geneva, _GenevaColumn(node, None, None, ""), node)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                gp = table.plan_backfill(s.fills, udf=udf)
        except Exception as e:  # never let the cross-check stop a plan
            out.append(f"Geneva plan_backfill `{s.name}`: unavailable ({type(e).__name__}: {e})")
            continue
        rows = int(gp.total_rows_pending)
        verdict = "agrees" if rows == s.rows else \
            f"vlmspec plans {s.rows:,}: Geneva also counts rows left null by `on_error: null`"
        out.append(f"Geneva plan_backfill `{s.name}`: {rows:,} rows in {gp.total_tasks} tasks ({verdict})")
    return out


def _renamed(node: Any, field: str) -> Any:
    from dataclasses import replace

    return replace(node, name=field)


# --- worker side ------------------------------------------------------------------------------

class _GenevaColumn:
    """The callable Geneva runs on its actors: one batch of a column's inputs (plus `_rowaddr`) in,
    the column's values out. Builds the UDF once per actor, on first call."""

    def __init__(self, node: Any, model_spec: Any, device: str | None, spool: str):
        self.node, self.model_spec, self.device, self.spool = node, model_spec, device, spool
        self.fn = None

    def _build(self) -> None:
        node = self.node
        if node.uses_model or node.gpus:
            device = self.device
            if device is None:
                from . import local_gpus

                device = "cuda" if node.gpus and local_gpus() else "cpu"
            self.fn, meta = instantiate(node, self.model_spec, device)
            # The driver stores the UDF's field metadata (e.g. the vision grid) when the column completes.
            _append(Path(self.spool) / f"meta.{os.getpid()}.json", json.dumps(meta), mode="w")
        else:
            self.fn = load_udf(WorkerNode.of(node))

    def __call__(self, batch: pa.RecordBatch) -> pa.Array:
        if self.fn is None:
            self._build()
        node = self.node
        arrays = [batch.column(c) for c in node.inputs]
        addrs = batch.column("_rowaddr").to_pylist() if "_rowaddr" in batch.schema.names else \
            [None] * batch.num_rows  # a direct call (Geneva's own checks): nothing to name rows by
        try:
            values, failures = compute(self.fn, arrays, dict(node.params), to_pyarrow(node.output), node.batch,
                                       node.on_error)
        except RowError as e:
            self._record([RowFailure(e.offset, str(e))], addrs, fatal=True)
            raise
        except Exception as e:  # a whole-batch failure under `fail` with one row
            self._record([RowFailure(0, describe(e))], addrs, fatal=True)
            raise
        if failures:
            self._record(failures, addrs)
        return values

    def _record(self, failures: list[RowFailure], addrs: list[int], fatal: bool = False) -> None:
        lines = "".join(json.dumps({"row_addr": addrs[f.offset], "error": f.error[:2000], "fatal": fatal}) + "\n"
                        for f in failures)
        _append(Path(self.spool) / f"errors.{os.getpid()}.jsonl", lines)


def _append(path: Path, text: str, mode: str = "a") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open(mode) as f:
        f.write(text)


def _geneva_udf(geneva, column: _GenevaColumn, node: Any) -> Any:
    """A Geneva UDF around `column`. Geneva hands a RecordBatch UDF every column of the table; this
    one declares its inputs (Geneva reads only those) and still gets the batch with `_rowaddr`, which
    names rows in errors: Geneva's array-UDF path would pass the input arrays alone."""
    from geneva.transformer import UDF, UDFArgType

    class _BatchWithAddresses(UDF):
        @property
        def arg_type(self):  # noqa: D401 - Geneva's validation of declared input columns
            return UDFArgType.ARRAY

        def __call__(self, *args, use_applier: bool = False, **kwargs):
            if use_applier or (len(args) == 1 and isinstance(args[0], pa.RecordBatch)):
                return column(args[0])
            return column(pa.RecordBatch.from_arrays(list(args), names=list(node.inputs)))

    # `func` stays this placeholder: Geneva validates `input_columns` (and the output type) against its
    # signature; the call goes to `column`, captured above.
    def inputs(*columns):
        raise NotImplementedError("called through _BatchWithAddresses.__call__")

    udf = _BatchWithAddresses(inputs, name=node.name, data_type=to_pyarrow(node.output),
                              input_columns=list(node.inputs), version=node.fingerprint,
                              num_cpus=node.cpus, num_gpus=node.gpus or None,
                              checkpoint_size=node.batch_size, max_checkpoint_size=node.batch_size)
    return udf


# --- driver side ------------------------------------------------------------------------------

@contextmanager
def geneva_session(address: str | None, workers: int | None = None, *, device: str | None = None,
                   ) -> Iterator["GenevaExecutor"]:
    """A `GenevaExecutor` for one apply, inside the Ray context the address names."""
    geneva = import_geneva()
    import ray

    addr = address or "local"
    with ExitStack() as stack:
        if ray.is_initialized():
            pass  # a cluster this process joined already (a test, a notebook): use it
        elif addr == "local":
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message="lance is not fork-safe")
                from geneva.runners.ray._mgr import ray_cluster

                stack.enter_context(ray_cluster(
                    local=True, log_to_driver=False, logging_level=logging.WARNING,
                    ray_init_kwargs={"num_cpus": workers, "include_dashboard": False} if workers else
                    {"include_dashboard": False}))
        elif addr.startswith("kuberay:"):
            db_ctx = _ContextOpener(geneva, addr.split(":", 1)[1])
            stack.callback(db_ctx.close)
        else:
            try:
                # Worker logs stay on the cluster: failures reach the user as our errors, and Geneva's
                # job driver is chatty (progress, dashboard probes).
                ray.init(address=addr, logging_level=logging.WARNING, log_to_driver=False)
            except Exception as e:
                raise ApplyError(Problem(f"cannot reach the Ray cluster at `{addr}`: {type(e).__name__}: {e}",
                                         "executor.address",
                                         fix="Start the cluster or fix `executor.address` (`auto`, "
                                             "`ray://head:10001`, `kuberay:<name>`, or `local`)")) from e
            stack.callback(ray.shutdown)
        yield GenevaExecutor(geneva, addr, workers, device=device)


class _ContextOpener:
    """`db.context(cluster=name)` is per database; the executor opens it on the first column's
    database and closes it at the end of the apply."""

    current: "_ContextOpener | None" = None

    def __init__(self, geneva, cluster: str):
        self.geneva, self.cluster, self.stack = geneva, cluster, ExitStack()
        self.opened = False
        _ContextOpener.current = self

    def open(self, db) -> None:
        if not self.opened:
            self.stack.enter_context(db.context(cluster=self.cluster))
            self.opened = True

    def close(self) -> None:
        _ContextOpener.current = None
        self.stack.close()


class GenevaExecutor:
    """Hands one column at a time to Geneva; `backfill.backfill_column` prepares and completes it."""

    remote = True
    """Its workers pick their own device: the driver may have no GPU."""

    def __init__(self, geneva, address: str, workers: int | None = None, *, device: str | None = None):
        self.geneva, self.address, self.workers, self.device = geneva, address, workers, device
        self.jobs: list[dict[str, Any]] = []
        """One record per Geneva job (column, job id, seconds): for run history and benchmarks."""

    def concurrency(self, node: Any, place: Any = None, workers: int | None = None) -> int:
        if place is not None and place.workers:
            return place.workers
        import ray

        from vlmspec.compiler.plan import geneva_appliers

        res = ray.cluster_resources()
        room = geneva_appliers(res.get("CPU", 1.0), node.cpus)  # beside Geneva's own actors, as the plan
        if node.gpus:
            n = min(max(1, int(res.get("GPU", 0.0) // node.gpus)), room)
        elif node.uses_model:
            n = 1
        else:
            n = room
        cap = workers or self.workers
        return min(n, cap) if cap else n

    def backfill(self, uri: str, ds: lance.LanceDataset, node: Any, sink: Any, *, model_spec: Any = None,
                 device: str | None = None, workers: int | None = None, place: Any = None) -> dict[str, str]:
        uri = _abs(uri)
        node = _absolute_impl(node)
        base, name = _split(uri)
        db = self.geneva.connect(base)
        if _ContextOpener.current is not None:
            _ContextOpener.current.open(db)
        table = db.open_table(name)
        rows = lance_io.fragment_rows(ds)
        done = set(lance_io.fragment_fill(ds).get(node.name, []))
        pending = {f: n for f, n in rows.items() if n and f not in done}
        sink.start(sum(pending.values()))
        spool = _spool_dir(uri, node)
        # A killed run's row errors of fragments it committed were spooled but never logged: log them
        # now (those rows are not recomputed); the rest are recomputed and spooled again.
        self._record_errors(spool, uri, node, sink, only=done)
        _clear(spool)
        column = _GenevaColumn(node, model_spec, device or self.device, str(spool))
        udf = _geneva_udf(self.geneva, column, node)
        started = time.perf_counter()
        job_id = None
        if pending:
            job_id = self._run(table, uri, node, udf, sink, pending, self.concurrency(node, place, workers))
        meta = self._field_metadata(spool, node, model_spec, device)
        self._record_errors(spool, uri, node, sink)
        _clear(spool)
        self.jobs.append({"column": node.name, "job_id": job_id, "seconds": round(time.perf_counter() - started, 3),
                          "fragments": len(pending)})
        return meta

    def _run(self, table, uri: str, node: Any, udf: Any, sink: Any, pending: dict[int, int], concurrency: int) -> str:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "no type annotations", DataReplacement "not stable yet"
            # commit_granularity 1: every finished fragment is committed at once, as under the other
            # executors, so a kill loses no finished fragment and the bar counts committed rows
            # (Geneva's default commits every 64 fragments).
            job = table.backfill_async(node.name, udf=udf, concurrency=concurrency, _admission_check=False,
                                       commit_granularity=1)
        counted = 0
        try:
            while not _wait(job, POLL_S):
                counted = self._advance(uri, node, sink, pending, counted)
            result = job.result()
        except ApplyError:
            raise
        except Exception as e:  # the job failed: a row under `fail`, a UDF that cannot build, a lost actor
            self._raise_failure(uri, node, sink, e)
        finally:
            _release_tracker(job)
        self._advance(uri, node, sink, pending, counted)
        status = str(getattr(result, "status", "DONE"))
        if "DONE" not in status.upper():
            self._raise_failure(uri, node, sink, RuntimeError(f"Geneva job ended {status}"))
        return getattr(result, "job_id", None)

    def _advance(self, uri: str, node: Any, sink: Any, pending: dict[int, int], counted: int) -> int:
        """Move the column's bar to the rows Geneva has committed (the bar never shows work a kill
        would lose, as under the other executors)."""
        try:
            done = set(lance_io.fragment_fill(lance.dataset(uri)).get(node.name, []))
        except Exception:  # a commit in progress: count next time
            return counted
        now = sum(n for f, n in pending.items() if f in done)
        if now > counted:
            sink.reporter.advance(sink.column, now - counted)
            sink.run.rows += now - counted
            sink.run.fragments = sum(1 for f in pending if f in done)
        return max(now, counted)

    def _raise_failure(self, uri: str, node: Any, sink: Any, e: Exception) -> None:
        spool = _spool_dir(uri, node)
        fatal = next((r for r in _read_errors(spool) if r.get("fatal")), None)
        if fatal is not None and node.on_error == "fail":
            _clear(spool)
            addr = int(fatal["row_addr"])
            frag, off = addr >> 32, addr & 0xFFFFFFFF
            from ..backfill import _keys

            key = _keys(uri, sink.key, frag, [off])[0]
            named = f", {sink.key}={key!r}" if key is not None else ""
            raise ApplyError(Problem(
                f"UDF `{node.udf}` failed on row {addr} (fragment {frag}, offset {off}{named}): {fatal['error']}",
                node.path, fix=f"Fix the UDF or the row, or set `on_error: null` on `{sink.column}`; "
                               "`vlmspec apply` resumes from the last checkpoint")) from None
        text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ApplyError(Problem(f"Geneva's backfill of `{node.name}` failed: {type(e).__name__}: {text}",
                                 node.path, fix="Committed fragments are kept; fix the cause and run "
                                                "`vlmspec apply` again to resume")) from e

    def _field_metadata(self, spool: Path, node: Any, model_spec: Any, device: str | None) -> dict[str, str]:
        if not (node.uses_model or node.gpus):
            return {}
        for p in sorted(spool.glob("meta.*.json")):
            return dict(json.loads(p.read_text()))
        # Nothing was pending (a kill after the last commit, before the fingerprint): the UDF's
        # metadata comes from building it here, on the CPU, as Ray's executor asks its actor.
        fn, meta = instantiate(node, model_spec, "cpu")
        if hasattr(fn, "close"):
            fn.close()
        return meta

    def _record_errors(self, spool: Path, uri: str, node: Any, sink: Any, only: set[int] | None = None) -> None:
        """Row errors the workers spooled, into `errors.jsonl` as the local executor writes them (each
        row once: Geneva may retry a task); `only` these fragments where given."""
        from ..backfill import _log_errors

        seen: dict[int, str] = {}
        for r in _read_errors(spool):
            if r.get("row_addr") is not None and (only is None or int(r["row_addr"]) >> 32 in only):
                seen.setdefault(int(r["row_addr"]), r["error"])
        by_frag: dict[int, list[RowFailure]] = {}
        for addr, err in sorted(seen.items()):
            by_frag.setdefault(addr >> 32, []).append(RowFailure(addr & 0xFFFFFFFF, err))
        for frag, failures in by_frag.items():
            sink.run.errors += len(failures)
            _log_errors(sink.errors_log, sink.column, node.fingerprint, frag, failures, uri, sink.key)


def _release_tracker(job) -> None:
    """Geneva's job tracker is an actor this process owns (0.1 CPU, restarted if it dies) that
    outlives its job until this process exits: one per column would pile up and, on a small
    cluster, starve the next column's workers (seen: a Ray column waiting forever for its second
    actor). The job's record is saved by then; stop it."""
    import ray

    try:
        from geneva.runners.ray.naming import job_tracker_name

        ray.kill(ray.get_actor(job_tracker_name(job.job_id)), no_restart=True)
    except Exception:  # noqa: BLE001 - already gone, or a Geneva that names it otherwise
        pass


def _wait(job, seconds: float) -> bool:
    try:
        return bool(job.done(timeout=seconds))
    except TypeError:  # a handle whose done() takes no timeout
        time.sleep(seconds)
        return bool(job.done())


def _absolute_impl(node: Any) -> Any:
    """Geneva's actors may run in another cwd: a user UDF's file path goes absolute."""
    if getattr(node, "impl_file", None):
        from dataclasses import replace

        return replace(node, impl_file=_abs(node.impl_file))
    return node


def _spool_dir(uri: str, node: Any) -> Path:
    """Beside the table, like errors.jsonl: `<table>.vlmspec/geneva/<column>.<fingerprint>`."""
    base, name = _split(uri)
    return Path(base) / f"{name}.vlmspec" / "geneva" / f"{node.name}.{node.fingerprint[:16]}"


def _read_errors(spool: Path) -> list[dict[str, Any]]:
    out = []
    for p in sorted(spool.glob("errors.*.jsonl")):
        out += [json.loads(line) for line in p.read_text().splitlines() if line.strip()]
    return out


def _clear(spool: Path) -> None:
    if spool.exists():
        for p in spool.iterdir():
            p.unlink()
