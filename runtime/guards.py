"""What `apply` refuses, and how it says so: a saved plan the table or spec has moved past, and a
storage error (a full disk, a read-only table directory). Pure checks and messages; no I/O.
"""

from __future__ import annotations

import errno
import os
import re
from typing import Any, Mapping

from vlmspec.compiler.errors import ApplyError, Problem
from vlmspec.compiler.plan import Plan

__all__ = ["PLAN_KEYS", "check_saved_plan", "storage_errno", "storage_error"]

PLAN_KEYS = ("name", "kind", "fingerprint", "rows")
"""What a saved plan's steps must still say for `apply --plan` to run it."""


def check_saved_plan(saved: Mapping[str, Any], plan: Plan) -> None:
    """Refuse a saved plan (`vlmspec plan --out`) once the table, the spec or its steps have moved."""
    from vlmspec.compiler.render import plan_to_dict

    fix = "Re-run `vlmspec plan` and review the new plan"
    problems = []
    if saved.get("table") != plan.table:
        problems.append(Problem(f"the plan is for table `{saved.get('table')}`, the spec's table is `{plan.table}`",
                                "--plan", fix="Pass the spec the plan was made from"))
    if saved.get("spec_hash") != plan.spec_hash:
        was, now = str(saved.get("spec_hash"))[:12], plan.spec_hash[:12]
        problems.append(Problem(f"the spec changed since the plan was made (hash `{was}` -> `{now}`)", "--plan",
                                fix=fix + " (with the same --var values)"))
    was, now = saved.get("version"), plan.version
    if was != now:
        moved = f"from version {was} to {now}" if None not in (was, now) else \
            f"from {'no table' if was is None else f'version {was}'} to {'no table' if now is None else f'version {now}'}"
        problems.append(Problem(f"the table moved {moved} since the plan was made", "--plan", fix=fix))
    if not problems:  # same spec and table, yet an edited UDF file or the sidecar can change the steps
        moved = _moved_steps(saved, plan_to_dict(plan))
        if moved:
            problems.append(Problem("the steps changed since the plan was made: " + ", ".join(moved), "--plan",
                                    fix=fix))
    if problems:
        raise ApplyError(problems)


def _moved_steps(saved: Mapping[str, Any], fresh: Mapping[str, Any]) -> list[str]:
    def steps(d: Mapping[str, Any], part: str) -> dict[Any, tuple]:
        items = d.get(part) or []
        items = [items] if isinstance(items, dict) else items
        return {s.get("name"): tuple(s.get(k) for k in PLAN_KEYS) for s in items if isinstance(s, dict)}

    moved = []
    for part in ("ingest", "columns", "stages"):
        old, new = steps(saved, part), steps(fresh, part)
        for name in sorted(set(old) | set(new), key=str):
            if old.get(name) != new.get(name):
                was, now = (old[name][1] if name in old else "absent"), (new[name][1] if name in new else "absent")
                moved.append(f"`{name}` ({was} -> {now})" if was != now else f"`{name}` (changed)")
    return moved


_STORAGE_FIXES = {errno.ENOSPC: "Free disk space", errno.EDQUOT: "Free disk space (quota exceeded)",
                  errno.EROFS: "Make the table's file system writable",
                  errno.EACCES: "Make the table directory writable", errno.EPERM: "Make the table directory writable"}


def storage_errno(e: BaseException) -> int | None:
    """The errno of a full-disk / read-only / permission error, also from Lance's `(os error N)` text."""
    if not isinstance(e, OSError):
        return None
    code = e.errno
    if code is None:
        m = re.search(r"\(os error (\d+)\)", str(e))
        code = int(m.group(1)) if m else None
    return code if code in _STORAGE_FIXES else None


def storage_error(e: OSError, table: str, step: str) -> ApplyError:
    """A full disk, a read-only or unwritable table directory: say so plainly, and how to resume."""
    code = storage_errno(e) or 0
    fix = _STORAGE_FIXES.get(code, "Check the storage")
    what = os.strerror(code) if code else str(e)
    where = f" (`{e.filename}`)" if e.filename else ""
    step = f"step `{step}` " if step else ""
    return ApplyError(Problem(f"{step}cannot write to `{table}`: {what}{where}", "apply",
                              fix=f"{fix}, then rerun `vlmspec apply`: committed versions are intact "
                                  "and it resumes from the last checkpoint"))
