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
   500 picks; the first picks of both are compared. Then core-set against the plain greedy this
   project ran before (one matrix-vector product over all rows per pick), 60,000 x 1,280, 1,000
   picks from a 1,000 pool (20,000 x 1,280, 300 picks with --quick), both in full in one spawned
   process: times (target <= 2 s), whether the picks agree (where they differ, the float64
   distances of both picks at the first difference: a tie within float32 rounding), both covering
   radii, and the peak RSS (--coreset-only runs just this comparison).
2. k-means overhead, 50,000 x 512, budget 1,000 (20,000 x 512, budget 200 with --quick): total
   time of `strategies.kmeans_select` over faiss k-means training alone with the same settings
   (niter 20, nredo 5, seed 1234, no subsampling). Target: ratio <= 1.10.
3. ImageNet scale (not with --quick or --skip-imagenet): 1,281,167 x 512 features (2.6 GB),
   `coreset_select` with 13,000 picks from a 1,000 random pool (target <= 3 min) and `kmeans_select` with
   budget 1,000, and MaxHerding with budget 1,000 from an empty pool as sampler.py runs it (on a seeded
   sample of --herding-sample rows: target <= 20 min, peak <= 2 x matrix), and ProbCover as in part 7
   (target <= 20 min, peak <= 2 x matrix). Each step runs in its own
   freshly spawned process that builds the features itself, so its peak RSS (VmHWM of that process) holds
   the matrix exactly once; printed as a multiple of the matrix size. Target: peak <= 1.5 x matrix. After
   core-set, the same process runs the plain greedy for --coreset-reference-picks picks (100) and
   extrapolates its time per pick to 13,000 picks (the plain greedy reads the whole matrix per pick:
   about 0.15 s a pick on an idle 2-core CPU); their first picks are compared as in part 1. k-means takes
   about 15 min; --imagenet-rows, --coreset-picks, --imagenet-steps and --imagenet-only (leave out the
   other parts) make smaller runs.
4. Low-budget strategies, 50,000 x 512 (20,000 x 512 with --quick), budget 100 from an empty pool,
   each in its own spawned process (time and peak RSS): TypiClust (target <= 30 s), ProbCover with δ
   chosen by the purity heuristic under 10 pseudo-classes (target <= 60 s and <= 4 GB peak) and
   MaxHerding with the kernel sampler.py uses from an empty pool (target <= 60 s). Each is also printed as a
   ratio to k-means with the same budget, timed in the same way in the same run.
5. TypiClust's k-means, 60,000 x 1,280, budget 1,000 from an empty pool (500 clusters; 20,000 x 512,
   budget 200 with --quick), each in a spawned process: its time with the default settings (one
   faiss run above 50 clusters) against the best of 5 runs it used before, the k-means objective and
   the quality of the picks on the mixture's labels (mean typicality, components covered, accuracy
   of labelling every row by its nearest pick); and, where scikit-activeml is installed, its TypiClust on
   the same features and budget in a spawned process (time and picks; otherwise the side-by-side
   measurement on real features is printed).
   --typiclust-only runs just this part.
6. k-means with many clusters: the baseline's k-means on all points (the original's) against training
   on a sample of 40 points per cluster (--kmeans-sample 40, then every point assigned exactly), each in
   a spawned process, 200,000 x 512 with 2,000 clusters and 20
   iterations (--kmeans-many ROWS CLUSTERS ITERATIONS; 20,000 x 512, 500 clusters, 5 iterations with
   --quick), and at ImageNet scale 1,281,167 x 512 with 13,000 clusters for 2 iterations: seconds an
   iteration and the exact assignment, each sampler run extrapolated (20 iterations x 5 restarts for all
   points, x 1 for the sample) and the objectives. --kmeans-many-only runs just this part.
7. ProbCover's neighbours, exact against approximate (--neighbours ivf), each in a spawned process,
   60,000 x 1,280 (--approximate-feats FILE: real features from an .npz/.npy instead), budget 1,000
   from an empty pool, δ auto under 10 pseudo-classes: time, the inverted file's recall@64 and probed
   cells, δ, the share of common picks (target >= 95 %) and the peak RSS; then, unless --skip-imagenet,
   ProbCover with the inverted file at 1,281,167 x 512, budget 1,000 (target <= 20 min, peak <= 2 x matrix).
   --approximate-only runs just this part.

Parts 1 and 2 report the best of --repeats runs (default 3; the two sides of a ratio interleaved),
which damps the effect of other processes on a small machine; the header shows the load average.
"""
from __future__ import annotations

import argparse
import importlib.util
import multiprocessing
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import torch

import strategies
from lowbudget import cover, faiss_ops
from lowbudget.strategy_table import STRATEGIES, Inputs

DIM = 512
CENTRES = 1000
NOISE = 0.03  # per-coordinate noise: noise norm ~0.7 against unit centres, cosine to centre ~0.8
BLOCK_ROWS = 16384  # features are generated in blocks of this many rows, in place
POOL_SIZE = 1000  # random initial labelled pool of the core-set runs
GIB = 2 ** 30


# ---------------------------------------------------------------- helpers

def synthetic_mixture(rows: int, seed: int, dim: int = DIM) -> tuple[np.ndarray, np.ndarray]:
    """Unit-norm float32 rows of a Gaussian mixture, filled block by block into one array, and each
    row's mixture component (a class label for measuring selection quality)."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((CENTRES, dim), dtype=np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    weights = rng.lognormal(size=CENTRES)
    weights /= weights.sum()
    feats = np.empty((rows, dim), dtype=np.float32)
    labels = np.empty(rows, dtype=np.int64)
    for start in range(0, rows, BLOCK_ROWS):
        block = feats[start:start + BLOCK_ROWS]
        rng.standard_normal(out=block, dtype=np.float32)
        block *= NOISE
        labels[start:start + BLOCK_ROWS] = rng.choice(CENTRES, size=len(block), p=weights)
        block += centres[labels[start:start + BLOCK_ROWS]]
        block /= np.linalg.norm(block, axis=1, keepdims=True)
    return feats, labels


def synthetic_features(rows: int, seed: int, dim: int = DIM) -> np.ndarray:
    return synthetic_mixture(rows, seed, dim)[0]


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


def reset_peak_memory() -> None:
    """Set this process' VmHWM back to its current RSS (Linux: 5 to /proc/self/clear_refs)."""
    Path("/proc/self/clear_refs").write_text("5")


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


def plain_greedy(feats: np.ndarray, labeled: np.ndarray, picks: int) -> tuple[np.ndarray, float, float]:
    """The core-set greedy as this project ran it before its lazy evaluation: one matrix-vector product
    over every row per pick. Returns (picks, seconds of the set-up: norms and the pool search,
    seconds per pick)."""
    start = time.perf_counter()
    sq_norms = np.einsum("ij,ij->i", feats, feats)
    min_dist = faiss_ops.flat_search(feats[labeled], feats, 1)[0][:, 0]
    min_dist[labeled] = -1
    setup = time.perf_counter() - start
    chosen = []
    start = time.perf_counter()
    for _ in range(picks):
        pick = int(np.argmax(min_dist))
        chosen.append(pick)
        np.minimum(min_dist, sq_norms - 2 * (feats @ feats[pick]) + feats[pick] @ feats[pick], out=min_dist)
        min_dist[pick] = -1
    return np.asarray(chosen, dtype=np.int64), setup, (time.perf_counter() - start) / picks


def nearest_sq_dist64(feats: np.ndarray, centres: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """Squared distance in float64 of each of `rows` to its nearest of `centres` (row indices)."""
    x, c = feats[rows].astype(np.float64), feats[centres].astype(np.float64)
    return ((x ** 2).sum(1)[:, None] - 2 * x @ c.T + (c ** 2).sum(1)[None]).min(1)


def covering_radius(feats: np.ndarray, centres: np.ndarray) -> float:
    """Largest squared distance from a row to its nearest centre (faiss, float32)."""
    return float(faiss_ops.flat_search(feats[centres], feats, 1)[0].max())


def child_coreset(rows: int, dim: int, picks: int, reference_picks: int, seed: int,
                  threads: int | None) -> dict[str, Any]:
    """Body of a fresh child process: core-set from a random pool, then the plain greedy on its first
    `reference_picks` picks; their times, this process' peak RSS after ours, and how the picks agree."""
    set_threads(threads)
    baseline = memory_status("VmRSS")
    feats = synthetic_features(rows, seed, dim)
    labeled = strategies.random_pools(rows, [POOL_SIZE], seed)[POOL_SIZE]
    reset_peak_memory()  # the peak below is the selection's, not that of building the features
    before = memory_status("VmRSS")
    ours, ours_s = timed(strategies.coreset_select, feats, labeled, picks, progress=False)
    r: dict[str, Any] = {"seconds": ours_s, "baseline": baseline, "peak": memory_status("VmHWM"),
                         "matrix": feats.nbytes, "before": before}
    plain, r["plain_setup"], r["plain_per_pick"] = plain_greedy(feats, labeled, reference_picks)
    differ = np.flatnonzero(ours.indices[:reference_picks] != plain)
    r["differ"] = len(differ)
    if len(differ):
        first = int(differ[0])
        r["first_differ"] = first
        r["first_dist"] = nearest_sq_dist64(feats, np.concatenate([labeled, plain[:first]]),
                                            np.array([ours.indices[first], plain[first]]))
    if reference_picks == picks:
        r["radius"] = [covering_radius(feats, np.concatenate([labeled, chosen])) for chosen in (ours.indices, plain)]
    return r


def within_rounding(a: float, b: float) -> bool:
    """Equal up to float32 rounding of a squared distance computed as |x|^2 - 2 x.c + |c|^2."""
    return abs(a - b) <= 1e-5 * max(abs(b), 1.0)


def print_peak(r: dict[str, Any], target: float = 1.5) -> None:
    """Peak RSS against the target (1.5 x the feature matrix unless said): the whole process' peak, or where the
    selection's own peak was taken (`before`: RSS when it started), the matrix plus what it added."""
    ratio = r["peak"] / r["matrix"]
    print(f"  peak RSS {r['peak'] / GIB:.2f} GiB = {ratio:.2f} x feature matrix {r['matrix'] / GIB:.2f} GiB")
    print(f"  process RSS before the features {r['baseline'] / GIB:.2f} GiB (interpreter, torch, faiss); "
          f"peak above it = {(r['peak'] - r['baseline']) / r['matrix']:.2f} x feature matrix")
    if "before" in r:
        added = (r["peak"] - r["before"]) / r["matrix"]
        ratio = 1 + added
        print(f"  the selection itself added {(r['peak'] - r['before']) / GIB:.3f} GiB to the RSS it started "
              f"with = {added:.3f} x feature matrix")
    print(f"  memory: {ratio:.2f} x feature matrix (target <= {target:g}){'' if ratio <= target else '  ABOVE TARGET'}")


def bench_coreset_exact(rows: int, dim: int, picks: int, reference_picks: int, seed: int, threads: int | None,
                        target_s: float | None) -> None:
    """Print core-set against the plain greedy timed in the same process (extrapolated per pick when it
    runs fewer picks), whether their picks agree, and the peak memory."""
    with multiprocessing.get_context("spawn").Pool(1) as child:
        r = child.apply(child_coreset, (rows, dim, picks, reference_picks, seed, threads))
    plain_s = r["plain_setup"] + r["plain_per_pick"] * picks
    how = "timed" if reference_picks == picks else f"extrapolated from {reference_picks} picks"
    target = "" if target_s is None else (f" (target <= {target_s:g} s)"
                                          f"{'' if r['seconds'] <= target_s else '  ABOVE TARGET'}")
    print(f"coreset {rows}x{dim}, {picks} picks from a {POOL_SIZE} pool: {r['seconds']:.1f} s{target}; "
          f"plain greedy {plain_s:.1f} s "
          f"({how}: set-up {r['plain_setup']:.1f} s + {r['plain_per_pick'] * 1e3:.1f} ms/pick), "
          f"speed-up {plain_s / r['seconds']:.1f}x")
    if r["differ"]:
        ours_d, plain_d = r["first_dist"]
        print(f"  first {reference_picks} picks: {r['differ']} differ, the first at #{r['first_differ']}, "
              f"distances there (float64) ours {ours_d:.9f} vs plain {plain_d:.9f}: "
              f"{'a tie within float32 rounding' if within_rounding(ours_d, plain_d) else 'NOT A TIE'}")
    else:
        print(f"  first {reference_picks} picks: all the same as the plain greedy's")
    if "radius" in r:
        ours_r, plain_r = r["radius"]
        print(f"  covering radius (squared) ours {ours_r:.7f} vs plain {plain_r:.7f}: "
              f"{'equal' if within_rounding(ours_r, plain_r) else 'DIFFERENT'}")
    print_peak(r)


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
    graph, _ = cover.probcover_graph(feats, None, purity=0.95, pseudo_classes=10)
    return strategies.probcover_select(graph, np.zeros(0, np.int64), budget)[0]


def maxherding(feats: np.ndarray, budget: int) -> strategies.Selection:
    """MaxHerding as sampler.py runs it by default (its --bandwidth and --herding-sample), from an empty pool."""
    row = STRATEGIES["maxherding"]
    return row.build(Inputs(feats, None), row.defaults())(np.zeros(0, np.int64), budget)


STEPS: dict[str, Callable[[np.ndarray, int, int], Any]] = {
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


IMAGENET_TARGETS = {"maxherding": (20 * 60, 2.0)}  # seconds, peak RSS as a multiple of the feature matrix


def bench_imagenet(step: str, rows: int, budget: int, seed: int, threads: int | None) -> None:
    """Run one ImageNet-scale step in its own spawned process and print its time and peak memory."""
    r = run_in_child(step, rows, budget, seed, threads)
    seconds, memory = IMAGENET_TARGETS.get(step, (None, 1.5))
    target = "" if seconds is None else (f" (target <= {seconds} s)"
                                         f"{'' if r['seconds'] <= seconds else '  ABOVE TARGET'}")
    print(f"imagenet {step} {rows}x{DIM}, budget {budget}: {r['seconds']:.1f} s{target} "
          f"(features generated in {r['generate']:.1f} s)")
    print_peak(r, memory)


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


# ---------------------------------------------------------------- 5. TypiClust's k-means

# Side by side on the demo's real 60,000 x 1,280 features, budget 1,000, both under the same load
# (docs/speed.md): scikit-activeml 1.0.1's TypiClust against this suite's, seconds.
SKACTIVEML_TYPICLUST_S, SUITE_TYPICLUST_S = 895.2, 72.8


def mean_typicality(feats: np.ndarray, picks: np.ndarray, knn: int = 20) -> float:
    """Mean TypiClust typicality of `picks` among all rows: 1 / (mean squared distance to the `knn`
    nearest other rows + 1e-5)."""
    sq_dist, _ = faiss_ops.flat_search(feats, feats[picks], knn + 1)
    return float((1 / (np.maximum(sq_dist[:, 1:], 0).mean(1) + 1e-5)).mean())


def pick_quality(feats: np.ndarray, labels: np.ndarray, picks: np.ndarray) -> dict[str, float]:
    """Mixture components the picks cover, and the accuracy of labelling every row by its nearest pick."""
    _, nearest = faiss_ops.flat_search(feats[picks], feats, 1)
    accuracy = float((labels[picks][nearest[:, 0]] == labels).mean())
    return {"classes": len(np.unique(labels[picks])), "accuracy": accuracy}


def child_typiclust(rows: int, dim: int, budget: int, seed: int, kmeans: faiss_ops.KmeansSettings | None,
                    threads: int | None) -> dict[str, float]:
    """Body of a fresh child process: TypiClust from an empty pool on the labelled mixture, its time, its
    k-means objective and the quality of its picks (mean typicality, components covered, and the
    accuracy of labelling every row by its nearest pick)."""
    set_threads(threads)
    feats, labels = synthetic_mixture(rows, seed, dim)
    selection, seconds = timed(strategies.typiclust_select, feats, np.zeros(0, np.int64), budget, seed=seed,
                               kmeans=kmeans)
    picks = selection.indices
    return {"seconds": seconds, "objective": selection.params["kmeans_objective"],
            "nredo": selection.params["nredo"], "typicality": mean_typicality(feats, picks),
            **pick_quality(feats, labels, picks)}


def bench_typiclust(rows: int, dim: int, budget: int, seed: int, threads: int | None) -> None:
    """TypiClust with its k-means settings against the best of 5 runs it used before, each in a fresh process."""
    before_settings = faiss_ops.KmeansSettings(niter=20, nredo=5)
    with multiprocessing.get_context("spawn").Pool(1) as child:
        before = child.apply(child_typiclust, (rows, dim, budget, seed, before_settings, threads))
    with multiprocessing.get_context("spawn").Pool(1) as child:
        now = child.apply(child_typiclust, (rows, dim, budget, seed, None, threads))
    speed_up = before["seconds"] / now["seconds"]
    print(f"typiclust {rows}x{dim}, budget {budget}: {now['seconds']:.1f} s with nredo {now['nredo']}, "
          f"{before['seconds']:.1f} s with nredo 5 before: {speed_up:.1f}x faster")
    for name, r in (("nredo 5", before), (f"nredo {now['nredo']}", now)):
        print(f"  {name}: k-means objective {r['objective']:.2f}, mean typicality of the picks "
              f"{r['typicality']:.4f}, mixture components covered {r['classes']}, 1-NN accuracy {r['accuracy']:.4f}")
    if importlib.util.find_spec("skactiveml") is None:
        print(f"  scikit-activeml is not installed (pip install scikit-activeml to time its TypiClust here); "
              f"side by side on real features: {SKACTIVEML_TYPICLUST_S} s against {SUITE_TYPICLUST_S} s, "
              f"{SKACTIVEML_TYPICLUST_S / SUITE_TYPICLUST_S:.1f}x (target >= 10)")
        return
    with multiprocessing.get_context("spawn").Pool(1) as child:
        theirs = child.apply(child_skactiveml_typiclust, (rows, dim, budget, seed, threads))
    print(f"  scikit-activeml's TypiClust, same features and budget: {theirs['seconds']:.1f} s, this suite's "
          f"{theirs['seconds'] / now['seconds']:.1f}x faster (target >= 10); its picks: mixture components covered "
          f"{theirs['classes']}, 1-NN accuracy {theirs['accuracy']:.4f}")


def child_skactiveml_typiclust(rows: int, dim: int, budget: int, seed: int, threads: int | None
                               ) -> dict[str, float]:
    """Body of a fresh child process: scikit-activeml's TypiClust (its defaults, k = 20 neighbours as this
    suite's) from an empty pool on the same mixture: its time and the quality of its picks."""
    from skactiveml.pool import TypiClust  # optional: only where scikit-activeml is installed

    set_threads(threads)
    feats, labels = synthetic_mixture(rows, seed, dim)
    picks, seconds = timed(TypiClust(random_state=seed, k=20).query, feats, np.full(rows, np.nan), batch_size=budget)
    return {"seconds": seconds, **pick_quality(feats, labels, np.asarray(picks, dtype=np.int64))}


# ---------------------------------------------------------------- 6. k-means with many clusters

SAMPLED_KMEANS = faiss_ops.KmeansSettings(nredo=1, sample=40)  # --kmeans-restarts 1 --kmeans-sample 40


def child_kmeans_many(rows: int, clusters: int, niter: int, sample: int | None, seed: int,
                      threads: int | None) -> dict[str, float]:
    """Body of a fresh child process: one faiss k-means run of `niter` iterations on all points or on
    `sample` points per cluster, then the exact assignment of every point: the time of each, the objective
    and the peak RSS."""
    set_threads(threads)
    feats = synthetic_features(rows, seed)
    settings = faiss_ops.KmeansSettings(niter=niter, nredo=1, sample=sample)
    (centroids, _, dist), seconds = timed(faiss_ops.kmeans, feats, clusters, seed, settings)
    _, assign_s = timed(faiss_ops.flat_search, centroids, feats, 1)
    return {"train": max(seconds - assign_s, 0.0), "assign": assign_s, "objective": float(dist.sum()),
            "peak": memory_status("VmHWM"), "matrix": feats.nbytes}


def bench_kmeans_many(rows: int, clusters: int, niter: int, seed: int, threads: int | None) -> None:
    """The k-means baseline on all points against training on a sample (SAMPLED_KMEANS), each in a fresh
    process for `niter` iterations: time, objective, and each sampler run extrapolated (20 iterations x its
    restarts, then the exact assignment)."""
    runs = {}
    for name, sample in (("all points", None), (f"{SAMPLED_KMEANS.sample} per cluster", SAMPLED_KMEANS.sample)):
        with multiprocessing.get_context("spawn").Pool(1) as child:
            runs[name] = child.apply(child_kmeans_many, (rows, clusters, niter, sample, seed, threads))
    print(f"kmeans {rows}x{DIM}, {clusters} clusters, {niter} iterations:")
    for (name, r), restarts in zip(runs.items(), (faiss_ops.ORIGINAL_KMEANS.nredo, SAMPLED_KMEANS.nredo), strict=True):
        whole = r["train"] / niter * faiss_ops.ORIGINAL_KMEANS.niter * restarts + r["assign"]
        print(f"  {name}: {r['train'] / niter:.1f} s an iteration, {r['assign']:.1f} s the assignment; a sampler run "
              f"with {restarts} restart(s): about {whole / 60:.1f} min; objective {r['objective']:.1f}, "
              f"peak RSS {r['peak'] / r['matrix']:.2f} x matrix")
    full, sampled = runs.values()
    print(f"  sampled / all points: {sampled['objective'] / full['objective']:.4f} x the objective after "
          f"{niter} iterations")


# ---------------------------------------------------------------- 7. ProbCover's neighbours

def approximate_features(rows: int, dim: int, seed: int, path: str | None) -> np.ndarray:
    """The mixture, or the L2-normalised features of `path` (an .npz with `feats`, or an .npy)."""
    if path is None:
        return synthetic_features(rows, seed, dim)
    loaded = np.load(path)
    feats = np.asarray(loaded["feats"] if path.endswith(".npz") else loaded, dtype=np.float32)
    return feats / np.linalg.norm(feats, axis=1, keepdims=True)


def child_probcover_neighbours(rows: int, dim: int, budget: int, method: str, seed: int, path: str | None,
                               threads: int | None) -> dict[str, Any]:
    """Body of a fresh child process: ProbCover (δ auto, 10 pseudo-classes) from an empty pool with `method`
    neighbours: its picks, δ, time, the recall and probed cells of the inverted file, the peak RSS."""
    set_threads(threads)
    feats = approximate_features(rows, dim, seed, path)
    start = time.perf_counter()
    approximate = cover.probcover_index(feats, method, seed=seed)
    index_s = time.perf_counter() - start
    graph, delta = cover.probcover_graph(feats, None, purity=0.95, pseudo_classes=10, seed=seed,
                                              approximate=approximate)
    selection, covered = strategies.probcover_select(graph, np.zeros(0, np.int64), budget, seed=seed)
    return {"seconds": time.perf_counter() - start, "index": index_s, "picks": selection.indices, "delta": delta,
            "covered": covered,
            "recall": None if approximate is None else approximate.recall,
            "probes": None if approximate is None else approximate.probes,
            "cells": None if approximate is None else approximate.cells,
            "peak": memory_status("VmHWM"), "matrix": feats.nbytes, "rows": len(feats), "dim": feats.shape[1]}


def run_probcover_neighbours(rows: int, dim: int, budget: int, method: str, seed: int, path: str | None,
                             threads: int | None) -> dict[str, Any]:
    with multiprocessing.get_context("spawn").Pool(1) as child:
        return child.apply(child_probcover_neighbours, (rows, dim, budget, method, seed, path, threads))


def describe_probcover(name: str, r: dict[str, Any]) -> str:
    index = "" if r["recall"] is None else (f" ({r['index']:.1f} s of it the index and its probes), recall@64 "
                                            f"{r['recall']:.3f} ({r['probes']} of {r['cells']} cells probed)")
    return (f"  {name}: {r['seconds']:.1f} s{index}, delta {r['delta']:.4f}, {r['covered']:.2%} covered, "
            f"peak RSS {r['peak'] / GIB:.2f} GiB = {r['peak'] / r['matrix']:.2f} x matrix")


def bench_probcover_neighbours(rows: int, dim: int, budget: int, seed: int, threads: int | None,
                               path: str | None = None) -> None:
    """ProbCover with exact against inverted-file neighbours, each in a fresh process: time, recall, δ, common
    picks."""
    exact = run_probcover_neighbours(rows, dim, budget, "exact", seed, path, threads)
    ivf = run_probcover_neighbours(rows, dim, budget, "ivf", seed, path, threads)
    common = len(np.intersect1d(exact["picks"], ivf["picks"])) / budget
    print(f"probcover neighbours {exact['rows']}x{exact['dim']}{'' if path is None else f' ({path})'}, "
          f"budget {budget}:")
    print(describe_probcover("exact", exact))
    print(describe_probcover("ivf", ivf))
    print(f"  ivf / exact: {ivf['seconds'] / exact['seconds']:.2f} x the time, {common:.1%} common picks "
          f"(target >= 95 %){'' if common >= 0.95 else '  BELOW TARGET'}, delta x {ivf['delta'] / exact['delta']:.4f}")


def bench_probcover_imagenet(rows: int, budget: int, seed: int, threads: int | None) -> None:
    """ProbCover with inverted-file neighbours at ImageNet scale, in a fresh process: time and peak memory."""
    r = run_probcover_neighbours(rows, DIM, budget, "ivf", seed, None, threads)
    slow = r["seconds"] > 20 * 60 or r["peak"] > 2 * r["matrix"]
    print(f"imagenet probcover (ivf) {rows}x{DIM}, budget {budget}: (targets <= 20 min, <= 2 x matrix)"
          f"{'  ABOVE TARGET' if slow else ''}")
    print(describe_probcover("ivf", r))


# ---------------------------------------------------------------- main

def kmeans_many_size(args: argparse.Namespace) -> tuple[int, int, int]:
    """(rows, clusters, iterations) of part 6 from --kmeans-many."""
    rows, clusters, niter = args.kmeans_many
    return rows, clusters, niter


IMAGENET_STEPS = ("coreset", "kmeans", "kmeans-many", "maxherding", "probcover")


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
    parser.add_argument("--typiclust-only", action="store_true", help="only part 5 (TypiClust's k-means settings)")
    parser.add_argument("--coreset-only", action="store_true",
                        help="only part 1's core-set against the plain greedy, 60,000 x 1,280, 1,000 picks")
    parser.add_argument("--imagenet-rows", type=int, default=1_281_167, help="rows of the ImageNet-scale matrix")
    parser.add_argument("--coreset-picks", type=int, default=13_000, help="core-set picks at ImageNet scale")
    parser.add_argument("--coreset-reference-picks", type=int, default=100,
                        help="picks of the plain greedy at ImageNet scale, extrapolated to --coreset-picks")
    parser.add_argument("--imagenet-steps", nargs="+", choices=IMAGENET_STEPS, default=list(IMAGENET_STEPS),
                        help="which ImageNet-scale steps to run")
    parser.add_argument("--kmeans-many-only", action="store_true",
                        help="only part 6 (k-means with many clusters, all points against a sample)")
    parser.add_argument("--kmeans-many", type=int, nargs=3, default=[200_000, 2_000, 20],
                        metavar=("ROWS", "CLUSTERS", "ITERATIONS"), help="the size of part 6 outside ImageNet scale")
    parser.add_argument("--approximate-only", action="store_true",
                        help="only part 7 (ProbCover with exact against IVF neighbours)")
    parser.add_argument("--approximate-feats", help="part 7: real features (.npz with feats, or .npy) instead of "
                        "the 60,000 x 1,280 mixture")
    parser.add_argument("--approximate-budget", type=int, default=1000, help="part 7: ProbCover's budget")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    set_threads(args.threads)
    print(header())
    if args.low_budget_only:
        bench_low_budget(50_000, 100, args.seed, args.threads)
        return
    if args.typiclust_only:
        bench_typiclust(60_000, 1280, 1000, args.seed, args.threads)
        return
    if args.coreset_only:
        bench_coreset_exact(60_000, 1280, 1000, 1000, args.seed, args.threads, target_s=2)
        return
    if args.kmeans_many_only:
        bench_kmeans_many(*kmeans_many_size(args), args.seed, args.threads)
        return
    if args.approximate_only:
        bench_probcover_neighbours(60_000, 1280, args.approximate_budget, args.seed, args.threads,
                                   args.approximate_feats)
        if not args.skip_imagenet:
            bench_probcover_imagenet(args.imagenet_rows, 1000, args.seed, args.threads)
        return
    if not args.imagenet_only:
        feats = synthetic_features(50_000, args.seed)
        bench_coreset(feats, budget=500, reference_picks=5 if args.quick else 20, seed=args.seed,
                      repeats=args.repeats)
        if args.quick:
            bench_coreset_exact(20_000, 1280, 300, 300, args.seed, args.threads, target_s=None)
        else:
            bench_coreset_exact(60_000, 1280, 1000, 1000, args.seed, args.threads, target_s=2)
        kmeans_feats = synthetic_features(20_000, args.seed) if args.quick else feats
        bench_kmeans(kmeans_feats, budget=200 if args.quick else 1000, repeats=args.repeats)
        del feats, kmeans_feats
        bench_low_budget(20_000 if args.quick else 50_000, 100, args.seed, args.threads)
        if args.quick:
            bench_typiclust(20_000, 512, 200, args.seed, args.threads)
            bench_kmeans_many(20_000, 500, 5, args.seed, args.threads)
        else:
            bench_typiclust(60_000, 1280, 1000, args.seed, args.threads)
            bench_kmeans_many(*kmeans_many_size(args), args.seed, args.threads)
    if args.quick or args.skip_imagenet:
        return
    for step in args.imagenet_steps:
        if step == "coreset":
            print("imagenet ", end="")
            bench_coreset_exact(args.imagenet_rows, DIM, args.coreset_picks, args.coreset_reference_picks,
                                args.seed, args.threads, target_s=180)
        elif step in ("kmeans", "maxherding"):
            bench_imagenet(step, args.imagenet_rows, 1000, args.seed, args.threads)
        elif step == "probcover":
            bench_probcover_imagenet(args.imagenet_rows, 1000, args.seed, args.threads)
        else:
            bench_kmeans_many(args.imagenet_rows, 13_000, 2, args.seed, args.threads)


if __name__ == "__main__":
    main()
