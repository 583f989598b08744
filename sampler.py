"""Select the images to label from cached backbone features (uniform, random, kmeans, accu_kmeans, coreset).

`--splits` is an absolute budget for uniform, random and kmeans, and a per-round increment on top of
the current pool for accu_kmeans and coreset (as in the original). Every index file holds exactly the
size in its name: `{indices}/{name}_{dataset}_{N}.npy`, with a JSON sidecar.
"""
from __future__ import annotations

import argparse
import sys
from typing import Iterator, Sequence

import numpy as np

import strategies
import tools
from tools import cli
from tools.cli import UsageError
from tools.features import train_features, train_labels
from tools.indices import index_path, read_indices, write_indices
from tools.metrics import coverage
from tools.results import append_result
from tools.runtime import faiss_uses_gpu, resolve_device, seed_everything

NAMES = ("uniform", "random", "kmeans", "accu_kmeans", "coreset")
INCREMENTAL = ("accu_kmeans", "coreset")
NEEDS_FEATURES = ("kmeans", "accu_kmeans", "coreset")


def build_parser() -> argparse.ArgumentParser:
    parser = cli.Parser(description=__doc__.splitlines()[0])
    cli.add_data_args(parser)
    cli.add_backbone_args(parser)
    cli.add_split_args(parser, NAMES)
    parser.add_argument("--resume-indices", default="", type=str, metavar="FILE",
                        help="initial labelled pool (.npy) that accu_kmeans and coreset add to; "
                             "without it they start from an empty pool")
    return parser


def check_budgets(name: str, splits: Sequence[int], pool_size: int, initial: int) -> None:
    """Every budget must be reachable: absolute budgets from the pool, increments from what is left."""
    if name in INCREMENTAL:
        needed, available = sum(splits), pool_size - initial
    else:
        needed, available = max(splits), pool_size
    if needed > available:
        raise UsageError(f"--splits: {name} needs {needed} images but only {available} can be selected")


def select_pools(name: str, splits: Sequence[int], feats: np.ndarray | None, labels: np.ndarray | None,
                 num_images: int, initial: np.ndarray, seed: int, device, gpu: bool
                 ) -> Iterator[tuple[np.ndarray, dict]]:
    """Yield (pool, parameters) for every split, in order."""
    if name == "uniform":
        for budget, pool in strategies.uniform_pools(labels, splits, seed).items():
            yield pool, {"budget": budget}
    elif name == "random":
        for budget, pool in strategies.random_pools(num_images, splits, seed).items():
            yield pool, {"budget": budget}
    elif name == "kmeans":
        for budget in splits:
            selection = strategies.kmeans_select(feats, budget, seed=seed, gpu=gpu, verbose=sys.stdout.isatty())
            yield selection.indices, {"budget": budget, "niter": 20, "nredo": 5, "filled": selection.filled}
    else:
        pool = initial
        for increment in splits:
            if name == "accu_kmeans":
                selection = strategies.accu_kmeans_select(feats, pool, increment, seed=seed, gpu=gpu,
                                                         verbose=sys.stdout.isatty())
            else:
                selection = strategies.coreset_select(feats, pool, increment, device=device, gpu_faiss=gpu)
            pool = np.concatenate([pool, selection.indices])
            yield pool, {"increment": increment, "filled": selection.filled}


def load_pool(args: argparse.Namespace, device) -> tuple[np.ndarray | None, np.ndarray | None, int, str]:
    """(features or None, labels or None, pool size, feature fingerprint) for this strategy."""
    if args.name in NEEDS_FEATURES:
        features = train_features(args, device)
        return features.feats, features.labels, len(features.feats), features.fingerprint
    num_images, labels = train_labels(args)
    return None, labels, num_images, "labels-only"


def load_initial(args: argparse.Namespace, num_images: int, labels: np.ndarray | None) -> np.ndarray:
    """The --resume-indices pool (validated), or an empty pool."""
    if not args.resume_indices:
        if args.name in INCREMENTAL:
            print(f"=> no --resume-indices: {args.name} starts from an empty pool")
        return np.zeros(0, dtype=np.int64)
    initial = read_indices(args.resume_indices, num_images, dataset=args.dataset)
    print(f"=> Loading current indices: {args.resume_indices}")
    seen = coverage(labels, initial)
    print(f"current indices size: {len(initial)}." + ("" if seen is None else f" {seen}% of all categories is seen"))
    if args.name not in INCREMENTAL:
        print(f"=> {args.name} budgets are absolute: the initial pool is not used")
    return initial


def main(argv: Sequence[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    if args.name not in NAMES:
        raise UsageError(f"--name: unknown strategy {args.name!r}; choose one of {', '.join(NAMES)}")
    splits = cli.parse_splits(args.splits)
    seed_everything(args.seed)
    device = resolve_device(args.device)
    feats, labels, num_images, fingerprint = load_pool(args, device)
    if args.name == "uniform" and labels is None:
        raise UsageError("--name uniform needs labels, and the --feats file has none")
    initial = load_initial(args, num_images, labels)
    check_budgets(args.name, splits, num_images, len(initial))
    print(f"Current unlabeled indices is {num_images - len(initial)}.")
    print(f"Query sampling with {args.name} started ...")
    results_file = cli.results_path(args)
    pools = select_pools(args.name, splits, feats, labels, num_images, initial, args.seed, device,
                         faiss_uses_gpu(device))
    for pool, params in pools:
        path = index_path(args.indices, args.name, args.dataset, len(pool))
        print(f"{len(pool)} indices are sampled in total, {len(np.unique(pool))} of them are unique")
        seen = coverage(labels, pool)
        if seen is not None:
            print(f"{seen}% of all categories is seen")
        write_indices(path, pool, {
            "strategy": args.name, "dataset": args.dataset, "params": params, "seed": args.seed,
            "initial_pool": {"path": args.resume_indices, "size": len(initial)} if args.resume_indices else None,
            "features": fingerprint, "arch": None if args.feats else args.arch,
            "backbone": None if args.feats else args.backbone, "version": tools.__version__})
        print(f"=> saved {path}")
        if seen is not None:
            append_result(results_file, script="sampler", dataset=args.dataset, name=args.name, split=len(pool),
                          metric="coverage", value=seen, seed=args.seed,
                          arch=None if args.feats else args.arch,
                          backbone=None if args.feats else args.backbone)


if __name__ == "__main__":
    cli.run_main(main)
