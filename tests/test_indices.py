"""Index files: atomic writes with a sidecar, and a reader that validates before use."""
import json
import os

import numpy as np
import pytest

from lowbudget.cli import UsageError
from lowbudget.indices import index_path, read_indices, sidecar_path, write_indices


def test_round_trip_with_sidecar(tmp_path):
    path = index_path(str(tmp_path), "kmeans", "cifar10", 3)
    assert path.endswith("kmeans_cifar10_3.npy")
    write_indices(path, np.array([5, 1, 9], dtype=np.int32), {"strategy": "kmeans", "seed": 4})
    stored = np.load(path)
    assert stored.dtype == np.int64 and stored.tolist() == [5, 1, 9]
    meta = json.loads(open(sidecar_path(path)).read())
    assert meta["strategy"] == "kmeans" and meta["seed"] == 4 and meta["size"] == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["kmeans_cifar10_3.json", "kmeans_cifar10_3.npy"]
    assert read_indices(path, 10).tolist() == [5, 1, 9]


def test_writer_refuses_duplicates(tmp_path):
    with pytest.raises(ValueError):
        write_indices(str(tmp_path / "x_cifar10_2.npy"), np.array([1, 1]), {})
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("array,message", [
    (np.array([0, 10]), "outside \\[0, 10\\)"),
    (np.array([-1, 2]), "outside"),
    (np.array([3, 3, 4]), "1 duplicate"),
    (np.array([0.0, 1.0]), "1-D integer"),
    (np.zeros((2, 2), dtype=np.int64), "1-D integer"),
])
def test_reader_validates(tmp_path, array, message):
    path = tmp_path / "bad.npy"
    np.save(path, array)
    with pytest.raises(UsageError, match=message):
        read_indices(str(path), 10)


def test_reader_lists_existing_files_of_the_dataset(tmp_path):
    np.save(tmp_path / "random_cifar10_10.npy", np.arange(10))
    with pytest.raises(UsageError, match="no index file .*found: random_cifar10_10.npy"):
        read_indices(str(tmp_path / "kmeans_cifar10_10.npy"), 100, flag="--splits", dataset="cifar10")


def test_reader_rejects_garbage(tmp_path):
    path = tmp_path / "garbage.npy"
    path.write_bytes(b"not an npy file")
    with pytest.raises(UsageError, match="cannot read index file"):
        read_indices(str(path), 10)


def test_written_files_get_the_usual_permissions(tmp_path):
    mask = os.umask(0o022)
    try:
        write_indices(str(tmp_path / "a.npy"), np.arange(3), {})
    finally:
        os.umask(mask)
    assert (tmp_path / "a.npy").stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "a.json").stat().st_mode & 0o777 == 0o644
