"""active_sampler.py: uncertainty scores against brute force, round mechanics, seeds, bad input."""
import json

import numpy as np
import pytest
import torch

import active_sampler
from lowbudget import strategies
from lowbudget.strategy_table import names
from tests.conftest import call_main
from tests.test_evaluators import write_feats


def softmax(z):
    z = z - z.max(1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(1, keepdims=True)


def brute_force_scores(logits, name):
    p = softmax(logits.astype(np.float64))
    if name == "entropy":
        return -np.sum(np.where(p > 0, p * np.log(np.where(p > 0, p, 1)), 0), axis=1)
    top = -np.sort(-p, axis=1)
    return -(top[:, 0] - top[:, 1]) if name == "margin" else -top[:, 0]


@pytest.mark.parametrize("name", names(model=True))
def test_selection_equals_brute_force_ranking(name):
    logits = np.random.default_rng(0).standard_normal((200, 7)) * 3
    logits[0] = [900, 0, 0, 0, 0, 0, 0]  # softmax underflows: log(softmax) would give NaN
    scores = strategies.uncertainty(torch.from_numpy(logits), name).numpy()
    assert np.all(np.isfinite(scores))
    np.testing.assert_allclose(scores, brute_force_scores(logits, name), atol=1e-12)
    candidates = np.arange(1000, 1200)
    picked = strategies.most_uncertain(scores, candidates, 15)
    assert picked.tolist() == candidates[np.argsort(-brute_force_scores(logits, name), kind="stable")[:15]].tolist()


def test_most_uncertain_budget_beyond_candidates():
    with pytest.raises(ValueError):
        strategies.most_uncertain(np.zeros(3), np.arange(3), 4)


def args_for(tmp_path, train, val, *extra):
    return ["--feats", train, "--val-feats", val, "--dataset", "cifar10", "--cached", "--epochs", "3", "-p", "1",
            "-b", "16", "--indices", tmp_path / "idx", "--save", tmp_path / "out", *extra]


def test_rounds_grow_by_the_split_without_duplicates(tmp_path, capsys):
    train, val = write_feats(tmp_path)
    status, out, err = call_main(active_sampler.main, args_for(tmp_path, train, val, "--name", "entropy",
                                                               "--init-random", "20", "--splits", "10,15"), capsys)
    assert status == 0, err
    initial = np.load(tmp_path / "idx" / "random_cifar10_20.npy")
    first, second = (np.load(tmp_path / "idx" / f"entropy_cifar10_{n}.npy") for n in (30, 45))
    assert np.array_equal(first[:20], initial) and np.array_equal(second[:30], first)
    for pool in (first, second):
        assert len(np.unique(pool)) == len(pool) and pool.dtype == np.int64 and pool.max() < 400
    meta = json.loads((tmp_path / "idx" / "entropy_cifar10_45.json").read_text())
    assert meta["params"]["increment"] == 15 and meta["initial_pool"]["size"] == 30
    rows = [json.loads(line) for line in (tmp_path / "out" / "results.jsonl").read_text().splitlines()]
    assert [(r["split"], r["metric"]) for r in rows] == [(20, "active_top1"), (30, "coverage"),
                                                         (30, "active_top1"), (45, "coverage")]
    assert "Final accuracy of 30 labeled data is:" in out


@pytest.mark.parametrize("name", ["margin", "least_confidence"])
def test_seeded_runs_identical_and_resumable(tmp_path, capsys, name):
    train, val = write_feats(tmp_path)
    runs = []
    for run in ("a", "b"):
        args = args_for(tmp_path / run, train, val, "--name", name, "--init-random", "10", "--splits", "5,5")
        assert call_main(active_sampler.main, args, capsys)[0] == 0
        runs.append((tmp_path / run / "idx" / f"{name}_cifar10_20.npy").read_bytes())
    assert runs[0] == runs[1]
    # stopped after one round, continued from its index file: the same final pool
    one = args_for(tmp_path / "c", train, val, "--name", name, "--init-random", "10", "--splits", "5")
    assert call_main(active_sampler.main, one, capsys)[0] == 0
    resumed = args_for(tmp_path / "c", train, val, "--name", name, "--splits", "5",
                       "--resume-indices", tmp_path / "c" / "idx" / f"{name}_cifar10_15.npy")
    assert call_main(active_sampler.main, resumed, capsys)[0] == 0
    assert (tmp_path / "c" / "idx" / f"{name}_cifar10_20.npy").read_bytes() == runs[0]


@pytest.mark.slow
def test_default_protocol_on_images(tmp_path, cifar10_root, capsys):
    status, out, err = call_main(active_sampler.main, [
        cifar10_root, "--dataset", "cifar10", "--arch", "resnet18", "--backbone", "random", "-j", "0",
        "--name", "entropy", "--init-random", "10", "--splits", "6", "--epochs", "2", "-p", "1", "-b", "8",
        "--indices", tmp_path / "idx", "--save", tmp_path / "out"], capsys)
    assert status == 0, err
    pool = np.load(tmp_path / "idx" / "entropy_cifar10_16.npy")
    assert len(np.unique(pool)) == 16 and "Current unlabeled indices is 190." in out


@pytest.mark.parametrize("extra,pattern", [
    (["--name", "entropy", "--splits", "5"], "needs an initial pool"),
    (["--name", "vaal", "--splits", "5", "--init-random", "5"], "--name: unknown strategy 'vaal'"),
    (["--name", "entropy", "--splits", "390,5", "--init-random", "10"], "--splits: 395 images to add but only 390"),
    (["--name", "entropy", "--splits", "5", "--init-random", "500"], "--init-random: 500 is more than"),
    (["--name", "entropy", "--splits", "5", "--resume-indices", "BAD"], "has indices outside [0, 400)"),
])
def test_bad_input(tmp_path, capsys, extra, pattern):
    train, val = write_feats(tmp_path)
    np.save(tmp_path / "bad.npy", np.array([3, 400]))
    extra = [str(tmp_path / "bad.npy") if e == "BAD" else e for e in extra]
    status, _, err = call_main(active_sampler.main, args_for(tmp_path, train, val, *extra), capsys)
    assert status == 2 and len(err.strip().splitlines()) == 1 and pattern in err, err
    assert not (tmp_path / "idx").exists()
