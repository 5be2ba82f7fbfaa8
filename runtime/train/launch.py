"""Data-parallel ranks, started two ways, both handed the same `TrainJob` (no rank re-reads the
spec, re-plans or re-compiles it). Gloo on CPU (what CI tests), NCCL on GPUs.

- `train.devices: N` (`launch`): this process spawns N ranks for the train step alone.
- An external launcher (`torchrun --nproc-per-node N -m vlmspec.runtime.cli apply SPEC`,
  `accelerate launch`, a cluster's): every rank runs `vlmspec apply`. `from_environment` finds the
  ranks in the environment; rank 0 does every data step while the others wait (`follow`), each rank
  trains its shard of every batch when rank 0 shares the job, rank 0 writes the adapter and the
  records, and eval runs once, on rank 0. Multi-node is then the launcher's job.
NVLink multicast stays off in every rank (it can take a shared host's GPUs down).
"""

from __future__ import annotations

import os
import socket
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Iterator

from vlmspec.compiler.errors import ApplyError, Problem

from .job import TrainJob

__all__ = ["Ranks", "follow", "from_environment", "launch", "ranks_session", "share_job"]

# Set in every rank's environment unless the user set them: NVLink SHARP / multicast off.
NO_MULTICAST = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}
# How long the waiting ranks wait for rank 0's data steps (a 56 GB tier-3 column takes a while);
# the default process-group timeout (10-30 min) would kill them mid-backfill.
WAIT = timedelta(days=2)


def _no_multicast() -> None:
    for k, v in NO_MULTICAST.items():
        os.environ.setdefault(k, v)


def _uses_cuda(device: str | None) -> bool:
    import torch

    return torch.cuda.is_available() and (device is None or device.startswith("cuda"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, n: int, port: int, job: TrainJob, device: str | None, stop_after: int | None,
            results: Any) -> None:
    import torch
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    _no_multicast()
    cuda = _uses_cuda(device)
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
    import torch
    import torch.multiprocessing as mp

    if _uses_cuda(device) and torch.cuda.device_count() < devices:
        raise ApplyError(Problem(f"`train.devices: {devices}` but this machine has {torch.cuda.device_count()} GPU(s)",
                                 "train.devices", fix="Lower `train.devices`"))
    ctx = mp.get_context("spawn")
    results = ctx.SimpleQueue()
    mp.start_processes(_worker, args=(devices, _free_port(), job, device, stop_after, results), nprocs=devices,
                       join=True, start_method="spawn")
    return results.get()


# torch is imported inside the functions: `apply` asks `from_environment` on every run, data-only
# specs included, and must not pay for importing torch to learn it runs alone.


# --- ranks started by an external launcher --------------------------------------------------

@dataclass(frozen=True)
class Ranks:
    """This process's place among ranks an external launcher started."""

    rank: int
    world: int
    local_rank: int
    local_world: int

    def device(self, device: str | None) -> str:
        return f"cuda:{self.local_rank}" if _uses_cuda(device) else "cpu"


def from_environment(environ: dict | None = None) -> Ranks | None:
    """The ranks torchrun / accelerate / a cluster launcher describe (RANK, WORLD_SIZE, LOCAL_RANK,
    LOCAL_WORLD_SIZE), or None for a plain process."""
    env = os.environ if environ is None else environ
    world = int(env.get("WORLD_SIZE", "1") or 1)
    if world <= 1 or "RANK" not in env:
        return None
    rank = int(env["RANK"])
    return Ranks(rank, world, int(env.get("LOCAL_RANK", rank)), int(env.get("LOCAL_WORLD_SIZE", world)))


@contextmanager
def ranks_session(ranks: Ranks, device: str | None) -> Iterator[Any]:
    """Join the launcher's process group for one apply; yields the control group (gloo) that the
    waiting ranks listen on, beside the default group training reduces over (NCCL on GPUs)."""
    import torch
    import torch.distributed as dist

    _no_multicast()
    cuda = _uses_cuda(device)
    if cuda:
        torch.cuda.set_device(ranks.local_rank)
    else:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // ranks.local_world))
    dist.init_process_group("nccl" if cuda else "gloo", timeout=WAIT)
    try:
        yield dist.new_group(backend="gloo", timeout=WAIT)
    finally:
        dist.destroy_process_group()


def share_job(job: TrainJob | None, control: Any) -> TrainJob | None:
    """Rank 0 hands every rank the job to train (None: nothing more; leave)."""
    import torch.distributed as dist

    box = [job]
    dist.broadcast_object_list(box, src=0, group=control)
    return box[0]


def follow(ranks: Ranks, control: Any, device: str | None) -> int:
    """A rank other than 0: wait for each job rank 0 shares, train its shard, until told to leave.
    Returns the number of jobs trained."""
    from .loop import run_training

    n = 0
    while (job := share_job(None, control)) is not None:
        run_training(job, ranks.device(device))
        n += 1
    return n
