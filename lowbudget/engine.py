"""The training and evaluation loop shared by the scripts that train a head on the labelled pool.

One epoch is seeded from (seed, epoch) alone, for the shuffle order and the augmentation, so a run
resumed from its checkpoint ends with the same weights as an uninterrupted one. Each image's
augmentation is drawn from (epoch seed, position in the pool) alone, so it does not depend on which
DataLoader worker or torchrun process loads it. Under torchrun (tools.distributed) the model is in
DistributedDataParallel, each process loads --batch-size / world images of every step through a
DistributedSampler, evaluation is shared out by blocks of rows, and rank 0 alone saves checkpoints.
"""
from __future__ import annotations

import io
import json
import math
import os
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset, DistributedSampler
from tqdm import tqdm

from lowbudget import datasets, distributed
from lowbudget.cli import UsageError
from lowbudget.fileio import atomic_write, atomic_write_bytes, text_digest
from lowbudget.indices import pool_digest
from lowbudget.metrics import class_mean_accuracy
from models.checkpoints import load_weights_only, strip_module_prefix

Batches = Iterable[tuple[torch.Tensor, torch.Tensor]]
EpochBatches = Callable[[int], Batches]  # an epoch's batches, from that epoch's seed


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


def epoch_seed(seed: int, epoch: int) -> int:
    """The seed of an epoch's shuffle and augmentation: a function of (seed, epoch) only."""
    return seed * 10007 + epoch


def feature_loader(feats: np.ndarray, labels: np.ndarray, batch_size: int) -> EpochBatches:
    """Shuffled (feature, label) batches for each epoch, sliced from whole tensors (no per-row calls)."""
    x, y = torch.from_numpy(np.asarray(feats, np.float32)), torch.from_numpy(labels)  # float16 features widened

    def epoch_batches(seed: int) -> Batches:
        order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
        return [(x[rows], y[rows]) for rows in order.split(batch_size)]
    return epoch_batches


class SeededItems(Dataset[datasets.TrainingItem]):
    """`dataset` whose item i is drawn with torch's random generator seeded from (`epoch_seed`, i): the
    same augmentation whatever the order, worker or process that loads it."""

    def __init__(self, dataset: datasets.AugmentedSubset):
        self.dataset, self.epoch_seed = dataset, 0

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> datasets.TrainingItem:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed((self.epoch_seed * 2**32 + i) % 2**63)
            return self.dataset[i]


def image_loader(images: datasets.Images, pool: np.ndarray, dataset: str, image_size: int | None, batch_size: int,
                 workers: int, preprocess: datasets.Preprocess | None = None, *, batch_norm: bool = False
                 ) -> EpochBatches:
    """Shuffled, augmented (image, label) batches of the pool for each epoch, normalised as the backbone's
    `preprocess` says (else as the dataset's); under torchrun this process's share of each batch, from a
    DistributedSampler. `batch_norm` (a network whose BatchNorm layers train) leaves out a last batch of a
    single image, which BatchNorm cannot train on, when the epoch has other batches."""
    items = SeededItems(datasets.AugmentedSubset(images, pool, dataset, image_size, preprocess))
    sampler: DistributedSampler[datasets.TrainingItem] | None = (
        DistributedSampler(items, seed=0) if distributed.active() else None)
    per_process = distributed.per_process_batch(batch_size)
    share = len(items) if sampler is None else sampler.num_samples
    drop_single = batch_norm and share > per_process and share % per_process == 1

    def epoch_batches(seed: int) -> Batches:
        items.epoch_seed = seed
        if sampler is not None:
            sampler.set_epoch(seed)  # it shuffles with seed + epoch, here the epoch's own seed
        return DataLoader(items, batch_size=per_process, shuffle=sampler is None, sampler=sampler,
                          num_workers=workers, generator=torch.Generator().manual_seed(seed),
                          pin_memory=torch.cuda.is_available(), drop_last=drop_single)
    return epoch_batches


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside DataParallel / DistributedDataParallel, or the model itself."""
    return model.module if isinstance(model, (nn.DataParallel, DistributedDataParallel)) else model


def train_epoch(model: nn.Module, batches: Batches, *, optimizer: torch.optim.Optimizer, device: torch.device,
                scaler: torch.amp.GradScaler, embed: Callable[[torch.Tensor], torch.Tensor] | None = None) -> float:
    """One pass of cross-entropy training (inputs through the frozen `embed` first; mixed precision
    when `scaler` is enabled, a disabled one passing the loss and the step through unchanged): mean
    loss (over all torchrun processes)."""
    model.train()
    total, count = 0.0, 0
    for x, y in tqdm(batches, desc="train", leave=False, disable=distributed.quiet()):
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        if embed is not None:
            with torch.no_grad():
                x = embed(x)
        with torch.autocast(device.type, enabled=scaler.is_enabled()):
            loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        total, count = total + loss.item() * len(y), count + len(y)
    loss_sum, images = distributed.sum_over_processes(total, count)
    return loss_sum / max(images, 1)


def finite_weights(model: nn.Module) -> bool:
    """Whether every floating-point weight and buffer of `model` is finite (one reduction per tensor)."""
    return all(bool(torch.isfinite(t).all()) for t in unwrap(model).state_dict().values() if t.is_floating_point())


def check_diverged(model: nn.Module, loss: float, epoch: int) -> None:
    """Training stops, in one line, after an epoch whose loss or weights are NaN or infinite (weights that
    held NaN from the start, or a learning rate too high): every later epoch, checkpoint and result would
    be meaningless. Every torchrun process sees the same summed loss and weights, so all stop alike."""
    if math.isfinite(loss) and finite_weights(model):
        return
    what = f"the loss is {loss}" if not math.isfinite(loss) else "the weights are NaN or infinite"
    raise UsageError(f"training diverged in epoch {epoch}: {what}; nothing of it was written (starting "
                     "weights that hold NaN, as a --weights checkpoint may, or too high a learning rate)")


def feature_logits(head: nn.Module, feats: np.ndarray, device: torch.device, batch_size: int = 4096
                   ) -> Iterator[torch.Tensor]:
    """Logits of `head` for feature rows, batch by batch (CPU tensors): memory O(batch), not O(N x C)."""
    head.eval()
    with torch.inference_mode():
        for i in range(0, len(feats), batch_size):
            yield head(torch.from_numpy(np.asarray(feats[i:i + batch_size], np.float32)).to(device)).float().cpu()


def image_logits(head: nn.Module, backbone: nn.Module, images: datasets.Images, dataset: str, batch_size: int,
                 workers: int, image_size: int | None, device: torch.device,
                 preprocess: datasets.Preprocess | None = None) -> Iterator[torch.Tensor]:
    """Logits of head(backbone(image)) with the backbone's `preprocess` (else the dataset's centre-crop
    inference transform), batch by batch."""
    head.eval()
    with torch.inference_mode():
        for x in datasets.inference_batches(images, dataset, batch_size, workers, image_size, preprocess):
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


CHECKPOINT_EVERY_S = 60.0  # the latest state reaches the disk at most this often, and after the last epoch


class LatestCheckpoint:
    """The state after the last finished epoch: serialised in memory every epoch, written to `path` (rank 0
    alone) at most every CHECKPOINT_EVERY_S seconds and by write() (after the last epoch, or when training
    stops on an exception such as Ctrl-C). Epochs of a few milliseconds are not slowed by a disk write
    each, and a killed run loses at most that much training."""

    def __init__(self, path: str):
        self.path, self.every_s = path, CHECKPOINT_EVERY_S
        self.pending: bytes | None = None
        self.written_at = time.monotonic()

    def update(self, state: dict) -> None:
        """Keep `state` as the latest; write it when the last write is CHECKPOINT_EVERY_S old."""
        if not distributed.is_main():
            return
        buffer = io.BytesIO()
        torch.save(state, buffer)
        self.pending = buffer.getvalue()
        if time.monotonic() - self.written_at >= self.every_s:
            self.write()

    def write(self) -> None:
        """Write the latest state if it is not on disk yet."""
        if self.pending is not None:
            atomic_write_bytes(self.path, self.pending)
            self.pending, self.written_at = None, time.monotonic()


def best_path(checkpoint: str) -> str:
    """Where the best validated weights are kept, apart from the latest checkpoint."""
    stem, ext = os.path.splitext(checkpoint)
    return f"{stem}_best{ext}"


@dataclass
class TrainingState:
    """How far training has gone: epochs done, the last validation and the best validated top-1. The
    checkpoint holds these three under the same keys."""
    epoch: int = 0
    last: dict[str, float] | None = None
    best_top1: float | None = None

    @classmethod
    def from_checkpoint(cls, saved: dict) -> TrainingState:
        return cls(saved["epoch"], saved["last"], saved["best_top1"])

    def to_checkpoint(self) -> dict:
        return asdict(self)

    def record(self, validation: dict[str, float]) -> bool:
        """Keep `validation` as the last one: whether its top-1 is the best so far."""
        self.last = validation
        if self.best_top1 is None or validation["top1"] > self.best_top1:
            self.best_top1 = validation["top1"]
            return True
        return False

    def result(self) -> dict[str, float]:
        """The last validation ('top1', 'top5', 'class_mean') and 'best_top1'."""
        assert self.last is not None and self.best_top1 is not None, "no validation recorded"
        return {**self.last, "best_top1": self.best_top1}


TRAINED_ON_WORDS = {"pool": "labelled pool", "features": "train features", "val_features": "evaluation features",
                    "images": "image listing", "model": "model"}


def trained_on(pool: np.ndarray, **sources: object) -> dict[str, str]:
    """What a model is trained on, for its checkpoint (fit's `trained_on`): the labelled pool's digest and a
    digest of each of `sources` (JSON values: a features fingerprint, datasets.listing_record of the images,
    the backbone's weights and transform)."""
    return {"pool": pool_digest(pool),
            **{name: text_digest(json.dumps(value, sort_keys=True)) for name, value in sources.items()}}
CHECKPOINT_KEYS = ("epoch", "last", "best_top1", "schedule", "seed", "model", "optimizer", "scheduler", "scaler")


def read_checkpoint(path: str) -> dict:
    """A checkpoint that fit() wrote, loaded with weights_only (no code runs); anything else, a file torch
    cannot read or one that holds other objects, is a one-line UsageError naming --resume."""
    try:
        saved = load_weights_only(path)
    except Exception as err:
        why = f"{type(err).__name__}: {err}".strip().splitlines()[0].split(". ")[0]
        raise UsageError(f"--resume: {path!r} is not a checkpoint this suite can load ({why})") from None
    if not isinstance(saved, dict) or any(key not in saved for key in CHECKPOINT_KEYS):
        raise UsageError(f"--resume: {path!r} is not a training checkpoint of this suite (it needs "
                         f"{', '.join(CHECKPOINT_KEYS)})")
    return saved


def check_resumable(path: str, saved: dict, *, schedule: Schedule, seed: int,
                    trained_on: dict[str, str] | None) -> None:
    """The checkpoint must come from the same schedule and seed and, when the caller says what it trains
    on (`trained_on`: the labelled pool's digest, the features' fingerprint), from the same training set;
    a checkpoint that records no training set is refused then, since it cannot be checked."""
    if saved["schedule"] != asdict(schedule) or saved["seed"] != seed:
        raise UsageError(f"--resume: {path} was trained with another schedule or seed "
                         f"({saved['schedule']}, seed {saved['seed']})")
    if trained_on is None:
        return
    recorded = saved.get("trained_on")
    if not isinstance(recorded, dict):
        raise UsageError(f"--resume: {path} does not record what it was trained on (written by an older version), "
                         "so it cannot be checked against this labelled pool; start again without --resume")
    changed = [key for key in trained_on if recorded.get(key) != trained_on[key]]
    if changed:
        details = "; ".join(f"{TRAINED_ON_WORDS.get(key, key)} {recorded.get(key)} there, {trained_on[key]} now"
                            for key in changed)
        raise UsageError(f"--resume: {path} was trained on something else than this run ({details}): the index file "
                         "was sampled again or the features changed; start again without --resume")


def fit(model: nn.Module, optimizer: torch.optim.Optimizer, *, epoch_batches: EpochBatches,
        validate: Callable[[], dict[str, float]] | None, schedule: Schedule, device: torch.device, seed: int,
        checkpoint: str, resume: bool = False, embed: Callable[[torch.Tensor], torch.Tensor] | None = None,
        amp: bool = False, trained_on: dict[str, str] | None = None) -> dict[str, float]:
    """Train `model` (already on `device`) for the schedule, validating (`validate()`: accuracy now) as
    the original; the latest state is checkpointed (LatestCheckpoint: at most every CHECKPOINT_EVERY_S, after
    the last epoch and when interrupted), the best validated weights apart, as soon as they are. An epoch
    whose loss or weights are not finite stops training (check_diverged) before it is validated or saved. Each
    epoch's batches come from epoch_seed(seed, epoch), which also seeds torch's global generator.
    `trained_on` (e.g. {'pool': digest, 'features': fingerprint}) is recorded in the checkpoint, and a
    resumed checkpoint must record the same (check_resumable).

    Returns the last validation ('top1', 'top5', 'class_mean') and 'best_top1'; {} with `validate` None (no
    evaluation set: an unlabelled folder labelled through --labels), which trains alone. With `resume` and an
    existing checkpoint, training continues from it (weights, optimiser, scheduler, scaler, history).
    """
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, schedule.milestones, gamma=0.1)
    scaler = torch.amp.GradScaler(device.type, enabled=amp and device.type == "cuda")
    state = TrainingState()
    if resume and os.path.isfile(checkpoint):
        saved = read_checkpoint(checkpoint)
        check_resumable(checkpoint, saved, schedule=schedule, seed=seed, trained_on=trained_on)
        try:
            unwrap(model).load_state_dict(strip_module_prefix(saved["model"]))
            optimizer.load_state_dict(saved["optimizer"])
            scheduler.load_state_dict(saved["scheduler"])
            scaler.load_state_dict(saved["scaler"])
        except (RuntimeError, ValueError, KeyError) as err:
            why = str(err).strip().splitlines()[0]
            raise UsageError(f"--resume: {checkpoint} does not fit this model ({why})") from None
        state = TrainingState.from_checkpoint(saved)
        print(f"=> resumed from {checkpoint} at epoch {state.epoch}")
    latest = LatestCheckpoint(checkpoint)
    try:
        for epoch in range(state.epoch, schedule.epochs):
            this_seed = epoch_seed(seed, epoch)
            torch.manual_seed(this_seed)
            loss = train_epoch(model, epoch_batches(this_seed), optimizer=optimizer, device=device, scaler=scaler,
                               embed=embed)
            print(f"Epoch: [{epoch}]\tLoss {loss:.4f}")
            check_diverged(model, loss, epoch)
            if validate is not None and schedule.validates_at(epoch):
                validation = validate()
                print(f" * Acc@1 {validation['top1']:.3f} Acc@5 {validation['top5']:.3f}")
                if state.record(validation):
                    save_checkpoint(best_path(checkpoint), {"epoch": epoch + 1, "model": unwrap(model).state_dict(),
                                                            "trained_on": trained_on, **validation})
            scheduler.step()
            print("LR: " + ", ".join(f"{lr:f}" for lr in scheduler.get_last_lr()))
            state.epoch = epoch + 1
            latest.update({**state.to_checkpoint(), "schedule": asdict(schedule), "seed": seed,
                           "trained_on": trained_on, "model": unwrap(model).state_dict(),
                           "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                           "scaler": scaler.state_dict()})
    finally:
        latest.write()
    if validate is None:
        return {}
    if state.last is None:  # a schedule of no epochs (the programs refuse --epochs 0): still measure
        state.record(validate())
    return state.result()
