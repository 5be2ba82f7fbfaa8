"""Data-parallel training: launch N processes, shard the slice, and sum gradients across them.

Each rank reads its own shard of every global batch (`loader.epoch_order`), computes the
token-weighted loss against the global token count, and gradients are summed with one
all-reduce of a flat buffer per optimizer step, so N processes give the single-process result up
to floating-point noise for the same global batch. Gloo on CPU (what CI tests), NCCL on GPUs.
We reduce explicitly rather than wrapping in DDP because the cached forward reaches into the
model's language side, past DDP's forward hooks.
"""

from __future__ import annotations

import os
import socket
from typing import Any

import torch
import torch.distributed as dist


def world() -> tuple[int, int]:
    """(rank, world size) of this process; (0, 1) when not distributed."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def all_sum(value: float | int) -> float:
    """Sum a number over ranks (identity when not distributed)."""
    _, n = world()
    if n == 1:
        return value
    t = torch.tensor([float(value)], dtype=torch.float64)
    if dist.get_backend() == "nccl":
        t = t.cuda()
    dist.all_reduce(t)
    return float(t.item())


def sum_gradients(params: list[torch.nn.Parameter]) -> None:
    """All-reduce (sum) the gradients of `params` in one flat buffer."""
    _, n = world()
    if n == 1:
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch._utils._flatten_dense_tensors(grads)
    dist.all_reduce(flat)
    for p, g in zip(params, torch._utils._unflatten_dense_tensors(flat, grads)):
        if p.grad is None:
            p.grad = g
        else:
            p.grad.copy_(g)


def barrier() -> None:
    if world()[1] > 1:
        dist.barrier()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, n: int, port: int, text: str, file: str, device: str | None,
            stop_after: int | None, results: Any) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    cuda = torch.cuda.is_available() and (device is None or device.startswith("cuda"))
    if cuda:
        torch.cuda.set_device(rank)
    else:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // n))
    dist.init_process_group("nccl" if cuda else "gloo", rank=rank, world_size=n)
    try:
        from vlmspec.compiler.load import load_spec_text

        from ..apply import prepare
        from .loop import run_training

        prep = prepare(load_spec_text(text, file=file), allow_destructive=True)
        out = run_training(prep, f"cuda:{rank}" if cuda else "cpu", stop_after)
        if rank == 0:
            results.put(out)
    finally:
        dist.destroy_process_group()


def launch(prep, devices: int, device: str | None, stop_after: int | None) -> dict[str, Any]:
    """Run training on `devices` spawned processes; returns rank 0's result."""
    import torch.multiprocessing as mp

    if torch.cuda.is_available() and (device is None or device.startswith("cuda")) \
            and torch.cuda.device_count() < devices:
        from vlmspec.compiler.errors import ApplyError, Problem

        raise ApplyError(Problem(f"`train.devices: {devices}` but this machine has {torch.cuda.device_count()} GPU(s)",
                                 "train.devices", fix="Lower `train.devices`"))
    ctx = mp.get_context("spawn")
    results = ctx.SimpleQueue()
    mp.start_processes(_worker, args=(devices, _free_port(), prep.loaded.text, prep.loaded.file, device,
                                      stop_after, results), nprocs=devices, join=True, start_method="spawn")
    return results.get()
