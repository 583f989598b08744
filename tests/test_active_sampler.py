"""active_sampler.py: uncertainty scores against brute force, round mechanics, seeds, bad input."""
import json

import numpy as np
import pytest
import torch

import active_sampler
import strategies
from lowbudget.selection import most_uncertain
from tests.helpers import args_for, call_main, torchrun, write_cifar, write_feats


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


UNCERTAINTY = ("entropy", "margin", "least_confidence")


@pytest.mark.parametrize("name", UNCERTAINTY)
def test_selection_equals_brute_force_ranking(name):
    logits = np.random.default_rng(0).standard_normal((200, 7)) * 3
    logits[0] = [900, 0, 0, 0, 0, 0, 0]  # softmax underflows: log(softmax) would give NaN
    scores = strategies.uncertainty(torch.from_numpy(logits), name).numpy()
    assert np.all(np.isfinite(scores))
    np.testing.assert_allclose(scores, brute_force_scores(logits, name), atol=1e-12)
    candidates = np.arange(1000, 1200)
    selection = most_uncertain(scores, candidates, 15)
    order = np.argsort(-brute_force_scores(logits, name), kind="stable")[:15]
    assert selection.indices.tolist() == candidates[order].tolist()
    assert selection.scores.tolist() == scores[order].tolist()  # what the sidecar records for the export


def test_most_uncertain_budget_beyond_candidates():
    with pytest.raises(ValueError):
        most_uncertain(np.zeros(3), np.arange(3), 4)


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


@pytest.mark.parametrize("name, logged, param", [("uherding", "=> uherding: temperature", "temperature"),
                                                 ("dropquery", "=> dropquery: ", "candidates")])
def test_uherding_and_dropquery_rounds_on_cached_features(tmp_path, capsys, name, logged, param):
    train, val = write_feats(tmp_path)
    runs = []
    for run in ("a", "b"):
        args = args_for(tmp_path / run, train, val, "--name", name, "--init-random", "20", "--splits", "10,15")
        status, out, err = call_main(active_sampler.main, args, capsys)
        assert status == 0, err
        assert logged in out and "Current unlabeled indices is 380." in out
        runs.append([(tmp_path / run / "idx" / f"{name}_cifar10_{n}.npy").read_bytes() for n in (30, 45)])
    assert runs[0] == runs[1]
    initial = np.load(tmp_path / "a" / "idx" / "random_cifar10_20.npy")
    first, second = (np.load(tmp_path / "a" / "idx" / f"{name}_cifar10_{n}.npy") for n in (30, 45))
    assert np.array_equal(first[:20], initial) and np.array_equal(second[:30], first)
    assert len(np.unique(second)) == 45 and second.dtype == np.int64 and second.max() < 400
    meta = json.loads((tmp_path / "a" / "idx" / f"{name}_cifar10_45.json").read_text())
    assert meta["params"]["increment"] == 15 and param in meta["params"]
    # stopped after one round, continued from its index file: the same final pool
    resumed = args_for(tmp_path / "a", train, val, "--name", name, "--splits", "15",
                       "--resume-indices", tmp_path / "a" / "idx" / f"{name}_cifar10_30.npy",
                       "--indices", tmp_path / "c")
    assert call_main(active_sampler.main, resumed, capsys)[0] == 0
    assert (tmp_path / "c" / f"{name}_cifar10_45.npy").read_bytes() == runs[0][1]


def test_uherding_options_reach_the_strategy(tmp_path, capsys):
    train, val = write_feats(tmp_path)
    args = args_for(tmp_path, train, val, "--name", "uherding", "--init-random", "20", "--splits", "5",
                    "--bandwidth", "0.3", "--calibration-holdout", "0.5")
    status, out, err = call_main(active_sampler.main, args, capsys)
    assert status == 0, err
    assert "held-out labelled images of a head trained on the other 10" in out
    params = json.loads((tmp_path / "idx" / "uherding_cifar10_25.json").read_text())["params"]
    assert params["calibration_holdout"] == 0.5 and params["bandwidth"] == 0.3
    assert (tmp_path / "out" / "active_uherding_probe_cifar10_10_seed0.pth").is_file()


@pytest.mark.slow
@pytest.mark.parametrize("name", ["entropy", "uherding", "dropquery", "dcom"])
def test_rounds_on_images(tmp_path, cifar10_root, capsys, name):
    """The default protocol: the head trained on the images through the backbone; the strategies that read
    features also embed every training image."""
    status, out, err = call_main(active_sampler.main, [
        cifar10_root, "--dataset", "cifar10", "--arch", "resnet18", "--backbone", "random", "-j", "0",
        "--name", name, "--init-random", "10", "--splits", "6", "--epochs", "2", "-p", "1", "-b", "8",
        "--indices", tmp_path / "idx", "--save", tmp_path / "out"], capsys)
    assert status == 0, err
    pool = np.load(tmp_path / "idx" / f"{name}_cifar10_16.npy")
    assert len(np.unique(pool)) == 16 and "Current unlabeled indices is 190." in out


@pytest.mark.slow
def test_auto_on_images_from_no_labels(tmp_path, cifar10_root, capsys):
    status, out, err = call_main(active_sampler.main, [
        cifar10_root, "--dataset", "cifar10", "--arch", "resnet18", "--backbone", "random", "-j", "0",
        "--name", "auto", "--auto-ready", "1", "--splits", "10,6", "--epochs", "2", "-p", "1", "-b", "8",
        "--indices", tmp_path / "idx", "--save", tmp_path / "out"], capsys)
    assert status == 0, err
    methods = [json.loads((tmp_path / "idx" / f"auto_cifar10_{n}.json").read_text())["params"]["method"]
               for n in (10, 16)]
    assert methods == ["kmeans", "dropquery"]
    assert len(np.unique(np.load(tmp_path / "idx" / "auto_cifar10_16.npy"))) == 16


@pytest.mark.slow
@pytest.mark.parametrize("name", ["uherding", "dropquery"])
def test_uherding_and_dropquery_under_torchrun(tmp_path, name):
    """Two processes score blocks of the images; the 3-image pool holds out one image for UHerding's
    temperature, fewer than the processes, which each score it whole."""
    root = write_cifar(tmp_path / "cifar", n_train=101, n_test=21)
    run = torchrun("active_sampler.py", root, "--dataset", "cifar10", "--arch", "resnet18", "--backbone", "random",
                   "--image-size", "16", "-j", "0", "-b", "8", "--name", name, "--init-random", "3", "--splits", "5",
                   "--epochs", "1", "--indices", tmp_path / "idx", "--save", tmp_path / "out")
    assert run.returncode == 0, run.stderr
    pool = np.load(tmp_path / "idx" / f"{name}_cifar10_8.npy")
    assert len(np.unique(pool)) == 8 and pool.max() < 101 and run.stdout.count("=> saved") == 1


@pytest.mark.parametrize("extra,pattern", [
    (["--name", "entropy", "--splits", "5"], "needs an initial pool"),
    (["--name", "badname", "--splits", "5", "--init-random", "5"], "--name: unknown strategy 'badname'"),
    (["--name", "entropy", "--splits", "390,5", "--init-random", "10"], "--splits: 395 images to add but only 390"),
    (["--name", "entropy", "--splits", "5", "--init-random", "500"], "--init-random: 500 is more than"),
    (["--name", "entropy", "--splits", "5", "--resume-indices", "BAD"], "has indices outside [0, 400)"),
    (["--name", "dropquery", "--splits", "5", "--init-random", "5", "--dropout", "1"], "--dropout: must be"),
    (["--name", "dropquery", "--splits", "5", "--init-random", "5", "--dropout-passes", "0"], "--dropout-passes:"),
    (["--name", "uherding", "--splits", "5", "--init-random", "5", "--calibration-holdout", "0"],
     "--calibration-holdout: must be"),
    (["--name", "uherding", "--splits", "5", "--init-random", "5", "--bandwidth", "0"], "--bandwidth: must be"),
])
def test_bad_input(tmp_path, capsys, extra, pattern):
    train, val = write_feats(tmp_path)
    np.save(tmp_path / "bad.npy", np.array([3, 400]))
    extra = [str(tmp_path / "bad.npy") if e == "BAD" else e for e in extra]
    status, _, err = call_main(active_sampler.main, args_for(tmp_path, train, val, *extra), capsys)
    assert status == 2 and len(err.strip().splitlines()) == 1 and pattern in err, err
    assert not (tmp_path / "idx").exists()


def test_vaal_rounds_on_cached_features_are_seeded_and_keep_a_checkpoint_per_round(tmp_path, capsys):
    train, val = write_feats(tmp_path)
    runs = []
    for run in ("a", "b"):
        args = args_for(tmp_path / run, train, val, "--name", "vaal", "--init-random", "20", "--splits", "10,15",
                        "--vaal-epochs", "2")
        status, _, err = call_main(active_sampler.main, args, capsys)
        assert status == 0, err
        runs.append([(tmp_path / run / "idx" / f"vaal_cifar10_{n}.npy").read_bytes() for n in (30, 45)])
    assert runs[0] == runs[1]
    initial = np.load(tmp_path / "a" / "idx" / "random_cifar10_20.npy")
    first, second = (np.load(tmp_path / "a" / "idx" / f"vaal_cifar10_{n}.npy") for n in (30, 45))
    assert np.array_equal(first[:20], initial) and np.array_equal(second[:30], first)
    assert len(np.unique(second)) == 45 and second.max() < 400
    params = json.loads((tmp_path / "a" / "idx" / "vaal_cifar10_45.json").read_text())["params"]
    assert params["epochs"] == 3 and params["vaal"]["epochs"] == 2 and params["vaal"]["mode"] == "features"
    assert params["vaal"]["iterations"] == 2 * (400 // 128)
    for pool_size in (20, 30):
        assert (tmp_path / "a" / "out" / f"vaal_features_{pool_size}_seed0.pth").is_file()


@pytest.mark.slow
def test_vaal_on_images_trains_on_the_pixels(tmp_path, cifar10_root, capsys):
    status, out, err = call_main(active_sampler.main, [
        cifar10_root, "--dataset", "cifar10", "--arch", "resnet18", "--backbone", "random", "-j", "0",
        "--name", "vaal", "--init-random", "10", "--splits", "6", "--epochs", "1", "-p", "1", "-b", "8",
        "--vaal-epochs", "1", "--vaal-width", "8", "--indices", tmp_path / "idx", "--save", tmp_path / "out"], capsys)
    assert status == 0, err
    pool = np.load(tmp_path / "idx" / "vaal_cifar10_16.npy")
    assert len(np.unique(pool)) == 16 and pool.max() < 200
    assert json.loads((tmp_path / "idx" / "vaal_cifar10_16.json").read_text())["params"]["vaal"]["mode"] == "images"
    assert (tmp_path / "out" / "vaal_images_10_seed0.pth").is_file()
