"""The per-split driver of finetune.py and trainer_DP.py: a whole network trained on a labelled pool.

Under torchrun the network trains in DistributedDataParallel (each process loads --batch-size / world
images of every step) and each process validates a block of the evaluation images.
"""
from __future__ import annotations

import argparse
import functools
import os
from collections.abc import Callable

import numpy as np
import torch
from torch import nn

from lowbudget import cli, datasets, distributed, engine
from lowbudget.feature_files import decodable_pools
from lowbudget.features import (
    evaluation_images,
    has_evaluation_set,
    provenance,
    require_pools_labelled,
    training_images,
)
from lowbudget.indices import read_split_pools, split_files
from lowbudget.metrics import coverage
from lowbudget.results import append_result
from lowbudget.runtime import on_device, resolve_device, seed_everything

ModelBuilder = Callable[[int], tuple[nn.Module, Callable[[nn.Module], torch.optim.Optimizer]]]


def add_args(parser: argparse.ArgumentParser, *, sgd: bool) -> None:
    """Flags the two training scripts share beyond the data flags (`sgd`: the script trains with SGD)."""
    cli.add_split_args(parser, ["any strategy that wrote {indices}/{name}_{dataset}_{split}.npy"])
    cli.add_training_args(parser, cached=False, sgd=sgd)
    cli.add_resume_arg(parser)
    cli.add_labels_arg(parser)
    parser.add_argument("--amp", action="store_true", help="mixed precision on CUDA")


def image_accuracy(model: nn.Module, images: datasets.Images, *, labels: np.ndarray, args: argparse.Namespace,
                   device: torch.device, preprocess: datasets.Preprocess | None = None) -> dict[str, float]:
    """The model's accuracy on the evaluation images (centre crop, as the backbone's `preprocess` says, else
    as the dataset's) with their `labels`, each torchrun process scoring its block."""
    logits = engine.image_logits(model, nn.Identity(), distributed.shard_images(images), args.dataset,
                                 args.batch_size, args.workers, args.image_size, device, preprocess)
    return engine.accuracy(logits, labels)


def train_splits(args: argparse.Namespace, script: str, build: ModelBuilder, validate_every: int,
                 preprocess: datasets.Preprocess | None = None) -> None:
    """For each split: check its index file (all of them before any training), build a fresh seeded
    model and optimiser, train with validation every `validate_every` epochs and after the last, and
    report top-1/top-5 per split. Images are normalised (and sized) as the backbone's `preprocess` says,
    else as the dataset's."""
    paths, milestones = split_files(args), cli.parse_milestones(args.lr_schedule)
    cli.check_resume(args, list(paths))
    seed_everything(args.seed)
    device = distributed.init_from_env(resolve_device(args.device))
    train, train_labels, classes = training_images(args)
    evaluates = has_evaluation_set(args)
    val, val_labels = evaluation_images(args) if evaluates else (train, None)
    pools = decodable_pools(train, read_split_pools(paths, len(train), args.dataset), paths, args.workers)
    require_pools_labelled(args, train_labels, pools.values())
    num_classes = classes or int(max(train_labels.max(), val_labels.max() if val_labels is not None else 0)) + 1
    schedule = engine.Schedule(args.epochs, args.lr, milestones, validate_every)
    for split, pool in pools.items():
        print(f"=> Loading current indices: {paths[split]}")
        print(f"current indices size: {len(pool)}. {coverage(train_labels, pool)}% of all categories is seen")
        torch.manual_seed(args.seed)
        model, make_optimizer = build(num_classes)
        model = distributed.ddp(on_device(model, device), device)
        batches = engine.image_loader(train, pool, args.dataset, args.image_size, args.batch_size, args.workers,
                                      preprocess, batch_norm=True)
        checkpoint = cli.checkpoint_for(args, os.path.join(args.save, f"{script}_{args.name}_{args.dataset}_{split}"
                                                                      f"_seed{args.seed}.pth"))
        validate = None if val_labels is None else functools.partial(
            image_accuracy, model, val, labels=val_labels, args=args, device=device, preprocess=preprocess)
        result = engine.fit(model, make_optimizer(engine.unwrap(model)), epoch_batches=batches, validate=validate,
                            schedule=schedule, device=device, seed=args.seed, checkpoint=checkpoint,
                            resume=bool(args.resume), amp=args.amp,
                            trained_on=engine.trained_on(pool, images=datasets.listing_record(train, args.data),
                                                         model=[args.arch, getattr(args, "backbone", None),
                                                                getattr(args, "weights", None)]))
        if not result:
            print(f"=> no evaluation set: the model trained on {split} labelled images is in {checkpoint}, "
                  "not validated")
            continue
        print(f"Final accuracy of {split} labeled data is: {result['top1']:.2f} "
              f"(best {result['best_top1']:.2f}, top-5 {result['top5']:.2f})")
        measures = {"top1": result["top1"], "top1_best": result["best_top1"], "top5": result["top5"],
                    "class_mean": result["class_mean"]}
        for metric, value in measures.items():
            append_result(cli.results_path(args), script=script, dataset=args.dataset, name=args.name, split=split,
                          metric=f"{script}_{metric}", value=value, epochs=args.epochs, seed=args.seed,
                          **provenance(args))
