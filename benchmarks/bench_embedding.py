"""Speed of the embedding pass, and what reduced precision does to its speed and its features.

Run from the repository root:

    .venv/bin/python benchmarks/bench_embedding.py [--quick] [--workers N] [--threads N] [--extraction-only]

Images are seeded synthetic 3-channel uint8 pictures drawn around 10 smooth prototypes (so that the
features form clusters k-means can find); backbones are mobilenet_v2 and resnet18 with random weights.
What is printed:

1. Extraction against the bare forward, at 64 and 112 px: images per second of
   `features.extract` (decoding, resizing, normalising, copying, L2-normalising included) over
   in-memory 32-px arrays (`ArrayImages`, resized on the fly like CIFAR at --image-size) and over a
   folder of 128-px PNG files (`FileImages`, decoded by --workers DataLoader processes), each as a
   ratio to the bare `model(x)` on the same images already decoded into tensors. Target: >= 0.9.
   For the PNG files also: the usual per-image float pipeline (Resize, CenterCrop, ToTensor, Normalize
   in each worker, float batches sent back) as the reference `extract` improves on, with the largest
   difference of its features from extract's; and what decoding alone costs: the CPU time per file of
   decoding, resizing and cropping, against the CPU time per image of the bare forward pass (all its
   threads). When the forward pass already keeps every core busy, decoding can only take CPU time from
   it, so the ratio cannot pass forward / (forward + decoding) however the work is spread: the bound
   printed (a forward pass that leaves cores idle leaves room above it).
2. Precision, at 112 px: forward speed of float32, float32 channels-last, and bf16 and fp16 autocast with
   channels-last (--precision fp32, fp32-cl, bf16, fp16, as `extract(precision=...)` runs them), on the
   CPU (and on CUDA when present), each as a ratio to float32 on that device, with the agreement of its
   features with float32: cosine per image (min, mean) and the share of k-means picks
   (`strategies.kmeans_select`) that differ. The bar for a default: cosine >= 0.999 for every image and
   <= 2 % of picks differing. fp16 on the CPU is slow (emulated) and is there for its agreement: what
   fp16 on CUDA would give.

Every ratio is against a reference measured in the same run; part 1's speeds are the best of --repeats
passes (the runs compared interleaved), part 2's one pass each. About 4 minutes on 2 idle cores (far more
while other jobs share them); --quick uses fewer images (about 30 s).
"""
from __future__ import annotations

import argparse
import copy
import functools
import os
import tempfile
import time
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader
from torchvision import transforms as T

import strategies
from lowbudget import datasets
from lowbudget.features import extract
from lowbudget.runtime import for_inference, inference_autocast
from models.checkpoints import build_backbone

ARCHS = ("mobilenet_v2", "resnet18")
SIZES = (64, 112)
PROTOTYPES = 10
ARRAY_PX, FILE_PX = 32, 128  # stored sizes: arrays are upscaled, files downscaled and cropped
COSINE_BAR, PICKS_BAR = 0.999, 0.02
BATCH = 64


PRECISIONS = ("fp32", "fp32-cl", "bf16", "fp16")  # --precision's choices, as extract() runs them


# ---------------------------------------------------------------- helpers

def synthetic_images(count: int, px: int, seed: int) -> datasets.ArrayImages:
    """uint8 (count, 3, px, px) images: a smooth random prototype per class plus pixel noise."""
    rng = np.random.default_rng(seed)
    coarse = torch.from_numpy(rng.uniform(0, 255, (PROTOTYPES, 3, 6, 6)).astype(np.float32))
    prototypes = F.interpolate(coarse, size=(px, px), mode="bicubic", align_corners=False).numpy()
    labels = rng.integers(0, PROTOTYPES, count)
    pixels = prototypes[labels] + rng.normal(0, 25, (count, 3, px, px)).astype(np.float32)
    return datasets.ArrayImages(np.clip(pixels, 0, 255).astype(np.uint8), labels)


def png_folder(images: datasets.ArrayImages, root: str) -> datasets.FileImages:
    """The images written as PNG files under `root` (unlabelled folder)."""
    paths = []
    for i, pixels in enumerate(images.images):
        path = os.path.join(root, f"img_{i:05d}.png")
        Image.fromarray(np.ascontiguousarray(pixels.transpose(1, 2, 0))).save(path)
        paths.append(path)
    return datasets.FileImages(paths, None)


def random_backbone(arch: str) -> nn.Module:
    torch.manual_seed(0)
    return build_backbone(arch, "random")[0]


def decoded(images: datasets.Images, dataset: str, px: int) -> list[torch.Tensor]:
    """The batches extract() would feed the backbone, made once beforehand."""
    return list(datasets.inference_batches(images, dataset, BATCH, 0, px))


def best_rates(repeats: int, count: int, *runs: Callable[[], object]) -> list[tuple[object, float]]:
    """Per zero-argument run: (its result, images per second of its fastest pass), runs interleaved."""
    best: list[tuple[object, float]] = [(None, 0.0)] * len(runs)
    for _ in range(repeats):
        for i, run in enumerate(runs):
            start = time.perf_counter()
            result = run()
            rate = count / (time.perf_counter() - start)
            if rate > best[i][1]:
                best[i] = (result, rate)
    return best


@torch.inference_mode()
def forward(model: nn.Module, batches: list[torch.Tensor], device: torch.device, precision: str = "fp32"
            ) -> np.ndarray:
    """L2-normalised features of pre-made batches: the bare forward pass, nothing else."""
    with inference_autocast(precision, device):
        out = [model(x.to(device)) for x in batches]
    return F.normalize(torch.cat(out).float(), dim=1).cpu().numpy()


def prepared(model: nn.Module, precision: str, device: torch.device) -> nn.Module:
    """A copy of `model` on `device` in the weight layout `precision` runs with."""
    return for_inference(copy.deepcopy(model), precision, device)


def agreement(feats: np.ndarray, reference: np.ndarray, budget: int) -> tuple[float, float, float]:
    """(min cosine, mean cosine, share of k-means picks that differ) of unit rows against the reference."""
    cosine = np.einsum("ij,ij->i", feats, reference)
    picks = strategies.kmeans_select(feats, budget, seed=0).indices
    reference_picks = strategies.kmeans_select(reference, budget, seed=0).indices
    return float(cosine.min()), float(cosine.mean()), 1 - len(np.intersect1d(picks, reference_picks)) / budget


# ---------------------------------------------------------------- 1. extraction against the bare forward

class PerImageFloat(torch.utils.data.Dataset):
    """The usual per-image pipeline: each worker resizes, crops, converts to float and normalises."""

    def __init__(self, paths: list[str], prep: datasets.Preprocess):
        self.paths = paths
        self.transform = T.Compose([T.Resize(prep.resize, interpolation=T.InterpolationMode(prep.interpolation)),
                                    T.CenterCrop(prep.size), T.ToTensor(), T.Normalize(prep.mean, prep.std)])

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.transform(datasets.open_rgb(self.paths[i]))


@torch.inference_mode()
def per_image_float(model: nn.Module, files: datasets.FileImages, px: int, workers: int) -> np.ndarray:
    """L2-normalised features of the files through the per-image float pipeline."""
    loader = DataLoader(PerImageFloat(files.paths, datasets.dataset_preprocess("folder", px)), batch_size=BATCH,
                        num_workers=workers)
    return F.normalize(torch.cat([model(x) for x in loader]), dim=1).numpy()


def decoding_seconds(files: datasets.FileImages, px: int) -> float:
    """CPU seconds per file of what a loader worker does (decode, resize, crop into uint8), on one core."""
    transform = datasets.file_transform(datasets.dataset_preprocess("folder", px))
    start = time.process_time()
    for path in files.paths:
        transform(datasets.open_rgb(path))
    return (time.process_time() - start) / len(files)


def forward_seconds(model: nn.Module, batches: list[torch.Tensor]) -> float:
    """CPU seconds per image of the bare forward pass, all its threads counted (steadier than wall time while
    other jobs share the cores)."""
    start = time.process_time()
    forward(model, batches, torch.device("cpu"))
    return (time.process_time() - start) / sum(len(x) for x in batches)


def extraction_speed(count: int, workers: int, repeats: int) -> None:
    print(f"\n1. extraction vs bare forward, {count} images, batch {BATCH}, {workers} decoding workers "
          f"for the PNG files (target >= 0.9)")
    cpu = torch.device("cpu")
    arrays = synthetic_images(count, ARRAY_PX, seed=1)
    with tempfile.TemporaryDirectory() as root:
        files = png_folder(synthetic_images(count, FILE_PX, seed=2), root)
        for arch in ARCHS:
            model = random_backbone(arch)
            for px in SIZES:
                batches = decoded(arrays, "cifar10", px)
                (_, bare), (_, full) = best_rates(
                    repeats, count, functools.partial(forward, model, batches, cpu),
                    functools.partial(extract, model, arrays, "cifar10", BATCH, workers, cpu, px, desc=""))
                print(f"  {arch:12s} {px:3d}px arrays 32px: extract {full:7.1f} img/s, bare forward "
                      f"{bare:7.1f} img/s, ratio {full / bare:.2f}")
                batches = decoded(files, "folder", px)
                (_, bare), (ours, full), (usual, per_image) = best_rates(
                    repeats, count, functools.partial(forward, model, batches, cpu),
                    functools.partial(extract, model, files, "folder", BATCH, workers, cpu, px, desc="",
                                      strict=True),
                    functools.partial(per_image_float, model, files, px, workers))
                assert isinstance(ours, tuple) and isinstance(usual, np.ndarray)
                difference = float(np.abs(ours[0] - usual).max())
                decoding, forward_cpu = decoding_seconds(files, px), forward_seconds(model, batches)
                print(f"  {arch:12s} {px:3d}px PNG 128px  : extract {full:7.1f} img/s, bare forward {bare:7.1f} "
                      f"img/s, ratio {full / bare:.2f}; per-image float pipeline {per_image:7.1f} img/s, ratio "
                      f"{per_image / bare:.2f} (features differ by {difference:.1e})")
                print(f"  {'':12s} {'':5s} CPU per image: decoding {decoding * 1e3:.2f} ms = "
                      f"{decoding / forward_cpu:.0%} of the forward pass's {forward_cpu * 1e3:.2f} ms "
                      f"({torch.get_num_threads()} threads): ratio bound {forward_cpu / (forward_cpu + decoding):.2f}")


# ---------------------------------------------------------------- 2. precision

def precision_effect(count: int, budget: int, device: torch.device) -> None:
    px = SIZES[-1]
    print(f"\n2. precision on {device.type}, {count} images at {px}px, k-means budget {budget} "
          f"(bar: cosine >= {COSINE_BAR}, picks differing <= {PICKS_BAR:.0%})")
    batches = decoded(synthetic_images(count, ARRAY_PX, seed=3), "cifar10", px)
    for arch in ARCHS:
        model = random_backbone(arch)
        models = [prepared(model, precision, device) for precision in PRECISIONS]
        results = best_rates(1, count, *[lambda m=m, p=p: forward(m, batches, device, p)
                                               for m, p in zip(models, PRECISIONS, strict=True)])
        reference, reference_rate = results[0]
        assert isinstance(reference, np.ndarray)
        for precision, (feats, rate) in zip(PRECISIONS, results, strict=True):
            assert isinstance(feats, np.ndarray)
            low, mean, differ = agreement(feats, reference, budget)
            passes = low >= COSINE_BAR and differ <= PICKS_BAR
            print(f"  {arch:12s} {precision:8s}: {rate:7.1f} img/s = {rate / reference_rate:.2f}x fp32; "
                  f"cosine min {low:.6f} mean {mean:.6f}; picks differing {differ:.1%}"
                  f"{'' if passes else '  (fails the bar)'}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer images (about 30 s)")
    parser.add_argument("--workers", type=int, default=2, help="DataLoader processes decoding the PNG files")
    parser.add_argument("--repeats", type=int, default=2, help="passes per measurement, the fastest kept")
    parser.add_argument("--threads", type=int, default=0, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--extraction-only", action="store_true", help="part 1 alone")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}; {os.cpu_count()} CPUs, torch threads {torch.get_num_threads()}; "
          f"CUDA {'available' if torch.cuda.is_available() else 'absent'}; load average {os.getloadavg()[0]:.2f}")
    started = time.perf_counter()
    extraction_speed(48 if args.quick else 192, args.workers, 1 if args.quick else args.repeats)
    devices = [] if args.extraction_only else [torch.device("cpu")] + (
        [torch.device("cuda")] if torch.cuda.is_available() else [])
    for device in devices:
        precision_effect(96 if args.quick else 384, 8 if args.quick else 50, device)
    print(f"\ntotal {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
