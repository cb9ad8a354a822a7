"""One place for torchrun: whether a process group runs, this process's rank, objects across ranks, the
DistributedDataParallel wrapper (and how to see through it and through `torch.compile`), and this process's share
of the node's cores for loader workers."""

from __future__ import annotations

import os
from typing import Any

import torch
import torch.distributed as dist


def loader_workers(requested: int = 4) -> int:
    """`requested` loader workers, but no more than this process's share of the cores it may run on (torchrun
    starts LOCAL_WORLD_SIZE processes per node): more workers than cores only compete, and PyTorch warns."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    share = max(1, cores // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1"))))
    return max(0, min(int(requested), share))


def is_distributed() -> bool:
    """Whether a process group is up (under torchrun), whatever its size."""
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def from_every_rank(value: Any) -> list:
    """Every rank's `value`, indexed by rank (one element outside torchrun); all ranks must call it together."""
    if not is_distributed():
        return [value]
    values: list = [None] * dist.get_world_size()
    dist.all_gather_object(values, value)
    return values


def broadcast_object(value: Any) -> Any:
    """Rank 0's value on every rank (e.g. a run name with a timestamp, so all ranks write to one run folder)."""
    if not is_distributed():
        return value
    holder = [value]
    dist.broadcast_object_list(holder, src=0)
    return holder[0]


def distributed_model(model: torch.nn.Module, device: torch.device,
                      find_unused_parameters: bool = False) -> torch.nn.Module:
    """DistributedDataParallel around the pretext (gloo on CPU, NCCL on GPUs).

    ``find_unused_parameters=True`` where a step leaves some parameters out (the cyclic multi-task pretext runs
    one task's heads per step)."""
    device_ids = [device.index] if device.type == "cuda" else None
    return torch.nn.parallel.DistributedDataParallel(model, device_ids=device_ids,
                                                     find_unused_parameters=find_unused_parameters)


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The module itself inside DistributedDataParallel (``.module``) and `torch.compile` (``._orig_mod``)."""
    while True:
        if isinstance(model, torch.nn.parallel.DistributedDataParallel):
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), torch.nn.Module):
            model = model._orig_mod
        else:
            return model
