"""Index files: atomic writes with a sidecar (both or neither, strict JSON, stale temporary files removed), and
a reader that validates before use, the sidecar included; file digests."""
import hashlib
import json
import os
import subprocess
import time

import numpy as np
import pytest

from lowbudget import fileio
from lowbudget.cli import UsageError
from lowbudget.indices import index_path, pool_digest, read_indices, sidecar_path, write_indices


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


def read_json_strictly(path):
    """json.load that refuses NaN and infinities, as parsers other than Python's do."""
    def refuse(name):
        raise ValueError(f"not JSON: {name}")
    with open(path) as f:
        return json.load(f, parse_constant=refuse)


def test_nan_in_a_sidecar_is_written_as_null(tmp_path):
    path = str(tmp_path / "p_cifar10_2.npy")
    write_indices(path, np.arange(2), {"params": {"delta": float("nan"), "bandwidth": np.float32("inf"),
                                                  "knn": np.int64(5)}})
    params = read_json_strictly(sidecar_path(path))["params"]
    assert params == {"delta": None, "bandwidth": None, "knn": 5}


def test_the_sidecar_records_the_entries_digest_and_readers_check_it(tmp_path):
    path = str(tmp_path / "kmeans_cifar10_3.npy")
    write_indices(path, np.array([4, 2, 7]), {"dataset": "cifar10", "digest": "forged", "size": 99})
    meta = json.loads(open(sidecar_path(path)).read())
    assert meta["digest"] == pool_digest(np.array([4, 2, 7])) and meta["size"] == 3  # never taken from meta
    assert pool_digest(np.array([4, 2, 7], dtype=np.int32)) == meta["digest"] != pool_digest(np.array([2, 4, 7]))
    np.save(path, np.array([7, 2, 4]))  # the same entries in another order: another file
    with pytest.raises(UsageError, match="replaced after it was written.*entries are not those"):
        read_indices(path, 10)
    np.save(path, np.array([4, 2]))
    with pytest.raises(UsageError, match="holds 2 entries, the sidecar .* says 3"):
        read_indices(path, 10)


def test_reader_checks_the_dataset_and_the_size_in_the_name(tmp_path):
    path = str(tmp_path / "kmeans_cifar100_3.npy")
    write_indices(path, np.array([4, 2, 7]), {"dataset": "cifar100"})
    assert read_indices(path, 10, dataset="cifar100", size=3).tolist() == [4, 2, 7]
    with pytest.raises(UsageError, match="--resume-indices: .* was selected from cifar100, not --dataset cifar10"):
        read_indices(path, 10, dataset="cifar10")
    with pytest.raises(UsageError, match="holds 3 indices, its name says 4"):
        read_indices(path, 10, size=4)
    (tmp_path / "kmeans_cifar100_3.json").write_text("{not json")
    with pytest.raises(UsageError, match="cannot read the sidecar"):
        read_indices(path, 10)


def test_a_failed_sidecar_write_leaves_the_previous_pair(tmp_path, monkeypatch):
    path = str(tmp_path / "random_cifar10_3.npy")
    write_indices(path, np.array([1, 2, 3]), {"seed": 0})
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    with pytest.raises(TypeError):  # a value JSON cannot hold: nothing is touched
        write_indices(path, np.array([4, 5, 6]), {"seed": object()})
    real, calls = fileio._write_temporary, []

    def disk_full_at_the_sidecar(target, write):
        calls.append(target)
        if target.endswith(".json"):
            raise OSError(28, "No space left on device")
        return real(target, write)
    monkeypatch.setattr(fileio, "_write_temporary", disk_full_at_the_sidecar)
    with pytest.raises(OSError, match="No space left"):
        write_indices(path, np.array([4, 5, 6]), {"seed": 1})
    assert calls == [path, sidecar_path(path)]
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before  # old pair, no temporary file
    assert read_indices(path, 10).tolist() == [1, 2, 3]


def test_a_folder_where_the_sidecar_goes_leaves_the_previous_pair(tmp_path):
    path = str(tmp_path / "random_cifar10_3.npy")
    write_indices(path, np.array([1, 2, 3]), {"seed": 0})
    os.remove(sidecar_path(path))
    os.mkdir(sidecar_path(path))  # no rename can replace it: refused before the index file is replaced
    with pytest.raises(IsADirectoryError):
        write_indices(path, np.array([4, 5, 6]), {"seed": 1})
    assert np.load(path).tolist() == [1, 2, 3] and sorted(p.name for p in tmp_path.iterdir()) == [
        "random_cifar10_3.json", "random_cifar10_3.npy"]


def dead_pid() -> int:
    child = subprocess.Popen(["true"])  # any process that ends; a Python would take a second to start
    child.wait()
    return child.pid


def test_stale_temporary_files_of_the_target_are_removed_by_its_next_write(tmp_path):
    host, target = fileio._host_tag(), "kmeans_cifar10_3.npy"
    names = {
        "dead": f".tmp-{host}-{dead_pid()}-abcdefgh-{target}",  # a killed write on this host
        "old": f".tmp-x1y2z3w4{target}",  # the former naming, untouched for two days
        "running": f".tmp-{host}-{os.getpid()}-abcdefgh-{target}",  # a write in progress
        "other host": f".tmp-0123abcd-{dead_pid()}-abcdefgh-{target}",  # may still run there
        "other target": f".tmp-{host}-{dead_pid()}-abcdefgh-random_cifar10_3.npy",
    }
    for name in names.values():
        (tmp_path / name).write_bytes(b"partial")
    two_days_ago = time.time() - 2 * 86400
    os.utime(tmp_path / names["old"], (two_days_ago, two_days_ago))
    write_indices(str(tmp_path / target), np.arange(3), {})
    left = {p.name for p in tmp_path.iterdir()}
    assert names["dead"] not in left and names["old"] not in left
    assert {names["running"], names["other host"], names["other target"], target, "kmeans_cifar10_3.json"} == left


def test_a_file_is_hashed_once_per_version(tmp_path, monkeypatch):
    path = tmp_path / "feats.npy"
    fileio.atomic_write_bytes(str(path), b"first version")
    opened = []
    real_open = open
    monkeypatch.setattr("builtins.open", lambda p, *a, **k: (opened.append(str(p)), real_open(p, *a, **k))[1])
    first = fileio.file_digest(str(path))
    assert fileio.file_digest(str(path)) == first and opened.count(str(path)) == 1  # the same version: not read again
    fileio.atomic_write_bytes(str(path), b"second version")  # a rewrite: another inode and modification time
    assert fileio.file_digest(str(path)) == hashlib.sha256(b"second version").hexdigest()[:10] != first
    assert opened.count(str(path)) == 2
