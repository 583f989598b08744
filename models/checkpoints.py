"""Frozen backbones: any torchvision classification architecture with its classifier removed.

Checkpoint formats (--backbone):
  compress     CompRess: {'model': DataParallel state dict, 'opt': Namespace, ...}, maybe a projection head
  moco         MoCo v2: {'state_dict': {'module.encoder_q.*', 'module.encoder_k.*', ...}}
  torchvision  a plain state dict (a torchvision weights enum name instead: models.families)
  random       no weights: the architecture's random initialisation (seeded)
Any of the three files may hold its weights under 'model', 'state_dict' or at the top level, with or
without 'module.' prefixes; any classifier or projection head is dropped whatever its size; missing
backbone weights stop the run instead of leaving layers randomly initialised.
"""
from __future__ import annotations

import argparse
import os
import warnings

import torch
import torchvision
from torch import nn

from lowbudget.cli import UsageError
from lowbudget.fileio import file_digest

HEAD_PREFIX_MOCO = "encoder_q."


def _last_linear_name(model: nn.Module) -> str | None:
    names = [name for name, module in model.named_modules() if isinstance(module, nn.Linear)]
    return names[-1] if names else None


def _replace_module(model: nn.Module, dotted: str, new: nn.Module) -> None:
    parent_name, _, child = dotted.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def build_architecture(arch: str) -> tuple[nn.Module, str, int]:
    """torchvision `arch` with its final Linear replaced by Identity: (model, head name, feature dim)."""
    if arch not in torchvision.models.list_models(module=torchvision.models):
        raise UsageError(f"--arch: unknown torchvision classification architecture {arch!r}")
    model = torchvision.models.get_model(arch, weights=None)
    head, dim = remove_classifier(model, arch)
    return model, head, dim


def remove_classifier(model: nn.Module, arch: str) -> tuple[str, int]:
    """Replace the torchvision model's final Linear by Identity: (its name, its input size)."""
    head = _last_linear_name(model)
    if head is None:
        raise UsageError(f"--arch: {arch!r} has no linear classifier to remove")
    linear = model.get_submodule(head)
    assert isinstance(linear, nn.Linear)
    _replace_module(model, head, nn.Identity())
    return head, linear.in_features


def load_weights_only(path: str) -> object:
    """torch.load on CPU with weights_only (no code runs), without the warning torch's unpickler prints before
    it refuses a pickle of another protocol than its own: the caller's one-line refusal names the file."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Detected pickle protocol", category=UserWarning)
        return torch.load(path, map_location="cpu", weights_only=True)


def read_checkpoint(path: str) -> object:
    """torch.load with weights_only=True on CPU; argparse.Namespace allowed for CompRess 'opt'."""
    if not path:
        raise UsageError("--weights: a checkpoint is required for this --backbone")
    if not os.path.isfile(path):
        raise UsageError(f"--weights: no checkpoint found at {path!r}")
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            return load_weights_only(path)
    except Exception as err:
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UsageError(f"--weights: cannot read checkpoint {path!r}: {first_line}") from None


def _is_state_dict(obj: object) -> bool:
    return isinstance(obj, dict) and bool(obj) and all(torch.is_tensor(v) for v in obj.values())


def select_state_dict(checkpoint: object, path: str) -> dict[str, torch.Tensor]:
    """The weights inside a checkpoint: under 'model', 'state_dict', or the file itself (fixes B1)."""
    if isinstance(checkpoint, dict):
        for key in ("model", "state_dict"):
            if _is_state_dict(checkpoint.get(key)):
                return checkpoint[key]
        if _is_state_dict(checkpoint):
            return checkpoint
    raise UsageError(f"--weights: {path!r} holds no state dict under 'model' or 'state_dict'")


def _strip_module(key: str) -> str:
    while key.startswith("module."):
        key = key[len("module."):]
    return key


def strip_module_prefix(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A state dict without DataParallel's 'module.' key prefixes."""
    return {_strip_module(k): v for k, v in state.items()}


def backbone_weights(state: dict[str, torch.Tensor], backbone: str) -> dict[str, torch.Tensor]:
    """Keys as the bare architecture names them: 'module.' removed, MoCo's query encoder selected."""
    state = strip_module_prefix(state)
    if backbone == "moco":
        state = {k[len(HEAD_PREFIX_MOCO):]: v for k, v in state.items() if k.startswith(HEAD_PREFIX_MOCO)}
    return state


def load_backbone_weights(model: nn.Module, head: str, state: dict[str, torch.Tensor], path: str) -> None:
    """Copy every backbone tensor; drop the head; stop on a missing or mis-shaped backbone tensor."""
    expected = model.state_dict()
    ignored = [k for k in state if k not in expected and not k.startswith(head + ".")]
    required = [k for k in expected if not k.endswith("num_batches_tracked")]  # absent in old files
    missing = [k for k in required if k not in state]
    if missing:
        moco_file = any(k.startswith(HEAD_PREFIX_MOCO) for k in state)
        hint = " (a MoCo file? use --backbone moco)" if moco_file else " (wrong --arch or --backbone?)"
        raise UsageError(f"--weights: {path!r} lacks {len(missing)} of {len(required)} backbone tensors, "
                         f"e.g. {missing[0]!r}{hint}")
    for key, value in expected.items():
        if key in state and state[key].shape != value.shape:
            raise UsageError(f"--weights: {key!r} has shape {tuple(state[key].shape)} in {path!r}, "
                             f"the architecture expects {tuple(value.shape)} (wrong --arch?)")
    model.load_state_dict({k: state.get(k, v) for k, v in expected.items()})
    if ignored:
        print(f"=> ignored {len(ignored)} checkpoint tensors that are not part of the backbone")


def build_backbone(arch: str, backbone: str, weights: str = "") -> tuple[nn.Module, int]:
    """A frozen backbone in eval mode that maps images to pooled features: (model, feature dim)."""
    model, head, dim = build_architecture(arch)
    if backbone != "random":
        print(f"=> loading {backbone} weights from {weights}")
        state = select_state_dict(read_checkpoint(weights), weights)
        load_backbone_weights(model, head, backbone_weights(state, backbone), weights)
        print(f"Weights of {backbone} loaded.")
    return frozen(model), dim


def frozen(model: nn.Module) -> nn.Module:
    """`model` in eval mode with no parameter requiring gradients."""
    for parameter in model.parameters():
        parameter.requires_grad = False
    return model.eval()


def weights_fingerprint(backbone: str, weights: str, seed: int) -> str:
    """Short content hash of the weights file (random backbones: the seed that initialised them)."""
    if backbone == "random":
        return f"random{seed}"
    return file_digest(weights)
