"""Data-parallel training with ``torch.distributed``: one code path for 1 or N processes.

Under ``torchrun`` (which sets ``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``/``MASTER_PORT``)
:func:`init_from_env` joins the process group (gloo on CPU, nccl when CUDA is there);
without those variables everything runs as a world of one and these helpers do nothing.
Every rank builds the same data, vocabulary and initial weights (same seed; rank 0's
weights are broadcast anyway), walks the same shuffled order and takes its own slice of
every global batch; gradients are averaged with an all-reduce before each optimizer
step, so the weights stay bit-identical on every rank. Rank 0 evaluates, decides early
stopping (broadcast to the others), logs to MLflow and registers.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
from torch import nn


def init_from_env(backend: str | None = None) -> tuple[int, int]:
    """Join the process group described by torchrun's environment; (rank, world)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and dist.is_available() and not dist.is_initialized():
        backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
        dist.init_process_group(backend=backend)
    return rank_world()


def rank_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_main() -> bool:
    return rank_world()[0] == 0


def broadcast_parameters(module: nn.Module) -> None:
    """Rank 0's parameters and buffers on every rank."""
    if rank_world()[1] == 1:
        return
    with torch.no_grad():
        for t in list(module.parameters()) + list(module.buffers()):
            dist.broadcast(t.data, src=0)


def average_gradients(module: nn.Module) -> None:
    """All-reduce every gradient and divide by the world size (data parallel SGD)."""
    world = rank_world()[1]
    if world == 1:
        return
    params = [p for p in module.parameters() if p.requires_grad]
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    flat = torch.cat([p.grad.reshape(-1) for p in params if p.grad is not None])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    flat.div_(world)
    offset = 0
    for p in params:
        assert p.grad is not None
        n = p.grad.numel()
        p.grad.copy_(flat[offset : offset + n].view_as(p.grad))
        offset += n


def broadcast_float(value: float) -> float:
    """Rank 0's value on every rank."""
    if rank_world()[1] == 1:
        return value
    t = torch.tensor([value], dtype=torch.float64)
    dist.broadcast(t, src=0)
    return float(t.item())


def barrier() -> None:
    if rank_world()[1] > 1:
        dist.barrier()


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
