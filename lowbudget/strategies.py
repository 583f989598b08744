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

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from lowbudget import faiss_ops

_NONE = np.iinfo(np.int64).max


@dataclass(frozen=True)
class Selection:
    """What a strategy returns: the picks, how many came from a fill rule, and the parameters it used."""

    indices: np.ndarray  # int64 row indices, exactly the budget, unique
    filled: int = 0  # how many came from the filling rule instead of the strategy's own criterion
    params: dict[str, Any] = field(default_factory=dict)  # values the sidecar records (e.g. k-means niter)


def _check_budget(budget: int, available: int) -> None:
    if budget <= 0 or budget > available:
        raise ValueError(f"budget {budget} is not within 1..{available}, the number of selectable images")


def _eligible_mask(n: int, taken: np.ndarray) -> np.ndarray:
    """True for the n rows but those `taken`."""
    eligible = np.ones(n, dtype=bool)
    eligible[taken] = False
    return eligible


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


def _kmeans_representatives(feats: np.ndarray, eligible: np.ndarray, budget: int, *, seed: int, gpu: bool,
                            verbose: bool) -> Selection:
    """`budget` faiss k-means clusters over all points, each sending its eligible point nearest the centroid."""
    settings = faiss_ops.KmeansSettings()
    _, assign, dist = faiss_ops.kmeans(feats, budget, seed, settings, gpu=gpu, verbose=verbose)
    selection = cluster_representatives(assign, dist, eligible, budget)
    return Selection(selection.indices, selection.filled, {"niter": settings.niter, "nredo": settings.nredo})


def kmeans_select(feats: np.ndarray, budget: int, seed: int = 0, gpu: bool = False,
                  verbose: bool = False) -> Selection:
    """Single-batch k-means: `budget` clusters over all points, each sends its point nearest the centroid."""
    _check_budget(budget, len(feats))
    return _kmeans_representatives(feats, np.ones(len(feats), dtype=bool), budget, seed=seed, gpu=gpu,
                                   verbose=verbose)


def accu_kmeans_select(feats: np.ndarray, labeled: np.ndarray, budget: int, seed: int = 0, gpu: bool = False,
                       verbose: bool = False) -> Selection:
    """Multi-batch k-means: `budget` clusters over all points (labelled included); each cluster sends
    its unlabelled point nearest the centroid. Returns only the new indices."""
    eligible = _eligible_mask(len(feats), labeled)
    _check_budget(budget, int(eligible.sum()))
    return _kmeans_representatives(feats, eligible, budget, seed=seed, gpu=gpu, verbose=verbose)


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


# ---------------------------------------------------------------- low-budget: TypiClust, ProbCover, MaxHerding

def _seeded_fill(eligible: np.ndarray, count: int, seed: int) -> np.ndarray:
    """`count` eligible indices in a seeded random order: the fill once a greedy objective is exhausted."""
    return np.random.default_rng(seed).permutation(np.flatnonzero(eligible))[:count].astype(np.int64)


def typicality(feats: np.ndarray, knn: int, squared: bool = True, gpu: bool = False) -> np.ndarray:
    """1 / (mean distance to the `knn` nearest other rows + 1e-5), as TypiClust.

    `squared=True` averages squared L2 distances, as the authors' code does (faiss returns squared
    distances); `squared=False` averages plain distances, as the paper's formula writes.
    """
    if len(feats) == 1:
        return np.ones(1)
    knn = max(1, min(knn, len(feats) // 2))
    dist, _ = faiss_ops.flat_search(feats, feats, knn + 1, gpu)
    dist = np.maximum(dist[:, 1:].astype(np.float64), 0)  # the first neighbour is the row itself
    return 1 / ((dist if squared else np.sqrt(dist)).mean(1) + 1e-5)


def _typiclust_cluster(sizes: np.ndarray, taken_per_cluster: np.ndarray,
                       left_per_cluster: np.ndarray, min_cluster_size: int) -> int:
    """The cluster to query next: among clusters with candidates left, those larger than
    `min_cluster_size` first, then fewest labelled or selected points, then largest, then lowest id."""
    open_ids = np.flatnonzero(left_per_cluster > 0)
    keys = (open_ids, -sizes[open_ids], taken_per_cluster[open_ids], sizes[open_ids] <= min_cluster_size)
    return int(open_ids[np.lexsort(keys)[0]])


def typiclust_select(feats: np.ndarray, labeled: np.ndarray, budget: int, knn: int = 20, max_clusters: int = 500,
                     min_cluster_size: int = 5, squared: bool = True, seed: int = 0, gpu: bool = False,
                     verbose: bool = False) -> Selection:
    """TypiClust (Hacohen et al. 2022): min(|L| + budget, max_clusters) k-means clusters; each query
    takes the most typical unlabelled point of the cluster with the fewest labelled (or already
    selected) points, largest first. Typicality is computed among the cluster's remaining
    candidates with k = min(knn, candidates // 2).

    Clusters of `min_cluster_size` points or fewer are skipped while larger ones have candidates;
    picks from them are counted as `filled`. Returns only the new indices.
    """
    labeled = np.asarray(labeled, dtype=np.int64)
    eligible = _eligible_mask(len(feats), labeled)
    _check_budget(budget, int(eligible.sum()))
    k = min(len(labeled) + budget, max_clusters, len(feats))
    _, assign, _ = faiss_ops.kmeans(feats, k, seed, gpu=gpu, verbose=verbose)
    sizes = np.bincount(assign, minlength=k)
    taken = np.bincount(assign[labeled], minlength=k)
    left = np.bincount(assign[eligible], minlength=k)
    picks, filled = [], 0
    for _ in range(budget):
        cluster = _typiclust_cluster(sizes, taken, left, min_cluster_size)
        candidates = np.flatnonzero(eligible & (assign == cluster))
        pick = int(candidates[np.argmax(typicality(feats[candidates], knn, squared, gpu))])
        eligible[pick] = False
        taken[cluster] += 1
        left[cluster] -= 1
        filled += int(sizes[cluster] <= min_cluster_size)
        picks.append(pick)
    return Selection(np.asarray(picks, dtype=np.int64), filled)


@dataclass(frozen=True)
class Neighbours:
    """The k exact nearest rows of every row: squared L2 distances (ascending) and row indices."""
    sq_dist: np.ndarray  # N x k
    index: np.ndarray  # N x k int64


def nearest_neighbours(feats: np.ndarray, k: int, gpu: bool = False) -> Neighbours:
    """faiss exact k-NN of every row among all rows (the row itself included), O(N k) memory."""
    sq_dist, index = faiss_ops.flat_search(feats, feats, min(k, len(feats)), gpu)
    return Neighbours(np.maximum(sq_dist, 0), index)


def nearest_other_label(feats: np.ndarray, labels: np.ndarray, rows: np.ndarray, gpu: bool = False) -> np.ndarray:
    """Exact distance from each of `rows` to the nearest row with another label (inf when there is
    none): per label, one faiss search of its rows against all rows of other labels."""
    dist = np.full(len(rows), np.inf)
    for label in np.unique(labels[rows]):
        queries = labels[rows] == label
        others = labels != label
        if others.any():
            sq, _ = faiss_ops.flat_search(feats[others], feats[rows[queries]], 1, gpu)
            dist[queries] = np.sqrt(np.maximum(sq[:, 0], 0))
    return dist


def purity_delta(feats: np.ndarray, pseudo_labels: np.ndarray, purity: float, neighbours: Neighbours,
                 gpu: bool = False) -> float:
    """The largest δ whose balls are pure for at least a `purity` share of the points (ProbCover's
    heuristic), computed exactly instead of on a grid.

    The ball B_δ(x) = {y : |x - y| < δ} is pure iff δ <= d(x), the distance from x to the nearest
    point of another pseudo-label, so δ is the ceil(purity * N)-th largest d(x). d(x) is read off
    the k nearest neighbours when one has another label; otherwise d(x) >= the k-th neighbour's
    distance, and only the points for which that bound cannot settle the answer are searched in full.
    """
    n = len(feats)
    other = pseudo_labels[neighbours.index] != pseudo_labels[:, None]
    found = other.any(1)
    dist = np.full(n, np.inf)
    dist[found] = np.sqrt(neighbours.sq_dist[found, other[found].argmax(1)])
    rank = n - int(np.ceil(purity * n))  # ascending position of the answer
    bound = np.sqrt(neighbours.sq_dist[:, -1])
    unsure = np.flatnonzero(~found & (bound < np.partition(dist, rank)[rank]))
    dist[unsure] = nearest_other_label(feats, pseudo_labels, unsure, gpu)
    delta = float(np.partition(dist, rank)[rank])
    if not np.isfinite(delta):
        raise ValueError("every ball is pure at any radius: the pseudo-labels need at least two clusters")
    return delta


@dataclass(frozen=True)
class CoverGraph:
    """Symmetric δ-ball graph in CSR form: the ball of row i is indices[indptr[i]:indptr[i+1]] (itself included)."""
    indptr: np.ndarray  # N + 1 int64
    indices: np.ndarray  # E int32 (int64 beyond 2^31 rows)


def _csr(n: int, rows: np.ndarray, cols: np.ndarray) -> CoverGraph:
    """CSR of the symmetric closure of the edges rows -> cols, duplicates removed."""
    keys = np.unique(np.concatenate([rows * n + cols, cols * n + rows]))
    indptr = np.concatenate([[0], np.cumsum(np.bincount(keys // n, minlength=n))])
    return CoverGraph(indptr.astype(np.int64), (keys % n).astype(np.int32 if n < 2 ** 31 else np.int64))


def _range_edges(feats: np.ndarray, rows: np.ndarray, delta: float, max_edges: int, block: int = 4096
                 ) -> tuple[np.ndarray, np.ndarray]:
    """All (row, y) with |x_row - y| < δ, from faiss range searches over blocks of `rows` (CPU:
    faiss has no range search on GPU flat indexes)."""
    if not len(rows):
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    index = faiss_ops.flat_index(feats, gpu=False)
    sources, targets, edges = [], [], 0
    for start in range(0, len(rows), block):
        queries = rows[start:start + block]
        lims, _, found = index.range_search(faiss_ops.as_float32(feats[queries]), delta * delta)
        limits = lims.astype(np.int64)  # uint64 from faiss, which repeat refuses
        sources.append(np.repeat(queries, limits[1:] - limits[:-1]))
        targets.append(found)
        edges += len(found)
        if edges > max_edges:
            raise ValueError(f"δ = {delta:.4g} gives more than {max_edges} edges; choose a smaller δ")
    return np.concatenate(sources), np.concatenate(targets)


def cover_graph(feats: np.ndarray, delta: float, neighbours: Neighbours, max_edges: int = 2 ** 29) -> CoverGraph:
    """Edges x - y for |x - y| < δ, and x - x, as a sparse edge list: memory grows with the number
    of edges, never N x N. A ball smaller than the k precomputed neighbours is read off them; the
    rows whose k-th neighbour is still inside δ are range-searched in full. Raises ValueError past
    `max_edges` (δ too large for memory)."""
    n = len(feats)
    inside = neighbours.sq_dist < delta * delta
    overflow = np.flatnonzero(inside[:, -1]) if neighbours.index.shape[1] < n else np.zeros(0, np.int64)
    inside[overflow] = False
    if inside.sum() > max_edges:
        raise ValueError(f"δ = {delta:.4g} gives more than {max_edges} edges; choose a smaller δ")
    far_rows, far_cols = _range_edges(feats, overflow, delta, max_edges)
    rows = np.concatenate([np.arange(n), np.nonzero(inside)[0], far_rows])
    cols = np.concatenate([np.arange(n), neighbours.index[inside], far_cols])
    return _csr(n, rows.astype(np.int64), cols.astype(np.int64))


def probcover_graph(feats: np.ndarray, delta: float | None = None, purity: float = 0.95,
                    pseudo_classes: int | None = 10, neighbours: int = 64, seed: int = 0, gpu: bool = False
                    ) -> tuple[CoverGraph, float]:
    """ProbCover's ball graph and its δ: the given one, or when None the purity heuristic under
    k-means pseudo-labels with `pseudo_classes` clusters (one faiss run, seeded). One exact k-NN
    pass with `neighbours` neighbours serves both the heuristic and the graph."""
    near = nearest_neighbours(feats, neighbours, gpu)
    if delta is None:
        if pseudo_classes is None:
            raise ValueError("the purity heuristic needs the number of pseudo-classes")
        _, pseudo_labels, _ = faiss_ops.kmeans(feats, pseudo_classes, seed, faiss_ops.KmeansSettings(nredo=1), gpu=gpu)
        delta = purity_delta(feats, pseudo_labels, purity, near, gpu)
    return cover_graph(feats, delta, near), delta


def _ball_members(graph: CoverGraph, rows: np.ndarray) -> np.ndarray:
    """Concatenated balls of `rows`."""
    starts, ends = graph.indptr[rows], graph.indptr[rows + 1]
    lengths = ends - starts
    offsets = np.repeat(starts - np.concatenate([[0], np.cumsum(lengths)[:-1]]), lengths)
    return graph.indices[np.arange(lengths.sum()) + offsets]


class _Coverage:
    """Greedy max-coverage state: which points are covered and how many uncovered points each ball holds."""

    def __init__(self, graph: CoverGraph):
        self.graph = graph
        self.covered = np.zeros(len(graph.indptr) - 1, dtype=bool)
        self.degree = np.diff(graph.indptr)

    def add(self, centres: np.ndarray) -> None:
        """Cover the balls of `centres`; every ball that held a newly covered point loses it."""
        members = np.unique(_ball_members(self.graph, np.atleast_1d(centres)))
        new = members[~self.covered[members]]
        self.covered[new] = True
        np.subtract.at(self.degree, _ball_members(self.graph, new), 1)  # symmetric: y's ball = balls holding y


def probcover_select(graph: CoverGraph, labeled: np.ndarray, budget: int, seed: int = 0) -> tuple[Selection, float]:
    """ProbCover (Yehuda et al. 2022): greedy max coverage of δ-balls. Each pick is the point whose
    ball holds the most uncovered points (ties: lowest index); points covered by `labeled` count as
    covered from the start. Once everything is covered the rest of the budget is a seeded random
    fill (`filled`). Returns the new indices and the share of points covered after them."""
    labeled = np.asarray(labeled, dtype=np.int64)
    n = len(graph.indptr) - 1
    eligible = _eligible_mask(n, labeled)
    _check_budget(budget, int(eligible.sum()))
    state = _Coverage(graph)
    if len(labeled):
        state.add(labeled)
    picks: list[int] = []
    while len(picks) < budget and state.degree.max() > 0:
        pick = int(np.argmax(state.degree))
        state.add(np.array([pick]))
        eligible[pick] = False
        picks.append(pick)
    fill = _seeded_fill(eligible, budget - len(picks), seed)
    return Selection(np.concatenate([np.asarray(picks, dtype=np.int64), fill]), len(fill)), float(state.covered.mean())


def ball_coverage(graph: CoverGraph, pool: np.ndarray) -> float:
    """Share of points within δ of a point of `pool`."""
    state = _Coverage(graph)
    if len(pool):
        state.add(np.asarray(pool, dtype=np.int64))
    return float(state.covered.mean())


@dataclass(frozen=True)
class HerdingKernel:
    """Gaussian kernel truncated to each row's k nearest neighbours: row j holds k(x_j, x) for x in kNN(j)."""
    weight: np.ndarray  # N x k float64
    index: np.ndarray  # N x k int64
    bandwidth: float


def herding_kernel(neighbours: Neighbours, bandwidth: float | None = None) -> HerdingKernel:
    """exp(-|x - y|^2 / (2 σ^2)) on the k nearest neighbours of every row (itself included), 0
    beyond them: O(N k) memory instead of N x N.

    σ = `bandwidth`, or when None the median over rows of the mean distance to their neighbours
    (the row itself left out): a scale set by the data, like the median heuristic.
    """
    sq_dist = neighbours.sq_dist.astype(np.float64)
    if bandwidth is None:
        others = sq_dist[:, 1:] if sq_dist.shape[1] > 1 else sq_dist
        bandwidth = float(np.median(np.sqrt(others).mean(1))) or 1.0
    return HerdingKernel(np.exp(-sq_dist / (2 * bandwidth ** 2)), neighbours.index, bandwidth)


def maxherding_select(kernel: HerdingKernel, labeled: np.ndarray, budget: int, seed: int = 0) -> Selection:
    """MaxHerding (Bae et al. 2024): greedy maximisation of the kernel coverage sum_j max_{l in L} k(x_j, x_l).
    Each pick is argmax_x sum_j max(k(x_j, x) - c_j, 0), c_j being the current coverage of x_j
    (ties: lowest index). Exact for the truncated kernel; updates touch only the rows that hold the
    pick. A seeded random fill takes over if no point adds coverage (`filled`)."""
    labeled = np.asarray(labeled, dtype=np.int64)
    n = len(kernel.weight)
    eligible = _eligible_mask(n, labeled)
    _check_budget(budget, int(eligible.sum()))
    flat_index = kernel.index.ravel()
    order = np.argsort(flat_index, kind="stable")  # column view: which rows hold x
    col_ptr = np.concatenate([[0], np.cumsum(np.bincount(flat_index, minlength=n))])
    cover = np.zeros(n)
    gain = np.bincount(flat_index, weights=kernel.weight.ravel(), minlength=n)

    def add(x: int) -> None:
        entries = order[col_ptr[x]:col_ptr[x + 1]]
        rows, value = entries // kernel.weight.shape[1], kernel.weight.ravel()[entries]
        better = value > cover[rows]
        rows, value = rows[better], value[better]
        row_weights = kernel.weight[rows]
        lost = np.maximum(row_weights - cover[rows, None], 0) - np.maximum(row_weights - value[:, None], 0)
        np.subtract.at(gain, kernel.index[rows].ravel(), lost.ravel())
        cover[rows] = value

    for x in labeled:
        add(int(x))
    picks: list[int] = []
    while len(picks) < budget:
        masked = np.where(eligible, gain, -np.inf)
        pick = int(np.argmax(masked))
        if masked[pick] <= 1e-12:
            break
        add(pick)
        eligible[pick] = False
        picks.append(pick)
    fill = _seeded_fill(eligible, budget - len(picks), seed)
    return Selection(np.concatenate([np.asarray(picks, dtype=np.int64), fill]), len(fill))


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
