"""Helpers the test modules share (fixtures stay in conftest.py)."""
from __future__ import annotations

import argparse
import dataclasses
import gzip
import importlib
import os
import pickle
import runpy
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import numpy as np
import timm
import torch
import torchvision
from PIL import Image

from lowbudget.herding import HerdingGreedy, HerdingKernel, herding_kernel
from lowbudget.selection import Selection


def herding(kernel: HerdingKernel, labeled: np.ndarray, budget: int, weights: np.ndarray | None = None, *,
            seed: int = 0) -> Selection:
    """`budget` picks of the herding greedy from `labeled` on `kernel` (weights None: MaxHerding), as
    strategies.MaxHerding and strategies.uherding_select take them."""
    return HerdingGreedy(kernel, labeled, weights).take(budget, seed)


REPO = Path(__file__).resolve().parents[1]


def load_program(path: str) -> ModuleType:
    """The program at `path` under the repository ('sampler.py', 'tools/report.py') as its installed module."""
    return importlib.import_module(path.removesuffix(".py").replace("/", "."))


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


def write_image_tree(root: Path, classes: dict[str, int], size: int = 40, seed: int = 0) -> Path:
    """root/<class>/<i>.png with random colour images."""
    rng = np.random.default_rng(seed)
    for cls, count in classes.items():
        (root / cls).mkdir(parents=True, exist_ok=True)
        for i in range(count):
            pixels = rng.integers(0, 256, (size, size + 8, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / cls / f"img_{i:03d}.png")
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


def torchrun(script, *args):
    """`torchrun --standalone --nproc_per_node 2 script args` on CPU, one thread per process."""
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           str(REPO / script), *map(str, args)], env=env, capture_output=True, text=True, timeout=300,
                          check=False)


def write_feats(tmp_path, n_train=400, n_val=200, classes=4, seed=0, separable=True):
    """Feature files whose class decides a block of coordinates: linearly separable."""
    rng = np.random.default_rng(seed)
    def make(n):
        labels = rng.integers(0, classes, n)
        feats = rng.standard_normal((n, 16)).astype(np.float32) * 0.3
        if separable:
            feats[np.arange(n), labels] += 3
        return feats, labels
    (tf, tl), (vf, vl) = make(n_train), make(n_val)
    np.savez(tmp_path / "train.npz", feats=tf, labels=tl)
    np.savez(tmp_path / "val.npz", feats=vf, labels=vl)
    return tmp_path / "train.npz", tmp_path / "val.npz"


def args_for(tmp_path, train, val, *extra):
    return ["--feats", train, "--val-feats", val, "--dataset", "cifar10", "--cached", "--epochs", "3", "-p", "1",
            "-b", "16", "--indices", tmp_path / "idx", "--save", tmp_path / "out", *extra]


def save_timm_resnet18(path, seed: int = 0):
    """A state dict of timm's resnet18 with seeded random weights, saved at `path`."""
    torch.manual_seed(seed)
    torch.save(timm.create_model("resnet18", pretrained=False).state_dict(), path)
    return path


def write_idx(path, array, magic):
    header = magic.to_bytes(4, "big") + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def assert_valid(indices, budget, n, exclude=()):
    assert indices.dtype == np.int64 and indices.ndim == 1
    assert len(indices) == budget
    assert len(np.unique(indices)) == budget
    assert indices.min() >= 0 and indices.max() < n
    assert not np.intersect1d(indices, np.asarray(exclude, dtype=np.int64)).size


def dense_herding_gains(x, bandwidth, labeled, picks, weights=None):
    """The dense herding greedy in float64 (the N x N kernel k(a, b) = exp(-|a - b|^2 / h^2)) replaying
    `picks`: before each pick and after the last, every row's gain (-inf where not a candidate) and its
    slack, the float32 rounding that lowbudget.herding allows a gain of the kernel it computes."""
    x64 = x.astype(np.float64)
    kernel = np.exp(-((x64[:, None, :] - x64[None, :, :]) ** 2).sum(-1) / bandwidth ** 2)
    u = np.ones(len(x)) if weights is None else np.array(weights, dtype=np.float64)
    u[labeled] = 0
    slack = herding_kernel(x, bandwidth).rounding * (kernel @ u)
    cover = kernel[:, labeled].max(1) if len(labeled) else np.zeros(len(x))
    eligible = np.ones(len(x), dtype=bool)
    eligible[labeled] = False
    for pick in [*picks, None]:
        yield np.where(eligible, (np.maximum(kernel - cover[None, :], 0) * u[None, :]).sum(1), -np.inf), slack
        if pick is not None:
            eligible[pick] = False
            cover = np.maximum(cover, kernel[pick])


def assert_herding_greedy(x, bandwidth, labeled, selection: Selection, weights=None) -> None:
    """Each greedy pick of `selection` is the row of largest float64 gain up to float32 rounding: a near-tie
    may go either way, so its gain lies within twice the largest one's slack (the tie window, plus
    rounding); the fill starts only once every gain is within that of zero."""
    greedy = selection.indices[:len(selection.indices) - selection.filled]
    steps = list(dense_herding_gains(x, bandwidth, labeled, greedy, weights))
    for step, ((gain, slack), pick) in enumerate(zip(steps[:-1], greedy, strict=True)):
        best = int(np.argmax(gain))
        assert gain[pick] >= gain[best] - 2 * slack[best], f"pick {step}: {pick} where {best} gains more"
    gain, slack = steps[-1]
    best = int(np.argmax(gain))
    assert selection.filled == 0 or gain[best] <= 2 * slack[best], f"filled while {best} adds coverage"


def herding_margins(x, bandwidth, labeled, picks, weights=None) -> np.ndarray:
    """For each of `picks`, how far the float64 runner-up gain lies below the largest, in units of the
    largest one's slack: above 3 (the tie window plus both gains' rounding), any code path takes the same row."""
    margins = []
    for gain, slack in list(dense_herding_gains(x, bandwidth, labeled, picks, weights))[:-1]:
        first, second = np.argsort(-gain, kind="stable")[:2]
        margins.append((gain[first] - gain[second]) / slack[first])
    return np.array(margins)


def small_blocks(kernel, rows=7):
    """The same kernel computed `rows` kernel rows at a time: the blocked gains and updates both exercised."""
    return dataclasses.replace(kernel, block_elements=rows * kernel.num_rows)
