"""Command-line plumbing shared by every script: one-line errors, option groups, split parsing."""
from __future__ import annotations

import argparse
import contextvars
import errno
import math
import os
import sys
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import NoReturn

DATASET_NAMES = ("cifar10", "cifar100", "imagenet", "imagenet_lt", "fashion_mnist", "folder")
BACKBONE_NAMES = ("compress", "moco", "torchvision", "random", "timm", "open_clip", "hf", "hub")
PRECISION_NAMES = ("auto", "fp32", "fp32-cl", "bf16", "fp16")
FEATURE_DTYPES = ("float32", "float16")  # --feats-dtype: how features are held and cached


class UsageError(Exception):
    """Bad input from the user: reported as one line on stderr with exit status 2."""


# An OSError with one of these errnos is a failed write, whatever the file; EACCES and EPERM are when the file
# lies in an output location (elsewhere they may come from reading an input).
WRITE_FAILURES = {errno.EROFS: "read-only file system", errno.ENOSPC: "no space left on the device",
                  errno.EDQUOT: "disk quota exceeded", errno.EFBIG: "file too large (the file size limit)"}
DENIED = {errno.EACCES: "permission denied", errno.EPERM: "operation not permitted"}

# {flag: path} of the output locations of the run in progress (run_main), filled in when the flags are read.
_outputs: contextvars.ContextVar[dict[str, str] | None] = contextvars.ContextVar("outputs", default=None)


class Parser(argparse.ArgumentParser):
    """ArgumentParser whose errors are a single line (no usage dump), exit status 2; it notes where the
    output flags point, for run_main to name the flag when a write there fails."""

    def error(self, message: str) -> NoReturn:
        print(f"{self.prog}: error: {message}", file=sys.stderr)
        sys.exit(2)

    def parse_known_args(self, args: Sequence[str] | None = None,  # type: ignore[override]
                         namespace: argparse.Namespace | None = None) -> tuple[argparse.Namespace, list[str]]:
        parsed, extras = super().parse_known_args(args, namespace)
        outputs = _outputs.get()
        if outputs is not None:
            for action in self._actions:
                if action.type in (output_folder, output_file) and getattr(parsed, action.dest, None):
                    outputs[max(action.option_strings, key=len)] = getattr(parsed, action.dest)
        return parsed, extras


def run_main(main: Callable[[Sequence[str] | None], None], argv: Sequence[str] | None = None) -> None:
    """Run a script's main; a UsageError, or an OSError from a write (read-only, no space, file too large),
    becomes one stderr line naming the flag (or else the file) and exit status 2."""
    outputs: dict[str, str] = {}
    token = _outputs.set(outputs)
    try:
        main(argv)
    except UsageError as err:
        _fail(str(err))
    except OSError as err:
        line = write_failure(err, outputs)
        if line is None:
            raise
        _fail(line)
    finally:
        _outputs.reset(token)


def _fail(message: str) -> NoReturn:
    prog = sys.argv[0].rsplit("/", 1)[-1]
    print(f"{prog}: error: {message}", file=sys.stderr)
    sys.exit(2)


def _flag_holding(path: str, outputs: dict[str, str]) -> str | None:
    """The output flag whose location is `path` or holds it (the innermost), or None."""
    path = os.path.abspath(path)
    holding = [(len(os.path.abspath(where)), flag) for flag, where in outputs.items()
               if os.path.commonpath([path, os.path.abspath(where)]) == os.path.abspath(where)]
    return max(holding)[1] if holding else None


def write_failure(err: OSError, outputs: dict[str, str]) -> str | None:
    """The one line for an OSError that a write met, naming the output flag whose location holds the file
    (or else the file); None when `err` is not a failed write."""
    flag = None if err.filename is None else _flag_holding(os.fsdecode(err.filename), outputs)
    reason = WRITE_FAILURES.get(err.errno or 0) or (DENIED.get(err.errno or 0) if flag else None)
    if reason is None:
        return None
    written = "a file" if err.filename is None else repr(os.fsdecode(err.filename))
    return f"{flag + ': ' if flag else ''}cannot write {written}: {reason}"


INT_MAX = 2**31 - 1  # counts reach torch, numpy and faiss as C ints
SEED_MAX = 2**31 - 1 - 1234  # faiss' k-means seed, a C int, is faiss_ops.FAISS_SEED_OFFSET + --seed
REAL_MAX = 1e6  # positive real flags (learning rates, radii, bandwidths): beyond this is a typing slip


@dataclass(frozen=True)
class Number:
    """argparse type: a finite number within its bounds, an integer when `integer`, else a float; with
    `auto`, the word 'auto' gives None. argparse names the flag in the error. The bounds are readable so
    that a test can throw out-of-range values at every numeric flag of every script."""
    low: float
    high: float
    integer: bool = False
    low_open: bool = False  # (low, high] instead of [low, high]
    auto: bool = False

    def bounds(self) -> str:
        low, high = (f"{int(x)}" if self.integer else f"{x:g}" for x in (self.low, self.high))
        return f"{'(' if self.low_open else '['}{low}, {high}]"

    def describe(self) -> str:
        kind = "an integer" if self.integer else "a finite number"
        return f"{'auto or ' if self.auto else ''}{kind} in {self.bounds()}"

    def __contains__(self, value: float) -> bool:
        if isinstance(value, float) and not math.isfinite(value):
            return False
        above_low = value > self.low if self.low_open else value >= self.low
        return above_low and value <= self.high

    def __call__(self, text: str) -> int | float | None:
        if self.auto and text == "auto":
            return None
        try:
            value: int | float = int(text) if self.integer else float(text)
        except ValueError:
            value = math.nan
        if value in self:
            return value
        shown = text if len(text) <= 40 else text[:37] + "..."
        if isinstance(value, float) and not math.isfinite(value):  # NaN, infinite, or not a number at all
            raise argparse.ArgumentTypeError(f"must be {self.describe()}, got {shown!r}")
        if self.integer:
            limit = f"at least {int(self.low)}" if value < self.low else f"at most {int(self.high)}"
        else:
            limit = f"{'auto or ' if self.auto else ''}in {self.bounds()}"
        raise argparse.ArgumentTypeError(f"must be {limit}, got {shown}")


def int_at_least(low: int, high: int = INT_MAX) -> Number:
    """argparse type: an integer in [low, high]."""
    return Number(low, high, integer=True)


def positive_real(high: float = REAL_MAX) -> Number:
    """argparse type: a finite number in (0, high]."""
    return Number(0, high, low_open=True)


def _file_in_the_way(path: str) -> str | None:
    """The existing non-folder at `path` or above it, which would stop a folder being made there; else None."""
    current = os.path.abspath(path)
    while not os.path.isdir(current):
        if os.path.lexists(current):
            return current
        current = os.path.dirname(current)
    return None


def folder_location(text: str) -> str:
    """argparse type: where a folder is or can be made (--indices of the scripts that read index files),
    refused at once when a file stands at it or above it."""
    blocker = _file_in_the_way(text)
    if blocker is not None:
        raise argparse.ArgumentTypeError(f"{text!r} cannot be a folder: {blocker!r} is a file")
    return text


def _nearest_folder(path: str) -> str:
    """`path` when it is a folder, else the nearest folder above it: where its files or folders would be made."""
    current = os.path.abspath(path)
    while not os.path.isdir(current):
        current = os.path.dirname(current)
    return current


def _write_problem(err: OSError) -> str:
    return {**WRITE_FAILURES, **DENIED}.get(err.errno or 0) or (err.strerror or str(err)).lower()


def _probe(folder: str) -> None:
    """Write one byte to a new file in `folder` and remove it: an ArgumentTypeError when the file system
    refuses (read-only, full, no permission)."""
    try:
        fd, probe = tempfile.mkstemp(dir=folder, prefix=".probe-")
        try:
            os.write(fd, b"\0")
        finally:
            os.close(fd)
            os.unlink(probe)
    except OSError as err:
        raise argparse.ArgumentTypeError(f"cannot write in {folder!r}: {_write_problem(err)}") from None


def output_folder(text: str) -> str:
    """argparse type: a folder the script creates or writes into (--save, --indices of the samplers, --out),
    refused at once when a file stands at it or above it, or when the nearest existing folder cannot be
    written (read-only, full), so that no run fails after its work with half its files written."""
    folder_location(text)
    _probe(_nearest_folder(text))
    return text


def output_file(text: str) -> str:
    """argparse type: a file the script appends to (--results): not a folder, its folder writable as
    output_folder's, the file (when there is one) open for appending."""
    if os.path.isdir(text):
        raise argparse.ArgumentTypeError(f"{text!r} is a folder, not a file")
    output_folder(os.path.dirname(text) or ".")
    if os.path.exists(text):
        try:
            os.close(os.open(text, os.O_WRONLY | os.O_APPEND))
        except OSError as err:
            raise argparse.ArgumentTypeError(f"cannot append to {text!r}: {_write_problem(err)}") from None
    return text


share = Number(0, 1, low_open=True)  # a fraction in (0, 1]
auto_or_positive = Number(0, REAL_MAX, low_open=True, auto=True)  # 'auto' -> None, else a positive real
SEED = int_at_least(0, SEED_MAX)
WORKERS = int_at_least(0, 1024)
IMAGE_SIZE = int_at_least(1, 8192)
EPOCHS = int_at_least(1, 10**6)
LEARNING_RATE = positive_real()
FRACTION = Number(0, 1)  # momentum, weight decay: [0, 1]
BUDGET = int_at_least(1)  # a --splits value


def add_data_args(parser: argparse.ArgumentParser, workers: int = 4, print_freq: int = 10, *,
                  indices_written: bool = False) -> None:
    """Dataset, folders and run-wide flags common to all scripts (defaults as each original script);
    `indices_written` for the scripts that write into --indices (the others read index files there)."""
    parser.add_argument("data", metavar="DIR", nargs="?", default=None,
                        help="dataset root (optional with --feats)")
    parser.add_argument("--dataset", default="imagenet", choices=DATASET_NAMES,
                        help="dataset name (default: imagenet)")
    parser.add_argument("-j", "--workers", default=workers, type=WORKERS, metavar="N",
                        help=f"data loading workers (default: {workers})")
    parser.add_argument("-b", "--batch-size", default=256, type=int_at_least(1), metavar="N",
                        help="batch size (default: 256)")
    parser.add_argument("-p", "--print-freq", default=print_freq, type=int_at_least(1), metavar="N",
                        help=f"print frequency (default: {print_freq})")
    parser.add_argument("--start-epoch", default=0, type=int_at_least(0), metavar="N",
                        help="accepted for compatibility with the original scripts")
    parser.add_argument("--save", default="./output", type=output_folder,
                        help="folder for the feature cache and results (default: ./output)")
    parser.add_argument("--indices", default="./indices", type=output_folder if indices_written else folder_location,
                        help="folder of index files (default: ./indices)")
    parser.add_argument("--seed", default=0, type=SEED,
                        help="seed for Python, NumPy, torch and faiss (default: 0)")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"),
                        help="auto = CUDA when available (default: auto)")
    parser.add_argument("--download", action="store_true",
                        help="allow torchvision to download the dataset")
    parser.add_argument("--lt-list", default="data/ImageNet_LT_train.txt",
                        help="ImageNet-LT train list (default: data/ImageNet_LT_train.txt)")
    parser.add_argument("--image-size", default=None, type=IMAGE_SIZE, metavar="PX",
                        help="resize images to PX before the backbone (default: the dataset's own "
                             "protocol: 224 for ImageNet and folders, native 32/28 for CIFAR/Fashion-MNIST)")
    parser.add_argument("--results", default=None, type=output_file,
                        help="JSON-lines file results are appended to (default: {save}/results.jsonl)")
    add_unlabeled_arg(parser)


def add_unlabeled_arg(parser: argparse.ArgumentParser) -> None:
    """--unlabeled: how --dataset folder is read, for every script that lists its images."""
    parser.add_argument("--unlabeled", action="store_true",
                        help="--dataset folder: every image file under data/train (or data) recursively, in "
                             "sorted relative-path order, labels unknown, even if there are sub-folders (a "
                             "folder without train/<class>/ sub-folders is read so anyway)")


def add_backbone_args(parser: argparse.ArgumentParser, arch: str = "resnet50") -> None:
    """Backbone and feature-cache flags of the scripts that embed images."""
    parser.add_argument("-a", "--arch", default=arch, metavar="ARCH",
                        help="any torchvision classification architecture; with --backbone timm a timm model "
                             "name, open_clip an OpenCLIP model, hf a Hugging Face repository id or folder, hub "
                             f"REPO:ENTRY (default: {arch})")
    parser.add_argument("--weights", default="", type=str,
                        help="backbone checkpoint file; or with --backbone torchvision a weights name "
                             "(IMAGENET1K_V2, DEFAULT), open_clip a pretrained tag; timm: a file instead of the "
                             "download")
    parser.add_argument("--backbone", default="compress", choices=BACKBONE_NAMES,
                        help="checkpoint format, or the library that names the model (default: compress)")
    parser.add_argument("--load_cache", action="store_true",
                        help="reuse cached features when they match this backbone and dataset")
    parser.add_argument("--strict", action="store_true",
                        help="stop at the first image file that cannot be decoded (default: report it, skip "
                             "it: it keeps its index but is never selected)")
    parser.add_argument("--feats", default=None, type=str, metavar="FILE",
                        help="precomputed train features (.npy, .npz with feats/labels, a (feats, labels) "
                             ".pth/.pth.tar, or a .parquet table with an embedding column); data and --weights "
                             "are then optional")
    parser.add_argument("--feats-dtype", default="float32", choices=FEATURE_DTYPES,
                        help="how the features are held in memory and cached: float16 halves the memory and the "
                             "bytes read, distances stay float32 (default: float32)")
    add_precision_arg(parser)


def add_precision_arg(parser: argparse.ArgumentParser) -> None:
    """--precision of the backbone's forward pass when it embeds images."""
    parser.add_argument("--precision", default="auto", choices=PRECISION_NAMES,
                        help="backbone forward pass: fp32 (plain float32), fp32-cl (float32 with channels-last "
                             "weights), or bf16/fp16 autocast with channels-last weights; auto = the fastest that "
                             "agrees with fp32 on this device type: fp32-cl on CPU, fp32 on CUDA, docs/speed.md "
                             "(default: auto)")


def add_selection_listing_args(parser: argparse.ArgumentParser) -> None:
    """--dataset, --unlabeled and --lt-list of the tools that read a selection's images: how the sampler listed
    them, the dataset by default the index file's sidecar's."""
    parser.add_argument("--dataset", default=None, choices=DATASET_NAMES,
                        help="dataset name (default: the index file's sidecar's, else folder)")
    add_unlabeled_arg(parser)
    parser.add_argument("--lt-list", default="data/ImageNet_LT_train.txt",
                        help="ImageNet-LT train list (default: data/ImageNet_LT_train.txt)")


def add_labels_arg(parser: argparse.ArgumentParser) -> None:
    """--labels: the annotations of an unlabelled folder (tools/import_labels.py), for the scripts that train."""
    parser.add_argument("--labels", default=None, type=str, metavar="FILE",
                        help="labels file written by tools/import_labels.py: the training images' labels, for an "
                             "unlabelled folder; every image of a labelled pool must have one")


def add_val_feats_arg(parser: argparse.ArgumentParser) -> None:
    """--val-feats, the evaluators' twin of --feats."""
    parser.add_argument("--val-feats", default=None, type=str, metavar="FILE",
                        help="precomputed evaluation-set features with labels, formats as --feats")


def add_split_args(parser: argparse.ArgumentParser, names: Sequence[str]) -> None:
    """--splits and --name, as in every original script."""
    parser.add_argument("--splits", default="", type=str,
                        help="comma-separated budgets, e.g. 1000,3000")
    parser.add_argument("--name", default="", type=str,
                        help="strategy name: " + ", ".join(names))


def add_training_args(parser: argparse.ArgumentParser, *, cached: bool = True, sgd: bool = False) -> None:
    """Training flags of the original eval_lincls.py, active_sampler.py, finetune.py, trainer_DP.py; `sgd`
    for the script that trains with SGD (its --momentum and --wd are used), the others use Adam."""
    optimizer = "SGD" if sgd else "Adam"
    parser.add_argument("--epochs", default=40, type=EPOCHS, help="epochs per split (default: 40)")
    parser.add_argument("--lr", "--learning-rate", default=0.01, type=LEARNING_RATE, dest="lr",
                        help=f"{optimizer} learning rate (default: 0.01)")
    parser.add_argument("--lr_schedule", default="30,60,90", type=str,
                        help="epochs at which the learning rate drops 10x (default: 30,60,90)")
    parser.add_argument("--momentum", default=0.9, type=FRACTION,
                        help="SGD momentum (default: 0.9)" if sgd else "accepted, unused (Adam), as the original")
    parser.add_argument("--wd", "--weight-decay", default=1e-4, type=FRACTION, dest="weight_decay",
                        help="SGD weight decay (default: 1e-4)" if sgd
                        else "accepted, unused (Adam without weight decay), as the original")
    parser.add_argument("-e", "--evaluate", action="store_true", help="accepted, unused, as the original")
    if cached:
        parser.add_argument("--cached", action="store_true",
                            help="train the head on cached centre-crop features (fast, no augmentation)")


def add_resume_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--resume", nargs="?", const="auto", default="", metavar="CKPT",
                        help="continue from a checkpoint: alone (or 'auto'), each split's own under --save; "
                             "or a checkpoint file, with a single split")


def checkpoint_for(args: argparse.Namespace, default: str) -> str:
    """The checkpoint a split trains into: --resume FILE when given, else `default` under --save."""
    return args.resume if args.resume not in ("", "auto") else default


def check_resume(args: argparse.Namespace, splits: Sequence[int]) -> None:
    """--resume FILE names one split's checkpoint: one split, and the file must exist."""
    if args.resume in ("", "auto"):
        return
    if len(splits) != 1:
        raise UsageError("--resume: a checkpoint file goes with a single --splits value")
    if not os.path.isfile(args.resume):
        raise UsageError(f"--resume: no checkpoint at {args.resume!r}")


def comma_integers(text: str, flag: str) -> list[int]:
    """'10, 20' -> [10, 20] (an empty text: []); an empty field or a non-integer is a UsageError naming `flag`."""
    if not text.strip():
        return []
    try:
        return [int(part) for part in text.split(",")]  # int() allows spaces around, never an empty field
    except ValueError:
        raise UsageError(f"{flag}: {text!r} is not a comma-separated list of integers") from None


def parse_milestones(text: str) -> list[int]:
    """'30,60' -> [30, 60] ('' for none); a UsageError naming --lr_schedule otherwise (epochs count from 1)."""
    milestones = comma_integers(text, "--lr_schedule")
    if any(epoch not in EPOCHS for epoch in milestones):
        raise UsageError(f"--lr_schedule: epochs must be in {EPOCHS.bounds()}, got {text!r}")
    return milestones


def parse_splits(text: str) -> list[int]:
    """'10,20' -> [10, 20]; anything but positive integers is a UsageError naming --splits."""
    splits = comma_integers(text, "--splits")
    if not splits:
        raise UsageError("--splits: give at least one budget, e.g. --splits 100,200")
    if any(split not in BUDGET for split in splits):
        raise UsageError(f"--splits: budgets must be positive, at most {BUDGET.high}; got {text!r}")
    return splits


def results_path(args: argparse.Namespace) -> str:
    """Where this run's result lines go."""
    return args.results or f"{args.save.rstrip('/')}/results.jsonl"
