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
from lowbudget.feature_files import rows_of
from lowbudget.features import provenance, train_features, train_labels
from lowbudget.indices import index_path, read_indices, require_files, write_indices_and_result
from lowbudget.metrics import coverage
from lowbudget.runtime import faiss_uses_gpu, resolve_device, seed_everything
from lowbudget.strategy_table import STRATEGIES, Inputs, Step, Strategy, add_options, lookup, names

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


def check_budgets(strategy: Strategy, splits: Sequence[int], pool_size: int, initial: int) -> None:
    """Every budget must be reachable: absolute budgets from the pool, increments from what is left."""
    if strategy.incremental:
        needed, available = sum(splits), pool_size - initial
    else:
        needed, available = max(splits), pool_size
    if needed > available:
        raise UsageError(f"--splits: {strategy.name} needs {needed} images but only {available} can be selected")


def select_pools(strategy: Strategy, step: Step, splits: Sequence[int], initial: np.ndarray
                 ) -> Iterator[tuple[np.ndarray, dict]]:
    """Yield (pool rows, sidecar parameters) for every split, in order: absolute budgets make a pool each,
    increments add to the pool so far."""
    pool = initial
    for split in splits:
        selection = step(pool, split)
        pool = np.concatenate([pool, selection.indices]) if strategy.incremental else selection.indices
        size_key = "increment" if strategy.incremental else "budget"
        yield pool, {size_key: split, "filled": selection.filled, **selection.params}


class Pool(NamedTuple):
    """The training set as the strategy sees it."""

    feats: np.ndarray  # features of the selectable rows (N x 0 for the strategies that need none)
    labels: np.ndarray | None  # labels of the selectable rows, None for unlabelled images
    num_images: int  # the dataset's size, selectable or not
    fingerprint: str  # of the features, for the sidecar
    keep: np.ndarray  # dataset indices of the selectable rows: every image but those that could not be decoded


def load_pool(args: argparse.Namespace, strategy: Strategy, device: torch.device) -> Pool:
    """Features (when the strategy needs them) and labels of the training set."""
    if strategy.needs_features:
        features = train_features(args, device)
        keep, feats = features.selectable()
        labels = None if features.labels is None else features.labels[keep]
        return Pool(feats, labels, len(features.feats), features.fingerprint, keep)
    num_images, labels = train_labels(args)
    return Pool(np.zeros((num_images, 0), np.float32), labels, num_images, "labels-only", np.arange(num_images))


def image_listing(args: argparse.Namespace) -> dict | None:
    """datasets.listing_record of the training images (None for --feats and the array datasets), for the
    sidecars: tools/export.py maps indices to files only in a listing that has not changed."""
    if args.feats or args.dataset in datasets.ARRAY_DATASETS:
        return None
    images = datasets.load_images(args.dataset, args.data, "train", args.lt_list, unlabeled=args.unlabeled)
    return datasets.listing_record(images, args.data)


def load_initial(args: argparse.Namespace, strategy: Strategy, num_images: int, labels: np.ndarray | None
                 ) -> np.ndarray:
    """The --resume-indices pool (validated), or an empty pool."""
    if not args.resume_indices:
        if strategy.incremental:
            print(f"=> no --resume-indices: {args.name} starts from an empty pool")
        return np.zeros(0, dtype=np.int64)
    initial = read_indices(args.resume_indices, num_images, dataset=args.dataset)
    print(f"=> Loading current indices: {args.resume_indices}")
    seen = coverage(labels, initial)
    print(f"current indices size: {len(initial)}." + ("" if seen is None else f" {seen}% of all categories is seen"))
    if not strategy.incremental:
        print(f"=> {args.name} budgets are absolute: the initial pool is not used")
    return initial


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
    initial = load_initial(args, strategy, pool.num_images, pool.labels)
    check_budgets(strategy, splits, len(pool.keep), len(initial))
    print(f"Current unlabeled indices is {len(pool.keep) - len(initial)}.")
    print(f"Query sampling with {args.name} started ...")
    inputs = Inputs(pool.feats, None if pool.labels is None else pool.labels[pool.keep], seed=args.seed,
                    device=device, gpu=faiss_uses_gpu(device), verbose=sys.stdout.isatty())
    step = strategy.build(inputs, vars(args))
    results_file = cli.results_path(args)
    made_by = provenance(args, embedded=strategy.needs_features)
    listing = image_listing(args)
    for rows, params in select_pools(strategy, step, splits, rows_of(pool.keep, initial, "--resume-indices")):
        selected = pool.keep[rows]
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
