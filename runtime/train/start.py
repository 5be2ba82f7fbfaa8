"""How a training run starts: reuse an adapter already saved under the same fingerprint, spawn the
data-parallel ranks `train.devices` asks for, or train in this process.
"""

from __future__ import annotations

from typing import Any, Callable

from ..progress import Reporter
from .checkpoint import finished_run
from .job import TrainJob
from .loop import run_training

__all__ = ["train", "train_from_spec"]


def train_from_spec(prep, device: str | None = None, stop_after: int | None = None,
                    reporter: Reporter | None = None) -> dict[str, Any]:
    """`train` for a prepared spec (notebooks, tests): the job `apply` would build."""
    return train(TrainJob.from_prepared(prep), device, stop_after, reporter)


def train(job: TrainJob, device: str | None = None, stop_after: int | None = None,
          reporter: Reporter | None = None, share: Callable[[TrainJob], Any] | None = None) -> dict[str, Any]:
    """Train per `job`; resumes from `<output_dir>/checkpoint` when its fingerprint matches.

    With `train.devices > 1` (and not already launched as ranks, e.g. by torchrun) it spawns that many
    data-parallel processes (`launch.py`), each handed the same job. `share` hands the job to the
    ranks an external launcher started (just before training, so they train only what rank 0 does)."""
    from .distributed import world

    done = None if job.fresh else finished_run(job.out, job.fingerprint)
    if done is not None:
        # The adapter for this exact fingerprint is already saved (e.g. killed after saving, before
        # apply recorded the step): record it instead of training again.
        return done
    if job.train.devices > 1 and world()[1] == 1:
        from .launch import launch

        return launch(job, job.train.devices, device, stop_after)
    if share is not None:
        share(job)
    return run_training(job, device, stop_after, reporter)
