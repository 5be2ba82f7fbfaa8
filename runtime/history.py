"""Run history and the step records `plan` diffs against, kept in the table's sidecar directory.

`<table>.vlmspec/state.json` holds the last completed curate/split/train/eval (fingerprint, table
version, recipe) and measured UDF throughputs; `<table>.vlmspec/runs/<id>.json` holds one record
per apply: the spec text and hash, versions before/after, each step's rows, time and throughput,
fingerprints and library versions. Nothing from the environment (tokens!) is ever written, and
secrets that reach a record anyway (a `--var hf_token=...` rendered into the spec text) are redacted.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import platform
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping

from . import lance_io

LIBRARIES = ("vlmspec", "pylance", "lancedb", "pyarrow", "torch", "transformers", "peft", "bitsandbytes",
             "pillow", "imagehash", "pydantic", "numpy")


REDACTED = "<redacted>"
_SECRET_VAR = re.compile(r"token|secret|passw|credential|key", re.I)
_SECRET_ENV = re.compile(r"TOKEN|SECRET|PASSW|CREDENTIAL|API_?KEY|ACCESS_KEY|PRIVATE_KEY", re.I)


def secret_values(variables: Mapping[str, Any] | None = None,
                  environ: Mapping[str, str] | None = None) -> frozenset[str]:
    """Values no record may hold: template vars named like a secret (`hf_token`, `api_key`), and the
    values of secret-named environment variables (`HF_TOKEN`, `HUGGING_FACE_HUB_TOKEN`, ...), which
    may reach a spec through `--var x=$HF_TOKEN` under any name."""
    out = {str(v) for k, v in (variables or {}).items()
           if _SECRET_VAR.search(str(k)) and isinstance(v, (str, int, float)) and not isinstance(v, bool)
           and len(str(v)) >= 4}  # shorter values would garble the text and protect nothing
    # Reading the environment outside cli.py, on purpose: whichever entry point wrote the record
    # (CLI, notebook, tests), a token in the environment must never be written to disk.
    env = os.environ if environ is None else environ
    out |= {v for k, v in env.items() if _SECRET_ENV.search(k) and len(v) >= 8}
    return frozenset(out)


def redact(value: Any, secrets: Iterable[str]) -> Any:
    """`value` (strings, lists and dicts, keys included) with every secret replaced by REDACTED."""
    secrets = sorted(set(secrets), key=len, reverse=True)  # a longer secret may contain a shorter one
    if not secrets:
        return value

    def walk(v: Any) -> Any:
        if isinstance(v, str):
            for s in secrets:
                v = v.replace(s, REDACTED)
            return v
        if isinstance(v, dict):
            return {walk(k): walk(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [walk(x) for x in v]
        return v

    return walk(value)


def library_versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in LIBRARIES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            pass
    return out


def new_run_id() -> str:
    """Sortable and unique per apply. Seconds and pid alone are not: two applies from one process
    within a second (a notebook, `apply --target` then `apply`) shared an id, and the second
    record silently overwrote the first. Milliseconds, kept strictly increasing per process."""
    global _LAST_RUN_MS
    ms = _LAST_RUN_MS = max(time.time_ns() // 1_000_000, _LAST_RUN_MS + 1)
    return time.strftime("%Y%m%dT%H%M%S", time.localtime(ms / 1000)) + f".{ms % 1000:03d}-{os.getpid()}"


_LAST_RUN_MS = 0


@dataclass
class RunRecord:
    spec_file: str
    spec_hash: str
    spec_text: str
    table: str
    run_id: str = field(default_factory=new_run_id)
    started: float = field(default_factory=time.time)
    finished: float | None = None
    status: str = "running"
    version_before: int | None = None
    version_after: int | None = None
    steps: list[dict[str, Any]] = field(default_factory=list)
    error: str | None = None
    libraries: dict[str, str] = field(default_factory=library_versions)
    host: str = field(default_factory=platform.node)
    prefetch: dict[str, Any] | None = None
    """The model's imports run on a thread during a step computed elsewhere (`prefetch.Prefetch`):
    the step, their seconds, and how long the next step waited for them."""
    secrets: frozenset[str] = field(default=frozenset(), repr=False)
    """Values to redact before saving (see `secret_values`); never saved themselves."""

    def add_step(self, name: str, kind: str, rows: int, seconds: float, **extra: Any) -> None:
        rate = rows / seconds if rows and seconds > 0 else None
        # `ended` (wall clock) places the step on a timeline: `vlmspec bench apply` lines its GPU
        # samples up with the stages by it.
        self.steps.append({"name": name, "kind": kind, "rows": rows, "seconds": round(seconds, 3),
                           "rows_per_s": round(rate, 2) if rate else None, "ended": round(time.time(), 3), **extra})

    def save(self) -> Path:
        d = lance_io.sidecar_dir(self.table) / "runs"
        d.mkdir(parents=True, exist_ok=True)
        path = d / f"{self.run_id}.json"
        tmp = path.with_suffix(".tmp")
        data = {k: v for k, v in self.__dict__.items() if k != "secrets"}
        data = redact(json.loads(json.dumps(data, default=str)), self.secrets | secret_values())
        tmp.write_text(json.dumps(data, indent=2, sort_keys=True))
        os.replace(tmp, path)
        return path


def list_runs(table: str) -> list[dict[str, Any]]:
    """Recorded applies, oldest first. A record still `running` while no apply holds the table's
    lock belongs to an apply that was killed: it reads `killed`, with the steps it committed."""
    from .lock import is_locked

    d = lance_io.sidecar_dir(table) / "runs"
    runs = []
    for p in sorted(d.glob("*.json")) if d.exists() else []:
        try:
            runs.append(json.loads(p.read_text()))
        except ValueError:
            continue
    if any(r.get("status") == "running" for r in runs) and not is_locked(table):
        for r in runs:
            if r.get("status") == "running":
                r["status"] = "killed"
    return runs


def record_step(table: str, name: str, fingerprint: str, table_version: int, rows: int,
                detail: dict[str, Any]) -> None:
    """Mark a curate/split/train/eval/ingest step complete (what `plan` diffs against)."""
    side = lance_io.read_sidecar(table)
    side.setdefault("steps", {})[name] = {"fingerprint": fingerprint, "table_version": table_version,
                                         "rows": rows, "detail": redact(detail, secret_values()), "time": time.time()}
    lance_io.write_sidecar(table, side)


def record_throughput(table: str, udf: str, rows_per_s: float) -> None:
    side = lance_io.read_sidecar(table)
    side.setdefault("throughput", {})[udf] = round(rows_per_s, 3)
    lance_io.write_sidecar(table, side)


def check_outputs(steps: Mapping[str, Any], expected: Mapping[str, Path]) -> dict[str, Any]:
    """`StepRecord`s with `missing` set where the outputs the spec expects of a train or eval step
    (`expected`: the adapter directory, the eval report) are gone or are not the record's (a deleted
    `runs/`, a fresh checkout, a new `output_dir`): the plan then reruns the step."""
    from dataclasses import replace

    out = dict(steps)
    for name, rec in steps.items():
        path = expected.get(name)
        if path is None:
            continue
        missing: list[str] = []
        if name == "train":
            try:
                manifest = json.loads((path.parent / "manifest.json").read_text())
            except (OSError, ValueError):
                manifest = {}
            if not (path / "adapter_config.json").exists() or manifest.get("train_fingerprint") != rec.fingerprint:
                missing.append(str(path))
        elif name == "eval":
            missing += [str(p) for p in (path, path.parent / "results.json") if not p.exists()]
        if missing:
            out[name] = replace(rec, missing=tuple(missing))
    return out
