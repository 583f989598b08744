"""The training and evaluation loop shared by the scripts that train a head on the labelled pool.

One epoch is seeded from (seed, epoch) alone, for the shuffle order and the augmentation, so a run
resumed from its checkpoint ends with the same weights as an uninterrupted one. Each image's
augmentation is drawn from (epoch seed, position in the pool) alone, so it does not depend on which
DataLoader worker or torchrun process loads it. Under torchrun (tools.distributed) the model is in
DistributedDataParallel, each process loads --batch-size / world images of every step through a
DistributedSampler, evaluation is shared out by blocks of rows, and rank 0 alone saves checkpoints.
"""
from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler
from tqdm import tqdm

from lowbudget import datasets, distributed
from lowbudget.backbones import strip_module_prefix
from lowbudget.cli import UsageError
from lowbudget.fileio import atomic_write
from lowbudget.metrics import class_mean_accuracy

Batches = Iterable[tuple[torch.Tensor, torch.Tensor]]


class Normalize(nn.Module):
    """L2 normalisation of each row, the first layer of the original's linear head."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(x, dim=1)


def linear_head(dim: int, num_classes: int, normalize: bool = True) -> nn.Sequential:
    """[Normalize ->] Linear, PyTorch's default initialisation."""
    layers = [Normalize()] if normalize else []
    return nn.Sequential(*layers, nn.Linear(dim, num_classes))


@dataclass
class Schedule:
    """Epochs, the learning rate(s) and MultiStepLR(gamma 0.1) milestones, validation interval."""
    epochs: int
    lr: float
    milestones: list[int]
    print_freq: int

    def validates_at(self, epoch: int) -> bool:
        """The original validates every print_freq epochs and after the last one."""
        return epoch % self.print_freq == 0 or epoch == self.epochs - 1


def feature_loader(feats: np.ndarray, labels: np.ndarray, batch_size: int, generator: torch.Generator
                   ) -> Callable[[int], Batches]:
    """Shuffled (feature, label) batches for each epoch, sliced from whole tensors (no per-row calls)."""
    x, y = torch.from_numpy(feats), torch.from_numpy(labels)

    def epoch_batches(epoch: int) -> Batches:
        order = torch.randperm(len(y), generator=generator)
        return [(x[rows], y[rows]) for rows in order.split(batch_size)]
    return epoch_batches


class SeededItems(Dataset):
    """`dataset` whose item i is drawn with torch's random generator seeded from (`epoch_seed`, i): the
    same augmentation whatever the order, worker or process that loads it."""

    def __init__(self, dataset: Dataset):
        self.dataset, self.epoch_seed = dataset, 0

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed((self.epoch_seed * 2**32 + i) % 2**63)
            return self.dataset[i]


def image_loader(images: datasets.Images, pool: np.ndarray, dataset: str, image_size: int | None, batch_size: int,
                 workers: int, generator: torch.Generator) -> Callable[[int], Batches]:
    """Shuffled, augmented (image, label) batches of the pool for each epoch (after seed_epoch); under
    torchrun this process's share of each batch, from a DistributedSampler."""
    items = SeededItems(datasets.AugmentedSubset(images, pool, dataset, image_size))
    sampler = DistributedSampler(items, seed=0) if distributed.active() else None
    loader = DataLoader(items, batch_size=distributed.per_process_batch(batch_size), shuffle=sampler is None,
                        sampler=sampler, num_workers=workers, generator=generator,
                        pin_memory=torch.cuda.is_available())

    def epoch_batches(epoch: int) -> Batches:
        items.epoch_seed = generator.initial_seed()  # what seed_epoch set
        if sampler is not None:
            sampler.set_epoch(items.epoch_seed)  # it shuffles with seed + epoch, here the epoch's own seed
        return loader
    return epoch_batches


def seed_epoch(seed: int, epoch: int, generator: torch.Generator) -> None:
    """Make an epoch's shuffle and augmentation a function of (seed, epoch) only."""
    torch.manual_seed(seed * 10007 + epoch)
    generator.manual_seed(seed * 10007 + epoch)


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside DataParallel / DistributedDataParallel, or the model itself."""
    return model.module if hasattr(model, "module") else model


def train_epoch(model: nn.Module, batches: Batches, optimizer: torch.optim.Optimizer, device: torch.device,
                embed: Callable[[torch.Tensor], torch.Tensor] | None = None,
                scaler: torch.amp.GradScaler | None = None) -> float:
    """One pass of cross-entropy training (inputs through the frozen `embed` first; mixed precision
    when `scaler` is enabled): mean loss (over all torchrun processes)."""
    model.train()
    amp = scaler is not None and scaler.is_enabled()
    total, count = 0.0, 0
    for x, y in tqdm(batches, desc="train", leave=False, disable=distributed.quiet()):
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        if embed is not None:
            with torch.no_grad():
                x = embed(x)
        with torch.autocast(device.type, enabled=amp):
            loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        if amp:
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        else:
            loss.backward()
            optimizer.step()
        total, count = total + loss.item() * len(y), count + len(y)
    total, count = distributed.sum_over_processes(total, count)
    return total / max(count, 1)


def feature_logits(head: nn.Module, feats: np.ndarray, device: torch.device, batch_size: int = 4096
                   ) -> Iterator[torch.Tensor]:
    """Logits of `head` for feature rows, batch by batch (CPU tensors): memory O(batch), not O(N x C)."""
    head.eval()
    with torch.inference_mode():
        for i in range(0, len(feats), batch_size):
            yield head(torch.from_numpy(feats[i:i + batch_size]).to(device)).float().cpu()


def image_logits(head: nn.Module, backbone: nn.Module, images: datasets.Images, dataset: str, batch_size: int,
                 workers: int, image_size: int | None, device: torch.device) -> Iterator[torch.Tensor]:
    """Logits of head(backbone(image)) with the centre-crop inference transform, batch by batch."""
    head.eval()
    with torch.inference_mode():
        for x in datasets.inference_batches(images, dataset, batch_size, workers, image_size):
            yield head(backbone(x.to(device, non_blocking=True))).float().cpu()


def accuracy(logit_batches: Iterable[torch.Tensor], labels: np.ndarray) -> dict[str, float]:
    """top-1, top-5 and per-class mean accuracy (percent) from streamed logits of this process's
    distributed.shard() block of the evaluation set (all of it without torchrun)."""
    top = torch.cat([logits.topk(min(5, logits.shape[1]), dim=1).indices for logits in logit_batches])
    top = distributed.gather_rows(top, len(labels))
    target = torch.from_numpy(labels)
    return {"top1": 100.0 * float((top[:, 0] == target).float().mean()),
            "top5": 100.0 * float((top == target[:, None]).any(1).float().mean()),
            "class_mean": class_mean_accuracy(top[:, 0].numpy(), labels)}


def feature_accuracy(head: nn.Module, feats: np.ndarray, labels: np.ndarray, device: torch.device) -> dict[str, float]:
    """accuracy() of `head` on feature rows, each torchrun process scoring its block."""
    return accuracy(feature_logits(head, feats[distributed.shard(len(feats))], device), labels)


def save_checkpoint(path: str, state: dict) -> None:
    """Written by rank 0 alone under torchrun (every process holds the same weights)."""
    if distributed.is_main():
        atomic_write(path, lambda f: torch.save(state, f))


def best_path(checkpoint: str) -> str:
    """Where the best validated weights are kept, apart from the latest checkpoint."""
    stem, ext = os.path.splitext(checkpoint)
    return f"{stem}_best{ext}"


def fit(model: nn.Module, optimizer: torch.optim.Optimizer, epoch_batches: Callable[[int], Batches],
        validate: Callable[[], dict[str, float]], schedule: Schedule, device: torch.device, seed: int,
        generator: torch.Generator, checkpoint: str, resume: bool = False,
        embed: Callable[[torch.Tensor], torch.Tensor] | None = None, amp: bool = False) -> dict:
    """Train `model` (already on `device`) for the schedule, validating (`validate()`: accuracy now) as
    the original; the latest state is checkpointed every epoch, the best validated weights apart.

    Returns the last validation ('top1', 'top5', 'class_mean') and 'best_top1'. With `resume` and an
    existing checkpoint, training continues from it (weights, optimiser, scheduler, scaler, history).
    """
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, schedule.milestones, gamma=0.1)
    scaler = torch.amp.GradScaler(device.type, enabled=amp and device.type == "cuda")
    state = {"epoch": 0, "last": None, "best_top1": None}
    if resume and os.path.isfile(checkpoint):
        saved = torch.load(checkpoint, map_location="cpu", weights_only=True)
        if saved.get("schedule") != asdict(schedule) or saved.get("seed") != seed:
            raise UsageError(f"--resume: {checkpoint} was trained with another schedule or seed "
                             f"({saved.get('schedule')}, seed {saved.get('seed')})")
        unwrap(model).load_state_dict(strip_module_prefix(saved["model"]))
        optimizer.load_state_dict(saved["optimizer"])
        scheduler.load_state_dict(saved["scheduler"])
        scaler.load_state_dict(saved["scaler"])
        state = {k: saved[k] for k in state}
        print(f"=> resumed from {checkpoint} at epoch {state['epoch']}")
    for epoch in range(state["epoch"], schedule.epochs):
        seed_epoch(seed, epoch, generator)
        loss = train_epoch(model, epoch_batches(epoch), optimizer, device, embed, scaler)
        print(f"Epoch: [{epoch}]\tLoss {loss:.4f}")
        if schedule.validates_at(epoch):
            state["last"] = validate()
            print(f" * Acc@1 {state['last']['top1']:.3f} Acc@5 {state['last']['top5']:.3f}")
            if state["best_top1"] is None or state["last"]["top1"] > state["best_top1"]:
                state["best_top1"] = state["last"]["top1"]
                save_checkpoint(best_path(checkpoint), {"epoch": epoch + 1, "model": unwrap(model).state_dict(),
                                                        **state["last"]})
        scheduler.step()
        print("LR: " + ", ".join(f"{lr:f}" for lr in scheduler.get_last_lr()))
        state["epoch"] = epoch + 1
        save_checkpoint(checkpoint, {**state, "schedule": asdict(schedule), "seed": seed,
                                     "model": unwrap(model).state_dict(), "optimizer": optimizer.state_dict(),
                                     "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict()})
    if state["last"] is None:  # nothing left to train (resumed at the end, or --epochs 0): still measure
        state["last"] = validate()
        state["best_top1"] = state["last"]["top1"]
    return {**state["last"], "best_top1": state["best_top1"]}
