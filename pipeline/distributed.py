"""torchrun process-group helpers shared by the training loop and the sharded flow/encode stages."""
from __future__ import annotations

import os
from typing import Any

import torch
import torch.distributed as dist

__all__ = ["init_distributed", "is_main_process", "barrier", "gather_objects", "shutdown_distributed"]


def init_distributed() -> tuple[int, int, int]:
    """Join the torchrun process group if WORLD_SIZE > 1; return (rank, world_size, local_rank)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend=backend)
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0"))
    return 0, 1, 0


def is_main_process() -> bool:
    """True on rank 0 (and in a single-process run)."""
    return not dist.is_initialized() or dist.get_rank() == 0


def barrier() -> None:
    """Wait for all ranks (no-op in a single-process run)."""
    if dist.is_initialized():
        dist.barrier()


def gather_objects(obj: Any) -> list[Any]:
    """Every rank's `obj` (picklable), in rank order, on every rank; [obj] in a single-process run."""
    if not dist.is_initialized():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def shutdown_distributed() -> None:
    """Leave the process group if one was joined."""
    if dist.is_initialized():
        dist.destroy_process_group()
