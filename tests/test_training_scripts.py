"""finetune.py and trainer_DP.py: learning, resume equality, checkpoint formats, bad input."""
import json
import pickle

import numpy as np
import pytest
import torch

import finetune
import trainer_DP
from tests.helpers import call_main


@pytest.fixture
def colour_cifar(tmp_path):
    """CIFAR-10 batches whose class sets the image's colour: learnable in a few epochs."""
    rng = np.random.default_rng(0)
    folder = tmp_path / "cifar" / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    palette = rng.integers(0, 256, (10, 3))

    def batch(n):
        labels = rng.integers(0, 10, n)
        images = np.clip(palette[labels][:, :, None] + rng.normal(0, 10, (n, 3, 1024)), 0, 255).astype(np.uint8)
        return {b"data": images.reshape(n, 3072), b"labels": labels.tolist()}
    for i in range(1, 6):
        (folder / f"data_batch_{i}").write_bytes(pickle.dumps(batch(40)))
    (folder / "test_batch").write_bytes(pickle.dumps(batch(40)))
    (tmp_path / "idx").mkdir()
    np.save(tmp_path / "idx" / "random_cifar10_40.npy", np.random.default_rng(1).permutation(200)[:40])
    return tmp_path / "cifar"


def common(tmp_path, root, *extra):
    return [root, "--dataset", "cifar10", "--arch", "resnet18", "-j", "0", "-b", "8", "--name", "random",
            "--image-size", "16", "--splits", "40", "--indices", tmp_path / "idx", "--save", tmp_path / "out", *extra]


SCRIPTS = {
    "trainer_DP": (trainer_DP, ["--cifar-stem", "--lr", "0.02", "--lr_schedule", "3", "-b", "20"]),
    "finetune": (finetune, ["--backbone", "random", "--lr", "0.001", "--lr-lin", "0.05", "-p", "2"]),
}


def losses(out):
    return [float(line.split("Loss ")[1]) for line in out.splitlines() if line.startswith("Epoch: [")]


def latest(tmp_path, script):
    return torch.load(tmp_path / "out" / f"{script}_random_cifar10_40_seed0.pth", weights_only=True)


@pytest.mark.slow
@pytest.mark.parametrize("script", SCRIPTS)
def test_loss_falls_and_results_are_written(tmp_path, colour_cifar, capsys, script):
    module, flags = SCRIPTS[script]
    status, out, err = call_main(module.main, common(tmp_path, colour_cifar, *flags, "--epochs", "4"), capsys)
    assert status == 0, err
    curve = losses(out)
    assert len(curve) == 4 and np.mean(curve[-2:]) < 0.8 * curve[0], curve
    assert "Final accuracy of 40 labeled data is:" in out
    rows = [json.loads(line) for line in (tmp_path / "out" / "results.jsonl").read_text().splitlines()]
    assert {r["metric"] for r in rows} == {f"{script}_{m}" for m in ("top1", "top1_best", "top5", "class_mean")}
    best = torch.load(tmp_path / "out" / f"{script}_random_cifar10_40_seed0_best.pth", weights_only=True)
    assert best["top1"] == max(r["value"] for r in rows if r["metric"] == f"{script}_top1_best")
    assert best["epoch"] <= latest(tmp_path, script)["epoch"] == 4


@pytest.mark.slow
@pytest.mark.parametrize("script", SCRIPTS)
def test_resume_equals_uninterrupted_and_accepts_module_keys(tmp_path, colour_cifar, capsys, monkeypatch, script):
    from lowbudget import engine
    module, flags = SCRIPTS[script]
    args = common(tmp_path, colour_cifar, *flags, "--epochs", "3")
    assert call_main(module.main, args, capsys)[0] == 0
    straight = latest(tmp_path, script)

    real, calls = engine.train_epoch, {"n": 0}

    def stop_after_one(*a, **k):
        if calls["n"] == 1:
            raise KeyboardInterrupt
        calls["n"] += 1
        return real(*a, **k)
    with monkeypatch.context() as patch:
        patch.setattr(engine, "train_epoch", stop_after_one)
        with pytest.raises(KeyboardInterrupt):
            call_main(module.main, args, capsys)
    path = tmp_path / "out" / f"{script}_random_cifar10_40_seed0.pth"
    saved = torch.load(path, weights_only=True)
    assert saved["epoch"] == 1
    saved["model"] = {"module." + k: v for k, v in saved["model"].items()}  # as DataParallel writes them
    torch.save(saved, path)
    status, out, err = call_main(module.main, args + ["--resume", path], capsys)
    assert status == 0, err
    resumed = latest(tmp_path, script)
    assert resumed["epoch"] == 3 and resumed["scheduler"] == straight["scheduler"]
    for key, value in straight["model"].items():
        assert torch.equal(resumed["model"][key], value), key


@pytest.mark.parametrize("script", SCRIPTS)
def test_missing_index_file_stops_before_training(tmp_path, colour_cifar, capsys, script):
    module, flags = SCRIPTS[script]
    args = common(tmp_path, colour_cifar, *flags, "--epochs", "1")
    args[args.index("40")] = "40,80"
    status, out, err = call_main(module.main, args, capsys)
    assert status == 2 and "random_cifar10_80.npy" in err and "found: random_cifar10_40.npy" in err
    assert "Epoch" not in out and not (tmp_path / "out").exists()


@pytest.mark.parametrize("extra,pattern", [
    (["--arch", "mobilenet_v2", "--cifar-stem"], "--cifar-stem: only for ResNets"),
    (["--arch", "resnet_x"], "--arch: unknown"),
    (["--lr_schedule", "a,b"], "--lr_schedule"),
])
def test_trainer_bad_input(tmp_path, colour_cifar, capsys, extra, pattern):
    status, _, err = call_main(trainer_DP.main, common(tmp_path, colour_cifar, "--epochs", "1", *extra), capsys)
    assert status == 2 and pattern in err and len(err.strip().splitlines()) == 1


def test_finetune_needs_backbone_weights(tmp_path, colour_cifar, capsys):
    status, _, err = call_main(finetune.main, common(tmp_path, colour_cifar, "--weights", tmp_path / "no.pth"), capsys)
    assert status == 2 and "--weights: no checkpoint found" in err
