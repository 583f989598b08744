"""--precision: its choices, fp32 unchanged, channels-last fp32 (the CPU default) and bf16 on the CPU within
the agreement bar, and the feature cache keyed by the precision it was computed in."""
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import sampler
import strategies
from lowbudget import datasets, features
from lowbudget.runtime import resolve_precision
from models.checkpoints import build_backbone
from tests.helpers import REPO, call_main, write_cifar


@pytest.fixture(scope="module")
def resnet18():
    torch.manual_seed(0)
    return build_backbone("resnet18", "random")[0]


def clustered_images(count: int, seed: int = 0) -> datasets.ArrayImages:
    """32-px uint8 images around 8 random prototypes, so that k-means has clusters to find."""
    rng = np.random.default_rng(seed)
    prototypes = rng.uniform(0, 255, (8, 3, 32, 32))
    labels = rng.integers(0, 8, count)
    pixels = prototypes[labels] + rng.normal(0, 20, (count, 3, 32, 32))
    return datasets.ArrayImages(np.clip(pixels, 0, 255).astype(np.uint8), labels)


def test_precision_flag_choices_and_default(capsys):
    parser = sampler.build_parser()
    assert parser.parse_args([]).precision == "auto"
    for name in ("fp32", "fp32-cl", "bf16", "fp16"):
        assert parser.parse_args(["--precision", name]).precision == name
    with pytest.raises(SystemExit) as exit_info:
        parser.parse_args(["--precision", "fp8"])
    assert exit_info.value.code == 2 and "--precision" in capsys.readouterr().err


def test_auto_precision_is_channels_last_fp32_on_cpu_and_fp32_on_cuda():
    assert resolve_precision("auto", torch.device("cpu")) == "fp32-cl"
    assert resolve_precision("auto", torch.device("cuda")) == "fp32"
    assert resolve_precision("bf16", torch.device("cpu")) == "bf16"


def test_channels_last_fp32_agrees_with_fp32(resnet18):
    images, cpu = clustered_images(200), torch.device("cpu")
    fp32, _ = features.extract(resnet18, images, "cifar10", 50, 0, cpu, desc="", precision="fp32")
    channels_last, _ = features.extract(resnet18, images, "cifar10", 50, 0, cpu, desc="", precision="fp32-cl")
    assert resnet18.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    resnet18.to(memory_format=torch.contiguous_format)  # the module is shared with the other tests
    assert np.einsum("ij,ij->i", fp32, channels_last).min() >= 0.99999
    # the features differ by float32 rounding, far less than each cluster's nearest member leads by (~1e-3)
    assert np.abs(fp32 - channels_last).max() < 1e-5
    picks = [strategies.kmeans_select(feats, 8, seed=0).indices for feats in (fp32, channels_last)]
    assert np.array_equal(*picks)


def test_fp32_features_are_the_plain_forward_pass(resnet18):
    images = clustered_images(24)
    feats, _ = features.extract(resnet18, images, "cifar10", 24, 0, torch.device("cpu"), desc="", precision="fp32")
    x = next(datasets.inference_batches(images, "cifar10", 24))
    with torch.inference_mode():
        direct = F.normalize(resnet18(x), dim=1).numpy()
    assert np.array_equal(feats, direct)


def test_bf16_on_cpu_agrees_with_fp32(resnet18):
    images, cpu = clustered_images(200), torch.device("cpu")
    fp32, _ = features.extract(resnet18, images, "cifar10", 50, 0, cpu, desc="", precision="fp32")
    bf16, _ = features.extract(resnet18, images, "cifar10", 50, 0, cpu, desc="", precision="bf16")
    resnet18.to(memory_format=torch.contiguous_format)  # the module is shared with the other tests
    assert np.einsum("ij,ij->i", fp32, bf16).min() >= 0.999
    # bf16 moves features by ~1e-2, more than a cluster's nearest member leads by (~1e-3): the picks may
    # differ, but k-means on either takes one image of each of the 8 prototypes
    for feats in (fp32, bf16):
        assert sorted(images.labels[strategies.kmeans_select(feats, 8, seed=0).indices]) == list(range(8))


def test_cache_from_another_precision_is_recomputed(tmp_path, capsys):
    root = write_cifar(tmp_path / "cifar", n_train=16, n_test=4)

    def run(*extra):
        return call_main(sampler.main, [root, "--dataset", "cifar10", "--arch", "resnet18", "--backbone", "random",
                                        "--save", tmp_path / "out", "--indices", tmp_path / "idx", "--splits", "2",
                                        "--name", "kmeans", "-j", "0", "-b", "8", "--load_cache", *extra], capsys)
    assert run("--precision", "fp32")[0] == 0
    status, out, _ = run("--precision", "bf16")
    assert status == 0 and "does not match this run (precision)" in out
    status, out, _ = run("--precision", "bf16")
    assert status == 0 and "from cache" in out
    meta = features.cache_meta(sampler.build_parser().parse_args([str(root), "--dataset", "cifar10"]), "train",
                               "random0", datasets.load_images("cifar10", str(root), "train"), "fp32")
    assert meta["precision"] == "fp32"


@pytest.mark.slow  # starts a Python
def test_gpu_check_skips_cleanly_without_cuda():
    done = subprocess.run([sys.executable, "tools/gpu_check.py"], cwd=REPO, capture_output=True, text=True,
                          env={"CUDA_VISIBLE_DEVICES": "", "PATH": "/usr/bin:/bin"}, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == ["gpu_check: no CUDA device: skipped"]
