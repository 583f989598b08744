"""torchrun on CPU (gloo, two processes) gives what one process gives: features and index files, a
linear head, a trained network; rank 0 alone writes; errors stop every process; the CUDA choices."""
import json
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DistributedSampler, default_collate

import eval_lincls
import sampler
import trainer_DP
from lowbudget import datasets, distributed, engine, runtime
from tests.helpers import call_main, torchrun, write_cifar, write_photo_folder


@pytest.fixture
def photos(tmp_path):
    """An unlabelled folder with an unreadable file in each process's block (the first and the last)."""
    root = tmp_path / "photos"
    write_photo_folder(root)
    (root / "zz_broken.jpg").write_bytes(b"not an image")
    return root


@pytest.fixture
def cifar(tmp_path):
    """CIFAR-10 with odd-sized splits (the processes' blocks differ in length) and a 40-image pool."""
    root = write_cifar(tmp_path / "cifar", n_train=201, n_test=51)
    (tmp_path / "idx").mkdir()
    np.save(tmp_path / "idx" / "random_cifar10_40.npy", np.random.default_rng(1).permutation(201)[:40])
    return root


def backbone_flags(*extra):
    return ["--arch", "resnet18", "--backbone", "random", "--image-size", "16", "-j", "0", "-b", "8", *extra]


@pytest.mark.slow
def test_sampler_features_and_index_files_equal_one_process(tmp_path, photos, capsys):
    flags = [photos, "--dataset", "folder", "--unlabeled", "--name", "kmeans", "--splits", "5,10",
             *backbone_flags()]
    status, _, err = call_main(sampler.main, [*flags, "--indices", tmp_path / "i1", "--save", tmp_path / "o1"], capsys)
    assert status == 0, err
    run = torchrun("sampler.py", *flags, "--indices", tmp_path / "i2", "--save", tmp_path / "o2")
    assert run.returncode == 0, run.stderr
    for name in ("kmeans_folder_5.npy", "kmeans_folder_10.npy"):
        assert np.array_equal(np.load(tmp_path / "i1" / name), np.load(tmp_path / "i2" / name))
    [cache] = os.listdir(tmp_path / "o1")
    with np.load(tmp_path / "o1" / cache) as one, np.load(tmp_path / "o2" / cache) as two:
        assert np.allclose(one["feats"], two["feats"], atol=1e-6) and str(one["meta"]) == str(two["meta"])
        assert one["skipped"].tolist() == two["skipped"].tolist() == [0, 30]
    assert run.stdout.count("skipped unreadable image") == 2 and run.stdout.count("=> saved") == 2  # rank 0 prints


@pytest.mark.slow
def test_linear_head_equals_one_process_and_rank0_alone_writes(tmp_path, cifar, capsys):
    flags = [cifar, "--dataset", "cifar10", "--name", "random", "--splits", "40", "--epochs", "2",
             "--indices", tmp_path / "idx", *backbone_flags("-b", "40")]  # one step per epoch on the whole pool
    status, _, err = call_main(eval_lincls.main, [*flags, "--save", tmp_path / "o1"], capsys)
    assert status == 0, err
    run = torchrun("eval_lincls.py", *flags, "--save", tmp_path / "o2")
    assert run.returncode == 0, run.stderr
    one, two = (torch.load(tmp_path / out / "lincls_random_cifar10_40_images_seed0.pth", weights_only=True)["model"]
                for out in ("o1", "o2"))
    torch.manual_seed(0)
    initial = engine.linear_head(512, 10).state_dict()
    # within 1% of one Adam step (lr 0.01): the processes' threads sum in another order than the test's
    assert one.keys() == two.keys() and all(torch.allclose(one[k], two[k], atol=1e-4) for k in one)
    assert (one["1.weight"] - initial["1.weight"]).abs().max() > 0.01  # and it trained
    rows = [[json.loads(line) for line in (tmp_path / out / "results.jsonl").read_text().splitlines()]
            for out in ("o1", "o2")]
    assert [r["metric"] for r in rows[0]] == [r["metric"] for r in rows[1]] and len(rows[1]) == 5


@pytest.mark.slow
def test_trainer_steps_average_the_processes_gradients(tmp_path, cifar):
    """An epoch of two SGD steps of 20 images equals one taken here: each step from 10 images of each
    process's DistributedSampler half, each 10 through BatchNorm alone (as with DataParallel), the
    gradients averaged, rank 0's BatchNorm statistics kept (DDP broadcasts them before each step)."""
    run = torchrun("trainer_DP.py", cifar, "--dataset", "cifar10", "--arch", "resnet18", "--cifar-stem", "--image-size",
                   "16", "-j", "0", "-b", "20", "--name", "random", "--splits", "40", "--epochs", "1", "--lr", "0.02",
                   "--indices", tmp_path / "idx", "--save", tmp_path / "out")
    assert run.returncode == 0, run.stderr
    trained = torch.load(tmp_path / "out" / "trainer_DP_random_cifar10_40_seed0.pth", weights_only=True)["model"]

    pool = np.load(tmp_path / "idx" / "random_cifar10_40.npy")
    items = engine.SeededItems(datasets.AugmentedSubset(datasets.load_images("cifar10", str(cifar), "train"), pool,
                                                        "cifar10", 16))
    items.epoch_seed = engine.epoch_seed(0, 0)
    halves = []
    for rank in (0, 1):
        half = DistributedSampler(items, num_replicas=2, rank=rank, seed=0)
        half.set_epoch(items.epoch_seed)
        halves.append(list(half))
    torch.manual_seed(0)
    model = trainer_DP.build_model("resnet18", 10, cifar_stem=True).train()
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    optimizer = torch.optim.SGD(model.parameters(), 0.02, momentum=0.9, weight_decay=1e-4)
    for step in range(2):
        rank0_buffers = [b.clone() for b in model.buffers()]
        optimizer.zero_grad()
        for rank in (1, 0):  # rank 0 last: its statistics stay
            for buffer, saved in zip(model.buffers(), rank0_buffers, strict=True):
                buffer.copy_(saved)
            x, y = default_collate([items[i] for i in halves[rank][10 * step:10 * step + 10]])
            (F.cross_entropy(model(x), y) / 2).backward()
        optimizer.step()
    expected = model.state_dict()
    assert all(torch.allclose(trained[k].float(), expected[k].float(), atol=1e-5) for k in expected)
    assert not torch.allclose(trained["fc.weight"], initial["fc.weight"])


@pytest.mark.slow
def test_an_error_in_one_process_stops_all_with_one_line(tmp_path, photos):
    (photos / "broken.jpg").unlink()  # only the second process's block has an unreadable file
    run = torchrun("sampler.py", photos, "--dataset", "folder", "--unlabeled", "--name", "kmeans", "--splits", "5",
                   "--strict", *backbone_flags(), "--indices", tmp_path / "idx", "--save", tmp_path / "out")
    assert run.returncode != 0
    errors = [line for line in run.stderr.splitlines() if line.startswith("sampler.py: error:")]
    # each process stops with that line, unless torchrun ended it first because the other one had
    assert errors and all("data: cannot read image" in e and "zz_broken.jpg" in e for e in errors)
    assert "[rank" not in run.stderr  # no process's traceback
    assert not (tmp_path / "idx").exists() and not (tmp_path / "out").exists()


@pytest.mark.parametrize("rank", ["0", "1"])
def test_samplers_without_backbone_start_no_process_group(tmp_path, cifar, capsys, monkeypatch, rank):
    """Under torchrun (no rendezvous address here: joining a group would fail) rank 0 writes, the others stop."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", rank)
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    status, _, err = call_main(sampler.main, [cifar, "--dataset", "cifar10", "--name", "uniform", "--splits", "20",
                                              "--indices", tmp_path / "i", "--save", tmp_path / "o"], capsys)
    assert status == 0, err
    assert not torch.distributed.is_initialized()
    assert (tmp_path / "i" / "uniform_cifar10_20.npy").exists() == (rank == "0")


def test_cuda_takes_the_local_rank_gpu_and_nccl(monkeypatch):
    calls = []
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: calls.append(("set_device", str(device))))
    monkeypatch.setattr(torch.distributed, "init_process_group", lambda backend: calls.append(("init", backend)))
    assert str(distributed.init_from_env(torch.device("cuda"))) == "cuda:1"
    assert calls == [("set_device", "cuda:1"), ("init", "cpu:gloo,cuda:nccl")]

    monkeypatch.setattr(distributed, "active", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.nn.Module, "to", lambda self, device: self)
    assert isinstance(runtime.on_device(torch.nn.Linear(2, 2), torch.device("cuda", 1)), torch.nn.Linear)  # no DP
    monkeypatch.setattr(distributed, "DistributedDataParallel", lambda model, device_ids: device_ids)
    assert distributed.ddp(torch.nn.Linear(2, 2), torch.device("cuda", 1)) == [1]
    assert distributed.ddp(torch.nn.Linear(2, 2), torch.device("cpu")) is None
