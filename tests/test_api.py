"""lowbudget.select: the selection of sampler.py as one Python call, with the same picks, checks and files."""
from __future__ import annotations

import json

import numpy as np
import pytest

import sampler
from lowbudget import select
from lowbudget.cli import UsageError
from tests.helpers import call_main, unit_rows


@pytest.fixture
def feats_file(tmp_path):
    rng = np.random.default_rng(4)
    centres = rng.standard_normal((6, 16))
    labels = rng.integers(0, 6, 400)
    feats = (centres[labels] + 0.3 * rng.standard_normal((400, 16))).astype(np.float32)
    path = tmp_path / "feats.npz"
    np.savez(path, feats=feats, labels=labels)
    return path, feats, labels


def cli_pool(tmp_path, capsys, feats_file, name, splits, *extra):
    indices = tmp_path / f"cli_{name}"
    status, _, err = call_main(sampler.main, ["--feats", feats_file, "--dataset", "folder", "--indices", indices,
                                              "--save", tmp_path / "save", "--name", name, "--splits", splits,
                                              *extra], capsys)
    assert status == 0, err
    return indices


@pytest.mark.parametrize("name, options, flags", [
    ("kmeans", {"kmeans_restarts": 2}, ["--kmeans-restarts", "2"]),
    ("typiclust", {"knn": 5}, ["--knn", "5"]),
    ("coreset", {}, []),
    ("probcover", {"delta": 0.4}, ["--delta", "0.4"]),
    ("maxherding", {"bandwidth": None}, ["--bandwidth", "auto"]),
    ("uniform", {}, []),
])
def test_picks_and_index_file_equal_sampler_py(tmp_path, capsys, feats_file, name, options, flags):
    path, feats, labels = feats_file
    start = select(feats, 12, "random", seed=1)
    np.save(tmp_path / "start.npy", start)
    incremental = name not in ("kmeans", "uniform")
    resume = ["--resume-indices", tmp_path / "start.npy"] if incremental else []
    indices = cli_pool(tmp_path, capsys, path, name, 20, *flags, *resume, "--seed", 3)
    size = 32 if incremental else 20
    from_cli = np.load(indices / f"{name}_folder_{size}.npy")
    picks = select(feats, 20, name, labelled=start if incremental else None, labels=labels, seed=3,
                   index_dir=tmp_path / "api", **options)
    assert picks.tolist() == from_cli[len(from_cli) - 20:].tolist()
    written = np.load(tmp_path / "api" / f"{name}_folder_{size}.npy")
    assert written.tolist() == from_cli.tolist()
    sidecar = json.loads((tmp_path / "api" / f"{name}_folder_{size}.json").read_text())
    assert sidecar["strategy"] == name and sidecar["seed"] == 3 and sidecar["size"] == size
    cli_sidecar = json.loads((indices / f"{name}_folder_{size}.json").read_text())
    assert sidecar["params"] == cli_sidecar["params"]


def test_a_feats_file_or_an_index_file_work_as_arrays_do(tmp_path, capsys, feats_file):
    path, feats, _ = feats_file
    pool = select(path, 10, "kmeans", index_dir=tmp_path)
    assert pool.tolist() == select(feats, 10).tolist()
    assert select(path, 5, "coreset", labelled=tmp_path / "kmeans_folder_10.npy").tolist() == \
        select(feats, 5, "coreset", labelled=pool).tolist()


def test_the_features_are_not_changed_and_unnormalised_rows_pick_as_normalised(feats_file):
    _, feats, _ = feats_file
    before = feats.copy()
    picks = select(feats * 7.5, 10, "coreset")
    assert np.array_equal(feats, before)
    assert picks.tolist() == select(feats, 10, "coreset").tolist()


@pytest.mark.parametrize("call, message", [
    (lambda x: select(x, 500), "--splits: kmeans needs 500 images but only 300 can be selected"),
    (lambda x: select(x, 10, "entropy"), "--name: unknown strategy 'entropy' here (entropy runs in active_sampler.py)"),
    (lambda x: select(x, 10, "uniform"), "--name uniform needs labels"),
    (lambda x: select(x, 10, "kmeans", knn=3), "knn: not an option of kmeans"),
    (lambda x: select(x, 10, "kmeans", kmeans_restarts=0), "--kmeans-restarts"),
    (lambda x: select(x, 10, "typiclust", typicality="cubic"), "--typicality: 'cubic' is not one of"),
    (lambda x: select(x, 10, "coreset", labelled=[3, 3]), "labelled contains 1 duplicate indices"),
    (lambda x: select(x, 10, "coreset", labelled=[300]), "labelled has indices outside [0, 300)"),
    (lambda x: select(x, 10, "coreset", labelled=[[1]]), "labelled must be a 1-D integer array"),
    (lambda x: select(np.full((5, 4), np.nan, np.float32), 2), "NaN"),
    (lambda x: select(x[0], 2), "features: expected a non-empty 2-D array"),
])
def test_bad_input_is_the_command_lines_usage_error(call, message):
    with pytest.raises(UsageError, match=None) as raised:
        call(unit_rows(300, 8))
    assert message in str(raised.value)
