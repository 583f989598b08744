"""Seeding and device selection: the one place that decides CPU or CUDA, torch or faiss GPU."""
from __future__ import annotations

import contextlib
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


# What --precision auto means per device type: measured by benchmarks/bench_embedding.py (docs/speed.md).
AUTO_PRECISION = {"cpu": "fp32-cl", "cuda": "fp32"}
AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
CHANNELS_LAST = {"fp32-cl", *AUTOCAST_DTYPES}  # the precisions that run with channels-last weights


def resolve_precision(name: str, device: torch.device) -> str:
    """--precision: 'auto' -> the measured choice for the device type; any other name as given."""
    return AUTO_PRECISION.get(device.type, "fp32") if name == "auto" else name


def inference_autocast(precision: str, device: torch.device) -> contextlib.AbstractContextManager:
    """Plain float32 for 'fp32' and 'fp32-cl'; else autocast to bf16 or fp16 (float32 where torch keeps it,
    e.g. norms)."""
    if precision not in AUTOCAST_DTYPES:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=AUTOCAST_DTYPES[precision])


def for_inference(model: nn.Module, precision: str, device: torch.device) -> nn.Module:
    """`model` on `device` for `precision`: channels-last weights (the layout the fast CPU convolutions and the
    bf16/fp16 ones use; float32 sums in another order) except for 'fp32', whose output stays the plain
    float32 forward pass's."""
    model = on_device(model.eval(), device)
    return model.to(memory_format=torch.channels_last) if precision in CHANNELS_LAST else model


def on_device(model: nn.Module, device: torch.device) -> nn.Module:
    """`model` on `device`; wrapped in DataParallel when several GPUs are visible, as the original, unless
    torchrun gave this process its own GPU (training then wraps it in DistributedDataParallel)."""
    model = model.to(device)
    if device.type == "cuda" and torch.cuda.device_count() > 1 and not distributed.active():
        model = nn.DataParallel(model)
    return model
