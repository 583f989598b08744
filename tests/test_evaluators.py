"""eval_knn.py and eval_lincls.py: brute-force k-NN, a separable probe, the original protocol end to
end, resume equality, and bad input."""
import json

import numpy as np
import pytest
import torch

import eval_knn
import eval_lincls
import sampler
from lowbudget import engine
from lowbudget.fileio import file_digest
from lowbudget.metrics import majority_vote
from tests.helpers import call_main, unit_rows, write_feats


def brute_force_knn(train, train_labels, queries, k):
    """NumPy k-NN: sort by distance (stable), vote, ties to the class of the nearest tied neighbour."""
    d = ((queries[:, None, :].astype(np.float64) - train[None].astype(np.float64)) ** 2).sum(-1)
    predictions = []
    for row in d:
        near = train_labels[np.argsort(row, kind="stable")[:k]]
        counts = {c: int((near == c).sum()) for c in near}
        top = max(counts.values())
        predictions.append(next(c for c in near if counts[c] == top))
    return np.array(predictions)


@pytest.mark.parametrize("k", [1, 5])
def test_knn_equals_brute_force(k):
    rng = np.random.default_rng(k)
    train, queries = unit_rows(300, 8, seed=1), unit_rows(120, 8, seed=2)
    labels = rng.integers(0, 4, 300)
    assert np.array_equal(eval_knn.knn_predict(train, labels, queries, k), brute_force_knn(train, labels, queries, k))


def test_vote_tie_goes_to_nearest_tied_class():
    rows = np.array([[3, 1, 1, 3, 2], [2, 2, 1, 1, 1], [4, 5, 6, 7, 8]])
    assert majority_vote(rows).tolist() == [3, 1, 4]


def feats_args(tmp_path, train, val, name, splits, *extra):
    return ["--feats", train, "--val-feats", val, "--dataset", "cifar10", "--name", name, "--splits", splits,
            "--indices", tmp_path / "idx", "--save", tmp_path / "out", *extra]


def select_args(tmp_path, train, val, name, splits):
    """sampler.py's flags for the same pool (it takes no --val-feats)."""
    args = feats_args(tmp_path, train, val, name, splits)
    return args[:2] + args[4:]


def results(tmp_path):
    return [json.loads(line) for line in (tmp_path / "out" / "results.jsonl").read_text().splitlines()]


def test_eval_knn_cli_on_feature_files(tmp_path, capsys):
    train, val = write_feats(tmp_path)
    assert call_main(sampler.main, select_args(tmp_path, train, val, "random", "20,40"), capsys)[0] == 0
    status, out, err = call_main(eval_knn.main, feats_args(tmp_path, train, val, "random", "20,40", "-k", "5"), capsys)
    assert status == 0, err
    assert " * Acc for 40 samples is " in out
    pool = np.load(tmp_path / "idx" / "random_cifar10_40.npy")
    with np.load(train) as t, np.load(val) as v:
        norm = lambda x: x / np.linalg.norm(x, axis=1, keepdims=True)  # noqa: E731
        expected = 100 * np.mean(brute_force_knn(norm(t["feats"])[pool], t["labels"][pool], norm(v["feats"]), 5)
                                 == v["labels"])
    knn = {(r["split"], r["metric"]): r["value"] for r in results(tmp_path) if r["script"] == "eval_knn"}
    assert knn[(40, "knn_top1")] == pytest.approx(expected)
    assert {m for _, m in knn} == {"coverage", "knn_top1", "knn_class_mean"}


def test_linear_probe_separable_features_near_perfect(tmp_path, capsys):
    train, val = write_feats(tmp_path)
    assert call_main(sampler.main, select_args(tmp_path, train, val, "uniform", "40"), capsys)[0] == 0
    status, out, err = call_main(eval_lincls.main, feats_args(tmp_path, train, val, "uniform", "40", "--cached",
                                                              "--epochs", "30", "--lr", "0.05", "-b", "16"), capsys)
    assert status == 0, err
    final = {r["metric"]: r["value"] for r in results(tmp_path) if r["script"] == "eval_lincls"}
    assert final["lincls_top1"] >= 97 and final["lincls_top5"] == 100 and final["lincls_class_mean"] >= 97
    assert "Final accuracy of 40 labeled data is:" in out


def interrupt_after(monkeypatch, epochs):
    real = engine.train_epoch
    calls = {"n": 0}

    def stopping(*args, **kwargs):
        if calls["n"] == epochs:
            raise KeyboardInterrupt
        calls["n"] += 1
        return real(*args, **kwargs)
    monkeypatch.setattr(engine, "train_epoch", stopping)


def final_head(tmp_path, pattern):
    (path,) = [p for p in (tmp_path / "out").glob(pattern) if not p.stem.endswith("_best")]
    return torch.load(path, weights_only=True)


def test_cached_resume_gives_the_same_weights(tmp_path, capsys, monkeypatch):
    train, val = write_feats(tmp_path)
    assert call_main(sampler.main, select_args(tmp_path, train, val, "random", "50"), capsys)[0] == 0
    args = feats_args(tmp_path, train, val, "random", "50", "--cached", "--epochs", "6", "-p", "2",
                      "--lr_schedule", "3", "-b", "8")
    assert call_main(eval_lincls.main, args, capsys)[0] == 0
    straight = final_head(tmp_path, "lincls_*.pth")
    with monkeypatch.context() as patch:
        interrupt_after(patch, 4)
        with pytest.raises(KeyboardInterrupt):
            call_main(eval_lincls.main, args, capsys)
    assert final_head(tmp_path, "lincls_*.pth")["epoch"] == 4
    status, out, _ = call_main(eval_lincls.main, args + ["--resume"], capsys)
    assert status == 0 and "resumed from" in out and "at epoch 4" in out
    resumed = final_head(tmp_path, "lincls_*.pth")
    status, _, err = call_main(eval_lincls.main, [a if a != "6" else "7" for a in args] + ["--resume"], capsys)
    assert status == 2 and "--resume: " in err and "another schedule" in err
    assert resumed["epoch"] == 6 and resumed["best_top1"] == straight["best_top1"]
    for key, value in straight["model"].items():
        assert torch.equal(resumed["model"][key], value), key


@pytest.mark.slow
def test_default_protocol_end_to_end_and_resume(tmp_path, cifar10_root, capsys, monkeypatch):
    common = [cifar10_root, "--dataset", "cifar10", "--arch", "resnet18", "--backbone", "random", "-j", "0",
              "--indices", tmp_path / "idx", "--save", tmp_path / "out", "--load_cache"]
    assert call_main(sampler.main, common + ["--name", "kmeans", "--splits", "12"], capsys)[0] == 0
    args = common + ["--name", "kmeans", "--splits", "12", "--epochs", "3", "-p", "1", "-b", "8"]
    status, out, err = call_main(eval_lincls.main, args, capsys)
    assert status == 0, err
    assert out.count(" * Acc@1 ") == 3 and "Final accuracy of 12 labeled data is:" in out
    straight = final_head(tmp_path, "lincls_*_images_*.pth")
    with monkeypatch.context() as patch:
        interrupt_after(patch, 1)
        with pytest.raises(KeyboardInterrupt):
            call_main(eval_lincls.main, args, capsys)
    assert call_main(eval_lincls.main, args + ["--resume"], capsys)[0] == 0
    resumed = final_head(tmp_path, "lincls_*_images_*.pth")
    for key, value in straight["model"].items():
        assert torch.equal(resumed["model"][key], value), key


def mode(script):
    return ["--cached"] if script is eval_lincls else []


@pytest.mark.parametrize("script", [eval_knn, eval_lincls])
def test_missing_index_file_lists_existing(tmp_path, capsys, script):
    train, val = write_feats(tmp_path)
    (tmp_path / "idx").mkdir()
    np.save(tmp_path / "idx" / "kmeans_cifar10_10.npy", np.arange(10))
    status, _, err = call_main(script.main, feats_args(tmp_path, train, val, "kmeans", "10,20", *mode(script)), capsys)
    assert status == 2 and len(err.strip().splitlines()) == 1
    assert "no index file at" in err and "kmeans_cifar10_20.npy" in err and "found: kmeans_cifar10_10.npy" in err


@pytest.mark.parametrize("script", [eval_knn, eval_lincls])
def test_index_beyond_dataset_size(tmp_path, capsys, script):
    train, val = write_feats(tmp_path, n_train=50)
    (tmp_path / "idx").mkdir()
    np.save(tmp_path / "idx" / "random_cifar10_3.npy", np.array([1, 2, 70]))
    status, _, err = call_main(script.main, feats_args(tmp_path, train, val, "random", "3", *mode(script)), capsys)
    assert status == 2 and "outside [0, 50)" in err and len(err.strip().splitlines()) == 1


def test_val_feats_without_labels(tmp_path, capsys):
    train, _ = write_feats(tmp_path)
    np.save(tmp_path / "v.npy", unit_rows(10, 16))
    (tmp_path / "idx").mkdir()
    np.save(tmp_path / "idx" / "random_cifar10_3.npy", np.array([1, 2, 3]))
    status, _, err = call_main(eval_knn.main, feats_args(tmp_path, train, tmp_path / "v.npy", "random", "3"), capsys)
    assert status == 2 and "--val-feats: the features have no labels" in err


def test_lincls_resume_file_needs_single_split(tmp_path, capsys):
    train, val = write_feats(tmp_path)
    (tmp_path / "idx").mkdir()
    for n in (3, 4):
        np.save(tmp_path / "idx" / f"random_cifar10_{n}.npy", np.arange(n))
    status, _, err = call_main(eval_lincls.main, feats_args(tmp_path, train, val, "random", "3,4", "--cached",
                                                            "--resume", tmp_path / "x.pth"), capsys)
    assert status == 2 and "--resume: a checkpoint file goes with a single --splits value" in err


def test_latest_checkpoint_reaches_the_disk_at_most_once_a_minute_and_at_the_end(tmp_path, capsys, monkeypatch):
    train, val = write_feats(tmp_path)
    assert call_main(sampler.main, select_args(tmp_path, train, val, "random", "50"), capsys)[0] == 0
    args = feats_args(tmp_path, train, val, "random", "50", "--cached", "--epochs", "6", "-p", "2", "-b", "8")
    written = []
    real_write = engine.atomic_write_bytes
    monkeypatch.setattr(engine, "atomic_write_bytes", lambda path, data: (written.append(path), real_write(path, data)))
    assert call_main(eval_lincls.main, args, capsys)[0] == 0
    assert len(written) == 1 and final_head(tmp_path, "lincls_*.pth")["epoch"] == 6  # six short epochs: one write
    at_the_end = final_head(tmp_path, "lincls_*.pth")
    written.clear()
    monkeypatch.setattr(engine, "CHECKPOINT_EVERY_S", 0.0)
    assert call_main(eval_lincls.main, args, capsys)[0] == 0
    assert written == written[:1] * 6  # every epoch, once the interval is up
    every_epoch = final_head(tmp_path, "lincls_*.pth")
    for key, value in at_the_end["model"].items():
        assert torch.equal(value, every_epoch["model"][key])


def test_resume_checks_what_the_checkpoint_was_trained_on(tmp_path, capsys, monkeypatch):
    train, val = write_feats(tmp_path, n_train=80, n_val=20)
    select = select_args(tmp_path, train, val, "random", "30")
    assert call_main(sampler.main, select, capsys)[0] == 0
    args = feats_args(tmp_path, train, val, "random", "30", "--cached", "--epochs", "3", "-b", "8")
    with monkeypatch.context() as patch:
        interrupt_after(patch, 1)
        with pytest.raises(KeyboardInterrupt):
            call_main(eval_lincls.main, args, capsys)
    saved = final_head(tmp_path, "lincls_*.pth")
    pool = np.load(tmp_path / "idx" / "random_cifar10_30.npy")
    assert set(saved["trained_on"]) == {"pool", "features", "val_features"}
    assert saved["trained_on"] == engine.trained_on(pool, features=file_digest(str(train)),
                                                    val_features=file_digest(str(val)))
    assert call_main(sampler.main, select, capsys)[0] == 0  # selected again: the same pool, the same digest
    status, out, err = call_main(eval_lincls.main, args + ["--resume"], capsys)
    assert status == 0 and "at epoch 1" in out, err
    assert call_main(sampler.main, select + ["--seed", "5"], capsys)[0] == 0  # another pool under that name
    status, _, err = call_main(eval_lincls.main, args + ["--resume"], capsys)
    assert status == 2 and "--resume: " in err and "labelled pool" in err and len(err.strip().splitlines()) == 1
