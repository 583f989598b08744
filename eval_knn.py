"""k-NN classification (k=1 by default) of the evaluation set from the labelled pool of each index file.

Features are the cached, L2-normalised backbone features (or --feats / --val-feats), so squared-L2
neighbours are cosine neighbours. Ties in the vote go to the nearest neighbour's class among the tied.
Under torchrun the processes share out the feature extraction, then rank 0 classifies alone.
"""
from __future__ import annotations

import argparse
from collections.abc import Sequence

import numpy as np

from lowbudget import cli, distributed, faiss_ops
from lowbudget.feature_files import check_same_width, readable_pools, require_labels
from lowbudget.features import (
    provenance,
    require_evaluation_set,
    require_pools_labelled,
    train_features,
    training_labels,
    val_features,
)
from lowbudget.indices import read_split_pools, split_files
from lowbudget.metrics import class_mean_accuracy, coverage, majority_vote, top1
from lowbudget.results import append_result
from lowbudget.runtime import faiss_uses_gpu, resolve_device, seed_everything


def build_parser() -> argparse.ArgumentParser:
    parser = cli.Parser(description=__doc__.splitlines()[0])
    cli.add_data_args(parser, workers=8, print_freq=90)
    cli.add_backbone_args(parser, arch="resnet18")
    cli.add_val_feats_arg(parser)
    cli.add_labels_arg(parser)
    cli.add_split_args(parser, ["any strategy that wrote {indices}/{name}_{dataset}_{split}.npy"])
    parser.add_argument("-k", default=1, type=cli.int_at_least(1), help="number of neighbours (default: 1)")
    return parser


def knn_predict(train_feats: np.ndarray, train_labels: np.ndarray, query_feats: np.ndarray, k: int,
                gpu: bool = False) -> np.ndarray:
    """Majority label of each query's k nearest training rows (exact search)."""
    k = min(k, len(train_feats))
    _, neighbors = faiss_ops.flat_search(train_feats, query_feats, k, gpu)
    return majority_vote(train_labels[neighbors])


def main(argv: Sequence[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    paths = split_files(args)
    seed_everything(args.seed)
    device = distributed.init_from_env(resolve_device(args.device))
    if args.labels:
        require_evaluation_set(args)
    val = val_features(args, device)  # first: an unlabelled folder stops here, before any extraction
    train = train_features(args, device)
    train_labels, _ = training_labels(args, lambda: require_labels(train, "--feats"), len(train.feats))
    val_labels = require_labels(val, "--val-feats")
    if not distributed.main_continues_alone():
        return
    check_same_width(train, val)
    pools = readable_pools(train, read_split_pools(paths, len(train.feats), args.dataset), paths)
    require_pools_labelled(args, train_labels, pools.values())
    gpu = faiss_uses_gpu(device)
    for split, pool in pools.items():
        print(f"current_indices loaded from {paths[split]} with {len(pool)} indices.")
        predictions = knn_predict(train.feats[pool], train_labels[pool], val.feats, args.k, gpu)
        measures = {"coverage": coverage(train_labels, pool), "knn_top1": top1(predictions, val_labels),
                    "knn_class_mean": class_mean_accuracy(predictions, val_labels)}
        print(f"{measures['coverage']}% of all categories is seen")
        print(f" * Acc for {split} samples is {measures['knn_top1']:.2f} "
              f"(per-class mean {measures['knn_class_mean']:.2f}, k={args.k})")
        for metric, value in measures.items():
            append_result(cli.results_path(args), script="eval_knn", dataset=args.dataset, name=args.name,
                          split=split, metric=metric, value=value, k=args.k, seed=args.seed, **provenance(args))


if __name__ == "__main__":
    cli.run_main(main)
