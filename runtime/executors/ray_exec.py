"""The Ray executor: the same backfill protocol as the local executor, with chunks placed on a cluster.

What runs where:
- The driver (the `vlmspec apply` process) prepares the column, pins the table version, splits the
  pending work by Lance fragment, commits every completed fragment with a `DataReplacement` (one
  checkpoint, exactly as runtime/backfill.py does locally) and writes `vlmspec.fingerprint` when
  the column is complete. Row errors are logged (`on_error: null`) or stop the column (`fail`) there.
- CPU UDFs run as Ray tasks, one per fragment (`num_cpus` = the column's `resources.cpus`). A task
  reads its fragment from the pinned version, computes it with the very code the local executor
  uses (`chunks.run_chunk`), writes the fragment's data file itself and returns the `DataFile`
  (a few hundred bytes through the object store, whatever the column's size). When there are
  fewer pending fragments than twice the parallelism, fragments are split into chunks of
  4 x batch_size rows that return their Arrow values, and the driver writes the file.
- Model UDFs (`vlm.*`, anything with `resources.gpus`) run on a pool of actors that build the UDF
  (load the model) once; `num_gpus` = the column's `resources.gpus`. The pool has one actor per GPU
  slot the cluster offers (capped by `executor.workers`), or a single actor for CPU-only models.
- A worker killed mid-task is retried by Ray (tasks: `max_retries`; actors: restarted, the call
  retried); a killed driver loses at most the fragments in flight, and the next apply resumes.

lance-ray 0.5's `add_columns` is not used for this: it commits all fragments at once at the end (no
per-fragment checkpoint, no per-row error policy). Lance's own fragment APIs do the job directly.

Ray is imported lazily: the local executor never imports it.
"""

from __future__ import annotations

import logging
import os
import warnings
from collections import deque
from contextlib import contextmanager
from dataclasses import replace
from typing import Any, Callable, Iterator

import lance

from vlmspec.compiler.errors import ApplyError, Problem

from .. import lance_io
from ..backfill import FragmentSink
from ..invoke import instantiate
from .chunks import Chunk, WorkerNode, compute_chunk, pending_chunks, run_chunk, spread_chunks

INSTALL = "pip install 'vlmspec[ray]'"
TASK_RETRIES = 3
ACTOR_RESTARTS = 3


def import_ray():
    try:
        import ray
    except ImportError as e:
        raise ApplyError(Problem(f"`executor.kind: ray` needs Ray, which is not installed ({e})", "executor.kind",
                                 fix=f"Install the extra: {INSTALL}; or use `executor: {{kind: local}}`")) from None
    return ray


def resolve_address(address: str | None) -> str:
    """`local` starts a cluster on this machine; `auto` / `ray://host:10001` join an existing one."""
    return address or os.environ.get("RAY_ADDRESS") or "local"


def _connect(ray, address: str, num_cpus: int | None = None) -> bool:
    """Connect (or start a local cluster); True when this call did it (and should shut it down)."""
    if ray.is_initialized():
        return False
    try:
        with warnings.catch_warnings():
            # Ray starts its processes with fork+exec; lance's at-fork warning does not apply to them.
            warnings.filterwarnings("ignore", message="lance is not fork-safe")
            if address == "local":
                ray.init(address="local", num_cpus=num_cpus, include_dashboard=False,
                         logging_level=logging.WARNING)
            else:
                ray.init(address=address, logging_level=logging.WARNING)
    except Exception as e:  # unreachable head, version skew, bad address
        raise ApplyError(Problem(f"cannot reach the Ray cluster at `{address}`: {type(e).__name__}: {e}",
                                 "executor.address",
                                 fix="Start the cluster (`ray start --head`) or fix `executor.address` "
                                     "(`auto`, `ray://head:10001`, or `local` to start one here)")) from e
    return True


def cluster_facts(address: str | None, *, needs_gpus: bool = False) -> dict[str, Any]:
    """CPU and GPU totals of the cluster, for the plan. `local` is not started for a plan: its totals
    are this machine's (CPU cores, and CUDA devices when a column asks for GPUs)."""
    ray = import_ray()
    addr = resolve_address(address)
    if not ray.is_initialized() and addr == "local":
        from . import local_gpus

        return {"address": addr, "cpus": os.cpu_count() or 1, "gpus": local_gpus() if needs_gpus else None}
    _connect(ray, addr)
    res = ray.cluster_resources()
    return {"address": addr, "cpus": res.get("CPU", 0.0), "gpus": res.get("GPU", 0.0)}


@contextmanager
def ray_session(address: str | None, workers: int | None = None, *, device: str | None = None,
                num_cpus: int | None = None) -> Iterator["RayExecutor"]:
    """A `RayExecutor` for one apply: joins the cluster (or starts a local one, shut down after).
    Reuses a connection the process already has (e.g. a test's `ray.init`)."""
    ray = import_ray()
    started = _connect(ray, resolve_address(address), num_cpus=num_cpus)
    try:
        yield RayExecutor(workers, device=device)
    finally:
        if started:
            ray.shutdown()


def _abs(path: str) -> str:
    """Workers may run elsewhere (another cwd): give them absolute local paths; URIs pass through."""
    return path if "://" in path else os.path.abspath(path)


# --- worker side ----------------------------------------------------------------------------

def _finish_remote(uri: str, name: str, result: tuple, storage: str | None) -> tuple:
    """(chunk, values, failures, datafile): a whole fragment's file is written here, on the worker."""
    chunk, values, failures = result
    if values is not None and storage is not None:
        return chunk, None, failures, lance_io.write_column_data(uri, name, values, storage)
    return chunk, values, failures, None


def _chunk_task(uri: str, version: int, node: WorkerNode, chunk: Chunk, batch_size: int,
                storage: str | None) -> tuple:
    """One Ray task: compute a chunk with the local executor's own code (its UDF and dataset caches
    live on in the reused worker process)."""
    return _finish_remote(uri, node.name, run_chunk(uri, version, node, chunk, batch_size), storage)


class UdfActor:
    """Builds a (model) UDF once and computes chunks with it."""

    def __init__(self, node: Any, model_spec: Any, device: str | None):
        if device is None:
            from . import local_gpus

            device = "cuda" if node.gpus and local_gpus() else "cpu"
        self.node = node
        self.fn, self.meta = instantiate(node, model_spec, device)
        self.ds = None

    def field_metadata(self) -> dict[str, str]:
        return self.meta

    def pid(self) -> int:
        return os.getpid()

    def run(self, uri: str, version: int, chunk: Chunk, storage: str | None) -> tuple:
        if self.ds is None or self.ds.version != version:
            self.ds = lance.dataset(uri, version=version)
        result = compute_chunk(self.ds, self.fn, self.node, chunk, self.node.batch_size)
        return _finish_remote(uri, self.node.name, result, storage)


# --- driver side ----------------------------------------------------------------------------

class RayExecutor:
    """Places one column's chunks on the cluster; `backfill.backfill_column` does everything else."""

    remote = True
    """Its workers pick their own device: the driver may have no GPU."""

    def __init__(self, workers: int | None = None, *, device: str | None = None):
        self.ray = import_ray()
        self.workers = workers
        self.device = device
        res = self.ray.cluster_resources()
        self.cpus, self.gpus = res.get("CPU", 0.0), res.get("GPU", 0.0)
        self._task = self.ray.remote(_chunk_task)
        self._actor = self.ray.remote(UdfActor)

    def uses_actors(self, node: Any) -> bool:
        return bool(node.uses_model or node.gpus)

    def parallelism(self, node: Any, workers: int | None = None) -> int:
        cap = workers or self.workers or 10**9
        if node.gpus:
            return max(1, min(cap, int(self.gpus // node.gpus)))
        if node.uses_model:
            return 1
        return max(1, min(cap, int(self.cpus // node.cpus) or 1))

    def backfill(self, uri: str, ds: lance.LanceDataset, node: Any, sink: FragmentSink, *, model_spec: Any = None,
                 device: str | None = None, workers: int | None = None, place: Any = None) -> dict[str, str]:
        uri = _abs(uri)
        # The plan's placement says how many run at once; without one (a caller with no plan), the
        # same rule applied to the cluster this executor sees.
        n = place.workers if place is not None and place.workers else self.parallelism(node, workers)
        chunks = pending_chunks(ds, node.name, max([*sink.frag_rows.values(), 1]))  # whole fragments
        if n > 1 and len(chunks) < 2 * n:
            chunks = spread_chunks(ds, node.name, n, node.batch_size * 4)
        sink.start(sum(c.limit for c in chunks))
        version, storage = ds.version, ds.data_storage_version
        if self.uses_actors(node):
            return self._on_actors(uri, version, storage, node, chunks, sink, model_spec, device, n)
        wnode = WorkerNode.of(node)
        wnode = replace(wnode, impl_file=_abs(wnode.impl_file)) if wnode.impl_file else wnode
        task = self._task.options(num_cpus=node.cpus, max_retries=TASK_RETRIES, name=f"vlmspec:{node.name}")

        def submit(chunk: Chunk):
            return task.remote(uri, version, wnode, chunk, node.batch_size, storage if sink.whole(chunk) else None)

        # Exactly n tasks in flight: Ray starts every queued task it has a free CPU for, so queueing
        # more than `workers` ahead would run more than `workers` at once.
        self._drive(node, chunks, submit, lambda ref: None, sink, n, "task")
        return {}

    def _on_actors(self, uri, version, storage, node, chunks, sink, model_spec, device, n) -> dict[str, str]:
        ray = self.ray
        actor_node = replace(node, impl_file=_abs(node.impl_file)) if node.impl_file else node
        opts = dict(num_cpus=node.cpus, num_gpus=node.gpus or 0, max_restarts=ACTOR_RESTARTS,
                    max_task_retries=TASK_RETRIES)
        # Even with nothing pending, one actor is built: completing the column needs the UDF's field
        # metadata (as the local executor builds the UDF whatever is left to do).
        actors = [self._actor.options(**opts).remote(actor_node, model_spec, device or self.device)
                  for _ in range(max(1, min(n, len(chunks))))]
        load = [0] * len(actors)
        owner: dict[Any, int] = {}

        def submit(chunk: Chunk):
            i = min(range(len(actors)), key=load.__getitem__)
            load[i] += 1
            ref = actors[i].run.remote(uri, version, chunk, storage if sink.whole(chunk) else None)
            owner[ref] = i
            return ref

        def release(ref) -> None:
            load[owner.pop(ref)] -= 1

        try:
            self._drive(node, chunks, submit, release, sink, 2 * len(actors), "actor")
            try:
                return dict(ray.get(actors[0].field_metadata.remote()))
            except ray.exceptions.RayError as e:
                raise self._error(node, None, e, "actor") from None
        finally:
            for a in actors:
                try:
                    ray.kill(a)
                except Exception:
                    pass

    def _drive(self, node: Any, chunks: list[Chunk], submit: Callable, release: Callable, sink: FragmentSink,
               in_flight: int, what: str) -> None:
        """Keep `in_flight` chunks running; commit what completes, group by group, in fragment order."""
        ray = self.ray
        todo = deque(chunks)
        running: dict[Any, Chunk] = {}
        try:
            while todo or running:
                while todo and len(running) < in_flight:
                    chunk = todo.popleft()
                    running[submit(chunk)] = chunk
                ray.wait(list(running), num_returns=1)
                ready, _ = ray.wait(list(running), num_returns=len(running), timeout=0)
                results, crashed = [], None
                for ref in ready:
                    chunk = running.pop(ref)
                    release(ref)
                    try:
                        results.append(ray.get(ref))
                    except ray.exceptions.RayError as e:
                        crashed = crashed or (chunk, e)
                results.sort(key=lambda r: (r[0].frag_id, r[0].offset))
                failed = [r for r in results if r[1] is None and r[3] is None]
                for r in results:
                    if r[1] is not None or r[3] is not None:
                        sink.add(*r, commit=False)
                sink.flush()  # one commit for the fragments completed together: a checkpoint
                if crashed:
                    raise self._error(node, *crashed, what)
                for r in failed:
                    sink.add(*r)  # `on_error: fail`: raises ApplyError
        finally:
            for ref in running:
                try:
                    ray.cancel(ref)
                except Exception:
                    pass

    def _error(self, node: Any, chunk: Chunk | None, e: Exception, what: str) -> ApplyError:
        cause = getattr(e, "cause", None)
        text = f"{type(cause).__name__}: {cause}" if cause is not None else str(e).strip().splitlines()[0]
        where = f" on fragment {chunk.frag_id}" if chunk is not None else ""
        return ApplyError(Problem(f"Ray {what} for `{node.name}` failed{where} (after Ray's retries): {text}",
                                  node.path, fix="Committed fragments are kept; fix the cause and run "
                                                 "`vlmspec apply` again to resume"))

