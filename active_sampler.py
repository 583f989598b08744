"""Model-in-the-loop rounds: train a linear head on the pool, add the most uncertain unlabelled images.

Each `--splits` value is the number of images added in that round (as the original). Scores:
entropy (the paper's Max-Entropy), margin, least_confidence, computed batch by batch so that memory
stays O(N). The pool of every round is written as `{indices}/{name}_{dataset}_{N}.npy` with a
sidecar; pass the last one as --resume-indices to continue a stopped run.
Under torchrun the processes share out the feature extraction; with images they also train the head in
DistributedDataParallel and score blocks of the images, while --cached leaves the rounds to rank 0.
"""
from __future__ import annotations

import argparse
import functools
import os
from collections.abc import Callable, Iterable, Sequence

import numpy as np
import torch

from lowbudget import cli, datasets, distributed, engine, strategies
from lowbudget.features import labelled_split, loaded_backbone, require_labels, train_features, val_features
from lowbudget.indices import index_path, read_indices, write_indices
from lowbudget.metrics import coverage
from lowbudget.results import append_result, provenance
from lowbudget.runtime import on_device, resolve_device, seed_everything
from lowbudget.strategy_table import Inputs, Strategy, lookup, names


def build_parser() -> argparse.ArgumentParser:
    parser = cli.Parser(description=__doc__.splitlines()[0])
    cli.add_data_args(parser)
    cli.add_backbone_args(parser)
    cli.add_val_feats_arg(parser)
    cli.add_split_args(parser, names(model=True))
    cli.add_training_args(parser)
    parser.add_argument("--resume", default="", type=str, help="accepted, unused, as the original "
                        "(continue a run with --resume-indices)")
    parser.add_argument("--resume-indices", default="", type=str, metavar="FILE", help="initial labelled pool (.npy)")
    parser.add_argument("--init-random", default=0, type=int, metavar="N",
                        help="without --resume-indices: draw a seeded random pool of N images and write it "
                             "as random_{dataset}_{N}.npy")
    return parser


class RoundData:
    """What the rounds work on: labels, the evaluation set, and either cached features or images with
    the backbone."""

    def __init__(self, args: argparse.Namespace, device: torch.device):
        self.args, self.device = args, device
        if args.cached:
            train = train_features(args, device)
            self.feats, self.labels, self.dim = train.feats, require_labels(train, "--feats"), train.feats.shape[1]
            self.fingerprint = train.fingerprint
            val = val_features(args, device)
            self.val_feats, self.val_labels = val.feats, require_labels(val, "--val-feats")
        else:
            self.images, self.labels = labelled_split(args, "train")
            self.val_images, self.val_labels = labelled_split(args, "val")
            model, self.dim, self.preprocess = loaded_backbone(args)
            self.backbone = on_device(model, device)
            self.fingerprint = f"{args.arch}-{args.backbone}-images"

    def batches(self, pool: np.ndarray) -> engine.EpochBatches:
        """Per-epoch training batches of the pool."""
        a = self.args
        if a.cached:
            return engine.feature_loader(self.feats[pool], self.labels[pool], a.batch_size)
        return engine.image_loader(self.images, pool, a.dataset, a.image_size, a.batch_size, a.workers,
                                   self.preprocess)

    def logits(self, head: torch.nn.Module, rows: np.ndarray) -> Iterable[torch.Tensor]:
        """Streamed logits of training rows `rows`."""
        if self.args.cached:
            return engine.feature_logits(head, self.feats[rows], self.device)
        return self.image_logits(head, self.images.subset(rows))

    def val_logits(self, head: torch.nn.Module) -> Iterable[torch.Tensor]:
        """Streamed logits of this torchrun process's block of the evaluation set (all of it without torchrun)."""
        if self.args.cached:
            return engine.feature_logits(head, self.val_feats, self.device)
        return self.image_logits(head, distributed.shard_images(self.val_images))

    def image_logits(self, head: torch.nn.Module, images: datasets.Images) -> Iterable[torch.Tensor]:
        """Streamed logits of head(backbone(image)) for `images`."""
        a = self.args
        return engine.image_logits(head, self.backbone, images, a.dataset, a.batch_size, a.workers, a.image_size,
                                   self.device, self.preprocess)

    def accuracy(self, head: torch.nn.Module) -> dict[str, float]:
        """The head's accuracy on the evaluation set."""
        return engine.accuracy(self.val_logits(head), self.val_labels)


def check_room(pool_size: int, to_add: int, num_images: int) -> None:
    if pool_size + to_add > num_images:
        raise cli.UsageError(f"--splits: {to_add} images to add but only {num_images - pool_size} are unlabelled")


def initial_pool(args: argparse.Namespace, num_images: int, to_add: int) -> np.ndarray:
    """--resume-indices, or a seeded random pool of --init-random images (written as random_*.npy once
    the rounds are known to fit)."""
    if args.resume_indices:
        pool = read_indices(args.resume_indices, num_images, dataset=args.dataset)
        print(f"=> Loading current indices: {args.resume_indices}")
        check_room(len(pool), to_add, num_images)
        return pool
    if args.init_random <= 0:
        raise cli.UsageError("--resume-indices: active learning needs an initial pool; give --resume-indices FILE "
                             "or --init-random N")
    if args.init_random > num_images:
        raise cli.UsageError(f"--init-random: {args.init_random} is more than the {num_images} images")
    pool = strategies.random_pools(num_images, [args.init_random], args.seed)[args.init_random]
    check_room(len(pool), to_add, num_images)
    path = index_path(args.indices, "random", args.dataset, len(pool))
    write_indices(path, pool, {"strategy": "random", "dataset": args.dataset, "params": {"budget": len(pool)},
                               "seed": args.seed, "initial_pool": None, **provenance(args)})
    print(f"=> initial random pool of {len(pool)} written to {path}")
    return pool


def train_head(pool_data: RoundData, pool: np.ndarray, num_classes: int, schedule: engine.Schedule
               ) -> tuple[torch.nn.Module, dict[str, float]]:
    """A fresh head (Linear, no normalisation, as the original) trained on `pool`: (head, last accuracy)."""
    args = pool_data.args
    torch.manual_seed(args.seed)
    head = engine.linear_head(pool_data.dim, num_classes, normalize=False)
    validate = functools.partial(pool_data.accuracy, head)
    checkpoint = os.path.join(args.save, f"active_{args.name}_{args.dataset}_{len(pool)}_seed{args.seed}.pth")
    model = distributed.ddp(head.to(pool_data.device), pool_data.device)
    result = engine.fit(model, torch.optim.Adam(model.parameters(), args.lr), epoch_batches=pool_data.batches(pool),
                        validate=validate, schedule=schedule, device=pool_data.device, seed=args.seed,
                        checkpoint=checkpoint, embed=None if args.cached else pool_data.backbone)
    return model, result


def model_scores(pool_data: RoundData, head: torch.nn.Module) -> Callable:
    """The table's model hook for `head`: candidates scored batch by batch (each torchrun process scoring a
    block of them), gathered in candidate order."""
    def scores(labelled: np.ndarray, candidates: np.ndarray, score: Callable[[torch.Tensor], torch.Tensor]
               ) -> np.ndarray:
        block = candidates[distributed.shard(len(candidates))]
        local = torch.cat([score(logits) for logits in pool_data.logits(head, block)])
        return distributed.gather_rows(local, len(candidates)).numpy()
    return scores


def select(strategy: Strategy, pool_data: RoundData, head: torch.nn.Module, pool: np.ndarray, budget: int
           ) -> np.ndarray:
    """The `budget` unlabelled images that the strategy picks under `head`, a model trained on `pool`."""
    inputs = Inputs(np.zeros((len(pool_data.labels), 0), np.float32), pool_data.labels, seed=pool_data.args.seed,
                    device=pool_data.device, model_scores=model_scores(pool_data, head))
    return strategy.build(inputs, vars(pool_data.args))(pool, budget).indices


def main(argv: Sequence[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    strategy = lookup(args.name, model=True)
    splits, milestones = cli.parse_splits(args.splits), cli.parse_milestones(args.lr_schedule)
    if not args.cached and not args.data:
        raise cli.UsageError("data: the default protocol trains on the images; give the dataset root or use --cached")
    seed_everything(args.seed)
    device = distributed.init_from_env(resolve_device(args.device))
    pool_data = RoundData(args, device)
    if args.cached and not distributed.main_continues_alone():
        return
    pool = initial_pool(args, len(pool_data.labels), sum(splits))
    print(f"current indices size: {len(pool)}. {coverage(pool_data.labels, pool)}% of all categories is seen")
    num_classes = int(max(pool_data.labels.max(), pool_data.val_labels.max())) + 1
    schedule = engine.Schedule(args.epochs, args.lr, milestones, max(args.print_freq, 1))
    record = functools.partial(append_result, cli.results_path(args), script="active_sampler", dataset=args.dataset,
                               name=args.name, seed=args.seed, **provenance(args))
    for increment in splits:
        print("Training task model started ...")
        head, result = train_head(pool_data, pool, num_classes, schedule)
        print(f"Final accuracy of {len(pool)} labeled data is: {result['top1']:.3f}")
        record(split=len(pool), metric="active_top1", value=result["top1"])
        print(f"Query sampling with {args.name} started ...")
        previous, pool = pool, np.concatenate([pool, select(strategy, pool_data, head, pool, increment)])
        seen = coverage(pool_data.labels, pool)
        print(f"{len(pool)} indices are sampled in total, {len(np.unique(pool))} of them are unique")
        print(f"{seen}% of all categories is seen")
        path = index_path(args.indices, args.name, args.dataset, len(pool))
        write_indices(path, pool, {
            "strategy": args.name, "dataset": args.dataset, "params": {"increment": increment, "epochs": args.epochs,
                                                                         "lr": args.lr, "lr_schedule": milestones,
                                                                         "mode": provenance(args)["mode"]},
            "seed": args.seed, "initial_pool": {"size": len(previous), "path": args.resume_indices or None},
            "features": pool_data.fingerprint, **provenance(args)})
        print(f"=> saved {path}")
        record(split=len(pool), metric="coverage", value=seen)


if __name__ == "__main__":
    cli.run_main(main)
