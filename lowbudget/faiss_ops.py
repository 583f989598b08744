"""Exact nearest-neighbour search and k-means with faiss, on CPU or on all GPUs (k-means may train on a
sample of the points, for many clusters on a CPU)."""
from __future__ import annotations

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
