"""Shared fixtures: small synthetic datasets in the original formats, checkpoints, script runners (in this
process or a new one), one thread per process."""
from __future__ import annotations

import argparse
import os
import pickle
import runpy
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import faiss
import numpy as np
import pytest
import torch
import torchvision
from PIL import Image

REPO = Path(__file__).resolve().parents[1]


def pytest_configure(config):
    """One thread per process (here and in the scripts the tests start) unless OMP_NUM_THREADS says
    otherwise: on the tests' tiny inputs a second thread gains nothing, and costs much on a busy machine."""
    if "OMP_NUM_THREADS" not in os.environ:
        os.environ["OMP_NUM_THREADS"] = "1"
        torch.set_num_threads(1)
        faiss.omp_set_num_threads(1)


@pytest.fixture(autouse=True)
def _isolated_torch_home(tmp_path, monkeypatch):
    """No test may touch the user's torch cache or download anything."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))


def write_cifar(root: Path, name: str = "cifar10", n_train: int = 200, n_test: int = 50, seed: int = 0) -> Path:
    """CIFAR python pickle batches exactly as torchvision's download unpacks them."""
    rng = np.random.default_rng(seed)
    classes = 10 if name == "cifar10" else 100
    if name == "cifar10":
        folder = root / "cifar-10-batches-py"
        folder.mkdir(parents=True)
        per_batch = np.array_split(np.arange(n_train), 5)
        for i, part in enumerate(per_batch, 1):
            batch = {b"data": rng.integers(0, 256, (len(part), 3072), dtype=np.uint8),
                     b"labels": [int(x) for x in rng.integers(0, classes, len(part))]}
            (folder / f"data_batch_{i}").write_bytes(pickle.dumps(batch))
        test = {b"data": rng.integers(0, 256, (n_test, 3072), dtype=np.uint8),
                b"labels": [int(x) for x in rng.integers(0, classes, n_test)]}
        (folder / "test_batch").write_bytes(pickle.dumps(test))
    else:
        folder = root / "cifar-100-python"
        folder.mkdir(parents=True)
        for split, n in (("train", n_train), ("test", n_test)):
            batch = {b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
                     b"fine_labels": [int(x) for x in rng.integers(0, classes, n)],
                     b"coarse_labels": [int(x) for x in rng.integers(0, 20, n)]}
            (folder / split).write_bytes(pickle.dumps(batch))
    return root


@pytest.fixture
def cifar10_root(tmp_path) -> Path:
    return write_cifar(tmp_path / "cifar")


def write_image_tree(root: Path, classes: dict[str, int], size: int = 40, seed: int = 0) -> Path:
    """root/<class>/<i>.png with random colour images."""
    rng = np.random.default_rng(seed)
    for cls, count in classes.items():
        (root / cls).mkdir(parents=True, exist_ok=True)
        for i in range(count):
            pixels = rng.integers(0, 256, (size, size + 8, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / cls / f"img_{i:03d}.png")
    return root


@pytest.fixture
def folder_root(tmp_path) -> Path:
    """An ImageFolder-style dataset: train/<class>/..., val/<class>/..."""
    root = tmp_path / "folder"
    write_image_tree(root / "train", {"ant": 6, "bee": 4, "cat": 5})
    write_image_tree(root / "val", {"ant": 2, "bee": 2, "cat": 2}, seed=1)
    return root


def resnet_backbone_state(arch: str = "resnet18", seed: int = 0) -> dict[str, torch.Tensor]:
    """A random torchvision resnet's state dict without its fc layer."""
    torch.manual_seed(seed)
    model = torchvision.models.get_model(arch, weights=None)
    return {k: v for k, v in model.state_dict().items() if not k.startswith("fc.")}


def compress_checkpoint(state: dict, head_dim: int | None = 2048, key: str = "model",
                        prefix: str = "module.") -> dict:
    """CompRess format: {'opt': Namespace, 'model': DataParallel keys (+ projection head), ...}."""
    weights = {prefix + k: v.clone() for k, v in state.items()}
    if head_dim is not None:
        feat = state["layer4.1.bn2.weight"].shape[0] if "layer4.1.bn2.weight" in state else 2048
        weights[prefix + "fc.weight"] = torch.randn(head_dim, feat)
        weights[prefix + "fc.bias"] = torch.randn(head_dim)
    return {"opt": argparse.Namespace(arch="resnet18", lr=0.05, teacher="moco"), key: weights,
            "optimizer": {"state": {}, "param_groups": [{"lr": 0.05, "params": [0, 1]}]}, "epoch": 130}


def moco_checkpoint(state: dict) -> dict:
    """MoCo v2 format: state_dict with module.encoder_q.* (+ MLP head), encoder_k, queue."""
    sd = {}
    for k, v in state.items():
        sd["module.encoder_q." + k] = v.clone()
        sd["module.encoder_k." + k] = torch.randn_like(v.float()).to(v.dtype)
    sd["module.encoder_q.fc.0.weight"] = torch.randn(2048, 2048)
    sd["module.encoder_q.fc.0.bias"] = torch.randn(2048)
    sd["module.encoder_q.fc.2.weight"] = torch.randn(128, 2048)
    sd["module.encoder_q.fc.2.bias"] = torch.randn(128)
    sd["module.queue"] = torch.randn(128, 16)
    sd["module.queue_ptr"] = torch.zeros(1, dtype=torch.long)
    return {"epoch": 800, "arch": "resnet50", "state_dict": sd,
            "optimizer": {"state": {}, "param_groups": [{"lr": 0.03, "params": [0]}]}}


def run_cli(script: str, *args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """Run one of the repository's scripts as a user would, capturing output."""
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.run([sys.executable, str(REPO / script), *map(str, args)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600)


def exit_status_and_output(run: Callable[[], object], capsys) -> tuple[int, str, str]:
    """Call `run` and read its exit as a process's: (status, out, err)."""
    try:
        run()
        status = 0
    except SystemExit as exit_:
        status = exit_.code if isinstance(exit_.code, int) else 1
    out, err = capsys.readouterr()
    return status, out, err


def call_main(main, args, capsys) -> tuple[int, str, str]:
    """Run a script's main in-process through the same error handling as the CLI: (status, out, err)."""
    from lowbudget.cli import run_main
    return exit_status_and_output(lambda: run_main(main, [str(a) for a in args]), capsys)


def run_script(script: str, args, capsys, monkeypatch) -> tuple[int, str, str]:
    """Run one of the repository's scripts in this process as `python script args` runs it, through its
    `__main__` block: (status, out, err)."""
    path = str(REPO / script)
    monkeypatch.setattr(sys, "argv", [path, *map(str, args)])
    return exit_status_and_output(lambda: runpy.run_path(path, run_name="__main__"), capsys)


@pytest.fixture(params=["in_process", pytest.param("new_process", marks=pytest.mark.slow)])
def script_run(request, capsys, monkeypatch):
    """Run a repository script as a user runs it: through its `__main__` block in this process, or in a
    new process (slow). Called as script_run(script, *args) -> (status, out, err)."""
    def run(script: str, *args) -> tuple[int, str, str]:
        if request.param == "in_process":
            return run_script(script, args, capsys, monkeypatch)
        done = run_cli(script, *args)
        return done.returncode, done.stdout, done.stderr
    return run


def unit_rows(n: int, d: int, seed: int = 0) -> np.ndarray:
    """n random L2-normalised float32 rows."""
    x = np.random.default_rng(seed).standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def write_photo_folder(root: Path, seed: int = 0) -> list[str]:
    """An unlabelled folder as a practitioner has one: 30 image files of varied sizes, many in nested
    folders (one with an upper-case extension), one of them a corrupt .jpg, plus a .txt file and a
    hidden image, which are not indexed. Returns the image files' relative paths, sorted."""
    rng = np.random.default_rng(seed)
    names = ([f"img_{i:02d}.png" for i in range(9)] + [f"trip/day1/photo_{i}.jpg" for i in range(8)]
             + [f"trip/day2/shot_{i}.png" for i in range(6)] + ["trip/day2/SHOT_UPPER.JPG"]
             + [f"scans/page_{i}.bmp" for i in range(5)])
    for k, name in enumerate(names):
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        height, width = 24 + 4 * (k % 5), 40 - 3 * (k % 4)
        Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(path)
    (root / "broken.jpg").write_bytes(b"\xff\xd8 this is not really a jpeg" + bytes(range(256)))
    (root / "notes.txt").write_text("not an image\n")
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(root / ".hidden.png")
    return sorted(names + ["broken.jpg"])
