"""NaN and infinity never pass: a backbone whose output holds them caches nothing, a cache or a --feats file
holding them is never used, and a training run whose loss or weights turn non-finite stops in one line
without a result."""
import re
import warnings

import numpy as np
import pytest
import torch

import finetune
import sampler
from lowbudget import engine, vaal
from lowbudget.cli import UsageError
from lowbudget.feature_files import read_feats_file
from tests.helpers import call_main, compress_checkpoint, resnet_backbone_state, unit_rows, write_cifar

ONE_ERROR_LINE = r"\S+: error: {}[^\n]*\n"


def nan_checkpoint(path):
    """A CompRess checkpoint of a resnet18 whose every floating-point weight is NaN."""
    state = {k: torch.full_like(v, float("nan")) if v.is_floating_point() else v
             for k, v in resnet_backbone_state("resnet18").items()}
    torch.save(compress_checkpoint(state, head_dim=None), path)
    return path


def kmeans(tmp_path, root, capsys, *extra):
    return call_main(sampler.main, [root, "--dataset", "cifar10", "--arch", "resnet18", "--save", tmp_path / "out",
                                    "--indices", tmp_path / "idx", "--splits", "4", "--name", "kmeans", "-j", "0",
                                    "-b", "8", "--image-size", "16", *extra], capsys)


# ---------------------------------------------------------------- features

def test_backbone_giving_nan_stops_before_anything_is_cached(tmp_path, capsys):
    root = write_cifar(tmp_path / "cifar", n_train=24, n_test=4)
    status, _, err = kmeans(tmp_path, root, capsys, "--weights", nan_checkpoint(tmp_path / "nan.pth"))
    assert status == 2
    assert re.fullmatch(ONE_ERROR_LINE.format("--weights: the backbone's features are NaN or infinite"), err), err
    assert not list(tmp_path.glob("out/feats_*")) and not list(tmp_path.glob("idx/*.npy"))


def test_cache_holding_nan_from_an_older_version_is_recomputed(tmp_path, capsys):
    root = write_cifar(tmp_path / "cifar", n_train=24, n_test=4)
    assert kmeans(tmp_path, root, capsys, "--backbone", "random")[0] == 0
    (path,) = (tmp_path / "out").glob("feats_*.npz")
    with np.load(path) as data:
        arrays = {name: data[name] for name in ("feats", "labels", "skipped", "meta")}
    arrays["feats"][0] = np.nan  # as an older version cached a backbone's NaN output: no digest
    np.savez(path, **arrays)

    status, out, err = kmeans(tmp_path, root, capsys, "--backbone", "random", "--load_cache")
    assert status == 0, err
    assert f"cache {path} holds NaN or infinite features; recomputing" in out and "from cache" not in out
    with np.load(path) as data:
        assert np.isfinite(data["feats"]).all() and "digest" in data.files


def test_huge_finite_rows_are_normalised_not_zeroed(tmp_path):
    feats = unit_rows(20, 8)
    feats[3] *= np.float32(1e30)  # its squares overflow float32
    np.save(tmp_path / "f.npy", feats)
    rows = read_feats_file(str(tmp_path / "f.npy"), "cifar10").feats
    np.testing.assert_allclose(rows[3], feats[3] / np.float32(1e30), rtol=1e-6)


def test_float64_values_beyond_float32_are_one_error_without_a_warning(tmp_path):
    np.save(tmp_path / "f.npy", np.full((20, 8), 1e300))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(UsageError, match=r"^--feats: .* contains NaN or infinite values$"):
            read_feats_file(str(tmp_path / "f.npy"), "cifar10")


# ---------------------------------------------------------------- training

def test_finetune_from_nan_weights_stops_without_a_result_or_checkpoint(tmp_path, capsys):
    root = write_cifar(tmp_path / "cifar", n_train=24, n_test=8)
    (tmp_path / "idx").mkdir()
    np.save(tmp_path / "idx" / "random_cifar10_8.npy", np.arange(8))
    argv = [root, "--dataset", "cifar10", "--arch", "resnet18", "--weights", nan_checkpoint(tmp_path / "nan.pth"),
            "-j", "0", "-b", "8", "--image-size", "16", "--name", "random", "--splits", "8", "--epochs", "2",
            "--indices", tmp_path / "idx", "--save", tmp_path / "out"]
    status, _, err = call_main(finetune.main, argv, capsys)
    assert status == 2
    assert re.fullmatch(ONE_ERROR_LINE.format("training diverged in epoch 0: the loss is nan;"), err), err
    assert not list(tmp_path.glob("out/*.pth")) and not (tmp_path / "out" / "results.jsonl").exists()


class PoisonedSGD(torch.optim.SGD):
    """SGD whose steps of one epoch leave NaN in the weights (the loss of that epoch's batch stays finite)."""

    def __init__(self, params, poisoned_epoch: int):
        super().__init__(params, lr=0.1)
        self.steps, self.poisoned_epoch = 0, poisoned_epoch

    def step(self, closure=None):
        super().step(closure)
        self.steps += 1
        if self.steps - 1 == self.poisoned_epoch:  # one batch an epoch
            for group in self.param_groups:
                for p in group["params"]:
                    p.data.fill_(float("nan"))


@pytest.mark.parametrize("poison", ["loss", "weights"])
def test_fit_stops_at_the_diverging_epoch_and_keeps_the_last_finite_checkpoint(tmp_path, poison):
    torch.manual_seed(0)
    x, y = torch.randn(16, 4), torch.arange(16) % 2
    head = engine.linear_head(4, 2)
    diverges = engine.epoch_seed(0, 1)

    def batches(seed):  # inf inputs: Normalize gives NaN, so the loss is NaN
        return [(x * float("inf") if poison == "loss" and seed == diverges else x, y)]
    optimizer = PoisonedSGD(head.parameters(), poisoned_epoch=1 if poison == "weights" else -1)
    checkpoint = str(tmp_path / "head.pth")
    what = "the loss is nan" if poison == "loss" else "the weights are NaN or infinite"
    with pytest.raises(UsageError, match=rf"^training diverged in epoch 1: {what};"):
        engine.fit(head, optimizer, epoch_batches=batches, schedule=engine.Schedule(3, 0.1, [], 1),
                   validate=lambda: {"top1": 50.0, "top5": 100.0, "class_mean": 50.0}, device=torch.device("cpu"),
                   seed=0, checkpoint=checkpoint)
    for path in (checkpoint, engine.best_path(checkpoint)):  # both from epoch 0, the last finite one
        saved = torch.load(path, weights_only=True)
        assert saved["epoch"] == 1 and all(torch.isfinite(w).all() for w in saved["model"].values())


def test_vaal_whose_networks_diverge_selects_nothing():
    settings = vaal.VaalSettings(lr=1e30, epochs=2, batch_size=16, latent_dim=4)
    with pytest.raises(UsageError, match=r"^training diverged in epoch 0: "):
        vaal.vaal_select(vaal.FeatureSource(unit_rows(64, 8)), np.arange(8), 4, settings, seed=0,
                         device=torch.device("cpu"))

