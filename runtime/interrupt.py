"""Ctrl-C that a native call swallowed, raised when the call returns.

Native code that checks Python's signals while it blocks (pyo3's `check_signals`, as Lance's
bindings can) may drop the `KeyboardInterrupt` that check raised and return normally: the
Ctrl-C-in-a-pooled-column test saw the apply run to the end after its Ctrl-C in 1 of 3 runs (which
call dropped it was not pinned down; with every apply step under this guard it passed 6 of 6).
`kept_ctrl_c()` installs a SIGINT
handler that remembers the Ctrl-C before raising it as usual, and raises it again, once, when the
block ends if nothing else did. Pure-Python code sees no difference.
"""

from __future__ import annotations

import signal
import threading
from contextlib import contextmanager
from typing import Iterator

__all__ = ["kept_ctrl_c"]


@contextmanager
def kept_ctrl_c() -> Iterator[None]:
    if threading.current_thread() is not threading.main_thread():
        yield  # signal handlers belong to the main thread
        return
    previous = signal.getsignal(signal.SIGINT)
    if previous is not signal.default_int_handler:
        yield  # someone else handles Ctrl-C here (a test harness, an embedding app): leave it be
        return
    hits: list[int] = []

    def remember(signum, frame):
        hits.append(signum)
        raise KeyboardInterrupt

    signal.signal(signal.SIGINT, remember)
    try:
        yield
    except KeyboardInterrupt:
        raise
    except BaseException:
        if hits:  # the interrupt surfaced as another error (a native call's): it is still a Ctrl-C
            raise KeyboardInterrupt from None
        raise
    finally:
        signal.signal(signal.SIGINT, previous)
    if hits:
        raise KeyboardInterrupt
