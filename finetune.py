"""Fine-tune the whole pretrained backbone plus a linear head on the labelled pool of each index file.

As the original: head = L2-normalise + Linear; Adam with --lr for the backbone and --lr-lin for the
head, no weight decay; MultiStepLR at --lr_schedule; BatchNorm in train mode; validation every
--print-freq epochs and after the last. Any dataset and any --backbone: a checkpoint file (compress, moco,
torchvision), random weights, or a model loaded by name (timm, open_clip's image tower, hf, hub, a torchvision
weights name), which trains and evaluates with its own preprocessing.
"""
from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence

import torch
from torch import nn

from lowbudget import cli, datasets, engine, supervised
from lowbudget.features import loaded_backbone
from models.checkpoints import build_backbone
from models.families import trainable, uses_pretrained_name


def build_parser() -> argparse.ArgumentParser:
    parser = cli.Parser(description=__doc__.splitlines()[0])
    cli.add_data_args(parser)
    parser.add_argument("-a", "--arch", default="resnet50", metavar="ARCH",
                        help="torchvision architecture; with --backbone timm/open_clip/hf/hub the model name, as "
                             "for the scripts that embed (default: resnet50)")
    parser.add_argument("--weights", default="", type=str,
                        help="pretrained backbone checkpoint; or a torchvision weights name, an OpenCLIP tag")
    parser.add_argument("--backbone", default="compress", choices=cli.BACKBONE_NAMES,
                        help="checkpoint format, or the library that names the model (default: compress)")
    supervised.add_args(parser, sgd=False)
    parser.add_argument("--lr-lin", default=0.01, type=cli.LEARNING_RATE, dest="lr_lin",
                        help="head learning rate (default: 0.01)")
    parser.add_argument("--resume-indices", default="", type=str, help="accepted, unused, as the original")
    return parser


def pretrained_backbone(args: argparse.Namespace) -> tuple[Callable[[], tuple[nn.Module, int]],
                                                        datasets.Preprocess | None]:
    """(a maker of a fresh trainable backbone and its feature dim, the preprocessing it trains and evaluates
    with): a model loaded by name once, copied for each split; a checkpoint file or random weights rebuilt for
    each split (seeded), with the dataset's preprocessing."""
    if not uses_pretrained_name(args.backbone, args.weights):
        def rebuilt() -> tuple[nn.Module, int]:
            backbone, dim = build_backbone(args.arch, args.backbone, args.weights)
            return backbone.requires_grad_(True), dim
        return rebuilt, None
    loaded = loaded_backbone(args)
    assert loaded.preprocess is not None
    size = loaded.preprocess.at_size(args.image_size).size
    return (lambda: (trainable(loaded.model, size), loaded.dim)), loaded.preprocess


def main(argv: Sequence[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    fresh_backbone, preprocess = pretrained_backbone(args)

    def build(num_classes: int):
        backbone, dim = fresh_backbone()
        model = nn.Sequential(backbone, engine.linear_head(dim, num_classes))

        def optimizer(net: nn.Module) -> torch.optim.Optimizer:
            """Adam over net = Sequential(backbone, head): --lr for the backbone, --lr-lin for the head."""
            backbone_part, head_part = net.children()
            trained = [p for p in backbone_part.parameters() if p.requires_grad]
            return torch.optim.Adam([{"params": trained},
                                     {"params": head_part.parameters(), "lr": args.lr_lin}], args.lr)
        return model, optimizer

    supervised.train_splits(args, "finetune", build, validate_every=max(args.print_freq, 1), preprocess=preprocess)


if __name__ == "__main__":
    cli.run_main(main)
