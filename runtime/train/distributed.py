"""Data-parallel comms: who this rank is, and the sums every rank takes part in (`launch.py` starts
the ranks).

Each rank reads its own shard of every global batch (`loader.epoch_order`), computes the
token-weighted loss against the global token count, and gradients are summed with one
all-reduce of a flat buffer per optimizer step, so N processes give the single-process result up
to floating-point noise for the same global batch. Gloo on CPU (what CI tests), NCCL on GPUs.
We reduce explicitly rather than wrapping in DDP because the cached forward reaches into the
model's language side, past DDP's forward hooks.
"""

from __future__ import annotations

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
