"""Export a selection for annotators: a CSV, a Label Studio import file and a contact sheet.

Usage, from the repository root:

    python tools/export.py INDEX_FILE --data DIR --out DIR [--dataset folder] [--unlabeled]
        [--url-prefix /data/local-files/?d=] [--compare INDEX_FILE2] [--labels FILE] [--thumb 96] [--columns 10]
    python tools/export.py INDEX_FILE --feats TABLE.parquet --out DIR

With --feats (a selection made from a Parquet table of embeddings, sampler.py --feats TABLE.parquet) it
writes STEM.csv alone, `index,id,label,priority,score`, `id` being the table's id (or path) column.

The index file's entries are dataset indices, mapped to images exactly as sampler.py listed them (pass
the same DIR, --dataset and --unlabeled). Writes into --out, STEM being the index file's name without
`.npy`:

- STEM.csv: `index,path,label,priority,score`, one row per selected image in the order worth labelling
  (`priority` 1 first): by the strategy's score where its sidecar records one (uncertainty sampling), else
  in selection order, which is the order of the greedy strategies' picks; `path` relative to DIR
  (POSIX; empty for the array datasets cifar10/cifar100/fashion_mnist), `label` the class name (the
  class number where no names are known; empty for an unlabelled folder). A cell that begins with
  `=`, `+`, `-`, `@`, a tab or a carriage return gets a leading `'`, so that a spreadsheet shows it as
  text instead of running it as a formula.
- STEM_label_studio.json: Label Studio tasks `{"data": {"image": PREFIX + path, "index": i, "path":
  path, "priority": rank, "score": s}, "meta": {"index": i}}` (path URL-quoted in `image`; `score` where
  the strategy has one), so that the Data Manager sorts the queue by `priority`; the default prefix is
  Label Studio's local-files URL, for LOCAL_FILES_DOCUMENT_ROOT = DIR. Not written for array datasets.

With --labels FILE (tools/import_labels.py's), the images it labels are left out: a round's index file
holds the whole pool, and only its new picks need an annotator.
- STEM_contact_sheet.png: thumbnails letterboxed to THUMB x THUMB squares, in selection order, row by
  row, under a strip naming the strategy (from the index file's JSON sidecar); with --compare, the
  second selection's panel to the right. Size in pixels, for n = the larger selection's size, k = 1 or
  2 panels, cols = min(COLUMNS, n), rows = ceil(n / cols):
      width  = k * (cols * (THUMB + 4) + 4)
      height = 20 + rows * (THUMB + 4) + 4

The files are written together or not at all. For image files, the index file's sidecar records the
listing the sampler indexed (count and digest of the relative paths); a DIR that lists other files now
(an image added, deleted or renamed) is refused, since the indices would name other images. A sidecar
without that record (none, or an older one) is said in one line, and the export goes on unchecked.
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

import numpy as np
from PIL import Image, ImageDraw, ImageOps
from tqdm import tqdm

from lowbudget import cli, datasets
from lowbudget.cli import UsageError
from lowbudget.fileio import atomic_write_folder, file_digest
from lowbudget.indices import read_indices, read_sidecar
from lowbudget.labels import read_labels
from lowbudget.parquet import read_parquet_features

GAP = 4  # pixels around every thumbnail
STRIP = 20  # height of the title strip above each panel
BACKGROUND, LETTERBOX, INK = (255, 255, 255), (40, 40, 40), (0, 0, 0)
LABEL_STUDIO_PREFIX = "/data/local-files/?d="
FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")  # what a spreadsheet reads as the start of a formula


def build_parser() -> argparse.ArgumentParser:
    parser = cli.Parser(description=__doc__.splitlines()[0])
    parser.add_argument("index_file", metavar="INDEX_FILE", help="index file written by a sampler (.npy)")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--data", metavar="DIR", help="the dataset root the sampler read")
    source.add_argument("--feats", metavar="FILE.parquet",
                        help="the Parquet table the sampler read with --feats: its rows' id (or path) column named, "
                             "in a CSV only")
    parser.add_argument("--out", required=True, metavar="DIR", help="folder for the exported files")
    cli.add_selection_listing_args(parser)
    parser.add_argument("--url-prefix", default=LABEL_STUDIO_PREFIX,
                        help=f"put before each relative path in the Label Studio file (default: {LABEL_STUDIO_PREFIX})")
    parser.add_argument("--compare", default=None, metavar="INDEX_FILE2",
                        help="a second selection (e.g. random) shown beside the first on the contact sheet")
    parser.add_argument("--labels", default=None, metavar="FILE",
                        help="a labels file (tools/import_labels.py): the images it labels are left out")
    parser.add_argument("--thumb", default=96, type=cli.int_at_least(8, 1024), metavar="PX",
                        help="thumbnail side, 8 to 1024 (default: 96)")
    parser.add_argument("--columns", default=10, type=cli.int_at_least(1, 1000), metavar="N",
                        help="thumbnails per row (default: 10)")
    return parser


@dataclass
class IndexFile:
    """One index file: its indices in the order worth labelling, the title of its contact-sheet panel, and the
    strategy's score of each (None where the strategy has none)."""
    stem: str
    indices: np.ndarray
    title: str
    scores: np.ndarray | None = None


def recorded_scores(sidecar: dict, size: int, path: str, flag: str) -> np.ndarray | None:
    """The sidecar's `scores` (the strategy's score of the round's picks, the last entries of the file; larger =
    worth labelling sooner) for every entry, NaN for the entries before them; None when it records none."""
    scores = sidecar.get("scores")
    if scores is None:
        return None
    if not isinstance(scores, list) or len(scores) > size or \
            not all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in scores):
        raise UsageError(f"{flag}: the sidecar of {path!r} has 'scores' that are not up to {size} numbers")
    out = np.full(size, np.nan)
    out[size - len(scores):] = scores
    return out


def in_priority_order(selection: IndexFile) -> IndexFile:
    """The entries with a score first, by score from the highest (ties and the rest: selection order)."""
    if selection.scores is None:
        return selection
    order = np.lexsort((np.arange(len(selection.indices)), -np.nan_to_num(selection.scores, nan=-np.inf)))
    return IndexFile(selection.stem, selection.indices[order], selection.title, selection.scores[order])


def without_labelled(selection: IndexFile, labelled: np.ndarray) -> IndexFile:
    """The selection less the images that already have a label (--labels)."""
    keep = ~np.isin(selection.indices, labelled)
    return IndexFile(selection.stem, selection.indices[keep], selection.title,
                     None if selection.scores is None else selection.scores[keep])


def resolve_dataset(args: argparse.Namespace) -> str:
    """--dataset, else the sidecar's, else folder; a UsageError when they disagree."""
    recorded = read_sidecar(args.index_file, "INDEX_FILE").get("dataset")
    if args.dataset and recorded and recorded != args.dataset:
        raise UsageError(f"--dataset: {args.index_file!r} was written for {recorded}, not {args.dataset}")
    return args.dataset or recorded or "folder"


def read_selection(path: str, images: datasets.Images, *, root: str, dataset: str, flag: str) -> IndexFile:
    """The index file, checked against the images (range, dataset, and the listing its sidecar records)."""
    indices = read_indices(path, len(images), flag=flag, dataset=dataset)
    if not len(indices):
        raise UsageError(f"{flag}: {path!r} is empty: nothing to export")
    sidecar = read_sidecar(path, flag)
    check_listing(sidecar.get("listing"), datasets.listing_record(images, root), path, root)
    stem = os.path.basename(path).removesuffix(".npy")
    strategy = sidecar.get("strategy")
    return IndexFile(stem, indices, f"{strategy} ({stem})" if strategy else stem,
                     recorded_scores(sidecar, len(indices), path, flag))


def check_listing(recorded: object, current: dict | None, path: str, root: str) -> None:
    """The image files under `root` must be those the selection indexed (its sidecar's listing)."""
    if current is None:  # an array dataset: fixed order
        return
    if recorded is None:
        print(f"=> warning: {path!r} records no image listing (no sidecar, or one written before listings were "
              f"recorded): cannot check that {root!r} still holds the images it was selected from")
        return
    if recorded != current:
        then = recorded.get("count") if isinstance(recorded, dict) else None
        raise UsageError(f"--data: {root!r} lists other image files than when {path!r} was selected ({then} then, "
                         f"{current['count']} now: a file added, deleted or renamed), so its indices would name "
                         "other images; select again")


def check_args(args: argparse.Namespace) -> None:
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        raise UsageError(f"--out: {args.out!r} is a file, not a folder")
    if args.data is None:
        return
    data, out = os.path.realpath(args.data), os.path.realpath(args.out)  # symbolic links resolved: one may lead inside
    if os.path.commonpath([data, out]) == data:
        raise UsageError(f"--out: {args.out!r} is inside --data: exported images would join the dataset "
                         "and shift its indices")


# ---------------------------------------------------------------- what each selected image is

def relative_path(images: datasets.Images, index: int, root: str) -> str:
    """The image file relative to the dataset root, POSIX; '' for images held in arrays."""
    if isinstance(images, datasets.ArrayImages):
        return ""
    return Path(os.path.relpath(images.paths[index], root)).as_posix()


def label_name(images: datasets.Images, index: int) -> str:
    """The class name when known, else the class number; '' without labels."""
    if images.labels is None:
        return ""
    label = int(images.labels[index])
    classes = getattr(images, "classes", None)
    return classes[label] if classes else str(label)


def spreadsheet_text(cell: str) -> str:
    """`cell` as text a spreadsheet will not run as a formula: a leading ' before a formula's first character."""
    return "'" + cell if cell.startswith(FORMULA_STARTS) else cell


def score_text(selection: IndexFile, rank: int) -> str:
    """The strategy's score of the entry at `rank`, '' where it has none."""
    if selection.scores is None or np.isnan(selection.scores[rank]):
        return ""
    return f"{selection.scores[rank]:.6g}"


def queue_csv(selection: IndexFile, name_column: str, name_of: Callable[[int], str],
              label_of: Callable[[int], str]) -> str:
    """The selection in its order as `index,NAME,label,priority,score`, the cells guarded against formulas."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["index", name_column, "label", "priority", "score"])
    for rank, i in enumerate(selection.indices.tolist()):
        writer.writerow([i, spreadsheet_text(name_of(i)), spreadsheet_text(label_of(i)), rank + 1,
                         score_text(selection, rank)])
    return out.getvalue()


def csv_text(images: datasets.Images, selection: IndexFile, root: str) -> str:
    return queue_csv(selection, "path", lambda i: relative_path(images, i, root), lambda i: label_name(images, i))


def label_studio_tasks(images: datasets.FileImages, selection: IndexFile, root: str, prefix: str) -> list[dict]:
    """One task per selected image, image URL = prefix + URL-quoted relative path."""
    tasks = []
    for rank, i in enumerate(selection.indices.tolist()):
        path = relative_path(images, i, root)
        data: dict[str, object] = {"image": prefix + quote(path), "index": i, "path": path, "priority": rank + 1}
        if score_text(selection, rank):
            data["score"] = float(selection.scores[rank])  # type: ignore[index]
        tasks.append({"data": data, "meta": {"index": i}})
    return tasks


# ---------------------------------------------------------------- contact sheet

def array_image(images: datasets.ArrayImages, index: int) -> Image.Image:
    """The image at `index` of an array dataset as RGB."""
    pixels = images.images[index]
    return Image.fromarray(pixels[0] if pixels.shape[0] == 1 else pixels.transpose(1, 2, 0)).convert("RGB")


def file_image(path: str, size: int) -> Image.Image:
    """The image file as RGB, decoded at a reduced scale where the format allows (JPEG)."""
    with Image.open(path) as image:
        image.draft("RGB", (size, size))
        return ImageOps.exif_transpose(image).convert("RGB")


def unreadable_mark(size: int) -> Image.Image:
    """A crossed-out square standing for an image that could not be read."""
    mark = Image.new("RGB", (size, size), LETTERBOX)
    draw = ImageDraw.Draw(mark)
    draw.line((0, 0, size - 1, size - 1), fill=(220, 0, 0), width=3)
    draw.line((0, size - 1, size - 1, 0), fill=(220, 0, 0), width=3)
    return mark


def thumbnail(images: datasets.Images, index: int, size: int) -> Image.Image:
    """The image letterboxed into a size x size square; an unreadable file is reported and crossed out."""
    if isinstance(images, datasets.ArrayImages):
        image = array_image(images, index)
    else:
        try:
            image = file_image(images.paths[index], size)
        except Exception as err:
            tqdm.write(f"=> warning: cannot read image {images.paths[index]!r} "
                       f"({type(err).__name__}: {err})".splitlines()[0] + "; crossed out on the contact sheet")
            return unreadable_mark(size)
    return ImageOps.pad(image, (size, size), color=LETTERBOX)


def panel(thumbs: list[Image.Image], title: str, cols: int, rows: int, size: int) -> Image.Image:
    """Title strip, then the thumbnails row by row."""
    image = Image.new("RGB", (cols * (size + GAP) + GAP, STRIP + rows * (size + GAP) + GAP), BACKGROUND)
    ImageDraw.Draw(image).text((GAP, 4), title, fill=INK)
    for k, thumb in enumerate(thumbs):
        row, col = divmod(k, cols)
        image.paste(thumb, (GAP + col * (size + GAP), STRIP + GAP + row * (size + GAP)))
    return image


def contact_sheet(images: datasets.Images, selections: list[IndexFile], size: int, columns: int) -> Image.Image:
    """The selections' panels side by side (the geometry in the module docstring)."""
    n = max(len(s.indices) for s in selections)
    cols = min(columns, n)
    rows = math.ceil(n / cols)
    panels = []
    for selection in selections:
        thumbs = [thumbnail(images, i, size)
                  for i in tqdm(selection.indices.tolist(), desc=f"thumbnails {selection.stem}", disable=None)]
        panels.append(panel(thumbs, selection.title, cols, rows, size))
    sheet = Image.new("RGB", (sum(p.width for p in panels), panels[0].height), BACKGROUND)
    for k, image in enumerate(panels):
        sheet.paste(image, (k * image.width, 0))
    return sheet


# ---------------------------------------------------------------- main

def png_bytes(image: Image.Image) -> bytes:
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()


def table_csv(args: argparse.Namespace) -> dict[str, bytes]:
    """The selection from a Parquet table (--feats) as `index,id,label,priority,score`: each row's id (or path)
    and label as the table gives them; the table must be the one the sidecar says was read."""
    if not args.feats.endswith(".parquet"):
        raise UsageError(f"--feats: {args.feats!r} is not a .parquet table (only a table names its rows)")
    table = read_parquet_features(args.feats, "--feats")
    sidecar = read_sidecar(args.index_file, "INDEX_FILE")
    recorded = sidecar.get("features")
    if isinstance(recorded, str) and recorded.split("-")[0] != file_digest(args.feats):
        raise UsageError(f"--feats: {args.feats!r} is not the table {args.index_file!r} was selected from (its "
                         "contents changed, or another file)")
    indices = read_indices(args.index_file, len(table.feats), flag="INDEX_FILE", dataset=sidecar.get("dataset"))
    stem = os.path.basename(args.index_file).removesuffix(".npy")
    selection = in_priority_order(IndexFile(stem, indices, stem, recorded_scores(sidecar, len(indices),
                                                                                   args.index_file, "INDEX_FILE")))
    text = queue_csv(selection, table.id_column or "id", lambda i: "" if table.ids is None else table.ids[i],
                     lambda i: "" if table.labels is None else str(int(table.labels[i])))
    return {f"{stem}.csv": text.encode()}


def main(argv: Sequence[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    check_args(args)
    if args.feats:
        write_outputs(args.out, table_csv(args))
        return
    dataset = resolve_dataset(args)
    images = datasets.load_images(dataset, args.data, "train", args.lt_list, unlabeled=args.unlabeled)
    selections = [read_selection(path, images, root=args.data, dataset=dataset, flag=flag)
                  for path, flag in ((args.index_file, "INDEX_FILE"), (args.compare, "--compare")) if path]
    selection = in_priority_order(selections[0])
    if args.labels:
        labels = read_labels(args.labels, dataset=dataset, listing=datasets.listing_record(images, args.data),
                             num_images=len(images))
        selection = without_labelled(selection, labels.indices)
        print(f"=> {len(selections[0].indices) - len(selection.indices)} images labelled in {args.labels} left out, "
              f"{len(selection.indices)} to label")
        if not len(selection.indices):
            raise UsageError(f"--labels: every image of {args.index_file!r} is labelled in {args.labels!r}: "
                             "nothing to export")
    selections[0] = selection
    outputs = {f"{selection.stem}.csv": csv_text(images, selection, args.data).encode()}
    if isinstance(images, datasets.FileImages):
        tasks = label_studio_tasks(images, selection, args.data, args.url_prefix)
        outputs[f"{selection.stem}_label_studio.json"] = (json.dumps(tasks, indent=1) + "\n").encode()
    outputs[f"{selection.stem}_contact_sheet.png"] = png_bytes(contact_sheet(images, selections, args.thumb,
                                                                             args.columns))
    write_outputs(args.out, outputs)


def write_outputs(folder: str, outputs: dict[str, bytes]) -> None:
    """All the files or none: a folder that cannot be written (read-only, full) is a UsageError naming --out."""
    try:
        paths = atomic_write_folder(folder, outputs)
    except OSError as err:
        raise UsageError(f"--out: cannot write into {folder!r} ({err.strerror or err})") from None
    for path in paths:
        print(f"=> wrote {path}")


if __name__ == "__main__":
    cli.run_main(main)
