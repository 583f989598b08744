"""sampler.py end to end: every strategy, exact budgets, seeds, sidecars, results, and bad input."""
import json
import pickle

import numpy as np
import pytest
import torch

import sampler
from lowbudget import datasets, features
from tests.helpers import call_main, compress_checkpoint, resnet_backbone_state, run_cli, run_script


def base_args(tmp_path, root, name, splits, *extra):
    return [root, "--dataset", "cifar10", "--arch", "resnet18", "--backbone", "random", "--load_cache",
            "--save", tmp_path / "out", "--indices", tmp_path / "idx", "--splits", splits, "--name", name,
            "-j", "0", "-b", "100", *extra]


def load(tmp_path, name, size):
    return np.load(tmp_path / "idx" / f"{name}_cifar10_{size}.npy")


@pytest.mark.parametrize("name", ["uniform", "random", "kmeans"])
def test_absolute_budgets(tmp_path, cifar10_root, capsys, name):
    status, out, err = call_main(sampler.main, base_args(tmp_path, cifar10_root, name, "10,30"), capsys)
    assert status == 0, err
    for size in (10, 30):
        pool = load(tmp_path, name, size)
        assert pool.dtype == np.int64 and len(pool) == size and len(np.unique(pool)) == size
        assert pool.min() >= 0 and pool.max() < 200
        meta = json.loads((tmp_path / "idx" / f"{name}_cifar10_{size}.json").read_text())
        assert meta["strategy"] == name and meta["size"] == size and meta["seed"] == 0
    assert "% of all categories is seen" in out and "30 indices are sampled in total, 30 of them are unique" in out
    results = [json.loads(line) for line in (tmp_path / "out" / "results.jsonl").read_text().splitlines()]
    assert [(r["name"], r["split"], r["metric"]) for r in results] == [(name, 10, "coverage"), (name, 30, "coverage")]
    assert all(0 < r["value"] <= 100 for r in results)


def test_uniform_is_class_balanced_and_needs_no_backbone(tmp_path, cifar10_root, capsys):
    status, out, _ = call_main(sampler.main, base_args(tmp_path, cifar10_root, "uniform", "20"), capsys)
    assert status == 0 and "get inference feats" not in out
    labels = np.concatenate([pickle.loads((cifar10_root / "cifar-10-batches-py" / f"data_batch_{i}").read_bytes())
                             [b"labels"] for i in range(1, 6)])
    assert np.bincount(labels[load(tmp_path, "uniform", 20)], minlength=10).tolist() == [2] * 10


@pytest.mark.parametrize("name", ["accu_kmeans", "coreset"])
def test_incremental_rounds_from_a_pool(tmp_path, cifar10_root, capsys, name):
    assert call_main(sampler.main, base_args(tmp_path, cifar10_root, "random", "10"), capsys)[0] == 0
    initial = tmp_path / "idx" / "random_cifar10_10.npy"
    status, out, err = call_main(sampler.main, base_args(tmp_path, cifar10_root, name, "10,20",
                                                         "--resume-indices", initial), capsys)
    assert status == 0, err
    first, second = load(tmp_path, name, 20), load(tmp_path, name, 40)
    assert np.array_equal(first[:10], np.load(initial)) and np.array_equal(second[:20], first)
    assert len(np.unique(second)) == 40
    meta = json.loads((tmp_path / "idx" / f"{name}_cifar10_40.json").read_text())
    assert meta["params"]["increment"] == 20 and meta["initial_pool"]["size"] == 10


@pytest.mark.parametrize("name", ["accu_kmeans", "coreset"])
def test_incremental_without_pool_starts_empty(tmp_path, cifar10_root, capsys, name):
    status, out, err = call_main(sampler.main, base_args(tmp_path, cifar10_root, name, "10,20"), capsys)
    assert status == 0, err
    assert "starts from an empty pool" in out
    assert len(load(tmp_path, name, 10)) == 10 and len(np.unique(load(tmp_path, name, 30))) == 30


def forget_earlier_runs():
    """Drop the backbone built by an earlier run and move the global random generators on."""
    features._backbone.cache_clear()
    torch.rand(1000)
    np.random.random(1000)


def seeded_args(out, root, name):
    return base_args(out, root, name, "10,15", "--seed", "3")


def index_files(out, name) -> list[bytes]:
    """The bytes of the index files a run with seeded_args wrote under `out`."""
    sizes = (10, 15) if name in ("random", "uniform", "kmeans") else (10, 25)
    return [(out / "idx" / f"{name}_cifar10_{n}.npy").read_bytes() for n in sizes]


def assert_a_second_run_writes_the_same_bytes(tmp_path, cifar10_root, capsys, name, second_run) -> None:
    status, _, err = call_main(sampler.main, seeded_args(tmp_path / "a", cifar10_root, name), capsys)
    assert status == 0, err
    forget_earlier_runs()
    status, _, err = second_run(seeded_args(tmp_path / "b", cifar10_root, name))
    assert status == 0, err
    assert index_files(tmp_path / "a", name) == index_files(tmp_path / "b", name)


@pytest.mark.parametrize("name", ["random", "uniform", "kmeans", "accu_kmeans", "coreset"])
def test_seeded_runs_write_identical_files(tmp_path, cifar10_root, capsys, monkeypatch, name):
    """A second seeded run in this process, through the script's __main__ block, writes the same bytes."""
    assert_a_second_run_writes_the_same_bytes(tmp_path, cifar10_root, capsys, name,
                                              lambda args: run_script("sampler.py", args, capsys, monkeypatch))


@pytest.mark.slow
@pytest.mark.parametrize("name", ["random", "kmeans"])
def test_seeded_runs_in_a_new_process_write_identical_files(tmp_path, cifar10_root, capsys, name):
    """A second seeded run in a new process (fresh global state) writes the same bytes: a label-only strategy
    and one that runs the backbone and faiss."""
    def new_process(args):
        done = run_cli("sampler.py", *args)
        return done.returncode, done.stdout, done.stderr
    assert_a_second_run_writes_the_same_bytes(tmp_path, cifar10_root, capsys, name, new_process)


def test_feats_file_without_data_and_row_warning(tmp_path, capsys):
    rng = np.random.default_rng(0)
    feats_path = tmp_path / "f.npz"
    np.savez(feats_path, feats=rng.standard_normal((120, 16)).astype(np.float32), labels=rng.integers(0, 4, 120))
    status, out, err = call_main(sampler.main, ["--feats", feats_path, "--dataset", "cifar10", "--name", "kmeans",
                                                "--splits", "8", "--indices", tmp_path / "idx",
                                                "--save", tmp_path / "out"], capsys)
    assert status == 0, err
    assert "has 120 rows, cifar10 usually has 50000" in out
    assert len(load(tmp_path, "kmeans", 8)) == 8


@pytest.mark.parametrize("name", ["kmeans", "accu_kmeans"])
def test_kmeans_restarts_and_sample_reach_the_sidecar(tmp_path, capsys, name):
    rng = np.random.default_rng(0)
    feats_path = tmp_path / "f.npz"
    np.savez(feats_path, feats=rng.standard_normal((300, 16)).astype(np.float32), labels=rng.integers(0, 4, 300))
    argv = ["--feats", feats_path, "--dataset", "cifar10", "--name", name, "--splits", "12",
            "--indices", tmp_path / "idx", "--save", tmp_path / "out"]
    status, out, err = call_main(sampler.main, argv, capsys)
    assert status == 0, err
    default = json.loads((tmp_path / "idx" / f"{name}_cifar10_12.json").read_text())["params"]
    assert default["nredo"] == 5 and default["sample"] is None
    status, out, err = call_main(sampler.main, [*argv, "--kmeans-restarts", "2", "--kmeans-sample", "10"], capsys)
    assert status == 0, err
    params = json.loads((tmp_path / "idx" / f"{name}_cifar10_12.json").read_text())["params"]
    assert params["nredo"] == 2 and params["sample"] == 10
    assert len(np.unique(load(tmp_path, name, 12))) == 12
    status, out, err = call_main(sampler.main, [*argv, "--kmeans-sample", "0"], capsys)
    assert status == 2 and "--kmeans-sample" in err


def test_imagenet_lt_uniform_reads_labels_and_decodes_its_picks_alone(tmp_path, capsys, monkeypatch):
    # uniform selects from the labels, then decodes only the images it picked (an unreadable one is excluded)
    lines, decoded = [], []
    monkeypatch.setattr(datasets, "open_rgb", lambda path: decoded.append(path))
    for cls, count in enumerate([1, 2, 30, 30]):
        for i in range(count):
            path = tmp_path / "train" / f"c{cls}" / f"{i}.JPEG"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(b"garbage")
            lines.append(f"train/c{cls}/{i}.JPEG {cls}")
    (tmp_path / "lt.txt").write_text("\n".join(lines) + "\n")
    status, out, err = call_main(sampler.main, [tmp_path, "--dataset", "imagenet_lt", "--lt-list", tmp_path / "lt.txt",
                                                "--name", "uniform", "--splits", "20", "--weights", "none.pth",
                                                "--indices", tmp_path / "idx", "--save", tmp_path / "out", "-j", "0"],
                                 capsys)
    assert status == 0, err
    pool = np.load(tmp_path / "idx" / "uniform_imagenet_lt_20.npy")
    labels = np.repeat(np.arange(4), [1, 2, 30, 30])
    assert len(np.unique(pool)) == 20 and np.bincount(labels[pool]).tolist()[:2] == [1, 2]
    assert "100.0% of all categories is seen" in out and len(decoded) == 20


def test_folder_dataset_with_random_backbone(tmp_path, folder_root, capsys):
    status, out, err = call_main(sampler.main, [folder_root, "--dataset", "folder", "--arch", "resnet18",
                                                "--backbone", "random", "--image-size", "32", "--name", "coreset",
                                                "--splits", "4", "-j", "0", "--indices", tmp_path / "idx",
                                                "--save", tmp_path / "out"], capsys)
    assert status == 0, err
    assert len(np.unique(np.load(tmp_path / "idx" / "coreset_folder_4.npy"))) == 4


# ---------------------------------------------------------------- bad input: one line, status 2, nothing written

def assert_usage_error(tmp_path, status, err, pattern):
    assert status == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert pattern in lines[0], lines[0]
    assert not list((tmp_path / "idx").glob("*")) if (tmp_path / "idx").exists() else True


@pytest.fixture
def resnet18_ckpt(tmp_path):
    path = tmp_path / "ckpt.pth"
    torch.save(compress_checkpoint(resnet_backbone_state("resnet18"), head_dim=128), path)
    return path


def bad_index(tmp_path, values):
    path = tmp_path / "pool.npy"
    np.save(path, np.asarray(values))
    return path


@pytest.mark.parametrize("case,pattern", [
    (lambda t, r: [t / "missing", "--splits", "5", "--name", "kmeans"], "data: no cifar10 batches"),
    (lambda t, r: [r, "--backbone", "compress", "--weights", t / "nope.pth", "--splits", "5", "--name", "kmeans"],
     "--weights: no checkpoint found"),
    (lambda t, r: [r, "--backbone", "compress", "--splits", "5", "--name", "kmeans"], "--weights: --backbone compress"),
    (lambda t, r: [r, "--name", "kmeans", "--splits", "500"], "--splits: kmeans needs 500 images but only 200"),
    (lambda t, r: [r, "--name", "coreset", "--splits", "150,60"], "--splits: coreset needs 210"),
    (lambda t, r: [r, "--name", "vaal", "--splits", "5"], "--name: unknown strategy 'vaal'"),
    (lambda t, r: [r, "--name", "kmeans", "--splits", ""], "--splits: give at least one budget"),
    (lambda t, r: [r, "--name", "kmeans", "--splits", "10,x"], "--splits: '10,x' is not"),
    (lambda t, r: [r, "--name", "kmeans", "--splits", "0"], "--splits: budgets must be positive"),
    (lambda t, r: [r, "--name", "coreset", "--splits", "5", "--resume-indices", bad_index(t, [1, 200])],
     "has indices outside [0, 200)"),
    (lambda t, r: [r, "--name", "coreset", "--splits", "5", "--resume-indices", bad_index(t, [1, 2, 2])],
     "1 duplicate indices"),
    (lambda t, r: [r, "--name", "coreset", "--splits", "5", "--resume-indices", bad_index(t, [0.5, 2.0])],
     "must be a 1-D integer array"),
    (lambda t, r: [r, "--name", "coreset", "--splits", "5", "--resume-indices", t / "none.npy"],
     "--resume-indices: no index file"),
    (lambda t, r: [r, "--name", "kmeans", "--splits", "5", "--arch", "resnet_x"], "--arch: unknown"),
    (lambda t, r: [r, "--name", "kmeans", "--splits", "5", "--device", "cuda"], "--device cuda"),
])
def test_bad_input(tmp_path, cifar10_root, capsys, monkeypatch, case, pattern):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    args = [str(a) for a in case(tmp_path, cifar10_root)]
    args = args[:1] + ["--dataset", "cifar10", "--arch", "resnet18", "--backbone", "random", "-j", "0",
                       "--indices", str(tmp_path / "idx"), "--save", str(tmp_path / "out")] + args[1:]
    status, _, err = call_main(sampler.main, args, capsys)
    assert_usage_error(tmp_path, status, err, pattern)


def test_checkpoint_without_backbone_weights(tmp_path, cifar10_root, capsys):
    path = tmp_path / "headonly.pth"
    torch.save({"model": {"module.fc.weight": torch.zeros(128, 512)}}, path)
    status, _, err = call_main(sampler.main, [cifar10_root, "--dataset", "cifar10", "--arch", "resnet18",
                                              "--weights", path, "--name", "kmeans", "--splits", "5", "-j", "0",
                                              "--indices", tmp_path / "idx", "--save", tmp_path / "out"], capsys)
    assert_usage_error(tmp_path, status, err, "lacks 100 of 100 backbone tensors")
    assert not list((tmp_path / "out").glob("feats_*"))


def test_truncated_feats_file_and_uniform_without_labels(tmp_path, capsys):
    np.save(tmp_path / "f.npy", np.random.default_rng(0).standard_normal((50, 4)).astype(np.float32))
    status, _, err = call_main(sampler.main, ["--feats", tmp_path / "f.npy", "--dataset", "cifar10",
                                              "--name", "uniform", "--splits", "5", "--indices", tmp_path / "idx"],
                               capsys)
    assert_usage_error(tmp_path, status, err, "--name uniform needs labels")
    (tmp_path / "g.npy").write_bytes((tmp_path / "f.npy").read_bytes()[:90])
    status, _, err = call_main(sampler.main, ["--feats", tmp_path / "g.npy", "--dataset", "cifar10",
                                              "--name", "kmeans", "--splits", "5", "--indices", tmp_path / "idx"],
                               capsys)
    assert_usage_error(tmp_path, status, err, "--feats: cannot read")


def test_script_error_is_one_line_without_traceback(tmp_path, cifar10_root, script_run):
    status, _, err = script_run("sampler.py", cifar10_root, "--dataset", "cifar10", "--name", "kmeans", "--splits",
                                "5", "--backbone", "random", "--arch", "resnet18", "--resume-indices",
                                tmp_path / "none.npy", "--indices", tmp_path / "idx", "--save", tmp_path / "out")
    assert status == 2
    assert err.strip().splitlines() == [
        f"sampler.py: error: --resume-indices: no index file at '{tmp_path / 'none.npy'}'; "
        "no index files for cifar10 there"]
    status, _, err = script_run("sampler.py", "--dataset", "mnist")
    assert status == 2 and len(err.strip().splitlines()) == 1
    assert "--dataset" in err
