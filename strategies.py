"""Query strategies as pure functions on arrays: no files, no flags, a seed where randomness enters.

Every function returns exactly the requested number of unique dataset indices (int64) or raises
ValueError when the pool cannot supply them. Features are expected L2-normalised, as the cache stores
them; distances are squared Euclidean, which ranks like cosine on unit vectors.

Filling rule (kmeans, accu_kmeans): each cluster contributes its eligible member nearest to its
centroid (ties: lowest index). When a cluster has no eligible member (empty, or every member already
labelled), the shortfall is filled one point per cluster from the clusters with the most eligible
members left (ties: lowest cluster id), each giving its next-nearest eligible member, repeated until
the budget is met. The number of points filled this way is reported.
"""
from __future__ import annotations

from typing import NamedTuple, Sequence

import numpy as np
import torch
from tqdm import tqdm

from tools import faiss_ops

_NONE = np.iinfo(np.int64).max


class Selection(NamedTuple):
    indices: np.ndarray  # int64 dataset indices, exactly the budget, unique
    filled: int  # how many came from the filling rule instead of one-per-cluster


def _check_budget(budget: int, available: int) -> None:
    if budget <= 0 or budget > available:
        raise ValueError(f"budget {budget} is not within 1..{available}, the number of selectable images")


# ---------------------------------------------------------------- random and uniform

def random_pools(num_images: int, budgets: Sequence[int], seed: int = 0) -> dict[int, np.ndarray]:
    """Nested random pools: each budget takes the first entries of one seeded permutation."""
    for budget in budgets:
        _check_budget(budget, num_images)
    order = np.random.default_rng(seed).permutation(num_images).astype(np.int64)
    return {budget: order[:budget].copy() for budget in budgets}


def class_quotas(class_sizes: np.ndarray, budget: int, priority: np.ndarray) -> np.ndarray:
    """Per-class counts summing to `budget`, as equal as class sizes allow (water-filling).

    Every class gets min(size, t) for the largest level t that fits; the remaining r < #classes
    images go one each to the classes still larger than t, in `priority` order. Counts never
    decrease as the budget grows, so pools built from them are nested.
    """
    _check_budget(budget, int(class_sizes.sum()))
    low, high = 0, int(class_sizes.max())
    while low < high:  # largest t with sum(min(size, t)) <= budget
        mid = (low + high + 1) // 2
        low, high = (mid, high) if np.minimum(class_sizes, mid).sum() <= budget else (low, mid - 1)
    counts = np.minimum(class_sizes, low)
    extra = budget - int(counts.sum())
    open_classes = priority[class_sizes[priority] > low]
    counts[open_classes[:extra]] += 1
    return counts


def uniform_pools(labels: np.ndarray, budgets: Sequence[int], seed: int = 0) -> dict[int, np.ndarray]:
    """Class-balanced nested pools: per class a seeded permutation, of which each budget takes a prefix.

    Classes smaller than their share (ImageNet-LT) give all their images and the rest of the budget
    goes to the larger classes, so every pool has exactly `budget` unique images.
    """
    rng = np.random.default_rng(seed)
    classes, class_of = np.unique(labels, return_inverse=True)
    shuffled = rng.permutation(len(labels))
    grouped = shuffled[np.argsort(class_of[shuffled], kind="stable")]  # by class, random inside
    class_sizes = np.bincount(class_of, minlength=len(classes))
    starts = np.concatenate(([0], np.cumsum(class_sizes)[:-1]))
    rank = np.arange(len(labels)) - np.repeat(starts, class_sizes)  # position inside its class
    priority = rng.permutation(len(classes))
    pools = {}
    for budget in budgets:
        counts = class_quotas(class_sizes, budget, priority)
        pools[budget] = grouped[rank < np.repeat(counts, class_sizes)].astype(np.int64)
    return pools


# ---------------------------------------------------------------- k-means family

def _nearest_per_cluster(assign: np.ndarray, dist: np.ndarray, candidates: np.ndarray, k: int) -> np.ndarray:
    """For each cluster, the candidate with the smallest distance to its centroid (ties: lowest
    index), or -1 when it has none. O(N): one pass of ufunc.at, no loop over clusters."""
    ids = np.flatnonzero(candidates)
    groups, values = assign[ids], dist[ids]
    best = np.full(k, np.inf, dtype=values.dtype)
    np.minimum.at(best, groups, values)
    at_best = values == best[groups]
    pick = np.full(k, _NONE, dtype=np.int64)
    np.minimum.at(pick, groups[at_best], ids[at_best])
    pick[pick == _NONE] = -1
    return pick


def cluster_representatives(assign: np.ndarray, dist: np.ndarray, eligible: np.ndarray, budget: int
                            ) -> Selection:
    """One eligible point per cluster (there are `budget` clusters) nearest its centroid, then the
    documented fill up to `budget`."""
    k = budget
    picks = _nearest_per_cluster(assign, dist, eligible, k)
    selected = picks[picks >= 0]
    remaining = eligible.copy()
    remaining[selected] = False
    filled = 0
    while len(selected) < budget:
        sizes = np.bincount(assign[remaining], minlength=k)
        order = np.argsort(-sizes, kind="stable")
        order = order[sizes[order] > 0][:budget - len(selected)]
        extra = _nearest_per_cluster(assign, dist, remaining, k)[order]
        remaining[extra] = False
        selected = np.concatenate([selected, extra])
        filled += len(extra)
    return Selection(selected.astype(np.int64), filled)


def kmeans_select(feats: np.ndarray, budget: int, seed: int = 0, gpu: bool = False,
                  verbose: bool = False) -> Selection:
    """Single-batch k-means: `budget` clusters over all points, each sends its point nearest the centroid."""
    _check_budget(budget, len(feats))
    _, assign, dist = faiss_ops.kmeans(feats, budget, seed=seed, gpu=gpu, verbose=verbose)
    return cluster_representatives(assign, dist, np.ones(len(feats), dtype=bool), budget)


def accu_kmeans_select(feats: np.ndarray, labeled: np.ndarray, budget: int, seed: int = 0, gpu: bool = False,
                       verbose: bool = False) -> Selection:
    """Multi-batch k-means: `budget` clusters over all points (labelled included); each cluster sends
    its unlabelled point nearest the centroid. Returns only the new indices."""
    eligible = np.ones(len(feats), dtype=bool)
    eligible[labeled] = False
    _check_budget(budget, int(eligible.sum()))
    _, assign, dist = faiss_ops.kmeans(feats, budget, seed=seed, gpu=gpu, verbose=verbose)
    return cluster_representatives(assign, dist, eligible, budget)


# ---------------------------------------------------------------- core-set (greedy k-center)

def _sq_dist_to(x, sq_norms, point):
    """Squared L2 distance of every row of x to one point, without an N x D temporary.
    Works on NumPy arrays (CPU: its threaded BLAS matrix-vector product is the fastest here) and on
    torch tensors (CUDA)."""
    return sq_norms - 2 * (x @ point) + (point @ point)


def coreset_select(feats: np.ndarray, labeled: np.ndarray, budget: int, device: str | torch.device = "cpu",
                   gpu_faiss: bool = False, progress: bool = True) -> Selection:
    """Greedy k-center (Sener & Savarese): repeatedly take the point farthest (squared L2) from the
    labelled pool and the points taken so far. Ties: lowest index.

    With an empty pool the first point is the one nearest the mean of all features. Memory: the
    features plus a few N-vectors; each pick is one matrix-vector product.
    """
    labeled = np.asarray(labeled, dtype=np.int64)
    _check_budget(budget, len(feats) - len(labeled))
    feats = np.ascontiguousarray(feats, dtype=np.float32)
    on_cpu = torch.device(device).type == "cpu"
    xp = np if on_cpu else torch
    x = feats if on_cpu else torch.as_tensor(feats).to(device)
    sq_norms = xp.einsum("ij,ij->i", x, x)
    if len(labeled):
        nearest, _ = faiss_ops.flat_search(feats[labeled], feats, 1, gpu_faiss)
        min_dist = nearest[:, 0] if on_cpu else torch.as_tensor(nearest[:, 0]).to(device)
        min_dist[labeled] = -1
        picks = []
    else:
        first = int(xp.argmin(_sq_dist_to(x, sq_norms, x.mean(0))))
        min_dist = _sq_dist_to(x, sq_norms, x[first])
        min_dist[first] = -1
        picks = [first]
    for _ in tqdm(range(budget - len(picks)), desc="select candidates", disable=not progress or None):
        pick = int(xp.argmax(min_dist))
        xp.minimum(min_dist, _sq_dist_to(x, sq_norms, x[pick]), out=min_dist)
        min_dist[pick] = -1
        picks.append(pick)
    return Selection(np.asarray(picks, dtype=np.int64), 0)


# ---------------------------------------------------------------- uncertainty (model in the loop)

def uncertainty(logits: torch.Tensor, name: str) -> torch.Tensor:
    """Per-row uncertainty from logits, larger = more uncertain.

    entropy: -sum p log p, from log_softmax (no NaN when a probability underflows to 0);
    margin: -(p1 - p2), the gap between the two most probable classes;
    least_confidence: -max p.
    """
    log_p = torch.log_softmax(logits.double(), dim=1)
    if name == "entropy":
        return -(log_p.exp() * log_p).sum(1)
    if name == "margin":
        top2 = log_p.topk(2, dim=1).values.exp()
        return -(top2[:, 0] - top2[:, 1])
    if name == "least_confidence":
        return -log_p.max(1).values.exp()
    raise ValueError(f"unknown uncertainty {name!r}")


def most_uncertain(scores: np.ndarray, candidates: np.ndarray, budget: int) -> np.ndarray:
    """The `budget` candidates with the largest scores (ties: the candidate listed first)."""
    _check_budget(budget, len(candidates))
    return np.asarray(candidates, dtype=np.int64)[np.argsort(-scores, kind="stable")[:budget]]
