"""torchrun: one process per device, DistributedDataParallel, and rank 0 alone prints and writes files.

A script started by torchrun (WORLD_SIZE > 1) that runs a backbone or trains calls init_from_env()
once: the process joins the process group (gloo for CPU tensors, nccl for CUDA tensors), takes the
GPU of its LOCAL_RANK, and prints nothing unless it is rank 0. Inference is shared out: each process
takes a contiguous block of the rows (shard, shard_images), and gather_rows() gives every process all
the rows again, in order. Without a process group each function here is the single-process identity.
"""
from __future__ import annotations

import atexit
import os
import sys
from typing import TypeVar

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from lowbudget import datasets
from lowbudget.cli import UsageError

T = TypeVar("T")


def launched() -> bool:
    """Started by torchrun with more than one process."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def active() -> bool:
    """This process is in a process group: inference is shared out and training is synchronised."""
    return dist.is_available() and dist.is_initialized()


def is_main() -> bool:
    """Rank 0, or no torchrun: the process that prints and writes files (known before any process group)."""
    return int(os.environ.get("RANK", "0")) == 0


def init_from_env(device: torch.device) -> torch.device:
    """Under torchrun, join the process group and quiet every rank but 0; returns the device this
    process computes on (the GPU of its LOCAL_RANK when `device` is CUDA). Otherwise `device` as given."""
    if not launched():
        return device
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
    dist.init_process_group("cpu:gloo,cuda:nccl" if device.type == "cuda" else "gloo")
    atexit.register(cleanup)
    if not is_main():
        sys.stdout = open(os.devnull, "w")
    return device


def cleanup() -> None:
    """Leave the process group, if this process is in one."""
    if active():
        dist.destroy_process_group()


def main_continues_alone() -> bool:
    """Leave the process group because what follows is one process's work (selection, k-NN, a head on
    cached features): True on rank 0, which carries on as a single process; False on the others, which stop."""
    cleanup()
    return is_main()


def quiet() -> bool | None:
    """tqdm's `disable`: automatic (None) on rank 0, True on the others."""
    return None if is_main() else True


def _block(rank: int, world: int, n: int) -> slice:
    return slice(rank * n // world, (rank + 1) * n // world)


def shard(n: int) -> slice:
    """This process's contiguous block of rows 0..n-1 (the blocks of all processes differ in length by
    at most one, none is padded); all of them without a process group."""
    if not active():
        return slice(0, n)
    if n < dist.get_world_size():
        raise UsageError(f"{n} rows cannot be shared out among {dist.get_world_size()} processes; run fewer")
    return _block(dist.get_rank(), dist.get_world_size(), n)


def shard_images(images: datasets.Images) -> datasets.Images:
    """This process's block of `images` (see shard); `images` itself, not copied, without a process group."""
    return images.subset(np.arange(len(images))[shard(len(images))]) if active() else images


def gather_rows(local: torch.Tensor, n: int) -> torch.Tensor:
    """All n rows on every process, in order, from each process's shard(n) block of them (CPU tensors):
    each block is broadcast by its owner straight into its place, so nothing is padded or copied twice."""
    if not active():
        return local
    out = local.new_empty((n, *local.shape[1:]))
    for rank in range(dist.get_world_size()):
        block = out[_block(rank, dist.get_world_size(), n)]
        if rank == dist.get_rank():
            block.copy_(local)
        dist.broadcast(block, src=rank)
    return out


def gather_objects(obj: T) -> list[T]:
    """Every process's `obj` (small, picklable), in rank order; [obj] without a process group."""
    if not active():
        return [obj]
    out = [obj] * dist.get_world_size()  # each replaced by that process's object
    dist.all_gather_object(out, obj)
    return out


def sum_over_processes(*values: float) -> list[float]:
    """Each of `values` summed over the processes (for logs that speak for all of them); as given without
    a process group."""
    if not active():
        return list(values)
    sums = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(sums)
    return sums.tolist()


def per_process_batch(batch_size: int) -> int:
    """Each process's share of --batch-size, so that a step still averages the gradient over
    --batch-size images, as one process does."""
    world = dist.get_world_size() if active() else 1
    if batch_size % world:
        raise UsageError(f"--batch-size: {batch_size} images do not divide evenly among {world} processes")
    return batch_size // world


def ddp(model: nn.Module, device: torch.device) -> nn.Module:
    """`model` (on `device`) in DistributedDataParallel, which averages gradients over the processes,
    when there is a process group; `model` itself otherwise."""
    if not active():
        return model
    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
