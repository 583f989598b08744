"""The GPU branches cannot run here, so the choice itself is tested: GPUs reported -> GPU calls made;
none reported -> CUDA and the faiss GPU cloner are never touched."""
import faiss
import numpy as np
import pytest
import torch

import sampler
import strategies
from lowbudget import faiss_ops
from lowbudget.runtime import faiss_uses_gpu, resolve_device
from tests.helpers import call_main, unit_rows


@pytest.fixture
def fake_gpus(monkeypatch):
    """CUDA and two faiss GPUs reported; the cloner records its calls and keeps the index on CPU."""
    calls = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(faiss, "get_num_gpus", lambda: 2)

    def clone_to_all_gpus(index, co=None, ngpu=-1):
        calls.append(("clone", co.shard if co is not None else None))
        return index
    class ClonerOptions:
        shard = False
    monkeypatch.setattr(faiss, "index_cpu_to_all_gpus", clone_to_all_gpus, raising=False)
    monkeypatch.setattr(faiss, "GpuMultipleClonerOptions", ClonerOptions, raising=False)
    return calls


@pytest.fixture
def no_gpus(monkeypatch):
    """No GPU anywhere; any attempt to use one fails the test."""
    def forbidden(*args, **kwargs):
        raise AssertionError("GPU code path taken without a GPU")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(faiss, "get_num_gpus", lambda: 0)
    monkeypatch.setattr(faiss, "index_cpu_to_all_gpus", forbidden, raising=False)
    monkeypatch.setattr(torch.Tensor, "cuda", forbidden)
    monkeypatch.setattr(torch.nn.Module, "cuda", forbidden)


def test_auto_device_and_faiss_choice_with_gpus(fake_gpus):
    device = resolve_device("auto")
    assert device.type == "cuda" and faiss_uses_gpu(device)
    assert not faiss_uses_gpu(resolve_device("cpu"))


def test_auto_device_without_gpus(no_gpus):
    device = resolve_device("auto")
    assert device.type == "cpu" and not faiss_uses_gpu(device)


def test_flat_search_clones_to_all_gpus_sharded(fake_gpus):
    base = unit_rows(50, 8)
    dist, idx = faiss_ops.flat_search(base, base[:5], 1, gpu=True)
    assert fake_gpus == [("clone", True)] and idx[:, 0].tolist() == [0, 1, 2, 3, 4]


def test_kmeans_asks_faiss_for_gpus(fake_gpus, monkeypatch):
    seen = {}
    real_kmeans = faiss.Kmeans

    class RecordingKmeans(real_kmeans):
        def __init__(self, d, k, **kwargs):
            seen.update(kwargs)
            super().__init__(d, k, **{**kwargs, "gpu": False})
    monkeypatch.setattr(faiss, "Kmeans", RecordingKmeans)
    selection = strategies.kmeans_select(unit_rows(200, 8), 10, seed=2, gpu=True)
    assert seen["gpu"] is True and seen["seed"] == faiss_ops.FAISS_SEED_OFFSET + 2
    assert seen["max_points_per_centroid"] == 40 and seen["niter"] == 20 and seen["nredo"] == 5
    assert fake_gpus == [("clone", True)]  # the assignment search runs on the GPUs too
    assert len(np.unique(selection.indices)) == 10


def test_coreset_moves_features_to_the_device(monkeypatch):
    moved = []
    real_to = torch.Tensor.to

    def record_to(self, *args, **kwargs):
        moved.append(str(args[0]) if args else str(kwargs.get("device")))
        return real_to(self, "cpu")
    monkeypatch.setattr(torch.Tensor, "to", record_to)
    feats = unit_rows(60, 4)
    on_gpu = strategies.coreset_select(feats, np.arange(3), 5, device="cuda", progress=False)
    assert "cuda" in moved
    assert np.array_equal(on_gpu.indices, strategies.coreset_select(feats, np.arange(3), 5, progress=False).indices)


@pytest.mark.parametrize("name", ["kmeans", "coreset"])
def test_sampler_never_touches_cuda_without_gpus(tmp_path, cifar10_root, capsys, no_gpus, name):
    status, _, err = call_main(sampler.main, [cifar10_root, "--dataset", "cifar10", "--arch", "resnet18",
                                              "--backbone", "random", "--name", name, "--splits", "5",
                                              "--device", "auto", "-j", "0", "--indices", tmp_path / "idx",
                                              "--save", tmp_path / "out"], capsys)
    assert status == 0, err
