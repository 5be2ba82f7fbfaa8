"""`kept_ctrl_c`: a Ctrl-C that native code swallowed is raised when the block ends."""

from __future__ import annotations

import os
import signal

import pytest

from vlmspec.runtime.interrupt import kept_ctrl_c


@pytest.fixture(autouse=True)
def python_handles_ctrl_c():
    """As in a terminal's foreground process. A suite started in the background (`cmd &` in a
    script, nohup) inherits SIGINT ignored, and the guard then rightly does nothing."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


def test_an_ignored_ctrl_c_stays_ignored():
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    with kept_ctrl_c():
        os.kill(os.getpid(), signal.SIGINT)
    assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN


def _swallowed_ctrl_c() -> None:
    """What lance's Rust bindings do: check signals while blocking, then drop the error."""
    try:
        os.kill(os.getpid(), signal.SIGINT)
        for _ in range(1000):  # the handler runs at the next bytecode boundary
            pass
    except KeyboardInterrupt:
        pass


def test_a_swallowed_ctrl_c_is_raised_when_the_block_ends():
    done = []
    with pytest.raises(KeyboardInterrupt):
        with kept_ctrl_c():
            _swallowed_ctrl_c()
            done.append("went on")  # the swallowing call returned, as the write did
    assert done == ["went on"]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_an_error_caused_by_the_interrupt_is_reported_as_the_interrupt():
    with pytest.raises(KeyboardInterrupt):
        with kept_ctrl_c():
            _swallowed_ctrl_c()
            raise OSError("native call failed: interrupted")


def test_without_a_ctrl_c_nothing_changes():
    with kept_ctrl_c():
        pass
    with pytest.raises(ValueError):
        with kept_ctrl_c():
            raise ValueError("x")
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
