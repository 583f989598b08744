"""Index files: `{indices}/{name}_{dataset}_{N}.npy`, 1-D int64, exactly N entries, with a JSON sidecar.

The pair is written together: both files are written to temporary files first, so a failure (a value the
sidecar cannot hold, a full disk) leaves the previous pair as it was; then the index file is renamed into
place, and its sidecar last. The sidecar records the digest of the entries, so that a reader refuses an
index file that its sidecar does not describe (replaced by hand, or a write killed between the renames).
A sampler's results line about a pair (its class coverage) is written with it, or neither is.
"""
from __future__ import annotations

import glob
import json
import os
import time
from typing import Any

import numpy as np

from lowbudget import distributed
from lowbudget.cli import UsageError, parse_splits
from lowbudget.fileio import atomic_write_files, bytes_digest, bytes_writer, json_text
from lowbudget.results import result_kept_with

FORMAT_VERSION = 1


def index_path(indices_dir: str, name: str, dataset: str, size: int) -> str:
    return os.path.join(indices_dir, f"{name}_{dataset}_{size}.npy")


def sidecar_path(path: str) -> str:
    return path[:-len(".npy")] + ".json" if path.endswith(".npy") else path + ".json"


def pool_digest(indices: np.ndarray) -> str:
    """A digest of the entries in order: what identifies a labelled pool in sidecars and checkpoints."""
    return bytes_digest(np.ascontiguousarray(indices, dtype="<i8").tobytes(), 16)


def write_indices(path: str, indices: np.ndarray, meta: dict) -> None:
    """Write the index file and its sidecar (strategy, parameters, seed, pool, version, the entries'
    digest) as a pair, as the module docstring says; under torchrun rank 0 alone writes."""
    indices = np.asarray(indices, dtype=np.int64).reshape(-1)
    if len(np.unique(indices)) != len(indices):
        raise ValueError("index file would contain duplicates")
    if not distributed.is_main():
        return
    record = {"size": int(len(indices)), "format_version": FORMAT_VERSION,
              "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **meta}
    record.update(size=int(len(indices)), digest=pool_digest(indices))  # what readers check: never from `meta`
    sidecar = (json_text(record, indent=2) + "\n").encode()
    atomic_write_files([(path, lambda f: np.save(f, indices)), (sidecar_path(path), bytes_writer(sidecar))])


def write_indices_and_result(path: str, indices: np.ndarray, meta: dict, *, results_file: str,
                             result: dict[str, Any] | None) -> None:
    """write_indices(), and the results line that reports on the pair (append_result's fields; None when
    there is none) as one unit: the line is appended first, and taken back when the pair cannot be written."""
    if result is None:
        write_indices(path, indices, meta)
        return
    with result_kept_with(results_file, result):
        write_indices(path, indices, meta)


def read_sidecar(path: str, flag: str) -> dict[str, Any]:
    """The index file's sidecar, {} when there is none; one that is not a JSON object is a UsageError."""
    try:
        with open(sidecar_path(path)) as f:
            record = json.load(f)
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as err:
        raise UsageError(f"{flag}: cannot read the sidecar {sidecar_path(path)!r} ({err})".splitlines()[0]) from None
    if not isinstance(record, dict):
        raise UsageError(f"{flag}: the sidecar {sidecar_path(path)!r} is not a JSON object")
    return record


def check_sidecar(path: str, indices: np.ndarray, flag: str, dataset: str | None) -> None:
    """The sidecar, when there is one, must describe these entries (size and digest) and, when `dataset` is
    given, that dataset."""
    record = read_sidecar(path, flag)
    recorded = record.get("dataset")
    if dataset is not None and recorded is not None and recorded != dataset:
        raise UsageError(f"{flag}: {path!r} was selected from {recorded}, not --dataset {dataset}")
    written = record.get("size", len(indices))
    if written != len(indices):
        differs = f"it holds {len(indices)} entries, the sidecar {sidecar_path(path)!r} says {written}"
    elif record.get("digest", pool_digest(indices)) != pool_digest(indices):
        differs = f"its entries are not those its sidecar {sidecar_path(path)!r} records"
    else:
        return
    raise UsageError(f"{flag}: {path!r} was replaced after it was written, or its write was interrupted: "
                     f"{differs}; select again")


def read_indices(path: str, num_images: int, flag: str = "--resume-indices",
                 dataset: str | None = None, size: int | None = None) -> np.ndarray:
    """A validated index file: exists, 1-D integers, within [0, num_images), no duplicates, `size` entries
    when given, and as its sidecar (if any) describes it, for `dataset` when given."""
    require_files([path], flag, dataset)
    try:
        indices = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError) as err:
        raise UsageError(f"{flag}: cannot read index file {path!r} ({err})".splitlines()[0]) from None
    indices = checked_indices(indices, num_images, f"{flag}: {path!r}", size)
    check_sidecar(path, indices, flag, dataset)
    return indices


def checked_indices(indices: np.ndarray, num_images: int, what: str, size: int | None = None) -> np.ndarray:
    """`indices` as int64 when they are a pool: 1-D integers within [0, num_images), none twice, `size` of them
    when given (the size an index file's name says); else a UsageError beginning with `what` (the flag and
    file, or the argument)."""
    if indices.ndim != 1 or not np.issubdtype(indices.dtype, np.integer):
        raise UsageError(f"{what} must be a 1-D integer array, got {indices.dtype} {indices.shape}")
    if size is not None and len(indices) != size:
        raise UsageError(f"{what} holds {len(indices)} indices, its name says {size}")
    if len(indices) and (indices.min() < 0 or indices.max() >= num_images):
        raise UsageError(f"{what} has indices outside [0, {num_images}) "
                         f"(min {indices.min()}, max {indices.max()}): wrong dataset or pool size?")
    if len(np.unique(indices)) != len(indices):
        raise UsageError(f"{what} contains {len(indices) - len(np.unique(indices))} duplicate indices")
    return indices.astype(np.int64)


def read_split_pools(paths: dict[int, str], num_images: int, dataset: str) -> dict[int, np.ndarray]:
    """{split: pool} of split_files() output, each checked by read_indices to hold exactly `split` entries
    of `dataset`: all of them before any training."""
    return {split: read_indices(path, num_images, flag="--splits", dataset=dataset, size=split)
            for split, path in paths.items()}


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
