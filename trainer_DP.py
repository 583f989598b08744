"""Train a network from random initialisation on the labelled pool of each index file.

As the original: SGD with momentum 0.9 and weight decay 1e-4, MultiStepLR at --lr_schedule,
validation every 10 epochs and after the last. Any dataset; --cifar-stem swaps a ResNet's 7x7
stride-2 stem and max-pool for a 3x3 stride-1 convolution, for 32x32 inputs.
"""
from __future__ import annotations

import argparse
from collections.abc import Sequence

import torch
import torchvision
from torch import nn

from lowbudget import cli, supervised

VALIDATE_EVERY = 10  # hard-coded in the original


def build_parser() -> argparse.ArgumentParser:
    parser = cli.Parser(description=__doc__.splitlines()[0])
    cli.add_data_args(parser)
    parser.add_argument("-a", "--arch", default="resnet50", metavar="ARCH", help="torchvision architecture")
    supervised.add_args(parser, sgd=True)
    parser.add_argument("--cifar-stem", action="store_true",
                        help="3x3 stride-1 first convolution and no max-pool (ResNets, 32x32 images)")
    return parser


def build_model(arch: str, num_classes: int, cifar_stem: bool) -> nn.Module:
    """torchvision `arch` with `num_classes` outputs, randomly initialised."""
    if arch not in torchvision.models.list_models(module=torchvision.models):
        raise cli.UsageError(f"--arch: unknown torchvision classification architecture {arch!r}")
    model = torchvision.models.get_model(arch, weights=None, num_classes=num_classes)
    if cifar_stem:
        if not isinstance(model, torchvision.models.ResNet):
            raise cli.UsageError(f"--cifar-stem: only for ResNets, not {arch!r}")
        model.conv1 = nn.Conv2d(3, model.conv1.out_channels, kernel_size=3, stride=1, padding=1, bias=False)
        model.maxpool = nn.Identity()
    return model


def main(argv: Sequence[str] | None = None) -> None:
    args = build_parser().parse_args(argv)

    def build(num_classes: int):
        model = build_model(args.arch, num_classes, args.cifar_stem)
        return model, lambda net: torch.optim.SGD(net.parameters(), args.lr, momentum=args.momentum,
                                                  weight_decay=args.weight_decay)

    supervised.train_splits(args, "trainer_DP", build, validate_every=VALIDATE_EVERY)


if __name__ == "__main__":
    cli.run_main(main)
