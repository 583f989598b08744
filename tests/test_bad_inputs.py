"""Bad input, table-driven: every numeric flag of every script is a checked number (tests/test_cli.py tests
the type's refusals), and files that are damaged or that describe something else than the run they are given
to. Every case ends with exit status 2, one stderr line naming the flag or the file, no traceback, and no file
written or changed."""
from __future__ import annotations

import argparse
import gzip
import math
import os
import pickle
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

from lowbudget import cli, faiss_ops
from lowbudget.indices import write_indices
from tests.helpers import REPO, call_main, load_program, write_cifar, write_image_tree, write_photo_folder

# ---------------------------------------------------------------- every numeric flag of every script

PROGRAMS = sorted(path for path in (*(p.name for p in REPO.glob("*.py")),
                                    *(f"tools/{p.name}" for p in (REPO / "tools").glob("*.py")))
                  if hasattr(load_program(path), "build_parser"))
HUGE = str(10**30)
CANDIDATES = ("0", "-1", "nan", "inf", "-inf", HUGE)


def parser_of(program: str) -> argparse.ArgumentParser:
    return load_program(program).build_parser()


def numeric_actions(parser: argparse.ArgumentParser) -> list[argparse.Action]:
    """The options that parse a number: a checked cli.Number, or a plain int or float."""
    return [action for action in parser._actions
            if action.option_strings and (isinstance(action.type, cli.Number) or action.type in (int, float))]


def flag_name(action: argparse.Action) -> str:
    return max(action.option_strings, key=len)


def required_args(parser: argparse.ArgumentParser) -> list[str]:
    """Placeholder values for the positional and required arguments (files that do not exist)."""
    args: list[str] = []
    for action in parser._actions:
        if not action.option_strings and action.nargs not in ("?", "*"):
            args.append("missing.input")
        elif action.required:
            args += [action.option_strings[0], "missing.input"]
    for group in parser._mutually_exclusive_groups:  # one of a required choice (export's --data or --feats)
        if group.required:
            args += [group._group_actions[0].option_strings[0], "missing.input"]
    return args


def out_of_range(kind: cli.Number, text: str) -> bool:
    """Whether `text` lies outside the bounds that `kind` declares (computed here, not by calling it)."""
    value = float(text)
    return (not math.isfinite(value) or value < kind.low or (kind.low_open and value == kind.low)
            or value > kind.high or (kind.integer and value != int(value)))


def action_of(program: str, flag: str) -> argparse.Action:
    return next(a for a in numeric_actions(parser_of(program)) if flag_name(a) == flag)


NUMERIC = [(program, flag_name(action)) for program in PROGRAMS for action in numeric_actions(parser_of(program))]
CHECKED = [(program, flag_name(action)) for program in PROGRAMS for action in numeric_actions(parser_of(program))
           if isinstance(action.type, cli.Number)]
KINDS = {action.type for program in PROGRAMS for action in numeric_actions(parser_of(program))
         if isinstance(action.type, cli.Number)}
# One out-of-range number per program, through its main: the first checked flag, its first bad candidate.
BAD_NUMBERS = [next((program, flag, text) for p, flag in CHECKED if p == program
                    for text in CANDIDATES if out_of_range(action_of(program, flag).type, text))
               for program in sorted({program for program, _ in CHECKED})]


def files_under(root: Path) -> dict[str, tuple[int, int]]:
    """{relative path: (size, mtime)} of every file under `root`, symbolic links not followed."""
    found = {}
    for directory, _, names in os.walk(root):
        for name in names:
            path = os.path.join(directory, name)
            status = os.lstat(path)
            found[os.path.relpath(path, root)] = (status.st_size, status.st_mtime_ns)
    return found


def assert_refused(status: int, err: str, names: str) -> None:
    """Exit 2 and a single stderr line that names `names`, no traceback."""
    lines = err.strip().splitlines()
    assert status == 2, err
    assert len(lines) == 1 and names in lines[0], err
    assert "Traceback" not in err


@pytest.mark.parametrize("program, flag", NUMERIC, ids=[f"{p}:{f}" for p, f in NUMERIC])
def test_every_numeric_flag_has_a_checked_type(program, flag):
    kind = action_of(program, flag).type
    assert isinstance(kind, cli.Number), f"{program} {flag} parses a plain {kind.__name__}: use a lowbudget.cli type"
    assert kind.high < float(HUGE)


def test_every_checked_number_refuses_exactly_what_lies_outside_its_bounds():
    """Each kind of number the programs declare, given every candidate: refused where out of range."""
    for kind in KINDS:
        for text in CANDIDATES:
            if out_of_range(kind, text):
                with pytest.raises(argparse.ArgumentTypeError, match="^must be "):
                    kind(text)
            else:
                assert kind(text) == float(text)


@pytest.mark.parametrize("program, flag, text", BAD_NUMBERS, ids=[f"{p}:{f}={t}" for p, f, t in BAD_NUMBERS])
def test_out_of_range_number_is_one_line_and_writes_nothing(program, flag, text, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    argv = [*required_args(parser_of(program)), flag, text]
    status, _, err = call_main(load_program(program).main, argv, capsys)
    assert_refused(status, err, flag)
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("program, flag", CHECKED, ids=[f"{p}:{f}" for p, f in CHECKED])
def test_bounds_and_default_are_accepted(program, flag):
    """The bounds are not tighter than they say: the default and the edges of the range parse."""
    action = action_of(program, flag)
    kind: cli.Number = action.type
    assert action.default is None or action.default in kind
    edges = [kind.high] + ([] if kind.low_open else [kind.low])
    for edge in edges:
        text = str(int(edge)) if kind.integer else repr(float(edge))
        parsed = parser_of(program).parse_args([*required_args(parser_of(program)), flag, text])
        assert getattr(parsed, action.dest) == edge


def test_seed_bound_keeps_faiss_seed_a_c_int():
    assert cli.SEED_MAX + faiss_ops.FAISS_SEED_OFFSET == 2**31 - 1


def test_the_table_covers_every_script():
    programs = {program for program, _, _ in BAD_NUMBERS}
    assert {"sampler.py", "active_sampler.py", "eval_knn.py", "eval_lincls.py", "finetune.py", "trainer_DP.py",
            "tools/export.py"} <= programs
    assert len(CHECKED) >= 60 and len(KINDS) >= 10


# ---------------------------------------------------------------- files: damaged, or of something else

Built = tuple[str, list]  # (program, argv) of the run that must be refused


@dataclass(frozen=True)
class Case:
    """A run that must be refused: `build(tmp_path, capsys)` writes its inputs (and may run scripts to make
    them) and returns the refused run; its one line must contain `names`."""
    id: str
    build: Callable[[Path, object], Built]
    names: str


def run_ok(program: str, argv: list, capsys) -> None:
    status, _, err = call_main(load_program(program).main, argv, capsys)
    assert status == 0, err


def feature_files(tmp: Path, seed: int = 0) -> tuple[Path, Path]:
    rng = np.random.default_rng(seed)
    for name, n in (("train", 60), ("val", 30)):
        labels = rng.integers(0, 3, n)
        feats = rng.standard_normal((n, 8)).astype(np.float32)
        feats[np.arange(n), labels] += 3
        np.savez(tmp / f"{name}{seed}.npz", feats=feats, labels=labels)
    return tmp / f"train{seed}.npz", tmp / f"val{seed}.npz"


def places(tmp: Path) -> list:
    return ["--indices", tmp / "idx", "--save", tmp / "out"]


def select(tmp: Path, capsys, train: Path, *extra) -> None:
    run_ok("sampler.py", ["--feats", train, "--dataset", "cifar10", "--name", "random", "--splits", "20",
                          *places(tmp), *extra], capsys)


def lincls_args(tmp: Path, train: Path, val: Path, *extra) -> list:
    return ["--feats", train, "--val-feats", val, "--dataset", "cifar10", "--name", "random", "--splits", "20",
            "--cached", "--epochs", "2", "-b", "8", *places(tmp), *extra]


def trained_probe(tmp: Path, capsys) -> tuple[Path, Path]:
    """Features, a random pool of 20 and eval_lincls.py's checkpoint for it."""
    train, val = feature_files(tmp)
    select(tmp, capsys, train)
    run_ok("eval_lincls.py", lincls_args(tmp, train, val), capsys)
    return train, val


def resume_after_resampling(tmp: Path, capsys) -> Built:
    train, val = trained_probe(tmp, capsys)
    select(tmp, capsys, train, "--seed", "1")  # the same index file, another pool
    return "eval_lincls.py", lincls_args(tmp, train, val, "--resume")


def resume_onto_other_features(tmp: Path, capsys) -> Built:
    _, val = trained_probe(tmp, capsys)
    other, _ = feature_files(tmp, seed=1)
    return "eval_lincls.py", lincls_args(tmp, other, val, "--resume")


def resume_unrecorded_checkpoint(tmp: Path, capsys) -> Built:
    train, val = trained_probe(tmp, capsys)
    (path,) = [p for p in (tmp / "out").glob("lincls_*.pth") if not p.stem.endswith("_best")]
    saved = torch.load(path, weights_only=True)
    del saved["trained_on"]  # as the versions before the record wrote them
    torch.save(saved, path)
    return "eval_lincls.py", lincls_args(tmp, train, val, "--resume")


def resume_not_a_checkpoint(tmp: Path, capsys) -> Built:
    train, val = feature_files(tmp)
    select(tmp, capsys, train)
    (tmp / "notes.pth").write_text("not a checkpoint\n")
    return "eval_lincls.py", lincls_args(tmp, train, val, "--resume", tmp / "notes.pth")


def evaluator_on_index_of_wrong_size(program: str, entries: int) -> Callable[[Path, object], Built]:
    def build(tmp: Path, capsys) -> Built:
        train, val = feature_files(tmp)
        (tmp / "idx").mkdir()
        np.save(tmp / "idx" / "random_cifar10_20.npy", np.arange(entries, dtype=np.int64))
        return program, ["--feats", train, "--val-feats", val, "--dataset", "cifar10", "--name", "random",
                         "--splits", "20", *places(tmp), *(["--cached"] if program == "eval_lincls.py" else [])]
    return build


def evaluator_on_replaced_index(tmp: Path, capsys) -> Built:
    train, val = feature_files(tmp)
    select(tmp, capsys, train)
    np.save(tmp / "idx" / "random_cifar10_20.npy", np.arange(20, dtype=np.int64))  # its sidecar left as it was
    return "eval_knn.py", ["--feats", train, "--val-feats", val, "--dataset", "cifar10", "--name", "random",
                           "--splits", "20", *places(tmp)]


def val_feats_of_another_width(program: str) -> Callable[[Path, object], Built]:
    """An evaluator, or entropy rounds on cached features, given evaluation features of 5 columns for train
    features of 8."""
    def build(tmp: Path, capsys) -> Built:
        train, _ = feature_files(tmp)
        select(tmp, capsys, train)
        np.savez(tmp / "narrow.npz", feats=np.eye(30, 5, dtype=np.float32), labels=np.arange(30) % 3)
        common = ["--feats", train, "--val-feats", tmp / "narrow.npz", "--dataset", "cifar10", *places(tmp)]
        if program == "active_sampler.py":
            return program, [*common, "--name", "entropy", "--cached", "--epochs", "2", "--splits", "5",
                             "--resume-indices", tmp / "idx" / "random_cifar10_20.npy"]
        return program, [*common, "--name", "random", "--splits", "20",
                         *(["--cached", "--epochs", "2"] if program == "eval_lincls.py" else [])]
    return build


def evaluation_runs(tmp: Path, capsys) -> dict[str, list]:
    """A random pool of 20 on small features and a run of each script that would use it (before its flags
    that name where the output goes, which a case appends)."""
    train, val = feature_files(tmp)
    select(tmp, capsys, train)
    common = ["--feats", train, "--val-feats", val, "--dataset", "cifar10", *places(tmp)]
    return {"sampler.py": ["--feats", train, "--dataset", "cifar10", "--name", "kmeans", "--splits", "5",
                           *places(tmp)],
            "eval_knn.py": [*common, "--name", "random", "--splits", "20"],
            "eval_lincls.py": [*common, "--name", "random", "--splits", "20", "--cached", "--epochs", "2"],
            "active_sampler.py": [*common, "--name", "entropy", "--cached", "--epochs", "2", "--splits", "5",
                                  "--resume-indices", tmp / "idx" / "random_cifar10_20.npy"]}


def output_blocked(program: str, flag: str, place: str) -> Callable[[Path, object], Built]:
    """`program` told to write through `flag` to `place` (under tmp), where a file or a folder stands in
    the way: refused before any work, not after its first files are written."""
    def build(tmp: Path, capsys) -> Built:
        argv = evaluation_runs(tmp, capsys)[program]
        (tmp / "a-file").write_text("not a folder")
        (tmp / "a-folder").mkdir()
        return program, [*argv, flag, tmp / place]
    return build


OUTPUTS_BLOCKED = [("sampler.py", "--indices", "a-file/idx"), ("sampler.py", "--save", "a-file"),
                   ("sampler.py", "--results", "a-folder"), ("sampler.py", "--results", "a-file/r.jsonl"),
                   ("eval_knn.py", "--results", "a-folder"), ("eval_lincls.py", "--save", "a-file/out"),
                   ("eval_lincls.py", "--results", "a-folder"), ("active_sampler.py", "--indices", "a-file/x")]


def too_small_for_the_backbone(tmp: Path, capsys) -> Built:
    """Images of 8 px through AlexNet, whose strides need more."""
    write_image_tree(tmp / "photos" / "train", {"c0": 2, "c1": 2}, size=16)
    return "sampler.py", [tmp / "photos", "--dataset", "folder", "--name", "kmeans", "--splits", "2", "--arch",
                          "alexnet", "--backbone", "random", "--image-size", "8", "-j", "0", *places(tmp)]


def missing_pool_on_images(tmp: Path, capsys) -> Built:
    """Rounds on images from an index file that does not exist: refused before the images are embedded
    (no feature cache is written)."""
    write_image_tree(tmp / "photos" / "train", {"c0": 2, "c1": 2}, size=16)
    return "sampler.py", [tmp / "photos", "--dataset", "folder", "--name", "accu_kmeans", "--splits", "2",
                          "--arch", "resnet18", "--backbone", "random", "--image-size", "16", "-j", "0",
                          "--resume-indices", tmp / "gone.npy", *places(tmp)]


def lt_list_not_utf8(tmp: Path, capsys) -> Built:
    program, argv = lt_list_naming_missing_files(tmp, capsys)
    (tmp / "lt.txt").write_bytes(b"train/c0/img_000.png 0\ntrain/c0/\xe9t\xe9.png 0\n")
    return program, argv


def fashion_mnist_root_missing(tmp: Path, capsys) -> Built:
    """A Fashion-MNIST root that does not exist: refused, never another copy of the data used instead."""
    return "sampler.py", [tmp / "no-such-root", "--dataset", "fashion_mnist", "--name", "random", "--splits", "3",
                          *places(tmp)]


def resume_indices_of_another_dataset(tmp: Path, capsys) -> Built:
    train, _ = feature_files(tmp)
    write_indices(str(tmp / "pool.npy"), np.arange(5), {"strategy": "random", "dataset": "cifar100"})
    return "sampler.py", ["--feats", train, "--dataset", "cifar10", "--name", "accu_kmeans", "--splits", "5",
                          "--resume-indices", tmp / "pool.npy", *places(tmp)]


def export_after_folder_changed(change: str) -> Callable[[Path, object], Built]:
    def build(tmp: Path, capsys) -> Built:
        names = write_photo_folder(tmp / "photos")
        run_ok("sampler.py", [tmp / "photos", "--dataset", "folder", "--name", "random", "--splits", "5",
                              *places(tmp)], capsys)
        chosen = set(np.load(tmp / "idx" / "random_folder_5.npy").tolist())
        unchosen = next(name for i, name in enumerate(names) if i not in chosen)
        if change == "deleted":
            (tmp / "photos" / unchosen).unlink()
        else:
            (tmp / "photos" / "aaa_new.png").write_bytes((tmp / "photos" / unchosen).read_bytes())
        return "tools/export.py", [tmp / "idx" / "random_folder_5.npy", "--data", tmp / "photos", "--out",
                                   tmp / "export"]
    return build


def export_into_a_file(tmp: Path, capsys) -> Built:
    np.save(tmp / "pick.npy", np.array([1, 2], dtype=np.int64))
    write_photo_folder(tmp / "photos")
    (tmp / "out.csv").write_text("")
    return "tools/export.py", [tmp / "pick.npy", "--data", tmp / "photos", "--out", tmp / "out.csv"]


def export_compare_of_another_dataset(tmp: Path, capsys) -> Built:
    write_photo_folder(tmp / "photos")
    write_indices(str(tmp / "pick.npy"), np.array([1, 2]), {"strategy": "kmeans", "dataset": "folder"})
    write_indices(str(tmp / "other.npy"), np.array([3, 4]), {"strategy": "random", "dataset": "cifar10"})
    return "tools/export.py", [tmp / "pick.npy", "--data", tmp / "photos", "--out", tmp / "export",
                               "--compare", tmp / "other.npy"]


class RunsCode:
    """Unpickled by pickle.load, this runs a shell command that creates a file."""

    def __init__(self, witness: Path):
        self.witness = witness

    def __reduce__(self):
        return os.system, (f"touch {self.witness}",)


def cifar_batch_damaged(damage: Callable[[Path, Path], None]) -> Callable[[Path, object], Built]:
    """CIFAR-10 batches, data_batch_3 damaged by `damage(path, tmp)`; the refused run reads the labels."""
    def build(tmp: Path, capsys) -> Built:
        root = write_cifar(tmp / "cifar")
        damage(root / "cifar-10-batches-py" / "data_batch_3", tmp)
        return "sampler.py", [root, "--dataset", "cifar10", "--name", "random", "--splits", "10", *places(tmp)]
    return build


def rewrite_batch(change: Callable[[dict], object]) -> Callable[[Path, Path], None]:
    def damage(path: Path, tmp: Path) -> None:
        path.write_bytes(pickle.dumps(change(pickle.loads(path.read_bytes()))))
    return damage


def truncate(path: Path, tmp: Path) -> None:
    path.write_bytes(path.read_bytes()[:len(path.read_bytes()) // 2])


def fashion_damaged(images: bytes | None = None, labels: bytes | None = None, gz: bool = True
                    ) -> Callable[[Path, object], Built]:
    """Fashion-MNIST IDX files (12 images) with the image or label file's bytes replaced."""
    def build(tmp: Path, capsys) -> Built:
        raw = tmp / "fm" / "FashionMNIST" / "raw"
        raw.mkdir(parents=True)
        files = {"train-images-idx3-ubyte": images if images is not None else idx_bytes(np.zeros((12, 28, 28)), 3),
                 "train-labels-idx1-ubyte": labels if labels is not None else idx_bytes(np.zeros(12), 1)}
        for name, content in files.items():
            if gz:
                (raw / f"{name}.gz").write_bytes(gzip.compress(content))
            else:
                (raw / name).write_bytes(content)
        return "sampler.py", [tmp / "fm", "--dataset", "fashion_mnist", "--name", "random", "--splits", "5",
                              *places(tmp)]
    return build


def idx_bytes(array: np.ndarray, dims: int) -> bytes:
    header = (0x0800 | dims).to_bytes(4, "big") + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    return header + array.astype(np.uint8).tobytes()


def truncated_gzip(tmp: Path, capsys) -> Built:
    program, argv = fashion_damaged()(tmp, capsys)
    path = tmp / "fm" / "FashionMNIST" / "raw" / "train-images-idx3-ubyte.gz"
    path.write_bytes(path.read_bytes()[:-20])
    return program, argv


def folder_with_link_loop(labelled: bool) -> Callable[[Path, object], Built]:
    def build(tmp: Path, capsys) -> Built:
        root = tmp / "photos"
        if labelled:
            write_image_tree(root / "train", {"ant": 3, "bee": 3})
            (root / "train" / "ant" / "again").symlink_to(root / "train")
        else:
            write_photo_folder(root)
            (root / "trip" / "back").symlink_to(root)
        return "sampler.py", [root, "--dataset", "folder", "--name", "random", "--splits", "3", *places(tmp)]
    return build


def lt_list_naming_missing_files(tmp: Path, capsys) -> Built:
    root = tmp / "imagenet"
    write_image_tree(root / "train", {"c0": 3, "c1": 3}, size=16)
    lines = [f"train/c{c}/img_{i:03d}.png {c}" for c in range(2) for i in range(3)] + ["train/c1/gone.png 1"]
    (tmp / "lt.txt").write_text("\n".join(lines) + "\n")
    return "sampler.py", [root, "--dataset", "imagenet_lt", "--lt-list", tmp / "lt.txt", "--name", "kmeans",
                          "--splits", "3", "--arch", "resnet18", "--backbone", "random", "--image-size", "16",
                          "-j", "0", *places(tmp)]


def corrupt_gzip(tmp: Path, capsys) -> Built:
    program, argv = fashion_damaged()(tmp, capsys)
    (tmp / "fm" / "FashionMNIST" / "raw" / "train-images-idx3-ubyte.gz").write_bytes(b"\x1f\x8b\x08\x00garbage" * 50)
    return program, argv


def crafted_pickle(path: Path, tmp: Path) -> None:
    path.write_bytes(pickle.dumps({b"data": np.zeros((4, 3072), np.uint8), b"labels": RunsCode(tmp / "ran")}))


def feats_file_of(feats: np.ndarray, labels: np.ndarray) -> Callable[[Path, object], Built]:
    """sampler.py k-means on a --feats file holding `feats` and `labels`."""
    def build(tmp: Path, capsys) -> Built:
        np.savez(tmp / "odd.npz", feats=feats, labels=labels)
        return "sampler.py", ["--feats", tmp / "odd.npz", "--dataset", "cifar10", "--name", "kmeans",
                              "--splits", "5", *places(tmp)]
    return build


CASES = [
    *(Case(f"{program.split('.')[0]}{flag}-{place.replace('/', '-')}", output_blocked(program, flag, place),
           f"{flag}: ") for program, flag, place in OUTPUTS_BLOCKED),
    Case("splits-with-an-empty-field", lambda tmp, capsys: ("sampler.py", [
        *evaluation_runs(tmp, capsys)["sampler.py"], "--splits", "5,,10"]), "--splits: '5,,10'"),
    Case("lr-schedule-with-an-empty-field", lambda tmp, capsys: ("eval_lincls.py", [
        *evaluation_runs(tmp, capsys)["eval_lincls.py"], "--lr_schedule", "1,,2"]), "--lr_schedule: '1,,2'"),
    Case("feats-label-beyond-the-datasets-classes",
         feats_file_of(np.eye(50, 8, dtype=np.float32), np.arange(50) % 11), "label 10; --dataset cifar10"),
    Case("feats-label-of-a-trillion",  # the linear head would have asked for 32 TB
         feats_file_of(np.eye(50, 8, dtype=np.float32), np.where(np.arange(50) == 7, 10**12, np.arange(50) % 5)),
         "label 1000000000000"),
    Case("image-size-too-small-for-the-arch", too_small_for_the_backbone, "--image-size: the backbone cannot"),
    Case("imagenet-lt-list-not-utf8", lt_list_not_utf8, "is not UTF-8 text"),
    Case("resume-indices-missing-before-embedding", missing_pool_on_images, "--resume-indices"),
    Case("fashion-mnist-root-missing", fashion_mnist_root_missing, "no-such-root"),
    Case("feats-without-columns", feats_file_of(np.zeros((50, 0), np.float32), np.arange(50) % 5),
         "2-D float array (rows x feature columns), got shape (50, 0)"),  # faiss died of SIGFPE on it
    Case("feats-with-negative-labels", feats_file_of(np.eye(50, 8, dtype=np.float32), np.arange(50) % 5 - 2),
         "labels must be class indices"),
    Case("lincls-resume-after-resampling", resume_after_resampling, "--resume"),
    Case("lincls-resume-onto-other-features", resume_onto_other_features, "--resume"),
    Case("lincls-resume-checkpoint-without-record", resume_unrecorded_checkpoint, "--resume"),
    Case("lincls-resume-not-a-checkpoint", resume_not_a_checkpoint, "notes.pth"),
    Case("knn-index-named-20-holds-30", evaluator_on_index_of_wrong_size("eval_knn.py", 30), "random_cifar10_20.npy"),
    Case("lincls-index-named-20-holds-10", evaluator_on_index_of_wrong_size("eval_lincls.py", 10),
         "random_cifar10_20.npy"),
    Case("knn-empty-index", evaluator_on_index_of_wrong_size("eval_knn.py", 0), "holds 0 indices"),
    Case("knn-index-replaced-under-its-sidecar", evaluator_on_replaced_index, "random_cifar10_20.npy"),
    *(Case(f"{program.split('.')[0]}-val-feats-of-another-width", val_feats_of_another_width(program),
           "--val-feats: dimension 5 differs from the train features' 8")
      for program in ("eval_knn.py", "eval_lincls.py", "active_sampler.py")),
    Case("sampler-resume-indices-of-another-dataset", resume_indices_of_another_dataset, "cifar100"),
    Case("export-after-an-unselected-image-deleted", export_after_folder_changed("deleted"), "--data"),
    Case("export-after-an-image-added", export_after_folder_changed("added"), "--data"),
    Case("export-out-is-a-file", export_into_a_file, "--out"),
    Case("export-compare-of-another-dataset", export_compare_of_another_dataset, "--compare"),
    Case("cifar-truncated-batch", cifar_batch_damaged(truncate), "data_batch_3"),
    Case("cifar-text-batch", cifar_batch_damaged(lambda p, t: p.write_text("label,pixels\n1,2\n")), "data_batch_3"),
    Case("cifar-batch-without-labels", cifar_batch_damaged(rewrite_batch(lambda b: {b"data": b[b"data"]})),
         "data_batch_3"),
    Case("cifar-fewer-labels-than-images",
         cifar_batch_damaged(rewrite_batch(lambda b: {**b, b"labels": b[b"labels"][:-3]})), "data_batch_3"),
    Case("cifar-rows-of-the-wrong-size",
         cifar_batch_damaged(rewrite_batch(lambda b: {**b, b"data": b[b"data"][:, :3000]})), "data_batch_3"),
    Case("cifar-label-out-of-range",
         cifar_batch_damaged(rewrite_batch(lambda b: {**b, b"labels": [10] + b[b"labels"][1:]})), "data_batch_3"),
    Case("cifar-batch-not-a-dict", cifar_batch_damaged(rewrite_batch(lambda b: [b[b"data"]])), "data_batch_3"),
    Case("cifar-batch-that-runs-code", cifar_batch_damaged(crafted_pickle), "data_batch_3"),
    Case("fashion-truncated-gzip", truncated_gzip, "train-images-idx3-ubyte.gz"),
    Case("fashion-corrupt-gzip", corrupt_gzip, "train-images-idx3-ubyte.gz"),
    Case("fashion-wrong-magic", fashion_damaged(images=idx_bytes(np.zeros((12, 28, 28)), 1)[:8] + bytes(12 * 784)),
         "train-images-idx3-ubyte.gz"),
    Case("fashion-truncated-idx", fashion_damaged(images=idx_bytes(np.zeros((12, 28, 28)), 3)[:-100], gz=False),
         "train-images-idx3-ubyte"),
    Case("fashion-more-images-than-labels", fashion_damaged(labels=idx_bytes(np.zeros(9), 1)),
         "train-labels-idx1-ubyte.gz"),
    Case("fashion-label-out-of-range", fashion_damaged(labels=idx_bytes(np.full(12, 10), 1)),
         "train-labels-idx1-ubyte.gz"),
    Case("unlabelled-folder-with-a-link-loop", folder_with_link_loop(labelled=False), "back"),
    Case("class-folder-with-a-link-loop", folder_with_link_loop(labelled=True), "again"),
    Case("imagenet-lt-list-naming-a-missing-file", lt_list_naming_missing_files, "gone.png"),
]


@pytest.mark.parametrize("case", CASES, ids=[case.id for case in CASES])
def test_wrong_or_damaged_file_is_one_line_and_writes_nothing(case, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    program, argv = case.build(tmp_path, capsys)
    capsys.readouterr()
    before = files_under(tmp_path)
    status, _, err = call_main(load_program(program).main, argv, capsys)
    assert_refused(status, err, case.names)
    assert files_under(tmp_path) == before
