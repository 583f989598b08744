"""Fine-tune the whole pretrained backbone plus a linear head on the labelled pool of each index file.

As the original: head = L2-normalise + Linear; Adam with --lr for the backbone and --lr-lin for the
head, no weight decay; MultiStepLR at --lr_schedule; BatchNorm in train mode; validation every
--print-freq epochs and after the last. Any dataset and any --backbone checkpoint format (the backbones
loaded by name, --backbone timm/open_clip/hf/hub or a torchvision weights name, embed only).
"""
from __future__ import annotations

import argparse
from collections.abc import Sequence

import torch
from torch import nn

from lowbudget import cli, engine, supervised
from lowbudget.backbone_families import uses_pretrained_name
from lowbudget.backbones import build_backbone
from lowbudget.cli import UsageError


def build_parser() -> argparse.ArgumentParser:
    parser = cli.Parser(description=__doc__.splitlines()[0])
    cli.add_data_args(parser)
    parser.add_argument("-a", "--arch", default="resnet50", metavar="ARCH", help="torchvision architecture")
    parser.add_argument("--weights", default="", type=str, help="pretrained backbone checkpoint")
    parser.add_argument("--backbone", default="compress", choices=cli.BACKBONE_NAMES,
                        help="checkpoint format (default: compress)")
    supervised.add_args(parser, sgd=False)
    parser.add_argument("--lr-lin", default=0.01, type=float, dest="lr_lin", help="head learning rate (default: 0.01)")
    parser.add_argument("--resume-indices", default="", type=str, help="accepted, unused, as the original")
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    args = build_parser().parse_args(argv)

    if uses_pretrained_name(args.backbone, args.weights):
        raise UsageError(f"--backbone: finetune.py trains compress, moco, random and torchvision checkpoint files; "
                         f"{args.backbone} {args.weights or args.arch} is for the frozen-feature scripts")

    def build(num_classes: int):
        backbone, dim = build_backbone(args.arch, args.backbone, args.weights)
        for parameter in backbone.parameters():
            parameter.requires_grad = True
        model = nn.Sequential(backbone, engine.linear_head(dim, num_classes))

        def optimizer(net: nn.Module) -> torch.optim.Optimizer:
            """Adam over net = Sequential(backbone, head): --lr for the backbone, --lr-lin for the head."""
            backbone_part, head_part = net.children()
            return torch.optim.Adam([{"params": backbone_part.parameters()},
                                     {"params": head_part.parameters(), "lr": args.lr_lin}], args.lr)
        return model, optimizer

    supervised.train_splits(args, "finetune", build, validate_every=max(args.print_freq, 1))


if __name__ == "__main__":
    cli.run_main(main)
