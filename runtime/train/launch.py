"""Starting data-parallel ranks: `train.devices: N` spawns N processes on this machine, each handed
the same `TrainJob` (no rank re-reads the spec, re-plans or re-compiles it). Gloo on CPU (what CI
tests), NCCL on GPUs. Under an external launcher (torchrun, accelerate) the ranks already exist:
`apply` finds them in the environment instead (`from_environment`).
"""

from __future__ import annotations

import os
import socket
from typing import Any

import torch
import torch.distributed as dist

from vlmspec.compiler.errors import ApplyError, Problem

from .job import TrainJob

__all__ = ["launch"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, n: int, port: int, job: TrainJob, device: str | None, stop_after: int | None,
            results: Any) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    cuda = torch.cuda.is_available() and (device is None or device.startswith("cuda"))
    if cuda:
        torch.cuda.set_device(rank)
    else:
        # The ranks share this machine's cores: each takes its share, or they oversubscribe.
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // n))
    dist.init_process_group("nccl" if cuda else "gloo", rank=rank, world_size=n)
    try:
        from .loop import run_training

        out = run_training(job, f"cuda:{rank}" if cuda else "cpu", stop_after)
        if rank == 0:
            results.put(out)
    finally:
        dist.destroy_process_group()


def launch(job: TrainJob, devices: int, device: str | None, stop_after: int | None) -> dict[str, Any]:
    """Run training on `devices` spawned processes; returns rank 0's result."""
    import torch.multiprocessing as mp

    if torch.cuda.is_available() and (device is None or device.startswith("cuda")) \
            and torch.cuda.device_count() < devices:
        raise ApplyError(Problem(f"`train.devices: {devices}` but this machine has {torch.cuda.device_count()} GPU(s)",
                                 "train.devices", fix="Lower `train.devices`"))
    ctx = mp.get_context("spawn")
    results = ctx.SimpleQueue()
    mp.start_processes(_worker, args=(devices, _free_port(), job, device, stop_after, results), nprocs=devices,
                       join=True, start_method="spawn")
    return results.get()
