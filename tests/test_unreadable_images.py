"""A labelled folder with one unreadable image, first, in the middle or last in dataset order: every
strategy family selects around it, coverage is counted by dataset index, and the evaluators and trainers
refuse a pool that holds it. Index files hold dataset indices; strategies pick among the readable rows."""
import shutil

import numpy as np
import pytest
import torch

import active_sampler
import eval_knn
import eval_lincls
import finetune
import sampler
import trainer_DP
from lowbudget import datasets, features
from tests.helpers import call_main, write_image_tree
from tools import export

CLASSES = {"ant": 4, "bee": 4, "cat": 4}  # dataset indices 0-3, 4-7, 8-11
LABELS = np.repeat(np.arange(3), 4)
POSITIONS = {"first": 0, "middle": 5, "last": 11}  # the dataset index of the unreadable image
BACKBONE = ["--dataset", "folder", "--arch", "resnet18", "--backbone", "random", "--image-size", "32", "-j", "0",
            "-b", "8"]
FEATURE_STRATEGIES = {"kmeans": (), "accu_kmeans": (), "coreset": (), "typiclust": ("--min-cluster-size", "1"),
                      "probcover": ("--pseudo-classes", "3"), "maxherding": ()}
ROUND_STRATEGIES = {"entropy": (), "uherding": (), "dropquery": (), "vaal": ("--vaal-epochs", "1")}


class Folder:
    """The dataset, the dataset index of its unreadable training image, and a --save folder holding the
    train and val feature caches (copied for each run, so that no test extracts again)."""

    def __init__(self, root, broken, cache):
        self.root, self.broken, self.cache = root, broken, cache
        self.readable = [i for i in range(len(LABELS)) if i != broken]

    def args(self, tmp_path, *extra):
        """Flags of a run over this folder that reads the cached features, writing under `tmp_path`."""
        save = tmp_path / "out"
        if not save.exists():
            shutil.copytree(self.cache, save)
        return [self.root, *BACKBONE, "--save", save, "--indices", tmp_path / "idx", "--load_cache", *extra]


@pytest.fixture(scope="module", params=list(POSITIONS))
def folder(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(f"broken_{request.param}")
    write_image_tree(root / "train", CLASSES)
    write_image_tree(root / "val", {"ant": 2, "bee": 2, "cat": 2}, seed=1)
    broken = POSITIONS[request.param]
    sorted((root / "train").rglob("*.png"))[broken].write_bytes(b"garbage, not a PNG")
    cache = root / "cache"
    args = eval_knn.build_parser().parse_args([str(root), *BACKBONE, "--save", str(cache)])
    for split in ("train", "val"):
        features.backbone_features(args, split, torch.device("cpu"))
    return Folder(root, broken, cache)


def index_file(tmp_path, name, size):
    return np.load(tmp_path / "idx" / f"{name}_folder_{size}.npy")


def seen_line(pool) -> str:
    """The coverage line of a pool of dataset indices."""
    return f"{100.0 * len(np.unique(LABELS[pool])) / 3}% of all categories is seen"


def write_pool(tmp_path, name, pool):
    """A hand-made index file (no sidecar), as another program would write it."""
    (tmp_path / "idx").mkdir(exist_ok=True)
    np.save(tmp_path / "idx" / f"{name}_folder_{len(pool)}.npy", np.array(pool, np.int64))


# ---------------------------------------------------------------- sampler.py

@pytest.mark.parametrize("name", list(FEATURE_STRATEGIES))
def test_feature_strategies_select_around_the_unreadable_image(tmp_path, folder, capsys, name):
    incremental = name != "kmeans"
    status, out, err = call_main(sampler.main, folder.args(tmp_path, "--name", name, "--splits",
                                                           "3,3" if incremental else "3",
                                                           *FEATURE_STRATEGIES[name]), capsys)
    assert status == 0, err
    pool = index_file(tmp_path, name, 6 if incremental else 3)
    assert len(np.unique(pool)) == len(pool) and folder.broken not in pool
    assert seen_line(pool) in out


def test_every_readable_image_and_no_more_can_be_selected(tmp_path, folder, capsys):
    status, _, err = call_main(sampler.main, folder.args(tmp_path, "--name", "kmeans", "--splits", "12"), capsys)
    assert status == 2 and "only 11 can be selected" in err
    assert call_main(sampler.main, folder.args(tmp_path, "--name", "kmeans", "--splits", "11"), capsys)[0] == 0
    assert sorted(index_file(tmp_path, "kmeans", 11).tolist()) == folder.readable


@pytest.mark.parametrize("name", ["uniform", "random"])
def test_label_only_strategies_never_select_the_unreadable_image(tmp_path, folder, capsys, name):
    status, out, err = call_main(sampler.main, folder.args(tmp_path, "--name", name, "--splits", "12"), capsys)
    assert status == 2 and "only 11 can be selected" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "idx").exists()
    status, out, err = call_main(sampler.main, folder.args(tmp_path, "--name", name, "--splits", "11"), capsys)
    assert status == 0, err
    assert "skipped unreadable image" in out and "selecting again without them" in out
    assert sorted(index_file(tmp_path, name, 11).tolist()) == folder.readable


def test_label_only_strategies_decode_their_picks_alone(tmp_path, folder, capsys, monkeypatch):
    decoded = []
    real = datasets.open_rgb
    monkeypatch.setattr(datasets, "open_rgb", lambda path: decoded.append(path) or real(path))
    status, _, err = call_main(sampler.main, folder.args(tmp_path, "--name", "random", "--splits", "2"), capsys)
    assert status == 0, err
    assert folder.broken not in index_file(tmp_path, "random", 2) and 2 <= len(decoded) <= 4


def test_strict_makes_an_unreadable_pick_an_error(tmp_path, folder, capsys):
    status, _, err = call_main(sampler.main, folder.args(tmp_path, "--name", "random", "--splits", "11",
                                                         "--strict"), capsys)
    assert status == 2 and "cannot read image" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "idx").exists()


def test_resume_indices_coverage_counts_dataset_indices(tmp_path, folder, capsys):
    ants = [i for i in folder.readable if LABELS[i] == 0][:2]
    write_pool(tmp_path, "start", ants)
    status, out, err = call_main(sampler.main, folder.args(tmp_path, "--name", "accu_kmeans", "--splits", "2",
                                                           "--resume-indices", tmp_path / "idx" / "start_folder_2.npy"),
                                 capsys)
    assert status == 0, err
    assert f"current indices size: 2. {seen_line(ants)}" in out
    pool = index_file(tmp_path, "accu_kmeans", 4)
    assert pool[:2].tolist() == ants and folder.broken not in pool and seen_line(pool) in out


def test_resume_indices_holding_the_unreadable_image_is_refused(tmp_path, folder, capsys):
    write_pool(tmp_path, "start", [folder.readable[0], folder.broken])
    start = tmp_path / "idx" / "start_folder_2.npy"
    status, _, err = call_main(sampler.main, folder.args(tmp_path, "--name", "coreset", "--splits", "2",
                                                         "--resume-indices", start), capsys)
    assert status == 2 and len(err.strip().splitlines()) == 1
    assert f"--resume-indices: index {folder.broken} is an image file that could not be read" in err
    assert sorted(p.name for p in (tmp_path / "idx").iterdir()) == ["start_folder_2.npy"]


# ---------------------------------------------------------------- active_sampler.py

@pytest.mark.parametrize("name", list(ROUND_STRATEGIES))
def test_rounds_on_cached_features_select_around_the_unreadable_image(tmp_path, folder, capsys, name):
    rounds = ["--name", name, "--cached", "--epochs", "1", "--init-random", "3", *ROUND_STRATEGIES[name]]
    status, _, err = call_main(active_sampler.main, folder.args(tmp_path, *rounds, "--splits", "4,5"), capsys)
    assert status == 2 and "--splits: 9 images to add but only 8 are unlabelled" in err
    status, out, err = call_main(active_sampler.main, folder.args(tmp_path, *rounds, "--splits", "4,4"), capsys)
    assert status == 0, err
    assert sorted(index_file(tmp_path, name, 11).tolist()) == folder.readable
    assert folder.broken not in index_file(tmp_path, "random", 3) and seen_line(index_file(tmp_path, name, 7)) in out


def test_rounds_on_images_decode_them_first_and_select_around_the_unreadable_one(tmp_path, folder, capsys):
    status, out, err = call_main(active_sampler.main, folder.args(
        tmp_path, "--name", "entropy", "--epochs", "1", "--init-random", "3", "--splits", "4,4"), capsys)
    assert status == 0, err
    assert "decoding the 12 train image files once" in out and "1 unreadable image file(s)" in out
    assert sorted(index_file(tmp_path, "entropy", 11).tolist()) == folder.readable


def test_rounds_refuse_a_resume_pool_holding_the_unreadable_image(tmp_path, folder, capsys):
    write_pool(tmp_path, "start", [folder.readable[0], folder.broken])
    status, _, err = call_main(active_sampler.main, folder.args(
        tmp_path, "--name", "margin", "--cached", "--epochs", "1", "--splits", "2",
        "--resume-indices", tmp_path / "idx" / "start_folder_2.npy"), capsys)
    assert status == 2 and len(err.strip().splitlines()) == 1
    assert f"--resume-indices: index {folder.broken} is an image file that could not be read" in err


# ---------------------------------------------------------------- evaluators, trainers, export

def test_knn_evaluates_a_sampled_pool_by_dataset_index(tmp_path, folder, capsys):
    assert call_main(sampler.main, folder.args(tmp_path, "--name", "kmeans", "--splits", "6"), capsys)[0] == 0
    status, out, err = call_main(eval_knn.main, folder.args(tmp_path, "--name", "kmeans", "--splits", "6"), capsys)
    assert status == 0, err
    assert seen_line(index_file(tmp_path, "kmeans", 6)) in out


@pytest.mark.parametrize("main, extra", [(eval_knn.main, ()), (eval_lincls.main, ("--cached", "--epochs", "1"))],
                         ids=["eval_knn", "eval_lincls_cached"])
def test_feature_evaluators_refuse_a_pool_holding_the_unreadable_image(tmp_path, folder, capsys, main, extra):
    write_pool(tmp_path, "hand", [folder.readable[0], folder.broken])
    status, out, err = call_main(main, folder.args(tmp_path, "--name", "hand", "--splits", "2", *extra), capsys)
    assert status == 2 and len(err.strip().splitlines()) == 1
    assert "hand_folder_2.npy" in err and f"index {folder.broken} is an image file that could not be read" in err
    assert "Acc" not in out


def trainer_args(tmp_path, root, *extra):
    """Flags of a program that trains on the images of the dataset at `root`."""
    return [root, "--dataset", "folder", "--arch", "resnet18", "--image-size", "32", "-j", "0",
            "--save", tmp_path / "out", "--indices", tmp_path / "idx", *extra]


@pytest.mark.parametrize("main, args", [
    (eval_lincls.main, lambda tmp_path, folder: folder.args(tmp_path)),
    (trainer_DP.main, lambda tmp_path, folder: trainer_args(tmp_path, folder.root)),
    (finetune.main, lambda tmp_path, folder: trainer_args(tmp_path, folder.root, "--backbone", "random"))],
    ids=["eval_lincls_images", "trainer_DP", "finetune"])
def test_trainers_refuse_a_pool_holding_the_unreadable_image_by_name(tmp_path, folder, capsys, main, args):
    write_pool(tmp_path, "hand", [folder.readable[0], folder.broken])
    status, out, err = call_main(main, [*args(tmp_path, folder), "--name", "hand", "--splits", "2", "--epochs", "1"],
                                 capsys)
    broken = sorted((folder.root / "train").rglob("*.png"))[folder.broken]
    assert status == 2 and len(err.strip().splitlines()) == 1
    assert "hand_folder_2.npy" in err and f"index {folder.broken} is the image file {str(broken)!r}" in err
    assert "Epoch" not in out


def test_export_names_the_files_of_the_dataset_indices(tmp_path, folder, capsys):
    assert call_main(sampler.main, folder.args(tmp_path, "--name", "kmeans", "--splits", "11"), capsys)[0] == 0
    status, _, err = call_main(export.main, [tmp_path / "idx" / "kmeans_folder_11.npy", "--data", folder.root,
                                             "--out", tmp_path / "export", "--thumb", "8"], capsys)
    assert status == 0, err
    files = sorted((folder.root / "train").rglob("*.png"))
    rows = (tmp_path / "export" / "kmeans_folder_11.csv").read_text().splitlines()[1:]
    pool = index_file(tmp_path, "kmeans", 11)
    assert [row.split(",")[1] for row in rows] == [files[i].relative_to(folder.root).as_posix() for i in pool]


@pytest.mark.parametrize("broken", [0, 3, 5], ids=["first", "middle", "last"])
@pytest.mark.parametrize("main, extra", [
    (trainer_DP.main, ("--name", "hand", "--splits", "3")),
    (active_sampler.main, ("--name", "entropy", "--init-random", "3", "--splits", "2", "--backbone", "random"))],
    ids=["trainer_DP", "active_sampler_images"])
def test_programs_validating_on_images_leave_an_unreadable_evaluation_image_out(tmp_path, folder_root, capsys,
                                                                               broken, main, extra):
    sorted((folder_root / "val").rglob("*.png"))[broken].write_bytes(b"garbage, not a PNG")
    write_pool(tmp_path, "hand", [0, 6, 10])
    status, out, err = call_main(main, [*trainer_args(tmp_path, folder_root), "--epochs", "1",
                                        *extra], capsys)
    assert status == 0, err
    assert "decoding the 6 val image files once" in out
    assert "1 unreadable image file(s) skipped: they are left out of the evaluation" in out
