"""Bring annotations back: the labels of a selection, as a labels file the scripts read with --labels.

Usage, from the repository root:

    python tools/import_labels.py INDEX_FILE ANNOTATIONS --data DIR [--classes coat,shirt,...]
        [--merge LABELS_FILE] [--out FILE] [--dataset folder] [--unlabeled]

INDEX_FILE is the selection that was exported (tools/export.py) and annotated; ANNOTATIONS is one of:

- a Label Studio JSON export (Export > JSON) of the tasks tools/export.py wrote: each task's last
  annotation that was not cancelled, its `choices` result;
- a CSV with a header naming `label` and `index` or `path` (tools/export.py's CSV with its label column
  filled in works as it is);
- a class-folder tree: ANNOTATIONS/<class>/<image>, each image found in the folder by its path relative to
  the class folder, or else by its file name when exactly one image of the folder has it.

Every row is mapped to a dataset index through the listing recorded in the index file's sidecar: a folder
that lists other files now is refused, as tools/export.py refuses it. The classes are --classes, else those
of --merge, else the labels found, sorted. --merge adds the labels of an earlier round (its file stays as it
is). Rows without a label (a task not annotated yet, an empty cell) are skipped and counted. The labels file
goes to --out, by default beside the index file as `{stem}_labels.json`.

A label that is not a class name, an image that is not in the listing or not in the selection, two labels
for one image, or an export of another folder stops with one line naming the file and the row, exit status
2, and nothing written.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote

import numpy as np

from lowbudget import cli, datasets
from lowbudget.cli import UsageError
from lowbudget.indices import read_indices, read_sidecar
from lowbudget.labels import Labels, labels_path, read_labels, write_labels
from tools.export import FORMULA_STARTS, check_listing, relative_path


@dataclass(frozen=True)
class Row:
    """One annotation as found: where it is (for messages), the image as it names it, and its label."""

    where: str  # 'FILE:line N', 'FILE task N', 'DIR/class/file'
    label: str
    index: int | None = None
    path: str | None = None


def build_parser() -> argparse.ArgumentParser:
    parser = cli.Parser(description=__doc__.splitlines()[0])
    parser.add_argument("index_file", metavar="INDEX_FILE", help="the selection that was annotated (.npy)")
    parser.add_argument("annotations", metavar="ANNOTATIONS",
                        help="Label Studio JSON export, CSV (label and index or path), or a class-folder tree")
    parser.add_argument("--data", required=True, metavar="DIR", help="the dataset root the sampler read")
    cli.add_selection_listing_args(parser)
    parser.add_argument("--classes", default=None, metavar="NAMES",
                        help="comma-separated class names every label must be one of (default: those of --merge, "
                             "else the labels found)")
    parser.add_argument("--merge", default=None, metavar="LABELS_FILE",
                        help="an earlier labels file of the same folder whose labels are kept")
    parser.add_argument("--out", default=None, metavar="FILE", type=cli.output_file,
                        help="the labels file to write (default: INDEX_FILE's stem + _labels.json)")
    return parser


# ---------------------------------------------------------------- reading each format

def unprotected(cell: str) -> str:
    """A CSV cell as written before tools/export.py guarded it against spreadsheet formulas."""
    return cell[1:] if cell.startswith("'") and cell[1:].startswith(FORMULA_STARTS) else cell


def csv_rows(path: str) -> Iterator[Row]:
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            columns = set(reader.fieldnames or ())
            if "label" not in columns or not columns & {"index", "path"}:
                raise UsageError(f"ANNOTATIONS: {path!r} needs a header with 'label' and 'index' or 'path' columns")
            for record in reader:
                where = f"{path}:{reader.line_num}"
                index_text = (record.get("index") or "").strip()
                index = None
                if index_text:
                    if not index_text.isdigit():
                        raise UsageError(f"ANNOTATIONS: {where}: index {index_text!r} is not a dataset index")
                    index = int(index_text)
                image = unprotected((record.get("path") or "").strip()) or None
                yield Row(where, unprotected((record.get("label") or "").strip()), index, image)
    except (OSError, UnicodeDecodeError, csv.Error) as err:
        raise UsageError(f"ANNOTATIONS: cannot read {path!r} ({err})".splitlines()[0]) from None


def task_choice(task: dict, where: str) -> str:
    """The label of a Label Studio task: the `choices` of its last annotation not cancelled; '' without one."""
    annotations = [a for a in task.get("annotations") or [] if isinstance(a, dict) and not a.get("was_cancelled")]
    if not annotations:
        return ""
    choices = [choice for result in annotations[-1].get("result") or [] if isinstance(result, dict)
               and result.get("type") == "choices" for choice in (result.get("value") or {}).get("choices") or []]
    if len(choices) > 1:
        raise UsageError(f"ANNOTATIONS: {where} has two labels for one image: {choices[0]!r} and {choices[1]!r}")
    return str(choices[0]) if choices else ""


def image_path_of(data: dict) -> str | None:
    """The image's relative path: `path` as tools/export.py wrote it, else the `image` URL's last query value."""
    if isinstance(data.get("path"), str) and data["path"]:
        return data["path"]
    image = data.get("image")
    if not isinstance(image, str) or not image:
        return None
    return unquote(image.split("?d=", 1)[1] if "?d=" in image else image)


def label_studio_rows(path: str) -> Iterator[Row]:
    try:
        with open(path, encoding="utf-8") as f:
            tasks = json.load(f)
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as err:
        raise UsageError(f"ANNOTATIONS: cannot read {path!r} ({err})".splitlines()[0]) from None
    if not isinstance(tasks, list):
        raise UsageError(f"ANNOTATIONS: {path!r} is not a Label Studio JSON export (a list of tasks)")
    for number, task in enumerate(tasks, 1):
        where = f"{path} task {number}"
        if not isinstance(task, dict) or not isinstance(task.get("data"), dict):
            raise UsageError(f"ANNOTATIONS: {where} is not a Label Studio task (no 'data')")
        data = task["data"]
        index = data.get("index")
        if index is not None and (not isinstance(index, int) or isinstance(index, bool) or index < 0):
            raise UsageError(f"ANNOTATIONS: {where}: index {index!r} is not a dataset index")
        yield Row(where, task_choice(task, where), index, image_path_of(data))


def folder_rows(root: str) -> Iterator[Row]:
    for label in sorted(entry.name for entry in os.scandir(root) if entry.is_dir() and not entry.name.startswith(".")):
        for name in datasets.image_files(os.path.join(root, label)):
            yield Row(os.path.join(root, label, name), label, path=name)


def annotation_rows(path: str) -> list[Row]:
    if os.path.isdir(path):
        return list(folder_rows(path))
    if not os.path.isfile(path):
        raise UsageError(f"ANNOTATIONS: no file or folder {path!r}")
    return list(label_studio_rows(path) if path.lower().endswith(".json") else csv_rows(path))


# ---------------------------------------------------------------- rows to dataset indices

def path_index(images: datasets.Images, root: str) -> tuple[dict[str, int], dict[str, list[int]]]:
    """Every image's relative path -> its index, and file name -> the indices of the images with that name."""
    by_path = {relative_path(images, i, root): i for i in range(len(images))}
    by_name: dict[str, list[int]] = {}
    for rel, i in by_path.items():
        by_name.setdefault(Path(rel).name, []).append(i)
    return by_path, by_name


def row_index(row: Row, images: datasets.Images, by_path: dict[str, int], by_name: dict[str, list[int]],
              folder_tree: bool) -> int:
    """The dataset index a row names: by its path in an image folder (checked against its index when it gives
    one too), else by its index."""
    if row.path is not None and by_path:
        found = by_path.get(row.path)
        if found is None and folder_tree:
            named = by_name.get(Path(row.path).name, [])
            found = named[0] if len(named) == 1 else None
        if found is None:
            raise UsageError(f"ANNOTATIONS: {row.where}: {row.path!r} is not an image of the listing")
        if row.index is not None and row.index != found:
            raise UsageError(f"ANNOTATIONS: {row.where}: index {row.index} is not the image {row.path!r} "
                             f"(that is index {found}): an export of another folder?")
        return found
    if row.index is None:
        raise UsageError(f"ANNOTATIONS: {row.where} names no image (no index, no path)")
    if row.index >= len(images):
        raise UsageError(f"ANNOTATIONS: {row.where}: index {row.index} is not an image of the listing "
                         f"({len(images)} images)")
    return row.index


def class_names(args: argparse.Namespace, merged: Labels | None, rows: Sequence[Row]) -> tuple[str, ...]:
    if args.classes is not None:
        names = tuple(name.strip() for name in args.classes.split(","))
        if not all(names) or len(set(names)) != len(names):
            raise UsageError(f"--classes: {args.classes!r} must be distinct, non-empty names")
        return names
    if merged is not None:
        return merged.classes
    found = tuple(sorted({row.label for row in rows if row.label}))
    if not found:
        raise UsageError(f"ANNOTATIONS: {args.annotations!r} holds no label")
    return found


def imported(rows: Sequence[Row], classes: tuple[str, ...], selection: np.ndarray, images: datasets.Images,
             root: str, folder_tree: bool) -> dict[int, tuple[int, str]]:
    """index -> (class id, where) for every labelled row, each checked."""
    by_path, by_name = path_index(images, root) if isinstance(images, datasets.FileImages) else ({}, {})
    selected = set(selection.tolist())
    out: dict[int, tuple[int, str]] = {}
    for row in rows:
        if not row.label:
            continue
        if row.label not in classes:
            raise UsageError(f"ANNOTATIONS: {row.where}: label {row.label!r} is not a class name "
                             f"({', '.join(classes)})")
        index = row_index(row, images, by_path, by_name, folder_tree)
        if index not in selected:
            raise UsageError(f"ANNOTATIONS: {row.where}: image {index} is not in the selection {len(selection)} "
                             "images were exported from")
        label = classes.index(row.label)
        if index in out and out[index][0] != label:
            raise UsageError(f"ANNOTATIONS: {row.where}: a second label for image {index} ({row.label!r}; "
                             f"{classes[out[index][0]]!r} at {out[index][1]})")
        out[index] = label, row.where
    return out


def merged_labels(found: dict[int, tuple[int, str]], merged: Labels | None, classes: tuple[str, ...],
                  images: datasets.Images, root: str) -> Labels:
    """The imported labels and --merge's: an image labelled in both must have the same class."""
    labels = {index: label for index, (label, _) in found.items()}
    for index, label in zip((merged.indices if merged else []), (merged.labels if merged else []), strict=True):
        name = merged.classes[int(label)] if merged else ""
        if name not in classes:
            raise UsageError(f"--classes: {name!r}, a class of --merge, is not among them")
        if int(index) in labels and labels[int(index)] != classes.index(name):
            raise UsageError(f"ANNOTATIONS: {found[int(index)][1]}: image {index} is labelled "
                             f"{classes[labels[int(index)]]!r} here and {name!r} in --merge")
        labels.setdefault(int(index), classes.index(name))
    indices = np.array(sorted(labels), dtype=np.int64)
    return Labels(indices, np.array([labels[i] for i in indices.tolist()], dtype=np.int64), classes,
                  tuple(relative_path(images, int(i), root) for i in indices))


def main(argv: Sequence[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    recorded = read_sidecar(args.index_file, "INDEX_FILE")
    dataset = args.dataset or recorded.get("dataset") or "folder"
    out = args.out or labels_path(args.index_file)
    images = datasets.load_images(dataset, args.data, "train", args.lt_list, unlabeled=args.unlabeled)
    selection = read_indices(args.index_file, len(images), flag="INDEX_FILE", dataset=dataset)
    listing = datasets.listing_record(images, args.data)
    check_listing(recorded.get("listing"), listing, args.index_file, args.data)
    merged = None if args.merge is None else read_labels(args.merge, dataset=dataset, listing=listing,
                                                         num_images=len(images), flag="--merge")
    rows = annotation_rows(args.annotations)
    classes = class_names(args, merged, rows)
    found = imported(rows, classes, selection, images, args.data, os.path.isdir(args.annotations))
    labels = merged_labels(found, merged, classes, images, args.data)
    write_labels(out, labels, dataset=dataset, listing=listing)
    skipped = sum(1 for row in rows if not row.label)
    print(f"=> {len(found)} labels imported from {args.annotations}"
          + (f" ({skipped} rows without a label skipped)" if skipped else "")
          + (f", {len(labels.indices) - len(found)} kept from {args.merge}" if merged else "")
          + f"; {len(selection) - len(set(found) & set(selection.tolist()))} of the {len(selection)} selected "
          f"images have none from this file")
    print(f"=> saved {out} ({len(labels.indices)} labelled images, {len(classes)} classes)")


if __name__ == "__main__":
    cli.run_main(main)
