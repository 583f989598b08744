"""The feature cache carries a digest of its arrays, checked on every load: a damaged cache is recomputed with a
line saying so, never used; one written before digests were stored is checked against its zip CRC-32."""
import hashlib
import json

import numpy as np
import pytest

import sampler
from lowbudget import features
from lowbudget.feature_files import stored_npz_member
from lowbudget.features import read_cache, write_cache
from tests.helpers import call_main, unit_rows, write_cifar

META = {"version": features.CACHE_VERSION, "dataset": "cifar10", "split": "train", "num_images": 30}


def cached(tmp_path, feats=None) -> str:
    feats = unit_rows(30, 8) if feats is None else feats
    path = str(tmp_path / "feats.npz")
    write_cache(path, feats, np.arange(30) % 3, np.array([4], np.int64), META)
    return path


def flip_feature_byte(path, byte: int = 1) -> None:
    """XOR one byte of the stored features (by default a mantissa byte of the first value: a small change)."""
    offset = stored_npz_member(str(path), "feats").offset + byte
    with open(path, "r+b") as f:
        f.seek(offset)
        value = f.read(1)[0]
        f.seek(offset)
        f.write(bytes([value ^ 0x40]))


def test_cache_stores_the_sha256_of_its_arrays(tmp_path):
    feats = unit_rows(30, 8)
    with np.load(cached(tmp_path, feats)) as data:
        stored = str(data["digest"])
    expected = hashlib.sha256(feats.tobytes() + (np.arange(30) % 3).tobytes() + np.int64([4]).tobytes())
    assert stored == f"sha256:{expected.hexdigest()}"


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_a_flipped_feature_byte_is_found_and_the_cache_not_used(tmp_path, capsys, dtype):
    path = cached(tmp_path)
    assert read_cache(path, META, dtype=dtype) is not None
    flip_feature_byte(path)
    assert read_cache(path, META, dtype=dtype) is None
    assert f"=> cache {path} is damaged (its bytes do not match their digest); recomputing" in capsys.readouterr().out


def test_cache_without_a_digest_is_checked_against_its_zip_crc(tmp_path, capsys):
    path = tmp_path / "old.npz"  # as written before digests were stored
    feats = unit_rows(30, 8)
    np.savez(path, feats=feats, labels=np.zeros(30, np.int64), meta=np.array(json.dumps({**META, "dtype": "float32"})))
    back, _, _ = read_cache(str(path), META)
    assert np.array_equal(back, feats)
    assert f"cache {path} has no digest (written by an older version): checking its zip CRC-32 instead" \
        in capsys.readouterr().out
    flip_feature_byte(path)
    assert read_cache(str(path), META) is None
    assert f"cache {path} is unreadable (BadZipFile); recomputing" in capsys.readouterr().out


def kmeans(tmp_path, root, capsys, *extra):
    return call_main(sampler.main, [root, "--dataset", "cifar10", "--arch", "resnet18", "--backbone", "random",
                                    "--save", tmp_path / "out", "--indices", tmp_path / "idx", "--splits", "5",
                                    "--name", "kmeans", "-j", "0", "-b", "8", "--image-size", "16", *extra], capsys)


def test_sampler_recomputes_a_damaged_cache_and_selects_as_from_a_sound_one(tmp_path, capsys):
    root = write_cifar(tmp_path / "cifar", n_train=30, n_test=4)
    assert kmeans(tmp_path, root, capsys)[0] == 0
    picks = np.load(tmp_path / "idx" / "kmeans_cifar10_5.npy")
    (path,) = (tmp_path / "out").glob("feats_*.npz")
    flip_feature_byte(path)

    status, out, err = kmeans(tmp_path, root, capsys, "--load_cache")
    assert status == 0, err
    assert f"cache {path} is damaged (its bytes do not match their digest); recomputing" in out
    assert "from cache" not in out
    assert np.array_equal(np.load(tmp_path / "idx" / "kmeans_cifar10_5.npy"), picks)
    status, out, _ = kmeans(tmp_path, root, capsys, "--load_cache")
    assert status == 0 and "from cache" in out  # written again whole
