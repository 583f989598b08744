"""Linear classifier on the frozen backbone, trained on the labelled pool of each index file.

Default: the original protocol, so numbers compare with the paper: the frozen backbone runs on
augmented labelled images every epoch (RandomResizedCrop + flip), head = L2-normalise + Linear, Adam
without weight decay, MultiStepLR at --lr_schedule, validation every --print-freq epochs and after the
last; the last validation's top-1 is reported (and the best, labelled as such). Validation uses the
cached centre-crop features of the evaluation set, which is what the original computes on the fly.
--cached trains the same head, optimiser and schedule on cached centre-crop train features instead:
seconds on a CPU rather than hours, without augmentation.
Under torchrun the features are extracted by all processes; the default protocol then trains the head
in DistributedDataParallel, while --cached leaves the training to rank 0 alone.
"""
from __future__ import annotations

import argparse
import functools
import os
from collections.abc import Sequence

import torch

from lowbudget import cli, datasets, distributed, engine
from lowbudget.feature_files import check_same_width, decodable_pools, readable_pools, require_labels
from lowbudget.features import (
    embedding_provenance,
    loaded_backbone,
    provenance,
    require_evaluation_set,
    require_pools_labelled,
    train_features,
    training_images,
    training_labels,
    val_features,
)
from lowbudget.indices import read_split_pools, split_files
from lowbudget.metrics import coverage
from lowbudget.results import append_result
from lowbudget.runtime import on_device, resolve_device, seed_everything


def build_parser() -> argparse.ArgumentParser:
    parser = cli.Parser(description=__doc__.splitlines()[0])
    cli.add_data_args(parser)
    cli.add_backbone_args(parser)
    cli.add_val_feats_arg(parser)
    cli.add_labels_arg(parser)
    cli.add_split_args(parser, ["any strategy that wrote {indices}/{name}_{dataset}_{split}.npy"])
    cli.add_training_args(parser)
    cli.add_resume_arg(parser)
    return parser


def checkpoint_path(args: argparse.Namespace, split: int) -> str:
    """Where a split's head, optimiser and scheduler are saved each epoch (or --resume CKPT)."""
    mode = "cached" if args.cached else "images"
    return cli.checkpoint_for(args, os.path.join(args.save, f"lincls_{args.name}_{args.dataset}_{split}_{mode}"
                                                            f"_seed{args.seed}.pth"))


def embedded_images(args: argparse.Namespace, images: datasets.Images) -> dict:
    """What the default protocol's head sees in place of a features file: the image listing and the backbone
    (weights, transform); recorded, with the pool, in the checkpoint (engine.trained_on) so that --resume
    refuses another labelled pool or other features."""
    return {"arch": args.arch, "backbone": args.backbone, "listing": datasets.listing_record(images, args.data),
            **embedding_provenance(args)}


def main(argv: Sequence[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    paths, milestones = split_files(args), cli.parse_milestones(args.lr_schedule)
    cli.check_resume(args, list(paths))
    if not args.cached and not args.data:
        raise cli.UsageError("data: the default protocol trains on the images; give the dataset root or use --cached")
    seed_everything(args.seed)
    device = distributed.init_from_env(resolve_device(args.device))
    if args.labels:
        require_evaluation_set(args)
    val = val_features(args, device)
    val_labels = require_labels(val, "--val-feats")
    source: str | dict  # what the head sees: the train features' fingerprint, or embedded_images()
    if args.cached:
        train = train_features(args, device)
        check_same_width(train, val)
        feats, source = train.feats, train.fingerprint
        labels, classes = training_labels(args, lambda: require_labels(train, "--feats"), len(train.feats))
        if not distributed.main_continues_alone():
            return
        pools = readable_pools(train, read_split_pools(paths, len(labels), args.dataset), paths)
    else:
        images, labels, classes = training_images(args)
        model, _, preprocess = loaded_backbone(args)
        backbone, source = on_device(model, device), embedded_images(args, images)
        pools = decodable_pools(images, read_split_pools(paths, len(labels), args.dataset), paths, args.workers)
    require_pools_labelled(args, labels, pools.values())
    num_classes = classes or int(max(labels.max(), val_labels.max())) + 1
    schedule = engine.Schedule(args.epochs, args.lr, milestones, args.print_freq)
    for split, pool in pools.items():
        print(f"=> Loading current indices: {paths[split]}")
        seen = coverage(labels, pool)
        print(f"current indices size: {len(pool)}. {seen}% of all categories is seen")
        print("Training task model started ...")
        torch.manual_seed(args.seed)
        head = engine.linear_head(val.feats.shape[1], num_classes)
        if args.cached:
            batches, embed = engine.feature_loader(feats[pool], labels[pool], args.batch_size), None
        else:
            batches = engine.image_loader(images, pool, args.dataset, args.image_size, args.batch_size, args.workers,
                                          preprocess)
            embed = backbone
        validate = functools.partial(engine.feature_accuracy, head, val.feats, val_labels, device)
        model = distributed.ddp(head.to(device), device)
        result = engine.fit(model, torch.optim.Adam(model.parameters(), args.lr), epoch_batches=batches,
                            validate=validate, schedule=schedule, device=device, seed=args.seed,
                            checkpoint=checkpoint_path(args, split), resume=bool(args.resume), embed=embed,
                            trained_on=engine.trained_on(pool, features=source, val_features=val.fingerprint))
        print(f"Final accuracy of {split} labeled data is: {result['top1']:.3f} "
              f"(best {result['best_top1']:.3f}, top-5 {result['top5']:.3f}, "
              f"per-class mean {result['class_mean']:.3f})")
        measures = {"coverage": seen, "lincls_top1": result["top1"], "lincls_top1_best": result["best_top1"],
                    "lincls_top5": result["top5"], "lincls_class_mean": result["class_mean"]}
        for metric, value in measures.items():
            append_result(cli.results_path(args), script="eval_lincls", dataset=args.dataset, name=args.name,
                          split=split, metric=metric, value=value, epochs=args.epochs, seed=args.seed,
                          **provenance(args))


if __name__ == "__main__":
    cli.run_main(main)
