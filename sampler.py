"""Select the images to label from cached backbone features.

Strategies: uniform, random, kmeans, accu_kmeans, coreset (the paper's) and typiclust, probcover,
maxherding (the newer low-budget methods). `--splits` is an absolute budget for uniform, random and
kmeans, and a per-round increment on top of the current pool for the others (as accu_kmeans and
coreset in the original). Every index file holds exactly the
size in its name: `{indices}/{name}_{dataset}_{N}.npy`, with a JSON sidecar.
Under torchrun the processes share out the backbone's feature extraction, then rank 0 selects alone;
strategies that need no backbone start no process group.
"""
from __future__ import annotations

import argparse
import sys
from collections.abc import Iterator, Sequence
from typing import NamedTuple

import numpy as np
import torch

from lowbudget import cli, datasets, distributed
from lowbudget.cli import UsageError
from lowbudget.feature_files import DatasetIndices, Rows, Selectable
from lowbudget.features import provenance, report_skips, train_features, train_labels
from lowbudget.indices import index_path, read_indices, require_files, write_indices_and_result
from lowbudget.metrics import coverage
from lowbudget.runtime import faiss_uses_gpu, resolve_device, seed_everything
from lowbudget.strategy_table import (
    STRATEGIES,
    Inputs,
    Strategy,
    add_options,
    check_budgets,
    lookup,
    names,
    select_pools,
)

SAMPLER_ROWS = [STRATEGIES[name] for name in names(model=False)]


def build_parser() -> argparse.ArgumentParser:
    parser = cli.Parser(description=__doc__.splitlines()[0])
    cli.add_data_args(parser, indices_written=True)
    cli.add_backbone_args(parser)
    cli.add_split_args(parser, names(model=False))
    parser.add_argument("--resume-indices", default="", type=str, metavar="FILE",
                        help="initial labelled pool (.npy) that the incremental strategies add to; "
                             "without it they start from an empty pool")
    add_options(parser, SAMPLER_ROWS)
    return parser


class Pool(NamedTuple):
    """The training set, every array by dataset index: a strategy sees them cut to the selectable rows
    (dataset_pools)."""

    feats: np.ndarray  # features of every training image (N x 0 for the strategies that need none)
    labels: np.ndarray | None  # label of every training image, None for unlabelled images
    fingerprint: str  # of the features, for the sidecar
    selectable: Selectable  # the images a strategy may pick: every image but those that could not be decoded


def load_pool(args: argparse.Namespace, strategy: Strategy, device: torch.device) -> Pool:
    """Features (when the strategy needs them) and labels of the training set."""
    if strategy.needs_features:
        features = train_features(args, device)
        return Pool(features.feats, features.labels, features.fingerprint, features.selectable_images())
    num_images, labels = train_labels(args)
    return Pool(np.zeros((num_images, 0), np.float32), labels, "labels-only", Selectable.all_but(num_images, ()))


def training_files(args: argparse.Namespace) -> datasets.FileImages | None:
    """The training image files (None for --feats and the array datasets)."""
    if args.feats or args.dataset in datasets.ARRAY_DATASETS:
        return None
    images = datasets.load_images(args.dataset, args.data, "train", args.lt_list, unlabeled=args.unlabeled)
    return images if isinstance(images, datasets.FileImages) else None


def load_initial(args: argparse.Namespace, strategy: Strategy, num_images: int, labels: np.ndarray | None
                 ) -> DatasetIndices:
    """The --resume-indices pool (validated), or an empty pool."""
    if not args.resume_indices:
        if strategy.incremental:
            print(f"=> no --resume-indices: {args.name} starts from an empty pool")
        return DatasetIndices(np.zeros(0, dtype=np.int64))
    initial = DatasetIndices(read_indices(args.resume_indices, num_images, dataset=args.dataset))
    print(f"=> Loading current indices: {args.resume_indices}")
    seen = coverage(labels, initial)
    print(f"current indices size: {len(initial)}." + ("" if seen is None else f" {seen}% of all categories is seen"))
    if not strategy.incremental:
        print(f"=> {args.name} budgets are absolute: the initial pool is not used")
    return initial


def dataset_pools(args: argparse.Namespace, strategy: Strategy, splits: Sequence[int], pool: Pool,
                  initial: DatasetIndices, device: torch.device) -> Iterator[tuple[DatasetIndices, dict]]:
    """select_pools() over the selectable rows, each pool given as dataset indices."""
    images = pool.selectable
    check_budgets(strategy, splits, images.num_rows, len(initial))
    inputs = Inputs(images.of_rows(pool.feats), None if pool.labels is None else images.of_rows(pool.labels),
                    seed=args.seed, device=device, gpu=faiss_uses_gpu(device), verbose=sys.stdout.isatty())
    step = strategy.build(inputs, vars(args))
    for rows, params in select_pools(strategy, step, splits, images.rows(initial, "--resume-indices")):
        yield images.dataset_indices(Rows(rows)), params


def readable_pools(args: argparse.Namespace, strategy: Strategy, splits: Sequence[int], pool: Pool,
                   initial: DatasetIndices, *, files: datasets.FileImages | None, device: torch.device
                   ) -> Iterator[tuple[DatasetIndices, dict]]:
    """dataset_pools(), none holding an unreadable image. A strategy that reads features picks among the
    images they were extracted from; one that reads no image (uniform, random) has its picks decoded: an
    unreadable one is reported and excluded, and the selection made again, until every pick decodes (they
    are absolute strategies: the initial pool is not theirs to check)."""
    if strategy.needs_features or files is None:
        yield from dataset_pools(args, strategy, splits, pool, initial, device)
        return
    readable = np.zeros(0, np.int64)
    while True:
        pools = list(dataset_pools(args, strategy, splits, pool, initial, device))
        picks = np.setdiff1d(np.concatenate([selected for selected, _ in pools]), readable)
        unreadable = datasets.unreadable_files(files, picks, args.workers)
        if not unreadable:
            yield from pools
            return
        report_skips(files, unreadable, args.strict)
        print(f"=> {len(unreadable)} unreadable image file(s) among the picks: selecting again without them")
        readable = np.union1d(readable, np.setdiff1d(picks, list(unreadable)))
        pool = pool._replace(selectable=pool.selectable.without(unreadable))


def main(argv: Sequence[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    strategy = lookup(args.name, model=False)
    splits = cli.parse_splits(args.splits)
    if args.resume_indices:  # before any feature is computed
        require_files([args.resume_indices], "--resume-indices", args.dataset)
    seed_everything(args.seed)
    device = resolve_device(args.device)
    if strategy.needs_features and not args.feats:
        device = distributed.init_from_env(device)
    elif not distributed.is_main():
        return  # nothing to share out: rank 0 does it all
    pool = load_pool(args, strategy, device)
    if not distributed.main_continues_alone():
        return
    if strategy.needs_labels and pool.labels is None:
        source = "the --feats file" if args.feats else f"the unlabelled folder {args.data!r}"
        raise UsageError(f"--name {args.name} needs labels, and {source} has none")
    initial = load_initial(args, strategy, pool.selectable.num_images, pool.labels)
    print(f"Current unlabeled indices is {pool.selectable.num_rows - len(initial)}.")
    print(f"Query sampling with {args.name} started ...")
    results_file = cli.results_path(args)
    made_by = provenance(args, embedded=strategy.needs_features)
    files = training_files(args)
    listing = None if files is None else datasets.listing_record(files, args.data)
    for selected, params in readable_pools(args, strategy, splits, pool, initial, files=files, device=device):
        path = index_path(args.indices, args.name, args.dataset, len(selected))
        print(f"{len(selected)} indices are sampled in total, {len(np.unique(selected))} of them are unique")
        seen = coverage(pool.labels, selected)
        if seen is not None:
            print(f"{seen}% of all categories is seen")
        result = None if seen is None else {"script": "sampler", "dataset": args.dataset, "name": args.name,
                                            "split": len(selected), "metric": "coverage", "value": seen,
                                            "seed": args.seed, **made_by}
        write_indices_and_result(path, selected, {
            "strategy": args.name, "dataset": args.dataset, "params": params, "seed": args.seed,
            "initial_pool": {"path": args.resume_indices, "size": len(initial)} if args.resume_indices else None,
            "features": pool.fingerprint, "listing": listing, **made_by}, results_file=results_file, result=result)
        print(f"=> saved {path}")


if __name__ == "__main__":
    cli.run_main(main)
