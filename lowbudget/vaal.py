"""VAAL, Variational Adversarial Active Learning (Sinha, Ebrahimi, Darrell, ICCV 2019).

A β-VAE learns a latent code of every image, labelled and unlabelled; a discriminator on the latent mean
learns to tell labelled (target 1) from unlabelled (target 0), while the VAE is also trained to make its
codes of unlabelled images look labelled. The query takes the unlabelled images that the discriminator
rates least likely to be labelled.

Two modes. Images: the authors' convolutional VAE (sinhasam/vaal `model.py`) on images resized to 32 or
64 px, read through `lowbudget.datasets` (CIFAR, Fashion-MNIST, image folders; grey repeated to 3
channels), scaled to [-1, 1] as the authors' transform does, no augmentation. Features (`--cached`, this
project's variant, not the paper's): the same training with an MLP VAE on the frozen L2-normalised
features. Both: a discriminator z -> 512 -> 512 -> 1, Adam for both networks, `vae_steps` VAE steps per
discriminator step, each step on a fresh labelled and a fresh unlabelled batch, as the authors' solver.

A round trains for `epochs` x floor(N / batch) iterations, N = every row (labelled and unlabelled), as the
authors' `num_images * train_epochs // batch_size` with num_images the training-set size. Epoch e draws its
batches and the VAE's noise from generators seeded by engine.epoch_seed(seed, e) alone, so a round resumed
from its checkpoint (written at the end of every epoch) gives exactly the uninterrupted round's picks.
"""
from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from lowbudget import datasets, engine
from lowbudget.cli import UsageError
from lowbudget.fileio import bytes_digest, json_text, text_digest
from lowbudget.selection import Selection, check_budget, most_uncertain
from models.vaal import Vae, conv_vae, discriminator, mlp_vae

IMAGE_SIZES = (32, 64)
PIXEL_STATS = ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))  # the authors' Normalize: pixels in [-1, 1]


@dataclass(frozen=True)
class VaalSettings:
    """The authors' public recipe by default. `conv_width` is the first convolution's channel count
    (the authors' 128, doubling to 1024); a smaller one makes the image VAE affordable on a CPU."""

    latent_dim: int = 32
    beta: float = 1.0  # weight of the KL term
    adversary_weight: float = 1.0  # λ: weight of the VAE's fool-the-discriminator term
    lr: float = 5e-4  # Adam, both networks
    vae_steps: int = 2  # VAE steps per discriminator step
    batch_size: int = 128
    epochs: int = 100
    image_size: int = 32  # the image VAE's input size (32 or 64)
    conv_width: int = 128

    def __post_init__(self) -> None:
        if self.image_size not in IMAGE_SIZES:
            raise ValueError(f"VAAL image size {self.image_size} is not one of {IMAGE_SIZES}")
        for name in ("latent_dim", "vae_steps", "batch_size", "epochs", "conv_width"):
            if getattr(self, name) < 1:
                raise ValueError(f"VAAL {name} must be at least 1, got {getattr(self, name)}")

    def iterations_per_epoch(self, num_rows: int) -> int:
        """floor(N / batch), at least 1: the authors' count of iterations per epoch."""
        return max(1, num_rows // self.batch_size)


# ---------------------------------------------------------------- data

class FeatureSource:
    """Frozen L2-normalised feature rows (`--cached`); `fingerprint` names them in the checkpoint's key
    (e.g. the feature cache's). The VAE sees them scaled by √D, so that a coordinate has mean square 1
    on average, the scale of the pixels in [-1, 1] that the loss's weights were set for."""

    mode = "features"

    def __init__(self, feats: np.ndarray, fingerprint: str = ""):
        self.feats, self.fingerprint = feats, fingerprint
        self.scale = math.sqrt(feats.shape[1])

    def __len__(self) -> int:
        return len(self.feats)

    def describe(self) -> str:
        return f"features {self.feats.shape[0]}x{self.feats.shape[1]} {self.fingerprint}"

    def vae(self, settings: VaalSettings) -> Vae:
        return mlp_vae(self.feats.shape[1], settings.latent_dim)

    def batches(self, row_batches: Sequence[np.ndarray], settings: VaalSettings) -> Iterable[torch.Tensor]:
        """The VAE's input for each batch of rows, one batch at a time."""
        return (torch.from_numpy(self.feats[rows]).float() * self.scale for rows in row_batches)


class _PixelBatches(Dataset[torch.Tensor]):
    """Item `rows` (an array of dataset indices) = those images as one batch, resized and scaled to [-1, 1]
    by the project's inference pipeline: a DataLoader worker decodes a whole batch."""

    def __init__(self, images: datasets.Images, dataset: str, size: int):
        self.images, self.dataset = images, dataset
        self.preprocess = datasets.Preprocess(size, size, *PIXEL_STATS)

    def __getitem__(self, rows: np.ndarray) -> torch.Tensor:
        return next(datasets.inference_batches(self.images.subset(rows), self.dataset, len(rows),
                                               preprocess=self.preprocess))


class ImageSource:
    """Images of a dataset (`datasets.load_images`), decoded batch by batch, `workers` DataLoader
    processes decoding ahead; `fingerprint` names them in the checkpoint's key."""

    mode = "images"

    def __init__(self, images: datasets.Images, dataset: str, *, workers: int = 0, fingerprint: str = ""):
        self.images, self.dataset, self.workers, self.fingerprint = images, dataset, workers, fingerprint

    def __len__(self) -> int:
        return len(self.images)

    def describe(self) -> str:
        return f"images {self.dataset} {len(self.images)} {self.fingerprint}"

    def vae(self, settings: VaalSettings) -> Vae:
        return conv_vae(settings.image_size, settings.latent_dim, settings.conv_width)

    def batches(self, row_batches: Sequence[np.ndarray], settings: VaalSettings) -> Iterable[torch.Tensor]:
        """The VAE's input for each batch of rows, in order, decoded at settings.image_size px."""
        return DataLoader(_PixelBatches(self.images, self.dataset, settings.image_size), batch_size=None,
                          sampler=row_batches, num_workers=self.workers)


Source = FeatureSource | ImageSource


# ---------------------------------------------------------------- training

def kl_divergence(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(μ, σ²) || N(0, 1)) summed over the latent dimensions and the batch, as the authors' loss."""
    return -0.5 * torch.sum(1 + logvar - mu.pow(2) - logvar.exp())


def _bce(logits: torch.Tensor, target: float) -> torch.Tensor:
    return F.binary_cross_entropy_with_logits(logits, torch.full_like(logits, target))


def cycled_batches(rows: np.ndarray, count: int, batch_size: int, generator: torch.Generator) -> list[np.ndarray]:
    """`count` batches of `batch_size` rows read off successive seeded permutations of `rows`: every row
    once per pass, a pool smaller than a batch repeated within it."""
    passes = math.ceil(count * batch_size / len(rows))
    order = torch.cat([torch.randperm(len(rows), generator=generator) for _ in range(passes)]).numpy()
    stream = rows[order[:count * batch_size]]
    return list(stream.reshape(count, batch_size))


@dataclass
class Networks:
    """The two networks and their optimisers."""

    vae: Vae
    discriminator: nn.Module
    vae_optimizer: torch.optim.Optimizer
    discriminator_optimizer: torch.optim.Optimizer

    def weights(self) -> dict:
        """What scoring needs: the two networks' state."""
        return {"vae": self.vae.state_dict(), "discriminator": self.discriminator.state_dict()}

    def state(self) -> dict:
        """What training on needs: the weights and both optimisers' state."""
        return {**self.weights(), "vae_optimizer": self.vae_optimizer.state_dict(),
                "discriminator_optimizer": self.discriminator_optimizer.state_dict()}

    def load(self, saved: dict) -> None:
        self.vae.load_state_dict(saved["vae"])
        self.discriminator.load_state_dict(saved["discriminator"])
        if "vae_optimizer" in saved:
            self.vae_optimizer.load_state_dict(saved["vae_optimizer"])
            self.discriminator_optimizer.load_state_dict(saved["discriminator_optimizer"])


def build_networks(source: Source, settings: VaalSettings, seed: int, device: torch.device) -> Networks:
    """Freshly initialised from `seed` (without touching torch's global generator), on `device`."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        vae, critic = source.vae(settings).to(device), discriminator(settings.latent_dim).to(device)
    return Networks(vae, critic, torch.optim.Adam(vae.parameters(), settings.lr),
                    torch.optim.Adam(critic.parameters(), settings.lr))


def vae_step(nets: Networks, x_l: torch.Tensor, x_u: torch.Tensor, settings: VaalSettings,
             noise: torch.Generator) -> float:
    """recon_l + recon_u + β (KL_l + KL_u) + λ [BCE(D(μ_l), 1) + BCE(D(μ_u), 1)]: one Adam step of the VAE.
    Both batches go through the VAE as one, so that BatchNorm's batch statistics are the same for both."""
    recon, mu, logvar = nets.vae(torch.cat([x_l, x_u]), noise)
    loss = torch.zeros((), device=x_l.device)
    for x, part in ((x_l, slice(0, len(x_l))), (x_u, slice(len(x_l), None))):
        loss = (loss + F.mse_loss(recon[part], x) + settings.beta * kl_divergence(mu[part], logvar[part])
                + settings.adversary_weight * _bce(nets.discriminator(mu[part]), 1.0))
    nets.vae_optimizer.zero_grad(set_to_none=True)
    loss.backward()
    nets.vae_optimizer.step()
    return loss.item()


def discriminator_step(nets: Networks, x_l: torch.Tensor, x_u: torch.Tensor) -> float:
    """BCE(D(μ_l), 1) + BCE(D(μ_u), 0) with the VAE frozen: one Adam step of the discriminator."""
    with torch.no_grad():
        mu = nets.vae.encode(torch.cat([x_l, x_u]))[0]
    loss = _bce(nets.discriminator(mu[:len(x_l)]), 1.0) + _bce(nets.discriminator(mu[len(x_l):]), 0.0)
    nets.discriminator_optimizer.zero_grad(set_to_none=True)
    loss.backward()
    nets.discriminator_optimizer.step()
    return loss.item()


def train_epoch(nets: Networks, source: Source, labelled: np.ndarray, unlabelled: np.ndarray, *,
                settings: VaalSettings, seed: int, device: torch.device, progress: tqdm) -> tuple[float, float]:
    """One epoch of iterations (`vae_steps` VAE steps, each on a fresh labelled and unlabelled batch, then
    a discriminator step on the last pair), everything random drawn from `seed`: the last two losses."""
    steps = settings.iterations_per_epoch(len(source)) * settings.vae_steps
    order = torch.Generator().manual_seed(seed)
    noise = torch.Generator(device).manual_seed(seed)
    pairs = zip(cycled_batches(labelled, steps, settings.batch_size, order),
                cycled_batches(unlabelled, steps, settings.batch_size, order), strict=True)
    batches = iter(source.batches([rows for pair in pairs for rows in pair], settings))
    nets.vae.train()
    nets.discriminator.train()
    losses = (math.nan, math.nan)
    for _ in range(settings.iterations_per_epoch(len(source))):
        for _ in range(settings.vae_steps):
            x_l, x_u = next(batches).to(device, non_blocking=True), next(batches).to(device, non_blocking=True)
            vae_loss = vae_step(nets, x_l, x_u, settings, noise)
        losses = (vae_loss, discriminator_step(nets, x_l, x_u))
        progress.update(1)
    return losses


# ---------------------------------------------------------------- checkpoint

def inputs_key(source: Source, labelled: np.ndarray, settings: VaalSettings, seed: int) -> str:
    """What a round was trained on: the source, the labelled pool (in its order), the settings, the seed."""
    pool = bytes_digest(np.ascontiguousarray(labelled, dtype=np.int64).tobytes(), length=64)
    return text_digest(json_text([source.describe(), pool, asdict(settings), seed]), length=16)


def load_checkpoint(path: str | None, key: str, log: Callable[[str], None]) -> dict | None:
    """The checkpoint at `path` when it was trained on the same inputs (`key`); None when there is none or
    it is another round's (it is then overwritten at the end of the first epoch)."""
    if path is None or not os.path.isfile(path):
        return None
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises several types for a file that is not a checkpoint
        raise UsageError(f"{path}: not a readable VAAL checkpoint ({type(err).__name__}); delete it") from None
    if not isinstance(saved, dict) or saved.get("key") != key:
        log(f"=> vaal: {path} holds another round (other pool, settings or seed); training from the start")
        return None
    return saved


# ---------------------------------------------------------------- selection

def discriminator_scores(nets: Networks, source: Source, rows: np.ndarray, settings: VaalSettings,
                         device: torch.device) -> np.ndarray:
    """D(μ(x)) as a logit for each of `rows`, in order, the VAE in eval mode, streamed batch by batch."""
    nets.vae.eval()
    nets.discriminator.eval()
    chunks = [rows[i:i + settings.batch_size] for i in range(0, len(rows), settings.batch_size)]
    scores: list[torch.Tensor] = []
    with torch.inference_mode():
        for x in source.batches(chunks, settings):
            scores.append(nets.discriminator(nets.vae.encode(x.to(device, non_blocking=True))[0]).float().cpu())
    return torch.cat(scores).numpy()


def train(source: Source, labelled: np.ndarray, unlabelled: np.ndarray, settings: VaalSettings, *, seed: int,
          device: torch.device, checkpoint: str | None, progress: bool, log: Callable[[str], None]) -> Networks:
    """The round's networks: trained for settings.epochs, resumed from `checkpoint` when it holds this
    round, which is saved at the end of every epoch and kept, weights only, once training is done."""
    nets = build_networks(source, settings, seed, device)
    key = inputs_key(source, labelled, settings, seed)
    saved = load_checkpoint(checkpoint, key, log)
    start = 0
    if saved is not None:
        nets.load(saved)
        start = saved["epoch"]
        log(f"=> vaal: resumed from {checkpoint} at epoch {start} of {settings.epochs}")
    per_epoch = settings.iterations_per_epoch(len(source))
    with tqdm(total=per_epoch * settings.epochs, initial=per_epoch * start, desc="vaal", disable=not progress,
              leave=False) as bar:
        for epoch in range(start, settings.epochs):
            vae_loss, critic_loss = train_epoch(nets, source, labelled, unlabelled, settings=settings,
                                                seed=engine.epoch_seed(seed, epoch), device=device, progress=bar)
            bar.set_postfix(vae=f"{vae_loss:.4f}", discriminator=f"{critic_loss:.4f}")
            engine.check_diverged(nets.vae, vae_loss, epoch)
            engine.check_diverged(nets.discriminator, critic_loss, epoch)
            if checkpoint is not None:
                state = nets.weights() if epoch + 1 == settings.epochs else nets.state()
                engine.save_checkpoint(checkpoint, {"key": key, "epoch": epoch + 1, **state})
    return nets


def vaal_select(source: Source, labelled: np.ndarray, budget: int, settings: VaalSettings, *, seed: int,
                device: torch.device, checkpoint: str | None = None, progress: bool = False,
                log: Callable[[str], None] = print) -> Selection:
    """The `budget` unlabelled rows that a discriminator trained for this labelled pool rates least likely
    to be labelled (lowest D(μ(x)); ties: lowest row), none of them in `labelled`."""
    labelled = np.asarray(labelled, dtype=np.int64)
    if not len(labelled):
        raise ValueError("vaal needs a labelled pool: its discriminator learns labelled from unlabelled")
    unlabelled = np.setdiff1d(np.arange(len(source), dtype=np.int64), labelled)
    check_budget(budget, len(unlabelled))
    nets = train(source, labelled, unlabelled, settings, seed=seed, device=device, checkpoint=checkpoint,
                 progress=progress, log=log)
    scores = discriminator_scores(nets, source, unlabelled, settings, device)
    picks = most_uncertain(-scores, unlabelled, budget).indices
    iterations = settings.iterations_per_epoch(len(source)) * settings.epochs
    return Selection(picks, 0, {**asdict(settings), "iterations": iterations, "mode": source.mode})
