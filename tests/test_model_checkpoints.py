"""Backbone construction and checkpoint loading in every format the paper's weights come in."""
import argparse

import pytest
import torch
from torch import nn

from lowbudget.cli import UsageError
from models.checkpoints import build_architecture, build_backbone
from tests.helpers import compress_checkpoint, moco_checkpoint, resnet_backbone_state


def assert_loaded(model: nn.Module, state: dict) -> None:
    loaded = model.state_dict()
    assert set(loaded) == set(state)
    for key, value in state.items():
        assert torch.equal(loaded[key], value), key


@pytest.fixture(scope="module")
def r18_state():
    return resnet_backbone_state("resnet18", seed=1)


@pytest.mark.parametrize("head_dim", [None, 128, 2048])
@pytest.mark.parametrize("key", ["model", "state_dict"])
@pytest.mark.parametrize("prefix", ["module.", ""])
def test_compress_checkpoint_any_head_any_container(tmp_path, r18_state, head_dim, key, prefix):
    path = tmp_path / "ckpt_epoch_130.pth"
    torch.save(compress_checkpoint(r18_state, head_dim, key, prefix), path)
    model, dim = build_backbone("resnet18", "compress", str(path))
    assert dim == 512
    assert_loaded(model, r18_state)
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 512)


def test_bare_state_dict_with_torchvision_classifier(tmp_path, r18_state):
    torch.manual_seed(0)
    full = dict(r18_state, **{"fc.weight": torch.randn(1000, 512), "fc.bias": torch.randn(1000)})
    path = tmp_path / "resnet18.pth"
    torch.save(full, path)
    model, _ = build_backbone("resnet18", "torchvision", str(path))
    assert_loaded(model, r18_state)


def test_moco_resnet50_drops_mlp_head_and_key_encoder(tmp_path):
    state = resnet_backbone_state("resnet50", seed=2)
    path = tmp_path / "moco_v2_800ep_pretrain.pth.tar"
    torch.save(moco_checkpoint(state), path)
    model, dim = build_backbone("resnet50", "moco", str(path))
    assert dim == 2048
    assert_loaded(model, state)


def test_moco_file_read_as_compress_fails_with_a_hint(tmp_path, r18_state):
    path = tmp_path / "moco.pth.tar"
    torch.save(moco_checkpoint(r18_state), path)
    with pytest.raises(UsageError, match="--backbone moco"):
        build_backbone("resnet18", "compress", str(path))


def test_missing_backbone_weights_stop_instead_of_random_layers(tmp_path, r18_state):
    partial = {k: v for k, v in r18_state.items() if not k.startswith("layer4")}
    path = tmp_path / "partial.pth"
    torch.save({"model": partial}, path)
    with pytest.raises(UsageError, match="lacks .* backbone tensors"):
        build_backbone("resnet18", "compress", str(path))


def test_wrong_arch_is_named(tmp_path, r18_state):
    path = tmp_path / "r18.pth"
    torch.save({"model": r18_state}, path)
    with pytest.raises(UsageError, match="lacks .*wrong --arch"):
        build_backbone("resnet34", "compress", str(path))


def test_mis_shaped_tensor_is_named(tmp_path):
    path = tmp_path / "r50.pth"
    torch.save({"model": resnet_backbone_state("resnet50")}, path)
    with pytest.raises(UsageError, match="'layer1.0.conv1.weight' has shape .*wrong --arch"):
        build_backbone("resnet18", "compress", str(path))


def test_checkpoint_without_any_state_dict(tmp_path):
    path = tmp_path / "empty.pth"
    torch.save({"epoch": 3, "opt": argparse.Namespace(a=1)}, path)
    with pytest.raises(UsageError, match="holds no state dict"):
        build_backbone("resnet18", "compress", str(path))


class NotAllowed:
    pass


def test_unsafe_pickle_is_refused(tmp_path):
    path = tmp_path / "unsafe.pth"
    torch.save({"model": {"x": torch.zeros(1)}, "extra": NotAllowed()}, path)
    with pytest.raises(UsageError, match="cannot read checkpoint"):
        build_backbone("resnet18", "compress", str(path))


def test_missing_and_empty_weights_path(tmp_path):
    with pytest.raises(UsageError, match="no checkpoint found"):
        build_backbone("resnet18", "compress", str(tmp_path / "nope.pth"))
    with pytest.raises(UsageError, match="--weights"):
        build_backbone("resnet18", "moco", "")


def test_random_backbone_is_seeded():
    torch.manual_seed(5)
    a, _ = build_backbone("resnet18", "random")
    torch.manual_seed(5)
    b, _ = build_backbone("resnet18", "random")
    assert_loaded(b, a.state_dict())


@pytest.mark.parametrize("arch,dim", [("resnet18", 512), ("mobilenet_v2", 1280), ("vgg11", 4096),
                                      ("efficientnet_b0", 1280)])
def test_any_torchvision_arch_loses_its_classifier(arch, dim):
    with torch.device("meta"):  # the structure alone is checked: no weights need initialising
        model, head, found = build_architecture(arch)
    assert found == dim
    assert isinstance(model.get_submodule(head), nn.Identity)


def test_unknown_arch():
    with pytest.raises(UsageError, match="--arch"):
        build_architecture("resnet_nonexistent")
