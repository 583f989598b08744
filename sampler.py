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
from typing import Callable, Iterator, Sequence

import numpy as np

import strategies
import tools
from tools import cli, distributed
from tools.cli import UsageError
from tools.features import rows_of, train_features, train_labels
from tools.indices import index_path, read_indices, write_indices
from tools.metrics import coverage
from tools.results import append_result
from tools.runtime import faiss_uses_gpu, resolve_device, seed_everything

NAMES = ("uniform", "random", "kmeans", "accu_kmeans", "coreset", "typiclust", "probcover", "maxherding")
INCREMENTAL = ("accu_kmeans", "coreset", "typiclust", "probcover", "maxherding")
NEEDS_FEATURES = ("kmeans", "accu_kmeans", "coreset", "typiclust", "probcover", "maxherding")


def build_parser() -> argparse.ArgumentParser:
    parser = cli.Parser(description=__doc__.splitlines()[0])
    cli.add_data_args(parser)
    cli.add_backbone_args(parser)
    cli.add_split_args(parser, NAMES)
    parser.add_argument("--resume-indices", default="", type=str, metavar="FILE",
                        help="initial labelled pool (.npy) that the incremental strategies add to; "
                             "without it they start from an empty pool")
    add_low_budget_args(parser)
    return parser


def _auto_or_positive(text: str) -> float | None:
    """'auto' -> None, else a positive float."""
    if text == "auto":
        return None
    value = float(text)
    if value <= 0:
        raise ValueError(text)
    return value


_auto_or_positive.__name__ = "'auto' or a positive number"  # argparse names the type in its error


def add_low_budget_args(parser: argparse.ArgumentParser) -> None:
    """Options of typiclust, probcover and maxherding."""
    group = parser.add_argument_group("typiclust, probcover, maxherding")
    group.add_argument("--max-clusters", default=500, type=int,
                       help="typiclust: at most this many k-means clusters (|pool| + increment otherwise)")
    group.add_argument("--min-cluster-size", default=5, type=int,
                       help="typiclust: clusters of this many points or fewer are used only when the larger "
                            "ones have no candidates left")
    group.add_argument("--knn", default=20, type=int,
                       help="typiclust: neighbours (inside the cluster) that typicality averages over")
    group.add_argument("--typicality", default="squared", choices=("squared", "euclidean"),
                       help="typiclust: average squared L2 distances (the authors' code) or plain distances "
                            "(the paper's formula)")
    group.add_argument("--delta", default=None, type=_auto_or_positive, metavar="auto|D",
                       help="probcover: ball radius (L2 on unit features); auto (default) takes the largest "
                            "radius whose balls are pure for a --purity share of points under k-means "
                            "pseudo-labels")
    group.add_argument("--purity", default=0.95, type=float, help="probcover: purity target of --delta auto")
    group.add_argument("--pseudo-classes", default=None, type=int, metavar="K",
                       help="probcover: clusters of the pseudo-labels of --delta auto (default: the number "
                            "of classes in the labels; required without labels)")
    group.add_argument("--bandwidth", default=None, type=_auto_or_positive, metavar="auto|S",
                       help="maxherding: sigma of the Gaussian kernel exp(-|x-y|^2 / 2 sigma^2); auto (default) "
                            "is the median mean distance of a point to its --kernel-knn neighbours")
    group.add_argument("--kernel-knn", default=100, type=int,
                       help="maxherding: the kernel is truncated to each point's k nearest neighbours (itself "
                            "included) and is 0 beyond them, so memory is O(N k), not N x N")


def check_low_budget_args(args: argparse.Namespace) -> None:
    """Ranges of the typiclust / probcover / maxherding options (before any feature is extracted)."""
    for flag, value, low in (("--max-clusters", args.max_clusters, 1), ("--min-cluster-size", args.min_cluster_size, 0),
                             ("--knn", args.knn, 1), ("--kernel-knn", args.kernel_knn, 1)):
        if value < low:
            raise UsageError(f"{flag}: must be at least {low}, got {value}")
    if not 0 < args.purity <= 1:
        raise UsageError(f"--purity: must be in (0, 1], got {args.purity}")
    if args.pseudo_classes is not None and args.pseudo_classes < 2:
        raise UsageError(f"--pseudo-classes: must be at least 2, got {args.pseudo_classes}")


def check_budgets(name: str, splits: Sequence[int], pool_size: int, initial: int) -> None:
    """Every budget must be reachable: absolute budgets from the pool, increments from what is left."""
    if name in INCREMENTAL:
        needed, available = sum(splits), pool_size - initial
    else:
        needed, available = max(splits), pool_size
    if needed > available:
        raise UsageError(f"--splits: {name} needs {needed} images but only {available} can be selected")


def select_pools(args: argparse.Namespace, splits: Sequence[int], feats: np.ndarray | None,
                 labels: np.ndarray | None, num_images: int, initial: np.ndarray, device, gpu: bool
                 ) -> Iterator[tuple[np.ndarray, dict]]:
    """Yield (pool, parameters) for every split, in order."""
    name, seed = args.name, args.seed
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
        step = incremental_step(args, feats, labels, device, gpu)
        pool = initial
        for increment in splits:
            selection, params = step(pool, increment)
            pool = np.concatenate([pool, selection.indices])
            yield pool, {"increment": increment, "filled": selection.filled, **params}


Step = Callable[[np.ndarray, int], tuple[strategies.Selection, dict]]


def incremental_step(args: argparse.Namespace, feats: np.ndarray, labels: np.ndarray | None, device, gpu: bool
                     ) -> Step:
    """The function that adds `increment` images to a pool for an incremental strategy. What does not
    depend on the pool (probcover's graph, maxherding's kernel) is built once, here."""
    seed, verbose = args.seed, sys.stdout.isatty()
    if args.name == "accu_kmeans":
        return lambda pool, b: (strategies.accu_kmeans_select(feats, pool, b, seed=seed, gpu=gpu, verbose=verbose), {})
    if args.name == "coreset":
        return lambda pool, b: (strategies.coreset_select(feats, pool, b, device=device, gpu_faiss=gpu), {})
    if args.name == "typiclust":
        options = {"knn": args.knn, "max_clusters": args.max_clusters, "min_cluster_size": args.min_cluster_size,
                   "squared": args.typicality == "squared"}
        return lambda pool, b: (strategies.typiclust_select(feats, pool, b, seed=seed, gpu=gpu, verbose=verbose,
                                                            **options), {**options, "typicality": args.typicality})
    if args.name == "probcover":
        return probcover_step(args, feats, labels, gpu)
    kernel = strategies.herding_kernel(strategies.nearest_neighbours(feats, args.kernel_knn, gpu), args.bandwidth)
    print(f"=> maxherding: Gaussian kernel bandwidth {kernel.bandwidth:.4f}, truncated to {args.kernel_knn} neighbours")
    params = {"bandwidth": kernel.bandwidth, "kernel_knn": args.kernel_knn}
    return lambda pool, b: (strategies.maxherding_select(kernel, pool, b, seed=seed), params)


def probcover_step(args: argparse.Namespace, feats: np.ndarray, labels: np.ndarray | None, gpu: bool) -> Step:
    """Choose δ (given, or the purity heuristic), build the ball graph once, and print the coverage of each round."""
    classes = args.pseudo_classes or (None if labels is None else len(np.unique(labels)))
    if args.delta is None and classes is None:
        raise UsageError("--pseudo-classes: --delta auto needs the class count, and the features have no labels")
    try:
        graph, delta = strategies.probcover_graph(feats, args.delta, args.purity, classes, seed=args.seed, gpu=gpu)
    except ValueError as err:
        raise UsageError(f"--delta: {err}") from None
    if args.delta is None:
        print(f"=> probcover: delta {delta:.4f}, the largest radius with {args.purity:.0%} pure balls "
              f"under {classes} k-means pseudo-labels")
    print(f"=> probcover: {len(graph.indices)} edges, {len(graph.indices) / len(feats):.1f} points per ball on average")
    params = {"delta": delta, "purity": args.purity if args.delta is None else None}

    def step(pool: np.ndarray, increment: int) -> tuple[strategies.Selection, dict]:
        selection, covered = strategies.probcover_select(graph, pool, increment, seed=args.seed)
        print(f"=> probcover: {covered:.2%} of the points lie within delta of the pool")
        return selection, {**params, "ball_coverage": covered}
    return step


def load_pool(args: argparse.Namespace, device
              ) -> tuple[np.ndarray | None, np.ndarray | None, int, str, np.ndarray]:
    """(features of the selectable rows or None, labels or None, pool size, feature fingerprint, dataset
    indices of the selectable rows: every image but those that could not be decoded) for this strategy."""
    if args.name in NEEDS_FEATURES:
        features = train_features(args, device)
        keep, feats = features.selectable()
        return feats, features.labels, len(features.feats), features.fingerprint, keep
    num_images, labels = train_labels(args)
    return None, labels, num_images, "labels-only", np.arange(num_images)


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
    check_low_budget_args(args)
    seed_everything(args.seed)
    device = resolve_device(args.device)
    if args.name in NEEDS_FEATURES and not args.feats:
        device = distributed.init_from_env(device)
    elif not distributed.is_main():
        return  # nothing to share out: rank 0 does it all
    feats, labels, num_images, fingerprint, keep = load_pool(args, device)
    if not distributed.main_continues_alone():
        return
    if args.name == "uniform" and labels is None:
        source = "the --feats file" if args.feats else f"the unlabelled folder {args.data!r}"
        raise UsageError(f"--name uniform needs labels, and {source} has none")
    initial = load_initial(args, num_images, labels)
    check_budgets(args.name, splits, len(keep), len(initial))
    print(f"Current unlabeled indices is {len(keep) - len(initial)}.")
    print(f"Query sampling with {args.name} started ...")
    results_file = cli.results_path(args)
    pools = select_pools(args, splits, feats, labels, num_images, rows_of(keep, initial, "--resume-indices"),
                         device, faiss_uses_gpu(device))
    for rows, params in pools:
        pool = keep[rows]
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
