"""`vlmspec bench ray`: the Ray executor against the local one, on this machine.

(a) Scaling of a tier-2 backfill (image.dhash over synthetic images) from 1 to N workers, under the
    local executor (spawn process pool) and under the Ray executor (tasks on a local cluster of
    max(N) CPUs, already started: the steady state of a long-lived cluster).
(b) The overhead of the Ray executor on one machine for the same plan: `apply()` of every feature
    column of the same spec (tier 1 + tier 2) under `executor: {kind: local}` and `{kind: ray}`,
    with the cluster already up, plus what starting the local cluster adds (`address: local`,
    started and shut down by the apply itself; `--no-cold` skips it).
Columns are dropped (untimed) before each run. Rounds interleave the variants, rotating their
order, so load from other work hits all alike; the values are checked equal across all of them.
"""

from __future__ import annotations

import logging
import os
import shutil
import statistics
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

from .common import Results, load, timed
from .tables import TIER1

FEATURE_COLUMNS = [*TIER1, "dhash"]


def _spec(table: Path, rows: int, image_px: int, rows_per_fragment: int, executor: str) -> str:
    feats = "\n".join(f"    {col}: {{udf: {udf}, inputs: [{inp}]}}" for col, (udf, inp) in TIER1.items())
    return (f"name: bench_ray\n"
            f"source:\n  table: \"{table}\"\n"
            f"  ingest: {{from: synthetic, rows: {rows}, seed: 0, image_px: {image_px}}}\n"
            f"  rows_per_fragment: {rows_per_fragment}\n"
            f"features:\n  tier1:\n{feats}\n"
            f"  tier2:\n    dhash: {{udf: image.dhash, inputs: [image]}}\n"
            f"executor: {executor}\n")


def _drop(uri: str, names: list[str]) -> None:
    import lance

    ds = lance.dataset(uri)
    have = [n for n in names if n in ds.schema.names]
    if have:
        ds.drop_columns(have)


def _values(uri: str, names: list[str]) -> dict[str, list]:
    import lance

    t = lance.dataset(uri).to_table(columns=names)
    return {n: t.column(n).to_pylist() for n in names}


def run(rows: int, image_px: int, workers_list: list[int], repeats: int, out: Path, *,
        rows_per_fragment: int = 256, cold: bool = True, workdir: Path | None = None) -> Results:
    import ray

    from vlmspec.compiler.load import load_spec

    from ..apply import apply, prepare
    from ..backfill import backfill_column
    from ..executors.ray_exec import RayExecutor

    workers_list = sorted(set(workers_list))
    top = workers_list[-1]
    res = Results("ray", "Ray executor vs local: tier-2 scaling and the overhead of Ray on one machine",
                  {"rows": rows, "image_px": image_px, "workers": workers_list, "repeats": repeats,
                   "rows_per_fragment": rows_per_fragment, "ray_cluster_cpus": top, "cold": cold})
    tmp = Path(tempfile.mkdtemp(prefix="vlmspec-bench-ray-", dir=workdir))
    own_cluster = not ray.is_initialized()
    try:
        uri = str(tmp / "t.lance")
        specs = {kind: tmp / f"{kind}.yaml" for kind in ("local", "ray")}
        specs["local"].write_text(_spec(Path(uri), rows, image_px, rows_per_fragment, f"{{kind: local, workers: {top}}}"))
        specs["ray"].write_text(_spec(Path(uri), rows, image_px, rows_per_fragment,
                                      f"{{kind: ray, address: local, workers: {top}}}"))
        loaded = {k: load_spec(p) for k, p in specs.items()}
        t0 = time.perf_counter()
        apply(loaded["local"], until="ingest")
        import lance

        frags = len(lance.dataset(uri).get_fragments())
        res.details["table"] = {"rows": rows, "fragments": frags, "image_px": image_px,
                                "generate_and_ingest_s": round(time.perf_counter() - t0, 2)}
        dnode = next(c for c in prepare(loaded["local"]).compiled.columns if c.name == "dhash")

        # The long-lived cluster for (a) and the warm half of (b).
        if own_cluster:
            with warnings.catch_warnings():  # Ray forks+execs its processes; lance's at-fork warning is moot
                warnings.filterwarnings("ignore", message="lance is not fork-safe")
                s, _, lb, la = timed(lambda: ray.init(num_cpus=top, include_dashboard=False,
                                                      logging_level=logging.WARNING))
            res.figure("ray_init", f"ray.init() of a local cluster ({top} CPUs)", "s").add(s, lb, la)
        res.details["cluster"] = {k: v for k, v in ray.cluster_resources().items() if k in ("CPU", "GPU")}
        executors = {w: RayExecutor(w) for w in workers_list}
        values: dict[str, Any] = {}

        # Warm-up, untimed: Ray starts its worker processes (interpreter + lance/pyarrow/imagehash
        # imports) on first use, as the local pool does per column; the cold figure below includes it.
        _drop(uri, ["dhash"])
        s, *_ = timed(lambda: backfill_column(uri, dnode, workers=top, executor=executors[top]))
        res.details["ray_first_column_s"] = round(s, 3)

        local = {w: res.figure(f"dhash_local_w{w}", f"image.dhash, local executor, workers={w}", "images/s",
                               higher_is_better=True, seconds=[]) for w in workers_list}
        onray = {w: res.figure(f"dhash_ray_w{w}", f"image.dhash, Ray tasks, workers={w} (cluster up)", "images/s",
                               higher_is_better=True, seconds=[]) for w in workers_list}
        paired: dict[str, list[float]] = {}

        def one(kind: str, w: int) -> float:
            _drop(uri, ["dhash"])
            ex = executors[w] if kind == "ray" else None
            s, _, lb, la = timed(lambda: backfill_column(uri, dnode, workers=w, executor=ex))
            fig = (onray if kind == "ray" else local)[w]
            fig.add(rows / s, lb, la)
            fig.extra["seconds"].append(s)
            values[f"dhash_{kind}_w{w}"] = _values(uri, ["dhash"])["dhash"]
            return s

        variants = [(k, w) for k in ("local", "ray") for w in workers_list]
        for r in range(repeats):
            k = r % len(variants)
            took = {v: one(*v) for v in variants[k:] + variants[:k]}
            for w in workers_list:
                paired.setdefault(f"ray_vs_local_w{w}", []).append(took[("local", w)] / took[("ray", w)])
                if w != workers_list[0]:
                    w1 = workers_list[0]
                    paired.setdefault(f"local_scaling_w{w}", []).append(took[("local", w1)] / took[("local", w)])
                    paired.setdefault(f"ray_scaling_w{w}", []).append(took[("ray", w1)] / took[("ray", w)])

        # (b) the whole plan's feature columns, same spec, both executors
        plan_local = res.figure("apply_local", f"apply() of {len(FEATURE_COLUMNS)} feature columns, local "
                                f"executor (workers={top})", "s")
        plan_ray = res.figure("apply_ray", f"apply() of the same columns, Ray executor (workers={top}, cluster up)", "s")
        for r in range(repeats):
            order = [("local", plan_local), ("ray", plan_ray)]
            for kind, fig in (order if r % 2 == 0 else order[::-1]):
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

        ref_d = values[f"dhash_local_w{workers_list[0]}"]
        ref_all = values["apply_local"]
        equal = all(v == ref_d for k, v in values.items() if k.startswith("dhash_")) and \
            all(v == ref_all for k, v in values.items() if k.startswith("apply_")) and ref_all["dhash"] == ref_d
        res.details["values_equal"] = equal
        res.details["paired_ratios"] = paired

        med = statistics.median
        for w in workers_list[1:]:
            res.derive(f"local_scaling_w{w}", f"dhash scaling, local: {w} / {workers_list[0]} workers",
                       round(med(paired[f"local_scaling_w{w}"]), 2), unit="x",
                       target=f"ideal {w / workers_list[0]:g}x on idle cores", how="median of per-round ratios")
            res.derive(f"ray_scaling_w{w}", f"dhash scaling, Ray: {w} / {workers_list[0]} workers",
                       round(med(paired[f"ray_scaling_w{w}"]), 2), unit="x",
                       target=f"ideal {w / workers_list[0]:g}x on idle cores", how="median of per-round ratios")
        for w in workers_list:
            res.derive(f"ray_vs_local_w{w}", f"dhash throughput, Ray / local, workers={w}",
                       round(med(paired[f"ray_vs_local_w{w}"]), 3), unit="x",
                       how=f"medians {onray[w].median:,.0f} vs {local[w].median:,.0f} images/s")
        over = plan_ray.median - plan_local.median
        res.derive("apply_overhead", "Ray executor overhead on the whole apply (cluster up)", round(over, 2),
                   unit="s", how=f"{plan_ray.median:.2f} s vs {plan_local.median:.2f} s local "
                                 f"({plan_ray.median / plan_local.median:.2f}x)")
        if "apply_ray_cold" in res.figures:
            cold_s = res.figures["apply_ray_cold"].median
            res.derive("apply_overhead_cold", "Ray executor overhead incl. starting the local cluster",
                       round(cold_s - plan_local.median, 2), unit="s",
                       how=f"{cold_s:.2f} s vs {plan_local.median:.2f} s local ({cold_s / plan_local.median:.2f}x)")
        res.derive("values_equal", "values equal across executors and worker counts", "yes" if equal else "no",
                   target="yes", met=equal)

        res.notes.append(f"{rows:,} synthetic {image_px}px images in {frags} fragments; image.dhash is the tier-2 "
                         "UDF. Local: a fresh spawn process pool per column (as `vlmspec apply`). Ray: one task per "
                         "fragment (each writes its fragment's data file), the driver commits each completed "
                         "fragment; the cluster's worker processes are reused across columns and runs.")
        res.notes.append(f"The first Ray column after start-up took {res.details['ray_first_column_s']} s "
                         "(worker processes starting and importing); it is not in the warm figures.")
        if load() > (os.cpu_count() or 1) * 0.75:
            res.notes.append(f"Other work was running (1-min load {load()} on {os.cpu_count()} cores): scaling is "
                             "capped by the cores actually free.")
        res.write(out)
        return res
    finally:
        if own_cluster and ray.is_initialized():
            ray.shutdown()
        shutil.rmtree(tmp, ignore_errors=True)
