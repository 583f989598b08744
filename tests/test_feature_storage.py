"""float16 features and memory-mapped feature files: the cache records its dtype, stored arrays are mapped
instead of loaded, and nothing but the one array that is needed is ever made."""
import io
import json
import mmap
import tracemalloc
import zipfile

import numpy as np
import pytest
import torch

import active_sampler
import eval_lincls
import sampler
from lowbudget import feature_files, features
from lowbudget.cli import UsageError
from lowbudget.feature_files import read_feats_file, stored_npz_member
from lowbudget.features import read_cache, write_cache
from lowbudget.indices import read_indices, read_sidecar
from tests.helpers import args_for, call_main, write_cifar, write_feats

META = {"version": features.CACHE_VERSION, "dataset": "cifar10", "split": "train", "num_images": 300}


def unit_rows(n: int, dim: int, seed: int = 0) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((n, dim), dtype=np.float32)
    x /= np.sqrt(np.einsum("ij,ij->i", x, x))[:, None]
    return x


def is_file_map(array: np.ndarray) -> bool:
    """Whether `array` is a memory map of a file, not memory of its own."""
    return isinstance(array, np.memmap) and isinstance(array.base, mmap.mmap)


def cached(tmp_path, feats: np.ndarray) -> str:
    path = str(tmp_path / "feats.npz")
    write_cache(path, feats, np.arange(len(feats)) % 3, np.zeros(0, np.int64), META)
    return path


# ---------------------------------------------------------------- the cache

def test_float16_cache_is_read_back_as_a_float16_memory_map(tmp_path):
    feats = unit_rows(300, 32)
    path = cached(tmp_path, feats.astype(np.float16))
    with np.load(path) as data:
        assert json.loads(str(data["meta"]))["dtype"] == "float16" and data["feats"].dtype == np.float16
    back, labels, skipped = read_cache(path, META, dtype="float16")
    assert is_file_map(back) and back.dtype == np.float16 and back.filename == str(tmp_path / "feats.npz")
    np.testing.assert_allclose(back.astype(np.float32), feats, atol=1e-3)
    assert labels.tolist() == (np.arange(300) % 3).tolist() and len(skipped) == 0


def test_float32_cache_is_rounded_for_a_float16_run_and_float16_never_widened(tmp_path, capsys):
    feats = unit_rows(300, 32)
    path = cached(tmp_path, feats)
    back, _, _ = read_cache(path, META, dtype="float32")
    assert is_file_map(back) and np.array_equal(back, feats)
    rounded, _, _ = read_cache(path, META, dtype="float16")
    assert f"cache {path} holds float32 features: rounding them to float16 (--feats-dtype)" in capsys.readouterr().out
    assert rounded.dtype == np.float16 and not isinstance(rounded, np.memmap)
    assert np.array_equal(rounded, feats.astype(np.float16))  # what extracting them again would store

    path = cached(tmp_path, feats.astype(np.float16))
    assert read_cache(path, META, dtype="float32") is None
    assert f"cache {path} holds float16 features, this run asks for float32 (--feats-dtype); recomputing" \
        in capsys.readouterr().out


def test_cache_without_a_dtype_holds_float32_and_one_that_lies_is_unreadable(tmp_path, capsys):
    feats = unit_rows(300, 8)
    old = tmp_path / "old.npz"  # written before the dtype was recorded
    np.savez(old, feats=feats, labels=np.zeros(300, np.int64), meta=np.array(json.dumps(META)))
    back, _, _ = read_cache(str(old), META, dtype="float32")
    assert is_file_map(back) and np.array_equal(back, feats)
    liar = tmp_path / "liar.npz"
    np.savez(liar, feats=feats, labels=np.zeros(300, np.int64), meta=np.array(json.dumps({**META, "dtype": "float16"})))
    assert read_cache(str(liar), META, dtype="float16") is None
    assert f"cache {liar} is unreadable (ValueError); recomputing" in capsys.readouterr().out


def npy_bytes(array: np.ndarray) -> bytes:
    out = io.BytesIO()
    np.save(out, array)
    return out.getvalue()


def test_cache_whose_features_end_early_is_recomputed(tmp_path, capsys):
    path = tmp_path / "short.npz"  # a valid zip whose feats member lacks its last row
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("feats.npy", npy_bytes(unit_rows(300, 32))[:-32 * 4])
        archive.writestr("labels.npy", npy_bytes(np.zeros(300, np.int64)))
        archive.writestr("meta.npy", npy_bytes(np.array(json.dumps(META))))
    assert read_cache(str(path), META, dtype="float32") is None
    assert f"cache {path} is unreadable (ValueError); recomputing" in capsys.readouterr().out


def kmeans_on_cifar(tmp_path, root, capsys, *extra):
    return call_main(sampler.main, [root, "--dataset", "cifar10", "--arch", "resnet18", "--backbone", "random",
                                    "--save", tmp_path / "out", "--indices", tmp_path / "idx", "--splits", "4",
                                    "--name", "kmeans", "-j", "0", "-b", "16", *extra], capsys)


def test_sampler_writes_and_reuses_a_float16_cache(tmp_path, capsys):
    root = write_cifar(tmp_path / "cifar", n_train=24, n_test=4)
    assert kmeans_on_cifar(tmp_path, root, capsys)[0] == 0
    (path,) = (tmp_path / "out").glob("feats_*.npz")
    with np.load(path) as data:
        full = data["feats"]
    assert kmeans_on_cifar(tmp_path, root, capsys, "--feats-dtype", "float16")[0] == 0
    with np.load(path) as data:
        assert data["feats"].dtype == np.float16 and json.loads(str(data["meta"]))["dtype"] == "float16"
        assert np.array_equal(data["feats"], full.astype(np.float16))  # extracted in float32, stored rounded
    status, out, _ = kmeans_on_cifar(tmp_path, root, capsys, "--feats-dtype", "float16", "--load_cache")
    assert status == 0 and "from cache" in out
    sidecar = read_sidecar(str(tmp_path / "idx" / "kmeans_cifar10_4.npy"), "--splits")
    assert sidecar["features"].endswith("-float16")
    status, out, _ = kmeans_on_cifar(tmp_path, root, capsys, "--load_cache")
    assert status == 0 and "holds float16 features, this run asks for float32 (--feats-dtype); recomputing" in out
    with np.load(path) as data:
        assert np.array_equal(data["feats"], full)


# ---------------------------------------------------------------- .npz members and --feats files

def test_npz_members_are_mapped_where_numpy_stores_them(tmp_path):
    feats, labels = unit_rows(500, 24), np.arange(500)
    np.savez(tmp_path / "f.npz", labels=labels, feats=feats, other=np.ones((3, 3)))
    with np.load(tmp_path / "f.npz") as data:
        for name in ("feats", "labels", "other"):
            stored = stored_npz_member(str(tmp_path / "f.npz"), name)
            assert stored.shape == data[name].shape and np.array_equal(stored.memmap(), data[name])
    pool = read_feats_file(str(tmp_path / "f.npz"), "folder")
    assert is_file_map(pool.feats) and np.array_equal(pool.feats, feats) and pool.labels.tolist() == labels.tolist()


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_compressed_npz_fortran_npy_and_pth_are_loaded(tmp_path, dtype):
    x = np.random.default_rng(1).standard_normal((200, 12)).astype(np.float32)
    expected = (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(dtype)
    np.savez_compressed(tmp_path / "c.npz", feats=x, labels=np.arange(200))
    np.save(tmp_path / "fortran.npy", np.asfortranarray(x))
    torch.save((torch.from_numpy(x), torch.arange(200)), tmp_path / "t.pth")
    assert stored_npz_member(str(tmp_path / "c.npz"), "feats") is None
    assert feature_files.stored_npy(str(tmp_path / "fortran.npy")) is None
    for name in ("c.npz", "fortran.npy", "t.pth"):
        feats = read_feats_file(str(tmp_path / name), "folder", dtype=dtype).feats
        assert feats.dtype == dtype and feats.flags.c_contiguous and not isinstance(feats, np.memmap)
        # norms summed in another order than NumPy's: the last bit of `dtype` may differ
        np.testing.assert_allclose(feats.astype(np.float32), expected.astype(np.float32), rtol=0,
                                   atol=2 * np.finfo(dtype).eps)


def test_npy_cut_inside_its_data_cannot_be_read(tmp_path):
    np.save(tmp_path / "f.npy", unit_rows(50, 8))
    (tmp_path / "g.npy").write_bytes((tmp_path / "f.npy").read_bytes()[:-4])
    with pytest.raises(UsageError, match=r"^--feats: cannot read .*g\.npy' \(ValueError: its array needs 1600 bytes, "
                                         r"1596 are stored\)$"):
        read_feats_file(str(tmp_path / "g.npy"), "cifar10")


def test_unit_rows_are_mapped_not_copied_and_other_rows_copied_once(tmp_path, monkeypatch):
    feats = unit_rows(200_000, 64)
    feats[7] = 0  # an unreadable image's row: normalising leaves it zero
    np.save(tmp_path / "unit.npy", feats)
    np.save(tmp_path / "raw.npy", feats * 3)
    monkeypatch.setattr(feature_files, "BLOCK_BYTES", 1 << 20)
    tracemalloc.start()
    try:
        kept = read_feats_file(str(tmp_path / "unit.npy"), "cifar10").feats
        _, peak_kept = tracemalloc.get_traced_memory()
        tracemalloc.reset_peak()
        half = read_feats_file(str(tmp_path / "raw.npy"), "cifar10", dtype="float16").feats
        _, peak_half = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert is_file_map(kept) and np.shares_memory(kept, np.frombuffer(kept.base, np.uint8))
    assert kept.filename == str(tmp_path / "unit.npy") and np.array_equal(kept, feats)
    assert peak_kept < 0.1 * feats.nbytes  # blocks, never the matrix
    assert half.dtype == np.float16 and not isinstance(half, np.memmap)
    assert peak_half < 0.6 * feats.nbytes  # the float16 array and blocks: no float32 N x D temporary
    np.testing.assert_allclose(half.astype(np.float32), feats, atol=1e-3)


def test_rows_within_the_tolerance_are_kept_and_others_normalised(tmp_path):
    feats = unit_rows(100, 16)
    np.save(tmp_path / "near.npy", feats * np.float32(1 + 5e-6))
    np.save(tmp_path / "off.npy", feats * np.float32(1 + 5e-4))
    np.save(tmp_path / "half.npy", (feats * np.float32(1 + 5e-4)).astype(np.float16))
    assert is_file_map(read_feats_file(str(tmp_path / "near.npy"), "cifar10").feats)
    off = read_feats_file(str(tmp_path / "off.npy"), "cifar10").feats
    assert not isinstance(off, np.memmap)
    np.testing.assert_allclose(np.linalg.norm(off, axis=1), 1, atol=1e-6)
    assert is_file_map(read_feats_file(str(tmp_path / "half.npy"), "cifar10", dtype="float16").feats)
    assert not isinstance(read_feats_file(str(tmp_path / "half.npy"), "cifar10").feats, np.memmap)


@pytest.mark.parametrize("name,dtype", [("unit", "float32"), ("unit", "float16"), ("raw", "float32")])
def test_nan_in_a_later_block_is_found(tmp_path, monkeypatch, name, dtype):
    feats = unit_rows(4000, 16) * (1 if name == "unit" else 2)
    feats[-1, 3] = np.nan
    np.save(tmp_path / f"{name}.npy", feats)
    monkeypatch.setattr(feature_files, "BLOCK_BYTES", 4096)
    with pytest.raises(UsageError, match=r"^--val-feats: .* contains NaN or infinite values$"):
        read_feats_file(str(tmp_path / f"{name}.npy"), "cifar10", flag="--val-feats", split="val", dtype=dtype)


# ---------------------------------------------------------------- end to end

def mixture(n_per: int = 40, k: int = 8, dim: int = 16, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """k tight, well-separated clusters of unit rows."""
    rng = np.random.default_rng(seed)
    centres = np.eye(dim)[:k] * 4
    labels = np.repeat(np.arange(k), n_per)
    x = (centres[labels] + 0.1 * rng.standard_normal((len(labels), dim))).astype(np.float32)
    return x, labels


def select_kmeans(tmp_path, capsys, feats_file, dtype: str, budget: int = 8) -> np.ndarray:
    argv = ["--feats", feats_file, "--dataset", "cifar10", "--name", "kmeans", "--splits", budget,
            "--indices", tmp_path / dtype, "--feats-dtype", dtype]
    status, _, err = call_main(sampler.main, argv, capsys)
    assert status == 0, err
    return read_indices(str(tmp_path / dtype / f"kmeans_cifar10_{budget}.npy"), 320, dataset="cifar10", size=budget)


def test_float32_file_as_float16_selects_as_float32(tmp_path, capsys):
    x, labels = mixture()
    np.save(tmp_path / "f.npy", x)  # rows not normalised: normalised in float32, then rounded
    half = select_kmeans(tmp_path, capsys, tmp_path / "f.npy", "float16")
    assert len(half) == 8 and len(np.unique(half)) == 8 and half.min() >= 0 and half.max() < len(x)
    assert sorted(labels[half].tolist()) == list(range(8))  # one pick per cluster
    assert half.tolist() == select_kmeans(tmp_path, capsys, tmp_path / "f.npy", "float32").tolist()
    sidecar = read_sidecar(str(tmp_path / "float16" / "kmeans_cifar10_8.npy"), "--splits")
    assert sidecar["features"].endswith("-float16")


@pytest.mark.parametrize("program", ["eval_lincls", "active_sampler"])
def test_linear_heads_train_on_float16_features(tmp_path, capsys, program):
    """The cached-feature probe and the rounds' head widen float16 batches to float32 as they go."""
    train, val = write_feats(tmp_path)
    if program == "eval_lincls":
        (tmp_path / "idx").mkdir()
        np.save(tmp_path / "idx" / "random_cifar10_20.npy", np.arange(0, 200, 10, dtype=np.int64))
        argv = [*args_for(tmp_path, train, val), "--name", "random", "--splits", "20", "--feats-dtype", "float16"]
        status, out, err = call_main(eval_lincls.main, argv, capsys)
    else:
        argv = [*args_for(tmp_path, train, val, "--name", "entropy", "--init-random", "20", "--splits", "10"),
                "--feats-dtype", "float16"]
        status, out, err = call_main(active_sampler.main, argv, capsys)
    assert status == 0, err
    if program == "active_sampler":
        assert len(read_indices(str(tmp_path / "idx" / "entropy_cifar10_30.npy"), 400)) == 30
