"""Linear probe: wall time of --cached against the original protocol, and their accuracy on real data.

Run from the repository root:

    .venv/bin/python benchmarks/bench_lincls.py [--epochs 40] [--skip-real]

1. Speed: a synthetic CIFAR-10-format set (5,000 train / 1,000 test images), a random ResNet-18,
   a random labelled pool of 1,000; eval_lincls.py with the same flags, once with --cached and once
   with the default protocol (frozen backbone on augmented images every epoch). Features are cached
   beforehand, so both times are the training and validation alone. Target: ratio >= 50x.
2. Accuracy on real images: Fashion-MNIST (Debian's dataset-fashion-mnist, or --fashion DIR), a
   subset written to a temporary folder in the same IDX format, a random ResNet-18 (no pretrained
   ResNet installs offline), the random and k-means pools of --budget images; top-1 of both modes
   side by side.
"""
from __future__ import annotations

import argparse
import contextlib
import gzip
import io
import pickle
import tempfile
import time
from pathlib import Path

import numpy as np

import eval_lincls
import sampler
from lowbudget import datasets


def quiet(main, args: list) -> float:
    """Run a script's main with its output swallowed: wall seconds."""
    start = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        main([str(a) for a in args])
    return time.perf_counter() - start


def synthetic_cifar(root: Path, n_train: int, n_test: int) -> None:
    """CIFAR-10 python batches of random images."""
    rng = np.random.default_rng(0)
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    for i, part in enumerate(np.array_split(np.arange(n_train), 5), 1):
        batch = {b"data": rng.integers(0, 256, (len(part), 3072), dtype=np.uint8),
                 b"labels": rng.integers(0, 10, len(part)).tolist()}
        (folder / f"data_batch_{i}").write_bytes(pickle.dumps(batch))
    test = {b"data": rng.integers(0, 256, (n_test, 3072), dtype=np.uint8),
            b"labels": rng.integers(0, 10, n_test).tolist()}
    (folder / "test_batch").write_bytes(pickle.dumps(test))


def fashion_subset(source: str, root: Path, n_train: int, n_test: int) -> None:
    """The first n_train / n_test Fashion-MNIST images, as IDX files under root/FashionMNIST/raw."""
    raw = root / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    for split, n in (("train", n_train), ("val", n_test)):
        images = datasets.load_fashion_mnist(source, split)
        image_name, label_name = datasets.FASHION_FILES[split]
        pixels = images.images[:n, 0]
        with gzip.open(raw / (image_name + ".gz"), "wb") as f:
            f.write((2051).to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in pixels.shape) + pixels.tobytes())
        with gzip.open(raw / (label_name + ".gz"), "wb") as f:
            f.write((2049).to_bytes(4, "big") + n.to_bytes(4, "big") + images.labels[:n].astype(np.uint8).tobytes())


def common(root: Path, dataset: str, work: Path) -> list:
    return [root, "--dataset", dataset, "--arch", "resnet18", "--backbone", "random", "-j", "2",
            "--save", work / "out", "--indices", work / "idx", "--load_cache", "--results", work / "results.jsonl"]


def probe(root: Path, dataset: str, work: Path, name: str, budget: int, epochs: int, cached: bool) -> float:
    """eval_lincls.py's wall time for one pool."""
    args = common(root, dataset, work) + ["--name", name, "--splits", budget, "--epochs", epochs,
                                          "--lr_schedule", f"{epochs // 2},{3 * epochs // 4}", "-b", "128"]
    return quiet(eval_lincls.main, args + (["--cached"] if cached else []))


def final_top1(work: Path, name: str, mode: str) -> float:
    import json
    rows = [json.loads(line) for line in (work / "results.jsonl").read_text().splitlines()]
    return [r["value"] for r in rows
            if r["name"] == name and r.get("mode") == mode and r["metric"] == "lincls_top1"][-1]


def bench_speed(work: Path, epochs: int) -> None:
    root = work / "cifar"
    synthetic_cifar(root, 5000, 1000)
    quiet(sampler.main, common(root, "cifar10", work) + ["--name", "random", "--splits", "1000"])
    quiet(eval_lincls.main, common(root, "cifar10", work) + ["--name", "random", "--splits", "1000", "--cached",
                                                             "--epochs", "1"])  # caches train and val features
    cached = probe(root, "cifar10", work, "random", 1000, epochs, cached=True)
    images = probe(root, "cifar10", work, "random", 1000, epochs, cached=False)
    print(f"synthetic CIFAR-10, 1,000 labelled, {epochs} epochs: default protocol {images:.1f} s, "
          f"--cached {cached:.2f} s, ratio {images / cached:.0f}x (target >= 50x)")


def bench_real(work: Path, source: str, epochs: int, budget: int) -> None:
    root = work / "fashion"
    fashion_subset(source, root, 10000, 2000)
    for name in ("random", "kmeans"):
        quiet(sampler.main, common(root, "fashion_mnist", work) + ["--name", name, "--splits", budget])
        for cached in (True, False):
            probe(root, "fashion_mnist", work, name, budget, epochs, cached)
        print(f"Fashion-MNIST (10,000 pool / 2,000 test), random ResNet-18, {name} {budget} labels, {epochs} epochs: "
              f"top-1 default protocol {final_top1(work, name, 'images'):.1f}%, "
              f"--cached {final_top1(work, name, 'cached'):.1f}%")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--budget", type=int, default=500, help="labelled pool on Fashion-MNIST")
    parser.add_argument("--fashion", default=datasets.DEBIAN_FASHION_DIR, help="Fashion-MNIST IDX folder")
    parser.add_argument("--skip-real", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        bench_speed(Path(tmp) / "speed", args.epochs)
        if not args.skip_real:
            bench_real(Path(tmp) / "real", args.fashion, args.epochs, args.budget)


if __name__ == "__main__":
    main()
