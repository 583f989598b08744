"""Model-in-the-loop rounds: train a linear head on the pool, add the unlabelled images it is unsure about.

Each `--splits` value is the number of images added in that round (as the original). Strategies:
entropy (the paper's Max-Entropy), margin, least_confidence (the most uncertain images, scored batch by
batch so that memory stays O(N)); uherding (MaxHerding's kernel coverage weighted by the head's
calibrated margin uncertainty), dropquery (k-means over the images whose prediction flips under
input-feature dropout), dcom (density of uncovered images mixed with margin uncertainty by the coverage
of per-image balls) and auto (k-means rounds from no labels, DropQuery's once the pool holds --auto-ready
labels per class), which also read the L2-normalised features of every training image (--cached: the
cached ones; images: the backbone's, embedded once per run). The pool of every round is written as
`{indices}/{name}_{dataset}_{N}.npy` with a sidecar; pass the last one as --resume-indices to continue
a stopped run.
Under torchrun the processes share out the feature extraction; with images they also train the head in
DistributedDataParallel and score blocks of the images, while --cached leaves the rounds to rank 0.
"""
from __future__ import annotations

import argparse
import functools
import os
import sys
from collections.abc import Callable, Iterable, Sequence

import numpy as np
import torch

import strategies
from lowbudget import cli, datasets, distributed, engine
from lowbudget.feature_files import DatasetIndices, Rows, Selectable, check_same_width, require_labels
from lowbudget.features import (
    decodable,
    evaluation_images,
    has_evaluation_set,
    loaded_backbone,
    provenance,
    require_pools_labelled,
    train_features,
    training_images,
    training_labels,
    val_features,
)
from lowbudget.indices import index_path, read_indices, require_files, write_indices, write_indices_and_result
from lowbudget.metrics import coverage
from lowbudget.results import append_result
from lowbudget.runtime import faiss_uses_gpu, on_device, resolve_device, seed_everything
from lowbudget.selection import Selection
from lowbudget.strategy_table import (
    STRATEGIES,
    HeadScore,
    Inputs,
    ModelScores,
    Step,
    Strategy,
    add_options,
    lookup,
    names,
    no_model,
)

MODEL_ROWS = [STRATEGIES[name] for name in names(model=True)]


def build_parser() -> argparse.ArgumentParser:
    parser = cli.Parser(description=__doc__.splitlines()[0])
    cli.add_data_args(parser, indices_written=True)
    cli.add_backbone_args(parser)
    cli.add_val_feats_arg(parser)
    cli.add_labels_arg(parser)
    cli.add_split_args(parser, names(model=True))
    cli.add_training_args(parser)
    parser.add_argument("--resume", default="", type=str, help="accepted, unused, as the original "
                        "(continue a run with --resume-indices)")
    parser.add_argument("--resume-indices", default="", type=str, metavar="FILE",
                        help="initial labelled pool (.npy)")
    parser.add_argument("--init-random", default=0, type=cli.int_at_least(0), metavar="N",
                        help="without --resume-indices: draw a seeded random pool of N images and write it "
                             "as random_{dataset}_{N}.npy")
    add_options(parser, MODEL_ROWS)
    return parser


class RoundData:
    """What the rounds work on: labels, the evaluation set, and either cached features or images with
    the backbone; with `strategy_features`, the L2-normalised features of every training image that the
    strategy reads (the cached ones, or the backbone's embedding of the images, computed once). Arrays
    are by dataset index; `selectable` says which images a strategy may pick (all but the unreadable
    ones) and maps its rows to them."""

    def __init__(self, args: argparse.Namespace, device: torch.device, strategy_features: bool):
        self.args, self.device = args, device
        self.evaluates = has_evaluation_set(args)
        if args.cached:
            train = train_features(args, device)
            self.feats, self.dim = train.feats, train.feats.shape[1]
            self.labels, self.classes = training_labels(args, lambda: require_labels(train, "--feats"),
                                                        len(train.feats))
            self.fingerprint, self.selectable = train.fingerprint, train.selectable_images()
            self.strategy_feats = self.feats
            if self.evaluates:
                val = val_features(args, device)
                check_same_width(train, val)
                self.val_feats, self.val_labels = val.feats, require_labels(val, "--val-feats")
        else:
            self.images, self.labels, self.classes = training_images(args)
            if self.evaluates:
                self.val_images, self.val_labels = evaluation_images(args)
            model, self.dim, self.preprocess = loaded_backbone(args)
            self.backbone = on_device(model, device)
            self.fingerprint = f"{args.arch}-{args.backbone}-images"
            if strategy_features:
                train = train_features(args, device)
                self.strategy_feats, self.selectable = train.feats, train.selectable_images()
            else:
                self.strategy_feats = np.zeros((len(self.labels), 0), np.float32)
                self.selectable = decodable(args, self.images, "train")

    @property
    def num_classes(self) -> int:
        return self.classes or int(max(self.labels.max(), self.val_labels.max())) + 1

    def batches(self, pool: DatasetIndices) -> engine.EpochBatches:
        """Per-epoch training batches of the pool."""
        a = self.args
        if a.cached:
            return engine.feature_loader(self.feats[pool], self.labels[pool], a.batch_size)
        return engine.image_loader(self.images, pool, a.dataset, a.image_size, a.batch_size, a.workers,
                                   self.preprocess)

    def logits(self, head: torch.nn.Module, images: DatasetIndices) -> Iterable[torch.Tensor]:
        """Streamed logits of the training `images`."""
        if self.args.cached:
            return engine.feature_logits(head, self.feats[images], self.device)
        return self.image_logits(head, self.images.subset(images))

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


def check_room(pool_size: int, to_add: int, selectable: int) -> None:
    """The rounds must fit in the `selectable` (readable) images."""
    if pool_size + to_add > selectable:
        raise cli.UsageError(f"--splits: {to_add} images to add but only {selectable - pool_size} are unlabelled")


def initial_pool(args: argparse.Namespace, images: Selectable, to_add: int, cold_start: bool) -> DatasetIndices:
    """--resume-indices, or a seeded random pool of --init-random readable images (written as random_*.npy
    once the rounds are known to fit), or with neither an empty pool when the strategy can start from one."""
    if args.resume_indices:
        pool = images.check(DatasetIndices(read_indices(args.resume_indices, images.num_images,
                                                        dataset=args.dataset)), "--resume-indices")
        print(f"=> Loading current indices: {args.resume_indices}")
        check_room(len(pool), to_add, images.num_rows)
        return pool
    if args.init_random <= 0 and cold_start:
        return DatasetIndices(np.zeros(0, np.int64))
    if args.init_random <= 0:
        raise cli.UsageError("--resume-indices: active learning needs an initial pool; give --resume-indices FILE "
                             "or --init-random N")
    if args.init_random > images.num_rows:
        raise cli.UsageError(f"--init-random: {args.init_random} is more than the {images.num_rows} images")
    pool = images.dataset_indices(Rows(strategies.random_pools(images.num_rows, [args.init_random],
                                                               args.seed)[args.init_random]))
    check_room(len(pool), to_add, images.num_rows)
    path = index_path(args.indices, "random", args.dataset, len(pool))
    write_indices(path, pool, {"strategy": "random", "dataset": args.dataset, "params": {"budget": len(pool)},
                               "seed": args.seed, "initial_pool": None, **provenance(args)})
    print(f"=> initial random pool of {len(pool)} written to {path}")
    return pool


def train_head(pool_data: RoundData, pool: DatasetIndices, num_classes: int, schedule: engine.Schedule,
               purpose: str = "") -> tuple[torch.nn.Module, dict[str, float]]:
    """A fresh head (Linear, no normalisation, as the original) trained on `pool`: (head, last accuracy).
    `purpose` names a head trained for a strategy's own use (its checkpoint apart from the round's)."""
    args = pool_data.args
    torch.manual_seed(args.seed)
    head = engine.linear_head(pool_data.dim, num_classes, normalize=False)
    validate = functools.partial(pool_data.accuracy, head) if pool_data.evaluates else None
    checkpoint = os.path.join(args.save, f"active_{args.name}{purpose}_{args.dataset}_{len(pool)}_seed{args.seed}.pth")
    model = distributed.ddp(head.to(pool_data.device), pool_data.device)
    result = engine.fit(model, torch.optim.Adam(model.parameters(), args.lr), epoch_batches=pool_data.batches(pool),
                        validate=validate, schedule=schedule, device=pool_data.device, seed=args.seed,
                        checkpoint=checkpoint, embed=None if args.cached else pool_data.backbone)
    return model, result


class ScoredHead(torch.nn.Module):
    """`head` followed by a strategy's score, for the program's logit streams: they feed it the inputs of
    the strategy's `rows` in order, batch by batch, so it knows which rows each batch holds."""

    def __init__(self, head: torch.nn.Module, score: HeadScore, rows: np.ndarray):
        super().__init__()
        self.head, self.score, self.rows, self.done = head, score, rows, 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = self.rows[self.done:self.done + len(x)]
        self.done += len(x)
        return self.score(self.head, x, rows)


def model_scores(pool_data: RoundData, head: torch.nn.Module, *, num_classes: int, schedule: engine.Schedule
                 ) -> ModelScores:
    """The table's model hook for `head`: the strategy's rows (of pool_data.selectable) scored batch by
    batch (each torchrun process scoring a block of them; fewer rows than processes are scored whole by
    each), gathered in row order; `trained_on` trains a fresh head on those rows first, as train_head does."""
    images = pool_data.selectable

    def scored(model: torch.nn.Module, score: HeadScore, rows: Rows) -> torch.Tensor:
        return torch.cat(list(pool_data.logits(ScoredHead(model, score, rows), images.dataset_indices(rows))))

    def scores(rows: np.ndarray, score: HeadScore, *, trained_on: np.ndarray | None = None) -> np.ndarray:
        model = head if trained_on is None else train_head(pool_data, images.dataset_indices(Rows(trained_on)),
                                                           num_classes, schedule, "_probe")[0]
        if distributed.active() and len(rows) < torch.distributed.get_world_size():
            return scored(model, score, Rows(rows)).numpy()
        local = scored(model, score, Rows(rows[distributed.shard(len(rows))]))
        return distributed.gather_rows(local, len(rows)).numpy()
    return scores


class RoundModel:
    """The strategy's model hook for a whole run: the head of the current round (no model before the first
    labels), so that the strategy is built once and keeps what does not change between rounds."""

    def __init__(self) -> None:
        self.current: ModelScores = no_model

    def __call__(self, rows: np.ndarray, score: HeadScore, *, trained_on: np.ndarray | None = None) -> np.ndarray:
        return self.current(rows, score, trained_on=trained_on)


def build_step(strategy: Strategy, pool_data: RoundData, hook: ModelScores) -> Step:
    """The strategy, built once per run on the selectable images (their features, labels and pixels as it needs
    them), its model reached through `hook`: what does not depend on the pool (DCoM's k-NN pass) is done once."""
    args, images = pool_data.args, pool_data.selectable
    pixels = pool_data.images.subset(images.indices) if strategy.learns_from_images and not args.cached else None
    inputs = Inputs(images.of_rows(pool_data.strategy_feats), images.of_rows(pool_data.labels), seed=args.seed,
                    device=pool_data.device, gpu=faiss_uses_gpu(pool_data.device), verbose=sys.stdout.isatty(),
                    model_scores=hook, pixels=pixels, dataset=args.dataset, workers=args.workers,
                    checkpoints=args.save)
    return strategy.build(inputs, vars(args))


def select(step: Step, images: Selectable, pool: DatasetIndices, budget: int) -> tuple[DatasetIndices, Selection]:
    """(the `budget` unlabelled images that the strategy's step picks; its selection, in its rows)."""
    selection = step(images.rows(pool, "--resume-indices"), budget)
    return images.dataset_indices(Rows(selection.indices)), selection


def pool_model(pool_data: RoundData, pool: DatasetIndices, num_classes: int, schedule: engine.Schedule,
               record: Callable[..., None]) -> ModelScores:
    """The round's model: a head trained on `pool`, its accuracy printed and recorded, as the strategy's hook."""
    print("Training task model started ...")
    head, result = train_head(pool_data, pool, num_classes, schedule)
    if result:
        print(f"Final accuracy of {len(pool)} labeled data is: {result['top1']:.3f}")
        record(split=len(pool), metric="active_top1", value=result["top1"])
    else:
        print(f"=> no evaluation set: the head trained on {len(pool)} labelled images is not validated")
    return model_scores(pool_data, head, num_classes=num_classes, schedule=schedule)


def main(argv: Sequence[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    strategy = lookup(args.name, model=True)
    splits, milestones = cli.parse_splits(args.splits), cli.parse_milestones(args.lr_schedule)
    if not args.cached and not args.data:
        raise cli.UsageError("data: the default protocol trains on the images; give the dataset root or use --cached")
    if args.resume_indices:  # before any feature is computed
        require_files([args.resume_indices], "--resume-indices", args.dataset)
    seed_everything(args.seed)
    device = distributed.init_from_env(resolve_device(args.device))
    pool_data = RoundData(args, device, strategy.needs_features and not strategy.learns_from_images)
    if args.cached and not distributed.main_continues_alone():
        return
    pool = initial_pool(args, pool_data.selectable, sum(splits), strategy.cold_start)
    print(f"current indices size: {len(pool)}. {coverage(pool_data.labels, pool)}% of all categories is seen")
    num_classes = pool_data.num_classes
    schedule = engine.Schedule(args.epochs, args.lr, milestones, max(args.print_freq, 1))
    results_file = cli.results_path(args)
    fields = {"script": "active_sampler", "dataset": args.dataset, "name": args.name, "seed": args.seed,
              **provenance(args)}
    record = functools.partial(append_result, results_file, **fields)
    model = RoundModel()
    step = build_step(strategy, pool_data, model)
    for increment in splits:
        require_pools_labelled(args, pool_data.labels, [pool])  # the last round's picks need their labels
        model.current = pool_model(pool_data, pool, num_classes, schedule, record) if len(pool) else no_model
        print(f"Query sampling with {args.name} started ...")
        picked, selection = select(step, pool_data.selectable, pool, increment)
        previous, pool = pool, DatasetIndices(np.concatenate([pool, picked]))
        seen = coverage(pool_data.labels, pool)
        print(f"{len(pool)} indices are sampled in total, {len(np.unique(pool))} of them are unique")
        print(f"{seen}% of all categories is seen")
        path = index_path(args.indices, args.name, args.dataset, len(pool))
        params = {"increment": increment, "epochs": args.epochs, "lr": args.lr, "lr_schedule": milestones,
                  "mode": provenance(args)["mode"], "filled": selection.filled, **selection.params}
        write_indices_and_result(path, pool, {
            "strategy": args.name, "dataset": args.dataset, "params": params,
            "seed": args.seed, "initial_pool": {"size": len(previous), "path": args.resume_indices or None},
            "features": pool_data.fingerprint, **provenance(args),
            **({} if selection.scores is None else {"scores": selection.scores.tolist()})},
            results_file=results_file, result={**fields, "split": len(pool), "metric": "coverage", "value": seen})
        print(f"=> saved {path}")


if __name__ == "__main__":
    cli.run_main(main)
