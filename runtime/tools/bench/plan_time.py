"""`vlmspec bench plan`: how long `vlmspec plan` takes as the table grows (it must read metadata only).

For each row count: write a table of cheap raw columns, apply the tier-1 features once (so the
derived columns carry fingerprints and the plan is empty), then time
- `prepare(loaded)` in-process: what `vlmspec plan` does after start-up (read state, compile, diff);
- the whole `vlmspec plan <spec>` command in a subprocess (interpreter and imports included),
  next to `vlmspec --help` as the start-up floor.
Proof that no column data is read: Lance's own I/O counters on the datasets `read_state` opens
(bytes read vs. the bytes of the data files and of the manifest), and a control table with the
largest row count cut into as few fragments as the smallest table: same fragments, many times the
rows, same time.
"""

from __future__ import annotations

import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from .common import Results, load, timed
from .tables import dir_bytes, tier1_spec, write_raw_table


def vlmspec_command() -> list[str]:
    # the console script beside this interpreter (a venv not on PATH), then PATH, then the module
    exe = Path(sys.executable).parent / "vlmspec"
    if exe.exists():
        return [str(exe)]
    found = shutil.which("vlmspec")
    return [found] if found else [sys.executable, "-c", "from vlmspec.runtime.cli import main; main()"]


@contextmanager
def capture_datasets() -> Iterator[list]:
    """Every dataset `lance_io.open_dataset` hands out while inside (to read its I/O counters)."""
    from ... import lance_io

    opened: list = []
    original = lance_io.open_dataset

    def spy(*args, **kwargs):
        ds = original(*args, **kwargs)
        if ds is not None:
            opened.append(ds)
        return ds

    lance_io.open_dataset = spy
    try:
        yield opened
    finally:
        lance_io.open_dataset = original


def _manifest_bytes(uri: str, version: int) -> int:
    """Size of the manifest of `version` (V2 naming: (2^64 - 1 - version).manifest, or v.manifest)."""
    d = Path(uri) / "_versions"
    for name in (f"{2**64 - 1 - version}.manifest", f"{version}.manifest"):
        if (d / name).exists():
            return (d / name).stat().st_size
    return -1


def _setup(workdir: Path, label: str, rows: int, rows_per_fragment: int) -> dict[str, Any]:
    from vlmspec.compiler.load import load_spec

    from ...apply import apply, prepare

    uri = workdir / f"{label}.lance"
    t0 = time.perf_counter()
    frags = write_raw_table(uri, rows, rows_per_fragment=rows_per_fragment)
    write_s = time.perf_counter() - t0
    spec = workdir / f"{label}.yaml"
    spec.write_text(tier1_spec(uri, name=f"bench_plan_{label}", rows_per_fragment=rows_per_fragment))
    loaded = load_spec(spec)
    t0 = time.perf_counter()
    apply(loaded)
    apply_s = time.perf_counter() - t0
    prep = prepare(loaded)
    if not prep.plan.is_empty:  # pragma: no cover - would mean the tier-1 apply did not complete
        raise RuntimeError(f"plan for {label} is not empty after apply")
    return {"uri": str(uri), "spec": str(spec), "loaded": loaded, "rows": rows, "fragments": frags,
            "rows_per_fragment": rows_per_fragment, "write_s": round(write_s, 3),
            "tier1_apply_s": round(apply_s, 3), "version": prep.state.version,
            "data_bytes": dir_bytes(uri, "data"), "manifest_bytes": _manifest_bytes(str(uri), prep.state.version)}


def _prepare_job(res: Results, key: str, label: str, table: dict[str, Any]):
    """A callable timing one prepare() into figure `key` (after an untimed warm-up)."""
    from ...apply import prepare

    loaded = table["loaded"]
    prepare(loaded)  # warm-up: imports, first manifest read
    fig = res.figure(key, label, "s", rows=table["rows"], fragments=table["fragments"])

    def job() -> None:
        s, prep, lb, la = timed(lambda: prepare(loaded))
        assert prep.plan.is_empty
        fig.add(s, lb, la)
    return job


def _rounds(jobs: list, repeats: int) -> None:
    """Run every job once per round, rotating the order, so changing load hits all of them alike."""
    for r in range(repeats):
        k = r % len(jobs)
        for job in jobs[k:] + jobs[:k]:
            job()


def _io_stats(table: dict[str, Any]) -> dict[str, Any]:
    from ...apply import prepare

    with capture_datasets() as opened:
        prepare(table["loaded"])
    stats = [ds.io_stats_snapshot() for ds in opened]
    read = sum(s.read_bytes for s in stats)
    return {"datasets_opened": len(opened), "read_iops": sum(s.read_iops for s in stats), "read_bytes": read,
            "write_iops": sum(s.write_iops for s in stats), "manifest_bytes": table["manifest_bytes"],
            "data_bytes": table["data_bytes"],
            "read_fraction_of_data": round(read / table["data_bytes"], 6) if table["data_bytes"] else None}


IMPORTS = "import vlmspec.runtime.cli, vlmspec.runtime.apply, vlmspec.compiler.load, vlmspec.compiler.render"


def _cli_job(res: Results, key: str, label: str, args: list[str], cwd: Path, *,
             cmd: list[str] | None = None, **extra):
    """A callable timing one subprocess run into figure `key`."""
    cmd = cmd or vlmspec_command() + args
    # start the child as a user's shell would: no debug mode, Lance warnings off
    env = {**os.environ, "VLMSPEC_DEBUG": "0", "LANCE_LOG": os.environ.get("LANCE_LOG", "error")}
    fig = res.figure(key, label, "s", command=" ".join(args) if cmd[0] == sys.executable else
                     "vlmspec " + " ".join(args), **extra)

    def job() -> None:
        s, proc, lb, la = timed(lambda: subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True))
        if proc.returncode != 0:
            raise RuntimeError(f"`{' '.join(cmd)}` failed ({proc.returncode}): {proc.stderr[-2000:]}")
        fig.add(s, lb, la)
    return job


def run(rows_list: list[int], repeats: int, out: Path, *, rows_per_fragment: int = 8192,
        cli_repeats: int | None = None, control: bool = True, workdir: Path | None = None) -> Results:
    rows_list = sorted(set(rows_list), reverse=True)
    cli_repeats = cli_repeats or repeats
    res = Results("plan", "Plan time vs. table size (`vlmspec plan` reads metadata only)",
                  {"rows": rows_list, "repeats": repeats, "cli_repeats": cli_repeats,
                   "rows_per_fragment": rows_per_fragment, "control": control,
                   "features": "tier-1: text.length, text.question_type, text.count (applied once)"})
    tmp = Path(tempfile.mkdtemp(prefix="vlmspec-bench-plan-", dir=workdir))
    try:
        tables: dict[int, dict[str, Any]] = {}
        for rows in rows_list:
            tables[rows] = _setup(tmp, f"t{rows}", rows, rows_per_fragment)
        big, small = rows_list[0], rows_list[-1]
        ctrl = None
        if control and big > small and tables[big]["fragments"] > tables[small]["fragments"]:
            # the control table: the big table's rows in the small table's fragment count
            per = math.ceil(big / tables[small]["fragments"])
            ctrl = _setup(tmp, f"control{big}", big, per)
        # In-process prepare() on every table, then the CLI (kept apart so one never warms the other);
        # within each group the figures are interleaved round by round.
        jobs = [_prepare_job(res, f"prepare_{rows}",
                             f"prepare() at {rows:,} rows ({tables[rows]['fragments']} fragments)", tables[rows])
                for rows in rows_list]
        if ctrl is not None:
            jobs.append(_prepare_job(res, f"prepare_control_{big}",
                                     f"prepare() at {big:,} rows in {ctrl['fragments']} fragments (control)", ctrl))
        _rounds(jobs, repeats)
        jobs = [_cli_job(res, "cli_help", "`vlmspec --help` (start-up floor)", ["--help"], tmp),
                _cli_job(res, "cli_imports", "python: import what `vlmspec plan` imports (no work)",
                         ["-c", f"'{IMPORTS}'"], tmp, cmd=[sys.executable, "-c", IMPORTS])]
        jobs += [_cli_job(res, f"cli_plan_{rows}", f"`vlmspec plan` at {rows:,} rows (subprocess)",
                          ["plan", tables[rows]["spec"]], tmp, rows=rows, fragments=tables[rows]["fragments"])
                 for rows in rows_list]
        _rounds(jobs, cli_repeats)
        io = {rows: _io_stats(tables[rows]) for rows in rows_list}
        if ctrl is not None:
            io[f"control_{big}"] = _io_stats(ctrl)

        def med(key: str) -> float:
            return res.figures[key].median

        res.derive("plan_big", f"prepare() at {big:,} rows", med(f"prepare_{big}"), unit="s", target="<= 1 s",
                   met=med(f"prepare_{big}") <= 1.0)
        res.derive("cli_big", f"`vlmspec plan` wall time at {big:,} rows", med(f"cli_plan_{big}"), unit="s",
                   target="<= 1 s", met=med(f"cli_plan_{big}") <= 1.0,
                   how=f"includes interpreter start and imports: importing alone takes "
                       f"{med('cli_imports'):.2f} s (`cli_imports`), the plan itself {med(f'prepare_{big}'):.3f} s")
        if big > small:
            ratio = med(f"prepare_{big}") / med(f"prepare_{small}")
            res.derive("ratio", f"prepare() time ratio {big:,} / {small:,} rows", round(ratio, 2), unit="x",
                       target="flat (~1x)", met=ratio <= 2.0,
                       how=f"{tables[big]['fragments']} vs {tables[small]['fragments']} fragments: the cost follows "
                           "fragments, not rows")
            res.derive("cli_ratio", f"`vlmspec plan` ratio {big:,} / {small:,} rows",
                       round(med(f"cli_plan_{big}") / med(f"cli_plan_{small}"), 2), unit="x", target="flat (~1x)",
                       met=med(f"cli_plan_{big}") / med(f"cli_plan_{small}") <= 1.5)
        if ctrl is not None:
            c = med(f"prepare_control_{big}") / med(f"prepare_{small}")
            res.derive("control_ratio",
                       f"prepare() ratio, same {ctrl['fragments']} fragments, {big // small}x the rows "
                       f"({big:,} / {small:,})", round(c, 2), unit="x", target="~1x (no data read)", met=c <= 1.5)
        bio = io[big]
        res.derive("io_bytes", f"bytes Lance read during prepare() at {big:,} rows", bio["read_bytes"], unit="B",
                   target=f"~ manifest ({bio['manifest_bytes']:,} B), not data ({bio['data_bytes']:,} B)",
                   # room for two manifest reads plus 16 kB (version listing, sidecar), and still far below the data
                   met=bio["read_bytes"] <= 2 * bio["manifest_bytes"] + 16384 < bio["data_bytes"],
                   how=f"{bio['read_iops']} read ops on {bio['datasets_opened']} dataset(s)")
        res.details["tables"] = {str(r): {k: v for k, v in t.items() if k not in ("loaded", "uri", "spec")}
                                 for r, t in tables.items()}
        if ctrl is not None:
            res.details["control_table"] = {k: v for k, v in ctrl.items() if k not in ("loaded", "uri", "spec")}
        res.details["io_stats"] = {str(k): v for k, v in io.items()}
        res.notes.append("prepare() = read_state (manifest + sidecar) + compile + diff; the plan is empty (tier-1 "
                         "features applied once before timing), as for a `vlmspec plan` on an up-to-date table.")
        res.notes.append("Lance I/O counters come from the dataset objects read_state opens; they count the "
                         "manifest read, and would count any data page read.")
        if load() > (os.cpu_count() or 1):
            res.notes.append(f"The machine was loaded by other work (1-min load {load()} on {os.cpu_count()} cores): "
                             "absolute times are pessimistic; ratios are the figure to read.")
        res.write(out)
        return res
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
