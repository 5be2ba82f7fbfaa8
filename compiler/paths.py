"""The one rule for paths in a spec: a relative path is relative to the spec file's own folder.

As in docker compose and terraform, a spec means the same files whatever directory vlmspec runs
from. `resolve_paths` applies the rule once, when the spec is loaded, so everything downstream sees
absolute paths; `shown` turns one back into what a person reads (relative to the current directory
when it lies under it). URIs with a scheme (`s3://...`) and hub ids are left alone.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

from .model import Spec

__all__ = ["LOCAL_PREFIXES", "PATH_FIELDS", "resolve_paths", "shown"]

LOCAL_PREFIXES = ("/", "./", "../", "~")
"""How a value that could also be a hub id is written to mean a local folder."""
PATH_FIELDS = ("source.table", "source.ingest.path", "source.ingest.uri", "source.ingest.dataset", "model.id",
               "split.table", "train.output_dir", "eval.output_dir")
_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


def _absolute(value: str, base: str) -> str:
    return value if _SCHEME.match(value) else os.path.normpath(os.path.join(base, os.path.expanduser(value)))


def _folder_or_id(value: str, base: str) -> str | None:
    """A hub id stays an id unless it is written as a path or names a folder next to the spec."""
    if value.startswith(LOCAL_PREFIXES) or os.path.isdir(_absolute(value, base)):
        return _absolute(value, base)
    return None


def resolve_paths(spec: Spec, base: str | Path) -> tuple[Spec, dict[str, str]]:
    """`spec` with every relative path made absolute against `base` (the spec's folder), and the
    output folders' defaults (`<base>/runs/<name>`, its `eval/`) filled in.

    Returns the new spec and `{field path: value as written}` for the fields it changed."""
    base = os.path.abspath(base)
    written: dict[str, str] = {}

    def fix(section: Any, field: str, path: str, value: str | None) -> dict[str, Any]:
        if value is None or value == getattr(section, field):
            return {}
        written[path] = getattr(section, field)
        return {field: value}

    src = spec.source
    update: dict[str, Any] = {}
    source = fix(src, "table", "source.table", _absolute(src.table, base))
    ing = src.ingest
    if ing is not None:
        field = {"parquet": "path", "lance": "uri", "huggingface": "dataset"}.get(ing.kind)
        if field is not None:
            value = getattr(ing, field)
            new = _folder_or_id(value, base) if ing.kind == "huggingface" else _absolute(value, base)
            changed = fix(ing, field, f"source.ingest.{field}", new)
            if changed:
                source["ingest"] = ing.model_copy(update=changed)
    if source:
        update["source"] = src.model_copy(update=source)
    if spec.model is not None and not spec.model.id.startswith("vlmspec:"):
        changed = fix(spec.model, "id", "model.id", _folder_or_id(spec.model.id, base))
        if changed:
            update["model"] = spec.model.model_copy(update=changed)
    if spec.split is not None and spec.split.table is not None:
        changed = fix(spec.split, "table", "split.table", _absolute(spec.split.table, base))
        if changed:
            update["split"] = spec.split.model_copy(update=changed)
    runs = os.path.join(base, "runs", spec.name)
    if spec.train is not None:
        out = spec.train.output_dir
        runs = _absolute(out, base) if out is not None else runs
        fix(spec.train, "output_dir", "train.output_dir", runs if out is not None else None)
        update["train"] = spec.train.model_copy(update={"output_dir": runs})
    if spec.eval is not None:
        out = spec.eval.output_dir
        fix(spec.eval, "output_dir", "eval.output_dir", _absolute(out, base) if out is not None else None)
        update["eval"] = spec.eval.model_copy(
            update={"output_dir": _absolute(out, base) if out is not None else os.path.join(runs, "eval")})
    return (spec.model_copy(update=update) if update else spec), written


def shown(path: str, cwd: str | None = None) -> str:
    """`path` as printed: relative to `cwd` (default: the current directory) when it lies under
    it, otherwise as it is (absolute, or a URI)."""
    if _SCHEME.match(path) or not os.path.isabs(path):
        return path
    rel = os.path.relpath(path, cwd or os.getcwd())
    return path if rel == ".." or rel.startswith(".." + os.sep) else rel
