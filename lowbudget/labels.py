"""Labels files: the annotations of an unlabelled image folder, brought back by tools/import_labels.py.

A labels file is JSON, written atomically next to the index file it answers (`{stem}_labels.json`):

    {"format": "lowbudget-labels", "version": 1, "dataset": "folder",
     "listing": {"count": ..., "digest": ...},          # the folder's listing, as index sidecars record it
     "classes": ["coat", "shirt", ...],                 # class names; a label's class id is its position
     "images": [{"index": 12, "path": "trip/a.jpg", "label": "coat"}, ...]}

The scripts that need the pool's labels (active_sampler.py, eval_knn.py, eval_lincls.py, finetune.py) take
it as `--labels FILE` for an unlabelled folder: an image with a label there has that class, any other image
is unlabelled, and a labelled pool that holds an unlabelled image is refused by name.
"""
from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from lowbudget.cli import UsageError
from lowbudget.fileio import atomic_write_bytes, json_text

FORMAT = "lowbudget-labels"
VERSION = 1
UNLABELLED = -1  # the class id of an image that has no label


@dataclass(frozen=True)
class Labels:
    """Class ids of annotated images (dataset indices, ascending) and the class names."""

    indices: np.ndarray  # int64 dataset indices, ascending, unique
    labels: np.ndarray  # int64 class ids, positions in `classes`
    classes: tuple[str, ...]
    paths: tuple[str, ...] = ()  # the images' paths relative to the dataset root ('' for array datasets)

    def per_image(self, num_images: int) -> np.ndarray:
        """A label for every image of the dataset: the class id, UNLABELLED where there is none."""
        out = np.full(num_images, UNLABELLED, dtype=np.int64)
        out[self.indices] = self.labels
        return out


def labels_path(index_file: str) -> str:
    """Where the labels answering an index file go by default: beside it."""
    return index_file.removesuffix(".npy") + "_labels.json"


def labels_record(labels: Labels, *, dataset: str, listing: dict | None) -> dict:
    return {"format": FORMAT, "version": VERSION, "dataset": dataset, "listing": listing,
            "classes": list(labels.classes),
            "images": [{"index": int(i), "path": path, "label": labels.classes[int(label)]}
                       for i, path, label in zip(labels.indices, labels.paths, labels.labels, strict=True)]}


def write_labels(path: str, labels: Labels, *, dataset: str, listing: dict | None) -> None:
    atomic_write_bytes(path, (json_text(labels_record(labels, dataset=dataset, listing=listing), indent=1)
                              + "\n").encode())


def _entry(entry: object, classes: tuple[str, ...], path: str, row: int, flag: str) -> tuple[int, str, int]:
    """(index, path, class id) of one image record; a UsageError naming the file and the row otherwise."""
    where = f"{flag}: {path!r} image {row}"
    if not isinstance(entry, dict):
        raise UsageError(f"{where} is not an object")
    index, label, image_path = entry.get("index"), entry.get("label"), entry.get("path", "")
    if not isinstance(index, int) or isinstance(index, bool) or index < 0:
        raise UsageError(f"{where}: 'index' must be a dataset index, got {index!r}")
    if label not in classes:
        raise UsageError(f"{where}: label {label!r} is not one of its classes")
    if not isinstance(image_path, str):
        raise UsageError(f"{where}: 'path' must be a string")
    return index, image_path, classes.index(label)


def read_labels(path: str, *, dataset: str, listing: dict | None, num_images: int, flag: str = "--labels"
                ) -> Labels:
    """The labels file at `path`, checked: its format, the dataset and the folder listing it was made for
    (a folder whose files changed since is refused, as its indices would name other images), every index
    within the dataset and labelled once, every label one of its classes."""
    try:
        with open(path, encoding="utf-8") as f:
            record = json.load(f)
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as err:
        raise UsageError(f"{flag}: cannot read {path!r} ({err})".splitlines()[0]) from None
    if not isinstance(record, dict) or record.get("format") != FORMAT:
        raise UsageError(f"{flag}: {path!r} is not a labels file (tools/import_labels.py writes them)")
    if record.get("dataset") != dataset:
        raise UsageError(f"{flag}: {path!r} labels --dataset {record.get('dataset')}, not {dataset}")
    if record.get("listing") != listing:
        raise UsageError(f"{flag}: {path!r} was made for another listing of the images (a file added, deleted or "
                         "renamed since), so its indices would name other images")
    classes, images = record.get("classes"), record.get("images")
    if not isinstance(classes, list) or not classes or not all(isinstance(name, str) for name in classes) \
            or len(set(classes)) != len(classes) or not isinstance(images, list):
        raise UsageError(f"{flag}: {path!r} needs a list of distinct class names and a list of images")
    names = tuple(classes)
    entries = [_entry(entry, names, path, row, flag) for row, entry in enumerate(images, 1)]
    indices = np.array([index for index, _, _ in entries], dtype=np.int64)
    if len(indices) and indices.max() >= num_images:
        raise UsageError(f"{flag}: {path!r} has index {indices.max()}; the dataset has {num_images} images")
    if len(np.unique(indices)) != len(indices):
        values, counts = np.unique(indices, return_counts=True)
        raise UsageError(f"{flag}: {path!r} labels image {values[counts > 1][0]} twice")
    order = np.argsort(indices, kind="stable")
    return Labels(indices[order], np.array([label for _, _, label in entries], dtype=np.int64)[order], names,
                  tuple(entries[i][1] for i in order))


def require_labelled(per_image: np.ndarray, pool: np.ndarray, describe: Callable[[int], str] | None = None,
                     flag: str = "--labels") -> None:
    """Every image of `pool` (dataset indices) must have a label; the first that has none is named (with
    `describe(index)`, its file, when given)."""
    missing = pool[per_image[pool] == UNLABELLED]
    if len(missing):
        name = f" ({describe(int(missing[0]))})" if describe else ""
        raise UsageError(f"{flag}: image {missing[0]}{name} of the labelled pool has no label "
                         f"({len(missing)} of {len(pool)} have none): import its annotation first")
