"""Speed and memory of the samplers on synthetic features.

Run from the repository root:

    .venv/bin/python benchmarks/bench_strategies.py [--quick] [--skip-imagenet] [--threads N]

Features are L2-normalised float32 rows of a seeded Gaussian mixture: 1,000 random unit centres
with uneven (log-normal) weights, isotropic noise added, every row scaled to unit norm. What is
printed:

1. Core-set speed-up, 50,000 x 512, 500 picks from a 1,000-point random pool:
   `strategies.coreset_select` against a plain re-statement of the original per-point loop (a new
   one-point faiss index per pick, then a Python loop over every unlabelled point). That loop is
   slow, so it runs only a few picks (20; 5 with --quick) and its time is extrapolated linearly to
   500 picks; the first picks of both are compared.
2. k-means overhead, 50,000 x 512, budget 1,000 (20,000 x 512, budget 200 with --quick): total
   time of `strategies.kmeans_select` over faiss k-means training alone with the same settings
   (niter 20, nredo 5, seed 1234, no subsampling). Target: ratio <= 1.10.
3. ImageNet scale (not with --quick or --skip-imagenet): 1,281,167 x 512 features (2.6 GB),
   `coreset_select` with 13,000 picks from a 1,000 random pool and `kmeans_select` with budget
   1,000. Each step runs in its own freshly spawned process that builds the features itself, so its
   peak RSS (VmHWM of that process) holds the matrix exactly once; printed as a multiple of the
   matrix size. Target: peak <= 1.5 x matrix. On a 2-core CPU these steps take long (core-set about
   0.15 s a pick, about 35 min in all; k-means about 15 min); --imagenet-rows, --coreset-picks,
   --imagenet-steps and --imagenet-only (leave out parts 1 and 2) make smaller runs.
4. Low-budget strategies, 50,000 x 512 (20,000 x 512 with --quick), budget 100 from an empty pool,
   each in its own spawned process (time and peak RSS): TypiClust (target <= 30 s), ProbCover with δ
   chosen by the purity heuristic under 10 pseudo-classes (target <= 60 s and <= 4 GB peak) and
   MaxHerding with 100-neighbour kernel truncation (target <= 60 s). Each is also printed as a
   ratio to k-means with the same budget, timed in the same way in the same run.

Parts 1 and 2 report the best of --repeats runs (default 3; the two sides of a ratio interleaved),
which damps the effect of other processes on a small machine; the header shows the load average.
"""
from __future__ import annotations

import argparse
import multiprocessing
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import torch

from lowbudget import faiss_ops, strategies

DIM = 512
CENTRES = 1000
NOISE = 0.03  # per-coordinate noise: noise norm ~0.7 against unit centres, cosine to centre ~0.8
BLOCK_ROWS = 16384  # features are generated in blocks of this many rows, in place
POOL_SIZE = 1000  # random initial labelled pool of the core-set runs
GIB = 2 ** 30


# ---------------------------------------------------------------- helpers

def synthetic_features(rows: int, seed: int, dim: int = DIM) -> np.ndarray:
    """Unit-norm float32 rows of a Gaussian mixture, filled block by block into one array."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((CENTRES, dim), dtype=np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    weights = rng.lognormal(size=CENTRES)
    weights /= weights.sum()
    feats = np.empty((rows, dim), dtype=np.float32)
    for start in range(0, rows, BLOCK_ROWS):
        block = feats[start:start + BLOCK_ROWS]
        rng.standard_normal(out=block, dtype=np.float32)
        block *= NOISE
        block += centres[rng.choice(CENTRES, size=len(block), p=weights)]
        block /= np.linalg.norm(block, axis=1, keepdims=True)
    return feats


def timed(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> tuple[Any, float]:
    """(fn's result, wall seconds)."""
    start = time.perf_counter()
    result = fn(*args, **kwargs)
    return result, time.perf_counter() - start


def best_of(repeats: int, *fns: Callable[[], Any]) -> list[tuple[Any, float]]:
    """Run the zero-argument `fns` in turn, `repeats` rounds; per fn (result, seconds) of its fastest run."""
    best: list[tuple[Any, float]] = [(None, float("inf"))] * len(fns)
    for _ in range(repeats):
        for i, fn in enumerate(fns):
            run = timed(fn)
            best[i] = min(best[i], run, key=lambda pair: pair[1])
    return best


def set_threads(threads: int | None) -> None:
    """Pin faiss' OpenMP and torch's intra-op threads when asked; otherwise keep the defaults."""
    if threads:
        faiss.omp_set_num_threads(threads)
        torch.set_num_threads(threads)


def memory_status(field: str) -> int:
    """A size field of /proc/self/status (VmRSS: current RSS, VmHWM: peak RSS of this process) in bytes.

    VmHWM belongs to the process' own address space, unlike ru_maxrss, which after fork + exec can
    report the parent's peak."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def header() -> str:
    return (f"numpy {np.__version__}, torch {torch.__version__}, faiss {faiss.__version__}; "
            f"{os.cpu_count()} CPUs, torch threads {torch.get_num_threads()}, "
            f"faiss threads {faiss.omp_get_max_threads()}; load average {os.getloadavg()[0]:.2f}")


# ---------------------------------------------------------------- 1. core-set

def original_coreset(feats: np.ndarray, labeled: np.ndarray, picks: int) -> tuple[np.ndarray, float, float]:
    """The original greedy k-center, per-point loop and all, for `picks` picks.

    Returns (picked dataset indices, seconds of the initial search, seconds per pick)."""
    start = time.perf_counter()
    unlabeled = np.setdiff1d(np.arange(len(feats)), labeled)
    pool = feats[unlabeled]
    index = faiss.IndexFlatL2(feats.shape[1])
    index.add(feats[labeled])
    min_distance = index.search(pool, 1)[0][:, 0]
    setup = time.perf_counter() - start

    chosen = []
    start = time.perf_counter()
    for _ in range(picks):
        i = int(np.argmax(min_distance))
        chosen.append(i)
        index = faiss.IndexFlatL2(feats.shape[1])
        index.add(pool[i:i + 1])
        dist = index.search(pool, 1)[0][:, 0]
        for j in range(len(pool)):
            min_distance[j] = min(min_distance[j], dist[j])
    per_pick = (time.perf_counter() - start) / picks
    return unlabeled[chosen], setup, per_pick


def bench_coreset(feats: np.ndarray, budget: int, reference_picks: int, seed: int, repeats: int) -> None:
    """Print ours against the original loop (extrapolated) and whether their first picks agree."""
    labeled = strategies.random_pools(len(feats), [POOL_SIZE], seed)[POOL_SIZE]
    (ours, ours_s), ((reference, setup_s, per_pick_s), _) = best_of(
        repeats,
        lambda: strategies.coreset_select(feats, labeled, budget, progress=False),
        lambda: original_coreset(feats, labeled, reference_picks))
    original_s = setup_s + per_pick_s * budget
    rows, dim = feats.shape
    print(f"coreset {rows}x{dim}, {budget} picks: ours {ours_s:.2f} s, original loop ~{original_s:.1f} s "
          f"(extrapolated from {reference_picks} picks), speed-up {original_s / ours_s:.1f}x")
    same = int(np.sum(ours.indices[:reference_picks] == reference))
    print(f"  first {reference_picks} picks agree: {'yes' if same == reference_picks else 'NO'} "
          f"({same}/{reference_picks}); original: initial search {setup_s:.2f} s, {per_pick_s * 1e3:.1f} ms/pick")


# ---------------------------------------------------------------- 2. k-means

def faiss_training(feats: np.ndarray, k: int) -> None:
    """faiss k-means training alone, with the settings of lowbudget.faiss_ops.kmeans at seed 0."""
    n, dim = feats.shape
    settings = faiss_ops.KmeansSettings()
    faiss.Kmeans(dim, k, niter=settings.niter, nredo=settings.nredo, seed=faiss_ops.FAISS_SEED_OFFSET,
                 max_points_per_centroid=max(1, 2 * n // k)).train(feats)


def bench_kmeans(feats: np.ndarray, budget: int, repeats: int) -> None:
    """Print the k-means sampler's total time over faiss training alone."""
    (_, training_s), (selection, sampler_s) = best_of(
        repeats,
        lambda: faiss_training(feats, budget),
        lambda: strategies.kmeans_select(feats, budget, seed=0))
    ratio = sampler_s / training_s
    rows, dim = feats.shape
    print(f"kmeans {rows}x{dim}, budget {budget}: sampler {sampler_s:.2f} s, faiss training {training_s:.2f} s, "
          f"{selection.filled} filled")
    print(f"kmeans sampler / faiss training = {ratio:.3f} (target <= 1.10){'' if ratio <= 1.10 else '  ABOVE TARGET'}")


# ---------------------------------------------------------------- 3. ImageNet scale and 4. low-budget

def probcover(feats: np.ndarray, budget: int) -> strategies.Selection:
    """ProbCover as sampler.py runs it: δ by the purity heuristic under 10 pseudo-classes."""
    graph, _ = strategies.probcover_graph(feats, None, purity=0.95, pseudo_classes=10)
    return strategies.probcover_select(graph, np.zeros(0, np.int64), budget)[0]


def maxherding(feats: np.ndarray, budget: int) -> strategies.Selection:
    kernel = strategies.herding_kernel(strategies.nearest_neighbours(feats, 100))
    return strategies.maxherding_select(kernel, np.zeros(0, np.int64), budget)


def coreset_from_random_pool(feats: np.ndarray, picks: int, seed: int) -> strategies.Selection:
    labeled = strategies.random_pools(len(feats), [POOL_SIZE], seed)[POOL_SIZE]
    return strategies.coreset_select(feats, labeled, picks, progress=False)


STEPS: dict[str, Callable[[np.ndarray, int, int], Any]] = {
    "coreset": coreset_from_random_pool,
    "kmeans": lambda feats, budget, seed: strategies.kmeans_select(feats, budget, seed=0),
    "typiclust": lambda feats, budget, seed: strategies.typiclust_select(feats, np.zeros(0, np.int64), budget),
    "probcover": lambda feats, budget, seed: probcover(feats, budget),
    "maxherding": lambda feats, budget, seed: maxherding(feats, budget),
}


def child_step(step: str, rows: int, budget: int, seed: int, threads: int | None) -> dict[str, float]:
    """Body of a fresh child process: build the features, run one step, report time and memory."""
    set_threads(threads)
    baseline = memory_status("VmRSS")
    feats, generate_s = timed(synthetic_features, rows, seed)
    _, step_s = timed(STEPS[step], feats, budget, seed)
    return {"seconds": step_s, "generate": generate_s, "baseline": baseline,
            "peak": memory_status("VmHWM"), "matrix": feats.nbytes}


def run_in_child(step: str, rows: int, budget: int, seed: int, threads: int | None) -> dict[str, float]:
    with multiprocessing.get_context("spawn").Pool(1) as child:
        return child.apply(child_step, (step, rows, budget, seed, threads))


def bench_imagenet(step: str, rows: int, picks: int, seed: int, threads: int | None) -> None:
    """Run one ImageNet-scale step in its own spawned process and print its time and peak memory."""
    r = run_in_child(step, rows, picks, seed, threads)
    what = f"{picks} picks" if step == "coreset" else f"budget {picks}"
    print(f"imagenet {step} {rows}x{DIM}, {what}: {r['seconds']:.1f} s "
          f"(features generated in {r['generate']:.1f} s)")
    ratio = r["peak"] / r["matrix"]
    print(f"  peak RSS {r['peak'] / GIB:.2f} GiB = {ratio:.2f} x feature matrix {r['matrix'] / GIB:.2f} GiB "
          f"(target <= 1.5){'' if ratio <= 1.5 else '  ABOVE TARGET'}")
    print(f"  process RSS before the features {r['baseline'] / GIB:.2f} GiB (interpreter, torch, faiss); "
          f"peak above it = {(r['peak'] - r['baseline']) / r['matrix']:.2f} x feature matrix")


LOW_BUDGET_TARGETS = {"typiclust": (30, None), "probcover": (60, 4), "maxherding": (60, None)}  # seconds, GB


def bench_low_budget(rows: int, budget: int, seed: int, threads: int | None) -> None:
    """Time and peak memory of typiclust, probcover and maxherding against k-means, each in a fresh process."""
    reference = run_in_child("kmeans", rows, budget, seed, threads)["seconds"]
    print(f"low-budget {rows}x{DIM}, budget {budget}: kmeans (reference) {reference:.1f} s")
    for step, (seconds, gigabytes) in LOW_BUDGET_TARGETS.items():
        r = run_in_child(step, rows, budget, seed, threads)
        peak_gb = r["peak"] / 1e9
        slow = r["seconds"] > seconds or (gigabytes is not None and peak_gb > gigabytes)
        print(f"  {step}: {r['seconds']:.1f} s = {r['seconds'] / reference:.2f} x kmeans (target <= {seconds} s), "
              f"peak RSS {peak_gb:.2f} GB{f' (target <= {gigabytes} GB)' if gigabytes else ''}"
              f"{'  ABOVE TARGET' if slow else ''}")


# ---------------------------------------------------------------- main

def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="fewer reference picks, a smaller k-means run, no ImageNet scale")
    parser.add_argument("--skip-imagenet", action="store_true", help="leave out the ImageNet-scale steps")
    parser.add_argument("--seed", type=int, default=0, help="seed of the features and the random pool")
    parser.add_argument("--threads", type=int, help="faiss and torch threads (default: their own)")
    parser.add_argument("--repeats", type=int, default=3, help="runs per timing in parts 1 and 2 (best is kept)")
    parser.add_argument("--imagenet-only", action="store_true", help="only the ImageNet-scale steps")
    parser.add_argument("--low-budget-only", action="store_true", help="only part 4 (typiclust, probcover, maxherding)")
    parser.add_argument("--imagenet-rows", type=int, default=1_281_167, help="rows of the ImageNet-scale matrix")
    parser.add_argument("--coreset-picks", type=int, default=13_000, help="core-set picks at ImageNet scale")
    parser.add_argument("--imagenet-steps", nargs="+", choices=("coreset", "kmeans"), default=["coreset", "kmeans"],
                        help="which ImageNet-scale steps to run")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    set_threads(args.threads)
    print(header())
    if args.low_budget_only:
        bench_low_budget(50_000, 100, args.seed, args.threads)
        return
    if not args.imagenet_only:
        feats = synthetic_features(50_000, args.seed)
        bench_coreset(feats, budget=500, reference_picks=5 if args.quick else 20, seed=args.seed,
                      repeats=args.repeats)
        kmeans_feats = synthetic_features(20_000, args.seed) if args.quick else feats
        bench_kmeans(kmeans_feats, budget=200 if args.quick else 1000, repeats=args.repeats)
        del feats, kmeans_feats
        bench_low_budget(20_000 if args.quick else 50_000, 100, args.seed, args.threads)
    if args.quick or args.skip_imagenet:
        return
    for step in args.imagenet_steps:
        picks = args.coreset_picks if step == "coreset" else 1000
        bench_imagenet(step, args.imagenet_rows, picks, args.seed, args.threads)


if __name__ == "__main__":
    main()
