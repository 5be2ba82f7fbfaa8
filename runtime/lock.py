"""One apply per table: an advisory lock in the table's sidecar (`apply.lock`, holding the holder's
pid). The kernel drops it when the holder dies, SIGKILL included, so a stale file never blocks.
"""

from __future__ import annotations

import fcntl
import os
import time
from contextlib import contextmanager
from typing import Iterator

from vlmspec.compiler.errors import ApplyError, Problem

from . import lance_io

__all__ = ["is_locked", "table_lock"]


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


def is_locked(table: str) -> bool:
    """True while an apply holds `table`'s lock (a run record still `running` without one was killed)."""
    path = lance_io.sidecar_dir(table) / "apply.lock"
    if not path.exists():
        return False
    with open(path, "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(f, fcntl.LOCK_UN)
    return False
