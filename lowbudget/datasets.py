"""Datasets of the paper plus Fashion-MNIST and any image folder, with labels known without decoding.

The index of a training image is its position exactly as in the original code: the torchvision
array order for CIFAR (and Fashion-MNIST), `ImageFolder.samples` order for ImageNet and labelled
folders, the line number of the list file for ImageNet-LT. An unlabelled folder (no `train/<class>/`
sub-folders, or `--unlabeled`) is every image file under it, indexed in sorted relative-path order.
Files that cannot be decoded keep their index; inference reports them instead of stopping.
"""
from __future__ import annotations

import gzip
import math
import os
import pickle
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision import datasets as tv_datasets
from torchvision import transforms as T

from lowbudget.cli import UsageError
from lowbudget.fileio import text_digest

IMAGENET_STATS = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


@dataclass(frozen=True)
class DatasetInfo:
    """What the original hard-codes per dataset: sizes, normalisation, native resolution."""
    num_images: int | None  # usual training-set size (None: any)
    num_classes: int | None
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    image_size: int  # the inference protocol's input size


DATASET_INFO = {
    "imagenet": DatasetInfo(1281167, 1000, *IMAGENET_STATS, 224),
    "imagenet_lt": DatasetInfo(115846, 1000, *IMAGENET_STATS, 224),
    "cifar10": DatasetInfo(50000, 10, (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616), 32),
    "cifar100": DatasetInfo(50000, 100, (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762), 32),
    "fashion_mnist": DatasetInfo(60000, 10, (0.2860,) * 3, (0.3530,) * 3, 28),
    "folder": DatasetInfo(None, None, *IMAGENET_STATS, 224),
}
ARRAY_DATASETS = ("cifar10", "cifar100", "fashion_mnist")  # held in memory, inferred at their native size


IMAGE_EXTENSIONS = tv_datasets.folder.IMG_EXTENSIONS  # what ImageFolder accepts, matched in any case


def open_rgb(path: str) -> Image.Image:
    """The decoded image in RGB (converted only when it is not RGB already)."""
    with open(path, "rb") as f:
        image = Image.open(f)
        image.load()
    return image if image.mode == "RGB" else image.convert("RGB")


class ArrayImages:
    """Images held in memory as uint8 (N, C, H, W) with their labels (CIFAR, Fashion-MNIST).

    Inference transforms whole batches as tensors: no per-image PIL work.
    """

    def __init__(self, images: np.ndarray, labels: np.ndarray):
        self.images = images
        self.labels = labels.astype(np.int64)

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, indices: np.ndarray) -> ArrayImages:
        """The images at `indices`, in that order."""
        return ArrayImages(self.images[indices], self.labels[indices])


class FileImages:
    """Image files with their labels (ImageNet, ImageNet-LT, folders); decoded only when iterated.

    `labels` is None for an unlabelled folder; `classes` names the labels when the folder does."""

    def __init__(self, paths: list[str], labels: list[int] | np.ndarray | None, classes: list[str] | None = None):
        self.paths = paths
        self.labels = None if labels is None else np.asarray(labels, dtype=np.int64)
        self.classes = classes

    def __len__(self) -> int:
        return len(self.paths)

    def subset(self, indices: np.ndarray) -> FileImages:
        """The images at `indices`, in that order."""
        labels = None if self.labels is None else self.labels[indices]
        return FileImages([self.paths[i] for i in indices], labels, self.classes)


Images = ArrayImages | FileImages


def with_labels(images: Images, labels: np.ndarray) -> Images:
    """The same images under other labels (an unlabelled folder's, from its annotations)."""
    if isinstance(images, ArrayImages):
        return ArrayImages(images.images, labels)
    return FileImages(images.paths, labels, images.classes)


# ---------------------------------------------------------------- CIFAR (our own pickle reader)

CIFAR_ROW = 3 * 32 * 32  # values per image in a batch's data rows
# The only globals a CIFAR batch refers to: NumPy's array reconstruction (under NumPy 1 and 2 module names,
# pickle protocols 2 to 5) and the codec that protocol 2 writes bytes with. Anything else is refused
# unrun, so a crafted batch file cannot run code as pickle.load would.
_PICKLE_GLOBALS = {("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode")} | {
    (f"numpy.{core}.{module}", name) for core in ("core", "_core")
    for module, name in (("multiarray", "_reconstruct"), ("multiarray", "scalar"), ("numeric", "_frombuffer"))}


class _RefusedGlobal(pickle.UnpicklingError):
    """A pickle refers to a global that the format never holds."""


class _ArraysOnlyUnpickler(pickle.Unpickler):
    """Unpickles dicts, lists, tuples, bytes, strings, numbers and NumPy arrays, and nothing else."""

    def find_class(self, module: str, name: str) -> object:
        if (module, name) not in _PICKLE_GLOBALS:
            raise _RefusedGlobal(f"{module}.{name}")
        if module.startswith("numpy.core.") and hasattr(np, "_core"):
            module = "numpy._core." + module.removeprefix("numpy.core.")  # NumPy 2 deprecates numpy.core
        return super().find_class(module, name)


def _unpickle(path: str) -> object:
    """The batch file's content, read by _ArraysOnlyUnpickler; a UsageError naming the file otherwise."""
    try:
        with open(path, "rb") as f:
            return _ArraysOnlyUnpickler(f, encoding="bytes").load()
    except _RefusedGlobal as err:
        raise UsageError(f"data: CIFAR batch {path!r} refers to {err}, which a CIFAR batch never holds: refused "
                         "without running it") from None
    except Exception as err:
        raise UsageError(f"data: cannot read CIFAR batch {path!r}, truncated or not a pickle "
                         f"({type(err).__name__}: {err})".splitlines()[0]) from None


def _field(batch: dict, name: str) -> object:
    """batch[name] under a bytes key (the original pickles) or a str key."""
    return batch.get(name.encode(), batch.get(name))


def _as_integers(values: object) -> np.ndarray | None:
    """`values` as an integer array, None when they are not integers."""
    try:
        array = np.asarray(values)
    except ValueError:  # ragged nested lists
        return None
    return array if np.issubdtype(array.dtype, np.integer) else None


def cifar_batch(path: str, key: str, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """(images N x 3 x 32 x 32 uint8, labels) of one batch file, checked: a dict whose 'data' rows are
    3072 bytes and whose `key` holds one label in [0, num_classes) per row."""
    batch = _unpickle(path)
    if not isinstance(batch, dict):
        raise UsageError(f"data: CIFAR batch {path!r} is a pickled {type(batch).__name__}, not a batch dict")
    data, labels = _as_integers(_field(batch, "data")), _as_integers(_field(batch, key))
    if data is None or labels is None:
        missing = "data" if data is None else key
        raise UsageError(f"data: CIFAR batch {path!r} has no integer {missing!r} array")
    out_of_bytes = data.dtype != np.uint8 and data.size and (data.min() < 0 or data.max() > 255)
    if data.ndim != 2 or data.shape[1] != CIFAR_ROW or out_of_bytes:
        raise UsageError(f"data: CIFAR batch {path!r}: 'data' must be rows of {CIFAR_ROW} bytes, got shape "
                         f"{data.shape} {data.dtype}")
    if labels.shape != (len(data),):
        raise UsageError(f"data: CIFAR batch {path!r} has {len(data)} images but {labels.size} {key!r}")
    if len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
        raise UsageError(f"data: CIFAR batch {path!r} has labels outside [0, {num_classes})")
    return data.astype(np.uint8, copy=False).reshape(-1, 3, 32, 32), labels


def _cifar_dir(root: str, folder: str, probe: str, download: bool, name: str) -> str:
    for candidate in (os.path.join(root, folder), root):
        if os.path.isfile(os.path.join(candidate, probe)):
            return candidate
    if download:
        cls = tv_datasets.CIFAR10 if name == "cifar10" else tv_datasets.CIFAR100
        cls(root, train=True, download=True)
        return os.path.join(root, folder)
    raise UsageError(f"data: no {name} batches under {root!r} (expected {folder}/{probe}; "
                     "pass --download to fetch them)")


def load_cifar(root: str, name: str, split: str, download: bool = False) -> ArrayImages:
    """CIFAR-10/100 from the python pickle batches, in torchvision's order."""
    if name == "cifar10":
        folder, files, key = "cifar-10-batches-py", (
            [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]), "labels"
    else:
        folder, files, key = "cifar-100-python", (["train"] if split == "train" else ["test"]), "fine_labels"
    directory = _cifar_dir(root, folder, files[0], download, name)
    images, labels = [], []
    for file in files:
        path = os.path.join(directory, file)
        if not os.path.isfile(path):
            raise UsageError(f"data: missing CIFAR batch {path!r}")
        batch_images, batch_labels = cifar_batch(path, key, DATASET_INFO[name].num_classes or 0)
        images.append(batch_images)
        labels.append(batch_labels)
    return ArrayImages(np.concatenate(images), np.concatenate(labels))


# ---------------------------------------------------------------- Fashion-MNIST (IDX files)

FASHION_FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
                 "val": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}
DEBIAN_FASHION_DIR = "/usr/share/datasets/fashion-mnist"


def _find_idx(directories: list[str], name: str) -> str | None:
    for directory in directories:
        for candidate in (name, name + ".gz"):
            path = os.path.join(directory, candidate)
            if os.path.isfile(path):
                return path
    return None


IDX_UBYTE = 0x08  # the IDX type code of unsigned bytes, the only one Fashion-MNIST uses


def read_idx(path: str, shape: tuple[int, ...]) -> np.ndarray:
    """An IDX file of unsigned bytes (optionally gzipped) whose dimensions after the first are `shape[1:]`
    (shape[0] = -1: any count): a UsageError naming the file when it is truncated, corrupt or of another
    shape."""
    opener = gzip.open if path.endswith(".gz") else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError, zlib.error) as err:
        raise UsageError(f"data: cannot read {path!r} ({type(err).__name__}: {err})".splitlines()[0]) from None
    header = 4 + 4 * len(shape)
    magic = (IDX_UBYTE << 8) | len(shape)
    if len(raw) < header or int.from_bytes(raw[:4], "big") != magic:
        raise UsageError(f"data: {path!r} is not an IDX file of {len(shape)}-D unsigned bytes (magic number "
                         f"{magic} expected)")
    dims = tuple(int.from_bytes(raw[4 + 4 * i:8 + 4 * i], "big") for i in range(len(shape)))
    if dims[1:] != shape[1:]:
        raise UsageError(f"data: {path!r} has dimensions {dims}, expected {('N', *shape[1:])}")
    if len(raw) != header + math.prod(dims):
        raise UsageError(f"data: {path!r} holds {len(raw) - header} bytes after its header, which says "
                         f"{math.prod(dims)} {dims}: truncated or damaged")
    return np.frombuffer(bytearray(raw), dtype=np.uint8, offset=header).reshape(dims)


def load_fashion_mnist(root: str, split: str, download: bool = False) -> ArrayImages:
    """Fashion-MNIST from IDX files under `root`: torchvision's layout or a flat folder (Debian's dataset
    package installs one: DEBIAN_FASHION_DIR)."""
    directories = [os.path.join(root, "FashionMNIST", "raw"), os.path.join(root, "raw"), root]
    image_name, label_name = FASHION_FILES[split]
    if _find_idx(directories, image_name) is None and download:
        tv_datasets.FashionMNIST(root, train=True, download=True)
    image_path, label_path = _find_idx(directories, image_name), _find_idx(directories, label_name)
    if image_path is None or label_path is None:
        raise UsageError(f"data: no Fashion-MNIST files under {root!r} (expected FashionMNIST/raw/"
                         f"{image_name}[.gz]; apt-get install dataset-fashion-mnist and pass "
                         f"{DEBIAN_FASHION_DIR}, or pass --download)")
    grey, labels = read_idx(image_path, (-1, 28, 28)), read_idx(label_path, (-1,))
    if len(grey) != len(labels):
        raise UsageError(f"data: {image_path!r} holds {len(grey)} images but {label_path!r} {len(labels)} labels")
    classes = DATASET_INFO["fashion_mnist"].num_classes or 0
    if len(labels) and labels.max() >= classes:
        raise UsageError(f"data: {label_path!r} has labels outside [0, {classes})")
    return ArrayImages(grey[:, None], labels)


# ---------------------------------------------------------------- image files

def _image_folder(root: str, flag: str = "data") -> FileImages:
    if not os.path.isdir(root):
        raise UsageError(f"{flag}: no image folder at {root!r}")
    for _ in walk_once(root, flag):  # ImageFolder follows links too, and would list a loop's images again
        pass
    try:
        folder = tv_datasets.ImageFolder(root)
    except (FileNotFoundError, RuntimeError) as err:
        raise UsageError(f"{flag}: {root!r} is not a class-per-folder image tree ({err})") from None
    paths, labels = zip(*folder.samples, strict=True) if folder.samples else ((), ())
    return FileImages(list(paths), list(labels), folder.classes)


def image_files(root: str) -> list[str]:
    """Every image file under `root`, recursively, as sorted relative POSIX paths: an unlabelled
    folder's index. Image = an ImageFolder extension in any case; hidden files and folders are skipped."""
    found = []
    for directory, subdirs, files in walk_once(root):
        subdirs[:] = [d for d in subdirs if not d.startswith(".")]
        parts = Path(os.path.relpath(directory, root)).parts
        found += ["/".join((*parts, name)) for name in files
                  if not name.startswith(".") and name.lower().endswith(IMAGE_EXTENSIONS)]
    return sorted(found)


def walk_once(root: str, flag: str = "data") -> Iterator[tuple[str, list[str], list[str]]]:
    """os.walk following symbolic links, as ImageFolder does; a folder reached a second time (a link loop,
    or two links to one folder, whose images would be listed twice) is a UsageError naming the link."""
    seen: dict[tuple[int, int], str] = {}
    for directory, subdirs, files in os.walk(root, followlinks=True):
        status = os.stat(directory)
        first = seen.setdefault((status.st_dev, status.st_ino), directory)
        if first != directory:
            raise UsageError(f"{flag}: {directory!r} is the folder {first!r} again (a symbolic link loop, or two "
                             "links to one folder): its images would be listed twice")
        yield directory, subdirs, files


def listing_record(images: Images, root: str) -> dict[str, int | str] | None:
    """What identifies the listing of an image-file dataset: its count and a digest of the files relative to
    `root` in index order (None for the array datasets, whose order is fixed). Recorded in index sidecars, so
    that tools/export.py can refuse a folder that has changed since the selection."""
    if not isinstance(images, FileImages):
        return None
    relative = [Path(os.path.relpath(path, root)).as_posix() for path in images.paths]
    return {"count": len(relative), "digest": text_digest("\n".join(relative), 16)}


def unlabeled_images(root: str, flag: str = "data") -> FileImages:
    """Every image file under `root` in `image_files` order, labels unknown."""
    names = image_files(root)
    if not names:
        raise UsageError(f"{flag}: no image files under {root!r} (extensions: {' '.join(IMAGE_EXTENSIONS)})")
    return FileImages([os.path.join(root, name) for name in names], None)


def _has_subfolders(path: str) -> bool:
    return os.path.isdir(path) and any(entry.is_dir() for entry in os.scandir(path))


def load_folder(root: str, split: str, unlabeled: bool = False) -> FileImages:
    """`--dataset folder`: `train/<class>/…` and `val/<class>/…` with labels; else (no class
    sub-folders under train/, or `unlabeled`) every image under train/ if it exists, else under
    root, without labels and with no evaluation split."""
    train = os.path.join(root, "train")
    if not unlabeled and _has_subfolders(train):
        return _image_folder(os.path.join(root, split))
    if split != "train":
        raise labels_required(root)
    return unlabeled_images(train if os.path.isdir(train) else root)


def has_evaluation_split(dataset: str, root: str, unlabeled: bool = False) -> bool:
    """Whether the dataset has a labelled evaluation split: every one but an unlabelled folder."""
    return dataset != "folder" or (not unlabeled and _has_subfolders(os.path.join(root, "train")))


def labels_required(root: str) -> UsageError:
    return UsageError(f"data: labels are required, and {root!r} is an unlabelled image folder (--dataset folder "
                      "takes labels from train/<class>/ and val/<class>/ sub-folders)")


def _text_lines(path: str, flag: str) -> list[str]:
    """The lines of a UTF-8 text file; a file that is not UTF-8 is a UsageError naming `flag`."""
    try:
        with open(path, encoding="utf-8") as f:
            return f.readlines()
    except UnicodeDecodeError as err:
        raise UsageError(f"{flag}: {path!r} is not UTF-8 text (byte {err.start})") from None


def load_lt_list(root: str, list_file: str) -> FileImages:
    """ImageNet-LT: one `relative/path label` per line, joined to the ImageNet root; every listed file must
    exist (a missing one would be embedded as a blank image)."""
    if not os.path.isfile(list_file):
        raise UsageError(f"--lt-list: no ImageNet-LT list at {list_file!r}")
    paths, labels, lines = [], [], []
    classes = DATASET_INFO["imagenet_lt"].num_classes or 0
    for number, line in enumerate(_text_lines(list_file, "--lt-list"), 1):
        parts = line.split()
        if not parts:
            continue
        if len(parts) != 2 or not parts[1].isdigit() or int(parts[1]) >= classes:
            raise UsageError(f"--lt-list: line {number} of {list_file!r} is not 'path label' "
                             f"(label in 0..{classes - 1})")
        paths.append(os.path.join(root, parts[0]))
        labels.append(int(parts[1]))
        lines.append(number)
    missing = missing_files(paths)
    if missing:
        first = missing[0]
        raise UsageError(f"--lt-list: line {lines[first]} of {list_file!r} names {paths[first]!r}, which does not "
                         f"exist ({len(missing)} of the {len(paths)} listed files are missing under {root!r})")
    return FileImages(paths, labels)


def missing_files(paths: Iterable[str]) -> list[int]:
    """Positions of the `paths` that name no file, each folder read once (not one stat call per file)."""
    listed: dict[str, set[str]] = {}
    missing = []
    for position, path in enumerate(paths):
        directory, name = os.path.split(path)
        if directory not in listed:
            try:
                listed[directory] = set(os.listdir(directory or "."))
            except OSError:
                listed[directory] = set()
        if name not in listed[directory]:
            missing.append(position)
    return missing


def load_images(name: str, root: str | None, split: str, lt_list: str = "data/ImageNet_LT_train.txt",
                download: bool = False, unlabeled: bool = False) -> Images:
    """The train or val ('val' = the official test/val set) images of dataset `name`, labels included
    when known (see `load_folder` and `unlabeled`)."""
    if root is None:
        raise UsageError(f"data: dataset {name!r} needs its root folder (or pass --feats)")
    if name in ("cifar10", "cifar100"):
        return load_cifar(root, name, split, download)
    if name == "fashion_mnist":
        return load_fashion_mnist(root, split, download)
    if not os.path.isdir(root):
        raise UsageError(f"data: no dataset folder at {root!r}")
    if name == "imagenet_lt" and split == "train":
        return load_lt_list(root, lt_list)
    if name == "folder":
        return load_folder(root, split, unlabeled)
    return _image_folder(os.path.join(root, split))


# ---------------------------------------------------------------- inference batches

@dataclass(frozen=True)
class Preprocess:
    """An inference transform: resize the shorter side to `resize` px with `interpolation` ('bilinear',
    'bicubic' or 'nearest'), centre-crop `size` px, scale to [0, 1], normalise by `mean` and `std`. A
    pretrained backbone brings its own (the one it was trained with); the others use the dataset's."""
    size: int
    resize: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    interpolation: str = "bilinear"

    def at_size(self, size: int | None) -> Preprocess:
        """The same transform cropping `size` px (--image-size), the resize scaled alike; unchanged for None."""
        if size is None or size == self.size:
            return self
        return replace(self, size=size, resize=round(self.resize * size / self.size))

    def describe(self) -> str:
        return f"resize{self.resize}-{self.interpolation}-centercrop{self.size}-normalize{self.mean}{self.std}"


def dataset_preprocess(name: str, image_size: int | None) -> Preprocess:
    """The dataset's own protocol: arrays (CIFAR, Fashion-MNIST) resized to `size` without a crop, files
    resized to size*256/224 and centre-cropped, normalised by the dataset's mean and std."""
    info, size = DATASET_INFO[name], inference_size(name, image_size)
    resize = size if name in ARRAY_DATASETS else round(size * 256 / 224)
    return Preprocess(size, resize, info.mean, info.std)



def inference_size(name: str, image_size: int | None, preprocess: Preprocess | None = None) -> int:
    """The backbone's input size: --image-size, else the backbone's own, else the dataset's."""
    return image_size or (preprocess.size if preprocess else DATASET_INFO[name].image_size)


def describe_transform(name: str, image_size: int | None, preprocess: Preprocess | None = None) -> str:
    """A short text naming the inference transform, stored in the feature cache's metadata: the
    backbone's `preprocess` at --image-size when it has one, else the dataset's protocol."""
    if preprocess is not None:
        return preprocess.at_size(image_size).describe()
    info, size = DATASET_INFO[name], inference_size(name, image_size)
    if name in ARRAY_DATASETS:
        resize = "" if size == info.image_size else f"resize{size}-"
        return f"{resize}normalize{info.mean}{info.std}"
    return f"resize{round(size * 256 / 224)}-centercrop{size}-normalize{info.mean}{info.std}"


def _resize_crop(x: torch.Tensor, prep: Preprocess) -> torch.Tensor:
    """Square image tensors resized to prep.resize (when they differ) and centre-cropped to prep.size."""
    if x.shape[-1] != prep.resize or x.shape[-2] != prep.resize:
        smooth = prep.interpolation in ("bilinear", "bicubic")
        x = F.interpolate(x, size=(prep.resize, prep.resize), mode=prep.interpolation, antialias=smooth,
                          align_corners=False if smooth else None)
    return T.functional.center_crop(x, [prep.size]) if prep.resize != prep.size else x


def _array_batches(images: ArrayImages, prep: Preprocess, batch_size: int, device: torch.device
                   ) -> Iterator[torch.Tensor]:
    """Batches of the arrays moved to `device` as uint8, then scaled, resized, cropped and normalised there."""
    mean = torch.tensor(prep.mean, device=device).view(1, 3, 1, 1)
    std = torch.tensor(prep.std, device=device).view(1, 3, 1, 1)
    for start in range(0, len(images), batch_size):
        x = torch.from_numpy(images.images[start:start + batch_size]).to(device).float().div_(255)
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        yield (_resize_crop(x, prep) - mean) / std


def file_transform(prep: Preprocess) -> T.Compose:
    """`prep`'s resize and centre crop of a PIL image, as a uint8 (3, size, size) tensor: what a DataLoader
    worker does per image. Scaling and normalising are left to `normalized`, on whole batches, where they
    cost a fraction and the workers send a quarter of the bytes."""
    return T.Compose([T.Resize(prep.resize, interpolation=T.InterpolationMode(prep.interpolation)),
                      T.CenterCrop(prep.size), T.PILToTensor()])


def normalized(x: torch.Tensor, prep: Preprocess) -> torch.Tensor:
    """uint8 images (N, 3, H, W) scaled to [0, 1] and normalised by prep's mean and std: the same float
    operations, in the same order, as ToTensor then Normalize on each image."""
    mean = torch.tensor(prep.mean, device=x.device).view(1, -1, 1, 1)
    std = torch.tensor(prep.std, device=x.device).view(1, -1, 1, 1)
    return x.float().div_(255).sub_(mean).div_(std)


class _TolerantFiles(Dataset):
    """Image files for inference: (uint8 tensor, '') each, or (zeros, why) for a file that cannot be
    decoded, so one bad file found in a DataLoader worker never stops a long extraction."""

    def __init__(self, paths: list[str], transform, size: int):
        self.paths, self.transform, self.size = paths, transform, size

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, str]:
        try:
            return self.transform(open_rgb(self.paths[i])), ""
        except Exception as err:
            return torch.zeros(3, self.size, self.size, dtype=torch.uint8), failure(err)


def failure(err: Exception) -> str:
    """Why a file could not be decoded, in one line."""
    return f"{type(err).__name__}: {err}".splitlines()[0]


class _DecodeCheck(Dataset):
    """Image files decoded and dropped: '' for each that decodes, else why not."""

    def __init__(self, paths: list[str]):
        self.paths = paths

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> str:
        try:
            open_rgb(self.paths[i])
        except Exception as err:
            return failure(err)
        return ""


def unreadable_files(images: Images, indices: np.ndarray, workers: int = 0) -> dict[int, str]:
    """{dataset index: why} of the image files at `indices` that cannot be decoded, each decoded once in
    `workers` DataLoader processes: the check for images that no backbone reads (images held in arrays
    are never unreadable)."""
    if isinstance(images, ArrayImages) or not len(indices):
        return {}
    loader = DataLoader(_DecodeCheck([images.paths[i] for i in indices]), batch_size=64, collate_fn=list,
                        num_workers=min(workers, -(-len(indices) // 64)))
    whys = [why for batch in loader for why in batch]
    return {int(i): why for i, why in zip(indices, whys, strict=True) if why}


def require_readable(images: Images, indices: np.ndarray, flag: str, workers: int = 0) -> None:
    """Training reads the images at `indices`: a UsageError naming `flag` and the first one whose file
    cannot be decoded."""
    if isinstance(images, ArrayImages):
        return
    unreadable = unreadable_files(images, indices, workers)
    if unreadable:
        i, why = min(unreadable.items())
        raise UsageError(f"{flag}: index {i} is the image file {images.paths[i]!r}, which cannot be read "
                         f"({why}); select again without it")


def unreadable_error(path: str, why: str) -> UsageError:
    return UsageError(f"data: cannot read image {path!r} ({why})")


def decoded_batches(images: Images, name: str, batch_size: int, workers: int = 0, image_size: int | None = None,
                    strict: bool = False, preprocess: Preprocess | None = None, device: torch.device | None = None
                    ) -> Iterator[tuple[torch.Tensor, dict[int, str]]]:
    """(batch on `device` (default: the CPU), {dataset index: why} of the files in it that could not be
    decoded, their rows zero), in dataset order, with the backbone's `preprocess` (else the original's
    centre-crop inference transform) at --image-size; with `strict` the first such file is a UsageError
    naming it instead. Files are decoded, resized and cropped in `workers` DataLoader processes; batches
    travel as uint8 (pinned for CUDA) and are scaled and normalised on the device."""
    prep = preprocess.at_size(image_size) if preprocess else dataset_preprocess(name, image_size)
    device = device or torch.device("cpu")
    if isinstance(images, ArrayImages):
        for x in _array_batches(images, prep, batch_size, device):
            yield x, {}
        return
    workers = min(workers, -(-len(images) // batch_size))  # a process per batch at most
    loader = DataLoader(_TolerantFiles(images.paths, file_transform(prep), prep.size), batch_size=batch_size,
                        shuffle=False, num_workers=workers, pin_memory=device.type == "cuda")
    start = 0
    for x, whys in loader:
        unreadable = {start + j: why for j, why in enumerate(whys) if why}
        if strict and unreadable:
            i, why = next(iter(unreadable.items()))
            raise unreadable_error(images.paths[i], why)
        x = normalized(x.to(device, non_blocking=True), prep)
        x[[i - start for i in unreadable]] = 0
        yield x, unreadable
        start += len(x)


def inference_batches(images: Images, name: str, batch_size: int, workers: int = 0,
                      image_size: int | None = None, preprocess: Preprocess | None = None,
                      device: torch.device | None = None) -> Iterator[torch.Tensor]:
    """Normalised image batches on `device` (default: the CPU) in dataset order; an unreadable file is a
    UsageError naming it."""
    for x, _ in decoded_batches(images, name, batch_size, workers, image_size, strict=True, preprocess=preprocess,
                                device=device):
        yield x


# ---------------------------------------------------------------- augmented training images

TrainingItem = tuple[torch.Tensor, int]  # an augmented image and its label


class AugmentedSubset(Dataset[TrainingItem]):
    """The labelled images at `indices` with the original's train augmentation (RandomResizedCrop to the
    inference size, horizontal flip, normalise by the backbone's `preprocess` mean and std, with its
    interpolation; else the dataset's, bilinear): (tensor, label). Arrays are augmented as uint8 tensors,
    files as PIL images."""

    def __init__(self, images: Images, indices: np.ndarray, name: str, image_size: int | None = None,
                 preprocess: Preprocess | None = None):
        if images.labels is None:
            raise ValueError("training images need labels")
        stats = preprocess or DATASET_INFO[name]
        self.images, self.labels, self.indices = images, images.labels, np.asarray(indices)
        size = inference_size(name, image_size, preprocess)
        interpolation = T.InterpolationMode(preprocess.interpolation if preprocess else "bilinear")
        self.augment = T.Compose([T.RandomResizedCrop(size, interpolation=interpolation), T.RandomHorizontalFlip()])
        self.normalize = T.Normalize(stats.mean, stats.std)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> TrainingItem:
        j = int(self.indices[i])
        if isinstance(self.images, ArrayImages):
            x = torch.from_numpy(self.images.images[j]).expand(3, -1, -1)
            x = self.augment(x).float().div_(255)
        else:
            x = T.functional.to_tensor(self.augment(open_rgb(self.images.paths[j])))
        return self.normalize(x), int(self.labels[j])
