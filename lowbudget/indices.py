"""Index files: `{indices}/{name}_{dataset}_{N}.npy`, 1-D int64, exactly N entries, with a JSON sidecar."""
from __future__ import annotations

import glob
import json
import os
import time

import numpy as np

from lowbudget import distributed
from lowbudget.cli import UsageError, parse_splits
from lowbudget.fileio import atomic_write, atomic_write_bytes

FORMAT_VERSION = 1


def index_path(indices_dir: str, name: str, dataset: str, size: int) -> str:
    return os.path.join(indices_dir, f"{name}_{dataset}_{size}.npy")


def sidecar_path(path: str) -> str:
    return path[:-len(".npy")] + ".json" if path.endswith(".npy") else path + ".json"


def write_indices(path: str, indices: np.ndarray, meta: dict) -> None:
    """Atomically write the index file, then its sidecar (strategy, parameters, seed, pool, version);
    under torchrun rank 0 alone writes."""
    indices = np.asarray(indices, dtype=np.int64).reshape(-1)
    if len(np.unique(indices)) != len(indices):
        raise ValueError("index file would contain duplicates")
    if not distributed.is_main():
        return
    record = {"size": int(len(indices)), "format_version": FORMAT_VERSION,
              "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **meta}
    atomic_write(path, lambda f: np.save(f, indices))
    atomic_write_bytes(sidecar_path(path), (json.dumps(record, indent=2) + "\n").encode())


def read_indices(path: str, num_images: int, flag: str = "--resume-indices",
                 dataset: str | None = None) -> np.ndarray:
    """A validated index file: exists, 1-D integers, within [0, num_images), no duplicates."""
    require_files([path], flag, dataset)
    try:
        indices = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as err:
        raise UsageError(f"{flag}: cannot read index file {path!r} ({err})".splitlines()[0]) from None
    if indices.ndim != 1 or not np.issubdtype(indices.dtype, np.integer):
        raise UsageError(f"{flag}: {path!r} must be a 1-D integer array, got {indices.dtype} {indices.shape}")
    if len(indices) and (indices.min() < 0 or indices.max() >= num_images):
        raise UsageError(f"{flag}: {path!r} has indices outside [0, {num_images}) "
                         f"(min {indices.min()}, max {indices.max()}): wrong dataset or pool size?")
    if len(np.unique(indices)) != len(indices):
        raise UsageError(f"{flag}: {path!r} contains {len(indices) - len(np.unique(indices))} duplicate indices")
    return indices.astype(np.int64)


def split_files(args) -> dict[int, str]:
    """{split: path} of --name's index files for every --splits value, all checked to exist before any
    heavy work (the evaluators' and trainers' input)."""
    if not args.name:
        raise UsageError("--name: give the strategy whose index files to use, e.g. --name kmeans")
    paths = {split: index_path(args.indices, args.name, args.dataset, split) for split in parse_splits(args.splits)}
    require_files(list(paths.values()), "--splits", args.dataset)
    return paths


def require_files(paths: list[str], flag: str, dataset: str | None = None) -> None:
    """Stop before any heavy work when an index file is missing, listing those that exist."""
    for path in paths:
        if not os.path.isfile(path):
            raise UsageError(f"{flag}: no index file at {path!r}{_listing_hint(path, dataset)}")


def _listing_hint(path: str, dataset: str | None) -> str:
    """'; found: a.npy, b.npy' listing the index files of `dataset` beside `path`, if any."""
    if dataset is None:
        return ""
    pattern = os.path.join(os.path.dirname(path) or ".", f"*_{dataset}_*.npy")
    found = sorted(os.path.basename(p) for p in glob.glob(pattern))
    return f"; found: {', '.join(found[:20])}" if found else f"; no index files for {dataset} there"
