"""Cost of the feature cache's digest check at ImageNet scale, against what the selection costs.

Run from the repository root:

    .venv/bin/python benchmarks/bench_cache_digest.py [--rows N] [--dim D] [--clusters K] [--kmeans-rows N]
        [--repeats N] [--dir DIR]

Builds 1,281,167 x 512 seeded float32 unit rows (2.6 GB), writes them as a feature cache with
`features.write_cache` (which stores their digest) into --dir (default: a temporary folder, removed at
the end), then times, each the best of --repeats runs in this one process:

1. hashlib's digests over 256 MiB of the rows (SHA-256, BLAKE2b, SHA-1, MD5; xxhash where installed):
   GB/s, the reason the cache uses SHA-256.
2. reading the cache's feature bytes once, a block of rows at a time into one buffer: the floor of any
   pass over the file.
3. `features.read_cache`: opening the cache and checking its digest, i.e. what `--load_cache` costs.
4. one k-means iteration at that scale: every row assigned to the nearest of --clusters (1,000)
   centroids by faiss' exact inner-product search, the step each of sampler.py's k-means iterations
   runs; sampler.py's k-means runs niter x nredo (20 x 5 = 100) of them. Its cost is linear in the rows,
   so it is timed on the first --kmeans-rows rows (128,000, a tenth) and scaled to all of them.

Prints the digest check's time and its ratio to 2, to 4 and to the 100 iterations of k-means. The file
is in the operating system's cache, as it is after being written or read once: a cache read from disk
costs that read whether or not it is checked, so the digest's own cost is the hashing measured here.
"""
from __future__ import annotations

import argparse
import hashlib
import importlib.util
import os
import tempfile
import time
from collections.abc import Callable
from typing import Any

import faiss
import numpy as np

from lowbudget import faiss_ops
from lowbudget.feature_files import BLOCK_BYTES, stored_npz_member
from lowbudget.features import read_cache, write_cache

IMAGENET_ROWS = 1_281_167
SAMPLE_BYTES = 256 << 20  # hashed by each digest of part 1
KMEANS_ITERATIONS = faiss_ops.KmeansSettings().niter * faiss_ops.KmeansSettings().nredo
GB = 1e9


def unit_rows(rows: int, dim: int, seed: int = 0) -> np.ndarray:
    """Seeded float32 rows of unit L2 norm, filled a block at a time (no float64 copy)."""
    rng = np.random.default_rng(seed)
    feats = np.empty((rows, dim), np.float32)
    step = max(1, BLOCK_BYTES // (4 * dim))
    for start in range(0, rows, step):
        block = feats[start:start + step]
        rng.standard_normal(out=block, dtype=np.float32)
        block /= np.linalg.norm(block, axis=1, keepdims=True)
    return feats


def best_seconds(repeats: int, fn: Callable[[], Any]) -> tuple[Any, float]:
    """(fn's last result, its fastest wall time over `repeats` runs)."""
    best, result = float("inf"), None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - start)
    return result, best


def digest_speeds(feats: np.ndarray, repeats: int) -> dict[str, float]:
    """GB/s of each candidate digest over the first SAMPLE_BYTES of `feats`."""
    sample = feats.reshape(-1).view(np.uint8)[:SAMPLE_BYTES]
    hashers: dict[str, Callable[[Any], Any]] = {name: getattr(hashlib, name) for name in
                                                ("sha256", "blake2b", "sha1", "md5")}
    if importlib.util.find_spec("xxhash") is not None:
        import xxhash
        hashers["xxh3_128"] = xxhash.xxh3_128

    def speed(make: Callable[[Any], Any]) -> float:
        return sample.nbytes / best_seconds(repeats, lambda: make(sample.data).digest())[1] / GB
    return {name: speed(make) for name, make in hashers.items()}


def read_once(path: str) -> int:
    """Read the cache's feature bytes once, a block of rows at a time: the bytes read."""
    stored = stored_npz_member(path, "feats")
    assert stored is not None
    rows = max(1, BLOCK_BYTES // (stored.dtype.itemsize * stored.shape[1]))
    return sum(block.nbytes for _, block in stored.blocks(rows))


def kmeans_iteration(feats: np.ndarray, clusters: int, rows: int, seed: int = 0) -> float:
    """Seconds of one k-means assignment step over all of `feats` (each row's nearest of `clusters` centroids,
    drawn from the rows), timed on its first `rows` rows and scaled to all."""
    centroids = feats[np.sort(np.random.default_rng(seed).choice(len(feats), clusters, replace=False))]
    index = faiss.IndexFlatIP(feats.shape[1])
    index.add(np.ascontiguousarray(centroids))
    part = np.ascontiguousarray(feats[:rows])
    start = time.perf_counter()
    index.search(part, 1)
    return (time.perf_counter() - start) * len(feats) / len(part)


def write_timed(path: str, rows: int, dim: int) -> float:
    """Seconds write_cache takes for seeded unit rows (their digest included)."""
    feats = unit_rows(rows, dim)
    _, seconds = best_seconds(1, lambda: write_cache(path, feats, None, np.zeros(0, np.int64),
                                                     {"dataset": "benchmark", "num_images": rows}))
    return seconds


def load_and_select_timed(path: str, args: argparse.Namespace) -> tuple[float, float]:
    """(seconds read_cache takes with its digest check, seconds of one k-means iteration on what it read)."""
    meta = {"dataset": "benchmark", "num_images": args.rows}
    loaded, seconds = best_seconds(args.repeats, lambda: read_cache(path, meta, labeled=False))
    assert loaded is not None, "the cache did not pass its own digest"
    return seconds, kmeans_iteration(loaded[0], args.clusters, min(args.kmeans_rows, args.rows))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=IMAGENET_ROWS)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--clusters", type=int, default=1000, help="k-means clusters (the budget)")
    parser.add_argument("--kmeans-rows", type=int, default=128_000, help="rows the k-means iteration is timed on")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dir", default=None, help="folder for the cache file (default: a temporary one)")
    args = parser.parse_args()
    print(f"{args.rows:,} x {args.dim} float32 ({args.rows * args.dim * 4 / GB:.2f} GB); "
          f"faiss threads {faiss.omp_get_max_threads()}; load average {os.getloadavg()[0]:.2f}")
    for name, speed in digest_speeds(unit_rows(SAMPLE_BYTES // (4 * args.dim), args.dim), args.repeats).items():
        print(f"  {name:>9}: {speed:.2f} GB/s")
    with tempfile.TemporaryDirectory(dir=args.dir) as folder:
        path = os.path.join(folder, "feats.npz")
        write_s = write_timed(path, args.rows, args.dim)
        _, read_s = best_seconds(args.repeats, lambda: read_once(path))
        check_s, iteration_s = load_and_select_timed(path, args)
    kmeans_s = iteration_s * KMEANS_ITERATIONS
    print(f"write_cache, its digest included:    {write_s:7.2f} s")
    print(f"reading the feature bytes once:       {read_s:7.2f} s")
    print(f"read_cache with its digest check:     {check_s:7.2f} s  ({check_s / read_s:.1f}x reading once)")
    print(f"one k-means iteration, {args.clusters} clusters: {iteration_s:7.2f} s  "
          f"(digest check {check_s / iteration_s:.2f}x one iteration)")
    print(f"sampler.py's k-means, {KMEANS_ITERATIONS} iterations: {kmeans_s:7.1f} s  "
          f"(digest check {100 * check_s / kmeans_s:.2f} % of it)")


if __name__ == "__main__":
    main()
