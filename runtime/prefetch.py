"""The model's imports, loaded while a step's work runs in worker processes.

The first step of an apply that touches the model (the vision column's set-up, training or eval)
paid this process's first import of transformers' Qwen2.5-VL code and the processor's files:
4-8 s on the GPU machine (`processor_s` in the column's `setup_parts`, `vlmspec bench apply`),
with the GPU idle. A tier-2 column before it (dhash) runs in worker processes while this process
only waits for their chunks, so that import runs then, on a thread (`Prefetch`), at the lowest CPU
priority: the workers fill every core (dhash is at the CPU's limit, ~96 % of its bare loop on 16
cores), and the import must not take its CPU from them, so it runs on what they leave idle (the
last chunks' tail, any core a worker's read leaves waiting) and at full speed once they are done.
Where the workers do not fill the machine, it overlaps them whole.

It is joined before the next step begins, so it never imports beside this process's own step
code: two threads importing at once can deadlock on import locks in rare circular cases, and
here the other thread only waits on futures and hands finished chunks to Lance. What it still
had to do when the step ended is waited out then and recorded (`RunRecord.prefetch`). Its
failures are ignored: the step that needs the module imports it again and reports the error.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from typing import Any

from vlmspec.compiler.plan import Backfill, Evaluate, Train


def needs_model(step: Any) -> bool:
    """Whether `step` loads the model stack in this process: training, eval, or a model column
    computed here (a Ray actor or worker process imports it there, not here)."""
    if isinstance(step, (Train, Evaluate)):
        return True
    return (isinstance(step, Backfill) and step.node is not None and step.node.uses_model
            and step.place is not None and step.place.where == "in-process")


def runs_elsewhere(step: Any) -> bool:
    """Whether `step`'s work runs in the local executor's worker processes, this process only
    waiting on their futures (`LocalExecutor._run_parallel`). Not under Ray or Geneva, whose
    drivers run their own Python (and imports) while they wait."""
    return isinstance(step, Backfill) and step.place is not None and step.place.where == "processes"


def _lowest_priority() -> None:
    """This thread (only: Linux's nice is per thread) at nice 19."""
    if sys.platform.startswith("linux"):
        try:
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)
        except OSError:  # a sandbox may refuse it: the import then only competes a little harder
            pass


class Prefetch:
    """`load_model_processor(model)` (transformers, tokenizers, the processor's files) and, where
    a GPU is present, inductor's compiler (the compiled tower's and train step's), on a thread."""

    def __init__(self, model_spec: Any, during: str):
        self.model_spec, self.during = model_spec, during
        self.seconds: float | None = None
        self.error: str | None = None
        self._thread = threading.Thread(target=self._run, name="vlmspec-prefetch", daemon=True)

    @classmethod
    def before(cls, model_spec: Any, steps: list, i: int) -> "Prefetch | None":
        """A prefetch to run through `steps[i]`: where that step runs elsewhere and a later one
        needs the model here; else None."""
        if model_spec is None or not runs_elsewhere(steps[i]) or not any(map(needs_model, steps[i + 1:])):
            return None
        return cls(model_spec, steps[i].name)

    def start(self) -> "Prefetch":
        self._thread.start()
        return self

    def _run(self) -> None:
        t0 = time.perf_counter()
        _lowest_priority()
        try:
            from .vlm.models import load_model_processor

            load_model_processor(self.model_spec)
            import torch

            if torch.cuda.is_available():
                import torch._inductor.compile_fx  # noqa: F401 - ~1-2 s of the first torch.compile
        except Exception as e:  # noqa: BLE001 - the step that needs it imports it again and says why
            self.error = f"{type(e).__name__}: {e}"
        self.seconds = round(time.perf_counter() - t0, 2)

    def join(self) -> dict[str, Any]:
        """Wait for the thread; what it did, for the run record."""
        t0 = time.perf_counter()
        self._thread.join()
        return {"during": self.during, "seconds": self.seconds, "waited_s": round(time.perf_counter() - t0, 2),
                **({"error": self.error} if self.error else {})}

    @staticmethod
    def summary(done: dict[str, Any]) -> str:
        """The apply summary's line: the wait after the step is in no step's seconds."""
        text = f"model imports: {done['seconds']:.1f} s on a thread during `{done['during']}`"
        return text + (f", then {done['waited_s']:.1f} s waited for them" if done["waited_s"] >= 0.05 else "")
