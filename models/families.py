"""Pretrained backbones by name, from the libraries people embed images with, each with the preprocessing
its weights were trained with:

  torchvision  --arch ARCH --weights NAME     a torchvision weights enum member (IMAGENET1K_V2, DEFAULT, ...),
                                              downloaded into TORCH_HOME on first use
  timm         --arch NAME [--weights FILE]   timm.create_model(NAME, pretrained=True, num_classes=0) and
                                              timm's data config; FILE is loaded instead of downloading
  open_clip    --arch ARCH --weights TAG|FILE the image tower (model.encode_image)
  hf           --arch REPO_ID|DIR             AutoModel + AutoImageProcessor: pooler output, else the CLS token
  hub          --arch REPO:ENTRY              torch.hub.load; a local directory REPO is loaded with source="local"

A missing package, an unknown name, weights that cannot be downloaded or a model without pooled features
is a one-line UsageError naming the flag.
"""
from __future__ import annotations

import contextlib
import copy
import importlib
import math
import os
from collections.abc import Iterator
from types import ModuleType
from typing import Any, NamedTuple

import torch
import torchvision
from torch import nn

from lowbudget.cli import UsageError
from lowbudget.datasets import IMAGENET_STATS, Preprocess
from lowbudget.fileio import file_digest, text_digest
from models.checkpoints import (
    build_backbone,
    frozen,
    read_checkpoint,
    remove_classifier,
    select_state_dict,
    strip_module_prefix,
)

NAMED_FAMILIES = ("timm", "open_clip", "hf", "hub")
PACKAGES = {"timm": ("timm", "timm"), "open_clip": ("open_clip", "open-clip-torch"),
            "hf": ("transformers", "transformers")}
PIL_RESAMPLING = {0: "nearest", 2: "bilinear", 3: "bicubic"}  # PIL.Image.Resampling values HF processors use
MAX_CLASSIFIER_TENSORS = 2  # a converted checkpoint may end with its classifier's weight and bias


def require_package(backbone: str) -> ModuleType:
    """The library behind `backbone`, or a UsageError saying what to install."""
    module, pip_name = PACKAGES[backbone]
    try:
        return importlib.import_module(module)
    except ImportError:
        raise UsageError(f"--backbone {backbone}: the {module} package is not installed "
                         f"(pip install {pip_name})") from None


def first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


@contextlib.contextmanager
def loading(flag: str, what: str) -> Iterator[None]:
    """Any failure while a library loads `what` (an unknown name, a download impossible offline, a file
    it cannot read) as a one-line UsageError naming `flag`."""
    try:
        yield
    except UsageError:
        raise
    except Exception as err:
        raise UsageError(f"{flag}: cannot load {what}: {first_line(err)}") from None


def is_weights_file(weights: str) -> bool:
    return bool(weights) and os.path.isfile(weights)


# ---------------------------------------------------------------- torchvision weights enums

def torchvision_weights(arch: str, name: str) -> torchvision.models.WeightsEnum | None:
    """The member `name` ('IMAGENET1K_V2', 'DEFAULT' or 'ResNet50_Weights.IMAGENET1K_V2') of `arch`'s
    torchvision weights enum, None when it is not one."""
    try:
        enum = torchvision.models.get_model_weights(arch)
    except (KeyError, ValueError):
        return None
    return enum.__members__.get(name.removeprefix(enum.__name__ + "."))


def torchvision_weight_names(arch: str) -> list[str]:
    try:
        return list(torchvision.models.get_model_weights(arch).__members__)
    except (KeyError, ValueError):
        return []


def torchvision_pretrained(arch: str, weights: torchvision.models.WeightsEnum) -> tuple[nn.Module, Preprocess]:
    """torchvision's `arch` with `weights` (downloaded into TORCH_HOME unless already there) and the
    transform those weights were made with."""
    with loading("--weights", f"torchvision weights {weights}"):
        model = torchvision.models.get_model(arch, weights=weights)
    remove_classifier(model, arch)
    t = weights.transforms()
    return model, Preprocess(t.crop_size[0], t.resize_size[0], tuple(t.mean), tuple(t.std), t.interpolation.value)


# ---------------------------------------------------------------- timm

def timm_preprocess(model: nn.Module) -> Preprocess:
    """timm's data config of `model`: input size, crop fraction, interpolation, mean and std."""
    import timm.data
    cfg = timm.data.resolve_model_data_config(model)
    size = cfg["input_size"][-1]
    return Preprocess(size, math.floor(size / cfg["crop_pct"]), tuple(cfg["mean"]), tuple(cfg["std"]),
                      cfg["interpolation"])


def timm_model(arch: str, weights: str, image_size: int | None) -> tuple[nn.Module, Preprocess]:
    """timm's `arch` without classifier: pretrained weights, or --weights FILE loaded strictly; a model with a
    fixed input size (ViTs) is built for --image-size."""
    timm = require_package("timm")
    cfg = timm.models.get_pretrained_cfg(arch)
    if cfg is None and not timm.is_model(arch):
        raise UsageError(f"--arch: timm has no model {arch!r} (timm.list_models() lists them)")
    sized = {"img_size": image_size} if image_size and cfg is not None and cfg.fixed_input_size else {}
    what = f"timm model {arch!r}" if weights else \
        f"timm model {arch!r} with its pretrained weights (offline, --weights FILE loads a local file)"
    with loading("--arch", what):
        model = timm.create_model(arch, pretrained=not weights, num_classes=0, **sized)
    if weights:
        load_file_strictly(model, weights)
    return model, timm_preprocess(model)


def timm_pretrained_tag(arch: str) -> str:
    """The pretrained weights timm downloads for `arch`: 'pretrained NAME.TAG', the tag resolved (timm's default
    tag of a bare name may change between timm versions)."""
    timm = require_package("timm")
    cfg = timm.models.get_pretrained_cfg(arch)
    if cfg is None:
        return "pretrained"
    return f"pretrained {cfg.architecture}.{cfg.tag}" if cfg.tag else f"pretrained {cfg.architecture}"


def load_file_strictly(model: nn.Module, path: str) -> None:
    """Every tensor of `model` from the state dict in `path` (its classifier, if any, ignored): by name, or
    by position when the file names its tensors otherwise but holds them in the model's order and shapes
    (a checkpoint converted from another implementation)."""
    state = strip_module_prefix(select_state_dict(read_checkpoint(path), path))
    expected = model.state_dict()
    if not set(expected) <= set(state):
        state = renamed_by_position(state, expected, path)
    for key, value in expected.items():
        if state[key].shape != value.shape:
            raise UsageError(f"--weights: {key!r} has shape {tuple(state[key].shape)} in {path!r}, "
                             f"--arch expects {tuple(value.shape)}")
    model.load_state_dict({k: state[k] for k in expected})


def renamed_by_position(state: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], path: str
                        ) -> dict[str, torch.Tensor]:
    """`state` under the model's names when its tensors are the model's, in order and shape, followed at
    most by a classifier; else a UsageError naming a missing tensor."""
    values = list(state.values())
    extra = len(values) - len(expected)
    if 0 <= extra <= MAX_CLASSIFIER_TENSORS and all(
            v.shape == e.shape for v, e in zip(values, expected.values(), strict=False)):
        return dict(zip(expected, values, strict=False))
    missing = next(k for k in expected if k not in state)
    raise UsageError(f"--weights: {path!r} does not fit --arch: it lacks {missing!r} and its tensors are not "
                     "the model's in order")


# ---------------------------------------------------------------- OpenCLIP

class ImageTower(nn.Module):
    """An OpenCLIP model seen as an image embedder: forward = encode_image."""

    def __init__(self, clip: Any):  # an open_clip CLIP model
        super().__init__()
        self.clip = clip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.clip.encode_image(x)


def open_clip_model(arch: str, weights: str) -> tuple[nn.Module, Preprocess]:
    """OpenCLIP `arch` with the pretrained tag or file `weights`, its image tower and its preprocessing."""
    open_clip = require_package("open_clip")
    if not weights:
        raise UsageError("--weights: --backbone open_clip needs a pretrained tag (open_clip.list_pretrained() "
                         "lists them) or a weights file")
    with loading("--arch", f"OpenCLIP {arch!r} with weights {weights!r}"):
        model = open_clip.create_model(arch, pretrained=weights)
    cfg = open_clip.get_model_preprocess_cfg(model)
    size = cfg["size"] if isinstance(cfg["size"], int) else cfg["size"][-1]
    return ImageTower(model), Preprocess(size, size, tuple(cfg["mean"]), tuple(cfg["std"]), cfg["interpolation"])


# ---------------------------------------------------------------- Hugging Face transformers

class PooledOutput(nn.Module):
    """A transformers vision model seen as an image embedder: its pooler output, else the CLS token."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.model(pixel_values=x)
        pooled = getattr(out, "pooler_output", None)
        if pooled is not None:
            return pooled.flatten(1)
        hidden = out.last_hidden_state
        return hidden[:, 0] if hidden.dim() == 3 else hidden


def hf_preprocess(processor: object) -> Preprocess:
    """An image processor's resize, crop, mean and std (shortest-edge or height/width sizes)."""
    size = getattr(processor, "size", None) or {}
    crop = getattr(processor, "crop_size", None) if getattr(processor, "do_center_crop", False) else None
    resize = size.get("shortest_edge") or size.get("height") or 224
    side = crop["height"] if crop else resize
    resample = PIL_RESAMPLING.get(int(getattr(processor, "resample", 2)), "bilinear")
    mean = getattr(processor, "image_mean", None) or IMAGENET_STATS[0]
    std = getattr(processor, "image_std", None) or IMAGENET_STATS[1]
    return Preprocess(side, resize, tuple(mean), tuple(std), resample)


def hf_model(arch: str) -> tuple[nn.Module, Preprocess]:
    """AutoModel and AutoImageProcessor of the Hugging Face repository or folder `arch`."""
    transformers = require_package("hf")
    with loading("--arch", f"Hugging Face model {arch!r}"):
        model = transformers.AutoModel.from_pretrained(arch)
        processor = transformers.AutoImageProcessor.from_pretrained(arch)
    return PooledOutput(model), hf_preprocess(processor)


# ---------------------------------------------------------------- torch.hub

def hub_model(arch: str) -> tuple[nn.Module, Preprocess]:
    """torch.hub.load(REPO, ENTRY) for --arch REPO:ENTRY (a local directory REPO with source='local'),
    fed ImageNet-normalised 224-px centre crops as the hub's image models expect."""
    repo, _, entry = arch.rpartition(":")
    if not repo or not entry:
        raise UsageError(f"--arch: --backbone hub takes REPO:ENTRY, e.g. facebookresearch/dinov2:dinov2_vits14, "
                         f"got {arch!r}")
    source = "local" if os.path.isdir(repo) else "github"
    with loading("--arch", f"torch.hub entry {arch!r}"):
        model = torch.hub.load(repo, entry, source=source, trust_repo=True)
    return model, Preprocess(224, 256, *IMAGENET_STATS)


# ---------------------------------------------------------------- one entry point

class Backbone(NamedTuple):
    """A frozen backbone in eval mode that maps images to pooled features."""
    model: nn.Module
    dim: int
    preprocess: Preprocess | None  # the transform its weights expect; None: the dataset's protocol


def load_backbone(arch: str, backbone: str, weights: str = "", image_size: int | None = None) -> Backbone:
    """Any --backbone: a checkpoint file or random weights (models.checkpoints, the dataset's
    preprocessing), or a model by name with its own preprocessing."""
    if not uses_pretrained_name(backbone, weights):
        return Backbone(*build_backbone(arch, backbone, weights), None)
    print(f"=> loading {backbone} {arch} ({weights_label(arch, backbone, weights)})")
    model, preprocess = pretrained_model(arch, backbone, weights, image_size)
    model = frozen(model)
    return Backbone(model, pooled_dim(model, preprocess.at_size(image_size).size, arch), preprocess)


def trainable(model: nn.Module, size: int) -> nn.Module:
    """A copy of the frozen `model` to fine-tune: the parameters that its image embedding uses (found by one
    backward pass of a blank `size`-px batch, in eval mode so no running statistic moves) require gradients;
    the others (an OpenCLIP text tower, an unused mask token) stay frozen, so that DistributedDataParallel
    finds a gradient for every parameter it averages."""
    model = copy.deepcopy(model).requires_grad_(True).eval()
    model(torch.zeros(2, 3, size, size)).float().sum().backward()
    for parameter in model.parameters():
        parameter.requires_grad_(parameter.grad is not None)
        parameter.grad = None
    return model


def check_pretrained_name(arch: str, backbone: str, weights: str) -> None:
    """--weights for a backbone loaded by name: a torchvision weights name (unless a file), nothing for hf and
    hub (--arch names the weights); a UsageError otherwise."""
    if backbone in ("hf", "hub") and weights:
        raise UsageError(f"--weights: --backbone {backbone} takes its weights from --arch, got {weights!r}")
    if backbone == "torchvision" and torchvision_weights(arch, weights) is None:
        names = ", ".join(torchvision_weight_names(arch)) or "none"
        raise UsageError(f"--weights: no checkpoint found at {weights!r}, and it is not a torchvision weights "
                         f"name for {arch} ({names})")


def pretrained_model(arch: str, backbone: str, weights: str, image_size: int | None) -> tuple[nn.Module, Preprocess]:
    """The named `backbone` family's model (classifier removed) and its preprocessing; --backbone torchvision
    with a weights enum name included."""
    if backbone == "timm":
        return timm_model(arch, weights, image_size)
    if backbone == "open_clip":
        return open_clip_model(arch, weights)
    if backbone == "hf":
        return hf_model(arch)
    if backbone == "hub":
        return hub_model(arch)
    enum = torchvision_weights(arch, weights)
    assert enum is not None, "torchvision weights files are loaded by models.checkpoints"
    return torchvision_pretrained(arch, enum)


def pooled_dim(model: nn.Module, size: int, arch: str) -> int:
    """The feature size, from one forward pass at the input `size`; a model whose output is not one
    vector per image is a UsageError."""
    with torch.inference_mode():
        out = model(torch.zeros(1, 3, size, size))
    if not isinstance(out, torch.Tensor) or out.dim() != 2:
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise UsageError(f"--arch: {arch!r} gives {shape} per batch, not a pooled feature vector per image")
    return out.shape[1]


def uses_pretrained_name(backbone: str, weights: str) -> bool:
    """Whether this backbone is loaded here (a named family, or a torchvision weights enum name) rather
    than from a checkpoint file by models.checkpoints."""
    return backbone in NAMED_FAMILIES or (backbone == "torchvision" and bool(weights) and not os.path.isfile(weights))


def weights_label(arch: str, backbone: str, weights: str) -> str:
    """What identifies the weights without loading them: the file's digest, a weights tag or enum name, a
    local folder's content digest, timm's resolved tag ('pretrained resnet18.a1_in1k'), or 'pretrained' (the
    default weights of the model id --arch)."""
    if is_weights_file(weights):
        return file_digest(weights)
    if backbone == "torchvision":
        check_pretrained_name(arch, backbone, weights)
        return str(torchvision_weights(arch, weights))
    folder = arch.rpartition(":")[0] if backbone == "hub" else arch
    if backbone in ("hf", "hub") and os.path.isdir(folder):
        return "dir-" + folder_digest(folder)
    if backbone == "timm":
        return timm_pretrained_tag(arch)
    return weights or "pretrained"


def folder_digest(folder: str) -> str:
    """A digest of every file's relative path and content under `folder`."""
    parts = []
    for directory, subdirs, files in os.walk(folder):
        subdirs.sort()
        for name in sorted(files):
            path = os.path.join(directory, name)
            parts.append(f"{os.path.relpath(path, folder)}={file_digest(path)}")
    return text_digest("\n".join(parts))
