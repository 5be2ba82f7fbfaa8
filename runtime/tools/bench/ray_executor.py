"""`vlmspec bench ray`: the Ray executor against the local one, on this machine.

(a) Scaling of a tier-2 backfill (image.dhash over synthetic images) from 1 to N workers, under the
    local executor as `vlmspec apply` runs it (workers=1: in this process; more: the shared spawn
    pool of one `LocalExecutor`, kept up across rounds) and under the Ray executor (tasks on a
    local cluster of max(N) CPUs, already started). Both are the steady state of a warm pool /
    cluster; what the first column pays to start them is recorded apart.
(b) Scaling of a tier-3 backfill (`vision_tower_hiddens`, udf `vlm.vision_tower`, the shipped tiny
    Qwen2.5-VL at 112 px) on the CPU from 1 to N workers. The local executor runs a model UDF in this
    process whatever `workers` says; the bench gives it w torch intra-op threads and w decode threads
    (the cores w workers would use). Under Ray, a model UDF whose `resources` ask for no GPU gets one
    actor (`cpu actor x1`) whatever `workers` says; with `resources: {gpus: 1}` it gets one actor
    per GPU slot (capped by `workers`). A CPU machine has none, so the bench's cluster declares max(N)
    *logical* GPU slots (Ray does not check them): w actors, each `num_cpus: 1` (Ray sets
    OMP_NUM_THREADS=1, so one torch thread) and one decode thread, computing on the CPU: the actor-pool
    path a GPU cluster runs, unchanged. Ray builds its actors per column, so the end-to-end figures
    include each actor's start-up (process, torch import, model load); the steady-state figures count
    only the rows committed after each worker's first chunk.
(c) The overhead of the Ray executor on one machine for the same plan: `apply()` of the tier-1 and
    tier-2 feature columns of (a)'s spec under `executor: {kind: local}` and `{kind: ray}`, with the
    cluster already up, plus what starting the local cluster adds (`address: local`, started and
    shut down by the apply itself; `--no-cold` skips it).
(d) Where Geneva is installed (`pip install 'vlmspec[geneva]'`), the Geneva executor beside both in
    (a), (b) and (c), on the same cluster: one Geneva backfill job per column, its appliers (Ray
    actors) started per job, so its figures include that start-up, as (b)'s Ray actors do.
Columns are dropped (untimed) before each run. Rounds interleave the variants, rotating their
order, so load from other work hits all alike; the values are checked byte-identical across all of them.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import statistics
import tempfile
import time
import warnings
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable, Iterator

from .common import Results, load, timed
from .tables import TIER1

FEATURE_COLUMNS = [*TIER1, "dhash"]
TOWER = "vision_tower_hiddens"
TOWER_MODEL = "vlmspec:tiny-qwen2.5-vl"
TOWER_PX = 112
TOWER_BATCH = 64


def _spec(table: Path, rows: int, image_px: int, rows_per_fragment: int, executor: str) -> str:
    feats = "\n".join(f"    {col}: {{udf: {udf}, inputs: [{inp}]}}" for col, (udf, inp) in TIER1.items())
    return (f"name: bench_ray\n"
            f"source:\n  table: \"{table}\"\n"
            f"  ingest: {{from: synthetic, rows: {rows}, seed: 0, image_px: {image_px}}}\n"
            f"  rows_per_fragment: {rows_per_fragment}\n"
            f"features:\n  tier1:\n{feats}\n"
            f"  tier2:\n    dhash: {{udf: image.dhash, inputs: [image]}}\n"
            f"executor: {executor}\n")


def _tower_spec(table: Path, rows: int, rows_per_fragment: int, executor: str, resources: str | None) -> str:
    res = f", resources: {resources}" if resources else ""
    return (f"name: bench_ray_tier3\n"
            f"source:\n  table: \"{table}\"\n"
            f"  ingest: {{from: synthetic, rows: {rows}, seed: 0, image_px: {TOWER_PX}}}\n"
            f"  rows_per_fragment: {rows_per_fragment}\n"
            f"model: {{id: \"{TOWER_MODEL}\", image_px: {TOWER_PX}}}\n"
            f"features:\n  tier3:\n"
            f"    {TOWER}: {{udf: vlm.vision_tower, inputs: [image], batch_size: {TOWER_BATCH}{res}, "
            f"tuning: {{decode_threads: 1}}}}\n"  # one per actor; local runs set their own (`threads_node`)
            f"executor: {executor}\n")


def _drop(uri: str, names: list[str]) -> None:
    import lance

    ds = lance.dataset(uri)
    # dropped before each timed run, so it computes the whole column (a filled one is a no-op)
    have = [n for n in names if n in ds.schema.names]
    if have:
        ds.drop_columns(have)
    # Geneva keeps a checkpoint per finished fragment, keyed by UDF version and source files: a
    # column dropped and backfilled again with the same recipe would be read back, not computed.
    shutil.rmtree(Path(uri) / "_ckp", ignore_errors=True)


def _values(uri: str, names: list[str]) -> dict[str, list]:
    import lance

    t = lance.dataset(uri).to_table(columns=names)
    return {n: t.column(n).to_pylist() for n in names}


def _digest(uri: str, name: str) -> str:
    """sha256 of a fixed-size-list column's value bytes, in row order (byte-identical or not)."""
    import lance
    import numpy as np

    col = lance.dataset(uri).to_table(columns=[name]).column(name).combine_chunks()
    assert col.null_count == 0, f"{name}: {col.null_count} null rows"
    return hashlib.sha256(np.asarray(col.flatten()).tobytes()).hexdigest()


@contextmanager
def _local_pools() -> Iterator[Callable[[int], Any]]:
    """The local executor as `vlmspec apply` uses it: one `LocalExecutor` (one spawn pool) for every
    parallel column of an apply. The bench keeps one per worker count up across its rounds (as the
    Ray cluster stays up) and hands the one for `w` to each run, exactly as an apply does."""
    from ...executors.local import LocalExecutor

    executors: dict[int, Any] = {}

    def use(w: int) -> Any:
        if w not in executors:
            executors[w] = LocalExecutor(w)
        return executors[w]

    try:
        yield use
    finally:
        for ex in executors.values():
            ex.close()


@contextmanager
def _torch_threads(n: int) -> Iterator[None]:
    """This process's torch intra-op threads, for one local run (decode threads: the node's tuning)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


class _Clock:
    """A backfill Reporter that timestamps each commit (the rows a checkpoint made durable)."""

    def __init__(self) -> None:
        self.t0 = time.perf_counter()
        self.marks: list[tuple[float, int]] = []

    def start(self, task: str, total: int, unit: str = "rows") -> None: ...
    def info(self, task: str, text: str) -> None: ...
    def finish(self, task: str) -> None: ...
    def note(self, text: str) -> None: ...

    def advance(self, task: str, n: int) -> None:
        self.marks.append((time.perf_counter(), n))

    def first_s(self) -> float | None:
        return self.marks[0][0] - self.t0 if self.marks else None

    def steady(self, k: int) -> float | None:
        """Rows/s committed after the first `k` chunks (each of k workers' first chunk carries its
        start-up: model load, imports); None with too few chunks to tell."""
        if len(self.marks) <= k:
            return None
        t, rows = self.marks[k - 1][0], sum(n for _, n in self.marks[k:])
        span = self.marks[-1][0] - t
        return rows / span if span > 0 else None


def _probe_threads() -> dict[str, Any]:
    """What a tier-3 actor's process sees (run as a Ray actor with the tier-3 actors' options)."""
    import torch

    return {"torch_threads": torch.get_num_threads(),
            **{k: os.environ.get(k) for k in ("OMP_NUM_THREADS", "CUDA_VISIBLE_DEVICES")}}


class _Probe:
    def get(self) -> dict[str, Any]:
        return _probe_threads()


def _geneva(workers_list: list[int], device: str | None = None) -> dict[int, Any]:
    """A Geneva executor per worker count on the bench's cluster; {} without the extra."""
    try:
        from ...executors.geneva_exec import GenevaExecutor, import_geneva

        geneva = import_geneva()
    except Exception:  # noqa: BLE001 - the extra is optional: the Geneva rows are left out
        return {}
    return {w: GenevaExecutor(geneva, "local", w, device=device) for w in workers_list}


def _geneva_version() -> str:
    from importlib.metadata import version

    return version("geneva")


def run(rows: int, image_px: int, workers_list: list[int], repeats: int, out: Path, *,
        rows_per_fragment: int = 256, cold: bool = True, workdir: Path | None = None,
        tier3_rows: int = 512, tier3_rows_per_fragment: int = 64) -> Results:
    import ray

    from vlmspec.compiler.load import load_spec

    from ...apply import apply, prepare
    from ...backfill import backfill_column
    from ...executors.ray_exec import RayExecutor

    workers_list = sorted(set(workers_list))
    top, w1 = workers_list[-1], workers_list[0]
    res = Results("ray", "Ray executor vs local: tier-2 and tier-3 scaling and the overhead of Ray on one machine",
                  {"rows": rows, "image_px": image_px, "workers": workers_list, "repeats": repeats,
                   "rows_per_fragment": rows_per_fragment, "tier3_rows": tier3_rows,
                   "tier3_rows_per_fragment": tier3_rows_per_fragment, "tier3_model": TOWER_MODEL,
                   "tier3_image_px": TOWER_PX, "tier3_batch_size": TOWER_BATCH,
                   "tier3_threads_local": "w torch intra-op + w decode threads (one in-process UDF)",
                   "tier3_threads_ray": "per actor: 1 torch (OMP_NUM_THREADS=1 from num_cpus=1) + 1 decode "
                                        "(tuning: {decode_threads: 1})",
                   "ray_cluster_cpus": top, "ray_cluster_logical_gpus": top if tier3_rows else 0, "cold": cold})
    tmp = Path(tempfile.mkdtemp(prefix="vlmspec-bench-ray-", dir=workdir))
    # a caller's cluster (a test, `ray start`) is used as it is and never shut down here
    own_cluster = not ray.is_initialized()
    med = statistics.median
    try:
        uri = str(tmp / "t.lance")
        gexecutors = _geneva(workers_list)
        specs = {kind: tmp / f"{kind}.yaml" for kind in ("local", "ray", *(("geneva",) if gexecutors else ()))}
        specs["local"].write_text(_spec(Path(uri), rows, image_px, rows_per_fragment, f"{{kind: local, workers: {top}}}"))
        specs["ray"].write_text(_spec(Path(uri), rows, image_px, rows_per_fragment,
                                      f"{{kind: ray, address: local, workers: {top}}}"))
        if gexecutors:
            specs["geneva"].write_text(_spec(Path(uri), rows, image_px, rows_per_fragment,
                                             f"{{kind: geneva, workers: {top}}}"))
        loaded = {k: load_spec(p) for k, p in specs.items()}
        t0 = time.perf_counter()
        apply(loaded["local"], until="ingest")
        import lance

        frags = len(lance.dataset(uri).get_fragments())
        res.details["table"] = {"rows": rows, "fragments": frags, "image_px": image_px,
                                "generate_and_ingest_s": round(time.perf_counter() - t0, 2)}
        dnode = next(c for c in prepare(loaded["local"]).compiled.columns if c.name == "dhash")

        # The long-lived cluster for (a), (b) and the warm half of (c). Logical GPU slots let the
        # tier-3 column ask for `gpus: 1` and get one actor per worker on this CPU machine; each
        # actor then decodes on one thread, as Ray gives it one torch thread.
        if own_cluster:
            with warnings.catch_warnings():  # Ray forks+execs its processes; lance's at-fork warning is moot
                warnings.filterwarnings("ignore", message="lance is not fork-safe")
                s, _, lb, la = timed(lambda: ray.init(
                    num_cpus=top, num_gpus=top if tier3_rows else None, include_dashboard=False,
                    log_to_driver=False,  # the workers' model-loading bars and Geneva's job progress
                    logging_level=logging.WARNING))
            res.figure("ray_init", f"ray.init() of a local cluster ({top} CPUs)", "s").add(s, lb, la)
        cluster = {k: v for k, v in ray.cluster_resources().items() if k in ("CPU", "GPU")}
        res.details["cluster"] = cluster
        executors = {w: RayExecutor(w) for w in workers_list}
        values: dict[str, Any] = {}
        paired: dict[str, list[float]] = {}

        def rotate(variants: list, r: int) -> list:
            # a different variant first each round: warm caches and load drift hit all of them alike
            k = r % len(variants)
            return variants[k:] + variants[:k]

        def scaling(prefix: str, took: dict, kinds: tuple[str, ...]) -> None:
            for w in workers_list:
                for other in ("ray", "geneva"):
                    if ("local", w) in took and (other, w) in took:
                        paired.setdefault(f"{prefix}{other}_vs_local_w{w}", []).append(
                            took[("local", w)] / took[(other, w)])
                if w != w1:
                    for k in kinds:
                        if (k, w) in took and (k, w1) in took:
                            paired.setdefault(f"{prefix}{k}_scaling_w{w}", []).append(took[(k, w1)] / took[(k, w)])

        # --- (a) tier 2 -----------------------------------------------------------------------
        # Warm-up, untimed: Ray starts its worker processes (interpreter + lance/pyarrow/imagehash
        # imports) on first use, as the local shared pool does at an apply's first parallel column.
        _drop(uri, ["dhash"])
        s, *_ = timed(lambda: backfill_column(uri, dnode, workers=top, executor=executors[top]))
        res.details["ray_first_column_s"] = round(s, 3)
        if gexecutors:  # Geneva's first job: its workers import geneva (untimed, as Ray's first column)
            _drop(uri, ["dhash"])
            s, *_ = timed(lambda: backfill_column(uri, dnode, workers=top, executor=gexecutors[top]))
            res.details["geneva_first_column_s"] = round(s, 3)
        local = {w: res.figure(f"dhash_local_w{w}", f"image.dhash, local executor, workers={w}"
                               + (" (in process)" if w == 1 else " (shared pool up)"), "images/s",
                               higher_is_better=True, seconds=[]) for w in workers_list}
        onray = {w: res.figure(f"dhash_ray_w{w}", f"image.dhash, Ray tasks, workers={w} (cluster up)", "images/s",
                               higher_is_better=True, seconds=[]) for w in workers_list}
        ongeneva = {w: res.figure(f"dhash_geneva_w{w}", f"image.dhash, Geneva backfill, workers={w} (cluster up; "
                                  "appliers started per job)", "images/s", higher_is_better=True, seconds=[])
                    for w in workers_list} if gexecutors else {}
        figs2 = {"local": local, "ray": onray, "geneva": ongeneva}
        kinds2 = ("local", "ray", *(("geneva",) if gexecutors else ()))
        with _local_pools() as use_pool:
            if top > 1:
                _drop(uri, ["dhash"])
                s, *_ = timed(lambda: backfill_column(uri, dnode, workers=top, executor=use_pool(top)))
                res.details["local_first_column_s"] = round(s, 3)

            def one(kind: str, w: int) -> float:
                _drop(uri, ["dhash"])
                ex = executors[w] if kind == "ray" else gexecutors[w] if kind == "geneva" else \
                    (use_pool(w) if w > 1 else None)
                s, _, lb, la = timed(lambda: backfill_column(uri, dnode, workers=w, executor=ex))
                fig = figs2[kind][w]
                fig.add(rows / s, lb, la)
                fig.extra["seconds"].append(s)
                # kept to check that every executor and worker count wrote the same values
                values[f"dhash_{kind}_w{w}"] = _values(uri, ["dhash"])["dhash"]
                return s

            variants = [(k, w) for k in kinds2 for w in workers_list]
            for r in range(repeats):
                scaling("", {v: one(*v) for v in rotate(variants, r)}, kinds2)

        # --- (b) tier 3 -----------------------------------------------------------------------
        tower_ok, tower_ray = True, False
        if tier3_rows:
            turi = str(tmp / "tower.lance")
            on_ray, gpu1 = f"{{kind: ray, address: local, workers: {top}}}", "{gpus: 1, cpus: 1}"
            tspecs = {"local": _tower_spec(Path(turi), tier3_rows, tier3_rows_per_fragment, "{kind: local}", None),
                      "local_gpu": _tower_spec(Path(turi), tier3_rows, tier3_rows_per_fragment, "{kind: local}", gpu1),
                      "ray_gpu": _tower_spec(Path(turi), tier3_rows, tier3_rows_per_fragment, on_ray, gpu1),
                      "ray_default": _tower_spec(Path(turi), tier3_rows, tier3_rows_per_fragment, on_ray, None)}
            tloaded = {}
            for k, text in tspecs.items():
                (tmp / f"tower_{k}.yaml").write_text(text)
                tloaded[k] = load_spec(tmp / f"tower_{k}.yaml")
            t0 = time.perf_counter()
            apply(tloaded["local"], until="ingest")
            tfrags = len(lance.dataset(turi).get_fragments())
            res.details["tier3_table"] = {"rows": tier3_rows, "fragments": tfrags, "image_px": TOWER_PX,
                                          "generate_and_ingest_s": round(time.perf_counter() - t0, 2)}
            model_spec = tloaded["local"].spec.model
            tnode = next(c for c in prepare(tloaded["local"]).compiled.columns if c.name == TOWER)
            threads_node = lambda w: replace(tnode, tuning={**tnode.tuning, "decode_threads": w})  # noqa: E731
            gnode = next(c for c in prepare(tloaded["local_gpu"]).compiled.columns if c.name == TOWER)
            assert gnode.fingerprint == tnode.fingerprint and gnode.gpus == 1  # `resources`: where, not what
            # Where the Ray plan puts the column on this cluster (it reads the cluster's totals).
            placement = {}
            for k, label in (("ray_gpu", f"resources {gpu1}"), ("ray_default", "resources default (no GPU)")):
                try:
                    placement[label] = next(s.placement for s in prepare(tloaded[k]).plan.columns if s.name == TOWER)
                except Exception as e:  # noqa: BLE001 - informational (a cluster without GPU slots refuses)
                    placement[label] = f"refused: {str(e).strip().splitlines()[0]}"
            res.details["tier3_placement_ray"] = placement
            tower_ray = cluster.get("GPU", 0) >= top
            if tower_ray:
                probe = ray.remote(_Probe).options(num_cpus=1, num_gpus=1).remote()
                try:
                    res.details["tier3_actor_threads"] = ray.get(probe.get.remote())
                finally:
                    ray.kill(probe)
            else:
                res.notes.append(f"The Ray cluster this run joined has {cluster.get('GPU', 0):g} GPU slots (< {top}): "
                                 "the tier-3 Ray figures were skipped.")
            texecutors = {w: RayExecutor(w, device="cpu") for w in workers_list}
            tgeneva = _geneva(workers_list, device="cpu") if tower_ray else {}

            # Warm-up, untimed: the driver imports torch/transformers and reads the model once.
            with _torch_threads(w1):
                _drop(turi, [TOWER])
                s, *_ = timed(lambda: backfill_column(turi, threads_node(w1), model_spec=model_spec, device="cpu",
                                                      workers=w1))
            res.details["tier3_local_first_column_s"] = round(s, 3)

            def tfig(kind: str, w: int, steady: bool):
                where = (f"local executor, in process, {w} torch + {w} decode thread{'s' if w > 1 else ''}"
                         if kind == "local" else
                         f"{'Ray' if kind == 'ray' else 'Geneva'}, {w} actor{'s' if w > 1 else ''} x 1 CPU "
                         "(logical GPU slots)")
                what = ("steady state (after each worker's first chunk)" if steady else
                        "end to end" + (" (incl. actor start-up)" if kind != "local" else ""))
                return res.figure(f"tower_{kind}_w{w}{'_steady' if steady else ''}",
                                  f"{TOWER}, {where}, {what}", "rows/s", higher_is_better=True,
                                  **({} if steady else {"seconds": [], "first_chunk_s": []}))

            def tone(kind: str, w: int) -> float:
                _drop(turi, [TOWER])
                clock = _Clock()
                if kind == "local":
                    with _torch_threads(w):
                        s, _, lb, la = timed(lambda: backfill_column(turi, threads_node(w), model_spec=model_spec,
                                                                     device="cpu", workers=w, reporter=clock))
                    k = 1
                else:
                    ex = texecutors[w] if kind == "ray" else tgeneva[w]
                    s, _, lb, la = timed(lambda: backfill_column(turi, gnode, model_spec=model_spec, device="cpu",
                                                                 workers=w, reporter=clock, executor=ex))
                    k = w
                fig = tfig(kind, w, False)
                fig.add(tier3_rows / s, lb, la)
                fig.extra["seconds"].append(round(s, 3))
                fig.extra["first_chunk_s"].append(round(clock.first_s() or 0.0, 3))
                st = clock.steady(k)
                if st is not None:
                    tfig(kind, w, True).add(st, lb, la)
                values[f"tower_{kind}_w{w}"] = _digest(turi, TOWER)
                return s

            kinds = ("local", "ray", *(("geneva",) if tgeneva else ())) if tower_ray else ("local",)
            tvariants = [(k, w) for k in kinds for w in workers_list]
            for r in range(repeats):
                scaling("tower_", {v: tone(*v) for v in rotate(tvariants, r)}, kinds)
            tower_ok = len(set(v for k, v in values.items() if k.startswith("tower_"))) == 1

        # --- (c) the whole plan's feature columns, same spec, both executors ----------------------
        plan_local = res.figure("apply_local", f"apply() of {len(FEATURE_COLUMNS)} feature columns, local "
                                f"executor (workers={top})", "s")
        plan_ray = res.figure("apply_ray", f"apply() of the same columns, Ray executor (workers={top}, cluster up)", "s")
        plan_geneva = res.figure("apply_geneva", f"apply() of the same columns, Geneva executor (workers={top}, "
                                 "cluster up)", "s") if gexecutors else None
        for r in range(repeats):
            order = [("local", plan_local), ("ray", plan_ray), *([("geneva", plan_geneva)] if gexecutors else [])]
            for kind, fig in rotate(order, r):
                _drop(uri, FEATURE_COLUMNS)
                s, result, lb, la = timed(lambda: apply(loaded[kind], until="features"))
                assert result.record.status == "ok"
                fig.add(s, lb, la)
                values[f"apply_{kind}"] = _values(uri, FEATURE_COLUMNS)
        if own_cluster:
            ray.shutdown()
        if cold and own_cluster:
            plan_cold = res.figure("apply_ray_cold", "apply() of the same columns, Ray executor, `address: local` "
                                   "(starts and stops its cluster)", "s")
            for _ in range(repeats):
                _drop(uri, FEATURE_COLUMNS)
                s, result, lb, la = timed(lambda: apply(loaded["ray"], until="features"))
                assert result.record.status == "ok"
                plan_cold.add(s, lb, la)
                values["apply_ray_cold"] = _values(uri, FEATURE_COLUMNS)

        ref_d = values[f"dhash_local_w{w1}"]
        ref_all = values["apply_local"]
        equal = all(v == ref_d for k, v in values.items() if k.startswith("dhash_")) and \
            all(v == ref_all for k, v in values.items() if k.startswith("apply_")) and ref_all["dhash"] == ref_d \
            and tower_ok
        res.details["values_equal"] = equal
        res.details["tier3_values_sha256"] = {k: v for k, v in values.items() if k.startswith("tower_")}
        res.details["paired_ratios"] = paired

        # --- headline -----------------------------------------------------------------------------
        def ratio(key: str, label: str, target: str | None = None, how: str = "median of per-round ratios",
                  digits: int = 2) -> None:
            if paired.get(key):
                res.derive(key, label, round(med(paired[key]), digits), unit="x", target=target, how=how)

        for w in workers_list[1:]:
            ideal = f"ideal {w / w1:g}x on idle cores"
            ratio(f"local_scaling_w{w}", f"tier 2 (dhash) scaling, local: {w} / {w1} workers", ideal)
            ratio(f"ray_scaling_w{w}", f"tier 2 (dhash) scaling, Ray: {w} / {w1} workers", ideal)
        for w in workers_list:
            ratio(f"ray_vs_local_w{w}", f"tier 2 (dhash) throughput, Ray / local, workers={w}",
                  how=f"medians {onray[w].median:,.0f} vs {local[w].median:,.0f} images/s", digits=3)
            if ongeneva:
                ratio(f"geneva_vs_local_w{w}", f"tier 2 (dhash) throughput, Geneva / local, workers={w}",
                      how=f"medians {ongeneva[w].median:,.0f} vs {local[w].median:,.0f} images/s", digits=3)
        if tier3_rows:
            for w in workers_list[1:]:
                ideal = f"ideal {w / w1:g}x on idle cores"
                for kind, name in (("local", "local (threads)"), ("ray", "Ray (actors)"),
                                   ("geneva", "Geneva (appliers)")):
                    ratio(f"tower_{kind}_scaling_w{w}", f"tier 3 (vision tower) scaling, {name}: {w} / {w1} "
                          "workers, end to end", ideal)
                    a, b = (res.figures.get(f"tower_{kind}_w{x}_steady") for x in (w1, w))
                    if a is not None and b is not None:
                        res.derive(f"tower_{kind}_steady_scaling_w{w}", f"tier 3 (vision tower) scaling, {name}: "
                                   f"{w} / {w1} workers, steady state", round(b.median / a.median, 2), unit="x",
                                   target=ideal, how=f"medians {b.median:,.0f} vs {a.median:,.0f} rows/s")
            for w in workers_list:
                lf = res.figures[f"tower_local_w{w}"]
                for kind, name in (("ray", "Ray"), ("geneva", "Geneva")):
                    rf = res.figures.get(f"tower_{kind}_w{w}")
                    if rf is not None:
                        ratio(f"tower_{kind}_vs_local_w{w}", f"tier 3 (vision tower) throughput, {name} / local, "
                              f"workers={w}, end to end", how=f"medians {rf.median:,.0f} vs {lf.median:,.0f} rows/s",
                              digits=3)
        over = plan_ray.median - plan_local.median
        res.derive("apply_overhead", "Ray executor overhead on the whole apply (cluster up)", round(over, 2),
                   unit="s", how=f"{plan_ray.median:.2f} s vs {plan_local.median:.2f} s local "
                                 f"({plan_ray.median / plan_local.median:.2f}x)")
        if plan_geneva is not None:
            res.derive("apply_overhead_geneva", "Geneva executor overhead on the whole apply (cluster up)",
                       round(plan_geneva.median - plan_local.median, 2), unit="s",
                       how=f"{plan_geneva.median:.2f} s vs {plan_local.median:.2f} s local "
                           f"({plan_geneva.median / plan_local.median:.2f}x)")
        if "apply_ray_cold" in res.figures:
            cold_s = res.figures["apply_ray_cold"].median
            res.derive("apply_overhead_cold", "Ray executor overhead incl. starting the local cluster",
                       round(cold_s - plan_local.median, 2), unit="s",
                       how=f"{cold_s:.2f} s vs {plan_local.median:.2f} s local ({cold_s / plan_local.median:.2f}x)")
        if not gexecutors:
            res.notes.append("Geneva is not installed here (`pip install 'vlmspec[geneva]'`): no Geneva rows.")
        else:
            res.notes.append(f"Geneva: one `backfill` job per column on the same cluster (geneva "
                             f"{_geneva_version()}), our UDF code as the Geneva UDF, a fragment committed as it "
                             "finishes; each job starts its appliers (Ray actors) and its own job tracking, which "
                             f"its figures include. Its first column took {res.details['geneva_first_column_s']} s, "
                             "untimed.")
        res.derive("values_equal", "values byte-identical across executors and worker counts (tier 1, 2, 3)",
                   "yes" if equal else "no", target="yes", met=equal)

        # --- notes --------------------------------------------------------------------------------
        res.notes.append(f"Tier 2: {rows:,} synthetic {image_px}px images in {frags} fragments, image.dhash. Local "
                         f"as `vlmspec apply` runs it: workers=1 in this process; more on the apply's shared spawn "
                         f"pool (one `LocalExecutor` per apply), here kept up across rounds. Ray: one task per fragment "
                         f"(each writes its fragment's data file), the driver commits each completed fragment; the "
                         f"cluster's worker processes are reused across columns and runs.")
        first = [f"Ray {res.details['ray_first_column_s']} s (worker processes starting and importing)"]
        if "local_first_column_s" in res.details:
            first.append(f"local {res.details['local_first_column_s']} s (spawning the {top}-process pool)")
        res.notes.append("The first tier-2 column after start-up took " + "; ".join(first)
                         + ": what an apply's first parallel column pays; not in the warm figures.")
        if tier3_rows:
            res.notes.append(
                f"Tier 3: {tier3_rows:,} synthetic {TOWER_PX}px images in {res.details['tier3_table']['fragments']} "
                f"fragments, `{TOWER}` (vlm.vision_tower, {TOWER_MODEL}, batch {TOWER_BATCH}) on the CPU. Local: "
                "the model UDF runs in this process whatever `workers` says; workers=w here means w torch intra-op "
                "threads and w decode threads (`tuning: {decode_threads: w}`), so w cores; at w = cores that is what "
                "`vlmspec apply` does by default (torch's default thread count, decode threads min(16, cores)). "
                "The first local tier-3 column (imports, model read) took "
                f"{res.details['tier3_local_first_column_s']} s, untimed.")
            place = "; ".join(f"{k} -> `{v}`" for k, v in res.details["tier3_placement_ray"].items())
            if tower_ray:
                th = res.details.get("tier3_actor_threads", {})
                res.notes.append(
                    f"Tier 3 under Ray, as the plan places it on this cluster ({cluster.get('CPU', 0):g} CPUs, "
                    f"{cluster.get('GPU', 0):g} logical GPU slots): {place}. The bench uses `gpus: 1, cpus: 1`: "
                    f"w actors computing on the CPU (device cpu), each seeing torch threads "
                    f"{th.get('torch_threads')}, OMP_NUM_THREADS={th.get('OMP_NUM_THREADS')}, "
                    "1 decode thread (`tuning: {decode_threads: 1}`). Actors are built per column (and "
                    "killed after it), so every Ray run pays their start-up; first-chunk times are in the JSON. "
                    "Steady state = rows committed after the first w chunks (w actors; 1 in process, where the "
                    "model loads once) / the time after them.")
        if load() > (os.cpu_count() or 1) * 0.75:
            res.notes.append(f"Other work was running (1-min load {load()} on {os.cpu_count()} cores): scaling is "
                             "capped by the cores actually free.")
        res.write(out)
        return res
    finally:
        if own_cluster and ray.is_initialized():
            ray.shutdown()
        shutil.rmtree(tmp, ignore_errors=True)
