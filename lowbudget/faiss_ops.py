"""Exact nearest-neighbour search and k-means with faiss, on CPU or on all GPUs (k-means may train on a
sample of the points, for many clusters on a CPU); an IVF index
with its probes tuned to a measured recall for approximate neighbours of many rows."""
from __future__ import annotations

import math
from dataclasses import dataclass

import faiss
import numpy as np

FAISS_SEED_OFFSET = 1234  # faiss' own default k-means seed: --seed 0 reproduces the original's clustering


def as_float32(x: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(x, dtype=np.float32)


def flat_index(base: np.ndarray, gpu: bool) -> faiss.Index:
    """Exact squared-L2 index over `base`, cloned to all GPUs (sharded) when `gpu`."""
    base = as_float32(base)
    index: faiss.Index = faiss.IndexFlatL2(base.shape[1])
    if gpu:
        options = faiss.GpuMultipleClonerOptions()
        options.shard = True
        index = faiss.index_cpu_to_all_gpus(index, co=options)
    index.add(base)
    return index


def flat_search(base: np.ndarray, queries: np.ndarray, k: int, gpu: bool = False
                ) -> tuple[np.ndarray, np.ndarray]:
    """k exact nearest rows of `base` for every query: (squared distances, indices)."""
    return flat_index(base, gpu).search(as_float32(queries), k)


@dataclass(frozen=True)
class KmeansSettings:
    """faiss k-means iterations and restarts, and the points it trains on: all (`sample` None, the
    original's) or a seeded sample of `sample` points per cluster (faiss' own subsampling; every point is
    then assigned to its nearest centroid exactly). The defaults are the original's."""

    niter: int = 20
    nredo: int = 5
    sample: int | None = None


ORIGINAL_KMEANS = KmeansSettings()  # the k-means baseline's settings, the original's


def kmeans(feats: np.ndarray, k: int, seed: int = 0, settings: KmeansSettings = KmeansSettings(), *,
           gpu: bool = False, verbose: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """faiss k-means, as the original on all points by default: (centroids, assignment, sq. distance).

    max_points_per_centroid = 2N // k keeps faiss from subsampling (or `settings.sample` makes it sample);
    the best of `settings.nredo` runs is kept; every point is then assigned to its nearest centroid exactly.
    """
    feats = as_float32(feats)
    n, dim = feats.shape
    per_centroid = settings.sample or max(1, 2 * n // k)
    km = faiss.Kmeans(dim, k, niter=settings.niter, nredo=settings.nredo, verbose=verbose,
                      seed=FAISS_SEED_OFFSET + seed, max_points_per_centroid=per_centroid, gpu=gpu)
    km.train(feats)
    assert km.centroids is not None  # set by train()
    dist, assign = flat_search(km.centroids, feats, 1, gpu)
    return km.centroids, assign[:, 0], dist[:, 0]


# ---------------------------------------------------------------- approximate nearest neighbours

NEIGHBOUR_SEARCHES = ("auto", "exact", "ivf")
APPROXIMATE_FROM_ROWS = 200_000  # --neighbours auto searches an IVF index from this many rows on (docs/speed.md)
TARGET_RECALL = 0.95  # recall@k the number of probed lists is raised until it reaches
FIRST_PROBES, MAX_PROBES = 8, 256  # probed lists: doubled from the first until the target or the cap
TRAINING_ROWS_PER_LIST = 64  # the IVF quantizer is trained on at most this many sampled rows per list
RECALL_QUERIES = 1000  # sampled rows whose exact neighbours measure the recall


def uses_ivf(method: str, rows: int, gpu: bool) -> bool:
    """Whether `method` ("auto", "exact", "ivf") searches an IVF index for `rows` rows: auto does from
    APPROXIMATE_FROM_ROWS rows on a CPU, and never on a GPU, where exact search is fast."""
    if method not in NEIGHBOUR_SEARCHES:
        raise ValueError(f"unknown neighbour search {method!r}; choose one of {', '.join(NEIGHBOUR_SEARCHES)}")
    return method == "ivf" or (method == "auto" and not gpu and rows >= APPROXIMATE_FROM_ROWS)


def ivf_lists(rows: int) -> int:
    """Inverted lists of the IVF index: 4 sqrt(N), rounded."""
    return max(1, round(4 * math.sqrt(rows)))


def ivf_index(base: np.ndarray, seed: int = 0) -> faiss.IndexIVFFlat:
    """IVF-Flat index (squared L2, exact distances within the probed lists) over `base`, its quantizer
    trained on a seeded sample of at most TRAINING_ROWS_PER_LIST rows per list. CPU: it serves range
    searches, which faiss' GPU indexes do not."""
    rows, dim = base.shape
    lists = ivf_lists(rows)
    sample = np.random.default_rng(seed).choice(rows, min(rows, TRAINING_ROWS_PER_LIST * lists), replace=False)
    index = faiss.IndexIVFFlat(faiss.IndexFlatL2(dim), dim, lists)
    index.cp.seed = FAISS_SEED_OFFSET + seed
    index.train(as_float32(base[np.sort(sample)]))
    for start in range(0, rows, 65536):  # float32 copies a block at a time
        index.add(as_float32(base[start:start + 65536]))
    return index


def recall_sample(rows: int, seed: int) -> np.ndarray:
    """The seeded random rows (RECALL_QUERIES at most) whose exact neighbours measure a recall."""
    return np.sort(np.random.default_rng(seed).choice(rows, min(rows, RECALL_QUERIES), replace=False))


def found_share(found: np.ndarray, base: np.ndarray, queries: np.ndarray, exact_sq: np.ndarray) -> float:
    """recall@k of `found` (queries x >= k row indices of `base`, -1 for none) given the queries' exact
    squared distances to their k nearest rows (`exact_sq`, k columns): the share of the first k found
    rows that are at most as far as the exact k-th (ties count as found), averaged over the queries."""
    rows = found[:, :exact_sq.shape[1]]
    hit = rows >= 0
    diff = as_float32(base[np.where(hit, rows, 0).ravel()]).reshape(*rows.shape, -1) - as_float32(queries)[:, None]
    sq_dist = np.where(hit, np.einsum("qkd,qkd->qk", diff, diff), np.inf)
    return float(np.mean(sq_dist <= exact_sq[:, -1:] * (1 + 1e-5) + 1e-6))


def sample_search(base: np.ndarray, queries: np.ndarray, k: int, block: int = 65536) -> np.ndarray:
    """Exact squared distances (ascending) from each of a few `queries` to their k nearest rows of `base`,
    searched a block of rows at a time: no float32 copy of the whole of `base`, unlike flat_search."""
    queries = as_float32(queries)
    best = np.full((len(queries), 0), np.inf, dtype=np.float32)
    for start in range(0, len(base), block):
        sq, _ = faiss.knn(queries, as_float32(base[start:start + block]), min(k, len(base[start:start + block])))
        best = np.sort(np.concatenate([best, sq], 1), 1)[:, :k]
    return best


def index_recall(index: faiss.Index, base: np.ndarray, k: int, seed: int = 0) -> float:
    """recall@k of `index` (over `base`) against exact flat search, on a seeded sample of rows as queries:
    exact search of the sample only (RECALL_QUERIES x N distances)."""
    queries = as_float32(base[recall_sample(len(base), seed)])
    k = min(k, len(base))
    return found_share(index.search(queries, k)[1], base, queries, sample_search(base, queries, k))


def tune_probes(index: faiss.IndexIVF, base: np.ndarray, k: int, seed: int = 0,
                target: float = TARGET_RECALL) -> float:
    """Set index.nprobe to the fewest lists (FIRST_PROBES, doubled, at most MAX_PROBES or all lists) whose
    recall@k on the seeded sample reaches `target`; return the recall reached (below `target` at the cap)."""
    queries = as_float32(base[recall_sample(len(base), seed)])
    k = min(k, len(base))
    exact_sq = sample_search(base, queries, k)
    cap = min(MAX_PROBES, index.nlist)
    index.nprobe = min(FIRST_PROBES, cap)
    while True:
        recall = found_share(index.search(queries, k)[1], base, queries, exact_sq)
        if recall >= target or index.nprobe >= cap:
            return recall
        index.nprobe = min(2 * index.nprobe, cap)


@dataclass(frozen=True)
class TunedIndex:
    """An IVF index over all rows, its nprobe tuned by tune_probes, and the recall@k it reached."""

    index: faiss.IndexIVF
    k: int
    recall: float


def tuned_ivf_index(base: np.ndarray, k: int, seed: int = 0) -> TunedIndex:
    """ivf_index over `base` with the fewest probes whose recall@k reaches TARGET_RECALL (tune_probes)."""
    index = ivf_index(base, seed)
    return TunedIndex(index, k, tune_probes(index, base, k, seed))


def search_among(index: faiss.IndexIVF, queries: np.ndarray, allowed: np.ndarray, k: int
                 ) -> tuple[np.ndarray, np.ndarray]:
    """index.search restricted to the rows where the boolean `allowed` is True (same nprobe)."""
    bits = np.packbits(allowed, bitorder="little")  # kept alive, with the selector, until the search returns
    selector = faiss.IDSelectorBitmap(len(allowed), faiss.swig_ptr(bits))
    params = faiss.SearchParametersIVF()
    params.sel, params.nprobe = selector, index.nprobe
    return index.search(as_float32(queries), k, params=params)
