"""Frozen-backbone features: extraction, the feature cache, and user-supplied --feats files.

The cache is one uncompressed `.npz` per (dataset, split, arch, backbone, weights fingerprint) under
--save holding `feats` (L2-normalised rows in dataset order, float32, or float16 with --feats-dtype
float16), `labels` (int64; absent for an unlabelled folder), `skipped` (int64 indices of the image files
that could not be decoded: their rows are zero), `meta` (JSON; its `dtype` names the type of `feats`,
and a cache without one, written before float16 existed, holds float32) and `digest` (the SHA-256 of
the arrays). It is written atomically, and a cache whose metadata differs from the request is
recomputed, never used. The dtype is the exception that is converted, not recomputed: a float32 cache
serves a float16 run by rounding its rows, exactly what extracting them again would store; a float16
cache is never widened for a float32 run (its rounding cannot be undone), it is recomputed. For
`--dataset folder` the metadata includes a digest of the file listing and labels, so a folder whose
files changed is never matched to stale features.

Every load checks the digest: a cache whose bytes changed is recomputed, never used. A cache written
before digests were stored is checked as np.load checked it before the features were memory-mapped,
against its zip CRC-32, and for NaN. Features are finite: a backbone whose output holds NaN or infinity
stops the run at its first batch, before anything is cached.

Features are memory-mapped, never loaded whole, wherever they are stored raw: the cache's `feats`, a
`.npy` file and an uncompressed `.npz` member of --feats. A cache in the requested dtype, or a --feats
file whose rows already have unit norm in it, is used in place (its pages are shared with the operating
system's file cache; the digest check reads a cache's once); anything else (another dtype, rows to
normalise, a compressed member, a .pth file) is read a block of rows at a time into one new array. The
maps are copy-on-write: the file is opened read-only and never changes, and the arrays behave as loaded
ones.

Under torchrun each process extracts a contiguous block of the images; every process receives all the
rows back in dataset order (the next steps need them, and the gather costs what reading the cache
would) and rank 0 alone writes the cache.
"""
from __future__ import annotations

import argparse
import functools
import hashlib
import json
import os
import re
import zipfile
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

import lowbudget
from lowbudget import datasets, distributed
from lowbudget.cli import FEATURE_DTYPES, UsageError
from lowbudget.feature_files import (
    BLOCK_BYTES,
    Features,
    Selectable,
    as_dtype,
    dtype_fingerprint,
    npz_source,
    read_feats_file,
    store_rows,
)
from lowbudget.fileio import atomic_write, text_digest
from lowbudget.labels import Labels, read_labels, require_labelled
from lowbudget.runtime import for_inference, inference_autocast, resolve_precision
from models import families
from models.checkpoints import weights_fingerprint

CACHE_VERSION = 1


def l2_normalize(x: torch.Tensor) -> torch.Tensor:
    return F.normalize(x, p=2, dim=1)


@torch.inference_mode()
def extract(model: nn.Module, images: datasets.Images, dataset: str, batch_size: int, workers: int,
            device: torch.device, image_size: int | None = None, desc: str = "features",
            strict: bool = False, precision: str = "fp32", preprocess: datasets.Preprocess | None = None,
            dtype: str = "float32") -> tuple[np.ndarray, dict[int, str]]:
    """(L2-normalised features of every image in dataset order, {index: why} of the files that could not
    be decoded): each of those gets a zero row, or with `strict` is a UsageError at once. Images are
    transformed as the backbone's `preprocess` says (None: the dataset's protocol). `precision`:
    'fp32', 'fp32-cl', or 'bf16'/'fp16' autocast, the last three with channels-last weights
    (runtime.resolve_precision). The rows are normalised in float32 and stored as `dtype` (float16: no
    float32 copy of all of them is made). A batch whose features hold NaN or infinity is a UsageError
    naming --weights."""
    model = for_inference(model, precision, device)
    batches = datasets.decoded_batches(images, dataset, batch_size, workers, image_size, strict=strict,
                                       preprocess=preprocess, device=device)
    total = -(-len(images) // batch_size)
    feats, start, skipped = None, 0, {}
    for x, unreadable in tqdm(batches, total=total, desc=desc, disable=distributed.quiet()):
        with inference_autocast(precision, device):
            embedded = model(x) if feats is not None else first_forward(model, x)
        out = l2_normalize(embedded.float()).cpu().numpy()
        if not np.isfinite(out).all():
            raise non_finite_features(precision)
        if feats is None:  # filled in place: no list of batches concatenated at the end (2x memory)
            feats = np.empty((len(images), out.shape[1]), dtype=dtype)
        store_rows(feats[start:start + len(out)], out)
        start += len(out)
        for i, why in unreadable.items():
            feats[i] = 0
            skipped[i] = why
    feats = feats if feats is not None else np.zeros((0, 0), dtype)
    return feats, skipped


def non_finite_features(precision: str) -> UsageError:
    """The error of a backbone whose output holds NaN or infinity: its weights do, or float16 overflowed."""
    overflow = " or its activations overflow float16 (try --precision bf16 or fp32)" if precision == "fp16" else ""
    return UsageError(f"--weights: the backbone's features are NaN or infinite: its weights hold NaN or "
                      f"infinity{overflow}; nothing was cached")


def first_forward(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The backbone on the first batch: an input it cannot take (images too small for its strides, or not the
    size a ViT was built for) is a UsageError naming --image-size, not a traceback."""
    try:
        return model(x)
    except torch.OutOfMemoryError:
        raise
    except (RuntimeError, AssertionError, ValueError) as err:
        raise UsageError(f"--image-size: the backbone cannot embed {x.shape[-2]}x{x.shape[-1]} px images "
                         f"({families.first_line(err)})") from None


def gather_blocks(feats: np.ndarray, skipped: dict[int, str], n: int) -> tuple[np.ndarray, dict[int, str]]:
    """extract()'s output for this torchrun process's distributed.shard(n) block of the images, put
    together with every other process's: all n rows and the unreadable files, in dataset order, on every
    process (unchanged without torchrun)."""
    start = distributed.shard(n).start
    feats = distributed.gather_rows(torch.from_numpy(feats), n).numpy()
    parts = distributed.gather_objects({start + i: why for i, why in skipped.items()})
    return feats, {i: why for part in parts for i, why in part.items()}


def listing_digest(images: datasets.FileImages, root: str) -> str:
    """A digest of the image files (relative to `root`) and their labels, in index order."""
    paths = [os.path.relpath(path, root) for path in images.paths]
    labels = None if images.labels is None else images.labels.tolist()
    return text_digest(json.dumps([paths, labels]))


def cache_meta(args: argparse.Namespace, split: str, fingerprint: str, images: datasets.Images,
               precision: str) -> dict:
    """Everything that must match for a cached file to be reused; a folder's contents included (the
    paper's datasets are fixed, a user's folder is not). `fingerprint`: the weights' digest or tag."""
    meta = {"version": CACHE_VERSION, "dataset": args.dataset, "split": split, "arch": args.arch,
            "backbone": args.backbone, "weights_fingerprint": fingerprint, "num_images": len(images),
            "transform": transform_of(args), "normalized": True,
            "precision": precision}
    if args.dataset == "folder" and isinstance(images, datasets.FileImages):
        meta["listing"] = listing_digest(images, args.data)
    return meta


def cache_path(args: argparse.Namespace, split: str, fingerprint: str) -> str:
    """The cache file: named by dataset, split, model and weights; for a model loaded by name (its id may
    hold '/' or ':'), by the digest of its id, weights tag and transform, so each of them gets its own file."""
    model, tag = args.arch, fingerprint
    if families.uses_pretrained_name(args.backbone, args.weights):
        model = file_name_part(args.arch)
        tag = text_digest(json.dumps([args.arch, fingerprint, transform_of(args)]))
    return os.path.join(args.save, f"feats_{args.dataset}_{split}_{model}_{args.backbone}_{tag}.npz")


def file_name_part(model_id: str) -> str:
    """A model id (a repository id, a folder, REPO:ENTRY) shortened to a safe part of a file name."""
    return re.sub(r"[^\w.-]+", "-", os.path.basename(model_id.rstrip("/")))[-60:]


def read_cache(path: str, meta: dict, labeled: bool = True, dtype: str = "float32"
               ) -> tuple[np.ndarray, np.ndarray | None, np.ndarray] | None:
    """(feats as `dtype`, labels or None when not `labeled`, skipped) when the cache exists, is readable,
    matches `meta` and is intact (cache_intact); else None with a message. Stored in `dtype`, feats are the
    file's memory map; a float32 cache is rounded for a float16 run; a float16 cache is not used for a
    float32 run."""
    if not os.path.isfile(path):
        return None
    try:
        with np.load(path, allow_pickle=False) as data:
            stored = json.loads(str(data["meta"]))
            stored_dtype = stored.pop("dtype", "float32")  # a cache written before the dtype was recorded
            if stored != meta:
                changed = sorted(k for k in meta if stored.get(k) != meta[k])
                print(f"=> cache {path} does not match this run ({', '.join(changed)}); recomputing")
                return None
            if (stored_dtype, dtype) == ("float16", "float32"):
                print(f"=> cache {path} holds float16 features, this run asks for float32 (--feats-dtype); "
                      "recomputing")
                return None
            source = npz_source(path, data, "feats")
            labels = data["labels"] if "labels" in data.files else None
            skipped = data["skipped"] if "skipped" in data.files else np.zeros(0, np.int64)
            digest = str(data["digest"]) if "digest" in data.files else None
        if stored_dtype not in FEATURE_DTYPES or source.dtype != np.dtype(stored_dtype):
            raise ValueError(f"feats are {source.dtype}, the metadata says {stored_dtype}")
        if len(source.shape) != 2 or source.shape[0] != meta["num_images"] or \
                (labeled and (labels is None or len(labels) != meta["num_images"])):
            print(f"=> cache {path} is truncated; recomputing")
            return None
        stored_feats = as_dtype(source, stored_dtype)  # the file's rows as they are: mapped, not copied
        if not cache_intact(path, stored_feats, labels, skipped, digest):
            return None
        if stored_dtype != dtype:
            print(f"=> cache {path} holds {stored_dtype} features: rounding them to {dtype} (--feats-dtype)")
        feats = as_dtype(stored_feats, dtype)
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as err:
        print(f"=> cache {path} is unreadable ({type(err).__name__}); recomputing")
        return None
    return feats, labels if labeled else None, skipped


def cache_digest(feats: np.ndarray, labels: np.ndarray | None, skipped: np.ndarray) -> str:
    """'sha256:HEX' of the cache's arrays as stored: the bytes of `feats`, then of `labels` (when there are
    any) and `skipped`. hashlib reads them in place (a memory map's pages, no copy); SHA-256 is the faster
    of hashlib's strong digests here (benchmarks/bench_cache_digest.py)."""
    digest = hashlib.sha256()
    for array in (feats, labels, skipped):
        if array is not None:
            digest.update(np.ascontiguousarray(array).data)
    return f"sha256:{digest.hexdigest()}"


def cache_intact(path: str, feats: np.ndarray, labels: np.ndarray | None, skipped: np.ndarray,
                 digest: str | None) -> bool:
    """Whether the cache's arrays are the ones written: their cache_digest() is `digest`. A cache written
    before digests were stored (`digest` None) is checked as np.load checked it before its features were
    memory-mapped, against the zip CRC-32 of `feats` (a BadZipFile when it differs), and for NaN, which
    no cache may hold. Says why when it is not intact."""
    if digest is None:
        print(f"=> cache {path} has no digest (written by an older version): checking its zip CRC-32 instead")
        check_zip_crc(path, "feats")
        if not all_finite(feats):
            print(f"=> cache {path} holds NaN or infinite features; recomputing")
            return False
        return True
    if cache_digest(feats, labels, skipped) != digest:
        print(f"=> cache {path} is damaged (its bytes do not match their digest); recomputing")
        return False
    return True


def check_zip_crc(path: str, name: str) -> None:
    """Read member `name` of the .npz `path` through zipfile, which checks its CRC-32 at the end: a
    BadZipFile when the bytes differ from those written."""
    with zipfile.ZipFile(path) as archive, archive.open(f"{name}.npy") as member:
        while member.read(BLOCK_BYTES):
            pass


def all_finite(feats: np.ndarray) -> bool:
    """Whether every value of `feats` is finite, checked BLOCK_BYTES of rows at a time (no N x D mask)."""
    rows = max(1, BLOCK_BYTES // max(1, feats.itemsize * feats.shape[1]))
    return all(np.isfinite(feats[start:start + rows]).all() for start in range(0, len(feats), rows))


@functools.lru_cache(maxsize=1)
def _backbone(arch: str, backbone: str, weights: str, fingerprint: str, seed: int, image_size: int | None
              ) -> families.Backbone:
    with torch.random.fork_rng():
        torch.manual_seed(seed)  # a random backbone depends on the seed alone, wherever it is built
        return families.load_backbone(arch, backbone, weights, image_size)


def check_weights(args: argparse.Namespace) -> None:
    """--weights as the backbone needs it: a checkpoint file, a weights name, or nothing (random)."""
    if families.uses_pretrained_name(args.backbone, args.weights):
        families.check_pretrained_name(args.arch, args.backbone, args.weights)
        return
    if args.backbone != "random" and not args.weights:
        raise UsageError(f"--weights: --backbone {args.backbone} needs a checkpoint (or pass --feats)")
    if args.backbone != "random" and not os.path.isfile(args.weights):
        raise UsageError(f"--weights: no checkpoint found at {args.weights!r}")


@functools.lru_cache(maxsize=4)
def _fingerprint(arch: str, backbone: str, weights: str, seed: int, mtime_ns: int) -> str:
    if families.uses_pretrained_name(backbone, weights):
        return families.weights_label(arch, backbone, weights)
    return weights_fingerprint(backbone, weights, seed)


def fingerprint_of(args: argparse.Namespace) -> str:
    """The weights' fingerprint (a file's digest, or the tag of weights loaded by name), hashed once per run
    however many splits and scripts parts ask for it."""
    check_weights(args)
    mtime_ns = os.stat(args.weights).st_mtime_ns if families.is_weights_file(args.weights) else 0
    return _fingerprint(args.arch, args.backbone, args.weights, args.seed, mtime_ns)


def loaded_backbone(args: argparse.Namespace) -> families.Backbone:
    """(backbone, feature dim, preprocessing), built once per run and shared by feature extraction and
    training."""
    return _backbone(args.arch, args.backbone, args.weights, fingerprint_of(args), args.seed, args.image_size)


def backbone_preprocess(args: argparse.Namespace) -> datasets.Preprocess | None:
    """The transform the backbone's weights expect (the model is built for it: its library says); None for
    a checkpoint file or random weights, which use the dataset's protocol."""
    if not families.uses_pretrained_name(args.backbone, args.weights):
        return None
    return loaded_backbone(args).preprocess


def embedding_provenance(args: argparse.Namespace) -> dict[str, str | int | None]:
    """The backbone's weights (tag or file digest; None when no file was given), input size and transform."""
    given = args.backbone == "random" or families.uses_pretrained_name(args.backbone, args.weights) or \
        families.is_weights_file(args.weights)
    return {"weights": fingerprint_of(args) if given else None,
            "image_size": datasets.inference_size(args.dataset, args.image_size, backbone_preprocess(args)),
            "transform": transform_of(args)}


def provenance(args: argparse.Namespace, *, embedded: bool = True) -> dict[str, Any]:
    """How a result was made, for results lines and index sidecars: arch and backbone (None when --feats
    gave the features ready-made; no backbone for a network trained from scratch), the backbone's weights
    (tag or file digest), input size and transform, the mode of the scripts that have --cached, and this
    suite's version. `embedded=False` (a strategy that ran no backbone) leaves the backbone unbuilt and its
    weights unread."""
    from_file = bool(getattr(args, "feats", None))
    record: dict[str, Any] = {"arch": None if from_file else args.arch,
                              "backbone": None if from_file else getattr(args, "backbone", None)}
    if embedded and record["backbone"] is not None:
        record.update(embedding_provenance(args))
    if hasattr(args, "cached"):
        record["mode"] = "cached" if args.cached else "images"
    return {**record, "version": lowbudget.__version__}


def transform_of(args: argparse.Namespace) -> str:
    """The inference transform as applied, described for caches, sidecars and results."""
    return datasets.describe_transform(args.dataset, args.image_size, backbone_preprocess(args))


def split_images(args: argparse.Namespace, split: str) -> datasets.Images:
    """The `split` images as the flags describe them (--unlabeled included); says when there are no labels."""
    images = datasets.load_images(args.dataset, args.data, split, args.lt_list, args.download, args.unlabeled)
    if images.labels is None:
        print(f"=> {args.data}: {len(images)} image files, labels unknown (unlabelled folder)")
    return images


def file_labels(args: argparse.Namespace, images: datasets.Images) -> Labels:
    """--labels, checked against the training `images` as the flags list them (dataset, listing, range)."""
    if not args.data:
        raise UsageError("--labels: needs the dataset root (data), whose image listing the labels refer to")
    return read_labels(args.labels, dataset=args.dataset, listing=datasets.listing_record(images, args.data),
                       num_images=len(images))


def training_labels(args: argparse.Namespace, own: Callable[[], np.ndarray], num_images: int,
                    listed: datasets.Images | None = None) -> tuple[np.ndarray, int | None]:
    """(the training images' labels, the class count): --labels' (UNLABELLED where it gives none) and its
    classes when given, else `own()` (the dataset's or the --feats file's labels; it raises when there are
    none) and None, for the caller to count the classes of the data. `listed`: the training images when the
    caller has listed them already, which --labels is checked against."""
    if getattr(args, "labels", None):
        annotations = file_labels(args, listed if listed is not None else split_images(args, "train"))
        return annotations.per_image(num_images), len(annotations.classes)
    return own(), None


def training_images(args: argparse.Namespace) -> tuple[datasets.Images, np.ndarray, int | None]:
    """(the training images carrying their labels, the labels, the class count as training_labels), for the
    programs that train on the images themselves."""
    images = split_images(args, "train")
    labels, classes = training_labels(args, lambda: own_labels(args, images), len(images), images)
    return datasets.with_labels(images, labels), labels, classes


def own_labels(args: argparse.Namespace, images: datasets.Images) -> np.ndarray:
    """The images' own labels; an unlabelled folder is the UsageError that says labels are required."""
    if images.labels is None:
        raise datasets.labels_required(args.data)
    return images.labels


def require_pools_labelled(args: argparse.Namespace, labels: np.ndarray, pools: Iterable[np.ndarray]) -> None:
    """With --labels, every image of every pool has a label; the first that has none is named with its file."""
    if not getattr(args, "labels", None):
        return

    def describe(index: int) -> str:
        images = datasets.load_images(args.dataset, args.data, "train", args.lt_list, unlabeled=args.unlabeled)
        return os.path.relpath(images.paths[index], args.data) if isinstance(images, datasets.FileImages) else ""
    for pool in pools:
        require_labelled(labels, pool, describe)


def has_evaluation_set(args: argparse.Namespace) -> bool:
    """--val-feats, or a dataset with a labelled evaluation split (every one but an unlabelled folder)."""
    return bool(getattr(args, "val_feats", None)) or datasets.has_evaluation_split(args.dataset, args.data or "",
                                                                                  args.unlabeled)


def require_evaluation_set(args: argparse.Namespace) -> None:
    """The evaluators measure on labelled evaluation images: an unlabelled folder has none of its own."""
    if not has_evaluation_set(args):
        raise UsageError(f"--val-feats: {args.data!r} is an unlabelled folder, which has no evaluation set; give the "
                         "evaluation images' features with their labels")


def labelled_split(args: argparse.Namespace, split: str) -> tuple[datasets.Images, np.ndarray]:
    """The `split` images and their labels, for the scripts that train on them; an unlabelled folder is
    the UsageError that says labels are required."""
    images = split_images(args, split)
    if images.labels is None:
        raise datasets.labels_required(args.data)
    return images, images.labels


def decodable(args: argparse.Namespace, images: datasets.Images, split: str) -> Selectable:
    """The `split` images whose files decode, each decoded once now (under torchrun each process decodes
    a block), the others reported (the first an error with --strict): for the programs that read the
    images themselves and no features, so that no unreadable image is picked or trained on, nor stops a
    validation after the training."""
    if isinstance(images, datasets.FileImages):
        print(f"=> decoding the {len(images)} {split} image files once, to find any that cannot be read")
    block = np.arange(len(images))[distributed.shard(len(images))]
    parts = distributed.gather_objects(datasets.unreadable_files(images, block, args.workers))
    unreadable = {i: why for part in parts for i, why in part.items()}
    report_skips(images, unreadable, getattr(args, "strict", False))
    report_skip_count(np.array(sorted(unreadable), np.int64), split)
    return Selectable.all_but(len(images), unreadable)


def evaluation_images(args: argparse.Namespace) -> tuple[datasets.Images, np.ndarray]:
    """The labelled evaluation images and their labels, those whose files cannot be decoded left out
    (decodable): for the programs that validate on the images themselves."""
    images, labels = labelled_split(args, "val")
    readable = decodable(args, images, "val")
    if readable.num_rows == len(images):
        return images, labels
    return images.subset(readable.indices), readable.of_rows(labels)


def report_skips(images: datasets.Images, skipped: dict[int, str], strict: bool) -> None:
    """Each unreadable file {index: why}, or with `strict` the first as an error (images held in arrays
    are never unreadable)."""
    if not isinstance(images, datasets.FileImages):
        return
    for i, why in skipped.items():
        if strict:
            raise datasets.unreadable_error(images.paths[i], why)
        print(f"=> skipped unreadable image {images.paths[i]!r} ({why})")


def report_skip_count(skipped: np.ndarray, split: str) -> None:
    if len(skipped):
        fate = "keep their index but are never selected" if split == "train" else "are left out of the evaluation"
        print(f"=> {len(skipped)} unreadable image file(s) skipped: they {fate} (--strict makes them an error)")


def write_cache(path: str, feats: np.ndarray, labels: np.ndarray | None, skipped: np.ndarray, meta: dict) -> None:
    """Uncompressed (its feats are memory-mapped when read), `meta` with the dtype of `feats` added, and the
    arrays' cache_digest(), which every read checks. Written by rank 0 alone under torchrun."""
    if not distributed.is_main():
        return
    meta = {**meta, "dtype": feats.dtype.name}
    arrays = {"feats": feats, "skipped": skipped, "meta": np.array(json.dumps(meta)),
              "digest": np.array(cache_digest(feats, labels, skipped))}
    if labels is not None:
        arrays["labels"] = labels
    atomic_write(path, lambda f: np.savez(f, allow_pickle=False, **arrays))


def backbone_features(args: argparse.Namespace, split: str, device: torch.device) -> Features:
    """Features of the `split` images: from the cache with --load_cache (no image is read), else
    extracted and cached. Unreadable files are reported; in the val split their rows are dropped."""
    images = split_images(args, split)
    fingerprint = fingerprint_of(args)
    precision = resolve_precision(args.precision, device)
    meta = cache_meta(args, split, fingerprint, images, precision)
    path = cache_path(args, split, fingerprint)
    cached = read_cache(path, meta, images.labels is not None, args.feats_dtype) if args.load_cache else None
    if cached is not None:
        print(f"=> loading {'inference' if split == 'train' else 'val'} feats of {args.dataset} from cache: {path}")
        feats, labels, skipped = cached
        report_skips(images, dict.fromkeys(skipped.tolist(), "found when the cache was written"), args.strict)
    else:
        model, _, preprocess = loaded_backbone(args)
        print(f"get {'inference' if split == 'train' else 'val'} feats =>")
        early = args.strict and not distributed.active()  # under torchrun every process stops alike, below
        feats, unreadable = extract(model, distributed.shard_images(images), args.dataset, args.batch_size,
                                    args.workers, device, args.image_size, desc=f"{split} feats", strict=early,
                                    precision=precision, preprocess=preprocess, dtype=args.feats_dtype)
        feats, unreadable = gather_blocks(feats, unreadable, len(images))
        report_skips(images, unreadable, args.strict)
        labels, skipped = images.labels, np.array(sorted(unreadable), dtype=np.int64)
        write_cache(path, feats, labels, skipped, meta)
    report_skip_count(skipped, split)
    fingerprint = dtype_fingerprint(text_digest(json.dumps(meta, sort_keys=True)), args.feats_dtype)
    features = Features(feats, labels, fingerprint=fingerprint, skipped=skipped, data_root=args.data)
    return features if split == "train" else readable_rows(features)


def readable_rows(features: Features) -> Features:
    """The features without their skipped rows (an evaluation set, whose indices nothing refers to)."""
    keep, feats = features.selectable()
    labels = None if features.labels is None else features.labels[keep]
    return Features(feats, labels, features.fingerprint, data_root=features.data_root)


# ---------------------------------------------------------------- --feats files

def train_features(args: argparse.Namespace, device: torch.device) -> Features:
    """The pool's features: --feats when given, else the backbone's (cached)."""
    if args.feats:
        return read_feats_file(args.feats, args.dataset, dtype=args.feats_dtype)
    return backbone_features(args, "train", device)


def train_labels(args: argparse.Namespace) -> tuple[int, np.ndarray | None]:
    """(pool size, labels) without running a backbone: from --feats, else from the dataset listing."""
    if args.feats:
        pool = read_feats_file(args.feats, args.dataset, dtype=args.feats_dtype)
        return len(pool.feats), pool.labels
    images = split_images(args, "train")
    return len(images), images.labels


def val_features(args: argparse.Namespace, device: torch.device) -> Features:
    """The evaluation set's features: --val-feats when given, else the backbone's (cached)."""
    if args.val_feats:
        return read_feats_file(args.val_feats, args.dataset, flag="--val-feats", split="val", dtype=args.feats_dtype)
    return backbone_features(args, "val", device)
