"""Seeding and device selection: the one place that decides CPU or CUDA, torch or faiss GPU."""
from __future__ import annotations

import random

import faiss
import numpy as np
import torch
from torch import nn

from lowbudget import distributed
from lowbudget.cli import UsageError


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (all devices) so that a run can be repeated."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def resolve_device(name: str) -> torch.device:
    """'auto' -> cuda when available else cpu; asking for cuda without one is a UsageError."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: no CUDA device is available")
    return torch.device(name)


def faiss_uses_gpu(device: torch.device) -> bool:
    """faiss runs on all GPUs only when it was built with GPU support and the device is CUDA."""
    return (device.type == "cuda" and hasattr(faiss, "index_cpu_to_all_gpus")
            and faiss.get_num_gpus() > 0)


def on_device(model: nn.Module, device: torch.device) -> nn.Module:
    """`model` on `device`; wrapped in DataParallel when several GPUs are visible, as the original, unless
    torchrun gave this process its own GPU (training then wraps it in DistributedDataParallel)."""
    model = model.to(device)
    if device.type == "cuda" and torch.cuda.device_count() > 1 and not distributed.active():
        model = nn.DataParallel(model)
    return model
