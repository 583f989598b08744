"""Shared fixtures: small synthetic datasets in the original formats, checkpoints, script runners (in this
process or a new one), one thread per process."""
from __future__ import annotations

import os
from pathlib import Path

import faiss
import pytest
import torch

from tests.helpers import run_cli, run_script, write_cifar, write_image_tree


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


@pytest.fixture
def cifar10_root(tmp_path) -> Path:
    return write_cifar(tmp_path / "cifar")


@pytest.fixture
def folder_root(tmp_path) -> Path:
    """An ImageFolder-style dataset: train/<class>/..., val/<class>/..."""
    root = tmp_path / "folder"
    write_image_tree(root / "train", {"ant": 6, "bee": 4, "cat": 5})
    write_image_tree(root / "val", {"ant": 2, "bee": 2, "cat": 2}, seed=1)
    return root


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


