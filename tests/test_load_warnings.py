"""A pickle that would run code, passed where a checkpoint goes (--weights, --resume, convert_weights' SRC), is
refused with one line and nothing else: no warning of torch's unpickler before it."""
from __future__ import annotations

import pickle
import warnings

import numpy as np
import pytest

import eval_lincls
import sampler
from tests.helpers import call_main, unit_rows
from tools import convert_weights


class RunsCode:
    """Unpickled by pickle.load, this creates the file `path`."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return open, (self.path, "w")


@pytest.fixture
def crafted(tmp_path):
    """A plain pickle (not torch's zip format), protocol 4, holding a RunsCode among tensor-like entries."""
    path = tmp_path / "crafted.pth"
    path.write_bytes(pickle.dumps({"model": {"conv1.weight": RunsCode(tmp_path / "ran")}}, protocol=4))
    return path


def refusal(run) -> tuple[int, str, list[str]]:
    """(status, stderr, warnings given) of `run`, every warning recorded, however often it was given before."""
    with warnings.catch_warnings(record=True) as given:
        warnings.simplefilter("always")
        status, _, err = run()
    return status, err, [str(w.message) for w in given]


def test_weights(tmp_path, cifar10_root, crafted, capsys):
    status, err, given = refusal(lambda: call_main(sampler.main, [
        cifar10_root, "--dataset", "cifar10", "--arch", "resnet18", "--weights", crafted, "--name", "kmeans",
        "--splits", "10", "--save", tmp_path / "out", "--indices", tmp_path / "idx", "-j", "0"], capsys))
    assert status == 2 and given == []
    assert len(err.splitlines()) == 1 and f"--weights: cannot read checkpoint {str(crafted)!r}" in err
    assert not (tmp_path / "ran").exists()


def test_resume(tmp_path, crafted, capsys):
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "train.npz", feats=unit_rows(40, 8), labels=rng.integers(0, 3, 40))
    np.savez(tmp_path / "val.npz", feats=unit_rows(20, 8, seed=1), labels=rng.integers(0, 3, 20))
    common = ["--dataset", "cifar10", "--feats", tmp_path / "train.npz", "--indices", tmp_path / "idx",
              "--save", tmp_path / "out", "--name", "random", "--splits", "10"]
    assert call_main(sampler.main, common, capsys)[0] == 0
    status, err, given = refusal(lambda: call_main(eval_lincls.main, [
        *common, "--val-feats", tmp_path / "val.npz", "--cached", "--epochs", "1", "--resume", crafted], capsys))
    assert status == 2 and given == []
    assert len(err.splitlines()) == 1 and f"--resume: {str(crafted)!r} is not a checkpoint" in err
    assert not (tmp_path / "ran").exists()


def test_convert_weights_source(tmp_path, crafted, capsys):
    status, err, given = refusal(lambda: call_main(convert_weights.main, [
        crafted, "--arch", "resnet18", "--out", tmp_path / "out.pth"], capsys))
    assert status == 2 and given == []
    assert len(err.splitlines()) == 1 and f"SRC: cannot read checkpoint {str(crafted)!r}" in err
    assert not (tmp_path / "ran").exists() and not (tmp_path / "out.pth").exists()
