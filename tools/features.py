"""Frozen-backbone features: extraction, the feature cache, and user-supplied --feats files.

The cache is one `.npz` per (dataset, split, arch, backbone, weights fingerprint) under --save holding
`feats` (float32, L2-normalised rows in dataset order), `labels` (int64) and `meta` (JSON). It is
written atomically, and a cache whose metadata differs from the request is recomputed, never used.
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import zipfile
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from models import build_backbone, weights_fingerprint
from tools import datasets
from tools.cli import UsageError
from tools.fileio import atomic_write, file_digest, text_digest
from tools.runtime import on_device

CACHE_VERSION = 1


@dataclass
class Features:
    """Rows of `feats` are the pool; `labels` is None when the source has none."""
    feats: np.ndarray
    labels: np.ndarray | None
    fingerprint: str  # identifies the features (cache metadata hash or --feats file hash)


def l2_normalize(x: torch.Tensor) -> torch.Tensor:
    return F.normalize(x, p=2, dim=1)


def normalize_rows(feats: np.ndarray) -> np.ndarray:
    """float32 rows scaled to unit L2 norm, in place when possible (no N x D temporaries)."""
    feats = np.ascontiguousarray(feats, dtype=np.float32)
    if not feats.flags.writeable:
        feats = feats.copy()
    norms = np.sqrt(np.einsum("ij,ij->i", feats, feats))
    feats /= np.maximum(norms, 1e-12)[:, None]
    return feats


@torch.inference_mode()
def extract(model: nn.Module, images: datasets.Images, dataset: str, batch_size: int, workers: int,
            device: torch.device, image_size: int | None = None, desc: str = "features") -> np.ndarray:
    """L2-normalised features of every image in dataset order; eval mode, inference mode."""
    model = on_device(model.eval(), device)
    batches = datasets.inference_batches(images, dataset, batch_size, workers, image_size)
    total = -(-len(images) // batch_size)
    feats, start = None, 0
    for x in tqdm(batches, total=total, desc=desc, disable=None):
        out = l2_normalize(model(x.to(device, non_blocking=True)).float()).cpu().numpy()
        if feats is None:  # filled in place: no list of batches concatenated at the end (2x memory)
            feats = np.empty((len(images), out.shape[1]), dtype=np.float32)
        feats[start:start + len(out)] = out
        start += len(out)
    return feats if feats is not None else np.zeros((0, 0), np.float32)


# ---------------------------------------------------------------- cache files

def cache_meta(args: argparse.Namespace, split: str, fingerprint: str, num_images: int) -> dict:
    """Everything that must match for a cached file to be reused."""
    return {"version": CACHE_VERSION, "dataset": args.dataset, "split": split, "arch": args.arch,
            "backbone": args.backbone, "weights_fingerprint": fingerprint, "num_images": num_images,
            "transform": datasets.describe_transform(args.dataset, args.image_size), "normalized": True}


def cache_path(args: argparse.Namespace, split: str, fingerprint: str) -> str:
    return os.path.join(args.save, f"feats_{args.dataset}_{split}_{args.arch}_{args.backbone}_{fingerprint}.npz")


def read_cache(path: str, meta: dict) -> tuple[np.ndarray, np.ndarray] | None:
    """(feats, labels) when the cache exists, is readable and matches `meta`; else None with a message."""
    if not os.path.isfile(path):
        return None
    try:
        with np.load(path, allow_pickle=False) as data:
            stored = json.loads(str(data["meta"]))
            if stored != meta:
                changed = sorted(k for k in meta if stored.get(k) != meta[k])
                print(f"=> cache {path} does not match this run ({', '.join(changed)}); recomputing")
                return None
            feats, labels = data["feats"], data["labels"]
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as err:
        print(f"=> cache {path} is unreadable ({type(err).__name__}); recomputing")
        return None
    if len(feats) != meta["num_images"] or len(labels) != meta["num_images"]:
        print(f"=> cache {path} is truncated; recomputing")
        return None
    return feats, labels


@functools.lru_cache(maxsize=1)
def _backbone(arch: str, backbone: str, weights: str, fingerprint: str, seed: int) -> tuple[nn.Module, int]:
    with torch.random.fork_rng():
        torch.manual_seed(seed)  # a random backbone depends on the seed alone, wherever it is built
        return build_backbone(arch, backbone, weights)


def check_weights(args: argparse.Namespace) -> None:
    if args.backbone != "random" and not args.weights:
        raise UsageError(f"--weights: --backbone {args.backbone} needs a checkpoint (or pass --feats)")
    if args.backbone != "random" and not os.path.isfile(args.weights):
        raise UsageError(f"--weights: no checkpoint found at {args.weights!r}")


@functools.lru_cache(maxsize=4)
def _fingerprint(backbone: str, weights: str, seed: int, mtime_ns: int) -> str:
    return weights_fingerprint(backbone, weights, seed)


def fingerprint_of(args: argparse.Namespace) -> str:
    """The weights' fingerprint, hashed once per run however many splits and scripts parts ask for it."""
    check_weights(args)
    mtime_ns = 0 if args.backbone == "random" else os.stat(args.weights).st_mtime_ns
    return _fingerprint(args.backbone, args.weights, args.seed, mtime_ns)


def frozen_backbone(args: argparse.Namespace) -> tuple[nn.Module, int]:
    """(backbone, feature dim), built once per run and shared by feature extraction and training."""
    return _backbone(args.arch, args.backbone, args.weights, fingerprint_of(args), args.seed)


def backbone_features(args: argparse.Namespace, split: str, device: torch.device) -> Features:
    """Features of the `split` images: from the cache with --load_cache, else extracted and cached."""
    images = datasets.load_images(args.dataset, args.data, split, args.lt_list, args.download)
    fingerprint = fingerprint_of(args)
    meta = cache_meta(args, split, fingerprint, len(images))
    path = cache_path(args, split, fingerprint)
    cached = read_cache(path, meta) if args.load_cache else None
    if cached is not None:
        print(f"=> loading {'inference' if split == 'train' else 'val'} feats of {args.dataset} from cache: {path}")
        feats, labels = cached
    else:
        model, _ = frozen_backbone(args)
        print(f"get {'inference' if split == 'train' else 'val'} feats =>")
        feats = extract(model, images, args.dataset, args.batch_size, args.workers, device, args.image_size,
                        desc=f"{split} feats")
        labels = images.labels
        atomic_write(path, lambda f: np.savez(f, feats=feats, labels=labels, meta=np.array(json.dumps(meta))))
    return Features(feats, labels, fingerprint=text_digest(json.dumps(meta, sort_keys=True)))


# ---------------------------------------------------------------- --feats files

def _read_feature_arrays(path: str, flag: str) -> tuple[np.ndarray, np.ndarray | None]:
    if path.endswith(".npy"):
        return np.load(path, allow_pickle=False), None
    if path.endswith(".npz"):
        with np.load(path, allow_pickle=False) as data:
            if "feats" not in data:
                raise UsageError(f"{flag}: {path!r} has no 'feats' array")
            return data["feats"], (data["labels"] if "labels" in data else None)
    if path.endswith((".pth", ".pth.tar", ".pt")):
        obj = torch.load(path, map_location="cpu", weights_only=True)
        if isinstance(obj, dict) and "feats" in obj:
            obj = (obj["feats"], obj.get("labels"))
        if not isinstance(obj, (tuple, list)) or len(obj) < 1:
            raise UsageError(f"{flag}: {path!r} is not a (feats, labels) tuple")
        feats = obj[0]
        labels = obj[1] if len(obj) > 1 else None
        as_np = lambda t: t.numpy() if torch.is_tensor(t) else np.asarray(t)  # noqa: E731
        return as_np(feats), (None if labels is None else as_np(labels))
    raise UsageError(f"{flag}: {path!r} is not .npy, .npz, .pth or .pth.tar")


def read_feats_file(path: str, dataset: str, flag: str = "--feats", split: str = "train") -> Features:
    """User-supplied features; rows are the pool. Rows are L2-normalised as the cache's are."""
    if not os.path.isfile(path):
        raise UsageError(f"{flag}: no such file {path!r}")
    try:
        feats, labels = _read_feature_arrays(path, flag)
    except UsageError:
        raise
    except Exception as err:  # noqa: BLE001 - any unreadable file is bad input
        raise UsageError(f"{flag}: cannot read {path!r} ({type(err).__name__}: {err})".splitlines()[0]) from None
    if feats.ndim != 2 or not np.issubdtype(feats.dtype, np.floating) or len(feats) == 0:
        raise UsageError(f"{flag}: {path!r} must hold a non-empty 2-D float array, got shape {feats.shape}")
    if not np.isfinite(feats).all():
        raise UsageError(f"{flag}: {path!r} contains NaN or infinite values")
    if labels is not None:
        labels = np.asarray(labels).reshape(-1)
        if len(labels) != len(feats) or not np.issubdtype(labels.dtype, np.integer):
            raise UsageError(f"{flag}: {path!r} labels must be {len(feats)} integers, got {labels.shape} {labels.dtype}")
        labels = labels.astype(np.int64)
    usual = datasets.DATASET_INFO[dataset].num_images if split == "train" else None
    if usual is not None and len(feats) != usual:
        print(f"=> warning: {flag} has {len(feats)} rows, {dataset} usually has {usual}; "
              "the rows are the pool and indices refer to them")
    return Features(normalize_rows(feats), labels, fingerprint=file_digest(path))


def train_features(args: argparse.Namespace, device: torch.device) -> Features:
    """The pool's features: --feats when given, else the backbone's (cached)."""
    if args.feats:
        return read_feats_file(args.feats, args.dataset)
    return backbone_features(args, "train", device)


def train_labels(args: argparse.Namespace) -> tuple[int, np.ndarray | None]:
    """(pool size, labels) without running a backbone: from --feats, else from the dataset listing."""
    if args.feats:
        pool = read_feats_file(args.feats, args.dataset)
        return len(pool.feats), pool.labels
    labels = datasets.load_images(args.dataset, args.data, "train", args.lt_list, args.download).labels
    return len(labels), labels


def val_features(args: argparse.Namespace, device: torch.device) -> Features:
    """The evaluation set's features: --val-feats when given, else the backbone's (cached)."""
    if args.val_feats:
        return read_feats_file(args.val_feats, args.dataset, flag="--val-feats", split="val")
    return backbone_features(args, "val", device)


def require_labels(features: Features, flag: str) -> np.ndarray:
    """Evaluation needs the oracle's labels: a UsageError naming `flag` when the source has none."""
    if features.labels is None:
        raise UsageError(f"{flag}: the features have no labels; evaluation needs them (.npz with 'labels' "
                         "or a (feats, labels) .pth)")
    return features.labels
