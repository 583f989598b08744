"""Feature arrays as stored on disk, and --feats / --val-feats files read from them.

Features are memory-mapped, never loaded whole, wherever they are stored raw: the cache's `feats`, a
`.npy` file and an uncompressed `.npz` member of --feats. A cache in the requested dtype, or a --feats
file whose rows already have unit norm in it, is used in place (pages are read on demand and shared
with the operating system's file cache); anything else (another dtype, rows to normalise, a compressed
member, a .pth file) is read a block of rows at a time into one new array. The maps are copy-on-write:
the file is opened read-only and never changes, and the arrays behave as loaded ones. A --feats file
is `.npy` (N x D), `.npz` (`feats`, `labels`) or a `.pth`/`.pth.tar` tuple (feats, labels) as the
original's cache writes; this module imports no backbone.
"""
from __future__ import annotations

import math
import os
import struct
import zipfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Literal, NewType

import numpy as np
import torch
from tqdm import tqdm

from lowbudget import datasets, distributed
from lowbudget.cli import UsageError
from lowbudget.fileio import file_digest
from lowbudget.parquet import read_parquet_features
from models.checkpoints import load_weights_only

MEMMAP_MODE: Literal["c"] = "c"  # copy-on-write: the file opened read-only, the array writable as a loaded one
BLOCK_BYTES = 1 << 24  # rows read, checked, normalised or converted at a time (16 MiB of them)
UNIT_NORM_TOLERANCE = {"float32": 1e-5, "float16": 1e-3}  # |norm - 1| of a row taken as already normalised


DatasetIndices = NewType("DatasetIndices", np.ndarray)
"""Positions in the training set, every image counted, readable or not: what index files hold."""
Rows = NewType("Rows", np.ndarray)
"""Positions among the selectable rows (the training images a strategy may pick): what strategies take and
return. The two agree only while every image is readable; Selectable maps one to the other."""


@dataclass(frozen=True)
class Selectable:
    """The training images a strategy may pick (all but the unreadable ones) and the one map between the
    two index spaces, so that a row is never taken for a dataset index, nor the other way round."""
    indices: DatasetIndices  # sorted: the dataset index of each row
    num_images: int  # the training set's size, unreadable images included

    @classmethod
    def all_but(cls, num_images: int, unreadable: Iterable[int]) -> Selectable:
        """Every image of a training set of `num_images` but the `unreadable` ones."""
        return cls(DatasetIndices(np.arange(num_images)), num_images).without(unreadable)

    @property
    def num_rows(self) -> int:
        return len(self.indices)

    def without(self, unreadable: Iterable[int]) -> Selectable:
        """These images less the `unreadable` ones (found since)."""
        return Selectable(DatasetIndices(np.setdiff1d(self.indices, np.fromiter(unreadable, np.int64))),
                          self.num_images)

    def rows(self, indices: DatasetIndices, flag: str) -> Rows:
        """The rows of dataset `indices`; a UsageError naming `flag` for an unreadable image among them."""
        return rows_of(self.indices, indices, flag)

    def dataset_indices(self, rows: Rows) -> DatasetIndices:
        return DatasetIndices(self.indices[rows])

    def check(self, indices: DatasetIndices, flag: str) -> DatasetIndices:
        """`indices` themselves; a UsageError naming `flag` for an unreadable image among them."""
        self.rows(indices, flag)
        return indices

    def of_rows(self, per_image: np.ndarray) -> np.ndarray:
        """An array with one entry per training image (features, labels) cut to the rows: itself, not
        copied, when every image is selectable."""
        return per_image if self.num_rows == self.num_images else per_image[self.indices]


@dataclass
class Features:
    """Rows of `feats` are the training set, in dataset order; `labels` is None when the source has none.
    `skipped` holds the dataset indices of image files that could not be decoded: zero rows that no
    strategy may select."""
    feats: np.ndarray  # float32 or float16 (--feats-dtype); often a memory map of the file
    labels: np.ndarray | None
    fingerprint: str  # identifies the features (cache metadata hash or --feats file hash)
    skipped: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    data_root: str | None = None  # the dataset folder the backbone read, None for a --feats file

    def selectable_images(self) -> Selectable:
        """The images a strategy may pick: all but the skipped ones."""
        return Selectable.all_but(len(self.feats), self.skipped.tolist())

    def selectable(self) -> tuple[DatasetIndices, np.ndarray]:
        """(dataset indices of the rows a strategy may pick, their features): every row, not copied, unless
        some image files were unreadable."""
        images = self.selectable_images()
        return images.indices, images.of_rows(self.feats)


def rows_of(keep: DatasetIndices, indices: DatasetIndices, flag: str) -> Rows:
    """Positions of dataset `indices` within the sorted selectable indices `keep`; a UsageError naming
    `flag` for an index that is not selectable (an unreadable image)."""
    missing = ~np.isin(indices, keep)
    if missing.any():
        raise UsageError(f"{flag}: index {indices[missing][0]} is an image file that could not be read; "
                         "select again without it")
    return Rows(np.searchsorted(keep, indices))


def readable_pools(features: Features, pools: dict[int, np.ndarray], paths: dict[int, str]
                   ) -> dict[int, DatasetIndices]:
    """An evaluator's {split: pool} as dataset indices; a UsageError naming --splits and the index file
    whose pool holds an unreadable image (its feature row is zero: nothing to learn from)."""
    images = features.selectable_images()
    return {split: images.check(DatasetIndices(pool), f"--splits: {paths[split]!r}") for split, pool in pools.items()}


def decodable_pools(images: datasets.Images, pools: dict[int, np.ndarray], paths: dict[int, str], workers: int
                    ) -> dict[int, DatasetIndices]:
    """A trainer's {split: pool} as dataset indices, every image file of every pool decoded first (training
    reads them, and no feature extraction has found the unreadable ones): a UsageError naming --splits, the
    index file and the first file that cannot be read."""
    for split, pool in pools.items():
        datasets.require_readable(images, pool, f"--splits: {paths[split]!r}", workers)
    return {split: DatasetIndices(pool) for split, pool in pools.items()}


# ---------------------------------------------------------------- stored arrays: memory maps, blocks of rows

@dataclass(frozen=True)
class StoredArray:
    """A C-order array stored raw in a file from byte `offset` on (a .npy file, an uncompressed .npz
    member): memory-mapped, or read a block of rows at a time, never loaded whole."""
    path: str
    offset: int
    dtype: np.dtype
    shape: tuple[int, ...]

    def memmap(self) -> np.memmap:
        """The array as a copy-on-write memory map (MEMMAP_MODE): no copy, pages read on demand."""
        return np.memmap(self.path, self.dtype, MEMMAP_MODE, self.offset, self.shape)

    def blocks(self, rows: int) -> Iterator[tuple[int, np.ndarray]]:
        """(start, rows start..start+`rows`) read from the file into one reused buffer, valid until the
        next block: unlike a map's pages, only one block is ever resident."""
        buffer = np.empty((min(rows, self.shape[0]), *self.shape[1:]), self.dtype)
        with open(self.path, "rb") as f:
            f.seek(self.offset)
            for start in range(0, self.shape[0], rows):
                block = buffer[:min(rows, self.shape[0] - start)]
                if f.readinto(block.view(np.uint8).data) != block.nbytes:
                    raise ValueError(f"{self.path} ends inside its array")
                yield start, block


RowSource = np.ndarray | StoredArray  # features as loaded, or where they are stored


def stored_npy(path: str, offset: int = 0, length: int | None = None) -> StoredArray | None:
    """The .npy array that starts at byte `offset` of `path` (and takes at most `length` bytes); None when
    it cannot be mapped (Fortran order, Python objects, a header version other than 1.0 and 2.0, no
    elements): the caller loads it as numpy does. A ValueError when the file is shorter than its header says."""
    with open(path, "rb") as f:
        f.seek(offset)
        version = np.lib.format.read_magic(f)
        if version not in ((1, 0), (2, 0)):
            return None
        read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else \
            np.lib.format.read_array_header_2_0
        shape, fortran_order, dtype = read_header(f)
        start = f.tell()
    if fortran_order or dtype.hasobject or math.prod(shape) == 0:
        return None
    end = start + dtype.itemsize * math.prod(shape)
    available = os.path.getsize(path) if length is None else offset + length
    if end > available:
        raise ValueError(f"its array needs {end - start} bytes, {max(available - start, 0)} are stored")
    return StoredArray(path, start, dtype, shape)


def stored_npz_member(path: str, name: str) -> StoredArray | None:
    """Member `name` of the .npz `path` where its .npy data starts in the file (zipfile finds the member's
    local header; the data follows that header, whose name and extra fields are sized by the header
    itself, not by the central directory); None for a compressed member, or one stored_npy cannot map."""
    with zipfile.ZipFile(path) as archive:
        info = archive.getinfo(f"{name}.npy")
    if info.compress_type != zipfile.ZIP_STORED:
        return None
    with open(path, "rb") as f:
        f.seek(info.header_offset)
        header = f.read(30)
    if len(header) != 30 or header[:4] != b"PK\x03\x04":
        raise zipfile.BadZipFile(f"no local header for member {name!r}")
    name_length, extra_length = struct.unpack("<HH", header[26:30])
    return stored_npy(path, info.header_offset + 30 + name_length + extra_length, info.file_size)


def npz_source(path: str, data: np.lib.npyio.NpzFile, name: str) -> RowSource:
    """Member `name` of the open .npz `data` (read from `path`): where it is stored, else loaded."""
    stored = stored_npz_member(path, name)
    return data[name] if stored is None else stored


def _row_blocks(source: RowSource, desc: str) -> Iterator[tuple[int, np.ndarray]]:
    """(start, block of rows) over all rows of `source`, about BLOCK_BYTES at a time, with a progress bar."""
    rows = max(1, BLOCK_BYTES // max(1, source.dtype.itemsize * math.prod(source.shape[1:])))
    blocks = source.blocks(rows) if isinstance(source, StoredArray) else \
        ((start, source[start:start + rows]) for start in range(0, source.shape[0], rows))
    with tqdm(total=source.shape[0], desc=desc, unit="rows", disable=distributed.quiet(), leave=False) as bar:
        for start, block in blocks:
            yield start, block
            bar.update(len(block))


def _keepable(source: RowSource, dtype: str) -> bool:
    """Whether `source` may serve as it is: of `dtype`, and stored (it is then mapped) or a loaded C-order
    array."""
    return source.dtype == np.dtype(dtype) and (isinstance(source, StoredArray) or source.flags.c_contiguous)


def _itself(source: RowSource) -> np.ndarray:
    """`source` as an array without a copy: mapped from its file when it is stored there."""
    return source.memmap() if isinstance(source, StoredArray) else source


def store_rows(out: np.ndarray, rows: np.ndarray) -> None:
    """out[:] = rows; between float32 and float16 by torch, several times faster than numpy (both round to
    nearest even)."""
    halves = {out.dtype, rows.dtype} <= {np.dtype(np.float16), np.dtype(np.float32)}
    if halves and out.dtype != rows.dtype and rows.flags.writeable:
        torch.from_numpy(out).copy_(torch.from_numpy(rows))
    else:
        out[...] = rows


def _float32_blocks(source: RowSource, desc: str) -> Iterator[tuple[int, np.ndarray]]:
    """_row_blocks() as float32, in one reused buffer that the caller may change (valid until the next
    block): a stored float32 array's own read buffer, else the rows widened or copied into one, so that a
    pass allocates nothing per block."""
    buffer = None
    for start, block in _row_blocks(source, desc):
        if isinstance(source, StoredArray) and block.dtype == np.float32:
            yield start, block
            continue
        if buffer is None:
            buffer = np.empty(block.shape, np.float32)
        rows = buffer[:len(block)]
        with np.errstate(over="ignore"):  # values beyond float32's range become inf, which _row_norms refuses
            store_rows(rows, block)
        yield start, rows


def _row_norms(rows: np.ndarray, flag: str, path: str) -> np.ndarray:
    """The L2 norms of float32 `rows`, in float64 for a block whose squares overflow float32 (such rows
    would otherwise be divided by infinity into zero rows); a UsageError naming `flag` and `path` for NaN
    or infinity."""
    norms = np.sqrt(np.einsum("ij,ij->i", rows, rows))
    if np.isfinite(norms).all():
        return norms
    if not np.isfinite(rows).all():
        raise UsageError(f"{flag}: {path!r} contains NaN or infinite values")
    return np.linalg.norm(rows.astype(np.float64), axis=1)


def _has_unit_rows(source: RowSource, dtype: str, flag: str, path: str) -> bool:
    """Whether every row has unit L2 norm within UNIT_NORM_TOLERANCE[dtype] (a zero row, which normalising
    leaves zero, counts as normalised); False at the first block with one that has not."""
    for _, rows in _float32_blocks(source, "checking norms"):
        norms = _row_norms(rows, flag, path)
        if not np.all((norms == 0) | (np.abs(norms - 1) <= UNIT_NORM_TOLERANCE[dtype])):
            return False
    return True


def normalized_rows(source: RowSource, dtype: str, flag: str, path: str) -> np.ndarray:
    """The rows scaled to unit L2 norm (computed in float32, a block at a time) and held as `dtype`:
    `source` itself (mapped when stored) when its rows have unit norm already in that dtype; else one new
    array, or `source` changed in place when it is a loaded, writable C-order array of that dtype. No other
    N x D array is made. NaN or infinity anywhere is a UsageError naming `flag` and `path`."""
    if _keepable(source, dtype) and _has_unit_rows(source, dtype, flag, path):
        return _itself(source)
    out = source if isinstance(source, np.ndarray) and source.flags.writeable and _keepable(source, dtype) \
        else np.empty(source.shape, dtype)
    for start, rows in _float32_blocks(source, f"normalising {os.path.basename(path)}"):
        rows /= np.maximum(_row_norms(rows, flag, path), 1e-12)[:, None]
        store_rows(out[start:start + len(rows)], rows)
    return out


def as_dtype(source: RowSource, dtype: str) -> np.ndarray:
    """The rows held as `dtype`: `source` itself (mapped when stored) when it is so already, else rounded
    into a new array a block at a time."""
    if _keepable(source, dtype):
        return _itself(source)
    out = np.empty(source.shape, dtype)
    for start, block in _row_blocks(source, f"converting to {dtype}"):
        store_rows(out[start:start + len(block)], block)
    return out


# ---------------------------------------------------------------- cache files

def _as_numpy(x: object) -> np.ndarray:
    """A tensor (from a .pth file) or an array-like as a numpy array."""
    return x.numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


def _read_feature_arrays(path: str, flag: str) -> tuple[RowSource, np.ndarray | None]:
    """(features, labels or None): the features where they are stored raw (a .npy file, an uncompressed .npz
    member), else loaded."""
    if path.endswith(".npy"):
        stored = stored_npy(path)
        return (np.load(path, allow_pickle=False) if stored is None else stored), None
    if path.endswith(".npz"):
        with np.load(path, allow_pickle=False) as data:
            if "feats" not in data:
                raise UsageError(f"{flag}: {path!r} has no 'feats' array")
            return npz_source(path, data, "feats"), (data["labels"] if "labels" in data else None)
    if path.endswith(".parquet"):
        table = read_parquet_features(path, flag)
        return table.feats, table.labels
    if path.endswith((".pth", ".pth.tar", ".pt")):
        obj = load_weights_only(path)
        if isinstance(obj, dict) and "feats" in obj:
            obj = (obj["feats"], obj.get("labels"))
        if not isinstance(obj, (tuple, list)) or len(obj) < 1:
            raise UsageError(f"{flag}: {path!r} is not a (feats, labels) tuple")
        feats = obj[0]
        labels = obj[1] if len(obj) > 1 else None
        return _as_numpy(feats), (None if labels is None else _as_numpy(labels))
    raise UsageError(f"{flag}: {path!r} is not .npy, .npz, .pth, .pth.tar or .parquet")


MAX_FOLDER_CLASSES = 100_000  # --dataset folder: labels at or above this are a slip (a head that wide is GBs)


def read_feats_file(path: str, dataset: str, flag: str = "--feats", split: str = "train",
                    dtype: str = "float32") -> Features:
    """User-supplied features; rows are the pool. Rows are L2-normalised as the cache's are and held as
    `dtype`: the file's memory map when they are so already (normalized_rows)."""
    if not os.path.isfile(path):
        raise UsageError(f"{flag}: no such file {path!r}")
    try:
        feats, labels = _read_feature_arrays(path, flag)
        if len(feats.shape) != 2 or not np.issubdtype(feats.dtype, np.floating) or 0 in feats.shape:
            raise UsageError(f"{flag}: {path!r} must hold a non-empty 2-D float array (rows x feature columns), "
                             f"got shape {feats.shape}")
        rows = normalized_rows(feats, dtype, flag, path)
    except UsageError:
        raise
    except Exception as err:
        raise UsageError(f"{flag}: cannot read {path!r} ({type(err).__name__}: {err})".splitlines()[0]) from None
    if labels is not None:
        labels = np.asarray(labels).reshape(-1)
        if len(labels) != len(rows) or not np.issubdtype(labels.dtype, np.integer):
            raise UsageError(f"{flag}: {path!r} labels must be {len(rows)} integers, "
                             f"got {labels.shape} {labels.dtype}")
        if len(labels) and labels.min() < 0:
            raise UsageError(f"{flag}: {path!r} labels must be class indices 0, 1, …; found {labels.min()}")
        classes = datasets.DATASET_INFO[dataset].num_classes or MAX_FOLDER_CLASSES
        if len(labels) and labels.max() >= classes:
            raise UsageError(f"{flag}: {path!r} has label {labels.max()}; --dataset {dataset} labels are "
                             f"below {classes}")
        labels = labels.astype(np.int64)
    usual = datasets.DATASET_INFO[dataset].num_images if split == "train" else None
    if usual is not None and len(rows) != usual:
        print(f"=> warning: {flag} has {len(rows)} rows, {dataset} usually has {usual}; "
              "the rows are the pool and indices refer to them")
    return Features(rows, labels, fingerprint=dtype_fingerprint(file_digest(path), dtype))


def dtype_fingerprint(fingerprint: str, dtype: str) -> str:
    """The fingerprint of features held as `dtype`: float32's is the features' own (as before float16
    existed), float16's another, since their rows differ."""
    return fingerprint if dtype == "float32" else f"{fingerprint}-{dtype}"


def check_same_width(train: Features, val: Features) -> None:
    """A head or a neighbour search needs the evaluation rows in the train features' space: a UsageError
    naming --val-feats when their widths differ."""
    if train.feats.shape[1] != val.feats.shape[1]:
        raise UsageError(f"--val-feats: dimension {val.feats.shape[1]} differs from the train features' "
                         f"{train.feats.shape[1]}")


def require_labels(features: Features, flag: str) -> np.ndarray:
    """Evaluation needs the oracle's labels: a UsageError naming `flag` (the --feats file) or the
    unlabelled data folder when the source has none."""
    if features.labels is None and features.data_root is not None:
        raise datasets.labels_required(features.data_root)
    if features.labels is None:
        raise UsageError(f"{flag}: the features have no labels; evaluation needs them (.npz with 'labels' "
                         "or a (feats, labels) .pth)")
    return features.labels
